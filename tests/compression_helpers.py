"""Shared inputs for the compression tests: the smoke profile's tiny random Llama (with the
embedded SmolLM2 tokenizer and chat template) published as qlora_model, and a deduped_corpus of
real English and Chinese instruction records from the shared data directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from refinery import base_model
from refinery.artifacts import Artifact, load_artifact, staged_artifact
from refinery.config import Profile, load_profile, resolve_path
from refinery.records import KEPT_SCHEMA, record_id, write_table

DEMO_DIR = resolve_path("${REFINERY_SHARED_DATA:-../shared/data}") / "llamafactory_demo"


def quiet(*_args) -> None:
    pass


def corpus_rows(per_language: int = 40, *, english_only: bool = False) -> list[dict]:
    """Alpaca records as deduped_corpus keeps them: English labelled en, Chinese labelled zh."""
    rows = []
    sources = (("alpaca_en_demo.json", "en"),) if english_only else (("alpaca_en_demo.json", "en"),
                                                                    ("alpaca_zh_demo.json", "zh"))
    for name, lang in sources:
        path = DEMO_DIR / name
        for i, rec in enumerate(json.loads(path.read_text(encoding="utf-8"))[:per_language]):
            user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
            rows.append({"id": record_id(messages), "source": name, "format": "alpaca",
                         "source_file": str(path), "source_line": i + 1, "license": "CC-BY-NC-4.0",
                         "messages": messages, "original": json.dumps(rec, ensure_ascii=False),
                         "lang": lang, "lang_score": 0.99, "p_en": 0.99 if lang == "en" else 0.01})
    return rows


def smoke_profile(**sections) -> Profile:
    """The smoke profile with some sections' fields replaced: smoke_profile(prune={...})."""
    profile = load_profile("smoke")
    update = {name: getattr(profile, name).model_copy(update=fields) for name, fields in sections.items()}
    return profile.model_copy(update=update)


def publish_inputs(home: Path) -> dict[str, Artifact]:
    """qlora_model (the tiny base model's folder) and deduped_corpus under ``home``."""
    base = base_model.build(load_profile("smoke"), home=home, log=quiet)
    with staged_artifact("qlora_model", config={"test_stand_in": base.version}, home=home) as st:
        shutil.copytree(base.path / "model", st.path / "model")
    qlora = load_artifact(st.path)
    with staged_artifact("deduped_corpus", home=home) as st:
        write_table(st.path / "kept.parquet", corpus_rows(), KEPT_SCHEMA)
    return {"qlora_model": qlora, "deduped_corpus": load_artifact(st.path)}
