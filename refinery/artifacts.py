"""Versioned, atomically written artifact directories with a manifest.

Every stage writes into a staging directory ``<home>/artifacts/<stage>/.staging-<version>-<pid>-<rand>``;
only after every file is written does the manifest (SHA-256 of every file, the resolved config,
the inputs' versions) go in and the directory get renamed to ``<stage>/<version>``. A rename is
atomic on one filesystem, so an interrupted stage leaves a ``.staging-*`` directory that nothing
reads, never a half-written artifact that looks finished; the next start removes staging
directories whose process is gone (``clean_stale_staging``).

A version is normally the stage's *identity* (refinery.stages.identity: a hash of its inputs'
versions, its resolved config and its code), so two runs that would make the same artifact make
the same directory: a run that finds it finished skips the work, and two runs writing it at once
both publish the same content, the second rename failing harmlessly (the first one wins).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refinery.config import home_dir

MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"

# The version the runner planned for the stage it is running (its identity); staged_artifact
# uses it for that stage, so stage code does not have to thread it through.
_PLANNED: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("refinery_planned_versions", default={})


class ArtifactCorrupted(RuntimeError):
    """A finished artifact whose files no longer match the checksums in its manifest."""


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
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
            if not p.is_file() or p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
                bad.append(rel)
        return bad

    def require_intact(self) -> Artifact:
        """Raise ArtifactCorrupted naming every changed or missing file; return self when intact."""
        bad = self.verify()
        if bad:
            raise ArtifactCorrupted(
                f"{self.stage} {self.version}: {len(bad)} file(s) changed or missing since the artifact was "
                f"published: {', '.join(str(self.path / b) for b in bad[:5])}. Delete {self.path} and "
                "materialize the stage again")
        return self


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
    """A version for an artifact made outside a planned run (tests, ad-hoc calls): the time."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@contextmanager
def planned_versions(versions: dict[str, str]) -> Iterator[None]:
    """Within this block, ``staged_artifact(stage)`` publishes ``stage`` as ``versions[stage]``."""
    token = _PLANNED.set({**_PLANNED.get(), **versions})
    try:
        yield
    finally:
        _PLANNED.reset(token)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _staging_pid(name: str) -> int | None:
    """The writer's pid from ``.staging-<version>-<pid>-<rand>`` (None for another layout)."""
    parts = name[len(STAGING_PREFIX):].rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def clean_stale_staging(home: Path | None = None, log: Callable[[str], Any] = print) -> list[Path]:
    """Remove staging directories left by writers that are gone (SIGKILL, out of memory).

    A staging directory names its writer's pid; one whose pid is no longer running on this
    machine is debris. Directories of live writers (a concurrent run) are left alone.
    """
    removed = []
    root = artifacts_root(home)
    if not root.is_dir():
        return removed
    for stage_dir in root.iterdir():
        if not stage_dir.is_dir():
            continue
        for entry in stage_dir.glob(STAGING_PREFIX + "*"):
            pid = _staging_pid(entry.name)
            if pid is not None and _pid_alive(pid):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            log(f"removed stale staging directory {entry} (writer pid {pid} is gone)")
    return removed


CONTENT = "content"  # staged_artifact(version=CONTENT): the version is a hash of the files written


def content_version(files: dict[str, dict[str, Any]]) -> str:
    """A version named by what an artifact holds: the hash of its files' names and checksums."""
    blob = json.dumps({rel: meta["sha256"] for rel, meta in files.items()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextmanager
def staged_artifact(stage: str, *, config: dict[str, Any] | None = None,
                    inputs: dict[str, Any] | None = None, home: Path | None = None,
                    version: str | None = None) -> Iterator[Staging]:
    """Yield a staging directory; on a clean exit, write the manifest and publish it atomically.

    The version is ``version``, else the one planned for this stage (the runner's identity), else
    the time. ``version=CONTENT`` names it by its files (content_version): a cheap stage that makes
    the same data again makes the same version, so nothing downstream changes. When another writer
    published the same version first, its artifact is kept and this one discarded (same name, same
    content): ``Staging.path`` then points at it.
    """
    stage_dir = artifacts_root(home) / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    version = version or _PLANNED.get().get(stage) or new_version()
    staging_path = stage_dir / f"{STAGING_PREFIX}{version}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    staging_path.mkdir()
    st = Staging(stage, staging_path, version, dict(config or {}), dict(inputs or {}))
    try:
        yield st
        publish(st, stage_dir)
    finally:
        shutil.rmtree(staging_path, ignore_errors=True)  # gone after a publish; debris otherwise


def publish(st: Staging, stage_dir: Path) -> Artifact:
    files = {}
    for p in sorted(st.path.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(st.path))] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    if st.version == CONTENT:
        st.version = content_version(files)
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
    try:
        os.rename(st.path, final)  # fails when the directory exists: never replaces a finished one
    except OSError:
        if not (final / MANIFEST).is_file():
            raise
        # A concurrent writer of the same identity won; its artifact is the one.
        st.path = final
        return load_artifact(final)
    st.path = final
    write_json_atomic(stage_dir / "LATEST", {"version": st.version})
    return Artifact(final, manifest)


def load_artifact(path: Path, *, verify: bool = False) -> Artifact:
    """The finished artifact at ``path``; with ``verify``, its files are checked against the
    manifest first (ArtifactCorrupted names what changed)."""
    manifest_file = Path(path) / MANIFEST
    if not manifest_file.exists():
        raise FileNotFoundError(f"{path} is not a finished artifact (no {MANIFEST})")
    art = Artifact(Path(path), json.loads(manifest_file.read_text(encoding="utf-8")))
    return art.require_intact() if verify else art


def remember(stage: str, identity: str, version: str, home: Path | None = None) -> None:
    """Record that input identity ``identity`` made ``version`` (content-named artifacts)."""
    write_json_atomic(artifacts_root(home) / stage / ".made-from" / f"{identity}.json", {"version": version})


def recall(stage: str, identity: str, home: Path | None = None) -> Artifact | None:
    """The finished artifact that input identity ``identity`` made before, or None."""
    path = artifacts_root(home) / stage / ".made-from" / f"{identity}.json"
    if not path.is_file():
        return None
    return find(stage, json.loads(path.read_text(encoding="utf-8"))["version"], home)


def find(stage: str, version: str, home: Path | None = None) -> Artifact | None:
    """The finished artifact ``stage/version``, or None."""
    path = artifacts_root(home) / stage / version
    return load_artifact(path) if (path / MANIFEST).is_file() else None


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
