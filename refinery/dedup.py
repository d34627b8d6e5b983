"""Exact and near-duplicate detection: normalized-text hashing, then MinHash LSH verified by exact Jaccard.

Steps (each a function over arrays, so that the in-memory ``find_duplicates``, the streaming data
stage (refinery.datastage) and its Ray executor run the same code; the inner loops are compiled
with numba in refinery.dedup_kernels; docs/data.md has the measurements behind the defaults):

1. ``normalize_batch``: NFKC, lower case, Unicode punctuation (category P) deleted, every run of
   whitespace turned into one space, trimmed. Symbols ($ + = < >) and digits are kept: they change
   the meaning of math and code. The result is a ``NormBatch`` (code points + offsets).
2. Exact: two 64-bit hashes per normalized text; equal 128-bit keys are exact duplicates.
3. Shingles: character n-grams (default 5) or word n-grams of the normalized text, each hashed to
   64 bits.
4. ``MinHasher``: one-permutation MinHash (Li, Owen & Zhang 2012) with rotation densification
   (Shrivastava & Li 2014): each shingle hash picks one of ``num_perm`` bins and the bin keeps its
   minimum; ``P[sig_a[k] == sig_b[k]]`` is still the Jaccard similarity, which is what LSH needs.
5. LSH (``candidate_pairs``): ``(bands, rows)`` from ``lsh_params``; EVERY pair of records that
   share a band key is a candidate (no cap on a bucket: templated records make buckets of hundreds),
   counted once (in the first band they share). A candidate whose MinHash estimate is more than
   ``PREFILTER_Z`` standard deviations below the threshold, the deviation taken over the smaller
   record's own filled bins, is dropped; records with fewer than ``PREFILTER_MIN_FILLED`` filled
   bins (short texts) are always verified.
6. ``verify_pairs``: the exact Jaccard of the two shingle sets, recomputed from the normalized
   text; only pairs >= threshold count.
7. ``resolve``: greedy in record order: a record is a near duplicate when it matches an earlier
   *kept* record (the most similar one is its ``duplicate_of``); matching only removed records does
   not remove it, so clusters never chain through records that are gone.

``near_resolve`` is what ``find_duplicates`` and the data stage run: steps 5-7 streamed together,
with the same result. Since only kept records can remove a record, a record is compared only with
the kept records of its buckets (removed ones are never comparators), in blocks of record order,
and a pair goes to the exact check only when the MinHash pre-filter and an exact upper bound of its
Jaccard (set sizes, then a merge of both records' rarest shingles) leave it possible. Templated
corpora (buckets of thousands) no longer materialize every pair of a bucket.

``DedupIndex`` holds what later batches are deduplicated against (ids, exact hashes, band keys,
normalized text); ``save``/``load`` persist it next to deduped_corpus's parquet files.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from refinery import dedup_kernels as K
from refinery.config import DedupConfig
from refinery.records import TEXT_ROLES, float_array, joined_array, message_text, numeric_array, numpy_of, string_array

U64 = np.uint64
INDEX_VERSION = 2  # 2: 128-bit exact keys, shingle hashes of refinery.dedup_kernels
PREFILTER_Z = 4.5  # candidates this many standard deviations below the threshold skip the exact check
PREFILTER_MIN_FILLED = 32  # records with fewer filled MinHash bins are always verified exactly
VERIFY_CHUNK_CHARS = 8_000_000  # characters of text verified at once (memory: ~12 bytes each)

# ------------------------------------------------------------------------------------ normalize

_TABLES: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
_TABLE_SIZE = 0x20000  # above: CJK extensions, tags, private use; no P*, space or case there
# lower() is not one code point to one code point for these (U+0130 becomes two; a capital sigma
# depends on its neighbours): texts that contain them are lower-cased by Python first
_CONTEXT_LOWER = ("\u0130", "\u03a3")
CHUNK_BYTES = 4_000_000  # text normalized and hashed at once: its buffers stay small and get reused


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class, lower, stable): code point -> 0 keep / K.PUNCT / K.SPACE; code point -> lower case;
    code point -> True where ``_nfkc`` cannot change a text made of such code points (NFKC maps it
    to itself, it combines with nothing before it, and Python lower-cases it on its own)."""
    global _TABLES
    if _TABLES is None:  # built once per process (0.1 s; the CLI builds it while the input is read)
        cls = np.zeros(_TABLE_SIZE, np.uint8)
        lower = np.arange(_TABLE_SIZE, dtype=np.uint32)
        stable = np.zeros(_TABLE_SIZE, bool)
        trailers = []  # the second of a canonical pair composes with the first
        for c in range(_TABLE_SIZE):
            ch = chr(c)
            if ch.isspace():
                cls[c] = K.SPACE
            elif unicodedata.category(ch)[0] == "P":
                cls[c] = K.PUNCT
            low = ch.lower()
            if len(low) == 1:
                lower[c] = ord(low)
            stable[c] = not unicodedata.combining(ch) and unicodedata.is_normalized("NFKC", ch)
            parts = unicodedata.decomposition(ch).split()
            if len(parts) == 2 and not parts[0].startswith("<"):
                trailers.append(int(parts[1], 16))
        cls[0] = K.PUNCT  # NUL is dropped
        stable[trailers] = False
        stable[0x1161:0x1176] = stable[0x11A8:0x11C3] = False  # Hangul vowel and final jamo compose too
        stable[[ord(c) for c in _CONTEXT_LOWER]] = False
        _TABLES = cls, lower, stable
    return _TABLES


@dataclass
class NormBatch:
    """Normalized texts as one array of code points: text t is ``cp[starts[t]:ends[t]]``."""

    cp: np.ndarray  # uint32
    starts: np.ndarray  # int64
    ends: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.starts)

    def texts(self) -> list[str]:
        raw = self.cp.tobytes()
        try:
            joined = raw.decode("utf-32-le")
        except UnicodeDecodeError:  # lone surrogates (from surrogateescape): 4x slower, so only then
            joined = raw.decode("utf-32-le", "surrogatepass")
        return [joined[s:e] for s, e in zip(self.starts.tolist(), self.ends.tolist())]

    def chars(self) -> int:
        return int((self.ends - self.starts).sum())

    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    @classmethod
    def of(cls, texts: Sequence[str]) -> NormBatch:
        """Texts taken as they are (already normalized)."""
        lens = np.fromiter(map(len, texts), np.int64, len(texts))
        ends = np.cumsum(lens)
        return cls(_code_points("".join(texts)), ends - lens, ends)

    @classmethod
    def concat(cls, parts: Sequence[NormBatch]) -> NormBatch:
        if not parts:
            return cls.of([])
        shift = np.cumsum([0] + [len(p.cp) for p in parts[:-1]])
        return cls(np.concatenate([p.cp for p in parts]),
                   np.concatenate([p.starts + s for p, s in zip(parts, shift)]),
                   np.concatenate([p.ends + s for p, s in zip(parts, shift)]))

    def take(self, rows: np.ndarray) -> NormBatch:
        """The texts of ``rows`` (in that order), compacted."""
        rows = np.ascontiguousarray(rows, np.int64)
        out = np.empty(int((self.ends[rows] - self.starts[rows]).sum()), np.uint32)
        starts, ends = np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
        K.gather(self.cp, self.starts, self.ends, rows, out, starts, ends)
        return NormBatch(out, starts, ends)

    def view(self, rows: np.ndarray) -> NormBatch:
        """The texts of ``rows`` without copying them (the code points stay shared)."""
        return NormBatch(self.cp, self.starts[rows], self.ends[rows])

    def utf8(self) -> Utf8Texts:
        """The texts as UTF-8 (a quarter of the memory for ASCII; ``Utf8Texts.decode`` reverses it)."""
        out = np.empty(K.utf8_size(self.cp, self.starts, self.ends), np.uint8)
        offsets = np.empty(len(self) + 1, np.int64)
        K.encode_utf8(self.cp, self.starts, self.ends, out, offsets)
        return Utf8Texts(out, offsets, self.lengths())


@dataclass
class Utf8Texts:
    """Texts as UTF-8 bytes, NFKC already applied (``prepare``): text r is
    ``data[offsets[r]:offsets[r + 1]]``, or text ``patch_of[r]`` of ``patch`` when that is >= 0 (the
    few texts NFKC changed: the rest keep sharing Arrow's buffer, uncopied). What normalization
    reads, in chunks, without Python strings."""

    data: np.ndarray  # uint8
    offsets: np.ndarray  # int64, len + 1
    chars: np.ndarray | None = None  # code points per text, when the encoder knew them
    patch: Utf8Texts | None = None
    patch_of: np.ndarray | None = None  # int64 per text, -1 where ``data`` holds it

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sizes(self) -> np.ndarray:
        """Bytes per text (at least its number of code points)."""
        return self._sizes(np.arange(len(self)))[0]

    def _sizes(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bytes of the texts ``rows``, and the rows as ``normalize_utf8`` reads them (-p-1: patch text p)."""
        size = self.offsets[rows + 1] - self.offsets[rows]
        if self.patch is None:
            return size, rows
        p = self.patch_of[rows]
        at = p >= 0
        size[at] = self.patch.offsets[p[at] + 1] - self.patch.offsets[p[at]]
        return size, np.where(at, -p - 1, rows)

    def normalize(self, rows: np.ndarray | None = None, *, plain: bool = False) -> NormBatch:
        """The normalized texts of ``rows`` (all by default), in that order; ``plain``: decoded
        only (texts that are normalized already)."""
        rows = np.arange(len(self), dtype=np.int64) if rows is None else np.ascontiguousarray(rows, np.int64)
        size, where = self._sizes(rows)
        out = np.empty(int(size.sum()), np.uint32)
        starts, ends = np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
        patch = _NO_PATCH if self.patch is None else self.patch  # (not ``or``: an empty batch is falsy)
        n = K.normalize_utf8(self.data, self.offsets, where, *_tables()[:2], plain, out, starts, ends,
                             patch.data, patch.offsets)
        return NormBatch(out[:n].copy() if n < len(out) // 2 else out[:n], starts, ends)

    def decode(self, rows: np.ndarray | None = None) -> NormBatch:
        return self.normalize(rows, plain=True)

    def arrow(self) -> pa.LargeStringArray:
        """The texts as an Arrow string column, over the same bytes when nothing is patched (no
        Python strings)."""
        arr = pa.LargeStringArray.from_buffers(len(self), pa.py_buffer(self.offsets), pa.py_buffer(self.data))
        if self.patch is None:
            return arr
        return pc.replace_with_mask(arr, numeric_array(self.patch_of >= 0), self.patch.arrow())

    def chunks(self, max_bytes: int = CHUNK_BYTES, max_rows: int | None = None) -> Iterator[np.ndarray]:
        """Consecutive row ranges of at most ``max_bytes`` of text (and ``max_rows`` rows), at least one row each."""
        n = len(self)
        lo = 0
        while lo < n:
            hi = int(np.searchsorted(self.offsets, self.offsets[lo] + max_bytes, side="right")) - 1
            hi = min(max(hi, lo + 1), n, lo + max_rows if max_rows else n)
            yield np.arange(lo, hi, dtype=np.int64)
            lo = hi


def _code_points(text: str) -> np.ndarray:
    try:
        return np.frombuffer(text.encode("utf-32-le"), np.uint32)
    except UnicodeEncodeError:  # lone surrogates (from surrogateescape) stay what they are
        return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


def prepare(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> Utf8Texts:
    """Texts (Python strings or an Arrow string column) as UTF-8 with NFKC applied where it
    changes something: only non-ASCII texts go through Python (``unicodedata``), the rest is
    Arrow's buffers as they are. NUL characters are dropped (here or by the compiled pass)."""
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        arr = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
        arr = arr.cast(pa.large_string())
        if arr.null_count:
            arr = pc.fill_null(arr, "")
        texts = _utf8_of_arrow(arr)
        other = np.flatnonzero(~numpy_of(pc.string_is_ascii(arr)))
        if len(other):  # only texts with a code point NFKC may change go through Python
            other = other[K.unstable_texts(texts.data, texts.offsets, other, _tables()[2])]
        if not len(other):
            return texts
        data, offsets = memoryview(texts.data), texts.offsets
        changed = {}
        for i in other.tolist():
            before = str(data[offsets[i]:offsets[i + 1]], "utf-8")
            after = _nfkc(before)
            if after != before:
                changed[i] = after
        if not changed:
            return texts
        texts.patch = _utf8_of_arrow(string_array(list(changed.values())).cast(pa.large_string()))
        texts.patch_of = np.full(len(texts), -1, np.int64)
        texts.patch_of[list(changed)] = np.arange(len(changed))
        return texts
    fixed = [t if t.isascii() else _nfkc(t) for t in texts]
    try:
        return _utf8_of_arrow(pa.array(fixed, pa.large_string()))
    except (UnicodeEncodeError, pa.ArrowInvalid):  # lone surrogates (from surrogateescape): kept as they are
        data = [t.encode("utf-8", "surrogatepass") for t in fixed]
        offsets = np.zeros(len(data) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, data), np.int64, len(data)), out=offsets[1:])
        return Utf8Texts(np.frombuffer(b"".join(data), np.uint8), offsets)


_NO_PATCH = Utf8Texts(np.frombuffer(b"", np.uint8), np.zeros(1, np.int64))


def _utf8_of_arrow(arr: pa.Array) -> Utf8Texts:
    """The buffers of a large_string array without nulls, as numpy views."""
    _, off, data = arr.buffers()
    offsets = np.frombuffer(off, np.int64)[arr.offset:arr.offset + len(arr) + 1]
    return Utf8Texts(np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8), offsets)


def normalize_batch(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> NormBatch:
    """``normalize_text`` over a batch: NFKC per text where needed (``prepare``), then lower
    case, punctuation and whitespace in one compiled pass over the UTF-8 of the batch."""
    return prepare(texts).normalize()


def _nfkc(t: str) -> str:
    t = t.replace("\x00", "")  # NUL is dropped (before NFKC: it would separate combining marks)
    t = t if unicodedata.is_normalized("NFKC", t) else unicodedata.normalize("NFKC", t)
    return t.lower() if any(c in t for c in _CONTEXT_LOWER) else t


def normalize_many(texts: Sequence[str]) -> list[str]:
    return normalize_batch(texts).texts()


def normalize_text(s: str) -> str:
    """NFKC, lower case, punctuation (Unicode P*) deleted, whitespace runs -> one space, trimmed."""
    return normalize_many([s])[0]


def dedup_key(messages: Sequence[dict[str, str]], key: str) -> str:
    """The text compared for duplicates: the user (and assistant) turns, never the system turns."""
    return message_text(messages, TEXT_ROLES[key])


def exact_keys(batch: NormBatch) -> np.ndarray:
    """uint64[n, 2]: the 128-bit exact-duplicate key of each normalized text."""
    out = np.empty((len(batch), 2), U64)
    K.exact_hashes(batch.cp, batch.starts, batch.ends, out)
    return out


# ------------------------------------------------------------------------------------ shingles


class Shingling:
    """Character or word n-grams of normalized text, each hashed to 64 bits (seeded)."""

    def __init__(self, shingle: str = "char", ngram: int = 5, seed: int = 1):
        if shingle not in ("char", "word"):
            raise ValueError(f"shingle must be 'char' or 'word', got {shingle!r}")
        self.shingle, self.ngram = shingle, int(ngram)
        rng = np.random.default_rng(seed)
        self.base = U64(int(rng.integers(1 << 62, dtype=np.int64)) * 2 + 1 | (1 << 63))
        self.salt = U64(int(rng.integers(1 << 62, dtype=np.int64)))

    @classmethod
    def from_config(cls, cfg: DedupConfig) -> Shingling:
        return cls(cfg.shingle, cfg.ngram, cfg.seed)

    def _args(self) -> tuple:
        return self.ngram, self.shingle == "word", self.base, self.salt

    def jaccard(self, batch: NormBatch, pairs: np.ndarray) -> np.ndarray:
        """Exact Jaccard of the shingle sets of batch texts a and b, for each pair (a, b)."""
        out = np.empty(len(pairs), np.float64)
        if len(pairs):
            K.jaccard(batch.cp, batch.starts, batch.ends, np.ascontiguousarray(pairs, np.int64), *self._args(), out,
                      numba.get_num_threads())
        return out

    def hash_sets(self, batch: NormBatch) -> list[set[int]]:
        """The shingle-hash set of each text (for tests and small checks)."""
        buf = np.empty(max(batch.chars(), 1) + 1, U64)
        out = []
        for s, e in zip(batch.starts.tolist(), batch.ends.tolist()):
            m = K._shingles(batch.cp, s, e, *self._args(), buf)
            out.append(set(buf[:m].tolist()))
        return out


def exact_jaccard(shingling: Shingling, texts: Sequence[str], pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard of normalized ``texts[a]``, ``texts[b]`` for each pair."""
    return shingling.jaccard(NormBatch.of(texts), np.asarray(pairs, np.int64).reshape(-1, 2))


# ------------------------------------------------------------------------------------ MinHash


class MinHasher:
    """One-permutation MinHash signatures (uint64[n, num_perm]) of normalized texts."""

    def __init__(self, num_perm: int = 128, *, shingle: str = "char", ngram: int = 5, seed: int = 1):
        self.num_perm = int(num_perm)
        self.shingles = Shingling(shingle, ngram, seed)

    @classmethod
    def from_config(cls, cfg: DedupConfig) -> MinHasher:
        return cls(cfg.num_perm, shingle=cfg.shingle, ngram=cfg.ngram, seed=cfg.seed)

    def signatures(self, texts: Sequence[str] | NormBatch) -> np.ndarray:
        return self.signatures_filled(texts)[0]

    def signatures_filled(self, texts: Sequence[str] | NormBatch, *, parallel: bool = True,
                          ) -> tuple[np.ndarray, np.ndarray]:
        """(signatures, filled): filled[t] is how many bins got a shingle of text t's own.
        ``parallel=False``: in the calling thread only (callers that run their own threads)."""
        batch = texts if isinstance(texts, NormBatch) else NormBatch.of(texts)
        sig = np.empty((len(batch), self.num_perm), U64)
        filled = np.empty(len(batch), np.int32)
        if len(batch) and parallel:
            K.signatures(batch.cp, batch.starts, batch.ends, *self.shingles._args(), sig, filled,
                         numba.get_num_threads())
        elif len(batch):
            K._signatures(batch.cp, batch.starts, batch.ends, *self.shingles._args(), sig, filled, 0, len(batch))
        return sig, filled


# ------------------------------------------------------------------------------------ LSH


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimizing the weighted areas under the
    S-curve 1 - (1 - s^rows)^bands: false positives (s < threshold) and false negatives (s >=
    threshold), as datasketch's MinHashLSH chooses them (integrated here on a fine grid)."""
    best, best_err = (1, 1), math.inf
    lo = np.linspace(0.0, threshold, 2001)
    hi = np.linspace(threshold, 1.0, 2001)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - lo ** r) ** b, lo)
            fn = np.trapezoid((1 - hi ** r) ** b, hi)
            err = fp * (1 - false_negative_weight) + fn * false_negative_weight
            if err < best_err - 1e-12:
                best, best_err = (b, r), err
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int, seed: int) -> np.ndarray:
    """uint64[n, bands]: one key per band, a hash of that band's `rows` signature values."""
    rng = np.random.default_rng(seed + 7919)
    mult = (rng.integers(1 << 62, size=(bands, rows), dtype=np.int64).astype(U64) << U64(1)) | U64(1)
    used = sig[:, : bands * rows].reshape(len(sig), bands, rows)
    keys = (used * mult).sum(axis=2, dtype=U64)
    keys += np.arange(bands, dtype=U64)
    return _fmix64(keys)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h ^= h >> U64(33)
    h *= U64(0xFF51AFD7ED558CCD)
    h ^= h >> U64(33)
    h *= U64(0xC4CEB9FE1A85EC53)
    h ^= h >> U64(33)
    return h


@dataclass
class Features:
    """What near dedup keeps per record between the passes: 128-bit exact key, band keys, the
    low 16 bits of each MinHash value (for the estimate that pre-filters candidates: a spurious
    16-bit match adds 1/65536 per bin) and the number of filled bins."""

    exact: np.ndarray  # uint64[n, 2]
    bands: np.ndarray  # uint64[n, bands]
    sig16: np.ndarray | None  # uint16[n, num_perm]; None once near dedup has consumed it
    filled: np.ndarray  # int32[n]

    def __len__(self) -> int:
        return len(self.exact)

    @classmethod
    def concat(cls, parts: Sequence[Features]) -> Features:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("exact", "bands", "sig16", "filled")))


    def take(self, rows: np.ndarray) -> Features:
        return Features(self.exact[rows], self.bands[rows], self.sig16[rows], self.filled[rows])


def features(batch: NormBatch, cfg: DedupConfig, *, parallel: bool = True) -> Features:
    """Exact keys, band keys and the pre-filter sketch of normalized texts (``parallel``: the
    MinHash kernel on numba's threads; else in the calling thread)."""
    b, r = lsh_params(cfg.threshold, cfg.num_perm, cfg.false_negative_weight)
    sig, filled = MinHasher.from_config(cfg).signatures_filled(batch, parallel=parallel)
    return Features(exact_keys(batch), band_keys(sig, b, r, cfg.seed), sig.astype(np.uint16), filled)


def candidate_pairs(bands: np.ndarray, sig16: np.ndarray, filled: np.ndarray, threshold: float, *,
                    existing: int = 0, only_bands: Sequence[int] | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """int64[m, 2] (earlier, later) rows that share a band key and pass the MinHash pre-filter
    (module docstring, step 5); rows below ``existing`` are an index whose pairs were resolved
    before. ``only_bands`` computes part of the bands (the pairs of a band do not depend on the
    others' split: a pair belongs to the first band it shares), for a distributed run."""
    out = np.empty((1024, 2), np.int64)
    count = comparisons = largest = 0
    for band in (range(bands.shape[1]) if only_bands is None else only_bands):
        order = np.argsort(bands[:, band], kind="stable")  # stable: rows stay in record order in a bucket
        out, count, comp, big = K.band_pairs(order, bands, band, sig16, filled, existing, float(threshold),
                                             PREFILTER_Z, PREFILTER_MIN_FILLED, out, count)
        comparisons += comp
        largest = max(largest, big)
    return out[:count].copy(), {"candidate_pairs": comparisons, "prefiltered_pairs": comparisons - count,
                                "largest_bucket": largest}


def verify_pairs(pairs: np.ndarray, texts_of: Callable[[np.ndarray], NormBatch], shingling: Shingling,
                 lengths: np.ndarray, max_chars: int = VERIFY_CHUNK_CHARS,
                 map_runs: Callable[[Iterator[tuple[NormBatch, np.ndarray]]], Iterator[np.ndarray]] | None = None,
                 ) -> np.ndarray:
    """Exact Jaccard of each pair; ``texts_of(rows)`` gives the normalized texts of sorted unique
    rows and ``lengths[row]`` their lengths. Pairs go in runs whose distinct texts add up to at
    most ``max_chars`` characters, so memory is bounded (a shingle set takes 8 bytes a character).
    ``map_runs`` computes the runs' (texts, local pairs) somewhere else, in order (Ray workers)."""
    sims = np.empty(len(pairs), np.float64)
    if len(pairs) == 0:
        return sims
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))  # pairs of one earlier row together: fewer texts a run
    ordered = np.ascontiguousarray(pairs[order])
    bounds = [0, *K.pair_runs(ordered, np.ascontiguousarray(lengths, np.int64), max_chars).tolist()]

    def runs() -> Iterator[tuple[NormBatch, np.ndarray]]:
        for lo, hi in zip(bounds, bounds[1:]):
            rows = np.unique(ordered[lo:hi])
            yield texts_of(rows), np.searchsorted(rows, ordered[lo:hi])

    results = map_runs(runs()) if map_runs else (shingling.jaccard(b, p) for b, p in runs())
    for lo, hi, part in zip(bounds, bounds[1:], results):
        sims[order[lo:hi]] = part
    return sims


def resolve(pairs: np.ndarray, sims: np.ndarray, threshold: float, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy in row order over verified pairs: (duplicate_of row or -1, similarity) per row."""
    ok = sims >= threshold
    verified, vsims = pairs[ok], sims[ok]
    dup = np.full(n_rows, -1, np.int64)
    sim = np.full(n_rows, np.nan)
    removed = np.zeros(n_rows, bool)
    order = np.lexsort((verified[:, 0], verified[:, 1])) if len(verified) else np.empty(0, np.int64)
    # sorted by the later row: every pair (x, a) is seen before (a, b), so removed[a] is final
    for a, b, s in zip(verified[order, 0].tolist(), verified[order, 1].tolist(), vsims[order].tolist()):
        if removed[a]:
            continue
        if not removed[b] or s > sim[b]:
            dup[b], sim[b] = a, s
        removed[b] = True
    return dup, sim


NEAR_BLOCK_PAIRS = 100_000  # a block resolved at once: at most this many pairs of its own rows share a bucket
COUNT_BITS = 22  # the table of shingle counts that orders shingles rarest first (4M uint32: 16 MB)
BOUND_BUCKET = 32  # rows of a bigger bucket get the exact bounds (their rarest-first prefix)


def _row_chunks(rows: np.ndarray, lengths: np.ndarray, max_chars: int) -> Iterator[np.ndarray]:
    """Consecutive parts of ``rows`` whose texts add up to at most ``max_chars`` characters."""
    ends = np.cumsum(lengths[rows] + 1)
    lo = 0
    while lo < len(rows):
        hi = max(int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + max_chars, side="right")), lo + 1)
        yield rows[lo:hi]
        lo = hi


def near_resolve(bands: np.ndarray, sig16: np.ndarray, filled: np.ndarray, threshold: float,
                 texts_of: Callable[[np.ndarray], NormBatch], shingling: Shingling, lengths: np.ndarray, *,
                 existing: int = 0, max_chars: int = VERIFY_CHUNK_CHARS,
                 map_runs: Callable[[Iterator[tuple[NormBatch, np.ndarray]]], Iterator[np.ndarray]] | None = None,
                 block_pairs: int = NEAR_BLOCK_PAIRS) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The greedy near dedup of rows in record order (module docstring, steps 5-7), streaming:
    (duplicate_of row or -1, similarity, stats) per row; rows below ``existing`` are an index,
    always kept.

    Gives what ``candidate_pairs`` -> ``verify_pairs`` -> ``resolve`` give, without materializing
    every pair of a bucket: a row is compared only with the KEPT rows of its buckets (a removed row
    never decides anything in the greedy rule), a block of rows at a time (``block_pairs`` bounds
    the pairs of a block's own rows sharing a bucket: they are compared with each other before their
    fates are known), and a pair is verified exactly only when nothing rules it out first: for rows
    of big buckets (more than ``BOUND_BUCKET`` rows) exact upper bounds of its Jaccard (sizes, the
    rows' shingle bitmaps, a merge of their rarest shingles: ``dedup_kernels._consider``), for the
    others the MinHash pre-filter.
    ``texts_of(rows)`` gives the normalized texts of sorted unique rows, ``lengths[row]`` their
    lengths; ``map_runs`` computes ``verify_pairs``' runs somewhere else (Ray)."""
    n, n_bands = bands.shape
    dup = np.full(n, -1, np.int64)
    sim = np.full(n, np.nan)
    stats = {"candidate_pairs": 0, "prefiltered_pairs": 0, "bounded_pairs": 0, "checked_pairs": 0,
             "verified_pairs": 0, "largest_bucket": 1 if n else 0}
    if n == 0:
        return dup, sim, stats
    # buckets of more than one row, numbered over all bands (-1: a row alone in its bucket), and
    # where each one's kept rows go in ``members``
    bucket = np.full((n, n_bands), -1, np.int32)
    partnered = np.zeros(n, bool)
    sizes_of = []
    for b in range(n_bands):
        _, inv, cnt = np.unique(bands[:, b], return_inverse=True, return_counts=True)
        multi = cnt > 1
        ids = np.cumsum(multi) - 1 + sum(len(c) for c in sizes_of)
        rows = multi[inv]
        bucket[rows, b] = ids[inv[rows]]
        partnered |= rows
        sizes_of.append(cnt[multi])
        stats["largest_bucket"] = max(stats["largest_bucket"], int(cnt.max()))
    del inv, rows
    capacity = np.concatenate(sizes_of)
    del sizes_of
    live = np.flatnonzero(partnered)
    if len(live) == 0 or not (live >= existing).any():
        return dup, sim, stats
    # rarest-first prefixes of the rows of big buckets (a count pass, then the keys): the exact
    # bounds pay off where a row meets many others; elsewhere a pair goes to the exact check as it is
    lengths = np.ascontiguousarray(lengths, np.int64)
    large = np.append(capacity > BOUND_BUCKET, False)  # the last entry answers bucket -1
    in_large = np.zeros(n, bool)
    for b in range(n_bands):  # a band at a time: no (rows x bands) temporaries
        in_large |= large[bucket[:, b]]
    bounded = np.flatnonzero(in_large)
    del large, in_large
    meta = np.zeros((n, 4), np.int64)  # dedup_kernels.SIZE (-1: no prefix), FILLED, P0, P1
    meta[:, K.SIZE] = -1
    meta[:, K.FILLED] = filled
    stats["bounded_rows"] = len(bounded)
    args = shingling._args()
    shift = np.uint64(64 - COUNT_BITS)
    counts = np.zeros(1 << COUNT_BITS, np.uint32)
    for rows in _row_chunks(bounded, lengths, max_chars):
        t = texts_of(rows)
        K.shingle_counts(t.cp, t.starts, t.ends, *args, counts, shift)
    plen = np.zeros(n, np.int64)
    parts = [np.empty(0, U64)]
    bitmaps = np.empty((len(bounded), K.BITMAP_WORDS + 1), U64)
    bitmap_row = np.full(n, -1, np.int32)
    bitmap_row[bounded] = np.arange(len(bounded))
    done = 0
    for rows in _row_chunks(bounded, lengths, max_chars):
        t = texts_of(rows)
        out = np.empty(int((t.ends - t.starts).sum()) + len(rows), U64)
        offs = np.empty(len(rows) + 1, np.int64)
        sz = np.empty(len(rows), np.int64)
        m = K.prefix_keys(t.cp, t.starts, t.ends, *args, counts, shift, float(threshold), sz, out, offs,
                          bitmaps[done:done + len(rows)])
        parts.append(out[:m].copy())
        meta[rows, K.SIZE] = sz
        done += len(rows)
        plen[rows] = np.diff(offs)
    del counts
    pkeys = np.concatenate(parts)
    del parts
    meta[:, K.P1] = np.cumsum(plen)
    meta[:, K.P0] = meta[:, K.P1] - plen
    del plen
    # each bucket's kept rows (filled in record order), and the block's own lists
    mstart = np.zeros(len(capacity), np.int64)
    np.cumsum(capacity[:-1], out=mstart[1:])
    mfill = np.zeros(len(capacity), np.int64)
    members = np.empty(int(capacity.sum()), np.int32)
    bhead = np.full(len(capacity), -1, np.int64)
    bstamp = np.full(len(capacity), -1, np.int64)
    pos = np.zeros(n, np.int64)
    removed = np.zeros(n, bool)
    K.add_kept(live[live < existing], bucket, mstart, mfill, members)
    todo = live[live >= existing]
    # blocks: few rows where buckets are big, whole batches where they are small (a block costs a
    # round of verification; its rows are compared with each other before their fates are known)
    edges = K.block_edges(todo, bucket, len(capacity), block_pairs)
    blink = np.full((int(np.diff(edges).max()), n_bands), -1, np.int64)
    stats["blocks"] = len(edges) - 1
    threads = max(1, min(numba.get_num_threads(), 8))
    seen = [np.full(n, -1, np.int64) for _ in range(threads)]
    counters = [np.zeros(3, np.int64) for _ in range(threads)]
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        for block_id, (lo, hi) in enumerate(zip(edges[:-1].tolist(), edges[1:].tolist())):
            ys = todo[lo:hi]
            K.block_lists(ys, bucket, bhead, bstamp, blink, pos, block_id)
            cuts = np.linspace(0, len(ys), threads + 1).astype(int)

            def part(i: int, ys: np.ndarray = ys, cuts: np.ndarray = cuts, block_id: int = block_id) -> np.ndarray:
                return K.near_candidates(ys, cuts[i], cuts[i + 1], bucket, mstart, mfill, members, bhead, bstamp,
                                         blink, pos, block_id, seen[i], sig16, meta, pkeys, bitmap_row, bitmaps,
                                         float(threshold), PREFILTER_Z, PREFILTER_MIN_FILLED, counters[i])

            found = list(pool.map(part, range(threads))) if pool else [part(0)]
            pairs = np.concatenate(found) if len(found) > 1 else found[0]
            sims = verify_pairs(pairs, texts_of, shingling, lengths, max_chars, map_runs) if len(pairs) else np.empty(0)
            stats["checked_pairs"] += len(pairs)
            stats["verified_pairs"] += int((sims >= threshold).sum())
            K.resolve_block(ys, pairs, sims, float(threshold), removed, dup, sim, bucket, mstart, mfill, members)
    finally:
        if pool:
            pool.shutdown()
    total = np.sum(counters, axis=0)
    stats["candidate_pairs"], stats["prefiltered_pairs"], stats["bounded_pairs"] = (int(c) for c in total)
    return dup, sim, stats


def first_occurrence(exact: np.ndarray) -> np.ndarray:
    """For each row, the first row with the same 128-bit exact key (itself when it is the first)."""
    if len(exact) == 0:
        return np.empty(0, np.int64)
    order = np.lexsort((np.arange(len(exact)), exact[:, 1], exact[:, 0]))
    e = exact[order]
    new = np.ones(len(e), bool)
    new[1:] = (e[1:] != e[:-1]).any(axis=1)
    first_in_sorted = np.maximum.accumulate(np.where(new, np.arange(len(e)), 0))
    out = np.empty(len(exact), np.int64)
    out[order] = order[first_in_sorted]
    return out


# ------------------------------------------------------------------------------------ index


@dataclass
class DedupIndex:
    """What later batches are deduplicated against: one row per kept record.

    Stored as ``index.parquet`` (id, exact key, band keys, normalized text) and ``index.json``
    (parameters). Band keys depend on the shingling, num_perm, bands/rows and seed; ``load`` with a
    different shingling or banding (or an index of an older version) recomputes them from the
    stored normalized text; a different ``key`` cannot be recomputed (the text is of the other
    key) and is refused.
    """

    params: dict[str, Any]
    ids: list[str] = field(default_factory=list)
    exact: np.ndarray = field(default_factory=lambda: np.empty((0, 2), U64))
    bands: np.ndarray | None = None
    norm: NormBatch = field(default_factory=lambda: NormBatch.of([]))  # the normalized texts

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def texts(self) -> list[str]:
        return self.norm.texts()

    @classmethod
    def empty(cls, cfg: DedupConfig) -> DedupIndex:
        params = index_params(cfg)
        return cls(params, bands=np.empty((0, params["bands"]), U64))

    def append(self, ids: list[str], exact: np.ndarray, bands: np.ndarray, norm: NormBatch) -> None:
        self.ids = self.ids + list(ids)
        self.exact = np.concatenate([self.exact, exact.astype(U64)])
        self.bands = np.concatenate([self.bands, bands]) if self.bands is not None else bands
        self.norm = NormBatch.concat([self.norm, norm])

    def save(self, directory: Path) -> None:
        write_index(Path(directory), self.params, [index_table(self.ids, self.exact, self.bands, self.texts)])

    @classmethod
    def load(cls, directory: Path, cfg: DedupConfig | None = None) -> DedupIndex:
        directory = Path(directory)
        meta_file = directory / "index.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{directory}: no dedup index (index.json missing)")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("version") not in (1, INDEX_VERSION):
            raise ValueError(f"{meta_file}: index version {meta.get('version')}, expected {INDEX_VERSION}")
        table = pq.read_table(directory / "index.parquet")
        params = {k: v for k, v in meta.items() if k != "records"}
        ids = table["id"].to_pylist()
        texts = table["text"].to_pylist()
        want = index_params(cfg) if cfg is not None else {**params, "version": INDEX_VERSION}
        if want["key"] != params["key"]:  # the stored texts and exact hashes are of the other key
            raise ValueError(f"{directory}: dedup index built with key={params['key']!r}, this run uses "
                             f"key={want['key']!r}; rebuild the corpus or use the same key")
        if want != params:  # another shingling, banding or version: rebuild the keys from the text
            if cfg is None:
                raise ValueError(f"{directory}: index of version {params['version']}; load it with the "
                                 "dedup config to rebuild its keys")
            rebuilt = features(NormBatch.of(texts), cfg)
            return cls(want, ids, rebuilt.exact, rebuilt.bands, NormBatch.of(texts))
        exact = np.stack([table["exact_hash"].to_numpy(), table["exact_hash2"].to_numpy()], axis=1).astype(U64)
        flat = pc.list_flatten(table["bands"]).to_numpy()
        return cls(params, ids, exact, flat.astype(U64).reshape(len(ids), params["bands"]), NormBatch.of(texts))


def index_table(ids: Sequence[str] | pa.Array, exact: np.ndarray, bands: np.ndarray,
                texts: Sequence[str] | pa.Array) -> pa.Table:
    return pa.table({
        "id": ids if isinstance(ids, pa.Array) else pa.array(ids, pa.string()),
        "exact_hash": pa.array(exact[:, 0], pa.uint64()),
        "exact_hash2": pa.array(exact[:, 1], pa.uint64()),
        "bands": pa.FixedSizeListArray.from_arrays(pa.array(bands.reshape(-1), pa.uint64()), bands.shape[1]),
        "text": texts if isinstance(texts, pa.Array) else pa.array(texts, pa.large_string()),
    })


def write_index(directory: Path, params: dict[str, Any], tables: Any) -> int:
    """index.parquet from an iterable of ``index_table`` parts (streamed), then index.json; returns rows."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = 0
    tmp = directory / ".index.parquet.tmp"
    writer = None
    for t in tables:
        writer = writer or pq.ParquetWriter(tmp, t.schema, compression="zstd")
        writer.write_table(t)
        rows += t.num_rows
    if writer is None:
        empty = index_table([], np.empty((0, 2), U64), np.empty((0, params["bands"]), U64), [])
        pq.write_table(empty, tmp, compression="zstd")
    else:
        writer.close()
    tmp.replace(directory / "index.parquet")
    (directory / "index.json").write_text(json.dumps({**params, "records": rows}, indent=2), encoding="utf-8")
    return rows


def index_params(cfg: DedupConfig) -> dict[str, Any]:
    b, r = lsh_params(cfg.threshold, cfg.num_perm, cfg.false_negative_weight)
    return {"version": INDEX_VERSION, "key": cfg.key, "shingle": cfg.shingle, "ngram": cfg.ngram,
            "num_perm": cfg.num_perm, "threshold": cfg.threshold, "bands": b, "rows": r, "seed": cfg.seed}


def compute_bands(normalized: Sequence[str], cfg: DedupConfig) -> np.ndarray:
    """Band keys for normalized texts, batch_size records at a time (memory stays bounded)."""
    out = np.empty((len(normalized), index_params(cfg)["bands"]), U64)
    for lo in range(0, len(normalized), cfg.batch_size):
        part = features(NormBatch.of(normalized[lo:lo + cfg.batch_size]), cfg)
        out[lo:lo + len(part)] = part.bands
    return out


# ------------------------------------------------------------------------------------ find


@dataclass
class DedupResult:
    """Per input record: status 'kept' | 'exact_duplicate' | 'near_duplicate', duplicate_of (an id),
    similarity; clusters as CLUSTER_SCHEMA rows; the index extended with the kept records."""

    status: list[str]
    duplicate_of: list[str | None]
    similarity: list[float | None]
    clusters: list[dict[str, Any]]
    index: DedupIndex
    stats: dict[str, Any]


def _chunked_features(src: Utf8Texts, cfg: DedupConfig) -> Features:
    """``features`` of every text, normalized ``CHUNK_BYTES`` at a time; the chunks run in numba's
    number of threads (the kernels release the GIL): normalizing and the exact keys are serial
    kernels, so one chunk at a time would leave a core idle for half of this step. The threads call
    serial kernels only (``parallel=False``): numba's workqueue layer must not be entered from two."""
    chunks = list(src.chunks(max_rows=cfg.batch_size))
    threads = min(numba.get_num_threads(), len(chunks))
    if threads <= 1:
        parts = [features(src.normalize(rows), cfg) for rows in chunks]
    else:
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(lambda rows: features(src.normalize(rows), cfg, parallel=False), chunks))
    return Features.concat(parts) if parts else features(NormBatch.of([]), cfg)


def find_duplicates(ids: Sequence[str], texts: Sequence[str] | pa.Array | NormBatch, cfg: DedupConfig,
                    existing: DedupIndex | None = None, *, normalized: bool = False,
                    keep_index: bool = True) -> DedupResult:
    """Exact then near duplicates among ``texts`` and against ``existing`` (whose records always stay),
    in one process (the CLI, verification); refinery.datastage streams the same steps.

    ``texts`` are dedup keys (see ``dedup_key``), Python strings or an Arrow string column; pass
    ``normalized=True`` (or a NormBatch) if they already went through ``normalize_batch``. Raw
    texts are normalized and hashed ``CHUNK_BYTES`` at a time and normalized again for the pairs
    to verify, so no code-point copy of the whole input is held. ``keep_index=False`` skips
    building the extended index (a CLI run that does not save it).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    n = len(ids)
    index = existing if existing is not None else DedupIndex.empty(cfg)
    params = index_params(cfg)
    if index.params != params:
        raise ValueError(f"existing index built with {index.params}, this run uses {params}; "
                         "load it with DedupIndex.load(dir, cfg) to rebuild its band keys")
    e = len(index)
    if isinstance(texts, NormBatch) or normalized:
        batch = texts if isinstance(texts, NormBatch) else NormBatch.of(texts)
        t_norm = time.perf_counter()
        feats = features(batch, cfg)
        lengths, text_of = batch.lengths(), batch.take
    else:
        src = prepare(texts)
        t_norm = time.perf_counter()
        feats = _chunked_features(src, cfg)
        lengths, text_of = src.sizes(), src.normalize
    t_sig = time.perf_counter()

    # 1. exact: the first occurrence (the existing corpus first) of a 128-bit key stays
    first = first_occurrence(np.concatenate([index.exact, feats.exact]))[e:]
    is_dup = first != np.arange(e, e + n)
    unique = np.flatnonzero(~is_dup)
    t_exact, c_exact = time.perf_counter(), time.process_time()

    # 2. near, over the exact-unique records; rows 0..e-1 are the existing corpus
    new = feats.take(unique)
    bands = np.concatenate([index.bands, new.bands]) if e else new.bands
    k = cfg.num_perm
    # the existing corpus keeps no sketch: its pairs are all verified (filled 0 skips the pre-filter)
    sig16 = np.concatenate([np.zeros((e, k), np.uint16), new.sig16]) if e else new.sig16
    filled = np.concatenate([np.zeros(e, np.int32), new.filled]) if e else new.filled
    t_cand = time.perf_counter()

    def texts_of(rows: np.ndarray) -> NormBatch:
        old = rows[rows < e]
        fresh = text_of(unique[rows[rows >= e] - e])
        return NormBatch.concat([index.norm.take(old), fresh]) if len(old) else fresh

    all_lengths = np.concatenate([index.norm.lengths(), lengths[unique]])
    dup, sim, cstats = near_resolve(bands, sig16, filled, cfg.threshold, texts_of, Shingling.from_config(cfg),
                                    all_lengths, existing=e, max_chars=cfg.verify_chunk_chars)
    del sig16
    t_verify = time.perf_counter()

    status = ["kept"] * n
    dup_of: list[str | None] = [None] * n
    similarity: list[float | None] = [None] * n
    clusters: list[dict[str, Any]] = []
    row_id = index.ids  # existing rows

    def id_of_row(r: int) -> str:
        return row_id[r] if r < e else ids[int(unique[r - e])]

    for i in np.flatnonzero(is_dup).tolist():
        j = int(first[i])
        status[i], dup_of[i], similarity[i] = "exact_duplicate", (row_id[j] if j < e else ids[j - e]), 1.0
        clusters.append({"kept_id": dup_of[i], "removed_id": ids[i], "kind": "exact", "similarity": 1.0})
    for r in np.flatnonzero(dup >= 0).tolist():
        i = int(unique[r - e])
        status[i], dup_of[i], similarity[i] = "near_duplicate", id_of_row(int(dup[r])), float(sim[r])
        clusters.append({"kept_id": dup_of[i], "removed_id": ids[i], "kind": "near", "similarity": similarity[i]})

    if keep_index:
        kept_rows = np.flatnonzero(dup[e:] < 0)
        kept_idx = unique[kept_rows]
        index.append([ids[i] for i in kept_idx.tolist()], feats.exact[kept_idx], new.bands[kept_rows], text_of(kept_idx))
    t_end, c_end = time.perf_counter(), time.process_time()
    stats = {"records": n, "existing": e, "bands": params["bands"], "rows": params["rows"], **cstats,
             "rejected_candidates": cstats["bounded_pairs"] + cstats["checked_pairs"] - cstats["verified_pairs"],
             "exact_duplicates": status.count("exact_duplicate"), "near_duplicates": status.count("near_duplicate"),
             "seconds": {"prepare": t_norm - t0, "normalize_and_signatures": t_sig - t_norm, "exact": t_exact - t_sig,
                         "near": t_verify - t_cand, "resolve": t_end - t_verify,
                         "total": t_end - t0},
             "cpu_seconds": {"exact": c_exact - c0, "near": c_end - c_exact}}
    return DedupResult(status, dup_of, similarity, clusters, index, stats)


# ------------------------------------------------------------------------------------ CLI


def _first_kernel_call() -> None:
    """Any kernel's first call sets numba up; then the normalization tables."""
    K.exact_hashes(np.zeros(1, np.uint32), np.zeros(1, np.int64), np.zeros(1, np.int64), np.empty((1, 2), U64))
    _tables()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m refinery.dedup IN [--out OUT.parquet] [--profile P] [--key ...] [--shingle ...]
    [--ngram N] [--threshold X] [--num-perm N] [--batch-size N] [--existing DIR] [--save-index DIR]``"""
    import argparse

    from refinery.config import load_profile
    from refinery.cli import CLI_INPUT_HELP, config_with_flags, read_input, run_cli, write_cli_output

    ap = argparse.ArgumentParser(prog="python -m refinery.dedup",
                                 description="Exact + MinHash LSH near dedup of a file of records")
    ap.add_argument("input", type=Path, help=CLI_INPUT_HELP)
    ap.add_argument("--out", type=Path, help="Parquet: the records + status, duplicate_of, similarity")
    ap.add_argument("--profile", help="take dedup settings from this profile (flags override)")
    ap.add_argument("--key", choices=["conversation", "prompt"])
    ap.add_argument("--shingle", choices=["char", "word"])
    ap.add_argument("--ngram", type=int)
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--num-perm", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--existing", type=Path, help="a dedup index directory to deduplicate against")
    ap.add_argument("--save-index", type=Path, help="write the index (existing + kept records) here")
    args = ap.parse_args(argv)
    # numba sets itself up on the first call of any kernel (0.5 s of imports), and the normalization
    # tables take 0.1 s: both in a thread while the input is read in C++ (pyarrow, without the GIL)
    threading.Thread(target=_first_kernel_call, daemon=True).start()

    def work() -> dict[str, Any]:
        cfg = config_with_flags(load_profile(args.profile).dedup if args.profile else DedupConfig(), {
            "key": args.key, "shingle": args.shingle, "ngram": args.ngram, "threshold": args.threshold,
            "num_perm": args.num_perm, "batch_size": args.batch_size})
        t0 = time.perf_counter()
        table = read_input(args.input)
        existing = DedupIndex.load(args.existing, cfg) if args.existing else None
        texts = joined_array(table["messages"], TEXT_ROLES[cfg.key], "\n")
        result = find_duplicates(table["id"].to_pylist(), texts, cfg, existing, keep_index=bool(args.save_index))
        seconds = time.perf_counter() - t0
        stats = result.stats
        summary = {"input": str(args.input), "records": table.num_rows, "kept": result.status.count("kept"),
                   "exact_duplicates": stats["exact_duplicates"], "near_duplicates": stats["near_duplicates"],
                   "existing_records": stats["existing"], "candidate_pairs": stats["candidate_pairs"],
                   "verified_pairs": stats["verified_pairs"], "bands": stats["bands"], "rows": stats["rows"],
                   "config": cfg.model_dump(), "seconds": round(seconds, 3),
                   "records_per_second": round(table.num_rows / seconds, 1) if seconds else None}
        if args.out:
            write_cli_output(table.append_column("status", string_array(result.status))
                             .append_column("duplicate_of", string_array(result.duplicate_of))
                             .append_column("similarity", float_array(result.similarity)), args.out)
            summary["out"] = str(args.out)
        if args.save_index:
            result.index.save(args.save_index)
            summary["index"] = str(args.save_index)
        return summary

    return run_cli(work)


if __name__ == "__main__":
    from refinery.cli import exit_cli

    exit_cli(main())
