"""Decontamination: n-gram overlap between training records and the evaluation sets."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from refinery.config import load_profile
from refinery.decontam import NgramIndex, eval_texts_for, find_contaminated

EVAL = {"gsm8k": ["Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
                  "muffins for her friends every day with four."],
        "mmlu": ["Which of the following best describes the structure that collects urine in the body?"]}


def records(*texts: str) -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in range(len(texts))],
                     "messages": [[{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]
                                  for t in texts]})


def test_planted_13_gram_is_found_with_the_eval_set_and_the_words():
    planted = ("Here is a puzzle: she eats three for breakfast every morning and bakes muffins for her "
               "friends every day, so how many are left?")
    found = find_contaminated(records("Write a poem about autumn leaves falling on a quiet street.", planted),
                              EVAL, 13)
    assert list(found) == ["r1"]
    assert found["r1"].startswith("gsm8k: shares the 13-gram '")
    assert "eats three for breakfast every morning and bakes muffins for her friends" in found["r1"]


def test_case_and_punctuation_do_not_hide_a_copy_but_12_words_are_not_13():
    copy = "SHE EATS THREE -- for breakfast, every morning; and bakes muffins for her friends!!"
    assert find_contaminated(records(copy), EVAL, 13)["r0"].startswith("gsm8k:")
    twelve = "she eats three for breakfast every morning and bakes muffins for her"  # 12 words
    assert find_contaminated(records(twelve), EVAL, 13) == {}


def test_short_eval_items_match_whole_and_tiny_ones_are_ignored():
    # the MMLU question has 14 words < 20: with ngram=20 the whole question is the n-gram
    hit = find_contaminated(records("Quiz: which of the following best describes the structure that collects "
                                    "urine in the body? Answer: the bladder."), EVAL, 20)
    assert "mmlu" in hit["r0"]
    index = NgramIndex({"bbh": ["True", "not ( True ) and ( True ) is"]}, 13)
    assert len(index) == 0  # under 8 words: would match nearly everything


def test_clean_corpus_and_missing_column():
    assert find_contaminated(records("Explain photosynthesis to a child.", "List three prime numbers."), EVAL, 13) == {}
    with pytest.raises(ValueError, match="'messages' column"):
        find_contaminated(pa.table({"id": ["a"]}), EVAL, 13)


def test_eval_texts_for_reads_every_test_set_in_use(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("REFINERY_SHARED_DATA", str(shared_data))
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "profiles" / "smoke.yaml").read_text())
    raw["eval"]["tasks"] = {"mmlu": {}, "gsm8k": {}, "bbh": {}, "humaneval": {}, "wikitext": {}, "demo_heldout": {}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"id": "h1", "family": "capitals", "prompt": "The capital city of the small "
                                   "European country that borders Spain and France is which one?",
                                   "answer": "Andorra la Vella", "choices": ["a", "b", "c", "d"], "label": 0}) + "\n")
    texts = eval_texts_for(load_profile(str(tmp_path / "p.yaml")), heldout)
    # test splits only: MMLU 14042 questions (+4 choices each), GSM8K 1319 (question + answer)
    assert {k: len(v) for k, v in texts.items()} == {"mmlu": 14042 * 5, "gsm8k": 1319 * 2, "bbh": 6511,
                                                     "humaneval": 164, "wikitext": 62, "demo_heldout": 2}
    leaked = "the capital city of the small European country that borders Spain and France is which one"
    found = find_contaminated(records(leaked), texts, 13)
    assert found["r0"].startswith("demo_heldout:")
