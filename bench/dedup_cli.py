"""Whole-process near dedup vs the naive datasketch reference and the libraries a user would pick; prints JSON.

    python bench/dedup_cli.py [--corpus prose|templated|both] [--records 60000] [--naive-sample 3000]
                              [--repeat 3] [--no-truth] [--libraries rensa,datatrove,text-dedup]
                              [--text-dedup-python PATH]

For each corpus (bench/dedup_corpora.py: ``prose``, 600-1,500 characters of English prose with 15%
planted copies that have 1% of their words changed; ``templated``, short records sharing long
preambles, whose LSH buckets hold hundreds of records) the records are written as JSON lines and:

- ``refinery``: ``python -m refinery.dedup IN.jsonl --out OUT.parquet`` as its own process, timed
  from start to exit (interpreter start, reading, normalizing, dedup, writing);
- ``naive``: datasketch ``MinHash.update`` per word 5-gram + ``MinHashLSH`` query/insert, the loop
  most scripts use, on the first ``--naive-sample`` normalized records (hashing and LSH only:
  reading and writing are not counted, which favours it); it removes a record whenever an LSH
  candidate exists, verified or not;
- ``naive_verified``: the same loop, exact: candidates verified by the Jaccard of Python sets of
  character 5-grams (what refinery decides), once, on the same sample;
- ``rensa``: rensa's ``RMinHash`` over word 5-grams + ``RMinHashLSH`` (reading the JSON lines
  included); ``datatrove``: its four MinHash stages (signatures, buckets, clusters, filter) with the
  local executor; ``text-dedup``: its MinHash script, when a Python with text-dedup is given
  (it pins packages the project's environment cannot take, so it lives in its own venv).

Quality is against the corpus's ground truth: recall and precision of the removed set, and per
duplicate group (an original and its copies) whether exactly one member stayed ("lost": none did;
"missed": more than one did). The speed ratio is records/s of the whole refinery process over the
naive loop's records/s in the same run: the median of ``--repeat`` runs of each, taken in turns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dedup_corpora import greedy_truth, prose_corpus, templated_corpus, write_jsonl  # noqa: E402
from refinery.config import DedupConfig  # noqa: E402
from refinery.dedup import lsh_params, normalize_many  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build(kind: str, records: int, seed: int, truth: bool = True) -> tuple[list[tuple[str, str]], dict | None]:
    """(records, truth: id -> the id it duplicates, None when it should stay; None if not ``truth``)."""
    if kind == "prose":
        recs, planted = prose_corpus(records, seed)
        return recs, {rid: planted.get(rid) for rid, _ in recs}
    per_family = 300
    recs, group = templated_corpus(families=max(1, round(records / per_family / 1.1)), per_family=per_family, seed=seed)
    return recs, greedy_truth(recs, group, DedupConfig().threshold) if truth else None


def quality(truth: dict[str, str | None], removed: set[str]) -> dict:
    should = {rid for rid, of in truth.items() if of is not None}
    hit = len(should & removed)
    # groups: each record belongs to the group of the record it (transitively) duplicates
    root = {}
    for rid in truth:
        r = rid
        while truth.get(r) is not None:
            r = truth[r]
        root[rid] = r
    members: dict[str, list[str]] = {}
    for rid, r in root.items():
        members.setdefault(r, []).append(rid)
    groups = [m for m in members.values() if len(m) > 1]
    stayed = [sum(x not in removed for x in m) for m in groups]
    return {"should_remove": len(should), "removed": len(removed), "recall": round(hit / max(len(should), 1), 5),
            "precision": round(hit / max(len(removed), 1), 5), "duplicate_groups": len(groups),
            "groups_lost": sum(s == 0 for s in stayed), "groups_missed": sum(s > 1 for s in stayed)}


# A small process starts the CLI, times it and reads its peak memory: ru_maxrss survives exec, so
# the CLI started from this (big) process would report this process's size at the fork (a process
# that only says "pass" reported 813 MB under an 800 MB parent).
_LAUNCHER = """import resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - t
sys.stdout.write(proc.stdout)
sys.stderr.write(proc.stderr + f"\\n{seconds} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n")
sys.exit(proc.returncode)"""


def run_refinery(path: Path, out: Path) -> dict:
    # numba compiles the kernels once per checkout (cached next to them): not part of a run
    warm = path.with_name("warm.jsonl")
    warm.write_text(path.read_text(encoding="utf-8").split("\n", 200)[0] + "\n", encoding="utf-8")
    subprocess.run([sys.executable, "-m", "refinery.dedup", str(warm)], capture_output=True, cwd=ROOT, check=True)
    warm.unlink()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, "-m", "refinery.dedup", str(path),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"refinery.dedup failed:\n{proc.stderr}")
    seconds, peak_kib = proc.stderr.rsplit("\n", 2)[-2].split()
    import pyarrow.parquet as pq

    table = pq.read_table(out, columns=["id", "status"])
    removed = {i for i, s in zip(table["id"].to_pylist(), table["status"].to_pylist()) if s != "kept"}
    summary = json.loads(proc.stdout)
    return {"seconds": round(float(seconds), 3), "inner_seconds": summary["seconds"],
            "peak_rss_bytes": int(peak_kib) * 1024,
            "candidate_pairs": summary["candidate_pairs"], "verified_pairs": summary["verified_pairs"],
            "_removed": removed}


def word_grams(text: str, n: int = 5) -> set[str]:
    w = text.split(" ")
    return {" ".join(w[k:k + n]) for k in range(len(w) - n + 1)} or {text}


def run_naive(texts: list[str], cfg: DedupConfig, *, verify: bool = False) -> dict:
    """datasketch the way most scripts use it: MinHash.update per word 5-gram, MinHashLSH query +
    insert; a record goes whenever a candidate exists. ``verify``: the loop made exact, as a user who
    wants the right answer writes it: candidates (kept records only) verified by the Jaccard of
    Python sets of character n-grams (refinery's shingles)."""
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=lsh_params(cfg.threshold, cfg.num_perm, cfg.false_negative_weight))
    kept: dict[str, set[str]] = {}
    removed = 0
    for i, t in enumerate(texts):
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        for g in word_grams(t):
            m.update(g.encode("utf-8"))
        if verify:
            grams = {t[k:k + cfg.ngram] for k in range(max(len(t) - cfg.ngram + 1, 1))}
            dup = any(len(grams & kept[c]) >= cfg.threshold * len(grams | kept[c]) for c in lsh.query(m))
        else:
            dup = bool(lsh.query(m))
        if dup:
            removed += 1
            continue
        lsh.insert(str(i), m)
        if verify:
            kept[str(i)] = grams
    seconds = time.perf_counter() - t0
    return {"records": len(texts), "seconds": round(seconds, 3), "records_per_second": round(len(texts) / seconds, 1),
            "removed": removed}


def run_rensa(path: Path, cfg: DedupConfig) -> dict:
    from rensa import RMinHash, RMinHashLSH

    t0 = time.perf_counter()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    texts = normalize_many([r["text"] for r in rows])
    bands, _ = lsh_params(cfg.threshold, cfg.num_perm, cfg.false_negative_weight)
    lsh = RMinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, num_bands=bands)
    removed = set()
    kept: dict[int, RMinHash] = {}
    for i, (row, t) in enumerate(zip(rows, texts)):
        m = RMinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update(list(word_grams(t)))
        # rensa's LSH gives candidates; its own estimate decides, as rensa's examples do
        if any(m.jaccard(kept[c]) >= cfg.threshold for c in lsh.query(m)):
            removed.add(row["id"])
        else:
            lsh.insert(i, m)
            kept[i] = m
    return {"seconds": round(time.perf_counter() - t0, 3), "shingles": "word 5-grams", "_removed": removed}


def run_datatrove(path: Path, work: Path) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    t0 = time.perf_counter()
    config = MinhashConfig()  # its defaults: word 5-grams, 14 buckets x 8 hashes (threshold ~0.72)
    reader = JsonlReader(str(path.parent), glob_pattern=path.name)
    steps = [
        [reader, MinhashDedupSignature(output_folder=str(work / "sigs"), config=config)],
        [MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=config)],
        [MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "ids"), config=config)],
        [reader, MinhashDedupFilter(input_folder=str(work / "ids"),
                                    exclusion_writer=JsonlWriter(str(work / "removed"), compression=None))],
    ]
    for i, pipeline in enumerate(steps):
        LocalPipelineExecutor(pipeline=pipeline, tasks=1, workers=1, logging_dir=str(work / f"logs{i}")).run()
    seconds = time.perf_counter() - t0
    removed = {json.loads(line)["id"] for f in (work / "removed").glob("*.jsonl")
               for line in f.read_text(encoding="utf-8").splitlines() if line.strip()}
    return {"seconds": round(seconds, 3), "shingles": "word 5-grams, 14x8 bands (datatrove defaults)",
            "_removed": removed}


def run_text_dedup(python: str, path: Path, work: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([python, "-m", "text_dedup.minhash", "--path", "json", "--data_files", str(path),
                           "--split", "train", "--cache_dir", str(work / "cache"), "--output", str(work / "out"),
                           "--column", "text", "--ngram", "5", "--threshold", "0.8", "--num_perm", "128",
                           "--local"], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        return {"error": proc.stderr[-600:]}
    from datasets import load_from_disk

    kept = set(load_from_disk(str(work / "out"))["id"])
    ids = [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]
    return {"seconds": round(seconds, 3), "_removed": set(ids) - kept}


def _median_run(runs: list[dict]) -> dict:
    """The run with the median time, with every run's seconds beside it."""
    run = dict(sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2])
    if len(runs) > 1:
        run["all_seconds"] = [r["seconds"] for r in runs]
    return run


def run_corpus(kind: str, args) -> dict:
    cfg = DedupConfig()
    t0 = time.perf_counter()
    recs, truth = build(kind, args.records, args.seed, truth=not args.no_truth)
    out: dict = {"records": len(recs), "build_seconds": round(time.perf_counter() - t0, 1),
                 "mean_chars": round(sum(len(t) for _, t in recs) / len(recs), 1)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()  # datatrove reads a folder
        path = write_jsonl(recs, tmp / "in" / "corpus.jsonl")
        out["loadavg_before"] = os.getloadavg()
        # refinery and the naive loop in turns, ``--repeat`` times each: the median of each is the
        # figure (this machine's speed drifts by 10-20 % within minutes, for both alike)
        sample = normalize_many([t for _, t in recs[:args.naive_sample]])
        runs = []
        for _ in range(args.repeat):
            runs.append((run_refinery(path, tmp / "out.parquet"), run_naive(sample, cfg)))
        results = {"refinery": _median_run([r for r, _ in runs]), "naive": _median_run([n for _, n in runs]),
                   "naive_verified": run_naive(sample, cfg, verify=True)}
        for lib in [x for x in args.libraries.split(",") if x]:
            try:
                if lib == "rensa":
                    results[lib] = run_rensa(path, cfg)
                elif lib == "datatrove":
                    results[lib] = run_datatrove(path, tmp / "datatrove")
                elif lib == "text-dedup" and args.text_dedup_python:
                    results[lib] = run_text_dedup(args.text_dedup_python, path, tmp / "text_dedup")
            except Exception as exc:  # a library that fails is reported, not fatal to the comparison
                results[lib] = {"error": f"{type(exc).__name__}: {exc}"}
        out["loadavg_after"] = os.getloadavg()
    naive_rate = results["naive"]["records_per_second"]
    verified_rate = results["naive_verified"]["records_per_second"]
    for name, r in results.items():
        if "_removed" in r:
            removed = r.pop("_removed")
            r.update(quality(truth, removed) if truth is not None else {"removed": len(removed)})
        if "seconds" in r and not name.startswith("naive"):
            r["records_per_second"] = round(len(recs) / r["seconds"], 1)
            r["speed_vs_naive"] = round(r["records_per_second"] / naive_rate, 1)
            r["speed_vs_naive_verified"] = round(r["records_per_second"] / verified_rate, 1)
    out["results"] = results
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", choices=["prose", "templated", "both"], default="both")
    ap.add_argument("--records", type=int, default=60_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--naive-sample", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of refinery and of the naive loop, in turns")
    ap.add_argument("--no-truth", action="store_true",
                    help="skip the ground truth (templated: 14 minutes of all-pairs Jaccard): speed and counts only")
    ap.add_argument("--libraries", default="rensa,datatrove,text-dedup")
    ap.add_argument("--text-dedup-python", help="a Python with text-dedup installed (its own venv)")
    args = ap.parse_args(argv)
    kinds = ["prose", "templated"] if args.corpus == "both" else [args.corpus]
    json.dump({k: run_corpus(k, args) for k in kinds}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
