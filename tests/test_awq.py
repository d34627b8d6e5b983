"""awq_model with real llm-compressor AWQ (W4A16, pack-quantized) on the tiny pruned Llama: the
pruned zeros survive, the folder reloads in plain transformers, and the CPU workaround is still
needed (the test that says so fails once upstream fixes it)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from compression_helpers import publish_inputs, quiet, smoke_profile
from refinery import awq, prune
from refinery.config import ProfileError, load_profile
from refinery.modelstats import ConfigError

GROUP = 32  # the smoke profile's; divides 64 (hidden) and 128 (MLP)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFINERY_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def inputs(home):
    base = publish_inputs(home)
    pruned = prune.build(smoke_profile(), inputs=base, home=home, log=quiet)
    return {"pruned_model": pruned, "deduped_corpus": base["deduped_corpus"]}


@pytest.fixture(scope="module")
def quantized(home, inputs):
    return awq.build(smoke_profile(), inputs=inputs, home=home, log=quiet)


def test_upstream_pin_memory_still_fails_without_an_accelerator():
    """The quirk awq.cpu_pin_memory_workaround exists for. When this fails, upstream fixed it:
    delete the workaround."""
    from llmcompressor.pipelines.cache import IntermediatesCache, IntermediateValue

    assert not torch.accelerator.is_available(), "this test describes CPU-only machines"
    cache = IntermediatesCache([{"x": IntermediateValue(torch.ones(2), torch.device("cpu"))}], None)
    with pytest.raises(RuntimeError, match="Cannot access accelerator device when none is available"):
        cache.pin_memory(0)
    with awq.cpu_pin_memory_workaround() as patched:
        assert patched
        cache.pin_memory(0)  # no-op now
    with pytest.raises(RuntimeError):  # restored afterwards
        cache.pin_memory(0)


def test_pruned_zeros_survive_quantization(quantized, inputs):
    before = inputs["pruned_model"].manifest["metrics"]["sparsity_per_layer"]
    after = json.loads((quantized.path / "sparsity.json").read_text())
    assert set(after["per_layer"]) == set(before)
    for name, sparsity in before.items():
        assert after["per_layer"][name] >= sparsity, name  # 4-bit rounding may add zeros, never lose
    m = quantized.manifest["metrics"]
    assert m["sparsity"] >= m["sparsity_input"] >= 0.49
    assert m["zeros_restored"] == 0  # nothing had to be re-applied
    assert m["config"]["cpu_pin_memory_workaround"] is True


def test_saved_pack_quantized_4bit_with_the_group_size(quantized):
    folder = quantized.path / "model"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    # W4A16: symmetric groups of 32, llama.cpp's Q4_0 block (gguf.type auto carries it over exactly)
    assert weights["num_bits"] == 4 and weights["group_size"] == GROUP and weights["symmetric"] is True
    assert "lm_head" in qc["ignore"]
    m = quantized.manifest["metrics"]
    assert m["nominal_weight_bits"] == 4 and m["group_size"] == GROUP and m["quantized"]
    # 4 bits + a scale (and a zero point, stored even when symmetric) per group of 32, from the file
    assert 4.0 < m["bits_per_linear_weight"] < 6.0
    assert m["bytes_on_disk"] < m["bytes_on_disk_input"]
    recipe = yaml.safe_load((quantized.path / "recipe.yaml").read_text())
    stages = json.dumps(recipe)
    assert "AWQModifier" in stages and "QuantizationModifier" in stages
    assert "SparseGPTModifier" in stages  # the pruned model's recipe is carried along


def test_reloads_in_plain_transformers_and_generates(quantized):
    folder = quantized.path / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)  # compressed-tensors, as saved
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5
    assert quantized.manifest["metrics"]["perplexity"] < float("inf")


def test_group_size_that_does_not_divide_is_rejected_before_any_work(home, inputs):
    with pytest.raises(ConfigError, match=r"awq\.group_size: 48 does not divide .*hidden_size 64"):
        awq.build(smoke_profile(awq={"group_size": 48}), inputs=inputs, home=home, log=quiet)


def test_there_is_no_autoawq_backend(tmp_path):
    """AutoAWQ is archived upstream; the setting that could only refuse is gone (docs/compression.md)."""
    path = tmp_path / "old.yaml"
    path.write_text("awq: {backend: autoawq}\n")
    with pytest.raises(ProfileError, match=r"awq\.backend"):
        load_profile(str(path))


def test_the_grid_size_reaches_the_modifier():
    """awq.n_grid (the demo tries 10 scaling ratios, llm-compressor's default is 20)."""
    modifiers = awq.recipe(smoke_profile(awq={"n_grid": 7}).awq)
    assert modifiers[0].n_grid == 7
    assert awq.recipe(load_profile("smoke").awq)[0].n_grid == 20
