"""Which recovery works: a measured sweep over what trains, learning rate and steps, on the demo model.

    .venv/bin/python bench/recovery_sweep.py --home HOME [--profile demo] [--configs '[{...}, ...]']

HOME must hold finished awq_model, qlora_model, deduped_corpus, raw_corpus and quant_baselines
artifacts (a `make demo` home). Each configuration overrides keys of the profile's ``recovery``
section; for each, recovery runs as the stage runs it (refinery.recover.recover), the result is
saved, exported to GGUF like the stage does, and scored by the benchmark's own fidelity code on the
benchmark's token set against qlora_model (cached in the benchmark_report folder of the home's
work directory, shared with the report). The first row is awq_model's GGUF without recovery. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIGS = [
    {"train": ["norms"], "learning_rate": 1e-3},
    {"train": ["scales"], "learning_rate": 1e-3},
    {"train": ["scales", "norms"], "learning_rate": 1e-3},
    {"train": ["scales", "norms"], "learning_rate": 3e-3},
    {"train": ["codes", "scales", "norms"], "learning_rate": 1e-3},
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--configs", default=None, help="JSON list of recovery overrides")
    args = parser.parse_args()

    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained
    from transformers import AutoTokenizer

    from refinery import device, evaluate, gguf_export, recover
    from refinery.artifacts import require_latest
    from refinery.config import load_profile
    from refinery.prune import save_compressed, storage_dtype

    profile = load_profile(args.profile)
    home = args.home.resolve()
    art = {s: require_latest(s, home) for s in ("awq_model", "qlora_model", "deduped_corpus", "raw_corpus",
                                                  "quant_baselines", "gguf_zst")}
    work = home / "work" / "benchmark_report"
    cands = evaluate.candidates({**art, "recovered_model": art["gguf_zst"]}, work, profile, print)
    reference = next(c for c in cands if c.role == "reference")
    heldout = art["raw_corpus"].path / "heldout.jsonl"
    tokens = evaluate.token_set(reference.path, profile, heldout if heldout.exists() else None)
    placement = device.select(profile)
    student_dir = art["awq_model"].path / "model"
    rows = []

    def score(label: str, gguf: Path, extra: dict) -> None:
        cand = evaluate.Candidate(label, "sweep", "-", "chain", gguf, gguf_export.sha256_file(gguf),
                                  gguf_export.zstd_size(gguf, profile.gguf.zstd_level))
        fid = evaluate.fidelity_scores([reference, cand], tokens, work, profile, lambda _m: None)[label]
        rows.append({"label": label, **extra, "zst_bytes": cand.zst_bytes,
                     **{k: [round(fid[k][x], 5) for x in ("value", "ci_low", "ci_high")]
                        for k in ("kld_mean", "top1_agreement", "perplexity")},
                     "kld_by_source": {s: round(v["kld_mean"]["value"], 5) for s, v in fid["by_source"].items()}})
        print(json.dumps(rows[-1]), flush=True)

    score("awq_model (no recovery)", art["gguf_zst"].path / "model.gguf", {})
    configs = json.loads(args.configs) if args.configs else DEFAULT_CONFIGS
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    for i, override in enumerate(configs):
        cfg = profile.recovery.model_copy(update=override)
        start = time.perf_counter()
        student, result = recover.recover(student_dir, art["qlora_model"].path / "model",
                                          art["deduped_corpus"].path / "kept.parquet", cfg, placement, lambda _m: None)
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "model"
            modify_save_pretrained(student)
            for p in student.parameters():
                p.requires_grad_(False)
            save_compressed(student, tokenizer, out, dtype=storage_dtype(student_dir))
            del student
            gguf_export.export_model(out, Path(tmp), profile.gguf.type, profile.gguf.zstd_level, {})
            curve = [r["loss"] for r in result["curve"] if r["split"] == "heldout_kl"]
            score(f"recovery {i}", Path(tmp) / "model.gguf",
                  {"config": override, "best_step": result["best_step"], "steps_run": result["steps_run"],
                   "heldout_kl": [round(curve[0], 5), round(result["heldout_kl_best"], 5)],
                   "seconds": round(seconds, 1)})
    print(json.dumps({"profile": profile.name, "predictions": tokens.predictions, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
