"""pruned_model: one-shot pruning of the fine-tuned model with llm-compressor (SparseGPT or Wanda).

Input: qlora_model (a dense HF folder) and deduped_corpus (English calibration records).
Output: ``model/`` (reloads in plain transformers), ``recipe.yaml`` (the llm-compressor recipe
that made it), ``sparsity.json`` (achieved sparsity per layer) and the metrics in the manifest.

Bytes on disk: compressed-tensors 0.19 (what llm-compressor 0.14 pins) removed its sparse
compressors (sparse-bitmask and sparse-24-bitmask are legacy config names with no compressor
behind them) and transformers 5.17 loads no sparse format, so the pruned model is saved dense
and is as large as its input. The zeros pay off downstream: the metrics record the zstd size of
the weights before and after pruning, and a test fails when a sparse compressor comes back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from refinery import device, memory_plan
from refinery.artifacts import Artifact, load_artifact, staged_artifact
from refinery.calibration import calibration_dataset
from refinery.config import PruneConfig, Profile
from refinery.modelstats import (ConfigError, Timer, dir_bytes, heldout_text, load_model,
                                 measure_saved_model, peak_rss_bytes, perplexity,
                                 validate_model_config, zstd_bytes)

STAGE = "pruned_model"

# SparseGPT/Wanda name the module inside a target Linear "lm_head." (trailing dot), so a plain
# "lm_head" in ignore never matches and the tied embedding gets pruned too; a regex does match.
IGNORE = ["re:.*lm_head"]


def recipe(cfg: PruneConfig) -> list[Any]:
    """The llm-compressor modifiers for this profile (saved as recipe.yaml with the model)."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    if cfg.mask_structure == "2:4" and cfg.sparsity != 0.5:
        raise ConfigError(f"prune.sparsity: mask_structure 2:4 means exactly 0.5, got {cfg.sparsity}")
    mask = "2:4" if cfg.mask_structure == "2:4" else "0:0"  # 0:0 is llm-compressor's unstructured
    modifier = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[cfg.method]
    return [modifier(sparsity=cfg.sparsity, mask_structure=mask, targets=["Linear"], ignore=IGNORE)]


def run_oneshot(model: Any, tokenizer: Any, dataset: Any, modifiers: list[Any]) -> None:
    """llm-compressor's single entry point, deterministic (no shuffling), in place on ``model``."""
    from llmcompressor import oneshot

    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=modifiers,
            num_calibration_samples=len(dataset), shuffle_calibration_samples=False,
            max_seq_length=max(len(x) for x in dataset["input_ids"]))


def storage_dtype(model_dir: Path) -> str:
    """The dtype a folder's weights are stored in (the stages compute in compute.dtype, save in this)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def save_compressed(model: Any, tokenizer: Any, out_dir: Path, *, dtype: str,
                    compressed: bool = True) -> None:
    """Save in ``dtype`` through llm-compressor's save_pretrained (compressed-tensors config and
    recipe.yaml), then end the llm-compressor session so a next stage in this process starts
    clean."""
    import torch
    from llmcompressor.core import reset_session

    model.to(getattr(torch, dtype))
    model.save_pretrained(out_dir, save_compressed=compressed)
    tokenizer.save_pretrained(out_dir)
    reset_session()


def input_paths(inputs: dict[str, Artifact], model_stage: str) -> tuple[Path, Path]:
    for name in (model_stage, "deduped_corpus"):
        if name not in inputs:
            raise ConfigError(f"{STAGE}: missing input artifact {name!r} (got {sorted(inputs)})")
    return inputs[model_stage].path / "model", inputs["deduped_corpus"].path / "kept.parquet"


def build(profile: Profile, *, inputs: dict[str, Artifact], home: Path, log=print) -> Artifact:
    from transformers import AutoTokenizer

    cfg = profile.prune
    placement = device.select(profile)
    model_in, kept = input_paths(inputs, "qlora_model")
    checked = validate_model_config(model_in, sparsity=cfg.sparsity, key_prefix="prune")
    plan = memory_plan.check(STAGE, profile, placement, model_dir=model_in, log=log)
    modifiers = recipe(cfg)
    text = heldout_text(profile)
    tokens = profile.eval.perplexity_tokens

    with Timer() as total:
        tokenizer = AutoTokenizer.from_pretrained(model_in)
        model = load_model(model_in, placement=placement)  # fp32 on the CPU, bf16 on a GPU
        ppl_before = input_perplexity(inputs["qlora_model"], tokens) or perplexity(model, text, tokenizer=tokenizer,
                                                                              max_tokens=tokens)
        log(f"pruned_model: perplexity before pruning {ppl_before:.2f} over {tokens} tokens")
        dataset, calib = calibration_dataset(
            kept, tokenizer, samples=cfg.calibration_samples, seq_len=cfg.calibration_seq_len,
            english_label=profile.langid.english_label, key="prune.calibration_samples")
        log(f"pruned_model: {cfg.method} to {cfg.sparsity:.0%} ({cfg.mask_structure}) on "
            f"{calib['samples']} English samples, {calib['tokens']} tokens")
        with Timer() as compress:
            run_oneshot(model, tokenizer, dataset, modifiers)

        config = {"prune": cfg.model_dump(), "perplexity_tokens": tokens,
                  "english_label": profile.langid.english_label, "ignore": IGNORE,
                  "storage": "dense (compressed-tensors 0.19 has no sparse compressor)"}
        with staged_artifact(STAGE, config=config, inputs={k: a.ref() for k, a in inputs.items()},
                             home=home) as st:
            out = st.path / "model"
            save_compressed(model, tokenizer, out, dtype=storage_dtype(model_in),
                            compressed=cfg.save_compressed)
            del model
            shutil.copy(out / "recipe.yaml", st.path / "recipe.yaml")
            after = measure_saved_model(out, text, max_tokens=tokens, placement=placement)
            log(f"pruned_model: sparsity {after['sparsity']:.4f}, perplexity {after['perplexity']:.2f}, "
                f"sample {after['generation']['completion']!r}")
            (st.path / "sparsity.json").write_text(json.dumps({
                "target": cfg.sparsity, "mask_structure": cfg.mask_structure,
                "overall": after["sparsity"], "per_layer": after["sparsity_per_layer"]}, indent=2))
            (st.path / "calibration.json").write_text(json.dumps(calib, indent=2))
            st.metrics.update(stage_metrics(after, model_in, out, ppl_before=ppl_before,
                                            seconds=total.seconds, compress_seconds=compress.seconds))
            st.metrics.update(target_sparsity=cfg.sparsity, calibration_samples=calib["samples"],
                              calibration_tokens=calib["tokens"], config=config,
                              checked=checked, compute=device.metadata(placement),
                              memory_plan=plan.metadata())
    log(f"pruned_model: done in {total.seconds:.1f} s")
    return load_artifact(st.path)


def input_perplexity(artifact: Artifact, tokens: int) -> float | None:
    """The perplexity the input's own stage measured on the same text and tokens (not measured twice)."""
    m = artifact.manifest.get("metrics", {})
    return m.get("perplexity") if m.get("perplexity_tokens") == tokens else None


def stage_metrics(after: dict[str, Any], model_in: Path, model_out: Path, *, ppl_before: float,
                  seconds: float, compress_seconds: float) -> dict[str, Any]:
    """The numbers every compression stage records, from a measure_saved_model() result."""
    keep = ("parameters", "linear_parameters", "bytes_on_disk", "tensor_bytes", "sparsity",
            "sparsity_per_layer", "bits_per_weight", "bits_per_linear_weight",
            "nominal_weight_bits", "quantized", "quant_format", "dtype", "perplexity",
            "perplexity_tokens", "generation")
    metrics = {k: after[k] for k in keep}
    metrics.update(
        perplexity_before=ppl_before,
        perplexity_ratio=after["perplexity"] / ppl_before,
        bytes_on_disk_input=dir_bytes(model_in),
        weights_zstd_bytes_input=zstd_bytes(model_in),
        weights_zstd_bytes=zstd_bytes(model_out),
        seconds=seconds,
        compress_seconds=compress_seconds,
        peak_rss_bytes=peak_rss_bytes(),
    )
    return metrics
