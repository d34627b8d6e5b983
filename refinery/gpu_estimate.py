"""How long and how much a training run would take on a GPU, before it starts.

The usual dense-transformer rule: training costs about 6 FLOPs per parameter per token (2 for
the forward pass, 4 for the backward pass). QLoRA freezes the base, so the weight-gradient half
of the backward pass is skipped (closer to 4 x N), but it dequantizes the 4-bit weights on every
forward and backward and recomputes activations under gradient checkpointing, so 6 x N is kept
as the stated assumption. Time = FLOPs / (peak FLOP/s x MFU); cost = hours x price per hour.
Every assumption comes from TrainConfig.gpu_* and is recorded next to the result.

``python -m refinery.gpu_estimate --profile llama31-8b --records 640000 --tokens-per-record 444.1
--parameters 8030261248`` prints the estimate as JSON (docs/training.md has the numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from refinery.config import TrainConfig, load_profile

FLOPS_PER_PARAMETER_TOKEN = 6


def estimate(*, tokens_per_epoch: int, parameters: int, train: TrainConfig,
             epochs: float | None = None) -> dict[str, Any]:
    """GPU hours and cost for ``epochs`` passes over ``tokens_per_epoch`` tokens; assumptions included."""
    if tokens_per_epoch <= 0 or parameters <= 0:
        raise ValueError(f"tokens_per_epoch and parameters must be positive, got "
                         f"{tokens_per_epoch} and {parameters}")
    epochs = train.num_epochs if epochs is None else epochs
    flops = FLOPS_PER_PARAMETER_TOKEN * parameters * tokens_per_epoch * epochs
    achieved = train.gpu_tflops * 1e12 * train.gpu_mfu
    hours = flops / achieved / 3600
    return {
        "gpu_hours": hours,
        "gpu_cost_usd": hours * train.gpu_price_per_hour,
        "flops": flops,
        "tokens_per_epoch": tokens_per_epoch,
        "epochs": epochs,
        "parameters": parameters,
        "assumptions": {
            "formula": "6 x parameters x tokens x epochs / (peak FLOP/s x MFU)",
            "flops_per_parameter_token": FLOPS_PER_PARAMETER_TOKEN,
            "gpu_name": train.gpu_name,
            "gpu_peak_tflops": train.gpu_tflops,
            "mfu": train.gpu_mfu,
            "price_per_hour_usd": train.gpu_price_per_hour,
            "tokens": "non-padding tokens of the training split (sample packing leaves little padding)",
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--profile", default=None, help="profile whose train.gpu_* assumptions are used")
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--tokens-per-record", type=float, required=True)
    parser.add_argument("--parameters", type=float, required=True)
    parser.add_argument("--epochs", type=float, default=None, help="default: the profile's num_epochs")
    args = parser.parse_args(argv)
    train = load_profile(args.profile).train
    result = estimate(tokens_per_epoch=round(args.records * args.tokens_per_record),
                      parameters=int(args.parameters), train=train, epochs=args.epochs)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
