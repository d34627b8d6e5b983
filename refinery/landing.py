"""The landing directory: where new data files are dropped for the new-data sensor.

A file is identified by its name, modification time and size (``key``), so a file replaced by a
new version is new data again. Files stay in ``landing/`` until the raw_corpus artifact that
ingested them is published; then they move to ``landing/processed/<raw_corpus version>/``, so a
crash loses nothing (the file is still waiting) and nothing is ingested twice (it has left the
directory the sensor watches). A full raw_corpus rebuild ingests ``processed/`` too, so data that
arrived through the landing directory stays in the corpus.

Whole files only: a file is ingested once it is *complete*, that is when a ``<name>.done`` marker
sits next to it (a producer that can write one should), or when its size and mtime are the same
at two sensor evaluations in a row (landing.interval_seconds apart): a copy still running has
grown in between. A producer that can stall longer than that interval mid-file must use the
marker, or copy under a hidden name (``.name``, ignored) and rename it when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from refinery.config import SourceConfig
from refinery.ingest import FILE_KINDS

if TYPE_CHECKING:  # curation pulls in fastText and numpy; the sensor only lists files
    from refinery.curate import CurateResult

PROCESSED = "processed"
DONE_SUFFIX = ".done"  # ``data.jsonl.done`` marks ``data.jsonl`` complete


@dataclass(frozen=True)
class LandingFile:
    path: Path
    mtime_ns: int
    size: int

    @property
    def key(self) -> str:
        """Name, mtime and size: what makes a landed file new data."""
        return f"{self.path.name}:{self.mtime_ns}:{self.size}"

    def complete(self, seen: set[str]) -> bool:
        """Its ``.done`` marker exists, or it is unchanged since the previous look (``seen`` keys)."""
        return self.key in seen or done_marker(self.path).exists()


def done_marker(path: Path) -> Path:
    return path.with_name(path.name + DONE_SUFFIX)


def pending_files(landing_dir: Path) -> list[LandingFile]:
    """Data files waiting in the landing directory (not processed/, not hidden), sorted by name."""
    if not landing_dir.is_dir():
        return []
    found = []
    for p in sorted(landing_dir.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FILE_KINDS:
            st = p.stat()
            found.append(LandingFile(p.resolve(), st.st_mtime_ns, st.st_size))
    return found


def source_name(version: str, file: Path) -> str:
    """``landing/<raw_corpus version>/<file name>``: the same name before and after the file is archived."""
    return f"landing/{version}/{Path(file).name}"


def landing_sources(files: list[Path], version: str) -> list[SourceConfig]:
    """One ingest source per landed file (each file may have its own format)."""
    names = [source_name(version, f) for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"landing files with the same name in one batch: {sorted(map(str, files))}")
    return [SourceConfig(name=name, path=str(Path(f).resolve()), format="auto")
            for name, f in zip(names, files, strict=True)]


def processed_sources(landing_dir: Path) -> list[SourceConfig]:
    """Every file that earlier landing runs ingested, for a full rebuild: ``landing/<version>/<name>``."""
    root = landing_dir / PROCESSED
    if not root.is_dir():
        return []
    files = sorted(p for p in root.glob("*/*") if p.is_file() and p.suffix.lower() in FILE_KINDS)
    return [SourceConfig(name=source_name(p.parent.name, p), path=str(p.resolve()), format="auto") for p in files]


def archive(files: list[Path], landing_dir: Path, version: str) -> dict[str, str]:
    """Move ingested files to ``processed/<version>/`` (same filesystem: a rename); old -> new path."""
    target = landing_dir / PROCESSED / version
    target.mkdir(parents=True, exist_ok=True)
    moved = {}
    for f in files:
        dest = target / Path(f).name
        os.replace(f, dest)
        done_marker(Path(f)).unlink(missing_ok=True)  # else a new file of that name would count as complete
        moved[str(f)] = str(dest)
    return moved


def merge_curated(existing_dir: Path, new: CurateResult) -> CurateResult:
    """The existing deduped_corpus plus a landing batch curated against it.

    ``curate(..., existing=...)`` returns only the new batch's fate (and an index that already holds
    both); the published version must be the whole corpus, so the existing kept, rejected and
    cluster rows come first and the counts add up.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from refinery.curate import conversation_chars, length_percentiles

    existing_dir = Path(existing_dir)
    metrics = json.loads((existing_dir / "manifest.json").read_text(encoding="utf-8"))["metrics"]

    def union(name: str, new_rows: pa.Table) -> pa.Table:
        return pa.concat_tables([pq.read_table(existing_dir / name).cast(new_rows.schema), new_rows])

    def add(a: dict, b: dict) -> dict:
        return {k: a.get(k, 0) + b.get(k, 0) for k in dict.fromkeys([*a, *b])}

    kept = union("kept.parquet", new.kept)
    per_source = {s: add(metrics["per_source"].get(s, {}), new.per_source.get(s, {}))
                  for s in dict.fromkeys([*metrics["per_source"], *new.per_source])}
    chars = conversation_chars(kept["messages"])
    sources = np.array(kept["source"].to_pylist(), dtype=object)
    return replace(new, kept=kept, rejected=union("rejected.parquet", new.rejected),
                   clusters=union("clusters.parquet", new.clusters), counts=add(metrics["counts"], new.counts),
                   per_source=per_source, languages=add(metrics["languages"], new.languages),
                   length_percentiles={s: length_percentiles(chars[sources == s]) for s in per_source})
