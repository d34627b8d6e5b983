"""Exact and near-duplicate detection: normalized-text hashing, then MinHash LSH verified by exact Jaccard.

Pipeline (``find_duplicates``), every step over numpy arrays in bounded batches (docs/data.md
has the measurements behind the defaults):

1. ``normalize_text``: NFKC, lower case, Unicode punctuation (category P) deleted, every run of
   whitespace turned into one space, trimmed. Symbols ($ + = < >) and digits are kept: they change
   the meaning of math and code. Two records whose normalized keys are equal are exact duplicates.
2. Shingles: character n-grams of the normalized text (default 5) or word n-grams, each hashed to
   64 bits with a polynomial rolling hash (prefix sums, so a window costs O(1)).
3. ``MinHasher``: one-permutation MinHash (Li, Owen & Zhang 2012) with rotation densification
   (Shrivastava & Li 2014): each shingle hash picks one of ``num_perm`` bins and the bin keeps its
   minimum, so a record costs one pass over its shingles instead of ``num_perm`` passes;
   ``P[sig_a[k] == sig_b[k]]`` is still the Jaccard similarity, which is what LSH needs.
4. LSH: ``(bands, rows)`` from datasketch's own optimiser (``lsh_params``) for the threshold and
   ``num_perm``; records sharing a band key are candidates.
5. Candidates whose MinHash estimate is more than ``PREFILTER_MARGIN`` below the threshold are
   dropped; every other pair is verified by the exact Jaccard of its two shingle sets (recomputed
   from the normalized text, so no shingles are stored); only pairs >= threshold count.
6. Greedy resolution in record order: a record is a near duplicate when it matches an earlier
   *kept* record (the most similar one is its ``duplicate_of``); matching only removed records does
   not remove it, so clusters never chain through records that are gone.

``DedupIndex`` holds what later batches are deduplicated against (ids, exact hashes, band keys,
normalized text); ``save``/``load`` persist it next to deduped_corpus's parquet files.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from refinery.config import DedupConfig

U64 = np.uint64
_MASK32 = U64(0xFFFFFFFF)
_LOW40 = U64((1 << 40) - 1)
INDEX_VERSION = 1
PREFILTER_MARGIN = 0.15  # candidates estimated below threshold - this skip the exact check

# ------------------------------------------------------------------------------------ normalize

_KEEP, _PUNCT, _SPACE, _BOUNDARY = 0, 1, 2, 3
# ASCII: the characters of Unicode category P are deleted, upper case lowered, whitespace -> space
_ASCII_PUNCT = "".join(chr(c) for c in range(128) if unicodedata.category(chr(c))[0] == "P").encode()
_ASCII_TABLE = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ\t\n\v\f\r\x1c\x1d\x1e\x1f",
                               b"abcdefghijklmnopqrstuvwxyz" + b" " * 9)
_CHAR_CLASS: np.ndarray | None = None  # code point -> one of the classes above


def _char_class() -> np.ndarray:
    global _CHAR_CLASS
    if _CHAR_CLASS is None:  # built once per process (0.1 s)
        table = np.zeros(0x110000, np.uint8)
        for c in range(0x20000):  # above: CJK extensions, tags, private use; no P* or space there
            ch = chr(c)
            if ch.isspace():
                table[c] = _SPACE
            elif unicodedata.category(ch)[0] == "P":
                table[c] = _PUNCT
        table[0] = _BOUNDARY  # NUL separates the texts of a batch (and is dropped from a text)
        _CHAR_CLASS = table
    return _CHAR_CLASS


def normalize_many(texts: Sequence[str]) -> list[str]:
    """``normalize_text`` over a batch. ASCII texts go through bytes.translate/replace on the whole
    batch at once; the others through NFKC, lower() and numpy over their code points."""
    out: list[str] = list(texts)
    ascii_idx = [i for i, t in enumerate(texts) if t.isascii() and "\x00" not in t]
    other_idx = [i for i, t in enumerate(texts) if not (t.isascii() and "\x00" not in t)]
    if ascii_idx:
        for i, t in zip(ascii_idx, _normalize_ascii_batch([texts[i] for i in ascii_idx])):
            out[i] = t
    if other_idx:
        for i, t in zip(other_idx, _normalize_unicode_batch([texts[i] for i in other_idx])):
            out[i] = t
    return out


def _normalize_ascii_batch(texts: list[str]) -> list[str]:
    raw = "\x00".join(texts).encode("ascii").translate(_ASCII_TABLE, _ASCII_PUNCT)
    a = np.frombuffer(raw, np.uint8)
    space = a == 32
    before = np.empty(len(a), np.uint8)
    before[:1] = 0
    before[1:] = a[:-1]
    keep = ~space | ((before != 32) & (before != 0))  # first space of a run, not at a text's start
    a = a[keep]
    after = np.empty(len(a), np.uint8)
    after[-1:] = 0
    after[:-1] = a[1:]
    a = a[(a != 32) | (after != 0)]  # nor at its end
    return a.tobytes().decode("ascii").split("\x00")


def _normalize_unicode_batch(texts: list[str]) -> list[str]:
    lowered = [(t if unicodedata.is_normalized("NFKC", t) else unicodedata.normalize("NFKC", t)).lower()
               for t in texts]
    lowered = [t.replace("\x00", "") if "\x00" in t else t for t in lowered]
    cp = np.frombuffer("\x00".join(lowered).encode("utf-32-le"), np.uint32)
    cls = _char_class()[cp]
    keep = cls != _PUNCT
    cp, cls = cp[keep], cls[keep]
    # whitespace runs -> their first character, dropped at the start of a text ...
    before = np.empty(len(cls), np.uint8)
    before[:1] = _BOUNDARY
    before[1:] = cls[:-1]
    keep = (cls != _SPACE) | ((before != _SPACE) & (before != _BOUNDARY))
    cp, cls = cp[keep], cls[keep]
    # ... and at its end
    after = np.empty(len(cls), np.uint8)
    after[-1:] = _BOUNDARY
    after[:-1] = cls[1:]
    keep = (cls != _SPACE) | (after != _BOUNDARY)
    cp = np.where(cls == _SPACE, np.uint32(32), cp)[keep]
    return cp.tobytes().decode("utf-32-le").split("\x00")


def normalize_text(s: str) -> str:
    """NFKC, lower case, punctuation (Unicode P*) deleted, whitespace runs -> one space, trimmed."""
    return normalize_many([s])[0]


def dedup_key(messages: Sequence[dict[str, str]], key: str) -> str:
    """The text compared for duplicates. System turns are left out: they are shared boilerplate
    (OpenOrca repeats a handful of system prompts), which would make unrelated records look alike."""
    roles = ("user",) if key == "prompt" else ("user", "assistant")
    return "\n".join(m["content"] for m in messages if m["role"] in roles)


def exact_hash(normalized: str) -> int:
    return xxhash.xxh3_64_intdigest(normalized.encode("utf-8"))


# ------------------------------------------------------------------------------------ shingles


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finalizer, in place: spreads the polynomial hash over all 64 bits."""
    h ^= h >> U64(33)
    h *= U64(0xFF51AFD7ED558CCD)
    h ^= h >> U64(33)
    h *= U64(0xC4CEB9FE1A85EC53)
    h ^= h >> U64(33)
    return h


class ShingleHasher:
    """64-bit hashes of character or word n-grams of normalized text, vectorized over a batch."""

    def __init__(self, shingle: str = "char", ngram: int = 5, seed: int = 1):
        if shingle not in ("char", "word"):
            raise ValueError(f"shingle must be 'char' or 'word', got {shingle!r}")
        self.shingle, self.ngram = shingle, int(ngram)
        rng = np.random.default_rng(seed)
        self._base = int(rng.integers(1 << 62, dtype=np.int64)) * 2 + 1 | (1 << 63)  # odd: invertible mod 2^64
        self._base_inv = pow(self._base, -1, 1 << 64)
        self._salt = U64(int(rng.integers(1 << 62, dtype=np.int64)))
        self._pow = np.ones(1, U64)
        self._pow_inv = np.ones(1, U64)

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self._pow) < n:  # cached: later batches reuse the powers
            size = max(n, 2 * len(self._pow))
            self._pow = np.cumprod(np.full(size, self._base, U64), dtype=U64)
            self._pow_inv = np.cumprod(np.full(size, self._base_inv, U64), dtype=U64)
            self._pow[1:], self._pow[0] = self._pow[:-1].copy(), 1  # base^0 .. base^(size-1)
            self._pow_inv[1:], self._pow_inv[0] = self._pow_inv[:-1].copy(), 1
        return self._pow[:n], self._pow_inv[:n]

    def hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(hash uint64[m], doc int64[m]): every shingle of every text, grouped by text in order.

        A text shorter than one n-gram (including the empty text) is a single shingle of itself.
        """
        lens = np.fromiter(map(len, texts), np.int64, len(texts))
        ends = np.cumsum(lens)
        starts = ends - lens
        cp = np.frombuffer("".join(texts).encode("utf-32-le"), np.uint32).astype(U64)
        total = len(cp)
        pw, pw_inv = self._powers(total + 1)
        # prefix[i] = sum_{k<i} (cp[k] + salt) * base^k, so a span [s, e) hashes to
        # (prefix[e] - prefix[s]) * base^-s, independent of where it sits in the batch.
        prefix = np.zeros(total + 1, U64)
        np.cumsum((cp + self._salt) * pw[:total], dtype=U64, out=prefix[1:])
        doc_ids = np.arange(len(texts), dtype=np.int64)
        n = self.ngram
        if self.shingle == "char":
            # windows [i, i + n) of the joined batch; the n - 1 crossing into the next text are dropped
            w = max(total - n + 1, 0)
            h = prefix[n:n + w] - prefix[:w]
            h *= pw_inv[:w]
            ok = np.ones(w, bool)
            crossing = _ranges(np.maximum(ends - n + 1, starts), np.minimum(lens, n - 1))
            ok[crossing[crossing < w]] = False
            h, doc = h[ok], np.repeat(doc_ids, lens)[:w][ok]
            short = lens < n
            if short.any():  # whole-text shingles, merged back in document order
                extra = (prefix[ends[short]] - prefix[starts[short]]) * pw_inv[starts[short]]
                doc = np.concatenate([doc, doc_ids[short]])
                h = np.concatenate([h, extra])
                order = np.argsort(doc, kind="stable")
                doc, h = doc[order], h[order]
            h += U64(n)  # the empty text still gets a (constant) shingle
            return _fmix64(h), doc
        # word n-grams: spans from the start of word i to the end of word i + n - 1, in one text
        spaces = np.flatnonzero(cp == U64(32))
        nonempty = lens > 0
        word_start = np.sort(np.concatenate([starts[nonempty], spaces + 1]))
        word_end = np.sort(np.concatenate([ends[nonempty], spaces]))
        word_doc = np.searchsorted(ends, word_start, side="right")
        words_per_doc = np.bincount(word_doc, minlength=len(texts))
        w = max(len(word_start) - n + 1, 0)
        span_start = word_start[:w]
        span_end = word_end[n - 1:n - 1 + w]
        doc = word_doc[:w]
        ok = word_doc[n - 1:n - 1 + w] == doc
        short = words_per_doc < n
        span_start, span_end, doc = span_start[ok], span_end[ok], doc[ok]
        if short.any():
            span_start = np.concatenate([span_start, starts[short]])
            span_end = np.concatenate([span_end, ends[short]])
            doc = np.concatenate([doc, doc_ids[short]])
            order = np.argsort(doc, kind="stable")
            span_start, span_end, doc = span_start[order], span_end[order], doc[order]
        h = prefix[span_end] - prefix[span_start]
        h *= pw_inv[span_start]
        h += U64(self.ngram)  # the empty text still gets a (constant) shingle
        return _fmix64(h), doc


# ------------------------------------------------------------------------------------ MinHash


class MinHasher:
    """One-permutation MinHash signatures (uint64[n, num_perm]) of normalized texts."""

    def __init__(self, num_perm: int = 128, *, shingle: str = "char", ngram: int = 5, seed: int = 1,
                 chunk_chars: int = 4_000_000):
        self.num_perm = int(num_perm)
        self.shingles = ShingleHasher(shingle, ngram, seed)
        self.chunk_chars = chunk_chars

    @classmethod
    def from_config(cls, cfg: DedupConfig) -> MinHasher:
        return cls(cfg.num_perm, shingle=cfg.shingle, ngram=cfg.ngram, seed=cfg.seed)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.num_perm), U64)
        for lo, hi in _chunks([len(t) for t in texts], self.chunk_chars):
            out[lo:hi] = self._signatures(texts[lo:hi])
        return out

    def _signatures(self, texts: Sequence[str]) -> np.ndarray:
        k = self.num_perm
        h, doc = self.shingles.hashes(texts)
        bins = ((h >> U64(32)) * U64(k)) >> U64(32)  # the high half picks the bin (any k)
        flat = doc * k + bins.astype(np.int64)
        sig = np.full(len(texts) * k, _MASK32, U64)
        np.minimum.at(sig, flat, h & _MASK32)
        return _densify(sig.reshape(len(texts), k))


def _densify(sig: np.ndarray) -> np.ndarray:
    """Rotation densification: an empty bin takes the next non-empty bin to its right (circularly),
    tagged with the distance so that borrowed values only match values borrowed the same way."""
    empty = sig == _MASK32
    if not empty.any():
        return sig
    n, k = sig.shape
    idx = np.where(~np.concatenate([empty, empty], axis=1), np.arange(2 * k), 2 * k)
    nxt = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1][:, :k]  # next non-empty at or after j
    dist = (nxt - np.arange(k)).astype(U64)
    donor = np.take_along_axis(sig, nxt % k, axis=1)
    return np.where(empty, donor | (dist << U64(32)), sig)


def _chunks(lengths: Sequence[int], max_chars: int) -> list[tuple[int, int]]:
    """Split a batch at record boundaries into runs of at most max_chars characters (at least one record)."""
    out, lo, acc = [], 0, 0
    for i, n in enumerate(lengths):
        if acc and acc + n > max_chars:
            out.append((lo, i))
            lo, acc = i, 0
        acc += n
    if lo < len(lengths):
        out.append((lo, len(lengths)))
    return out


# ------------------------------------------------------------------------------------ LSH


def lsh_params(threshold: float, num_perm: int, false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimizing datasketch's weighted false-positive + false-negative areas."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 1.0 - false_negative_weight, false_negative_weight)


def band_keys(sig: np.ndarray, bands: int, rows: int, seed: int) -> np.ndarray:
    """uint64[n, bands]: one key per band, a hash of that band's `rows` signature values."""
    rng = np.random.default_rng(seed + 7919)
    mult = (rng.integers(1 << 62, size=(bands, rows), dtype=np.int64).astype(U64) << U64(1)) | U64(1)
    used = sig[:, : bands * rows].reshape(len(sig), bands, rows)
    keys = (used * mult).sum(axis=2, dtype=U64)
    keys += np.arange(bands, dtype=U64)
    return _fmix64(keys)


def candidate_pairs(keys: np.ndarray, *, first_members: int = 8) -> np.ndarray:
    """int64[m, 2] of (earlier, later) rows sharing a band key.

    Within a bucket each row is paired with the bucket's first ``first_members`` rows and with its
    predecessor, not with every member: a bucket of g near-identical rows costs O(g), not O(g^2),
    and the earliest rows are the ones that stay kept.
    """
    n, bands = keys.shape
    out = []
    rows = np.arange(n, dtype=np.int64)
    for b in range(bands):
        order = np.argsort(keys[:, b], kind="stable")  # stable: rows stay in record order in a bucket
        k = keys[order, b]
        new = np.ones(n, bool)
        new[1:] = k[1:] != k[:-1]
        start = np.maximum.accumulate(np.where(new, rows, 0))  # bucket start, in sorted positions
        pos = rows - start
        dup = pos > 0
        if not dup.any():
            continue
        out.append(np.stack([order[rows[dup] - 1], order[dup]], axis=1))
        for f in range(min(first_members, int(pos.max()))):
            sel = pos > f + 1
            out.append(np.stack([order[start[sel] + f], order[sel]], axis=1))
    if not out:
        return np.empty((0, 2), np.int64)
    pairs = np.concatenate(out)
    codes = _sorted_unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([codes // n, codes % n], axis=1)


# ------------------------------------------------------------------------------------ verify


def exact_jaccard(hasher: ShingleHasher, texts: Sequence[str], pairs: np.ndarray,
                  *, max_chars: int = 8_000_000) -> np.ndarray:
    """Exact Jaccard of the (hashed) shingle sets of texts[a], texts[b] for each pair, computed
    for runs of pairs whose texts add up to at most max_chars characters (bounded memory)."""
    sim = np.empty(len(pairs), np.float64)
    lengths = np.fromiter((len(texts[a]) + len(texts[b]) for a, b in pairs.tolist()), np.int64, len(pairs))
    for lo, hi in _chunks(lengths.tolist(), max_chars):
        sim[lo:hi] = _exact_jaccard(hasher, texts, pairs[lo:hi])
    return sim


def _exact_jaccard(hasher: ShingleHasher, texts: Sequence[str], pairs: np.ndarray) -> np.ndarray:
    if len(pairs) == 0:
        return np.empty(0, np.float64)
    used, local = np.unique(pairs, return_inverse=True)
    local = local.reshape(-1, 2)
    h, doc = hasher.hashes([texts[i] for i in used])
    # One sorted array of (text, shingle) keys holds every text's shingle set, and "is shingle x
    # in text b" is one searchsorted. A key is the text's index in the top 24 bits and the hash's
    # top 40 bits below it: two different shingles of a pair share 40 bits with probability
    # ~3e-6 for texts of 1,500 characters, which would move that pair's Jaccard by ~0.001.
    if len(used) >= 1 << 24:
        raise ValueError("exact_jaccard: at most 2^24 texts per call")
    keys = _sorted_unique((doc.astype(U64) << U64(40)) | (h >> U64(24)))
    del h, doc
    sizes = np.bincount((keys >> U64(40)).astype(np.int64), minlength=len(used))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    a, b = local[:, 0], local[:, 1]
    idx = _ranges(offsets[a], sizes[a])  # every shingle of each a ...
    query = (b.repeat(sizes[a]).astype(U64) << U64(40)) | (keys[idx] & _LOW40)  # ... looked up in b
    found = np.searchsorted(keys, query)
    hit = keys[np.minimum(found, len(keys) - 1)] == query
    inter = np.bincount(np.arange(len(pairs)).repeat(sizes[a]), weights=hit, minlength=len(pairs))
    return inter / np.maximum(sizes[a] + sizes[b] - inter, 1)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting: numpy 2.4's hash-based unique took ~10x longer on millions of int64."""
    values = np.sort(values)
    keep = np.ones(len(values), bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """concatenate(arange(s, s + l) for s, l in zip(starts, lengths)), vectorized."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, np.int64)
    first = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return first + np.arange(total)


# ------------------------------------------------------------------------------------ index


@dataclass
class DedupIndex:
    """What later batches are deduplicated against: one row per kept record.

    Stored as ``index.parquet`` (id, exact hash, band keys, normalized text) and ``index.json``
    (parameters). Band keys depend on the shingling, num_perm, bands/rows and seed; ``load`` with a
    different shingling or banding recomputes them from the stored normalized text; a different
    ``key`` cannot be recomputed (the text is of the other key) and is refused.
    """

    params: dict[str, Any]
    ids: list[str] = field(default_factory=list)
    exact: np.ndarray = field(default_factory=lambda: np.empty(0, U64))
    bands: np.ndarray | None = None
    texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls, cfg: DedupConfig) -> DedupIndex:
        params = index_params(cfg)
        return cls(params, bands=np.empty((0, params["bands"]), U64))

    def append(self, ids: list[str], exact: np.ndarray, bands: np.ndarray, texts: list[str]) -> None:
        self.ids = self.ids + list(ids)
        self.exact = np.concatenate([self.exact, exact.astype(U64)])
        self.bands = np.concatenate([self.bands, bands]) if self.bands is not None else bands
        self.texts = self.texts + list(texts)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        table = pa.table({
            "id": pa.array(self.ids, pa.string()),
            "exact_hash": pa.array(self.exact, pa.uint64()),
            "bands": pa.FixedSizeListArray.from_arrays(pa.array(self.bands.reshape(-1), pa.uint64()),
                                                       self.params["bands"]),
            "text": pa.array(self.texts, pa.large_string()),
        })
        pq.write_table(table, directory / "index.parquet", compression="zstd")
        (directory / "index.json").write_text(json.dumps({**self.params, "records": len(self)}, indent=2),
                                              encoding="utf-8")

    @classmethod
    def load(cls, directory: Path, cfg: DedupConfig | None = None) -> DedupIndex:
        directory = Path(directory)
        meta_file = directory / "index.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{directory}: no dedup index (index.json missing)")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("version") != INDEX_VERSION:
            raise ValueError(f"{meta_file}: index version {meta.get('version')}, expected {INDEX_VERSION}")
        table = pq.read_table(directory / "index.parquet")
        params = {k: v for k, v in meta.items() if k != "records"}
        ids = table["id"].to_pylist()
        texts = table["text"].to_pylist()
        exact = table["exact_hash"].to_numpy().astype(U64)
        want = index_params(cfg) if cfg is not None else params
        if want["key"] != params["key"]:  # the stored texts and exact hashes are of the other key
            raise ValueError(f"{directory}: dedup index built with key={params['key']!r}, this run uses "
                             f"key={want['key']!r}; rebuild the corpus or use the same key")
        if want != params:  # another shingling or banding: rebuild the band keys from the text
            bands = compute_bands(texts, cfg)
            params = want
        else:
            flat = pc.list_flatten(table["bands"]).to_numpy()
            bands = flat.astype(U64).reshape(len(ids), params["bands"])
        return cls(params, ids, exact, bands, texts)


def index_params(cfg: DedupConfig) -> dict[str, Any]:
    b, r = lsh_params(cfg.threshold, cfg.num_perm, cfg.false_negative_weight)
    return {"version": INDEX_VERSION, "key": cfg.key, "shingle": cfg.shingle, "ngram": cfg.ngram,
            "num_perm": cfg.num_perm, "threshold": cfg.threshold, "bands": b, "rows": r, "seed": cfg.seed}


def compute_bands(normalized: Sequence[str], cfg: DedupConfig) -> np.ndarray:
    """Band keys for normalized texts, batch_size records at a time (memory stays bounded)."""
    params = index_params(cfg)
    hasher = MinHasher.from_config(cfg)
    out = np.empty((len(normalized), params["bands"]), U64)
    for lo in range(0, len(normalized), cfg.batch_size):
        sig = hasher.signatures(normalized[lo:lo + cfg.batch_size])
        out[lo:lo + len(sig)] = band_keys(sig, params["bands"], params["rows"], cfg.seed)
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


def find_duplicates(ids: Sequence[str], texts: Sequence[str], cfg: DedupConfig,
                    existing: DedupIndex | None = None, *, normalized: bool = False) -> DedupResult:
    """Exact then near duplicates among ``texts`` and against ``existing`` (whose records always stay).

    ``texts`` are dedup keys (see ``dedup_key``); pass ``normalized=True`` if they already went
    through ``normalize_many``.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    n = len(ids)
    index = existing if existing is not None else DedupIndex.empty(cfg)
    params = index_params(cfg)
    if index.params != params:
        raise ValueError(f"existing index built with {index.params}, this run uses {params}; "
                         "load it with DedupIndex.load(dir, cfg) to rebuild its band keys")
    norm = list(texts) if normalized else normalize_many(texts)
    status = ["kept"] * n
    dup_of: list[str | None] = [None] * n
    sim: list[float | None] = [None] * n
    clusters: list[dict[str, Any]] = []

    # 1. exact: the first occurrence (the existing corpus first) of a normalized key stays
    seen: dict[int, int] = {int(h): -1 - j for j, h in enumerate(index.exact.tolist())}  # <0: existing row
    exact = np.empty(n, U64)
    for i, t in enumerate(norm):
        h = exact_hash(t)
        exact[i] = h
        j = seen.setdefault(h, i)
        if j != i:
            other_text = index.texts[-1 - j] if j < 0 else norm[j]
            if other_text != t:  # a 64-bit collision: different texts, keep both
                continue
            status[i] = "exact_duplicate"
            dup_of[i] = index.ids[-1 - j] if j < 0 else ids[j]
            sim[i] = 1.0
            clusters.append({"kept_id": dup_of[i], "removed_id": ids[i], "kind": "exact", "similarity": 1.0})
    t_exact, c_exact = time.perf_counter(), time.process_time()

    # 2. near: signatures and band keys of the exact-unique records, batch by batch
    unique = np.flatnonzero(np.array([s == "kept" for s in status], bool))
    hasher = MinHasher.from_config(cfg)
    bands = np.empty((len(unique), params["bands"]), U64)
    sig32 = np.empty((len(unique), cfg.num_perm), np.uint32)  # kept to pre-filter candidates
    for lo in range(0, len(unique), cfg.batch_size):
        batch = unique[lo:lo + cfg.batch_size]
        sig = hasher.signatures([norm[i] for i in batch])
        bands[lo:lo + len(batch)] = band_keys(sig, params["bands"], params["rows"], cfg.seed)
        sig32[lo:lo + len(batch)] = sig  # the low 32 bits: the minimum itself
        del sig
    t_sig = time.perf_counter()

    # rows 0..E-1 are the existing corpus, E.. the unique new records, in order
    e = len(index)
    all_keys = np.concatenate([index.bands, bands]) if e else bands
    pairs = candidate_pairs(all_keys)
    pairs = pairs[pairs[:, 1] >= e]  # existing-vs-existing pairs were resolved when it was built
    # Candidates whose MinHash estimate is far below the threshold skip the exact check. The
    # estimate's standard deviation is sqrt(J(1-J)/num_perm) (0.035 at J=0.8, 128 permutations),
    # so PREFILTER_MARGIN=0.15 is over 4 of them. Pairs with an existing record are all checked.
    new_pair = pairs[:, 0] >= e
    estimate = (sig32[pairs[new_pair, 0] - e] == sig32[pairs[new_pair, 1] - e]).mean(axis=1)
    drop = np.zeros(len(pairs), bool)
    drop[np.flatnonzero(new_pair)[estimate < cfg.threshold - PREFILTER_MARGIN]] = True
    prefiltered = int(drop.sum())
    pairs = pairs[~drop]
    del sig32
    t_cand = time.perf_counter()

    def text_of(row: int) -> str:
        return index.texts[row] if row < e else norm[unique[row - e]]

    rows_used = _sorted_unique(pairs.ravel())
    texts_used = [text_of(int(r)) for r in rows_used]
    sims = exact_jaccard(hasher.shingles, texts_used, np.searchsorted(rows_used, pairs))
    ok = sims >= cfg.threshold
    verified, vsims = pairs[ok], sims[ok]
    t_verify = time.perf_counter()

    # 3. greedy in record order: removed when similar to an earlier record that is still kept
    removed = np.zeros(e + len(unique), bool)
    order = np.lexsort((verified[:, 0], verified[:, 1])) if len(verified) else np.empty(0, np.int64)
    best: dict[int, tuple[float, int]] = {}
    for a, b, s in zip(verified[order, 0].tolist(), verified[order, 1].tolist(), vsims[order].tolist()):
        if removed[a]:
            continue
        if b not in best or s > best[b][0]:
            best[b] = (s, a)
        removed[b] = True  # later pairs (x, b) only refine which kept record b matches best
    for b, (s, a) in best.items():
        i = int(unique[b - e])
        status[i] = "near_duplicate"
        dup_of[i] = index.ids[a] if a < e else ids[int(unique[a - e])]
        sim[i] = float(s)
        clusters.append({"kept_id": dup_of[i], "removed_id": ids[i], "kind": "near", "similarity": float(s)})

    kept_rows = [k for k in range(len(unique)) if not removed[e + k]]
    kept_idx = unique[kept_rows]
    index.append([ids[i] for i in kept_idx], exact[kept_idx], bands[kept_rows], [norm[i] for i in kept_idx])
    t_end, c_end = time.perf_counter(), time.process_time()
    stats = {"records": n, "existing": e, "bands": params["bands"], "rows": params["rows"],
             "candidate_pairs": int(len(pairs)) + prefiltered, "prefiltered_pairs": prefiltered,
             "verified_pairs": int(len(verified)),
             "rejected_candidates": int(len(pairs) - len(verified)),
             "exact_duplicates": status.count("exact_duplicate"),
             "near_duplicates": status.count("near_duplicate"),
             "seconds": {"exact": t_exact - t0, "signatures": t_sig - t_exact, "candidates": t_cand - t_sig,
                         "verify": t_verify - t_cand, "resolve": t_end - t_verify, "total": t_end - t0},
             "cpu_seconds": {"exact": c_exact - c0, "near": c_end - c_exact}}
    return DedupResult(status, dup_of, sim, clusters, index, stats)


# ------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m refinery.dedup IN [--out OUT.parquet] [--profile P] [--key ...] [--shingle ...]
    [--ngram N] [--threshold X] [--num-perm N] [--batch-size N] [--existing DIR] [--save-index DIR]``"""
    import argparse

    from refinery.config import load_profile
    from refinery.curate import CLI_INPUT_HELP, config_with_flags, joined_text, read_input, run_cli, write_cli_output

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

    def work() -> dict[str, Any]:
        cfg = config_with_flags(load_profile(args.profile).dedup if args.profile else DedupConfig(), {
            "key": args.key, "shingle": args.shingle, "ngram": args.ngram, "threshold": args.threshold,
            "num_perm": args.num_perm, "batch_size": args.batch_size})
        t0 = time.perf_counter()
        table = read_input(args.input)
        existing = DedupIndex.load(args.existing, cfg) if args.existing else None
        texts = joined_text(table["messages"], ("user",) if cfg.key == "prompt" else ("user", "assistant"), "\n")
        result = find_duplicates(table["id"].to_pylist(), texts, cfg, existing)
        seconds = time.perf_counter() - t0
        stats = result.stats
        summary = {"input": str(args.input), "records": table.num_rows, "kept": result.status.count("kept"),
                   "exact_duplicates": stats["exact_duplicates"], "near_duplicates": stats["near_duplicates"],
                   "existing_records": stats["existing"], "candidate_pairs": stats["candidate_pairs"],
                   "verified_pairs": stats["verified_pairs"], "bands": stats["bands"], "rows": stats["rows"],
                   "config": cfg.model_dump(), "seconds": round(seconds, 3),
                   "records_per_second": round(table.num_rows / seconds, 1) if seconds else None}
        if args.out:
            write_cli_output(table.append_column("status", pa.array(result.status, pa.string()))
                             .append_column("duplicate_of", pa.array(result.duplicate_of, pa.string()))
                             .append_column("similarity", pa.array(result.similarity, pa.float64())), args.out)
            summary["out"] = str(args.out)
        if args.save_index:
            result.index.save(args.save_index)
            summary["index"] = str(args.save_index)
        return summary

    return run_cli(work)


if __name__ == "__main__":
    raise SystemExit(main())
