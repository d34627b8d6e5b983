"""The inner loops of refinery.dedup, compiled with numba (one pass over the code points each).

Texts travel as one uint32 array of code points plus ``starts``/``ends`` per text (a
``refinery.dedup.NormBatch``), so nothing is re-encoded between steps. numba caches the compiled
code next to this file (``cache=True``); the first call in a fresh checkout compiles (a few
seconds), later processes load it.

Every shingle is hashed by ``_span_hash`` (Horner over the code points, then MurmurHash3's
finalizer), in signatures and in the exact Jaccard alike, so both see the same sets.
"""

from __future__ import annotations

import numba as nb
import numpy as np

U64 = np.uint64
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_P1 = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime
_P2 = np.uint64(0x9E3779B97F4A7C15)
_S33 = np.uint64(33)
_S32 = np.uint64(32)
_S29 = np.uint64(29)
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


@nb.njit(cache=True)
def normalize(cp, cls, lower, out, out_starts, out_ends):
    """Lower-case (``lower``: code point -> code point), delete punctuation (class PUNCT), turn every
    whitespace run into one space, trim. ``cp`` is the texts joined by NUL, already NFKC; returns
    the code points written."""
    o = 0
    t = 0
    out_starts[0] = 0
    pending = False
    for i in range(len(cp)):
        c = cp[i]
        if c == 0:  # the end of text t
            out_ends[t] = o
            t += 1
            out_starts[t] = o
            pending = False
            continue
        k = cls[c]
        if k == PUNCT:
            continue
        if k == SPACE:
            pending = o > out_starts[t]
            continue
        if pending:
            out[o] = _SPACE_CP
            o += 1
            pending = False
        out[o] = lower[c]
        o += 1
    out_ends[t] = o
    return o


@nb.njit(cache=True)
def gather(cp, starts, ends, rows, out, out_starts, out_ends):
    """The texts ``rows`` of a batch, compacted into ``out``."""
    o = 0
    for r in range(len(rows)):
        s, e = starts[rows[r]], ends[rows[r]]
        out_starts[r] = o
        out[o:o + e - s] = cp[s:e]
        o += e - s
        out_ends[r] = o


@nb.njit(cache=True)
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


@nb.njit(cache=True)
def _shingles(cp, s, e, ngram, word, base, salt, buf):
    """Hashes of the character (or word) n-grams of cp[s:e] into buf; returns how many. A text
    shorter than one n-gram (the empty text too) is one shingle of itself."""
    m = 0
    if not word:
        if e - s < ngram:
            buf[0] = _span_hash(cp, s, e, base, salt)
            return 1
        for i in range(s, e - ngram + 1):
            buf[m] = _span_hash(cp, i, i + ngram, base, salt)
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


@nb.njit(cache=True, parallel=True)
def signatures(cp, starts, ends, ngram, word, base, salt, sig, filled, threads):
    """One-permutation MinHash with rotation densification: ``sig[t]`` (uint64[k]) and the number
    of bins that got a shingle of their own (``filled[t]``). Texts are split over the threads."""
    n = len(starts)
    parts = min(n, 4 * threads)
    for p in nb.prange(parts):
        _signatures(cp, starts, ends, ngram, word, base, salt, sig, filled, p * n // parts, (p + 1) * n // parts)


@nb.njit(cache=True)
def _signatures(cp, starts, ends, ngram, word, base, salt, sig, filled, lo, hi):
    k = sig.shape[1]
    longest = 1
    for t in range(lo, hi):
        longest = max(longest, ends[t] - starts[t] + 1)
    buf = np.empty(longest, np.uint64)
    row = np.empty(k, np.uint64)
    kk = np.uint64(k)
    for t in range(lo, hi):
        row[:] = _EMPTY
        m = _shingles(cp, starts[t], ends[t], ngram, word, base, salt, buf)
        for x in range(m):
            h = buf[x]
            b = ((h >> _S32) * kk) >> _S32  # the high half picks the bin
            v = h & _LOW32
            if v < row[b]:
                row[b] = v
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


@nb.njit(cache=True, parallel=True)
def jaccard(cp, starts, ends, pairs, ngram, word, base, salt, out, threads):
    """Exact Jaccard of the shingle-hash sets of texts a and b for each (a, b) in ``pairs``: every
    text's set once, sorted (parallel over texts), then one merge per pair (parallel over pairs)."""
    n = len(starts)
    offsets = np.empty(n + 1, np.int64)
    offsets[0] = 0
    for t in range(n):
        offsets[t + 1] = offsets[t] + max(ends[t] - starts[t], 1)
    flat = np.empty(offsets[n], np.uint64)
    sizes = np.empty(n, np.int64)
    parts = min(n, 4 * threads)
    for p in nb.prange(parts):
        lo, hi = p * n // parts, (p + 1) * n // parts
        longest = 1
        for t in range(lo, hi):
            longest = max(longest, ends[t] - starts[t] + 1)
        buf = np.empty(longest, np.uint64)
        for t in range(lo, hi):
            m = _shingles(cp, starts[t], ends[t], ngram, word, base, salt, buf)
            srt = np.sort(buf[:m])
            k = 0
            o = offsets[t]
            for x in range(m):
                if x == 0 or srt[x] != srt[x - 1]:
                    flat[o + k] = srt[x]
                    k += 1
            sizes[t] = k
    for q in nb.prange(len(pairs)):
        a, b = pairs[q, 0], pairs[q, 1]
        i, j = offsets[a], offsets[b]
        ie, je = i + sizes[a], j + sizes[b]
        inter = 0
        while i < ie and j < je:
            if flat[i] == flat[j]:
                inter += 1
                i += 1
                j += 1
            elif flat[i] < flat[j]:
                i += 1
            else:
                j += 1
        out[q] = inter / max(sizes[a] + sizes[b] - inter, 1)


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


@nb.njit(cache=True)
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


@nb.njit(cache=True)
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


@nb.njit(cache=True)
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


@nb.njit(cache=True)
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


@nb.njit(cache=True)
def first_gram_hits(cp, starts, ends, ns, base, salt, slots, where, hit_word, hit_key, hit_n):
    """For each text, its first n-word window (n in ``ns``, in that order) whose hash is in the
    table: the window's first word, the index of the key it matched and n (hit_word -1: none).
    A text's word hashes are computed once for every n."""
    wh = np.empty(max(len(cp), 1), np.uint64)
    mask = np.uint64(len(slots) - 1)
    for t in range(len(starts)):
        hit_word[t] = -1
        if ends[t] <= starts[t]:
            continue
        words = _word_hashes(cp, starts[t], ends[t], base, salt, wh)
        for n in ns:
            for w in range(words - n + 1):
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
