"""The normalized record schema shared by every data stage.

A record is a conversation: ``messages`` is a list of ``{"role", "content"}`` with roles
``system`` / ``user`` / ``assistant``. Its ``id`` is a content hash of the messages, so the same
conversation gets the same id in every source and every run. ``original`` keeps the source
record as JSON: nothing the source had is lost by normalizing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROLES = ("system", "user", "assistant")

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))

RECORD_SCHEMA = pa.schema([
    ("id", pa.string()),  # sha256 of the canonical messages JSON, 16 hex characters
    ("source", pa.string()),  # the profile's source name
    ("format", pa.string()),  # alpaca, sharegpt, openai, oasst, dolly, openorca
    ("source_file", pa.string()),
    ("source_line", pa.int64()),  # 1-based line (JSONL/CSV) or element index + 1 (JSON array)
    ("license", pa.string()),
    ("messages", MESSAGE_TYPE),
    ("original", pa.string()),  # the source record as JSON
])

QUARANTINE_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("source_file", pa.string()),
    ("source_line", pa.int64()),  # 0 when the whole file is rejected
    ("field", pa.string()),  # the offending field, when there is one
    ("reason", pa.string()),
    ("raw", pa.string()),  # the raw text of the record, never truncated
])

# Columns deduped_corpus adds to every record (kept and rejected).
LANG_FIELDS = [("lang", pa.string()), ("lang_score", pa.float64()), ("p_en", pa.float64())]
KEPT_SCHEMA = pa.schema(list(RECORD_SCHEMA) + LANG_FIELDS)
REJECTED_SCHEMA = pa.schema(list(RECORD_SCHEMA) + LANG_FIELDS + [
    # non_english | exact_duplicate | near_duplicate | contaminated
    ("reason", pa.string()),
    ("duplicate_of", pa.string()),  # id of the kept record, for duplicates
    ("similarity", pa.float64()),  # exact Jaccard of the shingles, for near duplicates
    ("detail", pa.string()),  # free text: the matching eval set for contamination, etc.
])
CLUSTER_SCHEMA = pa.schema([
    ("kept_id", pa.string()),
    ("removed_id", pa.string()),
    ("kind", pa.string()),  # exact | near
    ("similarity", pa.float64()),
])


# json.dumps' own string quoting (ensure_ascii=False); json.dumps builds a new encoder per call,
# which was a quarter of ingest's time
_quote = json.encoder.encode_basestring


def record_id(messages: Sequence[dict[str, str]]) -> str:
    """sha256 of ``json.dumps([[role, content], ...], ensure_ascii=False, separators=(",", ":"))``,
    16 hex characters (the JSON is spelled out here: the same bytes, 4x faster)."""
    canonical = "[" + ",".join(f"[{_quote(m['role'])},{_quote(m['content'])}]" for m in messages) + "]"
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# Which turns a text is made of. System turns are left out of the language-ID and dedup texts:
# they are shared boilerplate (OpenOrca repeats a handful of system prompts), which would make
# unrelated records look alike and say nothing about the record's language.
TEXT_ROLES: dict[str, tuple[str, ...]] = {
    "all": ROLES, "conversation": ("user", "assistant"), "user": ("user",), "prompt": ("user",),
}


def message_text(messages: Sequence[dict[str, str]] | None, roles: Sequence[str] = ROLES, sep: str = "\n") -> str:
    """The contents of the turns whose role is in ``roles``, joined with ``sep``: the one definition
    of a record's text (``joined_text`` is the same over an Arrow column)."""
    return sep.join(m.get("content") or "" for m in messages or [] if m["role"] in roles)


def conversation_text(messages: Sequence[dict[str, str]] | None) -> str:
    """Every turn, system included, one per line (decontamination and the demo corpus's Jaccard)."""
    return message_text(messages)


def joined_text(messages: pa.ChunkedArray | pa.Array, roles: Sequence[str], sep: str,
                max_chars: int | None = None) -> list[str]:
    """``message_text`` of every record of a MESSAGE_TYPE column, cut to ``max_chars``, with Arrow
    kernels (no Python dict per message)."""
    return joined_array(messages, roles, sep, max_chars).to_pylist()


def joined_array(messages: pa.ChunkedArray | pa.Array, roles: Sequence[str], sep: str,
                 max_chars: int | None = None) -> pa.Array:
    """``joined_text`` as an Arrow string array (no Python string per record)."""
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    n = len(messages)
    flat = pc.list_flatten(messages)
    parents = numpy_of(pc.list_parent_indices(messages))
    keep = numpy_of(pc.is_in(flat.field("role"), value_set=string_array(list(roles))))
    if (max_chars is None and keep.all() and flat.field("content").null_count == 0
            and len(parents) == n and (np.bincount(parents, minlength=n) == 1).all()):
        return flat.field("content")  # one kept turn a record (text rows): its content as it is
    contents = pc.fill_null(flat.field("content").filter(pa.array(keep)), "")
    counts = np.bincount(parents[keep], minlength=n)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    joined = pc.fill_null(pc.binary_join(pa.ListArray.from_arrays(offsets, contents), sep), "")
    if max_chars is not None:
        joined = pc.utf8_slice_codeunits(joined, 0, max_chars)
    return joined


# Arrays built from buffers: pa.array checks its input against pandas types, which imports pandas
# (0.2-0.4 s a process); the command-line tools never need it.
def numeric_array(values: np.ndarray) -> pa.Array:
    """A 1-D numpy array of numbers or booleans as an Arrow array (no nulls)."""
    values = np.ascontiguousarray(values)
    if values.dtype == bool:
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(np.packbits(values, bitorder="little"))])
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def numpy_of(arr: pa.Array) -> np.ndarray:
    """A numeric or boolean Arrow array without nulls as numpy (``to_numpy`` imports pandas too)."""
    if arr.null_count:
        raise ValueError("numpy_of: the array has nulls")
    data = arr.buffers()[1]
    if arr.type == pa.bool_():
        bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
        return bits[arr.offset:arr.offset + len(arr)].astype(bool)
    return np.frombuffer(data, arr.type.to_pandas_dtype())[arr.offset:arr.offset + len(arr)]


def string_array(values: Sequence[str | None]) -> pa.Array:
    """Python strings (None: null) as an Arrow string array."""
    data = [v.encode("utf-8") if v is not None else b"" for v in values]
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, data), np.int64, len(data)), out=offsets[1:])
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    bitmap = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.LargeStringArray.from_buffers(len(data), pa.py_buffer(offsets), pa.py_buffer(b"".join(data)),
                                            bitmap).cast(pa.string())


def float_array(values: Sequence[float | None]) -> pa.Array:
    """Python floats (None: null) as an Arrow float64 array."""
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    data = np.fromiter((v if v is not None else 0.0 for v in values), np.float64, len(values))
    bitmap = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.float64(), len(values), [bitmap, pa.py_buffer(data)])


def repeated_string(value: str, n: int) -> pa.Array:
    """``n`` times the same string."""
    data = value.encode("utf-8")
    return pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(n + 1, dtype=np.int32) * len(data)),
                                       pa.py_buffer(data * n))


def write_table(path: Path, rows: Iterable[dict[str, Any]] | pa.Table, schema: pa.Schema) -> int:
    """Write rows as Parquet with the given schema (an empty table is still a valid file)."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows), schema=schema)
    table = table.select(schema.names).cast(schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")
    return table.num_rows


def open_parquet(path: Path | str) -> pq.ParquetFile:
    """A Parquet file to stream batch by batch. No pre-buffering: Arrow would keep every column
    chunk it read until the file is closed (400 MB by the end of a 640K-record corpus)."""
    return pq.ParquetFile(path, pre_buffer=False)


def read_table(path: Path) -> pa.Table:
    return pq.read_table(path)
