"""deduped_corpus: language ID, decontamination verdicts, exact and near dedup, in that order.

``curate(records, profile, existing=..., contaminated=...)`` gives every record exactly one fate:
kept, or rejected with the first reason that applies, in this order:

1. ``non_english``: p(en) below ``langid.min_score`` (refinery.langid);
2. ``contaminated``: the decontamination step listed its id (``contaminated`` maps id -> detail);
3. ``exact_duplicate``: same normalized dedup key as an earlier record or one already in the
   ``existing`` corpus (refinery.dedup);
4. ``near_duplicate``: exact Jaccard of the shingles >= ``dedup.threshold`` with an earlier kept record.

Rejected records keep every column plus the reason, ``duplicate_of``, ``similarity`` and
``detail``; nothing is deleted. ``read == kept + sum(rejections)`` is checked, per source too.
``write_deduped_corpus`` writes kept/rejected/clusters parquet files and the dedup index
(``dedup_index/``) that a later incremental run passes back as ``existing``.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from refinery.config import IngestConfig, Profile
from refinery.dedup import DedupIndex, find_duplicates, normalize_many
from refinery.formats import RecordError, detect_format, to_messages
from refinery.ingest import SourceError, file_records
from refinery.langid import LanguageIdentifier
from refinery.records import (CLUSTER_SCHEMA, KEPT_SCHEMA, RECORD_SCHEMA, REJECTED_SCHEMA, ROLES, record_id,
                              write_table)

REASONS = ("non_english", "contaminated", "exact_duplicate", "near_duplicate")
INDEX_DIR = "dedup_index"


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


def joined_text(messages: pa.ChunkedArray | pa.Array, roles: Sequence[str], sep: str,
                max_chars: int | None = None) -> list[str]:
    """Per record, the contents of the turns whose role is in ``roles`` joined with ``sep``, cut to
    ``max_chars`` (Arrow kernels, no Python dict per message; equal to refinery.langid.langid_text's
    and refinery.dedup.dedup_key's joins, see tests/test_curate.py)."""
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    n = len(messages)
    flat = pc.list_flatten(messages)
    parents = pc.list_parent_indices(messages).to_numpy()
    keep = pc.is_in(flat.field("role"), pa.array(list(roles))).to_numpy(zero_copy_only=False)
    contents = flat.field("content").filter(pa.array(keep))
    counts = np.bincount(parents[keep], minlength=n)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    lists = pa.ListArray.from_arrays(offsets, contents)
    joined = pc.fill_null(pc.binary_join(lists, sep), "")
    if max_chars is not None:
        joined = pc.utf8_slice_codeunits(joined, 0, max_chars)
    return joined.to_pylist()


def length_percentiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    p = np.percentile(values, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}


def curate(records: pa.Table, profile: Profile, *, existing: Path | None = None,
           contaminated: dict[str, str] | None = None, log: Callable[[str], None] | None = None) -> CurateResult:
    """Language ID, decontamination, exact and near dedup of ``records`` (RECORD_SCHEMA)."""
    t0, c0 = time.perf_counter(), time.process_time()
    records = records.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
    n = records.num_rows
    ids = records["id"].to_pylist()
    messages = records["messages"]
    reason: list[str | None] = [None] * n
    duplicate_of: list[str | None] = [None] * n
    similarity: list[float | None] = [None] * n
    detail: list[str | None] = [None] * n

    # 1. language
    lcfg = profile.langid
    ident = LanguageIdentifier(lcfg)
    roles = ("user",) if lcfg.text == "user" else ("user", "assistant")
    labels: list[str] = []
    scores_parts, p_en_parts = [], []
    for lo in range(0, n, 50_000):
        part = ident.classify_arrays(joined_text(messages.slice(lo, 50_000), roles, " ", lcfg.max_chars))
        labels += part[0]
        scores_parts.append(part[1])
        p_en_parts.append(part[2])
    scores = np.concatenate(scores_parts) if scores_parts else np.empty(0)
    p_en = np.concatenate(p_en_parts) if p_en_parts else np.empty(0)
    english = ident.is_english(p_en)
    for i in np.flatnonzero(~english):
        reason[i] = "non_english"
    t_lang, c_lang = time.perf_counter(), time.process_time()

    # 2. decontamination verdicts from the decontam step
    for i, rid in enumerate(ids):
        if reason[i] is None and contaminated and rid in contaminated:
            reason[i] = "contaminated"
            detail[i] = contaminated[rid]

    # 3-4. exact and near dedup of what is left, against the existing corpus's index
    dcfg = profile.dedup
    index = DedupIndex.load(Path(existing) / INDEX_DIR, dcfg) if existing is not None else None
    todo = np.array([r is None for r in reason], bool)
    todo_idx = np.flatnonzero(todo)
    key_roles = ("user",) if dcfg.key == "prompt" else ("user", "assistant")
    todo_messages = messages.take(pa.array(todo_idx, pa.int64())) if len(todo_idx) < n else messages
    keys: list[str] = []
    for lo in range(0, len(todo_idx), dcfg.batch_size):  # raw text lives one batch at a time
        keys += normalize_many(joined_text(todo_messages.slice(lo, dcfg.batch_size), key_roles, "\n"))
    del todo_messages
    t_norm, c_norm = time.perf_counter(), time.process_time()
    found = find_duplicates([ids[i] for i in todo_idx], keys, dcfg, index, normalized=True)
    del keys
    for k, i in enumerate(todo_idx):
        if found.status[k] != "kept":
            reason[i] = found.status[k]
            duplicate_of[i] = found.duplicate_of[k]
            similarity[i] = found.similarity[k]
    t_dedup = time.perf_counter()

    # tables
    lang_cols = {"lang": pa.array(labels, pa.string()), "lang_score": pa.array(scores, pa.float64()),
                 "p_en": pa.array(p_en, pa.float64())}
    full = records
    for name, col in lang_cols.items():
        full = full.append_column(name, col)
    kept_mask = np.array([r is None for r in reason], bool)
    kept = full.filter(pa.array(kept_mask)).cast(KEPT_SCHEMA)
    rej_idx = np.flatnonzero(~kept_mask)
    rejected = full.take(pa.array(rej_idx, pa.int64()))
    rejected = (rejected.append_column("reason", pa.array([reason[i] for i in rej_idx], pa.string()))
                .append_column("duplicate_of", pa.array([duplicate_of[i] for i in rej_idx], pa.string()))
                .append_column("similarity", pa.array([similarity[i] for i in rej_idx], pa.float64()))
                .append_column("detail", pa.array([detail[i] for i in rej_idx], pa.string()))).cast(REJECTED_SCHEMA)
    clusters = pa.Table.from_pylist(found.clusters, schema=CLUSTER_SCHEMA)

    # counts
    counts = {"read": n, "kept": int(kept_mask.sum()), **{r: 0 for r in REASONS}}
    counts.update(Counter(r for r in reason if r is not None))
    sources = records["source"].to_pylist()
    per_source: dict[str, dict[str, int]] = {}
    for src, r in zip(sources, reason):
        c = per_source.setdefault(src, {"read": 0, "kept": 0, **{x: 0 for x in REASONS}})
        c["read"] += 1
        c[r or "kept"] += 1
    _reconcile(counts, per_source)
    lengths = conversation_chars(kept["messages"])
    kept_sources = np.array(kept["source"].to_pylist(), dtype=object)
    percentiles = {s: length_percentiles(lengths[kept_sources == s]) for s in per_source}
    t_end = time.perf_counter()
    stats = {"dedup": found.stats, "langid_model": str(ident.path),
             "seconds": {"langid": t_lang - t0, "normalize": t_norm - t_lang, "dedup": t_dedup - t_norm,
                         "tables": t_end - t_dedup, "total": t_end - t0},
             "cpu_seconds": {"langid": c_lang - c0, "normalize": c_norm - c_lang, "total": time.process_time() - c0}}
    if log:
        log(f"curate: read {n}, kept {counts['kept']}, " + ", ".join(f"{r} {counts[r]}" for r in REASONS))
    return CurateResult(kept, rejected, clusters, counts, per_source, dict(Counter(labels).most_common()),
                        percentiles, found.index, stats)


def conversation_chars(messages: pa.ChunkedArray) -> np.ndarray:
    """Characters per record, all turns together."""
    arr = messages.combine_chunks()
    per_message = pc.utf8_length(pc.list_flatten(arr).field("content")).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(arr).to_numpy()
    return np.bincount(parents, weights=per_message, minlength=len(arr)).astype(np.int64)


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


# ------------------------------------------------------------------------------------ CLIs


CLI_INPUT_HELP = ("JSONL, JSON, Parquet or CSV: normalized records ('messages'), 'text' rows or records of any "
                  "of the six instruction formats")


class InputError(ValueError):
    """Input a CLI cannot use; the message names the file, the line and the field."""


def read_input(path: Path, *, max_record_bytes: int = IngestConfig().max_record_bytes) -> pa.Table:
    """A file of records for the langid and dedup CLIs, as RECORD_SCHEMA rows.

    Any file ingest reads (JSON lines, JSON array, Parquet, CSV). A record is a normalized one
    (``messages`` of system/user/assistant turns, kept as they are, answered or not), a ``text``
    (one user turn), or a record of one of the six instruction formats (refinery.formats, detected
    per record). The first record that is none of these stops the read with an InputError naming
    its file, line and field: a CLI summary over part of a file would be misleading.
    """
    try:
        items = list(file_records(Path(path), max_record_bytes=max_record_bytes))
    except SourceError as exc:
        raise InputError(str(exc)) from None
    out = []
    for item in items:
        where = f"{item.file}:{item.line}"
        if item.error is not None:
            raise InputError(f"{where}: {item.error}")
        row = item.obj
        if not isinstance(row, dict):
            raise InputError(f"{where}: a record is a JSON object, got {type(row).__name__}")
        if _is_normalized(row.get("messages")):
            messages, fmt = row["messages"], "normalized"
        elif "text" in row and "messages" not in row:
            if not isinstance(row["text"], str):
                raise InputError(f"{where}: field 'text': expected a string, got {type(row['text']).__name__}")
            messages, fmt = [{"role": "user", "content": row["text"]}], "text"
        else:
            fmt = detect_format(row)
            if fmt is None:
                raise InputError(f"{where}: no 'messages', no 'text' and no known format fits the keys "
                                 f"{sorted(row)[:12]}")
            try:
                messages = to_messages(row, fmt)
            except RecordError as exc:
                raise InputError(f"{where}: {fmt} record: " + (f"field '{exc.field}': " if exc.field else "")
                                 + exc.reason) from None
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        out.append({
            "id": str(row.get("id") or record_id(messages)),
            "source": row.get("source") or Path(path).stem,
            "format": row.get("format") or fmt,
            "source_file": row.get("source_file") or item.file,
            "source_line": row.get("source_line") or item.line,
            "license": row.get("license") or "unknown",
            "messages": messages,
            "original": row.get("original") or item.raw,
        })
    return pa.Table.from_pylist(out, schema=RECORD_SCHEMA)


def _is_normalized(messages: Any) -> bool:
    return isinstance(messages, list) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages)


def config_with_flags(cfg: BaseModel, flags: dict[str, Any]) -> BaseModel:
    """``cfg`` with the command-line flags that were given (not None), validated like a profile; an
    InputError names the flag (``--num-perm``), not the config field."""
    try:
        return type(cfg).model_validate({**cfg.model_dump(), **{k: v for k, v in flags.items() if v is not None}})
    except ValidationError as exc:
        raise InputError("; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')} {e['input']!r}: {e['msg']}"
                                   for e in exc.errors())) from None


def run_cli(work: Callable[[], dict[str, Any]]) -> int:
    """Run a CLI: its JSON summary on stdout (exit 0), or one error on stderr (exit 2).

    Bad input, a bad flag value, a missing model or index file are the user's to fix, so they get
    a message, not a traceback.
    """
    try:
        summary = work()
    except (ValueError, OSError) as exc:  # InputError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json.dump(summary, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


def write_cli_output(table: pa.Table, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(out)  # atomic: a crash never leaves a half-written file under the final name
