"""How close a quantized model stays to the dense one, measured in llama.cpp as its own
quantization scoreboard does (llama-perplexity --kl-divergence).

One fixed **token set** (held-out English: WikiText-2 test text and the demo's held-out
conversations in the chat template, cut into chunks of ``chunk`` tokens) is evaluated by every
model. The dense baseline's full next-token distributions are computed once and kept on disk
(log-probabilities, float16, one row per predicted position); every candidate is then scored
position by position against them:

- perplexity of the text (the candidate's own log-likelihood of the next token);
- KL divergence KL(P_dense || P_candidate) per position, its mean and 99th percentile;
- top-1 agreement: how often the candidate's most likely token is the dense model's.

Every position of a chunk after its first is predicted and scored. Intervals are percentile
bootstraps over chunks (positions within a chunk are not independent), the same resamples for
every statistic. Chance-level accuracy on a small benchmark cannot see damage; these can, on every
model, with a few thousand tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BOOTSTRAP_ITERS = 1000
SEED = 1234
LEVEL = 0.95


# --------------------------------------------------------------------------- the token set


@dataclass(frozen=True)
class TokenSet:
    """Chunks of token ids every model evaluates, and where each chunk's text came from."""

    chunks: np.ndarray  # (n_chunks, chunk) int32
    sources: tuple[str, ...]  # per chunk: "wikitext" | "conversations"

    @property
    def predictions(self) -> int:
        """Scored positions: every token of a chunk after the first."""
        return self.chunks.shape[0] * (self.chunks.shape[1] - 1)

    @property
    def digest(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.chunks, dtype=np.int32).tobytes())
        h.update(json.dumps(self.sources).encode())
        return h.hexdigest()[:16]

    def save(self, path: Path) -> None:
        np.savez(path, chunks=self.chunks, sources=np.array(self.sources))

    @classmethod
    def load(cls, path: Path) -> TokenSet:
        data = np.load(path)
        return cls(data["chunks"].astype(np.int32), tuple(str(s) for s in data["sources"]))


def _chunked(ids: Sequence[int], chunk: int, count: int, what: str) -> list[np.ndarray]:
    if len(ids) < chunk * count:
        raise ValueError(f"fidelity: {what} gives {len(ids)} tokens, fewer than the {count} chunks of "
                         f"{chunk} asked for (eval.fidelity)")
    return [np.asarray(ids[i * chunk:(i + 1) * chunk], dtype=np.int32) for i in range(count)]


def build_token_set(tokenize: Callable[[str], list[int]], wikitext: str, conversations: Sequence[str], *,
                    chunk: int, wikitext_chunks: int, conversation_chunks: int) -> TokenSet:
    """The token set: the first ``wikitext_chunks`` chunks of WikiText-2 and ``conversation_chunks``
    chunks of the held-out conversations (already chat-formatted, concatenated in order)."""
    parts: list[np.ndarray] = []
    sources: list[str] = []
    if wikitext_chunks:
        # roughly 4 characters a token: tokenize a prefix that is surely long enough
        ids = tokenize(wikitext[: chunk * wikitext_chunks * 12])
        parts += _chunked(ids, chunk, wikitext_chunks, "WikiText-2")
        sources += ["wikitext"] * wikitext_chunks
    if conversation_chunks:
        ids: list[int] = []
        for text in conversations:
            ids += tokenize(text)
            if len(ids) >= chunk * conversation_chunks:
                break
        parts += _chunked(ids, chunk, conversation_chunks, "the held-out conversations")
        sources += ["conversations"] * conversation_chunks
    if not parts:
        raise ValueError("fidelity: the token set is empty (eval.fidelity asks for no chunks)")
    return TokenSet(np.stack(parts), tuple(sources))


# --------------------------------------------------------------------------- scoring


def _log_probs(logits: np.ndarray, rows: int, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first ``rows`` positions' logits and their log-probabilities, written into ``out``
    (float32, or the reference's float16 rows) as logits - logsumexp(logits) in one pass.
    Returns (logits, logsumexp)."""
    import torch

    z = np.ascontiguousarray(logits[:rows], dtype=np.float32)
    if z.shape != out.shape:
        raise ValueError(f"vocabulary {z.shape[1]} differs from the reference's {out.shape[1]}")
    lse = torch.logsumexp(torch.from_numpy(z), -1).numpy()
    np.subtract(z, lse[:, None], out=out, casting="same_kind")
    return z, lse


def reference_path(work: Path, reference_sha: str, tokens: TokenSet) -> Path:
    return work / f"reference-{reference_sha[:16]}-{tokens.digest}.npy"


def write_reference(chunk_logits: Callable[[np.ndarray], np.ndarray], tokens: TokenSet, out: Path,
                    progress: Callable[[int, int], Any] = lambda i, n: None) -> dict[str, Any]:
    """Compute the dense model's log-probabilities for every scored position and store them
    (float16, rows = positions in chunk order) at ``out`` (written under a temporary name, then
    renamed). ``chunk_logits(ids)`` returns the logits (len(ids) x vocab) of one chunk. Returns the
    reference's own per-chunk statistics (its perplexity)."""
    n_chunks, width = tokens.chunks.shape
    rows = width - 1
    tmp = out.with_name(f".{out.name}.tmp")
    memmap = None
    stats = _empty_stats(n_chunks)
    try:
        for i, ids in enumerate(tokens.chunks):
            logits = chunk_logits(ids)
            if memmap is None:
                memmap = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                   shape=(n_chunks * rows, logits.shape[1]))
            z, lse = _log_probs(logits, rows, memmap[i * rows:(i + 1) * rows])
            stats["nll"][i] = float((lse - z[np.arange(rows), ids[1:]]).sum())
            stats["count"][i] = rows
            stats["top1"][i] = rows
            progress(i + 1, n_chunks)
        memmap.flush()
        del memmap
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    stats["kld_tokens"] = np.zeros(n_chunks * rows, dtype=np.float32)
    return stats


def _empty_stats(n_chunks: int) -> dict[str, Any]:
    return {"nll": np.zeros(n_chunks), "kld": np.zeros(n_chunks), "top1": np.zeros(n_chunks),
            "count": np.zeros(n_chunks)}


def _reference_rows(reference: Path, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per reference position: sum_v p log p (minus the entropy) and the most likely token, from
    the stored float16 log-probabilities exactly as ``score`` reads them. They are the same for
    every candidate: computed once and kept next to the reference (written under a temporary
    name, then renamed)."""
    import torch

    side = reference.with_name(f"{reference.stem}.rows.npz")
    if side.exists():
        data = np.load(side)
        return data["neg_entropy"], data["top1"]
    ref = np.load(reference, mmap_mode="r")
    neg_entropy, top1 = np.empty(len(ref)), np.empty(len(ref), np.int64)
    for start in range(0, len(ref), rows):
        logp = torch.from_numpy(np.array(ref[start:start + rows])).float()
        neg_entropy[start:start + rows] = np.einsum("ij,ij->i", logp.exp().numpy(), logp.numpy())
        top1[start:start + rows] = logp.numpy().argmax(-1)
    tmp = side.with_name(f".{side.name}.tmp.npz")
    np.savez(tmp, neg_entropy=neg_entropy, top1=top1)
    tmp.rename(side)
    return neg_entropy, top1


def score(chunk_logits: Callable[[np.ndarray], np.ndarray], tokens: TokenSet, reference: Path,
          progress: Callable[[int, int], Any] = lambda i, n: None) -> dict[str, Any]:
    """Per-chunk sums (nll, KL divergence, top-1 agreements, positions) and the per-position KL
    divergences of one candidate against the stored reference.

    KL(P || Q) = sum p log p - sum p log q per position, with the first sum taken once per
    reference (``_reference_rows``) and log q = logits - logsumexp(logits): a few passes over the
    (positions x vocabulary) logits per chunk, 0.12 s on 2 cores for 511 x 49152 (0.23 s as
    log-softmaxes of both sides), against about 1.0 s for llama.cpp to compute the logits."""
    import torch

    n_chunks, width = tokens.chunks.shape
    rows = width - 1
    ref = np.load(reference, mmap_mode="r")
    if ref.shape[0] != n_chunks * rows:
        raise ValueError(f"{reference}: {ref.shape[0]} reference rows for a token set of {n_chunks * rows}")
    neg_entropy, ref_top1 = _reference_rows(reference, rows)
    stats = _empty_stats(n_chunks)
    kld_tokens = np.empty(n_chunks * rows, dtype=np.float32)
    logq = np.empty((rows, ref.shape[1]), dtype=np.float32)
    for i, ids in enumerate(tokens.chunks):
        z, _lse = _log_probs(chunk_logits(ids), rows, logq)
        part = slice(i * rows, (i + 1) * rows)
        p = torch.from_numpy(np.array(ref[part])).float().exp_().numpy()
        # float16 rounding of the reference can take a position a hair below 0
        kld = np.maximum(neg_entropy[part] - np.einsum("ij,ij->i", p, logq), 0)
        kld_tokens[part] = kld
        stats["nll"][i] = float(-logq[np.arange(rows), ids[1:]].sum())
        stats["kld"][i] = float(kld.sum())
        stats["top1"][i] = float((z.argmax(-1) == ref_top1[part]).sum())
        stats["count"][i] = rows
        progress(i + 1, n_chunks)
    stats["kld_tokens"] = kld_tokens
    return stats


# --------------------------------------------------------------------------- summaries


def _interval(values: np.ndarray) -> tuple[float, float]:
    alpha = (1 - LEVEL) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def summarize(stats: dict[str, Any], sources: Sequence[str] | None = None,
              iters: int = BOOTSTRAP_ITERS) -> dict[str, Any]:
    """Perplexity, mean and 99th-percentile KL divergence and top-1 agreement with 95% bootstrap
    intervals over chunks; per source too when ``sources`` is given."""
    out = _summary(stats, np.arange(len(stats["nll"])), iters)
    if sources is not None:
        out["by_source"] = {}
        for src in sorted(set(sources)):
            idx = np.array([i for i, s in enumerate(sources) if s == src])
            out["by_source"][src] = _summary(stats, idx, iters)
    return out


def _summary(stats: dict[str, Any], chunks: np.ndarray, iters: int) -> dict[str, Any]:
    nll, kld, top1, count = (np.asarray(stats[k])[chunks] for k in ("nll", "kld", "top1", "count"))
    rows = int(count[0]) if len(count) else 0
    tokens = np.asarray(stats["kld_tokens"]).reshape(-1, rows)[chunks] if rows else np.zeros((0, 0))

    def point(idx: np.ndarray) -> tuple[float, float, float, float]:
        n = count[idx].sum()
        return (math.exp(nll[idx].sum() / n), kld[idx].sum() / n, top1[idx].sum() / n,
                float(np.quantile(tokens[idx].ravel(), 0.99)))

    whole = point(np.arange(len(chunks)))
    rng = np.random.default_rng(SEED)
    boots = np.array([point(rng.integers(0, len(chunks), len(chunks))) for _ in range(iters)])
    names = ("perplexity", "kld_mean", "top1_agreement", "kld_p99")
    out: dict[str, Any] = {"chunks": int(len(chunks)), "predictions": int(count.sum()),
                           "interval": f"{LEVEL:.0%} percentile bootstrap over chunks ({iters} resamples)"}
    for j, name in enumerate(names):
        low, high = _interval(boots[:, j])
        out[name] = {"value": whole[j], "ci_low": low, "ci_high": high}
    return out


def save_stats(stats: dict[str, Any], path: Path) -> None:
    np.savez(path, **{k: np.asarray(v) for k, v in stats.items()})


def load_stats(path: Path) -> dict[str, Any]:
    data = np.load(path)
    return {k: data[k] for k in data.files}
