"""The gguf_zst stage: a Hugging Face folder -> one GGUF file llama.cpp runs -> a .gguf.zst.

The converter is written on the ``gguf`` package (llama.cpp's convert_hf_to_gguf.py is not in
it) and does what that script does for the Llama architecture:

- tensor names from ``gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, n_layers)``;
- q_proj / k_proj rows permuted: HF's rotary embedding rotates the two halves of each head
  (rotate_half), llama.cpp rotates adjacent pairs, so each head's rows are interleaved;
- tied embeddings: no ``output.weight``, llama.cpp then reuses ``token_embd.weight``;
- tokenizer fields (byte-level BPE vocab, merges, token types, special ids, chat template) read
  from the folder's tokenizer.json;
- 2-D weights quantized with ``gguf.quants.quantize``, 1-D tensors (norms) kept F32.

The input may be a plain folder or a compressed-tensors one (sparse or pack-quantized from
llm-compressor); ``refinery.modelstats.load_model`` decompresses it to dense weights first.
Files are written through a temporary name and renamed, so a crash never leaves a file that
looks finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from refinery.artifacts import Artifact, load_artifact, sha256_file, staged_artifact
from refinery.config import Profile

STAGE = "gguf_zst"
EXPORTER_VERSION = "1"
GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "F32")
GGUF_NAME = "model.gguf"
CHUNK = 1 << 20

# The token embedding (also the output layer when tied) is the tensor most sensitive to
# quantization; llama.cpp's own quantizer keeps it at higher precision for low-bit types. With
# embedding_type="auto" it is Q8_0 for the 4/5-bit types and the main type otherwise.
_LOW_BIT = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")

# llama.cpp names BPE pre-tokenizers; these are the tokenizer.json shapes we recognise.
_LLAMA3_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


class GGUFExportError(ValueError):
    """A model or setting the converter cannot turn into a GGUF; the message says which."""


# --------------------------------------------------------------------------- small helpers


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``final``; rename it to ``final`` only on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _qtype(name: str):
    import gguf

    if name not in GGUF_TYPES:
        raise GGUFExportError(f"gguf.type: {name!r} is not supported; choose one of {list(GGUF_TYPES)}")
    return gguf.GGMLQuantizationType[name]


# --------------------------------------------------------------------------- tokenizer


def _bpe_pre(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for the pre-tokenizer in tokenizer.json."""
    pt = tokenizer_json.get("pre_tokenizer") or {}
    steps = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM / SmolLM2: each digit alone, then the GPT-2 regex
    if kinds == ["Split", "ByteLevel"] and \
            str(steps[0].get("pattern", {}).get("Regex", "")).startswith(_LLAMA3_REGEX_START):
        return "llama-bpe"  # Llama 3 / 3.1
    raise GGUFExportError(f"tokenizer.json: pre-tokenizer {kinds} is not one the converter knows "
                          "(gpt2, smollm, llama-bpe)")


def tokenizer_fields(model_dir: Path, vocab_size: int | None = None) -> dict[str, Any]:
    """The GGUF tokenizer fields of a folder's byte-level BPE tokenizer (tokenizer.json)."""
    import gguf
    from transformers import AutoTokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{path}: missing; the converter needs a fast (tokenizer.json) tokenizer")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFExportError(f"{path}: model.type={model.get('type')!r}; only byte-level BPE is supported")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special")
                                 else gguf.TokenType.USER_DEFINED)
    n = max(vocab_size or 0, max(by_id) + 1)
    tokens, toktypes = [], []
    for i in range(n):
        if i in by_id:
            tokens.append(by_id[i])
            toktypes.append(types.get(i, int(gguf.TokenType.NORMAL)))
        else:  # the embedding has more rows than the tokenizer has tokens (padding)
            tokens.append(f"[PAD{i}]")
            toktypes.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tok = AutoTokenizer.from_pretrained(model_dir)
    probe = tok("a").input_ids
    fields: dict[str, Any] = {
        "model": "gpt2", "pre": _bpe_pre(tj), "tokens": tokens, "token_types": toktypes,
        "merges": merges, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "unknown_token_id": tok.unk_token_id, "padding_token_id": tok.pad_token_id,
        "add_bos_token": bool(probe) and probe[0] == tok.bos_token_id,
        "chat_template": tok.chat_template,
    }
    return fields


def _write_tokenizer(w, fields: dict[str, Any]) -> None:
    w.add_tokenizer_model(fields["model"])
    w.add_tokenizer_pre(fields["pre"])
    w.add_token_list(fields["tokens"])
    w.add_token_types(fields["token_types"])
    w.add_token_merges(fields["merges"])
    for key in ("bos", "eos", "unknown", "padding"):
        if fields[f"{key}_token_id"] is not None:
            getattr(w, f"add_{'unk' if key == 'unknown' else 'pad' if key == 'padding' else key}_token_id")(
                fields[f"{key}_token_id"])
    w.add_add_bos_token(fields["add_bos_token"])
    w.add_add_space_prefix(False)
    if fields["chat_template"]:
        w.add_chat_template(fields["chat_template"])


# --------------------------------------------------------------------------- weights


def permute_qk(weight, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's q/k row order: interleave the two rotary halves of every head.

    The same function as ``LlamaModel.permute`` in llama.cpp's convert_hf_to_gguf.py; for k_proj
    the head count is the number of key/value heads.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _rope(config) -> dict[str, Any]:
    """Rope theta and scaling from a transformers 5 (rope_parameters) or 4 (rope_scaling) config."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    return {"theta": float(theta), "type": kind, **{k: v for k, v in params.items()
                                                   if k not in ("rope_theta", "rope_type", "type")}}


def _llama3_rope_factors(rope: dict[str, Any], head_dim: int):
    """The rope_freqs tensor llama.cpp needs for Llama 3.1's "llama3" rope scaling (as in
    convert_hf_to_gguf.py)."""
    import numpy as np

    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (rope["theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# --------------------------------------------------------------------------- the 4-bit grid, carried over

# A compressed-tensors int4 weight with groups of 32 is exactly a llama.cpp block type:
# symmetric x = s * q (q in [-8, 7]) is Q4_0 with d = s and code q + 8; asymmetric
# x = s * (q - z) is Q4_1 with d = s, m = -s * (z + 8) and code q + 8. Writing those codes keeps
# the quantization AWQ chose instead of rounding the weights a second time.
GRID_TYPES = {True: "Q4_0", False: "Q4_1"}  # symmetric -> type


def weight_grid(model_dir: Path) -> dict[str, Any] | None:
    """The folder's int4 group-32 weight grid (``{"type": "Q4_0"|"Q4_1", "symmetric": bool}``),
    or None when its weights are not quantized that way."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values()]
    if len(weights) != 1:
        return None
    w = weights[0]
    if w.get("num_bits") != 4 or w.get("type") != "int" or w.get("group_size") != 32 or w.get("strategy") != "group":
        return None
    return {"type": GRID_TYPES[bool(w.get("symmetric"))], "symmetric": bool(w.get("symmetric"))}


def resolve_type(gguf_type: str, model_dir: Path) -> str:
    """``auto``: the block type that holds the folder's 4-bit grid exactly (error when it has none)."""
    if gguf_type != "auto":
        return gguf_type
    grid = weight_grid(model_dir)
    if grid is None:
        raise GGUFExportError(f"gguf.type: auto carries an int4 group-32 weight grid into Q4_0/Q4_1, but "
                              f"{model_dir} has none (quantize with awq.group_size: 32, or set gguf.type)")
    return grid["type"]


def pack_on_grid(weight, scale, zero_point, gguf_type: str):
    """Q4_0 / Q4_1 blocks (uint8 rows) holding exactly the codes of ``weight = s * (q - z)``.

    ``scale`` and ``zero_point``: (rows, groups of 32). Raises when the weight is not on that grid.
    """
    import numpy as np

    rows, cols = weight.shape
    groups = scale.shape[1]
    if cols != groups * 32:
        raise GGUFExportError(f"grid export needs groups of 32 columns, got {cols} columns in {groups} groups")
    s = np.asarray(scale, dtype=np.float32).reshape(rows, groups, 1)
    z = np.zeros_like(s) if zero_point is None else np.asarray(zero_point, dtype=np.float32).reshape(rows, groups, 1)
    w = np.asarray(weight, dtype=np.float32).reshape(rows, groups, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s == 0, z, np.rint(w / s) + z)
    if q.min() < -8 or q.max() > 7 or not np.allclose((q - z) * s, w, rtol=0, atol=1e-6 * float(np.abs(w).max() or 1)):
        raise GGUFExportError("the weight is not on its own int4 grid (scale/zero point do not reproduce it)")
    codes = (q + 8).astype(np.uint8).reshape(rows * groups, 2, 16)
    nibbles = codes[:, 0, :] | (codes[:, 1, :] << np.uint8(4))
    d = s.reshape(-1, 1).astype(np.float16).view(np.uint8)
    if gguf_type == "Q4_0":
        if zero_point is not None and np.any(z != 0):
            raise GGUFExportError("Q4_0 holds a symmetric grid only; this one has zero points (use Q4_1)")
        blocks = np.concatenate([d, nibbles], axis=1)
    elif gguf_type == "Q4_1":
        m = (-(z + 8) * s).reshape(-1, 1).astype(np.float16).view(np.uint8)
        blocks = np.concatenate([d, m, nibbles], axis=1)
    else:
        raise GGUFExportError(f"no exact block type {gguf_type!r} for an int4 grid (Q4_0 or Q4_1)")
    return blocks.reshape(rows, -1)


def _tensor_type(name: str, data, main: str, embedding_type: str) -> str:
    """GGUF type of one tensor: F32 for 1-D; the embedding rule; F16 when rows do not fit blocks."""
    import gguf

    if data.ndim == 1:
        return "F32"
    kind = main
    if name in ("token_embd.weight", "output.weight"):
        kind = embedding_type if embedding_type != "auto" else ("Q8_0" if main in _LOW_BIT else main)
    if kind != "F16":
        block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        if data.shape[-1] % block:  # llama.cpp falls back the same way
            return "F16"
    return kind


def grid_tensors(model_dir: Path) -> dict[str, tuple[Any, Any]]:
    """Weight name -> (scale, zero point or None) of every grid-quantized Linear in the folder."""
    from safetensors import safe_open

    found: dict[str, dict[str, Any]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, framework="pt") as tensors:  # pt: scales may be bfloat16, which numpy lacks
            for name in tensors.keys():
                for suffix in ("weight_scale", "weight_zero_point"):
                    if name.endswith("." + suffix):
                        value = tensors.get_tensor(name).float().numpy()
                        found.setdefault(name[: -len(suffix)] + "weight", {})[suffix] = value
    return {k: (v["weight_scale"], v.get("weight_zero_point")) for k, v in found.items() if "weight_scale" in v}


def convert_to_gguf(model_dir: Path, out_path: Path, gguf_type: str, *,
                    metadata: dict[str, str] | None = None, embedding_type: str = "auto",
                    log: Callable[[str], Any] = lambda _msg: None, stats: dict[str, Any] | None = None) -> Path:
    """Write a llama.cpp GGUF of the Llama-architecture model in ``model_dir``; returns ``out_path``.

    ``metadata``: lineage written into the file; keys starting with ``general.`` are written as
    they are (``general.name``), every other key as ``refinery.<key>`` (string values).
    ``gguf_type="auto"`` writes an int4 group-32 grid as the block type that holds it exactly;
    ``stats`` (when given) receives the type chosen and how many tensors kept their grid.
    """
    import gguf
    import numpy as np
    import torch

    from refinery.modelstats import load_model

    model_dir, out_path = Path(model_dir), Path(out_path)
    gguf_type = resolve_type(gguf_type, model_dir)
    _qtype(gguf_type)
    if embedding_type != "auto":
        _qtype(embedding_type)
    grid = weight_grid(model_dir)
    # the grid goes over exactly when the block type is the grid's own; else a second rounding
    grids = grid_tensors(model_dir) if grid is not None and grid["type"] == gguf_type else {}
    model = load_model(model_dir)  # dense fp32, compressed-tensors decompressed
    config = model.config
    if config.model_type != "llama":
        raise GGUFExportError(f"{model_dir}/config.json: model_type={config.model_type!r}; the "
                              "converter writes the Llama architecture only")
    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_head_kv = config.num_key_value_heads or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = _rope(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    metadata = dict(metadata or {})

    with atomic_path(out_path) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        w.add_name(metadata.pop("general.name", model_dir.name))
        w.add_quantized_by("refinery")
        for key, value in sorted(metadata.items()):
            w.add_string(key if key.startswith("general.") else f"refinery.{key}", str(value))
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_rope_freq_base(rope["theta"])
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_rope_dimension_count(head_dim)
        if head_dim != config.hidden_size // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(config.vocab_size)
        w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{gguf_type}"])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if rope["type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        elif rope["type"] not in ("default", "llama3"):
            raise GGUFExportError(f"{model_dir}/config.json: rope type {rope['type']!r} is not supported")
        _write_tokenizer(w, tokenizer_fields(model_dir, config.vocab_size))

        if rope["type"] == "llama3":
            w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                         _llama3_rope_factors(rope, head_dim))
        types: dict[str, int] = {}
        on_grid = 0
        for hf_name, tensor in model.state_dict().items():
            if hf_name == "lm_head.weight" and tied:
                continue  # llama.cpp uses token_embd.weight when output.weight is absent
            leaf = hf_name.rsplit(".", 1)[-1]
            if leaf == "weight_packed":
                raise GGUFExportError(f"{model_dir}: {hf_name} is still packed after loading")
            if leaf not in ("weight", "bias"):
                continue  # inv_freq buffers; compressed-tensors' scales and zero points
            name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise GGUFExportError(f"{model_dir}: tensor {hf_name} has no llama.cpp name")
            data = tensor.detach().to(torch.float32).numpy()
            scale, zero = grids.get(hf_name, (None, None))
            heads = {"q_proj": n_head, "k_proj": n_head_kv}.get(hf_name.split(".")[-2]) \
                if "self_attn" in hf_name else None
            if heads is not None:  # the grid's rows move with the weight's
                data = permute_qk(data, n_head, heads)
                scale = None if scale is None else permute_qk(scale, n_head, heads)
                zero = None if zero is None else permute_qk(zero, n_head, heads)
            kind = _tensor_type(name, data, gguf_type, embedding_type)
            qtype = gguf.GGMLQuantizationType[kind]
            data = np.ascontiguousarray(data)
            if scale is not None and kind == gguf_type:
                packed = pack_on_grid(data, scale, zero, kind)
                on_grid += 1
            else:
                packed = data if kind == "F32" else gguf.quants.quantize(data, qtype)
            w.add_tensor(name, packed, raw_dtype=qtype)
            types[kind] = types.get(kind, 0) + 1
        quantized = sum(n for k, n in types.items() if k not in ("F32", "F16"))
        if stats is not None:
            stats.update(gguf_type=gguf_type, tensors_by_type=types, grid_tensors=on_grid,
                         weight_grid=grid["type"] if grid else None)
        log(f"gguf: writing {out_path.name} ({gguf_type}; tensors by type {types}; {on_grid} of {quantized} "
            "quantized tensors carry their int4 grid over exactly)")
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        except OSError as err:  # numpy's short write says neither the file nor why
            written = tmp.stat().st_size if tmp.exists() else 0
            free = shutil.disk_usage(tmp.parent).free
            message = f"writing {out_path}: {err} ({written:,} bytes written, {free:,} bytes free on its disk)"
            raise (OSError(err.errno, message) if err.errno else OSError(message)) from err
    del model
    return out_path


def gguf_summary(gguf_path: Path, *, count_zeros: bool = True) -> dict[str, Any]:
    """Tensor types, weights, bytes and bits per weight of a GGUF, and its zero fraction.

    ``sparsity``: exact zeros among the dequantized 2-D weights (what llama.cpp computes with);
    None without ``count_zeros`` (dequantizing every tensor takes seconds).
    """
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(gguf_path))
    types: dict[str, int] = {}
    elements = data_bytes = zeros = weights2d = 0
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        elements += int(t.n_elements)
        data_bytes += int(t.n_bytes)
        if count_zeros and len(t.shape) == 2 and t.name != "token_embd.weight":
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            zeros += int((values == 0).sum())
            weights2d += int(t.n_elements)
    return {"tensor_types": types, "parameters": elements, "tensor_bytes": data_bytes,
            "bytes": gguf_path.stat().st_size, "bits_per_weight": data_bytes * 8 / elements,
            "sparsity": (zeros / weights2d if weights2d else 0.0) if count_zeros else None}


# --------------------------------------------------------------------------- zstd


def zstd_pack(gguf_path: Path, level: int, *, threads: int = -1) -> dict[str, Any]:
    """Compress ``<name>.gguf`` to ``<name>.gguf.zst`` (streaming; zstd worker threads, -1 = all
    cores), hashing the input on the way. Returns sizes, ratio, seconds and both SHA-256s."""
    import zstandard

    gguf_path = Path(gguf_path)
    zst_path = gguf_path.with_name(gguf_path.name + ".zst")
    size = gguf_path.stat().st_size
    digest = hashlib.sha256()
    start = time.perf_counter()
    cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    with atomic_path(zst_path) as tmp:
        with open(gguf_path, "rb") as src, open(tmp, "wb") as dst, \
                cctx.stream_writer(dst, size=size, closefd=False) as writer:
            for block in iter(lambda: src.read(CHUNK), b""):
                digest.update(block)
                writer.write(block)
    seconds = time.perf_counter() - start
    zst_bytes = zst_path.stat().st_size
    return {"gguf": gguf_path.name, "zst": zst_path.name, "gguf_sha256": digest.hexdigest(),
            "zst_sha256": sha256_file(zst_path), "gguf_bytes": size, "zst_bytes": zst_bytes,
            "zstd_level": level, "zstd_ratio": size / zst_bytes, "zstd_seconds": round(seconds, 3)}


def zstd_size(path: Path, level: int) -> int:
    """Bytes ``path`` takes packed with zstd at ``level`` (compressed and counted, not written)."""
    import zstandard

    cctx = zstandard.ZstdCompressor(level=level, threads=-1)
    total = 0
    with open(path, "rb") as src:
        reader = cctx.stream_reader(src, size=Path(path).stat().st_size)
        while chunk := reader.read(CHUNK * 4):
            total += len(chunk)
    return total


def verify_roundtrip(zst_path: Path, expected_sha256: str) -> bool:
    """Decompress (streaming) and compare the SHA-256 with the original's; False on any damage."""
    import zstandard

    digest = hashlib.sha256()
    try:
        with open(zst_path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
            for block in iter(lambda: reader.read(CHUNK), b""):
                digest.update(block)
    except zstandard.ZstdError:
        return False
    return digest.hexdigest() == expected_sha256


def export_model(model_dir: Path, out_dir: Path, gguf_type: str, zstd_level: int,
                 metadata: dict[str, str] | None = None, *, embedding_type: str = "auto",
                 log: Callable[[str], Any] = lambda _msg: None) -> dict[str, Any]:
    """GGUF + .gguf.zst of a model folder in ``out_dir``, with checksums and a verified round trip.

    Shared by the gguf_zst, recovery and benchmark stages.
    """
    out_dir = Path(out_dir)
    start = time.perf_counter()
    converted: dict[str, Any] = {}
    gguf_path = convert_to_gguf(model_dir, out_dir / GGUF_NAME, gguf_type, metadata=metadata,
                                embedding_type=embedding_type, log=log, stats=converted)
    convert_seconds = time.perf_counter() - start
    summary = gguf_summary(gguf_path)
    packed = zstd_pack(gguf_path, zstd_level)
    ok = verify_roundtrip(out_dir / packed["zst"], packed["gguf_sha256"])
    if not ok:
        raise RuntimeError(f"{out_dir / packed['zst']}: zstd round trip does not reproduce {gguf_path.name}")
    log(f"gguf: {summary['bytes']:,} bytes, {summary['bits_per_weight']:.2f} bits/weight; zstd level "
        f"{zstd_level}: {packed['zst_bytes']:,} bytes (x{packed['zstd_ratio']:.3f})")
    return {"embedding_type": embedding_type, **summary, **packed, **converted,
            "roundtrip_ok": ok, "convert_seconds": round(convert_seconds, 3)}


# --------------------------------------------------------------------------- the stage


def lineage(artifact: Artifact) -> dict[str, str]:
    """stage -> version of an artifact and every artifact upstream of it (through manifests)."""
    out = {artifact.stage: artifact.version}
    for ref in artifact.manifest.get("inputs", {}).values():
        path = Path(ref.get("path", "")) if isinstance(ref, dict) else None
        if path and (path / "manifest.json").is_file():
            out.update({k: v for k, v in lineage(load_artifact(path)).items() if k not in out})
        elif isinstance(ref, dict) and "stage" in ref:
            out.setdefault(ref["stage"], ref.get("version", "?"))
    return out


def export_kld(model_dir: Path, gguf_path: Path, text: str, *, tokens: int = 512, chunk: int = 256) -> dict[str, Any]:
    """Mean KL divergence of the GGUF in llama.cpp from the Hugging Face folder it was written from,
    in transformers, on the first ``tokens`` tokens of ``text``: how faithful the export is. A grid
    carried over exactly leaves only llama.cpp's own arithmetic (8-bit activations) as difference;
    a second rounding of the weights shows up here."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from refinery import llamacpp
    from refinery.modelstats import load_model

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text[: tokens * 16], add_special_tokens=False).input_ids[:tokens]
    chunks = [ids[i:i + chunk] for i in range(0, len(ids) - chunk + 1, chunk)]
    model = load_model(model_dir)
    total, count = 0.0, 0
    with llamacpp.chunk_logits(gguf_path, chunk) as gguf_logits, torch.no_grad():
        for c in chunks:
            p = torch.log_softmax(model(torch.tensor([c])).logits[0].float(), -1)
            q = torch.log_softmax(torch.from_numpy(np.array(gguf_logits(c), dtype=np.float32)), -1)
            total += float((p.exp() * (p - q)).sum())
            count += len(c)
    return {"export_kld": total / count, "export_kld_tokens": count}


def build(profile: Profile, *, inputs: dict[str, Artifact], home: Path,
          log: Callable[[str], Any] = print) -> Artifact:
    """GGUF + zstd of the awq_model artifact, its 4-bit grid carried over; checked to load and generate
    in llama.cpp and to match the awq_model it was written from."""
    from refinery import llamacpp
    from refinery.modelstats import Timer, heldout_text, peak_rss_bytes

    source = inputs.get("awq_model")
    if source is None:
        raise ValueError(f"{STAGE}: needs inputs={{'awq_model': Artifact}}, got {sorted(inputs)}")
    cfg = profile.gguf
    llamacpp.require()  # fail before converting when the runtime that must load it is missing
    recipe = source.path / "recipe.yaml"
    metadata = {"general.name": profile.release.name, "source_stage": source.stage,
                "source_version": source.version, "lineage": json.dumps(lineage(source), sort_keys=True),
                "exporter_version": EXPORTER_VERSION}
    if recipe.is_file():
        metadata["recipe"] = recipe.read_text(encoding="utf-8")
    config = {"gguf": cfg.model_dump(mode="json"), "exporter_version": EXPORTER_VERSION}
    text = heldout_text(profile)
    with Timer() as timer, staged_artifact(STAGE, config=config, inputs={"awq_model": source.ref()},
                                           home=home) as st:
        result = export_model(source.path / "model", st.path, cfg.type, cfg.zstd_level, metadata,
                              embedding_type=cfg.embedding_type, log=log)
        gguf_path = st.path / GGUF_NAME
        ok, sample = llamacpp.loads_and_generates(gguf_path)
        if not ok:
            raise RuntimeError(f"{gguf_path}: llama.cpp could not load and generate: {sample}")
        faithful = export_kld(source.path / "model", gguf_path, text)
        ppl = llamacpp.perplexity(gguf_path, text, profile.eval.perplexity_tokens)
        st.metrics.update(result)
        st.metrics.update(faithful)
        st.metrics.update(bytes_on_disk=result["zst_bytes"], gguf_bytes=result["bytes"],
                          llamacpp_ok=ok, sample=sample, perplexity=ppl,
                          perplexity_tokens=profile.eval.perplexity_tokens, perplexity_runtime="llama.cpp",
                          seconds=timer.seconds, peak_rss_bytes=peak_rss_bytes())
    log(f"{STAGE}: {result['gguf_type']}, {result['grid_tensors']} tensors on their AWQ grid, "
        f"{result['zst_bytes']:,} bytes packed; KL divergence from awq_model {faithful['export_kld']:.5f}, "
        f"perplexity {ppl:.2f} (llama.cpp)")
    return load_artifact(st.path)
