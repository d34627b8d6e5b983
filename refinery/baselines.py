"""quant_baselines: what a user would do instead of refinery's chain, made the way they would make it.

llama.cpp's own quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) on an F16 GGUF of
qlora_model written by refinery's converter: every type in ``baselines.types`` with llama.cpp's
defaults, and every type in ``baselines.imatrix_types`` again with an importance matrix computed
from the same English calibration records AWQ uses (``llama-imatrix``'s statistic: the mean squared
input activation of every column of every decoder matrix). Each file's zstd size is measured at the
release's level, so the release gate compares like with like. The F16 GGUF is kept too: it is the
dense reference the benchmark scores every candidate against.

Where a model's rows do not fit a type's block (SmolLM2's 576 columns are not a multiple of 256),
llama.cpp falls back to another type per tensor; the tensor types actually written are recorded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refinery.artifacts import Artifact, load_artifact, staged_artifact
from refinery.calibration import calibration_dataset
from refinery.config import Profile
from refinery.modelstats import ConfigError

STAGE = "quant_baselines"
REFERENCE = "qlora_model.F16.gguf"


def baseline_file(ftype: str, imatrix: bool) -> str:
    return f"qlora_model.{ftype}{'.imatrix' if imatrix else ''}.gguf"


def collect_imatrix(model_dir: Path, samples: list[list[int]], log: Callable[[str], Any] = print) -> dict[str, Any]:
    """GGUF tensor name -> mean of x^2 per input column over ``samples`` (token id lists), for
    every Linear of the decoder layers: the importance matrix llama.cpp's quantizer takes."""
    import gguf
    import numpy as np
    import torch

    from refinery.modelstats import load_model

    model = load_model(model_dir)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in name:
            continue
        tensor = name_map.get_name(name + ".weight", try_suffixes=(".weight",))
        if tensor is None:
            raise ConfigError(f"imatrix: {name} has no llama.cpp tensor name")

        def hook(_module: Any, args: tuple, tensor: str = tensor) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[tensor] = sums.get(tensor, 0) + (x * x).sum(0)
            counts[tensor] = counts.get(tensor, 0) + x.shape[0]

        hooks.append(module.register_forward_pre_hook(hook))
    start = time.perf_counter()
    with torch.no_grad():
        for ids in samples:
            model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    log(f"{STAGE}: importance matrix of {len(sums)} tensors from {sum(map(len, samples))} tokens "
        f"in {time.perf_counter() - start:.1f} s")
    return {k: (sums[k] / counts[k]).numpy().astype(np.float32) for k in sorted(sums)}


def build(profile: Profile, *, inputs: dict[str, Artifact], home: Path, log: Callable[[str], Any] = print) -> Artifact:
    import numpy as np
    from transformers import AutoTokenizer

    from refinery import llamacpp
    from refinery.gguf_export import convert_to_gguf, gguf_summary, zstd_size

    cfg = profile.baselines
    for name in ("qlora_model", "deduped_corpus"):
        if name not in inputs:
            raise ConfigError(f"{STAGE}: missing input artifact {name!r} (got {sorted(inputs)})")
    llamacpp.require()
    model_dir = inputs["qlora_model"].path / "model"
    level = profile.gguf.zstd_level
    config = {"baselines": cfg.model_dump(mode="json"), "zstd_level": level}
    start = time.perf_counter()
    with staged_artifact(STAGE, config=config, inputs={k: v.ref() for k, v in inputs.items()}, home=home) as st:
        reference = st.path / REFERENCE
        convert_to_gguf(model_dir, reference, "F16", metadata={"source_stage": "qlora_model",
                                                                  "source_version": inputs["qlora_model"].version})
        imatrix = None
        calib: dict[str, Any] = {}
        if cfg.imatrix_types:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            dataset, calib = calibration_dataset(
                inputs["deduped_corpus"].path / "kept.parquet", tokenizer, samples=cfg.imatrix_samples,
                seq_len=cfg.imatrix_seq_len, english_label=profile.langid.english_label,
                key="baselines.imatrix_samples")
            imatrix = collect_imatrix(model_dir, dataset["input_ids"], log)
            np.savez(st.path / "imatrix.npz", **imatrix)
        rows = []
        for ftype, use_imatrix in [(t, False) for t in cfg.types] + [(t, True) for t in cfg.imatrix_types]:
            out = st.path / baseline_file(ftype, use_imatrix)
            t0 = time.perf_counter()
            note = llamacpp.quantize(reference, out, ftype, imatrix=imatrix if use_imatrix else None)
            summary = gguf_summary(out, count_zeros=False)
            rows.append({"label": f"qlora_model.{ftype}" + ("+imatrix" if use_imatrix else ""),
                         "file": out.name, "ftype": ftype, "imatrix": use_imatrix,
                         "bytes": summary["bytes"], "bits_per_weight": summary["bits_per_weight"],
                         "zst_bytes": zstd_size(out, level), "tensor_types": summary["tensor_types"],
                         "fallback_tensors": note["fallback_tensors"], "seconds": round(time.perf_counter() - t0, 2)})
            log(f"{STAGE}: {rows[-1]['label']}: {summary['bytes']:,} bytes, {rows[-1]['zst_bytes']:,} packed, "
                f"{note['fallback_tensors']} tensors fell back to another type")
        (st.path / "baselines.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
        (st.path / "calibration.json").write_text(json.dumps(calib, indent=2), encoding="utf-8")
        st.metrics.update(baselines=rows, reference=REFERENCE, reference_bytes=reference.stat().st_size,
                          imatrix_tokens=calib.get("tokens"), seconds=round(time.perf_counter() - start, 2))
    return load_artifact(st.path)


def load_baselines(artifact: Artifact) -> list[dict[str, Any]]:
    """The baselines an artifact of this stage holds (label, file, bytes, zst_bytes, ...)."""
    return json.loads((artifact.path / "baselines.json").read_text(encoding="utf-8"))
