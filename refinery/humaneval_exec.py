"""Run model-written HumanEval code in a sandbox (opt-in: profile.eval.humaneval_execute).

``eval.humaneval_isolation: bwrap`` (the default): each program runs under bubblewrap with no
network (its own network namespace, loopback down), its own PID, IPC and UTS namespaces, a
read-only view of /usr and the interpreter's prefix and nothing else of the host (no home, no
project, no /etc), a private size-limited tmpfs as /tmp and cwd, an empty environment and its own
session. Inside, as uid 65534 (nobody), ``python -I -S`` runs with rlimits on CPU time, address
space, file size, open files and processes. On a timeout the PID namespace's init is killed, which
takes everything the program started with it. Where bwrap is missing or does not work, nothing runs:
``SandboxUnavailable`` says why.

``eval.humaneval_isolation: none`` is the explicit opt-out: the same rlimits, an empty environment,
a temporary cwd and a session of its own, but the host's filesystem, network and processes are in
reach; the report says so in bold.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 10.0
MEMORY_LIMIT_BYTES = 1 << 30
FILE_SIZE_LIMIT_BYTES = 16 << 20
TMPFS_BYTES = 64 << 20
MAX_PROCESSES = 32  # tasks (threads included) of the sandbox's uid
MAX_OPEN_FILES = 256
NOBODY = 65534
ISOLATIONS = ("bwrap", "none")
_used: set[str] = set()  # the isolation the programs of this process actually ran under

# Runs inside the sandbox before the program. bwrap started by root makes no user namespace, so
# the program would be real root, which RLIMIT_NPROC exempts: become nobody first. Every limit is
# set inside, after bwrap made its namespaces, so the limit on processes counts the sandbox's own.
_LAUNCHER = """
import os, resource, sys
limits, program, drop = sys.argv[1], sys.argv[2], sys.argv[3] == "drop"
if drop and os.getuid() == 0:
    os.setgroups([]); os.setgid(%(nobody)d); os.setuid(%(nobody)d)
for pair in limits.split(","):
    name, value = pair.split("=")
    resource.setrlimit(getattr(resource, name), (int(value), int(value)))
os.execv(sys.executable, [sys.executable, "-I", "-S", program])
""" % {"nobody": NOBODY}


class SandboxUnavailable(RuntimeError):
    """Isolation was asked for and cannot be had here; nothing was executed."""


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str  # the tail of stderr


def _python() -> tuple[str, str]:
    """The real interpreter (not a venv's link) and the prefix it needs (stdlib, libpython)."""
    return os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)


def _bwrap_command(bwrap: str, program: Path, limits: str) -> list[str]:
    python, prefix = _python()
    cmd = [bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
           "--die-with-parent", "--new-session", "--clearenv", "--hostname", "sandbox"]
    if os.getuid() == 0:  # privileged bwrap: keep only what the launcher needs to become nobody
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:  # unprivileged bwrap needs a user namespace; uid 65534 inside maps to the caller outside
        cmd += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    cmd += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):  # merged-/usr links or real directories
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    if not prefix.startswith("/usr/"):  # e.g. pyenv under /root: bwrap would make its parents 0700
        for parent in reversed(Path(prefix).parents[:-1]):
            cmd += ["--perms", "0755", "--dir", str(parent)]
        cmd += ["--ro-bind", prefix, prefix]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp",
            "--ro-bind", str(program), "/tmp/program.py", "--chdir", "/tmp", "--",
            python, "-I", "-S", "-c", _LAUNCHER, limits, "/tmp/program.py", "drop"]
    return cmd


def _limits(nproc: int, timeout_s: float) -> str:
    cpu = int(timeout_s) + 1
    return ",".join(f"{k}={v}" for k, v in (
        ("RLIMIT_CPU", cpu), ("RLIMIT_AS", MEMORY_LIMIT_BYTES), ("RLIMIT_FSIZE", FILE_SIZE_LIMIT_BYTES),
        ("RLIMIT_NPROC", nproc), ("RLIMIT_NOFILE", MAX_OPEN_FILES), ("RLIMIT_CORE", 0)))


def _tasks_of_this_uid() -> int:
    """Tasks (threads) of this real uid: without a namespace RLIMIT_NPROC counts all of them."""
    uid, n = os.getuid(), 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:  # the process ended meanwhile
            continue
        if int(fields["Uid"].split()[0]) == uid:
            n += int(fields["Threads"])
    return n


def _execute(cmd: list[str], cwd: str, timeout_s: float, *, bwrap: bool) -> ExecResult:
    init = None  # pidfd of the PID namespace's init (bwrap reports its pid on --info-fd)
    info_r, info_w = os.pipe() if bwrap else (-1, -1)
    if bwrap:
        cmd = [cmd[0], "--info-fd", str(info_w), *cmd[1:]]
    # stderr goes to a file (RLIMIT_FSIZE bounds it), never into this process's memory
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True, pass_fds=(info_w,) if bwrap else ())
        finally:
            if bwrap:
                os.close(info_w)
        if bwrap:
            with open(info_r, "rb") as info:
                pid = json.loads(info.read() or b"{}").get("child-pid")
            with contextlib.suppress(ProcessLookupError):  # already over
                init = os.pidfd_open(pid) if pid else None
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
            # Kill the namespace's init and let bwrap exit by itself: the kernel empties the namespace
            # before init is reaped, so nothing the program started outlives bwrap (killing bwrap
            # first would return while the namespace is still dying).
            if init is not None:
                with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                    signal.pidfd_send_signal(init, signal.SIGKILL)
                    proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # without bwrap, the session is all there is to kill
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if init is not None:
            os.close(init)
        if rc is None:
            return ExecResult(False, "timeout", f"no exit within {timeout_s:g} s")
        err.seek(max(0, err.seek(0, os.SEEK_END) - 500))
        tail = err.read().decode("utf-8", "replace")
    return ExecResult(rc == 0, "passed" if rc == 0 else "failed", tail)


@functools.cache
def _probe(bwrap: str) -> str | None:
    with tempfile.TemporaryDirectory(prefix="refinery-sandbox-probe-") as tmp:
        program = Path(tmp) / "probe.py"
        program.write_text(f"import os\nassert os.getuid() == {NOBODY}, os.getuid()\n", encoding="utf-8")
        try:
            res = _execute(_bwrap_command(bwrap, program, _limits(MAX_PROCESSES, 30.0)), tmp, 30.0, bwrap=True)
        except OSError as exc:
            return f"{bwrap} could not be started: {exc}"
    return None if res.passed else f"{bwrap} did not run a test program ({res.status}): {res.detail.strip()}"


def isolation_problem() -> str | None:
    """Why bwrap isolation does not work here, or None when it does (probed once per bwrap binary)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bwrap (Debian package bubblewrap) is not on PATH"
    return _probe(bwrap)


def require_isolation(isolation: str) -> None:
    """Raise SandboxUnavailable unless programs can run under ``isolation`` here."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"eval.humaneval_isolation must be one of {ISOLATIONS}, got {isolation!r}")
    problem = isolation_problem() if isolation == "bwrap" else None
    if problem:
        raise SandboxUnavailable(f"HumanEval code not executed: {problem}. Install bubblewrap, or set "
                                 "eval.humaneval_isolation: none to run model-written code without isolation")


def sandbox_description(isolation: str | None = None) -> str:
    """One line for the report. ``isolation`` None: what this process's programs ran under (else bwrap)."""
    if isolation is None:
        isolation = "none" if "none" in _used else "bwrap"
    limits = (f"CPU {int(DEFAULT_TIMEOUT_S) + 1} s, memory {MEMORY_LIMIT_BYTES >> 20} MiB, files "
              f"{FILE_SIZE_LIMIT_BYTES >> 20} MiB, {MAX_PROCESSES} processes, {DEFAULT_TIMEOUT_S:g} s timeout")
    if isolation == "none":
        return (f"**WITHOUT ISOLATION** (`eval.humaneval_isolation: none`: the host's files, network and "
                f"processes were in reach); empty environment, temporary cwd, own session, {limits}")
    return (f"in a bubblewrap sandbox: no network, read-only /usr, private {TMPFS_BYTES >> 20} MiB /tmp, own "
            f"PID/IPC/UTS namespaces, empty environment, own session, uid {NOBODY}; {limits}")


def run_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, isolation: str = "bwrap") -> ExecResult:
    """Run ``program``; passed when it exits 0 within the timeout. Refuses (SandboxUnavailable) when
    ``isolation`` is bwrap and bwrap does not work here."""
    require_isolation(isolation)
    with tempfile.TemporaryDirectory(prefix="refinery-humaneval-") as tmp:
        script = Path(tmp) / "program.py"
        script.write_text(program, encoding="utf-8")
        if isolation == "bwrap":
            cmd = _bwrap_command(shutil.which("bwrap") or "bwrap", script, _limits(MAX_PROCESSES, timeout_s))
        else:  # same uid as this process: the process limit has to leave room for what it already runs
            limits = _limits(_tasks_of_this_uid() + MAX_PROCESSES, timeout_s)
            cmd = [_python()[0], "-I", "-S", "-c", _LAUNCHER, limits, str(script), "keep"]
        _used.add(isolation)
        return _execute(cmd, tmp, timeout_s, bwrap=isolation == "bwrap")


def check_program(doc: dict[str, Any], completion: str) -> str:
    """The HumanEval program: prompt + completion + the problem's tests + the call of check()."""
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def process_results_for(isolation: str) -> Callable[[dict[str, Any], list[str]], dict[str, float]]:
    """The lm-eval ``process_results`` hook for the local humaneval task, bound to the profile's isolation."""
    def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
        return {"pass@1": float(run_program(check_program(doc, results[0]), isolation=isolation).passed)}
    return process_results
