"""The torch runtime: transformers checkpoints (bf16, bitsandbytes, GPTQ) on CPU or CUDA."""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, QuantizedCache

from kvant.errors import SettingsError


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# transformers' QuantizedCache for Kvant's torch cache types (kvant.plan.KV_CACHES): fp8 is
# built in; int4 is optimum-quanto's (KIVI-style: per-channel groups of 64, the newest 128
# tokens unquantized).
_QUANTIZED_CACHE = {"fp8": {"backend": "fp8"},
                    "int4": {"backend": "quanto", "nbits": 4, "q_group_size": 64,
                             "residual_length": 128}}
# A quantized cache only shows in attention over earlier chunks: a whole-window forward
# attends to its own fresh keys. Scoring with one feeds the window in chunks this long, as
# a server's prefill batches and a generation's steps would meet the cache.
CACHE_CHUNK = 512


def _nbytes(value) -> int:
    """Bytes of the storage behind a cache attribute: tensors, tuples of them and tensor
    subclasses (quanto's packed tensors) flattened to the plain tensors they hold."""
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if not isinstance(value, torch.Tensor):
        return 0
    if hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return sum(_nbytes(getattr(value, n)) for n in names)
    return value.numel() * value.element_size()


def cache_bytes(cache) -> int:
    """What a transformers cache holds in memory, every layer's keys and values (quantized
    and residual) with their scales: the number the planner's KV bytes predict."""
    return sum(_nbytes(v) for layer in cache.layers for v in vars(layer).values())


class TorchRuntime:
    """A transformers model; quantized checkpoints keep the dtype their config chooses.

    ``kv_type``: f16 (the model's own dtype, transformers' DynamicCache), fp8 or int4
    (transformers' QuantizedCache; int4 needs optimum-quanto).
    """

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0,
                 dtype: str = "bfloat16", kv_type: str = "f16"):
        if threads:
            torch.set_num_threads(threads)
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        if "quantization_config" in config:
            self.model = AutoModelForCausalLM.from_pretrained(path, device_map=device)
        elif device.startswith("cuda"):
            # accelerate places what fits on the GPU and offloads the rest to CPU memory
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype), device_map="auto")
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype)).to(device)
        self.model.eval()
        self.device = str(self.model.device) if device.startswith("cuda") else device
        self.kv_type = kv_type
        if kv_type == "int4":
            try:
                import optimum.quanto  # noqa: F401
            except ImportError:
                raise SettingsError("--kv-type int4 needs optimum-quanto for transformers' "
                                    "quantized cache; pip install 'kvant[torch-kv]' or "
                                    "use fp8") from None

    def cache(self):
        """A fresh KV cache of this runtime's type (None: the model's default)."""
        if self.kv_type == "f16":
            return None
        return QuantizedCache(config=self.model.config, **_QUANTIZED_CACHE[self.kv_type])

    def logits(self, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            cache = self.cache()
            if cache is None:
                out = self.model(torch.tensor([ids], device=self.device)).logits[0]
                return out.float().cpu().numpy()
            parts = [self.model(torch.tensor([ids[i:i + CACHE_CHUNK]], device=self.device),
                                past_key_values=cache, use_cache=True).logits[0].float().cpu()
                     for i in range(0, len(ids), CACHE_CHUNK)]
        return torch.cat(parts).numpy()

    def _prompt(self, ids: list[int]):
        return self.model(torch.tensor([ids], device=self.device),
                          past_key_values=self.cache(), use_cache=True)

    def prefill(self, ids: list[int]) -> float:
        with torch.no_grad():
            _sync(self.device)
            start = time.perf_counter()
            self._prompt(ids)
            _sync(self.device)
        return time.perf_counter() - start

    def decode(self, ids: list[int], n_new: int) -> float:
        with torch.no_grad():
            out = self._prompt(ids)
            cache, token = out.past_key_values, out.logits[0, -1].argmax()
            _sync(self.device)
            start = time.perf_counter()
            for _ in range(n_new):
                out = self.model(token.view(1, 1), past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[0, -1].argmax()
            _sync(self.device)
        return time.perf_counter() - start

    def greedy(self, ids: list[int]) -> Iterator[int]:
        with torch.no_grad():
            out = self._prompt(ids)
            while True:
                token = out.logits[0, -1].argmax()
                yield int(token)
                out = self.model(token.view(1, 1), past_key_values=out.past_key_values,
                                 use_cache=True)

    def sample(self, ids: list[int], sampling) -> Iterator[int]:
        """Tokens after ``ids`` (``sampling``: a kvant.engine.Sampling): greedy at
        temperature 0, else llama.cpp's default order: top-k, then top-p on the untempered
        distribution, then temperature, drawn with a torch.Generator seeded by
        ``sampling.seed``."""
        if sampling.greedy:
            yield from self.greedy(ids)
            return
        generator = torch.Generator().manual_seed(
            secrets.randbits(31) if sampling.seed is None else sampling.seed)
        with torch.no_grad():
            out = self._prompt(ids)
            while True:
                logits = out.logits[0, -1].float().cpu()  # (vocab,)
                if 0 < sampling.top_k < logits.numel():
                    logits[logits < torch.topk(logits, sampling.top_k).values[-1]] = -math.inf
                if sampling.top_p < 1.0:
                    order = torch.argsort(logits, descending=True)
                    mass = torch.softmax(logits[order], dim=0).cumsum(0)
                    # keep the smallest prefix whose mass reaches top_p (its last token too)
                    logits[order[1:][mass[:-1] >= sampling.top_p]] = -math.inf
                probs = torch.softmax(logits / sampling.temperature, dim=0)
                token = torch.multinomial(probs, 1, generator=generator)
                yield int(token)
                out = self.model(token.view(1, 1).to(self.device),
                                 past_key_values=out.past_key_values, use_cache=True)

    def close(self) -> None:
        del self.model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
