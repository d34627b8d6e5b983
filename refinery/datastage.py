"""The curation half of the data stage as streaming steps, with memory bounded by configuration.

    records.parquet --(batches of data_engine.batch_records)--> map_batch --> dedup_verdicts --> write
                         language ID, decontamination,             exact keys, LSH candidates,
                         normalized dedup keys, MinHash features   verification, greedy resolution

- ``map_batch`` (one record batch, independent of every other): fastText language ID,
  decontamination against the eval n-gram index, and for the records still in the running, the
  normalized dedup key and its ``refinery.dedup.Features``. It is the step an executor spreads over
  workers: ``local_map`` over forked processes on this machine, refinery.datastage_ray on Ray Data.
- ``dedup_verdicts`` (global, on compact arrays: 128-bit exact keys, band keys, a 16-bit MinHash
  sketch; about 400 bytes a record): exact duplicates, LSH candidates, exact-Jaccard verification
  of the candidates (their texts are read back from the spill, ``dedup.verify_chunk_chars`` at a
  time) and the greedy resolution in record order. Its result does not depend on how the batches
  were mapped, so one process and N workers keep the same records.
- ``write`` (one batch at a time again): the batch re-read from the input, its verdicts attached,
  appended to kept.parquet / rejected.parquet / clusters.parquet, and the kept records' index rows
  to dedup_index/.

The normalized texts are the only thing that grows with the corpus beyond the compact arrays;
they go to a spill file (``Spill``) and are read back only for the pairs being verified.
``refinery.curate.curate`` runs the same steps on an in-memory table.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from refinery.config import Profile
from refinery.dedup import (DedupIndex, Features, NormBatch, Shingling, Utf8Texts, features, first_occurrence,
                            index_params, index_table, near_resolve, normalize_batch, write_index)
from refinery.parallel import WriteBehind, ordered_map
from refinery.records import (CLUSTER_SCHEMA, KEPT_SCHEMA, RECORD_SCHEMA, REJECTED_SCHEMA, TEXT_ROLES, joined_array,
                              joined_text, open_parquet)

REASONS = ("non_english", "contaminated", "exact_duplicate", "near_duplicate")
INDEX_DIR = "dedup_index"


def length_percentiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    p = np.percentile(values, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}


def conversation_chars(messages: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Characters per record, all turns together."""
    arr = messages.combine_chunks() if isinstance(messages, pa.ChunkedArray) else messages
    per_message = pc.utf8_length(pc.list_flatten(arr).field("content")).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(arr).to_numpy()
    return np.bincount(parents, weights=per_message, minlength=len(arr)).astype(np.int64)


# ------------------------------------------------------------------------------------ map


@dataclass
class StageContext:
    """What a worker loads once: the language-ID model and the eval n-gram index."""

    profile: Profile
    ident: Any  # refinery.langid.LanguageIdentifier
    decontam: Any = None  # refinery.decontam.NgramIndex, or None: no decontamination here

    @classmethod
    def build(cls, profile: Profile, eval_texts: dict[str, list[str]] | None = None) -> StageContext:
        from refinery.decontam import NgramIndex
        from refinery.langid import LanguageIdentifier

        index = NgramIndex(eval_texts, profile.decontam.ngram) if eval_texts else None
        return cls(profile, LanguageIdentifier(profile.langid), index)


@dataclass
class Mapped:
    """``map_batch``'s result for one batch: per record (language, contamination) and, for the
    records that reach dedup (``dedup_rows``), their ids, features and normalized keys."""

    lang: list[str]
    lang_score: np.ndarray
    p_en: np.ndarray
    english: np.ndarray
    contaminated: dict[int, str]  # row -> detail (only when decontam.action is remove)
    dedup_rows: np.ndarray  # rows of the batch that go to dedup
    ids: list[str]  # their ids
    features: Features
    norm: NormBatch | Utf8Texts | None  # their normalized keys (as UTF-8 to travel; None once spilled)

    @property
    def rows(self) -> int:
        return len(self.lang)


def map_batch(batch: pa.RecordBatch | pa.Table, ctx: StageContext,
              contaminated: dict[str, str] | None = None) -> Mapped:
    """Language ID, decontamination and dedup features of one batch (RECORD_SCHEMA columns)."""
    profile = ctx.profile
    messages = batch.column("messages")
    labels, scores, p_en = ctx.ident.classify_arrays(
        joined_text(messages, TEXT_ROLES[profile.langid.text], " ", profile.langid.max_chars))
    english = ctx.ident.is_english(p_en)
    ids = batch.column("id").to_pylist()
    found: dict[int, str] = {}
    if profile.decontam.action == "remove":  # block: contaminated records stay for the blocking check
        if contaminated:
            found = {i: contaminated[r] for i, r in enumerate(ids) if english[i] and r in contaminated}
        if ctx.decontam is not None:
            rows = np.flatnonzero(english)
            texts = joined_array(messages.take(pa.array(rows)), TEXT_ROLES["all"], "\n")  # no Python strings
            for i, hit in zip(rows.tolist(), ctx.decontam.find_batch(texts)):
                if hit and i not in found:
                    found[i] = f"{hit[0]}: shares the {len(hit[1].split())}-gram '{hit[1]}'"
    todo = english.copy()
    todo[list(found)] = False
    rows = np.flatnonzero(todo)
    dcfg = profile.dedup
    norm = normalize_batch(joined_array(messages.take(pa.array(rows, pa.int64())), TEXT_ROLES[dcfg.key], "\n"))
    return Mapped(labels, scores, p_en, english, found, rows, [ids[i] for i in rows.tolist()], features(norm, dcfg), norm)


# ------------------------------------------------------------------------------------ spill


_FEATURE_FIELDS = ("exact", "bands", "sig16", "filled")


class Spill:
    """What the map step produces, on disk until it is read: the normalized texts (UTF-8, one
    file), read back by row for verification (the texts of a 50M-record corpus do not fit in
    memory, their pairs to verify do), and the dedup features (a file per array), read back whole
    by ``features`` once every batch is mapped: while map workers run they are not in memory too."""

    def __init__(self, directory: Path | None = None):
        self._file = tempfile.NamedTemporaryFile(prefix="refinery-spill-", dir=directory)
        self._offsets: list[np.ndarray] = [np.zeros(1, np.int64)]
        self._lengths: list[np.ndarray] = []  # code points, for the verification budget
        self._end = 0
        self._all: np.ndarray | None = None  # the offsets as one array, until the next append
        self._feature_files = {f: tempfile.TemporaryFile(prefix=f"refinery-spill-{f}-", dir=directory)
                               for f in _FEATURE_FIELDS}
        self._feature_shapes: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self._rows = self._texts = 0

    def append(self, norm: NormBatch | Utf8Texts | list[str], features: Features | None = None) -> None:
        """Texts at the end of the file: code points, UTF-8 with their lengths (``NormBatch.utf8``,
        what travels from a worker), or strings; and their features, when given."""
        if isinstance(norm, list):
            norm = NormBatch.of(norm)
        utf8 = norm if isinstance(norm, Utf8Texts) else norm.utf8()  # compiled: no Python string per text
        if utf8.chars is None:
            raise ValueError("Spill.append: UTF-8 texts without their lengths in code points")
        if features is not None:
            if len(features) != len(utf8) or self._rows != self._texts:  # row r's features are text r's
                raise ValueError(f"Spill.append: {len(features)} features for {len(utf8)} texts "
                                 f"({self._rows} features for {self._texts} texts before)")
            for f in _FEATURE_FIELDS:
                a = np.ascontiguousarray(getattr(features, f))
                self._feature_shapes.setdefault(f, (a.dtype, a.shape[1:]))
                self._feature_files[f].write(memoryview(a).cast("B"))
            self._rows += len(features)
        self._file.write(memoryview(utf8.data))
        self._offsets.append(self._end + utf8.offsets[1:])
        self._lengths.append(utf8.chars)
        self._texts += len(utf8)
        self._end += int(utf8.offsets[-1])
        self._all = None

    def features(self, cfg: Any) -> Features:
        """Every appended row's features, read into memory (``cfg``: the DedupConfig, for the
        shapes when nothing was appended)."""
        if not self._feature_shapes:
            return Features(np.empty((0, 2), np.uint64), np.empty((0, index_params(cfg)["bands"]), np.uint64),
                            np.empty((0, cfg.num_perm), np.uint16), np.empty(0, np.int32))
        out = {}
        for f, file in self._feature_files.items():
            dtype, shape = self._feature_shapes[f]
            file.flush()
            file.seek(0)
            out[f] = np.fromfile(file, dtype, self._rows * int(np.prod(shape, dtype=np.int64))).reshape(
                (self._rows, *shape))
        return Features(**out)

    def lengths(self) -> np.ndarray:
        return np.concatenate(self._lengths) if self._lengths else np.empty(0, np.int64)

    def take_utf8(self, rows: np.ndarray) -> Utf8Texts:
        """The UTF-8 of ``rows`` (in that order); runs of consecutive rows are one read each."""
        self._file.flush()
        if self._all is None:
            self._all = np.concatenate(self._offsets)
        rows = np.asarray(rows, np.int64)
        lo, hi = self._all[rows], self._all[rows + 1]
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(hi - lo, out=offsets[1:])
        data = np.empty(int(offsets[-1]), np.uint8)
        view = memoryview(data)
        cuts = [0, *(np.flatnonzero(rows[1:] != rows[:-1] + 1) + 1).tolist(), len(rows)]
        fd = self._file.fileno()
        for a, b in zip(cuts, cuts[1:]) if len(rows) else ():
            pos, stop, at = int(offsets[a]), int(offsets[b]), int(lo[a])
            while pos < stop:  # a read may return less than asked
                got = os.preadv(fd, [view[pos:stop]], at)
                if got <= 0:
                    raise OSError(f"spill file: {stop - pos} bytes missing at offset {at}")
                pos, at = pos + got, at + got
        return Utf8Texts(data, offsets)

    def take(self, rows: np.ndarray) -> NormBatch:
        return self.take_utf8(rows).decode()

    def feature_rows(self, field: str, rows: np.ndarray) -> np.ndarray:
        """One feature array's ``rows``, read from its file (not from memory: near dedup consumed it)."""
        dtype, shape = self._feature_shapes[field]
        file = self._feature_files[field]
        file.flush()
        mapped = np.memmap(file, dtype, "r", shape=(self._rows, *shape))
        out = np.array(mapped[np.asarray(rows, np.int64)])
        del mapped
        return out

    def close(self) -> None:
        self._file.close()
        for file in self._feature_files.values():
            file.close()


# ------------------------------------------------------------------------------------ dedup


@dataclass
class Verdicts:
    """Per dedup row (all batches' dedup rows in order): duplicate kind, of which id, similarity."""

    kind: np.ndarray  # uint8: 0 kept, 1 exact, 2 near
    dup_of: list[str | None]
    similarity: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def _compact(a: np.ndarray, rows: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """``a[rows]`` written over the first ``len(rows)`` rows of ``a`` (``rows`` ascending, so no row
    is overwritten before it is read), a chunk at a time."""
    for lo in range(0, len(rows), chunk):
        part = rows[lo:lo + chunk]
        a[lo:lo + len(part)] = a[part]
    return a[:len(rows)]


def dedup_verdicts(ids: Sequence[str], feats: Features, texts_of: Callable[[np.ndarray], NormBatch],
                   lengths: np.ndarray, profile: Profile, index: DedupIndex | None = None, *,
                   map_runs: Callable[..., Any] | None = None) -> Verdicts:
    """Exact then near duplicates of the dedup rows (in record order) and against ``index``.
    Consumes ``feats.sig16`` and ``feats.bands`` (reordered in place, then set to None: they are
    the largest arrays, and a copy of them was the stage's peak); ``exact`` and ``filled`` stay.

    ``texts_of(rows)`` reads the normalized texts of dedup rows; ``map_runs`` computes
    ``verify_pairs``' runs, in a distributed run. Near duplicates come from
    ``refinery.dedup.near_resolve``, which finds the candidates while it resolves (a row is only
    compared with the rows kept before it), in record order, on the driver.
    """
    cfg = profile.dedup
    t0 = time.perf_counter()
    index = index or DedupIndex.empty(cfg)
    e, n = len(index), len(ids)
    first = first_occurrence(np.concatenate([index.exact, feats.exact]) if e else feats.exact)[e:]
    exact_dup = first != np.arange(e, e + n)
    unique = np.flatnonzero(~exact_dup)
    k = cfg.num_perm
    bands = np.concatenate([index.bands, feats.bands[unique]]) if e else _compact(feats.bands, unique)
    feats.bands = None
    # the pre-filter sketch is the biggest array (2 bytes x num_perm a record) and nothing reads it
    # after this step: its unique rows move to its front in place instead of into a copy
    sig16 = _compact(feats.sig16, unique)
    feats.sig16 = None
    sig16 = np.concatenate([np.zeros((e, k), np.uint16), sig16]) if e else sig16  # existing: always verified
    filled = np.concatenate([np.zeros(e, np.int32), feats.filled[unique]]) if e else feats.filled[unique]
    t_cand = time.perf_counter()

    def rows_text(rows: np.ndarray) -> NormBatch:
        old = rows[rows < e]
        fresh = texts_of(unique[rows[rows >= e] - e])
        return NormBatch.concat([index.norm.take(old), fresh]) if len(old) else fresh

    all_lengths = np.concatenate([index.norm.ends - index.norm.starts, lengths[unique]])
    shingling = Shingling.from_config(cfg)
    dup, sim, cstats = near_resolve(bands, sig16, filled, cfg.threshold, rows_text, shingling, all_lengths,
                                    existing=e, max_chars=cfg.verify_chunk_chars, map_runs=map_runs)
    del sig16
    t_verify = time.perf_counter()

    kind = np.zeros(n, np.uint8)
    dup_of: list[str | None] = [None] * n
    similarity = np.full(n, np.nan)
    exact_rows = np.flatnonzero(exact_dup)
    of = first[exact_rows]  # rows of index + dedup rows
    for i, name in zip(exact_rows.tolist(), _names(of, index.ids, ids, np.arange(n), e)):
        kind[i], dup_of[i], similarity[i] = 1, name, 1.0
    near = np.flatnonzero(dup[e:] >= 0)
    for r, i, name in zip(near.tolist(), unique[near].tolist(), _names(dup[e + near], index.ids, ids, unique, e)):
        kind[i], dup_of[i], similarity[i] = 2, name, sim[e + r]
    params = index_params(cfg)
    return Verdicts(kind, dup_of, similarity, {
        "records": n, "existing": e, "bands": params["bands"], "rows": params["rows"], **cstats,
        "rejected_candidates": cstats["bounded_pairs"] + cstats["checked_pairs"] - cstats["verified_pairs"],
        "exact_duplicates": int((kind == 1).sum()), "near_duplicates": int((kind == 2).sum()),
        "seconds": {"exact": t_cand - t0, "near": t_verify - t_cand, "total": time.perf_counter() - t0}})


def _names(rows: np.ndarray, index_ids: Sequence[str], ids: Sequence[str] | pa.Array, fresh: np.ndarray,
           e: int) -> list[str]:
    """The ids of ``rows`` numbered over index rows (< e) then ``fresh[row - e]`` dedup rows."""
    rows = np.asarray(rows, np.int64)
    at = fresh[np.maximum(rows - e, 0)]
    new = (ids.take(pa.array(at, pa.int64())).to_pylist() if isinstance(ids, pa.Array)
           else [ids[k] for k in at.tolist()])
    return [index_ids[j] if j < e else x for j, x in zip(rows.tolist(), new)]


# ------------------------------------------------------------------------------------ assemble


@dataclass
class Tally:
    """What the write step counts while batches go by."""

    counts: Counter = field(default_factory=Counter)
    per_source: dict[str, Counter] = field(default_factory=dict)
    languages: Counter = field(default_factory=Counter)
    lengths: dict[str, list[np.ndarray]] = field(default_factory=dict)  # kept records' characters per source

    def result(self) -> tuple[dict[str, int], dict[str, dict[str, int]], dict[str, int], dict[str, dict[str, float]]]:
        keys = ("read", "kept", *REASONS)
        counts = {k: int(self.counts[k]) for k in keys}
        per_source = {s: {k: int(c[k]) for k in keys} for s, c in self.per_source.items()}
        pct = {s: length_percentiles(np.concatenate(self.lengths.get(s, [np.empty(0)]))) for s in per_source}
        return counts, per_source, dict(self.languages.most_common()), pct


def assemble(batch: pa.RecordBatch | pa.Table, mapped: Mapped, kind: np.ndarray, dup_of: Sequence[str | None],
             similarity: np.ndarray, tally: Tally) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(kept, rejected, clusters) rows of one batch, counted into ``tally``."""
    n = mapped.rows
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    table = table.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
    reason = np.full(n, None, object)
    reason[~mapped.english] = "non_english"
    detail = np.full(n, None, object)
    for i, d in mapped.contaminated.items():
        reason[i], detail[i] = "contaminated", d
    dup = np.full(n, None, object)
    sim = np.full(n, np.nan)
    rows = mapped.dedup_rows
    names = np.array([None, "exact_duplicate", "near_duplicate"], object)
    reason[rows] = names[kind]
    dup[rows] = np.asarray(dup_of, object)
    sim[rows] = similarity
    table = (table.append_column("lang", pa.array(mapped.lang, pa.string()))
             .append_column("lang_score", pa.array(mapped.lang_score, pa.float64()))
             .append_column("p_en", pa.array(mapped.p_en, pa.float64())))
    kept_mask = np.array([r is None for r in reason], bool)
    kept = table.filter(pa.array(kept_mask)).cast(KEPT_SCHEMA)
    rej = np.flatnonzero(~kept_mask)
    rejected = (table.take(pa.array(rej, pa.int64()))
                .append_column("reason", pa.array(reason[rej].tolist(), pa.string()))
                .append_column("duplicate_of", pa.array(dup[rej].tolist(), pa.string()))
                .append_column("similarity", pa.array([None if np.isnan(x) else float(x) for x in sim[rej]],
                                                      pa.float64()))
                .append_column("detail", pa.array(detail[rej].tolist(), pa.string()))).cast(REJECTED_SCHEMA)
    is_dup = np.isin(reason[rej], ["exact_duplicate", "near_duplicate"]) if len(rej) else np.zeros(0, bool)
    clusters = pa.table({"kept_id": rejected["duplicate_of"].filter(pa.array(is_dup)),
                         "removed_id": rejected["id"].filter(pa.array(is_dup)),
                         "kind": pa.array([r.split("_")[0] for r in reason[rej][is_dup]], pa.string()),
                         "similarity": rejected["similarity"].filter(pa.array(is_dup))}, schema=CLUSTER_SCHEMA)
    sources = table["source"].to_numpy(zero_copy_only=False)
    lengths = conversation_chars(kept["messages"]) if kept.num_rows else np.empty(0, np.int64)
    kept_sources = sources[kept_mask]
    for src in np.unique(sources).tolist():
        c = tally.per_source.setdefault(src, Counter())
        mine = sources == src
        c["read"] += int(mine.sum())
        c["kept"] += int((mine & kept_mask).sum())
        for r, m in Counter(reason[mine & ~kept_mask].tolist()).items():
            c[r] += m
        tally.lengths.setdefault(src, []).append(lengths[kept_sources == src])
    tally.counts["read"] += n
    tally.counts["kept"] += int(kept_mask.sum())
    tally.counts.update(reason[~kept_mask].tolist())
    tally.languages.update(mapped.lang)
    return kept, rejected, clusters


# ------------------------------------------------------------------------------------ executors


@dataclass
class StageOutput:
    """What a run of the stage produced (what refinery.curate.write_deduped_corpus returns too)."""

    counts: dict[str, int]
    per_source: dict[str, dict[str, int]]
    languages: dict[str, int]
    length_percentiles: dict[str, dict[str, float]]
    index_records: int
    stats: dict[str, Any]


MapFn = Callable[[Iterable[pa.RecordBatch]], Iterator[Mapped]]


MAP_COLUMNS = ["id", "messages"]  # what map_batch reads: the rest (``original`` is as big) waits for the write


def batches(path: Path, size: int, columns: Sequence[str] = RECORD_SCHEMA.names) -> Iterator[pa.RecordBatch]:
    """The record batches of a Parquet file, ``size`` rows each (the stage's unit of memory)."""
    yield from open_parquet(path).iter_batches(batch_size=size, columns=list(columns))


def _map_to_send(ctx: StageContext, batch: pa.RecordBatch) -> Mapped:
    m = map_batch(batch, ctx)
    m.norm = m.norm.utf8()  # travels as UTF-8 (1 byte a character in English), not code points
    return m


def local_map(ctx: StageContext, workers: int = 1) -> MapFn:
    """map_batch on this machine: in this process, or in ``workers`` forked processes that share
    ``ctx`` (refinery.parallel), the batches in flight bounded and the results in record order."""
    if workers <= 1:
        return lambda stream: (map_batch(b, ctx) for b in stream)

    def forked(stream: Iterable[pa.RecordBatch]) -> Iterator[Mapped]:
        release_free_memory()  # pages the parent freed but kept would be shared, and copied when reused
        return ordered_map(_map_to_send, ctx, stream, workers)

    return forked


def local_workers(records: Path, profile: Profile) -> int:
    """Processes for the local map: ``data_engine.workers``, but one when the input is a single
    batch (a worker would only add its start-up)."""
    rows = pq.ParquetFile(records).metadata.num_rows
    return min(profile.data_engine.workers, -(-rows // profile.data_engine.batch_records)) or 1


def release_free_memory() -> None:
    """Give freed memory back to the system between steps: Arrow's allocator and glibc's malloc
    keep what the map step freed (120 MB at 640K records) unless asked."""
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def run_stage(records: Path, out_dir: Path, profile: Profile, *, map_fn: MapFn,
              existing: Path | None = None, spill_dir: Path | None = None,
              map_runs: Callable[..., Any] | None = None,
              log: Callable[[str], None] | None = None) -> StageOutput:
    """Curate ``records`` (a records.parquet) into ``out_dir``: kept/rejected/clusters parquet and
    dedup_index/, streaming ``data_engine.batch_records`` records at a time. ``map_fn`` maps the
    batches (here or on workers); everything after it is the same for every executor. Pass
    ``map_fn`` without keeping a reference: what it holds (the language-ID model, the eval n-gram
    index) is released once the batches are mapped."""
    t0, c0 = time.perf_counter(), time.process_time()
    size = profile.data_engine.batch_records
    index = DedupIndex.load(Path(existing) / INDEX_DIR, profile.dedup) if existing is not None else None
    spill = Spill(spill_dir)
    try:
        parts: list[Mapped] = []
        id_parts: list[pa.Array] = []  # Arrow, not a list of str: 20 bytes a record instead of ~75
        for m in map_fn(batches(records, size, MAP_COLUMNS)):  # in record order, however the executor cut them
            spill.append(m.norm, m.features)
            id_parts.append(pa.array(m.ids, pa.string()))
            m.norm, m.features, m.ids = None, None, []  # spilled / kept above: only the per-record results stay
            parts.append(m)
        rows = _concat(parts)
        del parts, map_fn
        release_free_memory()
        t_map, c_map = time.perf_counter(), time.process_time()
        if log:
            log(f"data stage: mapped {rows.rows} records in {t_map - t0:.1f} s")
        ids = pa.concat_arrays(id_parts) if id_parts else pa.array([], pa.string())
        del id_parts
        all_feats = spill.features(profile.dedup)
        verdicts = dedup_verdicts(ids, all_feats, spill.take, spill.lengths(), profile, index, map_runs=map_runs)
        t_dedup = time.perf_counter()
        tally = _write(records, out_dir, profile, rows, verdicts, all_feats, ids, spill, index)
    finally:
        spill.close()
    counts, per_source, languages, pct = tally.result()
    if counts["read"] != counts["kept"] + sum(counts[r] for r in REASONS):
        raise AssertionError(f"data stage: read {counts['read']} != kept + rejections {counts}")
    t_end = time.perf_counter()
    stats = {"dedup": verdicts.stats, "batch_records": size,
             "seconds": {"map": t_map - t0, "dedup": t_dedup - t_map, "write": t_end - t_dedup, "total": t_end - t0},
             "cpu_seconds": {"map": c_map - c0, "total": time.process_time() - c0}}
    return StageOutput(counts, per_source, languages, pct, tally.counts["index"], stats)


def _concat(parts: list[Mapped]) -> Mapped:
    """The per-record results of every batch as one (rows numbered over the whole input)."""
    offsets = np.cumsum([0] + [m.rows for m in parts])
    return Mapped([x for m in parts for x in m.lang],
                  np.concatenate([m.lang_score for m in parts] or [np.empty(0)]),
                  np.concatenate([m.p_en for m in parts] or [np.empty(0)]),
                  np.concatenate([m.english for m in parts] or [np.empty(0, bool)]),
                  {int(o) + i: d for m, o in zip(parts, offsets) for i, d in m.contaminated.items()},
                  np.concatenate([m.dedup_rows + o for m, o in zip(parts, offsets)] or [np.empty(0, np.int64)]),
                  [], None, None)


def _write(records: Path, out_dir: Path, profile: Profile, rows: Mapped, verdicts: Verdicts,
           feats: Features, ids: pa.Array, spill: Spill, index: DedupIndex | None) -> Tally:
    """The write pass: each batch again, with its verdicts, appended to the artifact's files
    (written under temporary names and renamed at the end: a crash leaves no partial file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {name: pq.ParquetWriter(out_dir / f".{name}.tmp", schema, compression="zstd")
               for name, schema in (("kept.parquet", KEPT_SCHEMA), ("rejected.parquet", REJECTED_SCHEMA),
                                    ("clusters.parquet", CLUSTER_SCHEMA))}
    tally = Tally()

    def index_parts() -> Iterator[pa.Table]:  # the kept records' index rows, written as they come
        if index is not None and len(index):
            yield index_table(index.ids, index.exact, index.bands, index.texts)
        start = 0
        for batch in batches(records, profile.data_engine.batch_records):
            end = start + batch.num_rows
            lo, hi = np.searchsorted(rows.dedup_rows, [start, end])
            part = slice(int(lo), int(hi))
            mapped = Mapped(rows.lang[start:end], rows.lang_score[start:end], rows.p_en[start:end],
                            rows.english[start:end], {i - start: d for i, d in rows.contaminated.items()
                                                      if start <= i < end},
                            rows.dedup_rows[part] - start, [], feats, None)
            kept, rejected, clusters = assemble(batch, mapped, verdicts.kind[part], verdicts.dup_of[part],
                                                verdicts.similarity[part], tally)
            behind.submit(writers["kept.parquet"].write_table, kept)
            behind.submit(writers["rejected.parquet"].write_table, rejected)
            behind.submit(writers["clusters.parquet"].write_table, clusters)
            keep = np.flatnonzero(verdicts.kind[part] == 0) + part.start
            if len(keep):
                yield index_table(ids.take(pa.array(keep, pa.int64())), feats.exact[keep],
                                  spill.feature_rows("bands", keep), spill.take_utf8(keep).arrow())
            start = end

    behind = WriteBehind()  # a batch's three writes run while the next batch is assembled
    try:
        tally.counts["index"] = write_index(out_dir / INDEX_DIR, index_params(profile.dedup), index_parts())
    finally:
        behind.close(writers.values())
    for name in writers:
        (out_dir / f".{name}.tmp").replace(out_dir / name)
    return tally


def curate_to(records: Path, out_dir: Path, profile: Profile, eval_texts: dict[str, list[str]] | None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The deduped_corpus files from a records.parquet with the profile's executor (local or Ray);
    returns the manifest metrics ``refinery.curate.write_deduped_corpus`` gives for an in-memory run."""
    if profile.data_engine.kind == "ray":
        from refinery.datastage_ray import run_stage_ray

        out = run_stage_ray(records, out_dir, profile, eval_texts=eval_texts, log=log)
    else:
        spill = profile.resolve_path(profile.data_engine.spill_dir) if profile.data_engine.spill_dir else None
        out = run_stage(records, out_dir, profile, map_fn=local_map(StageContext.build(profile, eval_texts),
                                                                    local_workers(records, profile)),
                        spill_dir=spill, log=log)
    lang = pq.read_table(out_dir / "kept.parquet", columns=["lang"])["lang"]
    english = float(pc.mean(pc.cast(pc.equal(lang, profile.langid.english_label), pa.float64())).as_py() or 0.0)
    clusters = pq.ParquetFile(out_dir / "clusters.parquet").metadata.num_rows
    return {"counts": out.counts, "per_source": out.per_source, "languages": out.languages,
            "length_percentiles": out.length_percentiles, "clusters": clusters, "index_records": out.index_records,
            "kept_english_share": english if len(lang) else 0, "stats": out.stats}
