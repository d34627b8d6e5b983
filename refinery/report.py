"""The benchmark report as files (JSON, Markdown, PNG charts) and as rows in DuckDB.

Dagster-free: ``record_scores`` takes an open DuckDB connection (``duckdb.connect(path)`` or the
Dagster DuckDBResource's), creates ``benchmark_scores`` if needed and appends one run's rows, so
the table keeps the history of every run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

BENCHMARK_SCORES = """CREATE TABLE IF NOT EXISTS benchmark_scores (
    run_id VARCHAR NOT NULL,          -- Dagster run id (the report version outside Dagster)
    recorded_at TIMESTAMP NOT NULL,   -- UTC, when the report was made
    profile VARCHAR,
    report_version VARCHAR,           -- the benchmark_report artifact version
    stage VARCHAR NOT NULL,           -- model label: a stage, 'recovered_model.gguf', 'qlora_model.Q4_0', ...
    artifact_version VARCHAR,         -- version of the artifact the model came from
    task VARCHAR NOT NULL,            -- mmlu, demo_heldout, ...; 'size' and 'speed' for those numbers
    metric VARCHAR NOT NULL,          -- acc, word_perplexity, retention:acc, bytes, bits_per_weight, tokens_per_second
    value DOUBLE,
    stderr DOUBLE,
    ci_low DOUBLE,                    -- retention rows: 95% paired-bootstrap interval
    ci_high DOUBLE,
    n INTEGER                         -- items scored
)"""


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def score_rows(doc: dict[str, Any], run_id: str | None = None) -> list[tuple]:
    run = run_id or doc["run_id"]
    when = doc["created"].replace("T", " ").rstrip("Z")
    base = (run, when, doc["profile"], doc["run_id"])
    rows: list[tuple] = []
    for m in doc["models"]:
        head = (*base, m["label"], m["version"])
        for task, s in m["scores"].items():
            rows.append((*head, task, s["metric"].split(",")[0], _num(s["value"]), _num(s["stderr"]), None, None, s["n"]))
        rows.append((*head, "size", "bytes", float(m["bytes"]), None, None, None, None))
        rows.append((*head, "size", "bits_per_weight", m["bits_per_weight"], None, None, None, None))
        if m.get("gguf_zst_bytes"):
            rows.append((*head, "size", "gguf_zst_bytes", float(m["gguf_zst_bytes"]), None, None, None, None))
        if m.get("tokens_per_second") is not None:
            rows.append((*head, "speed", "tokens_per_second", m["tokens_per_second"], None, None, None, None))
        for task, r in doc["retention"].get(m["label"], {}).items():
            metric = doc["tasks"][task]["metric"].split(",")[0]
            rows.append((*head, task, f"retention:{metric}", _num(r["value"]), None, _num(r["ci_low"]),
                         _num(r["ci_high"]), r["n"]))
    return rows


def record_scores(conn: Any, doc: dict[str, Any], run_id: str | None = None) -> int:
    """Append the report's scores, sizes, speeds and retentions to ``benchmark_scores``; returns
    the number of rows. A report recorded again (a retried run) replaces its own rows."""
    conn.execute(BENCHMARK_SCORES)
    rows = score_rows(doc, run_id)
    conn.execute("DELETE FROM benchmark_scores WHERE report_version = ? AND run_id = ?",
                 [doc["run_id"], run_id or doc["run_id"]])
    conn.executemany("INSERT INTO benchmark_scores VALUES (?, CAST(? AS TIMESTAMP), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     rows)
    return len(rows)


# --------------------------------------------------------------------------- text


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.1f}"


def score_cell(s: dict[str, Any] | None) -> str:
    if s is None:
        return "n/a"
    if s["stderr"] is None:
        return _fmt(s["value"])
    return f"{_fmt(s['value'])} ± {_fmt(s['stderr'])}"


def retention_cell(r: dict[str, Any] | None) -> str:
    if r is None or r.get("value") is None:
        return "n/a" if r is None else f"undefined ({r.get('note', '')})"
    if r.get("ci_low") is None:
        return _fmt(r["value"])
    return f"{_fmt(r['value'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"


def markdown(doc: dict[str, Any]) -> str:
    tasks = list(doc["tasks"])
    he = doc["humaneval"]
    head_tasks = tasks + (["humaneval"] if he["requested"] and not he["executed"] else [])
    lines = [f"# Benchmark report `{doc['run_id']}`", "",
             f"Profile `{doc['profile']}`, {doc['created']}. Every score is refinery's own measurement on "
             f"the same items for every model; retention is relative to refinery's dense fine-tuned "
             f"baseline `{doc['baseline']}`.", "",
             "## Scores (value ± standard error)", "",
             "| model | from | bytes | bits/weight | llama.cpp tokens/s | " + " | ".join(
                 f"{t} ({doc['tasks'][t]['metric'].split(',')[0]})" if t in doc["tasks"] else f"{t}"
                 for t in head_tasks) + " |",
             "|---" * (5 + len(head_tasks)) + "|"]
    for m in doc["models"]:
        cells = [score_cell(m["scores"].get(t)) if t in doc["tasks"] else "not executed" for t in head_tasks]
        speed = _fmt(m["tokens_per_second"], 1) if m.get("tokens_per_second") is not None else "-"
        lines.append(f"| {m['label']} | {m['stage']} `{m['version']}` | {m['bytes']:,} | {m['bits_per_weight']:.2f} "
                     f"| {speed} | " + " | ".join(cells) + " |")
    lines += ["", "Items per task: " + ", ".join(f"{t} {doc['tasks'][t]['items'] or 'lm-eval default'}"
                                                for t in tasks) + ".", ""]
    if he["requested"] and not he["executed"]:
        lines += ["HumanEval: **not executed** (running model-written code is opt-in: "
                  "`eval.humaneval_execute: true`).", ""]
    elif he["executed"]:
        lines += [f"HumanEval: model-written code **executed** in a sandbox: {he['sandbox']}.", ""]
    lines += ["## Retention vs " + doc["baseline"] + " (95% interval)", "",
              doc["retention_method"] + ".", "",
              "| model | " + " | ".join(tasks) + " |", "|---" * (1 + len(tasks)) + "|"]
    for label, per_task in doc["retention"].items():
        lines.append(f"| {label} | " + " | ".join(retention_cell(per_task.get(t)) for t in tasks) + " |")
    thresholds = {t: v["min_retention"] for t, v in doc["tasks"].items() if v["min_retention"] is not None}
    if thresholds:
        lines += ["", "Release thresholds (recovered_model): " +
                  ", ".join(f"{t} >= {v}" for t, v in thresholds.items()) + "."]
    d = doc["decontamination"]
    lines += ["", "## Decontamination", ""]
    if d.get("checked"):
        lines += [f"{d['ngram']}-gram overlap between the training corpus (deduped_corpus `{d['deduped_corpus']}`, "
                  f"{d['kept_records']:,} kept records) and the test sets {', '.join(d['eval_sets'])}: "
                  f"{d['removed']} records removed as contaminated, {d['remaining']} remaining.", ""]
        for ex in d["removed_examples"][:10]:
            lines.append(f"- removed `{ex['id']}`: {ex['detail']}")
        for ex in d["remaining_examples"][:10]:
            lines.append(f"- **remaining** `{ex['id']}`: {ex['detail']}")
    else:
        lines.append(d.get("note", "not checked"))
    rc = doc["release_candidate"]
    lines += ["", "## Release candidate", "",
              f"`{rc['stage']}` `{rc['version']}`: model.gguf.zst {rc['gguf_zst_bytes'] or 0:,} bytes "
              f"(limit {rc['max_bytes']:,}); llama.cpp loads and generates: {rc['llama_cpp_loads']}"
              + (f" ({rc['llama_cpp_error']})" if rc.get("llama_cpp_error") else "") + "."]
    return "\n".join(lines) + "\n"


def summary_metrics(doc: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth a glance in the UI (the rest is in report.json)."""
    out: dict[str, Any] = {"models_scored": len(doc["models"]), "tasks": ",".join(doc["tasks"]),
                           "humaneval": "executed" if doc["humaneval"]["executed"] else "not executed",
                           "decontamination_remaining": doc["decontamination"].get("remaining"),
                           "release_llama_cpp_loads": doc["release_candidate"]["llama_cpp_loads"],
                           "release_gguf_zst_bytes": doc["release_candidate"]["gguf_zst_bytes"]}
    for m in doc["models"]:
        for task, s in m["scores"].items():
            out[f"score.{m['label']}.{task}"] = s["value"]
        out[f"bytes.{m['label']}"] = m["bytes"]
    for label, per_task in doc["retention"].items():
        for task, r in per_task.items():
            out[f"retention.{label}.{task}"] = r["value"]
    return out


# --------------------------------------------------------------------------- charts


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_frontier(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both size (smaller) and quality."""
    keep = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and (y2 >= y if higher_is_better else y2 <= y)) and (x2, y2) != (x, y)
                        for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def pareto_figure(doc: dict[str, Any]):
    """Quality versus bytes on disk, one panel per task, every model; the Pareto frontier joined."""
    plt = _plt()
    tasks = list(doc["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        info = doc["tasks"][task]
        models = [m for m in doc["models"] if task in m["scores"]]
        pts = [(m["bytes"], m["scores"][task]["value"]) for m in models]
        for m, (x, y) in zip(models, pts, strict=True):
            plain = ".Q" in m["label"]
            ax.errorbar(x, y, yerr=m["scores"][task]["stderr"] or 0, fmt="s" if plain else "o", capsize=3,
                        color="grey" if plain else None, label=m["label"])
            ax.annotate(m["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto_frontier(pts, info["higher_is_better"])
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="black", lw=0.8,
                label="Pareto frontier")
        ax.set_xscale("log")
        ax.set_xlabel("bytes on disk (log)")
        metric = info["metric"].split(",")[0]
        ax.set_ylabel(f"{metric} ({'higher' if info['higher_is_better'] else 'lower'} is better)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig


def task_bars_figure(doc: dict[str, Any]):
    """Per-task scores of every model, with standard-error bars."""
    plt = _plt()
    tasks = list(doc["tasks"])
    models = doc["models"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.5, 0.55 * len(models)) * len(tasks), 4.2),
                             squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        vals = [m["scores"][task]["value"] for m in models]
        errs = [m["scores"][task]["stderr"] or 0 for m in models]
        ax.bar(range(len(models)), vals, yerr=errs, capsize=3,
               color=["grey" if ".Q" in m["label"] else "tab:blue" for m in models])
        ax.set_xticks(range(len(models)), [m["label"] for m in models], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{task}: {doc['tasks'][task]['metric'].split(',')[0]}")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def write_report_files(doc: dict[str, Any], out_dir: Path) -> None:
    """report.json, report.md, pareto.png and tasks.png in ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / "report.json").write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    (out_dir / "report.md").write_text(markdown(doc), encoding="utf-8")
    plt = _plt()
    for name, make in (("pareto.png", pareto_figure), ("tasks.png", task_bars_figure)):
        fig = make(doc)
        fig.savefig(out_dir / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
