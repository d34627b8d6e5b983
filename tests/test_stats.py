"""refinery.stats, refinery.verify and refinery.landing without Dagster: real DuckDB files, real parquet, real fastText."""

import json
import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery import stats
from refinery.artifacts import load_artifact, staged_artifact
from refinery.config import PROJECT_ROOT, SourceConfig, load_profile
from refinery.ingest import ingest, write_raw_corpus
from refinery.landing import archive, pending_files, processed_sources
from refinery.records import CLUSTER_SCHEMA, KEPT_SCHEMA, REJECTED_SCHEMA, record_id, write_table
from refinery.verify import drift_failures, exact_duplicates, measure, verify_corpus

TABLES = {"materializations", "source_stats", "languages", "duplicate_clusters", "quarantine", "verifications",
          "schema_info"}


def _msgs(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _record(source: str, user: str, assistant: str, **extra) -> dict:
    messages = _msgs(user, assistant)
    return {"id": record_id(messages), "source": source, "format": "openai", "source_file": f"{source}.jsonl",
            "source_line": 1, "license": "test", "messages": messages, "original": "{}", **extra}


def _raw_artifact(home: Path, tmp_path: Path, good: int, bad: int):
    src = tmp_path / f"src{good}.jsonl"
    lines = [json.dumps({"messages": _msgs(f"Question number {i}?", f"Answer number {i}.")}) for i in range(good)]
    src.write_text("\n".join(lines + ["{not json"] * bad) + "\n")
    result = ingest([SourceConfig(name="alpha", path=str(src), format="openai")], max_record_bytes=10_000)
    with staged_artifact("raw_corpus", home=home) as st:
        st.metrics.update(write_raw_corpus(result, st.path))
    return load_artifact(st.path)


def test_schema_is_idempotent_and_documented(tmp_path):
    conn = stats.connect(tmp_path / "s.duckdb")
    stats.ensure_schema(conn)  # twice: no error, no duplicate rows
    tables = {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert TABLES <= tables
    assert conn.execute("SELECT value FROM schema_info").fetchall() == [(str(stats.SCHEMA_VERSION),)]
    doc = (PROJECT_ROOT / "docs" / "stats.md").read_text()
    for table in TABLES - {"schema_info"}:
        columns = [r[0] for r in conn.execute(f"DESCRIBE {table}").fetchall()]
        missing = [c for c in columns if f"`{c}`" not in doc]
        assert not missing, f"docs/stats.md does not describe {table}.{missing}"


def test_raw_corpus_counts_history_and_replacement(tmp_path):
    home = tmp_path / "home"
    conn = stats.connect(home / "refinery.duckdb")
    first = _raw_artifact(home, tmp_path, good=4, bad=2)
    totals = stats.record_raw_corpus(conn, first, run_id="r1", profile="test")
    assert (totals["records_read"], totals["records_kept"], totals["quarantined"]) == (6, 4, 2)
    stats.record_raw_corpus(conn, first, run_id="r1-retry", profile="test")  # same version again: replaced
    assert conn.execute("SELECT count(*) FROM materializations").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 2
    reasons = stats.quarantine_reasons(conn, first.version)
    assert reasons == [{"source": "alpha", "reason": "invalid JSON", "records": 2,
                        "example": f"{tmp_path / 'src4.jsonl'}:5"}]
    second = _raw_artifact(home, tmp_path, good=7, bad=0)
    stats.record_raw_corpus(conn, second, run_id="r2", profile="test")
    assert [r["records_kept"] for r in stats.history(conn, "raw_corpus")] == [4, 7]
    assert stats.materialization(conn, "raw_corpus")["artifact_version"] == second.version
    row = stats.source_rows(conn, "raw_corpus", first.version)[0]
    # characters of all turns: "Question number 1?" (18) + "Answer number 1." (16)
    assert row["length_p50"] == 34.0


def _deduped_artifact(home: Path, reason: str = "exact_duplicate"):
    keep = [_record("a", "How do I boil an egg?", "Put it in boiling water for nine minutes.", lang="en",
                    lang_score=0.98, p_en=0.98),
            _record("a", "What is the capital of France?", "Paris.", lang="en", lang_score=0.97, p_en=0.97),
            _record("b", "Quelle heure est-il ?", "Il est midi.", lang="fr", lang_score=0.6, p_en=0.3)]
    rejected = [_record("a", "Wie spät ist es?", "Es ist zwölf.", lang="de", lang_score=0.9, p_en=0.05,
                        reason="non_english", duplicate_of=None, similarity=None, detail=None),
                _record("b", "How do I boil an egg?", "Put it in boiling water for nine minutes.", lang="en",
                        lang_score=0.98, p_en=0.98, reason=reason, duplicate_of=keep[0]["id"], similarity=1.0,
                        detail=None)]
    with staged_artifact("deduped_corpus", home=home) as st:
        write_table(st.path / "kept.parquet", keep, KEPT_SCHEMA)
        write_table(st.path / "rejected.parquet", rejected, REJECTED_SCHEMA)
        write_table(st.path / "clusters.parquet", [{"kept_id": keep[0]["id"], "removed_id": rejected[1]["id"],
                                                    "kind": "exact", "similarity": 1.0}], CLUSTER_SCHEMA)
    return load_artifact(st.path)


def test_deduped_corpus_shares_languages_and_clusters(tmp_path):
    conn = stats.connect(tmp_path / "s.duckdb")
    art = _deduped_artifact(tmp_path / "home")
    totals = stats.record_deduped_corpus(conn, art, records_read={"a": 3, "b": 2}, run_id="r", profile="t")
    assert (totals["records_read"], totals["records_kept"], totals["non_english"], totals["exact_duplicates"]) == (5, 3, 1, 1)
    assert totals["english_share"] == pytest.approx(3 / 5) and totals["kept_english_share"] == pytest.approx(2 / 3)
    by_source = {r["source"]: r for r in stats.source_rows(conn, "deduped_corpus", art.version)}
    assert by_source["b"]["kept_english_share"] == 0.0 and by_source["a"]["non_english"] == 1
    assert [(r["lang"], r["records"], r["kept"]) for r in stats.top_languages(conn, art.version)] == [
        ("en", 3, 2), ("de", 1, 0), ("fr", 1, 1)]
    [example] = stats.cluster_examples(conn, art)
    assert example["kind"] == "exact" and example["kept_text"] == example["removed_text"]
    assert example["kept_text"].startswith("How do I boil an egg?")


def test_unknown_rejection_reason_is_an_error_naming_the_file(tmp_path):
    conn = stats.connect(tmp_path / "s.duckdb")
    art = _deduped_artifact(tmp_path / "home", reason="too_short")
    with pytest.raises(ValueError, match=r"rejected\.parquet: unknown rejection reasons \['too_short'\]"):
        stats.record_deduped_corpus(conn, art, records_read={"a": 3, "b": 2})
    assert conn.execute("SELECT count(*) FROM materializations").fetchone()[0] == 0


def test_duckdb_lambda_syntax_quirk():
    """DuckDB 2.x refuses the arrow lambda by default; stats uses the Python-style lambda that works."""
    conn = duckdb.connect()
    with pytest.raises(duckdb.BinderException, match="lambda"):
        conn.execute("SELECT list_transform([1, 2], x -> x + 1)")
    value = conn.execute(f"SELECT {stats.CONVERSATION_CHARS} FROM (SELECT [{{'role': 'user', 'content': 'abc'}}, "
                         "{'role': 'assistant', 'content': 'de'}] AS messages)").fetchone()[0]
    assert value == 5


def test_example_queries_in_docs_run(tmp_path):
    conn = stats.connect(tmp_path / "s.duckdb")
    home = tmp_path / "home"
    stats.record_raw_corpus(conn, _raw_artifact(home, tmp_path, good=3, bad=1))
    stats.record_deduped_corpus(conn, _deduped_artifact(home), records_read={"a": 3, "b": 2})
    queries = re.findall(r"```sql\n(.*?)```", (PROJECT_ROOT / "docs" / "stats.md").read_text(), re.S)
    assert len(queries) >= 3
    for sql in queries:
        conn.execute(sql).fetchall()


# --------------------------------------------------------------------------- verify


def test_measure_counts_languages_and_duplicates(shared_data):
    profile = load_profile("smoke")
    en = json.loads((shared_data / "llamafactory_demo" / "alpaca_en_demo.json").read_text())[:20]
    zh = json.loads((shared_data / "llamafactory_demo" / "alpaca_zh_demo.json").read_text())[:2]
    rows = [_record("en", r["instruction"] + " " + r["input"], r["output"]) for r in en]
    rows += [dict(rows[0]), dict(rows[1])]  # two exact copies
    near = dict(rows[2], messages=_msgs(rows[2]["messages"][0]["content"],
                                        rows[2]["messages"][1]["content"] + " Thanks!"))
    rows += [near]
    rows += [_record("zh", r["instruction"] + r["input"], r["output"]) for r in zh]
    table = pa.Table.from_pylist([{k: r[k] for k in ("id", "source", "messages")} for r in rows])
    m = measure(table, profile.langid, profile.dedup)
    n = len(rows)
    assert m["english_share"] == pytest.approx((n - 2) / n)
    assert m["exact_dup_rate"] == pytest.approx(2 / n) and m["near_dup_rate"] == pytest.approx(1 / n)
    found, examples = exact_duplicates([r["id"] for r in rows], [r["messages"] for r in rows], "conversation")
    assert found == 2 and examples[0]["copies"] == 2


def test_verify_corpus_drift_and_integrity(tmp_path):
    profile = load_profile("smoke")
    art = _deduped_artifact(tmp_path / "home")
    first = verify_corpus(art, profile)
    assert first.previous_id is None and first.english_drift is None and first.passed
    assert first.sample_size == 3 and first.english_share == pytest.approx(2 / 3)
    again = verify_corpus(art, profile, previous=first.row())
    assert again.english_drift == 0.0 and again.passed
    kept = pq.read_table(art.path / "kept.parquet")
    pq.write_table(pa.concat_tables([kept, kept.slice(0, 1)]), art.path / "kept.parquet")  # tampered
    tampered = verify_corpus(art, profile, previous=again.row())
    assert tampered.integrity_failures == "kept.parquet" and not tampered.passed
    assert tampered.exact_dup_rate == pytest.approx(1 / 4)
    # the copied record is English, so the share moved too (3/4 from 2/3)
    assert drift_failures(tampered.row()) == ["english_drift 0.0833 > 0.02", "exact_dup_drift 0.2500 > 0.02"]
    conn = stats.connect(tmp_path / "s.duckdb")
    for v in (first, again, tampered):
        stats.record_verification(conn, v.row(run_id="r", profile="smoke"))
    last = stats.last_verification(conn)
    assert last["verification_id"] == tampered.verification_id and last["passed"] is False
    assert stats.last_verification(conn, exclude=tampered.verification_id)["verification_id"] == again.verification_id


# --------------------------------------------------------------------------- landing


def test_landing_files_keys_and_archive(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "b.csv").write_text("instruction,output\nhi,there\n")
    (landing / "a.jsonl").write_text("{}\n")
    (landing / ".copying.jsonl").write_text("{}\n")
    (landing / "notes.txt").write_text("not data")
    files = pending_files(landing)
    assert [f.path.name for f in files] == ["a.jsonl", "b.csv"]
    key = files[0].key
    assert key.startswith("a.jsonl:") and key.endswith(":3")
    moved = archive([files[0].path], landing, "v1")
    assert Path(moved[str(files[0].path)]) == landing / "processed" / "v1" / "a.jsonl"
    assert [f.path.name for f in pending_files(landing)] == ["b.csv"]
    assert [s.name for s in processed_sources(landing)] == ["landing/v1/a.jsonl"]
