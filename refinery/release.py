"""The gated release: what must hold before a model ships, and the bundle that ships.

Every gate reads the benchmark_report, whose thresholds were recorded when it ran (``gates`` in
report.json), never the profile as it is at release time; every gate compares interval bounds, not
point estimates, and each one can fail:

- fidelity: the shipped GGUF's mean KL divergence from qlora_model, upper bound <= ``gates.max_kld``
  (and its 99th percentile and top-1 agreement when set);
- Pareto: no plain llama.cpp quantization of qlora_model at no more .zst bytes has a lower mean KL
  divergence with the intervals apart;
- retention: on every task whose dense baseline scores above chance, the shipped model keeps at
  least ``min_retention`` of it (lower bound of the paired-bootstrap interval);
- the release GGUF loads and generates in llama.cpp; the .gguf.zst decompresses to exactly the
  .gguf its manifest names (SHA-256); the .gguf.zst is at most ``release.max_bytes``; no training
  record shares an n-gram with an evaluation set.

Dagster runs each gate as a blocking asset check on benchmark_report; ``build`` runs them all
again and refuses to publish when one fails, so the bundle cannot be made around the checks.
The bundle: model.gguf.zst, a Hugging Face model card (README.md), an Ollama Modelfile, the
training and compression recipes, the report and raw lm-eval results, SHA256SUMS and the manifest.
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
from refinery.evaluate import load_report, pareto
from refinery.stages import BASELINE, SHIPPED, STAGES, code_version

STAGE = "release"


class ReleaseBlocked(RuntimeError):
    """A gate failed: the release is not made."""


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    why: str = ""  # one sentence a person reads when the gate blocks
    note: str = ""  # when it passes having compared nothing: what it had no figure for


def _shipped(report: dict[str, Any]) -> dict[str, Any]:
    return next(m for m in report["models"] if m["label"] == report["shipped"])


def check_fidelity(report: dict[str, Any]) -> GateResult:
    """The shipped GGUF stays close to qlora_model: KLD (and p99, top-1 when set) by interval bounds."""
    g, f = report["gates"], _shipped(report)["fidelity"]
    rows = [{"metric": "kld_mean (upper bound)", "measured": f["kld_mean"]["ci_high"], "threshold": g["max_kld"],
             "passed": f["kld_mean"]["ci_high"] <= g["max_kld"]}]
    if g.get("max_kld_p99") is not None:
        rows.append({"metric": "kld_p99 (upper bound)", "measured": f["kld_p99"]["ci_high"],
                     "threshold": g["max_kld_p99"], "passed": f["kld_p99"]["ci_high"] <= g["max_kld_p99"]})
    if g.get("min_top1_agreement") is not None:
        rows.append({"metric": "top1_agreement (lower bound)", "measured": f["top1_agreement"]["ci_low"],
                     "threshold": g["min_top1_agreement"],
                     "passed": f["top1_agreement"]["ci_low"] >= g["min_top1_agreement"]})
    bad = [r for r in rows if not r["passed"]]
    why = "; ".join(f"{r['metric']} is {r['measured']:.4f} against a limit of {r['threshold']}" for r in bad)
    return GateResult("fidelity_within_limits", not bad, {"model": report["shipped"], "limits": rows},
                      f"the shipped file is too far from {BASELINE}: {why}" if bad else "")


def check_pareto(report: dict[str, Any]) -> GateResult:
    """No plain llama.cpp quantization at no more .zst bytes is closer to qlora_model (intervals apart)."""
    if not report["gates"]["pareto"]:
        return GateResult("not_beaten_by_plain_quantization", True, {"note": "gates.pareto is off"})
    p = pareto(report["models"])  # recomputed from the measurements, not read from the summary
    shipped = _shipped(report)
    why = ""
    if p["dominated_by"]:
        by = next(m for m in report["models"] if m["label"] == p["dominated_by"][0])
        why = (f"{by['label']} ({by['zst_bytes']:,} bytes packed) has a mean KLD of "
               f"{by['fidelity']['kld_mean']['ci_high']:.4f} or less, below the shipped file's "
               f"{shipped['fidelity']['kld_mean']['ci_low']:.4f} or more at {shipped['zst_bytes']:,} bytes: "
               "a plain llama.cpp quantization is smaller and better")
    note = "" if p["best_plain_at_size"] else "nothing to compare: every plain quantization tried is larger"
    return GateResult("not_beaten_by_plain_quantization", not p["dominated_by"],
                      {"dominated_by": ", ".join(p["dominated_by"]) or "none",
                       "best_plain_at_size": p["best_plain_at_size"] or "none", "summary": p["sentence"]}, why, note)


def check_retention(report: dict[str, Any]) -> GateResult:
    """The shipped model keeps min_retention of qlora_model's score on every gated task (lower bound)."""
    rows, failed = [], []
    for task, info in report["tasks"].items():
        threshold = report["gates"]["min_retention"].get(task)
        if threshold is None:
            rows.append({"task": task, "threshold": info.get("min_retention"), "passed": True,
                         "note": info.get("why_not_gated", "no threshold")})
            continue
        r = report["retention"].get(SHIPPED, {}).get(task) or {}
        low = r.get("ci_low")
        ok = low is not None and low >= threshold
        rows.append({"task": task, "threshold": threshold, "retention": r.get("value"), "ci_low": low,
                     "ci_high": r.get("ci_high"), "passed": ok, "note": r.get("note", "")})
        if not ok:
            kept = "an undefined share" if r.get("value") is None else f"{r['value']:.3f}"
            bound = "undefined" if low is None else f"{low:.3f}"
            failed.append(f"{task} keeps {kept} of {BASELINE}'s score (lower bound {bound}), below {threshold}")
    gated = any(report["gates"]["min_retention"].get(task) is not None for task in report["tasks"])
    return GateResult("retention_meets_thresholds", not failed, {"stage": SHIPPED, "baseline": BASELINE,
                                                                 "tasks": rows}, "; ".join(failed),
                      "" if gated else "nothing to compare: no task has a retention threshold")


def check_llamacpp(report: dict[str, Any]) -> GateResult:
    """The release GGUF loads and generates in llama.cpp (measured by the report)."""
    rc = report["release_candidate"]
    return GateResult("gguf_loads_in_llamacpp", bool(rc["llama_cpp_loads"]),
                      {"gguf": rc["gguf"], "error": rc.get("llama_cpp_error") or ""},
                      f"llama.cpp could not load and run {rc['gguf']}: {rc.get('llama_cpp_error')}")


def check_zstd_roundtrip(report: dict[str, Any]) -> GateResult:
    """model.gguf.zst decompresses to the bytes of model.gguf named in the manifest."""
    import zstandard

    rc = report["release_candidate"]
    zst, expected = Path(rc["gguf_zst"]), rc.get("gguf_sha256")
    meta: dict[str, Any] = {"gguf_zst": str(zst), "expected_sha256": expected}
    if not zst.exists() or not expected:
        return GateResult("zstd_roundtrip_verifies", False, {**meta, "error": "file or checksum missing"},
                          f"{zst} or its checksum is missing")
    h, size = hashlib.sha256(), 0
    try:
        with open(zst, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
            for block in iter(lambda: reader.read(1 << 20), b""):
                h.update(block)
                size += len(block)
    except zstandard.ZstdError as exc:
        return GateResult("zstd_roundtrip_verifies", False, {**meta, "error": str(exc)}, f"{zst} does not decompress: {exc}")
    meta.update(decompressed_sha256=h.hexdigest(), decompressed_bytes=size)
    zst_ok = rc.get("gguf_zst_sha256") is None or sha256_file(zst) == rc["gguf_zst_sha256"]
    meta["zst_matches_manifest"] = zst_ok
    ok = zst_ok and h.hexdigest() == expected
    return GateResult("zstd_roundtrip_verifies", ok, meta,
                      "" if ok else f"{zst} does not decompress to the model.gguf its manifest names")


def check_size(report: dict[str, Any]) -> GateResult:
    """The .gguf.zst fits in release.max_bytes (as recorded by the report)."""
    size, limit = report["release_candidate"].get("gguf_zst_bytes"), report["gates"]["max_bytes"]
    ok = size is not None and size <= limit
    return GateResult("release_size_within_limit", ok, {"gguf_zst_bytes": size, "max_bytes": limit},
                      "" if ok else f"model.gguf.zst is {size} bytes, over the limit of {limit:,}")


def check_decontamination(report: dict[str, Any]) -> GateResult:
    """No kept training record shares an n-gram with an evaluation set."""
    d = report["decontamination"]
    ok = bool(d.get("checked")) and bool(d.get("passed"))
    return GateResult("decontamination_clean", ok,
                      {k: d.get(k) for k in ("ngram", "removed", "remaining", "deduped_corpus", "note") if k in d},
                      "" if ok else f"{d.get('remaining', '?')} training records share an n-gram with a test set "
                                    f"({d.get('note', 'see the report')})")


GATES = (check_fidelity, check_pareto, check_retention, check_llamacpp, check_zstd_roundtrip, check_size,
         check_decontamination)


def gates(report: dict[str, Any]) -> list[GateResult]:
    return [gate(report) for gate in GATES]


def blocked_paragraph(failed: list[GateResult]) -> str:
    """What a person reads when the release is blocked: which gates, and why, in sentences."""
    return ("The release was not made. " + " ".join(f"Gate {g.name}: {g.why}." for g in failed)
            + " The report (benchmark_report's report.md) has every measurement behind this.")


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


def _cell(v: dict[str, Any], digits: int = 4) -> str:
    return f"{v['value']:.{digits}f} [{v['ci_low']:.{digits}f}, {v['ci_high']:.{digits}f}]"


def _recipe_sentence(upstream: dict[str, Artifact], profile: Profile) -> str:
    """How the shipped file was made, from the configs its artifacts recorded (not today's profile)."""
    def cfg(stage: str, key: str) -> dict[str, Any]:
        return upstream[stage].manifest.get("config", {}).get(key, {}) if stage in upstream else {}

    train, prune, awq = cfg("qlora_model", "train"), cfg("pruned_model", "prune"), cfg("awq_model", "awq")
    rec, gguf = cfg(SHIPPED, "recovery"), upstream[SHIPPED].manifest.get("metrics", {}).get("gguf", {}) \
        if SHIPPED in upstream else {}
    return (f"{profile.base_model.name} fine-tuned with QLoRA (rank {train.get('lora_r', '?')}) on an English instruction "
            f"corpus, pruned to {prune.get('sparsity', 0):.0%} sparsity ({prune.get('method', '?')}), quantized with AWQ "
            f"({awq.get('scheme', '?')}, groups of {awq.get('group_size', '?')}), written to GGUF as "
            f"{gguf.get('gguf_type', '?')} with that 4-bit grid carried over, recovered by distillation "
            f"({rec.get('steps', '?')} steps at most), and packed with zstd; made by refinery.")


def model_card(report: dict[str, Any], profile: Profile, recipes: list[str], gate_results: list[GateResult],
               upstream: dict[str, Artifact]) -> str:
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
    shipped, base = models[report["shipped"]], models[BASELINE]
    rc = report["release_candidate"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {profile.release.name}", "", _recipe_sentence(upstream, profile), "",
             f"Every number below is refinery's own measurement against its own dense fine-tuned baseline "
             f"(`{BASELINE}`); nothing is compared with models refinery did not run.", "",
             f"File: `model.gguf.zst` ({rc['gguf_zst_bytes']:,} bytes; `zstd -d model.gguf.zst`, then "
             "`ollama create NAME -f Modelfile` or `llama-cli -m model.gguf`).", "",
             "## How close it stays to the dense model", "", report["pareto"]["sentence"], "",
             "| model | .zst bytes | mean KLD [95% CI] | top-1 agreement | perplexity |", "|---|---|---|---|---|"]
    plain = [m for m in report["models"] if m["role"] == "baseline"]
    for m in [shipped, *sorted(plain, key=lambda m: m["zst_bytes"])]:
        f = m["fidelity"]
        lines.append(f"| {m['label']}{' (this file)' if m is shipped else ''} | {m['zst_bytes']:,} | "
                     f"{_cell(f['kld_mean'])} | {_cell(f['top1_agreement'], 3)} | {_cell(f['perplexity'], 2)} |")
    ts = report["token_set"]
    lines += ["", f"KL divergence from `{BASELINE}`'s next-token distributions over {ts['predictions']:,} held-out "
                  f"tokens ({', '.join(f'{n} chunks of {k}' for k, n in ts['sources'].items())}), every model run in "
                  "llama.cpp; the other rows are llama.cpp's own quantizer on the same dense model.", ""]
    if report["tasks"]:
        lines += ["## Tasks (value ± standard error)", "",
                  f"| task | metric | items | chance | base_model | {BASELINE} | this file | retention [95% CI] |",
                  "|---|---|---|---|---|---|---|---|"]
        for task, info in report["tasks"].items():
            r = report["retention"].get(report["shipped"], {}).get(task) or {}
            ret = "n/a" if r.get("value") is None else _cell(r, 3)
            lines.append(f"| {task} | {info['metric'].split(',')[0]} | {info['items'] or 'all'} | {info['chance']:g} | "
                         f"{_score(models.get('base_model', {}).get('scores', {}).get(task))} | "
                         f"{_score(base['scores'].get(task))} | {_score(shipped['scores'].get(task))} | {ret} |")
        if report["humaneval"]["requested"] and not report["humaneval"]["executed"]:
            lines.append("| humaneval | pass@1 | - | - | not executed | not executed | not executed | - |")
        for task, info in report["tasks"].items():
            if info.get("why_not_gated"):
                lines.append(f"\n{task} carries no retention gate: {info['why_not_gated']}.")
        ungated = [task for task, info in report["tasks"].items() if info.get("min_retention") is None]
        if ungated:
            lines.append(f"\nNo retention threshold is set for {', '.join(ungated)} (profile `eval.tasks`): "
                         "reported, not gated.")
        lines.append("")
    lines += ["## Training data", "", "| source | where | licence |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['where']} | {s['license']} |" for s in sources]
    if any("nc" in s["license"].lower().split("-") for s in sources):
        lines += ["", "Some sources are licensed for non-commercial use only; so is what is derived from them."]
    d = report["decontamination"]
    if d.get("checked"):
        lines += ["", f"Decontamination: {d['ngram']}-gram overlap with the evaluation sets removed "
                      f"{d['removed']} training records; {d['remaining']} remain."]
    lines += ["", "## Recipes", "", "Included in `recipes/`: " + ", ".join(f"`{r}`" for r in recipes) + ".", "",
              "## Release gates", "", "Thresholds as benchmark_report recorded them (mean KLD upper bound at most "
              f"{report['gates']['max_kld']}, .gguf.zst at most {report['gates']['max_bytes']:,} bytes); every gate "
              "compares interval bounds, not point estimates. What each gate read is in `report.json` and the "
              "Dagster UI.", "",
              "| gate | passed | what it checks |", "|---|---|---|"]
    for gate, g in zip(GATES, gate_results):
        verdict = ("yes" + (f" ({g.note})" if g.note else "")) if g.passed else "**no**: " + g.why
        lines.append(f"| {g.name} | {verdict} | "
                     f"{(gate.__doc__ or '').strip().splitlines()[0]} |")
    if shipped.get("tokens_per_second") is not None:
        lines += ["", f"llama.cpp CPU speed where it was measured: {shipped['tokens_per_second']:.1f} tokens/s generated."]
    lines += ["", "## Known limits", ""]
    kld = shipped["fidelity"]["kld_mean"]
    if kld["ci_low"] > 0:
        lines.append(f"- It is not the dense model: mean KL divergence {kld['value']:.4f} from `{BASELINE}` "
                     f"(top-1 agreement {shipped['fidelity']['top1_agreement']['value']:.1%}).")
    small = [t for t, i in report["tasks"].items() if i["items"] is not None and i["items"] < 500]
    if small:
        sizes = ", ".join(f"{t}: {report['tasks'][t]['items']} items" for t in small)
        lines.append(f"- Tasks scored on subsets ({sizes}): intervals are wide; differences inside them are not evidence.")
    for task, r in report["retention"].get(report["shipped"], {}).items():
        if r.get("ci_high") is not None and r["ci_high"] < 1:
            lines.append(f"- {task}: measurably worse than the dense baseline (retention interval below 1).")
    lines += ["- English only: the training data was filtered to English.",
              "- Small model: expect factual errors and weak reasoning; not for decisions of consequence."]
    return "\n".join(lines) + "\n"


def _inputs_of(report_art: Artifact) -> dict[str, Artifact]:
    out = {}
    for name, ref in report_art.manifest.get("inputs", {}).items():
        if isinstance(ref, dict) and Path(ref.get("path", "")).exists():
            out[name] = load_artifact(Path(ref["path"]))
    return out


def release_version(report_version: str, profile: Profile) -> str:
    """The bundle's identity: the report it ships, the code that writes it, the release settings."""
    key = json.dumps([report_version, code_version("refinery.release"), profile.release.model_dump()], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def build(profile: Profile, *, inputs: dict[str, Artifact], home: Path, log: Callable[[str], Any] = print) -> Artifact:
    """Check every gate again (from the report's recorded thresholds) and, when all pass, publish
    the release bundle. Its version comes from the report's, this module's code and the release
    settings: a change to what writes the bundle (the card, the Modelfile) makes a new one."""
    report_art = inputs["benchmark_report"]
    report = load_report(report_art.path)
    results = gates(report)
    failed = [g for g in results if not g.passed]
    if failed:
        raise ReleaseBlocked(blocked_paragraph(failed))
    upstream = _inputs_of(report_art)
    rc = report["release_candidate"]
    recipe_stages = [s.name for s in STAGES if s.produces != "none"]
    with staged_artifact(STAGE, config={"release": profile.release.model_dump(), "profile": profile.name},
                         inputs={"benchmark_report": report_art.ref()}, home=home,
                         version=release_version(report_art.version, profile)) as st:
        log(f"release: copying {rc['gguf_zst']}")
        shutil.copyfile(rc["gguf_zst"], st.path / "model.gguf.zst")
        recipes = []
        (st.path / "recipes").mkdir()
        for stage in recipe_stages:
            if stage not in upstream:
                continue
            for f in sorted(upstream[stage].path.glob("*.yaml")) + sorted(upstream[stage].path.glob("*.yml")):
                name = f"{stage}.{f.name}"
                shutil.copyfile(f, st.path / "recipes" / name)
                recipes.append(name)
        if (report_art.path / "lm_eval").is_dir():
            shutil.copytree(report_art.path / "lm_eval", st.path / "lm_eval")
        for name in ("report.json", "report.md", "pareto.png"):
            if (report_art.path / name).exists():
                shutil.copyfile(report_art.path / name, st.path / name)
        model_dir = upstream[SHIPPED].path / "model" if SHIPPED in upstream else None
        template = chat_template(model_dir) if model_dir else None
        eos = None
        if model_dir and (model_dir / "tokenizer_config.json").exists():
            eos = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
        (st.path / "Modelfile").write_text(modelfile(template, eos), encoding="utf-8")
        (st.path / "README.md").write_text(model_card(report, profile, recipes, results, upstream), encoding="utf-8")
        sums = [f"{sha256_file(p)}  {p.relative_to(st.path)}" for p in sorted(st.path.rglob("*")) if p.is_file()]
        (st.path / "SHA256SUMS").write_text("\n".join(sums) + "\n", encoding="utf-8")
        st.metrics.update({"gguf_zst_bytes": (st.path / "model.gguf.zst").stat().st_size,
                           "gguf_sha256": rc["gguf_sha256"], "report_version": report_art.version,
                           "recipes": len(recipes), "gates_passed": len(results)})
    return load_artifact(st.path)
