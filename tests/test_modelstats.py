"""refinery.modelstats on the smoke profile's tiny Llama: perplexity against first principles,
sparsity and bytes on a model zeroed by hand, and validation errors that name the profile key."""

from __future__ import annotations

import math
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compression_helpers import quiet, smoke_profile
from refinery import base_model
from refinery.config import load_profile
from refinery.modelstats import (ConfigError, Timer, heldout_text, load_model, model_stats,
                                 peak_rss_bytes, perplexity, validate_model_config)

# SmolLM2-135M's shape (config of the embedded GGUF); vocabulary cut to keep the meta model small.
SMOLLM2_SHAPE = dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                     num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
                     vocab_size=1024)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFINERY_HOME", str(home))
        art = base_model.build(load_profile("smoke"), home=home, log=quiet)
    return art.path / "model"


@pytest.fixture(scope="module")
def text():
    return heldout_text(load_profile("smoke"))


def test_heldout_text_is_wikitext(text):
    assert len(text) > 1_000_000 and "Robert Boulter" in text[:1000]


def test_heldout_text_names_the_key_when_missing(tmp_path):
    profile = smoke_profile(eval={"data_dir": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match=r"eval\.data_dir.*nowhere"):
        heldout_text(profile)


def test_perplexity_matches_the_models_own_loss(tiny, text):
    """One window: exp of transformers' mean cross-entropy over the same tokens."""
    tok = AutoTokenizer.from_pretrained(tiny)
    model = load_model(tiny)
    ids = tok(text[:4000], add_special_tokens=False, return_tensors="pt").input_ids[:, :200]
    with torch.no_grad():
        expected = math.exp(model(ids, labels=ids).loss.item())
    got = perplexity(model, text, tokenizer=tok, max_tokens=200, window=256, stride=256)
    assert got == pytest.approx(expected, rel=1e-4)
    # from the folder, twice: same number (deterministic)
    assert perplexity(tiny, text, max_tokens=200) == pytest.approx(got, rel=1e-6)
    assert perplexity(tiny, text, max_tokens=200) == perplexity(tiny, text, max_tokens=200)


def test_perplexity_sliding_windows_score_every_token_once(tiny, text):
    """A model that predicts uniformly has perplexity = vocabulary size, whatever the windows."""
    tok = AutoTokenizer.from_pretrained(tiny)
    model = load_model(tiny)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied to the embedding: logits are all zero
    vocab = model.config.vocab_size
    for window, stride in ((32, 32), (32, 8), (120, 50)):
        assert perplexity(model, text, tokenizer=tok, max_tokens=120, window=window,
                          stride=stride) == pytest.approx(vocab, rel=1e-4)


def test_model_stats_counts_zeros_set_by_hand(tiny, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    q = model.model.layers[0].self_attn.q_proj.weight
    down = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        q[: q.shape[0] // 2].zero_()
        down.zero_()
    model.save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp_path / "m")

    stats = model_stats(tmp_path / "m")
    per_layer = stats["sparsity_per_layer"]
    assert per_layer["model.layers.0.self_attn.q_proj"] == 0.5
    assert per_layer["model.layers.1.mlp.down_proj"] == 1.0
    assert all(v == 0 for k, v in per_layer.items()
               if k not in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"))
    assert "lm_head" not in per_layer and len(per_layer) == 14  # 7 linears x 2 layers
    assert stats["sparsity"] == pytest.approx((q.numel() / 2 + down.numel()) / stats["linear_parameters"])
    assert stats["parameters"] == sum(p.numel() for p in model.parameters())  # tied: counted once
    assert stats["bytes_on_disk"] == sum(p.stat().st_size for p in (tmp_path / "m").iterdir())
    assert stats["bits_per_weight"] == pytest.approx(32.0, rel=1e-6)
    assert stats["nominal_weight_bits"] == 32 and stats["dtype"] == "float32" and not stats["quantized"]


def test_group_size_that_does_not_divide_smollm2_names_the_key():
    with pytest.raises(ConfigError, match=r"awq\.group_size: 128 .*hidden_size 576 \(576 % 128 = 64\)"):
        validate_model_config(dict(SMOLLM2_SHAPE), group_size=128)
    checked = validate_model_config(dict(SMOLLM2_SHAPE), group_size=64)
    assert checked["group_dimensions"] == {"hidden_size": 576, "intermediate_size": 1536,
                                           "num_attention_heads*head_dim": 576}


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_open_interval_names_the_key(tiny, sparsity):
    with pytest.raises(ConfigError, match=r"prune\.sparsity: must be in \(0, 1\)"):
        validate_model_config(tiny, sparsity=sparsity, key_prefix="prune")


def test_missing_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"awq: model directory .*absent does not exist"):
        validate_model_config(tmp_path / "absent", group_size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        validate_model_config(tmp_path / "empty", key_prefix="prune")
    # memory is refinery.memory_plan's check now (tests/test_memory_plan.py: a 70B config refused)


def test_timer_and_peak_rss():
    with Timer() as t:
        time.sleep(0.05)
    assert 0.04 < t.seconds < 1.0
    assert peak_rss_bytes() > 50 * 2**20  # torch alone is larger than this


def test_tree_memory_counts_the_children_too():
    # the data-stage benchmark's memory figure: this process plus its map workers, shared pages once
    import subprocess
    import sys
    import time

    from refinery.modelstats import TreeMemory, tree_pss_bytes

    alone = tree_pss_bytes()
    child = subprocess.Popen([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
                              "import sys; print('ready', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with TreeMemory(interval=0.01) as memory:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(0.1)
        assert tree_pss_bytes() - alone > 250 * 2**20
        assert memory.peak_bytes - alone > 250 * 2**20
    finally:
        child.communicate("")
    assert tree_pss_bytes() - alone < 100 * 2**20
