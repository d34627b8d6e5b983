"""Evaluation and release: quant_baselines (assets/models.py) -> benchmark_report -> release (gated).

benchmark_report runs refinery.evaluate out of process (Dagster Pipes), or reuses the report made
from the same inputs, config and code; it records the scores in DuckDB and shows the tables and
charts. Every release gate is a blocking asset check on benchmark_report that reads the report
(its recorded thresholds, refinery.release holds the logic), and decontamination is a blocking
check on deduped_corpus, so release materializes only when all of them pass in the run.
"""


import dagster as dg
import pyarrow.parquet as pq
from dagster_duckdb import DuckDBResource

from assets.common import markdown_table, png_markdown, run_stage, upstream_artifact
from assets.models import RETRY
from refinery import stages
from resources import RefineryResource

EVALUATION = stages.EVALUATION
RELEASE = "release"
REPORT = stages.stage("benchmark_report")


@dg.asset(name=REPORT.name, deps=list(REPORT.inputs), group_name=REPORT.group, kinds=set(REPORT.kinds),
          description=REPORT.description, code_version=REPORT.code_version, retry_policy=RETRY)
def benchmark_report(context: dg.AssetExecutionContext, refinery: RefineryResource, duckdb: DuckDBResource,
                     pipes: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    from refinery.evaluate import load_report
    from refinery.report import fidelity_rows, pareto_figure, record_scores, task_bars_figure

    result, artifact = run_stage(context, REPORT.name)
    doc = load_report(artifact.path)
    with duckdb.get_connection() as conn:
        rows = record_scores(conn, doc, run_id=context.run_id)
    task_models = [m for m in doc["models"] if m["scores"]]
    tasks = [{"task": t, "chance": i["chance"], "gated": i["gated"],
              **{m["label"]: m["scores"][t]["value"] for m in task_models if t in m["scores"]}}
             for t, i in doc["tasks"].items()]
    # What a reader looks at first goes first: the UI keeps this order.
    metadata = {
        "what_the_chain_bought": dg.MetadataValue.md(doc["pareto"]["sentence"]),
        "kld_vs_size": png_markdown(pareto_figure(doc), "KL divergence against .zst bytes, Pareto frontier"),
        "fidelity": markdown_table(fidelity_rows(doc)),
        "tasks": markdown_table(tasks),
        "report": dg.MetadataValue.md((artifact.path / "report.md").read_text(encoding="utf-8")),
        "duckdb_rows": rows,
        **result.metadata,
    }
    if tasks:
        metadata["task_scores"] = png_markdown(task_bars_figure(doc), "task scores")
    return dg.MaterializeResult(data_version=result.data_version, metadata=metadata)


def _report(context: dg.AssetCheckExecutionContext, refinery: RefineryResource) -> dict:
    from refinery.evaluate import load_report

    return load_report(upstream_artifact(context, REPORT.name, refinery.home_path()).path)


def _result(gate) -> dg.AssetCheckResult:
    metadata = {}
    for key, value in gate.metadata.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            metadata[key] = markdown_table(value)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            metadata[key] = value if value is not None else "none"
        else:
            metadata[key] = str(value)
    return dg.AssetCheckResult(passed=gate.passed, metadata=metadata, description=gate.why or gate.note or None)


def gate_check(gate) -> dg.AssetChecksDefinition:
    """A blocking check on benchmark_report running one of refinery.release's gates."""
    name = gate.__name__.removeprefix("check_")
    check_name = {"fidelity": "fidelity_within_limits", "pareto": "not_beaten_by_plain_quantization",
                  "retention": "retention_meets_thresholds", "llamacpp": "gguf_loads_in_llamacpp",
                  "zstd_roundtrip": "zstd_roundtrip_verifies", "size": "release_size_within_limit",
                  "decontamination": "decontamination_clean"}[name]

    @dg.asset_check(asset=REPORT.name, name=check_name, blocking=True, description=gate.__doc__)
    def _check(context: dg.AssetCheckExecutionContext, refinery: RefineryResource) -> dg.AssetCheckResult:
        return _result(gate(_report(context, refinery)))

    return _check


def _gate_checks() -> list[dg.AssetChecksDefinition]:
    from refinery.release import GATES

    return [gate_check(g) for g in GATES]


gate_checks = _gate_checks()


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
    named = ", ".join(list(found)[:20]) + (f" and {len(found) - 20} more" if len(found) > 20 else "")
    failure = (f"{len(found)} kept records share a {profile.decontam.ngram}-gram with an evaluation set "
               f"(decontam.action: {profile.decontam.action}): {named}")
    return dg.AssetCheckResult(passed=not found, description=failure if found else None, metadata={
        "ngram": profile.decontam.ngram, "action": profile.decontam.action, "kept_records": kept.num_rows,
        "contaminated": len(found), "threshold": 0, "eval_sets": ", ".join(sorted(texts)),
        "examples": markdown_table([{"id": k, "detail": v} for k, v in list(found.items())[:20]])})


@dg.asset(group_name=RELEASE, deps=[benchmark_report], kinds={"gguf", "zstd", "ollama"},
          description="The release bundle: model.gguf.zst, a Hugging Face model card, an Ollama Modelfile, the "
                      "training and compression recipes, the report and checksums. Made only when every blocking "
                      "check passed; its gates read the thresholds the report recorded.")
def release(context: dg.AssetExecutionContext, refinery: RefineryResource) -> dg.MaterializeResult:
    from refinery import release as release_stage

    home = refinery.home_path()
    report = upstream_artifact(context, REPORT.name, home)
    artifact = release_stage.build(refinery.load_profile(), inputs={"benchmark_report": report}, home=home,
                                   log=context.log.info)
    card = (artifact.path / "README.md").read_text(encoding="utf-8")
    return dg.MaterializeResult(data_version=dg.DataVersion(artifact.version), metadata={
        "path": str(artifact.path), "version": artifact.version, "report_version": report.version,
        "gguf_zst_bytes": artifact.manifest["metrics"]["gguf_zst_bytes"],
        "files": ", ".join(sorted(artifact.manifest["files"])[:40]),
        "model_card": dg.MetadataValue.md(card)})
