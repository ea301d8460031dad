"""One way to run every format: a runtime per engine behind one small protocol.

    runtime = open_runtime(target, device="cpu")
    logits = runtime.logits(ids)        # (len(ids), vocab) float32, fresh cache per call
    seconds = runtime.prefill(ids)      # timed prompt processing
    seconds = runtime.decode(ids, 32)   # timed greedy decode of 32 tokens after ids
    runtime.close()

Pipelines validate their output with these runtimes and the bench measures with them, so a
GGUF, an ONNX folder or a GPTQ checkpoint yields logits one way only. The engines (torch,
llama.cpp, ONNX Runtime, MLX) are heavy imports: each lives in its own module, imported when a
runtime of that kind is opened.

What to run is found by kvant.runtimes.targets; the reference distributions every
scorer compares with are kept by kvant.runtimes.reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from kvant.errors import SettingsError
from kvant.plan.kv import require_kv_type
from kvant.runtimes.targets import Target

BACKENDS = ("torch", "llama.cpp", "onnxruntime-genai", "onnxruntime", "mlx")


class Runtime(Protocol):
    """What every engine offers for one loaded model."""

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits from an empty cache."""

    def prefill(self, ids: list[int]) -> float:
        """Seconds to process ``ids`` from an empty cache."""

    def decode(self, ids: list[int], n_new: int) -> float:
        """Seconds to generate ``n_new`` greedy tokens after ``ids`` (prefill not counted)."""

    def greedy(self, ids: list[int]) -> Iterator[int]:
        """Greedy next tokens after ``ids``, one at a time, until the caller stops."""

    def sample(self, ids: list[int], sampling) -> Iterator[int]:
        """Next tokens after ``ids`` chosen by ``sampling`` (a kvant.engine.Sampling:
        greedy at temperature 0), one at a time, until the caller stops."""

    def close(self) -> None:
        """Free the engine's memory."""


def open_runtime(target: Target, device: str = "cpu", threads: int = 0, n_ctx: int = 0,
                 all_logits: bool = True, dtype: str = "bfloat16",
                 repack: bool = False, kv_type: str = "f16") -> Runtime:
    """Load ``target`` in its engine.

    ``all_logits`` False keeps only the last position's logits (speed runs: copying
    (tokens x vocab) floats would be measured as compute); ``dtype`` applies to plain
    (unquantized) torch checkpoints; ``repack`` to llama.cpp's CPU weight repacking (see
    kvant.runtimes.llamacpp); ``kv_type`` to the KV cache (kvant.plan.KV_CACHES: f16, q8_0
    and q4_0 in llama.cpp, f16, fp8 and int4 in transformers, f16 in ONNX Runtime GenAI
    and MLX).
    """
    require_kv_type(target.backend, kv_type)
    # Each engine module imports its engine (torch, llama_cpp, onnxruntime) at its top:
    # imported here, on first use, so that opening a GGUF never loads torch.
    if target.backend == "torch":
        from kvant.runtimes.hf import TorchRuntime

        return TorchRuntime(target.path, device, threads, dtype, kv_type=kv_type)
    if target.backend == "llama.cpp":
        from kvant.runtimes.llamacpp import LlamaCppRuntime

        return LlamaCppRuntime(target.path, device, threads, n_ctx, all_logits, repack=repack,
                               kv_type=kv_type)
    if target.backend == "onnxruntime-genai":
        from kvant.runtimes.onnx import GenaiRuntime

        return GenaiRuntime(target.path, device, threads, n_ctx)
    if target.backend == "onnxruntime":
        from kvant.runtimes.onnx import OrtRuntime

        return OrtRuntime(target.path)
    if target.backend == "mlx":
        try:
            from kvant.runtimes.mlx import MLXRuntime
        except ImportError as exc:
            raise SettingsError(f"'{target.path}' is an MLX model and MLX is not installed "
                                f"({exc.name} is missing); pip install 'kvant[mlx]' (macOS or "
                                "Linux)") from None

        return MLXRuntime(target.path, device)
    raise SettingsError(f"unknown backend '{target.backend}' (valid: {', '.join(BACKENDS)})")


def score_target(target: Target, wins: dict[str, list[list[int]]], device: str = "cpu",
                 threads: int = 0, dtype: str = "bfloat16") -> dict:
    """Open ``target``, compute logits for every window of every language, close it."""
    n_ctx = max((len(w) for lang_wins in wins.values() for w in lang_wins), default=0)
    runtime = open_runtime(target, device, threads, n_ctx=n_ctx + 8, dtype=dtype)
    try:
        return {lang: [runtime.logits(w) for w in lang_wins]
                for lang, lang_wins in wins.items()}
    finally:
        runtime.close()
