"""The data stage on Ray with 1 and 2 local workers (records/s), and the 50M-record plan; prints JSON.

    python bench/data_scale.py [--records 100000] [--workers 1,2]

The corpus is bench/data_stage.py's (English instruction records, 3% Chinese, 10% planted
duplicates) as a records.parquet; each worker count runs ``refinery.datastage_ray.run_stage_ray``
in a fresh process (a fresh local Ray), with decontamination against the demo profile's eval
sets. The kept sets of all runs are compared (they must be equal). The plan for 50M records is
derived from the measured per-record costs: see docs/data.md ("Scaling out").
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(records: str, out: str, workers: int, profile_name: str) -> dict:
    from refinery.config import DataEngineConfig, load_profile
    from refinery.datastage_ray import run_stage_ray
    from refinery.decontam import eval_texts_for

    profile = load_profile(profile_name)
    profile = profile.model_copy(update={"data_engine": DataEngineConfig(kind="ray", workers=workers)})
    t0 = time.perf_counter()
    result = run_stage_ray(Path(records), Path(out), profile, eval_texts=eval_texts_for(profile))
    seconds = time.perf_counter() - t0
    return {"workers": workers, "seconds": round(seconds, 2), "counts": result.counts,
            "breakdown_seconds": {k: round(v, 2) for k, v in result.stats["seconds"].items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        json.dump(child(args.child[0], args.child[1], int(args.child[2]), args.profile), sys.stdout)
        return 0
    import pyarrow.parquet as pq

    from bench.data_stage import build_corpus

    table, _, _ = build_corpus(args.records)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(table, Path(tmp) / "records.parquet")
        for w in [int(x) for x in args.workers.split(",")]:
            out = Path(tmp) / f"out{w}"
            load = os.getloadavg()
            proc = subprocess.run([sys.executable, __file__, "--profile", args.profile, "--child",
                                   str(Path(tmp) / "records.parquet"), str(out), str(w)], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["records_per_second"] = round(args.records / r["seconds"], 1)
            r["loadavg_before"] = load
            r["kept_ids"] = sorted(pq.read_table(out / "kept.parquet", columns=["id"])["id"].to_pylist())
            runs.append(r)
    same = all(r["kept_ids"] == runs[0]["kept_ids"] for r in runs)
    for r in runs:
        r["kept"] = len(r.pop("kept_ids"))
    json.dump({"records": args.records, "cpu_count": os.cpu_count(), "runs": runs, "same_kept_set": same},
              sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
