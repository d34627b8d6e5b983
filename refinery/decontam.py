"""Decontamination: training records that share a word n-gram with an evaluation set.

Text is lower-cased and split into words (``\\w+``), so punctuation and spacing do not hide a
copy. Every n-gram (13 words by default, profile.decontam.ngram, as in the GPT-3 and Llama
reports) of every evaluation item in use is hashed (64-bit xxhash) into one sorted array; a
training record is contaminated when any of its n-grams is in that array. An evaluation item
shorter than n words contributes its whole word sequence when it has at least MIN_SHORT_WORDS
words (shorter ones, e.g. "True", would match everything and are ignored).

The same local files the benchmark report scores are checked, plus the demo held-out tasks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import xxhash

from refinery.config import Profile
from refinery.eval_tasks import TASKS, doc_texts, load_docs

MIN_SHORT_WORDS = 8
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _grams(ws: list[str], n: int) -> Iterable[str]:
    if len(ws) < n:
        if len(ws) >= min(n, MIN_SHORT_WORDS):
            yield " ".join(ws)
        return
    for i in range(len(ws) - n + 1):
        yield " ".join(ws[i:i + n])


def _hash(gram: str) -> int:
    return xxhash.xxh3_64_intdigest(gram.encode("utf-8"))


class NgramIndex:
    """Hashes of every eval n-gram, each with the (first) eval set it came from."""

    def __init__(self, eval_texts: dict[str, list[str]], ngram: int):
        self.ngram = ngram
        self.sets = sorted(eval_texts)
        hashes: list[int] = []
        owners: list[int] = []
        for set_idx, name in enumerate(self.sets):
            for text in eval_texts[name]:
                for gram in _grams(words(text), ngram):
                    hashes.append(_hash(gram))
                    owners.append(set_idx)
        h = np.array(hashes, dtype=np.uint64)
        o = np.array(owners, dtype=np.int32)
        order = np.argsort(h, kind="stable")
        self.hashes, self.owners = h[order], o[order]
        # also index short texts' whole sequences by length, to test a record's windows of that length
        self.short_lengths = sorted({len(ws) for texts in eval_texts.values() for t in texts
                                     if min(ngram, MIN_SHORT_WORDS) <= len(ws := words(t)) < ngram})

    def __len__(self) -> int:
        return len(self.hashes)

    def find(self, text: str) -> tuple[str, str] | None:
        """(eval set, matching n-gram) for the first shared n-gram in ``text``, or None."""
        if len(self.hashes) == 0:
            return None
        ws = words(text)
        for n in (self.ngram, *self.short_lengths):
            if len(ws) < n:
                continue
            grams = [" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1)]
            h = np.fromiter((_hash(g) for g in grams), dtype=np.uint64, count=len(grams))
            pos = np.searchsorted(self.hashes, h)
            pos[pos == len(self.hashes)] = 0
            hit = np.nonzero(self.hashes[pos] == h)[0]
            if hit.size:
                first = int(hit[0])
                return self.sets[int(self.owners[pos[first]])], grams[first]
        return None


def record_text(messages: list[dict[str, str]] | None) -> str:
    return "\n".join(m.get("content") or "" for m in messages or [])


def find_contaminated(records: pa.Table, eval_texts: dict[str, list[str]], ngram: int) -> dict[str, str]:
    """Record id -> detail ("<eval set>: shares the N-gram '<words>'") for every record of
    ``records`` (RECORD_SCHEMA: id, messages) that shares an n-gram with an evaluation text."""
    for column in ("id", "messages"):
        if column not in records.column_names:
            raise ValueError(f"find_contaminated: records need an {column!r} column, "
                             f"got {records.column_names}")
    index = NgramIndex(eval_texts, ngram)
    found: dict[str, str] = {}
    ids = records.column("id").to_pylist()
    for rid, messages in zip(ids, records.column("messages").to_pylist(), strict=True):
        match = index.find(record_text(messages))
        if match:
            eval_set, gram = match
            found[str(rid)] = f"{eval_set}: shares the {len(gram.split())}-gram '{gram}'"
    return found


def eval_texts_for(profile: Profile, heldout_path: Path | None = None) -> dict[str, list[str]]:
    """The text of every evaluation set the profile's benchmark report uses (the full local test
    sets, not only the scored subsets; few-shot train/dev splits are not test items), plus the demo held-out tasks when ``heldout_path`` is given."""
    data_dir = profile.resolve_path(profile.eval.data_dir)
    names = [n for n in profile.eval.tasks if n in TASKS and n != "demo_heldout"]
    texts: dict[str, list[str]] = {}
    for name in names:
        docs = load_docs(name, data_dir)
        texts[name] = [t for d in docs["test"] for t in doc_texts(name, d)]  # train/dev splits are fair game
    if heldout_path is not None:
        docs = load_docs("demo_heldout", data_dir, heldout_path)
        texts["demo_heldout"] = [t for d in docs["test"] for t in doc_texts("demo_heldout", d)]
    return texts
