"""benchmark_report: lm-eval over every stage, measured against refinery's own dense baseline.

Scored: base_model, qlora_model (the baseline), pruned_model, awq_model, the GGUF of gguf_zst
(read through transformers ``gguf_file=``), recovered_model and its GGUF (the file that ships),
and, for comparison, plain Q4_0 and Q8_0 GGUFs of qlora_model made by refinery's own converter.
Every model is scored on the same items (eval_tasks picks a fixed subset), so stages are compared
item by item:

- a score's standard error is lm-eval's; where lm-eval has none (perplexity), a bootstrap over
  documents;
- retention of a stage = its score / qlora_model's score (for perplexity, lower is better:
  qlora's / the stage's), with a 95% paired-bootstrap interval: the same resampled items for both
  models, BOOTSTRAP_ITERS resamples, percentile interval.

Sizes are bytes on disk and bits per weight (8 * bytes / the dense parameter count); CPU speed is
llama.cpp's tokens/s for every GGUF. No other model's score is quoted anywhere.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refinery.artifacts import Artifact, load_artifact, staged_artifact
from refinery.config import Profile, config_hash
from refinery.eval_tasks import PreparedTask, prepare_tasks, spec, tasks_in_use

STAGE = "benchmark_report"
BASELINE = "qlora_model"
MODEL_STAGES = ("base_model", "qlora_model", "pruned_model", "awq_model", "gguf_zst", "recovered_model")
PLAIN_GGUF_TYPES = ("Q4_0", "Q8_0")
RELEASE_STAGE = "recovered_model"  # its model.gguf(.zst) is what the release ships
BOOTSTRAP_ITERS = 1000
SEED = 1234


@dataclass
class Candidate:
    """One model to score."""

    label: str  # row name in the report: a stage, or e.g. "qlora_model.Q4_0"
    stage: str  # the artifact it comes from
    version: str
    kind: str  # "hf" | "gguf"
    path: Path  # model folder or .gguf file
    note: str = ""


@dataclass
class Score:
    task: str
    metric: str
    value: float
    stderr: float | None
    stderr_method: str
    n: int
    higher_is_better: bool


@dataclass
class ModelResult:
    label: str
    stage: str
    version: str
    kind: str
    path: str
    note: str
    parameters: int
    bytes: int
    bits_per_weight: float
    scores: dict[str, Score] = field(default_factory=dict)
    tokens_per_second: float | None = None  # llama.cpp greedy generation on every core
    prompt_tokens_per_second: float | None = None  # llama.cpp prompt evaluation
    gguf_zst_bytes: int | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------- statistics


def aggregate(metric: str, values: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The task-level number from per-item values: a mean, or for perplexities
    exp(-sum(loglikelihood) / sum(words or bytes))."""
    if metric.endswith("perplexity"):
        return float(math.exp(-values.sum() / weights.sum()))
    if metric == "bits_per_byte":
        return float(-values.sum() / weights.sum() / math.log(2))
    return float(values.mean())


def standard_error(metric: str, values: np.ndarray, weights: np.ndarray | None = None,
                   iters: int = BOOTSTRAP_ITERS) -> tuple[float | None, str]:
    """(stderr, method): the sample standard error of a mean, or a bootstrap over items."""
    n = len(values)
    if n < 2:
        return None, "n<2"
    if weights is None:
        return float(values.std(ddof=1) / math.sqrt(n)), "sample std / sqrt(n)"
    rng = np.random.default_rng(SEED)
    idx = rng.integers(0, n, size=(iters, n))
    boots = [aggregate(metric, values[i], weights[i]) for i in idx]
    return float(np.std(boots, ddof=1)), f"bootstrap over {n} documents ({iters} resamples)"


def paired_retention(metric: str, higher_is_better: bool, stage: np.ndarray, baseline: np.ndarray,
                     stage_w: np.ndarray | None = None, base_w: np.ndarray | None = None,
                     iters: int = BOOTSTRAP_ITERS, level: float = 0.95) -> dict[str, Any]:
    """Retention of a stage vs the baseline on the same items, with a paired-bootstrap interval.

    ``stage[i]`` and ``baseline[i]`` are the same item. Retention = stage / baseline when higher
    is better, baseline / stage otherwise (so 1.0 means "as good" either way). Each resample draws
    item indices once and uses them for both models, which keeps the item-to-item correlation
    and gives a tighter, honest interval than two independent errors would.
    """
    n = len(stage)
    if n != len(baseline):
        raise ValueError(f"paired_retention: {n} stage items vs {len(baseline)} baseline items")

    def ratio(idx: np.ndarray | slice) -> float:
        s = aggregate(metric, stage[idx], None if stage_w is None else stage_w[idx])
        b = aggregate(metric, baseline[idx], None if base_w is None else base_w[idx])
        num, den = (s, b) if higher_is_better else (b, s)
        return num / den if den != 0 else float("nan")

    point = ratio(slice(None))
    out: dict[str, Any] = {"value": None if math.isnan(point) else point, "ci_low": None, "ci_high": None,
                           "n": n, "level": level,
                           "method": f"paired bootstrap over items ({iters} resamples, percentile interval)"}
    if math.isnan(point):
        out["note"] = "baseline score is 0: retention undefined"
        return out
    if n >= 2:
        rng = np.random.default_rng(SEED)
        boots = np.array([ratio(rng.integers(0, n, size=n)) for _ in range(iters)])
        boots = boots[np.isfinite(boots)]
        if boots.size:
            alpha = (1 - level) / 2
            out["ci_low"], out["ci_high"] = (float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha)))
    return out


# --------------------------------------------------------------------------- per-item values from lm-eval


@dataclass
class Items:
    """Per-item values of one task's headline metric, keyed by item (for pairing)."""

    keys: list[str]
    values: np.ndarray
    weights: np.ndarray | None  # words/bytes of each document for perplexities


def items_from_samples(samples: dict[str, list[dict[str, Any]]], metric_key: str) -> Items:
    metric, _, filter_name = metric_key.partition(",")
    keys, values, weights = [], [], []
    for task_name in sorted(samples):
        for s in samples[task_name]:
            if s.get("filter", "none") != filter_name or metric not in s:
                continue
            doc = s.get("doc") or {}
            keys.append(str(doc.get("key", f"{task_name}/{s['doc_id']}")))
            v = s[metric]
            if isinstance(v, (list, tuple)):  # (loglikelihood, words or bytes)
                values.append(float(v[0]))
                weights.append(float(v[1]))
            else:
                values.append(float(v))
    return Items(keys, np.array(values, dtype=float), np.array(weights, dtype=float) if weights else None)


def paired(a: Items, b: Items) -> tuple[Items, Items]:
    """The items both have, in the same order."""
    common = sorted(set(a.keys) & set(b.keys))

    def take(x: Items) -> Items:
        pos = {k: i for i, k in enumerate(x.keys)}
        idx = np.array([pos[k] for k in common], dtype=int)
        return Items(common, x.values[idx], None if x.weights is None else x.weights[idx])

    return take(a), take(b)


# --------------------------------------------------------------------------- models


def load_for_eval(cand: Candidate) -> tuple[Any, Any]:
    """(model, tokenizer) on CPU in float32: compressed-tensors decompressed (modelstats), GGUF
    weights dequantized by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.modelstats import load_model

    if cand.kind == "gguf":
        # The tokenizer is refinery's own GGUF reader (base_model.tokenizer_from_gguf): transformers'
        # gets eos and the digit splitting wrong, so it would not tokenize like llama.cpp does.
        from refinery.base_model import tokenizer_from_gguf

        tok = tokenizer_from_gguf(cand.path)
        model = AutoModelForCausalLM.from_pretrained(str(cand.path.parent), gguf_file=cand.path.name,
                                                     dtype=torch.float32)
        model.eval()
        return model, tok
    return load_model(cand.path), AutoTokenizer.from_pretrained(cand.path)


def task_manager(profile: Profile, task_dir: Path):
    """lm-eval's TaskManager over the generated YAMLs. Offline it skips indexing lm-eval's own
    thousands of task files (about 14 s on a busy 2-core machine), which it would never use."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir), include_defaults=not profile.eval.offline)


def _leaf_tasks(name: str, groups: dict[str, list[str]]) -> list[str]:
    """The tasks under an lm-eval group (groups nest: mmlu -> mmlu_stem -> mmlu_anatomy)."""
    if name not in groups:
        return [name]
    return [leaf for child in groups[name] for leaf in _leaf_tasks(child, groups)]


def _collect_env_info_once() -> None:
    """lm-eval adds torch's environment report to every simple_evaluate result, running
    subprocesses for it (~3 s each call, 9+ calls per report); it cannot change within one
    process, so it is collected once and copied into every result."""
    import lm_eval.evaluator as evaluator

    if getattr(evaluator.add_env_info, "refinery_cached", False):
        return
    original, first = evaluator.add_env_info, {}

    def add_env_info(storage: dict[str, Any]) -> None:
        if not first:
            original(first)
        storage.update(first)

    add_env_info.refinery_cached = True  # type: ignore[attr-defined]
    evaluator.add_env_info = add_env_info


def score_candidate(cand: Candidate, tasks: list[PreparedTask], manager: Any, profile: Profile,
                    out_dir: Path, log: Callable[[str], Any] = print) -> tuple[ModelResult, dict[str, Items]]:
    """Run lm-eval on one model for every task; write its raw results under ``out_dir``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from refinery.modelstats import dir_bytes

    _collect_env_info_once()
    start = time.perf_counter()
    model, tok = load_for_eval(cand)
    parameters = sum(p.numel() for p in model.parameters())
    if cand.kind == "gguf":
        size = weight_bytes = cand.path.stat().st_size
    else:  # bits per weight from the tensor files only, not the tokenizer and configs beside them
        size = dir_bytes(cand.path)
        weight_bytes = sum(p.stat().st_size for p in cand.path.glob("*.safetensors"))
    result = ModelResult(cand.label, cand.stage, cand.version, cand.kind, str(cand.path), cand.note,
                         parameters, size, 8 * weight_bytes / parameters)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=profile.eval.batch_size,
              max_length=profile.eval.max_length)
    items: dict[str, Items] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    # One simple_evaluate per (limit, num_fewshot): offline that is one call for all tasks (each
    # call also collects environment info, several seconds).
    groups: dict[tuple, list[PreparedTask]] = {}
    for task in tasks:
        groups.setdefault((task.limit, task.num_fewshot), []).append(task)
    for i, ((limit, shots), group) in enumerate(groups.items()):
        log(f"[{cand.label}] lm-eval {', '.join(t.lm_eval_task for t in group)}")
        res = simple_evaluate(model=lm, tasks=[t.lm_eval_task for t in group], task_manager=manager, limit=limit,
                              num_fewshot=shots, log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS,
                              random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED,
                              fewshot_random_seed=SEED)
        samples = res.pop("samples")
        name = "results.json" if len(groups) == 1 else f"results.{i}.json"
        (out_dir / name).write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
        for task in group:
            s = spec(task.name)
            own = {k: samples[k] for k in _leaf_tasks(task.lm_eval_task, res.get("group_subtasks", {}))
                   if k in samples}
            it = items_from_samples(own, task.metric)
            if not it.keys:
                raise RuntimeError(f"lm-eval returned no per-item {task.metric} for {task.lm_eval_task} ({cand.label})")
            items[task.name] = it
            reported = res["results"].get(task.lm_eval_task, {})
            value = reported.get(task.metric)
            stderr = reported.get(task.metric.replace(",", "_stderr,", 1))
            method = "lm-eval"
            if not isinstance(value, (int, float)):
                value = aggregate(s.metric_name, it.values, it.weights)
                method = "refinery"
            if not isinstance(stderr, (int, float)) or math.isnan(stderr):
                stderr, method = standard_error(s.metric_name, it.values, it.weights)
            result.scores[task.name] = Score(task.name, task.metric, float(value), stderr, method, len(it.keys),
                                             s.higher_is_better)
    del lm, model
    gc.collect()
    result.seconds = round(time.perf_counter() - start, 2)
    return result, items


# --------------------------------------------------------------------------- the stage


def _model_dir(art: Artifact) -> Path:
    path = art.path / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{art.stage} {art.version}: no Hugging Face folder at {path}")
    return path


def _gguf_file(art: Artifact) -> Path:
    path = art.path / "model.gguf"
    if not path.exists():
        raise FileNotFoundError(f"{art.stage} {art.version}: no model.gguf at {path}")
    return path


def candidates(inputs: dict[str, Artifact], work_dir: Path, profile: Profile,
               log: Callable[[str], Any] = print) -> list[Candidate]:
    """Every model the report scores, the plain-quantization baselines included."""
    missing = [s for s in MODEL_STAGES if s not in inputs]
    if missing:
        raise ValueError(f"benchmark_report needs the inputs {list(MODEL_STAGES)}; missing {missing}")
    out = []
    for stage in MODEL_STAGES:
        art = inputs[stage]
        if stage == "gguf_zst":
            out.append(Candidate(stage, stage, art.version, "gguf", _gguf_file(art), "GGUF of awq_model"))
            continue
        out.append(Candidate(stage, stage, art.version, "hf", _model_dir(art)))
        if stage == RELEASE_STAGE:
            out.append(Candidate(f"{stage}.gguf", stage, art.version, "gguf", _gguf_file(art),
                                 "the GGUF the release ships"))
    from refinery.gguf_export import convert_to_gguf

    qlora = inputs[BASELINE]
    for gguf_type in PLAIN_GGUF_TYPES:
        path = work_dir / f"{BASELINE}.{qlora.version}.{gguf_type}.gguf"
        if not path.exists():  # keyed by the baseline's version: reused on a rerun (written atomically)
            log(f"plain {gguf_type} GGUF of {BASELINE} (refinery.gguf_export)")
            convert_to_gguf(_model_dir(qlora), path, gguf_type,
                            metadata={"general.name": f"{BASELINE} {gguf_type} (plain)", "source_version": qlora.version})
        out.append(Candidate(f"{BASELINE}.{gguf_type}", BASELINE, qlora.version, "gguf", path,
                             f"plain {gguf_type} of {BASELINE}, no pruning/AWQ/recovery"))
    return out


def _find_deduped(inputs: dict[str, Artifact]) -> Artifact | None:
    """deduped_corpus given directly, else the one qlora_model says it was trained on (lineage)."""
    if "deduped_corpus" in inputs:
        return inputs["deduped_corpus"]
    for ref in inputs[BASELINE].manifest.get("inputs", {}).values():
        if isinstance(ref, dict) and ref.get("stage") == "deduped_corpus" and Path(ref.get("path", "")).exists():
            return load_artifact(Path(ref["path"]))
    return None


def decontamination_summary(profile: Profile, inputs: dict[str, Artifact], heldout: Path | None,
                            max_listed: int = 50) -> dict[str, Any]:
    """What the decontamination removed from the training corpus, and what is still in it."""
    import pyarrow.parquet as pq

    from refinery.decontam import eval_texts_for, find_contaminated

    deduped = _find_deduped(inputs)
    if deduped is None:
        return {"checked": False, "passed": False,
                "note": "no deduped_corpus input, and qlora_model records none: cannot check"}
    removed: list[dict[str, Any]] = []
    rejected = deduped.path / "rejected.parquet"
    if rejected.exists():
        table = pq.read_table(rejected)
        if "reason" in table.column_names:
            for row in table.to_pylist():
                if row.get("reason") == "contaminated":
                    removed.append({"id": row.get("id"), "detail": row.get("detail")})
    kept = pq.read_table(deduped.path / "kept.parquet", columns=["id", "messages"])
    texts = eval_texts_for(profile, heldout)
    remaining = find_contaminated(kept, texts, profile.decontam.ngram)
    return {"checked": True, "passed": not remaining, "ngram": profile.decontam.ngram,
            "action": profile.decontam.action, "deduped_corpus": deduped.version,
            "eval_sets": {k: len(v) for k, v in texts.items()}, "kept_records": kept.num_rows,
            "removed": len(removed), "removed_examples": removed[:max_listed],
            "remaining": len(remaining),
            "remaining_examples": [{"id": k, "detail": v} for k, v in list(remaining.items())[:max_listed]]}


def release_candidate(inputs: dict[str, Artifact], profile: Profile) -> dict[str, Any]:
    """The files the release would ship, and whether llama.cpp loads and runs the GGUF."""
    from refinery.llamacpp import loads_and_generates

    art = inputs[RELEASE_STAGE]
    gguf, zst = art.path / "model.gguf", art.path / "model.gguf.zst"
    files = art.manifest.get("files", {})
    try:  # a child process: a crash in native code is a finding of the report, not a crash of it
        loads, sample = loads_and_generates(gguf)
    except Exception as exc:
        loads, sample = False, f"{type(exc).__name__}: {exc}"
    return {"stage": RELEASE_STAGE, "version": art.version, "artifact": str(art.path),
            "gguf": str(gguf), "gguf_zst": str(zst),
            "gguf_sha256": files.get("model.gguf", {}).get("sha256"),
            "gguf_zst_sha256": files.get("model.gguf.zst", {}).get("sha256"),
            "gguf_zst_bytes": zst.stat().st_size if zst.exists() else None,
            "llama_cpp_loads": loads, "llama_cpp_sample": sample if loads else "",
            "llama_cpp_error": "" if loads else sample, "max_bytes": profile.release.max_bytes}


def build(profile: Profile, *, inputs: dict[str, Artifact], home: Path, log: Callable[[str], Any] = print) -> Artifact:
    """Score every stage with lm-eval and publish the benchmark_report artifact."""
    from refinery import humaneval_exec, report
    from refinery.llamacpp import tokens_per_second

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    heldout = None
    if "raw_corpus" in inputs and (inputs["raw_corpus"].path / "heldout.jsonl").exists():
        heldout = inputs["raw_corpus"].path / "heldout.jsonl"
    key = config_hash(profile.eval)
    work = home / "work" / STAGE / key
    work.mkdir(parents=True, exist_ok=True)
    use = tasks_in_use(profile)
    if not use:
        raise ValueError(f"{profile.source_file}: eval.tasks has nothing to score (HumanEval alone needs "
                         "eval.humaneval_execute: true)")
    if "demo_heldout" in use and heldout is None:
        raise FileNotFoundError("profile.eval.tasks has demo_heldout, but raw_corpus has no heldout.jsonl "
                                "(the demo source writes it); remove the task or ingest the demo corpus")
    config = {"eval": profile.eval.model_dump(), "decontam": profile.decontam.model_dump(),
              "release": profile.release.model_dump(), "profile": profile.name}
    refs = {name: art.ref() for name, art in inputs.items()}

    with staged_artifact(STAGE, config=config, inputs=refs, home=home) as st:
        task_dir = st.path / "tasks"
        prepared = prepare_tasks(profile, task_dir, heldout)
        manager = task_manager(profile, task_dir)
        cands = candidates(inputs, work, profile, log)
        results: list[ModelResult] = []
        per_item: dict[str, dict[str, Items]] = {}
        for cand in cands:
            res, items = score_candidate(cand, prepared, manager, profile, st.path / "lm_eval" / cand.label, log)
            if cand.kind == "gguf":
                log(f"[{cand.label}] llama.cpp speed")
                speed = tokens_per_second(cand.path, profile.eval.speed_tokens, os.cpu_count() or 1)
                res.tokens_per_second = speed["generation_tokens_per_second"]
                res.prompt_tokens_per_second = speed["prompt_tokens_per_second"]
                zst = cand.path.parent / (cand.path.name + ".zst")
                res.gguf_zst_bytes = zst.stat().st_size if zst.exists() else None
            results.append(res)
            per_item[cand.label] = items
        _write_items(st.path / "items.jsonl", per_item)

        retention: dict[str, dict[str, Any]] = {}
        for res in results:
            if res.label == BASELINE:
                continue
            retention[res.label] = {}
            for task in prepared:
                s = spec(task.name)
                a, b = paired(per_item[res.label][task.name], per_item[BASELINE][task.name])
                retention[res.label][task.name] = paired_retention(
                    s.metric_name, s.higher_is_better, a.values, b.values, a.weights, b.weights)

        he = profile.eval.tasks.get("humaneval")
        doc = {
            "run_id": st.version, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "profile": profile.name, "baseline": BASELINE,
            "tasks": {t.name: {"lm_eval_task": t.lm_eval_task, "metric": t.metric,
                               "higher_is_better": spec(t.name).higher_is_better, "items": t.items,
                               "num_fewshot": use[t.name].num_fewshot,
                               "min_retention": use[t.name].min_retention} for t in prepared},
            "models": [_result_dict(r) for r in results],
            "retention": retention,
            "retention_method": "paired bootstrap over items, 95% percentile interval; "
                                "retention = stage/qlora_model (perplexity: qlora_model/stage)",
            "humaneval": {"requested": he is not None, "executed": he is not None and profile.eval.humaneval_execute,
                          "sandbox": humaneval_exec.sandbox_description() if he is not None
                          and profile.eval.humaneval_execute else None},
            "decontamination": decontamination_summary(profile, inputs, heldout),
            "release_candidate": release_candidate(inputs, profile),
        }
        report.write_report_files(doc, st.path)
        st.metrics.update(report.summary_metrics(doc))
    return load_artifact(st.path)


def _result_dict(r: ModelResult) -> dict[str, Any]:
    d = asdict(r)
    d["scores"] = {k: asdict(v) for k, v in r.scores.items()}
    return d


def _write_items(path: Path, per_item: dict[str, dict[str, Items]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for label, tasks in per_item.items():
            for task, it in tasks.items():
                for i, key in enumerate(it.keys):
                    row = {"model": label, "task": task, "key": key, "value": float(it.values[i])}
                    if it.weights is not None:
                        row["weight"] = float(it.weights[i])
                    f.write(json.dumps(row) + "\n")


def load_report(artifact_path: Path) -> dict[str, Any]:
    return json.loads((Path(artifact_path) / "report.json").read_text(encoding="utf-8"))

