"""recovered_model: recovery training that restores quality lost to pruning and 4-bit quantization
without undoing either.

Knowledge distillation from qlora_model (the dense teacher) into awq_model (the student). The
student is loaded with its 4-bit weights dequantized to float; every quantized Linear weight gets
a parametrization (:class:`GridProjection`) that, in the forward pass, rounds the float master
weight to the layer's own fixed W4 group grid (the scales and zero points AWQ chose, unchanged)
and multiplies by the sparsity mask. The backward pass is straight-through for the kept weights
and zero for the pruned ones (masked gradients). So the student trains against exactly the
weights it will ship, and what is saved is on the same grid with the same zeros: the saved
compressed-tensors checkpoint has byte-identical scales and zero points, and the same sparsity
per layer; both are measured before and after and the stage fails if either changed.

A kept weight never rounds to the zero code (it is pushed to the nearest non-zero code), so the
sparsity pattern stays exactly the pruned model's. Weights start on grid points, so a code moves
only once a weight has drifted half a grid step: the learning rate has to be large enough for
that (see docs/training.md).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Callable

from refinery.artifacts import Artifact, load_artifact, staged_artifact
from refinery.config import Profile, RecoveryConfig
from refinery.modelstats import ConfigError

STAGE = "recovered_model"


# --------------------------------------------------------------------------- the grid


def _grid_module():
    import torch

    class GridProjection(torch.nn.Module):
        """weight -> nearest point of the layer's fixed 4-bit group grid, pruned positions at 0.

        Straight-through estimator: the forward value is the projected weight, the gradient
        passes to the float master weight unchanged where the weight is kept, and is zero where
        it was pruned.
        """

        def __init__(self, scale, zero_point, keep, q_min, q_max):
            super().__init__()
            self.register_buffer("scale", scale.detach().float().clone())
            self.register_buffer("zero_point", zero_point.detach().float().clone())
            self.register_buffer("keep", keep.detach().clone())
            self.q_min, self.q_max = float(q_min), float(q_max)

        def project(self, w):
            out_features, in_features = w.shape
            groups = self.scale.shape[1]
            wg = w.detach().float().view(out_features, groups, in_features // groups)
            s, z = self.scale.unsqueeze(-1), self.zero_point.unsqueeze(-1)
            q = torch.clamp(torch.round(wg / s) + z, self.q_min, self.q_max)
            # a kept weight must not land on the zero code: that would add sparsity
            keep = self.keep.view_as(wg)
            up = torch.where(z + 1 <= self.q_max, z + 1, z - 1).expand_as(q)
            down = torch.where(z - 1 >= self.q_min, z - 1, z + 1).expand_as(q)
            nonzero = torch.where(wg >= 0, up, down)
            q = torch.where(keep & (q == z), nonzero, q)
            return ((q - z) * s).view(out_features, in_features).to(w.dtype)

        def forward(self, w):
            return (w + (self.project(w) - w).detach()) * self.keep

    return GridProjection


def quantized_linears(model: Any) -> dict[str, Any]:
    """The Linear layers that carry a compressed-tensors weight quantization (scale, zero point)."""
    import torch

    out = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if isinstance(module, torch.nn.Linear) and scheme is not None and scheme.weights is not None:
            out[name] = module
    return out


def attach_grid(model: Any) -> dict[str, Any]:
    """Parametrize every quantized Linear weight with its GridProjection; returns them by name."""
    import torch
    from compressed_tensors.quantization.utils import calculate_range
    from torch.nn.utils import parametrize

    GridProjection = _grid_module()
    layers = quantized_linears(model)
    if not layers:
        raise ConfigError("recovery: the awq_model has no compressed-tensors quantized Linear layers")
    grids = {}
    for name, layer in layers.items():
        args = layer.quantization_scheme.weights
        if args.strategy not in ("group", "channel") or hasattr(layer, "weight_g_idx"):
            raise ConfigError(f"recovery: {name} uses weight strategy {args.strategy!r}"
                              f"{' with activation ordering' if hasattr(layer, 'weight_g_idx') else ''}; "
                              "recovery keeps group/channel grids without activation ordering only")
        scale = layer.weight_scale.detach().view(layer.out_features, -1)
        zp = getattr(layer, "weight_zero_point", None)
        zp = torch.zeros_like(scale) if zp is None else zp.detach().view_as(scale)
        q_min, q_max = calculate_range(args, "cpu")
        weight = layer.weight.detach()
        grid = GridProjection(scale, zp, weight != 0, q_min, q_max)
        if not torch.equal(grid.project(weight) * grid.keep, weight):
            raise RuntimeError(f"recovery: {name}'s weights are not on their own 4-bit grid "
                               "(was awq_model saved with different scales?)")
        parametrize.register_parametrization(layer, "weight", grid)
        grids[name] = grid
    return grids


def detach_grid(model: Any) -> None:
    """Replace each parametrized weight by its projection (on the grid, pruned positions 0)."""
    from torch.nn.utils import parametrize

    for layer in quantized_linears(model).values():
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)


def zero_masks(model: Any) -> dict[str, Any]:
    return {name: (layer.weight == 0) for name, layer in quantized_linears(model).items()}


# --------------------------------------------------------------------------- data


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
        raise ConfigError(f"recovery: {kept_parquet} has {len(ids)} tokens, fewer than the "
                          f"{need} that recovery.steps x micro_batch_size + eval_sequences blocks "
                          f"of {seq_len} need")
    return torch.tensor(ids[:need]).view(count, seq_len)


# --------------------------------------------------------------------------- distillation


def distill_loss(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """KL(teacher || student) on temperature-softened distributions, times T^2, mean per token."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")
    return kl * temperature**2


def heldout_kl(student: Any, teacher_logits: list[Any], blocks: Any, cfg: RecoveryConfig) -> float:
    import torch

    student.eval()
    total = 0.0
    with torch.no_grad():
        for i, t in enumerate(teacher_logits):
            batch = blocks[i * cfg.micro_batch_size:(i + 1) * cfg.micro_batch_size]
            total += distill_loss(student(batch).logits, t, cfg.temperature).item()
    return total / len(teacher_logits)


def distill(student: Any, teacher: Any, train_blocks: Any, cfg: RecoveryConfig,
            log: Callable[[str], Any]) -> list[float]:
    """``cfg.steps`` AdamW steps on the distillation loss; returns the loss per step."""
    import torch

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    losses = []
    student.train()
    for step in range(cfg.steps):
        i = (step * cfg.micro_batch_size) % len(train_blocks)
        batch = train_blocks[i:i + cfg.micro_batch_size]
        with torch.no_grad():
            teacher_logits = teacher(batch).logits
        loss = distill_loss(student(batch).logits, teacher_logits, cfg.temperature)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        log(f"recovery step {step + 1}/{cfg.steps}: distillation loss {losses[-1]:.5f}")
    student.eval()
    return losses


def freeze_all_but_recovery_weights(model: Any, train_norms: bool) -> int:
    """Only the quantized weights' float masters (and, optionally, the norms) train."""
    from torch.nn.utils import parametrize

    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    for layer in quantized_linears(model).values():
        if parametrize.is_parametrized(layer, "weight"):
            original = layer.parametrizations.weight.original
            original.requires_grad_(True)
            count += original.numel()
    if train_norms:
        for name, module in model.named_modules():
            if type(module).__name__.endswith("RMSNorm") or "norm" in name.split(".")[-1]:
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
                    count += p.numel()
    return count


# --------------------------------------------------------------------------- checks


def quantization_tensors(model_dir: Path) -> dict[str, Any]:
    """Every scale / zero-point tensor in a compressed-tensors folder (the grid itself)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, framework="pt") as tensors:
            for name in tensors.keys():
                if name.endswith(("weight_scale", "weight_zero_point")):
                    out[name] = tensors.get_tensor(name)
    return out


def compare_compression(before: dict[str, Any], after: dict[str, Any], masks_before: dict[str, Any],
                        masks_after: dict[str, Any], grid_before: dict[str, Any],
                        grid_after: dict[str, Any]) -> list[str]:
    """What changed in sparsity or bit width between the input and the output (empty: nothing)."""
    import torch

    problems = []
    for key in ("quant_format", "nominal_weight_bits", "bits_per_weight", "bits_per_linear_weight",
                "sparsity", "sparsity_per_layer"):
        if before.get(key) != after.get(key):
            problems.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}"[:500])
    if set(masks_before) != set(masks_after):
        problems.append("the set of quantized layers changed")
    for name in sorted(set(masks_before) & set(masks_after)):
        if not torch.equal(masks_before[name], masks_after[name]):
            problems.append(f"{name}: sparsity mask changed")
    if set(grid_before) != set(grid_after):
        problems.append("the set of scale/zero-point tensors changed")
    for name in sorted(set(grid_before) & set(grid_after)):
        if not torch.equal(grid_before[name], grid_after[name]):
            problems.append(f"{name}: the 4-bit grid changed")
    return problems


# --------------------------------------------------------------------------- the stage


def build(profile: Profile, *, inputs: dict[str, Artifact], home: Path, log=print) -> Artifact:
    import torch
    from transformers import AutoTokenizer

    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

    from refinery import gguf_export, modelstats
    from refinery.prune import save_compressed, storage_dtype

    cfg = profile.recovery
    if cfg.method != "distill":
        raise ConfigError(f"recovery.method: {cfg.method!r} is not implemented; use 'distill' "
                          "(distillation with the sparsity mask and the 4-bit grid enforced)")
    for name in ("awq_model", "qlora_model", "deduped_corpus"):
        if name not in inputs:
            raise ConfigError(f"{STAGE}: missing input artifact {name!r} (got {sorted(inputs)})")
    student_dir = inputs["awq_model"].path / "model"
    teacher_dir = inputs["qlora_model"].path / "model"
    kept = inputs["deduped_corpus"].path / "kept.parquet"
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    text = modelstats.heldout_text(profile)
    tokens = profile.eval.perplexity_tokens
    student = modelstats.load_model(student_dir)  # 4-bit weights dequantized, grid attached
    teacher = modelstats.load_model(teacher_dir)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ConfigError(f"recovery: teacher {teacher_dir} has vocabulary {teacher.config.vocab_size}, "
                          f"student {student_dir} {student.config.vocab_size}; they must share a tokenizer")
    stats_before = modelstats.model_stats(student_dir, model=student)
    masks_before = zero_masks(student)
    ppl_before = modelstats.perplexity(student, text, tokenizer=tokenizer, max_tokens=tokens)

    n_eval = -(-cfg.eval_sequences // cfg.micro_batch_size) * cfg.micro_batch_size
    blocks = token_blocks(kept, tokenizer, count=n_eval + cfg.steps * cfg.micro_batch_size,
                          seq_len=cfg.sequence_len, seed=cfg.seed)
    eval_blocks, train_blocks = blocks[:n_eval], blocks[n_eval:]
    with torch.no_grad():
        teacher_eval = [teacher(eval_blocks[i:i + cfg.micro_batch_size]).logits
                        for i in range(0, n_eval, cfg.micro_batch_size)]

    attach_grid(student)
    trainable = freeze_all_but_recovery_weights(student, cfg.train_norms)
    kl_before = heldout_kl(student, teacher_eval, eval_blocks, cfg)
    log(f"recovery: {trainable:,} trainable parameters; held-out KL before {kl_before:.5f}, "
        f"perplexity before {ppl_before:.3f}")
    train_start = time.perf_counter()
    losses = distill(student, teacher, train_blocks, cfg, log)
    train_seconds = time.perf_counter() - train_start
    kl_after = heldout_kl(student, teacher_eval, eval_blocks, cfg)
    detach_grid(student)
    del teacher, teacher_eval

    config = {"recovery": cfg.model_dump(mode="json"), "gguf": profile.gguf.model_dump(mode="json"),
              "perplexity_tokens": tokens}
    with staged_artifact(STAGE, config=config, inputs={k: v.ref() for k, v in inputs.items()},
                         home=home) as st:
        out = st.path / "model"
        for p in student.parameters():
            p.requires_grad_(False)
        # a model loaded from disk (not through oneshot) needs llm-compressor's compressing save
        modify_save_pretrained(student)
        save_compressed(student, tokenizer, out, dtype=storage_dtype(student_dir))
        del student
        saved = modelstats.load_model(out)
        after = modelstats.measure_saved_model(out, text, max_tokens=tokens)
        problems = compare_compression(stats_before, after, masks_before, zero_masks(saved),
                                       quantization_tensors(student_dir), quantization_tensors(out))
        if problems:
            raise RuntimeError("recovery changed the compression it must keep:\n  " + "\n  ".join(problems))
        del saved
        metadata = {"general.name": profile.release.name, "source_stage": STAGE,
                    "profile": profile.name, "gguf_type": profile.gguf.type,
                    "lineage": json.dumps({k: v.version for k, v in inputs.items()}, sort_keys=True)}
        gguf = gguf_export.export_model(out, st.path, profile.gguf.type, profile.gguf.zstd_level,
                                        metadata, embedding_type=profile.gguf.embedding_type, log=log)
        st.metrics.update(
            perplexity_before=ppl_before,
            perplexity=after["perplexity"],
            perplexity_tokens=tokens,
            teacher_perplexity=inputs["qlora_model"].manifest.get("metrics", {}).get("perplexity"),
            heldout_kl_before=kl_before,
            heldout_kl_after=kl_after,
            distill_loss_first=losses[0],
            distill_loss_last=losses[-1],
            distill_losses=losses,
            trainable_parameters=trainable,
            steps=cfg.steps,
            tokens_seen=cfg.steps * cfg.micro_batch_size * cfg.sequence_len,
            tokens_per_second=cfg.steps * cfg.micro_batch_size * cfg.sequence_len / train_seconds,
            sparsity_before=stats_before["sparsity"],
            sparsity=after["sparsity"],
            sparsity_per_layer_before=stats_before["sparsity_per_layer"],
            sparsity_per_layer=after["sparsity_per_layer"],
            bits_per_weight_before=stats_before["bits_per_weight"],
            bits_per_weight=after["bits_per_weight"],
            bits_per_linear_weight=after["bits_per_linear_weight"],
            nominal_weight_bits=after["nominal_weight_bits"],
            compression_preserved=True,
            parameters=after["parameters"],
            bytes_on_disk=after["bytes_on_disk"],
            generation=after["generation"],
            gguf=gguf,
            seconds=time.perf_counter() - start,
            train_seconds=train_seconds,
            peak_rss_bytes=modelstats.peak_rss_bytes(),
        )
    log(f"{STAGE}: perplexity {ppl_before:.3f} -> {after['perplexity']:.3f}; held-out KL "
        f"{kl_before:.5f} -> {kl_after:.5f}; sparsity {after['sparsity']:.4f}, "
        f"{after['bits_per_linear_weight']:.3f} bits per linear weight (unchanged)")
    return load_artifact(st.path)
