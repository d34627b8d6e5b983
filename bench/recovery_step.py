"""Seconds per recovery step, three ways, in one process: what the 2-core demo pays for recovery.

    .venv/bin/python bench/recovery_step.py --home HOME [--steps 3] [--batch 4] [--seq 256]

HOME must hold finished awq_model and qlora_model artifacts (a `make demo` home). The step is
refinery.recover's own (teacher forward, student forward, KL, backward, AdamW) on random token
blocks, training the group scales and the norms as the demo does:

- ``rebuild``: the weight rebuilt from the 4-bit codes every forward (the path codes training takes);
- ``broadcast``: the fixed AWQ weight times the per-group scale ratio (what scales-only training
  takes), float32;
- ``broadcast_bf16``: the same in bfloat16 autocast (compute.autocast).

The variants alternate step by step (noise on a shared machine hits all three alike); the first
step of each is a warm-up and not counted. Prints JSON with the medians and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = (("rebuild", None), ("broadcast", None), ("broadcast_bf16", "bfloat16"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()

    import torch

    from refinery import modelstats, recover
    from refinery.artifacts import require_latest
    from refinery.device import cpu_has_native_bf16

    home = args.home.resolve()
    student = modelstats.load_model(require_latest("awq_model", home).path / "model")
    teacher = modelstats.load_model(require_latest("qlora_model", home).path / "model")
    train = {"scales", "norms"}
    grids = recover.attach_grid(student, train)
    params = recover.trainable(student, grids, train)
    start = [p.detach().clone() for p in params]
    blocks = torch.randint(100, student.config.vocab_size - 100, (args.batch, args.seq),
                           generator=torch.Generator().manual_seed(0))

    def step(optimizer: torch.optim.Optimizer, precision: str | None) -> tuple[float, float]:
        t0 = time.perf_counter()
        with torch.no_grad(), recover.autocast("cpu", precision):
            target = teacher(blocks).logits
        with recover.autocast("cpu", precision):
            logits = student(blocks).logits
        loss = recover.kl_divergence(logits, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss.item()

    times: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    losses: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    student.train()
    for i in range(args.steps + 1):
        for name, precision in VARIANTS:
            with torch.no_grad():  # every variant trains from the same start, on the same blocks
                for p, p0 in zip(params, start):
                    p.copy_(p0)
            for grid in grids.values():
                grid.train_codes = name == "rebuild"  # forward path only: the codes stay frozen
            seconds, loss = step(torch.optim.AdamW(params, lr=1e-3), precision)
            losses[name].append(loss)
            if i:  # the first round warms up
                times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "tokens_per_step": args.batch * args.seq, "steps_counted": args.steps,
        "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
        "seconds_per_step": {k: round(v, 3) for k, v in median.items()},
        "speedup_vs_rebuild": {k: round(median["rebuild"] / v, 2) for k, v in median.items()},
        "first_step_loss": {k: v[0] for k, v in losses.items()},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
