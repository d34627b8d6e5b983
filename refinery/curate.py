"""deduped_corpus: language ID, decontamination verdicts, exact and near dedup, in that order.

``curate(records, profile, existing=..., contaminated=...)`` gives every record exactly one fate:
kept, or rejected with the first reason that applies, in this order:

1. ``non_english``: p(en) below ``langid.min_score`` (refinery.langid);
2. ``contaminated``: the decontamination step listed its id (``contaminated`` maps id -> detail) and
   ``decontam.action`` is ``remove``; with ``block`` the record stays in the corpus, where the blocking
   check ``no_eval_contamination`` finds it and stops training;
3. ``exact_duplicate``: same normalized dedup key as an earlier record or one already in the
   ``existing`` corpus (refinery.dedup);
4. ``near_duplicate``: exact Jaccard of the shingles >= ``dedup.threshold`` with an earlier kept record.

Rejected records keep every column plus the reason, ``duplicate_of``, ``similarity`` and
``detail``; nothing is deleted. ``read == kept + sum(rejections)`` is checked, per source too.
``write_deduped_corpus`` writes kept/rejected/clusters parquet files and the dedup index
(``dedup_index/``) that a later incremental run passes back as ``existing``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from refinery.config import Profile
from refinery.datastage import (INDEX_DIR, REASONS, StageContext, Tally, assemble, conversation_chars,
                                dedup_verdicts, length_percentiles, map_batch)
from refinery.dedup import DedupIndex, Features, NormBatch
from refinery.langid import LanguageIdentifier
from refinery.records import CLUSTER_SCHEMA, KEPT_SCHEMA, RECORD_SCHEMA, REJECTED_SCHEMA, write_table

__all__ = ["INDEX_DIR", "REASONS", "CurateResult", "conversation_chars", "curate", "length_percentiles",
           "write_deduped_corpus"]


@dataclass
class CurateResult:
    kept: pa.Table  # KEPT_SCHEMA
    rejected: pa.Table  # REJECTED_SCHEMA
    clusters: pa.Table  # CLUSTER_SCHEMA
    counts: dict[str, int]  # read, kept, non_english, contaminated, exact_duplicate, near_duplicate
    per_source: dict[str, dict[str, int]]
    languages: dict[str, int]  # label -> records (all records read)
    length_percentiles: dict[str, dict[str, float]]  # source -> p50/p90/p99 characters (kept records)
    index: DedupIndex
    stats: dict[str, Any] = field(default_factory=dict)  # timings, LSH parameters, candidate counts


def curate(records: pa.Table, profile: Profile, *, existing: Path | None = None,
           contaminated: dict[str, str] | None = None, log: Callable[[str], None] | None = None) -> CurateResult:
    """Language ID, decontamination, exact and near dedup of an in-memory ``records`` table
    (RECORD_SCHEMA): the steps of refinery.datastage, with the texts kept in memory instead of
    spilled (landing batches, tests). ``contaminated`` maps id -> detail from the decontam step."""
    t0, c0 = time.perf_counter(), time.process_time()
    records = records.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
    ctx = StageContext(profile, LanguageIdentifier(profile.langid))
    parts = records.to_batches(max_chunksize=profile.data_engine.batch_records) or [
        pa.RecordBatch.from_pylist([], schema=RECORD_SCHEMA)]
    mapped = [map_batch(b, ctx, contaminated) for b in parts]
    t_map, c_map = time.perf_counter(), time.process_time()
    norm = NormBatch.concat([m.norm for m in mapped])
    feats = Features.concat([m.features for m in mapped])
    bands = feats.bands.copy()  # dedup_verdicts consumes them; the index rows need them after
    ids = [i for m in mapped for i in m.ids]
    index = DedupIndex.load(Path(existing) / INDEX_DIR, profile.dedup) if existing is not None else None
    verdicts = dedup_verdicts(ids, feats, norm.take, norm.ends - norm.starts, profile, index)
    t_dedup = time.perf_counter()
    tally = Tally()
    kept, rejected, clusters = [], [], []
    lo = 0
    for batch, m in zip(parts, mapped):
        part = slice(lo, lo + len(m.dedup_rows))
        k, r, c = assemble(batch, m, verdicts.kind[part], verdicts.dup_of[part], verdicts.similarity[part], tally)
        kept.append(k)
        rejected.append(r)
        clusters.append(c)
        lo = part.stop
    counts, per_source, languages, percentiles = tally.result()
    _reconcile(counts, per_source)
    keep = np.flatnonzero(verdicts.kind == 0)
    index = index or DedupIndex.empty(profile.dedup)
    index.append([ids[i] for i in keep.tolist()], feats.exact[keep], bands[keep], norm.take(keep))
    t_end = time.perf_counter()
    stats = {"dedup": verdicts.stats, "langid_model": str(ctx.ident.path),
             "seconds": {"map": t_map - t0, "dedup": t_dedup - t_map, "tables": t_end - t_dedup, "total": t_end - t0},
             "cpu_seconds": {"map": c_map - c0, "total": time.process_time() - c0}}
    if log:
        log(f"curate: read {counts['read']}, kept {counts['kept']}, " + ", ".join(f"{r} {counts[r]}" for r in REASONS))
    return CurateResult(pa.concat_tables(kept), pa.concat_tables(rejected), pa.concat_tables(clusters), counts,
                        per_source, languages, percentiles, index, stats)


def _reconcile(counts: dict[str, int], per_source: dict[str, dict[str, int]]) -> None:
    """read == kept + every rejection, overall and per source: a bug here would lose records."""
    for where, c in [("all sources", counts)] + list(per_source.items()):
        if c["read"] != c["kept"] + sum(c[r] for r in REASONS):
            raise AssertionError(f"curate {where}: read {c['read']} != kept {c['kept']} + "
                                 + " + ".join(f"{r} {c[r]}" for r in REASONS))


def write_deduped_corpus(result: CurateResult, out_dir: Path) -> dict[str, Any]:
    """kept.parquet, rejected.parquet, clusters.parquet and dedup_index/; returns manifest metrics."""
    out_dir = Path(out_dir)
    kept = write_table(out_dir / "kept.parquet", result.kept, KEPT_SCHEMA)
    rejected = write_table(out_dir / "rejected.parquet", result.rejected, REJECTED_SCHEMA)
    clusters = write_table(out_dir / "clusters.parquet", result.clusters, CLUSTER_SCHEMA)
    if kept != result.counts["kept"] or kept + rejected != result.counts["read"]:
        raise AssertionError(f"wrote {kept} kept + {rejected} rejected rows, expected "
                             f"{result.counts['kept']} + {result.counts['read'] - result.counts['kept']}")
    result.index.save(out_dir / INDEX_DIR)
    english_share = (result.kept.num_rows and
                     float(np.mean(np.asarray(result.kept["lang"].to_pylist()) == "en")))
    return {"counts": result.counts, "per_source": result.per_source, "languages": result.languages,
            "length_percentiles": result.length_percentiles, "clusters": clusters,
            "index_records": len(result.index), "kept_english_share": english_share, "stats": result.stats}
