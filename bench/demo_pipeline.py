"""Wall time, per-stage time and memory of the whole pipeline, as `make demo` runs it.

    .venv/bin/python bench/demo_pipeline.py [--profile demo] [--home DIR] [--job pipeline]

Runs scripts/run_pipeline.py (what `make demo` runs after setup) in a fresh home (unless --home is
given: then a rerun, which reuses what is finished), then reads the step timings from the Dagster
instance and the per-stage seconds and peak RSS from each artifact's manifest. Prints JSON with
the total and the summary the command printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_pipeline(profile: str, home: Path, job: str = "pipeline") -> dict[str, Any]:
    """Run ``job`` on ``profile`` in ``home``; step times, and per stage its time, memory, device."""
    env = {**os.environ, "REFINERY_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
           "REFINERY_PROFILE": profile, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "refinery.home"], env=env, check=True, cwd=ROOT, capture_output=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "scripts/run_pipeline.py", "--profile", profile, "--job", job],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (home / "bench-pipeline.log").write_text(proc.stdout + proc.stderr)

    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    run = instance.get_runs(limit=1)[0]
    stats = instance.get_run_step_stats(run.run_id)
    steps = {s.step_key: round((s.end_time or 0) - (s.start_time or 0), 2) for s in stats
             if s.end_time and s.start_time}
    stages = {}
    for stage_dir in sorted((home / "artifacts").iterdir()):
        pointer = stage_dir / "LATEST"
        if not pointer.exists():
            continue
        manifest = json.loads((stage_dir / json.loads(pointer.read_text())["version"] / "manifest.json").read_text())
        metrics = manifest.get("metrics", {})
        stages[stage_dir.name] = {
            "step_seconds": steps.get(stage_dir.name),
            "stage_seconds": metrics.get("seconds"),
            "peak_rss_bytes": metrics.get("peak_rss_bytes"),
            "bytes_on_disk": manifest.get("bytes"),
            "compute": metrics.get("compute"),  # device, dtype, GPU peak (refinery.device.metadata)
        }
    return {"profile": profile, "job": job, "success": proc.returncode == 0, "exit_code": proc.returncode,
            "wall_seconds": round(wall, 1), "steps_seconds_total": round(sum(steps.values()), 1), "steps": steps,
            "stages": stages, "load_average_1m_before": load_before, "load_average_1m_after": os.getloadavg()[0],
            "cpus": os.cpu_count(), "home": str(home), "summary": proc.stdout.splitlines()[-40:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--job", default="pipeline")
    args = parser.parse_args()
    home = (args.home or Path(tempfile.mkdtemp(prefix="refinery-bench-"))).resolve()
    result = run_pipeline(args.profile, home, args.job)
    print(json.dumps(result, indent=2))
    return 0 if result["success"] else 1


if __name__ == "__main__":
    sys.exit(main())
