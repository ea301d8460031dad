"""`kvant plan`: predicted peak memory per artifact type and context length, and what fits.

peak = weights + KV cache + backend overhead, where
- weights come from the real bits per weight of each type on this architecture's tensors
  (which tensors a format leaves in 16/32 bits matters: embeddings are 0.5 GB at 11.4B);
- KV cache = 2 x layers x kv_heads x head_dim x bytes x context;
- overhead = base + logits x context per runtime stack (transformers alone, with
  bitsandbytes, with GPTQModel; llama.cpp; ORT GenAI), the base fitted to `kvant bench`
  measurements (results.json) when given, else the defaults below, measured by the bench on
  this project's 2-core CPU machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvant.synth import Shape

GIB = 2**30
MIB = 2**20

# Bits per weight of the quantized matmul weights.
# GGUF: llama.cpp tools/quantize README (whole-file bpw on Llama-3-8B, a 128k vocabulary
# whose embedding and output tensors weigh on these like NorMistral's 51,200 x 5,120 do).
GGUF_BPW = {"f16": 16.0, "bf16": 16.0, "q8_0": 8.50, "q6_k": 6.56, "q5_k_m": 5.70,
            "q4_k_m": 4.89, "q3_k_m": 4.00, "iq4_xs": 4.46}


@dataclass(frozen=True)
class Kind:
    """How one artifact type stores each tensor group (bits per weight) and its KV cache."""

    backend: str
    stack: str
    """backend/format: what the process imports (transformers+bnb, +GPTQModel, ...)."""
    linear_bpw: float
    embed_bpw: float
    head_bpw: float
    kv_bytes: int


def kinds() -> dict[str, Kind]:
    out = {
        "bf16": Kind("torch", "torch/bf16", 16, 16, 16, 2),
        # bnb: absmax fp32 per 64 weights (nf4), 8-bit double-quantized scales with --double-quant;
        # int8: one fp32 scale per row. Embeddings and lm_head stay bf16.
        "bnb-int8": Kind("torch", "torch/bnb", 8.0, 16, 16, 2),
        "bnb-nf4": Kind("torch", "torch/bnb", 4 + 32 / 64, 16, 16, 2),
        # GPTQ 4-bit g128: fp16 scale + 4-bit zero per 128 weights; embeddings/lm_head bf16.
        "gptq-4bit-g128": Kind("torch", "torch/gptq", 4 + 20 / 128, 16, 16, 2),
        # ONNX int4 (CPU): MatMulNBits with fp32 scales per 32 weights, lm_head too;
        # the embedding stays fp32 (the GenAI builder's CPU io dtype); fp32 KV cache.
        "onnx-int4-b32": Kind("onnxruntime-genai", "onnxruntime-genai/onnx", 4 + 32 / 32, 32,
                              4 + 32 / 32, 4),
    }
    for name, bpw in GGUF_BPW.items():  # whole-file bpw; f16 KV cache in llama.cpp
        out[f"gguf-{name}"] = Kind("llama.cpp", "llama.cpp/gguf", bpw, bpw, bpw, 2)
    return out


# Overhead per runtime stack: (base MiB, bytes per context token per vocabulary entry). The
# bases are `kvant bench` peak RSS minus weights and KV cache on the stand-in on this machine
# (what each stack imports and allocates at start). The per-token term is the float32 logits
# a full prefill returns: transformers and ORT keep (context x vocab), llama.cpp only its
# batch's rows (constant, inside the base).
DEFAULT_OVERHEAD = {"torch/bf16": (363.0, 4.0), "torch/bnb": (405.0, 4.0),
                    "torch/gptq": (569.0, 4.0), "llama.cpp/gguf": (51.0, 0.0),
                    "onnxruntime-genai/onnx": (61.0, 4.0)}


def shape_of(config: dict) -> Shape:
    n_heads = config["num_attention_heads"]
    return Shape(config["num_hidden_layers"], config["hidden_size"],
                 config["intermediate_size"], n_heads,
                 config.get("num_key_value_heads", n_heads),
                 config.get("head_dim") or config["hidden_size"] // n_heads,
                 config["vocab_size"], config.get("max_position_embeddings", 32768))


def weight_bytes(shape: Shape, kind: Kind) -> float:
    embed = shape.vocab * shape.hidden
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    per_layer = shape.hidden * (2 * q + 2 * kv) + 3 * shape.hidden * shape.intermediate
    return (embed * kind.embed_bpw + embed * kind.head_bpw
            + shape.n_layers * per_layer * kind.linear_bpw) / 8


def kv_bytes(shape: Shape, kind: Kind, ctx: int) -> float:
    return 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * kind.kv_bytes * ctx


def overhead_bytes(stack: str, ctx: int, vocab: int, fitted: dict | None = None) -> float:
    base_mib, per_logit = {**DEFAULT_OVERHEAD, **(fitted or {})}[stack]
    return base_mib * MIB + per_logit * ctx * vocab


def predict(shape: Shape, ctxs: list[int], fitted: dict | None = None) -> dict:
    """{kind: {ctx: predicted peak bytes}}."""
    out = {}
    for name, kind in kinds().items():
        w = weight_bytes(shape, kind)
        out[name] = {ctx: w + kv_bytes(shape, kind, ctx)
                     + overhead_bytes(kind.stack, ctx, shape.vocab, fitted) for ctx in ctxs}
    return out


def fit_overhead(results: dict, shape: Shape) -> tuple[dict, set[tuple[str, str]]]:
    """Each runtime stack's base overhead from bench results, and the measurements used.

    Per stack, one measurement calibrates: the smallest-context run of its smallest target,
    (peak RSS - weights - KV cache - logits). Every other measurement is held out for checking
    the prediction, other context lengths of the same target included.
    """
    calibration: dict[str, tuple[str, dict]] = {}
    for name, entry in sorted(results["targets"].items(), key=lambda kv: kv[1]["size_bytes"]):
        kind = _kind_of(name, entry)
        if kind is not None and any("error" not in s for s in entry.get("speed", {}).values()):
            calibration.setdefault(kinds()[kind].stack, (name, entry))
    fitted, used = {}, set()
    for stack, (name, entry) in calibration.items():
        kind = kinds()[_kind_of(name, entry)]
        ctx, s = min(((int(c), s) for c, s in entry["speed"].items() if "error" not in s),
                     key=lambda cs: cs[0])
        per_logit = DEFAULT_OVERHEAD[stack][1]
        rest = (s["peak_rss_mib"] * MIB - entry["size_bytes"] - kv_bytes(shape, kind, ctx)
                - per_logit * ctx * shape.vocab)
        fitted[stack] = (rest / MIB, per_logit)
        used.add((name, str(ctx)))
    return fitted, used


def _kind_of(name: str, entry: dict) -> str | None:
    fmt = entry["format"]
    if fmt == "gguf":
        key = "gguf-" + name.rsplit("-", 1)[-1].lower()
        return key if key in kinds() else None
    if fmt == "bnb":
        mode = "int8" if name.endswith("int8") else "nf4"  # fp4 stores like nf4
        return f"bnb-{mode}"
    return {"bf16": "bf16", "onnx": "onnx-int4-b32", "gptq": "gptq-4bit-g128"}.get(fmt)


def prediction_errors(results: dict, shape: Shape, fitted: dict,
                      skip: set[tuple[str, str]] = frozenset()) -> list[dict]:
    """Predicted versus measured peak for every held-out bench measurement of a known kind."""
    rows = []
    for name, entry in results["targets"].items():
        kind = _kind_of(name, entry)
        for ctx, s in entry.get("speed", {}).items():
            if kind is None or "error" in s or (name, ctx) in skip:
                continue
            measured = s["peak_rss_mib"] * MIB
            predicted = (entry["size_bytes"] + kv_bytes(shape, kinds()[kind], int(ctx))
                         + overhead_bytes(kinds()[kind].stack, int(ctx), shape.vocab, fitted))
            rows.append({"target": name, "ctx": int(ctx), "measured_mib": round(measured / MIB),
                         "predicted_mib": round(predicted / MIB),
                         "error_pct": round(100 * (predicted / measured - 1), 2)})
    return rows


def plan_table(shape: Shape, ctxs: list[int], budget: float, fitted: dict | None) -> str:
    pred = predict(shape, ctxs, fitted)
    lines = ["| artifact | backend | weights (GiB) | " + " | ".join(
        f"peak @ {c:,} (GiB)" for c in ctxs) + " |", "|---|---|---|" + "---|" * len(ctxs)]
    for name, by_ctx in pred.items():
        kind = kinds()[name]
        cells = []
        for c in ctxs:
            gib = by_ctx[c] / GIB
            cells.append(f"{gib:.2f} {'fits' if by_ctx[c] <= budget else 'too big'}")
        lines.append(f"| {name} | {kind.backend} | {weight_bytes(shape, kind) / GIB:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_results(path: Path | None) -> dict | None:
    return json.loads(Path(path).read_text()) if path else None
