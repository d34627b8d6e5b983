"""recovered_model: recovery training that restores what pruning and 4-bit quantization lost, without
undoing either, so the result still exports to GGUF exactly.

Distillation from qlora_model (the dense teacher) into awq_model (the student), on English
training conversations, with **early stopping on held-out KL divergence**: the student is scored
every ``recovery.eval_every`` steps on held-out conversations it never trains on, the best step is
kept, and training stops after ``recovery.patience`` evaluations without improvement. When no step
beats the start, the output is the input (the report then shows recovery bought nothing).

What trains (``recovery.train``), each keeping the format the GGUF holds exactly:

- ``scales``: the per-group scale of every quantized Linear (a fp16 ``d`` per block of 32 in
  Q4_0/Q4_1), trained as a log-ratio to its AWQ value; the 4-bit codes and the zeros stay as they
  are (EfficientQAT's end-to-end step-size training);
- ``norms``: the RMSNorm gains (F32 in the GGUF);
- ``codes``: the 4-bit codes themselves, through a straight-through estimator on a continuous
  code per weight; a kept weight never rounds to the zero code, a pruned one never leaves it.

The sparsity mask is never touched. The saved model is compared with the input before it is
published: the same zeros, the same bits and groups, the same codes unless codes trained, the same
scales unless scales trained; the stage fails if anything else changed. Scales are rounded to
float16 (what GGUF stores) before saving, so the GGUF holds exactly the recovered weights.
docs/compression.md has the sweep (bench/recovery_sweep.py) behind the defaults.
"""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path
from typing import Any, Callable

from refinery.artifacts import Artifact, load_artifact, staged_artifact
from refinery.config import Profile, RecoveryConfig
from refinery.modelstats import ConfigError
from refinery.progress import Progress

STAGE = "recovered_model"


# --------------------------------------------------------------------------- the grid


def _grid_module():
    import torch

    class GridWeight(torch.nn.Module):
        """Parametrization: weight = (q - z) * s * keep, q the 4-bit codes, s the group scales.

        ``u`` is a continuous code per weight (it starts on the AWQ codes); q = round(u), clamped,
        kept weights pushed off the zero code. The gradient passes straight through the rounding
        to ``u`` when codes train; ``log_ratio`` scales the AWQ scales when scales train.
        """

        def __init__(self, codes, zero, scale, keep, q_min: float, q_max: float, *, train_scales: bool,
                     train_codes: bool):
            super().__init__()
            out_features, in_features = codes.shape
            self.groups = scale.shape[1]
            self.register_buffer("scale0", scale.detach().float().clone())
            self.register_buffer("zero", zero.detach().float().clone())
            self.register_buffer("keep", keep.detach().clone())
            self.u = torch.nn.Parameter(codes.detach().float().clone(), requires_grad=train_codes)
            self.log_ratio = torch.nn.Parameter(torch.zeros_like(self.scale0), requires_grad=train_scales)
            self.q_min, self.q_max = float(q_min), float(q_max)
            self.train_codes = train_codes
            if not train_codes:
                # the codes are fixed: the weight is the AWQ weight times a per-group ratio, one
                # broadcast multiply a forward instead of rebuilding it from the codes (2x a step)
                with torch.no_grad():
                    w0 = (self.codes() - self._expand(self.zero)) * self._expand(self.scale0) * self.keep
                self.register_buffer("w0", w0.view(out_features, self.groups, -1).contiguous())

        def _expand(self, t):
            return t.repeat_interleave(self.u.shape[1] // self.groups, dim=1)

        def scale(self):
            return self.scale0 * self.log_ratio.exp()

        def codes(self):
            z = self._expand(self.zero)
            q = torch.clamp(torch.round(self.u), self.q_min, self.q_max)
            up = torch.where(z + 1 <= self.q_max, z + 1, z - 1)
            down = torch.where(z - 1 >= self.q_min, z - 1, z + 1)
            q = torch.where(self.keep & (q == z), torch.where(self.u >= z, up, down), q)
            return torch.where(self.keep, q, z)

        def forward(self, _weight):
            if not self.train_codes:
                return (self.w0 * self.log_ratio.exp().unsqueeze(-1)).flatten(1)
            q = self.codes()
            q = self.u + (q - self.u).detach()  # straight through to u
            return (q - self._expand(self.zero)) * self._expand(self.scale()) * self.keep

    return GridWeight


def quantized_linears(model: Any) -> dict[str, Any]:
    """The Linear layers that carry a compressed-tensors weight quantization (scale, zero point)."""
    import torch

    out = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if isinstance(module, torch.nn.Linear) and scheme is not None and scheme.weights is not None:
            out[name] = module
    return out


def attach_grid(model: Any, train: set[str]) -> dict[str, Any]:
    """Parametrize every quantized Linear weight with its GridWeight; returns them by name."""
    import torch
    from compressed_tensors.quantization.utils import calculate_range
    from torch.nn.utils import parametrize

    GridWeight = _grid_module()
    layers = quantized_linears(model)
    if not layers:
        raise ConfigError("recovery: the awq_model has no compressed-tensors quantized Linear layers")
    grids = {}
    for name, layer in layers.items():
        args = layer.quantization_scheme.weights
        if args.strategy not in ("group", "channel") or hasattr(layer, "weight_g_idx"):
            raise ConfigError(f"recovery: {name} uses weight strategy {args.strategy!r}; recovery keeps "
                              "group/channel grids without activation ordering only")
        scale = layer.weight_scale.detach().float().view(layer.out_features, -1)
        zp = getattr(layer, "weight_zero_point", None)
        zp = torch.zeros_like(scale) if zp is None else zp.detach().float().view_as(scale)
        q_min, q_max = calculate_range(args, "cpu")
        weight = layer.weight.detach().float()
        full = lambda t: t.repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)  # noqa: E731
        codes = torch.where(full(scale) == 0, full(zp), torch.round(weight / full(scale)) + full(zp))
        grid = GridWeight(codes, zp, scale, weight != 0, float(q_min), float(q_max),
                          train_scales="scales" in train, train_codes="codes" in train)
        with torch.no_grad():
            if not torch.allclose(grid(weight), weight, rtol=0, atol=1e-6 * float(weight.abs().max() or 1)):
                raise RuntimeError(f"recovery: {name}'s weights are not on their own 4-bit grid "
                                   "(was awq_model saved with different scales?)")
        parametrize.register_parametrization(layer, "weight", grid)
        grids[name] = grid
    return grids


def detach_grid(model: Any, grids: dict[str, Any]) -> None:
    """Write the trained grid back as plain weights and scales (float16-exact, what GGUF stores)."""
    import torch
    from torch.nn.utils import parametrize

    layers = quantized_linears(model)
    with torch.no_grad():
        for name, grid in grids.items():
            layer = layers[name]
            scale = grid.scale().half().float()
            weight = ((grid.codes() - grid._expand(grid.zero)) * grid._expand(scale) * grid.keep)
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            layer.weight.data.copy_(weight.to(layer.weight.dtype))
            layer.weight_scale.data.copy_(scale.view_as(layer.weight_scale).to(layer.weight_scale.dtype))


def trainable(model: Any, grids: dict[str, Any], train: set[str]) -> list[Any]:
    """Freeze everything but what ``recovery.train`` names; returns the parameters that train."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for grid in grids.values():
        if "codes" in train:
            grid.u.requires_grad_(True)
            params.append(grid.u)
        if "scales" in train:
            grid.log_ratio.requires_grad_(True)
            params.append(grid.log_ratio)
    if "norms" in train:
        for name, module in model.named_modules():
            if type(module).__name__.endswith("RMSNorm"):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
                    params.append(p)
    return params


# --------------------------------------------------------------------------- data and loss


def token_blocks(kept_parquet: Path, tokenizer: Any, *, count: int, seq_len: int, seed: int) -> Any:
    """``count`` blocks of ``seq_len`` tokens: chat-formatted conversations, shuffled, concatenated."""
    import torch

    from refinery.records import read_table

    rows = read_table(kept_parquet).select(["id", "messages"]).sort_by("id").to_pylist()
    random.Random(seed).shuffle(rows)
    need = count * seq_len
    ids: list[int] = []
    for row in rows:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        ids += tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ConfigError(f"recovery: {kept_parquet} has {len(ids)} tokens, fewer than the {need} that "
                          f"recovery.steps x micro_batch_size + eval_sequences blocks of {seq_len} need")
    return torch.tensor(ids[:need]).view(count, seq_len)


def kl_divergence(student_logits: Any, teacher_logits: Any, temperature: float = 1.0) -> Any:
    """KL(teacher || student) per token, averaged, on temperature-softened distributions times T^2."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean") * temperature**2


def autocast(device: str, dtype: str | None) -> Any:
    """Mixed precision for the forward passes (compute.autocast); off when ``dtype`` is None."""
    import torch

    return torch.autocast(device, dtype=getattr(torch, dtype or "bfloat16"), enabled=dtype is not None)


def heldout_kl(student: Any, teacher_logits: list[Any], blocks: Any, batch: int, precision: str | None = None) -> float:
    """Mean KL divergence (temperature 1, the report's metric) on the held-out blocks."""
    import torch

    was = student.training
    student.eval()
    with torch.no_grad(), autocast(blocks.device.type, precision):
        total = sum(kl_divergence(student(blocks[i * batch:(i + 1) * batch]).logits, t).item()
                    for i, t in enumerate(teacher_logits))
    student.train(was)
    return total / len(teacher_logits)


def distill(student: Any, teacher: Any, params: list[Any], train_blocks: Any, eval_blocks: Any,
            cfg: RecoveryConfig, log: Callable[[str], Any], precision: str | None = None) -> dict[str, Any]:
    """AdamW on the distillation loss with early stopping on held-out KL; the best step's
    parameters are restored at the end. ``precision``: the forward passes' autocast dtype (None:
    the weights' own). Returns the curve and the chosen step."""
    import torch

    b = cfg.micro_batch_size
    device = train_blocks.device.type
    with torch.no_grad(), autocast(device, precision):
        teacher_eval = [teacher(eval_blocks[i:i + b]).logits for i in range(0, len(eval_blocks), b)]
    best = {"step": 0, "kl": heldout_kl(student, teacher_eval, eval_blocks, b, precision),
            "state": [p.detach().clone() for p in params]}
    curve = [{"step": 0, "split": "heldout_kl", "loss": best["kl"]}]
    log(f"recovery: held-out KL at the start {best['kl']:.5f}")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    progress = Progress("recovery steps", cfg.steps, log)
    waited = 0
    student.train()
    for step in range(1, cfg.steps + 1):
        i = ((step - 1) * b) % len(train_blocks)
        batch = train_blocks[i:i + b]
        with torch.no_grad(), autocast(device, precision):
            target = teacher(batch).logits
        with autocast(device, precision):
            logits = student(batch).logits
        loss = kl_divergence(logits, target, cfg.temperature)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append({"step": step, "split": "train", "loss": loss.item()})
        note = f"distillation loss {loss.item():.5f}"
        if step % cfg.eval_every == 0 or step == cfg.steps:
            kl = heldout_kl(student, teacher_eval, eval_blocks, b, precision)
            curve.append({"step": step, "split": "heldout_kl", "loss": kl})
            note += f", held-out KL {kl:.5f} (best {best['kl']:.5f} at step {best['step']})"
            if kl < best["kl"]:
                best.update(step=step, kl=kl, state=[p.detach().clone() for p in params])
                waited = 0
            else:
                waited += 1
        progress.update(step, note)
        if waited >= cfg.patience:
            log(f"recovery: stopped early at step {step}: no held-out improvement in {cfg.patience} evaluations")
            break
    with torch.no_grad():
        for p, saved in zip(params, best["state"]):
            p.copy_(saved)
    student.eval()
    return {"curve": curve, "best_step": best["step"], "heldout_kl_best": best["kl"], "steps_run": step,
            "teacher_eval_logits": teacher_eval}


# --------------------------------------------------------------------------- checks


def quantization_tensors(model_dir: Path) -> dict[str, Any]:
    """Every scale / zero-point / packed-code tensor in a compressed-tensors folder."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, framework="pt") as tensors:
            for name in tensors.keys():
                if name.endswith(("weight_scale", "weight_zero_point", "weight_packed")):
                    out[name] = tensors.get_tensor(name)
    return out


def compare_compression(before: dict[str, Any], after: dict[str, Any], grid_before: dict[str, Any],
                        grid_after: dict[str, Any], trained: set[str]) -> list[str]:
    """What changed between the input and the output beyond what ``trained`` allows (empty: nothing)."""
    import torch

    problems = []
    for key in ("quant_format", "nominal_weight_bits", "bits_per_weight", "bits_per_linear_weight",
                "sparsity", "sparsity_per_layer"):
        if before.get(key) != after.get(key):
            problems.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}"[:500])
    if set(grid_before) != set(grid_after):
        problems.append("the set of quantized tensors changed")
    allowed = {"weight_scale"} if "scales" in trained else set()
    if "codes" in trained:
        allowed.add("weight_packed")
    for name in sorted(set(grid_before) & set(grid_after)):
        kind = name.rsplit(".", 1)[-1]
        if kind not in allowed and not torch.equal(grid_before[name], grid_after[name]):
            problems.append(f"{name} changed, and recovery.train does not include what it holds")
    return problems


# --------------------------------------------------------------------------- the stage


def recover(student_dir: Path, teacher_dir: Path, kept: Path, cfg: RecoveryConfig, placement: Any,
            log: Callable[[str], Any]) -> tuple[Any, dict[str, Any]]:
    """Distill ``teacher_dir`` into the quantized ``student_dir`` as ``cfg`` says; returns the
    student (grid written back, ready to save) and what happened (curve, best step, ...)."""
    import torch
    from transformers import AutoTokenizer

    from refinery import modelstats

    torch.manual_seed(cfg.seed)
    train = set(cfg.train)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student = modelstats.load_model(student_dir, placement=placement)  # 4-bit weights dequantized
    teacher = modelstats.load_model(teacher_dir, placement=placement)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ConfigError(f"recovery: teacher {teacher_dir} has vocabulary {teacher.config.vocab_size}, "
                          f"student {student_dir} {student.config.vocab_size}; they must share a tokenizer")
    stats_before = modelstats.model_stats(student_dir, model=student)
    n_eval = -(-cfg.eval_sequences // cfg.micro_batch_size) * cfg.micro_batch_size
    blocks = token_blocks(kept, tokenizer, count=n_eval + cfg.steps * cfg.micro_batch_size,
                          seq_len=cfg.sequence_len, seed=cfg.seed).to(placement.device)
    eval_blocks, train_blocks = blocks[:n_eval], blocks[n_eval:]
    grids = attach_grid(student, train)
    params = trainable(student, grids, train)
    log(f"recovery: training {', '.join(sorted(train))}: {sum(p.numel() for p in params):,} parameters")
    train_start = time.perf_counter()
    if placement.autocast:
        log(f"recovery: forward passes in {placement.autocast} autocast over {placement.dtype} weights "
            "(compute.autocast)")
    result = distill(student, teacher, params, train_blocks, eval_blocks, cfg, log, placement.autocast)
    result["train_seconds"] = time.perf_counter() - train_start
    detach_grid(student, grids)
    del teacher, result["teacher_eval_logits"]
    result.update(stats_before=stats_before, params=sum(p.numel() for p in params))
    return student, result



def build(profile: Profile, *, inputs: dict[str, Artifact], home: Path, log=print) -> Artifact:
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained
    from transformers import AutoTokenizer

    from refinery import device, gguf_export, memory_plan, modelstats
    from refinery.prune import save_compressed, storage_dtype

    cfg = profile.recovery
    train = set(cfg.train)
    for name in ("awq_model", "qlora_model", "deduped_corpus"):
        if name not in inputs:
            raise ConfigError(f"{STAGE}: missing input artifact {name!r} (got {sorted(inputs)})")
    placement = device.select(profile)
    plan = memory_plan.check(STAGE, profile, placement, log=log)
    student_dir = inputs["awq_model"].path / "model"
    teacher_dir = inputs["qlora_model"].path / "model"
    kept = inputs["deduped_corpus"].path / "kept.parquet"
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student, result = recover(student_dir, teacher_dir, kept, cfg, placement, log)
    stats_before = result["stats_before"]
    train_seconds = result["train_seconds"]
    params = result["params"]

    config = {"recovery": cfg.model_dump(mode="json"), "gguf": profile.gguf.model_dump(mode="json")}
    with staged_artifact(STAGE, config=config, inputs={k: v.ref() for k, v in inputs.items()}, home=home) as st:
        out = st.path / "model"
        for p in student.parameters():
            p.requires_grad_(False)
        modify_save_pretrained(student)  # a model loaded from disk needs llm-compressor's compressing save
        save_compressed(student, tokenizer, out, dtype=storage_dtype(student_dir))
        del student
        text = modelstats.heldout_text(profile)
        after = modelstats.measure_saved_model(out, text, max_tokens=profile.eval.perplexity_tokens)
        problems = compare_compression(stats_before, after, quantization_tensors(student_dir),
                                       quantization_tensors(out), train)
        if problems:
            raise RuntimeError("recovery changed the compression it must keep:\n  " + "\n  ".join(problems))
        with open(st.path / "losses.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "split", "loss"])
            writer.writeheader()
            writer.writerows(result["curve"])
        metadata = {"general.name": profile.release.name, "source_stage": STAGE,
                    "lineage": json.dumps({k: v.version for k, v in inputs.items()}, sort_keys=True)}
        gguf = gguf_export.export_model(out, st.path, profile.gguf.type, profile.gguf.zstd_level, metadata,
                                        embedding_type=profile.gguf.embedding_type, log=log)
        kl_curve = [r["loss"] for r in result["curve"] if r["split"] == "heldout_kl"]
        st.metrics.update(
            heldout_kl_before=kl_curve[0],
            heldout_kl_after=result["heldout_kl_best"],
            best_step=result["best_step"],
            steps=result["steps_run"],
            trained=sorted(train),
            trainable_parameters=params,
            perplexity=after["perplexity"],
            perplexity_tokens=profile.eval.perplexity_tokens,
            tokens_seen=result["steps_run"] * cfg.micro_batch_size * cfg.sequence_len,
            tokens_per_second=result["steps_run"] * cfg.micro_batch_size * cfg.sequence_len / train_seconds,
            sparsity=after["sparsity"],
            bits_per_weight=after["bits_per_weight"],
            bits_per_linear_weight=after["bits_per_linear_weight"],
            nominal_weight_bits=after["nominal_weight_bits"],
            compression_preserved=True,
            parameters=after["parameters"],
            generation=after["generation"],
            gguf=gguf,
            zst_bytes=gguf["zst_bytes"],
            gguf_bytes=gguf["bytes"],
            seconds=time.perf_counter() - start,
            train_seconds=train_seconds,
            peak_rss_bytes=modelstats.peak_rss_bytes(),
            compute=device.metadata(placement),
            memory_plan=plan.metadata(),
        )
    outcome = (f"step {result['best_step']} of {result['steps_run']} kept" if result["best_step"] else
               "no step improved on the start: the input is kept as it was")
    log(f"{STAGE}: held-out KL {kl_curve[0]:.5f} -> {result['heldout_kl_best']:.5f} ({outcome}); "
        f"sparsity {after['sparsity']:.4f}")
    return load_artifact(st.path)

