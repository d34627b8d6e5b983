"""Decontamination: training records that share a word n-gram with an evaluation set.

Text is normalized as for dedup (refinery.dedup: lower case, punctuation deleted, whitespace
runs -> one space) and split into words, so case, punctuation and spacing do not hide a copy.
Every n-gram (13 words by default, profile.decontam.ngram, as in the GPT-3 and Llama reports) of
every evaluation item in use is hashed (64 bits, compiled over whole batches) into one sorted
array; a training record is contaminated when any of its n-grams is in that array. An evaluation item
shorter than n words contributes its whole word sequence when it has at least MIN_SHORT_WORDS
words (shorter ones, e.g. "True", would match everything and are ignored).

The same local files the benchmark report scores are checked, plus the demo held-out tasks.
"""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import pyarrow as pa

from refinery import dedup_kernels as K
from refinery.config import Profile
from refinery.dedup import normalize_batch
from refinery.eval_tasks import TASKS, doc_texts, load_docs

MIN_SHORT_WORDS = 8


def _word_grams(batch, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash, text, first word) of every n-word window of a NormBatch (refinery.dedup_kernels)."""
    cap = max(len(batch.cp), 1)
    h, doc, word = np.empty(cap, np.uint64), np.empty(cap, np.int64), np.empty(cap, np.int64)
    m = K.word_grams(batch.cp, batch.starts, batch.ends, n, _BASE, _SALT, h, doc, word)
    return h[:m].copy(), doc[:m].copy(), word[:m].copy()  # copies: a view would keep all `cap` alive


_BASE, _SALT = np.uint64(0x9E3779B97F4A7C15 | 1), np.uint64(0x2545F4914F6CDD1D)


def _chunks(texts: list[str], max_chars: int) -> list[int]:
    """Cut points of consecutive runs of ``texts`` of at most ``max_chars`` characters (at least one text each)."""
    cuts, size = [0], 0
    for i, t in enumerate(texts):
        if size and size + len(t) > max_chars:
            cuts.append(i)
            size = 0
        size += len(t)
    return cuts + [len(texts)] if texts else cuts


class NgramIndex:
    """Hashes of every eval n-gram, each with the (first) eval set it came from.

    Words are those of refinery.dedup's normalized text (lower case, punctuation deleted), so case
    and punctuation do not hide a copy; n-grams are hashed in compiled code over whole batches.
    """

    def __init__(self, eval_texts: dict[str, list[str]], ngram: int, chunk_chars: int = 1 << 21):
        self.ngram = ngram
        self.sets = sorted(eval_texts)
        texts = [t for name in self.sets for t in eval_texts[name]]
        owner = np.repeat(np.arange(len(self.sets)), [len(eval_texts[name]) for name in self.sets])
        # a chunk of texts at a time: the n-gram arrays of a whole eval suite would be 24 bytes a
        # character (260 MB for MMLU + WikiText-2 + ...), the hashes kept are 8 bytes an n-gram
        cuts = _chunks(texts, chunk_chars)
        hashes, owners, word_counts = [], [], []
        for lo, hi in zip(cuts, cuts[1:]):
            batch = normalize_batch(texts[lo:hi])
            word_counts.append(np.array([len(t.split()) for t in batch.texts()], np.int64))
            h, doc, _ = _word_grams(batch, ngram)
            hashes.append(h)
            owners.append(owner[lo + doc])
        words = np.concatenate(word_counts) if word_counts else np.empty(0, np.int64)
        # an item shorter than n words (but not tiny) contributes its whole word sequence
        short = np.flatnonzero((words >= min(ngram, MIN_SHORT_WORDS)) & (words < ngram))
        self.short_lengths = sorted(set(words[short].tolist()))
        if len(short):
            batch = normalize_batch([texts[i] for i in short.tolist()])
            for n in self.short_lengths:
                sel = np.flatnonzero(words[short] == n)
                h, doc, _ = _word_grams(batch.take(sel), n)
                hashes.append(h)
                owners.append(owner[short[sel[doc]]])
        h = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
        o = (np.concatenate(owners) if owners else np.empty(0)).astype(np.int32)
        order = np.argsort(h, kind="stable")
        self.hashes, self.owners = h[order], o[order]
        self._table = K.hash_table(self.hashes)  # a lookup costs O(1), not a binary search
        # every key starts with a window of the shortest n: those windows go into a Bloom filter of
        # ~16 bits a key (a few MB, stays in cache), so most of a text's words skip the table
        self.prefix = min([ngram, *self.short_lengths])
        keys = []
        for lo, hi in zip(cuts, cuts[1:]):
            h, doc, word = _word_grams(normalize_batch(texts[lo:hi]), self.prefix)
            w = words[lo + doc]
            keys.append(h[np.where(w >= ngram, word <= w - ngram, word == 0)])  # a key's first window
        keys = np.concatenate(keys) if keys else np.empty(0, np.uint64)
        self._bits = K.bloom(keys, 1 << max(10, int(np.ceil(np.log2(max(len(keys), 1) / 4)))))

    def __len__(self) -> int:
        return len(self.hashes)

    def find(self, text: str) -> tuple[str, str] | None:
        """(eval set, matching n-gram) for the first shared n-gram in ``text``, or None."""
        return self.find_batch([text])[0]

    def find_batch(self, texts: list[str] | pa.Array) -> list[tuple[str, str] | None]:
        """``find`` for many texts (strings or an Arrow string column) at once (the n-grams of the
        whole batch in one pass)."""
        out: list[tuple[str, str] | None] = [None] * len(texts)
        if len(self.hashes) == 0 or len(texts) == 0:
            return out
        batch = normalize_batch(texts)
        hit_word = np.full(len(texts), -1, np.int64)
        hit_key = np.zeros(len(texts), np.int64)
        hit_n = np.zeros(len(texts), np.int64)
        ns = np.array([self.ngram, *self.short_lengths], np.int64)  # full n-grams first, then short items
        K.first_gram_hits(batch.cp, batch.starts, batch.ends, ns, self.prefix, _BASE, _SALT, self._bits, *self._table,
                          hit_word, hit_key, hit_n, numba.get_num_threads())
        for t in np.flatnonzero(hit_word >= 0).tolist():  # rare: the words, for the report
            ws = batch.take(np.array([t])).texts()[0].split(" ")
            w, n = int(hit_word[t]), int(hit_n[t])
            out[t] = (self.sets[int(self.owners[hit_key[t]])], " ".join(ws[w:w + n]))
        return out


def find_contaminated(records: pa.Table, eval_texts: dict[str, list[str]], ngram: int) -> dict[str, str]:
    """Record id -> detail ("<eval set>: shares the N-gram '<words>'") for every record of
    ``records`` (RECORD_SCHEMA: id, messages) that shares an n-gram with an evaluation text."""
    for column in ("id", "messages"):
        if column not in records.column_names:
            raise ValueError(f"find_contaminated: records need an {column!r} column, "
                             f"got {records.column_names}")
    return contaminated_ids(NgramIndex(eval_texts, ngram), records)


def contaminated_ids(index: NgramIndex, records: pa.Table | pa.RecordBatch, batch_size: int = 20_000) -> dict[str, str]:
    """``find_contaminated`` with a built index, ``batch_size`` records at a time."""
    from refinery.records import TEXT_ROLES, joined_text

    found: dict[str, str] = {}
    for lo in range(0, records.num_rows, batch_size):
        part = records.slice(lo, batch_size)
        texts = joined_text(part.column("messages"), TEXT_ROLES["all"], "\n")
        for rid, match in zip(part.column("id").to_pylist(), index.find_batch(texts), strict=True):
            if match:
                eval_set, gram = match
                found[str(rid)] = f"{eval_set}: shares the {len(gram.split())}-gram '{gram}'"
    return found


def eval_texts_for(profile: Profile, heldout_path: Path | None = None) -> dict[str, list[str]]:
    """The text of every evaluation set the profile's benchmark report uses (the full local test
    sets, not only the scored subsets; few-shot train/dev splits are not test items): its tasks,
    WikiText-2 whenever the fidelity token set reads it, and the demo held-out tasks when
    ``heldout_path`` is given."""
    data_dir = profile.resolve_path(profile.eval.data_dir)
    names = [n for n in profile.eval.tasks if n in TASKS and n != "demo_heldout"]
    if profile.eval.fidelity.wikitext_chunks and "wikitext" not in names:
        names.append("wikitext")
    texts: dict[str, list[str]] = {}
    for name in names:
        docs = load_docs(name, data_dir)
        texts[name] = [t for d in docs["test"] for t in doc_texts(name, d)]  # train/dev splits are fair game
    if heldout_path is not None:
        docs = load_docs("demo_heldout", data_dir, heldout_path)
        texts["demo_heldout"] = [t for d in docs["test"] for t in doc_texts("demo_heldout", d)]
    return texts
