"""Versioned, atomically written artifact directories with a manifest.

Every stage writes into a staging directory ``<home>/artifacts/<stage>/.staging-<id>``; only
after every file is written does the manifest (SHA-256 of every file, the resolved config, the
inputs' versions) go in and the directory get renamed to ``<stage>/<version>``. A rename is atomic
on one filesystem, so an interrupted stage leaves a ``.staging-*`` directory that nothing reads,
never a half-written artifact that looks finished. ``LATEST`` is replaced atomically too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refinery.config import home_dir

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class Artifact:
    """A finished artifact directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def ref(self) -> dict[str, str]:
        """How a downstream artifact records this one as an input."""
        return {"stage": self.stage, "version": self.version, "path": str(self.path),
                "manifest_sha256": sha256_file(self.path / MANIFEST)}

    def verify(self) -> list[str]:
        """Files whose checksum no longer matches the manifest (empty when intact)."""
        bad = []
        for rel, meta in self.manifest["files"].items():
            p = self.path / rel
            if not p.exists() or sha256_file(p) != meta["sha256"]:
                bad.append(rel)
        return bad


@dataclass
class Staging:
    """An artifact being written. Put files under ``path``; add metrics as you go."""

    stage: str
    path: Path
    version: str
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def artifacts_root(home: Path | None = None) -> Path:
    return (home or home_dir()) / "artifacts"


def new_version() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@contextmanager
def staged_artifact(stage: str, *, config: dict[str, Any] | None = None,
                    inputs: dict[str, Any] | None = None, home: Path | None = None,
                    version: str | None = None) -> Iterator[Staging]:
    """Yield a staging directory; on a clean exit, write the manifest and publish it atomically."""
    stage_dir = artifacts_root(home) / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    version = version or new_version()
    staging_path = stage_dir / f".staging-{version}"
    staging_path.mkdir()
    st = Staging(stage, staging_path, version, dict(config or {}), dict(inputs or {}))
    try:
        yield st
    except BaseException:
        shutil.rmtree(staging_path, ignore_errors=True)
        raise
    publish(st, stage_dir)


def publish(st: Staging, stage_dir: Path) -> Artifact:
    files = {}
    for p in sorted(st.path.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(st.path))] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "stage": st.stage,
        "version": st.version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": st.config,
        "inputs": st.inputs,
        "metrics": st.metrics,
        "files": files,
        "bytes": sum(f["bytes"] for f in files.values()),
    }
    write_json_atomic(st.path / MANIFEST, manifest)
    final = stage_dir / st.version
    os.replace(st.path, final)
    st.path = final
    write_json_atomic(stage_dir / "LATEST", {"version": st.version})
    return Artifact(final, manifest)


def load_artifact(path: Path) -> Artifact:
    manifest_file = path / MANIFEST
    if not manifest_file.exists():
        raise FileNotFoundError(f"{path} is not a finished artifact (no {MANIFEST})")
    return Artifact(path, json.loads(manifest_file.read_text(encoding="utf-8")))


def latest(stage: str, home: Path | None = None) -> Artifact | None:
    """The most recently published artifact of a stage, or None."""
    pointer = artifacts_root(home) / stage / "LATEST"
    if not pointer.exists():
        return None
    version = json.loads(pointer.read_text(encoding="utf-8"))["version"]
    return load_artifact(artifacts_root(home) / stage / version)


def require_latest(stage: str, home: Path | None = None) -> Artifact:
    art = latest(stage, home)
    if art is None:
        raise FileNotFoundError(f"no finished '{stage}' artifact under {artifacts_root(home)}; "
                                f"materialize {stage} first")
    return art
