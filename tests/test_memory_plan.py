"""The memory plan: estimates from the config alone, refusals that name the key, before any load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from refinery import awq, memory_plan, prune, train
from refinery.artifacts import load_artifact, staged_artifact
from refinery.config import PROJECT_ROOT, load_profile
from refinery.device import Placement
from refinery.memory_plan import STAGES, MemoryPlanError, arch_for, arch_of, plan_stage

GiB = 2**30
LLAMA31_8B_PARAMETERS = 8_030_261_248  # meta-llama/Llama-3.1-8B, counted by transformers


def _placement(device: str, gib: float, dtype: str | None = None, host_gib: float | None = None) -> Placement:
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    host = int((host_gib or gib) * GiB)
    return Placement(device, dtype, f"test {gib:g} GiB", int(gib * GiB), host)


def test_8b_architecture_is_known_without_a_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arch = arch_for(load_profile("llama31-8b"))
    assert arch.parameters == LLAMA31_8B_PARAMETERS
    assert (arch.layers, arch.hidden_size, arch.intermediate_size, arch.vocab_size) == (32, 4096, 14336, 128256)
    assert arch.linear_parameters == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)


def test_arch_of_a_saved_model_matches_its_real_parameters(tmp_path):
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    arch = arch_for(load_profile("smoke"), tmp_path)
    assert arch.parameters == sum(p.numel() for p in model.parameters())
    assert arch.linear_parameters == sum(m.weight.numel() for n, m in model.named_modules()
                                         if n.startswith("model.layers.") and hasattr(m, "in_features"))
    assert arch.lora_parameters(8, ["q_proj", "down_proj"]) == 8 * 2 * ((64 + 64) + (128 + 64))


def test_unknown_hub_model_offline_names_base_model_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = yaml.safe_load((PROJECT_ROOT / "profiles" / "llama31-8b.yaml").read_text())
    raw["base_model"]["path"] = "nobody/not-a-model"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(MemoryPlanError, match=r"base_model\.path: no config for 'nobody/not-a-model'"):
        arch_for(load_profile(str(tmp_path / "p.yaml")))


def test_8b_refuses_on_a_24_gib_cpu_machine_naming_keys():
    profile = load_profile("llama31-8b")
    arch = arch_for(profile)
    plans = {s: plan_stage(s, profile, _placement("cpu", 24), arch) for s in STAGES}
    assert all(p.problems() for p in plans.values()), "no stage of the 8B plan fits 24 GiB of CPU memory"
    base = plans["base_model"]
    assert 29 * GiB < base.need() < 36 * GiB  # 8.03B fp32 weights are 29.9 GiB
    assert "change compute.device in llama31-8b.yaml" in base.problems()[0]
    assert "change train.micro_batch_size" in plans["qlora_model"].problems()[0]
    assert "prune.calibration_samples" in plans["pruned_model"].problems()[0]


def test_8b_fits_one_80_gib_gpu_with_the_adapter_recovery_only():
    profile = load_profile("llama31-8b")
    arch = arch_for(profile)
    gpu = _placement("cuda", 80, host_gib=128)
    plans = {s: plan_stage(s, profile, gpu, arch) for s in STAGES}
    fits = {s for s, p in plans.items() if not p.problems()}
    assert fits == set(STAGES) - {"recovered_model"}
    assert 15 * GiB < plans["qlora_model"].need() < 40 * GiB  # NF4 weights, r=64 adapter, bf16 activations
    assert "recovery.micro_batch_size" in plans["recovered_model"].problems()[0]  # today's design
    topk = plan_stage("recovered_model", profile, gpu, arch, recovery_design="lora_topk")
    resident = plan_stage("recovered_model", profile, gpu, arch, recovery_design="lora_teacher")
    assert not topk.problems() and topk.need() < resident.need() < plans["recovered_model"].need()
    # the cached teacher runs alone first: the need is the larger phase, not the sum of both
    assert topk.need() < sum(p.bytes for p in topk.parts if p.pool == "device")


def test_host_and_device_pools_on_a_gpu():
    profile = load_profile("llama31-8b")
    arch = arch_for(profile)
    small_host = plan_stage("gguf_zst", profile, _placement("cuda", 80, host_gib=16), arch)
    assert small_host.need("device") < GiB  # the GGUF converter works on the host
    assert "host RAM" in small_host.problems()[0] and "base_model.path" in small_host.problems()[0]


def test_70b_is_refused_on_an_80_gib_gpu(tmp_path):
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path)  # config only
    plan = plan_stage("pruned_model", load_profile("llama31-8b"), _placement("cuda", 80),
                      arch_for(load_profile("llama31-8b"), tmp_path))
    assert plan.arch.parameters > 70e9 and "pruned_model needs about 1" in plan.problems()[0]


def _config_only_artifact(stage: str, home: Path):
    """An artifact whose model/ holds config.json and no weights: a stage that loads it fails."""
    with staged_artifact(stage, home=home) as st:
        LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2).save_pretrained(st.path / "model")
    return load_artifact(st.path)


@pytest.mark.parametrize("module, model_input", [(train, "base_model"), (prune, "qlora_model"),
                                                 (awq, "pruned_model")])
def test_stages_check_the_plan_before_loading(module, model_input, tmp_path):
    raw = yaml.safe_load((PROJECT_ROOT / "profiles" / "smoke.yaml").read_text())
    raw["compute"] = {"device": "cpu", "memory_fraction": 1e-6}  # a few KB usable
    (tmp_path / "tight.yaml").write_text(yaml.safe_dump(raw))
    profile = load_profile(str(tmp_path / "tight.yaml"))
    home = tmp_path / "home"
    inputs = {model_input: _config_only_artifact(model_input, home),
              "deduped_corpus": _config_only_artifact("deduped_corpus", home)}
    with pytest.raises(MemoryPlanError, match=rf"memory plan: {module.STAGE} needs about .*"
                                              r"compute\.memory_fraction 1e-06"):
        module.build(profile, inputs=inputs, home=home, log=lambda _: None)


def test_cli_prints_the_8b_plan_and_refuses_on_this_machine(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "REFINERY_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "refinery.memory_plan", "--profile", "llama31-8b"],
                         env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "Llama-3.1-8B, 8.03B parameters, on cpu" in out.stdout
    for stage in STAGES:
        assert f"\n{stage} " in out.stdout
    assert "refused: memory plan: qlora_model needs about" in out.stderr
    assert not list(tmp_path.iterdir())  # nothing downloaded or written


def test_demo_plan_fits_a_laptop():
    profile = load_profile("demo")
    arch = arch_for(profile)
    plans = [plan_stage(s, profile, _placement("cpu", 16), arch) for s in STAGES]
    assert not [p.problems() for p in plans if p.problems()]
    # the measured peak RSS of the demo chain is 1.9-7.5 GB (docs/models.md): same order
    assert all(1 * GiB < p.need() < 10 * GiB for p in plans)


def test_metadata_carries_need_and_usable():
    profile = load_profile("smoke")
    plan = memory_plan.plan_stage("awq_model", profile, _placement("cuda", 8), arch_for(profile))
    meta = plan.metadata()
    assert meta["need_device_bytes"] == plan.need("device") and meta["usable_device_bytes"] == int(8 * GiB * 0.9)
    assert "oneshot:AWQ activation cache" in meta["parts"]
    with pytest.raises(ValueError, match="unknown stage"):
        plan_stage("nope", profile, _placement("cpu", 8), arch_of(LlamaConfig(num_hidden_layers=1), "x"))
