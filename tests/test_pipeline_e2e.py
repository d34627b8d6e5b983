"""The whole chain, smoke profile, through the real Dagster CLI, instance, DuckDB file and UI.

One run of the `pipeline` job (as `make demo` runs it, with the tiny profile) is shared by the
tests of this module; each asserts one thing a user relies on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

import dagster as dg

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ["raw_corpus", "deduped_corpus", "base_model", "qlora_model", "pruned_model", "awq_model",
          "gguf_zst", "recovered_model", "benchmark_report", "release"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "REFINERY_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
           "REFINERY_PROFILE": "smoke", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "refinery.home"], env=env, check=True, cwd=ROOT)
    dagster = str(Path(sys.executable).with_name("dagster"))
    proc = subprocess.run([dagster, "job", "execute", "-f", "definitions.py", "-j", "pipeline"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    log = home / "pipeline.log"
    log.write_text(proc.stdout + proc.stderr)
    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    return {"home": home, "env": env, "proc": proc, "instance": instance, "log": log}


def _tail(run) -> str:
    return (run["proc"].stdout + run["proc"].stderr)[-6000:]


def test_pipeline_job_succeeds(pipeline_run):
    assert pipeline_run["proc"].returncode == 0, _tail(pipeline_run)


@pytest.mark.parametrize("asset", ASSETS)
def test_every_asset_materialized(pipeline_run, asset):
    event = pipeline_run["instance"].get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None, f"{asset} not materialized\n{_tail(pipeline_run)}"
    metadata = event.asset_materialization.metadata
    if "path" in metadata:
        assert (Path(str(metadata["path"].value)) / "manifest.json").exists()


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
