"""recovered_model: distillation into the pruned W4 student keeps its zeros and its 4-bit grid,
measurably moves it toward the teacher, and is saved as compressed-tensors + GGUF + zstd."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from compression_helpers import corpus_rows
from refinery import base_model, recover
from refinery.artifacts import load_artifact, staged_artifact
from refinery.config import PROJECT_ROOT, load_profile
from refinery.records import KEPT_SCHEMA, write_table




def magnitude_prune(model, sparsity: float) -> None:
    """Zero the smallest weights of every decoder Linear (a stand-in for SparseGPT: same format)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                w = module.weight
                threshold = w.abs().flatten().kthvalue(int(w.numel() * sparsity)).values
                w[w.abs() <= threshold] = 0


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    raw = yaml.safe_load((PROJECT_ROOT / "profiles" / "smoke.yaml").read_text())
    # a learning rate that moves weights across grid cells without overshooting (docs/training.md)
    raw["recovery"].update(steps=12, learning_rate=3e-4, micro_batch_size=2, sequence_len=64,
                           eval_sequences=4)
    path = tmp_path_factory.mktemp("profile") / "smoke-recover.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_profile(str(path))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, profile):
    """Teacher = the dense tiny model; student = it pruned 50% and quantized W4A16 (group 32)."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home = tmp_path_factory.mktemp("home")
    base = base_model.build(load_profile("smoke"), home=home, log=lambda _: None)
    src = base.path / "model"
    with staged_artifact("qlora_model", home=home) as st:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        model.save_pretrained(st.path / "model")
        AutoTokenizer.from_pretrained(src).save_pretrained(st.path / "model")
    teacher = load_artifact(st.path)

    with staged_artifact("awq_model", home=home) as st:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        magnitude_prune(model, 0.5)
        scheme = preset_name_to_scheme("W4A16_ASYM", ["Linear"])
        scheme.weights.group_size = profile.awq.group_size
        oneshot(model=model, recipe=[QuantizationModifier(config_groups={"group_0": scheme},
                                                          ignore=["lm_head"])])
        model.save_pretrained(st.path / "model", save_compressed=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(st.path / "model")
        reset_session()
    student = load_artifact(st.path)

    with staged_artifact("deduped_corpus", home=home) as st:
        write_table(st.path / "kept.parquet", corpus_rows(200, english_only=True), KEPT_SCHEMA)
    return home, {"awq_model": student, "qlora_model": teacher, "deduped_corpus": load_artifact(st.path)}


def test_grid_projection_keeps_zeros_grid_and_masks_gradients():
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_range

    args = preset_name_to_scheme("W4A16_ASYM", ["Linear"]).weights
    q_min, q_max = calculate_range(args, "cpu")
    torch.manual_seed(0)
    scale = torch.full((4, 2), 0.1)
    zero = torch.tensor([[0.0, 3.0], [-8.0, 7.0], [1.0, -2.0], [0.0, 0.0]])
    keep = torch.rand(4, 16) > 0.5
    grid = recover._grid_module()(scale, zero, keep, q_min, q_max)
    w = (torch.randn(4, 16) * 0.3).requires_grad_(True)
    out = grid(w)
    codes = out.detach().view(4, 2, 8) / scale.unsqueeze(-1)
    assert torch.allclose(codes, codes.round(), atol=1e-5), "projected weights are off the grid"
    assert torch.all(out[~keep] == 0) and torch.all(out[keep] != 0), "sparsity pattern changed"
    assert torch.all(codes.round() + zero.unsqueeze(-1) >= q_min)
    assert torch.all(codes.round() + zero.unsqueeze(-1) <= q_max)
    out.sum().backward()
    assert torch.equal(w.grad, keep.float()), "straight-through inside the mask, zero outside"


def test_compare_compression_reports_changes():
    masks = {"l": torch.tensor([True, False])}
    grid = {"l.weight_scale": torch.ones(2)}
    stats = {"sparsity": 0.5, "bits_per_weight": 4.5, "sparsity_per_layer": {"l": 0.5}}
    assert recover.compare_compression(stats, dict(stats), masks, masks, grid, grid) == []
    problems = recover.compare_compression(
        stats, {**stats, "sparsity": 0.4, "sparsity_per_layer": {"l": 0.4}}, masks,
        {"l": torch.tensor([False, False])}, grid, {"l.weight_scale": torch.full((2,), 2.0)})
    assert any("sparsity:" in p for p in problems) and any("mask changed" in p for p in problems)
    assert any("grid changed" in p for p in problems)


def test_recovery_keeps_sparsity_and_bits_and_moves_toward_the_teacher(inputs, profile):
    home, arts = inputs
    art = recover.build(profile, inputs=arts, home=home, log=lambda _: None)
    m = art.manifest["metrics"]
    assert m["compression_preserved"] is True
    assert m["sparsity"] == m["sparsity_before"] and abs(m["sparsity"] - 0.5) < 0.01
    assert m["sparsity_per_layer"] == m["sparsity_per_layer_before"]
    assert m["bits_per_weight"] == m["bits_per_weight_before"] and m["nominal_weight_bits"] == 4
    # what can honestly be asserted on a random tiny model: the student got closer to the teacher
    assert m["heldout_kl_after"] < m["heldout_kl_before"]
    assert m["perplexity"] > 1 and m["perplexity_before"] > 1

    # the recovered 4-bit codes differ from the input's: recovery did change the weights
    from safetensors.torch import load_file
    before = load_file(arts["awq_model"].path / "model" / "model.safetensors")
    after = load_file(art.path / "model" / "model.safetensors")
    packed = [k for k in before if k.endswith("weight_packed")]
    assert packed and any(not torch.equal(before[k], after[k]) for k in packed)
    qc_before = json.loads((arts["awq_model"].path / "model" / "config.json").read_text())["quantization_config"]
    qc_after = json.loads((art.path / "model" / "config.json").read_text())["quantization_config"]
    assert qc_after["format"] == qc_before["format"] == "pack-quantized"
    assert qc_after["config_groups"] == qc_before["config_groups"]

    gguf = m["gguf"]
    assert gguf["roundtrip_ok"] is True
    assert (art.path / "model.gguf").exists() and (art.path / gguf["zst"]).exists()
    assert art.verify() == []


def test_refuses_unimplemented_method(inputs, profile):
    home, arts = inputs
    lora = profile.model_copy(update={"recovery": profile.recovery.model_copy(update={"method": "lora"})})
    with pytest.raises(ValueError, match="recovery.method"):
        recover.build(lora, inputs=arts, home=home, log=lambda _: None)
    assert not list((home / "artifacts").glob("recovered_model/.staging-*"))
