"""Artifacts are published atomically with a manifest; a crash leaves nothing that looks finished."""

import json

import pytest

from refinery.artifacts import (MANIFEST, ArtifactCorrupted, clean_stale_staging, latest, load_artifact,
                                require_latest, staged_artifact)


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


def test_two_writers_of_one_identity_do_not_corrupt_each_other(tmp_path):
    """Both write in their own staging directory; the second rename finds the first's finished
    artifact and keeps it (same identity, same content)."""
    outer = staged_artifact("s", home=tmp_path, version="abc")
    first = outer.__enter__()
    (first.path / "f").write_text("same")
    with staged_artifact("s", home=tmp_path, version="abc") as second:
        (second.path / "f").write_text("same")
    outer.__exit__(None, None, None)
    art = load_artifact(tmp_path / "artifacts" / "s" / "abc", verify=True)
    assert first.path == second.path == art.path and (art.path / "f").read_text() == "same"
    assert [p.name for p in (tmp_path / "artifacts" / "s").iterdir() if p.name.startswith(".staging")] == []


def test_stale_staging_of_a_killed_writer_is_removed_on_start(tmp_path):
    """SIGKILL skips every finally block: the staging directory stays until the next start
    removes it, while a live writer's is left alone."""
    import os
    import signal
    import subprocess
    import sys

    code = ("import sys, time; from pathlib import Path; from refinery.artifacts import staged_artifact\n"
            "with staged_artifact('s', home=Path(sys.argv[1])) as st:\n"
            "    (st.path / 'half.bin').write_bytes(b'x' * 1000); print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    with staged_artifact("s", home=tmp_path) as live:  # a concurrent writer that is alive
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        logs = []
        removed = clean_stale_staging(tmp_path, log=logs.append)
        assert len(removed) == 1 and str(proc.pid) in removed[0].name and live.path.exists()
        assert "stale staging" in logs[0]
    assert latest("s", home=tmp_path) is not None


def test_a_changed_file_is_an_error_naming_it(tmp_path):
    with staged_artifact("s", home=tmp_path) as st:
        (st.path / "w.bin").write_bytes(bytes(range(256)))
    path = tmp_path / "artifacts" / "s" / st.version / "w.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupted, match=r"w\.bin"):
        load_artifact(path.parent, verify=True)
