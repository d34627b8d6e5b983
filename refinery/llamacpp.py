"""llama.cpp (through llama-cpp-python) as the runtime every GGUF is checked and timed on.

llama-cpp-python is an optional extra (built from source, about 15 minutes on 2 cores):
``CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON" pip install 'refinery[llamacpp]'``.
It is imported only when a function here needs it.

Quirk handled here: built natively (GGML_NATIVE=ON), llama.cpp crashed with SIGSEGV in
``ggml_backend_amx_mul_mat`` on a CPU reporting AMX, when the model was placed in the CPU's
"extra" buffer types (weight repacking, AMX). Our wheel is built with GGML_NATIVE=OFF (no AMX
kernels), where the extra buffer types are what makes prompt evaluation fast (repacked Q4_0 /
IQ4 weights: 1024 tokens of the embedded model in 3.3 s with them, 22.6 s without, measured on a
loaded 2-core machine). So they stay on, and are turned off only when the build reports AMX
(``llama_print_system_info``). llama-cpp-python does not expose that field on ``Llama(...)``: the
default model params it starts from are patched once, in ``_llama_cpp()``.
tests/test_llamacpp.py checks the flag follows the build and that generation survives.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

INSTALL_HINT = ("llama-cpp-python is not installed; install the extra: "
                "CMAKE_ARGS=\"-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF\" pip install 'refinery[llamacpp]' "
                "(builds from source, about 15 minutes on 2 cores)")
SMOKE_PROMPT = "The capital of France is"


class LlamaCppMissing(RuntimeError):
    """llama-cpp-python is not importable."""


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise LlamaCppMissing(INSTALL_HINT) from exc
    low = llama_cpp.llama_cpp  # the ctypes module Llama() takes its default params from
    default = low.llama_model_default_params
    if build_has_amx() and not getattr(default, "_refinery_no_extra_bufts", False):
        def params_without_extra_bufts():
            params = default()
            params.use_extra_bufts = False  # the AMX / repack crash, see the module docstring
            return params

        params_without_extra_bufts._refinery_no_extra_bufts = True
        low.llama_model_default_params = params_without_extra_bufts
    return llama_cpp


def build_features() -> list[str]:
    """The CPU features the installed llama.cpp was compiled for (``AVX2``, ``AVX512``, ...), as
    ``llama_print_system_info`` reports them. `make setup` builds for the machine it runs on:
    AVX512 where the CPU has it (1.5x faster prompt evaluation than AVX2, docs/stack.md)."""
    import llama_cpp

    return re.findall(r"\b([A-Z][A-Z0-9_]*) = 1\b", llama_cpp.llama_print_system_info().decode(errors="replace"))


def build_has_amx() -> bool:
    """Whether the installed llama.cpp was built with its AMX kernels (the crash above)."""
    return any(name.startswith("AMX") for name in build_features())


def require() -> None:
    """Raise LlamaCppMissing (with the install command) when llama-cpp-python is missing."""
    _llama_cpp()


def load(gguf_path: Path | str, n_ctx: int = 512, *, n_threads: int | None = None,
         logits_all: bool = False, n_batch: int = 512):
    """A ``llama_cpp.Llama`` on the CPU, quiet, with the workaround above applied. ``n_threads``
    (generation and prompt) defaults to the physical cores: llama-cpp-python's own default
    generates on half the logical ones, 1 thread on a 2-core machine, 1.2x slower there."""
    llama_cpp = _llama_cpp()
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    n_threads = n_threads or physical_cores()
    return llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n_threads,
                           n_threads_batch=n_threads, n_batch=min(n_batch, n_ctx),
                           logits_all=logits_all, n_gpu_layers=gpu_layers(), verbose=False, seed=0)


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def gpu_layers() -> int:
    """Every layer on the GPU when llama.cpp was built with GPU support and REFINERY_LLAMACPP_GPU=1
    (the runner sets it when compute.device resolves to cuda); none otherwise."""
    llama_cpp = _llama_cpp()
    wanted = os.environ.get("REFINERY_LLAMACPP_GPU") == "1"
    return -1 if wanted and llama_cpp.llama_cpp.llama_supports_gpu_offload() else 0


@contextmanager
def loaded(gguf_path: Path | str, **kwargs: Any) -> Iterator[Any]:
    """``load`` closed deterministically (llama-cpp-python's __del__ fails at interpreter exit)."""
    llm = load(gguf_path, **kwargs)
    try:
        yield llm
    finally:
        llm.close()


def generate(gguf_path: Path | str, prompt: str, max_tokens: int = 32, *, chat: bool = False) -> str:
    """Greedy completion of ``prompt`` (through the GGUF's chat template when ``chat``)."""
    with loaded(gguf_path, n_ctx=512) as llm:
        if chat:
            out = llm.create_chat_completion([{"role": "user", "content": prompt}],
                                             max_tokens=max_tokens, temperature=0.0)
            return out["choices"][0]["message"]["content"] or ""
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        return out["choices"][0]["text"]


def logits(gguf_path: Path | str, token_ids: list[int]):
    """Logits (n_tokens x vocab, float32) llama.cpp computes for a token sequence."""
    import numpy as np

    with loaded(gguf_path, n_ctx=max(64, len(token_ids)), logits_all=True) as llm:
        llm.eval(list(token_ids))
        return np.array(llm.scores[: len(token_ids)], dtype=np.float32)


def perplexity(gguf_path: Path | str, text: str, max_tokens: int = 2048, *, window: int = 1024,
               stride: int = 512) -> float:
    """Perplexity of the first ``max_tokens`` tokens of ``text`` as llama.cpp computes it.

    The same sliding windows as ``refinery.modelstats.perplexity`` (every token after the first
    scored once, with at least ``window - stride`` tokens of context), so the numbers compare
    with the transformers ones of the stages before.
    """
    import numpy as np

    with loaded(gguf_path, n_ctx=window, logits_all=True) as llm:
        ids = llm.tokenize(text[: max_tokens * 16].encode("utf-8"), add_bos=False, special=False)
        ids = ids[:max_tokens]
        if len(ids) < 2:
            raise ValueError("perplexity: the text has fewer than 2 tokens")
        nll, counted, scored_until, begin = 0.0, 0, 1, 0
        while scored_until < len(ids):
            end = min(begin + window, len(ids))
            llm.reset()
            llm.eval(ids[begin:end])
            first = scored_until - begin  # window position of the first token not yet scored
            scores = np.asarray(llm.scores[first - 1:end - begin - 1], dtype=np.float64)
            top = scores.max(axis=1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
            targets = np.asarray(ids[scored_until:end])
            nll += float((logz - scores[np.arange(len(targets)), targets]).sum())
            counted += len(targets)
            scored_until = end
            begin += stride
    return math.exp(nll / counted)


def tokens_per_second(gguf_path: Path | str, n_tokens: int = 64, n_threads: int | None = None) -> dict[str, Any]:
    """Prompt evaluation and greedy generation speed, ``n_tokens`` each, on ``n_threads`` threads."""
    with loaded(gguf_path, n_ctx=max(2 * n_tokens + 8, 64), n_threads=n_threads) as llm:
        seed_ids = llm.tokenize(b"The history of the city begins", add_bos=False)
        prompt = (seed_ids * (n_tokens // max(len(seed_ids), 1) + 1))[:n_tokens]
        start = time.perf_counter()
        llm.eval(prompt)
        prompt_s = time.perf_counter() - start
        # generate() yields a token sampled from the last logits, then evaluates it before
        # yielding the next: n_tokens + 1 yields are n_tokens decode steps.
        yielded = 0
        start = time.perf_counter()
        for _token in llm.generate([], temp=0.0, reset=False):  # continue after the prompt
            yielded += 1
            if yielded > n_tokens:
                break
        gen_s = time.perf_counter() - start
        generated = yielded - 1
    return {"prompt_tokens": len(prompt), "prompt_seconds": round(prompt_s, 4),
            "prompt_tokens_per_second": len(prompt) / prompt_s,
            "generated_tokens": generated, "generation_seconds": round(gen_s, 4),
            "generation_tokens_per_second": generated / gen_s if gen_s else None,
            "n_threads": llm.n_threads, "cpu_features": build_features()}


@contextmanager
def chunk_logits(gguf_path: Path | str, chunk: int, n_threads: int | None = None) -> Iterator[Any]:
    """A function ``ids -> logits (len(ids) x vocab, float32)`` evaluating each chunk from an empty
    context, as llama-perplexity does; the array is a view valid until the next call."""
    import numpy as np

    with loaded(gguf_path, n_ctx=chunk, n_threads=n_threads, logits_all=True, n_batch=chunk) as llm:
        def logits(ids: Any) -> Any:
            if len(ids) > chunk:
                raise ValueError(f"chunk of {len(ids)} tokens does not fit n_ctx {chunk}")
            llm.reset()
            llm.eval([int(i) for i in ids])
            return np.asarray(llm.scores[: len(ids)])

        yield logits


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collect what native code writes to file descriptor 2 (llama.cpp logs there, past Python)."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", errors="replace").splitlines())


def quantize(src: Path | str, dst: Path | str, ftype: str, *, imatrix: dict[str, Any] | None = None,
             n_threads: int | None = None) -> dict[str, Any]:
    """llama.cpp's own quantizer (``llama-quantize``): ``src`` (an F16/F32 GGUF) to type ``ftype``
    (``Q4_0``, ``Q4_K_M``, ``IQ4_XS``...), with an importance matrix when given: tensor name ->
    mean squared activation per input column (what ``llama-imatrix`` writes). The output is
    written under a temporary name and renamed. Returns how many tensors fell back to another
    type (rows that do not fit the type's blocks) and llama.cpp's log."""
    import ctypes
    import uuid

    import numpy as np

    low = _llama_cpp().llama_cpp
    name = f"LLAMA_FTYPE_MOSTLY_{ftype}"
    if not hasattr(low, name):
        known = sorted(n[len("LLAMA_FTYPE_MOSTLY_"):] for n in dir(low) if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise ValueError(f"unknown llama.cpp quantization type {ftype!r}; known: {known}")
    params = low.llama_model_quantize_default_params()
    params.ftype = getattr(low, name)
    params.nthread = n_threads or os.cpu_count() or 1
    keep = []  # the arrays and names must stay alive until quantize returns
    if imatrix:
        entries = (low.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (tensor, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep += [arr, tensor.encode()]
            entries[i].name = keep[-1]
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None  # the list ends with a NULL name
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(low.llama_model_imatrix_data))
        keep.append(entries)
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with captured_stderr() as lines:
            code = low.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) returned {code}:\n" + "\n".join(lines[-20:]))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"fallback_tensors": sum("falling back" in line for line in lines), "log": lines}


_CHILD = """
import json, sys
from refinery import llamacpp
try:
    text = llamacpp.generate(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    print(json.dumps({"ok": True, "sample": text}))
except Exception as exc:
    print(json.dumps({"ok": False, "sample": f"{type(exc).__name__}: {exc}"}))
"""


def loads_and_generates(gguf_path: Path | str, prompt: str = SMOKE_PROMPT,
                        max_tokens: int = 16, timeout: float = 300) -> tuple[bool, str]:
    """(ok, sample): load and generate in a child process, so a crash in native code (a segfault)
    is reported as a failed check instead of killing the caller."""
    require()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(gguf_path), prompt, str(max_tokens)],
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        return False, f"llama.cpp child process failed ({why}): {proc.stderr.strip()[-500:]}"
    result = json.loads(lines[-1])
    return bool(result["ok"]), result["sample"]
