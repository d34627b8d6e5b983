"""The model half, one asset per declared stage (refinery.stages.STAGES): base_model -> qlora_model ->
pruned_model -> awq_model -> gguf_zst -> recovered_model, and quant_baselines beside them.

Each asset runs its stage out of process (refinery.runner through Dagster Pipes), or reuses the
artifact when one with the same identity exists; its code version is the stage's, so the UI shows
what a code change made stale. Heavy stages retry once on a failure (a killed subprocess, a
transient error); the attempt number is in the metadata.
"""

import csv

import dagster as dg
from dagster_duckdb import DuckDBResource

from assets.common import png_markdown, run_stage, upstream_artifact
from refinery import stages

STAGE_RESOURCES = {"refinery", "pipes", "duckdb"}
RETRY = dg.RetryPolicy(max_retries=1, delay=5)
# benchmark_report and release have their own assets (assets/evaluation.py): they add the report.
MODEL_ASSETS = [s for s in stages.STAGES if s.name != "benchmark_report"]


def stage_asset(st: stages.Stage) -> dg.AssetsDefinition:
    @dg.asset(name=st.name, deps=list(st.inputs), group_name=st.group, kinds=set(st.kinds),
              description=st.description, code_version=st.code_version, required_resource_keys=STAGE_RESOURCES,
              retry_policy=RETRY if st.heavy else None)
    def _asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        result, artifact = run_stage(context, st.name)
        losses = artifact.path / "losses.csv"
        if not (st.loss_curve and losses.exists()):
            return result
        rows = _read_losses(losses)
        _store_losses(context.resources.duckdb, context.run_id, st.name, artifact.version, rows)
        # first: the UI keeps this order
        return dg.MaterializeResult(metadata={"loss_curve": _loss_plot(rows, st.name), **result.metadata},
                                    data_version=result.data_version)

    return _asset


stage_assets = [stage_asset(st) for st in MODEL_ASSETS]


def _intact_check(asset_name: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=asset_name, name="artifact_intact", blocking=True, required_resource_keys={"refinery"},
                    description="Every file of the artifact matches the SHA-256 in its manifest.")
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        artifact = upstream_artifact(context, asset_name, context.resources.refinery.home_path())
        bad = artifact.verify()
        return dg.AssetCheckResult(passed=not bad, metadata={
            "files": len(artifact.manifest["files"]), "mismatched": ", ".join(bad) or "none",
            "version": artifact.version})

    return _check


intact_checks = [_intact_check(st.name) for st in MODEL_ASSETS]


# --------------------------------------------------------------------------- loss curves


def _read_losses(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{"step": int(float(r["step"])), "split": r["split"], "loss": float(r["loss"])}
                for r in csv.DictReader(f) if r.get("loss") not in (None, "")]


def _store_losses(duckdb: DuckDBResource, run_id: str, stage: str, version: str, rows: list[dict]) -> None:
    """Loss per step in DuckDB; an artifact recorded again (reused by a later run) replaces its rows."""
    with duckdb.get_connection() as conn:
        conn.execute("""CREATE TABLE IF NOT EXISTS training_loss (
            run_id VARCHAR, recorded_at TIMESTAMP DEFAULT current_timestamp, stage VARCHAR,
            artifact_version VARCHAR, step INTEGER, split VARCHAR, loss DOUBLE)""")
        conn.execute("DELETE FROM training_loss WHERE stage = ? AND artifact_version = ?", [stage, version])
        conn.executemany(
            "INSERT INTO training_loss (run_id, stage, artifact_version, step, split, loss) VALUES (?, ?, ?, ?, ?, ?)",
            [(run_id, stage, version, r["step"], r["split"], r["loss"]) for r in rows])


def _loss_plot(rows: list[dict], title: str) -> dg.MetadataValue:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for split in sorted({r["split"] for r in rows}):
        pts = [(r["step"], r["loss"]) for r in rows if r["split"] == split]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None,
                markersize=3, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: loss per step")
    ax.legend()
    ax.grid(alpha=0.3)
    return png_markdown(fig, f"{title} loss")
