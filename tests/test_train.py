"""qlora_model through real axolotl on the smoke profile's tiny Llama: split, config, a run killed
after its first checkpoint that resumes when re-run, and outputs that transformers/peft load."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig

from compression_helpers import corpus_rows
from refinery import base_model, train
from refinery.artifacts import latest, load_artifact, staged_artifact
from refinery.config import PROJECT_ROOT, load_profile
from refinery.device import Placement
from refinery.environment import stage_environment
from refinery.modelstats import ConfigError
from refinery.records import KEPT_SCHEMA, read_table, write_table

TRAIN_PYTHON = PROJECT_ROOT / ".venv-train" / "bin" / "python"




@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def inputs(home):
    profile = load_profile("smoke")
    base = base_model.build(profile, home=home, log=lambda _: None)
    with staged_artifact("deduped_corpus", home=home) as st:
        write_table(st.path / "kept.parquet", corpus_rows(120, english_only=True), KEPT_SCHEMA)
    return {"base_model": base, "deduped_corpus": load_artifact(st.path)}


def test_split_is_deterministic_and_disjoint(inputs, tmp_path):
    kept = inputs["deduped_corpus"].path / "kept.parquet"
    a = train.split_corpus(kept, tmp_path / "a", val_fraction=0.1, seed=7)
    b = train.split_corpus(kept, tmp_path / "b", val_fraction=0.1, seed=7)
    assert a == b == {"train": 108, "val": 12}
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    ids = {s: {json.loads(x)["id"] for x in (tmp_path / "a" / f"{s}.jsonl").read_text().splitlines()}
           for s in ("train", "val")}
    assert not ids["train"] & ids["val"]
    assert ids["train"] | ids["val"] == set(read_table(kept).column("id").to_pylist())
    first = json.loads((tmp_path / "a" / "train.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    c = train.split_corpus(kept, tmp_path / "c", val_fraction=0.1, seed=7, max_train_records=20,
                           max_val_records=5)
    assert c == {"train": 20, "val": 5}
    capped = {s: [json.loads(x)["id"] for x in (tmp_path / "c" / f"{s}.jsonl").read_text().splitlines()]
              for s in ("train", "val")}
    assert set(capped["val"]) <= ids["val"] and set(capped["train"]) <= ids["train"]


GPU = Placement("cuda", "bfloat16", "A100-SXM4-80GB", 80 * 2**30, 256 * 2**30, 4)
CPU = Placement("cpu", "float32", "cpu", 24 * 2**30, 24 * 2**30)
DISTRIBUTED = ("none", "deepspeed_zero2", "deepspeed_zero3", "fsdp")


def _paths(tmp_path):
    return dict(base_model=tmp_path / "m", train_file=tmp_path / "t.jsonl", val_file=tmp_path / "v.jsonl",
                output_dir=tmp_path / "out", pad_token="<pad>")


def test_axolotl_config_for_cpu_and_for_the_8b_plan(tmp_path):
    seed = load_profile("llama31-8b").train
    gpu = train.axolotl_config(seed, placement=GPU, **_paths(tmp_path))
    assert (gpu["load_in_4bit"], gpu["adapter"], gpu["lora_r"], gpu["learning_rate"]) == (True, "qlora", 64, 5e-6)
    assert (gpu["num_epochs"], gpu["micro_batch_size"], gpu["early_stopping_patience"]) == (3, 4, 3)
    assert gpu["gradient_accumulation_steps"] > 1 and gpu["sample_packing"] is True
    assert gpu["val_set_size"] == 0 and gpu["test_datasets"][0]["path"].endswith("v.jsonl")
    # compute.dtype auto on the GPU: bf16, the fused CUDA kernels on, checkpointing on
    assert (gpu["bf16"], gpu["fp16"], gpu["lora_mlp_kernel"], gpu["gradient_checkpointing"]) == (True, False, True, True)
    fp16 = train.axolotl_config(seed, placement=replace(GPU, dtype="float16"), flash_attention=True, **_paths(tmp_path))
    assert (fp16["bf16"], fp16["fp16"], fp16["attn_implementation"]) == (False, True, "flash_attention_2")
    cpu = train.axolotl_config(seed, placement=CPU, **_paths(tmp_path))
    assert all(cpu[k] is False for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel",
                                         "lora_embedding_kernel", "flash_attention", "bf16", "fp16"))
    assert "refinery.bnb_cpu.BnbCpuPlugin" in cpu["plugins"]
    assert cpu["attn_implementation"] == "sdpa"  # isolates packed samples on CPU
    assert train.decoder_layer_class(LlamaConfig()) == "LlamaDecoderLayer"


def test_multi_gpu_variants_validate_in_axolotl(tmp_path):
    """train.distributed: the generated YAML of each variant, validated by axolotl 0.19's own schema
    as on a 4 x A100 node (capabilities given; no GPU needed), and the launcher it runs under."""
    seed = load_profile("llama31-8b").train
    configs = {kind: train.axolotl_config(seed.model_copy(update={"distributed": kind}), placement=GPU,
                                          **_paths(tmp_path)) for kind in DISTRIBUTED}
    assert "deepspeed" not in configs["none"] and "fsdp_config" not in configs["none"]
    assert configs["deepspeed_zero2"]["deepspeed"]["zero_optimization"]["stage"] == 2
    assert configs["deepspeed_zero3"]["deepspeed"]["zero_optimization"]["stage"] == 3
    assert configs["fsdp"]["fsdp_version"] == 2
    assert configs["fsdp"]["fsdp_config"]["transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    for kind, config in configs.items():
        (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    script = (
        "import sys, yaml\n"
        "from axolotl.utils.config import validate_config\n"
        "from axolotl.utils.dict import DictDefault\n"
        "caps = {'bf16': True, 'fp8': False, 'tf32': True, 'n_gpu': 4, 'compute_capability': 'sm_80'}\n"
        "for path in sys.argv[1:]:\n"
        "    cfg = validate_config(DictDefault(yaml.safe_load(open(path))), capabilities=caps,\n"
        "                          env_capabilities={'torch_version': '2.13.0'})\n"
        "    print('valid', path, bool(cfg.deepspeed), cfg.fsdp_version)\n")
    out = subprocess.run([str(TRAIN_PYTHON), "-c", script, *(str(tmp_path / f"{k}.yaml") for k in DISTRIBUTED)],
                         capture_output=True, text=True, timeout=300, env=stage_environment())
    assert out.returncode == 0, out.stderr[-3000:]
    assert [line.split()[0] for line in out.stdout.splitlines() if line.startswith("valid")] == ["valid"] * 4
    cmd = train.axolotl_command(tmp_path / "fsdp.yaml", processes=4)
    assert cmd[1:6] == ["-m", "accelerate.commands.launch", "--num_processes", "4", "-m"]
    assert train.axolotl_command(tmp_path / "none.yaml")[1:3] == ["-m", "axolotl.cli.train"]
    with pytest.raises(ConfigError, match=r"train\.distributed: fsdp needs GPUs"):
        train.axolotl_config(seed.model_copy(update={"distributed": "fsdp"}), placement=CPU, **_paths(tmp_path))


def _smoke_profile(tmp_path: Path) -> Path:
    raw = yaml.safe_load((PROJECT_ROOT / "profiles" / "smoke.yaml").read_text())
    # enough steps after the first checkpoint that the kill lands mid-training
    raw["train"].update(max_steps=8, save_steps=2, eval_steps=2, max_train_records=96)
    path = tmp_path / "smoke-train.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _runner(python: str, profile: Path, inputs: dict, home: Path) -> list[str]:
    return [python, "-m", "refinery.runner", "refinery.train", "--profile", str(profile),
            "--input", f"base_model={inputs['base_model'].path}",
            "--input", f"deduped_corpus={inputs['deduped_corpus'].path}"]


def test_killed_run_resumes_and_outputs_load(inputs, home, tmp_path):
    assert TRAIN_PYTHON.exists(), f"{TRAIN_PYTHON} missing: create the trainer environment first"
    profile = _smoke_profile(tmp_path)
    env = {**os.environ, "REFINERY_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT)}

    # 1) run in a process group of its own, kill it (and axolotl) once a checkpoint is complete
    first = subprocess.Popen(_runner(sys.executable, profile, inputs, home), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    checkpoint = None
    while time.monotonic() < deadline and first.poll() is None:
        found = sorted(home.glob("work/qlora_model/*/out/checkpoint-*/trainer_state.json"))
        if found:
            time.sleep(0.5)  # let the trainer finish writing this checkpoint's last files
            checkpoint = found[0].parent
            break
        time.sleep(0.2)
    assert first.poll() is None, f"training ended (code {first.returncode}) before it could be killed"
    assert checkpoint is not None, "no checkpoint within 240 s"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert latest("qlora_model", home) is None, "a killed run must not publish an artifact"
    assert not list((home / "artifacts" / "qlora_model").glob(".staging-*"))

    # 2) re-materialize, this time from inside the trainer's environment (as the Dagster asset does)
    second = subprocess.run(_runner(str(TRAIN_PYTHON), profile, inputs, home), env=env,
                            capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    art = latest("qlora_model", home)
    m = art.manifest["metrics"]
    assert m["resumed_from_step"] >= 2, "the second run started from scratch"
    assert m["steps"] == 8 and m["early_stopped"] is False
    assert art.path.joinpath("axolotl.log").read_text().count("CPU repacking disabled on 14 Linear4bit") >= 1

    # losses: every step has a train loss; validation at every eval step; tokens grow
    with open(art.path / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    train_steps = [int(r["step"]) for r in rows if r["split"] == "train"]
    assert train_steps == list(range(1, 9))
    assert {int(r["step"]) for r in rows if r["split"] == "val"} >= {2, 4, 6, 8}
    tokens = [int(r["tokens"]) for r in rows if r["split"] == "train"]
    assert tokens == sorted(tokens) and tokens[-1] == m["tokens_seen"] > 0
    assert m["tokens_per_second"] > 0 and m["gpu_estimate"]["gpu_hours"] > 0
    assert m["perplexity"] > 1 and m["parameters"] > 0 and m["peak_rss_bytes"] > 0

    cfg = yaml.safe_load((art.path / "axolotl.yaml").read_text())
    assert cfg["load_in_4bit"] is True and cfg["adapter"] == "qlora" and cfg["max_steps"] == 8

    # the adapter on the un-quantized base computes what the merged model computes
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = inputs["base_model"].path / "model"
    ids = torch.arange(5, 37).unsqueeze(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, art.path / "adapter").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(art.path / "model", dtype=torch.float32).eval()
        merged_logits = merged(ids).logits
    assert not torch.allclose(peft_logits, base_logits), "training changed nothing"
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-3, atol=1e-3)
    assert art.verify() == []
