"""The HumanEval sandbox (real bubblewrap): hostile programs are contained and scored as failed
samples; nothing runs where isolation is missing unless the profile opts out."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from refinery.config import ProfileError, load_profile
from refinery.eval_tasks import prepare_tasks
from refinery.humaneval_exec import (MAX_PROCESSES, NOBODY, SandboxUnavailable, isolation_problem,
                                     run_program, sandbox_description)

SMOKE = Path(__file__).resolve().parents[1] / "profiles" / "smoke.yaml"
CANARY = "hf_CANARY_d0n0tl3ak_7f3a9"


@pytest.fixture(autouse=True)
def _bwrap_works():
    """These tests are about the real sandbox: an error, not a skip, where it cannot run."""
    problem = isolation_problem()
    assert problem is None, f"{problem} (make test installs bubblewrap)"


def _sandbox_processes() -> list[int]:
    """Host processes still running a sandboxed program (uid nobody, python on /tmp/program.py)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            uid = int((proc / "status").read_text().split("Uid:")[1].split()[0])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if uid == NOBODY and b"/tmp/program.py" in cmdline:
            found.append(int(proc.name))
    return found


def test_sandbox_passes_fails_times_out_and_has_no_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    assert run_program("assert 1 + 1 == 2\n").passed
    failed = run_program("raise SystemExit(3)\n")
    assert not failed.passed and failed.status == "failed"
    assert run_program("while True:\n    pass\n", timeout_s=2).status == "timeout"
    assert run_program("import os\nassert set(os.environ) <= {'LC_CTYPE', 'PWD'}, dict(os.environ)\n").passed
    # its own private directory works (a write there is not what makes the other tests fail)
    assert run_program("open('out.txt', 'w').write('x')\nassert open('/tmp/out.txt').read() == 'x'\n").passed


def test_fork_bomb_is_contained():
    counted = run_program(
        "import os, sys, time\nn = 0\nwhile n < 1000:\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
        "    n += 1\nprint('forked', n, file=sys.stderr)\nsys.exit(0 if n >= 1000 else 1)\n")
    assert not counted.passed and counted.status == "failed"
    forked = int(counted.detail.split()[-1])
    assert 0 < forked < MAX_PROCESSES  # RLIMIT_NPROC stopped it, not the machine
    bomb = run_program("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                       timeout_s=3)
    assert bomb.status == "timeout" and not bomb.passed
    assert _sandbox_processes() == []  # the sleepers and the bomb died with the sandbox


def test_network_call_is_contained():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(2)
    port, accepted = server.getsockname()[1], []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(2)], daemon=True).start()
    probe = ("import socket, sys\n"
             f"for addr in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('example.com', 80)]:\n"
             "    try:\n        socket.create_connection(addr, timeout=2).close()\n        sys.exit(0)\n"
             "    except OSError as exc:\n        print(addr, exc, file=sys.stderr)\n"
             "sys.exit(1)\n")
    try:
        res = run_program(probe)
        assert accepted == []  # the host's listener saw nothing
        assert run_program(probe, isolation="none").passed  # the control: unisolated, it gets through
    finally:
        server.close()
    assert not res.passed and res.status == "failed"
    assert "Network is unreachable" in res.detail or "Connection refused" in res.detail


def test_parent_environment_is_out_of_reach():
    # The parent gets the canary at exec time, as a token exported before starting Dagster would be:
    # /proc/<pid>/environ shows the environment a process started with.
    program = (
        "import glob, sys\nseen = []\n"
        "for path in ['/proc/PARENT/environ'] + glob.glob('/proc/*/environ'):\n"
        "    try:\n        seen.append(open(path, 'rb').read())\n"
        "    except OSError as exc:\n        print(path, type(exc).__name__, file=sys.stderr)\n"
        "sys.exit(0 if any(b'hf_CANARY' in s for s in seen) else 1)\n")
    parent = ("import json, os, sys\nfrom refinery.humaneval_exec import run_program\n"
              "program = sys.stdin.read().replace('PARENT', str(os.getpid()))\n"
              "print(json.dumps([run_program(program, isolation=i).__dict__ for i in ('bwrap', 'none')]))\n")
    out = subprocess.run([sys.executable, "-c", parent], input=program, capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_TOKEN": CANARY}).stdout
    isolated, control = json.loads(out)
    assert not isolated["passed"] and isolated["status"] == "failed" and CANARY not in isolated["detail"]
    assert control["passed"]  # unisolated, the same program finds the token


def test_write_outside_its_directory_is_contained(tmp_path):
    targets = [tmp_path / "escaped.txt", Path(__file__).parent / "escaped.txt", Path("/usr/escaped.txt"),
               Path.home() / "escaped.txt"]
    program = ("import sys\nwritten = []\n"
               f"for path in {[str(t) for t in targets[:1]]!r} + {[str(t) for t in targets[1:]]!r}:\n"
               "    try:\n        open(path, 'w').write('x')\n        written.append(path)\n"
               "    except OSError as exc:\n        print(path, type(exc).__name__, file=sys.stderr)\n"
               "sys.exit(0 if written else 1)\n")
    res = run_program(program)
    assert not res.passed and res.status == "failed"
    assert not any(t.exists() for t in targets)
    assert run_program("open('/tmp/big', 'wb').write(b'x' * (64 << 20))\n").status == "failed"  # file-size limit
    control = f"open({str(targets[0])!r}, 'w').write('x')\n"
    assert run_program(control, isolation="none").passed and targets[0].exists()  # unisolated it lands


def _profile(tmp_path: Path, **eval_extra) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    raw["eval"] = {**raw["eval"], "tasks": {"humaneval": {"limit": 1}}, "humaneval_execute": True, **eval_extra}
    path = tmp_path / f"p{len(eval_extra)}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_refuses_without_bwrap_and_runs_unisolated_only_when_configured(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv("REFINERY_SHARED_DATA", str(shared_data))
    marker = tmp_path / "ran.txt"
    program = f"open({str(marker)!r}, 'w').write('ran')\n"
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # a PATH without bwrap
    with pytest.raises(SandboxUnavailable, match="bwrap .* not on PATH.*humaneval_isolation: none"):
        run_program(program)
    with pytest.raises(SandboxUnavailable):  # the evaluation refuses before any model generates code
        prepare_tasks(load_profile(str(_profile(tmp_path))), tmp_path / "tasks")
    assert not marker.exists()  # nothing executed

    profile = load_profile(str(_profile(tmp_path, humaneval_isolation="none")))
    prepare_tasks(profile, tmp_path / "tasks")
    spec = importlib.util.spec_from_file_location("hooks_none", tmp_path / "tasks" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    doc = {"prompt": program, "test": "def check(f):\n    pass\n", "entry_point": "open"}
    assert hooks.humaneval_process_results(doc, [""]) == {"pass@1": 1.0}
    assert marker.read_text() == "ran"  # it did run, on the host, as configured
    assert sandbox_description("none").startswith("**WITHOUT ISOLATION**")
    assert "bubblewrap" in sandbox_description("bwrap")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"eval": {"humaneval_isolation": "chroot"}}))
    with pytest.raises(ProfileError, match="eval.humaneval_isolation"):
        load_profile(str(bad))
