"""Time and measure pruned_model and awq_model on SmolLM2-135M-Instruct; prints JSON.

    nice .venv/bin/python bench/bench_compression.py --sparsity 0.5 0.6 --awq-from 0.5

The input model is the embedded SmolLM2 base model (refinery.base_model, demo profile) published
as a stand-in qlora_model, so the numbers do not depend on a training run; the calibration
corpus is the English Alpaca-GPT4 demo file from the shared data directory (real instructions).
Everything is written under --home (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def corpus_artifact(home: Path, records: int):
    from refinery.artifacts import load_artifact, staged_artifact
    from refinery.config import resolve_path
    from refinery.records import KEPT_SCHEMA, record_id, write_table

    src = resolve_path("${REFINERY_SHARED_DATA:-../shared/data}") / "llamafactory_demo" / "alpaca_en_demo.json"
    rows = []
    for i, r in enumerate(json.loads(src.read_text(encoding="utf-8"))[:records]):
        msgs = [{"role": "user", "content": (r["instruction"] + "\n" + r["input"]).strip()},
                {"role": "assistant", "content": r["output"]}]
        rows.append(dict(id=record_id(msgs), source="alpaca_en_demo", format="alpaca",
                         source_file=str(src), source_line=i + 1, license="CC BY-NC 4.0",
                         messages=msgs, original=json.dumps(r), lang="en", lang_score=1.0, p_en=1.0))
    with staged_artifact("deduped_corpus", config={"bench": str(src)}, home=home) as st:
        write_table(st.path / "kept.parquet", rows, KEPT_SCHEMA)
    return load_artifact(st.path)


def model_artifact(home: Path, profile):
    from refinery import base_model
    from refinery.artifacts import load_artifact, staged_artifact

    base = base_model.build(profile, home=home, log=lambda *_: None)
    with staged_artifact("qlora_model", config={"stand_in_for": base.ref()}, home=home) as st:
        shutil.copytree(base.path / "model", st.path / "model")
    return load_artifact(st.path), base


def summary(art) -> dict:
    m = art.manifest["metrics"]
    keys = ("sparsity", "perplexity_before", "perplexity", "bytes_on_disk", "bytes_on_disk_input",
            "weights_zstd_bytes_input", "weights_zstd_bytes", "bits_per_weight",
            "bits_per_linear_weight", "nominal_weight_bits", "parameters", "seconds",
            "compress_seconds", "peak_rss_bytes", "zeros_restored", "sparsity_input")
    out = {k: m[k] for k in keys if k in m}
    out["generation"] = m["generation"]["completion"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5])
    ap.add_argument("--mask-structure", default=None, choices=["unstructured", "2:4"])
    ap.add_argument("--awq-from", type=float, default=None, help="run AWQ on the model pruned to this")
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--home", type=Path, default=None)
    args = ap.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="refinery-bench-"))
    os.environ["REFINERY_HOME"] = str(home)
    from refinery import awq, prune
    from refinery.config import load_profile

    profile = load_profile(args.profile)
    quiet = lambda *_: None  # noqa: E731
    corpus = corpus_artifact(home, args.records)
    qlora, base = model_artifact(home, profile)
    results: dict = {"profile": profile.name, "home": str(home),
                     "base_model_perplexity": base.manifest["metrics"].get("perplexity"), "prune": {}}
    pruned = {}
    for s in args.sparsity:
        update = {"sparsity": s} | ({"mask_structure": args.mask_structure} if args.mask_structure else {})
        p = profile.model_copy(update={"prune": profile.prune.model_copy(update=update)})
        start = time.perf_counter()
        pruned[s] = prune.build(p, inputs={"qlora_model": qlora, "deduped_corpus": corpus}, home=home, log=quiet)
        results["prune"][str(s)] = summary(pruned[s]) | {"wall_seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps({"prune": s, **results["prune"][str(s)]}), flush=True)
    if args.awq_from is not None:
        start = time.perf_counter()
        art = awq.build(profile, inputs={"pruned_model": pruned[args.awq_from], "deduped_corpus": corpus},
                        home=home, log=quiet)
        results["awq"] = summary(art) | {"wall_seconds": round(time.perf_counter() - start, 1),
                                         "group_size": profile.awq.group_size,
                                         "calibration_samples": profile.awq.calibration_samples}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
