"""Numbers every model stage records: size, sparsity, bits per weight, perplexity, time, memory.

All of it works on a Hugging Face folder that plain transformers loads on CPU: dense, sparse
compressed-tensors (sparse-bitmask) and quantized compressed-tensors (pack-quantized) alike.
Sparsity and parameters are counted on the dense-equivalent weights (what the model computes
with), bytes on what is on disk, so a saving shows up only if the file format really has it.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from refinery.config import Profile, ProfileError
from refinery.device import Placement

WIKITEXT_FILE = Path("wikitext2_raw") / "wikitext-test.txt"


class ConfigError(ProfileError):
    """A setting that does not fit the model or the machine; the message names the profile key."""


# --------------------------------------------------------------------------- held-out text


def heldout_text(profile: Profile) -> str:
    """WikiText-2 raw test split: the fixed English text every stage's quick perplexity uses."""
    data_dir = profile.resolve_path(profile.eval.data_dir)
    path = data_dir / WIKITEXT_FILE
    if not path.is_file():
        raise ConfigError(
            f"eval.data_dir: held-out text {path} not found (eval.data_dir={profile.eval.data_dir!r} "
            f"resolves to {data_dir}); point eval.data_dir or REFINERY_SHARED_DATA at the shared data")
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- loading


def load_model(model_dir: Path | str, *, dtype: Any = None, placement: Placement | None = None):
    """Load a saved folder with compressed-tensors weights decompressed to dense, on
    ``placement`` (refinery.device.select; default the CPU in float32). ``dtype`` overrides the
    placement's dtype ("auto": the dtype the folder is stored in).

    ``dequantize=True``: a quantized checkpoint is dequantized at load time, so every layer is a
    plain nn.Linear whose zeros can be counted and which runs on any device.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    kwargs: dict[str, Any] = {
        "dtype": dtype or (placement.torch_dtype if placement else torch.float32),
        "device_map": placement.device if placement else "cpu"}
    if _quantization_config(model_dir):
        from transformers.utils.quantization_config import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.eval()
    return model


def _read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))


def _quantization_config(model_dir: Path) -> dict[str, Any] | None:
    return _read_config(model_dir).get("quantization_config")


# --------------------------------------------------------------------------- perplexity


def perplexity(model_or_dir: Any, text: str, *, tokenizer: Any = None, max_tokens: int = 2048,
               window: int = 1024, stride: int = 512) -> float:
    """Perplexity over the first ``max_tokens`` tokens of ``text`` (CPU, no grad).

    Sliding windows of ``window`` tokens advancing by ``stride``: every token after the first is
    scored once, with at least ``window - stride`` tokens of context once the first window is full.
    """
    import torch
    from transformers import AutoTokenizer

    if isinstance(model_or_dir, (str, Path)):
        model = load_model(model_or_dir)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_or_dir)
    else:
        model = model_or_dir
        if tokenizer is None:
            raise ValueError("perplexity: pass tokenizer= with an in-memory model")
    if stride <= 0 or stride > window:
        raise ValueError(f"perplexity: need 0 < stride <= window, got stride={stride} window={window}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    window = min(window, max_pos) if max_pos else window
    stride = min(stride, window)

    # Tokenize a prefix that is surely long enough (>= 1 character per token), not the whole file.
    ids = tokenizer(text[: max_tokens * 16], add_special_tokens=False, return_tensors="pt").input_ids[0]
    ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError("perplexity: the text has fewer than 2 tokens")

    device = next(model.parameters()).device
    nll, counted, scored_until = 0.0, 0, 1  # position 0 has no prediction
    was_training = model.training
    model.eval()
    with torch.no_grad():
        begin = 0
        while scored_until < ids.numel():
            end = min(begin + window, ids.numel())
            chunk = ids[begin:end].unsqueeze(0).to(device)
            logits = model(chunk).logits[0, :-1].float()
            targets = chunk[0, 1:]
            # logits[i] predicts token begin+i+1; score only tokens not scored before (with
            # stride == window the first token of each window has no context and is skipped)
            first = max(scored_until - (begin + 1), 0)
            logp = torch.log_softmax(logits[first:], dim=-1)
            nll -= logp.gather(1, targets[first:].unsqueeze(1)).sum().item()
            counted += targets.numel() - first
            scored_until = end
            begin += stride
    model.train(was_training)
    return math.exp(nll / counted)


# --------------------------------------------------------------------------- size and sparsity


def _safetensors_bytes(model_dir: Path) -> tuple[int, dict[str, int]]:
    """Bytes of tensor data per tensor name, read from the safetensors headers only."""
    per_tensor: dict[str, int] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        for name, meta in header.items():
            if name != "__metadata__":
                start, stop = meta["data_offsets"]
                per_tensor[name] = stop - start
    return sum(per_tensor.values()), per_tensor


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def nominal_weight_bits(config: dict[str, Any]) -> int | None:
    """Weight bits the quantization config declares (None when the model is not quantized)."""
    qc = config.get("quantization_config") or {}
    bits = [g.get("weights", {}).get("num_bits") for g in (qc.get("config_groups") or {}).values()
            if g.get("weights")]
    bits = [b for b in bits if b]
    return max(bits) if bits else None


def _dtype_bits(dtype: str) -> int | None:
    import torch

    dt = getattr(torch, dtype, None)
    return dt.itemsize * 8 if isinstance(dt, torch.dtype) else None


def linear_sparsity(model: Any) -> dict[str, float]:
    """Fraction of exact zeros in each nn.Linear weight inside the decoder layers (not lm_head)."""
    import torch

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            w = module.weight.detach()
            out[name] = float((w == 0).sum().item()) / w.numel()
    return out


# Quantization metadata a dequantized compressed-tensors model still carries as parameters.
_QUANT_PARAM = re.compile(r"\.(weight|input|output)_(scale|zero_point|shape|g_idx|global_scale)$")


def count_model_parameters(model: Any) -> int:
    """Dense-equivalent parameters: tied embeddings once, quantization scales/zero points not."""
    return sum(p.numel() for name, p in model.named_parameters() if not _QUANT_PARAM.search(name))


def model_stats(model_dir: Path | str, model: Any = None) -> dict[str, Any]:
    """Parameters, bytes on disk, sparsity (overall and per linear layer), bits per weight, dtype.

    ``model``: the same model already in memory (skips reloading it from ``model_dir``).
    Sparsity is measured on the dense-equivalent weights (dequantized, decompressed).
    """
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    model = model if model is not None else load_model(model_dir, dtype="auto")
    parameters = count_model_parameters(model)

    per_layer = linear_sparsity(model)
    linear_params = {name: m.weight.numel() for name, m in model.named_modules()
                     if name in per_layer}
    total_linear = sum(linear_params.values())
    zeros = sum(per_layer[n] * linear_params[n] for n in per_layer)

    tensor_bytes, per_tensor = _safetensors_bytes(model_dir)
    prefixes = tuple(f"{n}." for n in per_layer)
    linear_bytes = sum(b for name, b in per_tensor.items() if name.startswith(prefixes))
    nominal = nominal_weight_bits(config)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or
                next(model.parameters()).dtype).replace("torch.", "")
    return {
        "parameters": parameters,
        "linear_parameters": total_linear,
        "bytes_on_disk": dir_bytes(model_dir),
        "tensor_bytes": tensor_bytes,
        "sparsity": zeros / total_linear if total_linear else 0.0,  # over decoder linear weights
        "sparsity_all_parameters": (zeros / parameters) if parameters else 0.0,
        "sparsity_per_layer": per_layer,
        "bits_per_weight": tensor_bytes * 8 / parameters,
        "bits_per_linear_weight": linear_bytes * 8 / total_linear if total_linear else None,
        "nominal_weight_bits": nominal or _dtype_bits(dtype),
        "quantized": nominal is not None,
        "sparse_format": ((config.get("quantization_config") or {}).get("sparsity_config") or {}).get("format"),
        "quant_format": (config.get("quantization_config") or {}).get("format"),
        "dtype": dtype,
    }


def zstd_bytes(model_dir: Path | str, level: int = 3) -> int:
    """Bytes of the weight files after zstd: what sparsity saves once any generic compressor runs."""
    import zstandard

    total = 0
    cctx = zstandard.ZstdCompressor(level=level)
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as src:
            reader = cctx.stream_reader(src)
            while chunk := reader.read(1 << 22):
                total += len(chunk)
    return total


def generation_sample(model: Any, tokenizer: Any, prompt: str = "What is the capital of France?",
                      max_new_tokens: int = 16) -> dict[str, Any]:
    """Greedy continuation of a chat prompt: proof that a saved model runs, and a glimpse of how."""
    import torch

    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new = out[0, ids["input_ids"].shape[1]:]
    return {"prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True),
            "new_tokens": int(new.numel())}


def measure_saved_model(model_dir: Path | str, text: str, *, max_tokens: int = 2048,
                        placement: Placement | None = None) -> dict[str, Any]:
    """Reload a saved folder with plain transformers (on ``placement``, default CPU), generate, and
    measure it.

    Everything a model stage records about its output, taken from what is on disk (so a
    format that does not reload fails here, inside the stage, not downstream).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, placement=placement)
    stats = model_stats(model_dir, model=model)
    stats["perplexity"] = perplexity(model, text, tokenizer=tokenizer, max_tokens=max_tokens)
    stats["perplexity_tokens"] = max_tokens
    stats["generation"] = generation_sample(model, tokenizer)
    return stats


# --------------------------------------------------------------------------- validation


def _as_config(model_dir_or_config: Any, key_prefix: str):
    """(transformers config, model_dir or None) from a folder, a config object or a dict."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_dir_or_config, PretrainedConfig):
        return model_dir_or_config, None
    if isinstance(model_dir_or_config, dict):
        return AutoConfig.for_model(**model_dir_or_config), None
    model_dir = Path(model_dir_or_config)
    if not (model_dir / "config.json").is_file():
        what = "does not exist" if not model_dir.exists() else "has no config.json"
        raise ConfigError(f"{key_prefix}: model directory {model_dir} {what}")
    return AutoConfig.from_pretrained(model_dir), model_dir


def meta_model(config: Any):
    """The model a config describes, built on the meta device: shapes without memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_parameters(config: Any) -> int:
    """Parameter count from a config alone (tied weights once)."""
    return sum(p.numel() for p in meta_model(config).parameters())


def group_dimensions(config: Any) -> dict[str, int]:
    """Input widths of the linear layers that group-wise quantization splits into groups."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dims = {"hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size}
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    if heads and head_dim:
        dims["num_attention_heads*head_dim"] = heads * head_dim
    return dims


def validate_model_config(model_dir_or_config: Any, *, group_size: int | None = None,
                          sparsity: float | None = None, key_prefix: str = "awq",
                          bytes_per_param: float = 4.0) -> dict[str, Any]:
    """Check a stage's settings against the model and this machine's disk before any work starts.

    Raises ConfigError naming the profile key (``<key_prefix>.group_size`` etc.). The disk
    estimate assumes the model is saved in fp32 (``bytes_per_param``). Memory is
    refinery.memory_plan's check, per device. Returns the numbers it checked.
    """
    config, model_dir = _as_config(model_dir_or_config, key_prefix)
    checked: dict[str, Any] = {}
    if sparsity is not None and not 0 < sparsity < 1:
        raise ConfigError(f"{key_prefix}.sparsity: must be in (0, 1), got {sparsity}")
    if group_size is not None:
        dims = group_dimensions(config)
        bad = {k: v for k, v in dims.items() if v % group_size}
        if group_size <= 0 or bad:
            g = math.gcd(*dims.values())
            fits = [d for d in (256, 128, 64, 32, 16) if g % d == 0]
            detail = ", ".join(f"{k} {v} ({v} % {group_size} = {v % group_size})" for k, v in bad.items())
            raise ConfigError(f"{key_prefix}.group_size: {group_size} does not divide the model's "
                              f"dimensions: {detail}; group sizes that fit: {fits or [g]}")
        checked["group_dimensions"] = dims

    params = count_parameters(config)
    need_disk = int(params * bytes_per_param)
    checked.update(parameters=params, need_disk_bytes=need_disk)
    if model_dir is not None:
        free_disk = shutil.disk_usage(model_dir).free
        if free_disk < need_disk:
            raise ConfigError(f"{key_prefix}: {params / 1e9:.2f}B parameters need about "
                              f"{need_disk / 2**30:.1f} GiB of disk, {free_disk / 2**30:.1f} GiB free "
                              f"under {model_dir}")
    return checked


# --------------------------------------------------------------------------- time and memory


def peak_rss_bytes() -> int:
    """Peak resident memory of this process and of its finished children, the larger (Linux: KiB).

    This process's own peak is VmHWM where /proc has it: ru_maxrss survives exec, so a process
    started by a big parent reports the parent's size at the fork (the data-stage benchmark's
    child reported its parent's 2.16 GB corpus instead of its own 0.97 GB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        pass
    return 1024 * max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def tree_pss_bytes(pid: int | None = None) -> int:
    """Proportional set size of a process and all its descendants (Linux /proc; 0 elsewhere): what
    they hold together, each shared page counted once. RSS would count pages a forked worker
    shares with its parent twice."""
    pid = os.getpid() if pid is None else pid
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup", encoding="ascii") as f:
                total += 1024 * next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration, ValueError):  # gone meanwhile, or no /proc
            continue
    return total


class TreeMemory:
    """``with TreeMemory() as m: ...``; then ``m.peak_bytes``: the largest ``tree_pss_bytes`` of this
    process seen every ``interval`` seconds (a sampling thread: a spike shorter than that can be missed,
    which VmHWM in ``peak_rss_bytes`` catches for this process alone)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_bytes = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_pss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


class Timer:
    """``with Timer() as t: ...``; then ``t.seconds`` (also readable while running)."""

    def __init__(self) -> None:
        self.start = self.end = None

    def __enter__(self) -> Timer:
        self.start, self.end = time.perf_counter(), None
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self.start is None:
            return 0.0
        return round((self.end or time.perf_counter()) - self.start, 3)
