"""lm-eval's model interface over llama.cpp, in process: the benchmark tasks run on the GGUF file
that ships, the way its users run it.

One model is loaded once for every task. Requests that share a prompt prefix (the four answers of
a multiple-choice question, the chat template's system turn) reuse llama.cpp's KV cache for it:
requests are taken in prefix order and only the tokens after the common prefix are evaluated.
Generation is greedy. Wrapped in lm-eval's CachingLM (refinery.evaluate), a question a model has
answered is never computed again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from refinery import llamacpp


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LlamaCppLM(TemplateLM):
    """``TemplateLM`` on a GGUF through llama-cpp-python (CPU, or GPU layers in a CUDA build)."""

    def __init__(self, gguf_path: Path | str, *, max_length: int = 2048, n_threads: int | None = None,
                 tokenizer: Any = None, progress: Any = None) -> None:
        super().__init__()
        from refinery.base_model import tokenizer_from_gguf

        self.path = Path(gguf_path)
        self.max_length = max_length
        self._llm = llamacpp.load(self.path, n_ctx=max_length, n_threads=n_threads, logits_all=True)
        # the chat template comes with the GGUF; this HF tokenizer equals llama.cpp's (base_model)
        self.tokenizer = tokenizer or tokenizer_from_gguf(self.path)
        self._progress = progress or (lambda done, total, what: None)

    def close(self) -> None:
        self._llm.close()

    # ----------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        return int(self._llm.token_eos())

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # special=True: the chat template's <|im_start|> markers are single special tokens
        return list(self._llm.tokenize(string.encode("utf-8"), add_bos=bool(add_special_tokens), special=True))

    def tok_decode(self, tokens: list[int]) -> str:
        return self._llm.detokenize(tokens).decode("utf-8", errors="replace")

    @property
    def tokenizer_name(self) -> str:
        return f"llamacpp:{self.path.name}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        # lm-eval asks for no generation prompt when the history ends in an answer prefix (gen_prefix):
        # that assistant turn must stay open for the model to continue, as in lm-eval's HF model
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ----------------------------------------------------------------- evaluation

    def _eval_from_prefix(self, tokens: list[int]) -> np.ndarray:
        """Evaluate ``tokens``, reusing the KV cache for the prefix shared with what is loaded;
        returns the logits of every position (a view into llama-cpp-python's buffer)."""
        llm = self._llm
        keep = _common_prefix(list(llm.input_ids[: llm.n_tokens]), tokens)
        keep = min(keep, len(tokens) - 1)  # the last token is always evaluated: its logits are needed
        llm.n_tokens = keep
        llm.eval(tokens[keep:])
        return llm.scores[: len(tokens)]

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        order = sorted(range(len(requests)), key=lambda i: requests[i][1] + requests[i][2])
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for done, i in enumerate(order, 1):
            _, context, continuation = requests[i]
            # as lm-eval's HF model does: at most max_length + 1 tokens, the last one only a target
            whole = (context + continuation)[-(self.max_length + 1):]
            inp = whole[:-1]
            n_cont = min(len(continuation), len(inp))
            logits = np.asarray(self._eval_from_prefix(inp)[len(inp) - n_cont:], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            target = np.asarray(whole[-n_cont:])
            logprob = float((logits[np.arange(n_cont), target] - logz).sum())
            greedy = bool((logits.argmax(axis=1) == target).all())
            out[i] = (logprob, greedy)
            self._progress(done, len(requests), "loglikelihood")
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        results = []
        for done, (string,) in enumerate((req.args for req in requests), 1):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            total = 0.0
            for context, continuation in windows:
                total += self._loglikelihood_tokens([(None, context, continuation)])[0][0]
            results.append(total)
            self._progress(done, len(requests), "loglikelihood_rolling")
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results = []
        for done, req in enumerate(requests, 1):
            context, kwargs = req.args
            until = [u for u in (kwargs.get("until") or []) if u]
            max_new = int(kwargs.get("max_gen_toks", 256))
            results.append(self._greedy(self.tok_encode(context), until, max_new))
            self._progress(done, len(requests), "generate_until")
        return results

    def _greedy(self, prompt: list[int], until: list[str], max_new: int) -> str:
        llm = self._llm
        prompt = prompt[-max(self.max_length - max_new, 1):]  # room for the answer
        generated: list[int] = []
        text = ""
        # generate() reuses the KV cache of the longest common prefix with what is loaded
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            if token == self.eot_token_id or llm.n_tokens >= self.max_length:
                break
            generated.append(int(token))
            text = self.tok_decode(generated)
            stops = [text.find(u) for u in until if u in text]
            if stops:
                return text[:min(stops)]
            if len(generated) >= max_new:
                break
        return text

