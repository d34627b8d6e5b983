"""Device and dtype selection from the profile, and its plumbing into the model stages.

No GPU is needed: where a test needs "a GPU is present", torch.cuda's availability and properties
are replaced for the selection logic only; nothing is computed on CUDA (the stages refuse, through
the memory plan, before they load anything).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from refinery import base_model, device
from refinery.config import PROJECT_ROOT, load_profile
from refinery.device import DeviceError, Placement
from refinery.memory_plan import MemoryPlanError
from refinery.modelstats import load_model

GiB = 2**30
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # a real way to have no GPU, whatever the machine


def _profile(tmp_path: Path, base: str = "smoke", **compute) -> Path:
    raw = yaml.safe_load((PROJECT_ROOT / "profiles" / f"{base}.yaml").read_text())
    raw["compute"] = {**raw.get("compute", {}), **compute}
    path = tmp_path / f"{base}-{'-'.join(f'{k}{v}' for k, v in compute.items())}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def gpu_present(monkeypatch):
    """torch.cuda reports one 80 GiB GPU with bf16 (selection logic only: no CUDA call computes)."""
    props = {"bf16": True, "free": 80 * GiB}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Selection-Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: props["bf16"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (props["free"], 80 * GiB))
    return props


def test_auto_on_this_machine(tmp_path):
    placement = device.select(load_profile(str(_profile(tmp_path, device="auto", dtype="auto"))))
    if torch.cuda.is_available():
        assert (placement.device, placement.dtype) == ("cuda", "bfloat16")
    else:
        assert (placement.device, placement.dtype) == ("cpu", "float32")
        assert placement.memory_bytes == placement.host_memory_bytes > 0
    meta = device.metadata(placement)
    assert meta["device"] == placement.device and meta["device_name"] and meta["dtype"] == placement.dtype


def test_auto_picks_cuda_and_bf16_when_a_gpu_is_present(tmp_path, gpu_present):
    auto = device.select(load_profile(str(_profile(tmp_path, device="auto", dtype="auto"))))
    assert auto == Placement("cuda", "bfloat16", "Selection-Test GPU", 80 * GiB, auto.host_memory_bytes, 2)
    gpu_present["bf16"] = False  # an older GPU: auto falls back to float16, an explicit bf16 is refused
    assert device.select(load_profile(str(_profile(tmp_path, device="auto", dtype="auto")))).dtype == "float16"
    with pytest.raises(DeviceError, match=r"compute\.dtype: bfloat16 .*Selection-Test GPU has no bfloat16"):
        device.select(load_profile(str(_profile(tmp_path, device="cuda", dtype="bfloat16"))))
    cpu = device.select(load_profile(str(_profile(tmp_path, device="cpu", dtype="auto"))))
    assert (cpu.device, cpu.dtype) == ("cpu", "float32")  # told cpu: the GPU is left alone


def test_autocast_only_where_bf16_is_native(tmp_path, monkeypatch):
    assert device.resolve_autocast("auto", "float32", native_bf16=True) == "bfloat16"
    assert device.resolve_autocast("auto", "float32", native_bf16=False) is None  # emulated: slower
    assert device.resolve_autocast("bfloat16", "float32", native_bf16=False) == "bfloat16"  # told so
    assert device.resolve_autocast("auto", "bfloat16", native_bf16=True) is None  # weights already bf16
    assert device.resolve_autocast("off", "float32", native_bf16=True) is None
    for native in (True, False):
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
        cpu = device.select(load_profile(str(_profile(tmp_path, device="cpu", dtype="auto"))))
        assert cpu.autocast == ("bfloat16" if native else None)
        assert device.metadata(cpu)["autocast"] == cpu.autocast  # recorded with every model stage
        off = device.select(load_profile(str(_profile(tmp_path, device="cpu", dtype="auto", autocast="off"))))
        assert off.autocast is None


def test_cuda_without_a_gpu_fails_naming_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"compute\.device: cuda is requested by profile gpu-smoke "
                                          r"\(gpu-smoke\.yaml\), but torch sees no CUDA GPU"):
        device.select(load_profile("gpu-smoke"))


def test_gpu_smoke_fails_fast_without_a_gpu(tmp_path):
    """REFINERY_PROFILE=gpu-smoke: the memory plan (make demo's first step) and the first model
    stage both stop at once, naming compute.device, and write nothing."""
    env = {**os.environ, **NO_GPU, "REFINERY_PROFILE": "gpu-smoke", "REFINERY_HOME": str(tmp_path / "home"),
           "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    plan = subprocess.run([sys.executable, "-m", "refinery.memory_plan"], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    stage = subprocess.run([sys.executable, "-m", "refinery.runner", "refinery.base_model"], env=env,
                           cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert plan.returncode == 2 and "refused: compute.device: cuda is requested by profile gpu-smoke" in plan.stderr
    assert stage.returncode != 0 and "DeviceError: compute.device: cuda is requested" in stage.stderr
    assert not (tmp_path / "home" / "artifacts").exists()
    assert seconds < 90, f"took {seconds:.0f} s: the failure is not fast"


def test_stage_takes_cuda_when_told_and_refuses_before_loading(tmp_path, gpu_present, refinery_home):
    """base_model on a (selection-only) GPU with too little free memory: the stage plans for the
    GPU, in bf16, and refuses before it builds or loads a model."""
    gpu_present["free"] = 1 * 2**20
    profile = load_profile(str(_profile(tmp_path, device="cuda", dtype="auto")))
    with pytest.raises(MemoryPlanError, match=r"base_model needs about .* GiB of GPU memory "
                                              r"\(Selection-Test GPU\), 0\.0 GiB usable .*bfloat16"):
        base_model.build(profile, home=refinery_home, log=lambda _: None)
    assert not list((refinery_home / "artifacts").glob("base_model/*/model"))


def test_load_model_follows_the_placement(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    assert next(load_model(tmp_path).parameters()).dtype == torch.float32  # default: CPU, fp32
    bf16 = load_model(tmp_path, placement=Placement("cpu", "bfloat16", "cpu", GiB, GiB))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    if not torch.cuda.is_available():  # the placement's device reaches from_pretrained
        with pytest.raises(AssertionError, match="not compiled with CUDA"):
            load_model(tmp_path, placement=Placement("cuda", "bfloat16", "gpu", GiB, GiB))
