"""Fuzz test of ingest: thousands of randomly corrupted records of every format in every file kind.

Seeded (SEED), so a failure reproduces. Every record carries a unique ``uid``; the test checks that
ingest never crashes, that read = kept + quarantined per source and per file, that every record
written comes out exactly once (kept, or quarantined with its untouched raw text), and that each
quarantine row names its file, line, field (when the fault is in a field) and reason. The counts it
tried are printed (``pytest -s``) and quoted in docs/reliability.md.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery.config import SourceConfig
from refinery.formats import FORMATS
from refinery.ingest import ingest, write_raw_corpus

SEED = 20261201
LIMIT = 200_000  # max_record_bytes, the profiles' default
PER_FILE = {"jsonl": 400, "json": 300, "csv": 300, "parquet": 200}
FLAT = ("alpaca", "dolly", "openorca")  # the formats a CSV can hold
WORDS = "the a model data answer question river blue quick seven ünïcödé 漢字 😀 naïve œuvre".split()
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82"]
FIELD_KINDS = ["drop", "wrong_type", "deep", "huge_int", "surrogate", "nan", "escaped_nul", "empty"]
# an array element with these faults still parses, so the elements after it are read one by one
ARRAY_SAFE = ["drop", "wrong_type", "surrogate", "nan", "escaped_nul", "empty"]
BYTE_KINDS = ["truncate", "invalid_utf8", "nul", "flip", "delete", "duplicate", "control", "scalar", "blank"]
# faults of a whole line or record, where no single field is to blame: the quarantine row's field is empty
LINE_LEVEL = re.compile(r"^(invalid JSON|invalid UTF-8|record is \d+ bytes|unknown format|wrong format|"
                        r"expected a JSON object|no assistant turn|no user turn|fewer fields|\d+ fields)")
UID = re.compile(rb"(?<!\\)u\d{6}x")  # not the tail of an escape such as \\u0000


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))


def _record(fmt: str, uid: str, rng: random.Random) -> dict:
    t = lambda: _text(rng)  # noqa: E731
    if fmt == "alpaca":
        return {"uid": uid, "instruction": t(), "input": t(), "output": t()}
    if fmt == "dolly":
        return {"uid": uid, "instruction": t(), "context": t(), "response": t(), "category": "qa"}
    if fmt == "openorca":
        return {"uid": uid, "system_prompt": t(), "question": t(), "response": t()}
    if fmt == "sharegpt":
        return {"uid": uid, "conversations": [{"from": "human", "value": t()}, {"from": "gpt", "value": t()}]}
    if fmt == "openai":
        return {"uid": uid, "messages": [{"role": "user", "content": t()}, {"role": "assistant", "content": t()}]}
    return {"uid": uid, "message_tree_id": uid, "prompt": {
        "role": "prompter", "text": t(), "replies": [{"role": "assistant", "text": t(), "rank": 0}]}}


def _leaves(obj, parent=None, key=None):
    """(container, key) of every value below the top level, the uid excepted."""
    if isinstance(obj, dict):
        items = [(k, v) for k, v in obj.items() if k != "uid"]
    elif isinstance(obj, list):
        items = list(enumerate(obj))
    else:
        items = []
    for k, v in items:
        yield obj, k
        yield from _leaves(v, obj, k)


def _corrupt_fields(obj: dict, rng: random.Random, kinds=FIELD_KINDS) -> str:
    """Corrupt one value in place; values that JSON cannot express become placeholders (_serialize)."""
    parent, key = rng.choice(list(_leaves(obj)))
    kind = rng.choice(kinds)
    if kind == "drop":
        del parent[key]
    elif kind == "wrong_type":
        parent[key] = rng.choice([None, 0, -1.5, True, [], {}, [1, "x"], {"k": "v"}])
    elif kind == "empty":
        parent[key] = rng.choice(["", "   ", "\n\t"])
    else:
        parent[key] = f"@@{kind}@@"
    return kind


def _serialize(obj: dict, rng: random.Random) -> bytes:
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.3)
    depth = rng.choice([50, 900, 5000, 100_000])
    raw = {"deep": "[" * depth + "]" * depth, "huge_int": "9" * rng.choice([4000, 5000, 20_000]),
           "surrogate": rng.choice(['"a\\ud800b"', '"\\udfff"', '"x\\udc80"']),
           "nan": rng.choice(["NaN", "Infinity", "-Infinity", "1e999"]), "escaped_nul": '"a\\u0000b"'}
    for kind, value in raw.items():
        text = text.replace(f'"@@{kind}@@"', value)
    return text.encode("utf-8")


def _corrupt_bytes(line: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(BYTE_KINDS)
    i, j = sorted(rng.randrange(len(line) + 1) for _ in range(2))
    if kind == "truncate":
        return line[:i], kind
    if kind == "invalid_utf8":
        return line[:i] + rng.choice(BAD_UTF8) + line[i:], kind
    if kind == "nul":
        return line[:i] + b"\x00" * rng.randint(1, 3) + line[i:], kind
    if kind == "flip":
        b = bytearray(line)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b), kind
    if kind == "delete":
        return line[:i] + line[j:], kind
    if kind == "duplicate":
        return line[:i] + line[i:j] + line[i:], kind
    if kind == "control":
        return line[:i] + rng.choice([b"\r", b"\x0b", b"\x1b", b"\x7f", b"\xef\xbb\xbf", b"\x0c"]) + line[i:], kind
    if kind == "scalar":
        return rng.choice([b"42", b"null", b'"text"', b"[1, 2]", b"true", b"{}"]), kind
    return rng.choice([b"", b"   ", b"\t"]), kind


class Fuzzer:
    def __init__(self, root: Path):
        self.rng, self.root, self.n = random.Random(SEED), root, 0
        self.tried: Counter = Counter()  # records written per fault kind ("clean" for none)
        self.sources: list[SourceConfig] = []

    def uid(self) -> str:
        self.n += 1
        return f"u{self.n:06d}x"

    def _add(self, path: Path, fmt: str) -> None:
        self.sources.append(SourceConfig(name=path.name, path=str(path), format=fmt))

    def jsonl(self, fmt: str, declared: str) -> None:
        path, lines = self.root / f"{fmt}-{declared}.jsonl", []
        for _ in range(PER_FILE["jsonl"]):
            obj, roll, kinds = _record(fmt, self.uid(), self.rng), self.rng.random(), []
            if 0.3 <= roll < 0.75:
                kinds.append(_corrupt_fields(obj, self.rng))
            line = _serialize(obj, self.rng)
            if roll >= 0.65:
                line, kind = _corrupt_bytes(line, self.rng)
                kinds.append(kind)
            self.tried.update(kinds or ["clean"])
            lines.append(line)
        path.write_bytes(b"\n".join(lines) + b"\n")
        self._add(path, declared)

    def json_array(self, fmt: str) -> None:
        path, elements = self.root / f"{fmt}-array.json", []
        for i in range(PER_FILE["json"]):
            obj = _record(fmt, self.uid(), self.rng)
            # deep nesting or a huge integer ends the element-by-element reading: only in the last tenth
            kinds = FIELD_KINDS if i >= PER_FILE["json"] * 9 // 10 else ARRAY_SAFE
            kind = _corrupt_fields(obj, self.rng, kinds) if self.rng.random() < 0.5 else "clean"
            element = _serialize(obj, self.rng)
            if self.rng.random() < 0.05:  # bytes that are not UTF-8 inside a string keep the array's shape
                element, kind = element.replace(b'"uid": ', b'"bad": "\xff\xfe", "uid": ', 1), "invalid_utf8"
            self.tried[kind] += 1
            elements.append(element)
        data = b"[\n" + b",\n".join(elements) + b"\n]\n"
        if self.rng.random() < 0.5:  # a copy cut short: the rest of the array is one quarantined record
            data = data[:self.rng.randrange(len(data) * 9 // 10, len(data))]
            self.tried["truncated_file"] += 1
        path.write_bytes(data)
        self._add(path, fmt)

    def csv(self, fmt: str) -> None:
        path = self.root / f"{fmt}.csv"
        rows = [_record(fmt, self.uid(), self.rng) for _ in range(PER_FILE["csv"])]
        columns = list(rows[0])
        out = [",".join(columns).encode()]
        for row in rows:
            line = ",".join('"' + str(v).replace('"', '""') + '"' for v in row.values()).encode()
            kind = "clean"
            if self.rng.random() < 0.6:
                line, kind = _corrupt_bytes(line, self.rng) if self.rng.random() < 0.7 else (
                    line + b',"extra"' if self.rng.random() < 0.5 else line.rsplit(b",", 1)[0], "field_count")
            self.tried[kind] += 1
            out.append(line)
        path.write_bytes(b"\n".join(out) + b"\n")
        self._add(path, fmt)

    def parquet(self, fmt: str) -> None:
        rows, kinds = [], []
        for _ in range(PER_FILE["parquet"]):
            obj = _record(fmt, self.uid(), self.rng)
            kind = "clean"
            if self.rng.random() < 0.6:  # a column has one type: nulls, empty, huge and odd strings
                parent, key = self.rng.choice([(p, k) for p, k in _leaves(obj) if isinstance(p[k], str)])
                kind = self.rng.choice(["null", "empty", "huge", "nul_char", "unknown_role"])
                parent[key] = {"null": None, "empty": " ", "huge": "x" * (LIMIT + 1), "nul_char": "a\x00b",
                               "unknown_role": "alien"}[kind]
            kinds.append(kind)
            rows.append(obj)
        schema = pa.Table.from_pylist([_record(fmt, "u", random.Random(0))]).schema
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), self.root / f"{fmt}.parquet")
        self.tried.update(kinds)
        self._add(self.root / f"{fmt}.parquet", fmt)
        if fmt in FLAT:  # a column of the wrong type in every row
            wrong = pa.Table.from_pylist([{**_record(fmt, self.uid(), self.rng), "response": 7, "output": 7}
                                          for _ in range(50)])
            pq.write_table(wrong, self.root / f"{fmt}-wrong-type.parquet")
            self.tried["wrong_column_type"] += 50
            self._add(self.root / f"{fmt}-wrong-type.parquet", fmt)

    def huge_line(self) -> None:
        """A 100 MB JSON line between good ones: quarantined whole, never truncated, nothing else lost."""
        path = self.root / "huge.jsonl"
        big = json.dumps({"uid": self.uid(), "instruction": "hi", "output": "x" * 100_000_000}).encode()
        good = [json.dumps(_record("alpaca", self.uid(), self.rng)).encode() for _ in range(3)]
        path.write_bytes(b"\n".join([good[0], big, *good[1:]]) + b"\n")
        self.tried.update(["huge_line"] + ["clean"] * 3)
        self._add(path, "alpaca")


def _content(path: Path) -> bytes:
    """What a file holds, as text: its bytes, or for Parquet its rows as JSON (the file itself
    repeats values in its statistics)."""
    if path.suffix != ".parquet":
        return path.read_bytes()
    return "\n".join(json.dumps(row, ensure_ascii=False) for row in pq.read_table(path).to_pylist()).encode()


def test_fuzzed_sources_lose_nothing_and_never_crash(tmp_path):
    fuzz = Fuzzer(tmp_path)
    for fmt in FORMATS:
        fuzz.jsonl(fmt, fmt)
        fuzz.jsonl(fmt, "auto")
        fuzz.json_array(fmt)
        fuzz.parquet(fmt)
        if fmt in FLAT:
            fuzz.csv(fmt)
    fuzz.huge_line()

    result = ingest(fuzz.sources, max_record_bytes=LIMIT)
    written = write_raw_corpus(result, tmp_path / "out")  # Arrow and Parquet accept every kept record
    assert written["kept"] == len(result.records) and written["quarantined"] == len(result.quarantine)

    outputs: dict[str, list[bytes]] = {}  # source -> the raw text of every kept and quarantined record
    for r in result.records:
        outputs.setdefault(r["source"], []).append(r["original"].encode("utf-8", "backslashreplace"))
    for q in result.quarantine:
        outputs.setdefault(q["source"], []).append(q["raw"].encode("utf-8", "backslashreplace"))
        assert Path(q["source_file"]).exists() and q["source_line"] >= 1 and q["reason"], q
        assert q["field"] or LINE_LEVEL.match(q["reason"]), (q["field"], q["reason"])
    lost = 0
    for src in fuzz.sources:
        counts = result.per_source[src.name]
        assert counts["read"] == counts["kept"] + counts["quarantined"]
        for per_file in counts["files"].values():
            assert per_file["read"] == per_file["kept"] + per_file["quarantined"]
        # every uid the file holds comes out exactly once; a uid cut by a corruption is not counted
        written_uids = Counter(UID.findall(_content(Path(src.path))))
        came_out = Counter(u for raw in outputs.get(src.name, []) for u in UID.findall(raw))
        lost += sum((written_uids - came_out).values())
        assert came_out == written_uids, src.name
    huge = [q for q in result.quarantine if q["source"] == "huge.jsonl"]
    assert [len(q["raw"]) > 100_000_000 and q["reason"].startswith("record is") for q in huge] == [True]

    kept = len(result.records)
    corrupted = sum(v for k, v in fuzz.tried.items() if k != "clean")
    print("\ningest fuzz:", json.dumps({"seed": SEED, "records_written": fuzz.n, "corrupted": corrupted,
                                        "read": result.totals["read"], "kept": kept,
                                        "quarantined": len(result.quarantine), "lost": lost,
                                        "faults": dict(sorted(fuzz.tried.items()))}))
    assert corrupted >= 5000 and lost == 0
    assert len(set(fuzz.tried) - {"clean"}) >= len(FIELD_KINDS) + len(BYTE_KINDS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_keeps_clean_records(tmp_path, fmt):
    """The control: the fuzzer's uncorrupted records are valid, so quarantines above come from the faults."""
    rng = random.Random(SEED)
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(_record(fmt, f"u{i:06d}x", rng)) + "\n" for i in range(50)))
    result = ingest([SourceConfig(name=fmt, path=str(path), format="auto")], max_record_bytes=LIMIT)
    assert (result.totals["kept"], result.totals["quarantined"]) == (50, 0)


GOOD = {"alpaca": b'{"instruction": "Name a colour.", "output": "Blue."}',
        "oasst": b'{"message_id": "m", "role": "prompter", "text": "Hi", '
                 b'"replies": [{"role": "assistant", "text": "Hello"}]}'}
FOUND = {  # what the fuzzer found: each crashed ingest, or (NUL) rejected the whole file, before the fix
    "deep_nesting": ("alpaca", b'{"instruction": ' + b"[" * 5000 + b"]" * 5000 + b', "output": "x"}', None,
                     "invalid JSON"),
    "int_over_digit_limit": ("alpaca", b'{"instruction": ' + b"9" * 5000 + b', "output": "x"}', None, "invalid JSON"),
    "lone_surrogate": ("alpaca", b'{"instruction": "a\\ud800b", "output": "x"}', "instruction", "not valid Unicode"),
    "nul_byte_in_a_line": ("alpaca", b'{"instruction": "a\x00b", "output": "x"}', None, "invalid JSON"),
    "role_of_wrong_type": ("oasst", b'{"message_id": "m", "text": "Hi", "role": ["prompter"]}', "role", "unknown role"),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_fuzz_findings_are_quarantined_naming_line_and_field(tmp_path, case):
    fmt, line, field, reason = FOUND[case]
    path = tmp_path / "found.jsonl"
    path.write_bytes(GOOD[fmt] + b"\n" + line + b"\n" + GOOD[fmt] + b"\n")
    result = ingest([SourceConfig(name="s", path=str(path), format="auto")], max_record_bytes=LIMIT)
    (q,) = result.quarantine
    assert (q["source_file"], q["source_line"], q["field"]) == (str(path), 2, field)
    assert q["reason"].startswith(reason) and result.totals["kept"] == 2


def test_invalid_utf8_in_csv_cells_past_the_header(tmp_path):
    path = tmp_path / "extra.csv"
    path.write_bytes(b"instruction,output\nhi,there\nhi,there,\xff\xfe\n")
    result = ingest([SourceConfig(name="s", path=str(path), format="alpaca")], max_record_bytes=LIMIT)
    write_raw_corpus(result, tmp_path / "out")  # the raw row holds \xNN text, not undecodable bytes
    (q,) = result.quarantine
    assert q["source_line"] == 3 and q["reason"].startswith("3 fields")
    assert json.loads(q["raw"])["null"] == ["\\xff\\xfe"]  # the cells past the header, as \xNN text
