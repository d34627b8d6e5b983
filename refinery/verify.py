"""Re-verification of a published deduped_corpus: the seed's "verify" step, made repeatable.

A fixed-seed sample of ``verify.sample_size`` kept records is classified again with the language
identifier and deduplicated again within itself (refinery.dedup, the same exact and MinHash rules
curation used); the manifest checksums are re-checked. The measures are compared with the previous
verification (``refinery.stats.last_verification``): an English share or a duplicate rate that
moved by more than ``verify.max_english_drift`` / ``verify.max_duplicate_drift`` fails. Drift is a
change alarm between consecutive verifications; a file that changed on disk also fails the
integrity part every time until the corpus is rebuilt.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from refinery.artifacts import Artifact
from refinery.config import DedupConfig, LangIdConfig, Profile
from refinery.dedup import dedup_key, find_duplicates, normalize_many

SAMPLE_SEED = 0  # the same records are sampled every time, so drift is the data's, not the sampler's


@dataclass(frozen=True)
class Verification:
    """One row of the ``verifications`` table (refinery.stats)."""

    verification_id: str
    artifact_version: str
    corpus_records: int
    sample_size: int
    english_share: float  # share of sampled records whose top language is English
    exact_dup_rate: float  # sampled records that exactly repeat another sampled record
    near_dup_rate: float  # sampled records that are near duplicates of another sampled record
    previous_id: str | None
    english_drift: float | None
    exact_dup_drift: float | None
    near_dup_drift: float | None
    max_english_drift: float
    max_duplicate_drift: float
    integrity_failures: str  # comma-separated files whose SHA-256 changed; "" when intact

    @property
    def drift_ok(self) -> bool:
        return drift_failures(asdict(self)) == []

    @property
    def passed(self) -> bool:
        return self.drift_ok and not self.integrity_failures

    def row(self, *, run_id: str = "", profile: str = "") -> dict[str, Any]:
        return {**asdict(self), "run_id": run_id, "profile": profile, "passed": self.passed}


def drift_failures(v: dict[str, Any]) -> list[str]:
    """Which measures of a verification row moved beyond their threshold (empty: within bounds)."""
    failed = []
    for measure, limit in (("english_drift", "max_english_drift"), ("exact_dup_drift", "max_duplicate_drift"),
                           ("near_dup_drift", "max_duplicate_drift")):
        if v.get(measure) is not None and v[measure] > v[limit]:
            failed.append(f"{measure} {v[measure]:.4f} > {v[limit]}")
    return failed


def sample_table(path: Path, n: int, seed: int = SAMPLE_SEED) -> tuple[pa.Table, int]:
    """Up to ``n`` rows (id, source, messages) of a Parquet file, chosen with a fixed seed; and its row count."""
    table = pq.read_table(path, columns=["id", "source", "messages"])
    total = table.num_rows
    if total > n:
        rows = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
        table = table.take(pa.array(rows))
    return table, total


def exact_duplicates(ids: Sequence[str], messages: Sequence[list[dict[str, str]]], key: str,
                     limit: int = 5) -> tuple[int, list[dict[str, Any]]]:
    """Records whose normalized dedup key repeats an earlier one (curation's exact rule):
    (how many, a few groups as {copies, ids})."""
    groups: dict[str, list[str]] = {}
    texts = normalize_many([dedup_key(m, key) for m in messages])
    for rid, text in zip(ids, texts, strict=True):  # keyed by the text itself: no hash collision to rule out
        groups.setdefault(text, []).append(rid)
    repeated = sorted((g for g in groups.values() if len(g) > 1), key=len, reverse=True)
    return sum(len(g) - 1 for g in repeated), [{"copies": len(g), "ids": g[:3]} for g in repeated[:limit]]


def measure(table: pa.Table, langid: LangIdConfig, dedup: DedupConfig) -> dict[str, float]:
    """English share and exact / near duplicate rates of a record table (re-computed from the text)."""
    from refinery.langid import LanguageIdentifier, langid_text

    n = table.num_rows
    if n == 0:
        return {"english_share": 0.0, "exact_dup_rate": 0.0, "near_dup_rate": 0.0}
    messages = table.column("messages").to_pylist()
    ids = table.column("id").to_pylist()
    labels, _, _ = LanguageIdentifier(langid).classify_arrays([langid_text(m, langid) for m in messages])
    # ids are made unique here: a copied record has the same id, and the rates count records
    dups = find_duplicates([f"{i}#{k}" for k, i in enumerate(ids)], [dedup_key(m, dedup.key) for m in messages], dedup)
    return {"english_share": sum(lab == langid.english_label for lab in labels) / n,
            "exact_dup_rate": dups.status.count("exact_duplicate") / n,
            "near_dup_rate": dups.status.count("near_duplicate") / n}


def verify_corpus(artifact: Artifact, profile: Profile, *, previous: dict[str, Any] | None = None,
                  seed: int = SAMPLE_SEED) -> Verification:
    """Sample the kept records of a deduped_corpus artifact, measure them, compare with ``previous``."""
    sample, total = sample_table(artifact.path / "kept.parquet", profile.verify.sample_size, seed)
    m = measure(sample, profile.langid, profile.dedup)

    def drift(name: str) -> float | None:
        return None if previous is None else round(abs(m[name] - previous[name]), 6)

    return Verification(
        verification_id=uuid.uuid4().hex[:12], artifact_version=artifact.version, corpus_records=total,
        sample_size=sample.num_rows, english_share=m["english_share"], exact_dup_rate=m["exact_dup_rate"],
        near_dup_rate=m["near_dup_rate"], previous_id=None if previous is None else previous["verification_id"],
        english_drift=drift("english_share"), exact_dup_drift=drift("exact_dup_rate"),
        near_dup_drift=drift("near_dup_rate"), max_english_drift=profile.verify.max_english_drift,
        max_duplicate_drift=profile.verify.max_duplicate_drift, integrity_failures=", ".join(artifact.verify()))
