"""Time the data half through Dagster: raw_corpus, deduped_corpus, verified_corpus and their checks.

Usage: ``python bench/bench_data_assets.py [PROFILE]`` (default demo). Runs in a temporary home
with an in-memory Dagster instance; prints JSON: seconds per step, records read and kept.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(profile: str) -> dict:
    home = Path(tempfile.mkdtemp(prefix="refinery-bench-"))
    os.environ.update(REFINERY_HOME=str(home), REFINERY_PROFILE=profile, HF_HUB_OFFLINE="1")
    import dagster as dg
    from dagster_duckdb import DuckDBResource

    from assets import data
    from resources import RefineryResource
    from sensors import JOBS

    defs = dg.Definitions(assets=dg.load_assets_from_modules([data]),
                          asset_checks=dg.load_asset_checks_from_modules([data]), jobs=JOBS,
                          executor=dg.in_process_executor,
                          resources={"refinery": RefineryResource(profile=profile, home=str(home)),
                                     "duckdb": DuckDBResource(database=str(home / "refinery.duckdb"))})
    t0 = time.perf_counter()
    result = defs.resolve_job_def("pipeline").execute_in_process(instance=dg.DagsterInstance.ephemeral())
    total = time.perf_counter() - t0
    steps = {}
    for event in result.all_events:
        if event.event_type_value == "STEP_SUCCESS":
            steps[event.step_key] = round(event.event_specific_data.duration_ms / 1000, 3)
    dedup = {k: v.value for k, v in result.asset_materializations_for_node("deduped_corpus")[0].metadata.items()
             if k in ("records_read", "records_kept", "non_english", "exact_duplicates", "near_duplicates")}
    return {"profile": profile, "success": result.success, "seconds_total": round(total, 2),
            "seconds_per_step": steps, "deduped_corpus": dedup}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "demo"), indent=2))
