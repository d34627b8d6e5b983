"""awq_model: AWQ 4-bit weight quantization (W4A16) of the pruned model, keeping its zeros.

llm-compressor 0.14 splits AWQ in two modifiers: ``AWQModifier`` searches per-channel scales on
English calibration activations and folds them into the weights; ``QuantizationModifier`` then
quantizes every decoder Linear to 4-bit integers in groups of ``awq.group_size`` input columns.
The model is saved pack-quantized (eight 4-bit values per int32), with recipe.yaml beside it.

Sparsity survives by construction: smoothing multiplies or divides whole weight columns/rows by
a scale (0 * s = 0), and with integer zero points a weight of 0 quantizes to exactly the zero
point, which dequantizes to exactly 0. The stage still re-applies the input's zero mask before
saving and measures the saved model per layer, so a library change that breaks this is caught.

AutoAWQ, the package the seed plan named, is archived: its authors moved AWQ into llm-compressor,
which runs it here. refinery has no autoawq backend (docs/compression.md says why).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from refinery import device, memory_plan
from refinery.artifacts import Artifact, load_artifact, staged_artifact
from refinery.calibration import calibration_dataset
from refinery.config import AWQConfig, Profile
from refinery.modelstats import (Timer, heldout_text, load_model,
                                 measure_saved_model, perplexity, validate_model_config)
from refinery.prune import input_paths, input_perplexity, run_oneshot, save_compressed, stage_metrics, storage_dtype

STAGE = "awq_model"
IGNORE = ["lm_head"]  # the tied embedding / output head stays in its original precision


@contextlib.contextmanager
def cpu_pin_memory_workaround() -> Iterator[bool]:
    """Make ``IntermediatesCache.pin_memory`` a no-op while no accelerator is present.

    llm-compressor 0.14's AWQModifier pins cached activations before its grid search (to speed
    host-to-GPU copies); on a machine without an accelerator ``Tensor.pin_memory()`` raises
    "Cannot access accelerator device when none is available". Pinning buys nothing on CPU, so
    skipping it changes no result. Yields whether the patch was applied.
    tests/test_awq.py checks that upstream still raises, so we notice when this can go.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield False
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original


def quantization_scheme(cfg: AWQConfig) -> dict[str, Any]:
    """The named preset (W4A16 / W4A16_ASYM) with the profile's group size."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(cfg.scheme, ["Linear"])
    scheme.weights.group_size = cfg.group_size
    return {"group_0": scheme}


def recipe(cfg: AWQConfig) -> list[Any]:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    return [AWQModifier(n_grid=cfg.n_grid), QuantizationModifier(config_groups=quantization_scheme(cfg), ignore=IGNORE)]


def zero_masks(model: Any) -> dict[str, Any]:
    """Where each decoder Linear weight is exactly zero (the pruned positions)."""
    import torch

    return {name: (m.weight == 0) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in IGNORE}


def reapply_masks(model: Any, masks: dict[str, Any]) -> int:
    """Zero the pruned positions again; returns how many had become non-zero."""
    import torch

    lost = 0
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            weight = modules[name].weight
            lost += int((weight[mask] != 0).sum().item())
            weight.masked_fill_(mask, 0)
    return lost


def build(profile: Profile, *, inputs: dict[str, Artifact], home: Path, log=print) -> Artifact:
    from transformers import AutoTokenizer

    cfg = profile.awq
    placement = device.select(profile)
    model_in, kept = input_paths(inputs, "pruned_model")
    checked = validate_model_config(model_in, group_size=cfg.group_size, key_prefix="awq")
    plan = memory_plan.check(STAGE, profile, placement, model_dir=model_in, log=log)
    modifiers = recipe(cfg)
    text = heldout_text(profile)
    tokens = profile.eval.perplexity_tokens

    with Timer() as total:
        tokenizer = AutoTokenizer.from_pretrained(model_in)
        model = load_model(model_in, placement=placement)  # saved in the input's dtype
        ppl_before = input_perplexity(inputs["pruned_model"], tokens) or perplexity(model, text, tokenizer=tokenizer,
                                                                              max_tokens=tokens)
        masks = zero_masks(model)
        # the same arithmetic as modelstats.linear_sparsity, so equal zero counts compare equal
        sparsity_in = {n: float(m.sum().item()) / m.numel() for n, m in masks.items()}
        sparsity_in_overall = (sum(int(m.sum()) for m in masks.values())
                               / max(sum(m.numel() for m in masks.values()), 1))
        dataset, calib = calibration_dataset(
            kept, tokenizer, samples=cfg.calibration_samples, seq_len=cfg.calibration_seq_len,
            english_label=profile.langid.english_label, key="awq.calibration_samples")
        log(f"awq_model: {cfg.scheme} group {cfg.group_size} on {calib['samples']} English "
            f"samples, {calib['tokens']} tokens; perplexity before {ppl_before:.2f}")
        with Timer() as compress, cpu_pin_memory_workaround() as patched:
            run_oneshot(model, tokenizer, dataset, modifiers)
        zeros_restored = reapply_masks(model, masks)
        if zeros_restored:
            log(f"awq_model: {zeros_restored} pruned weights had become non-zero; mask re-applied")

        config = {"awq": cfg.model_dump(), "perplexity_tokens": tokens, "ignore": IGNORE,
                  "english_label": profile.langid.english_label,
                  "cpu_pin_memory_workaround": patched}
        with staged_artifact(STAGE, config=config, inputs={k: a.ref() for k, a in inputs.items()},
                             home=home) as st:
            out = st.path / "model"
            save_compressed(model, tokenizer, out, dtype=storage_dtype(model_in))
            del model, masks
            shutil.copy(out / "recipe.yaml", st.path / "recipe.yaml")
            after = measure_saved_model(out, text, max_tokens=tokens, placement=placement)
            lost = {n: (sparsity_in[n], after["sparsity_per_layer"].get(n, 0.0)) for n in sparsity_in
                    if after["sparsity_per_layer"].get(n, 0.0) < sparsity_in[n]}
            if lost:
                raise RuntimeError(f"awq_model: quantization lost pruned zeros (input, saved): {lost}")
            log(f"awq_model: sparsity {after['sparsity']:.4f}, {after['bits_per_linear_weight']:.2f} "
                f"bits per linear weight, perplexity {after['perplexity']:.2f}, "
                f"sample {after['generation']['completion']!r}")
            (st.path / "sparsity.json").write_text(json.dumps({
                "input_per_layer": sparsity_in, "overall": after["sparsity"],
                "per_layer": after["sparsity_per_layer"], "zeros_restored": zeros_restored}, indent=2))
            (st.path / "calibration.json").write_text(json.dumps(calib, indent=2))
            st.metrics.update(stage_metrics(after, model_in, out, ppl_before=ppl_before,
                                            seconds=total.seconds, compress_seconds=compress.seconds))
            st.metrics.update(
                group_size=cfg.group_size, scheme=cfg.scheme,
                sparsity_input=sparsity_in_overall,
                zeros_restored=zeros_restored, calibration_samples=calib["samples"],
                calibration_tokens=calib["tokens"], config=config, checked=checked,
                compute=device.metadata(placement), memory_plan=plan.metadata())
    log(f"awq_model: done in {total.seconds:.1f} s")
    return load_artifact(st.path)
