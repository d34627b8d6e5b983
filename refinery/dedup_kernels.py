"""The inner loops of refinery.dedup, compiled with numba (one pass over the code points each).

Texts travel as one uint32 array of code points plus ``starts``/``ends`` per text (a
``refinery.dedup.NormBatch``), so nothing is re-encoded between steps. numba caches the compiled
code next to this file (``cache=True``); the first call in a fresh checkout compiles (a few
seconds), later processes load it.

Every shingle is hashed by ``_span_hash`` (Horner over the code points, then MurmurHash3's
finalizer), in signatures and in the exact Jaccard alike, so both see the same sets. Character
n-grams compute the same values with a rolling update (O(1) a shingle, not O(n)).

The kernels release the GIL (``nogil``), so a caller's thread can run them next to Python work.
"""

from __future__ import annotations

import sys

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


def _numba_setup_without_scipy() -> None:
    """numba's set-up at its first compile imports numba.np.arraymath, which imports scipy (0.15 s,
    with numpy.testing and f2py) only to choose BLAS or a plain loop for np.correlate/np.convolve;
    no kernel here uses them. Importing arraymath with scipy's BLAS module hidden takes 0.03 s, and
    numba still imports scipy when it compiles a function that needs BLAS (np.dot, np.linalg)."""
    blas = "scipy.linalg.cython_blas"
    if "numba.np.arraymath" in sys.modules or blas in sys.modules:
        return
    sys.modules[blas] = None  # import fails: "no BLAS", arraymath's inner product is a plain loop
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        if sys.modules.get(blas, 0) is None:
            del sys.modules[blas]


_numba_setup_without_scipy()

U64 = np.uint64
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_P1 = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime
_P2 = np.uint64(0x9E3779B97F4A7C15)
_S33 = np.uint64(33)
_S32 = np.uint64(32)
_S29 = np.uint64(29)
_S40 = np.uint64(40)
_LOW32 = np.uint64(0xFFFFFFFF)
_EMPTY = np.uint64(0xFFFFFFFF)  # a bin no shingle fell into (values are 32-bit)
_SPACE_CP = np.uint32(32)
PUNCT, SPACE = 1, 2  # classes of refinery.dedup's code point table


@nb.njit(cache=True, inline="always")
def _fmix(h):
    h ^= h >> _S33
    h *= _C1
    h ^= h >> _S33
    h *= _C2
    h ^= h >> _S33
    return h


@nb.njit(cache=True, nogil=True)
def normalize_utf8(data, offsets, rows, cls, lower, plain, out, out_starts, out_ends, patch, patch_offsets):
    """Texts ``rows`` of UTF-8 ``data`` (text r is ``data[offsets[r]:offsets[r + 1]]``, already
    NFKC; a row -p-1 is text p of ``patch``) as code points: lower case (``lower``), punctuation
    (class PUNCT) deleted, every whitespace run turned into one space, trimmed, NUL dropped.
    ``plain``: decode only (text that was normalized before). Surrogates (encoded with
    surrogatepass) decode as themselves. Returns the code points written."""
    o = 0
    for k in range(len(rows)):
        r = rows[k]
        out_starts[k] = o
        if r >= 0:
            o = _normalize_one(data, offsets[r], offsets[r + 1], cls, lower, plain, out, o)
        else:
            o = _normalize_one(patch, patch_offsets[-r - 1], patch_offsets[-r], cls, lower, plain, out, o)
        out_ends[k] = o
    return o


@nb.njit(cache=True, nogil=True, inline="always")
def _normalize_one(data, i, end, cls, lower, plain, out, o):
    first = o
    ntab = len(cls)
    while i < end:
        b = np.uint32(data[i])
        n = 1 if b < 0xC0 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4
        if i + n > end:  # a cut sequence (not produced here): the byte stands for itself
            n = 1
        if n == 1:
            c = b
        elif n == 2:
            c = ((b & 0x1F) << 6) | (data[i + 1] & 0x3F)
        elif n == 3:
            c = ((b & 0x0F) << 12) | ((data[i + 1] & 0x3F) << 6) | (data[i + 2] & 0x3F)
        else:
            c = ((b & 0x07) << 18) | ((data[i + 1] & 0x3F) << 12) | ((data[i + 2] & 0x3F) << 6) | (data[i + 3] & 0x3F)
        i += n
        if plain:
            out[o] = c
            o += 1
            continue
        kind = cls[c] if c < ntab else 0  # NUL is punctuation in the table: dropped
        space = kind == SPACE
        out[o] = _SPACE_CP if space else lower[c] if c < ntab else c
        # written always, kept only if a character, or a space after a character (a run of spaces
        # and punctuation keeps one; leading ones go): no branch on the class, which is unpredictable
        o += np.int64((kind == 0) | (space & (o > first) & (out[o - 1] != _SPACE_CP)))
    if o > first and out[o - 1] == _SPACE_CP:  # a trailing space goes too
        o -= 1
    return o


@nb.njit(cache=True, nogil=True)
def unstable_texts(data, offsets, rows, stable):
    """bool per text of ``rows``: its UTF-8 has a code point that is not ``stable`` (or beyond the table)."""
    out = np.zeros(len(rows), np.bool_)
    for k in range(len(rows)):
        i, end = offsets[rows[k]], offsets[rows[k] + 1]
        while i < end:
            b = np.uint32(data[i])
            n = 1 if b < 0xC0 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            if b < 0x80:
                c = b
            elif n == 2 and i + 1 < end:
                c = ((b & 0x1F) << 6) | (data[i + 1] & 0x3F)
            elif n == 3 and i + 2 < end:
                c = ((b & 0x0F) << 12) | ((data[i + 1] & 0x3F) << 6) | (data[i + 2] & 0x3F)
            else:  # four bytes: beyond the table; a cut sequence: let Python decide
                out[k] = True
                break
            if c >= len(stable) or not stable[c]:
                out[k] = True
                break
            i += n
    return out


@nb.njit(cache=True, nogil=True)
def utf8_size(cp, starts, ends):
    """Bytes ``encode_utf8`` writes for these texts."""
    n = 0
    for t in range(len(starts)):
        for i in range(starts[t], ends[t]):
            c = cp[i]
            n += 1 if c < 0x80 else 2 if c < 0x800 else 3 if c < 0x10000 else 4
    return n


@nb.njit(cache=True, nogil=True)
def encode_utf8(cp, starts, ends, out, out_offsets):
    """The texts of a NormBatch as UTF-8 (surrogates as surrogatepass would write them); returns bytes written."""
    o = 0
    out_offsets[0] = 0
    for t in range(len(starts)):
        for i in range(starts[t], ends[t]):
            c = cp[i]
            if c < 0x80:
                out[o] = c
                o += 1
            elif c < 0x800:
                out[o] = 0xC0 | (c >> 6)
                out[o + 1] = 0x80 | (c & 0x3F)
                o += 2
            elif c < 0x10000:
                out[o] = 0xE0 | (c >> 12)
                out[o + 1] = 0x80 | ((c >> 6) & 0x3F)
                out[o + 2] = 0x80 | (c & 0x3F)
                o += 3
            else:
                out[o] = 0xF0 | (c >> 18)
                out[o + 1] = 0x80 | ((c >> 12) & 0x3F)
                out[o + 2] = 0x80 | ((c >> 6) & 0x3F)
                out[o + 3] = 0x80 | (c & 0x3F)
                o += 4
        out_offsets[t + 1] = o
    return o


@nb.njit(cache=True, nogil=True)
def gather(cp, starts, ends, rows, out, out_starts, out_ends):
    """The texts ``rows`` of a batch, compacted into ``out``."""
    o = 0
    for r in range(len(rows)):
        s, e = starts[rows[r]], ends[rows[r]]
        out_starts[r] = o
        out[o:o + e - s] = cp[s:e]
        o += e - s
        out_ends[r] = o


@nb.njit(cache=True, nogil=True)
def exact_hashes(cp, starts, ends, out):
    """Two independent 64-bit hashes of each text (128 bits: a collision is not a practical concern)."""
    for t in range(len(starts)):
        h1 = np.uint64(0xCBF29CE484222325)
        h2 = np.uint64(0x84222325CBF29CE4)
        for i in range(starts[t], ends[t]):
            c = np.uint64(cp[i])
            h1 = (h1 ^ c) * _P1
            h2 = (h2 + c) * _P2
            h2 ^= h2 >> _S29
        n = np.uint64(ends[t] - starts[t])
        out[t, 0] = _fmix(h1 ^ n)
        out[t, 1] = _fmix(h2 + n)


@nb.njit(cache=True, inline="always")
def _span_hash(cp, i, j, base, salt):
    h = np.uint64(j - i)
    for x in range(i, j):
        h = h * base + (np.uint64(cp[x]) + salt)
    return _fmix(h)


@nb.njit(cache=True, nogil=True)
def _shingles(cp, s, e, ngram, word, base, salt, buf):
    """Hashes of the character (or word) n-grams of cp[s:e] into buf; returns how many. A text
    shorter than one n-gram (the empty text too) is one shingle of itself."""
    m = 0
    if not word:
        if e - s < ngram:
            buf[0] = _span_hash(cp, s, e, base, salt)
            return 1
        # _span_hash(i, i + n) = n * base^n + sum_k (cp[i + k] + salt) * base^(n - 1 - k) (mod 2^64):
        # the sum rolls from one window to the next
        top = np.uint64(1)
        for _ in range(ngram - 1):
            top *= base
        head = np.uint64(ngram) * top * base
        acc = np.uint64(0)
        for x in range(s, s + ngram):
            acc = acc * base + (np.uint64(cp[x]) + salt)
        buf[0] = _fmix(head + acc)
        m = 1
        for i in range(s + 1, e - ngram + 1):
            acc = (acc - (np.uint64(cp[i - 1]) + salt) * top) * base + (np.uint64(cp[i + ngram - 1]) + salt)
            buf[m] = _fmix(head + acc)
            m += 1
        return m
    # word n-grams: a span from the start of word w to the end of word w + ngram - 1
    words = 0
    for i in range(s, e):
        if cp[i] == _SPACE_CP:
            words += 1
    words += 1 if e > s else 0
    if words < ngram:
        buf[0] = _span_hash(cp, s, e, base, salt)
        return 1
    wstart = np.empty(words, np.int64)
    wend = np.empty(words, np.int64)
    w = 0
    wstart[0] = s
    for i in range(s, e):
        if cp[i] == _SPACE_CP:
            wend[w] = i
            w += 1
            wstart[w] = i + 1
    wend[w] = e
    for w in range(words - ngram + 1):
        buf[m] = _span_hash(cp, wstart[w], wend[w + ngram - 1], base, salt)
        m += 1
    return m


@nb.njit(cache=True, parallel=True, nogil=True)
def signatures(cp, starts, ends, ngram, word, base, salt, sig, filled, threads):
    """One-permutation MinHash with rotation densification: ``sig[t]`` (uint64[k]) and the number
    of bins that got a shingle of their own (``filled[t]``). Texts are split over the threads."""
    n = len(starts)
    parts = min(n, 4 * threads)
    for p in nb.prange(parts):
        _signatures(cp, starts, ends, ngram, word, base, salt, sig, filled, p * n // parts, (p + 1) * n // parts)


@nb.njit(cache=True, nogil=True)
def _signatures(cp, starts, ends, ngram, word, base, salt, sig, filled, lo, hi):
    k = sig.shape[1]
    longest = 1
    for t in range(lo, hi):
        longest = max(longest, ends[t] - starts[t] + 1)
    buf = np.empty(longest, np.uint64)
    row = np.empty(k, np.uint64)
    kk = np.uint64(k)
    top = np.uint64(1)
    for _ in range(ngram):
        top *= base
    head = np.uint64(ngram) * top
    for t in range(lo, hi):
        row[:] = _EMPTY
        s, e = starts[t], ends[t]
        if word or e - s < ngram:
            m = _shingles(cp, s, e, ngram, word, base, salt, buf)
            for x in range(m):
                _bin_min(row, buf[x], kk)
        else:  # character n-grams, rolled here (the values of _shingles, without the buffer)
            acc = np.uint64(0)
            for x in range(s, s + ngram):
                acc = acc * base + (np.uint64(cp[x]) + salt)
            _bin_min(row, _fmix(head + acc), kk)
            for i in range(s + ngram, e):
                acc = acc * base + ((np.uint64(cp[i]) + salt) - (np.uint64(cp[i - ngram]) + salt) * top)
                _bin_min(row, _fmix(head + acc), kk)
        f = 0
        for j in range(k):
            if row[j] != _EMPTY:
                f += 1
        filled[t] = f
        # an empty bin takes the next non-empty bin to its right (circularly), tagged with the
        # distance so that borrowed values only match values borrowed the same way
        for j in range(k):
            if row[j] != _EMPTY:
                sig[t, j] = row[j]
                continue
            d = 1
            while row[(j + d) % k] == _EMPTY:
                d += 1
            sig[t, j] = row[(j + d) % k] | (np.uint64(d) << _S32)


@nb.njit(cache=True, inline="always")
def _bin_min(row, h, k):
    b = ((h >> _S32) * k) >> _S32  # the high half picks the bin
    row[b] = min(row[b], h & _LOW32)  # no branch: a third of the shingles lower their bin, unpredictably


@nb.njit(cache=True, parallel=True, nogil=True)
def jaccard(cp, starts, ends, pairs, ngram, word, base, salt, out, threads):
    """Exact Jaccard of the shingle-hash sets of texts a and b for each (a, b) in ``pairs`` (sorted
    by a): each text's distinct count once (parallel over texts), then per pair a's set in an
    open-addressing table (built once for a run of pairs with the same a) probed with b's
    shingles, each matched entry counted once (parallel over pairs). Hashing, not sorting: a
    shingle costs O(1)."""
    n = len(starts)
    longest = 1
    for t in range(n):
        longest = max(longest, ends[t] - starts[t] + 1)
    cap = 64
    while cap < 2 * longest:
        cap *= 2
    sizes = np.empty(n, np.int64)
    parts = min(n, 4 * threads)
    for p in nb.prange(parts):
        buf = np.empty(longest, np.uint64)
        slots = np.empty(cap, np.uint64)
        stamp = np.zeros(cap, np.int64)
        for t in range(p * n // parts, (p + 1) * n // parts):
            m = _shingles(cp, starts[t], ends[t], ngram, word, base, salt, buf)
            sizes[t] = _insert_all(buf, m, slots, stamp, t + 1)
    m_pairs = len(pairs)
    parts = min(m_pairs, 4 * threads)
    for p in nb.prange(parts):
        buf = np.empty(longest, np.uint64)
        slots = np.empty(cap, np.uint64)
        stamp = np.zeros(cap, np.int64)  # generation of the table's entry (one per a)
        hit = np.zeros(cap, np.int64)  # pair that last matched the entry (counted once a pair)
        gen = 0
        cur = -1
        mask = np.uint64(cap - 1)
        for q in range(p * m_pairs // parts, (p + 1) * m_pairs // parts):
            a, b = pairs[q, 0], pairs[q, 1]
            if a != cur:
                gen += 1
                cur = a
                m = _shingles(cp, starts[a], ends[a], ngram, word, base, salt, buf)
                _insert_all(buf, m, slots, stamp, gen)
            m = _shingles(cp, starts[b], ends[b], ngram, word, base, salt, buf)
            inter = 0
            for x in range(m):
                slot = _probe(buf[x], slots, stamp, gen, mask)
                if stamp[slot] == gen and hit[slot] != q + 1:
                    hit[slot] = q + 1
                    inter += 1
            out[q] = inter / max(sizes[a] + sizes[b] - inter, 1)


@nb.njit(cache=True, nogil=True)
def _insert_all(buf, m, slots, stamp, gen):
    """buf[:m] into the table (entries of generation ``gen``); returns the distinct count."""
    mask = np.uint64(len(slots) - 1)
    distinct = 0
    for x in range(m):
        slot = _probe(buf[x], slots, stamp, gen, mask)
        if stamp[slot] != gen:
            stamp[slot] = gen
            slots[slot] = buf[x]
            distinct += 1
    return distinct


@nb.njit(cache=True, nogil=True, inline="always")
def _probe(h, slots, stamp, gen, mask):
    """The slot of ``h`` in the open-addressing table: where it is, or the free slot it would take
    (an entry belongs to the table only when its stamp is ``gen``)."""
    slot = h & mask
    while stamp[slot] == gen and slots[slot] != h:
        slot = (slot + np.uint64(1)) & mask
    return slot


@nb.njit(cache=True)
def pair_runs(pairs, lengths, budget):
    """Ends of consecutive runs of ``pairs`` whose DISTINCT rows' lengths add up to at most
    ``budget`` (at least one pair a run)."""
    stamp = np.zeros(len(lengths), np.int64)
    ends = []
    run, used = 1, 0
    for q in range(len(pairs)):
        add = 0
        for r in (pairs[q, 0], pairs[q, 1]):
            if stamp[r] != run:
                add += lengths[r] + 1
        if used > 0 and used + add > budget:
            ends.append(q)
            run += 1
            used = 0
            add = lengths[pairs[q, 0]] + lengths[pairs[q, 1]] + 2
        for r in (pairs[q, 0], pairs[q, 1]):
            stamp[r] = run
        used += add
    ends.append(len(pairs))
    return np.array(ends, np.int64)


@nb.njit(cache=True, nogil=True)
def band_pairs(order, keys, band, sig, filled, existing, threshold, z, min_filled, out, count):
    """Candidate pairs (earlier, later) of the bucket runs of ``keys[order, band]``: every pair of a
    bucket, not a sample, except pairs that already share an earlier band (found there), pairs of
    two existing rows (resolved when the index was built) and pairs whose MinHash estimate is
    more than ``z`` standard deviations below the threshold. The deviation is taken over the
    smaller record's own filled bins; records with fewer than ``min_filled`` are always verified.

    Appends to ``out`` from row ``count`` (growing it); returns (out, count, comparisons, largest).
    """
    n = len(order)
    k = sig.shape[1]
    var = threshold * (1.0 - threshold)
    comparisons = 0
    largest = 1
    lo = 0
    while lo < n:
        key = keys[order[lo], band]
        hi = lo + 1
        while hi < n and keys[order[hi], band] == key:
            hi += 1
        largest = max(largest, hi - lo)
        for i in range(lo + 1, hi):
            y = order[i]
            for j in range(lo, i):
                x = order[j]  # order is stable: x < y
                if y < existing:
                    continue
                seen = False
                for b2 in range(band):
                    if keys[x, b2] == keys[y, b2]:
                        seen = True
                        break
                if seen:
                    continue
                comparisons += 1
                f = min(filled[x], filled[y])
                if f >= min_filled:
                    same = 0
                    for c in range(k):
                        if sig[x, c] == sig[y, c]:
                            same += 1
                    if same / k < threshold - z * np.sqrt(var / f):
                        continue
                if count == len(out):
                    grown = np.empty((2 * len(out) + 1024, 2), np.int64)
                    grown[:count] = out[:count]
                    out = grown
                out[count, 0] = x
                out[count, 1] = y
                count += 1
        lo = hi
    return out, count, comparisons, largest


@nb.njit(cache=True, nogil=True)
def _word_hashes(cp, s, e, base, salt, wh):
    """The hash of each word of cp[s:e] (words split by single spaces) into wh; returns how many."""
    words = 0
    w0 = s
    for i in range(s, e + 1):
        if i == e or cp[i] == _SPACE_CP:
            wh[words] = _span_hash(cp, w0, i, base, salt)
            words += 1
            w0 = i + 1
    return words


@nb.njit(cache=True, inline="always")
def _gram(wh, w, n, base):
    h = np.uint64(n)
    for x in range(w, w + n):
        h = h * base + wh[x]
    return _fmix(h)


@nb.njit(cache=True, nogil=True)
def word_grams(cp, starts, ends, n, base, salt, out_hash, out_doc, out_word):
    """Every window of ``n`` words of each text (words split by single spaces, as normalized):
    a hash of its words' hashes, the text and the window's first word; returns how many."""
    m = 0
    wh = np.empty(max(len(cp), 1), np.uint64)
    for t in range(len(starts)):
        if ends[t] <= starts[t]:
            continue
        words = _word_hashes(cp, starts[t], ends[t], base, salt, wh)
        for w in range(words - n + 1):
            out_hash[m] = _gram(wh, w, n, base)
            out_doc[m] = t
            out_word[m] = w
            m += 1
    return m


@nb.njit(cache=True, nogil=True)
def hash_table(keys):
    """An open-addressing set of ``keys`` (uint64): (slots, slot -> index into keys or -1)."""
    cap = 1024
    while cap < 2 * len(keys):
        cap *= 2
    slots = np.zeros(cap, np.uint64)
    where = np.full(cap, -1, np.int64)
    mask = np.uint64(cap - 1)
    for i in range(len(keys)):
        slot = keys[i] & mask
        while where[slot] >= 0 and slots[slot] != keys[i]:
            slot = (slot + np.uint64(1)) & mask
        if where[slot] < 0:
            slots[slot] = keys[i]
            where[slot] = i
    return slots, where


@nb.njit(cache=True, nogil=True)
def bloom(keys, words):
    """A one-word-per-key Bloom filter: ``words`` uint64 (a power of two), two bits a key."""
    bits = np.zeros(words, np.uint64)
    for h in keys:
        bits[(h >> _S40) & np.uint64(words - 1)] |= _bloom_mask(h)
    return bits


@nb.njit(cache=True, inline="always")
def _bloom_mask(h):
    return (np.uint64(1) << (h & np.uint64(63))) | (np.uint64(1) << ((h >> np.uint64(6)) & np.uint64(63)))


@nb.njit(cache=True, parallel=True, nogil=True)
def first_gram_hits(cp, starts, ends, ns, prefix, base, salt, bits, slots, where, hit_word, hit_key, hit_n, threads):
    """For each text, its first n-word window (n in ``ns``, in that order) whose hash is in the
    table: the window's first word, the index of the key it matched and n (hit_word -1: none).

    Every key of the table starts with a ``prefix``-word window that is in the Bloom filter
    ``bits``, so only the windows whose first ``prefix`` words pass it (rolled over the word
    hashes: O(1) a word, and the filter, a few MB, stays in cache) are looked up in the table."""
    n_texts = len(starts)
    parts = min(n_texts, 4 * threads)
    mask = np.uint64(len(slots) - 1)
    bmask = np.uint64(len(bits) - 1)
    top = np.uint64(1)
    for _ in range(prefix - 1):
        top *= base
    head = np.uint64(prefix) * top * base
    for p in nb.prange(parts):
        lo, hi = p * n_texts // parts, (p + 1) * n_texts // parts
        longest = 1
        for t in range(lo, hi):
            longest = max(longest, ends[t] - starts[t] + 1)
        wh = np.empty(longest, np.uint64)
        cand = np.empty(longest, np.int64)
        for t in range(lo, hi):
            hit_word[t] = -1
            if ends[t] <= starts[t]:
                continue
            words = _word_hashes(cp, starts[t], ends[t], base, salt, wh)
            found = 0  # windows whose prefix passes the filter, in order
            acc = np.uint64(0)
            for w in range(words):
                if w >= prefix:
                    acc -= wh[w - prefix] * top
                acc = acc * base + wh[w]
                if w >= prefix - 1:
                    h = _fmix(head + acc)  # == _gram(wh, w - prefix + 1, prefix, base)
                    want = _bloom_mask(h)
                    if bits[(h >> _S40) & bmask] & want == want:
                        cand[found] = w - prefix + 1
                        found += 1
            for n in ns:
                for c in range(found):
                    w = cand[c]
                    if w + n > words:
                        break
                    h = _gram(wh, w, n, base)
                    slot = h & mask
                    while where[slot] >= 0 and slots[slot] != h:
                        slot = (slot + np.uint64(1)) & mask
                    if where[slot] >= 0:
                        hit_word[t] = w
                        hit_key[t] = where[slot]
                        hit_n[t] = n
                        break
                if hit_word[t] >= 0:
                    break


# ------------------------------------------------------------------------------------ greedy near dedup
# The streaming resolution of refinery.dedup.near_resolve: rows in record order, each compared only
# with the KEPT rows that share one of its LSH buckets (a removed row is never a comparator), pairs
# that cannot reach the threshold dropped by bounds before the exact check.

# a bounded row's shingles as a 2,048-bit map (256 bytes: the cheap exact bound), then one word:
# its distinct shingles << 32 | the bits set
BITMAP_WORDS = 32
_AHEAD = 8  # bucket members ahead whose bitmap rows are prefetched
_BIT_SHIFT = np.uint64(64 - 11)
_KEY_SHIFT = np.uint64(24)
_CNT_SHIFT = np.uint64(40)
_CNT_MAX = (1 << 24) - 1


@nb.njit(cache=True, nogil=True)
def shingle_counts(cp, starts, ends, ngram, word, base, salt, counts, shift):
    """Adds each text's shingles to ``counts[h >> shift]`` (how common a shingle is, approximately:
    what orders the shingles of a text for the prefix bound, any consistent order being correct)."""
    longest = 1
    for t in range(len(starts)):
        longest = max(longest, ends[t] - starts[t] + 1)
    buf = np.empty(longest, np.uint64)
    for t in range(len(starts)):
        m = _shingles(cp, starts[t], ends[t], ngram, word, base, salt, buf)
        for x in range(m):
            counts[buf[x] >> shift] += 1


@intrinsic
def _popcount(typingctx, x):
    """The set bits of a uint64 (LLVM's ctpop: one instruction)."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@intrinsic
def _prefetch(typingctx, arr, index):
    """Ask for the cache line of ``arr.flat[index]`` now (LLVM's prefetch): a row read a few
    iterations later is then there instead of waiting for memory."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        builder.call(fn, [builder.bitcast(builder.gep(data, [args[1]]), i8p), ir.Constant(i32, 0),
                          ir.Constant(i32, 3), ir.Constant(i32, 1)])  # read, keep in all levels, data
        return context.get_dummy_value()

    return types.void(arr, index), codegen


@nb.njit(cache=True, nogil=True)
def prefix_keys(cp, starts, ends, ngram, word, base, salt, counts, shift, threshold, sizes, out, out_offsets,
                bitmaps):
    """Per text: its number of distinct shingles (``sizes``), the first ``size - floor(threshold *
    size) + 1`` of its distinct shingles in the global order (rarest first: key = count << 40 | the
    hash's top 40 bits) into ``out`` (text t: ``out[out_offsets[t]:out_offsets[t + 1]]``), and its
    shingles as a bitmap (``bitmaps[t]``: bit = the hash's top 11 bits, then size << 32 | bits set)."""
    longest = 1
    for t in range(len(starts)):
        longest = max(longest, ends[t] - starts[t] + 1)
    buf = np.empty(longest, np.uint64)
    keys = np.empty(longest, np.uint64)
    o = 0
    out_offsets[0] = 0
    for t in range(len(starts)):
        m = _shingles(cp, starts[t], ends[t], ngram, word, base, salt, buf)
        hs = np.sort(buf[:m])
        d = 0
        for x in range(m):
            if x == 0 or hs[x] != hs[x - 1]:
                c = min(counts[hs[x] >> shift], _CNT_MAX)
                keys[d] = (np.uint64(c) << _CNT_SHIFT) | (hs[x] >> _KEY_SHIFT)
                d += 1
        sizes[t] = d
        bitmaps[t, :] = 0
        for x in range(m):
            bit = hs[x] >> _BIT_SHIFT
            bitmaps[t, bit >> np.uint64(6)] |= np.uint64(1) << (bit & np.uint64(63))
        ones = np.uint64(0)
        for w in range(BITMAP_WORDS):
            ones += _popcount(bitmaps[t, w])
        bitmaps[t, BITMAP_WORDS] = (np.uint64(d) << _S32) | ones
        p = min(d, d - int(threshold * d) + 1)
        ks = np.sort(keys[:d])
        out[o:o + p] = ks[:p]
        o += p
        out_offsets[t + 1] = o
    return o


@nb.njit(cache=True, inline="always")
def _overlap_needed(na, nb_, threshold):
    """The least overlap of sets of na and nb_ elements whose Jaccard reaches the threshold
    (o / (na + nb_ - o) >= t  <=>  o >= t (na + nb_) / (1 + t)), less a margin for rounding."""
    return np.int64(np.ceil(threshold * (na + nb_) / (1.0 + threshold) - 1e-9))


# meta[row] = (distinct shingles, filled MinHash bins, start, end of its prefix in pkeys)
SIZE, FILLED, P0, P1 = 0, 1, 2, 3


@nb.njit(cache=True, nogil=True)
def _bitmap_rejects(bx, by, bitmaps, threshold):
    """True when the Jaccard of two bounded rows (their rows of ``bitmaps``) is surely below the
    threshold by their sizes, or by their bitmaps: a shared shingle sets the same bit in both, so
    the overlap is at most the bits both have plus the shingles either lost to collisions in its
    own map."""
    hx, hy = bitmaps[bx, BITMAP_WORDS], bitmaps[by, BITMAP_WORDS]
    na, nb_ = np.int64(hx >> _S32), np.int64(hy >> _S32)
    need = _overlap_needed(na, nb_, threshold)
    if min(na, nb_) < need:
        return True
    both = np.uint64(0)
    for w in range(BITMAP_WORDS):
        both += _popcount(bitmaps[bx, w] & bitmaps[by, w])
    return np.int64(both) + min(na - np.int64(hx & _LOW32), nb_ - np.int64(hy & _LOW32)) < need


@nb.njit(cache=True, nogil=True)
def _prefix_rejects(mx, my, pkeys, threshold):
    """True when a merge of the rarest-first prefixes of two bounded rows shows their Jaccard below
    the threshold (a shingle passed over without a match has none in the other set, so the overlap
    is at most what matched plus the smaller rest)."""
    na, nb_ = mx[SIZE], my[SIZE]
    need = _overlap_needed(na, nb_, threshold)
    i, iend = mx[P0], mx[P1]
    j, jend = my[P0], my[P1]
    # the overlap is at most what matched plus the smaller of what is left: ra - i of x, rb - j of y
    ra, rb = na + i, nb_ + j
    o = 0
    while i < iend and j < jend:
        if pkeys[i] == pkeys[j]:
            o += 1
            i += 1
            j += 1
        else:
            if pkeys[i] < pkeys[j]:
                i += 1
            else:
                j += 1
            if o + min(ra - i, rb - j) < need:
                return True
    return o + min(ra - i, rb - j) < need


@nb.njit(cache=True, nogil=True)
def _consider(x, y, sig, meta, bitmap_row, bitmaps, threshold, z, min_filled, stats):
    """Whether the pair (x, y) goes to the exact check. Rows of big buckets (the bounded rows:
    ``bitmap_row`` >= 0) go through exact bounds, cheapest first (``_bitmap_rejects`` here,
    ``_prefix_rejects`` later); other rows through the MinHash pre-filter (not when the estimate
    is more than ``z`` standard deviations below the threshold, as ``band_pairs``)."""
    stats[0] += 1
    bx, by = bitmap_row[x], bitmap_row[y]
    if bx >= 0 and by >= 0:
        if _bitmap_rejects(bx, by, bitmaps, threshold):
            stats[2] += 1
            return False
        return True  # the prefix merge comes after (``near_candidates``)
    f = min(meta[x, FILLED], meta[y, FILLED])
    if f >= min_filled:
        k = sig.shape[1]
        same = 0
        for c in range(k):
            same += np.int64(sig[x, c] == sig[y, c])
        if same / k < threshold - z * np.sqrt(threshold * (1.0 - threshold) / f):
            stats[1] += 1
            return False
    return True


@nb.njit(cache=True, nogil=True)
def block_lists(ys, bucket, bhead, bstamp, blink, pos, block_id):
    """The block's own per-bucket lists (every row of the block, latest first) and each row's
    position in the block."""
    for p in range(len(ys)):
        y = ys[p]
        for b in range(bucket.shape[1]):
            g = bucket[y, b]
            if g < 0:
                continue
            if bstamp[g] != block_id:
                bstamp[g] = block_id
                bhead[g] = -1
            blink[p, b] = bhead[g]
            bhead[g] = y
        pos[y] = p


@nb.njit(cache=True, nogil=True)
def near_candidates(ys, lo, hi, bucket, mstart, mfill, members, bhead, bstamp, blink, pos, block_id, seen, sig, meta,
                    pkeys, bitmap_row, bitmaps, threshold, z, min_filled, stats):
    """Candidate pairs (x, y) for the rows ``ys[lo:hi]`` of a block (``ys`` ascending), each x once
    per y: x a kept row before the block that shares a bucket with y (bucket g's kept rows are
    ``members[mstart[g]:mstart[g] + mfill[g]]``), or an earlier row of the block that does
    (``block_lists``; their fate is decided by ``resolve_block``, in order), and ``_consider``
    passes it. Read-only but for ``seen`` and ``stats`` (+= [compared, prefiltered, bounded]), so
    parts of a block run on threads at once."""
    n_bands = bucket.shape[1]
    out = np.empty((1024, 2), np.int64)
    count = 0
    local = np.zeros(3, np.int64)  # not ``stats`` itself: threads' counters side by side would share a cache line
    for p in range(lo, hi):
        y = ys[p]
        for b in range(n_bands):
            g = bucket[y, b]
            if g < 0:
                continue
            m0 = mstart[g]
            m1 = m0 + mfill[g]
            x = bhead[g] if bstamp[g] == block_id else -1
            while x >= 0 and pos[x] >= p:  # the block's list is latest first
                x = blink[pos[x], b]
            i = m0
            ahead = bitmaps.shape[1] if bitmap_row[y] >= 0 else 0  # words of a bitmap row, to prefetch
            while True:
                if i < m1:
                    x2 = np.int64(members[i])
                    if ahead and i + _AHEAD < m1 and bitmap_row[members[i + _AHEAD]] >= 0:
                        _prefetch(bitmaps, bitmap_row[members[i + _AHEAD]] * ahead)
                    i += 1
                elif x >= 0:
                    x2 = x
                    x = blink[pos[x], b]
                else:
                    break
                if seen[x2] != y:
                    seen[x2] = y
                    if _consider(x2, y, sig, meta, bitmap_row, bitmaps, threshold, z, min_filled, local):
                        if count == len(out):
                            grown = np.empty((2 * len(out), 2), np.int64)
                            grown[:count] = out[:count]
                            out = grown
                        out[count, 0] = x2
                        out[count, 1] = y
                        count += 1
    # the prefix merge costs more than the bitmap: only for the pairs the bitmap let through
    kept = 0
    for q in range(count):
        mx, my = meta[out[q, 0]], meta[out[q, 1]]
        if mx[SIZE] >= 0 and my[SIZE] >= 0 and _prefix_rejects(mx, my, pkeys, threshold):
            local[2] += 1
        else:
            out[kept] = out[q]
            kept += 1
    stats += local
    return out[:kept]


@nb.njit(cache=True, nogil=True)
def resolve_block(ys, pairs, sims, threshold, removed, dup, sim, bucket, mstart, mfill, members):
    """The greedy rule over one block, in row order: y is removed when a verified pair joins it to
    a row that is still kept (``duplicate_of`` the most similar, the earliest on a tie); a kept y
    joins its buckets' kept rows. ``pairs`` are in y order, as ``near_candidates`` makes them."""
    q = 0
    for p in range(len(ys)):
        y = ys[p]
        best = -1
        bs = -1.0
        while q < len(pairs) and pairs[q, 1] == y:
            x = pairs[q, 0]
            s = sims[q]
            if not removed[x] and s >= threshold and (s > bs or (s == bs and x < best)):
                best, bs = x, s
            q += 1
        if best >= 0:
            removed[y] = True
            dup[y] = best
            sim[y] = bs
        else:
            _add_kept(y, bucket, mstart, mfill, members)


@nb.njit(cache=True, nogil=True, inline="always")
def _add_kept(y, bucket, mstart, mfill, members):
    for b in range(bucket.shape[1]):
        g = bucket[y, b]
        if g >= 0:
            members[mstart[g] + mfill[g]] = y
            mfill[g] += 1


@nb.njit(cache=True, nogil=True)
def add_kept(rows, bucket, mstart, mfill, members):
    """Rows (ascending) that are kept whatever comes later (an existing index) into their buckets."""
    for y in rows:
        _add_kept(y, bucket, mstart, mfill, members)


@nb.njit(cache=True, nogil=True)
def block_edges(rows, bucket, n_buckets, max_pairs):
    """Where to cut ``rows`` (ascending) into blocks for ``near_candidates``: a block ends before
    the row that would take the pairs of rows of the block sharing a bucket (counted per band)
    past ``max_pairs``, i.e. the comparisons made before the rows' fates are known. Small buckets
    make blocks of whole batches, big ones blocks of a few hundred rows."""
    cnt = np.zeros(n_buckets, np.int64)
    stamp = np.full(n_buckets, -1, np.int64)
    edges = [0]
    blk = 0
    pairs = 0
    for p in range(len(rows)):
        y = rows[p]
        add = 0
        for b in range(bucket.shape[1]):
            g = bucket[y, b]
            if g >= 0 and stamp[g] == blk:
                add += cnt[g]
        if pairs + add > max_pairs and p > edges[-1]:
            edges.append(p)
            blk += 1
            pairs = 0
            add = 0
        for b in range(bucket.shape[1]):
            g = bucket[y, b]
            if g >= 0:
                if stamp[g] != blk:
                    stamp[g] = blk
                    cnt[g] = 0
                cnt[g] += 1
        pairs += add
    edges.append(len(rows))
    return np.array(edges, np.int64)
