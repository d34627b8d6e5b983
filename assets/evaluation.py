"""Evaluation and release: benchmark_report (lm-eval over every stage) -> release (gated).

benchmark_report runs refinery.evaluate out of process (Dagster Pipes), then records the scores
in DuckDB and shows the charts. Every release gate is a blocking asset check on benchmark_report
(refinery.release holds the logic), and decontamination is a blocking check on deduped_corpus, so
release materializes only when all of them pass in the run.
"""


import dagster as dg
import pyarrow.parquet as pq
from dagster_duckdb import DuckDBResource

from assets.common import markdown_table, png_markdown, run_stage, upstream_artifact
from resources import RefineryResource

EVALUATION = "evaluation"
RELEASE = "release"
MODEL_INPUTS = ["base_model", "qlora_model", "pruned_model", "awq_model", "gguf_zst", "recovered_model"]
REPORT_INPUTS = [*MODEL_INPUTS, "raw_corpus", "deduped_corpus"]
ARTIFACT_KEYS = {"path", "version", "bytes_on_disk", "stage_seconds"}


@dg.asset(group_name=EVALUATION, deps=REPORT_INPUTS, kinds={"lmeval", "duckdb", "llamacpp"},
          description="lm-eval (MMLU, GSM8K, BBH, HumanEval when opted in, WikiText-2 perplexity, the demo "
                      "held-out tasks) over every stage and plain Q4_0/Q8_0 GGUFs of qlora_model, on the same "
                      "items; retention vs qlora_model with paired-bootstrap intervals, sizes, llama.cpp speed.")
def benchmark_report(context: dg.AssetExecutionContext, refinery: RefineryResource, duckdb: DuckDBResource,
                     pipes: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    from refinery.evaluate import load_report
    from refinery.report import (markdown, pareto_figure, record_scores, retention_cell, score_cell,
                                 task_bars_figure)

    result, artifact = run_stage(context, "refinery.evaluate", REPORT_INPUTS)
    doc = load_report(artifact.path)
    with duckdb.get_connection() as conn:
        rows = record_scores(conn, doc, run_id=context.run_id)
    scores = [{"model": m["label"], "bytes": m["bytes"], "bits/weight": round(m["bits_per_weight"], 2),
               "tokens/s": m["tokens_per_second"] and round(m["tokens_per_second"], 1),
               **{t: score_cell(s) for t, s in m["scores"].items()}} for m in doc["models"]]
    retention = [{"model": label, **{t: retention_cell(r) for t, r in per_task.items()}}
                 for label, per_task in doc["retention"].items()]
    # What a reader looks at first goes first: the UI keeps this order.
    return dg.MaterializeResult(data_version=result.data_version, metadata={
        "quality_vs_size": png_markdown(pareto_figure(doc), "quality versus size, Pareto frontier"),
        "retention_vs_qlora_model": markdown_table(retention),
        "scores": markdown_table(scores),
        "task_scores": png_markdown(task_bars_figure(doc), "per-task scores"),
        "report": dg.MetadataValue.md(markdown(doc)),
        "duckdb_rows": rows,
        # lineage and artifact, not the per-score scalars: those are in the tables above
        **{k: v for k, v in result.metadata.items() if k in ARTIFACT_KEYS or k.startswith("input.")},
    })


def _report(context: dg.AssetCheckExecutionContext, refinery: RefineryResource) -> dict:
    from refinery.evaluate import load_report

    return load_report(upstream_artifact(context, "benchmark_report", refinery.home_path()).path)


def _result(gate) -> dg.AssetCheckResult:
    metadata = {}
    for key, value in gate.metadata.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            metadata[key] = markdown_table(value)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            metadata[key] = value if value is not None else "none"
        else:
            metadata[key] = str(value)
    return dg.AssetCheckResult(passed=gate.passed, metadata=metadata)


@dg.asset_check(asset=benchmark_report, name="retention_meets_thresholds", blocking=True)
def retention_meets_thresholds(context: dg.AssetCheckExecutionContext, refinery: RefineryResource) -> dg.AssetCheckResult:
    """recovered_model keeps eval.tasks[t].min_retention of qlora_model's score on every task."""
    from refinery.release import check_retention

    return _result(check_retention(_report(context, refinery), refinery.load_profile()))


@dg.asset_check(asset=benchmark_report, name="gguf_loads_in_llamacpp", blocking=True)
def gguf_loads_in_llamacpp(context: dg.AssetCheckExecutionContext, refinery: RefineryResource) -> dg.AssetCheckResult:
    """The release GGUF loads and generates in llama.cpp."""
    from refinery.release import check_llamacpp

    return _result(check_llamacpp(_report(context, refinery)))


@dg.asset_check(asset=benchmark_report, name="zstd_roundtrip_verifies", blocking=True)
def zstd_roundtrip_verifies(context: dg.AssetCheckExecutionContext, refinery: RefineryResource) -> dg.AssetCheckResult:
    """model.gguf.zst decompresses to exactly the model.gguf its manifest names."""
    from refinery.release import check_zstd_roundtrip

    return _result(check_zstd_roundtrip(_report(context, refinery)))


@dg.asset_check(asset=benchmark_report, name="release_size_within_limit", blocking=True)
def release_size_within_limit(context: dg.AssetCheckExecutionContext, refinery: RefineryResource) -> dg.AssetCheckResult:
    """The .gguf.zst is at most release.max_bytes."""
    from refinery.release import check_size

    return _result(check_size(_report(context, refinery), refinery.load_profile()))


@dg.asset_check(asset=benchmark_report, name="decontamination_clean", blocking=True)
def decontamination_clean(context: dg.AssetCheckExecutionContext, refinery: RefineryResource) -> dg.AssetCheckResult:
    """The corpus qlora_model trained on shares no n-gram with an evaluation set (per the report)."""
    from refinery.release import check_decontamination

    return _result(check_decontamination(_report(context, refinery)))


@dg.asset_check(asset="deduped_corpus", name="no_eval_contamination", blocking=True)
def no_eval_contamination(context: dg.AssetCheckExecutionContext, refinery: RefineryResource) -> dg.AssetCheckResult:
    """No kept record shares an n-gram (decontam.ngram) with an evaluation set in use."""
    from pathlib import Path

    from refinery.decontam import eval_texts_for, find_contaminated

    profile = refinery.load_profile()
    deduped = upstream_artifact(context, "deduped_corpus", refinery.home_path())
    heldout = deduped.manifest.get("config", {}).get("heldout_path")
    texts = eval_texts_for(profile, Path(heldout) if heldout and Path(heldout).exists() else None)
    kept = pq.read_table(deduped.path / "kept.parquet", columns=["id", "messages"])
    found = find_contaminated(kept, texts, profile.decontam.ngram)
    return dg.AssetCheckResult(passed=not found, metadata={
        "ngram": profile.decontam.ngram, "action": profile.decontam.action, "kept_records": kept.num_rows,
        "contaminated": len(found), "threshold": 0, "eval_sets": ", ".join(sorted(texts)),
        "examples": markdown_table([{"id": k, "detail": v} for k, v in list(found.items())[:20]])})


@dg.asset(group_name=RELEASE, deps=[benchmark_report], kinds={"gguf", "zstd", "ollama"},
          description="The release bundle: model.gguf.zst, a Hugging Face model card, an Ollama Modelfile, the "
                      "training and compression recipes, raw lm-eval results and checksums. Made only when every "
                      "blocking check passed.")
def release(context: dg.AssetExecutionContext, refinery: RefineryResource) -> dg.MaterializeResult:
    from refinery import release as release_stage

    home = refinery.home_path()
    report = upstream_artifact(context, "benchmark_report", home)
    artifact = release_stage.build(refinery.load_profile(), inputs={"benchmark_report": report}, home=home,
                                   log=context.log.info)
    card = (artifact.path / "README.md").read_text(encoding="utf-8")
    return dg.MaterializeResult(data_version=dg.DataVersion(artifact.version), metadata={
        "path": str(artifact.path), "version": artifact.version, "report_version": report.version,
        "gguf_zst_bytes": artifact.manifest["metrics"]["gguf_zst_bytes"],
        "files": ", ".join(sorted(artifact.manifest["files"])[:40]),
        "model_card": dg.MetadataValue.md(card)})
