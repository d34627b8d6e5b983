"""What the stage CLIs (``python -m refinery.langid``, ``refinery.dedup``, ``refinery.demo_data``) share:
reading a file of records, flags over a profile's config, the JSON summary and the atomic output.

Kept apart from the stages so that no stage module imports another one for its command line.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from refinery.config import IngestConfig
from refinery.formats import RecordError, detect_format, to_messages
from refinery.ingest import SourceError, file_records
from refinery.records import RECORD_SCHEMA, ROLES, numeric_array, numpy_of, record_id, repeated_string

CLI_INPUT_HELP = ("JSONL, JSON, Parquet or CSV: normalized records ('messages'), 'text' rows or records of any "
                  "of the six instruction formats")


class InputError(ValueError):
    """Input a CLI cannot use; the message names the file, the line and the field."""


def read_input(path: Path, *, max_record_bytes: int = IngestConfig().max_record_bytes) -> pa.Table:
    """A file of records for the langid and dedup CLIs, as RECORD_SCHEMA rows.

    Any file ingest reads (JSON lines, JSON array, Parquet, CSV). A record is a normalized one
    (``messages`` of system/user/assistant turns, kept as they are, answered or not), a ``text``
    (one user turn), or a record of one of the six instruction formats (refinery.formats, detected
    per record). The first record that is none of these stops the read with an InputError naming
    its file, line and field: a CLI summary over part of a file would be misleading.
    """
    fast = _read_text_lines(Path(path), max_record_bytes)
    if fast is not None:
        return fast
    try:
        items = file_records(Path(path), max_record_bytes=max_record_bytes)
        columns: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}
        stem = Path(path).stem
        for item in items:
            where = f"{item.file}:{item.line}"
            if item.error is not None:
                raise InputError(f"{where}: {item.error}")
            row = item.obj
            if type(row) is not dict:
                raise InputError(f"{where}: a record is a JSON object, got {type(row).__name__}")
            text = row.get("text")
            if type(text) is str and "messages" not in row:  # the common case first: one user turn
                messages, fmt = [{"role": "user", "content": text}], "text"
            else:
                messages, fmt = _messages(row, where)
            get = row.get
            columns["id"].append(str(get("id") or record_id(messages)))
            columns["source"].append(get("source") or stem)
            columns["format"].append(get("format") or fmt)
            columns["source_file"].append(get("source_file") or item.file)
            columns["source_line"].append(get("source_line") or item.line)
            columns["license"].append(get("license") or "unknown")
            columns["messages"].append(messages)
            columns["original"].append(get("original") or item.raw)
    except SourceError as exc:
        raise InputError(str(exc)) from None
    return pa.table({name: pa.array(columns[name], RECORD_SCHEMA.field(name).type) for name in RECORD_SCHEMA.names},
                    schema=RECORD_SCHEMA)


_TEXT_LINE_COLUMNS = {"text", "id", "source", "format", "source_file", "license", "original"}


def _read_text_lines(path: Path, max_record_bytes: int) -> pa.Table | None:
    """The common shape read by Arrow's multithreaded JSON reader: JSON lines whose every record is
    ``{"text": str}`` with optional string id/source/... fields, one object a line (empty lines
    skipped). Anything else (None) goes through the record-by-record reader, which names the file,
    line and field of a bad record; the table is the same either way (tests/test_dedup.py).
    Columns are built from Arrow buffers: no Python object per record."""
    import pyarrow.json as pajson

    if path.suffix.lower() not in (".jsonl", ".ndjson") or not path.is_file():
        return None
    data = path.read_bytes()
    # (the JSON reader below takes the whole file as one block, whose size is an int32)
    if not data.startswith(b"{") or b"\r" in data or b"\x00" in data or len(data) >= 2**31 - 1:
        return None
    # the raw lines (Arrow splits the file's bytes); an empty line is not a record
    whole = pa.Array.from_buffers(pa.large_binary(), 1, [None, pa.py_buffer(np.array([0, len(data)])),
                                                         pa.py_buffer(data)])
    parts = pc.split_pattern(whole, pattern="\n").values
    lines = np.flatnonzero(numpy_of(pc.binary_length(parts)))
    raw = parts.slice(0, len(lines)) if len(lines) and lines[-1] == len(lines) - 1 else parts.take(numeric_array(lines))
    # every record is one object on its own line: anything else takes the careful path
    if (not len(lines) or not pc.all(pc.starts_with(raw, pattern="{")).as_py()
            or int(pc.max(pc.binary_length(raw)).as_py()) > max_record_bytes):
        return None
    try:
        # one block: the text column comes out in one buffer, as the dedup reads it. Arrow's 1 MB
        # blocks parse on both cores, but their allocations and the copy joining them cost more:
        # 2.2-2.6 s (3 s of it system time) for a 400 MB file that one block reads in 0.5-0.6 s
        table = pajson.read_json(pa.py_buffer(data), read_options=pajson.ReadOptions(block_size=len(data) + 1))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    names = set(table.column_names)
    n = table.num_rows
    if ("text" not in names or not names <= _TEXT_LINE_COLUMNS or n != len(lines)
            or any(table[c].type != pa.string() or table[c].null_count or _has_empty(table[c])
                   for c in names - {"text"})
            or table["text"].type != pa.string() or table["text"].null_count):
        return None
    text = table["text"].combine_chunks()
    messages = pa.ListArray.from_arrays(
        numeric_array(np.arange(n + 1, dtype=np.int32)),
        pa.StructArray.from_arrays([repeated_string("user", n), text], ["role", "content"]))
    try:
        original = raw.cast(pa.large_string()).cast(pa.string())  # checks the UTF-8 of every byte
    except pa.ArrowInvalid:
        return None
    if "id" in names:
        ids = table["id"]
    else:
        ids = pa.array([record_id([{"role": "user", "content": t}]) for t in text.to_pylist()], pa.string())

    def column(name: str, value: str) -> pa.Array:
        return table[name] if name in names else repeated_string(value, n)

    return pa.table({
        "id": ids, "source": column("source", path.stem), "format": column("format", "text"),
        "source_file": column("source_file", str(path)),
        "source_line": numeric_array(lines.astype(np.int64) + 1),
        "license": column("license", "unknown"),
        "messages": messages.cast(RECORD_SCHEMA.field("messages").type), "original": original,
    }, schema=RECORD_SCHEMA)


def _has_empty(column: pa.ChunkedArray) -> bool:
    return any(numpy_of(pc.binary_length(chunk)).min(initial=1) == 0 for chunk in column.chunks)


def _messages(row: dict, where: str) -> tuple[list[dict[str, str]], str]:
    if _is_normalized(row.get("messages")):
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]], "normalized"
    if "text" in row and "messages" not in row:
        raise InputError(f"{where}: field 'text': expected a string, got {type(row['text']).__name__}")
    fmt = detect_format(row)
    if fmt is None:
        raise InputError(f"{where}: no 'messages', no 'text' and no known format fits the keys {sorted(row)[:12]}")
    try:
        messages = to_messages(row, fmt)
    except RecordError as exc:
        raise InputError(f"{where}: {fmt} record: " + (f"field '{exc.field}': " if exc.field else "")
                         + exc.reason) from None
    return [{"role": m["role"], "content": m["content"]} for m in messages], fmt


def _is_normalized(messages: Any) -> bool:
    return isinstance(messages, list) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages)


def config_with_flags(cfg: BaseModel, flags: dict[str, Any]) -> BaseModel:
    """``cfg`` with the command-line flags that were given (not None), validated like a profile; an
    InputError names the flag (``--num-perm``), not the config field."""
    try:
        return type(cfg).model_validate({**cfg.model_dump(), **{k: v for k, v in flags.items() if v is not None}})
    except ValidationError as exc:
        raise InputError("; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')} {e['input']!r}: {e['msg']}"
                                   for e in exc.errors())) from None


def run_cli(work: Callable[[], dict[str, Any]]) -> int:
    """Run a CLI: its JSON summary on stdout (exit 0), or one error on stderr (exit 2).

    Bad input, a bad flag value, a missing model or index file are the user's to fix, so they get
    a message, not a traceback.
    """
    try:
        summary = work()
    except (ValueError, OSError) as exc:  # InputError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json.dump(summary, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


def exit_cli(code: int) -> NoReturn:
    """End a CLI process. ``gc.freeze()`` first: at exit Python's collector would walk every object
    still alive (0.4 s after deduplicating 60K records) to free memory the OS takes back anyway."""
    gc.freeze()
    raise SystemExit(code)


def write_cli_output(table: pa.Table, out: Path) -> None:
    """Parquet, atomically: a crash never leaves a half-written file under the final name."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(out)
