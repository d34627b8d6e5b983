"""fastText language ID on real English, Chinese and the 11 parallel MGSM languages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import fasttext
import numpy as np
import pyarrow.parquet as pq
import pytest

from refinery.config import LangIdConfig, resolve_path
from refinery.langid import LanguageIdentifier, bundled_model_path, langid_text

DATA = resolve_path("${REFINERY_SHARED_DATA:-../shared/data}")


def conv(user: str, answer: str) -> list[dict]:
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def ident() -> LanguageIdentifier:
    return LanguageIdentifier(LangIdConfig())


@pytest.fixture(scope="module")
def alpaca() -> dict[str, list[list[dict]]]:
    out = {}
    for lang in ("en", "zh"):
        path = DATA / "llamafactory_demo" / f"alpaca_{lang}_demo.json"
        assert path.exists(), f"shared data missing: {path}"
        rows = json.loads(path.read_text(encoding="utf-8"))[:300]
        out[lang] = [conv((r["instruction"] + "\n" + r["input"]).strip(), r["output"]) for r in rows]
    return out


def test_english_vs_chinese(ident, alpaca):
    cfg = ident.cfg
    en = ident.classify([langid_text(m, cfg) for m in alpaca["en"]])
    zh = ident.classify([langid_text(m, cfg) for m in alpaca["zh"]])
    assert np.mean([p.p_en >= cfg.min_score for p in en]) >= 0.97
    assert np.mean([p.p_en < cfg.min_score for p in zh]) >= 0.97
    assert np.mean([p.label in ("zh", "wuu", "yue", "ja") for p in zh]) >= 0.97
    # ALL-CAPS English: lid.176 alone calls most of it non-English; the wrapper lower-cases it
    shouting = ident.classify([langid_text(m, cfg).upper() for m in alpaca["en"]])
    assert np.mean([p.p_en >= cfg.min_score for p in shouting]) >= 0.97
    for p in en + zh:
        assert 0.0 <= p.p_en <= 1.0 and 0.0 < p.score <= 1.0 and p.label
        if p.label == "en":
            assert p.p_en == p.score


def test_mgsm_parallel_languages(ident):
    files = sorted((DATA / "mgsm").glob("mgsm_*.tsv"))
    assert len(files) == 11, f"expected 11 MGSM languages in {DATA / 'mgsm'}"
    for path in files:
        lang = path.stem.split("_")[1]
        questions = [line.split("\t")[0] for line in path.read_text(encoding="utf-8").splitlines()[:100]]
        preds = ident.classify([langid_text(conv(q, ""), ident.cfg) for q in questions])
        english = np.mean([p.p_en >= ident.cfg.min_score for p in preds])
        if lang == "en":
            assert english >= 0.98, path.name
        else:
            assert english <= 0.02, path.name
            # the language itself is recognized (Chinese is sometimes tagged Japanese on short text)
            assert np.mean([p.label == lang for p in preds]) >= (0.8 if lang in ("zh", "ja") else 0.9), path.name


def test_fasttext_quirks_handled(ident):
    """The two fastText quirks (STACK-NOTES): if the library changes, these show it."""
    model = fasttext.load_model(str(bundled_model_path()))
    # numpy 2: predict on a str raises; predict on a list works. We always pass a list.
    if int(np.__version__.split(".")[0]) >= 2:
        with pytest.raises(ValueError, match="copy"):
            model.predict("hello world")
    with pytest.raises(ValueError, match="one line"):
        model.predict(["first line\nsecond line"])
    # ...and our wrapper takes single texts with newlines, tabs and CRs
    text = "This is the first line of an English answer.\nAnd\tthis is\r\nthe second one."
    [pred] = ident.classify([text])
    assert pred.label == "en" and pred.p_en > 0.9
    assert ident.classify([""])[0].label == "und"
    with pytest.raises(TypeError, match="list"):
        ident.classify(text)  # a bare str would otherwise be classified letter by letter


def test_langid_text_slices():
    messages = [{"role": "system", "content": "SYSTEM " * 50}, {"role": "user", "content": "Bonjour\nà tous"},
                {"role": "assistant", "content": "Hello everyone"}]
    assert langid_text(messages, LangIdConfig(text="user")) == "Bonjour à tous"
    assert langid_text(messages, LangIdConfig(text="conversation")) == "Bonjour à tous Hello everyone"
    assert langid_text(messages, LangIdConfig(text="conversation", max_chars=7)) == "Bonjour"


def test_model_path_from_profile(tmp_path):
    copy = tmp_path / "lid.ftz"
    shutil.copy(bundled_model_path(), copy)
    ident = LanguageIdentifier(LangIdConfig(model_path=str(copy)))
    assert ident.path == copy and ident.classify(["Where is the station?"])[0].label == "en"
    with pytest.raises(FileNotFoundError, match="model_path"):
        LanguageIdentifier(LangIdConfig(model_path=str(tmp_path / "missing.bin")))


def test_cli(tmp_path, alpaca):
    src = tmp_path / "in.jsonl"
    rows = [{"messages": m} for m in alpaca["en"][:20]] + [{"text": m[1]["content"]} for m in alpaca["zh"][:10]]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.parquet"
    proc = subprocess.run([sys.executable, "-m", "refinery.langid", str(src), "--out", str(out),
                           "--profile", "smoke", "--max-chars", "300"], capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout)
    assert summary["records"] == 30 and summary["english"] == 20 and summary["non_english"] == 10
    assert summary["config"]["max_chars"] == 300
    table = pq.read_table(out)
    assert table["english"].to_pylist() == [True] * 20 + [False] * 10
    assert set(table.column_names) >= {"id", "messages", "lang", "lang_score", "p_en"}


def test_cli_reads_instruction_formats_and_reports_bad_input(tmp_path, capsys):
    from refinery.langid import main

    # a raw LLaMA-Factory Alpaca JSON array, read the way ingest reads it
    zh = DATA / "llamafactory_demo" / "alpaca_zh_demo.json"
    assert main([str(zh), "--out", str(tmp_path / "zh.parquet")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == pq.read_metadata(tmp_path / "zh.parquet").num_rows == 1000
    assert summary["non_english"] > 900 and max(summary["languages"], key=summary["languages"].get) == "zh"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', encoding="utf-8")
    assert main([str(bad)]) == 2
    err = capsys.readouterr()
    assert err.out == "" and f"{bad}:2" in err.err and "invalid JSON" in err.err
    # a flag out of range is named as the flag the user typed
    assert main([str(zh), "--min-score", "2"]) == 2
    assert "--min-score 2.0" in capsys.readouterr().err
    # --model is relative to the working directory, like every other path on the command line
    assert main([str(zh), "--model", "no-such-model.bin"]) == 2
    assert str(Path.cwd() / "no-such-model.bin") in capsys.readouterr().err
