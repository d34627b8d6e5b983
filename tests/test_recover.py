"""recovered_model: distillation into the pruned W4 student keeps its zeros and its 4-bit format,
stops early on held-out KL divergence (keeping the input when nothing helps), and is saved as
compressed-tensors + a GGUF that holds exactly the recovered grid + zstd."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from compression_helpers import corpus_rows
from refinery import base_model, recover
from refinery.artifacts import load_artifact, staged_artifact
from refinery.config import PROJECT_ROOT, ProfileError, load_profile
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
    raw["recovery"].update(steps=12, eval_every=3, patience=2, learning_rate=1e-2, micro_batch_size=2,
                           sequence_len=64, eval_sequences=4, train=["scales", "norms"])
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
        scheme = preset_name_to_scheme("W4A16", ["Linear"])  # symmetric: Q4_0 in the GGUF
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


def _grid(train_scales: bool, train_codes: bool):
    torch.manual_seed(0)
    scale = torch.full((4, 2), 0.1)
    zero = torch.zeros(4, 2)
    keep = torch.rand(4, 16) > 0.5
    codes = torch.randint(-8, 8, (4, 16)).float()
    codes[codes == 0] = 1  # kept weights are never on the zero code
    codes = torch.where(keep, codes, torch.zeros_like(codes))
    grid = recover._grid_module()(codes, zero, scale, keep, -8.0, 7.0, train_scales=train_scales,
                                  train_codes=train_codes)
    return grid, codes, keep


def test_grid_weight_trains_scales_with_codes_and_zeros_fixed():
    grid, codes, keep = _grid(train_scales=True, train_codes=False)
    out = grid(None)
    assert torch.allclose(out, codes * 0.1) and torch.all(out[~keep] == 0)
    out.pow(2).sum().backward()
    assert grid.log_ratio.grad is not None and grid.log_ratio.grad.abs().sum() > 0
    assert grid.u.grad is None  # codes frozen
    with torch.no_grad():
        grid.log_ratio.fill_(0.5)
    out = grid(None)
    assert torch.allclose(out, codes * 0.1 * torch.exp(torch.tensor(0.5)))  # same codes, new scale
    assert torch.equal(grid.codes(), codes)


def test_grid_weight_codes_move_straight_through_and_never_touch_the_zeros():
    grid, codes, keep = _grid(train_scales=False, train_codes=True)
    out = grid(None)
    out.sum().backward()
    assert torch.all(grid.u.grad[~keep] == 0) and torch.all(grid.u.grad[keep] != 0)
    with torch.no_grad():
        grid.u.copy_(torch.where(keep, torch.zeros_like(codes) + 0.2, codes))  # push kept weights to code 0
    q = grid.codes()
    assert torch.all(q[keep] != 0) and torch.all(q[~keep] == 0), "a kept weight reached the zero code"


def test_compare_compression_allows_only_what_trained():
    stats = {"sparsity": 0.5, "bits_per_weight": 4.5, "sparsity_per_layer": {"l": 0.5}}
    before = {"l.weight_scale": torch.ones(2), "l.weight_packed": torch.zeros(2, dtype=torch.int32)}
    scaled = {**before, "l.weight_scale": torch.full((2,), 2.0)}
    recoded = {**before, "l.weight_packed": torch.ones(2, dtype=torch.int32)}
    assert recover.compare_compression(stats, dict(stats), before, scaled, {"scales"}) == []
    assert any("weight_scale changed" in p for p in recover.compare_compression(stats, stats, before, scaled, {"norms"}))
    assert any("weight_packed changed" in p for p in
               recover.compare_compression(stats, stats, before, recoded, {"scales", "norms"}))
    assert recover.compare_compression(stats, stats, before, recoded, {"codes"}) == []
    moved = recover.compare_compression(stats, {**stats, "sparsity": 0.4}, before, before, {"codes"})
    assert any("sparsity:" in p for p in moved)


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(path / "model" / "model.safetensors")


def test_recovery_moves_toward_the_teacher_and_keeps_the_format(inputs, profile):
    home, arts = inputs
    art = recover.build(profile, inputs=arts, home=home, log=lambda _: None)
    m = art.manifest["metrics"]
    assert m["compression_preserved"] is True and m["nominal_weight_bits"] == 4
    assert abs(m["sparsity"] - 0.5) < 0.02
    # early stopping on held-out KL: the kept step is better than the start
    assert m["best_step"] > 0 and m["heldout_kl_after"] < m["heldout_kl_before"]
    before, after = _tensors(arts["awq_model"].path), _tensors(art.path)
    packed = [k for k in before if k.endswith("weight_packed")]
    assert packed and all(torch.equal(before[k], after[k]) for k in packed)  # the same 4-bit codes
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight_scale"))
    scales = [after[k] for k in after if k.endswith("weight_scale")]
    assert all(torch.equal(s.float(), s.float().half().float()) for s in scales)  # what GGUF stores
    qc_before = json.loads((arts["awq_model"].path / "model" / "config.json").read_text())["quantization_config"]
    qc_after = json.loads((art.path / "model" / "config.json").read_text())["quantization_config"]
    assert qc_after["config_groups"] == qc_before["config_groups"]
    gguf = m["gguf"]
    assert gguf["roundtrip_ok"] is True and gguf["gguf_type"] == "Q4_0"
    assert gguf["grid_tensors"] == len(packed)  # every quantized tensor written exactly, no second rounding
    curve = [r for r in csv.DictReader(open(art.path / "losses.csv")) if r["split"] == "heldout_kl"]
    assert len(curve) >= 2
    assert art.verify() == []


def test_when_nothing_helps_the_input_is_kept(inputs, profile, tmp_path):
    """A learning rate that only hurts: early stopping keeps step 0, the output is the input."""
    home, arts = inputs
    wild = profile.model_copy(update={"recovery": profile.recovery.model_copy(
        update={"learning_rate": 5.0, "steps": 4, "eval_every": 2, "patience": 1})})
    art = recover.build(wild, inputs=arts, home=tmp_path / "h", log=lambda _: None)
    m = art.manifest["metrics"]
    assert m["best_step"] == 0 and m["heldout_kl_after"] == m["heldout_kl_before"]
    before, after = _tensors(arts["awq_model"].path), _tensors(art.path)
    quant = [k for k in before if k.endswith(("weight_packed", "weight_scale"))]
    assert all(torch.allclose(before[k].float(), after[k].float(), rtol=1e-3) for k in quant)


def test_only_distillation_is_offered(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("recovery: {method: lora}\n")
    with pytest.raises(ProfileError, match="recovery.method"):
        load_profile(str(path))
