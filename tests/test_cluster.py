"""The Pipes resource from profile.cluster: a subprocess here, a GPU pod per stage on Kubernetes.

Built without a cluster: the pod body is what dagster-k8s itself would submit (its build_pod_body).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster_k8s import PipesK8sClient
from dagster_k8s.pipes import build_pod_body

from refinery.config import PROJECT_ROOT, ClusterConfig, ProfileError, load_profile
from resources import build_resources
from resources.cluster import pipes_client, pod_command, pod_spec
from resources.pipes import CompleteLineTempFileMessageReader

K8S = {"kind": "k8s", "image": "registry.example/refinery:2026.12", "gpus": 1, "memory": "120Gi",
       "home_claim": "refinery-home", "hf_token_secret": "hf-token", "node_selector": {"gpu": "a100-80gb"}}


def _profile_with_cluster(tmp_path: Path, cluster: dict) -> Path:
    raw = yaml.safe_load((PROJECT_ROOT / "profiles" / "smoke.yaml").read_text())
    raw["cluster"] = cluster
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_local_is_the_subprocess_client():
    client = pipes_client(ClusterConfig())
    assert isinstance(client, dg.PipesSubprocessClient)
    assert isinstance(client.message_reader, CompleteLineTempFileMessageReader)


def test_build_resources_gives_a_pod_client_for_a_k8s_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINERY_PROFILE", str(_profile_with_cluster(tmp_path, K8S)))
    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))
    resources = build_resources()
    assert isinstance(resources["pipes"], PipesK8sClient)
    assert resources["pipes"].cluster.image == K8S["image"]
    assert resources["pipes"].load_incluster_config is True  # the code server runs in the cluster


def test_stage_pod_has_the_gpu_shared_home_and_token(tmp_path):
    cfg = ClusterConfig(**K8S)
    home = tmp_path / "home"
    command = [str(PROJECT_ROOT / ".venv-train" / "bin" / "python"), "-m", "refinery.runner", "refinery.train",
               "--input", f"base_model={home}/artifacts/base_model/v1"]
    pod = build_pod_body("refinery-qlora", cfg.image, pod_command(cfg, command),
                         {"REFINERY_HOME": str(home)}, None, pod_spec(cfg, home))
    container = pod.spec.containers[0]
    assert container.image == K8S["image"]
    assert container.command[:2] == ["/opt/refinery/.venv-train/bin/python", "-m"]  # the image's venv
    assert container.command[-1] == f"base_model={home}/artifacts/base_model/v1"  # paths unchanged
    assert container.resources.limits == {"nvidia.com/gpu": "1", "memory": "120Gi"}
    mounts = {m.name: m.mount_path for m in container.volume_mounts}
    assert mounts == {"dshm": "/dev/shm", "refinery-home": str(home)}  # same path as the code server
    claims = {v.name: v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim}
    assert claims == {"refinery-home": "refinery-home"}
    token = next(e for e in container.env if e.name == "HF_TOKEN")
    assert token.value is None and token.value_from.secret_key_ref.name == "hf-token"  # never the value
    assert pod.spec.node_selector == {"gpu": "a100-80gb"} and pod.spec.restart_policy == "Never"


def test_interpreter_outside_the_project_becomes_the_images_python():
    cfg = ClusterConfig(**K8S)
    assert pod_command(cfg, ["/usr/bin/python3", "-m", "refinery.runner"]) == ["python", "-m", "refinery.runner"]


def test_k8s_without_an_image_names_the_key(tmp_path):
    with pytest.raises(ProfileError, match=r"cluster: .*kind k8s needs 'image'"):
        load_profile(str(_profile_with_cluster(tmp_path, {"kind": "k8s"})))
