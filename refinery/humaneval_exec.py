"""Run model-written HumanEval code in a sandboxed subprocess (opt-in: profile.eval.humaneval_execute).

Each program runs in a fresh ``python -I -S`` (isolated: no site-packages, no user paths, no
PYTHON* variables) with an empty environment, a temporary working directory, CPU-time, memory,
file-size and process limits, its own session (so a timeout kills everything it started), and,
where the kernel allows it, no network (``unshare -n``; root or an unprivileged user namespace
with ``-r``). This limits damage from buggy generated code; it is not a security boundary against
a hostile model, which is why it is opt-in and labelled in the report.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 10.0
MEMORY_LIMIT_BYTES = 1 << 30
FILE_SIZE_LIMIT_BYTES = 16 << 20


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str  # the tail of stderr


@functools.cache
def network_isolation() -> list[str]:
    """The command prefix that removes network access here, or [] where none works."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    for prefix in ([unshare, "-n"], [unshare, "-r", "-n"]):
        try:
            probe = subprocess.run([*prefix, sys.executable, "-I", "-S", "-c", "pass"],
                                   capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return []


def sandbox_description() -> str:
    net = "no network (unshare -n)" if network_isolation() else "network NOT isolated (unshare unavailable)"
    return (f"fresh `python -I -S` subprocess, empty environment, temporary cwd, {net}, "
            f"CPU/memory ({MEMORY_LIMIT_BYTES >> 20} MiB)/file-size/process limits, "
            f"{DEFAULT_TIMEOUT_S:g} s timeout")


def _limits(timeout_s: float) -> None:  # runs in the child between fork and exec
    cpu = int(timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.setsid()


def run_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> ExecResult:
    """Run ``program`` in the sandbox; passed when it exits 0 within the timeout."""
    with tempfile.TemporaryDirectory(prefix="refinery-humaneval-") as tmp:
        script = Path(tmp) / "program.py"
        script.write_text(program, encoding="utf-8")
        cmd = [*network_isolation(), sys.executable, "-I", "-S", str(script)]
        proc = subprocess.Popen(cmd, cwd=tmp, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, preexec_fn=lambda: _limits(timeout_s))
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: children die too
            proc.communicate()
            return ExecResult(False, "timeout", f"no exit within {timeout_s:g} s")
        tail = err.decode("utf-8", "replace")[-500:]
        return ExecResult(proc.returncode == 0, "passed" if proc.returncode == 0 else "failed", tail)


def check_program(doc: dict[str, Any], completion: str) -> str:
    """The HumanEval program: prompt + completion + the problem's tests + the call of check()."""
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval hook (``process_results``) for the local humaneval task: pass@1 of one greedy sample."""
    return {"pass@1": float(run_program(check_program(doc, results[0])).passed)}
