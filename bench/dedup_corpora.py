"""Corpora with known duplicates, for bench/dedup_cli.py and tests/test_dedup.py.

- ``prose_corpus``: English prose records of 600-1,500 characters, recombined from the sentences of
  the shared data's prose files (WikiText-2, LAMBADA, C4 and Wikipedia demos, LIMA and Alpaca-GPT4
  answers), with a share of planted copies that have 1% of their words changed.
- ``templated_corpus``: short instruction records built from a few long shared preambles with short
  variable tails (arithmetic, translation, rewrite prompts), so that LSH buckets hold hundreds of
  records, plus planted near copies. Its ground truth is computed, not assumed: ``greedy_truth``
  runs refinery's greedy rule with the exact Jaccard of every pair of a family.

Records are ``(id, text)``; a group is an original and its planted copies.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refinery.config import resolve_path

DATA = resolve_path("${REFINERY_SHARED_DATA:-../shared/data}")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'“])")


def mutate(text: str, fraction: float, rng: random.Random) -> str:
    """Replace, delete or insert about ``fraction`` of the words (at least one)."""
    words = text.split(" ")
    for _ in range(max(1, round(len(words) * fraction))):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.5:
            words[i] = rng.choice(["alpha", "beta", "gamma", "delta", "omega"])
        elif op < 0.75 and len(words) > 2:
            del words[i]
        else:
            words.insert(i, rng.choice(["very", "really", "quite", "also"]))
    return " ".join(words)


def prose_sentences() -> list[str]:
    """English sentences of 40-400 characters from the shared data's prose, each once."""
    texts: list[str] = []
    wiki = (DATA / "wikitext2_raw" / "wikitext-test.txt").read_text(encoding="utf-8")
    wiki = wiki.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    texts += [line.strip() for line in wiki.splitlines() if len(line.strip()) > 100 and not line.startswith(" =")]
    texts += (DATA / "llamafactory_demo" / "wiki_demo.txt").read_text(encoding="utf-8").splitlines()
    texts += [json.loads(line)["text"] for line in
              (DATA / "llamafactory_demo" / "c4_demo.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    for name in ("llamafactory_demo/alpaca_en_demo.json", "llamafactory_hist/lima.json"):
        texts += [r["output"] for r in json.loads((DATA / name).read_text(encoding="utf-8"))]
    for name in ("lambada_test_plain_text.txt", "lambada_development_plain_text.txt"):
        for line in (DATA / "lambada" / name).read_text(encoding="utf-8").splitlines():
            # LAMBADA is lower-cased and tokenized: rejoin its punctuation, capitalize its sentences
            line = re.sub(r" ([.,!?;:']|n't)", r"\1", line.replace("`` ", '"').replace(" ''", '"'))
            texts.append(". ".join(s[:1].upper() + s[1:] for s in line.split(". ")))
    seen: set[str] = set()
    out = []
    for text in texts:
        for s in _SENTENCE.split(" ".join(text.split())):
            if 40 <= len(s) <= 400 and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def prose_corpus(n: int, seed: int = 0, copies: float = 0.15, edit: float = 0.01) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``n`` records, ``copies`` of them planted copies (1-3 per original) with ``edit`` of the words
    changed; returns (records in stream order, planted id -> original id)."""
    rng = random.Random(seed)
    pool = prose_sentences()
    n_copies = int(n * copies)
    originals: list[str] = []
    for _ in range(n - n_copies):
        target, parts, size = rng.randint(600, 1500), [], 0
        while size < target - 40:
            s = rng.choice(pool)
            if size + len(s) + 1 > 1500:
                continue
            parts.append(s)
            size += len(s) + 1
        originals.append(" ".join(parts))
    records = [(f"p{i:06d}", t) for i, t in enumerate(originals)]
    planted: dict[str, str] = {}
    while len(planted) < n_copies:
        k = rng.randrange(len(originals))
        for _ in range(min(rng.choice([1, 1, 1, 2, 3]), n_copies - len(planted))):
            rid = f"c{len(planted):06d}"
            records.append((rid, mutate(originals[k], edit, rng)))
            planted[rid] = f"p{k:06d}"
    return _after_originals(records, planted, rng), planted


def _after_originals(records: list[tuple[str, str]], planted: dict[str, str],
                     rng: random.Random) -> list[tuple[str, str]]:
    """Shuffled, with every planted copy after its original (as a real stream would have it)."""
    rng.shuffle(records)
    pos = {rid: i for i, (rid, _) in enumerate(records)}
    for copy, orig in planted.items():
        if pos[copy] < pos[orig]:
            pos[copy], pos[orig] = pos[orig], pos[copy]
    return sorted(records, key=lambda r: pos[r[0]])


# ------------------------------------------------------------------------------------ templated

PREAMBLES = [
    "You are a careful assistant. Read the task below and answer it exactly, without any explanation, "
    "without repeating the question and without adding anything that was not asked for. Task: ",
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. Instruction: ",
    "The following is a sentence written by a student in an English class. Translate it into French, keeping "
    "the meaning and the tone of the original, and return only the translation. Sentence: ",
    "Rewrite the text below so that it is shorter and clearer for a general audience, keep every fact it "
    "states, and do not add new information of your own. Text: ",
]
_WORDS = ("river house garden letter morning window teacher market winter bridge station music doctor "
          "village mountain coffee paper answer number friend summer forest city road table light story").split()


def _tail(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(10, 10_000), rng.randrange(10, 10_000)
        return f"What is {a} {rng.choice('+-*')} {b}?"
    n = rng.randint(4, 14) if kind == 1 else rng.randint(10, 30)
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."


def templated_corpus(families: int = 40, per_family: int = 300, seed: int = 0,
                     copies: float = 0.1) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Records ``preamble + short tail`` in families that share one preamble (``per_family`` each),
    plus ``copies`` planted near copies (a word changed, or the text upper-cased with a doubled
    space); returns (records, id -> group). Families of the same base preamble differ only in a
    short tag, so they are one ground-truth group (every pair of it is checked)."""
    rng = random.Random(seed)
    records: list[tuple[str, str]] = []
    group: dict[str, int] = {}
    for f in range(families):
        preamble = PREAMBLES[f % len(PREAMBLES)]
        for i in range(per_family):
            rid = f"t{f:03d}_{i:04d}"
            records.append((rid, f"[set {f}] " + preamble + _tail(rng)))
            group[rid] = f % len(PREAMBLES)
    originals = list(records)
    for k in range(int(len(originals) * copies)):
        rid, text = rng.choice(originals)
        copy = mutate(text, 0.01, rng) if rng.random() < 0.5 else text.replace(". ", ".  ", 1).upper()
        records.append((f"{rid}_copy{k}", copy))
        group[f"{rid}_copy{k}"] = group[rid]
    rng.shuffle(records)
    return records, group


def greedy_truth(records: Sequence[tuple[str, str]], group: dict[str, int], threshold: float,
                 shingling: Any = None) -> dict[str, str | None]:
    """id -> the kept record it duplicates (None: kept), by refinery's greedy rule over the exact
    Jaccard of EVERY pair of records in the same group (no LSH). Records of different groups must
    be distinct (``templated_corpus``'s groups share nothing but a short tag). The Jaccard is
    refinery.dedup's kernel, which tests/test_dedup.py checks against Python sets of real n-grams."""
    import numpy as np

    from refinery.dedup import Shingling, normalize_batch

    shingling = shingling or Shingling()
    batch = normalize_batch([t for _, t in records])
    members: dict[int, list[int]] = {}
    for i, (rid, _) in enumerate(records):
        members.setdefault(group[rid], []).append(i)
    out: dict[str, str | None] = {}
    for rows in members.values():
        rows_a = np.array(rows)
        sub = batch.take(rows_a)
        i, j = np.triu_indices(len(rows), 1)
        sim = np.zeros((len(rows), len(rows)))
        sim[i, j] = shingling.jaccard(sub, np.stack([i, j], axis=1))
        kept: list[int] = []
        for b in range(len(rows)):
            best = max(kept, key=lambda a: sim[a, b], default=None)
            if best is not None and sim[best, b] >= threshold:
                out[records[rows[b]][0]] = records[rows[best]][0]
            else:
                out[records[rows[b]][0]] = None
                kept.append(b)
    return out


def write_jsonl(records: Sequence[tuple[str, str]], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for rid, text in records:
            f.write(json.dumps({"id": rid, "text": text}, ensure_ascii=False) + "\n")
    return path
