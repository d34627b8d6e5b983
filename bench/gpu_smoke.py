"""The gpu-smoke profile on this machine's GPU: the whole chain on CUDA, then QLoRA speed with and
without sample packing. Prints one JSON object; docs/models.md records it with the date.

    .venv/bin/python bench/gpu_smoke.py [--home DIR] [--steps 30] [--records 2000]

Needs a CUDA GPU and the CUDA build of torch (make setup TORCH=torch==2.13.0); without them it stops
at once with the profile's message (compute.device: cuda). Per stage: seconds, peak host RSS, and
the GPU peak (torch.cuda.max_memory_allocated in the stage's process; for qlora_model also in
axolotl's process). Not run yet: no GPU has been available to the project (README, "What has run
where").
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_pipeline  # noqa: E402
import train_speed  # noqa: E402

from refinery import device, memory_plan  # noqa: E402
from refinery.config import load_profile  # noqa: E402

PROFILE = "gpu-smoke"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=30, help="QLoRA steps per speed variant")
    parser.add_argument("--records", type=int, default=2000, help="training records for the speed variants")
    args = parser.parse_args()
    import torch

    profile = load_profile(PROFILE)
    try:
        placement = device.select(profile)
    except device.DeviceError as exc:  # no GPU: nothing else runs
        print(f"gpu_smoke: {exc}", file=sys.stderr)
        return 2
    plans = {s: memory_plan.plan_stage(s, profile, placement, memory_plan.arch_for(profile)).need()
             for s in memory_plan.STAGES}
    home = (args.home or Path(tempfile.mkdtemp(prefix="refinery-gpu-smoke-"))).resolve()
    pipeline = demo_pipeline.run_pipeline(PROFILE, home / "pipeline")
    speed = train_speed.measure(PROFILE, steps=args.steps, records=args.records, home=home / "speed",
                                variants=["packing", "no_packing"])
    print(json.dumps({
        "date": datetime.date.today().isoformat(),
        "gpu": placement.name, "gpus": placement.count, "dtype": placement.dtype,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "pipeline": pipeline,  # per-stage seconds, peak RSS and compute (GPU peak) from the manifests
        "planned_device_bytes": plans,  # the memory plan's estimate, to compare with the peaks
        "qlora_speed": speed,  # tokens/s with and without sample packing
    }, indent=2, default=str))
    return 0 if pipeline["success"] else 1


if __name__ == "__main__":
    sys.exit(main())
