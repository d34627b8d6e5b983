"""Data statistics in one DuckDB file, with history: what every data materialization read, kept and removed.

Every function takes an open DuckDB connection (``duckdb.connect(path)`` or Dagster's
DuckDBResource) and creates the schema idempotently, so the same file accumulates the history of
every run: raw_corpus and deduped_corpus materializations (per source), their language
distribution, duplicate clusters and quarantine rows, and the scheduled re-verifications. The
numbers are computed by DuckDB from the artifact's own Parquet files, so the statistics describe
exactly what was published. The schema and example queries are in docs/stats.md.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from refinery.artifacts import Artifact

SCHEMA_VERSION = 1

# One statement per table. Keys are (asset, artifact_version): every materialization publishes a
# new artifact version, so recording the same version again (a retried run) replaces its rows.
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS materializations (
        asset VARCHAR NOT NULL,              -- raw_corpus | deduped_corpus
        artifact_version VARCHAR NOT NULL,
        artifact_path VARCHAR,
        run_id VARCHAR,                      -- Dagster run id ('' outside Dagster)
        profile VARCHAR,
        materialized_at TIMESTAMP,           -- UTC
        mode VARCHAR,                        -- full | landing (the sensor's incremental runs)
        input_version VARCHAR,               -- the upstream artifact version, for deduped_corpus
        records_read BIGINT,                 -- as counted by the stage itself
        records_kept BIGINT,                 -- rows in records.parquet / kept.parquet
        quarantined BIGINT,
        non_english BIGINT,
        exact_duplicates BIGINT,
        near_duplicates BIGINT,
        contaminated BIGINT,
        english_share DOUBLE,                -- share of classified records whose language is English
        kept_english_share DOUBLE,           -- the same over the kept records (the asset check)
        length_p50 DOUBLE,                   -- characters of all turns of a kept record (percentiles)
        length_p90 DOUBLE,
        length_p99 DOUBLE,
        PRIMARY KEY (asset, artifact_version))""",
    """CREATE TABLE IF NOT EXISTS source_stats (
        asset VARCHAR NOT NULL,
        artifact_version VARCHAR NOT NULL,
        source VARCHAR NOT NULL,
        records_read BIGINT,
        records_kept BIGINT,
        quarantined BIGINT,
        non_english BIGINT,
        exact_duplicates BIGINT,
        near_duplicates BIGINT,
        contaminated BIGINT,
        english_share DOUBLE,
        kept_english_share DOUBLE,
        length_p50 DOUBLE,
        length_p90 DOUBLE,
        length_p99 DOUBLE,
        PRIMARY KEY (asset, artifact_version, source))""",
    """CREATE TABLE IF NOT EXISTS languages (
        artifact_version VARCHAR NOT NULL,   -- deduped_corpus version
        source VARCHAR NOT NULL,
        lang VARCHAR NOT NULL,
        records BIGINT,                      -- classified records with this top language
        kept BIGINT,
        PRIMARY KEY (artifact_version, source, lang))""",
    """CREATE TABLE IF NOT EXISTS duplicate_clusters (
        artifact_version VARCHAR NOT NULL,   -- deduped_corpus version
        kept_id VARCHAR NOT NULL,
        removed_id VARCHAR NOT NULL,
        kind VARCHAR,                        -- exact | near
        similarity DOUBLE)""",
    """CREATE TABLE IF NOT EXISTS quarantine (
        artifact_version VARCHAR NOT NULL,   -- raw_corpus version
        source VARCHAR,
        source_file VARCHAR,
        source_line BIGINT,
        field VARCHAR,
        reason VARCHAR,
        raw_preview VARCHAR)                 -- first 200 characters; the full text is in the artifact""",
    """CREATE TABLE IF NOT EXISTS verifications (
        verification_id VARCHAR PRIMARY KEY,
        run_id VARCHAR,
        verified_at TIMESTAMP,               -- UTC
        profile VARCHAR,
        artifact_version VARCHAR,            -- the deduped_corpus version sampled
        corpus_records BIGINT,
        sample_size BIGINT,
        english_share DOUBLE,
        exact_dup_rate DOUBLE,
        near_dup_rate DOUBLE,
        previous_id VARCHAR,                 -- the verification compared against (NULL: the first)
        english_drift DOUBLE,                -- absolute change since previous_id
        exact_dup_drift DOUBLE,
        near_dup_drift DOUBLE,
        max_english_drift DOUBLE,            -- the thresholds in force
        max_duplicate_drift DOUBLE,
        integrity_failures VARCHAR,          -- files whose SHA-256 no longer matches the manifest
        passed BOOLEAN)""",
    """CREATE TABLE IF NOT EXISTS schema_info (key VARCHAR PRIMARY KEY, value VARCHAR)""",
]

# DuckDB 1.3+ deprecates the arrow lambda (x -> ...) and 2.x refuses it by default; the Python-style
# lambda works in both (tests/test_stats.py runs these expressions).
CONVERSATION_CHARS = "coalesce(list_sum(list_transform(messages, lambda m: length(m.content))), 0)"
CONVERSATION_TEXT = "array_to_string(list_transform(messages, lambda m: m.content), chr(10))"

COUNT_COLUMNS = ["records_read", "records_kept", "quarantined", "non_english", "exact_duplicates",
                 "near_duplicates", "contaminated"]
SHARE_COLUMNS = ["english_share", "kept_english_share", "length_p50", "length_p90", "length_p99"]
REJECTION_COLUMNS = {"non_english": "non_english", "exact_duplicate": "exact_duplicates",
                     "near_duplicate": "near_duplicates", "contaminated": "contaminated"}


def connect(path: Path | str) -> duckdb.DuckDBPyConnection:
    """Open (creating) the statistics file and make sure the schema exists."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = duckdb.connect(str(path))
    ensure_schema(conn)
    return conn


def ensure_schema(conn: duckdb.DuckDBPyConnection) -> None:
    for statement in SCHEMA:
        conn.execute(statement)
    conn.execute("INSERT OR REPLACE INTO schema_info VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _pq(path: Path) -> str:
    """A read_parquet() expression for one file (paths are quoted, never interpolated raw)."""
    return "read_parquet('" + str(path).replace("'", "''") + "')"


def _rows(conn: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[dict[str, Any]]:
    cur = conn.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def _lengths(conn: duckdb.DuckDBPyConnection, table: str) -> dict[str, dict[str, float | None]]:
    """Conversation-length percentiles (characters) per source of a record table."""
    rows = _rows(conn, f"""
        SELECT source, round(quantile_cont(n, 0.5), 1) AS p50, round(quantile_cont(n, 0.9), 1) AS p90,
               round(quantile_cont(n, 0.99), 1) AS p99
        FROM (SELECT source, {CONVERSATION_CHARS} AS n FROM {table}) GROUP BY ALL""")
    out = {r["source"]: {"length_p50": r["p50"], "length_p90": r["p90"], "length_p99": r["p99"]} for r in rows}
    total = _rows(conn, f"""SELECT round(quantile_cont(n, 0.5), 1) AS p50, round(quantile_cont(n, 0.9), 1) AS p90,
                                   round(quantile_cont(n, 0.99), 1) AS p99
                            FROM (SELECT {CONVERSATION_CHARS} AS n FROM {table})""")[0]
    out[None] = {"length_p50": total["p50"], "length_p90": total["p90"], "length_p99": total["p99"]}
    return out


def _delete_materialization(conn: duckdb.DuckDBPyConnection, asset: str, version: str) -> None:
    conn.execute("DELETE FROM materializations WHERE asset = ? AND artifact_version = ?", [asset, version])
    conn.execute("DELETE FROM source_stats WHERE asset = ? AND artifact_version = ?", [asset, version])
    if asset == "raw_corpus":
        conn.execute("DELETE FROM quarantine WHERE artifact_version = ?", [version])
    else:
        conn.execute("DELETE FROM languages WHERE artifact_version = ?", [version])
        conn.execute("DELETE FROM duplicate_clusters WHERE artifact_version = ?", [version])


@contextmanager
def _replacing(conn: duckdb.DuckDBPyConnection, asset: str, artifact: Artifact, per_source: list[dict[str, Any]],
               totals: dict[str, Any], **materialization: Any) -> Iterator[None]:
    """One transaction that replaces a materialization's rows: its source_stats and materializations
    rows here, its asset-specific rows in the ``with`` body. A failure leaves the old rows in place."""
    conn.execute("BEGIN TRANSACTION")
    try:
        _delete_materialization(conn, asset, artifact.version)
        for row in per_source:
            _insert(conn, "source_stats", row)
        _insert(conn, "materializations", {"asset": asset, "artifact_version": artifact.version,
                                           "artifact_path": str(artifact.path), "materialized_at": _now(),
                                           **materialization, **totals})
        yield
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _insert(conn: duckdb.DuckDBPyConnection, table: str, row: dict[str, Any]) -> None:
    cols = list(row)
    conn.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                 [row[c] for c in cols])


def _totals(per_source: list[dict[str, Any]], lengths: dict) -> dict[str, Any]:
    totals: dict[str, Any] = {c: sum(r[c] or 0 for r in per_source) if any(r[c] is not None for r in per_source)
                              else None for c in COUNT_COLUMNS}
    totals.update(lengths[None])
    return totals


# --------------------------------------------------------------------------- raw_corpus


def record_raw_corpus(conn: duckdb.DuckDBPyConnection, artifact: Artifact, *, run_id: str = "",
                      profile: str = "", mode: str = "full") -> dict[str, Any]:
    """Store one raw_corpus materialization: per source read (the ingest's count), kept, quarantined.

    ``read`` comes from the manifest (what ingest counted while reading), ``kept`` and
    ``quarantined`` from the Parquet files, so the reconciliation check compares two independent
    numbers. Returns the totals row.
    """
    ensure_schema(conn)
    records, quarantine = _pq(artifact.path / "records.parquet"), _pq(artifact.path / "quarantine.parquet")
    read = {name: c["read"] for name, c in artifact.manifest["metrics"].get("per_source", {}).items()}
    kept = dict(conn.execute(f"SELECT source, count(*) FROM {records} GROUP BY ALL").fetchall())
    quarantined = dict(conn.execute(f"SELECT source, count(*) FROM {quarantine} GROUP BY ALL").fetchall())
    lengths = _lengths(conn, records)
    per_source = []
    for source in sorted(set(read) | set(kept) | set(quarantined)):
        per_source.append({"asset": "raw_corpus", "artifact_version": artifact.version, "source": source,
                           "records_read": read.get(source), "records_kept": kept.get(source, 0),
                           "quarantined": quarantined.get(source, 0), "non_english": None,
                           "exact_duplicates": None, "near_duplicates": None, "contaminated": None,
                           **lengths.get(source, {"length_p50": None, "length_p90": None, "length_p99": None})})
    totals = _totals(per_source, lengths)
    with _replacing(conn, "raw_corpus", artifact, per_source, totals, run_id=run_id, profile=profile, mode=mode,
                    input_version=None):
        conn.execute(f"""INSERT INTO quarantine SELECT ?, source, source_file, source_line, field, reason,
                         left(raw, 200) FROM {quarantine}""", [artifact.version])
    return {"asset": "raw_corpus", "artifact_version": artifact.version, **totals}


# --------------------------------------------------------------------------- deduped_corpus


def record_deduped_corpus(conn: duckdb.DuckDBPyConnection, artifact: Artifact, *, records_read: dict[str, int],
                          english_label: str = "en", run_id: str = "", profile: str = "",
                          mode: str = "full", input_version: str | None = None) -> dict[str, Any]:
    """Store one deduped_corpus materialization: per source kept and each rejection reason.

    ``records_read`` is what curation was given per source (counted by the caller from its
    inputs), so ``read == kept + rejections`` is a real reconciliation. The English shares use the
    top language label (``lang == english_label``), the seed's fastText measure. Returns the totals.
    """
    ensure_schema(conn)
    kept, rejected = _pq(artifact.path / "kept.parquet"), _pq(artifact.path / "rejected.parquet")
    clusters = _pq(artifact.path / "clusters.parquet")
    both = f"(SELECT source, lang, true AS is_kept FROM {kept} UNION ALL SELECT source, lang, false FROM {rejected})"
    counts = {r["source"]: r for r in _rows(conn, f"""
        SELECT source, count(*) FILTER (is_kept) AS records_kept,
               avg(CASE WHEN lang = $1 THEN 1.0 ELSE 0.0 END) AS english_share,
               avg(CASE WHEN lang = $1 THEN 1.0 ELSE 0.0 END) FILTER (is_kept) AS kept_english_share
        FROM {both} GROUP BY ALL""", [english_label])}
    reasons: dict[str, dict[str, int]] = {}
    for source, reason, n in conn.execute(f"SELECT source, reason, count(*) FROM {rejected} GROUP BY ALL").fetchall():
        reasons.setdefault(source, {})[reason] = n
    unknown = {r for by in reasons.values() for r in by} - set(REJECTION_COLUMNS)
    if unknown:
        raise ValueError(f"{artifact.path / 'rejected.parquet'}: unknown rejection reasons {sorted(unknown)} "
                         f"(known: {sorted(REJECTION_COLUMNS)})")
    lengths = _lengths(conn, kept)
    per_source = []
    for source in sorted(set(records_read) | set(counts)):
        c = counts.get(source, {})
        row = {"asset": "deduped_corpus", "artifact_version": artifact.version, "source": source,
               "records_read": records_read.get(source, 0), "records_kept": c.get("records_kept", 0) or 0,
               "quarantined": None, "english_share": c.get("english_share"),
               "kept_english_share": c.get("kept_english_share"),
               **lengths.get(source, {"length_p50": None, "length_p90": None, "length_p99": None})}
        for reason, column in REJECTION_COLUMNS.items():
            row[column] = reasons.get(source, {}).get(reason, 0)
        per_source.append(row)
    totals = _totals(per_source, lengths)
    shares = _rows(conn, f"""SELECT avg(CASE WHEN lang = $1 THEN 1.0 ELSE 0.0 END) AS english_share,
                                    avg(CASE WHEN lang = $1 THEN 1.0 ELSE 0.0 END) FILTER (is_kept)
                                        AS kept_english_share FROM {both}""", [english_label])[0]
    totals.update(shares)
    with _replacing(conn, "deduped_corpus", artifact, per_source, totals, run_id=run_id, profile=profile,
                    mode=mode, input_version=input_version):
        conn.execute(f"""INSERT INTO languages SELECT ?, source, coalesce(lang, 'unknown'), count(*),
                         count(*) FILTER (is_kept) FROM {both} GROUP BY ALL""", [artifact.version])
        conn.execute(f"INSERT INTO duplicate_clusters SELECT ?, kept_id, removed_id, kind, similarity FROM {clusters}",
                     [artifact.version])
    return {"asset": "deduped_corpus", "artifact_version": artifact.version, **totals}


def count_by_source(conn: duckdb.DuckDBPyConnection, parquet: Path) -> dict[str, int]:
    """Rows per source of a record Parquet file (what a stage was given to read)."""
    return dict(conn.execute(f"SELECT source, count(*) FROM {_pq(parquet)} GROUP BY ALL").fetchall())


# --------------------------------------------------------------------------- queries for the UI and checks


def materialization(conn: duckdb.DuckDBPyConnection, asset: str, version: str | None = None) -> dict[str, Any] | None:
    """One materialization's totals row (the latest recorded when no version is given)."""
    ensure_schema(conn)
    where, params = ("asset = ? AND artifact_version = ?", [asset, version]) if version else ("asset = ?", [asset])
    rows = _rows(conn, f"SELECT * FROM materializations WHERE {where} ORDER BY materialized_at DESC LIMIT 1", params)
    return rows[0] if rows else None


def source_rows(conn: duckdb.DuckDBPyConnection, asset: str, version: str) -> list[dict[str, Any]]:
    ensure_schema(conn)
    return _rows(conn, "SELECT * FROM source_stats WHERE asset = ? AND artifact_version = ? ORDER BY source",
                 [asset, version])


def top_languages(conn: duckdb.DuckDBPyConnection, version: str, limit: int = 10) -> list[dict[str, Any]]:
    """Most frequent top-1 languages among the records curation classified (all sources)."""
    return _rows(conn, f"""
        SELECT lang, sum(records)::BIGINT AS records, sum(kept)::BIGINT AS kept,
               round(sum(records) / (SELECT sum(records) FROM languages WHERE artifact_version = $1), 4) AS share
        FROM languages WHERE artifact_version = $1 GROUP BY lang ORDER BY records DESC, lang LIMIT {int(limit)}""",
                 [version])


def quarantine_reasons(conn: duckdb.DuckDBPyConnection, version: str, limit: int = 10) -> list[dict[str, Any]]:
    """Quarantine rows of a raw_corpus version grouped by source and reason (the text before ':' or ' (')."""
    return _rows(conn, f"""
        SELECT source, regexp_replace(regexp_replace(reason, ':.*$', ''), ' \\(.*$', '') AS reason,
               count(*) AS records,
               min(source_file || ':' || source_line || coalesce(' ' || field, '')) AS example
        FROM quarantine WHERE artifact_version = ? GROUP BY ALL ORDER BY records DESC, source LIMIT {int(limit)}""",
                 [version])


def cluster_examples(conn: duckdb.DuckDBPyConnection, artifact: Artifact, limit: int = 3,
                     chars: int = 80) -> list[dict[str, Any]]:
    """A few duplicate clusters (near ones first) with the beginning of both texts, to eyeball."""
    kept, rejected = _pq(artifact.path / "kept.parquet"), _pq(artifact.path / "rejected.parquet")
    return _rows(conn, f"""
        SELECT c.kind, round(c.similarity, 3) AS similarity, c.kept_id, c.removed_id,
               left(k.text, {int(chars)}) AS kept_text, left(r.text, {int(chars)}) AS removed_text
        FROM duplicate_clusters c
        LEFT JOIN (SELECT id, {CONVERSATION_TEXT} AS text FROM {kept}) k ON k.id = c.kept_id
        LEFT JOIN (SELECT id, {CONVERSATION_TEXT} AS text FROM {rejected}) r ON r.id = c.removed_id
        WHERE c.artifact_version = ?
        ORDER BY c.kind = 'near' DESC, c.similarity, c.removed_id LIMIT {int(limit)}""", [artifact.version])


def history(conn: duckdb.DuckDBPyConnection, asset: str) -> list[dict[str, Any]]:
    """Every recorded materialization of an asset, oldest first (the trend)."""
    ensure_schema(conn)
    return _rows(conn, "SELECT * FROM materializations WHERE asset = ? ORDER BY materialized_at", [asset])


# --------------------------------------------------------------------------- verifications


def record_verification(conn: duckdb.DuckDBPyConnection, row: dict[str, Any]) -> None:
    """Store one verification (the columns of the ``verifications`` table; see refinery.verify)."""
    ensure_schema(conn)
    row = dict(row)
    row.setdefault("verified_at", _now())
    _insert(conn, "verifications", row)


def last_verification(conn: duckdb.DuckDBPyConnection, *, exclude: str | None = None) -> dict[str, Any] | None:
    """The most recent verification (optionally not counting ``exclude``, a verification id)."""
    ensure_schema(conn)
    rows = _rows(conn, """SELECT * FROM verifications WHERE verification_id IS DISTINCT FROM ?
                          ORDER BY verified_at DESC, verification_id DESC LIMIT 1""", [exclude])
    return rows[0] if rows else None
