"""The MLX runtime: mlx-lm folders on Apple silicon's GPU (Metal) or on any CPU.

The model is mlx-lm's own (`mlx_lm.load`), and so are its KV cache and its decoding loop
(`mlx_lm.generate.generate_step`, with mlx-lm's sampler), so what Kvant measures is what
`mlx_lm.generate`, `mlx_lm.server` and LM Studio run. Kvant feeds it the exact HF token ids;
mlx-lm's tokenizer is not used here (the MLX export checks that it gives the same ids).

On the CPU the float tensors (scales, biases, norms) are cast to float32 after loading, so
activations are float32: MLX's CPU quantized matmul is about 10x slower with bfloat16
activations (a 576 x 1,536 4-bit matmul of 132 rows: 1.06 s against 0.11 s, MLX 0.32.4 on
2 cores of an AMD EPYC). The quantized weights are unchanged, and the casts are exact. This
is also how llama.cpp's CPU path, which Kvant's GGUF numbers come from, computes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from kvant.errors import SettingsError

DEVICES = ("cpu", "gpu")
# mlx-lm's generate_step feeds a prompt this many tokens per forward (its prefill_step_size):
# the speed rows prefill as it does, so a long prompt never holds every position's logits
PREFILL_STEP = 2048


def mlx_device(device: str):
    """MLX's device for Kvant's --device: cpu, or the GPU (Metal) for gpu, mps or metal."""
    if device in ("gpu", "mps", "metal"):
        if not mx.metal.is_available():
            raise SettingsError(f"--device {device}: MLX has no Metal GPU on this machine; "
                                "pass --device cpu")
        return mx.gpu
    if device != "cpu":
        raise SettingsError(f"--device {device}: MLX runs on cpu, or on a Mac's GPU with "
                            "--device gpu")
    return mx.cpu


class MLXRuntime:
    """One mlx-lm folder loaded on ``device`` (cpu, or gpu: Metal)."""

    def __init__(self, path: Path, device: str = "cpu"):
        self.device = mlx_device(device)
        mx.set_default_device(self.device)
        self.model, _ = load(str(Path(path)))
        if self.device == mx.cpu:
            self.model.update(tree_map(
                lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v,
                self.model.parameters()))
            # now, in this thread: a lazy cast left for a server's worker thread to evaluate
            # would run on a stream that thread does not have
            mx.eval(self.model.parameters())
        self.model.eval()
        # MLX streams belong to a thread, and `kvant serve` generates in its worker threads:
        # a thread-local stream on this runtime's device, as mlx-lm's own generation stream
        self.stream = mx.new_thread_local_stream(self.device)

    def logits(self, ids: list[int]) -> np.ndarray:
        with mx.stream(self.stream):
            return np.array(self.model(mx.array([ids]))[0].astype(mx.float32))

    def _forward(self, ids: list[int], cache) -> mx.array:
        with mx.stream(self.stream):
            out = self.model(mx.array([ids]), cache=cache)
            mx.eval(out)
        return out

    def _prompt(self, ids: list[int], cache) -> mx.array:
        for start in range(0, len(ids), PREFILL_STEP):
            out = self._forward(ids[start:start + PREFILL_STEP], cache)
        return out

    def prefill(self, ids: list[int]) -> float:
        start = time.perf_counter()
        self._prompt(ids, make_prompt_cache(self.model))
        return time.perf_counter() - start

    def decode(self, ids: list[int], n_new: int) -> float:
        cache = make_prompt_cache(self.model)
        token = int(self._prompt(ids, cache)[0, -1].argmax().item())
        start = time.perf_counter()
        for _ in range(n_new):
            token = int(self._forward([token], cache)[0, -1].argmax().item())
        return time.perf_counter() - start

    def greedy(self, ids: list[int]) -> Iterator[int]:
        return self._generate(ids, make_sampler(0.0))

    def sample(self, ids: list[int], sampling) -> Iterator[int]:
        """Tokens after ``ids`` by mlx-lm's own sampler (``sampling``: a
        kvant.engine.Sampling; greedy at temperature 0), seeded by ``sampling.seed``."""
        if sampling.greedy:
            return self.greedy(ids)
        if sampling.seed is not None:
            mx.random.seed(sampling.seed)
        return self._generate(ids, make_sampler(sampling.temperature, top_p=(
            sampling.top_p if sampling.top_p < 1.0 else 0.0), top_k=sampling.top_k))

    def _generate(self, ids: list[int], sampler) -> Iterator[int]:
        for token, _ in generate_step(mx.array(ids), self.model, self.stream, max_tokens=-1,
                                      sampler=sampler):
            yield int(token)

    def close(self) -> None:
        del self.model
        mx.clear_cache()
