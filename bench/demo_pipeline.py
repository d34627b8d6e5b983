"""Wall time, per-stage time and memory of the whole pipeline, as `make demo` runs it.

    .venv/bin/python bench/demo_pipeline.py [--profile demo] [--home DIR] [--job pipeline]

Runs `dagster job execute -j pipeline` in a fresh home (unless --home is given and reused),
then reads the step timings from the Dagster instance and the per-stage seconds and peak RSS from
each artifact's manifest. Prints JSON.
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

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--job", default="pipeline")
    args = parser.parse_args()
    home = (args.home or Path(tempfile.mkdtemp(prefix="refinery-bench-"))).resolve()
    env = {**os.environ, "REFINERY_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
           "REFINERY_PROFILE": args.profile, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "refinery.home"], env=env, check=True, cwd=ROOT, capture_output=True)
    dagster = str(Path(sys.executable).with_name("dagster"))
    start = time.perf_counter()
    proc = subprocess.run([dagster, "job", "execute", "-f", "definitions.py", "-j", args.job],
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
        }
    print(json.dumps({
        "profile": args.profile, "job": args.job, "success": proc.returncode == 0,
        "wall_seconds": round(wall, 1), "steps": steps, "stages": stages,
        "load_average_1m_after": os.getloadavg()[0], "cpus": os.cpu_count(), "home": str(home),
    }, indent=2))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
