"""Artifacts are published atomically with a manifest; a crash leaves nothing that looks finished."""

import json

import pytest

from refinery.artifacts import MANIFEST, latest, load_artifact, require_latest, staged_artifact


def test_publish_writes_manifest_and_latest(tmp_path):
    with staged_artifact("demo_stage", config={"a": 1}, home=tmp_path) as st:
        (st.path / "model").mkdir()
        (st.path / "model" / "w.bin").write_bytes(b"\x00" * 10)
        st.metrics["answer"] = 42
    art = latest("demo_stage", home=tmp_path)
    assert art is not None and art.path.name == st.version
    assert art.manifest["files"]["model/w.bin"]["bytes"] == 10
    assert art.manifest["metrics"] == {"answer": 42} and art.manifest["config"] == {"a": 1}
    assert art.verify() == []
    (art.path / "model" / "w.bin").write_bytes(b"\x01" * 10)
    assert art.verify() == ["model/w.bin"]


def test_crash_leaves_no_finished_artifact(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_artifact("demo_stage", home=tmp_path) as st:
            (st.path / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert latest("demo_stage", home=tmp_path) is None
    stage_dir = tmp_path / "artifacts" / "demo_stage"
    assert not [p for p in stage_dir.iterdir() if (p / MANIFEST).exists()]
    with pytest.raises(FileNotFoundError, match="materialize demo_stage first"):
        require_latest("demo_stage", home=tmp_path)


def test_directory_without_manifest_is_not_an_artifact(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="not a finished artifact"):
        load_artifact(tmp_path / "x")


def test_latest_moves_to_newest(tmp_path):
    versions = []
    for i in range(2):
        with staged_artifact("s", home=tmp_path) as st:
            (st.path / "f").write_text(str(i))
        versions.append(st.version)
    assert latest("s", home=tmp_path).version == versions[-1]
    pointer = json.loads((tmp_path / "artifacts" / "s" / "LATEST").read_text())
    assert pointer["version"] == versions[-1]
