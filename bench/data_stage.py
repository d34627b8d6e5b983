"""Benchmark of the deduped_corpus stage (language ID + exact + near dedup); prints JSON.

    python bench/data_stage.py [--records 640000] [--profile demo] [--naive-sample 2000]
    python bench/data_stage.py --langid-grid      # the measurement behind langid.text / max_chars
    python bench/data_stage.py --shingle-grid     # the measurement behind dedup.shingle / ngram

The corpus is built from the shared data directory (REFINERY_SHARED_DATA, default ../shared/data):
English prompts and answer paragraphs (Alpaca-GPT4, LIMA, GSM8K, WizardLM, user-oriented
instructions) are recombined into distinct records (a prompt + 2-4 paragraphs); 3% are Chinese
(Alpaca-zh, BELLE, OASST-zh); then planted duplicates are appended: exact copies up to case,
whitespace and punctuation, and near copies with 1-5% of their words replaced, deleted or inserted.
Ground truth: a planted near copy should be removed when the exact Jaccard of its shingles with its
original is >= the threshold. Precision is checked independently with Python sets of the real
n-gram strings on removed pairs. The naive reference (datasketch MinHash.update per shingle +
MinHashLSH) runs on a sample in the same process, for the speed ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refinery.config import DedupConfig, LangIdConfig, load_profile, resolve_path  # noqa: E402
from refinery.curate import curate  # noqa: E402
from refinery.dedup import ShingleHasher, exact_jaccard, find_duplicates, normalize_many  # noqa: E402
from refinery.langid import LanguageIdentifier, langid_text  # noqa: E402
from refinery.records import MESSAGE_TYPE, RECORD_SCHEMA  # noqa: E402

DATA = resolve_path("${REFINERY_SHARED_DATA:-../shared/data}")


def _json(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def english_pairs() -> list[tuple[str, str]]:
    """(prompt, answer) pairs of English instruction data."""
    out = []
    for r in _json(DATA / "llamafactory_demo/alpaca_en_demo.json") + _json(DATA / "llamafactory_hist/lima.json"):
        out.append(((r["instruction"] + "\n" + r.get("input", "")).strip(), r["output"]))
    out += [(r["question"], r["answer"]) for r in _jsonl(DATA / "gsm8k/train.jsonl")]
    out += [(r["instruction"], "") for r in _jsonl(DATA / "gpt4llm_eval/user_oriented_instructions.jsonl")]
    out += [(r["Instruction"], "") for r in _jsonl(DATA / "wizardlm_testset/WizardLM_testset.jsonl")]
    return out


def chinese_pairs() -> list[tuple[str, str]]:
    out = [((r["instruction"] + "\n" + r.get("input", "")).strip(), r["output"])
           for r in _json(DATA / "llamafactory_demo/alpaca_zh_demo.json") + _json(DATA / "llamafactory_hist/oaast_sft_zh.json")]
    out += [(r["question"], r["std_answer"]) for r in _jsonl(DATA / "belle_zh/eval_set.json")]
    return out


def mutate(text: str, fraction: float, rng: random.Random) -> str:
    """Replace, delete or insert about ``fraction`` of the words (tests/test_dedup.py plants with it too)."""
    words = text.split(" ")
    for _ in range(max(1, round(len(words) * fraction))):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.5:
            words[i] = rng.choice(["alpha", "beta", "gamma", "delta", "omega"])
        elif op < 0.75 and len(words) > 2:
            del words[i]
        else:
            words.insert(i, rng.choice(["very", "really", "quite", "also"]))
    return " ".join(words)


def build_corpus(n: int, seed: int = 0, chinese: float = 0.03, exact: float = 0.03, near: float = 0.07):
    """(table, truth): truth maps planted row -> (original row, kind)."""
    rng = random.Random(seed)
    en, zh = english_pairs(), chinese_pairs()
    en_prompts = [p for p, _ in en]
    en_paras = [x.strip() for _, a in en for x in a.split("\n") if len(x.strip()) > 40]
    zh_prompts = [p for p, _ in zh]
    zh_paras = [x.strip() for _, a in zh for x in a.split("\n") if len(x.strip()) > 15]
    n_planted_exact, n_planted_near = int(n * exact), int(n * near)
    n_base = n - n_planted_exact - n_planted_near
    users, answers, is_zh = [], [], []
    for _ in range(n_base):
        z = rng.random() < chinese
        prompts, paras = (zh_prompts, zh_paras) if z else (en_prompts, en_paras)
        users.append(rng.choice(prompts))
        answers.append("\n".join(rng.sample(paras, rng.randint(2, 4))))
        is_zh.append(z)
    truth = {}
    english_rows = [i for i in range(n_base) if not is_zh[i]]
    originals = rng.sample(english_rows, n_planted_exact + n_planted_near)
    for k, orig in enumerate(originals):
        row = len(users)
        if k < n_planted_exact:
            users.append(users[orig].upper() + "  ")
            answers.append(answers[orig].replace(". ", " .  ").replace(",", ""))
            truth[row] = (orig, "exact")
        else:
            frac = rng.uniform(0.01, 0.05)
            users.append(users[orig])
            answers.append(mutate(answers[orig], frac, rng))
            truth[row] = (orig, "near")
        is_zh.append(False)
    # planted rows go anywhere after their original, as a real stream would have them
    order = list(range(len(users)))
    rng.shuffle(order)
    pos = {row: p for p, row in enumerate(order)}
    for row, (orig, _) in truth.items():
        if pos[row] < pos[orig]:
            pos[row], pos[orig] = pos[orig], pos[row]
    inv = sorted(range(len(users)), key=pos.__getitem__)
    new_index = {row: p for p, row in enumerate(inv)}
    truth = {new_index[r]: (new_index[o], kind) for r, (o, kind) in truth.items()}
    users = [users[i] for i in inv]
    answers = [answers[i] for i in inv]
    is_zh = [is_zh[i] for i in inv]
    messages = [[{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in zip(users, answers)]
    table = pa.table({
        "id": pa.array([f"r{i:07d}" for i in range(len(users))]),
        "source": pa.array(["zh_mix" if z else "en_mix" for z in is_zh]),
        "format": pa.array(["bench"] * len(users)),
        "source_file": pa.array(["bench"] * len(users)),
        "source_line": pa.array(np.arange(1, len(users) + 1)),
        "license": pa.array(["mixed"] * len(users)),
        "messages": pa.array(messages, MESSAGE_TYPE),
        "original": pa.array([""] * len(users)),
    }, schema=RECORD_SCHEMA)
    return table, truth, is_zh


def python_jaccard(a: str, b: str, shingle: str, n: int) -> float:
    if shingle == "char":
        sa = {a[i:i + n] for i in range(len(a) - n + 1)} or {a}
        sb = {b[i:i + n] for i in range(len(b) - n + 1)} or {b}
    else:
        wa, wb = a.split(" "), b.split(" ")
        sa = {tuple(wa[i:i + n]) for i in range(len(wa) - n + 1)} or {tuple(wa)}
        sb = {tuple(wb[i:i + n]) for i in range(len(wb) - n + 1)} or {tuple(wb)}
    return len(sa & sb) / len(sa | sb)


def naive_reference(texts: list[str], cfg: DedupConfig) -> dict:
    """datasketch the way most scripts use it: MinHash.update per shingle, MinHashLSH insert + query."""
    from datasketch import MinHash, MinHashLSH

    from refinery.dedup import lsh_params

    b, r = lsh_params(cfg.threshold, cfg.num_perm, cfg.false_negative_weight)
    t0, c0 = time.perf_counter(), time.process_time()
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(b, r))
    removed = 0
    n = cfg.ngram
    for i, t in enumerate(texts):
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        if cfg.shingle == "char":
            grams = {t[k:k + n] for k in range(len(t) - n + 1)} or {t}
        else:
            w = t.split(" ")
            grams = {" ".join(w[k:k + n]) for k in range(len(w) - n + 1)} or {t}
        for g in grams:
            m.update(g.encode("utf-8"))
        if lsh.query(m):
            removed += 1
        else:
            lsh.insert(str(i), m)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"records": len(texts), "seconds": round(seconds, 3), "records_per_second": round(len(texts) / seconds, 1),
            "cpu_records_per_second": round(len(texts) / cpu, 1), "removed": removed}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stage_child(args) -> dict:
    """The stage alone in a fresh process, so its peak RSS is its own (not the corpus builder's)."""
    import pyarrow.parquet as pq

    from refinery.curate import write_deduped_corpus

    profile = load_profile(args.profile)
    table = pq.read_table(args.stage_input)
    t0, c0 = time.perf_counter(), time.process_time()
    result = curate(table, profile)
    stage_s, stage_cpu = time.perf_counter() - t0, time.process_time() - c0
    del table
    t1 = time.perf_counter()
    write_deduped_corpus(result, Path(args.stage_output))
    return {"stage_seconds": stage_s, "stage_cpu_seconds": stage_cpu, "write_seconds": time.perf_counter() - t1,
            "peak_rss_bytes": peak_rss_bytes(), "stats": result.stats, "counts": result.counts}


def run_stage(args) -> dict:
    import subprocess
    import tempfile

    import pyarrow.parquet as pq

    profile = load_profile(args.profile)
    dcfg = profile.dedup
    t0 = time.perf_counter()
    table, truth, is_zh = build_corpus(args.records, args.seed)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(table, Path(tmp) / "records.parquet")
        load_before = os.getloadavg()
        proc = subprocess.run([sys.executable, __file__, "--profile", args.profile,
                               "--stage-input", str(Path(tmp) / "records.parquet"),
                               "--stage-output", str(Path(tmp) / "out")], capture_output=True, text=True)
        load_after = os.getloadavg()
        if proc.returncode != 0:
            raise SystemExit(f"stage process failed:\n{proc.stderr}")
        child = json.loads(proc.stdout)
        rej = pq.read_table(Path(tmp) / "out" / "rejected.parquet", columns=["id", "reason", "duplicate_of"])
    stage_s, stage_cpu, peak = child["stage_seconds"], child["stage_cpu_seconds"], child["peak_rss_bytes"]

    class _Result:  # what the evaluation below reads
        stats, counts = child["stats"], child["counts"]

    result = _Result()
    ids = table["id"].to_pylist()
    row_of = {rid: i for i, rid in enumerate(ids)}
    reason = {rid: None for rid in ids}
    dup_of = {}
    for rid, why, of in zip(rej["id"].to_pylist(), rej["reason"].to_pylist(), rej["duplicate_of"].to_pylist()):
        reason[rid] = why
        dup_of[rid] = of

    # ground truth: true Jaccard of each planted near copy with its original (normalized dedup keys)
    def key(i: int) -> str:
        m = table["messages"][i].as_py()
        return "\n".join(x["content"] for x in m if x["role"] in ("user", "assistant"))

    near_rows = [r for r, (o, kind) in truth.items() if kind == "near"]
    keys = normalize_many([key(r) for r in near_rows] + [key(truth[r][0]) for r in near_rows])
    k = len(near_rows)
    true_j = exact_jaccard(ShingleHasher(dcfg.shingle, dcfg.ngram, dcfg.seed), keys,
                           np.array([(i, i + k) for i in range(k)]))
    should = {ids[r] for r, j in zip(near_rows, true_j) if j >= dcfg.threshold}
    removed_dup = {rid for rid, why in reason.items() if why in ("near_duplicate", "exact_duplicate")}
    removed_near = [rid for rid, why in reason.items() if why == "near_duplicate"]
    recall = len(should & removed_dup) / max(len(should), 1)
    planted_near = {ids[r] for r in near_rows}
    planted_recall = len(planted_near & removed_dup) / max(len(planted_near), 1)
    planted_exact = {ids[r] for r, (o, kind) in truth.items() if kind == "exact"}
    exact_recall = sum(reason[x] == "exact_duplicate" for x in planted_exact) / max(len(planted_exact), 1)
    exact_fates = dict(Counter(reason[x] or "kept" for x in planted_exact))
    # precision, checked with Python sets of the real n-grams on (a sample of) the removed pairs
    rng = random.Random(1)
    sample = rng.sample(removed_near, min(len(removed_near), args.precision_sample))
    sk = normalize_many([key(row_of[x]) for x in sample] + [key(row_of[dup_of[x]]) for x in sample])
    ok = sum(python_jaccard(sk[i], sk[i + len(sample)], dcfg.shingle, dcfg.ngram) >= dcfg.threshold
             for i in range(len(sample)))
    precision = ok / max(len(sample), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    # language: Chinese rows rejected, English rows not
    non_en = {rid for rid, why in reason.items() if why == "non_english"}
    zh_ids = {ids[i] for i, z in enumerate(is_zh) if z}
    lang = {"chinese_rejected": len(zh_ids & non_en) / max(len(zh_ids), 1),
            "english_rejected": len(non_en - zh_ids) / max(len(ids) - len(zh_ids), 1)}

    secs = result.stats["seconds"]
    dedup_s = secs["normalize"] + secs["dedup"]  # the dedup keys' normalization, exact and near dedup
    dstats = result.stats["dedup"]
    dedup_in = dstats["records"]
    near_s = dstats["seconds"]["total"] - dstats["seconds"]["exact"]

    # naive reference vs ours on the same sample of dedup keys
    sample_keys = normalize_many([key(i) for i in range(min(args.naive_sample, len(ids)))])
    naive = naive_reference(sample_keys, dcfg)
    t0 = time.perf_counter()
    find_duplicates([str(i) for i in range(len(sample_keys))], sample_keys, dcfg, normalized=True)
    ours_sample = len(sample_keys) / (time.perf_counter() - t0)

    return {
        "records": len(ids), "profile": profile.name, "cpu_count": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "build_corpus_seconds": round(build_s, 2),
        "stage_seconds": round(stage_s, 2), "write_seconds": round(child["write_seconds"], 2),
        "stage_records_per_second": round(len(ids) / stage_s, 1),
        "stage_cpu_seconds": round(stage_cpu, 2),  # this process's CPU time: what the wall time would be alone on a core
        "langid": {"seconds": round(secs["langid"], 2), "records_per_second": round(len(ids) / secs["langid"], 1),
                   "cpu_seconds": round(result.stats["cpu_seconds"]["langid"], 2),
                   "cpu_records_per_second": round(len(ids) / result.stats["cpu_seconds"]["langid"], 1),
                   **{k: round(v, 4) for k, v in lang.items()}, "text": profile.langid.text,
                   "max_chars": profile.langid.max_chars},
        "dedup": {"records_in": dedup_in, "seconds": round(dedup_s, 2),
                  "exact_seconds": round(dstats["seconds"]["exact"], 2),
                  "near_seconds": round(near_s, 2),
                  "near_records_per_second": round(dedup_in / near_s, 1),  # signatures + LSH + verify
                  "near_cpu_seconds": round(dstats["cpu_seconds"]["near"], 2),
                  "near_cpu_records_per_second": round(dedup_in / dstats["cpu_seconds"]["near"], 1),
                  "normalize_cpu_seconds": round(result.stats["cpu_seconds"]["normalize"], 2),
                  "exact_cpu_seconds": round(dstats["cpu_seconds"]["exact"], 2),
                  "dedup_records_per_second": round(dedup_in / dedup_s, 1),
                  "breakdown_seconds": {k: round(v, 2) for k, v in dstats["seconds"].items()},
                  "bands": dstats["bands"], "rows": dstats["rows"],
                  "normalize_seconds": round(secs["normalize"], 2),
                  "candidate_pairs": dstats["candidate_pairs"], "prefiltered_pairs": dstats["prefiltered_pairs"],
                  "verified_pairs": dstats["verified_pairs"],
                  "shingle": dcfg.shingle, "ngram": dcfg.ngram, "num_perm": dcfg.num_perm,
                  "threshold": dcfg.threshold, "batch_size": dcfg.batch_size},
        "quality": {"should_remove": len(should), "recall": round(recall, 4), "precision": round(precision, 4),
                    "precision_sample": len(sample), "f1": round(f1, 4),
                    "planted_near": len(planted_near), "planted_near_recall": round(planted_recall, 4),
                    "planted_exact_recall": round(exact_recall, 4), "planted_exact_fates": exact_fates},
        "counts": result.counts,
        "naive_reference": naive,
        "ours_on_naive_sample_records_per_second": round(ours_sample, 1),
        "speed_ratio_near_vs_naive": round((dedup_in / near_s) / naive["records_per_second"], 1),
        "speed_ratio_near_vs_naive_cpu": round((dedup_in / dstats["cpu_seconds"]["near"])
                                               / naive["cpu_records_per_second"], 1),
        "stage_peak_rss_bytes": peak,
    }


def langid_sets() -> dict[str, tuple[bool, list[list[dict]]]]:
    """name -> (is_english, records as messages) from shared data with known language."""
    def conv(u, a):
        return [{"role": "user", "content": u}, {"role": "assistant", "content": a}]

    sets = {
        "alpaca_en": (True, [conv((r["instruction"] + "\n" + r["input"]).strip(), r["output"])
                             for r in _json(DATA / "llamafactory_demo/alpaca_en_demo.json")]),
        "lima": (True, [conv(r["instruction"], r["output"]) for r in _json(DATA / "llamafactory_hist/lima.json")]),
        "alpaca_zh": (False, [conv((r["instruction"] + "\n" + r["input"]).strip(), r["output"])
                              for r in _json(DATA / "llamafactory_demo/alpaca_zh_demo.json")]),
        "belle_zh": (False, [conv(r["question"], r["std_answer"]) for r in _jsonl(DATA / "belle_zh/eval_set.json")]),
        "oasst_zh": (False, [conv(r["instruction"], r["output"]) for r in _json(DATA / "llamafactory_hist/oaast_sft_zh.json")]),
    }
    for path in sorted((DATA / "mgsm").glob("mgsm_*.tsv")):
        lang = path.stem.split("_")[1]
        rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        sets[f"mgsm_{lang}"] = (lang == "en", [conv(q, a) for q, a in rows])
    return sets


def langid_grid(args) -> dict:
    sets = langid_sets()
    out = []
    for text in ("user", "conversation"):
        for max_chars in (50, 100, 200, 300, 500, 1000, 2000):
            cfg = LangIdConfig(text=text, max_chars=max_chars)
            ident = LanguageIdentifier(cfg)
            row = {"text": text, "max_chars": max_chars, "per_set": {}}
            correct = total = en_ok = en_n = non_ok = non_n = 0
            n_texts, seconds = 0, 0.0
            for name, (is_en, records) in sets.items():
                texts = [langid_text(m, cfg) for m in records]
                t0 = time.perf_counter()
                _, _, p_en = ident.classify_arrays(texts)
                seconds += time.perf_counter() - t0
                n_texts += len(texts)
                ok = ident.is_english(p_en) == is_en
                row["per_set"][name] = round(float(ok.mean()), 4)
                correct += int(ok.sum())
                total += len(ok)
                if is_en:
                    en_ok, en_n = en_ok + int(ok.sum()), en_n + len(ok)
                else:
                    non_ok, non_n = non_ok + int(ok.sum()), non_n + len(ok)
            row.update(accuracy=round(correct / total, 4), english_kept=round(en_ok / en_n, 4),
                       non_english_rejected=round(non_ok / non_n, 4),
                       balanced_accuracy=round((en_ok / en_n + non_ok / non_n) / 2, 4),
                       records_per_second=round(n_texts / seconds, 1))
            out.append(row)
    # case: lid.176 on upper-cased text (the ALL-CAPS rule in langid.clean_for_fasttext) and on
    # text lower-cased first, at the chosen defaults
    ident = LanguageIdentifier(LangIdConfig())
    case = {}
    for variant, change in (("as_is", str), ("upper_cased", str.upper), ("lower_cased", str.lower),
                            ("upper_cased_without_rule", None)):
        kept = rejected = n_en = n_non = 0
        for is_en, records in sets.values():
            texts = [langid_text(m, ident.cfg) for m in records]
            if change is None:  # the raw model on upper-cased text, bypassing the rule
                labs, probs = ident.model.predict([t.upper() for t in texts], k=5)
                p_en = np.array([dict(zip(lab, pr)).get("__label__en", 0.0) for lab, pr in zip(labs, probs)])
            else:
                p_en = ident.classify_arrays([change(t) for t in texts])[2]
            ok = ident.is_english(p_en) == is_en
            if is_en:
                kept, n_en = kept + int(ok.sum()), n_en + len(ok)
            else:
                rejected, n_non = rejected + int(ok.sum()), n_non + len(ok)
        case[variant] = {"english_kept": round(kept / n_en, 4), "non_english_rejected": round(rejected / n_non, 4)}
    return {"sets": {k: {"english": v[0], "records": len(v[1])} for k, v in sets.items()}, "grid": out,
            "case": case, "loadavg": os.getloadavg()}


def shingle_grid(args) -> dict:
    """Recall of planted 1-5% word edits and false-candidate load per shingling (threshold 0.8)."""
    rng = random.Random(args.seed)
    en = [u + "\n" + a for u, a in english_pairs() if len(a) > 300]
    base = rng.sample(en, min(3000, len(en)))
    planted = [mutate(t, rng.uniform(0.01, 0.05), rng) for t in base[:1000]]
    texts = base + planted
    ids = [str(i) for i in range(len(texts))]
    out = []
    for shingle, ngram in [("word", 5), ("word", 3), ("word", 2), ("word", 1), ("char", 3), ("char", 5),
                           ("char", 7), ("char", 9)]:
        cfg = DedupConfig(shingle=shingle, ngram=ngram)
        t0 = time.perf_counter()
        res = find_duplicates(ids, texts, cfg)
        seconds = time.perf_counter() - t0
        found = sum(res.status[len(base) + i] != "kept" for i in range(len(planted)))
        wrong = sum(res.status[i] != "kept" for i in range(len(base)))
        norm = normalize_many(texts)
        j = exact_jaccard(ShingleHasher(shingle, ngram), norm, np.array([(i, len(base) + i) for i in range(len(planted))]))
        out.append({"shingle": shingle, "ngram": ngram, "planted_found": round(found / len(planted), 4),
                    "planted_mean_jaccard": round(float(j.mean()), 4),
                    "planted_jaccard_ge_threshold": round(float((j >= 0.8).mean()), 4),
                    "unplanted_removed": wrong, "candidate_pairs": res.stats["candidate_pairs"],
                    "records_per_second": round(len(texts) / seconds, 1)})
    return {"records": len(texts), "planted": len(planted), "grid": out, "loadavg": os.getloadavg()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=640_000)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--naive-sample", type=int, default=2000)
    ap.add_argument("--precision-sample", type=int, default=3000)
    ap.add_argument("--langid-grid", action="store_true")
    ap.add_argument("--shingle-grid", action="store_true")
    ap.add_argument("--stage-input", help=argparse.SUPPRESS)  # the child process of a benchmark run
    ap.add_argument("--stage-output", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not DATA.exists():
        raise SystemExit(f"shared data directory not found: {DATA} (set REFINERY_SHARED_DATA)")
    if args.stage_input:
        result = stage_child(args)
    elif args.langid_grid:
        result = langid_grid(args)
    elif args.shingle_grid:
        result = shingle_grid(args)
    else:
        result = run_stage(args)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
