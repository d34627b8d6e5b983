"""The data half through a real Dagster instance and a real DuckDB file, smoke profile.

raw_corpus and deduped_corpus materialized by the ``data`` job, their checks (and a failing one
blocking what is downstream), the re-verification schedule and its drift check, and the landing
sensor deduplicating new files against the existing corpus.
"""

import json
import os
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from dagster_duckdb import DuckDBResource

from assets import data
from conftest import use_home
from refinery.config import PROFILES_DIR
from resources import RefineryResource
from sensors import JOBS, SCHEDULES, SENSORS, landing_sensor, reverify_corpus


def make_defs(home: Path, profile: str = "smoke") -> dg.Definitions:
    return dg.Definitions(
        assets=dg.load_assets_from_modules([data]), asset_checks=dg.load_asset_checks_from_modules([data]),
        jobs=JOBS, schedules=SCHEDULES, sensors=SENSORS, executor=dg.in_process_executor,
        resources={"refinery": RefineryResource(profile=profile, home=str(home)),
                   "duckdb": DuckDBResource(database=str(home / "refinery.duckdb"))})


def run_job(defs: dg.Definitions, name: str, instance: dg.DagsterInstance, **kwargs) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(name).execute_in_process(instance=instance, raise_on_error=False, **kwargs)


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {f"{e.asset_key.to_user_string()}:{e.check_name}": e
            for e in (ev.event_specific_data for ev in result.all_events
                      if ev.event_type_value == "ASSET_CHECK_EVALUATION")}


def metadata(instance: dg.DagsterInstance, asset: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def query(home: Path, sql: str, params=None) -> list[tuple]:
    with duckdb.connect(str(home / "refinery.duckdb"), read_only=True) as conn:
        return conn.execute(sql, params or []).fetchall()


@pytest.fixture
def instance(refinery_home):
    """A persistent instance (SQLite under DAGSTER_HOME): schedules and sensors need an instance reference."""
    with dg.DagsterInstance.from_config(os.environ["DAGSTER_HOME"]) as inst:
        yield inst


@pytest.fixture(scope="module")
def first_data_run(tmp_path_factory) -> tuple[Path, Path, dict[str, dg.AssetCheckEvaluation]]:
    """One ``data`` run of the smoke profile in a fresh home, and a copy of that home taken after it.

    Tests that start from a materialized corpus restore the copy at the same path (manifests, the
    Dagster instance and the DuckDB file hold absolute paths) instead of running the job again.
    """
    root = tmp_path_factory.mktemp("first_data_run")
    home, snapshot = root / "home", root / "snapshot"
    with pytest.MonkeyPatch.context() as mp:
        use_home(home, mp)
        with dg.DagsterInstance.from_config(os.environ["DAGSTER_HOME"]) as inst:
            result = run_job(make_defs(home), "data", inst)
            assert result.success
            checks = check_results(result)
    shutil.copytree(home, snapshot)
    return home, snapshot, checks


@pytest.fixture
def materialized(first_data_run, monkeypatch) -> tuple[Path, dg.DagsterInstance]:
    """(home, instance) as left by the first ``data`` run, private to the test."""
    home, snapshot, _ = first_data_run
    shutil.rmtree(home)
    shutil.copytree(snapshot, home)
    use_home(home, monkeypatch)
    with dg.DagsterInstance.from_config(os.environ["DAGSTER_HOME"]) as inst:
        yield home, inst


def test_data_job_records_statistics_and_history(materialized, first_data_run):
    refinery_home, instance = materialized
    defs = make_defs(refinery_home)
    checks = first_data_run[2]
    assert set(checks) == {"raw_corpus:schema_valid", "raw_corpus:counts_reconcile", "deduped_corpus:english_share",
                           "deduped_corpus:no_exact_duplicates", "deduped_corpus:schema_valid",
                           "deduped_corpus:counts_reconcile"}
    assert all(c.passed for c in checks.values()), {k: c.metadata for k, c in checks.items() if not c.passed}
    share = checks["deduped_corpus:english_share"].metadata
    assert share["min_english_share"].value == 0.99 and share["kept_english_share"].value >= 0.99

    raw, dedup = metadata(instance, "raw_corpus"), metadata(instance, "deduped_corpus")
    truth = json.loads((Path(raw["path"]) / "ground_truth.json").read_text())["counts"]
    assert (Path(raw["path"]) / "heldout.jsonl").exists()
    # the smoke demo corpus plants 3 malformed lines, 6 non-English records, 10 exact and 10 near duplicates
    assert raw["quarantined"] == truth["malformed_lines"] == 3
    assert raw["records_read"] == raw["records_kept"] + raw["quarantined"]
    assert dedup["non_english"] == truth["non_english"] and dedup["exact_duplicates"] == truth["exact_duplicates"]
    assert dedup["near_duplicates"] == truth["near_duplicates"]
    assert dedup["records_read"] == raw["records_kept"]
    assert "| en |" in dedup["top_languages"] and "| near |" in dedup["duplicate_examples"]
    assert "invalid JSON" in raw["quarantine_reasons"]

    rows = query(refinery_home, """SELECT source, records_read, records_kept, quarantined FROM source_stats
                                   WHERE asset = 'raw_corpus' ORDER BY source""")
    assert [r[0] for r in rows] == ["demo_alpaca", "demo_openai", "demo_sharegpt"]
    assert all(read == kept + quarantined for _, read, kept, quarantined in rows)
    rows = query(refinery_home, """SELECT records_read, records_kept + non_english + contaminated + exact_duplicates
                                          + near_duplicates FROM source_stats WHERE asset = 'deduped_corpus'""")
    assert len(rows) == 3 and all(a == b for a, b in rows)
    assert query(refinery_home, "SELECT count(*) FROM quarantine")[0][0] == 3
    assert query(refinery_home, "SELECT count(*) FROM duplicate_clusters")[0][0] == 20

    # the same files again: the content-named artifacts are reused (nothing is done twice), and the
    # statistics stay one row per artifact version, now naming the run that last materialized it
    second = run_job(defs, "data", instance)
    assert second.success
    assert metadata(instance, "raw_corpus")["version"] == raw["version"]
    assert metadata(instance, "deduped_corpus")["version"] == dedup["version"]
    history = query(refinery_home, """SELECT asset, count(*), count(DISTINCT artifact_version), max(run_id)
                                      FROM materializations GROUP BY asset ORDER BY asset""")
    assert history == [("deduped_corpus", 1, 1, second.run_id), ("raw_corpus", 1, 1, second.run_id)]
    assert query(refinery_home, "SELECT count(*) FROM source_stats")[0][0] == 6


def test_failing_english_share_check_blocks_downstream(refinery_home, instance, tmp_path):
    # A permissive language filter (min_score 0: every record "passes") lets the planted non-English
    # records into the kept corpus; the check measures the top label and must catch it.
    profile = yaml.safe_load((PROFILES_DIR / "smoke.yaml").read_text())
    profile["langid"]["min_score"] = 0.0
    path = tmp_path / "permissive.yaml"
    path.write_text(yaml.safe_dump(profile))
    defs = make_defs(refinery_home, str(path))
    result = run_job(defs, "pipeline", instance)
    assert not result.success
    checks = check_results(result)
    failed = checks["deduped_corpus:english_share"]
    assert not failed.passed
    assert failed.metadata["kept_english_share"].value < failed.metadata["min_english_share"].value == 0.99
    assert checks["deduped_corpus:counts_reconcile"].passed  # the data is consistent, only not English enough
    assert instance.get_latest_materialization_event(dg.AssetKey("deduped_corpus")) is not None
    assert instance.get_latest_materialization_event(dg.AssetKey("verified_corpus")) is None


def test_schedule_skips_before_the_first_corpus(refinery_home, instance):
    refinery = RefineryResource(profile="smoke", home=str(refinery_home))
    skip = reverify_corpus(dg.build_schedule_context(instance=instance, resources={"refinery": refinery}))
    assert isinstance(skip, dg.SkipReason) and "not been materialized" in skip.skip_message


def test_schedule_reverifies_and_drift_check_fails_on_tampered_data(materialized):
    refinery_home, instance = materialized
    defs = make_defs(refinery_home)
    refinery = RefineryResource(profile="smoke", home=str(refinery_home))
    request = reverify_corpus(dg.build_schedule_context(instance=instance, resources={"refinery": refinery}))
    assert isinstance(request, dg.RunRequest)
    version = metadata(instance, "deduped_corpus")["version"]
    assert request.tags["refinery/deduped_corpus"] == version
    assert reverify_corpus.job_name == "verify_data" and reverify_corpus.cron_schedule

    for _ in range(2):  # a baseline, then an unchanged corpus: no drift
        result = run_job(defs, "verify_data", instance, tags=request.tags)
        assert result.success and all(c.passed for c in check_results(result).values())

    # tamper: a third of the kept records replaced by copies of others (exact duplicates)
    kept_path = Path(metadata(instance, "deduped_corpus")["path"]) / "kept.parquet"
    kept = pq.read_table(kept_path)
    n = kept.num_rows
    pq.write_table(pa.concat_tables([kept.slice(0, n - n // 3), kept.slice(0, n // 3)]), kept_path)
    result = run_job(defs, "verify_data", instance, tags=request.tags)
    checks = check_results(result)
    drift = checks["verified_corpus:within_drift"]
    assert not drift.passed and "exact_dup_drift" in drift.metadata["failures"].value
    assert drift.metadata["exact_dup_drift"].value > drift.metadata["max_duplicate_drift"].value == 0.02
    assert not checks["verified_corpus:integrity"].passed
    assert "kept.parquet" in checks["verified_corpus:integrity"].metadata["changed_files"].value
    rows = query(refinery_home, "SELECT passed, previous_id IS NULL FROM verifications ORDER BY verified_at")
    assert rows == [(True, True), (True, False), (False, False)]


def _alpaca_lines(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def test_landing_sensor_dedups_new_files_against_existing_corpus(materialized, shared_data):
    refinery_home, instance = materialized
    defs = make_defs(refinery_home)
    refinery = RefineryResource(profile="smoke", home=str(refinery_home))
    before = metadata(instance, "deduped_corpus")
    old_kept = pq.read_table(Path(before["path"]) / "kept.parquet")
    existing = old_kept.slice(0, 1).to_pylist()[0]  # planted again in the landing file: an exact duplicate

    landing = refinery_home / "landing"
    new = json.loads((shared_data / "llamafactory_demo" / "alpaca_en_demo.json").read_text())[:3]
    duplicate = {"instruction": existing["messages"][0]["content"], "input": "",
                 "output": existing["messages"][1]["content"]}
    (landing / "batch1.jsonl").write_text(_alpaca_lines(new + [duplicate]))
    (landing / "batch1.jsonl.done").touch()  # complete: no need to wait for a second look
    (landing / ".partial.jsonl").write_text(_alpaca_lines(new))  # still being copied: ignored

    context = dg.build_sensor_context(instance=instance, resources={"refinery": refinery})
    request = landing_sensor(context)
    assert isinstance(request, dg.RunRequest), request
    files = request.run_config["ops"]["raw_corpus"]["config"]["landing_files"]
    assert [Path(f).name for f in files] == ["batch1.jsonl"]
    assert request.run_key and context.cursor

    result = run_job(defs, "data", instance, run_config=request.run_config, tags=request.tags)
    assert result.success and all(c.passed for c in check_results(result).values())
    after = metadata(instance, "deduped_corpus")
    assert after["mode"] == "landing" and after["version"] != before["version"]
    kept = pq.read_table(Path(after["path"]) / "kept.parquet")
    assert kept.num_rows == old_kept.num_rows + 3  # the whole corpus: the old records and the 3 new ones
    raw_version = metadata(instance, "raw_corpus")["version"]
    source = f"landing/{raw_version}/batch1.jsonl"
    rejected = [r for r in pq.read_table(Path(after["path"]) / "rejected.parquet").to_pylist() if r["source"] == source]
    assert [(r["reason"], r["duplicate_of"]) for r in rejected] == [("exact_duplicate", existing["id"])]

    # the file left the landing directory for processed/<raw version>/; the sensor has nothing left to do
    assert not (landing / "batch1.jsonl").exists()
    assert (landing / "processed" / raw_version / "batch1.jsonl").exists()
    again = dg.build_sensor_context(instance=instance, resources={"refinery": refinery}, cursor=context.cursor)
    assert isinstance(landing_sensor(again), dg.SkipReason)
    assert json.loads(again.cursor) == {"requested": [], "seen": []}
    assert not (landing / "batch1.jsonl.done").exists()  # archived with its file
    assert query(refinery_home, "SELECT mode FROM materializations ORDER BY materialized_at") == [
        ("full",), ("full",), ("landing",), ("landing",)]

    # a full rebuild keeps what arrived through the landing directory: nothing lost
    assert run_job(defs, "data", instance).success
    rebuilt = pq.read_table(Path(metadata(instance, "deduped_corpus")["path"]) / "kept.parquet")
    assert rebuilt.num_rows == kept.num_rows
    assert rebuilt.column("source").to_pylist().count(source) == 3
