"""Jobs, the re-verification schedule and the new-data sensor.

- ``data``: raw_corpus + deduped_corpus (and their checks); what the landing sensor runs.
- ``verify_data``: verified_corpus, run by the ``reverify_corpus`` schedule (cron verify.cron).
- ``pipeline``: every asset, raw data to release.
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg

from assets.data import CURATION, INGESTION, VERIFICATION
from refinery.artifacts import latest
from refinery.config import load_profile
from refinery.landing import pending_files
from resources import RefineryResource

data_job = dg.define_asset_job(
    "data", selection=dg.AssetSelection.groups(INGESTION, CURATION),
    description="Ingest the sources into raw_corpus and curate deduped_corpus (the landing sensor's job).")
verify_job = dg.define_asset_job(
    "verify_data", selection=dg.AssetSelection.groups(VERIFICATION),
    description="Re-verify the latest deduped_corpus (language share and duplicate rates on a sample, drift).")
pipeline_job = dg.define_asset_job("pipeline", selection=dg.AssetSelection.all(),
                                   description="Every asset: data, training, compression, evaluation, release.")

_PROFILE = load_profile()  # the cron and the polling interval are read when the code location loads


def _deduped_version(instance: dg.DagsterInstance, refinery: RefineryResource) -> str | None:
    event = instance.get_latest_materialization_event(dg.AssetKey("deduped_corpus"))
    if event is not None and event.asset_materialization is not None:
        version = event.asset_materialization.metadata.get("version")
        if version is not None:
            return str(version.value)
    art = latest("deduped_corpus", refinery.home_path())
    return art.version if art else None


@dg.schedule(job=verify_job, cron_schedule=_PROFILE.verify.cron, default_status=dg.DefaultScheduleStatus.RUNNING,
             description="Re-verify deduped_corpus on verify.cron: language ID and duplicate rates on a sample, "
                         "compared with the previous verification.")
def reverify_corpus(context: dg.ScheduleEvaluationContext, refinery: RefineryResource):
    version = _deduped_version(context.instance, refinery)
    if version is None:
        return dg.SkipReason("deduped_corpus has not been materialized yet: nothing to verify")
    return dg.RunRequest(tags={"refinery/deduped_corpus": version})


@dg.sensor(job=data_job, minimum_interval_seconds=_PROFILE.landing.interval_seconds,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="New JSONL/JSON/Parquet/CSV files in landing.dir, once complete (a <name>.done marker, or "
                       "the same size and mtime at two evaluations), become a data run that ingests them and "
                       "deduplicates them against the existing deduped_corpus.")
def landing_sensor(context: dg.SensorEvaluationContext, refinery: RefineryResource):
    """One run per batch of new complete files (refinery.landing: a ``<name>.done`` marker, or the
    same size and mtime as at the previous evaluation). The cursor holds the keys (name, mtime,
    size) already requested for files still in the landing directory, and every key seen at this
    evaluation; a run moves its files to landing/processed/ once their records are published, so a
    finished file leaves the cursor too. A failed run leaves its files in place and known: touch a
    file (new mtime) to retry it."""
    profile = refinery.load_profile()
    landing_dir = profile.resolve_path(profile.landing.dir)
    landing_dir.mkdir(parents=True, exist_ok=True)
    files = pending_files(landing_dir)
    state = json.loads(context.cursor) if context.cursor else {}
    state = {"requested": state} if isinstance(state, list) else state  # a cursor from before "seen"
    requested, seen = set(state.get("requested", [])), set(state.get("seen", []))
    present = {f.key for f in files}
    growing = [f.path.name for f in files if not f.complete(seen)]
    new = [f for f in files if f.complete(seen) and f.key not in requested]

    def save(requested: set[str]) -> None:
        context.update_cursor(json.dumps({"requested": sorted(requested & present), "seen": sorted(present)}))

    if not new:
        save(requested)
        waiting = f"; still being written (changed since the last look, no .done marker): {growing}" if growing else ""
        return dg.SkipReason(f"no new complete files in {landing_dir}{waiting}")
    busy = context.instance.get_run_records(dg.RunsFilter(
        job_name=data_job.name, statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
                                          dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
        tags={"refinery/trigger": "landing"}), limit=1)
    if busy:  # two batches curated against the same corpus would publish two versions, each missing the other
        save(requested)
        return dg.SkipReason(f"{len(new)} new files wait for landing run {busy[0].dagster_run.run_id} to finish")
    keys = sorted(f.key for f in new)
    save(requested | set(keys))
    return dg.RunRequest(
        run_key=hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20],
        run_config={"ops": {"raw_corpus": {"config": {"landing_files": [str(f.path) for f in new]}}}},
        tags={"refinery/trigger": "landing", "refinery/files": ", ".join(f.path.name for f in new)[:200]})


JOBS = [data_job, verify_job, pipeline_job]
SCHEDULES = [reverify_corpus]
SENSORS = [landing_sensor]
