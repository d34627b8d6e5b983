"""What every asset shares: finding upstream artifacts, launching a stage through Pipes, plots."""

from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path
from typing import Any

import dagster as dg

from refinery.artifacts import Artifact, load_artifact, require_latest
from refinery.config import PROJECT_ROOT

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}


def upstream_artifact(context: dg.AssetExecutionContext, asset: str, home: Path) -> Artifact:
    """The exact artifact the latest materialization of ``asset`` reported (lineage), else LATEST."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is not None and event.asset_materialization is not None:
        path = event.asset_materialization.metadata.get("path")
        if path is not None and Path(str(path.value)).exists():
            return load_artifact(Path(str(path.value)))
    return require_latest(asset, home)


def trainer_python() -> str:
    """axolotl lives in its own environment (.venv-train; see Makefile), else this interpreter."""
    explicit = os.environ.get("REFINERY_TRAIN_PYTHON")
    if explicit:
        return explicit
    candidate = PROJECT_ROOT / ".venv-train" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def run_stage(context: dg.AssetExecutionContext, module: str, inputs: list[str], *,
              python: str | None = None) -> tuple[dg.MaterializeResult, Artifact]:
    """Run ``refinery.runner MODULE`` out of process through Dagster Pipes; return its result."""
    refinery = context.resources.refinery
    home = refinery.home_path()
    command = [python or sys.executable, "-m", "refinery.runner", module]
    lineage = {}
    for name in inputs:
        art = upstream_artifact(context, name, home)
        command += ["--input", f"{name}={art.path}"]
        lineage[f"input.{name}"] = art.version
    env = {**OFFLINE_ENV, **refinery.env()}
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env[key] = os.environ.get(key, env[key])  # an online 8B run may turn the hub back on
    client = context.resources.pipes
    if isinstance(client, dg.PipesSubprocessClient):
        invocation = client.run(command=command, context=context, env=env, cwd=str(PROJECT_ROOT))
    else:  # e.g. PipesK8sClient: same command in the cluster image (docs/cluster.md)
        invocation = client.run(command=command, context=context, env=env)
    result = invocation.get_materialize_result()
    artifact = load_artifact(Path(str(result.metadata["path"].value)))
    metadata = {**result.metadata, **lineage}
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(artifact.version)), artifact


def png_markdown(fig: Any, alt: str) -> dg.MetadataValue:
    """A matplotlib figure as Markdown with an inline PNG (the Dagster UI renders it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})")


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> dg.MetadataValue:
    if not rows:
        return dg.MetadataValue.md("_none_")
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")).replace("|", "\\|").replace("\n", " ")[:120]
                                        for c in columns) + " |")
    return dg.MetadataValue.md("\n".join(lines))
