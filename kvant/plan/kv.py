"""Every runtime's KV cache precisions, and what a cache costs at a context."""

from __future__ import annotations

from dataclasses import dataclass

from kvant.errors import SettingsError
from kvant.plan.kinds import Kind
from kvant.synth import Shape


@dataclass(frozen=True)
class KVCache:
    """One KV cache precision: the runtime that has it and what a cached value costs."""

    backend: str | None
    """None: every runtime, in its own precision (Kind.kv_bytes)."""
    bytes_per_value: float | None = None
    residual_tokens: int = 0
    """Newest tokens kept unquantized (KIVI-style caches)."""


# Every runtime's KV cache precisions, one table for the planner, the CLIs and the runtimes.
# "f16": the runtime's own unquantized cache (f16 in llama.cpp, the model's bf16 in
# transformers, the io dtype in ONNX Runtime GenAI, which has no other). llama.cpp (ggml):
# q8_0 34 bytes and q4_0 18 bytes per 32 values; quantized V needs flash attention there.
# transformers' QuantizedCache: fp8 (float8 e4m3, one scale per tensor), int4
# (optimum-quanto: 4 bits with a bf16 scale and zero point per 64 values, the newest 128
# tokens kept in bf16).
KV_CACHES = {"f16": KVCache(None), "q8_0": KVCache("llama.cpp", 34 / 32),
             "q4_0": KVCache("llama.cpp", 18 / 32), "fp8": KVCache("torch", 1.0),
             "int4": KVCache("torch", 0.5 + 4 / 64, residual_tokens=128)}


KV_TYPES = tuple(KV_CACHES)


def kv_types_for(backend: str) -> tuple[str, ...]:
    """The cache types ``backend`` runs, most precise first."""
    return tuple(n for n, c in KV_CACHES.items() if c.backend in (None, backend))


def require_kv_type(backend: str, kv_type: str) -> None:
    """One line, exit status 2, for a cache type ``backend`` does not run."""
    if kv_type not in kv_types_for(backend):
        raise SettingsError(f"--kv-type {kv_type}: {backend} runs "
                            f"{', '.join(kv_types_for(backend))}; pick one of those")


def kv_bytes(shape: Shape, kind: Kind, ctx: int, kv_type: str | None = None) -> float:
    """The KV cache at ``ctx`` tokens; ``kv_type`` (one of the kind's backend's
    :func:`kv_types_for`) overrides the kind's own element size."""
    per_token = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim
    cache = KV_CACHES[kv_type or "f16"]
    if cache.backend is None:
        return per_token * kind.kv_bytes * ctx
    if cache.backend != kind.backend:
        raise ValueError(f"{kv_type} is a {cache.backend} cache, not {kind.backend}'s")
    kept = min(ctx, cache.residual_tokens)
    return per_token * (cache.bytes_per_value * (ctx - kept) + kind.kv_bytes * kept)
