"""The ONNX runtimes: plain onnxruntime (logits of a window) and ONNX Runtime GenAI
(generation with its KV cache, as GenAI apps run the model)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og

from kvant.errors import SettingsError
from kvant.plan.peaks import PREFILL_BATCH


def kv_shape(model_dir: Path) -> tuple[int, int]:
    """(num_key_value_heads, head_size) from genai_config.json."""
    decoder = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
    return decoder["num_key_value_heads"], decoder["head_size"]


class OrtRuntime:
    """model.onnx in a plain InferenceSession on the CPU: each window from an empty cache."""

    def __init__(self, path: Path):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(Path(path) / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.kv_shape = kv_shape(path)

    def logits(self, ids: list[int]) -> np.ndarray:
        feeds = {}
        for inp in self.session.get_inputs():
            if inp.name == "input_ids":
                feeds[inp.name] = np.array([ids], dtype=np.int64)
            elif inp.name == "attention_mask":
                feeds[inp.name] = np.ones((1, len(ids)), dtype=np.int64)
            else:  # past_key_values.N.key/value: (batch, kv_heads, 0, head_dim)
                dtype = np.float16 if "float16" in inp.type else np.float32
                feeds[inp.name] = np.zeros((1, self.kv_shape[0], 0, self.kv_shape[1]),
                                           dtype=dtype)
        return self.session.run(["logits"], feeds)[0][0].astype(np.float32)

    def prefill(self, ids: list[int]) -> float:
        start = time.perf_counter()
        self.logits(ids)
        return time.perf_counter() - start

    def decode(self, ids: list[int], n_new: int) -> float:
        raise SettingsError("plain onnxruntime has no KV-cache loop here; use the "
                            "onnxruntime-genai runtime for decode speed")

    def greedy(self, ids: list[int]) -> Iterator[int]:
        raise SettingsError("use the onnxruntime-genai runtime to generate")

    def sample(self, ids: list[int], sampling) -> Iterator[int]:
        return self.greedy(ids)

    def close(self) -> None:
        del self.session


# GenAI takes a prompt in one forward by default, and on the CPU that forward holds float32
# logits of every position (8,192 x 51,200 x 4 bytes, copied about twice) and an arena that
# grows with the forward's length. Fed in batches of PREFILL_BATCH (512) tokens, as
# llama.cpp's speed rows are (n_batch 512), the next tokens are the same and the prefill is
# no slower: at one real-width layer and 8,192 tokens, 4,791 MiB and 133 tok/s in one
# forward, 1,318 MiB and 165 tok/s in batches of 512. GenAI's own search.chunk_size serves
# only its CUDA and TensorRT providers.


def append(generator, ids: list[int], batch: int = PREFILL_BATCH) -> None:
    """Feed ``ids`` to a GenAI generator ``batch`` tokens per forward."""
    tokens = np.asarray(ids, dtype=np.int32)
    for start in range(0, len(tokens), batch):
        generator.append_tokens(tokens[start:start + batch])


def og_model(model_dir: Path, device: str = "cpu"):
    """An onnxruntime-genai model; on the CPU whatever provider it was built for."""
    if device.startswith("cuda"):
        return og.Model(str(model_dir))
    config = og.Config(str(model_dir))
    config.clear_providers()
    return og.Model(config)


class GenaiRuntime:
    """An ONNX folder in ONNX Runtime GenAI; logits come from plain onnxruntime on the same
    model.onnx (GenAI exposes only the newest position's logits)."""

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0, n_ctx: int = 0):
        self.path = Path(path)
        self.model = og_model(path, device)
        self._ort: OrtRuntime | None = None  # opened on the first logits() call
        # the context a generation may fill (prompt and new tokens): ``n_ctx``, else the
        # trained context the model was built for
        self.n_ctx = n_ctx or int(self._config()["model"]["context_length"])

    def logits(self, ids: list[int]) -> np.ndarray:
        if self._ort is None:
            self._ort = OrtRuntime(self.path)
        return self._ort.logits(ids)

    def _generator(self, max_length: int, sampling=None):
        params = og.GeneratorParams(self.model)
        if sampling is None or sampling.greedy:
            params.set_search_options(max_length=max_length, do_sample=False)
        else:  # GenAI's top_k has no "off": the whole vocabulary is the same thing
            params.set_search_options(
                max_length=max_length, do_sample=True, temperature=sampling.temperature,
                top_p=sampling.top_p, top_k=sampling.top_k or self._vocab_size(),
                random_seed=secrets.randbits(31) if sampling.seed is None else sampling.seed)
        return og.Generator(self.model, params)

    def _config(self) -> dict:
        return json.loads((self.path / "genai_config.json").read_text())

    def _vocab_size(self) -> int:
        return int(self._config()["model"]["vocab_size"])

    def prefill(self, ids: list[int]) -> float:
        generator = self._generator(len(ids) + 1)
        start = time.perf_counter()
        append(generator, ids)
        return time.perf_counter() - start

    def decode(self, ids: list[int], n_new: int) -> float:
        generator = self._generator(len(ids) + n_new)
        append(generator, ids)
        start = time.perf_counter()
        for _ in range(n_new):
            generator.generate_next_token()
        return time.perf_counter() - start

    def greedy(self, ids: list[int], max_length: int | None = None) -> Iterator[int]:
        return self.sample(ids, None, max_length)

    def sample(self, ids: list[int], sampling, max_length: int | None = None
               ) -> Iterator[int]:
        """Tokens after ``ids`` from GenAI's own search (``sampling``: a
        kvant.engine.Sampling; greedy at temperature 0 or None), until the runtime's
        context (``max_length``: a shorter one) is full."""
        generator = self._generator(min(max_length or self.n_ctx, self.n_ctx), sampling)
        append(generator, ids)
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    def tokenizer(self):
        """GenAI's own tokenizer (what GenAI apps use on raw text)."""
        return og.Tokenizer(self.model)

    def close(self) -> None:
        if self._ort is not None:
            self._ort.close()
        del self.model
