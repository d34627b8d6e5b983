"""The benchmark report as files (JSON, Markdown, PNG charts) and as rows in DuckDB.

Dagster-free: ``record_scores`` takes an open DuckDB connection (``duckdb.connect(path)`` or the
Dagster DuckDBResource's), creates ``benchmark_scores`` if needed and appends one report's rows, so
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
    stage VARCHAR NOT NULL,           -- model label: a stage, 'qlora_model.Q4_0+imatrix', ...
    artifact_version VARCHAR,         -- version of the artifact the model came from
    task VARCHAR NOT NULL,            -- 'fidelity', a benchmark task, 'size' or 'speed'
    metric VARCHAR NOT NULL,          -- kld_mean, kld_p99, top1_agreement, perplexity, exact_match, acc,
                                      -- retention:<metric>, bytes, zst_bytes, tokens_per_second
    value DOUBLE,
    stderr DOUBLE,
    ci_low DOUBLE,                    -- 95% interval (bootstrap over chunks or items)
    ci_high DOUBLE,
    n INTEGER                         -- items or predicted tokens scored
)"""
FIDELITY_METRICS = ("kld_mean", "kld_p99", "top1_agreement", "perplexity")


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def score_rows(doc: dict[str, Any], run_id: str | None = None) -> list[tuple]:
    run = run_id or doc["run_id"]
    when = doc["created"].replace("T", " ").rstrip("Z")
    base = (run, when, doc["profile"], doc["run_id"])
    rows: list[tuple] = []
    for m in doc["models"]:
        head = (*base, m["label"], m["version"])
        fid = m.get("fidelity") or {}
        for metric in FIDELITY_METRICS:
            if metric in fid:
                v = fid[metric]
                rows.append((*head, "fidelity", metric, _num(v["value"]), None, _num(v["ci_low"]),
                             _num(v["ci_high"]), fid.get("predictions")))
        for task, s in m["scores"].items():
            rows.append((*head, task, s["metric"].split(",")[0], _num(s["value"]), _num(s["stderr"]), None, None, s["n"]))
        rows.append((*head, "size", "bytes", float(m["bytes"]), None, None, None, None))
        if m.get("zst_bytes"):
            rows.append((*head, "size", "zst_bytes", float(m["zst_bytes"]), None, None, None, None))
        if m.get("tokens_per_second") is not None:
            rows.append((*head, "speed", "tokens_per_second", m["tokens_per_second"], None, None, None, None))
        for task, r in doc["retention"].get(m["label"], {}).items():
            metric = doc["tasks"][task]["metric"].split(",")[0]
            rows.append((*head, task, f"retention:{metric}", _num(r["value"]), None, _num(r["ci_low"]),
                         _num(r["ci_high"]), r["n"]))
    return rows


def record_scores(conn: Any, doc: dict[str, Any], run_id: str | None = None) -> int:
    """Append the report's fidelity, task scores, sizes, speeds and retentions to ``benchmark_scores``;
    returns the number of rows. A report recorded again (a retried run) replaces its own rows."""
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


def interval_cell(v: dict[str, Any] | None, digits: int = 3) -> str:
    if not v or v.get("value") is None:
        return "n/a" if not v else f"undefined ({v.get('note', '')})"
    if v.get("ci_low") is None:
        return _fmt(v["value"], digits)
    return f"{_fmt(v['value'], digits)} [{_fmt(v['ci_low'], digits)}, {_fmt(v['ci_high'], digits)}]"


def score_cell(s: dict[str, Any] | None) -> str:
    if s is None:
        return "n/a"
    if s["stderr"] is None:
        return _fmt(s["value"])
    return f"{_fmt(s['value'])} ± {_fmt(s['stderr'])}"


retention_cell = interval_cell


def fidelity_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per scored GGUF, smallest packed file first (the table of the report and the UI)."""
    rows = []
    for m in sorted((m for m in doc["models"] if m.get("fidelity")), key=lambda m: m.get("zst_bytes") or 0):
        f = m["fidelity"]
        by = f.get("by_source", {})
        rows.append({"model": m["label"], "role": m["role"], "bytes": f"{m['bytes']:,}",
                     ".zst bytes": f"{m['zst_bytes']:,}" if m.get("zst_bytes") else "-",
                     "KLD mean": interval_cell(f["kld_mean"], 4), "KLD p99": interval_cell(f["kld_p99"], 3),
                     "top-1": interval_cell(f["top1_agreement"]), "perplexity": interval_cell(f["perplexity"], 2),
                     **{f"KLD {src}": _fmt(v["kld_mean"]["value"], 4) for src, v in sorted(by.items())},
                     "tokens/s": _fmt(m.get("tokens_per_second"), 1)})
    return rows


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["_none_"]
    cols = list(rows[0])
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows])


def markdown(doc: dict[str, Any]) -> str:
    ts, g = doc["token_set"], doc["gates"]
    lines = [f"# Benchmark report `{doc['run_id']}`", "",
             f"Profile `{doc['profile']}`, {doc['created']}. Every number is refinery's own measurement; "
             f"every comparison is against refinery's dense fine-tuned baseline `{doc['baseline']}`.", "",
             "## What the chain bought", "", doc["pareto"]["sentence"], "",
             "## Fidelity to the dense model (every GGUF, in llama.cpp)", "",
             f"{ts['predictions']:,} predicted tokens in {ts['chunks']} chunks of {ts['chunk']} "
             f"({', '.join(f'{n} chunks of {src}' for src, n in ts['sources'].items())}), the same for every model. "
             f"{doc['fidelity_method']}. Lower KLD is closer to `{doc['baseline']}`.", ""]
    lines += _table(fidelity_rows(doc))
    lines += ["", f"Pareto frontier (KLD against .zst bytes): {', '.join(doc['pareto']['frontier'])}."
              + (f" Dominated by (intervals apart, no more bytes): {', '.join(doc['pareto']['dominated_by'])}."
                 if doc["pareto"]["dominated_by"] else ""), "",
              "## Along the chain (what each stage measured of its own output)", ""]
    lines += _table([{"stage": s, "version": v.get("version"),
                      **{k: (_fmt(v[k], 4) if isinstance(v.get(k), float) else v.get(k, "-"))
                         for k in ("perplexity", "sparsity", "bits_per_weight", "heldout_kl_before", "heldout_kl_after",
                                   "export_kld")}} for s, v in doc["lineage"].items()])
    lines += ["", "Perplexities here are each stage's quick measurement on WikiText-2 "
                  "(transformers for Hugging Face folders, llama.cpp for GGUFs); the table above is the comparable one.", ""]
    if doc["tasks"]:
        task_models = [m for m in doc["models"] if m["scores"]]
        lines += ["## Tasks (value ± standard error)", "",
                  "| task | metric | items | chance | " + " | ".join(m["label"] for m in task_models) + " | gate |",
                  "|---" * (5 + len(task_models)) + "|"]
        for task, info in doc["tasks"].items():
            gate = (f"retention >= {info['min_retention']}" if info["gated"] else
                    info.get("why_not_gated", "no threshold set"))
            lines.append(f"| {task} | {info['metric'].split(',')[0]} | {info['items'] or 'all'} | {info['chance']:g} | "
                         + " | ".join(score_cell(m["scores"].get(task)) for m in task_models) + f" | {gate} |")
        if doc["fine_tuning"]:
            lines += ["", f"Fine-tuning's effect ({doc['baseline']} - base_model, same items, 95% paired-bootstrap "
                          "interval): " + "; ".join(f"{t} {interval_cell(r)}" for t, r in doc["fine_tuning"].items()) + "."]
        if doc["retention"]:
            lines += ["", f"Retention vs {doc['baseline']}: " + doc["retention_method"] + ".", ""]
            for label, per_task in doc["retention"].items():
                lines.append(f"- {label}: " + "; ".join(f"{t} {interval_cell(r)}" for t, r in per_task.items()))
        lines.append("")
    he = doc["humaneval"]
    if he["requested"] and not he["executed"]:
        lines += ["HumanEval: **not executed** (running model-written code is opt-in: "
                  "`eval.humaneval_execute: true`).", ""]
    elif he["executed"]:
        lines += [f"HumanEval: model-written code **executed** {he['sandbox']}.", ""]
    lines += ["## Gates recorded for the release", "",
              f"Read by `release` from this report (recorded from `{g['recorded_from']}`), compared on interval bounds: "
              f"mean KLD upper bound <= {g['max_kld']}"
              + (f"; KLD p99 upper bound <= {g['max_kld_p99']}" if g.get("max_kld_p99") else "")
              + (f"; top-1 agreement lower bound >= {g['min_top1_agreement']}" if g.get("min_top1_agreement") else "")
              + ("; no plain llama.cpp quantization at no more .zst bytes with a lower KLD, intervals apart"
                 if g["pareto"] else "")
              + f"; .gguf.zst <= {g['max_bytes']:,} bytes"
              + "".join(f"; {t} retention lower bound >= {v}" for t, v in g["min_retention"].items()) + ".", ""]
    d = doc["decontamination"]
    lines += ["## Decontamination", ""]
    if d.get("checked"):
        lines += [f"{d['ngram']}-gram overlap between the training corpus (deduped_corpus `{d['deduped_corpus']}`, "
                  f"{d['kept_records']:,} kept records) and the test sets {', '.join(d['eval_sets'])}: "
                  f"{d['removed']} records removed as contaminated, {d['remaining']} remaining.", ""]
        for ex in d["remaining_examples"][:10]:
            lines.append(f"- **remaining** `{ex['id']}`: {ex['detail']}")
    else:
        lines.append(d.get("note", "not checked"))
    rc = doc["release_candidate"]
    lines += ["", "## Release candidate", "",
              f"`{rc['stage']}` `{rc['version']}`: model.gguf.zst {rc['gguf_zst_bytes'] or 0:,} bytes; llama.cpp "
              f"loads and generates: {rc['llama_cpp_loads']}"
              + (f" ({rc['llama_cpp_error']})" if rc.get("llama_cpp_error") else f": {rc['llama_cpp_sample']!r}") + "."]
    return "\n".join(lines) + "\n"


def summary_metrics(doc: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth a glance in the UI (the rest is in report.json)."""
    shipped = next(m for m in doc["models"] if m["label"] == doc["shipped"])
    kld = shipped["fidelity"]["kld_mean"]
    out: dict[str, Any] = {"models_scored": len(doc["models"]), "predicted_tokens": doc["token_set"]["predictions"],
                           "kld_mean": kld["value"], "kld_ci_high": kld["ci_high"],
                           "zst_bytes": shipped.get("zst_bytes"), "pareto": doc["pareto"]["sentence"],
                           "release_llama_cpp_loads": doc["release_candidate"]["llama_cpp_loads"]}
    for m in doc["models"]:
        if m.get("fidelity"):
            out[f"kld.{m['label']}"] = m["fidelity"]["kld_mean"]["value"]
    return out


# --------------------------------------------------------------------------- charts


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_figure(doc: dict[str, Any]):
    """Mean KL divergence and perplexity against .zst bytes for every scored GGUF, with their
    intervals; the KLD Pareto frontier joined; and the KLD of the files within 10 % of the
    shipped file's size on a linear scale, where the release is decided."""
    plt = _plt()
    models = [m for m in doc["models"] if m.get("fidelity") and m.get("zst_bytes")]
    shipped = next((m for m in models if m["label"] == doc.get("shipped")), None)
    near = [m for m in models if shipped and abs(m["zst_bytes"] / shipped["zst_bytes"] - 1) <= 0.1]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colors = {"reference": "black", "chain": "tab:red", "baseline": "grey"}
    panels = ((axes[0], models, "kld_mean", "mean KL divergence from qlora_model", True),
              (axes[1], near, "kld_mean", "mean KLD, files within 10 % of the shipped size", False),
              (axes[2], models, "perplexity", "perplexity (held-out token set)", False))
    for ax, shown, metric, title, log in panels:
        for i, m in enumerate(sorted(shown, key=lambda m: m["zst_bytes"])):
            v = m["fidelity"][metric]
            y = max(v["value"], 1e-5) if log else v["value"]
            ax.errorbar(m["zst_bytes"], y, yerr=[[max(y - max(v["ci_low"], 1e-5 if log else v["ci_low"]), 0)],
                                                 [max(v["ci_high"] - y, 0)]],
                        fmt="o" if m["role"] == "chain" else "s", capsize=3, color=colors.get(m["role"], "grey"))
            # alternate the labels' side: the files near one size crowd together
            ax.annotate(m["label"].replace("qlora_model.", ""), (m["zst_bytes"], y), textcoords="offset points",
                        xytext=(5, 4) if i % 2 == 0 else (5, -10), fontsize=7)
        if metric == "kld_mean" and log:
            front = [next(m for m in models if m["label"] == label) for label in doc["pareto"]["frontier"]]
            ax.plot([m["zst_bytes"] for m in front], [max(m["fidelity"][metric]["value"], 1e-5) for m in front],
                    "--", color="black", lw=0.8, label="Pareto frontier")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax.set_xlabel(".gguf.zst bytes")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def task_bars_figure(doc: dict[str, Any]):
    """Per-task scores of the task models, with standard-error bars and the chance level."""
    plt = _plt()
    tasks = list(doc["tasks"])
    models = [m for m in doc["models"] if m["scores"]]
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(3.6 * max(len(tasks), 1), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        vals = [m["scores"][task]["value"] if task in m["scores"] else 0 for m in models]
        errs = [(m["scores"].get(task) or {}).get("stderr") or 0 for m in models]
        ax.bar(range(len(models)), vals, yerr=errs, capsize=3)
        ax.axhline(doc["tasks"][task]["chance"], color="grey", ls=":", lw=1, label="chance")
        ax.set_xticks(range(len(models)), [m["label"] for m in models], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{task}: {doc['tasks'][task]['metric'].split(',')[0]}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def write_report_files(doc: dict[str, Any], out_dir: Path) -> None:
    """report.json, report.md, pareto.png and tasks.png in ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / "report.json").write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    (out_dir / "report.md").write_text(markdown(doc), encoding="utf-8")
    plt = _plt()
    figures = [("pareto.png", pareto_figure)] + ([("tasks.png", task_bars_figure)] if doc["tasks"] else [])
    for name, make in figures:
        fig = make(doc)
        fig.savefig(out_dir / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
