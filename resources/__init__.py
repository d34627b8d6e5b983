"""Dagster resources: the selected profile and home directory, and the DuckDB statistics file."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from refinery.config import Profile, home_dir, load_profile


class RefineryResource(dg.ConfigurableResource):
    """Which profile a run uses (REFINERY_PROFILE, default demo) and where it writes (REFINERY_HOME)."""

    profile: str = ""
    home: str = ""

    def load_profile(self) -> Profile:
        return load_profile(self.profile or None)

    def home_path(self) -> Path:
        path = Path(self.home).resolve() if self.home else home_dir()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def env(self) -> dict[str, str]:
        """Environment for out-of-process stages: the same profile and home as this run."""
        return {"REFINERY_PROFILE": self.profile or os.environ.get("REFINERY_PROFILE", "demo"),
                "REFINERY_HOME": str(self.home_path())}


def stats_database() -> str:
    return str(home_dir() / "refinery.duckdb")


def build_resources() -> dict[str, object]:
    return {
        "refinery": RefineryResource(profile=os.environ.get("REFINERY_PROFILE", ""),
                                     home=os.environ.get("REFINERY_HOME", "")),
        "duckdb": DuckDBResource(database=stats_database()),
        "pipes": dg.PipesSubprocessClient(),
    }
