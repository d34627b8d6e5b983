"""qlora_model: QLoRA fine-tuning of the base model on deduped_corpus, through axolotl.

The stage writes one axolotl YAML from ``profile.train`` (kept with the artifact as
``axolotl.yaml``: a user reruns it by hand with ``axolotl train axolotl.yaml``) and runs axolotl
as a subprocess in the trainer's environment (.venv-train: axolotl pins accelerate below what
llm-compressor needs). Checkpoints live in ``work/qlora_model/<key>/`` under the home, keyed by the
config and the inputs' versions, so a killed run resumes from its last checkpoint when the stage
runs again (axolotl's ``auto_resume_from_checkpoints``). The artifact holds the adapter, the
adapter merged into the un-quantized base weights (``model/``, a plain Hugging Face folder),
``losses.csv`` and the metrics.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from refinery import device, gpu_estimate, memory_plan
from refinery.artifacts import Artifact, load_artifact, staged_artifact
from refinery.bnb_cpu import PLUGIN as BNB_CPU_PLUGIN
from refinery.config import PROJECT_ROOT, Profile, TrainConfig
from refinery.environment import stage_environment
from refinery.progress import Progress
from refinery.modelstats import ConfigError, peak_rss_bytes
from refinery.records import read_table

STAGE = "qlora_model"
TRAINER_PLUGIN = "refinery.train.TrainerPlugin"
AUTOCAST_ENV = "REFINERY_TRAIN_AUTOCAST"  # compute.autocast, resolved, for TrainerPlugin in axolotl's process
RUN_LOG = "train_runs.jsonl"  # one line per axolotl run: the step it started and ended at
HISTORY = "log_history.json"  # the trainer's full log history, written when training ends


# --------------------------------------------------------------------------- data


def split_corpus(kept_parquet: Path, out_dir: Path, *, val_fraction: float, seed: int,
                 max_train_records: int | None = None,
                 max_val_records: int | None = None) -> dict[str, int]:
    """Write train.jsonl / val.jsonl ({"messages": [...]}, what axolotl's chat_template reads).

    Records are ordered by id and shuffled with ``seed``, so the split depends only on the
    corpus content and the seed. Returns the record counts.
    """
    table = read_table(kept_parquet).select(["id", "messages"]).sort_by("id")
    rows = table.to_pylist()
    if len(rows) < 2:
        raise ValueError(f"{kept_parquet}: {len(rows)} records; need at least 2 to split train/val")
    random.Random(seed).shuffle(rows)
    n_val = min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
    val, train = rows[:n_val], rows[n_val:]
    # the caps only shorten each side: a record never moves between train and val
    train, val = train[:max_train_records], val[:max_val_records]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("val", val)):
        tmp = out_dir / f".{name}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for row in part:
                messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
                f.write(json.dumps({"id": row["id"], "messages": messages}, ensure_ascii=False) + "\n")
        os.replace(tmp, out_dir / f"{name}.jsonl")
    return {"train": len(train), "val": len(val)}


def token_lengths(jsonl: Path, tokenizer_dir: Path) -> list[int]:
    """Tokens of each chat-formatted conversation in a JSONL file (what training will see)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with open(jsonl, encoding="utf-8") as f:
        return [len(tok.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=False))
                for line in f]


# --------------------------------------------------------------------------- axolotl config


def pad_token_for(tokenizer_dir: Path) -> str:
    """The tokenizer's pad token, else its unk/eos token (padding is masked out of the loss)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    token = tok.pad_token or tok.unk_token or tok.eos_token
    if token is None:
        raise ValueError(f"{tokenizer_dir}: tokenizer has no pad, unk or eos token to pad with")
    return token


def axolotl_config(cfg: TrainConfig, *, base_model: Path, train_file: Path, val_file: Path,
                   output_dir: Path, pad_token: str, placement: device.Placement,
                   decoder_layer: str = "LlamaDecoderLayer", flash_attention: bool = False) -> dict[str, Any]:
    """The axolotl YAML (as a dict) for ``cfg`` on ``placement``: NF4 + double quantization, LoRA,
    early stopping; on GPUs bf16/fp16 from compute.dtype, the fused LoRA kernels, flash attention
    when the trainer has it, and with ``train.distributed`` DeepSpeed ZeRO or FSDP2
    (``decoder_layer``: the class FSDP wraps)."""
    gpu = placement.device == "cuda"
    if cfg.distributed != "none" and not gpu:
        raise ConfigError(f"train.distributed: {cfg.distributed} needs GPUs, and this stage runs on "
                          f"the CPU ({placement.name}); set train.distributed: none or compute.device: cuda")
    dataset = {"ds_type": "json", "type": "chat_template", "field_messages": "messages",
               "roles_to_train": ["assistant"]}
    config: dict[str, Any] = {
        "base_model": str(base_model),
        "load_in_4bit": cfg.load_in_4bit,  # axolotl: NF4, double quantization (bnb)
        "adapter": "qlora" if cfg.load_in_4bit else "lora",
        "lora_r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "lora_target_modules": list(cfg.lora_target_modules),
        "chat_template": "tokenizer_default",  # the base model's own template
        "special_tokens": {"pad_token": pad_token},
        "datasets": [{"path": str(train_file), **dataset}],
        "test_datasets": [{"path": str(val_file), "split": "train", **dataset}],
        "val_set_size": 0,
        "dataset_prepared_path": str(output_dir / "prepared"),
        "output_dir": str(output_dir),
        "sequence_len": cfg.sequence_len,
        "sample_packing": cfg.sample_packing,
        "eval_sample_packing": False,
        # sdpa isolates packed samples with a block-diagonal mask, and runs on CPU
        "attn_implementation": "sdpa",
        "micro_batch_size": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "num_epochs": cfg.num_epochs,
        "learning_rate": cfg.learning_rate,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "logging_steps": 1,
        "eval_steps": cfg.eval_steps,
        "save_steps": cfg.save_steps,
        "save_total_limit": 3,
        "auto_resume_from_checkpoints": True,
        "include_tokens_per_second": True,  # logs num_input_tokens_seen per step
        "seed": cfg.seed,
        # axolotl on the CPU trains in fp32: transformers refuses bf16 there (docs/training.md)
        "bf16": gpu and placement.dtype == "bfloat16",
        "fp16": gpu and placement.dtype == "float16",
        "tf32": False,
        "plugins": [BNB_CPU_PLUGIN, TRAINER_PLUGIN],
    }
    if cfg.max_steps is not None:
        config["max_steps"] = cfg.max_steps
    if cfg.early_stopping_patience is not None:
        config["early_stopping_patience"] = cfg.early_stopping_patience
    if not gpu:
        # axolotl's fused LoRA kernels and flash attention are CUDA-only
        config.update(lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False,
                      lora_embedding_kernel=False, flash_attention=False,
                      dataloader_pin_memory=False, dataloader_num_workers=0)
    else:
        config.update(gradient_checkpointing=True, lora_mlp_kernel=True, lora_qkv_kernel=True,
                      lora_o_kernel=True)
        if flash_attention:  # axolotl: packing through sdpa in bf16 may give 0.0 loss before Hopper
            config["attn_implementation"] = "flash_attention_2"
        config.update(distributed_config(cfg.distributed, decoder_layer))
    return config


def distributed_config(kind: str, decoder_layer: str) -> dict[str, Any]:
    """The axolotl keys of a multi-GPU run (one process per GPU, docs/cluster.md); {} for one GPU.

    DeepSpeed's config is given inline (axolotl takes a dict), with "auto" where the HF Trainer
    fills in batch sizes and precision. FSDP is version 2: axolotl's LoRA kernels refuse FSDP1.
    """
    if kind == "none":
        return {}
    if kind in ("deepspeed_zero2", "deepspeed_zero3"):
        stage = 2 if kind == "deepspeed_zero2" else 3
        zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
        if stage == 3:
            zero["gather_16bit_weights_on_model_save"] = True  # a whole adapter, not shards
        out: dict[str, Any] = {"deepspeed": {
            "zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}}
        if stage == 3:  # axolotl: QLoRA + ZeRO-3 needs re-entrant checkpointing
            out["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
        return out
    return {"fsdp_version": 2, "fsdp_config": {
        # axolotl refuses rank-0-only loading with 4-bit weights (the scatter deadlocks)
        "offload_params": False, "cpu_ram_efficient_loading": False,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": decoder_layer,
        "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True}}


def has_flash_attn() -> bool:
    """Whether the flash-attn package is installed here (the trainer's environment)."""
    return importlib.util.find_spec("flash_attn") is not None


def decoder_layer_class(config: Any) -> str:
    """The decoder layer class of a transformers config (LlamaForCausalLM -> LlamaDecoderLayer)."""
    return (config.architectures or ["LlamaForCausalLM"])[0].replace("ForCausalLM", "DecoderLayer")


# --------------------------------------------------------------------------- running axolotl


def train_python() -> str:
    """The interpreter that has axolotl: REFINERY_TRAIN_PYTHON, this one, or .venv-train's."""
    if os.environ.get("REFINERY_TRAIN_PYTHON"):
        return os.environ["REFINERY_TRAIN_PYTHON"]
    if importlib.util.find_spec("axolotl") is not None:
        return sys.executable
    candidate = PROJECT_ROOT / ".venv-train" / "bin" / "python"
    if not candidate.exists():
        raise FileNotFoundError(f"axolotl is not installed here and {candidate} does not exist; "
                                "create the trainer environment (pip install -e '.[train]' in .venv-train) "
                                "or set REFINERY_TRAIN_PYTHON")
    return str(candidate)


def drop_incomplete_checkpoints(output_dir: Path, log: Callable[[str], Any]) -> None:
    """A checkpoint killed while being written must not be resumed from."""
    for ckpt in output_dir.glob("checkpoint-*"):
        if not (ckpt / "trainer_state.json").exists() or not (ckpt / "adapter_model.safetensors").exists():
            log(f"removing incomplete checkpoint {ckpt.name}")
            shutil.rmtree(ckpt)


def axolotl_command(config_path: Path, processes: int = 1) -> list[str]:
    """``axolotl.cli.train`` on ``config_path``; several processes (one per GPU) through accelerate."""
    launcher = ["-m", "accelerate.commands.launch", "--num_processes", str(processes)] if processes > 1 else []
    return [train_python(), *launcher, "-m", "axolotl.cli.train", str(config_path)]


def run_axolotl(config_path: Path, log_path: Path, log: Callable[[str], Any], *, processes: int = 1,
                hide_gpus: bool = False, max_steps: int | None = None, start_step: int = 0,
                autocast: str | None = None) -> None:
    """Run ``axolotl.cli.train`` on ``config_path``; its output goes to ``log_path``.

    ``hide_gpus``: compute.device is cpu on a machine with a GPU; axolotl would take the GPU.
    ``max_steps``: progress with an ETA is logged per training step (the trainer logs every step).
    ``autocast``: the training forward passes in this dtype's autocast (TrainerPlugin).
    """
    env = stage_environment()  # what axolotl needs, no secrets it did not ask for
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if autocast:
        env[AUTOCAST_ENV] = autocast
    cmd = axolotl_command(config_path, processes)
    log(f"running {' '.join(cmd)} (output: {log_path})")
    with open(log_path, "a", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1)
        assert proc.stdout is not None
        progress = Progress("training steps", max_steps - start_step, log, every=0) if max_steps else None
        done = 0
        for line in proc.stdout:
            out.write(line)
            text = line.strip()
            if text.startswith("{'loss'") and progress is not None:  # one per optimizer step
                done += 1
                progress.update(min(done, progress.total), text[:120])
            elif text.startswith("{'eval_loss'") or "resume" in text.lower():
                log(text[:300])
        code = proc.wait()
    if code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
        raise RuntimeError(f"axolotl exited with {code}; last lines of {log_path}:\n" + "\n".join(tail))


try:  # the plugin below runs inside the axolotl process (.venv-train)
    from axolotl.integrations.base import BasePlugin as _AxolotlPlugin
except ImportError:
    _AxolotlPlugin = object


class TrainerPlugin(_AxolotlPlugin):  # type: ignore[misc, valid-type]
    """axolotl plugin: record where each run started and ended and the full loss history; on the
    CPU, run the forward passes in bf16 autocast when compute.autocast resolves to it."""

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list:
        from transformers import TrainerCallback

        output_dir = Path(cfg.output_dir)
        if os.environ.get(AUTOCAST_ENV):
            autocast_training(trainer, os.environ[AUTOCAST_ENV])

        class _Recorder(TrainerCallback):
            start_step = 0

            def on_train_begin(self, args, state, control, **kwargs):
                # called after a checkpoint's state is restored: global_step is where we resume
                self.start_step = state.global_step

            def on_train_end(self, args, state, control, **kwargs):
                import torch

                if not state.is_world_process_zero:  # one record per run, not one per GPU
                    return
                (output_dir / HISTORY).write_text(json.dumps(state.log_history), encoding="utf-8")
                with open(output_dir / RUN_LOG, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"start_step": self.start_step, "end_step": state.global_step,
                                        "max_steps": state.max_steps, "epoch": state.epoch,
                                        "best_checkpoint": state.best_model_checkpoint,
                                        "max_memory_allocated_bytes": torch.cuda.max_memory_allocated()
                                        if torch.cuda.is_available() else None}) + "\n")

        return [_Recorder()]


def autocast_training(trainer: Any, dtype: str) -> None:
    """The trainer's forward passes (``compute_loss``, training and evaluation) in CPU autocast of
    ``dtype``: matmuls in bf16 over the fp32 LoRA weights and the NF4-dequantized base, as
    recovery does (compute.autocast) and as axolotl's ``bf16: true`` does on a GPU, which
    transformers refuses on a CPU (docs/training.md). The backward pass follows the forward's
    dtypes."""
    import torch

    inner = trainer.compute_loss

    def compute_loss(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=getattr(torch, dtype)):
            return inner(*args, **kwargs)

    trainer.compute_loss = compute_loss
    print(f"refinery: training forward passes in {dtype} autocast (compute.autocast)", flush=True)



# --------------------------------------------------------------------------- outputs


def losses_table(history: list[dict[str, Any]], tokens_per_epoch: int) -> list[dict[str, Any]]:
    """Per-step train and validation loss with the non-padding tokens seen so far.

    Tokens are the epoch progress times the training split's tokens: the trainer's own count
    (num_input_tokens_seen) includes the padding of packed and unpacked batches alike.
    """
    rows = []
    for entry in history:
        step, tokens = entry.get("step"), round((entry.get("epoch") or 0) * tokens_per_epoch)
        if "loss" in entry:
            rows.append({"step": step, "split": "train", "loss": entry["loss"], "tokens": tokens})
        if "eval_loss" in entry:
            rows.append({"step": step, "split": "val", "loss": entry["eval_loss"], "tokens": tokens})
    return rows


def merge_adapter(base_model: Path, adapter: Path, out: Path, dtype: str = "float32") -> None:
    """Merge the LoRA adapter into the un-quantized base weights (in fp32); save a plain HF folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.to(getattr(torch, dtype)).save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)


def work_key(cfg: TrainConfig, inputs: dict[str, Artifact]) -> str:
    blob = json.dumps({"train": cfg.model_dump(mode="json"),
                       "inputs": {k: inputs[k].version for k in sorted(inputs)}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build(profile: Profile, *, inputs: dict[str, Artifact], home: Path, log=print) -> Artifact:
    from transformers import AutoConfig

    from refinery import modelstats

    start = time.perf_counter()
    cfg = profile.train
    placement = device.select(profile)
    base, corpus = inputs["base_model"], inputs["deduped_corpus"]
    base_dir = base.path / "model"
    plan = memory_plan.check(STAGE, profile, placement, model_dir=base_dir, log=log)
    work = home / "work" / STAGE / work_key(cfg, inputs)
    output_dir = work / "out"
    output_dir.mkdir(parents=True, exist_ok=True)
    log(f"qlora_model work directory: {work}")

    counts = split_corpus(corpus.path / "kept.parquet", work / "data", val_fraction=cfg.val_fraction,
                          seed=cfg.seed, max_train_records=cfg.max_train_records,
                          max_val_records=cfg.max_val_records)
    lengths = token_lengths(work / "data" / "train.jsonl", base_dir)
    # axolotl drops (does not truncate) conversations longer than sequence_len
    train_tokens = sum(n for n in lengths if n <= cfg.sequence_len)
    too_long = sum(n > cfg.sequence_len for n in lengths)
    base_config = AutoConfig.from_pretrained(base_dir)
    base_parameters = modelstats.count_parameters(base_config)
    estimate = gpu_estimate.estimate(tokens_per_epoch=train_tokens, parameters=base_parameters, train=cfg)
    log(f"GPU estimate for {counts['train']} records, {train_tokens} tokens x {estimate['epochs']} epochs: "
        f"{estimate['gpu_hours']:.4f} h, ${estimate['gpu_cost_usd']:.4f} on {cfg.gpu_name} "
        f"(MFU {cfg.gpu_mfu})")

    config = axolotl_config(cfg, base_model=base_dir, train_file=work / "data" / "train.jsonl",
                            val_file=work / "data" / "val.jsonl", output_dir=output_dir,
                            pad_token=pad_token_for(base_dir), placement=placement,
                            decoder_layer=decoder_layer_class(base_config),
                            flash_attention=placement.device == "cuda" and has_flash_attn())
    config_path = work / "axolotl.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    drop_incomplete_checkpoints(output_dir, log)
    (output_dir / HISTORY).unlink(missing_ok=True)
    runs_before = _read_runs(output_dir)
    train_start = time.perf_counter()
    resume_from = max((int(c.name.split("-")[-1]) for c in output_dir.glob("checkpoint-*")), default=0)
    if resume_from:
        log(f"qlora_model: resuming from checkpoint-{resume_from} (a run of the same identity was interrupted)")
    run_axolotl(config_path, work / "axolotl.log", log,
                processes=placement.count if cfg.distributed != "none" else 1,
                hide_gpus=placement.device == "cpu", max_steps=cfg.max_steps, start_step=resume_from,
                autocast=placement.autocast if placement.device == "cpu" else None)
    train_seconds = time.perf_counter() - train_start

    runs = _read_runs(output_dir)
    if len(runs) <= len(runs_before):
        raise RuntimeError(f"axolotl finished without recording its run in {output_dir / RUN_LOG}")
    run = runs[-1]
    history = json.loads((output_dir / HISTORY).read_text(encoding="utf-8"))
    losses = losses_table(history, train_tokens)
    train_losses = [r["loss"] for r in losses if r["split"] == "train"]
    val_losses = [r["loss"] for r in losses if r["split"] == "val"]
    tokens_seen = round(run["epoch"] * train_tokens)
    new_tokens = tokens_seen - round(_epoch_at(history, run["start_step"]) * train_tokens)
    # the trainer's own runtime of this run (evaluation included, start-up excluded)
    runtime = next((e["train_runtime"] for e in reversed(history) if "train_runtime" in e), None)

    with staged_artifact(STAGE, config={"train": cfg.model_dump(mode="json"), "axolotl": config},
                         inputs={k: v.ref() for k, v in inputs.items()}, home=home) as st:
        shutil.copy2(config_path, st.path / "axolotl.yaml")
        shutil.copy2(work / "axolotl.log", st.path / "axolotl.log")
        adapter = st.path / "adapter"
        adapter.mkdir()
        for f in output_dir.iterdir():
            if f.is_file() and f.name not in (HISTORY, RUN_LOG, "debug.log"):
                shutil.copy2(f, adapter / f.name)
        with open(st.path / "losses.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "split", "loss", "tokens"])
            writer.writeheader()
            writer.writerows(losses)
        log("merging the adapter into the base weights")
        merge_adapter(base_dir, adapter, st.path / "model", cfg.merged_dtype)
        text = modelstats.heldout_text(profile)
        stats = modelstats.measure_saved_model(st.path / "model", text, placement=placement,
                                               max_tokens=profile.eval.perplexity_tokens)
        st.metrics.update(
            train_loss_first=train_losses[0] if train_losses else None,
            train_loss_last=train_losses[-1] if train_losses else None,
            val_loss_first=val_losses[0] if val_losses else None,
            val_loss_last=val_losses[-1] if val_losses else None,
            val_loss_best=min(val_losses) if val_losses else None,
            steps=run["end_step"],
            max_steps=run["max_steps"],
            epochs=run["epoch"],
            early_stopped=run["end_step"] < run["max_steps"],
            best_checkpoint=run["best_checkpoint"],
            resumed_from_step=run["start_step"],
            tokens_seen=tokens_seen,
            token_slots_seen=max((e.get("num_input_tokens_seen") or 0 for e in history), default=0),
            tokens_per_second=new_tokens / runtime if runtime and new_tokens > 0 else None,
            train_records=counts["train"],
            val_records=counts["val"],
            train_tokens_per_epoch=train_tokens,
            train_records_too_long=too_long,
            perplexity=stats["perplexity"],
            perplexity_tokens=profile.eval.perplexity_tokens,
            base_perplexity=base.manifest.get("metrics", {}).get("perplexity"),
            parameters=stats["parameters"],
            sparsity=stats["sparsity"],
            bits_per_weight=stats["bits_per_weight"],
            bytes_on_disk=stats["bytes_on_disk"],
            generation=stats["generation"],
            gpu_estimate=estimate,
            axolotl_config=config,
            seconds=time.perf_counter() - start,
            train_seconds=train_seconds,
            peak_rss_bytes=peak_rss_bytes(),
            # the trainer's GPU peak is measured in axolotl's process (TrainerPlugin)
            compute={**device.metadata(placement),
                     "trainer_max_memory_allocated_bytes": run.get("max_memory_allocated_bytes")},
            memory_plan=plan.metadata(),
        )
    return load_artifact(st.path)


def _read_runs(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / RUN_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _epoch_at(history: list[dict[str, Any]], step: int) -> float:
    """Epoch progress when the trainer was at ``step`` (0 at the start)."""
    seen = [e.get("epoch") or 0 for e in history if (e.get("step") or 0) <= step]
    return max(seen, default=0.0)
