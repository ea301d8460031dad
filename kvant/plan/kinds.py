"""How each artifact kind stores its tensors: bits per weight per tensor group."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvant.synth import Shape

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
_MLX = re.compile(r"mlx-(\d+)bit-g(\d+)(?:-mix)?")


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
        stack = "torch/bnb-int8" if key == "bnb-int8" else "torch/bnb"
        return Kind("torch", stack, linear, 16, 16, 2) if linear else None
    if match := _GPTQ.fullmatch(key):
        # an fp16 scale and a packed `bits`-wide zero point per group; embeddings/lm_head bf16
        bits, group = int(match.group(1)), int(match.group(2))
        linear = bits + (16 + bits) / group if group > 0 else float(bits)
        return Kind("torch", "torch/gptq", linear, 16, 16, 2)
    if match := _ONNX.fullmatch(key):
        # int4 (CPU): MatMulNBits with fp32 scales per block; lm_head int8 (the default
        # k_quant_last quantizer); the embedding stays fp32 (the GenAI builder's CPU io
        # dtype); fp32 KV cache. fp16 is all fp16.
        precision, block = match.group(1), int(match.group(2) or 32)
        if precision == "int4":
            q = 4 + 32 / block
            return Kind("onnxruntime-genai", "onnxruntime-genai/onnx", q, 32, 8 + 32 / block, 4)
        width = 32 if precision == "fp32" else 16
        return Kind("onnxruntime-genai", "onnxruntime-genai/onnx", width, width, width,
                    width // 8)
    if match := _MLX.fullmatch(key):
        # MLX affine: a bf16 scale and bias per group, for the embedding and lm_head too
        # (mlx-lm quantizes every Linear and Embedding); bf16 KV cache; a -mix within those bytes
        bits, group = int(match.group(1)), int(match.group(2))
        q = bits + 32 / group
        return Kind("mlx", "mlx/mlx", q, q, q, 2)
    return None


# The kinds `kvant plan` lists when no measurements are given: what a release makes.
PLAN_KINDS = ("bf16", "bnb-int8", "bnb-nf4", "gptq-4bit-g128", "onnx-int4-b32", "mlx-4bit-g64",
              *(f"gguf-{t}" for t in GGUF_BPW))


def kinds() -> dict[str, Kind]:
    return {key: kind(key) for key in PLAN_KINDS}


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
