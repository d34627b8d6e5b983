"""llama.cpp built for this CPU against another build of the same version: seconds per 512-token
chunk with every position's logits (what `refinery.fidelity` asks of each GGUF in the report),
on the embedded SmolLM2-135M quantized to the report's types. Prints JSON.

    python bench/llamacpp_build.py                  # builds the AVX2-only variant first (a few minutes)
    python bench/llamacpp_build.py --other DIR      # a `pip install --target DIR llama-cpp-python` made before

The installed build is `make setup`'s (AVX512 where the CPU has it); the other defaults to the
flags the Makefile used before: AVX2/FMA/F16C. Both run in fresh processes, alternating, so a
change in machine load hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

AVX2_ONLY = ("-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
             "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF")
TYPES = ("F16", "Q4_0", "Q4_K_M", "IQ4_XS")

_CHILD = """
import json, sys, time
import numpy as np
if sys.argv[1]:
    sys.path.insert(0, sys.argv[1])
from refinery import llamacpp
out = {"features": llamacpp.build_features()}
rng = np.random.default_rng(0)
for f in sys.argv[3:]:
    with llamacpp.chunk_logits(f, 512) as logits:
        logits(rng.integers(100, 40000, size=64))  # warm-up
        t = time.perf_counter()
        for _ in range(int(sys.argv[2])):
            logits(rng.integers(100, 40000, size=512))
        out[f] = (time.perf_counter() - t) / int(sys.argv[2])
print(json.dumps(out))
"""


def models(work: Path) -> dict[str, Path]:
    """The embedded model as F16 and the report's 4-bit types (llama.cpp's quantizer)."""
    import ctypes

    from refinery import llamacpp
    from refinery.base_model import embedded_gguf

    src = embedded_gguf()
    low = llamacpp._llama_cpp().llama_cpp
    f16 = work / "F16.gguf"
    params = low.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = low.LLAMA_FTYPE_MOSTLY_F16, True
    with llamacpp.captured_stderr():
        if low.llama_model_quantize(str(src).encode(), str(f16).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"could not convert {src} to F16")
        out = {"F16": f16}
        for t in TYPES[1:]:
            llamacpp.quantize(f16, work / f"{t}.gguf", t)
            out[t] = work / f"{t}.gguf"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, help="a pip --target folder holding the other llama_cpp build")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=4, help="512-token chunks timed per file and round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llamacpp-build-") as tmp:
        work = Path(tmp)
        other = args.other
        if other is None:
            other = work / "avx2"
            version = __import__("importlib.metadata").metadata.version("llama-cpp-python")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir", "--no-deps",
                            "--target", str(other), f"llama-cpp-python=={version}"],
                           env={**os.environ, "CMAKE_ARGS": AVX2_ONLY}, check=True)
        files = models(work)
        runs: dict[str, list[dict]] = {"installed": [], "other": []}
        for _ in range(args.rounds):
            for name, path in (("installed", ""), ("other", str(other))):
                proc = subprocess.run([sys.executable, "-c", _CHILD, path, str(args.chunks),
                                       *map(str, files.values())], capture_output=True, text=True, check=True)
                runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        result = {"chunk_tokens": 512, "chunks_per_round": args.chunks, "rounds": args.rounds,
                  "installed_features": runs["installed"][0]["features"],
                  "other_features": runs["other"][0]["features"], "seconds_per_chunk": {}}
        for t, f in files.items():
            mine = statistics.median(r[str(f)] for r in runs["installed"])
            theirs = statistics.median(r[str(f)] for r in runs["other"])
            result["seconds_per_chunk"][t] = {"installed": round(mine, 3), "other": round(theirs, 3),
                                              "speedup": round(theirs / mine, 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
