"""The environment a stage subprocess gets: what it needs to run, and no secrets it did not ask for.

``stage_environment(extra, secrets=("HF_TOKEN",))`` starts from nothing and copies in an allow-list
of this process's variables (PATH, HOME, locale, temp dir, the REFINERY_* and DAGSTER_* settings,
the Hugging Face offline switches and cache locations, CUDA device selection), the offline
defaults, then ``extra``. A token reaches the child only when its caller names it.

Dagster's PipesSubprocessClient merges ``os.environ`` under any ``env`` it is given, so the
variables it inherits cannot be removed there; ``python -m refinery.environment [--secret NAME]
-- COMMAND...`` re-executes COMMAND with ``stage_environment()`` plus the DAGSTER_PIPES_* variables
Dagster added, so COMMAND's /proc/<pid>/environ holds nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping

# Hub access off, telemetry off, logs unbuffered; an online run turns the hub back on by setting
# the *_OFFLINE variables to 0 in its own environment (they are copied over these defaults).
# Progress bars off: llm-compressor draws one per layer and calibration batch (thousands of lines in
# a run's log); the stages log their own progress with an ETA (refinery.progress).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
PASSED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "VIRTUAL_ENV",
          "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE",
          "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", *OFFLINE_ENV)
PASSED_PREFIXES = ("REFINERY_", "DAGSTER_")
PIPES_PREFIX = "DAGSTER_PIPES_"  # set by Dagster for one launch; never inherited from a parent's


def stage_environment(extra: Mapping[str, str] | None = None, *, secrets: Iterable[str] = (),
                      source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a stage subprocess: allow-listed variables of ``source`` (this process's
    environment), the offline defaults, the named ``secrets`` that are set, then ``extra``."""
    source = os.environ if source is None else source
    env = dict(OFFLINE_ENV)
    for key, value in source.items():
        if key in PASSED or (key.startswith(PASSED_PREFIXES) and not key.startswith(PIPES_PREFIX)):
            env[key] = value
    env.update({name: source[name] for name in secrets if name in source})
    env.update(extra or {})
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run COMMAND with the stage environment only.")
    parser.add_argument("--secret", action="append", default=[], metavar="NAME",
                        help="a variable holding a secret that COMMAND needs (e.g. HF_TOKEN)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no COMMAND given")
    pipes = {k: v for k, v in os.environ.items() if k.startswith(PIPES_PREFIX)}
    os.execvpe(command[0], command, stage_environment(pipes, secrets=args.secret))
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
