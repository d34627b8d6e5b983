"""The demo's Pareto table as JSON, and what each sparsity costs and buys.

    .venv/bin/python bench/compression_pareto.py --home HOME [--profile demo] [--sparsity 0,0.1,0.2,0.35,0.5]

HOME is a finished `make demo` home. Without --sparsity: every GGUF of its latest benchmark_report
(the chain, llama.cpp's plain quantizations, the dense reference) with bytes, .zst bytes, mean KL
divergence from qlora_model with its 95% interval, top-1 agreement, perplexity and the seconds its
scoring took, the Pareto frontier and the report's one-sentence verdict.

With --sparsity: for each sparsity, qlora_model is pruned (the profile's prune method; 0 skips it),
quantized with the profile's AWQ recipe, written to GGUF with its grid carried over (no recovery),
and scored on the report's own token set against the same reference: the KL divergence each
sparsity costs and the .zst bytes it buys. GGUF has no sparse format; zeros pay only through zstd.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _triple(v: dict) -> list[float]:
    return [round(v["value"], 5), round(v["ci_low"], 5), round(v["ci_high"], 5)]


def report_table(report: dict) -> dict:
    rows = []
    for m in sorted((m for m in report["models"] if m.get("fidelity")), key=lambda m: m["zst_bytes"] or 0):
        f = m["fidelity"]
        rows.append({"candidate": m["label"], "role": m["role"], "bytes": m["bytes"], "zst_bytes": m["zst_bytes"],
                     "kld_mean": _triple(f["kld_mean"]), "kld_p99": _triple(f["kld_p99"]),
                     "top1_agreement": _triple(f["top1_agreement"]), "perplexity": _triple(f["perplexity"]),
                     "seconds": round(f.get("seconds") or 0, 1)})
    return {"report": report["run_id"], "predictions": report["token_set"]["predictions"], "candidates": rows,
            "frontier": report["pareto"]["frontier"], "verdict": report["pareto"]["sentence"]}


def sparsity_sweep(home: Path, profile, sparsities: list[float]) -> list[dict]:
    from transformers import AutoTokenizer

    from refinery import awq, evaluate, gguf_export, prune
    from refinery.artifacts import require_latest
    from refinery.calibration import calibration_dataset
    from refinery.modelstats import load_model

    art = {s: require_latest(s, home) for s in ("qlora_model", "deduped_corpus", "raw_corpus", "quant_baselines",
                                               "gguf_zst")}
    work = home / "work" / "benchmark_report"
    cands = evaluate.candidates({**art, "recovered_model": art["gguf_zst"]}, work, profile, lambda _m: None)
    reference = next(c for c in cands if c.role == "reference")
    heldout = art["raw_corpus"].path / "heldout.jsonl"
    tokens = evaluate.token_set(reference.path, profile, heldout if heldout.exists() else None)
    model_dir, kept = art["qlora_model"].path / "model", art["deduped_corpus"].path / "kept.parquet"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for sparsity in sparsities:
        start = time.perf_counter()
        model = load_model(model_dir)
        modifiers = []
        if sparsity > 0:
            modifiers += prune.recipe(profile.prune.model_copy(update={"sparsity": sparsity}))
        modifiers += awq.recipe(profile.awq)
        data, _ = calibration_dataset(kept, tokenizer, samples=profile.prune.calibration_samples,
                                      seq_len=profile.prune.calibration_seq_len)
        with awq.cpu_pin_memory_workaround():
            prune.run_oneshot(model, tokenizer, data, modifiers)
        tmp = Path(tempfile.mkdtemp(prefix="sweep-"))
        try:
            prune.save_compressed(model, tokenizer, tmp / "model", dtype="float32")
            del model
            out = gguf_export.export_model(tmp / "model", tmp, profile.gguf.type, profile.gguf.zstd_level, {})
            seconds = time.perf_counter() - start
            label = f"sparsity {sparsity:g}"
            cand = evaluate.Candidate(label, "sweep", "-", "chain", tmp / "model.gguf", out["gguf_sha256"],
                                      out["zst_bytes"])
            fid = evaluate.fidelity_scores([reference, cand], tokens, work, profile, lambda _m: None)[label]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rows.append({"sparsity": sparsity, "gguf_bytes": out["bytes"], "zst_bytes": out["zst_bytes"],
                     "zstd_ratio": round(out["zstd_ratio"], 4), "kld_mean": _triple(fid["kld_mean"]),
                     "top1_agreement": _triple(fid["top1_agreement"]), "perplexity": _triple(fid["perplexity"]),
                     "compress_seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--sparsity", default=None, help="comma-separated sparsities to sweep (0 = no pruning)")
    args = parser.parse_args()

    from refinery.artifacts import require_latest
    from refinery.config import load_profile
    from refinery.evaluate import load_report

    home = args.home.resolve()
    out = report_table(load_report(require_latest("benchmark_report", home).path))
    if args.sparsity:
        out["sparsity_sweep"] = sparsity_sweep(home, load_profile(args.profile),
                                               [float(x) for x in args.sparsity.split(",")])
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
