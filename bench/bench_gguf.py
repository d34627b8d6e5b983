"""GGUF types and zstd levels on SmolLM2-135M-Instruct: size, perplexity, speed; prints JSON lines.

    nice .venv/bin/python bench/bench_gguf.py --types Q8_0 Q4_0 --zstd-levels 3 19

The model is the embedded SmolLM2 base model (refinery.base_model, demo profile, built once
under --home). Perplexity is llama.cpp's over the first --tokens tokens of WikiText-2
(refinery.modelstats.heldout_text), with the same sliding windows as the transformers numbers.
--dtypes also builds the base folder in fp32 and bf16 and prints both perplexities and sizes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--types", nargs="+", default=["F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"])
    parser.add_argument("--embedding-types", nargs="+", default=["auto"])
    parser.add_argument("--zstd-levels", nargs="+", type=int, default=[3, 19])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--speed-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", action="store_true", help="also build the base folder in fp32")
    parser.add_argument("--home", type=Path, default=None)
    args = parser.parse_args()

    from refinery import base_model, gguf_export, llamacpp
    from refinery.config import load_profile
    from refinery.modelstats import heldout_text

    home = args.home or Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    profile = load_profile("demo")
    text = heldout_text(profile)
    dtypes = ["float32", "bfloat16"] if args.dtypes else [profile.base_model.dtype]
    for dtype in dtypes:  # the last one (the profile's dtype) is the one converted below
        prof = profile.model_copy(update={"base_model": profile.base_model.model_copy(update={"dtype": dtype})})
        base = base_model.build(prof, inputs={}, home=home / f"base-{dtype}", log=lambda _m: None)
        m = base.manifest["metrics"]
        print(json.dumps({"base_model": base.version, "dtype": m["dtype"], "bytes_on_disk": m["bytes_on_disk"],
                          "perplexity_transformers": m["perplexity"], "tokens": m["perplexity_tokens"],
                          "seconds": m["seconds"]}), flush=True)
    model_dir = base.path / "model"

    for gguf_type in args.types:
        for embedding_type in args.embedding_types:
            out = home / "gguf" / f"{gguf_type}-{embedding_type}"
            start = time.perf_counter()
            path = gguf_export.convert_to_gguf(model_dir, out / gguf_export.GGUF_NAME, gguf_type,
                                               metadata={}, embedding_type=embedding_type)
            row = {"type": gguf_type, "embedding_type": embedding_type,
                   "convert_seconds": round(time.perf_counter() - start, 1),
                   **gguf_export.gguf_summary(path)}
            start = time.perf_counter()
            row["perplexity_llamacpp"] = llamacpp.perplexity(path, text, args.tokens)
            row["perplexity_seconds"] = round(time.perf_counter() - start, 1)
            row["speed"] = llamacpp.tokens_per_second(path, args.speed_tokens, args.threads)
            for level in args.zstd_levels:
                packed = gguf_export.zstd_pack(path, level)
                row[f"zstd_{level}"] = {k: packed[k] for k in ("zst_bytes", "zstd_ratio", "zstd_seconds")}
                row[f"zstd_{level}"]["roundtrip_ok"] = gguf_export.verify_roundtrip(
                    out / packed["zst"], packed["gguf_sha256"])
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
