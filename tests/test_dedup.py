"""Exact + MinHash LSH dedup on real instruction data from the shared data directory."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.dedup_corpora import greedy_truth, mutate, templated_corpus  # the benchmarks' corpora and edits
from refinery.config import DedupConfig, resolve_path
from refinery.dedup import (DedupIndex, MinHasher, NormBatch, Shingling, candidate_pairs, exact_jaccard, features,
                            find_duplicates, lsh_params, near_resolve, normalize_batch, normalize_many, normalize_text,
                            prepare, resolve, verify_pairs)
from refinery.dedup import _nfkc  # what prepare applies to a text that is not ASCII

DATA = resolve_path("${REFINERY_SHARED_DATA:-../shared/data}")


@pytest.fixture(scope="module")
def english() -> list[str]:
    path = DATA / "llamafactory_demo" / "alpaca_en_demo.json"
    assert path.exists(), f"shared data missing: {path}"
    rows = json.loads(path.read_text(encoding="utf-8"))
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows]
    # the demo file has a few exact duplicates of its own; keep one of each so planted pairs are the only ones
    seen, out = set(), []
    for t in texts:
        if normalize_text(t) not in seen and len(t) > 200:
            seen.add(normalize_text(t))
            out.append(t)
    return out


def char_jaccard(a: str, b: str, n: int = 5) -> float:
    """Reference: Python sets of the real n-gram strings."""
    sa = {a[i:i + n] for i in range(len(a) - n + 1)} or {a}
    sb = {b[i:i + n] for i in range(len(b) - n + 1)} or {b}
    return len(sa & sb) / len(sa | sb)


def test_normalize_text():
    assert normalize_text("  Hello,  WORLD!\n\tIt's  fine. ") == "hello world its fine"
    assert normalize_text("Price: $5 + 3 = 8?") == "price $5 + 3 = 8"  # symbols and digits stay
    assert normalize_text("“Ｆｕｌｌ” width — ok…") == "full width ok"  # NFKC, Unicode punctuation
    assert normalize_text("") == ""
    texts = ["A, b", "Ünïcode « ok »", "x\u00a0\u00a0y", "你好，世界！"]
    assert normalize_many(texts) == [normalize_text(t) for t in texts] == ["a b", "ünïcode ok", "x y", "你好世界"]


def test_compiled_normalization_matches_python(english):
    import unicodedata

    def reference(t: str) -> str:
        t = unicodedata.normalize("NFKC", t).lower()
        return " ".join("".join(c for c in t if unicodedata.category(c)[0] != "P").split())

    texts = english[:300] + [" ", "", "\t\x1fA\v", "..", " x  y ", "a\r\n\r\nB!", "ΟΔΟΣ ΣΟΦΟΣ", "İstanbul",
                             "ﬁne ＡＢＣ", "e\u0301cole", "x\x00y", "café – “it’s” 北京", "wait…", "x\u00a0y",
                             "\u1100\u1161\u11a8", "\u0bc6\u0bbe", "\u0dd9\u0ddf", "Ω", "ｶﾞ", "x\U0001d400y",
                             "\u3300 x", "\ufdfa"]  # the last two: NFKC makes them longer
    want = [reference(t.replace("\x00", "")) for t in texts]
    assert normalize_many(texts) == want
    # an Arrow column takes the other path: only texts with a code point NFKC may change go through
    # Python, and those it changed are read from a patch beside Arrow's buffer, in any order of rows
    assert normalize_batch(pa.array(texts)).texts() == want
    src = prepare(pa.array(texts))
    assert src.patch is not None and (src.patch_of >= 0).sum() < len(texts)
    rows = np.random.default_rng(0).permutation(len(texts))[:150]
    assert src.normalize(rows).texts() == [want[r] for r in rows]
    assert src.arrow().to_pylist() == [t if t.isascii() else _nfkc(t) for t in texts]


def test_nfkc_stable_code_points_stay_stable_next_to_any_other():
    """A text made only of code points the table marks stable is its own NFKC (what lets Arrow
    columns skip Python): checked for every code point that starts a canonical composition, followed
    by a sample of stable ones, and for random runs of stable ones."""
    import unicodedata

    from refinery.dedup import _tables

    stable = _tables()[2]
    assert stable[:128].all() and not stable[[0xA0, 0x2026, 0xFB01, 0x301, 0x3A3, 0x130, 0x1161, 0xBBE]].any()
    starters = sorted({int(d.split()[0], 16) for d in map(unicodedata.decomposition, map(chr, range(0x20000)))
                       if len(d.split()) == 2 and not d.startswith("<")})
    rng = random.Random(3)
    ok = np.flatnonzero(stable)
    sample = [chr(c) for c in rng.sample(ok.tolist(), 3000)] + [chr(c) for c in range(0x80, 0x3000) if stable[c]]
    for c in starters:
        if stable[c]:
            assert all(unicodedata.is_normalized("NFKC", chr(c) + x) for x in sample), hex(c)
    for _ in range(3000):
        t = "".join(chr(int(c)) for c in rng.choices(ok, k=rng.randint(2, 8)))
        assert unicodedata.is_normalized("NFKC", t), t


def test_kernels_set_numba_up_without_scipy_and_leave_blas_to_others():
    """The kernels' first call no longer imports scipy (0.15 s of every CLI process); numba still
    compiles linear algebra with BLAS afterwards, in the same process."""
    code = """
import sys
import numpy as np
from refinery import dedup_kernels as K
K.exact_hashes(np.zeros(1, np.uint32), np.zeros(1, np.int64), np.zeros(1, np.int64), np.empty((1, 2), np.uint64))
assert "scipy.linalg" not in sys.modules, "numba's set-up imported scipy.linalg"
import numba
a = np.arange(6.0).reshape(2, 3)
assert np.allclose(numba.njit(lambda x, y: np.dot(x, y))(a, a.T), a @ a.T)
assert "scipy.linalg.cython_blas" in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shingle_hashes_are_exact_jaccard(english):
    rng = random.Random(1)
    norm = normalize_many(english[:60])
    texts = norm + [mutate(t, rng.uniform(0.01, 0.3), rng) for t in norm] + ["abc", ""]
    pairs = np.array([(i, i + 60) for i in range(60)] + [(0, 1), (2, 3), (120, 0), (121, 120)])
    got = exact_jaccard(Shingling("char", 5), texts, pairs)
    want = [char_jaccard(texts[a], texts[b]) for a, b in pairs]
    np.testing.assert_allclose(got, want, atol=1e-12)
    # word shingles: the same hash for the same words anywhere in a batch
    s0, s1 = Shingling("word", 2).hash_sets(NormBatch.of(["a b c", "x a b"]))
    assert len(s0) == len(s1) == 2 and len(s0 & s1) == 1


def test_minhash_estimates_jaccard(english):
    rng = random.Random(2)
    norm = normalize_many(english[:200])
    texts = norm + [mutate(t, rng.uniform(0.01, 0.2), rng) for t in norm]
    pairs = np.array([(i, i + 200) for i in range(200)])
    true = exact_jaccard(Shingling("char", 5), texts, pairs)
    sig = MinHasher(128).signatures(texts)
    estimate = (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1)
    assert abs(float((estimate - true).mean())) < 0.02  # unbiased
    assert float(np.abs(estimate - true).mean()) < 0.05
    assert (MinHasher(128).signatures(texts[:5]) == sig[:5]).all()  # deterministic for a seed


def test_planted_near_duplicates_found_and_verified(english):
    rng = random.Random(3)
    base = english[:400]
    texts, ids, planted = list(base), [f"r{i}" for i in range(len(base))], {}
    for i in range(0, 400, 4):  # 100 near duplicates, 1-5% of the words changed
        texts.append(mutate(base[i], rng.uniform(0.01, 0.05), rng))
        ids.append(f"near{i}")
        planted[f"near{i}"] = f"r{i}"
    for i in range(1, 400, 20):  # 20 exact duplicates up to case, whitespace and punctuation
        texts.append(base[i].upper().replace(". ", " . ").replace(",", ""))
        ids.append(f"exact{i}")
    cfg = DedupConfig()
    result = find_duplicates(ids, texts, cfg)
    status = dict(zip(ids, result.status))
    norm = normalize_many(texts)
    should = {rid for rid, orig in planted.items()
              if char_jaccard(norm[ids.index(rid)], norm[ids.index(orig)]) >= cfg.threshold}
    assert len(should) >= 90  # char 5-grams keep 1-5% word edits above 0.8
    found = {rid for rid in planted if status[rid] == "near_duplicate"}
    assert should <= found
    assert all(status[f"exact{i}"] == "exact_duplicate" for i in range(1, 400, 20))
    assert all(status[f"r{i}"] == "kept" for i in range(400))  # originals come first and stay
    # every removal is verified: its exact Jaccard with the record it duplicates is >= threshold
    for rid, of, s in zip(ids, result.duplicate_of, result.similarity):
        if status[rid] == "near_duplicate":
            assert of == planted[rid]
            assert s >= cfg.threshold
            assert s == pytest.approx(char_jaccard(norm[ids.index(rid)], norm[ids.index(of)]))
    # clusters: one row per removed record, pointing at a kept record
    removed = [c["removed_id"] for c in result.clusters]
    assert sorted(removed) == sorted(r for r in ids if status[r] != "kept")
    assert all(status[c["kept_id"]] == "kept" for c in result.clusters)
    assert len(result.index) == result.status.count("kept")


def test_verification_rejects_false_candidates(english):
    rng = random.Random(4)
    base = normalize_many(english[:100])
    texts = base + [mutate(t, 0.04, rng) for t in base]
    # Pairs near 0.8-0.9 collide in LSH easily; a 0.97 threshold makes most of them false candidates.
    cfg = DedupConfig(threshold=0.97)
    result = find_duplicates([str(i) for i in range(len(texts))], texts, cfg, normalized=True)
    assert result.stats["rejected_candidates"] > 10
    true = exact_jaccard(Shingling(), texts, np.array([(i, i + 100) for i in range(100)]))
    for i in range(100):
        assert (result.status[100 + i] == "near_duplicate") == (true[i] >= 0.97)


def test_incremental_against_saved_index(english, tmp_path):
    rng = random.Random(5)
    cfg = DedupConfig()
    first = english[:300]
    r1 = find_duplicates([f"a{i}" for i in range(300)], first, cfg)
    r1.index.save(tmp_path / "index")
    loaded = DedupIndex.load(tmp_path / "index", cfg)
    assert loaded.ids == r1.index.ids and (loaded.bands == r1.index.bands).all()
    second = [mutate(first[i], 0.02, rng) for i in range(0, 30)] + [first[40]] + english[300:400]
    ids2 = [f"b{i}" for i in range(len(second))]
    r2 = find_duplicates(ids2, second, cfg, loaded)
    s2 = dict(zip(ids2, r2.status))
    assert s2["b30"] == "exact_duplicate" and r2.duplicate_of[30] == "a40"
    cross = [i for i in range(30) if r2.status[i] == "near_duplicate"]
    assert len(cross) >= 27 and all(r2.duplicate_of[i] == f"a{i}" for i in cross)
    assert all(s == "kept" for s in r2.status[31:])
    assert len(r2.index) == 300 + r2.status.count("kept")
    # another shingling: the stored normalized text rebuilds the band keys
    word_cfg = DedupConfig(shingle="word", ngram=2)
    rebuilt = DedupIndex.load(tmp_path / "index", word_cfg)
    assert rebuilt.params["shingle"] == "word"
    r3 = find_duplicates(["c0"], [mutate(first[7], 0.01, rng)], word_cfg, rebuilt)
    assert r3.status == ["near_duplicate"] and r3.duplicate_of == ["a7"]
    # another key cannot be rebuilt: the stored texts are whole conversations, not prompts
    with pytest.raises(ValueError, match="key='conversation'.*key='prompt'"):
        DedupIndex.load(tmp_path / "index", DedupConfig(key="prompt"))


def test_lsh_params_match_datasketch_without_its_private_function():
    from datasketch.lsh import _optimal_param  # the reference only: refinery does not call it

    for threshold in (0.5, 0.7, 0.8, 0.9):
        for num_perm in (64, 128, 256):
            for fnw in (0.5, 0.95):
                assert lsh_params(threshold, num_perm, fnw) == _optimal_param(threshold, num_perm, 1 - fnw, fnw)
    b, r = lsh_params(0.8, 128, 0.95)
    assert b * r <= 128 and 1 - (1 - 0.8 ** r) ** b > 0.9


@pytest.fixture(scope="module")
def templated():
    """Short records behind four long shared preambles: LSH buckets of hundreds, ground truth by
    the greedy rule over EVERY pair of a preamble group."""
    records, group = templated_corpus(families=8, per_family=300, seed=1)
    return records, group, greedy_truth(records, group, DedupConfig().threshold)


def test_templated_short_records_big_buckets_stay_exact(templated):
    records, _, truth = templated
    result = find_duplicates([r for r, _ in records], [t for _, t in records], DedupConfig())
    assert result.stats["largest_bucket"] >= 300  # what the old 8-member cap could not handle
    removed = {rid for (rid, _), s in zip(records, result.status) if s != "kept"}
    should = {rid for rid, of in truth.items() if of is not None}
    assert len(should) > 500
    recall, precision = len(removed & should) / len(should), len(removed & should) / len(removed)
    assert recall >= 0.995 and precision >= 0.999, (recall, precision)


def test_every_pair_sharing_a_bucket_is_a_candidate(templated):
    """No cap on a bucket: every pair of records that share a band key and are >= the threshold
    is found (the pre-filter is sized for short records too)."""
    records, group, _ = templated
    cfg = DedupConfig()
    batch = normalize_batch([t for _, t in records])
    f = features(batch, cfg)
    pairs, _ = candidate_pairs(f.bands, f.sig16, f.filled, cfg.threshold)
    found = set(map(tuple, pairs.tolist()))
    g = np.array([group[r] for r, _ in records])
    i, j = np.triu_indices(len(records), 1)
    same = (g[i] == g[j]) & (f.bands[i] == f.bands[j]).any(axis=1)
    i, j = i[same], j[same]
    sims = Shingling().jaccard(batch, np.stack([i, j], axis=1))
    want = {(a, b) for a, b, s in zip(i.tolist(), j.tolist(), sims.tolist()) if s >= cfg.threshold}
    assert len(want) > 1000 and want <= found
    assert int(f.filled.min()) < 128  # short records: fewer shingles than MinHash bins



def test_exact_bounds_never_drop_a_pair_that_verifies(templated):
    """The bitmap and prefix bounds of near dedup are upper bounds of the exact Jaccard (a pair >=
    the threshold is never dropped), and they have teeth: most pairs of one preamble fall to them."""
    from refinery import dedup_kernels as K

    records, group, _ = templated
    cfg = DedupConfig()
    batch = normalize_batch([t for _, t in records[:600]])
    shingling = Shingling()
    n = len(batch)
    counts = np.zeros(1 << 22, np.uint32)
    K.shingle_counts(batch.cp, batch.starts, batch.ends, *shingling._args(), counts, np.uint64(64 - 22))
    keys, offs = np.empty(int(batch.lengths().sum()) + n, np.uint64), np.empty(n + 1, np.int64)
    meta, sizes = np.zeros((n, 4), np.int64), np.empty(n, np.int64)
    bitmaps = np.empty((n, K.BITMAP_WORDS + 1), np.uint64)
    K.prefix_keys(batch.cp, batch.starts, batch.ends, *shingling._args(), counts, np.uint64(64 - 22),
                  cfg.threshold, sizes, keys, offs, bitmaps)
    meta[:, K.SIZE], meta[:, K.P0], meta[:, K.P1] = sizes, offs[:-1], offs[1:]
    g = np.array([group[r] for r, _ in records[:600]])
    i, j = np.triu_indices(n, 1)
    i, j = i[g[i] == g[j]], j[g[i] == g[j]]
    sims = shingling.jaccard(batch, np.stack([i, j], axis=1))
    by_bitmap = np.array([K._bitmap_rejects(a, b, bitmaps, cfg.threshold) for a, b in zip(i, j)])
    by_prefix = np.array([K._prefix_rejects(meta[a], meta[b], keys, cfg.threshold) for a, b in zip(i, j)])
    close = sims >= cfg.threshold
    assert close.sum() > 100 and not by_bitmap[close].any() and not by_prefix[close].any()
    far = sims < 0.7
    assert by_bitmap[far].mean() > 0.99 and by_prefix[far].mean() > 0.9, (by_bitmap[far].mean(), by_prefix[far].mean())


@pytest.mark.parametrize("existing, block_pairs", [(0, 100_000), (0, 500), (400, 5_000)])
def test_streaming_resolution_equals_every_pair_then_greedy(templated, existing, block_pairs):
    """near_resolve (kept records only as comparators, exact bounds before the exact check, blocks
    of any size, down to a few rows, an existing index in front) decides exactly what every
    candidate pair verified and resolved greedily decides: the same duplicate_of and similarity."""
    records, _, _ = templated
    cfg = DedupConfig()
    batch = normalize_batch([t for _, t in records])
    f = features(batch, cfg)
    shingling, lengths = Shingling(), batch.lengths()
    pairs, _ = candidate_pairs(f.bands, f.sig16, f.filled, cfg.threshold, existing=existing)
    sims = verify_pairs(pairs, batch.take, shingling, lengths)
    want_dup, want_sim = resolve(pairs, sims, cfg.threshold, len(records))
    dup, sim, stats = near_resolve(f.bands, f.sig16, f.filled, cfg.threshold, batch.take, shingling, lengths,
                                   existing=existing, block_pairs=block_pairs)
    assert (dup >= 0).sum() > 500 and not (dup[:existing] >= 0).any()
    np.testing.assert_array_equal(dup, want_dup)
    np.testing.assert_array_equal(sim, want_sim)
    assert stats["checked_pairs"] < len(pairs) / (3 if block_pairs <= 5_000 else 1)  # most never reach it


def test_cli(tmp_path, english):
    rng = random.Random(6)
    src = tmp_path / "in.jsonl"
    texts = english[:40] + [mutate(english[0], 0.02, rng), english[1].upper()]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "out.parquet"
    proc = subprocess.run([sys.executable, "-m", "refinery.dedup", str(src), "--out", str(out),
                           "--profile", "smoke", "--threshold", "0.8", "--save-index", str(tmp_path / "idx")],
                          capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout)
    assert summary["records"] == 42 and summary["near_duplicates"] == 1 and summary["exact_duplicates"] == 1
    table = pq.read_table(out)
    assert table.num_rows == 42 and table["status"].to_pylist()[-2:] == ["near_duplicate", "exact_duplicate"]


def test_cli_against_saved_index_and_bad_input(tmp_path, english, capsys):
    from refinery.dedup import main

    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps({"text": t}) + "\n" for t in english[:10]), encoding="utf-8")
    assert main([str(first), "--save-index", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    second = tmp_path / "second.jsonl"
    second.write_text(json.dumps({"messages": [{"role": "user", "content": english[5]}]}) + "\n", encoding="utf-8")
    assert main([str(second), "--existing", str(tmp_path / "idx")]) == 0
    assert json.loads(capsys.readouterr().out)["exact_duplicates"] == 1
    # an index of whole conversations cannot dedup prompts: refused, not silently wrong
    assert main([str(second), "--existing", str(tmp_path / "idx"), "--key", "prompt"]) == 2
    assert "key='conversation'" in capsys.readouterr().err
    assert main([str(second), "--existing", str(tmp_path / "no-index")]) == 2
    assert "no dedup index" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    assert main([str(bad)]) == 2
    err = capsys.readouterr()
    assert err.out == "" and f"{bad}:2: field 'text'" in err.err
    # a record of a known format that does not normalize names its field
    bad.write_text('{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}\n')
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: sharegpt record: field 'conversations[1].from': unknown speaker 'robot'" in err
    assert main([str(bad), "--threshold", "1.5", "--num-perm", "0"]) == 2
    assert "--threshold 1.5" in capsys.readouterr().err


def test_cli_reads_a_sharegpt_json_array(tmp_path, shared_data, capsys):
    from refinery.dedup import main

    src = shared_data / "fastchat_sharegpt" / "dummy_conversation.json"
    assert main([str(src), "--out", str(tmp_path / "out.parquet")]) == 0
    summary = json.loads(capsys.readouterr().out)
    table = pq.read_table(tmp_path / "out.parquet", columns=["id", "status", "format"])
    assert summary["records"] == table.num_rows == len(json.loads(src.read_text(encoding="utf-8")))
    assert set(table["format"].to_pylist()) == {"sharegpt"}
    assert table["id"][0].as_py() == "identity_0"  # the source's own ids, to join the verdicts back
    assert summary["kept"] + summary["exact_duplicates"] + summary["near_duplicates"] == summary["records"]
