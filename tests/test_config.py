"""Profiles: every shipped profile validates; bad ones fail naming the file and the key."""

from pathlib import Path

import pytest

from refinery.config import PROFILES_DIR, ProfileError, load_profile, resolve_path


@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
def test_shipped_profiles_validate(name):
    profile = load_profile(name)
    assert profile.name == name
    assert Path(profile.source_file).name == f"{name}.yaml"


def test_required_profiles_exist():
    assert {"smoke", "demo", "llama31-8b"} <= {p.stem for p in PROFILES_DIR.glob("*.yaml")}


def test_seed_plan_lives_in_the_8b_profile():
    p = load_profile("llama31-8b")
    assert p.train.load_in_4bit and p.train.lora_r == 64 and p.train.learning_rate == 5e-6
    assert p.train.num_epochs == 3 and p.train.early_stopping_patience and p.train.sample_packing
    assert 0.6 <= p.prune.sparsity <= 0.65
    assert {s.name for s in p.ingest.sources} == {"openorca", "alpaca", "wizardlm", "dolly"}
    assert p.base_model.path == "meta-llama/Llama-3.1-8B"


def _write(tmp_path, text):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    return f


def test_unknown_key_names_file_and_key(tmp_path):
    f = _write(tmp_path, "train:\n  lora_rank: 8\n")
    with pytest.raises(ProfileError) as err:
        load_profile(str(f))
    assert str(f) in str(err.value) and "train.lora_rank" in str(err.value)


def test_wrong_type_names_file_and_key(tmp_path):
    f = _write(tmp_path, "prune:\n  sparsity: lots\n")
    with pytest.raises(ProfileError) as err:
        load_profile(str(f))
    assert "prune.sparsity" in str(err.value)


def test_sparsity_outside_open_interval(tmp_path):
    f = _write(tmp_path, "prune:\n  sparsity: 1.0\n")
    with pytest.raises(ProfileError, match="prune.sparsity"):
        load_profile(str(f))


def test_unknown_profile_lists_known():
    with pytest.raises(ProfileError, match="known profiles"):
        load_profile("no-such-profile")


def test_env_expansion(monkeypatch, tmp_path):
    monkeypatch.setenv("REFINERY_SHARED_DATA", str(tmp_path))
    assert resolve_path("${REFINERY_SHARED_DATA:-../x}/mmlu") == tmp_path / "mmlu"
    monkeypatch.delenv("REFINERY_SHARED_DATA")
    assert resolve_path("${REFINERY_SHARED_DATA:-relative/dir}").is_absolute()
