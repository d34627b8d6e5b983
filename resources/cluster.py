"""The Pipes client that runs each heavy stage: a subprocess here, or a GPU pod on Kubernetes.

``profile.cluster`` (refinery.config.ClusterConfig) chooses. For ``kind: k8s`` the client is a
``PipesK8sClient`` that fills in what ``assets.common.run_stage`` does not pass: the image, the
namespace and a pod spec with the GPUs, the shared REFINERY_HOME volume and the HF token secret,
so the assets call it exactly as they call the subprocess client. docs/cluster.md has the setup.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from refinery.config import PROJECT_ROOT, ClusterConfig, home_dir, load_profile

HOME_VOLUME = "refinery-home"


def pod_spec(cfg: ClusterConfig, home: Path) -> dict[str, Any]:
    """The base pod spec of a stage pod: GPUs, resources, REFINERY_HOME at the code server's path."""
    limits: dict[str, str] = {}
    if cfg.gpus:
        limits["nvidia.com/gpu"] = str(cfg.gpus)
    if cfg.cpu:
        limits["cpu"] = cfg.cpu
    if cfg.memory:
        limits["memory"] = cfg.memory
    container: dict[str, Any] = {"name": "stage", "working_dir": cfg.project_dir,
                                 "resources": {"limits": limits, "requests": dict(limits)},
                                 # NCCL and the data loaders need more than the default 64 MB /dev/shm
                                 "volume_mounts": [{"name": "dshm", "mount_path": "/dev/shm"}]}
    volumes: list[dict[str, Any]] = [{"name": "dshm", "empty_dir": {"medium": "Memory"}}]
    if cfg.home_claim:
        # the same path as in the code server: artifacts are passed as paths under it
        container["volume_mounts"].append({"name": HOME_VOLUME, "mount_path": str(home)})
        volumes.append({"name": HOME_VOLUME, "persistent_volume_claim": {"claim_name": cfg.home_claim}})
    if cfg.hf_token_secret:
        container["env"] = [{"name": "HF_TOKEN", "value_from": {"secret_key_ref": {
            "name": cfg.hf_token_secret, "key": "HF_TOKEN"}}}]
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if cfg.node_selector:
        spec["node_selector"] = dict(cfg.node_selector)
    if cfg.gpus:  # GPU nodes are usually tainted so that only GPU work lands there
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if cfg.service_account:
        spec["service_account_name"] = cfg.service_account
    return spec


def pod_command(cfg: ClusterConfig, command: Sequence[str]) -> list[str]:
    """The stage command with this checkout's interpreter mapped to the image's copy of it."""
    python = Path(command[0])
    try:
        mapped = str(Path(cfg.project_dir) / python.relative_to(PROJECT_ROOT))
    except ValueError:  # an interpreter outside the project: the image's default one
        mapped = "python"
    return [mapped, *command[1:]]


@functools.cache
def _k8s_client_class() -> type:
    """Defined on first use: dagster-k8s is an optional extra (pip install -e '.[k8s]')."""
    from dagster_k8s import PipesK8sClient

    class StagePodClient(PipesK8sClient):
        """PipesK8sClient with refinery's image, namespace and stage pod spec filled in."""

        def __init__(self, cfg: ClusterConfig, home: Path):
            super().__init__(load_incluster_config=None if cfg.kubeconfig else True,
                             kubeconfig_file=cfg.kubeconfig)
            self.cluster, self.home = cfg, home

        def run(self, *, context: Any, command: Sequence[str], env: Mapping[str, str] | None = None,
                **kwargs: Any):  # type: ignore[override]
            kwargs.setdefault("image", self.cluster.image)
            kwargs.setdefault("namespace", self.cluster.namespace)
            kwargs.setdefault("base_pod_spec", pod_spec(self.cluster, self.home))
            return super().run(context=context, command=pod_command(self.cluster, command), env=env, **kwargs)

    return StagePodClient


def pipes_client(cfg: ClusterConfig | None = None) -> dg.PipesClient:
    """The ``pipes`` resource for ``cfg`` (default: the selected profile's ``cluster`` section)."""
    cfg = cfg if cfg is not None else load_profile().cluster
    if cfg.kind == "local":
        from resources.pipes import subprocess_client

        return subprocess_client()
    try:
        cls = _k8s_client_class()
    except ImportError:
        raise ImportError("cluster.kind: k8s needs dagster-k8s: pip install -e '.[k8s]'") from None
    return cls(cfg, home_dir())
