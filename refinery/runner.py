"""Out-of-process entry point for the heavy stages: ``python -m refinery.runner STAGE --input NAME=DIR``.

Dagster launches this through Pipes (resources.pipes.subprocess_client here, PipesK8sClient on a
cluster), so an out-of-memory crash kills this process, not Dagster, while the stage's log lines
stream into the run. Without Pipes (a plain shell) it runs the same and prints a JSON summary.

What every stage gets from here, so no stage has to do it itself:
- stale staging directories of dead writers are removed first;
- every input artifact's files are checked against its manifest (a changed file is an error
  naming it, before any work);
- the artifact's identity (refinery.stages.identity) is its version: when that artifact already
  exists and is intact, nothing runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refinery import stages
from refinery.artifacts import Artifact, clean_stale_staging, find, load_artifact, planned_versions
from refinery.config import Profile, home_dir, load_profile


def resolve_stage(name: str) -> stages.Stage:
    """A stage by its name, or by its module (``refinery.prune``)."""
    for st in stages.STAGES:
        if name in (st.name, st.module):
            return st
    return stages.stage(name)  # raises, listing the known names


def run(stage_name: str, inputs: dict[str, Path], profile: Profile | str | None = None, *,
        version: str | None = None, home: Path | None = None,
        log: Callable[[str], Any] = print) -> tuple[Artifact, bool]:
    """Make (or find) the stage's artifact; returns (artifact, reused)."""
    st = resolve_stage(stage_name)
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    home = home or home_dir()
    clean_stale_staging(home, log)
    missing = sorted(set(st.inputs) - set(inputs))
    if missing:
        raise ValueError(f"{st.name} needs --input for {missing} (NAME=ARTIFACT_DIR)")
    artifacts = {name: load_artifact(inputs[name], verify=True) for name in st.inputs}
    version = version or stages.identity(st, profile, {k: a.version for k, a in artifacts.items()})
    existing = find(st.name, version, home)
    if existing is not None:
        damaged = existing.verify()
        if not damaged:
            log(f"{st.name}: {version} exists and is intact; nothing to do")
            return existing, True
        aside = set_aside(existing)
        log(f"{st.name}: {version} was damaged ({', '.join(damaged[:3])} changed); moved to {aside}, making it again")
    module = importlib.import_module(st.module)
    _llamacpp_follows(profile)
    with planned_versions({st.name: version}):
        artifact = module.build(profile, inputs=artifacts, home=home, log=log)
    if artifact.version != version:
        raise RuntimeError(f"{st.module}.build published {artifact.version}, not the planned {version}")
    return artifact, False


def _llamacpp_follows(profile: Profile) -> None:
    """GGUFs run in llama.cpp on the GPU too when the stages' device is a GPU (refinery.llamacpp)."""
    from refinery import device

    if device.select(profile).device == "cuda":
        os.environ["REFINERY_LLAMACPP_GPU"] = "1"


def set_aside(artifact: Artifact) -> Path:
    """Move a damaged artifact out of the way (kept for inspection, never read again)."""
    aside = artifact.path.with_name(f".damaged-{artifact.path.name}-{uuid.uuid4().hex[:6]}")
    os.rename(artifact.path, aside)
    return aside


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", help=f"one of {[s.name for s in stages.STAGES]} (or its module)")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=ARTIFACT_DIR")
    parser.add_argument("--profile", default=None, help="profile name or path (default REFINERY_PROFILE)")
    parser.add_argument("--version", default=None, help="the planned version (Dagster computes it)")
    args = parser.parse_args(argv)
    inputs = {}
    for item in args.input:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"--input expects NAME=ARTIFACT_DIR, got {item!r}")
        inputs[name] = Path(path)
    start = time.perf_counter()
    if os.environ.get("DAGSTER_PIPES_CONTEXT"):  # launched by Dagster Pipes: logs stream into the run
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            artifact, reused = run(args.stage, inputs, args.profile, version=args.version, log=pipes.log.info)
    else:
        artifact, reused = run(args.stage, inputs, args.profile, version=args.version)
    print(json.dumps({"stage": artifact.stage, "version": artifact.version, "path": str(artifact.path),
                      "reused": reused, "seconds": round(time.perf_counter() - start, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
