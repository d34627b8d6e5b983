"""Benchmark of the data stage (streaming ingest -> language ID -> decontamination -> exact + near dedup); prints JSON.

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

The stage runs in a child process (its peak memory is its own and its map workers', summed as PSS:
shared pages once) with the profile's data_engine and
dedup settings: ``ingest_to`` reads the corpus's JSON lines (OpenAI chat format) into
records.parquet, ``refinery.datastage.run_stage`` curates it batch by batch with decontamination
against the profile's evaluation sets.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dedup_corpora import mutate  # noqa: E402,F401 - the planted edit, shared with tests/test_dedup.py
from refinery.config import DedupConfig, LangIdConfig, load_profile, resolve_path  # noqa: E402
from refinery.dedup import Shingling, exact_jaccard, find_duplicates, normalize_many  # noqa: E402
from refinery.langid import LanguageIdentifier, langid_text  # noqa: E402
from refinery.modelstats import peak_rss_bytes  # noqa: E402
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


def stage_child(args) -> dict:
    """The data stage alone in a fresh process, so its peak RSS is its own: streaming ingest of the
    JSON lines into records.parquet, then the streaming curation (language ID, decontamination
    against the profile's eval sets, exact + near dedup) into the deduped_corpus files."""
    from refinery.config import SourceConfig
    from refinery.datastage import StageContext, local_map, local_workers, run_stage
    from refinery.decontam import eval_texts_for
    from refinery.ingest import ingest_to
    from refinery.modelstats import TreeMemory

    profile = load_profile(args.profile)
    out = Path(args.stage_output)
    with TreeMemory() as memory:  # this process and its map workers, shared pages counted once
        t0, c0 = time.perf_counter(), time.process_time()
        raw = ingest_to([SourceConfig(name="bench", path=args.stage_input, format="openai")], out / "raw",
                        max_record_bytes=profile.ingest.max_record_bytes, batch_records=profile.data_engine.batch_records,
                        workers=profile.data_engine.workers)
        t1, c1 = time.perf_counter(), time.process_time()
        built = [StageContext.build(profile, eval_texts_for(profile))]
        ngrams = len(built[0].decontam) if built[0].decontam else 0
        # no reference kept here: run_stage frees the model and the n-gram index once the batches are mapped
        records = out / "raw" / "records.parquet"
        result = run_stage(records, out / "curated", profile,
                           map_fn=local_map(built.pop(), local_workers(records, profile)))
        t2, c2 = time.perf_counter(), time.process_time()
    return {"stage_seconds": t2 - t0, "tree_pss_peak_bytes": memory.peak_bytes,
            "map_workers": local_workers(records, profile), "stage_cpu_seconds": c2 - c0, "ingest_seconds": t1 - t0,
            "ingest_cpu_seconds": c1 - c0, "curate_seconds": t2 - t1, "write_seconds": result.stats["seconds"]["write"],
            "decontam_ngrams": ngrams, "ingested": raw["kept"],
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
        src = Path(tmp) / "records.jsonl"
        with open(src, "w", encoding="utf-8") as f:  # the OpenAI chat format, one of ingest's six
            for rid, messages in zip(table["id"].to_pylist(), table["messages"].to_pylist()):
                f.write(json.dumps({"id": rid, "messages": messages}, ensure_ascii=False) + "\n")
        load_before = os.getloadavg()
        proc = subprocess.run([sys.executable, __file__, "--profile", args.profile, "--stage-input", str(src),
                               "--stage-output", str(Path(tmp) / "out")], capture_output=True, text=True)
        load_after = os.getloadavg()
        if proc.returncode != 0:
            raise SystemExit(f"stage process failed:\n{proc.stderr}")
        child = json.loads(proc.stdout)
        rej = pq.read_table(Path(tmp) / "out" / "curated" / "rejected.parquet", columns=["id", "reason", "duplicate_of"])
        # ingest gives each record its content id; map them back to the corpus's row ids
        raw_ids = pq.read_table(Path(tmp) / "out" / "raw" / "records.parquet", columns=["id", "source_line"])
        corpus_ids = table["id"].to_pylist()
        row_id = dict(zip(raw_ids["id"].to_pylist(), (corpus_ids[n - 1] for n in raw_ids["source_line"].to_pylist())))
    stage_s, stage_cpu, peak = child["stage_seconds"], child["stage_cpu_seconds"], child["peak_rss_bytes"]
    tree_peak = child["tree_pss_peak_bytes"]

    class _Result:  # what the evaluation below reads
        stats, counts = child["stats"], child["counts"]

    result = _Result()
    ids = table["id"].to_pylist()
    row_of = {rid: i for i, rid in enumerate(ids)}
    reason = {rid: None for rid in ids}
    dup_of = {}
    for rid, why, of in zip(rej["id"].to_pylist(), rej["reason"].to_pylist(), rej["duplicate_of"].to_pylist()):
        reason[row_id[rid]] = why
        dup_of[row_id[rid]] = row_id.get(of, of)

    # ground truth: true Jaccard of each planted near copy with its original (normalized dedup keys)
    def key(i: int) -> str:
        m = table["messages"][i].as_py()
        return "\n".join(x["content"] for x in m if x["role"] in ("user", "assistant"))

    near_rows = [r for r, (o, kind) in truth.items() if kind == "near"]
    keys = normalize_many([key(r) for r in near_rows] + [key(truth[r][0]) for r in near_rows])
    k = len(near_rows)
    true_j = exact_jaccard(Shingling(dcfg.shingle, dcfg.ngram, dcfg.seed), keys,
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
    dstats = result.stats["dedup"]
    # naive reference vs ours on the same sample of dedup keys, in this run
    sample_keys = normalize_many([key(i) for i in range(min(args.naive_sample, len(ids)))])
    naive = naive_reference(sample_keys, dcfg)
    find_duplicates(["a", "b"], sample_keys[:2], dcfg, normalized=True)  # numba loads its compiled code once
    t0 = time.perf_counter()
    find_duplicates([str(i) for i in range(len(sample_keys))], sample_keys, dcfg, normalized=True)
    ours_sample = len(sample_keys) / (time.perf_counter() - t0)
    return {
        "records": len(ids), "profile": profile.name, "cpu_count": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": load_after, "build_corpus_seconds": round(build_s, 2),
        "stage_seconds": round(stage_s, 2), "stage_cpu_seconds": round(stage_cpu, 2),
        "stage_records_per_second": round(len(ids) / stage_s, 1), "stage_peak_rss_bytes": peak,
        # the stage process and its forked map workers together (PSS, sampled every 20 ms); the
        # line above is the stage process's own exact peak (VmHWM), shared pages counted in full
        "stage_peak_memory_bytes": max(peak, tree_peak), "stage_tree_pss_peak_bytes": tree_peak,
        "map_workers": child["map_workers"],
        "ingest_seconds": round(child["ingest_seconds"], 2), "ingest_cpu_seconds": round(child["ingest_cpu_seconds"], 2),
        "curate_seconds": round(child["curate_seconds"], 2),
        "curate_breakdown_seconds": {k: round(v, 2) for k, v in secs.items()},
        "curate_cpu_seconds": {k: round(v, 2) for k, v in result.stats["cpu_seconds"].items()},
        "batch_records": result.stats["batch_records"], "decontam_ngrams": child["decontam_ngrams"],
        "dedup": {k: dstats[k] for k in ("records", "bands", "rows", "candidate_pairs", "prefiltered_pairs",
                                         "largest_bucket", "verified_pairs", "exact_duplicates", "near_duplicates")}
                 | {"seconds": {k: round(v, 2) for k, v in dstats["seconds"].items()},
                    "shingle": dcfg.shingle, "ngram": dcfg.ngram, "num_perm": dcfg.num_perm, "threshold": dcfg.threshold},
        "langid": {k: round(v, 4) for k, v in lang.items()} | {"text": profile.langid.text,
                                                                "max_chars": profile.langid.max_chars},
        "quality": {"should_remove": len(should), "recall": round(recall, 4), "precision": round(precision, 4),
                    "precision_sample": len(sample), "f1": round(f1, 4),
                    "planted_near": len(planted_near), "planted_near_recall": round(planted_recall, 4),
                    "planted_exact_recall": round(exact_recall, 4), "planted_exact_fates": exact_fates},
        "counts": result.counts,
        "naive_reference": naive,
        "ours_on_naive_sample_records_per_second": round(ours_sample, 1),
        "speed_ratio_dedup_vs_naive_same_sample": round(ours_sample / naive["records_per_second"], 1),
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
        j = exact_jaccard(Shingling(shingle, ngram), norm, np.array([(i, len(base) + i) for i in range(len(planted))]))
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
