"""Benchmark tasks for lm-eval: local task YAMLs over the shared data files, or lm-eval's own names.

Offline (``profile.eval.offline``) refinery converts each benchmark's local files (MMLU CSVs,
GSM8K JSONL, BBH JSON, HumanEval JSONL.gz, the WikiText-2 raw text, the demo held-out tasks) to
JSONL in a work directory and writes an lm-eval task YAML for each (``dataset_path: json``), so
lm-eval never touches a hub. The item subset is chosen here, deterministically (by a hash of the
item's key), so every stage is scored on the same items and comparisons between stages are paired.
Items left out of the subset form the few-shot pool when the benchmark has no train/dev split.

Online, the standard lm-eval task names are used, with lm-eval's own ``limit`` (its first N items,
also the same for every stage); the demo held-out set and HumanEval (sandboxed) stay local.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from refinery import humaneval_exec
from refinery.config import EvalTask, Profile
from refinery.demo_data import ANSWER_PREFIX


@dataclass(frozen=True)
class TaskSpec:
    """What refinery knows about one benchmark."""

    name: str  # refinery's name, the key in profile.eval.tasks
    online_name: str  # lm-eval's task (or group) name
    metric: str  # lm-eval result key of the headline metric, e.g. "acc,none"
    higher_is_better: bool
    kind: str  # "multiple_choice" | "generate_until" | "loglikelihood_rolling"
    max_gen_toks: int = 256
    executes_code: bool = False
    online_metric: str | None = None  # lm-eval's own task reports under another key
    # what guessing scores: a task whose baseline is not above it (by its interval) carries no gate
    chance: float = 0.0
    chat: bool = False  # prompted through the model's chat template, as it was trained


    @property
    def metric_name(self) -> str:
        return self.metric.split(",")[0]


TASKS: dict[str, TaskSpec] = {
    "mmlu": TaskSpec("mmlu", "mmlu", "acc,none", True, "multiple_choice", chance=0.25),
    "gsm8k": TaskSpec("gsm8k", "gsm8k", "exact_match,flexible-extract", True, "generate_until", 256),
    "bbh": TaskSpec("bbh", "bbh_zeroshot", "exact_match,first-line", True, "generate_until", 128,
                   online_metric="exact_match,flexible-extract"),
    "humaneval": TaskSpec("humaneval", "humaneval", "pass@1,none", True, "generate_until", 384,
                          executes_code=True),
    "wikitext": TaskSpec("wikitext", "wikitext", "word_perplexity,none", False, "loglikelihood_rolling"),
    # as trained: the chat template, the answer prefix, the computed answer matched exactly
    "demo_heldout": TaskSpec("demo_heldout", "demo_heldout", "exact_match,answer", True, "generate_until", 24,
                             chat=True),
}

# lm-eval names local tasks by these; a prefix keeps them apart from lm-eval's built-in tasks.
LOCAL_PREFIX = "refinery_"


class EvalDataError(ValueError):
    """A benchmark file that cannot be read; the message names the file, line and field."""


def spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"unknown eval task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


# --------------------------------------------------------------------------- reading the local files


def _jsonl(path: Path, opener: Callable[..., Any] = open) -> list[dict[str, Any]]:
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"{path}:{line_no}: not valid JSON: {exc}") from None
    return rows


def _require(path: Path, line: int, doc: dict[str, Any], fields: tuple[str, ...]) -> None:
    for field in fields:
        if field not in doc:
            raise EvalDataError(f"{path}:{line}: missing field {field!r}")


def _mmlu_split(data_dir: Path, split: str) -> list[dict[str, Any]]:
    folder = data_dir / "mmlu_hfformat" / split
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise EvalDataError(f"{folder}: no *_{split}.csv files (MMLU in hf format)")
    docs = []
    for path in files:
        subject = path.name[: -len(f"_{split}.csv")]
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.DictReader(f), 2):
                _require(path, line, row, ("question", "choice0", "choice1", "choice2", "choice3", "answer"))
                try:
                    answer = int(row["answer"])
                except ValueError:
                    raise EvalDataError(f"{path}:{line}: field 'answer' is not 0-3: {row['answer']!r}") from None
                docs.append({"key": f"{subject}/{line}", "subject": subject, "question": row["question"],
                             "choices": [row[f"choice{i}"] for i in range(4)], "answer": answer})
    return docs


def _gsm8k_split(data_dir: Path, split: str) -> list[dict[str, Any]]:
    path = data_dir / "gsm8k" / f"{split}.jsonl"
    docs = []
    for line, doc in enumerate(_jsonl(path), 1):
        _require(path, line, doc, ("question", "answer"))
        docs.append({"key": f"{split}/{line}", "question": doc["question"], "answer": doc["answer"]})
    return docs


def _bbh(data_dir: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted((data_dir / "bbh").glob("*.json")):
        try:
            examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise EvalDataError(f"{path}: expected {{'examples': [...]}}: {exc}") from None
        for i, ex in enumerate(examples):
            _require(path, i, ex, ("input", "target"))
            docs.append({"key": f"{path.stem}/{i}", "subtask": path.stem, "input": ex["input"],
                         "target": ex["target"]})
    if not docs:
        raise EvalDataError(f"{data_dir / 'bbh'}: no BBH task files")
    return docs


def _humaneval(data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / "humaneval" / "HumanEval.jsonl.gz"
    docs = []
    for line, doc in enumerate(_jsonl(path, gzip.open), 1):
        _require(path, line, doc, ("task_id", "prompt", "canonical_solution", "test", "entry_point"))
        docs.append({"key": doc["task_id"], **doc})
    return docs


_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def _wikitext(data_dir: Path) -> list[dict[str, Any]]:
    """Split the raw test text into articles (at top-level ' = Title = ' lines), like lm-eval's
    wikitext_document_level, so perplexity is per document."""
    path = data_dir / "wikitext2_raw" / "wikitext-test.txt"
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    pages: list[list[str]] = []
    for line in text.split("\n"):
        if _WIKI_TITLE.match(line) or not pages:
            pages.append([])
        pages[-1].append(line)
    docs = []
    for i, lines in enumerate(pages):
        page = "\n".join(lines).strip("\n")
        if page.strip():
            docs.append({"key": f"page/{i}", "page": page})
    return docs


def _heldout(path: Path) -> list[dict[str, Any]]:
    docs = []
    for line, doc in enumerate(_jsonl(path), 1):
        _require(path, line, doc, ("id", "family", "prompt", "answer", "choices", "label"))
        if not isinstance(doc["choices"], list) or not 0 <= int(doc["label"]) < len(doc["choices"]):
            raise EvalDataError(f"{path}:{line}: field 'label' does not index 'choices'")
        docs.append({"key": str(doc["id"]), **doc})
    return docs


def load_docs(name: str, data_dir: Path, heldout_path: Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """All items of a benchmark, as {"test": [...], "fewshot": [...]} (fewshot may be empty:
    then the pool is whatever the subset leaves out)."""
    if name == "mmlu":
        return {"test": _mmlu_split(data_dir, "test"), "fewshot": _mmlu_split(data_dir, "dev")}
    if name == "gsm8k":
        return {"test": _gsm8k_split(data_dir, "test"), "fewshot": _gsm8k_split(data_dir, "train")}
    if name == "bbh":
        return {"test": _bbh(data_dir), "fewshot": []}
    if name == "humaneval":
        return {"test": _humaneval(data_dir), "fewshot": []}
    if name == "wikitext":
        return {"test": _wikitext(data_dir), "fewshot": []}
    if name == "demo_heldout":
        if heldout_path is None:
            raise EvalDataError("demo_heldout needs raw_corpus's heldout.jsonl, and none was given")
        return {"test": _heldout(heldout_path), "fewshot": []}
    raise KeyError(f"unknown eval task {name!r}; known: {sorted(TASKS)}")


def doc_texts(name: str, doc: dict[str, Any]) -> list[str]:
    """The text of an item a model could have memorized (for decontamination)."""
    if name == "mmlu":
        return [doc["question"], *doc["choices"]]
    if name == "gsm8k":
        return [doc["question"], doc["answer"]]
    if name == "bbh":
        return [doc["input"]]
    if name == "humaneval":
        return [doc["prompt"] + doc["canonical_solution"]]
    if name == "wikitext":
        return [doc["page"]]
    if name == "demo_heldout":
        return [doc["prompt"], doc["answer"]]
    raise KeyError(name)


def select_subset(name: str, docs: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """A fixed subset of ``limit`` items: the smallest SHA-256 of (task, key), in file order.
    The same for every stage and every run, and spread over subjects rather than the first file."""
    if limit is None or limit >= len(docs):
        return list(docs)
    ranked = sorted(range(len(docs)),
                    key=lambda i: hashlib.sha256(f"{name}:{docs[i]['key']}".encode()).hexdigest())
    keep = sorted(ranked[:limit])
    return [docs[i] for i in keep]


# --------------------------------------------------------------------------- task YAMLs

# Shim modules lm-eval imports by file path (``!function hooks.NAME`` resolves to hooks.py next
# to the YAML); they re-export lm-eval's wikitext helpers and refinery's sandboxed HumanEval check.
_HOOKS = '''"""Generated by refinery.eval_tasks: lm-eval loads `!function hooks.NAME` from this file."""
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as wikitext_process_results
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer
from refinery.humaneval_exec import process_results_for
humaneval_process_results = process_results_for({isolation!r})
'''


class _Function(str):
    """A YAML scalar written with lm-eval's ``!function`` tag."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))


def _task_yaml(name: str, task: EvalTask, data_files: dict[str, str]) -> dict[str, Any]:
    s = spec(name)
    cfg: dict[str, Any] = {
        "task": LOCAL_PREFIX + name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "test_split": "test",
        "output_type": s.kind,
        "num_fewshot": task.num_fewshot,
        "metadata": {"version": 1.0, "source": "refinery.eval_tasks"},
    }
    if task.num_fewshot and "fewshot" in data_files:
        cfg["fewshot_split"] = "fewshot"
    gen = {"do_sample": False, "temperature": 0.0, "max_gen_toks": task.max_gen_toks or s.max_gen_toks}
    if name == "mmlu":
        cfg.update(doc_to_text="{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
                               "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
                   doc_to_choice=["A", "B", "C", "D"], doc_to_target="answer",
                   metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    elif name == "demo_heldout":  # the way the demo corpus trains: "The answer is 68.\n..."
        cfg.update(doc_to_text="{{prompt}}", doc_to_target="{{answer}}", gen_prefix=ANSWER_PREFIX,
                   generation_kwargs={**gen, "until": ["\n", "<|im_end|>", "<|eot_id|>"]},
                   metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                 "ignore_case": True, "ignore_punctuation": False}],
                   # the short answer: up to the full stop that ends the sentence ("2.5" stays whole)
                   filter_list=[{"name": "answer", "filter": [
                       {"function": "regex", "regex_pattern": "^\\s*(.+?)(?:\\.(?:\\s|$)|$)", "group_select": 0},
                       {"function": "take_first"}]}])
    elif name == "gsm8k":  # lm-eval's gsm8k.yaml, pointed at the local file
        cfg.update(doc_to_text="Question: {{question}}\nAnswer:", doc_to_target="{{answer}}",
                   generation_kwargs={**gen, "until": ["Question:", "</s>", "<|im_end|>"]},
                   metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                 "ignore_case": True, "ignore_punctuation": False,
                                 "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
                   filter_list=[
                       {"name": "strict-match", "filter": [
                           {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                           {"function": "take_first"}]},
                       {"name": "flexible-extract", "filter": [
                           {"function": "regex", "group_select": -1,
                            "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                           {"function": "take_first"}]}])
    elif name == "bbh":  # the zero-shot BBH format, all 27 subtasks in one file
        cfg.update(doc_to_text="Q: {{input}}\nA:", doc_to_target="{{target}}",
                   generation_kwargs={**gen, "until": ["</s>", "Q:", "\n\n", "<|im_end|>"]},
                   metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                 "ignore_case": True, "ignore_punctuation": False, "regexes_to_ignore": ["\\.$"]}],
                   # the answer is the first non-blank line, trimmed (a model writes " False" or "False.")
                   filter_list=[{"name": "first-line", "filter": [
                       {"function": "regex", "regex_pattern": "\\S(?:.*\\S)?", "group_select": 0},
                       {"function": "take_first"}]}])
    elif name == "humaneval":
        cfg.update(doc_to_text="{{prompt}}", doc_to_target="{{canonical_solution}}",
                   generation_kwargs={**gen, "until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]},
                   process_results=_Function("hooks.humaneval_process_results"),
                   metric_list=[{"metric": "pass@1", "aggregation": "mean", "higher_is_better": True}])
    elif name == "wikitext":  # lm-eval's wikitext.yaml, pointed at the local file
        cfg.update(doc_to_text="", doc_to_target=_Function("hooks.wikitext_detokenizer"),
                   process_results=_Function("hooks.wikitext_process_results"),
                   metric_list=[{"metric": "word_perplexity", "aggregation": "weighted_perplexity",
                                 "higher_is_better": False},
                                {"metric": "byte_perplexity", "aggregation": "weighted_perplexity",
                                 "higher_is_better": False},
                                {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}])
    return cfg


@dataclass(frozen=True)
class PreparedTask:
    name: str  # refinery name
    lm_eval_task: str  # what simple_evaluate is given
    limit: int | None  # passed to simple_evaluate (online only: offline the subset is in the file)
    num_fewshot: int | None  # passed to simple_evaluate (online only)
    items: int | None  # items in the subset (offline); None online (lm-eval decides)
    metric: str  # the headline metric's key in lm-eval's results


def tasks_in_use(profile: Profile) -> dict[str, EvalTask]:
    """The profile's tasks, HumanEval left out unless its code may be executed."""
    tasks = {}
    for name, task in profile.eval.tasks.items():
        spec(name)
        if spec(name).executes_code and not profile.eval.humaneval_execute:
            continue
        tasks[name] = task
    return tasks


def prepare_tasks(profile: Profile, work_dir: Path, heldout_path: Path | None = None) -> list[PreparedTask]:
    """Write the JSONL subsets and task YAMLs under ``work_dir`` (offline) and say what to run.

    ``work_dir`` is then the ``include_path`` of lm-eval's TaskManager.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    data_dir = profile.resolve_path(profile.eval.data_dir)
    prepared = []
    for name, task in tasks_in_use(profile).items():
        if spec(name).executes_code:  # refuse before any model writes code that may not run here
            humaneval_exec.require_isolation(profile.eval.humaneval_isolation)
        # Always local: the demo held-out set (ours), and HumanEval, whose code must run in
        # refinery's sandbox (lm-eval's own task executes it in-process through `evaluate`).
        if not profile.eval.offline and name not in ("demo_heldout", "humaneval"):
            s = spec(name)
            prepared.append(PreparedTask(name, s.online_name, task.limit, task.num_fewshot, None,
                                         s.online_metric or s.metric))
            continue
        docs = load_docs(name, data_dir, heldout_path)
        subset = select_subset(name, docs["test"], task.limit)
        taken = {d["key"] for d in subset}
        pool = docs["fewshot"] or [d for d in docs["test"] if d["key"] not in taken]
        files = {"test": work_dir / f"{name}.test.jsonl"}
        _write_jsonl(files["test"], subset)
        if task.num_fewshot:
            if len(pool) < task.num_fewshot:
                raise EvalDataError(f"{name}: {task.num_fewshot}-shot needs {task.num_fewshot} items outside "
                                    f"the scored subset, only {len(pool)} left")
            files["fewshot"] = work_dir / f"{name}.fewshot.jsonl"
            _write_jsonl(files["fewshot"], pool)
        cfg = _task_yaml(name, task, {k: str(v.resolve()) for k, v in files.items()})
        (work_dir / f"{name}.yaml").write_text(yaml.dump(cfg, Dumper=_Dumper, sort_keys=False), encoding="utf-8")
        prepared.append(PreparedTask(name, LOCAL_PREFIX + name, None, None, len(subset), spec(name).metric))
    (work_dir / "hooks.py").write_text(_HOOKS.format(isolation=profile.eval.humaneval_isolation), encoding="utf-8")
    return prepared


def _write_jsonl(path: Path, docs: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
