"""benchmark_report: task YAMLs, statistics, the HumanEval sandbox, and real lm-eval runs on a tiny Llama."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from pathlib import Path

import duckdb
import numpy as np
import pytest
import yaml
import zstandard

from refinery.artifacts import load_artifact, staged_artifact
from refinery.config import load_profile
from refinery.eval_tasks import EvalDataError, prepare_tasks, select_subset
from refinery.evaluate import (BASELINE, MODEL_STAGES, Candidate, aggregate, paired_retention,
                               score_candidate, standard_error, task_manager)
from refinery.humaneval_exec import network_isolation, run_program

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
                                "answer": str(2 * i), "choices": [str(2 * i), str(2 * i + 1), str(i), str(3 * i)],
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


# --------------------------------------------------------------------------- HumanEval sandbox


def test_sandbox_passes_fails_times_out_and_has_no_environment():
    assert run_program("assert 1 + 1 == 2\n").passed
    failed = run_program("raise SystemExit(3)\n")
    assert not failed.passed and failed.status == "failed"
    assert run_program("while True:\n    pass\n", timeout_s=2).status == "timeout"
    assert run_program("import os\nassert dict(os.environ) == {} or set(os.environ) <= {'LC_CTYPE'}\n").passed


def test_sandbox_cannot_reach_a_server_on_this_machine():
    assert network_isolation(), "unshare -n should work here (root or user namespaces)"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    probe = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    try:
        assert not run_program(probe).passed
    finally:
        server.close()


# --------------------------------------------------------------------------- real lm-eval runs


def _small_profile(tmp_path: Path, shared_data: Path, monkeypatch, wikitext_docs: int = 2, generative: bool = False):
    monkeypatch.setenv("REFINERY_SHARED_DATA", str(shared_data))
    tasks = {"mmlu": {"limit": 5}, "demo_heldout": {"limit": 10, "min_retention": 0.5}}
    if wikitext_docs:
        tasks["wikitext"] = {"limit": wikitext_docs}
    if generative:  # a few tokens each: the task YAMLs' generation and filters run, not the model's skill
        tasks.update(gsm8k={"limit": 2, "num_fewshot": 1, "max_gen_toks": 4}, bbh={"limit": 2, "max_gen_toks": 4})
    # a 256-token window keeps rolling perplexity cheap (49k-vocab logits per window)
    return load_profile(str(write_profile(tmp_path / "small.yaml", tasks, max_length=256, batch_size=4)))


def test_lm_eval_scores_a_tiny_model(tmp_path, tiny_model, shared_data, monkeypatch):
    profile = _small_profile(tmp_path, shared_data, monkeypatch, generative=True)
    prepared = prepare_tasks(profile, tmp_path / "tasks", write_heldout(tmp_path / "heldout.jsonl"))
    cand = Candidate("tiny", "base_model", "v0", "hf", tiny_model)
    manager = task_manager(profile, tmp_path / "tasks")
    result, items = score_candidate(cand, prepared, manager, profile, tmp_path / "out")
    assert {k: s.n for k, s in result.scores.items()} == {"mmlu": 5, "demo_heldout": 10, "wikitext": 2,
                                                          "gsm8k": 2, "bbh": 2}
    assert result.scores["bbh"].metric == "exact_match,first-line"
    assert result.scores["gsm8k"].metric == "exact_match,flexible-extract"
    for name in ("mmlu", "demo_heldout"):  # lm-eval's number is the mean of the per-item values we pair on
        s = result.scores[name]
        assert s.value == pytest.approx(items[name].values.mean()) and s.stderr is not None
    ppl = result.scores["wikitext"]
    assert ppl.value == pytest.approx(aggregate("word_perplexity", items["wikitext"].values, items["wikitext"].weights))
    assert ppl.value > 1000 and ppl.stderr > 0  # a random model is nearly uniform over 49k tokens
    raw = json.loads((tmp_path / "out" / "results.json").read_text())
    assert raw["results"]["refinery_mmlu"]["acc,none"] == result.scores["mmlu"].value
    assert "PyTorch version" in raw["pretty_env_info"]  # lm-eval's environment report, collected once
    assert result.parameters > 3_000_000 and 31 < result.bits_per_weight < 33  # fp32 weights


def test_build_scores_every_stage_and_records_history(tmp_path, tiny_model, shared_data, monkeypatch):
    """The whole stage on fake upstream artifacts (every model the tiny Llama, real GGUFs, real llama.cpp)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from refinery import evaluate, report
    from refinery.gguf_export import convert_to_gguf

    home = tmp_path / "home"
    monkeypatch.setenv("REFINERY_HOME", str(home))
    profile = _small_profile(tmp_path, shared_data, monkeypatch, wikitext_docs=0)  # perplexity: test above
    inputs = {}
    with staged_artifact("raw_corpus", home=home) as st:
        write_heldout(st.path / "heldout.jsonl")
    inputs["raw_corpus"] = load_artifact(st.path)
    mmlu_q = "A lesion causing compression of the facial nerve at the stylomastoid foramen will cause ipsilateral"
    kept = pa.table({"id": ["clean", "dirty"], "messages": [
        [{"role": "user", "content": "Write a haiku about the sea."}],
        [{"role": "user", "content": f"Quiz: {mmlu_q}? Answer briefly."}]]})
    with staged_artifact("deduped_corpus", home=home) as st:
        pq.write_table(kept, st.path / "kept.parquet")
    inputs["deduped_corpus"] = load_artifact(st.path)
    gguf = convert_to_gguf(tiny_model, tmp_path / "tiny.Q8_0.gguf", "Q8_0")
    for stage in MODEL_STAGES:
        with staged_artifact(stage, home=home) as st:
            shutil.copytree(tiny_model, st.path / "model")
            if stage in ("gguf_zst", "recovered_model"):
                shutil.copyfile(gguf, st.path / "model.gguf")
                (st.path / "model.gguf.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(gguf.read_bytes()))
        inputs[stage] = load_artifact(st.path)

    art = evaluate.build(profile, inputs=inputs, home=home, log=lambda _m: None)
    doc = evaluate.load_report(art.path)
    labels = [m["label"] for m in doc["models"]]
    assert labels == ["base_model", BASELINE, "pruned_model", "awq_model", "gguf_zst", "recovered_model",
                      "recovered_model.gguf", f"{BASELINE}.Q4_0", f"{BASELINE}.Q8_0"]
    by = {m["label"]: m for m in doc["models"]}
    # the same weights in the same format score the same on the same items: retention exactly 1
    assert doc["retention"]["recovered_model"]["demo_heldout"]["value"] == pytest.approx(1.0)
    assert by[f"{BASELINE}.Q4_0"]["bytes"] < by[f"{BASELINE}.Q8_0"]["bytes"] < by[BASELINE]["bytes"]
    assert by[f"{BASELINE}.Q4_0"]["bits_per_weight"] < by[f"{BASELINE}.Q8_0"]["bits_per_weight"] < by[BASELINE]["bits_per_weight"]
    assert all(by[l]["tokens_per_second"] > 0 for l in labels if by[l]["kind"] == "gguf")
    assert doc["release_candidate"]["llama_cpp_loads"] is True
    assert doc["humaneval"] == {"requested": False, "executed": False, "sandbox": None}
    d = doc["decontamination"]
    assert d["remaining"] == 1 and d["remaining_examples"][0]["id"] == "dirty" and "mmlu" in \
        d["remaining_examples"][0]["detail"]
    for name in ("report.json", "report.md", "pareto.png", "tasks.png", "items.jsonl", "lm_eval/qlora_model/results.json"):
        assert (art.path / name).is_file(), name
    md = (art.path / "report.md").read_text()
    assert "±" in md and "% of" not in md

    db = duckdb.connect(str(tmp_path / "scores.duckdb"))
    n = report.record_scores(db, doc, run_id="run-1")
    report.record_scores(db, doc, run_id="run-2")
    report.record_scores(db, doc, run_id="run-2")  # a retry replaces, does not duplicate
    assert db.execute("SELECT count(*) FROM benchmark_scores").fetchone()[0] == 2 * n
    row = db.execute("""SELECT value, ci_low, ci_high FROM benchmark_scores WHERE run_id='run-1'
                        AND stage='pruned_model' AND task='demo_heldout' AND metric='retention:acc'""").fetchone()
    assert row[0] == pytest.approx(1.0)
