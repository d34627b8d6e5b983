"""The streaming data stage: bounded batches give the same corpus as the in-memory path, and the
same steps on Ray (local, 2 workers) keep the same records as one process."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery.config import DataEngineConfig, load_profile
from refinery.curate import curate
from refinery.datastage import Spill, StageContext, _compact, local_map, local_workers, run_stage
from refinery.dedup import DedupIndex, NormBatch, Utf8Texts, features
from refinery.records import RECORD_SCHEMA
from tests.test_curate import alpaca, edit_words, records_from

EVAL = {"gsm8k": ["Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
                  "muffins for her friends every day with four."]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[pa.Table, dict]:
    en, zh = alpaca("en", 300), alpaca("zh", 30)
    rows = (records_from("en", en[:260]) + records_from("zh", zh)
            + records_from("planted", [(u.upper(), a) for u, a in en[:15]] + [(u, edit_words(a, 40)) for u, a in en[15:45]])
            + records_from("leak", [("Puzzle: she eats three for breakfast every morning and bakes muffins for her "
                                     "friends every day. How many?", "Four.")])
            + records_from("later", [(u, edit_words(a, 50)) for u, a in en[100:130]] + en[260:300]))
    table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    path = tmp_path_factory.mktemp("stage") / "records.parquet"
    pq.write_table(table, path)
    return table, {"path": path}


def fates(out) -> dict[str, tuple]:
    kept = pq.read_table(out / "kept.parquet", columns=["id"])["id"].to_pylist()
    rej = pq.read_table(out / "rejected.parquet", columns=["id", "reason", "duplicate_of"]).to_pylist()
    return {**{i: ("kept",) for i in kept}, **{r["id"]: (r["reason"], r["duplicate_of"]) for r in rej}}


def with_engine(**kw):
    profile = load_profile("smoke")
    return profile.model_copy(update={"data_engine": DataEngineConfig(**kw)})


def test_streaming_small_batches_equal_in_memory(corpus, tmp_path):
    table, files = corpus
    profile = with_engine(batch_records=37)  # many batches, none aligned with anything
    ctx = StageContext.build(profile, EVAL)
    out = run_stage(files["path"], tmp_path / "out", profile, map_fn=local_map(ctx))
    c = out.counts
    assert c["read"] == table.num_rows == c["kept"] + sum(c[r] for r in ("non_english", "contaminated",
                                                                           "exact_duplicate", "near_duplicate"))
    assert c["contaminated"] == 1 and c["exact_duplicate"] >= 15 and c["near_duplicate"] >= 55
    from refinery.decontam import find_contaminated

    memory = curate(table, profile, contaminated=find_contaminated(table, EVAL, profile.decontam.ngram))
    got = fates(tmp_path / "out")
    want = {r["id"]: ("kept",) for r in memory.kept.select(["id"]).to_pylist()}
    want.update({r["id"]: (r["reason"], r["duplicate_of"]) for r in memory.rejected.to_pylist()})
    assert got == want
    index = DedupIndex.load(tmp_path / "out" / "dedup_index", profile.dedup)
    assert len(index) == out.index_records == c["kept"] and sorted(index.ids) == sorted(memory.index.ids)
    assert sorted(zip(index.ids, index.texts)) == sorted(zip(memory.index.ids, memory.index.texts))
    assert out.stats["dedup"]["largest_bucket"] >= 2


def test_forked_workers_keep_what_one_process_keeps(corpus, tmp_path):
    # data_engine.workers processes on this machine (refinery.parallel): the batches come back in
    # record order, so the greedy resolution, the files and the index are those of one process
    _, files = corpus
    profile = with_engine(workers=2, batch_records=23)
    ctx = StageContext.build(profile, EVAL)
    one = run_stage(files["path"], tmp_path / "one", profile, map_fn=local_map(ctx))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to one process: it forked
        two = run_stage(files["path"], tmp_path / "two", profile, map_fn=local_map(ctx, 2))
    assert fates(tmp_path / "two") == fates(tmp_path / "one")
    assert two.counts == one.counts and two.counts["near_duplicate"] >= 55 and two.counts["contaminated"] == 1
    for name in ("kept.parquet", "rejected.parquet", "clusters.parquet", "dedup_index/index.parquet"):
        assert pq.read_table(tmp_path / "two" / name).equals(pq.read_table(tmp_path / "one" / name)), name
    assert local_workers(files["path"], profile) == 2
    assert local_workers(files["path"], with_engine(workers=2, batch_records=10_000)) == 1  # one batch: no fork


def test_ordered_map_keeps_order_and_raises_a_workers_error():
    from refinery.parallel import ordered_map

    assert list(ordered_map(_double, "s", range(7), 2)) == [0, 2, 4, 6, 8, 10, 12]
    assert os.getpid() not in set(ordered_map(_pid, None, range(4), 2))  # other processes did the work
    with pytest.raises(ValueError, match="bad batch 3 of s"):
        list(ordered_map(_fail_on_three, "s", range(7), 2))


def _double(state, item):
    return item * 2


def _pid(state, item):
    return os.getpid()


def _fail_on_three(state, item):
    if item == 3:
        raise ValueError(f"bad batch {item} of {state}")
    return item * 2


def test_ray_two_workers_keep_what_one_process_keeps(corpus, tmp_path):
    ray = pytest.importorskip("ray")
    from refinery.datastage_ray import run_stage_ray

    _, files = corpus
    profile = with_engine(kind="ray", workers=2, batch_records=50)
    local = run_stage(files["path"], tmp_path / "local", profile, map_fn=local_map(StageContext.build(profile, EVAL)))
    try:
        distributed = run_stage_ray(files["path"], tmp_path / "ray", profile, eval_texts=EVAL)
    finally:
        ray.shutdown()
    assert fates(tmp_path / "ray") == fates(tmp_path / "local")
    assert distributed.counts == local.counts and distributed.counts["near_duplicate"] >= 55


def test_spill_reads_back_any_rows_in_any_order(tmp_path):
    texts = ["plain ascii", "café ünïcode", "日本語のテキスト", "emoji 🙂 here", "", "x" * 5000]
    cfg = load_profile("smoke").dedup
    feats = features(NormBatch.of(texts), cfg)
    spill = Spill(tmp_path)
    spill.append(NormBatch.of(texts[:3]), feats.take(np.arange(3)))
    spill.append(NormBatch.of(texts[3:5]).utf8(), feats.take(np.arange(3, 5)))  # what a worker sends
    spill.append(texts[5:], feats.take(np.arange(5, 6)))  # strings
    rows = np.array([5, 0, 1, 2, 4, 3, 3, 1])  # runs of consecutive rows, repeats, backwards
    try:
        assert spill.take(rows).texts() == [texts[i] for i in rows]
        assert spill.take_utf8(rows).arrow().to_pylist() == [texts[i] for i in rows]
        assert spill.lengths().tolist() == [len(t) for t in texts]
        assert len(spill.take(np.empty(0, np.int64))) == 0  # rows of an existing index only: none from here
        back = spill.features(cfg)
        for f in ("exact", "bands", "sig16", "filled"):
            assert np.array_equal(getattr(back, f), getattr(feats, f)), f
        assert np.array_equal(spill.feature_rows("bands", rows), feats.bands[rows])
        with pytest.raises(ValueError, match="2 features for 1 texts"):
            spill.append(["one"], feats.take(np.arange(2)))
        with pytest.raises(ValueError, match="without their lengths"):
            spill.append(Utf8Texts(np.frombuffer(b"ab", np.uint8), np.array([0, 2])))
    finally:
        spill.close()
    empty = Spill(tmp_path)
    assert len(empty.features(cfg)) == 0 and empty.features(cfg).bands.shape[1] == feats.bands.shape[1]
    empty.close()


def test_compacting_in_place_equals_taking_a_copy():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1 << 16, size=(1000, 7)).astype(np.uint16)
    rows = np.flatnonzero(rng.random(1000) < 0.9)
    want = a[rows].copy()
    assert np.array_equal(_compact(a, rows, chunk=64), want)
