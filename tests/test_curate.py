"""curate(): language ID + decontamination verdicts + exact/near dedup, counts that reconcile."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery.config import LangIdConfig, load_profile, resolve_path
from refinery.curate import INDEX_DIR, REASONS, curate, write_deduped_corpus
from refinery.dedup import DedupIndex, dedup_key
from refinery.landing import merge_curated
from refinery.langid import langid_text
from refinery.records import CLUSTER_SCHEMA, KEPT_SCHEMA, RECORD_SCHEMA, REJECTED_SCHEMA, joined_text, record_id

DATA = resolve_path("${REFINERY_SHARED_DATA:-../shared/data}")


def records_from(name: str, rows: list[tuple[str, str]], system: str | None = None) -> list[dict]:
    out = []
    for line, (user, answer) in enumerate(rows, start=1):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        out.append({"id": record_id(messages), "source": name, "format": "alpaca", "source_file": f"{name}.json",
                    "source_line": line, "license": "CC-BY-NC-4.0", "messages": messages,
                    "original": json.dumps({"instruction": user, "output": answer}, ensure_ascii=False)})
    return out


def alpaca(lang: str, n: int) -> list[tuple[str, str]]:
    path = DATA / "llamafactory_demo" / f"alpaca_{lang}_demo.json"
    assert path.exists(), f"shared data missing: {path}"
    rows = json.loads(path.read_text(encoding="utf-8"))
    seen, out = set(), []
    for r in rows:  # the demo file repeats a few records; planted duplicates should be the only ones
        pair = ((r["instruction"] + "\n" + r["input"]).strip(), r["output"])
        if pair[0].lower() not in seen and len(pair[1]) > 300:
            seen.add(pair[0].lower())
            out.append(pair)
    return out[:n]


def edit_words(text: str, every: int) -> str:
    words = text.split(" ")
    return " ".join("changed" if i % every == every // 2 else w for i, w in enumerate(words))


@pytest.fixture(scope="module")
def corpus():
    en = alpaca("en", 240)
    zh = alpaca("zh", 40)
    base = records_from("alpaca_en", en[:200], system="You are a helpful assistant.") + records_from("alpaca_zh", zh)
    planted = records_from("planted", [(u.upper(), a.replace(". ", " .  ")) for u, a in en[:10]]  # exact
                           + [(u, edit_words(a, 40)) for u, a in en[10:30]])  # near: 2.5% of words
    rng = random.Random(0)
    rng.shuffle(planted)
    records = base + planted
    contaminated = {records[50]["id"]: "mmlu: 13-gram overlap", records[205]["id"]: "gsm8k"}  # en, zh
    later = records_from("later", [(u, edit_words(a, 50)) for u, a in en[100:110]] + en[200:240])
    return records, contaminated, later


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


@pytest.fixture(scope="module")
def curated(corpus):
    records, contaminated, _ = corpus
    return curate(table(records), load_profile("smoke"), contaminated=contaminated)


def test_curate_reasons_and_counts(corpus, curated):
    records, contaminated, _ = corpus
    profile = load_profile("smoke")
    result = curated
    c = result.counts
    assert c["read"] == len(records) == c["kept"] + sum(c[r] for r in REASONS)
    assert c["non_english"] >= 38  # the Chinese records (one of them is also "contaminated": language wins)
    assert c["contaminated"] == 1 and c["exact_duplicate"] == 10 and c["near_duplicate"] == 20
    for src, sc in result.per_source.items():
        assert sc["read"] == sc["kept"] + sum(sc[r] for r in REASONS), src
    assert result.per_source["planted"]["kept"] == 0
    assert result.kept.schema == KEPT_SCHEMA and result.rejected.schema == REJECTED_SCHEMA
    assert result.clusters.schema == CLUSTER_SCHEMA
    # nothing is lost: every input id is kept or rejected exactly once, with every column
    ids = result.kept["id"].to_pylist() + result.rejected["id"].to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in records)
    by_id = {r["id"]: r for r in records}
    rej = result.rejected.to_pylist()
    for row in rej:
        assert row["messages"] == by_id[row["id"]]["messages"] and row["original"] == by_id[row["id"]]["original"]
        assert row["reason"] in REASONS and row["lang"]
    contaminated_row = next(r for r in rej if r["reason"] == "contaminated")
    assert contaminated_row["id"] == records[50]["id"] and contaminated_row["detail"] == "mmlu: 13-gram overlap"
    # duplicates point at kept records; clusters say the same thing
    kept_ids = set(result.kept["id"].to_pylist())
    dups = {r["id"]: (r["duplicate_of"], r["similarity"]) for r in rej if r["reason"].endswith("duplicate")}
    assert all(of in kept_ids for of, _ in dups.values())
    clusters = {r["removed_id"]: (r["kept_id"], r["similarity"]) for r in result.clusters.to_pylist()}
    assert clusters == dups
    assert all(s >= profile.dedup.threshold for _, s in dups.values())
    assert result.languages["zh"] >= 30 and result.languages["en"] >= 200
    assert set(result.length_percentiles) == set(result.per_source)
    p = result.length_percentiles["alpaca_en"]
    assert 0 < p["p50"] <= p["p90"] <= p["p99"]
    # the timed steps do not overlap: together they fit in the total
    seconds = result.stats["seconds"]
    assert sum(seconds[k] for k in ("map", "dedup", "tables")) <= seconds["total"] + 1e-6


def test_write_incremental_and_merge(corpus, curated, tmp_path):
    records, contaminated, later = corpus
    profile = load_profile("smoke")
    first = curated
    out = tmp_path / "v1"
    metrics = write_deduped_corpus(first, out)
    assert metrics["counts"] == first.counts and metrics["index_records"] == first.counts["kept"]
    assert pq.read_table(out / "kept.parquet").num_rows == first.counts["kept"]
    assert pq.read_table(out / "rejected.parquet").num_rows == first.counts["read"] - first.counts["kept"]
    assert pq.read_table(out / "clusters.parquet").num_rows == 30
    assert len(DedupIndex.load(out / INDEX_DIR, profile.dedup)) == first.counts["kept"]
    # a later batch: 10 near copies of records already kept, 40 new records, 1 exact copy
    batch = later + [records[3]]
    second = curate(table(batch), profile, existing=out)
    assert second.counts["near_duplicate"] == 10 and second.counts["exact_duplicate"] == 1
    assert second.counts["kept"] == 40
    old_ids = set(first.kept["id"].to_pylist())
    assert set(second.rejected["duplicate_of"].to_pylist()) <= old_ids
    assert len(second.index) == first.counts["kept"] + 40  # the index grows with what was kept
    # the published landing version is the union: counts add up, every row is there once
    (out / "manifest.json").write_text(json.dumps({"metrics": metrics}), encoding="utf-8")
    merged = merge_curated(out, second)
    assert merged.counts == {k: first.counts[k] + second.counts[k] for k in first.counts}
    assert merged.kept.num_rows == merged.counts["kept"] and merged.rejected.num_rows == 30 + 11 + (
        first.counts["read"] - first.counts["kept"] - 30)
    assert merged.per_source["later"]["read"] == len(later)
    assert merged.per_source["alpaca_en"] == {**first.per_source["alpaca_en"], "read": 201, "exact_duplicate": 1}
    assert merged.length_percentiles["alpaca_en"] == first.length_percentiles["alpaca_en"]  # nothing new kept there


def test_joined_text_matches_per_record_helpers(corpus):
    records, _, _ = corpus
    t = table(records[:50] + [{**records[0], "messages": [{"role": "system", "content": "only a system turn"}]}])
    msgs = t["messages"].to_pylist()
    for text in ("user", "conversation"):
        cfg = LangIdConfig(text=text, max_chars=120)
        roles = ("user",) if text == "user" else ("user", "assistant")
        got = [s.replace("\n", " ") for s in joined_text(t["messages"], roles, " ", cfg.max_chars)]
        assert got == [langid_text(m, cfg) for m in msgs]
    for key in ("conversation", "prompt"):
        roles = ("user",) if key == "prompt" else ("user", "assistant")
        assert joined_text(t["messages"], roles, "\n") == [dedup_key(m, key) for m in msgs]
    assert np.all(np.array(joined_text(t["messages"], ("user",), "\n")[-1:]) == "")
