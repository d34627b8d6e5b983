"""The home directory: everything refinery writes lives under it (REFINERY_HOME, default var/).

``python -m refinery.home`` creates it and the Dagster instance config (SQLite storage, telemetry
off) and prints its path. Dagster's own DAGSTER_HOME is ``<home>/dagster``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from refinery.config import home_dir

DAGSTER_YAML = """\
# Written by refinery (python -m refinery.home): a local instance with SQLite storage.
storage:
  sqlite:
    base_dir: {base}
local_artifact_storage:
  module: dagster._core.storage.root
  class: LocalArtifactStorage
  config:
    base_dir: {base}
telemetry:
  enabled: false
"""


def prepare_home(home: Path | None = None) -> Path:
    """Create the home layout and dagster.yaml (kept if present); returns the home directory."""
    home = (home or home_dir()).resolve()
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or home / "dagster")
    for sub in ("artifacts", "work", "cache", "landing"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML.format(base=dagster_home), encoding="utf-8")
    return home


if __name__ == "__main__":
    print(prepare_home())
    sys.exit(0)
