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
import re
from dataclasses import dataclass
from pathlib import Path

from kvant.synth import Shape

GIB = 2**30
MIB = 2**20

# Bits per weight of the quantized matmul weights.
# GGUF: llama.cpp tools/quantize README (whole-file bpw on Llama-3-8B, a 128k vocabulary
# whose embedding and output tensors weigh on these like NorMistral's 51,200 x 5,120 do).
GGUF_BPW = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.50, "q6_k": 6.56, "q5_k_m": 5.70,
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


_GPTQ = re.compile(r"gptq-(\d+)bit-g(-?\d+)")
_ONNX = re.compile(r"onnx-(fp32|fp16|int4)(?:-b(\d+))?")


def kind(key: str, file_bpw: float | None = None) -> Kind | None:
    """The storage of an artifact kind key (as pipelines record it in manifests).

    ``file_bpw``: a GGUF file's measured bits per weight, used for a type the table below
    does not list. None when the key names nothing Kvant makes.

    >>> kind("gptq-4bit-g128").linear_bpw
    4.15625
    """
    if key == "bf16":
        return Kind("torch", "torch/bf16", 16, 16, 16, 2)
    if key.startswith("gguf-"):  # whole-file bpw; f16 KV cache in llama.cpp
        bpw = GGUF_BPW.get(key.removeprefix("gguf-"), file_bpw)
        return Kind("llama.cpp", "llama.cpp/gguf", bpw, bpw, bpw, 2) if bpw else None
    if key.startswith("bnb-"):
        # nf4/fp4: an fp32 absmax per 64 weights, or with double quant an 8-bit absmax plus
        # an fp32 scale per 256 of those; int8: an fp32 scale per row (about 8 bits).
        # Embeddings and lm_head stay bf16.
        linear = {"bnb-int8": 8.0, "bnb-nf4": 4 + 32 / 64, "bnb-fp4": 4 + 32 / 64,
                  "bnb-nf4-dq": 4 + 8 / 64 + 32 / (64 * 256),
                  "bnb-fp4-dq": 4 + 8 / 64 + 32 / (64 * 256)}.get(key)
        return Kind("torch", "torch/bnb", linear, 16, 16, 2) if linear else None
    if match := _GPTQ.fullmatch(key):
        # an fp16 scale and a packed `bits`-wide zero point per group; embeddings/lm_head bf16
        bits, group = int(match.group(1)), int(match.group(2))
        linear = bits + (16 + bits) / group if group > 0 else float(bits)
        return Kind("torch", "torch/gptq", linear, 16, 16, 2)
    if match := _ONNX.fullmatch(key):
        # int4 (CPU): MatMulNBits with fp32 scales per block, lm_head too; the embedding
        # stays fp32 (the GenAI builder's CPU io dtype); fp32 KV cache. fp16 is all fp16.
        precision, block = match.group(1), int(match.group(2) or 32)
        if precision == "int4":
            q = 4 + 32 / block
            return Kind("onnxruntime-genai", "onnxruntime-genai/onnx", q, 32, q, 4)
        width = 32 if precision == "fp32" else 16
        return Kind("onnxruntime-genai", "onnxruntime-genai/onnx", width, width, width,
                    width // 8)
    return None


# The kinds `kvant plan` lists when no measurements are given: what a release makes.
PLAN_KINDS = ("bf16", "bnb-int8", "bnb-nf4", "gptq-4bit-g128", "onnx-int4-b32",
              *(f"gguf-{t}" for t in GGUF_BPW))


def kinds() -> dict[str, Kind]:
    return {key: kind(key) for key in PLAN_KINDS}


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


def peak_bytes(shape: Shape, kind: Kind, ctx: int, weights: float | None = None,
               fitted: dict | None = None) -> float:
    """The one formula: weights (measured file size when known, else predicted) + KV cache
    + the runtime stack's overhead, at context ``ctx``."""
    weights = weight_bytes(shape, kind) if weights is None else weights
    return weights + kv_bytes(shape, kind, ctx) + overhead_bytes(kind.stack, ctx, shape.vocab,
                                                                 fitted)


def predict(shape: Shape, ctxs: list[int], fitted: dict | None = None) -> dict:
    """{kind: {ctx: predicted peak bytes}}."""
    return {name: {ctx: peak_bytes(shape, k, ctx, fitted=fitted) for ctx in ctxs}
            for name, k in kinds().items()}


def entry_kind(entry: dict, shape: Shape) -> Kind | None:
    """The Kind of a bench results entry, from the kind its artifact's manifest records."""
    if not entry.get("kind"):
        return None
    return kind(entry["kind"], file_bpw=8 * entry["size_bytes"] / shape.n_params())


def fit_overhead(results: dict, shape: Shape) -> tuple[dict, set[tuple[str, str]]]:
    """Each runtime stack's base overhead from bench results, and the measurements used.

    Per stack, one measurement calibrates: the smallest-context run of its smallest target,
    (peak RSS - weights - KV cache - logits). Every other measurement is held out for checking
    the prediction, other context lengths of the same target included.
    """
    calibration: dict[str, tuple[str, dict, Kind]] = {}
    for name, entry in sorted(results["targets"].items(), key=lambda kv: kv[1]["size_bytes"]):
        k = entry_kind(entry, shape)
        if k is not None and any("error" not in s for s in entry.get("speed", {}).values()):
            calibration.setdefault(k.stack, (name, entry, k))
    fitted, used = {}, set()
    for stack, (name, entry, k) in calibration.items():
        ctx, s = min(((int(c), s) for c, s in entry["speed"].items() if "error" not in s),
                     key=lambda cs: cs[0])
        base = peak_bytes(shape, k, ctx, entry["size_bytes"], {stack: (0.0, DEFAULT_OVERHEAD[
            stack][1])})
        fitted[stack] = ((s["peak_rss_mib"] * MIB - base) / MIB, DEFAULT_OVERHEAD[stack][1])
        used.add((name, str(ctx)))
    return fitted, used


def prediction_errors(results: dict, shape: Shape, fitted: dict,
                      skip: set[tuple[str, str]] = frozenset()) -> list[dict]:
    """Predicted versus measured peak for every held-out bench measurement of a known kind."""
    rows = []
    for name, entry in results["targets"].items():
        k = entry_kind(entry, shape)
        for ctx, s in entry.get("speed", {}).items():
            if k is None or "error" in s or (name, ctx) in skip:
                continue
            measured = s["peak_rss_mib"] * MIB
            predicted = peak_bytes(shape, k, int(ctx), entry["size_bytes"], fitted)
            rows.append({"target": name, "ctx": int(ctx), "measured_mib": round(measured / MIB),
                         "predicted_mib": round(predicted / MIB),
                         "error_pct": round(100 * (predicted / measured - 1), 2)})
    return rows


def plan_table(shape: Shape, ctxs: list[int], budget: float, fitted: dict | None) -> str:
    pred = predict(shape, ctxs, fitted)
    lines = ["| artifact | backend | weights (GiB) | " + " | ".join(
        f"peak @ {c:,} (GiB)" for c in ctxs) + " |", "|---|---|---|" + "---|" * len(ctxs)]
    for name, by_ctx in pred.items():
        k = kinds()[name]
        cells = []
        for c in ctxs:
            gib = by_ctx[c] / GIB
            cells.append(f"{gib:.2f} {'fits' if by_ctx[c] <= budget else 'too big'}")
        lines.append(f"| {name} | {k.backend} | {weight_bytes(shape, k) / GIB:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def disk_need(config: dict, kinds_made: list[str], scratch: list[str] = ()) -> int:
    """Bytes a pipeline writes: every artifact kind it makes plus its model-sized scratch
    files, with 2% and 64 MiB for metadata, tokenizer and cards. Unlisted GGUF types are
    counted at 8.5 bits per weight (Q8_0, the largest quantized type)."""
    shape = shape_of(config)
    total = sum(weight_bytes(shape, kind(k, file_bpw=8.5)) for k in [*kinds_made, *scratch])
    return int(total * 1.02) + 64 * MIB


def load_results(path: Path | None) -> dict | None:
    return json.loads(Path(path).read_text()) if path else None
