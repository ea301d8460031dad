"""Any Kvant artifact as an lm-evaluation-harness model, on NorMistral's exact tokens.

    import lm_eval
    from kvant.app.lmeval import KvantLM
    lm_eval.simple_evaluate(model=KvantLM("out/normistral-11b-long-gguf/...-Q4_K_M.gguf"),
                            tasks=["noreval_..."])

Registered as ``kvant`` (``--model kvant --model_args artifact=PATH`` wherever lm-eval's
registry has this module imported). lm-eval's own gguf and OpenAI-API backends tokenize with
the server's tokenizer or none at all; here every request is tokenized with the exact
NorMistral tokenizer the artifact carries (kvant.tokenization.exact_tokenizer: tokenizer.json,
or the one embedded in a GGUF), and the runtime is Kvant's own for that kind (transformers
for bf16, GPTQ and bitsandbytes, llama.cpp for GGUF, ONNX Runtime for ONNX), so a bf16 folder
and its bf16 GGUF score the same ids.

Written here because lm-eval's HFLM takes transformers models only; the split of a request
follows HFLM's (lm-eval's convention: trailing spaces of the context belong to the
continuation, and the continuation's ids are those of context + continuation after the
context's own).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from kvant.errors import SettingsError
from kvant.generation import Engine, stated_context
from kvant.runtimes import open_runtime
from kvant.runtimes.reference import reference_dtype
from kvant.runtimes.targets import targets, verify
from kvant.tokenization import exact_tokenizer

DEFAULT_MAX_LENGTH = 4096  # tokens per forward unless the artifact states less


def split_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with <s>, continuation ids): the continuation's ids are the tail of
    context + continuation's exact ids after the context's own (HFLM's rule), with the
    context's trailing spaces moved to the continuation first."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation).ids
    head = tokenizer.encode(context).ids if context else whole[:1]  # "" is <s> alone
    return head, whole[len(head):]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@register_model("kvant")
class KvantLM(LM):
    """One artifact (a bf16 folder, a GPTQ or bitsandbytes checkpoint, a .gguf file, an ONNX
    folder) behind lm-eval's three request types. ``max_length``: tokens per forward (a
    longer request keeps its last ones, as HFLM does). ``runtime``: an opened kvant runtime
    to use instead (tests record what it is fed)."""

    def __init__(self, artifact: str, device: str = "cpu", max_length: int | str = 0,
                 threads: int | str = 0, runtime=None, **_lm_eval_args) -> None:
        super().__init__()
        found = targets(Path(artifact))
        if len(found) != 1:
            raise SettingsError(f"'{artifact}' holds {len(found)} models; pass one .gguf file "
                                "or one artifact folder")
        self.target = found[0]
        verify(self.target)
        self.tokenizer = exact_tokenizer(self.target.path)
        self.bos_id = self.tokenizer.token_to_id("<s>")
        self.max_length = int(max_length) or min(stated_context(self.target),
                                                 DEFAULT_MAX_LENGTH)
        self.where, self.threads = device, int(threads)  # LM.device is lm-eval's
        self._runtime, self._engine = runtime, None
        self._own_runtime = runtime is None

    # the scoring runtime and the generation engine are opened one at a time: never two
    # copies of an 11.4B model in memory
    def _scorer(self):
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._runtime is None:
            dtype = (reference_dtype(self.target.path, self.where)
                     if self.target.fmt == "bf16" else "bfloat16")
            self._runtime = open_runtime(self.target, self.where, self.threads,
                                         n_ctx=self.max_length + 8, dtype=dtype)
        return self._runtime

    def _generator(self) -> Engine:
        if self._runtime is not None and self._own_runtime:
            self._runtime.close()
            self._runtime = None
        if self._engine is None:
            self._engine = Engine(self.target.path, self.where, self.max_length,
                                  self.threads, check=False)
        return self._engine

    def close(self) -> None:
        for held in (self._engine, self._runtime if self._own_runtime else None):
            if held is not None:
                held.close()
        self._engine = self._runtime = None

    def score(self, head: list[int], tail: list[int]) -> tuple[float, bool]:
        """(sum of log p(tail | head), whether greedy decoding gives ``tail``): one forward
        over head + tail, cut on the left to ``max_length`` + 1 ids."""
        if not tail:
            raise SettingsError("a request's continuation is empty after tokenization; "
                                "lm-eval tasks score at least one token")
        ids = (head + tail)[-(self.max_length + 1):]
        logits = self._scorer().logits(ids[:-1])[-len(tail):]
        logp = _log_softmax(logits)
        rows = np.arange(len(tail))
        return float(logp[rows, tail].sum()), bool((logits.argmax(-1) == tail).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        done: dict[tuple, tuple[float, bool]] = {}  # multiple choice repeats its pairs
        out = []
        for request in requests:
            head, tail = split_request(self.tokenizer, *request.args)
            key = (tuple(head), tuple(tail))
            if key not in done:
                done[key] = self.score(head, tail)
            out.append(done[key])
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for request in requests:
            ids = self.tokenizer.encode(request.args[0]).ids[1:]  # after <s>
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=self.bos_id, max_seq_len=self.max_length,
                context_len=1)]
            out.append(sum(self.score(head, tail)[0] for head, tail in windows))
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
                raise SettingsError("kvant's lm-eval model decodes greedily; set the task's "
                                    "generation_kwargs do_sample: false")
            engine = self._generator()
            ids = engine.encode(context)[-(self.max_length - 1):]
            n_new = min(int(kwargs.get("max_gen_toks") or 256), self.max_length - len(ids))
            out.append("".join(engine.complete(ids, n_new, stop=until)))
        return out
