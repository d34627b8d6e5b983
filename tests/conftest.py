"""Shared fixtures: a private refinery home (and Dagster instance directory) per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from refinery.config import resolve_path

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture
def refinery_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh REFINERY_HOME under tmp_path with DAGSTER_HOME inside it, the smoke profile and no hub.

    Override the profile in a test with ``monkeypatch.setenv("REFINERY_PROFILE", ...)``.
    """
    return use_home(tmp_path / "home", monkeypatch)


def use_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point REFINERY_HOME and DAGSTER_HOME at ``home`` (created), with the smoke profile and no hub."""
    from refinery.home import prepare_home

    monkeypatch.setenv("REFINERY_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    monkeypatch.setenv("REFINERY_PROFILE", "smoke")
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    return prepare_home(home)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared public data directory (REFINERY_SHARED_DATA, default ../shared/data); an error, not a skip, when absent."""
    path = resolve_path("${REFINERY_SHARED_DATA:-../shared/data}")
    if not path.is_dir():
        raise FileNotFoundError(f"shared data directory {path} not found: set REFINERY_SHARED_DATA")
    return path


@pytest.fixture(autouse=True)
def _fresh_dagster_state_storage():
    """Dagster keeps the entered instance's state storage in a context variable; one test's
    instance (gone by now) must not be what the next test's definitions resolve against."""
    from dagster._core.storage.defs_state.base import set_defs_state_storage

    with set_defs_state_storage(None):
        yield
