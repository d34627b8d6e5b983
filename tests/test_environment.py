"""The stage environment: no secret reaches a stage subprocess that did not ask for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from refinery.environment import stage_environment

CANARY = "hf_CANARY_d0n0tl3ak_7f3a9"


def test_stage_environment_keeps_secrets_out_unless_named(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    monkeypatch.setenv("REFINERY_HOME", "/somewhere")
    monkeypatch.setenv("DAGSTER_PIPES_CONTEXT", "a parent's")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # an online run keeps its choice
    env = stage_environment({"EXTRA": "1"})
    assert CANARY not in env.values() and "DAGSTER_PIPES_CONTEXT" not in env
    assert env["REFINERY_HOME"] == "/somewhere" and env["PATH"] == os.environ["PATH"] and env["EXTRA"] == "1"
    assert env["HF_HUB_OFFLINE"] == "0" and env["HF_DATASETS_OFFLINE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert stage_environment(secrets=["HF_TOKEN"])["HF_TOKEN"] == CANARY
    # the re-exec wrapper for launchers that merge os.environ (Dagster Pipes): the child's
    # /proc/self/environ, the thing another process could read, holds no canary
    out = subprocess.run([sys.executable, "-m", "refinery.environment", "--", sys.executable, "-c",
                          "import json; print(json.dumps(open('/proc/self/environ').read().split('\\0')))"],
                         capture_output=True, text=True, check=True).stdout
    child = dict(kv.split("=", 1) for kv in json.loads(out) if kv)
    assert CANARY not in out and child["DAGSTER_PIPES_CONTEXT"] == "a parent's"
    assert child["REFINERY_HOME"] == "/somewhere"
