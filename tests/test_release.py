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
from refinery.evaluate import BASELINE, RELEASE_STAGE, paired_retention
from refinery.release import ReleaseBlocked, build, gates

SMOKE = Path(__file__).resolve().parents[1] / "profiles" / "smoke.yaml"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}")


def write_profile(path: Path, min_retention: float = 0.8, max_bytes: int = 50_000_000) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    raw["name"] = path.stem
    raw["eval"]["tasks"] = {"demo_heldout": {"limit": 200, "min_retention": min_retention}, "mmlu": {"limit": 200}}
    raw["release"]["max_bytes"] = max_bytes
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def make_stage(home: Path, stage: str) -> Artifact:
    """A fake upstream artifact with the files the release reads."""
    with staged_artifact(stage, home=home) as st:
        if stage == "qlora_model":
            (st.path / "axolotl.yaml").write_text("adapter: qlora\nlora_r: 8\n")
        if stage in ("pruned_model", "awq_model"):
            (st.path / "recipe.yaml").write_text(f"# {stage}\nmodifiers: []\n")
        if stage == RELEASE_STAGE:
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


def make_report(home: Path, inputs: dict[str, Artifact], *, recovered_correct: int = 150,
                llama_cpp_loads: bool = True, remaining: int = 0, humaneval_requested: bool = False) -> Artifact:
    """A benchmark_report built from per-item results (200 held-out items, baseline right on 160)."""
    base = np.array([1.0] * 160 + [0.0] * 40)
    stage = base.copy()
    stage[recovered_correct:160] = 0.0
    rec = inputs[RELEASE_STAGE]

    def model(label: str, values: np.ndarray, size: int) -> dict:
        se = float(values.std(ddof=1) / np.sqrt(len(values)))
        return {"label": label, "stage": label, "version": "v1", "kind": "hf", "path": "", "note": "",
                "parameters": 1000, "bytes": size, "bits_per_weight": 8 * size / 1000, "tokens_per_second": None,
                "scores": {t: {"task": t, "metric": "acc,none", "value": float(values.mean()), "stderr": se,
                               "stderr_method": "lm-eval", "n": 200, "higher_is_better": True}
                           for t in ("demo_heldout", "mmlu")}}

    retention = {t: paired_retention("acc", True, stage, base) for t in ("demo_heldout", "mmlu")}
    doc = {
        "run_id": "r1", "created": "2026-11-25T03:00:00Z", "profile": "test", "baseline": BASELINE,
        "tasks": {t: {"lm_eval_task": f"refinery_{t}", "metric": "acc,none", "higher_is_better": True, "items": 200,
                      "num_fewshot": 0, "min_retention": None} for t in ("demo_heldout", "mmlu")},
        "models": [model(BASELINE, base, 4000), model(RELEASE_STAGE, stage, 1000)],
        "retention": {RELEASE_STAGE: retention}, "retention_method": "paired bootstrap over items",
        "humaneval": {"requested": humaneval_requested, "executed": False, "sandbox": None},
        "decontamination": {"checked": True, "passed": remaining == 0, "ngram": 13, "action": "remove",
                            "deduped_corpus": "v1", "eval_sets": {"mmlu": 1}, "kept_records": 1, "removed": 2,
                            "removed_examples": [{"id": "x", "detail": "mmlu: shares the 13-gram '...'"}] * 2,
                            "remaining": remaining, "remaining_examples": []},
        "release_candidate": {
            "stage": RELEASE_STAGE, "version": rec.version, "artifact": str(rec.path),
            "gguf": str(rec.path / "model.gguf"), "gguf_zst": str(rec.path / "model.gguf.zst"),
            "gguf_sha256": rec.manifest["files"]["model.gguf"]["sha256"],
            "gguf_zst_sha256": rec.manifest["files"]["model.gguf.zst"]["sha256"],
            "gguf_zst_bytes": (rec.path / "model.gguf.zst").stat().st_size, "llama_cpp_loads": llama_cpp_loads,
            "llama_cpp_error": "" if llama_cpp_loads else "exit code 1", "max_bytes": 0}}
    with staged_artifact("benchmark_report", home=home, inputs={k: a.ref() for k, a in inputs.items()}) as st:
        (st.path / "lm_eval" / RELEASE_STAGE).mkdir(parents=True)
        (st.path / "lm_eval" / RELEASE_STAGE / "results.json").write_text("{}")
        report_files.write_report_files(doc, st.path)
    return load_artifact(st.path)


@pytest.fixture
def upstream(refinery_home) -> dict[str, Artifact]:
    return {s: make_stage(refinery_home, s) for s in ("qlora_model", "pruned_model", "awq_model", RELEASE_STAGE)}


def test_release_bundle_contents(refinery_home, upstream, tmp_path):
    profile = load_profile(str(write_profile(tmp_path / "p.yaml", min_retention=0.9)))
    rep = make_report(refinery_home, upstream, recovered_correct=155, humaneval_requested=True)  # 0.969 >= 0.9
    report_md = (rep.path / "report.md").read_text()
    assert "HumanEval: **not executed**" in report_md and "| not executed |" in report_md
    art = build(profile, inputs={"benchmark_report": rep}, home=refinery_home, log=lambda _m: None)
    files = set(art.manifest["files"])
    assert {"model.gguf.zst", "README.md", "Modelfile", "SHA256SUMS", "report.json", "report.md",
            "recipes/qlora_model.axolotl.yaml", "recipes/pruned_model.recipe.yaml", "recipes/awq_model.recipe.yaml",
            f"lm_eval/{RELEASE_STAGE}/results.json"} <= files
    source = upstream[RELEASE_STAGE].manifest["files"]["model.gguf.zst"]["sha256"]
    assert art.manifest["files"]["model.gguf.zst"]["sha256"] == source
    for line in (art.path / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((art.path / name).read_bytes()).hexdigest() == digest, name

    card = (art.path / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["license"] == "apache-2.0" and "refinery-demo" in meta["datasets"] and "gguf" in meta["tags"]
    assert "| refinery-demo |" in body and "Apache-2.0" in body  # data source with its licence
    assert "0.969 [" in body and " ± " in body  # retention with its interval, scores with errors
    assert "## Known limits" in body and "% of GPT" not in body
    assert "| humaneval | pass@1 | - | not executed | not executed | - |" in body  # no number for code not run

    modelfile = (art.path / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and "<|im_start|>user\n{{ .Prompt }}<|im_end|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_each_gate_fails_on_its_own_problem(refinery_home, upstream, tmp_path):
    profile = load_profile(str(write_profile(tmp_path / "p.yaml", min_retention=0.9)))
    low = make_report(refinery_home, upstream, recovered_correct=120)  # 0.75 < 0.9
    with pytest.raises(ReleaseBlocked, match="retention_meets_thresholds"):
        build(profile, inputs={"benchmark_report": low}, home=refinery_home)
    assert latest("release", refinery_home) is None  # nothing published, nothing half-written left

    def failed(report_art, prof=profile) -> set[str]:
        doc = json.loads((report_art.path / "report.json").read_text())
        return {g.name for g in gates(doc, prof) if not g.passed}

    assert failed(make_report(refinery_home, upstream, recovered_correct=155)) == set()
    assert failed(make_report(refinery_home, upstream, recovered_correct=155, llama_cpp_loads=False)) == \
        {"gguf_loads_in_llamacpp"}
    assert failed(make_report(refinery_home, upstream, recovered_correct=155, remaining=1)) == {"decontamination_clean"}
    tiny_limit = load_profile(str(write_profile(tmp_path / "small.yaml", min_retention=0.9, max_bytes=1000)))
    assert failed(make_report(refinery_home, upstream, recovered_correct=155), tiny_limit) == {"release_size_within_limit"}
    # a .gguf.zst that no longer decompresses to the manifest's model.gguf
    rep = make_report(refinery_home, upstream, recovered_correct=155)
    zst = upstream[RELEASE_STAGE].path / "model.gguf.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(b"GGUF something else"))
    assert failed(rep) == {"zstd_roundtrip_verifies"}


# --------------------------------------------------------------------------- Dagster


def _fake_assets() -> list:
    """Upstream assets with the real keys, writing fake artifacts (the model stages are not under test)."""
    def fake(name: str, deps: list[str]):
        @dg.asset(name=name, deps=deps, required_resource_keys={"refinery"})
        def _asset(context) -> dg.MaterializeResult:
            home = context.resources.refinery.home_path()
            if name == "benchmark_report":
                inputs = {s: require_latest(s, home) for s in ("qlora_model", "pruned_model", "awq_model",
                                                               RELEASE_STAGE)}
                art = make_report(home, inputs, recovered_correct=155)
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

    models = ["base_model", "qlora_model", "pruned_model", "awq_model", "gguf_zst", RELEASE_STAGE]
    return [fake("raw_corpus", []), fake("deduped_corpus", ["raw_corpus"]),
            *[fake(m, ["deduped_corpus"]) for m in models],
            fake("benchmark_report", [*models, "raw_corpus", "deduped_corpus"])]


def _materialize(refinery_home: Path, profile_path: Path) -> dg.ExecuteInProcessResult:
    from assets import evaluation
    from resources import RefineryResource

    checks = [evaluation.retention_meets_thresholds, evaluation.gguf_loads_in_llamacpp,
              evaluation.zstd_roundtrip_verifies, evaluation.release_size_within_limit,
              evaluation.decontamination_clean, evaluation.no_eval_contamination]
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
