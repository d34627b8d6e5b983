"""raw_corpus ingest: real public files, every bad-input class, and whole-source errors."""

from __future__ import annotations

import csv
import json
import tracemalloc
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery.config import SourceConfig, resolve_path
from refinery.ingest import SourceError, ingest, read_source, write_raw_corpus
from refinery.records import QUARANTINE_SCHEMA, RECORD_SCHEMA, read_table, record_id

LIMIT = 200_000
DATA = resolve_path("${REFINERY_SHARED_DATA:-../shared/data}")


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))


def source(path: Path | str, fmt: str = "auto", **kw) -> SourceConfig:
    return SourceConfig(name=kw.pop("name", "src"), path=str(path), format=fmt, **kw)


def read(path: Path | str, fmt: str = "auto", limit: int = LIMIT, **kw):
    result = read_source(source(path, fmt, **kw), max_record_bytes=limit)
    assert_reconciles(result.counts)
    return result


def assert_reconciles(counts: dict) -> None:
    assert counts["read"] == counts["kept"] + counts["quarantined"]
    for per_file in counts["files"].values():
        assert per_file["read"] == per_file["kept"] + per_file["quarantined"]
    assert sum(f["read"] for f in counts["files"].values()) == counts["read"]


def write_jsonl(path: Path, lines: list) -> Path:
    """Write lines: dicts as JSON, str as given, bytes verbatim."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line, ensure_ascii=False)
            f.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
    return path


def only_quarantined(result) -> dict:
    (row,) = result.quarantine
    return row


def assert_row(row: dict, file: Path, line: int, field: str | None, reason: str) -> None:
    """The quarantine row names the file, line, field and reason (reason: exact, or a prefix + '...')."""
    assert (row["source"], row["source_file"], row["source_line"], row["field"]) == ("src", str(file), line, field)
    if reason.endswith("..."):
        assert row["reason"].startswith(reason[:-3]), row["reason"]
    else:
        assert row["reason"] == reason


ALPACA = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


# --------------------------------------------------------------------------- real public files

def test_shared_data_dir_is_present():
    assert (DATA / "README.md").exists(), f"shared data not found at {DATA}; set REFINERY_SHARED_DATA"


# path, format chosen, read (README's record count), kept
REAL = [
    ("llamafactory_demo/alpaca_en_demo.json", "alpaca", 999, 999),
    ("llamafactory_demo/alpaca_zh_demo.json", "alpaca", 1000, 1000),
    ("llamafactory_demo/glaive_toolcall_en_demo.json", "sharegpt", 300, 300),
    ("llamafactory_hist/lima.json", "alpaca", 1029, 1029),
    ("oasst_sample/en_100_tree.jsonl", "oasst", 100, 100),
    ("oasst_sample/en_100_message.jsonl", "oasst", 100, 100),
    ("fastchat_sharegpt/dummy_conversation.json", "sharegpt", 500, 500),
    # README calls these system/question/chosen/rejected; the file is OpenAI's preference shape
    ("orca_dpo_pairs_sample/validation.jsonl", "openai", 284, 284),
    ("alpaca_seed_tasks/seed_tasks.jsonl", "alpaca", 175, 175),
    ("gpt4llm_eval/user_oriented_instructions.jsonl", "alpaca", 252, 252),
    # prompts without answers: nothing to train on, all quarantined, none lost
    ("wizardlm_testset/WizardLM_testset.jsonl", None, 218, 0),
    ("gpt4llm_eval/vicuna_question_80.jsonl", None, 80, 0),
    ("oasst_sample/prompt_lottery_en_250_text.jsonl", None, 250, 0),
]


@pytest.mark.parametrize("rel, fmt, n_read, n_kept", REAL, ids=[r[0].split("/")[-1] for r in REAL])
def test_real_files(rel, fmt, n_read, n_kept):
    result = read(DATA / rel)
    assert (result.format, result.counts["read"], result.counts["kept"]) == (fmt, n_read, n_kept)
    for rec in result.records:
        assert rec["messages"][-1]["role"] == "assistant"
        assert rec["id"] == record_id(rec["messages"])
        assert json.loads(rec["original"])  # the untouched source record
    for row in result.quarantine:
        assert json.loads(row["raw"]) is not None
        if fmt is None:
            assert row["reason"].startswith("unknown format: no known format fits ")


def test_oasst_trees_follow_the_best_ranked_replies():
    result = read(DATA / "oasst_sample/en_100_tree.jsonl")
    lengths = [len(r["messages"]) for r in result.records]
    assert min(lengths) >= 2 and max(lengths) >= 4  # multi-turn paths are followed, not just the first answer
    for rec in result.records:
        node = json.loads(rec["original"])["prompt"]
        for turn in rec["messages"][1:]:  # walk the tree along the chosen path
            live = [r for r in node["replies"] if not r.get("deleted")]
            node = next(r for r in live if r["text"] == turn["content"])
            if node["role"] == "assistant" and node.get("rank") is not None:
                assert node["rank"] == min(r["rank"] for r in live if r.get("rank") is not None)


def test_lima_history_becomes_earlier_turns():
    result = read(DATA / "llamafactory_hist/lima.json", "alpaca")
    originals = [json.loads(r["original"]) for r in result.records]
    with_history = [(o, r) for o, r in zip(originals, result.records) if o["history"]]
    assert len(with_history) == 29  # 15 + 10 + 3 + 1 records with 1, 2, 3, 9 earlier exchanges
    for orig, rec in with_history:
        assert len(rec["messages"]) == 2 * len(orig["history"]) + 2
        assert rec["messages"][0]["content"] == orig["history"][0][0]


def test_orca_pairs_keep_the_rejected_answer_in_original():
    result = read(DATA / "orca_dpo_pairs_sample/validation.jsonl")
    rec = result.records[0]
    orig = json.loads(rec["original"])
    assert rec["messages"][-1]["content"] == orig["preferred_output"][0]["content"]
    assert orig["non_preferred_output"][0]["content"] not in [m["content"] for m in rec["messages"]]


def test_output_as_a_list_is_quarantined_naming_the_field():
    # LLaMA-Factory's reward-model pairs put [chosen, rejected] in "output"
    result = read(DATA / "llamafactory_hist/oaast_rm_zh.json", "alpaca")
    assert (result.counts["read"], result.counts["kept"]) == (775, 0)
    row = result.quarantine[0]
    assert (row["field"], row["reason"], row["source_line"]) == ("output", "expected a string, got list", 1)


def test_profile_style_mix_of_real_sources(tmp_path):
    sources = [
        SourceConfig(name="alpaca_en", path=str(DATA / "llamafactory_demo/alpaca_en_demo.json"),
                     format="alpaca", license="CC-BY-NC-4.0"),
        SourceConfig(name="oasst", path=str(DATA / "oasst_sample/*tree*.jsonl"), license="Apache-2.0"),
        SourceConfig(name="evals", path=str(DATA / "gpt4llm_eval/*.jsonl")),
    ]
    result = ingest(sources, max_record_bytes=LIMIT)
    assert result.totals == {"read": 999 + 100 + 332, "kept": 999 + 100 + 252, "quarantined": 80}
    assert result.per_source["evals"]["files"][str(DATA / "gpt4llm_eval/vicuna_question_80.jsonl")] == \
        {"read": 80, "kept": 0, "quarantined": 80}
    summary = write_raw_corpus(result, tmp_path / "out")
    records = read_table(tmp_path / "out/records.parquet")
    quarantine = read_table(tmp_path / "out/quarantine.parquet")
    assert records.schema.equals(RECORD_SCHEMA) and quarantine.schema.equals(QUARANTINE_SCHEMA)
    assert (summary["kept"], summary["quarantined"]) == (records.num_rows, quarantine.num_rows) == (1351, 80)
    licences = dict(zip(*[records.column(c).to_pylist() for c in ("source", "license")]))
    assert licences == {"alpaca_en": "CC-BY-NC-4.0", "oasst": "Apache-2.0", "evals": "unknown"}


# --------------------------------------------------------------------------- bad records

def test_invalid_json_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA, '{"instruction": "x", "output": ', ALPACA])
    result = read(path)
    row = only_quarantined(result)
    assert_row(row, path, 2, None, "invalid JSON: Expecting value: line 1 column 32 (char 31)")
    assert row["raw"] == '{"instruction": "x", "output": '
    assert [r["source_line"] for r in result.records] == [1, 3]


def test_missing_field_and_wrong_type(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        ALPACA, {"instruction": "q", "input": ""}, {"instruction": "q", "input": "", "output": ["a", "b"]}])
    result = read(path, "alpaca")
    assert_row(result.quarantine[0], path, 2, "output", "missing")
    assert_row(result.quarantine[1], path, 3, "output", "expected a string, got list")
    assert len(result.quarantine) == 2
    assert result.counts["reasons"] == {"output: missing": 1, "output: expected a string, got list": 1}


def test_extra_fields_are_kept_in_original(tmp_path):
    rec = dict(ALPACA, category="colours", score=0.9, tags=["a"])
    result = read(write_jsonl(tmp_path / "a.jsonl", [rec]))
    assert json.loads(result.records[0]["original"]) == rec and not result.quarantine


def test_empty_messages(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]},
                                              {"messages": []}])
    assert_row(only_quarantined(read(path)), path, 2, "messages", "empty")


def test_invalid_utf8_is_quarantined_with_escaped_bytes(tmp_path):
    bad = b'{"instruction": "caf\xe9", "input": "", "output": "ok"}'
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA, bad])
    row = only_quarantined(read(path))
    assert_row(row, path, 2, None, "invalid UTF-8 at byte 20")
    assert row["raw"] == '{"instruction": "caf\\xe9", "input": "", "output": "ok"}'


def test_invalid_utf8_inside_a_json_array(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[{"instruction": "a", "output": "b"},\n {"instruction": "caf\xe9", "output": "b"}]')
    result = read(path)
    row = only_quarantined(result)
    assert_row(row, path, 2, None, "invalid UTF-8")
    assert "\\xe9" in row["raw"]


def test_record_over_the_size_limit(tmp_path):
    big = dict(ALPACA, output="x" * 5000)
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA, big])
    result = read(path, limit=4096)
    row = only_quarantined(result)
    size = len(json.dumps(big).encode("utf-8"))
    assert_row(row, path, 2, None, f"record is {size} bytes, over max_record_bytes=4096")
    assert result.counts["reasons"] == {"record is N bytes, over max_record_bytes=N": 1}
    assert row["raw"] == json.dumps(big)  # kept whole, never truncated


def test_minority_format_in_an_auto_source(tmp_path):
    share = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA, ALPACA, share, ALPACA])
    result = read(path)
    assert result.format == "alpaca" and result.counts["format_votes"] == {"alpaca": 3, "sharegpt": 1}
    assert result.counts["format_chosen"] == "alpaca (3 of 4 sampled records)"
    assert_row(only_quarantined(result), path, 3, None,
               "wrong format: record looks like sharegpt, the source's format is alpaca")


def test_explicit_format_on_a_file_of_another_format(tmp_path):
    share = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = write_jsonl(tmp_path / "a.jsonl", [share, share])
    result = read(path, "dolly")
    assert result.counts["kept"] == 0 and result.counts["quarantined"] == 2
    assert_row(result.quarantine[1], path, 2, "instruction", "missing (record looks like sharegpt, not dolly)")


def test_non_object_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA, '"just a string"', "[1, 2]"])
    result = read(path)
    assert_row(result.quarantine[0], path, 2, None, "expected a JSON object, got str")
    assert_row(result.quarantine[1], path, 3, None, "expected a JSON object, got list")


def test_truncated_json_array_keeps_the_rest_as_one_row(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([ALPACA, ALPACA])[:-20], encoding="utf-8")
    result = read(path)
    assert result.counts["kept"] == 1
    row = only_quarantined(result)
    assert_row(row, path, 2, None, "invalid JSON (the rest of the array is kept here): ...")
    assert path.read_text().endswith(row["raw"])


def test_max_records_stops_reading(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA] * 10)
    assert read(path, max_records=4).counts["read"] == 4


# --------------------------------------------------------------------------- other file types

def test_dolly_jsonl(tmp_path):
    rows = [{"instruction": "Who?", "context": "Ada wrote it.", "response": "Ada", "category": "closed_qa"},
            {"instruction": "Why?", "context": "", "response": 42, "category": "open_qa"}]
    path = write_jsonl(tmp_path / "dolly.jsonl", rows)
    result = read(path)
    assert result.format == "dolly" and result.records[0]["messages"][0]["content"] == "Who?\n\nAda wrote it."
    assert_row(only_quarantined(result), path, 2, "response", "expected a string, got int")


def test_openai_json_array(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]}]
    path = tmp_path / "openai.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    result = read(path)
    assert result.format == "openai" and [m["role"] for m in result.records[0]["messages"]] == ["system", "user", "assistant"]
    row = only_quarantined(result)
    assert_row(row, path, 2, "messages[1].role", "unknown role 'wizard'")
    assert json.loads(row["raw"]) == rows[1]


def test_csv_file(tmp_path):
    path = tmp_path / "alpaca.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["Say hi.", "", "Hi!"])
        w.writerow(["Two lines?", "", "one\ntwo"])  # a quoted field over two physical lines
        w.writerow(["Bad row", "", "x", "surplus"])
        w.writerow(["", "", ""])
    result = read(path)
    assert result.format == "alpaca" and result.records[1]["messages"][1]["content"] == "one\ntwo"
    assert [r["source_line"] for r in result.records] == [2, 3]
    assert_row(result.quarantine[0], path, 5, None, "4 fields, the header has 3")
    assert_row(result.quarantine[1], path, 6, "output", "empty")
    assert len(result.quarantine) == 2


def test_csv_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffinstruction,input,output\nSay hi.,,Hi!\n".encode())
    result = read(path)
    assert result.format == "alpaca" and result.counts["kept"] == 1 and not result.quarantine
    assert json.loads(result.records[0]["original"]) == {"instruction": "Say hi.", "input": "", "output": "Hi!"}


def test_parquet_files_by_glob(tmp_path):
    rows = [{"system_prompt": "", "question": f"q{i}", "response": f"a{i}", "id": f"t.{i}"} for i in range(3)]
    rows.append({"system_prompt": "", "question": "q", "response": None, "id": "t.3"})
    for i, chunk in enumerate([rows[:2], rows[2:]]):
        pq.write_table(pa.Table.from_pylist(chunk), tmp_path / f"part-{i}.parquet")
    result = read(tmp_path / "part-*.parquet")
    assert result.format == "openorca" and result.counts["kept"] == 3
    assert_row(only_quarantined(result), tmp_path / "part-1.parquet", 2, "response", "missing")


def test_csv_invalid_utf8_row(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"instruction,input,output\nSay hi.,,Hi!\ncaf\xe9,,ok\n")
    result = read(path)
    row = only_quarantined(result)
    assert_row(row, path, 3, None, "invalid UTF-8")
    assert json.loads(row["raw"])["instruction"] == "caf\\xe9"


def test_sharegpt_parquet_with_nested_columns(tmp_path):
    rows = [{"id": "1", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"id": "2", "conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    result = read(path)
    assert result.format == "sharegpt" and result.records[0]["messages"][1] == {"role": "assistant", "content": "a"}
    assert_row(only_quarantined(result), path, 2, "conversations[1].from", "unknown speaker 'robot'")


def test_a_file_of_another_format_in_a_glob_is_quarantined_per_file(tmp_path):
    share = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    write_jsonl(tmp_path / "a.jsonl", [ALPACA] * 3)
    write_jsonl(tmp_path / "b.jsonl", [share] * 2)
    result = read(tmp_path / "*.jsonl")
    assert result.format == "alpaca"
    assert result.counts["files"] == {str(tmp_path / "a.jsonl"): {"read": 3, "kept": 3, "quarantined": 0},
                                      str(tmp_path / "b.jsonl"): {"read": 2, "kept": 0, "quarantined": 2}}


def test_directory_source_reads_every_data_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [ALPACA])
    (tmp_path / "b.json").write_text(json.dumps([ALPACA, ALPACA]), encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not data")
    result = read(tmp_path)
    assert result.counts["kept"] == 3 and len(result.counts["files"]) == 2


def test_json_extension_holding_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", [ALPACA, ALPACA])  # like belle_zh's files
    assert read(path).counts["kept"] == 2


def test_array_saved_as_jsonl_is_read_as_an_array(tmp_path):
    path = tmp_path / "pretty.jsonl"
    path.write_text(json.dumps([ALPACA, ALPACA], indent=2), encoding="utf-8")
    result = read(path)
    assert (result.counts["kept"], result.counts["quarantined"]) == (2, 0)


def test_text_after_an_array_is_kept(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["[1, 2]", ALPACA])  # JSON lines whose first line is an array
    result = read(path)
    assert result.counts["read"] == 3
    row = result.quarantine[-1]
    assert_row(row, path, 3, None, "invalid JSON: text after the end of the array")
    assert json.loads(row["raw"]) == ALPACA


# --------------------------------------------------------------------------- whole-source errors

def test_missing_file_names_the_source_and_path(tmp_path):
    with pytest.raises(SourceError, match=r"source 'src': no file matches .*nope\.jsonl"):
        read(tmp_path / "nope.jsonl")


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(SourceError, match=r"no file matches .*\*\.parquet"):
        read(tmp_path / "*.parquet")


def test_binary_garbage(tmp_path):
    path = tmp_path / "garbage.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SourceError, match=r"garbage\.jsonl: binary data"):
        read(path)


def test_text_that_is_not_json(tmp_path):
    path = tmp_path / "readme.jsonl"
    path.write_text("This is a README.\nIt has lines.\n")
    with pytest.raises(SourceError, match=r"readme\.jsonl: not JSON lines: none of its 2 lines"):
        read(path)
    other = tmp_path / "readme.json"
    other.write_text("Hello, world\n")
    with pytest.raises(SourceError, match=r"readme\.json: not JSON"):
        read(other)


def test_single_json_object_file(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"task1": ALPACA, "task2": ALPACA}, indent=2))
    with pytest.raises(SourceError, match=r"tasks\.json: one JSON object"):
        read(path)


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(SourceError, match=r"broken\.parquet: unreadable Parquet"):
        read(path)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(SourceError, match=r"data\.txt: unsupported file type"):
        read(tmp_path / "data.txt")


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = SourceConfig(name="dolly", hub="databricks/databricks-dolly-15k", format="dolly")
    with pytest.raises(SourceError, match=r"source 'dolly': hub:databricks/databricks-dolly-15k:train: .*network"):
        read_source(hub, max_record_bytes=LIMIT)


def test_one_bad_source_stops_ingest(tmp_path):
    good = source(write_jsonl(tmp_path / "a.jsonl", [ALPACA]), name="good")
    bad = source(tmp_path / "missing.jsonl", name="bad")
    with pytest.raises(SourceError, match="source 'bad'"):
        ingest([good, bad], max_record_bytes=LIMIT)


# --------------------------------------------------------------------------- output and memory

def test_write_raw_corpus_round_trip(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA, "{oops", dict(ALPACA, output="Red.")])
    result = ingest([source(path, license="MIT")], max_record_bytes=LIMIT)
    summary = write_raw_corpus(result, tmp_path / "out")
    assert (summary["read"], summary["kept"], summary["quarantined"]) == (3, 2, 1)
    records = read_table(tmp_path / "out/records.parquet").to_pylist()
    assert records[0] == {"id": record_id(records[0]["messages"]), "source": "src", "format": "alpaca",
                          "source_file": str(path), "source_line": 1, "license": "MIT",
                          "messages": [{"role": "user", "content": "Name a colour."},
                                       {"role": "assistant", "content": "Blue."}],
                          "original": json.dumps(ALPACA)}
    (q,) = read_table(tmp_path / "out/quarantine.parquet").to_pylist()
    assert (q["source_line"], q["raw"]) == (2, "{oops")


def test_empty_corpus_still_writes_valid_files(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["{oops", "[]"])
    summary = write_raw_corpus(ingest([source(path)], max_record_bytes=LIMIT), tmp_path / "out")
    assert summary["kept"] == 0 and read_table(tmp_path / "out/records.parquet").num_rows == 0


def test_memory_stays_a_small_multiple_of_the_input(tmp_path):
    """Files are streamed: peak Python memory is the kept records, not copies of the file."""
    rows = [{"instruction": f"Question {i}: " + "word " * 100, "input": "", "output": "answer " * 120}
            for i in range(3000)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        result = read_source(source(path), max_record_bytes=LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.counts["kept"] == 3000
    assert peak < 4 * size, f"peak {peak} bytes for a {size}-byte file"


# --------------------------------------------------------------------------- streaming, in workers


def test_streaming_in_workers_writes_what_reading_in_memory_writes(tmp_path):
    # ingest_to (raw_corpus's path) streams small batches, and JSON lines files go through forked
    # workers: records, their order, the quarantine and every count equal the in-memory read
    from refinery.ingest import ingest_to

    src = tmp_path / "src"
    src.mkdir()
    (src / "a_array.json").write_text(json.dumps([ALPACA, {"instruction": "Say hi.", "output": "Hi."}, {"x": 1}]))
    good = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(40)]
    write_jsonl(src / "b_lines.jsonl", [b"\xef\xbb\xbf" + json.dumps(good[0]).encode()] + good[1:10]
                + ["", "{not json", {"instruction": "", "output": "empty prompt"}, b'{"instruction": "\xff", "output": "x"}',
                   {"conversations": [{"from": "human", "value": "wrong format"}, {"from": "gpt", "value": "a"}]},
                   {"instruction": "q", "output": "x" * 3000}, "   "] + good[10:40] + [good[3]])
    write_jsonl(src / "c_lines.jsonl", good[::-1])
    sources = [SourceConfig(name="mix", path=str(src), format="alpaca"),
               SourceConfig(name="again", path=str(src / "c_lines.jsonl"), format="auto")]
    memory = ingest(sources, max_record_bytes=2000)
    want = write_raw_corpus(memory, tmp_path / "memory")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to one process: it forked
        got = ingest_to(sources, tmp_path / "stream", max_record_bytes=2000, batch_records=7, workers=2)
    assert got == want and got["quarantined"] == 6
    assert got["kept"] == 2 + 41 + 40 + 40  # the directory holds c_lines.jsonl too
    for name in ("records.parquet", "quarantine.parquet"):
        assert pq.read_table(tmp_path / "stream" / name).equals(pq.read_table(tmp_path / "memory" / name)), name
    assert not list((tmp_path / "stream").glob(".*.tmp"))


def test_streaming_in_workers_still_rejects_a_file_that_is_not_json_lines(tmp_path):
    from refinery.ingest import ingest_to

    path = write_jsonl(tmp_path / "notes.jsonl", ["just some notes", "nothing here is JSON", "at all"])
    with pytest.raises(SourceError, match="not JSON lines: none of its 3 lines"):
        ingest_to([source(path, "alpaca")], tmp_path / "out", max_record_bytes=LIMIT, batch_records=2, workers=2)
    assert not (tmp_path / "out" / "records.parquet").exists()
