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

from kvant.errors import SettingsError
from kvant.memory import reference_dtype_for
from kvant.synth import Shape

GIB = 2**30
MIB = 2**20
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(GiB|GB|MiB|MB)?", re.IGNORECASE)
_UNITS = {"gib": GIB, "gb": 10**9, "mib": MIB, "mb": 10**6}


def parse_size(text: str, what: str, example: str, default_unit: str | None = None) -> int:
    """'6.5GiB' -> bytes (GiB and MiB binary, GB and MB decimal); a bare number is in
    ``default_unit``, or refused when there is none. ``what`` and ``example`` word the
    error: "--budget lots: write it like 8GiB or 24GB"."""
    match = _SIZE.fullmatch(text.strip())
    if not match or not (match.group(2) or default_unit):
        raise SettingsError(f"{what} {text}: write it like {example}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or default_unit).lower()])

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
# Per-token terms measured at real width (rehearsal, 2 layers, 512 to 8,192 tokens): a
# transformers prefill holds its bf16 logits and activations, about 2.5 bytes per token per
# vocabulary entry (bitsandbytes int8 about 4: its CPU path keeps activations in float32
# and their int8 copy); ORT GenAI about 12 (its float32 logits, copied twice).
DEFAULT_OVERHEAD = {"torch/bf16": (363.0, 2.5), "torch/bnb": (405.0, 2.5),
                    "torch/bnb-int8": (405.0, 4.0),
                    "torch/gptq": (569.0, 2.5), "llama.cpp/gguf": (51.0, 0.0),
                    "onnxruntime-genai/onnx": (61.0, 12.0)}


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


def overhead_bytes(stack: str, ctx: int, vocab: int, fitted: dict | None = None) -> float:
    base_mib, per_logit = {**DEFAULT_OVERHEAD, **(fitted or {})}[stack]
    return base_mib * MIB + per_logit * ctx * vocab


def peak_bytes(shape: Shape, kind: Kind, ctx: int, weights: float | None = None,
               fitted: dict | None = None, kv_type: str | None = None) -> float:
    """The one formula: weights (measured file size when known, else predicted) + KV cache
    + the runtime stack's overhead, at context ``ctx``. ORT GenAI maps its weights file and
    gathers embedding rows from it: the embedding table is never resident."""
    weights = weight_bytes(shape, kind) if weights is None else weights
    if kind.backend == "onnxruntime-genai":
        weights = _ort_resident(shape, kind, weights)
    return weights + kv_bytes(shape, kind, ctx, kv_type) + overhead_bytes(kind.stack, ctx,
                                                                          shape.vocab, fitted)


def _ort_resident(shape: Shape, kind: Kind, weights: float) -> float:
    """What ONNX Runtime holds of a weights file: it maps the file and gathers embedding
    rows from it (the table is never resident), and MLAS repacks every MatMulNBits weight
    into a copy of its own."""
    embed = shape.vocab * shape.hidden * kind.embed_bpw / 8
    return weights - embed + (weights - embed) if kind.linear_bpw < 16 else weights - embed


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
            stack][1])}, kv_type=s.get("kv_type"))
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
            predicted = peak_bytes(shape, k, int(ctx), entry["size_bytes"], fitted,
                                   kv_type=s.get("kv_type"))
            rows.append({"target": name, "ctx": int(ctx), "measured_mib": round(measured / MIB),
                         "predicted_mib": round(predicted / MIB),
                         "error_pct": round(100 * (predicted / measured - 1), 2)})
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


def load_results(path: Path | None) -> dict | None:
    return json.loads(Path(path).read_text()) if path else None


# ---- the release's own steps (kvant.rehearsal) -------------------------------------------
#
# Each step's peak is what the process tree held at the step's start (Python and
# every engine imported) plus what the step itself holds, from the shapes:
# - reference: the checkpoint in the reference's dtype, one window's float32 logits and their
#   copy on the way to disk;
# - scoring: the artifact's weights (mapped file or loaded tensors), one window's logits
#   twice (the engine's and numpy's) and one language's reference windows, memory-mapped;
# - conversion and llama-quantize: the largest tensor (the 51,200 x 5,120 embedding) in its
#   source, float32 and output forms;
# - GPTQ: the bf16 model, the calibration activations of one layer (inputs and outputs, one
#   row per sample and position) and the largest Hessian (float32, in x in);
# - bitsandbytes: the quantized model plus the largest tensor in bf16 while it is quantized;
# - the ONNX builder (a child process): the checkpoint loaded in float32, plus the int4 model
#   it builds;
# - bench speed rows (a child process each): `peak_bytes` of the artifact at that context.

DEFAULT_FLOOR_MIB = 1200.0
"""A release process's resident memory between steps (every engine imported), used for a
recorded step that has no `start_rss_mib` (each step records what the tree held at its
start, and the prediction adds to that)."""
_BUILDER_BASE_MIB = 600.0  # the GenAI builder's process: torch, transformers, onnx, ORT
_TORCH_IMPORT_MIB = 250.0  # what importing torch and transformers adds to a process


def _reference_dtype_bytes(record: dict, shape: Shape, ram: int) -> int:
    if record.get("dtype"):
        return 4 if record["dtype"] == "float32" else 2
    return 4 if reference_dtype_for(shape.n_params(), ram) == "float32" else 2


def _largest(shape: Shape) -> int:
    """Elements of the largest tensor (the embedding or lm_head, at NorMistral's sizes)."""
    return max(shape.vocab * shape.hidden, shape.intermediate * shape.hidden)


def _logits(shape: Shape, ctx: int) -> float:
    return 4.0 * ctx * shape.vocab


def step_work(record: dict, shape: Shape) -> float:
    """What a step's time grows with: the parameters it touches (every step reads or runs
    every tensor)."""
    return shape.n_params()


def _drift(shape: Shape, ctx: int, lang_tokens: int) -> float:
    """kvant.scoring.drift on one language: the target's logits of every window and the
    reference's (mapped) held, and per window five float64 (ctx x vocab) arrays at once
    (both log-softmaxes and the KL terms)."""
    return 2 * _logits(shape, lang_tokens) + 5 * 8 * ctx * shape.vocab


def step_peak(record: dict, shape: Shape, ram: int, floor_mib: float | None = None
              ) -> float | None:
    """Predicted peak RAM of one recorded release step (kvant.steps): ``floor_mib`` (what
    the process tree held when the step started) plus what the plan says the step adds,
    from the shapes; None when the plan has no model of the step."""
    floor = (DEFAULT_FLOOR_MIB if floor_mib is None else floor_mib) * MIB
    name, key, ctx = record["step"], record.get("kind"), record.get("ctx") or 0
    big = _largest(shape)
    torch_import = 0 if record.get("torch_loaded", True) else _TORCH_IMPORT_MIB * MIB
    lang = record.get("tokens_per_language") or 0
    if name == "cards":
        return floor
    if key == "reference":
        # safetensors maps the bf16 files: a bf16 reference runs on the mapped pages (the
        # embedding's only where a window's rows are gathered); a float32 one is a
        # converted copy beside every page it read
        dtype = _reference_dtype_bytes(record, shape, ram)
        weights = shape.n_params() * (2 + dtype) if dtype != 2 \
            else 2 * (shape.n_params() - shape.vocab * shape.hidden)
        return floor + torch_import + weights + 2 * _logits(shape, ctx)
    if name.startswith("gguf convert"):
        return floor + big * 2 + 64 * MIB  # the largest tensor, read and written once
    if key == "llama-quantize":
        # the largest tensor read (bf16), dequantized to float32 and quantized
        return floor + big * (2 + 4 + 1)
    if key == "imatrix":
        # llama-imatrix maps the bf16 file and keeps logits of its chunk for perplexity
        # plus the feed-forward activations of its batch
        return floor + record.get("weights", 2 * shape.n_params()) + 3 * _logits(shape, ctx) \
            + 3 * ctx * shape.intermediate * 4
    if key == "onnx-builder":
        # transformers' bf16 model, the whole fp32 ONNX proto the quantizer works on (the
        # builder's to_proto), a transient fp32 copy of the largest tensor, the int4 output
        int4 = weight_bytes(shape, kind("onnx-int4-b32"))
        return floor + _BUILDER_BASE_MIB * MIB + (2 + 4) * shape.n_params() + 4 * big + int4
    if name.endswith(" quantize") and key and key.startswith("gptq"):
        # the bf16 model, one layer's calibration inputs and outputs (float32, a row per
        # sample and position), the largest Hessian (float32, in x in); GPTQModel offloads
        # finished layers to disk, so at depth this is an upper bound
        samples, seqlen = record.get("samples") or 0, record.get("seqlen") or 0
        activations = 2 * samples * seqlen * shape.hidden * 4
        hessian = max(shape.intermediate, shape.hidden) ** 2 * 4
        return floor + torch_import + _TORCH_IMPORT_MIB * MIB + 2 * shape.n_params() \
            + activations + hessian
    if name.endswith(" quantize") and key and key.startswith("bnb"):
        # quantized on load: the mapped bf16 source, the quantized linears, two matrices
        # in flight
        k = kind(key)
        linear = weight_bytes(shape, k) - shape.vocab * shape.hidden * (k.embed_bpw
                                                                         + k.head_bpw) / 8
        return floor + torch_import + 2 * shape.n_params() + linear \
            + 2 * shape.intermediate * shape.hidden * 2
    k = kind(key, file_bpw=8 * record["weights"] / shape.n_params()) \
        if key and record.get("weights") else kind(key) if key else None
    if k is None:
        return None
    weights = record.get("weights") or weight_bytes(shape, k)
    if record.get("worker"):  # a fresh process: the one formula of `kvant plan`
        return floor + peak_bytes(shape, k, ctx, weights)
    if name.endswith(("greedy", "greedy check")) or (
            k.backend == "onnxruntime-genai" and not name.startswith("bench speed")):
        # ONNX Runtime in this process (GenAI, or the plain session that scores): mapped
        # weights, repacked copies, its logits three times, drift's comparison
        return floor + _ort_resident(shape, k, weights) + kv_bytes(shape, k, ctx) \
            + 3 * _logits(shape, ctx) + (_drift(shape, ctx, lang) if lang else 0)
    if name == "gguf tokenizer report":  # whole paragraphs, one at a time: bits per byte
        return floor + weights + 2 * _logits(shape, ctx) + 3 * 8 * ctx * shape.vocab
    # scoring in this process: the weights (a mapped file or loaded tensors), the engine's
    # logits of a window and numpy's copy, and drift's comparison of one language
    return floor + torch_import + weights + kv_bytes(shape, k, ctx) + 2 * _logits(shape, ctx) \
        + _drift(shape, ctx, lang)
