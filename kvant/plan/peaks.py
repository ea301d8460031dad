"""The memory model: peak = weights + KV cache + the runtime stack's overhead."""

from __future__ import annotations

import math

from kvant.plan.kinds import Kind, kind, kinds, shape_of, weight_bytes
from kvant.plan.kv import kv_bytes, kv_types_for
from kvant.plan.sizes import GIB, MIB
from kvant.synth import Shape

# Overhead per runtime stack: (base MiB, bytes per context token per vocabulary entry). The
# bases are `kvant bench` peak RSS minus weights and KV cache on the stand-in on this machine
# (what each stack imports and allocates at start). The per-token term is the float32 logits
# a full prefill returns: transformers and ORT keep (context x vocab), llama.cpp only its
# batch's rows (constant, inside the base).
# Per-token terms measured at real width (rehearsal, 2 layers, 512 to 8,192 tokens): a
# transformers prefill holds its bf16 logits and activations, about 2.5 bytes per token per
# vocabulary entry (bitsandbytes int8 about 4: its CPU path keeps activations in float32
# and their int8 copy); ORT GenAI about 11 (its float32 logits, copied about twice: 9.3 and
# 10.8 bytes measured per 2,048 and 8,192 tokens).
DEFAULT_OVERHEAD = {"torch/bf16": (363.0, 2.5), "torch/bnb": (405.0, 2.5),
                    "torch/bnb-int8": (405.0, 4.0),
                    "torch/gptq": (569.0, 2.5), "llama.cpp/gguf": (51.0, 0.0),
                    "onnxruntime-genai/onnx": (61.0, 11.0), "mlx/mlx": (276.0, 26.0)}
# MLX (mlx-lm 0.32.2 on the CPU, the stand-in at 4 bits g64, 512 tokens, one run): 276 MiB
# after loading beside 6 MiB of weights; a whole-window forward adds 26 bytes per token per
# vocabulary entry (its float32 logits, the copy numpy takes, and what MLX's allocator keeps)


# kvant.runtimes.onnx feeds GenAI a prompt this many tokens per forward, as llama.cpp's speed
# rows do (n_batch 512): its logits and its arena follow the batch, not the context.
PREFILL_BATCH = 512
MLX_PREFILL_STEP = 2048  # mlx-lm's generate_step feeds a prompt 2,048 tokens per forward


def overhead_bytes(stack: str, ctx: int, vocab: int, fitted: dict | None = None) -> float:
    base_mib, per_logit = {**DEFAULT_OVERHEAD, **(fitted or {})}[stack]
    return base_mib * MIB + per_logit * ctx * vocab


def peak_bytes(shape: Shape, kind: Kind, ctx: int, weights: float | None = None,
               fitted: dict | None = None, kv_type: str | None = None) -> float:
    """The one formula: weights (measured file size when known, else predicted) + KV cache
    + the runtime stack's overhead, at context ``ctx``. ORT GenAI maps its weights file and
    gathers embedding rows from it: the embedding table is never resident."""
    weights = weight_bytes(shape, kind) if weights is None else weights
    logit_rows = ctx
    if kind.backend == "onnxruntime-genai":  # its prompt in batches: one batch's logits
        weights = ort_resident(shape, kind, weights) + ort_arena(shape, kind, weights, ctx)
        logit_rows = min(ctx, PREFILL_BATCH)
    if kind.backend == "mlx":  # mlx-lm's prefill steps (kvant.runtimes.mlx.PREFILL_STEP)
        logit_rows = min(ctx, MLX_PREFILL_STEP)
    return weights + kv_bytes(shape, kind, ctx, kv_type) + overhead_bytes(
        kind.stack, logit_rows, shape.vocab, fitted)


# ONNX Runtime at real width (kvant synth, ONNX int4 from GPTQ at block 128, 1 and 2 layers
# of 139 MiB of MatMulNBits each, 2026-12-04): a layer adds 156 MiB to a plain session after
# loading and 189 MiB to GenAI's (MLAS's prepacked copy; the file's pages are let go, 75 MiB
# of them resident after loading). GenAI's prefill in batches of 512 adds a further 59 and
# 152 MiB per layer at 2,048 and 8,192 tokens: its fp32 KV cache (16 and 64 MiB) and its
# arena's attention buffers over the whole context, a chunk per doubling (in one forward it
# was 119 and 226 MiB).
_MLAS_PREPACKED = 1.4  # resident bytes per byte of MatMulNBits weights
_ARENA_PER_DOUBLING = 0.16  # GenAI prefill, per layer and doubling of context past 512,
#                             in bytes per byte of the layer's MatMulNBits weights


def ort_resident(shape: Shape, kind: Kind, weights: float) -> float:
    """What ONNX Runtime holds of a weights file: it maps the file and gathers embedding
    rows from it (the table is never resident), and MLAS repacks every MatMulNBits weight
    into a copy of its own, letting the file's pages go."""
    embed = shape.vocab * shape.hidden * kind.embed_bpw / 8
    return _MLAS_PREPACKED * (weights - embed) if kind.linear_bpw < 16 else weights - embed


def ort_arena(shape: Shape, kind: Kind, weights: float, ctx: int) -> float:
    """What GenAI's arena adds per layer to a prefill of ``ctx`` tokens beyond its KV cache
    (fitted at real width: a chunk per doubling of the context past 512)."""
    if kind.linear_bpw >= 16 or ctx <= 512:
        return 0.0
    table = shape.vocab * shape.hidden
    linear = weights - table * (kind.embed_bpw + kind.head_bpw) / 8
    return _ARENA_PER_DOUBLING * max(linear, 0.0) * math.log2(ctx / 512)


def predict(shape: Shape, ctxs: list[int], fitted: dict | None = None,
            kv_types: tuple[str, ...] = ("f16",)) -> dict:
    """{row name: {ctx: predicted peak bytes}}; each kind once per cache type of
    ``kv_types`` its backend runs (``gguf-q4_k_m`` with f16, ``gguf-q4_k_m kv=q8_0``)."""
    rows = {}
    for name, k in kinds().items():
        for kv in (t for t in kv_types if t in kv_types_for(k.backend)):
            row = name if kv == "f16" else f"{name} kv={kv}"
            rows[row] = {ctx: peak_bytes(shape, k, ctx, fitted=fitted, kv_type=kv)
                         for ctx in ctxs}
    return rows


def plan_table(shape: Shape, ctxs: list[int], budget: float, fitted: dict | None,
               kv_types: tuple[str, ...] = ("f16",),
               artifacts: list[tuple[str, Kind, int]] | None = None) -> str:
    """The plan as a Markdown table: a row per kind and KV cache type with its predicted peak
    at each context, and whether it fits ``budget``. ``artifacts``: (name, kind, bytes on
    disk) of given artifacts, planned with their measured size, instead of every kind a
    release makes."""
    rows = [(name, k, None) for name, k in kinds().items()] if artifacts is None else artifacts
    lines = ["| artifact | backend | weights (GiB) | " + " | ".join(
        f"peak @ {c:,} (GiB)" for c in ctxs) + " |", "|---|---|---|" + "---|" * len(ctxs)]
    for name, k, size in rows:
        weights = weight_bytes(shape, k) if size is None else size
        for kv in (t for t in kv_types if t in kv_types_for(k.backend)):
            cells = []
            for c in ctxs:
                peak = peak_bytes(shape, k, c, size, fitted, kv)
                cells.append(f"{peak / GIB:.2f} {'fits' if peak <= budget else 'too big'}")
            row = name if kv == "f16" else f"{name} kv={kv}"
            lines.append(f"| {row} | {k.backend} | {weights / GIB:.2f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


# A typical laptop: 16 GB of RAM, of which the model gets 10 GiB (the system, a browser and
# the chat app keep the rest). The Modelfile's num_ctx is sized for it.
LAPTOP_BUDGET = 10 * GIB
CONTEXTS = (2048, 4096, 8192, 16384, 32768)


def context_that_fits(shape: Shape, key: str, trained: int, weights: float | None = None,
                      budget: float = LAPTOP_BUDGET) -> tuple[int, bool]:
    """(the largest of CONTEXTS up to ``trained`` whose predicted peak fits ``budget``, whether
    any does); the smallest context when none fits."""
    found = kind(key, file_bpw=8 * weights / shape.n_params() if weights else None)
    candidates = [c for c in CONTEXTS if c <= trained] or [trained]
    fitting = [c for c in candidates if found is not None
               and peak_bytes(shape, found, c, weights) <= budget]
    return (max(fitting), True) if fitting else (candidates[0], False)


def disk_need(config: dict, kinds_made: list[str], scratch: list[str] = ()) -> int:
    """Bytes a pipeline writes: every artifact kind it makes plus its model-sized scratch
    files, with 2% and 64 MiB for metadata, tokenizer and cards. Unlisted GGUF types are
    counted at 8.5 bits per weight (Q8_0, the largest quantized type)."""
    shape = shape_of(config)
    total = sum(weight_bytes(shape, kind(k, file_bpw=8.5)) for k in [*kinds_made, *scratch])
    return int(total * 1.02) + 64 * MIB
