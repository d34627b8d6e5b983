"""Dagster resources: the selected profile and home directory, and the DuckDB statistics file."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import PrivateAttr

from refinery.config import Profile, freeze_profile, home_dir, load_profile
from resources.cluster import pipes_client


class RefineryResource(dg.ConfigurableResource):
    """Which profile a run uses (REFINERY_PROFILE, default demo) and where it writes (REFINERY_HOME).

    The profile is resolved once per run, when the run starts, and frozen to
    ``<home>/runs/<run_id>/profile.json``; every asset, check and stage subprocess of the run reads
    that copy, so editing the YAML mid-run changes nothing in it (the next run picks it up).
    """

    profile: str = ""
    home: str = ""
    _frozen: Path | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        from refinery.artifacts import clean_stale_staging

        home = self.home_path()
        clean_stale_staging(home, log=context.log.info if context.log else print)
        if context.run_id:
            self._frozen = freeze_profile(load_profile(self.profile or None),
                                          home / "runs" / context.run_id / "profile.json")

    def load_profile(self) -> Profile:
        return load_profile(str(self._frozen) if self._frozen else (self.profile or None))

    def home_path(self) -> Path:
        path = Path(self.home).resolve() if self.home else home_dir()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def env(self) -> dict[str, str]:
        """Environment for out-of-process stages: this run's frozen profile and home."""
        profile = str(self._frozen) if self._frozen else (self.profile or os.environ.get("REFINERY_PROFILE", "demo"))
        return {"REFINERY_PROFILE": profile, "REFINERY_HOME": str(self.home_path())}


def stats_database() -> str:
    return str(home_dir() / "refinery.duckdb")


def build_resources() -> dict[str, object]:
    return {
        "refinery": RefineryResource(profile=os.environ.get("REFINERY_PROFILE", ""),
                                     home=os.environ.get("REFINERY_HOME", "")),
        "duckdb": DuckDBResource(database=stats_database()),
        "pipes": pipes_client(),  # subprocess here, a GPU pod per stage with cluster.kind: k8s
    }
