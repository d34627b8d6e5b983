"""Guards of the data half through a real Dagster instance and the smoke profile: a landing file
still being written is not ingested until it is whole, and then exactly once; with
``decontam.action: block`` contaminated records stay, the blocking check fails naming them, and
qlora_model does not start."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml
from dagster_duckdb import DuckDBResource

from assets import data, evaluation, models
from refinery.config import PROFILES_DIR
from resources import RefineryResource
from sensors import landing_sensor
from test_dagster_data import _alpaca_lines, check_results, make_defs, metadata, run_job


@pytest.fixture
def instance(refinery_home):
    with dg.DagsterInstance.from_config(os.environ["DAGSTER_HOME"]) as inst:
        yield inst


def test_partial_landing_file_waits_until_whole_then_is_ingested_once(refinery_home, instance, shared_data):
    refinery = RefineryResource(profile="smoke", home=str(refinery_home))
    records = json.loads((shared_data / "llamafactory_demo" / "alpaca_en_demo.json").read_text())[:6]
    whole = _alpaca_lines(records).encode()
    landing = refinery_home / "landing"
    landing.mkdir(exist_ok=True)
    path = landing / "batch.jsonl"
    cursor, outcomes = None, []

    def look():
        nonlocal cursor
        context = dg.build_sensor_context(instance=instance, resources={"refinery": refinery}, cursor=cursor)
        outcome = landing_sensor(context)
        cursor = context.cursor
        outcomes.append(type(outcome).__name__)
        return outcome

    # a copy in progress, cut inside a JSON line: each look sees a size the previous one did not
    for end in (len(whole) // 3, 2 * len(whole) // 3, len(whole)):
        with open(path, "ab") as f:
            f.write(whole[f.tell():end])
        skip = look()
        assert isinstance(skip, dg.SkipReason) and "batch.jsonl" in skip.skip_message
    request = look()  # unchanged since the last look: complete
    assert isinstance(request, dg.RunRequest)
    assert request.run_config["ops"]["raw_corpus"]["config"]["landing_files"] == [str(path.resolve())]
    assert isinstance(look(), dg.SkipReason)  # requested once, not again while its run is pending
    assert outcomes == ["SkipReason"] * 3 + ["RunRequest", "SkipReason"]

    result = run_job(make_defs(refinery_home), "data", instance, run_config=request.run_config, tags=request.tags)
    assert result.success
    raw = metadata(instance, "raw_corpus")
    assert (raw["records_read"], raw["records_kept"], raw["quarantined"]) == (6, 6, 0)  # no half line was read
    assert not path.exists() and isinstance(look(), dg.SkipReason)  # archived: never ingested twice
    assert json.loads(cursor) == {"requested": [], "seen": []}


def _blocking_profile(tmp_path: Path, shared_data: Path) -> tuple[Path, list[str]]:
    """The smoke profile with decontam.action: block and a source holding two WikiText sentences."""
    article = (shared_data / "wikitext2_raw" / "wikitext-test.txt").read_text(encoding="utf-8").splitlines()
    sentences = [line.strip() for line in article if len(line.split()) > 40][:2]
    planted = [{"instruction": "Tell me something you read.", "input": "", "output": s} for s in sentences]
    planted.append({"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."})
    source = tmp_path / "planted.jsonl"
    source.write_text(_alpaca_lines(planted))
    raw = yaml.safe_load((PROFILES_DIR / "smoke.yaml").read_text())
    raw["decontam"] = {"action": "block"}
    raw["ingest"]["sources"] = [{"name": "planted", "path": str(source), "format": "alpaca"}]
    path = tmp_path / "block.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, sentences


def test_decontam_block_keeps_records_fails_the_check_and_training_does_not_start(
        refinery_home, instance, shared_data, tmp_path):
    profile, sentences = _blocking_profile(tmp_path, shared_data)
    defs = dg.Definitions(
        assets=dg.load_assets_from_modules([data, models]),
        asset_checks=[*dg.load_asset_checks_from_modules([data]), evaluation.no_eval_contamination],
        jobs=[dg.define_asset_job("to_training", selection=["raw_corpus", "deduped_corpus", "qlora_model"])],
        executor=dg.in_process_executor,
        resources={"refinery": RefineryResource(profile=str(profile), home=str(refinery_home)),
                   "duckdb": DuckDBResource(database=str(refinery_home / "refinery.duckdb")),
                   "pipes": dg.PipesSubprocessClient()})
    result = run_job(defs, "to_training", instance)

    check = check_results(result)["deduped_corpus:no_eval_contamination"]
    assert not check.passed and check.metadata["contaminated"].value == 2
    assert check.metadata["action"].value == "block"
    kept = pq.read_table(Path(metadata(instance, "deduped_corpus")["path"]) / "kept.parquet").to_pylist()
    planted = [r["id"] for r in kept if r["source"] == "planted" and r["messages"][1]["content"] in sentences]
    assert len(planted) == 2  # kept, not removed: block means "stop", not "clean quietly"
    assert all(rid in check.description for rid in planted)  # the failure names them
    assert metadata(instance, "deduped_corpus")["contaminated"] == 0
    # the blocking check stopped the run before training
    assert instance.get_latest_materialization_event(dg.AssetKey("qlora_model")) is None
    started = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    assert "qlora_model" not in started and not result.success
