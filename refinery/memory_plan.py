"""The memory plan: what each model stage needs for the configured model, checked before it loads.

Every model stage calls :func:`check` first. The estimate comes from the architecture alone (the
model built on the meta device; a Hub model that is not on disk is read from :data:`KNOWN_CONFIGS`,
so the 8B plan needs no download) and from the stage's settings in the profile. Each part of an
estimate names the profile key that changes it; a stage that does not fit refuses with the key of
its largest part. Parts of different phases of a stage (the trainer, then the merge) are not in
memory together: the need is the largest phase. On a GPU two pools are checked, GPU memory and host
RAM (llm-compressor keeps its calibration intermediates on the host); on the CPU they are one.

The numbers are estimates; the formulas are here and in docs/gpu.md, next to what was measured.
With b the bytes per element of compute.dtype, N parameters, L layers, H hidden, I MLP width,
V vocabulary, T tokens per micro-batch:

- weights N*b; NF4 (QLoRA) 4.125 bits per decoder Linear weight (4 + double-quantized scales)
- activations of one decoder layer kept for backward T*(16H + 6I)*b; with gradient checkpointing
  only each layer's input (L*T*H*b) plus one layer; without, all L layers
- logits T*V*b, their float32 log-softmax and its gradient (8 bytes), and the logits' gradient
- LoRA adapter r*(in+out) per target module at 16 bytes (fp32 weight, gradient, two AdamW moments)

    python -m refinery.memory_plan --profile llama31-8b                       # this machine
    python -m refinery.memory_plan --profile llama31-8b --device cuda --memory-gib 80   # a planned GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from refinery.config import Profile, load_profile
from refinery.device import DeviceError, Placement, profile_file, resolve_dtype, select
from refinery.modelstats import ConfigError

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BYTES = 4.125 / 8
ADAPTER_BYTES = 16  # fp32 weight + gradient + two AdamW moments per LoRA parameter
# torch, transformers and the rest imported (peak RSS of the demo stages less their tensors,
# docs/gpu.md); cuBLAS workspaces and kernels on a GPU
RUNTIME_BYTES = {"host": 3 * GiB // 2, "device": GiB // 2}
PERPLEXITY_WINDOW = 1024  # refinery.modelstats.perplexity's window
TOPK = 64  # teacher logits kept per token by the cached-teacher recovery design
STAGES = ("base_model", "qlora_model", "pruned_model", "awq_model", "gguf_zst", "recovered_model",
          "benchmark_report")
# recovered_model designs (docs/gpu.md): which one recover.py runs is the caller's to say
RECOVERY_DESIGNS = ("distill", "lora_topk", "lora_teacher")  # the lora ones are planned, not built
PLANNED_LORA_RANK = 16  # of the planned adapter designs

# config.json numbers of Hub models the plan must know without a download (the 8B one is gated)
_LLAMA31_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                   max_position_embeddings=131072, tie_word_embeddings=False)
_SMOLLM2_135M = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                     max_position_embeddings=8192, tie_word_embeddings=True)
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B": _LLAMA31_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,  # also the embedded GGUF (smollm2_gguf)
}


class MemoryPlanError(ConfigError):
    """A stage would not fit the device's memory; the message names the profile key to change."""


# --------------------------------------------------------------------------- the architecture


@dataclass(frozen=True)
class Arch:
    """The shapes a memory estimate needs, read from a model built on the meta device."""

    name: str
    parameters: int  # tied weights once
    linear_parameters: int  # decoder nn.Linear weights: what NF4, pruning, AWQ and recovery touch
    layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    largest_tensor: int  # elements of the largest single weight
    layer_linears: tuple[tuple[int, int], ...]  # (in, out) features of each Linear of one decoder layer
    lora_width: dict[str, int]  # per module name (q_proj, ...): in + out features over all layers

    def lora_parameters(self, rank: int, targets: list[str]) -> int:
        return rank * sum(self.lora_width.get(t, 0) for t in targets)


def arch_of(config: Any, name: str) -> Arch:
    import torch

    from refinery.modelstats import meta_model

    model = meta_model(config)
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    lora: dict[str, int] = {}
    for n, m in linears.items():
        short = n.rsplit(".", 1)[-1]
        lora[short] = lora.get(short, 0) + m.in_features + m.out_features
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Arch(
        name=name,
        parameters=sum(p.numel() for p in model.parameters()),
        linear_parameters=sum(m.weight.numel() for m in linears.values()),
        layers=text.num_hidden_layers, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, vocab_size=text.vocab_size,
        max_positions=getattr(text, "max_position_embeddings", None) or 2048,
        largest_tensor=max(p.numel() for p in model.parameters()),
        layer_linears=tuple((m.in_features, m.out_features) for n, m in linears.items() if ".layers.0." in n),
        lora_width=lora)


def arch_for(profile: Profile, model_dir: Path | str | None = None) -> Arch:
    """The architecture of ``model_dir`` (a stage's input) or of ``profile.base_model``; no weights read."""
    from transformers import AutoConfig, LlamaConfig

    cfg = profile.base_model
    if model_dir is not None:
        config = AutoConfig.from_pretrained(model_dir)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # shapes of the dense-equivalent model
        return arch_of(config, str(model_dir))
    if cfg.kind == "smollm2_gguf":
        return arch_of(AutoConfig.for_model(**KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"]), cfg.name)
    if cfg.kind == "tiny_random":  # refinery.base_model.tiny_random_model with the embedded tokenizer
        return arch_of(LlamaConfig(
            vocab_size=_SMOLLM2_135M["vocab_size"], hidden_size=cfg.tiny_hidden_size,
            intermediate_size=cfg.tiny_intermediate_size, num_hidden_layers=cfg.tiny_layers,
            num_attention_heads=cfg.tiny_heads, num_key_value_heads=cfg.tiny_kv_heads,
            max_position_embeddings=2048, tie_word_embeddings=True), cfg.name)
    if not cfg.path:
        raise MemoryPlanError(f"base_model.path: kind={cfg.kind} needs a path")
    if cfg.kind == "hub" and cfg.path in KNOWN_CONFIGS:
        return arch_of(AutoConfig.for_model(**KNOWN_CONFIGS[cfg.path]), cfg.name)
    source = profile.resolve_path(cfg.path) if cfg.kind == "local" else cfg.path
    if cfg.kind == "local" and not (Path(source) / "config.json").is_file():
        what = "does not exist" if not Path(source).exists() else "has no config.json"
        raise MemoryPlanError(f"base_model.path: {cfg.path!r} resolves to {source}, which {what} "
                              f"(profile {profile_file(profile)})")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    token = os.environ.get(cfg.token_env) if cfg.kind == "hub" else None  # gated models need it
    try:  # a local folder, or config.json alone from the Hub when online
        return arch_of(AutoConfig.from_pretrained(source, local_files_only=offline, token=token), cfg.name)
    except OSError as exc:
        raise MemoryPlanError(
            f"base_model.path: no config for {cfg.path!r} to plan memory with ({str(exc)[:200]}); "
            "add its config.json numbers to refinery.memory_plan.KNOWN_CONFIGS or go online "
            "(HF_HUB_OFFLINE=0) so that config.json alone is read") from None


# --------------------------------------------------------------------------- a stage's plan


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    key: str | None = None  # the profile key that changes it; None: only the model does
    pool: str = "device"  # "device" or "host"
    phase: str = ""  # parts of different phases are not in memory together; "" is in every phase


@dataclass(frozen=True)
class StagePlan:
    stage: str
    arch: Arch
    placement: Placement
    memory_fraction: float
    parts: tuple[Part, ...]
    source: str = ""  # the profile file, for messages
    notes: tuple[str, ...] = ()

    def pools(self) -> tuple[str, ...]:
        return ("device",) if self.placement.device == "cpu" else ("device", "host")

    def _pool(self, part: Part) -> str:
        return "device" if self.placement.device == "cpu" else part.pool

    def peak(self, pool: str = "device") -> tuple[int, list[Part]]:
        """The need of ``pool`` (its largest phase) and that phase's parts, largest first."""
        parts = [p for p in self.parts if self._pool(p) == pool]
        phases = sorted({p.phase for p in parts if p.phase}) or [""]
        best = max(([p for p in parts if p.phase in ("", ph)] for ph in phases),
                   key=lambda ps: sum(p.bytes for p in ps))
        return sum(p.bytes for p in best), sorted(best, key=lambda p: -p.bytes)

    def need(self, pool: str = "device") -> int:
        return self.peak(pool)[0]

    def total(self, pool: str = "device") -> int:
        return self.placement.memory_bytes if pool == "device" else self.placement.host_memory_bytes

    def usable(self, pool: str = "device") -> int:
        return int(self.total(pool) * self.memory_fraction)

    def _where(self, pool: str) -> str:
        if self.placement.device == "cpu":
            return f"memory on the CPU ({self.placement.name})"
        return f"GPU memory ({self.placement.name})" if pool == "device" else "host RAM"

    def problems(self) -> list[str]:
        out = []
        for pool in self.pools():
            need, parts = self.peak(pool)
            usable = self.usable(pool)
            if need <= usable:
                continue
            keys = list(dict.fromkeys(p.key for p in parts[:3] if p.key)) or ["base_model.path"]
            key = " or ".join(keys)
            largest = ", ".join(f"{p.name} {p.bytes / GiB:.1f} GiB" + (f" ({p.key})" if p.key else "")
                                for p in parts[:3])
            hint = ""
            if keys == ["base_model.path"]:
                hint = "; or use a machine with more memory"
            elif self.placement.device == "cpu" and "compute.device" not in keys:
                hint = "; or run it on a GPU (compute.device: cuda)"
            out.append(
                f"memory plan: {self.stage} needs about {need / GiB:.1f} GiB of {self._where(pool)}, "
                f"{usable / GiB:.1f} GiB usable ({self.total(pool) / GiB:.1f} GiB free x "
                f"compute.memory_fraction {self.memory_fraction}), for {self.arch.name} "
                f"({self.arch.parameters / 1e9:.2f}B parameters, {self.placement.dtype}). Largest parts: "
                f"{largest}. To fit, change {key} in {self.source or 'the profile'}{hint}")
        return out

    def metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.arch.name, "parameters": self.arch.parameters,
                               "memory_fraction": self.memory_fraction}
        for pool in self.pools():
            out[f"need_{pool}_bytes"] = self.need(pool)
            out[f"usable_{pool}_bytes"] = self.usable(pool)
        out["parts"] = {f"{p.phase + ':' if p.phase else ''}{p.name}": p.bytes for p in self.parts}
        return out


def _weights_key(placement: Placement) -> str:
    if placement.device == "cpu":
        return "compute.device"
    return "compute.dtype" if placement.dtype == "float32" else "base_model.path"


def _layer_activations(arch: Arch, tokens: int, b: int) -> int:
    return tokens * (16 * arch.hidden_size + 6 * arch.intermediate_size) * b


def _train_activations(arch: Arch, tokens: int, b: int, checkpointing: bool) -> int:
    if checkpointing:
        return arch.layers * tokens * arch.hidden_size * b + _layer_activations(arch, tokens, b)
    return arch.layers * _layer_activations(arch, tokens, b)


def _train_logits(arch: Arch, tokens: int, b: int) -> int:
    return tokens * arch.vocab_size * (2 * b + 8)


def _perplexity(arch: Arch, b: int, phase: str = "") -> Part:
    tokens = min(PERPLEXITY_WINDOW, arch.max_positions)
    return Part("perplexity logits", tokens * arch.vocab_size * (b + 8), None, "device", phase)


def _base_model(arch, profile, pl, b, wk):
    cfg = profile.base_model
    parts = [Part("weights", arch.parameters * max(b, DTYPE_BYTES[cfg.dtype]), wk), _perplexity(arch, b)]
    if cfg.kind == "smollm2_gguf":  # transformers dequantizes the GGUF, copied into a fresh model
        parts.append(Part("GGUF dequantized (a second fp32 copy)", arch.parameters * 4, "base_model.kind", "host"))
    return parts


def _qlora_model(arch, profile, pl, b, wk):
    cfg = profile.train
    gpu = pl.device == "cuda"
    b = b if gpu else 4  # axolotl on the CPU computes in fp32 (docs/training.md)
    tokens = cfg.micro_batch_size * cfg.sequence_len
    others = arch.parameters - arch.linear_parameters
    weights = (arch.linear_parameters * NF4_BYTES + others * b) if cfg.load_in_4bit else arch.parameters * b
    ranks = pl.count if gpu and cfg.distributed != "none" else 1
    shard_weights = ranks if cfg.distributed in ("deepspeed_zero3", "fsdp") else 1
    adapter = arch.lora_parameters(cfg.lora_r, cfg.lora_target_modules) * ADAPTER_BYTES / ranks
    return [
        Part("weights (NF4 linears)" if cfg.load_in_4bit else "weights", int(weights / shard_weights),
             "train.load_in_4bit" if not cfg.load_in_4bit else wk, "device", "train"),
        Part("LoRA adapter + AdamW", int(adapter), "train.lora_r", "device", "train"),
        # the generated axolotl config turns gradient checkpointing on on GPUs only
        Part("activations", _train_activations(arch, tokens, b, gpu), "train.micro_batch_size", "device", "train"),
        Part("logits and loss", _train_logits(arch, tokens, b), "train.micro_batch_size", "device", "train"),
        Part("adapter merge (fp32 base on the host)", arch.parameters * 4, None, "host", "merge"),
    ]


def _hessians(arch: Arch) -> int:
    # one fp32 Hessian per Linear of the layer being pruned, the inverse's workspace (two of the
    # largest) and an fp32 copy of the weight being pruned
    inputs = [i for i, _ in arch.layer_linears]
    return 4 * (sum(i * i for i in inputs) + 2 * max(inputs) ** 2 + max(i * o for i, o in arch.layer_linears))


def _pruned_model(arch, profile, pl, b, wk):
    cfg = profile.prune
    tokens = cfg.calibration_samples * cfg.calibration_seq_len
    return [
        Part("weights", arch.parameters * b, wk),
        Part("SparseGPT Hessians (one layer)", _hessians(arch), None, "device", "oneshot"),
        Part("one layer's forward", _layer_activations(arch, cfg.calibration_seq_len, b),
             "prune.calibration_seq_len", "device", "oneshot"),
        # llm-compressor's sequential pipeline keeps the inputs and outputs of the current layer
        # for every calibration sample, offloaded to the host
        Part("calibration intermediates", 2 * tokens * arch.hidden_size * b, "prune.calibration_samples",
             "host", "oneshot"),
        _perplexity(arch, b, "measure"),
    ]


def _awq_model(arch, profile, pl, b, wk):
    cfg = profile.awq
    tokens = cfg.calibration_samples * cfg.calibration_seq_len
    h, i = arch.hidden_size, arch.intermediate_size
    return [
        Part("weights", arch.parameters * b, wk),
        Part("pruned-zero masks", arch.linear_parameters, wk),
        # AWQModifier caches each mapping's parent inputs on the device (no offload for dense
        # models) and compares the parent's outputs for each grid point against the original
        Part("AWQ activation cache", tokens * (3 * h + i) * b + 2 * tokens * h * b, "awq.calibration_samples",
             "device", "oneshot"),
        Part("calibration intermediates", 2 * tokens * h * b, "awq.calibration_samples", "host", "oneshot"),
        _perplexity(arch, b, "measure"),
    ]


def _gguf_zst(arch, profile, pl, b, wk):
    # refinery.gguf_export converts on the host with numpy from a dense fp32 load
    return [Part("weights (fp32 on the host)", arch.parameters * 4, None, "host"),
            Part("converter working set", arch.largest_tensor * 4 * 3, None, "host")]


def _recovered_model(arch, profile, pl, b, wk, design: str):
    cfg = profile.recovery
    tokens = cfg.micro_batch_size * cfg.sequence_len
    n_eval = -(-cfg.eval_sequences // cfg.micro_batch_size) * cfg.micro_batch_size
    teacher_logits = tokens * arch.vocab_size * b
    weights = arch.parameters * b
    if design == "distill":  # recover.py as of 2026-12-01: both models resident, every weight trains
        return [
            Part("teacher weights", weights, "recovery.method"),
            Part("student weights", weights, wk),
            # the continuous codes train only with "codes"; scales are one per group of 32
            Part("trained parameters + gradients + AdamW",
                 (arch.linear_parameters if "codes" in cfg.train else arch.linear_parameters // 32) * 3 * 4,
                 "recovery.train"),
            Part("grid masks", arch.linear_parameters, wk),
            Part("activations (no checkpointing)", _train_activations(arch, tokens, b, False),
                 "recovery.micro_batch_size"),
            Part("student logits and loss", _train_logits(arch, tokens, b) + teacher_logits,
                 "recovery.micro_batch_size"),
            Part("held-out teacher logits", n_eval * cfg.sequence_len * arch.vocab_size * b,
                 "recovery.eval_sequences"),
        ]
    targets = profile.train.lora_target_modules
    student = [
        Part("student weights (frozen, on the grid)", weights, wk, "device", "student"),
        Part("LoRA adapter + AdamW", arch.lora_parameters(PLANNED_LORA_RANK, targets) * ADAPTER_BYTES,
             "recovery.method", "device", "student"),
        Part("activations (checkpointed)", _train_activations(arch, tokens, b, True), "recovery.micro_batch_size",
             "device", "student"),
        Part("student logits and loss", _train_logits(arch, tokens, b), "recovery.micro_batch_size",
             "device", "student"),
    ]
    if design == "lora_topk":  # the teacher runs alone first; its top-k logits go to disk
        return student + [Part("teacher weights", weights, "recovery.method", "device", "teacher"),
                          Part("teacher logits", teacher_logits, "recovery.micro_batch_size", "device", "teacher")]
    return student + [Part("teacher weights", weights, "recovery.method", "device", "student"),
                      Part("teacher logits", teacher_logits, "recovery.micro_batch_size", "device", "student")]


def _benchmark_report(arch, profile, pl, b, wk):
    cfg = profile.eval
    context = cfg.max_length or min(arch.max_positions, 2048)  # lm-eval pads a batch to its longest
    return [
        Part("weights (one model at a time)", arch.parameters * b, wk, "device", "hf"),
        Part("lm-eval batch logits", cfg.batch_size * context * arch.vocab_size * (b + 8), "eval.batch_size",
             "device", "hf"),
        # a GGUF candidate is dequantized to fp32 by transformers on the host (evaluate.load_for_eval)
        Part("GGUF candidate (fp32 on the host)", arch.parameters * 4, None, "host", "gguf"),
    ]


_ESTIMATORS: dict[str, Callable[..., list[Part]]] = {
    "base_model": _base_model, "qlora_model": _qlora_model, "pruned_model": _pruned_model,
    "awq_model": _awq_model, "gguf_zst": _gguf_zst, "benchmark_report": _benchmark_report}


def plan_stage(stage: str, profile: Profile, placement: Placement, arch: Arch, *,
               recovery_design: str | None = None) -> StagePlan:
    """The estimate for ``stage`` (one of STAGES) on ``placement``; computes, loads nothing."""
    b, wk = DTYPE_BYTES[placement.dtype], _weights_key(placement)
    notes: tuple[str, ...] = ()
    if stage == "recovered_model":
        design = recovery_design or profile.recovery.method
        if design not in RECOVERY_DESIGNS:
            raise ValueError(f"recovery design {design!r}: one of {RECOVERY_DESIGNS}")
        parts = _recovered_model(arch, profile, placement, b, wk, design)
        if design == "lora_topk":
            cfg = profile.recovery
            disk = cfg.steps * cfg.micro_batch_size * cfg.sequence_len * TOPK * (2 + 4)
            notes = (f"design {design}: teacher top-{TOPK} logits cached on disk, {disk / GiB:.1f} GiB",)
        else:
            notes = (f"design {design}",)
    elif stage in _ESTIMATORS:
        parts = _ESTIMATORS[stage](arch, profile, placement, b, wk)
    else:
        raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")
    parts.append(Part("runtime (libraries)", RUNTIME_BYTES["host"], None, "host"))
    if placement.device == "cuda":
        parts.append(Part("runtime (CUDA workspaces)", RUNTIME_BYTES["device"], None, "device"))
    return StagePlan(stage, arch, placement, profile.compute.memory_fraction,
                     tuple(Part(p.name, int(p.bytes), p.key, p.pool, p.phase) for p in parts),
                     profile_file(profile), notes)


def check(stage: str, profile: Profile, placement: Placement, *, model_dir: Path | str | None = None,
          recovery_design: str | None = None, log: Callable[[str], Any] = print) -> StagePlan:
    """Plan ``stage`` for the model in ``model_dir`` (else the profile's base model) and refuse,
    before anything is loaded, when it does not fit: MemoryPlanError naming the profile key."""
    arch = arch_for(profile, model_dir)
    plan = plan_stage(stage, profile, placement, arch, recovery_design=recovery_design)
    log(f"memory plan: {stage} on {placement.device} ({placement.dtype}): " + ", ".join(
        f"{pool} {plan.need(pool) / GiB:.2f} of {plan.usable(pool) / GiB:.1f} GiB usable" for pool in plan.pools()))
    problems = plan.problems()
    if problems:
        raise MemoryPlanError("\n".join(problems))
    return plan


# --------------------------------------------------------------------------- the CLI


def table(plans: list[StagePlan]) -> str:
    """The per-stage plan as a fixed-width table."""
    cuda = plans[0].placement.device == "cuda"
    head = ["stage", "need GiB", "usable GiB"] + (["host GiB", "host usable"] if cuda else []) + ["fits", "largest part"]
    rows = [head]
    for plan in plans:
        pool = max(plan.pools(), key=lambda p: plan.need(p) / max(plan.usable(p), 1))
        _, parts = plan.peak(pool)
        row = [plan.stage, f"{plan.need() / GiB:.1f}", f"{plan.usable() / GiB:.1f}"]
        if cuda:
            row += [f"{plan.need('host') / GiB:.1f}", f"{plan.usable('host') / GiB:.1f}"]
        largest = parts[0] if parts else None
        row += ["no" if plan.problems() else "yes",
                f"{largest.name} {largest.bytes / GiB:.1f}" + (f" ({largest.key})" if largest.key else "")
                if largest else ""]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=None, help="profile name or path (default REFINERY_PROFILE or demo)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="plan for this device instead of this machine's (needs --memory-gib)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_BYTES])
    parser.add_argument("--memory-gib", type=float, default=None, help="memory of the planned device")
    parser.add_argument("--host-memory-gib", type=float, default=None, help="host RAM of the planned machine")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of the planned machine (train.distributed)")
    parser.add_argument("--recovery-design", choices=RECOVERY_DESIGNS, default=None)
    parser.add_argument("--json", action="store_true", help="print the plans as JSON instead of a table")
    args = parser.parse_args(argv)
    profile = load_profile(args.profile)
    if args.memory_gib is not None:  # a machine we are not on: no torch.cuda involved
        device = args.device or "cuda"
        memory = int(args.memory_gib * GiB)
        host = int((args.host_memory_gib or args.memory_gib) * GiB) if device == "cuda" else memory
        placement = Placement(device, resolve_dtype(device, args.dtype), f"planned {args.memory_gib:g} GiB",
                              memory, host, args.gpus)
    else:
        if args.device:
            parser.error("--device needs --memory-gib (the plan for this machine uses compute.device)")
        try:
            placement = select(profile)
        except DeviceError as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 2
    arch = arch_for(profile)
    plans = [plan_stage(s, profile, placement, arch, recovery_design=args.recovery_design) for s in STAGES]
    if args.json:
        print(json.dumps({"profile": profile.name, "placement": asdict(placement),
                          "plans": {p.stage: {**p.metadata(), "fits": not p.problems(), "notes": p.notes}
                                    for p in plans}}, indent=2))
    else:
        print(f"memory plan for profile {profile.name}: {arch.name}, {arch.parameters / 1e9:.2f}B parameters, "
              f"on {placement.device} ({placement.name}), {placement.dtype}, compute.memory_fraction "
              f"{profile.compute.memory_fraction}")
        print(table(plans))
        for plan in plans:
            for note in plan.notes:
                print(f"{plan.stage}: {note}")
    problems = [line for p in plans for line in p.problems()]
    for line in problems:
        print(f"refused: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
