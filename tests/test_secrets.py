"""A canary HF_TOKEN through one run of the smoke chain (the README's `make demo` command, tiny
profile, fresh home): it must appear in nothing refinery writes or records, and in no stage
process's environment except one that declares it.

Where it is looked for, each store read the way it stores text (a compressed or paged store can
split or encode a string that a byte search would miss):
- every file under the home (artifacts, manifests, metadata JSON, reports, logs, the frozen
  profiles, Dagster's storage and compute logs) and under the run's TMPDIR, byte for byte, and
  decoded where it is a container: zstd, gzip, zip (.npz, torch files), Parquet rows, every
  column of every SQLite table (Dagster's run and event log databases), every column of every
  DuckDB table cast to text;
- through Dagster's API: every run record and every event log entry (messages, materialization
  and check metadata values);
- the run's console output;
- the environment (/proc/<pid>/environ) of every process the run starts, polled while it runs:
  stage processes (``-m refinery.runner``) and their children hold the token only when their
  stage declares it (``Stage.secrets``); the ``dagster job execute`` process, which got the full
  environment, is the control that the polling sees it.

test_sandbox.py::test_parent_environment_is_out_of_reach covers model-written code reading a
parent's /proc/<pid>/environ. The first test here shows the scanner finds a planted canary in every
kind of store it claims to read.
"""

from __future__ import annotations

import gzip
import json
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from refinery import stages
from refinery.config import load_profile
from test_pipeline_e2e import ROOT, _env

CHUNK = 1 << 22


def encodings(canary: str) -> tuple[bytes, ...]:
    """The canary as UTF-8, and as UTF-16 and UTF-32 (numpy stores its strings in UTF-32)."""
    return tuple(canary.encode(e) for e in ("utf-8", "utf-16-le", "utf-32-le"))


def _find(chunks: Iterable[bytes], needles: tuple[bytes, ...]) -> bool:
    """Whether one of ``needles`` occurs in the concatenation of ``chunks`` (also across their borders)."""
    keep, tail = max(map(len, needles)) - 1, b""
    for chunk in chunks:
        window = tail + chunk
        if any(n in window for n in needles):
            return True
        tail = window[-keep:]
    return False


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(CHUNK), b"")


def _reader_chunks(reader) -> Iterator[bytes]:
    with reader:
        yield from iter(lambda: reader.read(CHUNK), b"")


def _copy_store(path: Path, wal_suffix: str, into: Path) -> Path:
    """A copy of a database file and its write-ahead log, to open as the writer left it."""
    for suffix in ("", wal_suffix):
        if path.with_name(path.name + suffix).exists():
            shutil.copyfile(path.with_name(path.name + suffix), into / (path.name + suffix))
    return into / path.name


def _sqlite_hits(path: Path, needles: tuple[bytes, ...], counts: Counter) -> list[str]:
    """Every column of every table, as bytes (a long text spills over pages a byte scan sees cut)."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(_copy_store(path, "-wal", Path(tmp)))
        try:
            hits = []
            for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                counts["sqlite_rows"] += conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
                for column in [row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')]:
                    query = f'SELECT count(*) FROM "{table}" WHERE instr(CAST("{column}" AS BLOB), ?) > 0'
                    found = sum(conn.execute(query, [needle]).fetchone()[0] for needle in needles)
                    if found:
                        hits.append(f"sqlite {table}.{column}")
            return hits
        finally:
            conn.close()


def _duckdb_hits(path: Path, needles: tuple[bytes, ...], counts: Counter) -> list[str]:
    """Every column of every table cast to text (DuckDB compresses strings on disk)."""
    with tempfile.TemporaryDirectory() as tmp:
        hits = []
        with duckdb.connect(str(_copy_store(path, ".wal", Path(tmp)))) as conn:
            columns = conn.execute("""SELECT c.table_schema, c.table_name, c.column_name, c.data_type
                FROM information_schema.columns c JOIN information_schema.tables t
                  ON c.table_schema = t.table_schema AND c.table_name = t.table_name
                WHERE t.table_type = 'BASE TABLE'""").fetchall()
            for schema, table in sorted({(s, t) for s, t, _, _ in columns}):
                counts["duckdb_tables"] += 1
                counts["duckdb_rows"] += conn.execute(f'SELECT count(*) FROM "{schema}"."{table}"').fetchone()[0]
            for schema, table, column, dtype in columns:
                if dtype == "BLOB":
                    text, values = f'hex("{column}")', [n.hex().upper() for n in needles]
                else:
                    text, values = f'CAST("{column}" AS VARCHAR)', [needles[0].decode()]
                found = sum(conn.execute(f'SELECT count(*) FROM "{schema}"."{table}" WHERE strpos({text}, ?) > 0',
                                         [value]).fetchone()[0] for value in values)
                counts["duckdb_columns"] += 1
                if found:
                    hits.append(f"duckdb {schema}.{table}.{column}")
        return hits


def scan_files(root: Path, canary: str, counts: Counter) -> list[str]:
    """``path: how`` for every file under ``root`` holding ``canary``, read raw and decoded."""
    needle = encodings(canary)
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        counts["files"] += 1
        counts["bytes"] += path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
        found = ["raw bytes"] if _find(_file_chunks(path), needle) else []
        if head.startswith(b"\x28\xb5\x2f\xfd"):
            counts["zstd"] += 1
            reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
            found += ["zstd"] if _find(_reader_chunks(reader), needle) else []
        elif head.startswith(b"\x1f\x8b"):
            counts["gzip"] += 1
            found += ["gzip"] if _find(_reader_chunks(gzip.open(path)), needle) else []
        elif zipfile.is_zipfile(path):
            counts["zip"] += 1
            with zipfile.ZipFile(path) as z:
                found += [f"zip member {m}" for m in z.namelist() if _find(_reader_chunks(z.open(m)), needle)]
        elif head.startswith(b"PAR1"):
            counts["parquet"] += 1
            rows = json.dumps(pq.read_table(path).to_pylist(), default=str, ensure_ascii=False).encode()
            found += ["parquet rows"] if _find([rows], needle) else []
        elif head.startswith(b"SQLite format 3\x00"):
            counts["sqlite"] += 1
            found += _sqlite_hits(path, needle, counts)
        elif head[8:12] == b"DUCK":
            counts["duckdb"] += 1
            found += _duckdb_hits(path, needle, counts)
        hits += [f"{path.relative_to(root)}: {how}" for how in found]
    return hits


def scan_dagster(dagster_home: Path, needle: str, counts: Counter) -> list[str]:
    """Every run record and event log entry (messages, metadata values) through Dagster's API."""
    hits = []
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for run in instance.get_runs():
            counts["dagster_runs"] += 1
            if needle in dg.serialize_value(run):
                hits.append(f"run {run.run_id}")
            for entry in instance.all_logs(run.run_id):
                counts["dagster_events"] += 1
                event = entry.dagster_event
                data = event.event_specific_data if event else None
                metadata = getattr(getattr(data, "materialization", None), "metadata", None) or \
                    (data.metadata if event and event.event_type_value == "ASSET_CHECK_EVALUATION" else {})
                counts["dagster_metadata_values"] += len(metadata)
                if needle in dg.serialize_value(entry):
                    hits.append(f"run {run.run_id} event {event.event_type_value if event else 'log'}: "
                                f"{entry.user_message[:80]}")
    return hits


class EnvironmentWatcher(threading.Thread):
    """Polls the environment of every process under ``pid`` while it runs."""

    def __init__(self, pid: int, needle: str):
        super().__init__(daemon=True)
        self.root, self.needle, self.stop = psutil.Process(pid), needle, threading.Event()
        self.seen: dict[tuple[int, float, tuple[str, ...]], dict] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                children = self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for proc in children:
                try:
                    argv = tuple(proc.cmdline())
                    holds = any(self.needle in v for v in proc.environ().values())
                    if tuple(proc.cmdline()) != argv:  # it exec'd in between: read it next time
                        continue
                    parents = [tuple(p.cmdline()) for p in proc.parents()]
                    key = (proc.pid, proc.create_time(), argv)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                self.seen[key] = {"argv": argv, "holds": holds, "stage": _stage_of(argv, parents)}
            self.stop.wait(0.2)


def _runner_stage(argv: tuple[str, ...]) -> str | None:
    return argv[3] if argv[1:3] == ("-m", "refinery.runner") and len(argv) > 3 else None


def _stage_of(argv: tuple[str, ...], parents: list[tuple[str, ...]]) -> tuple[str, bool] | None:
    """(stage, is the runner itself) for a stage process or one of its descendants, else None."""
    if _runner_stage(argv):
        return _runner_stage(argv), True
    for parent in parents:
        if _runner_stage(parent):
            return _runner_stage(parent), False
    return None


def test_the_scanner_finds_a_planted_canary_in_every_kind_of_store(tmp_path):
    """The control for the test below: each file holds the canary where a plain byte search of the
    file would miss it (compressed, split over pages, encoded); the scanner names each one."""
    canary = f"refinery-canary-{secrets.token_hex(8)}"
    root = tmp_path / "home"
    root.mkdir()
    (root / "run.log").write_text(f"step 3 token={canary}\n")
    (root / "clean.log").write_text("nothing here\n" * 1000)
    (root / "model.gguf.zst").write_bytes(zstandard.ZstdCompressor().compress(b"x" * 100_000 + canary.encode()))
    with gzip.open(root / "events.gz", "wb") as f:
        f.write(b"y" * 50_000 + canary.encode())
    np.savez_compressed(root / "cache.npz", a=np.zeros(10_000), b=np.array([canary]))
    rows = [f"row {i} " + ("filler " * 20) for i in range(2000)] + [f"x {canary} y"]
    pq.write_table(pa.table({"text": rows}), root / "kept.parquet", compression="zstd")
    with sqlite3.connect(root / "events.db") as conn:  # 100 KB before it: the canary is on an overflow page
        conn.execute("CREATE TABLE event_logs (id INTEGER, event TEXT)")
        conn.execute("INSERT INTO event_logs VALUES (1, ?)", ["z" * 100_000 + canary])
    conn.close()
    with duckdb.connect(str(root / "stats.duckdb")) as conn:
        conn.execute("CREATE TABLE scores (stage VARCHAR, run STRUCT(id VARCHAR, n INTEGER), value DOUBLE)")
        conn.execute("INSERT INTO scores SELECT 'qlora_model', {'id': 'r' || i, 'n': i}, i FROM range(50000) t(i)")
        conn.execute("INSERT INTO scores VALUES ('x', {'id': ?, 'n': 1}, 1.0)", [canary])
        conn.execute("CHECKPOINT")
    counts = Counter()
    hits = scan_files(root, canary, counts)
    found = {h.split(":")[0] for h in hits}
    assert found == {"run.log", "model.gguf.zst", "events.gz", "cache.npz", "kept.parquet", "events.db",
                     "stats.duckdb"}, hits
    # a byte search alone misses these: the decoding is what finds them
    raw = {h.split(":")[0] for h in hits if h.endswith("raw bytes")}
    assert raw.isdisjoint({"events.gz", "cache.npz", "stats.duckdb"}), hits


def test_a_canary_token_appears_in_nothing_the_smoke_chain_writes_or_records(tmp_path):
    canary = f"refinery-canary-{secrets.token_hex(8)}"
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    tmp.mkdir()
    env = {**_env(home), "HF_TOKEN": canary, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "scripts/run_pipeline.py", "--profile", "smoke"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = EnvironmentWatcher(proc.pid, canary)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=1500)
    finally:
        watcher.stop.set()
        watcher.join()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out + err)[-5000:]  # the whole chain ran: every store was written

    counts = Counter()
    hits = scan_files(home, canary, counts) + scan_files(tmp, canary, counts)
    hits += scan_dagster(home / "dagster", canary, counts)
    hits += ["console output"] if canary in out + err else []
    assert hits == [], hits
    assert counts["sqlite"] >= 1 and counts["duckdb"] == 1 and counts["duckdb_rows"] > 0  # the stores were read
    assert counts["dagster_metadata_values"] >= 50 and counts["parquet"] >= 2

    # the processes: the run's Dagster process had the token (the poll sees it); a stage process
    # only when its stage declares it
    seen = list(watcher.seen.values())
    declared = {st.name for st in stages.STAGES
                if "HF_TOKEN" in stages.config_values(load_profile("smoke"), st.secrets).values()}
    assert any(s["holds"] for s in seen if ("job", "execute") in zip(s["argv"], s["argv"][1:])), \
        "the poll never saw the token where it is (the Dagster process): it cannot see a leak either"
    stage_procs = [s for s in seen if s["stage"]]
    leaked = [s["argv"][:6] for s in stage_procs if s["holds"] and s["stage"][0] not in declared]
    assert leaked == [], leaked
    runners = {s["stage"][0] for s in stage_procs if s["stage"][1]}
    assert runners == {st.name for st in stages.STAGES}, runners  # every stage process was looked at
    print("\nsecrets:", json.dumps({
        **{k: counts[k] for k in sorted(counts)}, "found": len(hits),
        "processes_polled": len(seen), "stage_processes": len(stage_procs),
        "stage_processes_with_token": sorted({s["stage"][0] for s in stage_procs if s["holds"]}),
        "declared": sorted(declared)}, sort_keys=True))
