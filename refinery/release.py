"""The gated release: what must hold before a model ships, and the bundle that ships.

The gates read the benchmark_report (refinery's own measurements) and the files themselves:

- retention: recovered_model keeps at least ``eval.tasks[t].min_retention`` of qlora_model's
  score on every task that sets one (point estimate; the interval is shown next to it);
- the release GGUF loads and generates in llama.cpp;
- the .gguf.zst decompresses to exactly the .gguf its manifest names (SHA-256);
- the .gguf.zst is at most ``release.max_bytes``;
- no training record shares an n-gram with an evaluation set.

Dagster runs each gate as a blocking asset check on benchmark_report; ``build`` runs them all
again and refuses to publish when one fails, so the bundle cannot be made around the checks.
The bundle: model.gguf.zst, a Hugging Face model card (README.md), an Ollama Modelfile, the
training and compression recipes, the raw lm-eval results, SHA256SUMS and the manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from refinery.artifacts import Artifact, load_artifact, sha256_file, staged_artifact
from refinery.config import Profile
from refinery.evaluate import BASELINE, RELEASE_STAGE, load_report

STAGE = "release"
RECIPE_STAGES = ("qlora_model", "pruned_model", "awq_model", "gguf_zst", "recovered_model")


class ReleaseBlocked(RuntimeError):
    """A gate failed: the release is not made."""


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    metadata: dict[str, Any] = field(default_factory=dict)


def check_retention(report: dict[str, Any], profile: Profile) -> GateResult:
    """recovered_model's retention vs qlora_model meets every task's min_retention."""
    rows, passed = [], True
    for task, cfg in profile.eval.tasks.items():
        if cfg.min_retention is None:
            continue
        r = report["retention"].get(RELEASE_STAGE, {}).get(task)
        value = None if r is None else r.get("value")
        # a threshold of 0 asks for nothing: met even when retention is undefined (baseline scored 0)
        ok = cfg.min_retention <= 0 or (value is not None and value >= cfg.min_retention)
        passed &= ok
        rows.append({"task": task, "threshold": cfg.min_retention, "retention": value,
                     "ci_low": None if r is None else r.get("ci_low"), "ci_high": None if r is None else r.get("ci_high"),
                     "passed": ok, "note": "not scored" if r is None else r.get("note", "")})
    return GateResult("retention_meets_thresholds", passed,
                      {"stage": RELEASE_STAGE, "baseline": BASELINE, "tasks": rows})


def check_llamacpp(report: dict[str, Any]) -> GateResult:
    """The release GGUF loads and generates in llama.cpp (measured by the report)."""
    rc = report["release_candidate"]
    return GateResult("gguf_loads_in_llamacpp", bool(rc["llama_cpp_loads"]),
                      {"gguf": rc["gguf"], "error": rc.get("llama_cpp_error") or ""})


def check_zstd_roundtrip(report: dict[str, Any]) -> GateResult:
    """model.gguf.zst decompresses to the bytes of model.gguf named in the manifest."""
    import zstandard

    rc = report["release_candidate"]
    zst, expected = Path(rc["gguf_zst"]), rc.get("gguf_sha256")
    meta: dict[str, Any] = {"gguf_zst": str(zst), "expected_sha256": expected}
    if not zst.exists() or not expected:
        return GateResult("zstd_roundtrip_verifies", False, {**meta, "error": "file or checksum missing"})
    h, size = hashlib.sha256(), 0
    with open(zst, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
        for block in iter(lambda: reader.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    meta.update(decompressed_sha256=h.hexdigest(), decompressed_bytes=size)
    zst_ok = rc.get("gguf_zst_sha256") is None or sha256_file(zst) == rc["gguf_zst_sha256"]
    meta["zst_matches_manifest"] = zst_ok
    return GateResult("zstd_roundtrip_verifies", zst_ok and h.hexdigest() == expected, meta)


def check_size(report: dict[str, Any], profile: Profile) -> GateResult:
    """The .gguf.zst fits in release.max_bytes."""
    size = report["release_candidate"].get("gguf_zst_bytes")
    return GateResult("release_size_within_limit", size is not None and size <= profile.release.max_bytes,
                      {"gguf_zst_bytes": size, "max_bytes": profile.release.max_bytes})


def check_decontamination(report: dict[str, Any]) -> GateResult:
    """No kept training record shares an n-gram with an evaluation set."""
    d = report["decontamination"]
    return GateResult("decontamination_clean", bool(d.get("checked")) and bool(d.get("passed")),
                      {k: d.get(k) for k in ("ngram", "removed", "remaining", "deduped_corpus", "note")
                       if k in d})


def gates(report: dict[str, Any], profile: Profile) -> list[GateResult]:
    return [check_retention(report, profile), check_llamacpp(report), check_zstd_roundtrip(report),
            check_size(report, profile), check_decontamination(report)]


# --------------------------------------------------------------------------- bundle contents

_CHATML_TEMPLATE = """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
"""
_LLAMA3_TEMPLATE = """{{ if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>

{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

{{ .Response }}<|eot_id|>"""


def chat_template(model_dir: Path) -> str | None:
    """The Jinja chat template saved with the tokenizer (chat_template.jinja or tokenizer_config)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    cfg = model_dir / "tokenizer_config.json"
    if cfg.exists():
        value = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        return value if isinstance(value, str) else None
    return None


def modelfile(template: str | None, eos_token: str | None) -> str:
    """An Ollama Modelfile. Ollama uses Go templates, not Jinja, so the known chat formats are
    translated (ChatML, Llama 3); another format gets no TEMPLATE and a comment saying so."""
    lines = ["# Ollama Modelfile written by refinery. Decompress first: zstd -d model.gguf.zst",
             "FROM ./model.gguf"]
    stops: list[str] = []
    if template and "<|im_start|>" in template:
        lines.append(f'TEMPLATE """{_CHATML_TEMPLATE}"""')
        stops = ["<|im_start|>", "<|im_end|>"]
    elif template and "<|start_header_id|>" in template:
        lines.append(f'TEMPLATE """{_LLAMA3_TEMPLATE}"""')
        stops = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    else:
        lines.append("# no TEMPLATE: the tokenizer's chat template is not a format refinery translates")
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


_BASE_LICENSES = {"smollm2_gguf": ("apache-2.0", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                  "tiny_random": ("apache-2.0", None)}


def data_sources(profile: Profile) -> list[dict[str, str]]:
    """Every training source with its licence (the profile's sources and the demo corpus)."""
    out = []
    if profile.ingest.demo is not None:
        out.append({"name": "refinery-demo", "where": "generated by refinery (refinery.demo_data)",
                    "license": "Apache-2.0"})
    for s in profile.ingest.sources:
        out.append({"name": s.name, "where": s.hub or Path(s.path or "").name, "license": s.license})
    return out


def _score(s: dict[str, Any] | None) -> str:
    if s is None:
        return "not scored"
    err = "" if s.get("stderr") is None else f" ± {s['stderr']:.3f}"
    return f"{s['value']:.3f}{err}"


def model_card(report: dict[str, Any], profile: Profile, recipes: list[str], gate_results: list[GateResult]) -> str:
    license_, base_id = _BASE_LICENSES.get(profile.base_model.kind, ("other", profile.base_model.path))
    if "llama-3.1" in profile.base_model.name.lower():
        license_ = "llama3.1"
    sources = data_sources(profile)
    front: dict[str, Any] = {
        "license": license_, "language": ["en"], "library_name": "gguf", "pipeline_tag": "text-generation",
        "datasets": [s["where"] if "/" in s["where"] and not s["where"].startswith("generated") else s["name"]
                     for s in sources],
        "tags": ["gguf", "refinery", "pruned", "awq", "4-bit", "llama.cpp", "ollama"],
    }
    if base_id:
        front["base_model"] = base_id
    models = {m["label"]: m for m in report["models"]}
    released, base = models.get(f"{RELEASE_STAGE}.gguf") or models[RELEASE_STAGE], models[BASELINE]
    rc = report["release_candidate"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {profile.release.name}", "",
             f"{profile.base_model.name} fine-tuned with QLoRA (rank {profile.train.lora_r}) on an English "
             f"instruction corpus, pruned to {profile.prune.sparsity:.0%} sparsity ({profile.prune.method}, "
             f"{profile.prune.mask_structure}), quantized with AWQ ({profile.awq.scheme}, group "
             f"{profile.awq.group_size}), converted to GGUF ({profile.gguf.type}) and recovered "
             f"({profile.recovery.method}), made by refinery. Scores below are refinery's own measurements, "
             f"against its own dense fine-tuned baseline (`{BASELINE}`), on the same items for every model.", "",
             f"File: `model.gguf.zst` ({rc['gguf_zst_bytes']:,} bytes; `zstd -d model.gguf.zst`, then "
             "`ollama create NAME -f Modelfile` or `llama-cli -m model.gguf`).", "",
             "## Training data", "", "| source | where | licence |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['where']} | {s['license']} |" for s in sources]
    if any("nc" in s["license"].lower().split("-") for s in sources):
        lines += ["", "Some sources are licensed for non-commercial use only; so is what is derived from them."]
    d = report["decontamination"]
    if d.get("checked"):
        lines += ["", f"Decontamination: {d['ngram']}-gram overlap with the evaluation sets removed "
                      f"{d['removed']} training records; {d['remaining']} remain."]
    lines += ["", "## Recipes", "", "Included in `recipes/`: " + ", ".join(f"`{r}`" for r in recipes) + ".",
              "", "## Evaluation (value ± standard error)", "",
              "| task | metric | items | " + f"{BASELINE} | {released['label']} | retention [95% CI] |",
              "|---|---|---|---|---|---|"]
    for task, info in report["tasks"].items():
        r = (report["retention"].get(released["label"]) or report["retention"].get(RELEASE_STAGE, {})).get(task) or {}
        ret = "n/a" if r.get("value") is None else (
            f"{r['value']:.3f}" + ("" if r.get("ci_low") is None else f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"))
        lines.append(f"| {task} | {info['metric'].split(',')[0]} | {info['items'] or 'all'} | "
                     f"{_score(base['scores'].get(task))} | {_score(released['scores'].get(task))} | {ret} |")
    if report["humaneval"]["requested"] and not report["humaneval"]["executed"]:
        lines.append("| humaneval | pass@1 | - | not executed | not executed | - |")
    lines += ["", f"Retention: {report['retention_method']}. The release gate applies the thresholds to "
                  f"`{RELEASE_STAGE}` (its Hugging Face weights); the table shows `{released['label']}`, the file shipped. "
                  f"Sizes: {released['label']} {released['bytes']:,} bytes, {released['bits_per_weight']:.2f} "
                  f"bits per weight; {BASELINE} {base['bytes']:,} bytes."]
    if released.get("tokens_per_second") is not None:
        lines.append(f"llama.cpp CPU speed: {released['tokens_per_second']:.1f} tokens/s.")
    lines += ["", "Release gates (all passed): " + ", ".join(g.name for g in gate_results) + ".",
              "", "## Known limits", ""]
    small = [t for t, i in report["tasks"].items() if i["items"] is not None and i["items"] < 500]
    if small:
        sizes = ", ".join(f"{t}: {report['tasks'][t]['items']} items" for t in small)
        lines.append(f"- Scored on subsets ({sizes}): intervals are wide; differences inside them are not evidence.")
    for task, r in report["retention"].get(RELEASE_STAGE, {}).items():
        if r.get("ci_high") is not None and r["ci_high"] < 1:
            lines.append(f"- {task}: measurably worse than the dense baseline (retention interval below 1).")
    lines += ["- English only: the training data was filtered to English.",
              "- Small model: expect factual errors and weak reasoning; not for decisions of consequence.",
              "- Only the benchmarks above were run; nothing here compares it to models refinery did not run."]
    return "\n".join(lines) + "\n"


def _inputs_of(report_art: Artifact) -> dict[str, Artifact]:
    out = {}
    for name, ref in report_art.manifest.get("inputs", {}).items():
        if isinstance(ref, dict) and Path(ref.get("path", "")).exists():
            out[name] = load_artifact(Path(ref["path"]))
    return out


def build(profile: Profile, *, inputs: dict[str, Artifact], home: Path, log: Callable[[str], Any] = print) -> Artifact:
    """Check every gate again and, when all pass, publish the release bundle."""
    report_art = inputs["benchmark_report"]
    report = load_report(report_art.path)
    results = gates(report, profile)
    failed = [g for g in results if not g.passed]
    if failed:
        raise ReleaseBlocked("release blocked by: " + "; ".join(
            f"{g.name} ({json.dumps(g.metadata, default=str)[:300]})" for g in failed))
    upstream = _inputs_of(report_art)
    rc = report["release_candidate"]
    with staged_artifact(STAGE, config={"release": profile.release.model_dump(), "profile": profile.name},
                         inputs={"benchmark_report": report_art.ref()}, home=home) as st:
        log(f"release: copying {rc['gguf_zst']}")
        shutil.copyfile(rc["gguf_zst"], st.path / "model.gguf.zst")
        recipes = []
        (st.path / "recipes").mkdir()
        for stage in RECIPE_STAGES:
            if stage not in upstream:
                continue
            for f in sorted(upstream[stage].path.glob("*.yaml")) + sorted(upstream[stage].path.glob("*.yml")):
                name = f"{stage}.{f.name}"
                shutil.copyfile(f, st.path / "recipes" / name)
                recipes.append(name)
        shutil.copytree(report_art.path / "lm_eval", st.path / "lm_eval")
        for name in ("report.json", "report.md"):
            shutil.copyfile(report_art.path / name, st.path / name)
        model_dir = upstream[RELEASE_STAGE].path / "model" if RELEASE_STAGE in upstream else None
        template = chat_template(model_dir) if model_dir else None
        eos = None
        if model_dir and (model_dir / "tokenizer_config.json").exists():
            eos = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
        (st.path / "Modelfile").write_text(modelfile(template, eos), encoding="utf-8")
        (st.path / "README.md").write_text(model_card(report, profile, recipes, results), encoding="utf-8")
        sums = [f"{sha256_file(p)}  {p.relative_to(st.path)}" for p in sorted(st.path.rglob("*")) if p.is_file()]
        (st.path / "SHA256SUMS").write_text("\n".join(sums) + "\n", encoding="utf-8")
        st.metrics.update({"gguf_zst_bytes": (st.path / "model.gguf.zst").stat().st_size,
                           "gguf_sha256": rc["gguf_sha256"], "report_version": report_art.version,
                           "recipes": len(recipes), "gates_passed": len(results)})
    return load_artifact(st.path)
