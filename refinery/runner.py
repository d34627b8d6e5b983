"""Out-of-process entry point for heavy stages: ``python -m refinery.runner MODULE --input NAME=PATH``.

Dagster launches this through Pipes (PipesSubprocessClient here; PipesK8sClient on a cluster),
so an out-of-memory crash kills this process, not Dagster, while logs and metadata still stream
back into the run. Without Pipes (a plain shell) it runs the same and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from refinery.artifacts import Artifact, load_artifact
from refinery.config import home_dir, load_profile


def _scalar_metadata(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested metrics to the scalar values Dagster metadata can show."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_scalar_metadata(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)[:4000]
    return out


def run(module: str, inputs: dict[str, Path], profile_name: str | None = None) -> Artifact:
    profile = load_profile(profile_name)
    artifacts = {name: load_artifact(path) for name, path in inputs.items()}
    stage = importlib.import_module(module)
    start = time.perf_counter()

    if os.environ.get("DAGSTER_PIPES_CONTEXT"):  # launched by Dagster Pipes
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            artifact = stage.build(profile, inputs=artifacts, home=home_dir(), log=pipes.log.info)
            metadata = _scalar_metadata(artifact.manifest.get("metrics", {}))
            metadata.update(path=str(artifact.path), version=artifact.version,
                            bytes_on_disk=artifact.manifest["bytes"],
                            stage_seconds=round(time.perf_counter() - start, 2))
            pipes.report_asset_materialization(metadata=metadata, data_version=artifact.version)
    else:
        artifact = stage.build(profile, inputs=artifacts, home=home_dir(), log=print)
    return artifact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("module", help="stage module, e.g. refinery.train")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=ARTIFACT_DIR")
    parser.add_argument("--profile", default=None)
    args = parser.parse_args(argv)
    inputs = {}
    for item in args.input:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"--input expects NAME=ARTIFACT_DIR, got {item!r}")
        inputs[name] = Path(path)
    artifact = run(args.module, inputs, args.profile)
    print(json.dumps({"stage": artifact.stage, "version": artifact.version, "path": str(artifact.path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
