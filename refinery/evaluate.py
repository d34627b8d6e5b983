"""benchmark_report: what the chain made, measured on the files that ship, against the dense model and
against what a user would do instead.

Every candidate is a GGUF scored through llama.cpp, the way its users run it:

- the dense reference: qlora_model as an F16 GGUF (quant_baselines writes it);
- the chain: gguf_zst (awq_model exported with its 4-bit grid) and recovered_model, whose
  model.gguf(.zst) is what the release ships;
- the plain baselines: llama.cpp's own quantizer on qlora_model (quant_baselines).

**Fidelity** (refinery.fidelity) is measured for every candidate on one held-out token set (WikiText-2
and the demo's held-out conversations): perplexity, mean and 99th-percentile KL divergence from the
reference's distributions, top-1 agreement, each with a 95% bootstrap interval over chunks. These
are the gate's primary metrics: they see damage on any model, where accuracy at chance level
cannot.

**Tasks** (lm-eval on refinery.lm_llamacpp) are scored for ``eval.task_models`` (the base model, the
dense baseline, the release candidate): demo_heldout as the model was trained (chat template,
answer prefix, exact match on the computed answer), MMLU and the rest as configured. Every score
has its standard error; retention vs qlora_model and fine-tuning's effect (qlora_model vs
base_model) have paired-bootstrap intervals over the same items. A task whose baseline is not
above chance by its interval carries no retention gate, and the report says so.

The Hugging Face stages in between (pruned_model, awq_model) keep the scores their own stages
measured (manifests), shown as the lineage. Every result is cached in the work directory by the
file's checksum, the token set and the reference: no model is scored twice for the same question.
The gate thresholds in force are recorded in the report; the release reads them from there.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refinery import fidelity
from refinery.artifacts import Artifact, load_artifact, sha256_file, staged_artifact
from refinery.config import Profile
from refinery.eval_tasks import EvalDataError, PreparedTask, prepare_tasks, spec, tasks_in_use
from refinery.modelstats import ConfigError
from refinery.progress import Progress
from refinery.stages import BASELINE, SHIPPED, STAGES, model_stages

STAGE = "benchmark_report"
BOOTSTRAP_ITERS = 1000
SEED = 1234
CHAIN = tuple(s.name for s in STAGES if s.produces == "gguf")  # the chain's GGUFs, in order
LINEAGE = tuple(s.name for s in model_stages())  # every model the chain made


@dataclass
class Candidate:
    """One GGUF to score."""

    label: str  # row name in the report: a stage, or e.g. "qlora_model.Q4_0+imatrix"
    stage: str  # the artifact it comes from
    version: str
    role: str  # "reference" | "chain" | "baseline" | "base"
    path: Path
    sha256: str
    zst_bytes: int | None
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


def _percentiles(boots: np.ndarray, level: float) -> tuple[float | None, float | None]:
    boots = boots[np.isfinite(boots)]
    if not boots.size:
        return None, None
    alpha = (1 - level) / 2
    return float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))


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
        out["ci_low"], out["ci_high"] = _percentiles(
            np.array([ratio(rng.integers(0, n, size=n)) for _ in range(iters)]), level)
    return out


def paired_difference(metric: str, after: np.ndarray, before: np.ndarray, after_w: np.ndarray | None = None,
                      before_w: np.ndarray | None = None, iters: int = BOOTSTRAP_ITERS,
                      level: float = 0.95) -> dict[str, Any]:
    """after - before on the same items, with a paired-bootstrap interval (fine-tuning's effect)."""
    n = len(after)

    def diff(idx: np.ndarray | slice) -> float:
        return (aggregate(metric, after[idx], None if after_w is None else after_w[idx])
                - aggregate(metric, before[idx], None if before_w is None else before_w[idx]))

    rng = np.random.default_rng(SEED)
    low, high = _percentiles(np.array([diff(rng.integers(0, n, size=n)) for _ in range(iters)]), level) \
        if n >= 2 else (None, None)
    return {"value": diff(slice(None)), "ci_low": low, "ci_high": high, "n": n, "level": level,
            "method": f"paired bootstrap over items ({iters} resamples, percentile interval)"}


def mean_interval(values: np.ndarray, iters: int = BOOTSTRAP_ITERS, level: float = 0.95) -> tuple[float | None, float | None]:
    """Bootstrap interval of a mean (a task score's, to compare it with chance)."""
    if len(values) < 2:
        return None, None
    rng = np.random.default_rng(SEED)
    return _percentiles(np.array([values[rng.integers(0, len(values), len(values))].mean()
                                  for _ in range(iters)]), level)


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


# --------------------------------------------------------------------------- candidates


def _file_sha(art: Artifact, rel: str) -> str:
    meta = art.manifest.get("files", {}).get(rel)
    return meta["sha256"] if meta else sha256_file(art.path / rel)


def _chain_candidate(art: Artifact, label: str, note: str) -> Candidate:
    gguf, zst = art.path / "model.gguf", art.path / "model.gguf.zst"
    if not gguf.is_file():
        raise FileNotFoundError(f"{art.stage} {art.version}: no model.gguf at {gguf}")
    return Candidate(label, art.stage, art.version, "chain", gguf, _file_sha(art, "model.gguf"),
                     zst.stat().st_size if zst.is_file() else None, note)


def base_gguf(base: Artifact, work: Path, log: Callable[[str], Any]) -> Candidate:
    """base_model as a GGUF for its task scores: the published GGUF it was converted from when
    there is one (the embedded SmolLM2, Q4_1: the model as its authors ship it, no conversion),
    else an F16 GGUF made once per base version in the work directory."""
    from refinery.base_model import published_gguf
    from refinery.gguf_export import convert_to_gguf

    published = published_gguf(base)
    if published is not None:
        return Candidate("base_model", "base_model", base.version, "base", published,
                         base.manifest["metrics"]["source"]["sha256"], None,
                         f"the model before fine-tuning, as published ({published.name})")
    path = work / f"base_model.{base.version}.F16.gguf"
    if not path.exists():
        log(f"{STAGE}: base_model as an F16 GGUF for its task scores")
        convert_to_gguf(base.path / "model", path, "F16", metadata={"source_stage": "base_model",
                                                                   "source_version": base.version})
    return Candidate("base_model", "base_model", base.version, "base", path, f"base-{base.version}", None,
                     "the model before fine-tuning, F16")


def candidates(inputs: dict[str, Artifact], work: Path, profile: Profile,
               log: Callable[[str], Any] = print) -> list[Candidate]:
    """Every GGUF the report scores: the reference, the chain, the plain baselines (and the base
    model when its tasks are scored)."""
    from refinery.baselines import REFERENCE, load_baselines
    from refinery.gguf_export import zstd_size

    missing = [s for s in ("quant_baselines", *CHAIN) if s not in inputs]
    if missing:
        raise ValueError(f"{STAGE} needs the inputs {missing}")
    qb = inputs["quant_baselines"]
    out = [Candidate(BASELINE, BASELINE, inputs[BASELINE].version if BASELINE in inputs else qb.version,
                     "reference", qb.path / REFERENCE, _file_sha(qb, REFERENCE),
                     zstd_size(qb.path / REFERENCE, profile.gguf.zstd_level), "dense reference, F16 GGUF")]
    for name in CHAIN:
        out.append(_chain_candidate(inputs[name], name, "the GGUF the release ships" if name == SHIPPED
                                    else f"{name}'s GGUF"))
    for row in load_baselines(qb):
        out.append(Candidate(row["label"], "quant_baselines", qb.version, "baseline", qb.path / row["file"],
                             _file_sha(qb, row["file"]), row["zst_bytes"],
                             f"llama.cpp {row['ftype']}" + (" with an importance matrix" if row["imatrix"] else "")))
    if "base_model" in profile.eval.task_models and "base_model" in inputs:
        out.append(base_gguf(inputs["base_model"], work, log))
    return out


# --------------------------------------------------------------------------- fidelity


def heldout_conversations(heldout: Path | None, tokenizer: Any) -> list[str]:
    """The demo's held-out tasks as chat-formatted conversations (prompt and reference response)."""
    if heldout is None:
        return []
    out = []
    with open(heldout, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                d = json.loads(line)
                if not isinstance(d.get("response"), str) or not isinstance(d.get("prompt"), str):
                    raise EvalDataError(f"{heldout}:{number}: field 'response' (or 'prompt') missing or not text")
                out.append(tokenizer.apply_chat_template(
                    [{"role": "user", "content": d["prompt"]}, {"role": "assistant", "content": d["response"]}],
                    tokenize=False))
    return out


def token_set(reference: Path, profile: Profile, heldout: Path | None) -> fidelity.TokenSet:
    """The held-out tokens every candidate is scored on, tokenized as llama.cpp does."""
    from refinery import llamacpp
    from refinery.base_model import tokenizer_from_gguf
    from refinery.modelstats import heldout_text

    cfg = profile.eval.fidelity
    if cfg.conversation_chunks and heldout is None:
        raise ConfigError("eval.fidelity.conversation_chunks: the held-out conversations come from the demo "
                          "corpus (raw_corpus heldout.jsonl), which this profile does not ingest; set it to 0")
    conversations = heldout_conversations(heldout, tokenizer_from_gguf(reference))
    with llamacpp.loaded(reference, n_ctx=64) as llm:
        def tokenize(text: str) -> list[int]:
            return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

        return fidelity.build_token_set(tokenize, heldout_text(profile), conversations, chunk=cfg.chunk,
                                        wikitext_chunks=cfg.wikitext_chunks,
                                        conversation_chunks=cfg.conversation_chunks)


def fidelity_scores(cands: list[Candidate], tokens: fidelity.TokenSet, work: Path, profile: Profile,
                    log: Callable[[str], Any]) -> dict[str, dict[str, Any]]:
    """label -> fidelity summary for every candidate except the base model (cached per file)."""
    from refinery import llamacpp

    cfg = profile.eval.fidelity
    ref = next(c for c in cands if c.role == "reference")
    cache = work / "fidelity"
    cache.mkdir(parents=True, exist_ok=True)
    ref_logprobs = fidelity.reference_path(cache, ref.sha256, tokens)
    ref_stats = cache / f"{ref.sha256[:16]}-{tokens.digest}.reference.npz"
    if not (ref_logprobs.exists() and ref_stats.exists()):
        progress = Progress(f"fidelity: {ref.label} (reference) chunks", len(tokens.chunks), log)
        with llamacpp.chunk_logits(ref.path, cfg.chunk, cfg.n_threads) as logits:
            stats = fidelity.write_reference(logits, tokens, ref_logprobs, lambda i, n: progress.update(i))
        fidelity.save_stats(stats, ref_stats)
    out = {ref.label: fidelity.summarize(fidelity.load_stats(ref_stats), tokens.sources)}
    scored = [c for c in cands if c.role in ("chain", "baseline")]
    for k, cand in enumerate(scored, 1):
        path = cache / f"{cand.sha256[:16]}-{tokens.digest}-{ref.sha256[:12]}.npz"
        if not path.exists():
            start = time.perf_counter()
            progress = Progress(f"fidelity {k}/{len(scored)}: {cand.label} chunks", len(tokens.chunks), log)
            with llamacpp.chunk_logits(cand.path, cfg.chunk, cfg.n_threads) as logits:
                stats = fidelity.score(logits, tokens, ref_logprobs, lambda i, n: progress.update(i))
            stats["seconds"] = np.array(time.perf_counter() - start)
            fidelity.save_stats(stats, path)
        stats = fidelity.load_stats(path)
        out[cand.label] = fidelity.summarize(stats, tokens.sources)
        out[cand.label]["seconds"] = float(stats.get("seconds", np.nan))
        log(f"fidelity: {cand.label}: KLD {out[cand.label]['kld_mean']['value']:.4f} "
            f"[{out[cand.label]['kld_mean']['ci_low']:.4f}, {out[cand.label]['kld_mean']['ci_high']:.4f}], "
            f"top-1 {out[cand.label]['top1_agreement']['value']:.3f}, ppl {out[cand.label]['perplexity']['value']:.2f}")
    return out


# --------------------------------------------------------------------------- tasks


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
    subprocesses for it (~3 s each call); it cannot change within one process, so it is collected
    once and copied into every result."""
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


def score_tasks(cand: Candidate, tasks: list[PreparedTask], manager: Any, profile: Profile, work: Path,
                out_dir: Path, log: Callable[[str], Any]) -> tuple[dict[str, Score], dict[str, Items]]:
    """lm-eval on one GGUF (llama.cpp) for every task; answers cached per file in ``work``."""
    from lm_eval import simple_evaluate

    from refinery.lm_llamacpp import LlamaCppLM

    _collect_env_info_once()
    counter: dict[str, Progress] = {}

    def progress(done: int, total: int, what: str) -> None:
        if what not in counter or counter[what].total != total:
            counter[what] = Progress(f"tasks: {cand.label} {what} requests", total, log)
        counter[what].update(done)

    lm = LlamaCppLM(cand.path, max_length=profile.eval.max_length or 2048, n_threads=profile.eval.fidelity.n_threads,
                    progress=progress)
    scores: dict[str, Score] = {}
    items: dict[str, Items] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    (work / "answers").mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list[PreparedTask]] = {}
    for task in tasks:  # one simple_evaluate per (limit, shots, chat template or not)
        groups.setdefault((task.limit, task.num_fewshot, spec(task.name).chat), []).append(task)
    try:
        for i, ((limit, shots, chat), group) in enumerate(groups.items()):
            log(f"tasks: {cand.label}: lm-eval {', '.join(t.lm_eval_task for t in group)}")
            res = simple_evaluate(model=lm, tasks=[t.lm_eval_task for t in group], task_manager=manager, limit=limit,
                                  num_fewshot=shots, apply_chat_template=chat, log_samples=True,
                                  use_cache=str(work / "answers" / cand.sha256[:16]),
                                  bootstrap_iters=BOOTSTRAP_ITERS, random_seed=SEED, numpy_random_seed=SEED,
                                  torch_random_seed=SEED, fewshot_random_seed=SEED)
            samples = res.pop("samples")
            (out_dir / f"results.{i}.json").write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
            for task in group:
                s = spec(task.name)
                own = {k: samples[k] for k in _leaf_tasks(task.lm_eval_task, res.get("group_subtasks", {}))
                       if k in samples}
                it = items_from_samples(own, task.metric)
                if not it.keys:
                    raise RuntimeError(f"lm-eval returned no per-item {task.metric} for {task.lm_eval_task} "
                                       f"({cand.label})")
                items[task.name] = it
                value = aggregate(s.metric_name, it.values, it.weights)
                stderr, method = standard_error(s.metric_name, it.values, it.weights)
                scores[task.name] = Score(task.name, task.metric, value, stderr, method, len(it.keys),
                                          s.higher_is_better)
    finally:
        lm.close()
        gc.collect()
    return scores, items


def task_gates(prepared: list[PreparedTask], use: dict[str, Any], per_item: dict[str, dict[str, Items]]) -> dict[str, Any]:
    """Per task: its chance level, whether the dense baseline is above it (interval), and so
    whether its min_retention gates the release."""
    out = {}
    for task in prepared:
        s = spec(task.name)
        info: dict[str, Any] = {"lm_eval_task": task.lm_eval_task, "metric": task.metric,
                                "higher_is_better": s.higher_is_better, "items": task.items,
                                "num_fewshot": use[task.name].num_fewshot, "chance": s.chance,
                                "min_retention": use[task.name].min_retention}
        base = per_item.get(BASELINE, {}).get(task.name)
        low, _ = mean_interval(base.values) if base is not None and base.weights is None else (None, None)
        info["baseline_ci_low"] = low
        info["above_chance"] = bool(low is not None and low > s.chance) if s.higher_is_better else True
        info["gated"] = info["min_retention"] is not None and info["above_chance"]
        if info["min_retention"] is not None and not info["above_chance"]:
            info["why_not_gated"] = (f"{BASELINE} does not score above chance ({s.chance:g}) by its interval "
                                     f"(lower bound {low if low is None else round(low, 3)}): retention of a "
                                     "chance-level score says nothing")
        out[task.name] = info
    return out


# --------------------------------------------------------------------------- Pareto


def pareto(models: list[dict[str, Any]]) -> dict[str, Any]:
    """The frontier of mean KLD against .zst bytes, and where the shipped file stands on it."""
    pts = [m for m in models if m.get("fidelity") and m.get("zst_bytes") and m["role"] != "base"]
    frontier = []
    for m in pts:
        x, y = m["zst_bytes"], m["fidelity"]["kld_mean"]["value"]
        if not any(o is not m and o["zst_bytes"] <= x and o["fidelity"]["kld_mean"]["value"] <= y
                   and (o["zst_bytes"], o["fidelity"]["kld_mean"]["value"]) != (x, y) for o in pts):
            frontier.append(m["label"])
    frontier.sort(key=lambda label: next(p["zst_bytes"] for p in pts if p["label"] == label))
    shipped = next(m for m in models if m["label"] == SHIPPED)
    kld = shipped["fidelity"]["kld_mean"]
    smaller = [m for m in pts if m["role"] == "baseline" and m["zst_bytes"] <= shipped["zst_bytes"]]
    dominated_by = [m["label"] for m in smaller if m["fidelity"]["kld_mean"]["ci_high"] < kld["ci_low"]]
    best = min(smaller, key=lambda m: m["fidelity"]["kld_mean"]["value"], default=None)
    # with none as small, the comparison is with the smallest plain quantization (a little larger)
    other = best or min((m for m in pts if m["role"] == "baseline"), key=lambda m: m["zst_bytes"], default=None)
    if other is None:
        sentence = "No plain llama.cpp quantization was made to compare with (profile baselines)."
    else:
        b = other["fidelity"]["kld_mean"]
        verdict = ("lower, intervals apart" if kld["ci_high"] < b["ci_low"] else
                   "higher, intervals apart" if b["ci_high"] < kld["ci_low"] else "not separable")
        which = ("the best plain llama.cpp quantization at no more bytes" if best is not None else
                 "no plain llama.cpp quantization tried is as small; the smallest")
        sentence = (f"At {shipped['zst_bytes']:,} bytes packed, the chain's file has a mean KL divergence of "
                    f"{kld['value']:.4f} [{kld['ci_low']:.4f}, {kld['ci_high']:.4f}] from {BASELINE}; {which}, "
                    f"{other['label']} ({other['zst_bytes']:,} bytes), has {b['value']:.4f} "
                    f"[{b['ci_low']:.4f}, {b['ci_high']:.4f}]: the chain's is {verdict}.")
    return {"frontier": frontier, "shipped_on_frontier": SHIPPED in frontier, "dominated_by": dominated_by,
            "best_plain_at_size": None if best is None else best["label"], "sentence": sentence}


# --------------------------------------------------------------------------- the stage


def lineage(inputs: dict[str, Artifact]) -> dict[str, dict[str, Any]]:
    """What each stage measured of its own output (transformers for the Hugging Face stages)."""
    keep = ("perplexity", "perplexity_tokens", "sparsity", "bits_per_weight", "bytes_on_disk", "zst_bytes",
            "heldout_kl_before", "heldout_kl_after", "export_kld", "val_loss_first", "val_loss_last", "seconds")
    return {s: {"version": inputs[s].version, **{k: v for k, v in inputs[s].manifest.get("metrics", {}).items()
                                                 if k in keep}}
            for s in LINEAGE if s in inputs}


def build(profile: Profile, *, inputs: dict[str, Artifact], home: Path, log: Callable[[str], Any] = print) -> Artifact:
    """Score every candidate, record the gates' thresholds and publish the benchmark_report artifact."""
    from refinery import humaneval_exec, report
    from refinery.llamacpp import tokens_per_second

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    heldout = None
    if "raw_corpus" in inputs and (inputs["raw_corpus"].path / "heldout.jsonl").exists():
        heldout = inputs["raw_corpus"].path / "heldout.jsonl"
    use = tasks_in_use(profile)
    if "demo_heldout" in use and heldout is None:
        raise FileNotFoundError("eval.tasks has demo_heldout, but raw_corpus has no heldout.jsonl "
                                "(the demo source writes it); remove the task or ingest the demo corpus")
    work = home / "work" / STAGE
    work.mkdir(parents=True, exist_ok=True)
    config = {"eval": profile.eval.model_dump(mode="json"), "gates": profile.gates.model_dump(mode="json"),
              "release": profile.release.model_dump(mode="json"), "decontam": profile.decontam.model_dump(mode="json")}
    refs = {name: art.ref() for name, art in inputs.items()}

    with staged_artifact(STAGE, config=config, inputs=refs, home=home) as st:
        cands = candidates(inputs, work, profile, log)
        tokens = token_set(next(c.path for c in cands if c.role == "reference"), profile, heldout)
        tokens.save(st.path / "tokens.npz")
        log(f"{STAGE}: {len(cands)} GGUFs; fidelity on {tokens.predictions:,} predicted tokens "
            f"({len(tokens.chunks)} chunks of {tokens.chunks.shape[1]})")
        fid = fidelity_scores(cands, tokens, work, profile, log)

        task_dir = st.path / "tasks"
        prepared = prepare_tasks(profile, task_dir, heldout) if use else []
        manager = task_manager(profile, task_dir) if prepared else None
        per_item: dict[str, dict[str, Items]] = {}
        scores: dict[str, dict[str, Score]] = {}
        for cand in [c for c in cands if c.label in profile.eval.task_models] if prepared else []:
            scores[cand.label], per_item[cand.label] = score_tasks(
                cand, prepared, manager, profile, work, st.path / "lm_eval" / cand.label, log)
        _write_items(st.path / "items.jsonl", per_item)

        models = []
        for cand in cands:
            m = {**{k: v for k, v in asdict(cand).items() if k != "path"}, "file": str(cand.path),
                 "bytes": cand.path.stat().st_size, "fidelity": fid.get(cand.label),
                 "scores": {t: asdict(s) for t, s in scores.get(cand.label, {}).items()}}
            if cand.role != "base":
                speed = tokens_per_second(cand.path, profile.eval.speed_tokens, profile.eval.fidelity.n_threads)
                m["tokens_per_second"] = speed["generation_tokens_per_second"]
                m["prompt_tokens_per_second"] = speed["prompt_tokens_per_second"]
            models.append(m)

        task_info = task_gates(prepared, use, per_item)
        retention: dict[str, dict[str, Any]] = {}
        fine_tuning: dict[str, Any] = {}
        for label in per_item:
            if label == BASELINE:
                continue
            for task in prepared:
                s = spec(task.name)
                a, b = paired(per_item[label][task.name], per_item[BASELINE][task.name])
                if label == "base_model":
                    fine_tuning[task.name] = paired_difference(s.metric_name, b.values, a.values, b.weights, a.weights)
                else:
                    retention.setdefault(label, {})[task.name] = paired_retention(
                        s.metric_name, s.higher_is_better, a.values, b.values, a.weights, b.weights)

        gates = {**profile.gates.model_dump(mode="json"), "max_bytes": profile.release.max_bytes,
                 "min_retention": {t: i["min_retention"] for t, i in task_info.items() if i["gated"]},
                 "recorded_from": profile.frozen_from or profile.source_file}
        doc = {
            "run_id": st.version, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "profile": profile.name, "baseline": BASELINE, "shipped": SHIPPED,
            "token_set": {"chunks": int(tokens.chunks.shape[0]), "chunk": int(tokens.chunks.shape[1]),
                          "predictions": tokens.predictions, "digest": tokens.digest,
                          "sources": {src: tokens.sources.count(src) for src in sorted(set(tokens.sources))}},
            "fidelity_method": ("KL(P_qlora_model || P_model) per predicted token over the token set, llama.cpp "
                                "logits for every model; 95% percentile bootstrap over chunks"),
            "models": models,
            "lineage": lineage(inputs),
            "tasks": task_info,
            "retention": retention,
            "retention_method": "paired bootstrap over items, 95% percentile interval; "
                                f"retention = model/{BASELINE} (perplexity: {BASELINE}/model)",
            "fine_tuning": fine_tuning,
            "pareto": pareto(models),
            "gates": gates,
            "humaneval": {"requested": "humaneval" in profile.eval.tasks,
                          "executed": "humaneval" in use,
                          "sandbox": humaneval_exec.sandbox_description(profile.eval.humaneval_isolation)
                          if "humaneval" in use else None},
            "decontamination": decontamination_summary(profile, inputs, heldout),
            "release_candidate": release_candidate(inputs, profile),
        }
        report.write_report_files(doc, st.path)
        st.metrics.update(report.summary_metrics(doc))
    return load_artifact(st.path)


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


# --------------------------------------------------------------------------- decontamination, release candidate


def release_candidate(inputs: dict[str, Artifact], profile: Profile) -> dict[str, Any]:
    """The files the release would ship, and whether llama.cpp loads and runs the GGUF."""
    from refinery.llamacpp import loads_and_generates

    art = inputs[SHIPPED]
    gguf, zst = art.path / "model.gguf", art.path / "model.gguf.zst"
    files = art.manifest.get("files", {})
    try:  # a child process: a crash in native code is a finding of the report, not a crash of it
        loads, sample = loads_and_generates(gguf)
    except Exception as exc:
        loads, sample = False, f"{type(exc).__name__}: {exc}"
    return {"stage": SHIPPED, "version": art.version, "artifact": str(art.path),
            "gguf": str(gguf), "gguf_zst": str(zst),
            "gguf_sha256": files.get("model.gguf", {}).get("sha256"),
            "gguf_zst_sha256": files.get("model.gguf.zst", {}).get("sha256"),
            "gguf_zst_bytes": zst.stat().st_size if zst.exists() else None,
            "llama_cpp_loads": loads, "llama_cpp_sample": sample if loads else "",
            "llama_cpp_error": "" if loads else sample}


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
