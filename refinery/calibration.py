"""Calibration data for the compression stages: English records from the training corpus.

Pruning and AWQ fit the model to activations it sees on calibration text, so that text should
look like what the model will serve: the same chat-formatted English conversations it was trained
on. The selection is deterministic and independent of file order: English records sorted by
their content-hash id, the first ``samples`` taken (a hash order is an unbiased sample).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from refinery.modelstats import ConfigError


def english_records(kept_parquet: Path, samples: int, *, english_label: str = "en",
                    key: str = "calibration_samples") -> list[dict[str, Any]]:
    """The first ``samples`` records with ``lang == english_label`` in id order.

    Raises ConfigError when the file is missing or holds no English record; returns fewer than
    ``samples`` when fewer exist (the caller records how many it got).
    """
    kept_parquet = Path(kept_parquet)
    if not kept_parquet.is_file():
        raise ConfigError(f"{key}: calibration corpus {kept_parquet} not found")
    table = pq.read_table(kept_parquet, columns=["id", "lang", "messages"])
    english = table.filter(pc.equal(table["lang"], english_label))
    if english.num_rows == 0:
        raise ConfigError(f"{key}: {kept_parquet} has no record with lang == {english_label!r} "
                          f"({table.num_rows} records in all)")
    english = english.sort_by("id").slice(0, samples)
    return english.to_pylist()


def calibration_dataset(kept_parquet: Path, tokenizer: Any, *, samples: int, seq_len: int,
                        english_label: str = "en", key: str = "calibration_samples"):
    """``(dataset, info)``: a tokenized ``datasets.Dataset`` (input_ids, attention_mask) that
    llm-compressor's ``oneshot`` uses as is (chat template applied, each sample cut to
    ``seq_len`` tokens), and what the manifest records about it."""
    from datasets import Dataset

    rows = english_records(kept_parquet, samples, english_label=english_label, key=key)
    input_ids, ids = [], []
    for row in rows:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        # the template already wrote the special tokens
        tokens = tokenizer(text, add_special_tokens=False, truncation=True, max_length=seq_len)
        if tokens["input_ids"]:
            input_ids.append(tokens["input_ids"])
            ids.append(row["id"])
    dataset = Dataset.from_dict({"input_ids": input_ids,
                                 "attention_mask": [[1] * len(x) for x in input_ids]})
    lengths = [len(x) for x in input_ids]
    info = {"source": str(kept_parquet), "english_label": english_label, "samples": len(lengths),
            "requested_samples": samples, "seq_len": seq_len, "tokens": sum(lengths),
            "record_ids": ids}
    return dataset, info
