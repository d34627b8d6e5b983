"""The data half: raw_corpus (ingestion) -> deduped_corpus (curation) -> verified_corpus (verification).

The work happens in refinery.ingest / refinery.curate / refinery.verify; these assets choose the
inputs, publish the artifact, record the statistics in DuckDB (refinery.stats) and show them.
Checks marked blocking stop training when the data is wrong.

Re-verification is an asset (verified_corpus) rather than a check on deduped_corpus: each
verification is a record of its own (a DuckDB row, with its sample and drift), so its
materializations plot the English share and duplicate rates over time in the UI, the schedule
targets it without re-running curation, and its checks say whether the latest one drifted.
"""

# No `from __future__ import annotations`: Dagster resolves config and resource parameters from
# real annotations, and string annotations make it fail ("RawCorpusConfig cannot be resolved").
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from dagster_duckdb import DuckDBResource
from pydantic import Field

from assets.common import markdown_table, upstream_artifact
from refinery import stages, stats
from refinery.artifacts import CONTENT, Artifact, load_artifact, recall, remember, staged_artifact
from refinery.config import Profile, SourceConfig
from refinery.records import CLUSTER_SCHEMA, KEPT_SCHEMA, QUARANTINE_SCHEMA, RECORD_SCHEMA, REJECTED_SCHEMA
from resources import RefineryResource

INGESTION, CURATION, VERIFICATION = "ingestion", "curation", "verification"
HELDOUT, GROUND_TRUTH = "heldout.jsonl", "ground_truth.json"


def _columns(schema: pa.Schema) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(f.name, str(f.type)) for f in schema])


def _rate(part: int | None, whole: int | None) -> float:
    return round((part or 0) / whole, 6) if whole else 0.0


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


# --------------------------------------------------------------------------- raw_corpus


class RawCorpusConfig(dg.Config):
    landing_files: list[str] = Field(
        default_factory=list,
        description="Ingest only these landed files (the new-data sensor sets this); empty: every source of the "
                    "profile, the demo corpus when enabled, and every file processed from the landing directory.")


def _full_sources(profile: Profile, home: Path) -> tuple[list[SourceConfig], Path | None]:
    """The profile's sources, the demo corpus (written to home/demo_data) and earlier landed files."""
    from refinery.landing import processed_sources

    sources = list(profile.ingest.sources)
    demo_dir = None
    if profile.ingest.demo is not None:
        from refinery.demo_data import write_demo_corpus

        demo_dir = home / "demo_data"
        sources = write_demo_corpus(profile.ingest.demo, demo_dir).sources + sources
    sources += processed_sources(profile.resolve_path(profile.landing.dir))
    return sources, demo_dir


@dg.asset(group_name=INGESTION, kinds={"parquet", "duckdb"},
          description="Every record of every source, normalized to chat messages (records.parquet), and every "
                      "record that could not be read with its file, line, field and reason (quarantine.parquet). "
                      "read = kept + quarantined per source.")
def raw_corpus(context: dg.AssetExecutionContext, config: RawCorpusConfig, refinery: RefineryResource,
               duckdb: DuckDBResource) -> dg.MaterializeResult:
    from refinery.ingest import ingest_to, source_files
    from refinery.landing import archive, landing_sources

    profile, home = refinery.load_profile(), refinery.home_path()
    landing = [Path(p) for p in config.landing_files]
    missing = [str(p) for p in landing if not p.exists()]
    if missing:
        raise FileNotFoundError(f"landing files no longer in the landing directory: {missing}")
    mode = "landing" if landing else "full"
    config = {"mode": mode, "profile": profile.name, "ingest": profile.ingest.model_dump()}
    artifact = None
    if not landing:  # a full build is named by what it reads: the same files make the same artifact
        sources, demo_dir = _full_sources(profile, home)
        identity = stages.data_identity("raw_corpus", RAW_CODE, {
            "ingest": profile.ingest.model_dump(mode="json"), "sources": [s.model_dump() for s in sources],
            "files": [stages.files_fingerprint(source_files(s)) for s in sources if s.path]})
        artifact = _reuse("raw_corpus", identity, home, context)
    if artifact is None:
        with staged_artifact("raw_corpus", home=home, config=config, version=None if landing else CONTENT) as st:
            if landing:  # a landing batch is an event: its version is its time
                sources, demo_dir = landing_sources(landing, st.version), None
            st.config["sources"] = [s.model_dump() for s in sources]
            # streamed to records.parquet a batch at a time: memory does not grow with the sources
            st.metrics.update(ingest_to(sources, st.path, max_record_bytes=profile.ingest.max_record_bytes,
                                        batch_records=profile.data_engine.batch_records,
                                        workers=profile.data_engine.workers, log=context.log.info))
            if demo_dir is not None:  # the held-out tasks and ground truth travel with the corpus they belong to
                for name in (HELDOUT, GROUND_TRUTH):
                    shutil.copy2(demo_dir / name, st.path / name)
        artifact = load_artifact(st.path)
        if not landing:
            remember("raw_corpus", identity, artifact.version, home)
    moved = {}
    if landing:  # only now, with the records published, do the files leave the landing directory
        moved = archive(landing, profile.resolve_path(profile.landing.dir), artifact.version)
        context.log.info(f"archived landed files: {moved}")

    with duckdb.get_connection() as conn:
        totals = stats.record_raw_corpus(conn, artifact, run_id=context.run_id, profile=profile.name, mode=mode)
        per_source = stats.source_rows(conn, "raw_corpus", artifact.version)
        reasons = stats.quarantine_reasons(conn, artifact.version)
    formats = {name: c.get("format") for name, c in artifact.manifest["metrics"]["per_source"].items()}
    metadata: dict[str, Any] = {
        "path": str(artifact.path), "version": artifact.version, "mode": mode,
        "dagster/row_count": totals["records_kept"], "dagster/column_schema": _columns(RECORD_SCHEMA),
        "records_read": totals["records_read"], "records_kept": totals["records_kept"],
        "quarantined": totals["quarantined"], "quarantine_rate": _rate(totals["quarantined"], totals["records_read"]),
        "sources": markdown_table([{"source": r["source"], "format": formats.get(r["source"]),
                                    "read": r["records_read"], "kept": r["records_kept"],
                                    "quarantined": r["quarantined"], "median chars": r["length_p50"]}
                                   for r in per_source]),
        "quarantine_reasons": markdown_table(reasons, ["source", "reason", "records", "example"]),
        "bytes_on_disk": artifact.manifest["bytes"],
    }
    if moved:
        metadata["landing_files"] = dg.MetadataValue.json(moved)
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(artifact.version))


# The code that decides what each data artifact holds (part of its identity).
RAW_CODE = ("refinery.ingest", "refinery.demo_data")
DEDUPED_CODE = ("refinery.curate", "refinery.datastage")


def _reuse(name: str, identity: str, home: Path, context) -> Artifact | None:
    """The finished, intact artifact these inputs, settings and code made before, or None (a
    damaged one is set aside). Data artifacts are named by their content (artifacts.CONTENT): making
    them again from changed inputs that give the same data gives the same version, and nothing
    downstream is recomputed."""
    from refinery.runner import set_aside

    art = recall(name, identity, home)
    if art is None:
        return None
    damaged = art.verify()
    if damaged:
        context.log.warning(f"{name} {art.version}: {damaged[:3]} changed since it was made; moved to "
                            f"{set_aside(art)}, making it again")
        return None
    context.log.info(f"{name} {art.version}: made before from the same inputs, settings and code; reused")
    return art


def _raw(context, refinery: RefineryResource) -> Artifact:
    return upstream_artifact(context, "raw_corpus", refinery.home_path())


@dg.asset_check(asset=raw_corpus, name="schema_valid", blocking=True,
                description="records.parquet and quarantine.parquet have the project's schemas; every record has an id.")
def raw_corpus_schema_valid(context: dg.AssetCheckExecutionContext, refinery: RefineryResource) -> dg.AssetCheckResult:
    """records.parquet and quarantine.parquet match RECORD_SCHEMA and QUARANTINE_SCHEMA; no record lacks an id."""
    art = _raw(context, refinery)
    problems = _schema_problems(art, {"records.parquet": RECORD_SCHEMA, "quarantine.parquet": QUARANTINE_SCHEMA})
    missing_ids = pq.read_table(art.path / "records.parquet", columns=["id"]).column("id").null_count
    if missing_ids:
        problems.append(f"records.parquet: {missing_ids} records without an id")
    return dg.AssetCheckResult(passed=not problems, metadata={
        "problems": "; ".join(problems) or "none", "version": art.version})


@dg.asset_check(asset=raw_corpus, name="counts_reconcile", blocking=True,
                description="Per source, the records ingest read equal the rows kept plus the rows quarantined.")
def raw_corpus_counts_reconcile(context: dg.AssetCheckExecutionContext, refinery: RefineryResource,
                                duckdb: DuckDBResource) -> dg.AssetCheckResult:
    """read (as counted by ingest) == kept + quarantined (rows in the Parquet files), for every source."""
    art = _raw(context, refinery)
    with duckdb.get_connection() as conn:
        rows = stats.source_rows(conn, "raw_corpus", art.version)
    return _reconciliation(rows, ["records_kept", "quarantined"])


def _reconciliation(rows: list[dict[str, Any]], parts: list[str]) -> dg.AssetCheckResult:
    """Passed when every source's records_read equals the sum of its ``parts`` (and there is a source)."""
    accounted = [sum(r[p] or 0 for p in parts) for r in rows]
    off = [r for r, n in zip(rows, accounted) if r["records_read"] != n]
    return dg.AssetCheckResult(passed=bool(rows) and not off, metadata={
        "sources": len(rows), "records_read": sum(r["records_read"] or 0 for r in rows),
        "accounted_for": sum(accounted), "accounted_as": " + ".join(parts),
        "sources_not_reconciling": markdown_table([{k: r[k] for k in ["source", "records_read", *parts]} for r in off])})


def _schema_problems(art: Artifact, expected: dict[str, pa.Schema]) -> list[str]:
    problems = []
    for name, schema in expected.items():
        path = art.path / name
        if not path.exists():
            problems.append(f"{name} missing")
            continue
        actual = pq.read_schema(path)
        if [(f.name, f.type) for f in actual] != [(f.name, f.type) for f in schema]:
            problems.append(f"{name}: columns {[f'{f.name}:{f.type}' for f in actual]}, expected "
                            f"{[f'{f.name}:{f.type}' for f in schema]}")
    return problems


# --------------------------------------------------------------------------- deduped_corpus


def _heldout_path(raw: Artifact, existing: Artifact | None) -> Path | None:
    """The demo held-out tasks: in the raw corpus, else the ones the existing corpus was checked against."""
    if (raw.path / HELDOUT).exists():
        return raw.path / HELDOUT
    previous = existing.manifest["config"].get("heldout_path") if existing else None
    return Path(previous) if previous and Path(previous).exists() else None


def _latest_deduped(context: dg.AssetExecutionContext, home: Path) -> Artifact | None:
    try:
        return upstream_artifact(context, "deduped_corpus", home)
    except FileNotFoundError:
        return None


@dg.asset(group_name=CURATION, deps=[raw_corpus], kinds={"parquet", "duckdb", "fasttext"},
          description="raw_corpus without non-English records (fastText lid.176), records that overlap an "
                      "evaluation set (13-gram decontamination), exact duplicates and MinHash-LSH near duplicates; "
                      "every removed record kept in rejected.parquet with its reason. A landing run deduplicates "
                      "the new records against the existing corpus and publishes the union.")
def deduped_corpus(context: dg.AssetExecutionContext, refinery: RefineryResource,
                   duckdb: DuckDBResource) -> dg.MaterializeResult:
    from refinery.curate import curate, write_deduped_corpus
    from refinery.datastage import curate_to
    from refinery.decontam import eval_texts_for, find_contaminated
    from refinery.landing import merge_curated

    profile, home = refinery.load_profile(), refinery.home_path()
    raw = upstream_artifact(context, "raw_corpus", home)
    mode = raw.manifest["config"].get("mode", "full")
    existing = _latest_deduped(context, home) if mode == "landing" else None
    heldout = _heldout_path(raw, existing)
    eval_texts = eval_texts_for(profile, heldout)
    inputs = {"raw_corpus": raw.ref(), **({"existing": existing.ref()} if existing else {})}
    config = {"mode": mode, "profile": profile.name, "langid": profile.langid.model_dump(),
              "dedup": profile.dedup.model_dump(), "decontam": profile.decontam.model_dump(),
              "data_engine": profile.data_engine.model_dump(), "eval_sets": sorted(eval_texts),
              "heldout_path": str(heldout) if heldout else None}
    # named by its input, its settings and the evaluation texts it decontaminates against (not where
    # it runs: data_engine changes the speed, not the kept set)
    identity = stages.data_identity("deduped_corpus", DEDUPED_CODE, {
        "inputs": {k: v["version"] for k, v in inputs.items()},
        **{k: profile.model_dump(mode="json")[k] for k in ("langid", "dedup", "decontam")},
        "eval_texts": hashlib.sha256(json.dumps(eval_texts, sort_keys=True, default=str).encode()).hexdigest()})
    artifact = _reuse("deduped_corpus", identity, home, context)
    if artifact is None:
        with staged_artifact("deduped_corpus", home=home, inputs=inputs, config=config, version=CONTENT) as st:
            if existing is None:  # a full build streams, here or on Ray (profile.data_engine)
                st.metrics.update(curate_to(raw.path / "records.parquet", st.path, profile, eval_texts,
                                            log=context.log.info))
            else:  # a landing batch is small: curated in memory against the existing index, then merged
                records = pq.read_table(raw.path / "records.parquet")
                contaminated = find_contaminated(records, eval_texts, profile.decontam.ngram)
                context.log.info(f"decontamination: {len(contaminated)} records share a "
                                 f"{profile.decontam.ngram}-gram with {sorted(eval_texts)}")
                result = merge_curated(existing.path, curate(records, profile, existing=existing.path,
                                                             contaminated=contaminated, log=context.log.info))
                st.metrics.update(write_deduped_corpus(result, st.path))
        artifact = load_artifact(st.path)
        remember("deduped_corpus", identity, artifact.version, home)

    with duckdb.get_connection() as conn:
        # what curation was given, counted from the input files, not from curation's own tally
        read = stats.count_by_source(conn, raw.path / "records.parquet")
        if existing is not None:
            for name in ("kept.parquet", "rejected.parquet"):
                for source, n in stats.count_by_source(conn, existing.path / name).items():
                    read[source] = read.get(source, 0) + n
        totals = stats.record_deduped_corpus(conn, artifact, records_read=read, english_label=profile.langid.english_label,
                                             run_id=context.run_id, profile=profile.name, mode=mode,
                                             input_version=raw.version)
        per_source = stats.source_rows(conn, "deduped_corpus", artifact.version)
        languages = stats.top_languages(conn, artifact.version)
        examples = stats.cluster_examples(conn, artifact)
    read_total = totals["records_read"]
    metadata: dict[str, Any] = {
        "path": str(artifact.path), "version": artifact.version, "mode": mode, "input.raw_corpus": raw.version,
        "dagster/row_count": totals["records_kept"], "dagster/column_schema": _columns(KEPT_SCHEMA),
        "records_read": read_total, "records_kept": totals["records_kept"],
        "non_english": totals["non_english"], "contaminated": totals["contaminated"],
        "exact_duplicates": totals["exact_duplicates"], "near_duplicates": totals["near_duplicates"],
        "non_english_rate": _rate(totals["non_english"], read_total),
        "exact_duplicate_rate": _rate(totals["exact_duplicates"], read_total),
        "near_duplicate_rate": _rate(totals["near_duplicates"], read_total),
        "removed_rate": _rate(read_total - totals["records_kept"], read_total),
        "english_share": totals["english_share"], "kept_english_share": totals["kept_english_share"],
        "length_p50": totals["length_p50"], "length_p90": totals["length_p90"], "length_p99": totals["length_p99"],
        "top_languages": markdown_table(languages, ["lang", "records", "kept", "share"]),
        "duplicate_examples": markdown_table(examples),
        "sources": markdown_table([{"source": r["source"], "read": r["records_read"], "kept": r["records_kept"],
                                    "non-English": r["non_english"], "exact dup": r["exact_duplicates"],
                                    "near dup": r["near_duplicates"], "contaminated": r["contaminated"],
                                    "English share": _percent(r["english_share"])} for r in per_source]),
        "bytes_on_disk": artifact.manifest["bytes"],
    }
    if existing is not None:
        metadata["input.existing"] = existing.version
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(artifact.version))


def _deduped(context, refinery: RefineryResource) -> Artifact:
    return upstream_artifact(context, "deduped_corpus", refinery.home_path())


@dg.asset_check(asset=deduped_corpus, name="english_share", blocking=True,
                description="Share of kept records whose most likely language is English >= langid.min_english_share.")
def deduped_corpus_english_share(context: dg.AssetCheckExecutionContext, refinery: RefineryResource,
                                 duckdb: DuckDBResource) -> dg.AssetCheckResult:
    """The kept corpus is English: share of records whose top fastText label is English >= the profile's bar."""
    profile, art = refinery.load_profile(), _deduped(context, refinery)
    with duckdb.get_connection() as conn:
        row = stats.materialization(conn, "deduped_corpus", art.version)
    share = row["kept_english_share"] if row else None
    bar = profile.langid.min_english_share
    return dg.AssetCheckResult(passed=share is not None and share >= bar, metadata={
        "kept_english_share": share, "min_english_share": bar, "langid_min_score": profile.langid.min_score,
        "records_kept": row["records_kept"] if row else None, "version": art.version})


@dg.asset_check(asset=deduped_corpus, name="no_exact_duplicates", blocking=True,
                description="No two kept records have the same normalized dedup key (curation's exact rule).")
def deduped_corpus_no_exact_duplicates(context: dg.AssetCheckExecutionContext,
                                       refinery: RefineryResource) -> dg.AssetCheckResult:
    """No kept record repeats another's normalized dedup key."""
    from refinery.verify import exact_duplicates

    profile, art = refinery.load_profile(), _deduped(context, refinery)
    table = pq.read_table(art.path / "kept.parquet", columns=["id", "messages"])
    found, examples = exact_duplicates(table.column("id").to_pylist(), table.column("messages").to_pylist(),
                                       profile.dedup.key)
    return dg.AssetCheckResult(passed=found == 0, metadata={
        "exact_duplicates": found, "max_allowed": 0, "records_checked": table.num_rows,
        "dedup_key": profile.dedup.key, "examples": markdown_table(examples)})


@dg.asset_check(asset=deduped_corpus, name="schema_valid", blocking=True,
                description="kept/rejected/clusters files have the project's schemas, kept ids are unique, every "
                            "rejection has a known reason and every duplicate points at a kept record.")
def deduped_corpus_schema_valid(context: dg.AssetCheckExecutionContext,
                                refinery: RefineryResource) -> dg.AssetCheckResult:
    """Schemas match, kept ids are unique, reasons are known, duplicates point at kept records."""
    from refinery.stats import REJECTION_COLUMNS

    art = _deduped(context, refinery)
    problems = _schema_problems(art, {"kept.parquet": KEPT_SCHEMA, "rejected.parquet": REJECTED_SCHEMA,
                                      "clusters.parquet": CLUSTER_SCHEMA})
    if not problems:
        kept_ids = pq.read_table(art.path / "kept.parquet", columns=["id"]).column("id").to_pylist()
        rejected = pq.read_table(art.path / "rejected.parquet", columns=["reason", "duplicate_of"]).to_pylist()
        if len(set(kept_ids)) != len(kept_ids):
            problems.append(f"kept.parquet: {len(kept_ids) - len(set(kept_ids))} repeated ids")
        unknown = sorted({r["reason"] for r in rejected} - set(REJECTION_COLUMNS))
        if unknown:
            problems.append(f"rejected.parquet: unknown reasons {unknown}")
        kept_set = set(kept_ids)
        dangling = [r["duplicate_of"] for r in rejected
                    if r["reason"] in ("exact_duplicate", "near_duplicate") and r["duplicate_of"] not in kept_set]
        if dangling:
            problems.append(f"rejected.parquet: {len(dangling)} duplicates point at no kept record, e.g. {dangling[:3]}")
    return dg.AssetCheckResult(passed=not problems, metadata={
        "problems": "; ".join(problems) or "none", "version": art.version})


@dg.asset_check(asset=deduped_corpus, name="counts_reconcile", blocking=True,
                description="Per source, the records curation was given equal the records kept plus every rejection.")
def deduped_corpus_counts_reconcile(context: dg.AssetCheckExecutionContext, refinery: RefineryResource,
                                    duckdb: DuckDBResource) -> dg.AssetCheckResult:
    """read (rows of the input files) == kept + non-English + contaminated + exact + near, for every source."""
    art = _deduped(context, refinery)
    with duckdb.get_connection() as conn:
        rows = stats.source_rows(conn, "deduped_corpus", art.version)
    return _reconciliation(rows, ["records_kept", "non_english", "contaminated", "exact_duplicates", "near_duplicates"])


# --------------------------------------------------------------------------- verified_corpus


@dg.asset(group_name=VERIFICATION, deps=[deduped_corpus], kinds={"duckdb", "fasttext"},
          description="The scheduled re-verification of deduped_corpus: a fixed-seed sample of verify.sample_size "
                      "kept records is classified and deduplicated again, the manifest checksums re-checked, and "
                      "the result stored in DuckDB (table verifications) next to its drift from the previous one.")
def verified_corpus(context: dg.AssetExecutionContext, refinery: RefineryResource,
                    duckdb: DuckDBResource) -> dg.MaterializeResult:
    from refinery.verify import verify_corpus

    profile = refinery.load_profile()
    corpus = _deduped(context, refinery)
    with duckdb.get_connection() as conn:
        previous = stats.last_verification(conn)
        result = verify_corpus(corpus, profile, previous=previous)
        stats.record_verification(conn, result.row(run_id=context.run_id, profile=profile.name))
    context.log.info(f"verification {result.verification_id} of {corpus.version}: English {result.english_share:.4f}, "
                     f"exact dup {result.exact_dup_rate:.4f}, near dup {result.near_dup_rate:.4f}, passed {result.passed}")
    return dg.MaterializeResult(data_version=dg.DataVersion(result.verification_id), metadata={
        "verification_id": result.verification_id, "deduped_corpus": corpus.version,
        "sample_size": result.sample_size, "corpus_records": result.corpus_records,
        "english_share": result.english_share, "exact_dup_rate": result.exact_dup_rate,
        "near_dup_rate": result.near_dup_rate, "previous_verification": result.previous_id or "none (baseline)",
        "passed": result.passed})


@dg.asset_check(asset=verified_corpus, name="within_drift",
                description="English share and duplicate rates moved no more than verify.max_*_drift since the "
                            "previous verification.")
def verified_corpus_within_drift(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    """The last verification is within the drift thresholds of the one before it."""
    from refinery.verify import drift_failures

    with duckdb.get_connection() as conn:
        v = stats.last_verification(conn)
    if v is None:
        return dg.AssetCheckResult(passed=False, metadata={"problem": "no verification recorded"})
    failures = drift_failures(v)
    return dg.AssetCheckResult(passed=not failures, metadata={
        "verification_id": v["verification_id"], "compared_with": v["previous_id"] or "none (baseline)",
        "english_share": v["english_share"], "english_drift": v["english_drift"],
        "max_english_drift": v["max_english_drift"],
        "exact_dup_rate": v["exact_dup_rate"], "exact_dup_drift": v["exact_dup_drift"],
        "near_dup_rate": v["near_dup_rate"], "near_dup_drift": v["near_dup_drift"],
        "max_duplicate_drift": v["max_duplicate_drift"], "failures": "; ".join(failures) or "none"})


@dg.asset_check(asset=verified_corpus, name="integrity",
                description="Every file of the verified deduped_corpus still matches the SHA-256 in its manifest.")
def verified_corpus_integrity(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    """The sampled deduped_corpus files are the bytes that were published."""
    with duckdb.get_connection() as conn:
        v = stats.last_verification(conn)
    if v is None:
        return dg.AssetCheckResult(passed=False, metadata={"problem": "no verification recorded"})
    return dg.AssetCheckResult(passed=not v["integrity_failures"], metadata={
        "verification_id": v["verification_id"], "deduped_corpus": v["artifact_version"],
        "changed_files": v["integrity_failures"] or "none"})
