"""benchmark_report: task YAMLs, statistics, fidelity, lm-eval on llama.cpp and the whole stage on a tiny Llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
import yaml
import zstandard

from refinery.artifacts import load_artifact, staged_artifact
from refinery.config import load_profile
from refinery.stages import SHIPPED
from refinery.eval_tasks import EvalDataError, prepare_tasks, select_subset
from refinery.evaluate import (BASELINE, Candidate, aggregate, paired_retention, score_tasks, standard_error,
                               task_manager)

SMOKE = Path(__file__).resolve().parents[1] / "profiles" / "smoke.yaml"


def write_profile(path: Path, tasks: dict, **eval_extra) -> Path:
    """The smoke profile with other eval tasks (a profile file, as a user would write it)."""
    raw = yaml.safe_load(SMOKE.read_text())
    raw["name"] = path.stem
    raw["eval"] = {**raw.get("eval", {}), "tasks": tasks, **eval_extra}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def write_heldout(path: Path, n: int = 30) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"h{i}", "family": "arith", "prompt": f"What is {i} plus {i}?",
                                "answer": str(2 * i), "response": f"The answer is {2 * i}.\n{i} + {i} = {2 * i}.",
                                "choices": [str(2 * i), str(2 * i + 1), str(i), str(3 * i)],
                                "label": i % 4}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 64) with SmolLM2's tokenizer, saved as a Hugging Face folder."""
    from refinery import base_model as bm
    from refinery.config import BaseModelConfig

    tok = bm.tokenizer_from_gguf(bm.embedded_gguf())
    model = bm.tiny_random_model(BaseModelConfig(kind="tiny_random", tiny_hidden_size=64, tiny_layers=2), tok)
    out = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- task files


def test_task_yamls_offline_are_deterministic_and_load_in_lm_eval(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("REFINERY_SHARED_DATA", str(shared_data))
    tasks = {"mmlu": {"limit": 5, "num_fewshot": 2}, "gsm8k": {"limit": 3, "num_fewshot": 1}, "bbh": {"limit": 4},
             "humaneval": {"limit": 2}, "wikitext": {"limit": 2}, "demo_heldout": {"limit": 10}}
    profile = load_profile(str(write_profile(tmp_path / "p.yaml", tasks, humaneval_execute=True)))
    heldout = write_heldout(tmp_path / "heldout.jsonl")
    a = prepare_tasks(profile, tmp_path / "a", heldout)
    b = prepare_tasks(profile, tmp_path / "b", heldout)
    assert {t.name: t.items for t in a} == {"mmlu": 5, "gsm8k": 3, "bbh": 4, "humaneval": 2, "wikitext": 2,
                                            "demo_heldout": 10}
    for t in a:  # the same items every time: paired comparisons across stages and runs
        assert (tmp_path / "a" / f"{t.name}.test.jsonl").read_text() == (tmp_path / "b" / f"{t.name}.test.jsonl").read_text()
    mmlu = [json.loads(x) for x in (tmp_path / "a" / "mmlu.test.jsonl").read_text().splitlines()]
    assert len({d["subject"] for d in mmlu}) > 1  # spread over subjects, not the first file's rows
    cfg = yaml.safe_load((tmp_path / "a" / "gsm8k.yaml").read_text())
    assert cfg["dataset_path"] == "json" and cfg["fewshot_split"] == "fewshot"
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]).is_absolute()

    manager = task_manager(profile, tmp_path / "a")
    loaded = manager.load_task_or_group([t.lm_eval_task for t in a])
    assert sorted(loaded) == sorted(t.lm_eval_task for t in a)
    he = loaded["refinery_humaneval"]
    doc = he.dataset["test"][0]
    passing = he.process_results(doc, [doc["canonical_solution"]])
    assert passing == {"pass@1": 1.0}  # the !function hook reaches the sandbox
    assert he.process_results(doc, ["    return None\n"]) == {"pass@1": 0.0}


def test_online_names_and_humaneval_left_out_unless_opted_in(tmp_path):
    tasks = {"mmlu": {"limit": 5}, "humaneval": {}, "demo_heldout": {"limit": 3}}
    profile = load_profile(str(write_profile(tmp_path / "p.yaml", tasks, offline=False)))
    prepared = prepare_tasks(profile, tmp_path / "t", write_heldout(tmp_path / "h.jsonl"))
    assert [(t.name, t.lm_eval_task, t.limit) for t in prepared] == [
        ("mmlu", "mmlu", 5), ("demo_heldout", "refinery_demo_heldout", None)]
    # opted in, HumanEval stays local even online: its code runs in refinery's sandbox, not lm-eval's
    profile = load_profile(str(write_profile(tmp_path / "q.yaml", tasks, offline=False, humaneval_execute=True)))
    prepared = prepare_tasks(profile, tmp_path / "u", write_heldout(tmp_path / "h.jsonl"))
    assert [t.lm_eval_task for t in prepared] == ["mmlu", "refinery_humaneval", "refinery_demo_heldout"]


def test_bad_heldout_line_names_file_line_and_field(tmp_path):
    path = write_heldout(tmp_path / "heldout.jsonl", 3)
    with open(path, "a") as f:
        f.write(json.dumps({"id": "x", "family": "f", "prompt": "p", "choices": ["a", "b"], "label": 0}) + "\n")
    profile = load_profile(str(write_profile(tmp_path / "p.yaml", {"demo_heldout": {}})))
    with pytest.raises(EvalDataError, match=r"heldout.jsonl:4: missing field 'answer'"):
        prepare_tasks(profile, tmp_path / "t", path)


def test_subset_is_a_hash_order_not_the_first_items():
    docs = [{"key": str(i)} for i in range(100)]
    subset = select_subset("mmlu", docs, 10)
    assert len(subset) == 10 and subset != docs[:10]
    # chosen by key, not by position: the same items whatever the file order
    assert {d["key"] for d in subset} == {d["key"] for d in select_subset("mmlu", docs[::-1], 10)}
    assert subset != select_subset("gsm8k", docs, 10)  # each task its own draw


# --------------------------------------------------------------------------- statistics


def test_standard_error_of_a_mean_matches_the_binomial_formula():
    x = np.array([1.0] * 30 + [0.0] * 70)
    se, method = standard_error("acc", x)
    assert se == pytest.approx(np.sqrt(0.3 * 0.7 / 99), rel=1e-9) and "sqrt(n)" in method


def test_paired_retention_point_and_interval():
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.6).astype(float)
    same = paired_retention("acc", True, base.copy(), base)
    assert same["value"] == 1.0 and same["ci_low"] == same["ci_high"] == 1.0  # identical answers: no doubt
    worse = base.copy()
    worse[np.flatnonzero(base)[:48]] = 0.0  # 48 of ~240 right answers lost
    r = paired_retention("acc", True, worse, base)
    assert r["value"] == pytest.approx(worse.mean() / base.mean())
    assert r["ci_low"] < r["value"] < r["ci_high"] < 1.0
    # the paired interval is narrower than one ignoring the pairing would be
    independent = np.sqrt(standard_error("acc", worse)[0] ** 2 + standard_error("acc", base)[0] ** 2) / base.mean()
    assert (r["ci_high"] - r["ci_low"]) < 2 * 1.96 * independent


def test_perplexity_retention_is_inverted_and_zero_baseline_is_undefined():
    ll_base, words = np.array([-100.0, -200.0, -150.0]), np.array([40.0, 80.0, 60.0])
    ll_stage = ll_base * 1.1  # worse: higher perplexity
    r = paired_retention("word_perplexity", False, ll_stage, ll_base, words, words)
    expected = aggregate("word_perplexity", ll_base, words) / aggregate("word_perplexity", ll_stage, words)
    assert r["value"] == pytest.approx(expected) and r["value"] < 1
    zero = paired_retention("acc", True, np.array([1.0, 0.0]), np.zeros(2))
    assert zero["value"] is None and "undefined" in zero["note"]


# --------------------------------------------------------------------------- fidelity


def test_fidelity_sees_damage_and_nothing_else():
    """KL divergence, top-1 agreement and perplexity against a stored reference: zero for the same
    model, growing with damage, intervals around the point estimate."""
    from refinery import fidelity

    rng = np.random.default_rng(0)
    tokens = fidelity.TokenSet(rng.integers(0, 50, (6, 17)).astype(np.int32), ("wikitext",) * 3 + ("conversations",) * 3)
    ref_logits = {tuple(c): rng.normal(0, 3, (17, 50)).astype(np.float32) for c in tokens.chunks}
    same = lambda ids: ref_logits[tuple(ids)]  # noqa: E731
    small = lambda ids: ref_logits[tuple(ids)] + rng.normal(0, 0.1, (17, 50)).astype(np.float32)  # noqa: E731
    large = lambda ids: ref_logits[tuple(ids)] + rng.normal(0, 2.0, (17, 50)).astype(np.float32)  # noqa: E731
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "ref.npy"
        ref_stats = fidelity.write_reference(same, tokens, ref)
        s_same = fidelity.summarize(fidelity.score(same, tokens, ref), tokens.sources)
        s_small = fidelity.summarize(fidelity.score(small, tokens, ref), tokens.sources)
        s_large = fidelity.summarize(fidelity.score(large, tokens, ref), tokens.sources)
    assert s_same["kld_mean"]["value"] < 1e-3 and s_same["top1_agreement"]["value"] == 1.0  # float16 storage only
    assert s_same["perplexity"]["value"] == pytest.approx(fidelity.summarize(ref_stats)["perplexity"]["value"], rel=1e-3)
    assert s_small["kld_mean"]["value"] < s_large["kld_mean"]["value"]
    assert s_large["kld_mean"]["ci_low"] > s_small["kld_mean"]["ci_high"]  # intervals apart
    assert s_large["top1_agreement"]["value"] < s_small["top1_agreement"]["value"]
    k = s_large["kld_mean"]
    assert k["ci_low"] <= k["value"] <= k["ci_high"] and s_large["predictions"] == 6 * 16
    assert set(s_large["by_source"]) == {"wikitext", "conversations"}
    assert s_large["kld_p99"]["value"] > k["value"]


# --------------------------------------------------------------------------- real runs on a tiny model


def _small_profile(tmp_path: Path, shared_data: Path, monkeypatch, generative: bool = False):
    monkeypatch.setenv("REFINERY_SHARED_DATA", str(shared_data))
    tasks = {"mmlu": {"limit": 5}, "demo_heldout": {"limit": 10, "min_retention": 0.5}}
    if generative:  # a few tokens each: the task YAMLs' generation and filters run, not the model's skill
        tasks.update(gsm8k={"limit": 2, "num_fewshot": 1, "max_gen_toks": 4}, bbh={"limit": 2, "max_gen_toks": 4},
                     wikitext={"limit": 1})
    return load_profile(str(write_profile(tmp_path / "small.yaml", tasks, max_length=256)))


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory) -> Path:
    from refinery.gguf_export import convert_to_gguf

    return convert_to_gguf(tiny_model, tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf", "Q8_0")


def test_tasks_run_in_llama_cpp_as_trained_and_are_answered_once(tmp_path, tiny_gguf, shared_data, monkeypatch):
    from refinery import lm_llamacpp

    profile = _small_profile(tmp_path, shared_data, monkeypatch, generative=True)
    prepared = prepare_tasks(profile, tmp_path / "tasks", write_heldout(tmp_path / "heldout.jsonl"))
    cand = Candidate("tiny", "recovered_model", "v0", "chain", tiny_gguf, "sha-tiny", None)
    manager = task_manager(profile, tmp_path / "tasks")
    prompts: list[str] = []
    greedy = lm_llamacpp.LlamaCppLM._greedy

    def recording(self, prompt, until, max_new):
        prompts.append(self._llm.detokenize(prompt, special=True).decode())
        return greedy(self, prompt, until, max_new)

    monkeypatch.setattr(lm_llamacpp.LlamaCppLM, "_greedy", recording)
    scores, items = score_tasks(cand, prepared, manager, profile, tmp_path / "work", tmp_path / "out", lambda _m: None)
    assert {k: s.n for k, s in scores.items()} == {"mmlu": 5, "demo_heldout": 10, "gsm8k": 2, "bbh": 2, "wikitext": 1}
    assert scores["wikitext"].value > 1000  # a random model is nearly uniform over 49k tokens
    assert scores["demo_heldout"].metric == "exact_match,answer"
    # the held-out task is asked the way the model was trained: chat template, then the answer prefix
    held = [p for p in prompts if "What is" in p and "plus" in p]
    assert len(held) == 10 and all(p.startswith("<|im_start|>") and p.endswith("The answer is ") for p in held)
    for name in ("mmlu", "demo_heldout"):
        assert scores[name].value == pytest.approx(items[name].values.mean()) and scores[name].stderr is not None
    # a second scoring of the same file answers from the cache: no generation runs again
    prompts.clear()
    again, _ = score_tasks(cand, prepared, manager, profile, tmp_path / "work", tmp_path / "out2", lambda _m: None)
    assert prompts == [] and {k: s.value for k, s in again.items()} == {k: s.value for k, s in scores.items()}


def test_build_scores_every_gguf_and_records_the_gates(tmp_path, tiny_model, tiny_gguf, shared_data, monkeypatch):
    """The whole stage on a tiny model: real quant_baselines (llama.cpp's quantizer), real GGUFs,
    real llama.cpp; then DuckDB history."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from refinery import baselines, evaluate, report

    home = tmp_path / "home"
    monkeypatch.setenv("REFINERY_HOME", str(home))
    profile = _small_profile(tmp_path, shared_data, monkeypatch)
    inputs = {}
    with staged_artifact("raw_corpus", home=home) as st:
        write_heldout(st.path / "heldout.jsonl", 60)
    inputs["raw_corpus"] = load_artifact(st.path)
    mmlu_q = "A lesion causing compression of the facial nerve at the stylomastoid foramen will cause ipsilateral"
    kept = pa.table({"id": ["clean", "dirty"], "lang": ["en", "en"], "messages": [
        [{"role": "user", "content": "Write a haiku about the sea."}, {"role": "assistant", "content": "Waves."}],
        [{"role": "user", "content": f"Quiz: {mmlu_q}? Answer briefly."}, {"role": "assistant", "content": "Yes."}]]})
    with staged_artifact("deduped_corpus", home=home) as st:
        pq.write_table(kept, st.path / "kept.parquet")
    inputs["deduped_corpus"] = load_artifact(st.path)
    for stage in ("base_model", BASELINE, "gguf_zst", "recovered_model"):
        with staged_artifact(stage, home=home) as st:
            shutil.copytree(tiny_model, st.path / "model")
            if stage in ("gguf_zst", "recovered_model"):
                shutil.copyfile(tiny_gguf, st.path / "model.gguf")
                (st.path / "model.gguf.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(tiny_gguf.read_bytes()))
        inputs[stage] = load_artifact(st.path)
    inputs["quant_baselines"] = baselines.build(profile, inputs=inputs, home=home, log=lambda _m: None)

    art = evaluate.build(profile, inputs=inputs, home=home, log=lambda _m: None)
    doc = evaluate.load_report(art.path)
    by = {m["label"]: m for m in doc["models"]}
    assert set(by) == {BASELINE, "gguf_zst", "recovered_model", "base_model", f"{BASELINE}.Q8_0",
                       f"{BASELINE}.Q4_0", f"{BASELINE}.Q4_0+imatrix"}
    assert by[BASELINE]["fidelity"]["kld_mean"]["value"] == 0
    assert by[f"{BASELINE}.Q4_0"]["zst_bytes"] < by[f"{BASELINE}.Q8_0"]["zst_bytes"] < by[BASELINE]["zst_bytes"]
    # the same file scores the same: the shipped Q8_0 and the plain Q8_0 are both our tiny model
    assert by["recovered_model"]["fidelity"]["kld_mean"]["value"] == by["gguf_zst"]["fidelity"]["kld_mean"]["value"]
    assert by["base_model"]["fidelity"] is None and by["base_model"]["scores"]  # tasks only
    assert doc["gates"]["max_kld"] == profile.gates.max_kld and doc["gates"]["max_bytes"] == profile.release.max_bytes
    assert doc["token_set"]["predictions"] == 8 * 63 and set(doc["token_set"]["sources"]) == {"wikitext", "conversations"}
    assert doc["tasks"]["demo_heldout"]["gated"] is False  # a random model is not above chance
    assert "why_not_gated" in doc["tasks"]["demo_heldout"]
    assert doc["release_candidate"]["llama_cpp_loads"] is True
    d = doc["decontamination"]
    assert d["remaining"] == 1 and d["remaining_examples"][0]["id"] == "dirty"
    for name in ("report.json", "report.md", "pareto.png", "tasks.png", "items.jsonl", "tokens.npz"):
        assert (art.path / name).is_file(), name
    md = (art.path / "report.md").read_text()
    assert "## What the chain bought" in md and "KLD mean" in md and "% of" not in md

    # a second report of the same files scores nothing again (every GGUF's fidelity is cached)
    cached = sorted(p.stat().st_mtime_ns for p in (home / "work" / "benchmark_report" / "fidelity").glob("*.npz"))
    evaluate.build(profile, inputs=inputs, home=home, log=lambda _m: None)
    assert sorted(p.stat().st_mtime_ns for p in (home / "work" / "benchmark_report" / "fidelity").glob("*.npz")) == cached

    db = duckdb.connect(str(tmp_path / "scores.duckdb"))
    n = report.record_scores(db, doc, run_id="run-1")
    report.record_scores(db, doc, run_id="run-2")
    report.record_scores(db, doc, run_id="run-2")  # a retry replaces, does not duplicate
    assert db.execute("SELECT count(*) FROM benchmark_scores").fetchone()[0] == 2 * n
    row = db.execute("""SELECT value, ci_low, ci_high FROM benchmark_scores WHERE run_id='run-1'
                        AND stage='qlora_model.Q4_0' AND task='fidelity' AND metric='kld_mean'""").fetchone()
    assert row[1] <= row[0] <= row[2]


@pytest.mark.slow
def test_a_damaged_gguf_is_refused_by_the_fidelity_and_pareto_gates(tmp_path_factory, tmp_path, shared_data,
                                                                       monkeypatch):
    """SmolLM2 as the dense model: its Q8_0 passes; the same Q8_0 with random sign flips in three
    layers' block scales is refused by the fidelity gate and dominated by llama.cpp's plain Q4_0."""
    import gguf

    from refinery import fidelity, gguf_export, llamacpp, runner
    from refinery.evaluate import pareto
    from refinery.release import check_fidelity, check_pareto

    monkeypatch.setenv("REFINERY_SHARED_DATA", str(shared_data))
    profile = load_profile("demo")
    home = tmp_path_factory.getbasetemp() / "smollm2-home"  # shared with tests/test_base_model.py
    base, _ = runner.run("base_model", {}, profile, home=home, log=lambda _m: None)
    f16 = gguf_export.convert_to_gguf(base.path / "model", tmp_path / "ref.F16.gguf", "F16")
    files = {"Q8_0": tmp_path / "q8.gguf", "Q4_0": tmp_path / "q4.gguf"}
    for ftype, path in files.items():
        llamacpp.quantize(f16, path, ftype)
    damaged = tmp_path / "damaged.gguf"
    shutil.copyfile(files["Q8_0"], damaged)
    rng = np.random.default_rng(0)
    for tensor in gguf.GGUFReader(str(damaged)).tensors:
        if tensor.name not in ("blk.4.ffn_down.weight", "blk.12.ffn_down.weight", "blk.20.ffn_down.weight"):
            continue
        assert tensor.tensor_type.name == "Q8_0"  # blocks of a float16 scale and 32 int8 values
        blocks = np.memmap(damaged, dtype=np.uint8, mode="r+", offset=tensor.data_offset,
                           shape=(tensor.n_bytes // 34, 34))
        blocks[rng.random(len(blocks)) < 0.5, 1] ^= 0x80  # the scale's sign bit: half the blocks negated
        blocks.flush()
        del blocks

    with llamacpp.loaded(f16, n_ctx=64) as llm:
        tokens = fidelity.build_token_set(lambda t: llm.tokenize(t.encode(), add_bos=False), heldout_text_of(profile),
                                          [], chunk=128, wikitext_chunks=6, conversation_chunks=0)
    ref = tmp_path / "ref.npy"
    with llamacpp.chunk_logits(f16, 128) as logits:
        fidelity.write_reference(logits, tokens, ref)
    models = [{"label": BASELINE, "role": "reference", "zst_bytes": None, "fidelity": None}]
    for label, path in (("q8", files["Q8_0"]), ("damaged", damaged), (f"{BASELINE}.Q4_0", files["Q4_0"])):
        with llamacpp.chunk_logits(path, 128) as logits:
            models.append({"label": label, "role": "baseline" if label.endswith("Q4_0") else "chain",
                           "zst_bytes": gguf_export.zstd_size(path, 3),
                           "fidelity": fidelity.summarize(fidelity.score(logits, tokens, ref))})
    by = {m["label"]: m for m in models}
    assert by["damaged"]["fidelity"]["kld_mean"]["ci_low"] > by["q8"]["fidelity"]["kld_mean"]["ci_high"]
    gates = {"max_kld": profile.gates.max_kld, "pareto": True}
    for shipped, passes in (("q8", True), ("damaged", False)):
        ms = [{**m, "label": SHIPPED if m["label"] == shipped else m["label"]} for m in models if m["label"] in
              (BASELINE, shipped, f"{BASELINE}.Q4_0")]
        doc = {"shipped": SHIPPED, "models": ms, "gates": gates, "pareto": pareto(ms)}
        assert check_fidelity(doc).passed is passes, shipped
        assert check_pareto(doc).passed is passes, shipped
        if not passes:
            assert f"{BASELINE}.Q4_0" in check_pareto(doc).why and "too far" in check_fidelity(doc).why


def heldout_text_of(profile) -> str:
    from refinery.modelstats import heldout_text

    return heldout_text(profile)
