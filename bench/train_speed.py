"""QLoRA training speed on this machine: the demo profile's model (SmolLM2-135M) through axolotl,
with and without sample packing, and with and without bf16 autocast of the training forward
passes on the CPU (compute.autocast; axolotl's own bf16 switch does not work there), a few steps
each. Prints one JSON object.

    .venv/bin/python bench/train_speed.py --steps 6 [--records 400] [--home /tmp/bench-home]
    .venv/bin/python bench/train_speed.py --steps 12 --variants packing,packing_fp32

Each variant is a full refinery.train.build (axolotl start-up, training, merge, perplexity);
``tokens_per_second`` is non-padding tokens per second of the trainer's own runtime (evaluation
included, start-up excluded), ``seconds`` the whole stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refinery import base_model, train  # noqa: E402
from refinery.artifacts import load_artifact, staged_artifact  # noqa: E402
from refinery.config import load_profile, resolve_path  # noqa: E402
from refinery.records import KEPT_SCHEMA, record_id, write_table  # noqa: E402


def corpus(home: Path, records: int):
    """A deduped_corpus of real English instruction records from the shared data directory."""
    data = resolve_path("${REFINERY_SHARED_DATA:-../shared/data}") / "llamafactory_demo" / "alpaca_en_demo.json"
    rows = []
    for i, rec in enumerate(json.loads(data.read_text(encoding="utf-8"))[:records]):
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
        rows.append({"id": record_id(messages), "source": "alpaca_en_demo", "format": "alpaca",
                     "source_file": str(data), "source_line": i + 1, "license": "CC-BY-NC-4.0",
                     "messages": messages, "original": json.dumps(rec), "lang": "en",
                     "lang_score": 1.0, "p_en": 1.0})
    with staged_artifact("deduped_corpus", home=home) as st:
        write_table(st.path / "kept.parquet", rows, KEPT_SCHEMA)
    return load_artifact(st.path)


# name -> (train overrides, compute overrides); compute.autocast auto is bf16 where the CPU has it
VARIANTS = {"packing": ({"sample_packing": True}, {}), "no_packing": ({"sample_packing": False}, {}),
            "packing_fp32": ({"sample_packing": True}, {"autocast": "off"})}


def measure(profile_name: str, *, steps: int, records: int, home: Path,
            variants: list[str]) -> dict[str, Any]:
    """One whole refinery.train.build per variant; what each one measured."""
    os.environ["REFINERY_HOME"] = str(home)
    profile = load_profile(profile_name)
    inputs = {"base_model": base_model.build(profile, home=home, log=lambda _: None),
              "deduped_corpus": corpus(home, records)}
    results: dict[str, Any] = {}
    for name in variants:
        train_overrides, compute_overrides = VARIANTS[name]
        overrides = {**train_overrides, "max_steps": steps, "early_stopping_patience": None}
        variant = profile.model_copy(update={"train": profile.train.model_copy(update=overrides),
                                             "compute": profile.compute.model_copy(update=compute_overrides)})
        try:  # a home per variant: the same train settings would otherwise resume the other's checkpoints
            art = train.build(variant, inputs=inputs, home=home / name, log=lambda _: None)
        except Exception as exc:  # a variant that does not run on this machine is a result too
            results[name] = {"error": str(exc)[-1500:]}
            continue
        m = art.manifest["metrics"]
        results[name] = {k: m.get(k) for k in ("tokens_per_second", "tokens_seen", "token_slots_seen",
                                                "steps", "epochs", "train_seconds", "seconds",
                                                "train_loss_first", "train_loss_last", "val_loss_last",
                                                "perplexity", "peak_rss_bytes", "compute")}
    return {"profile": profile_name, "model": profile.base_model.name, "steps": steps,
            "micro_batch_size": profile.train.micro_batch_size,
            "sequence_len": profile.train.sequence_len, "cpus": os.cpu_count(), "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--home", default=None)
    parser.add_argument("--variants", default="packing,no_packing")
    args = parser.parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="refinery-bench-"))
    print(json.dumps(measure(args.profile, steps=args.steps, records=args.records, home=home,
                             variants=args.variants.split(",")), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
