"""The gated release: bundle contents, each gate failing on its own problem, and Dagster blocking release."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

from refinery import report as report_files
from refinery.artifacts import Artifact, latest, load_artifact, require_latest, staged_artifact
from refinery.config import load_profile
from refinery.evaluate import paired_retention
from refinery.release import ReleaseBlocked, build, gates
from refinery.stages import BASELINE, SHIPPED

SMOKE = Path(__file__).resolve().parents[1] / "profiles" / "smoke.yaml"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}")


def write_profile(path: Path, min_retention: float = 0.9, max_bytes: int = 50_000_000, max_kld: float = 0.2) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    raw["name"] = path.stem
    raw["eval"]["tasks"] = {"demo_heldout": {"limit": 200, "min_retention": min_retention}, "mmlu": {"limit": 200}}
    raw["release"]["max_bytes"] = max_bytes
    raw["gates"] = {"max_kld": max_kld, "pareto": True}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def make_stage(home: Path, stage: str) -> Artifact:
    """A fake upstream artifact with the files the release reads."""
    with staged_artifact(stage, home=home, config={"train": {"lora_r": 8}} if stage == "qlora_model" else {}) as st:
        if stage == "qlora_model":
            (st.path / "axolotl.yaml").write_text("adapter: qlora\nlora_r: 8\n")
        if stage in ("pruned_model", "awq_model"):
            (st.path / "recipe.yaml").write_text(f"# {stage}\nmodifiers: []\n")
        if stage == SHIPPED:
            (st.path / "model").mkdir()
            (st.path / "model" / "tokenizer_config.json").write_text(json.dumps(
                {"chat_template": CHATML, "eos_token": "<|im_end|>"}))
            gguf = b"GGUF" + np.random.default_rng(0).integers(0, 16, 300_000, dtype=np.uint8).tobytes()
            (st.path / "model.gguf").write_bytes(gguf)
            (st.path / "model.gguf.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(gguf))
        if stage == "deduped_corpus":
            pq.write_table(pa.table({"id": ["a"], "messages": [[{"role": "user", "content": "Say hello."}]]}),
                           st.path / "kept.parquet")
    return load_artifact(st.path)


def interval(value: float, half: float) -> dict:
    return {"value": value, "ci_low": value - half, "ci_high": value + half}


def fid(kld: float, half: float = 0.01) -> dict:
    return {"kld_mean": interval(kld, half), "kld_p99": interval(10 * kld, 10 * half),
            "top1_agreement": interval(1 - kld, half), "perplexity": interval(10 + kld, 0.5),
            "predictions": 1000, "by_source": {}}


def make_report(home: Path, inputs: dict[str, Artifact], profile, *, recovered_correct: int = 155,
                shipped_kld: float = 0.10, plain_kld: float = 0.20, plain_zst: int | None = None,
                llama_cpp_loads: bool = True, remaining: int = 0, humaneval_requested: bool = False) -> Artifact:
    """A benchmark_report as refinery.evaluate writes it, with chosen measurements: 200 held-out
    items (the baseline right on 160), the shipped file's KL divergence and one plain baseline's."""
    from refinery.evaluate import pareto

    base = np.array([1.0] * 160 + [0.0] * 40)
    stage = base.copy()
    stage[recovered_correct:160] = 0.0
    rec = inputs[SHIPPED]
    zst = (rec.path / "model.gguf.zst").stat().st_size

    def model(label: str, role: str, size: int, kld: float | None, values: np.ndarray | None) -> dict:
        scores = {} if values is None else {
            t: {"task": t, "metric": "exact_match,answer", "value": float(values.mean()),
                "stderr": float(values.std(ddof=1) / np.sqrt(len(values))), "stderr_method": "sample std / sqrt(n)",
                "n": 200, "higher_is_better": True} for t in ("demo_heldout", "mmlu")}
        return {"label": label, "stage": label, "version": "v1", "role": role, "file": "", "sha256": "x",
                "zst_bytes": size, "bytes": size, "note": "", "fidelity": None if kld is None else fid(kld),
                "scores": scores, "tokens_per_second": 100.0}

    models = [model(BASELINE, "reference", 4 * zst, 0.0, base), model(SHIPPED, "chain", zst, shipped_kld, stage),
              model(f"{BASELINE}.Q4_0", "baseline", plain_zst or zst + 1000, plain_kld, None)]
    gates = {**profile.gates.model_dump(), "max_bytes": profile.release.max_bytes,
             "min_retention": {"demo_heldout": profile.eval.tasks["demo_heldout"].min_retention},
             "recorded_from": profile.source_file}
    doc = {
        "run_id": "r1", "created": "2026-12-01T03:00:00Z", "profile": "test", "baseline": BASELINE, "shipped": SHIPPED,
        "token_set": {"chunks": 4, "chunk": 251, "predictions": 1000, "digest": "d", "sources": {"wikitext": 4}},
        "fidelity_method": "KL", "models": models, "lineage": {},
        "tasks": {"demo_heldout": {"lm_eval_task": "refinery_demo_heldout", "metric": "exact_match,answer",
                                   "higher_is_better": True, "items": 200, "num_fewshot": 0, "chance": 0.0,
                                   "min_retention": gates["min_retention"]["demo_heldout"], "gated": True},
                  "mmlu": {"lm_eval_task": "refinery_mmlu", "metric": "acc,none", "higher_is_better": True,
                           "items": 200, "num_fewshot": 0, "chance": 0.25, "min_retention": None, "gated": False,
                           "why_not_gated": "qlora_model does not score above chance"}},
        "retention": {SHIPPED: {t: paired_retention("exact_match", True, stage, base) for t in ("demo_heldout", "mmlu")}},
        "retention_method": "paired bootstrap over items", "fine_tuning": {},
        "pareto": pareto(models), "gates": gates,
        "humaneval": {"requested": humaneval_requested, "executed": False, "sandbox": None},
        "decontamination": {"checked": True, "passed": remaining == 0, "ngram": 13, "action": "remove",
                            "deduped_corpus": "v1", "eval_sets": {"mmlu": 1}, "kept_records": 1, "removed": 2,
                            "removed_examples": [{"id": "x", "detail": "mmlu: shares the 13-gram '...'"}] * 2,
                            "remaining": remaining, "remaining_examples": []},
        "release_candidate": {
            "stage": SHIPPED, "version": rec.version, "artifact": str(rec.path),
            "gguf": str(rec.path / "model.gguf"), "gguf_zst": str(rec.path / "model.gguf.zst"),
            "gguf_sha256": rec.manifest["files"]["model.gguf"]["sha256"],
            "gguf_zst_sha256": rec.manifest["files"]["model.gguf.zst"]["sha256"],
            "gguf_zst_bytes": zst, "llama_cpp_loads": llama_cpp_loads, "llama_cpp_sample": "Paris",
            "llama_cpp_error": "" if llama_cpp_loads else "exit code 1"}}
    with staged_artifact("benchmark_report", home=home, inputs={k: a.ref() for k, a in inputs.items()}) as st:
        (st.path / "lm_eval" / SHIPPED).mkdir(parents=True)
        (st.path / "lm_eval" / SHIPPED / "results.0.json").write_text("{}")
        report_files.write_report_files(doc, st.path)
    return load_artifact(st.path)


@pytest.fixture
def upstream(refinery_home) -> dict[str, Artifact]:
    return {s: make_stage(refinery_home, s) for s in ("qlora_model", "pruned_model", "awq_model", SHIPPED)}


def test_release_bundle_contents(refinery_home, upstream, tmp_path):
    profile = load_profile(str(write_profile(tmp_path / "p.yaml")))
    rep = make_report(refinery_home, upstream, profile, humaneval_requested=True)  # 0.969 retained >= 0.9
    report_md = (rep.path / "report.md").read_text()
    assert "HumanEval: **not executed**" in report_md and "## What the chain bought" in report_md
    art = build(profile, inputs={"benchmark_report": rep}, home=refinery_home, log=lambda _m: None)
    files = set(art.manifest["files"])
    assert {"model.gguf.zst", "README.md", "Modelfile", "SHA256SUMS", "report.json", "report.md", "pareto.png",
            "recipes/qlora_model.axolotl.yaml", "recipes/pruned_model.recipe.yaml", "recipes/awq_model.recipe.yaml",
            f"lm_eval/{SHIPPED}/results.0.json"} <= files
    assert art.manifest["metrics"]["report_version"] == rep.version and art.version != rep.version
    source = upstream[SHIPPED].manifest["files"]["model.gguf.zst"]["sha256"]
    assert art.manifest["files"]["model.gguf.zst"]["sha256"] == source
    for line in (art.path / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((art.path / name).read_bytes()).hexdigest() == digest, name

    card = (art.path / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["license"] == "apache-2.0" and "refinery-demo" in meta["datasets"] and "gguf" in meta["tags"]
    assert "| refinery-demo |" in body and "Apache-2.0" in body  # data source with its licence
    assert "(this file)" in body and "0.1000 [0.0900, 0.1100]" in body  # KLD with its interval
    assert "0.969 [" in body and " ± " in body  # retention with its interval, scores with errors
    assert "mmlu carries no retention gate" in body
    assert "| not_beaten_by_plain_quantization | yes (nothing to compare: every plain quantization tried is larger) |" in body
    assert "## Known limits" in body and "% of GPT" not in body
    assert "| humaneval | pass@1 | - | - | not executed |" in body  # no number for code not run
    assert "QLoRA (rank 8)" in body  # described from what the artifacts recorded

    modelfile = (art.path / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and "<|im_start|>user\n{{ .Prompt }}<|im_end|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def failed(report_art) -> set[str]:
    doc = json.loads((report_art.path / "report.json").read_text())
    return {g.name for g in gates(doc) if not g.passed}


def test_each_gate_fails_on_its_own_problem(refinery_home, upstream, tmp_path):
    profile = load_profile(str(write_profile(tmp_path / "p.yaml")))
    low = make_report(refinery_home, upstream, profile, recovered_correct=120)  # 0.75 < 0.9
    with pytest.raises(ReleaseBlocked, match="retention_meets_thresholds") as blocked:
        build(profile, inputs={"benchmark_report": low}, home=refinery_home)
    assert "The release was not made" in str(blocked.value) and "demo_heldout keeps" in str(blocked.value)
    assert latest("release", refinery_home) is None  # nothing published, nothing half-written left

    assert failed(make_report(refinery_home, upstream, profile)) == set()
    # the interval, not the point: 0.195 is under 0.2, its upper bound 0.205 is not
    assert failed(make_report(refinery_home, upstream, profile, shipped_kld=0.195, plain_kld=0.5)) == \
        {"fidelity_within_limits"}
    # a plain quantization no larger and better, intervals apart: dominated
    assert failed(make_report(refinery_home, upstream, profile, shipped_kld=0.15, plain_kld=0.05,
                              plain_zst=1000)) == {"not_beaten_by_plain_quantization"}
    # better but larger, or not separable: not dominated
    assert failed(make_report(refinery_home, upstream, profile, shipped_kld=0.15, plain_kld=0.05)) == set()
    assert failed(make_report(refinery_home, upstream, profile, shipped_kld=0.15, plain_kld=0.14,
                              plain_zst=1000)) == set()
    assert failed(make_report(refinery_home, upstream, profile, llama_cpp_loads=False)) == {"gguf_loads_in_llamacpp"}
    # a pass that compared nothing says so (the card and the Dagster check show the note)
    notes = {g.name: g.note for g in gates(json.loads((make_report(refinery_home, upstream, profile).path
                                                         / "report.json").read_text()))}
    assert "every plain quantization tried is larger" in notes["not_beaten_by_plain_quantization"]
    smaller = make_report(refinery_home, upstream, profile, shipped_kld=0.15, plain_kld=0.14, plain_zst=1000)
    assert not {g.name: g.note for g in gates(json.loads((smaller.path / "report.json").read_text()))}[
        "not_beaten_by_plain_quantization"]
    assert failed(make_report(refinery_home, upstream, profile, remaining=1)) == {"decontamination_clean"}
    tiny_limit = load_profile(str(write_profile(tmp_path / "small.yaml", max_bytes=1000)))
    assert failed(make_report(refinery_home, upstream, tiny_limit)) == {"release_size_within_limit"}
    # a .gguf.zst that no longer decompresses to the manifest's model.gguf
    rep = make_report(refinery_home, upstream, profile)
    zst = upstream[SHIPPED].path / "model.gguf.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(b"GGUF something else"))
    assert failed(rep) == {"zstd_roundtrip_verifies"}


def test_editing_the_profile_after_the_report_changes_no_verdict(refinery_home, upstream, tmp_path):
    """The gates read the thresholds the report recorded, not the profile as it is at release time."""
    lenient = load_profile(str(write_profile(tmp_path / "lenient.yaml", max_kld=0.5, min_retention=0.5)))
    strict = load_profile(str(write_profile(tmp_path / "strict.yaml", max_kld=0.01, min_retention=0.99,
                                            max_bytes=10)))
    passing = make_report(refinery_home, upstream, lenient, shipped_kld=0.3)
    assert build(strict, inputs={"benchmark_report": passing}, home=refinery_home).manifest["metrics"][
        "report_version"] == passing.version
    blocked = make_report(refinery_home, upstream, strict)
    with pytest.raises(ReleaseBlocked, match="fidelity_within_limits"):
        build(lenient, inputs={"benchmark_report": blocked}, home=refinery_home)


# --------------------------------------------------------------------------- Dagster


def _fake_assets() -> list:
    """Upstream assets with the real keys, writing fake artifacts (the model stages are not under test)."""
    def fake(name: str, deps: list[str]):
        @dg.asset(name=name, deps=deps, required_resource_keys={"refinery"})
        def _asset(context) -> dg.MaterializeResult:
            home = context.resources.refinery.home_path()
            if name == "benchmark_report":
                inputs = {s: require_latest(s, home) for s in ("qlora_model", "pruned_model", "awq_model",
                                                               SHIPPED)}
                art = make_report(home, inputs, context.resources.refinery.load_profile())
            elif name == "deduped_corpus" and context.resources.refinery.load_profile().name == "editing":
                # someone edits the YAML while the run is under way: the run keeps its frozen copy
                path = Path(context.resources.refinery.profile)
                path.write_text(path.read_text().replace("min_retention: 0.9", "min_retention: 0.99"))
                art = make_stage(home, name)
            elif name == "deduped_corpus" and context.resources.refinery.load_profile().name == "dirty":
                # the "dirty" run's corpus keeps an MMLU test question
                with staged_artifact(name, home=home) as st:
                    pq.write_table(pa.table({"id": ["leak"], "messages": [[{"role": "user", "content":
                        "A lesion causing compression of the facial nerve at the stylomastoid foramen will "
                        "cause ipsilateral paralysis"}]]}), st.path / "kept.parquet")
                art = load_artifact(st.path)
            else:
                art = make_stage(home, name)
            return dg.MaterializeResult(metadata={"path": str(art.path)})
        return _asset

    models = ["base_model", "qlora_model", "pruned_model", "awq_model", "gguf_zst", SHIPPED]
    return [fake("raw_corpus", []), fake("deduped_corpus", ["raw_corpus"]),
            *[fake(m, ["deduped_corpus"]) for m in models],
            fake("benchmark_report", [*models, "raw_corpus", "deduped_corpus"])]


def _materialize(refinery_home: Path, profile_path: Path) -> dg.ExecuteInProcessResult:
    from assets import evaluation
    from resources import RefineryResource

    checks = [*evaluation.gate_checks, evaluation.no_eval_contamination]
    return dg.materialize([*_fake_assets(), evaluation.release, *checks], raise_on_error=False,
                          resources={"refinery": RefineryResource(profile=str(profile_path), home=str(refinery_home))})


def _materialized(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def _check(result: dg.ExecuteInProcessResult, name: str) -> bool:
    return next(e.passed for e in result.get_asset_check_evaluations() if e.check_name == name)


def test_failing_check_blocks_release_in_dagster(refinery_home, tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("REFINERY_SHARED_DATA", str(shared_data))
    passing = write_profile(tmp_path / "passing.yaml", min_retention=0.9)
    result = _materialize(refinery_home, passing)
    assert "release" in _materialized(result) and _check(result, "retention_meets_thresholds")
    release = require_latest("release", refinery_home)
    assert (release.path / "model.gguf.zst").exists()

    failing = write_profile(tmp_path / "failing.yaml", min_retention=0.99)  # 155/160 = 0.969 < 0.99
    result = _materialize(refinery_home, failing)
    assert not _check(result, "retention_meets_thresholds")
    assert "benchmark_report" in _materialized(result) and "release" not in _materialized(result)
    assert require_latest("release", refinery_home).version == release.version  # nothing new published

    dirty = write_profile(tmp_path / "dirty.yaml", min_retention=0.9)  # deduped_corpus keeps an MMLU question
    result = _materialize(refinery_home, dirty)
    assert not _check(result, "no_eval_contamination")
    assert "release" not in _materialized(result) and "benchmark_report" not in _materialized(result)


def test_a_profile_edited_mid_run_changes_nothing_in_that_run(refinery_home, tmp_path, shared_data, monkeypatch):
    """The run resolved its profile when it started; the edit (a stricter threshold) reaches the
    next run, not this one."""
    monkeypatch.setenv("REFINERY_SHARED_DATA", str(shared_data))
    path = write_profile(tmp_path / "editing.yaml", min_retention=0.9)
    result = _materialize(refinery_home, path)
    assert "min_retention: 0.99" in path.read_text()  # the edit happened during the run
    assert "release" in _materialized(result) and _check(result, "retention_meets_thresholds")
    report = json.loads((require_latest("benchmark_report", refinery_home).path / "report.json").read_text())
    assert report["gates"]["min_retention"] == {"demo_heldout": 0.9}
