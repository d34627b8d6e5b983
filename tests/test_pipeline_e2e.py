"""The whole chain, smoke profile, through the real Dagster CLI, instance, DuckDB file and UI.

One run of the `pipeline` job (as `make demo` runs it, with the tiny profile) is shared by the
tests of this module; each asserts one thing a user relies on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

import dagster as dg

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ["raw_corpus", "deduped_corpus", "base_model", "qlora_model", "pruned_model", "awq_model",
          "gguf_zst", "recovered_model", "benchmark_report", "release"]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "REFINERY_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
            "REFINERY_PROFILE": "smoke", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}


def _run(home: Path) -> subprocess.CompletedProcess:
    """The README's main command (make demo runs this script) on the smoke profile."""
    return subprocess.run([sys.executable, "scripts/run_pipeline.py", "--profile", "smoke"], env=_env(home),
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    proc = _run(home)
    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    return {"home": home, "env": _env(home), "proc": proc, "instance": instance}


def _tail(run) -> str:
    return (run["proc"].stdout + run["proc"].stderr)[-6000:]


def test_pipeline_job_succeeds_with_a_readable_summary(pipeline_run):
    proc = pipeline_run["proc"]
    assert proc.returncode == 0, _tail(pipeline_run)
    out = proc.stdout
    assert "RELEASED: " in out and "key figure" in out and "make ui" in out
    assert len(out.splitlines()) < 80  # a summary, not the event log (that is in the log file)
    assert "benchmark_report  " in out and "shipped KLD" in out


@pytest.mark.parametrize("asset", ASSETS)
def test_every_asset_materialized(pipeline_run, asset):
    event = pipeline_run["instance"].get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None, f"{asset} not materialized\n{_tail(pipeline_run)}"
    metadata = event.asset_materialization.metadata
    if "path" in metadata:
        assert (Path(str(metadata["path"].value)) / "manifest.json").exists()


def test_a_second_run_with_nothing_changed_reuses_every_stage(pipeline_run):
    """Artifacts are named by what made them: the second run recomputes nothing."""
    proc = _run(pipeline_run["home"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    instance = dg.DagsterInstance.from_config(str(pipeline_run["home"] / "dagster"))
    run_id = instance.get_runs(limit=1)[0].run_id
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    meta = {r.event_log_entry.dagster_event.event_specific_data.materialization.asset_key.to_user_string():
            r.event_log_entry.dagster_event.event_specific_data.materialization.metadata for r in records}
    for name in ("base_model", "qlora_model", "pruned_model", "awq_model", "gguf_zst", "recovered_model",
                 "quant_baselines", "benchmark_report"):
        assert meta[name]["reused"].value is True, name
    first = pipeline_run["instance"].get_latest_materialization_event(dg.AssetKey("release"))
    assert meta["release"]["version"].value == first.asset_materialization.metadata["version"].value


def _start(home: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "scripts/run_pipeline.py", "--profile", "smoke"], env=_env(home),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 900) -> None:
    """SIGKILL the whole run (Dagster, the stage subprocess, axolotl) once ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the point it was to be killed at"
        assert time.monotonic() < deadline, "the point to kill at never came"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_runs_resume_training_and_the_report(tmp_path):
    """kill -9 during qlora_model (after its first checkpoint), then during benchmark_report (after
    it scored a model): each next run continues where the last one stopped."""
    home = tmp_path / "home"
    work = home / "work"
    _kill_when(_start(home), lambda: any(work.glob("qlora_model/*/out/checkpoint-2/trainer_state.json")))
    assert not list((home / "artifacts").glob("qlora_model/*/manifest.json"))  # nothing that looks finished
    cache = work / "benchmark_report" / "fidelity"
    _kill_when(_start(home), lambda: len(list(cache.glob("*-*-*.npz"))) >= 1)
    scored = {p.name: p.stat().st_mtime_ns for p in cache.glob("*-*-*.npz")}
    proc = _run(home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    qlora = json.loads(next((home / "artifacts").glob("qlora_model/*/manifest.json")).read_text())
    assert qlora["metrics"]["resumed_from_step"] >= 2  # training went on from its checkpoint
    for name, mtime in scored.items():  # what the killed report had scored was not scored again
        assert (cache / name).stat().st_mtime_ns == mtime
    assert not list((home / "artifacts").glob("*/.staging-*"))  # the killed runs' debris is gone
    assert "RELEASED" in proc.stdout


def _processes_of(home: Path) -> list[int]:
    """The processes running with this REFINERY_HOME (Dagster, the stage runners, their workers)."""
    mark = b"\0" + f"REFINERY_HOME={home}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mark in b"\0" + (entry / "environ").read_bytes() + b"\0":
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def test_sigterm_to_the_driver_ends_the_whole_run(tmp_path):
    """A process manager stops `make demo` with SIGTERM to its main process: Dagster and the stage
    running under it end too (they used to run on alone, unseen), the exit status says so, and the
    run is CANCELED in Dagster (it stayed STARTED: the UI showed it running)."""
    home = tmp_path / "home"
    proc = _start(home)
    deadline = time.monotonic() + 600
    while not list((home / "work").glob("qlora_model/*/out")):  # a stage runner is at work
        assert proc.poll() is None and time.monotonic() < deadline, "the run never reached qlora_model"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        time.sleep(1)
        assert _processes_of(home) == []
        runs = dg.DagsterInstance.from_config(str(home / "dagster")).get_runs(limit=1)
        assert [r.status for r in runs] == [dg.DagsterRunStatus.CANCELED]
    finally:  # a failure leaves no run behind
        for pid in _processes_of(home):
            os.kill(pid, signal.SIGKILL)


def test_every_check_passed(pipeline_run):
    instance = pipeline_run["instance"]
    runs = instance.get_runs(limit=1)
    assert runs, "no run recorded"
    records = instance.get_records_for_run(runs[0].run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    evaluations = [r.event_log_entry.dagster_event.event_specific_data for r in records]
    assert evaluations, "no asset check ran"
    failed = [f"{e.asset_key.to_user_string()}:{e.check_name}" for e in evaluations if not e.passed]
    assert not failed, failed


def test_duckdb_statistics_recorded(pipeline_run):
    db = pipeline_run["home"] / "refinery.duckdb"
    assert db.exists()
    with duckdb.connect(str(db), read_only=True) as conn:
        tables = {r[0] for r in conn.execute("select table_name from information_schema.tables").fetchall()}
        assert "training_loss" in tables
        assert conn.execute("select count(*) from training_loss where stage = 'qlora_model'").fetchone()[0] > 0
        assert "benchmark_scores" in tables
        assert conn.execute("select count(distinct stage) from benchmark_scores").fetchone()[0] >= 5


def test_release_bundle(pipeline_run):
    event = pipeline_run["instance"].get_latest_materialization_event(dg.AssetKey("release"))
    path = Path(str(event.asset_materialization.metadata["path"].value))
    names = {p.name for p in path.rglob("*") if p.is_file()}
    assert any(n.endswith(".gguf.zst") for n in names), names
    assert "README.md" in names and "Modelfile" in names and "manifest.json" in names


def test_ui_screenshots(pipeline_run):
    if not Path(os.environ.get("REFINERY_CHROMIUM", "/usr/bin/chromium")).exists():
        pytest.skip("Debian's chromium is not installed (make test installs it as root)")
    out = Path(os.environ.get("REFINERY_SCREENSHOTS") or pipeline_run["home"] / "screenshots")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "ui_screenshots.py"), str(out), "--port", "3391"],
                          env=pipeline_run["env"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shots = json.loads(proc.stdout.strip().splitlines()[-1])["screenshots"]
    for name in ("asset_graph", "benchmark_report"):
        assert Path(shots[name]).stat().st_size > 20_000, f"{name} screenshot looks empty"
    shutil.rmtree(out / "tmp", ignore_errors=True)
