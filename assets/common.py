"""What every asset shares: finding upstream artifacts, running a stage (or reusing it), plots."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path
from typing import Any

import dagster as dg

from refinery import stages
from refinery.artifacts import Artifact, find, load_artifact, require_latest
from refinery.config import PROJECT_ROOT
from refinery.environment import stage_environment

# Manifest metrics shown as asset metadata (the rest stays in the manifest and report files).
_SHOWN_METRICS = ("perplexity", "perplexity_before", "sparsity", "bits_per_weight", "zst_bytes", "gguf_bytes",
                  "kld_mean", "kld_ci_high", "heldout_kl_before", "heldout_kl_after", "best_step", "steps", "tokens_per_second",
                  "val_loss_first", "val_loss_last", "seconds", "peak_rss_bytes", "device", "export_kld")


class StageFailed(RuntimeError):
    """A stage subprocess that ended without publishing its artifact."""


def upstream_artifact(context: Any, asset: str, home: Path) -> Artifact:
    """The exact artifact the latest materialization of ``asset`` reported (lineage), else LATEST."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is not None and event.asset_materialization is not None:
        path = event.asset_materialization.metadata.get("path")
        if path is not None and Path(str(path.value)).exists():
            return load_artifact(Path(str(path.value)))
    return require_latest(asset, home)


def stage_python(st: stages.Stage) -> str:
    """axolotl lives in its own environment (.venv-train; see Makefile), everything else here."""
    if st.environment == "train":
        from refinery.train import train_python

        return train_python()
    return sys.executable


def artifact_metadata(artifact: Artifact, **extra: Any) -> dict[str, Any]:
    """What the UI shows for a model artifact: where it is, its size, its key figures."""
    metrics = artifact.manifest.get("metrics", {})
    shown = {k: metrics[k] for k in _SHOWN_METRICS if isinstance(metrics.get(k), (int, float, str, bool))}
    return {"path": str(artifact.path), "version": artifact.version, "bytes_on_disk": artifact.manifest["bytes"],
            **shown, **extra}


def run_stage(context: dg.AssetExecutionContext, name: str) -> tuple[dg.MaterializeResult, Artifact]:
    """Materialize stage ``name``: reuse its artifact when its identity exists, else run
    ``refinery.runner`` out of process through Dagster Pipes.

    The artifact store, not the Pipes channel, says what was made: a stage that published its
    artifact counts as done even if its channel broke, and one that did not fails naming itself.
    """
    st = stages.stage(name)
    refinery = context.resources.refinery
    home, profile = refinery.home_path(), refinery.load_profile()
    upstream = {n: upstream_artifact(context, n, home) for n in st.inputs}
    version = stages.identity(st, profile, {n: a.version for n, a in upstream.items()})
    lineage = {f"input.{n}": a.version for n, a in upstream.items()}
    attempt = {"attempt": context.retry_number + 1}
    existing = find(st.name, version, home)
    if existing is not None and not existing.verify():
        context.log.info(f"{st.name} {version}: made before from the same inputs, config and code; reused")
        metadata = artifact_metadata(existing, reused=True, **lineage, **attempt)
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version)), existing

    # Dagster merges its own environment into a subprocess's: refinery.environment re-executes the
    # stage with only what it needs, a secret (HF_TOKEN) only where the stage declares it.
    secrets = [f"--secret={v}" for v in stages.config_values(profile, st.secrets).values() if v]
    command = [sys.executable, "-m", "refinery.environment", *secrets, "--",
               stage_python(st), "-m", "refinery.runner", st.name, "--version", version]
    for n, art in upstream.items():
        command += ["--input", f"{n}={art.path}"]
    env = stage_environment(refinery.env())
    client = context.resources.pipes
    error: Exception | None = None
    try:
        if isinstance(client, dg.PipesSubprocessClient):
            client.run(command=command, context=context, env=env, cwd=str(PROJECT_ROOT))
        else:  # e.g. PipesK8sClient: same command in the cluster image (docs/cluster.md)
            client.run(command=command, context=context, env=env)
    except Exception as exc:  # the artifact store decides below whether the stage got done
        error = exc
    artifact = find(st.name, version, home)
    if artifact is None:
        raise StageFailed(f"stage {st.name} did not publish its artifact {version}"
                          + (f": {type(error).__name__}: {error}" if error else
                             " although its process exited cleanly (see its log lines above)")) from error
    if error is not None:
        context.log.warning(f"{st.name}: published {version}, but its process reported {error!r}")
    metadata = artifact_metadata(artifact, reused=False, **lineage, **attempt)
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version)), artifact


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
