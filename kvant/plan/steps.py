"""The release's own steps: what each adds to the process tree's memory (kvant.app.rehearsal)."""

from __future__ import annotations

from dataclasses import dataclass

from kvant.memory import reference_dtype_for
from kvant.plan.kinds import kind, weight_bytes
from kvant.plan.kv import kv_bytes
from kvant.plan.peaks import ort_resident, peak_bytes
from kvant.plan.sizes import MIB, SHARD_BYTES
from kvant.synth import Shape

# ---- the release's own steps (kvant.app.rehearsal) -------------------------------------------
#
# Each step's peak is what the process tree held at the step's start (Python and
# every engine imported) plus what the step itself holds, from the shapes:
# - reference: the checkpoint in the reference's dtype, one window's float32 logits and their
#   copy on the way to disk;
# - scoring: the artifact's weights (mapped file or loaded tensors), one window's logits
#   twice (the engine's and numpy's) and one language's reference windows, memory-mapped;
# - conversion and llama-quantize: the largest tensor (the 51,200 x 5,120 embedding) in its
#   source, float32 and output forms;
# - GPTQ: the embedding, lm_head and two layers in bf16 (GPTQModel offloads the rest), the
#   calibration activations of one layer (inputs and outputs, one row per sample and
#   position) and the largest Hessian (float32, in x in);
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
_MLX_BASE_MIB = 290.0  # mlx-lm's convert process: MLX, mlx-lm, transformers (stand-in: 287)
_BNB_IMPORT_MIB = 100.0  # bitsandbytes and the model's code, beside torch and transformers
# lm-eval's own working set in a task eval's step (kvant.app.lmeval.run_eval: the task built
# from its dataset, the requests, the per-sample log it keeps), whatever the model: fitted to
# the 1-layer real-width rehearsal of 2026-12-05, where every GGUF row's step held 450-460 MiB
# more than its model and logits
_LM_EVAL_MIB = 450.0


def _reference_dtype_bytes(record: dict, shape: Shape, ram: int) -> int:
    if record.get("dtype"):
        return 4 if record["dtype"] == "float32" else 2
    return 4 if reference_dtype_for(shape.n_params(), ram) == "float32" else 2


def _reference_weights(record: dict, shape: Shape, ram: int) -> float:
    """A bf16 checkpoint loaded in the reference's dtype (the reference, a task eval of the
    bf16 folder): bf16 runs on the mapped pages; float32 is a converted copy beside every
    page it read."""
    dtype = _reference_dtype_bytes(record, shape, ram)
    return shape.n_params() * (2 + dtype) if dtype != 2 else _bf16_resident(shape)


def _largest(shape: Shape) -> int:
    """Elements of the largest tensor (the embedding or lm_head, at NorMistral's sizes)."""
    return max(shape.vocab * shape.hidden, shape.intermediate * shape.hidden)


def _logits(shape: Shape, ctx: int) -> float:
    return 4.0 * ctx * shape.vocab


def step_work(record: dict, shape: Shape) -> float:
    """What a step's time grows with: the parameters it touches (every step reads or runs
    every tensor)."""
    return shape.n_params()


def quantizable_tensors(shape: Shape) -> int:
    """The matrices a GGUF mix types one by one: seven per layer, token_embd and output."""
    return 7 * shape.n_layers + 2


def mix_torch_seconds(estimate: dict, shape: Shape, full: Shape) -> float:
    """The torch mix sensitivity's whole time at ``full`` depth from its estimate at
    ``shape``'s (kvant.export.gguf_substitution.substitution_costs): a --pure
    llama-quantize per type and the dequantization of its tensors, growing with the
    parameters, and an evaluation
    per tensor and type. Where the estimate has the head's time alone (``head_s``: the
    layers before a tensor's own are replayed), a tensor in layer L runs the head and the
    layers from L on, each layer as long as at ``shape``'s width: the layers run grow with
    the square of the depth, halved. Without it each evaluation is a whole forward, growing
    with the parameters."""
    grow = full.n_params() / shape.n_params()
    types = estimate.get("types") or estimate["evaluations"] // quantizable_tensors(shape)
    # a --pure file per type, and dequantizing its tensors, both with the parameters
    quantize = grow * (estimate["quantize_s"] + estimate.get("dequant_s", 0.0)) * types
    if "head_s" not in estimate:
        return quantize + grow * estimate["first_s"] * types * quantizable_tensors(full)
    head, n = estimate["head_s"], full.n_layers
    layer = max(estimate["first_s"] - head, 0.0) / shape.n_layers
    per_layer = (quantizable_tensors(full) - 2) // n  # the matrices of one layer
    # token_embd runs every layer, output none, a matrix of layer L the n - L from it
    per_type = (head + layer * n) + head + per_layer * (n * head + layer * n * (n + 1) / 2)
    return quantize + per_type * types


def _drift(shape: Shape, ctx: int, lang_tokens: int) -> float:
    """kvant.scoring.drift on one language: the target's logits of every window and the
    reference's (mapped) held, and per window five float64 (ctx x vocab) arrays at once
    (both log-softmaxes and the KL terms)."""
    return 2 * _logits(shape, lang_tokens) + 5 * 8 * ctx * shape.vocab


def _bf16_resident(shape: Shape) -> float:
    """What transformers holds of a bf16 checkpoint on the CPU: its parameters are views of
    the safetensors files, mapped private (file pages, reclaimable: measured at real width,
    a 512-token forward of one layer left 296 MiB anonymous and 1,150 MiB of file pages);
    a forward reads every layer and the lm_head, and gathers only its rows of the embedding,
    whose table is never resident."""
    return 2.0 * (shape.n_params() - shape.vocab * shape.hidden)


def step_mapped(record: dict, shape: Shape, ram: int) -> float:
    """How much of a step's predicted peak is file pages mapped read-only (the page cache:
    reclaimable, re-read from disk when RAM runs short) rather than anonymous memory: a
    llama.cpp step's mapped GGUF (the imatrix, scoring, the tokenizer report, bench rows), a
    bf16 reference's mapped safetensors (not when it streams) and the bench's rows of the
    bf16 folder (the same weights, loaded the same way)."""
    name, key = record["step"], record.get("kind") or ""
    if (key == "reference" or (key == "bf16" and record.get("task_eval"))) and (
            record.get("streamed") or _reference_dtype_bytes(record, shape, ram) != 2):
        return 0.0
    if key in ("reference", "bf16"):  # bf16: the bench's rows of the bf16 folder
        return _bf16_resident(shape)
    if key == "imatrix":
        return float(record.get("weights", 2 * shape.n_params()))
    if key.startswith("gguf-") and not name.startswith("gguf convert"):
        k = kind(key, file_bpw=8 * record["weights"] / shape.n_params()) \
            if record.get("weights") else kind(key)
        return float(record.get("weights") or (weight_bytes(shape, k) if k else 0))
    return 0.0


@dataclass(frozen=True)
class _Step:
    """A recorded release step (kvant.recorder), as every rule of step_peak reads it."""

    record: dict
    shape: Shape
    ram: int

    @property
    def name(self) -> str:
        return self.record["step"]

    @property
    def key(self) -> str:
        return self.record.get("kind") or ""

    @property
    def ctx(self) -> int:
        return self.record.get("ctx") or 0

    @property
    def big(self) -> int:
        return _largest(self.shape)

    @property
    def torch_import(self) -> float:
        """Importing torch, where the step's process had not yet (0 where it had)."""
        return 0 if self.record.get("torch_loaded", True) else _TORCH_IMPORT_MIB * MIB

    @property
    def dtype(self) -> int:
        return _reference_dtype_bytes(self.record, self.shape, self.ram)


def _streamed_reference(s: _Step) -> float:
    # one piece at a time (kvant.runtimes.streamed): every window's hidden states in the
    # dtype, twice while a layer maps inputs to outputs, beside the largest of the embedding
    # or lm_head while loaded (its weights in the dtype and the bf16 tensor read), a
    # layer's weights with its largest tensor read and one window's activations (the
    # MLP's three intermediate rows per position, attention's scores per head), or lm_head
    # with one window's logits in the dtype and in float32
    shape, ctx, dtype = s.shape, s.ctx, s.dtype
    table = shape.vocab * shape.hidden
    layer = (shape.n_params() - 2 * table) / shape.n_layers
    states = (s.record.get("tokens") or ctx) * shape.hidden * dtype
    window = max(3 * ctx * shape.intermediate * dtype, 4 * shape.n_heads * ctx * ctx)
    piece = max(table * (dtype + 2),
                states + layer * dtype + 2 * shape.intermediate * shape.hidden + window,
                table * dtype + ctx * shape.vocab * (dtype + 4))
    return s.torch_import + states + piece


def _reference(s: _Step) -> float:
    # safetensors maps the bf16 files: a bf16 reference runs on the mapped pages (the
    # embedding's only where a window's rows are gathered); a float32 one is a converted
    # copy beside every page it read
    return s.torch_import + _reference_weights(s.record, s.shape, s.ram) \
        + 2 * _logits(s.shape, s.ctx)


def _mix_torch(s: _Step) -> float:
    # the torch mix sensitivity (export/gguf_substitution.substitution_costs). Loading a
    # float32 model holds the mapped bf16 pages beside their converted copy, then lets the
    # pages go (measured at real width: 6 then 4 bytes per parameter); a bf16 model ends
    # with every page resident, the embedding's too once it is substituted. Then per
    # evaluation: the engine's logits of a window and numpy's copy, their KLD a block of
    # 1,024 positions at a time (five float64 arrays), and the largest tensor dequantized
    # (float32) beside the parameter's saved original; throughout, every layer's output for
    # the calibration tokens, kept to replay the layers before a substituted tensor's.
    shape, ctx, dtype = s.shape, s.ctx, s.dtype
    work = 2 * _logits(shape, ctx) + 5 * 8 * min(ctx, 1024) * shape.vocab \
        + s.big * (4 + dtype) + s.record.get("tokens", 0) * shape.hidden * dtype * shape.n_layers
    held = dtype * shape.n_params()
    return s.torch_import + max(held + work, (2 + dtype) * shape.n_params()
                                if dtype != 2 else 0)


def _gguf_convert(s: _Step) -> float:
    return s.big * 2 + 64 * MIB  # the largest tensor, read and written once


def _llama_quantize(s: _Step) -> float:
    return s.big * (2 + 4 + 1)  # the largest tensor read (bf16), dequantized and quantized


def _imatrix(s: _Step) -> float:
    # llama-imatrix maps the bf16 file and keeps logits of its chunk for perplexity plus the
    # feed-forward activations of its batch
    shape, ctx = s.shape, s.ctx
    return s.record.get("weights", 2 * shape.n_params()) + 3 * _logits(shape, ctx) \
        + 3 * ctx * shape.intermediate * 4


def _onnx_builder_from_gptq(s: _Step) -> float:
    # the builder's pre-quantized path on a GPTQ checkpoint (int4_algo "gptq"), its lm_head
    # quantized in place (kvant.export.onnx_builder): the embedding and lm_head read in fp16
    # and made float32 on the way to disk, the lm_head's int8 (about 5.5 bytes per weight of
    # the two), and per layer the packed weights read, unpacked and repacked (1.15 bytes per
    # weight); fitted to builds at 1, 2 and 4 real-width layers (3,649, 3,953 and 4,549 MiB)
    table = s.shape.vocab * s.shape.hidden
    layers = s.shape.n_params() - 2 * table
    return _BUILDER_BASE_MIB * MIB + 5.5 * 2 * table + 1.15 * layers


def _onnx_builder(s: _Step) -> float:
    # transformers' bf16 model, the whole fp32 ONNX proto the quantizer works on (the
    # builder's to_proto), a transient fp32 copy of the largest tensor, the int4 output
    int4 = weight_bytes(s.shape, kind("onnx-int4-b32"))
    return _BUILDER_BASE_MIB * MIB + (2 + 4) * s.shape.n_params() + 4 * s.big + int4


def _gptq(s: _Step) -> float:
    # GPTQModel loads the model lazily and offloads each finished layer to disk
    # (offload_to_disk_path, kvant.quantize.gptq_pipeline): the embedding and lm_head in
    # bf16, at most two decoder layers in bf16 (measured flat past two: 4,244, 4,398 and
    # 4,412 MiB at 1, 2 and 4 real-width layers on the CPU, docs/real-size.md), one layer's
    # calibration inputs and outputs (float32, a row per sample and position) and the
    # largest Hessian (float32, in x in)
    shape = s.shape
    samples, seqlen = s.record.get("samples") or 0, s.record.get("seqlen") or 0
    activations = 2 * samples * seqlen * shape.hidden * 4
    hessian = max(shape.intermediate, shape.hidden) ** 2 * 4
    table = shape.vocab * shape.hidden
    layer = (shape.n_params() - 2 * table) / shape.n_layers
    held = 2 * (2 * table + min(shape.n_layers, 2) * layer)
    return s.torch_import + _TORCH_IMPORT_MIB * MIB + held + activations + hessian


def _mlx_convert(s: _Step) -> float:
    # mlx-lm's convert in a child process (kvant.export.mlx_pipeline): it loads the
    # safetensors lazily, quantizes, and evaluates the quantized model as it saves it: the
    # source's pages (2 bytes per parameter) beside the quantized model and the largest
    # tensor in float32. Measured on the stand-in only (287 MiB); not yet at real width,
    # where scoring on MLX's CPU backend takes seconds per token
    return _MLX_BASE_MIB * MIB + 2 * s.shape.n_params() \
        + weight_bytes(s.shape, kind(s.key)) + 4 * s.big


def _bnb(s: _Step) -> float:
    # tensor by tensor (kvant.quantize.bnb_pipeline): bitsandbytes and the model code
    # imported, one shard of the output (at most SHARD_BYTES plus the tensor that crossed
    # it), and the largest linear in flight with bitsandbytes' temporaries (measured at real
    # width: about 10 bytes per weight for 4-bit, 6 for int8)
    out = weight_bytes(s.shape, kind(s.key))
    linear = s.shape.intermediate * s.shape.hidden
    per_weight = 6 if "int8" in s.key else 10
    return s.torch_import + _BNB_IMPORT_MIB * MIB + min(out, SHARD_BYTES + 2 * s.big) \
        + per_weight * linear


def _running(s: _Step) -> float | None:
    """A step that runs an artifact (scoring, a bench row, greedy checks, a task eval), or
    None where the plan has no kind for it."""
    record, shape, ctx, key = s.record, s.shape, s.ctx, s.key
    lang = record.get("tokens_per_language") or 0
    k = kind(key, file_bpw=8 * record["weights"] / shape.n_params()) \
        if key and record.get("weights") else kind(key) if key else None
    if k is None:
        return None
    # (a task eval scores a bf16 folder in the reference's dtype, float32 where it fits)
    weights = (_reference_weights(record, shape, s.ram) if record.get("task_eval")
               else _bf16_resident(shape)) if key == "bf16" \
        else record.get("weights") or weight_bytes(shape, k)
    lm_eval = _LM_EVAL_MIB * MIB if record.get("task_eval") else 0
    if record.get("worker"):  # a fresh process: the one formula of `kvant plan`
        return peak_bytes(shape, k, ctx, weights)
    if s.name.endswith(("greedy", "greedy check")) or (
            k.backend == "onnxruntime-genai" and not s.name.startswith("bench speed")):
        # ONNX Runtime in this process (GenAI, or the plain session that scores): mapped
        # weights, repacked copies, its logits three times, drift's comparison
        return ort_resident(shape, k, weights) + kv_bytes(shape, k, ctx) \
            + 3 * _logits(shape, ctx) + (_drift(shape, ctx, lang) if lang else 0) + lm_eval
    if s.name == "gguf tokenizer report":  # whole paragraphs, one at a time: bits per byte
        return weights + 2 * _logits(shape, ctx) + 3 * 8 * ctx * shape.vocab
    # scoring in this process: the weights (a mapped file or loaded tensors), the engine's
    # logits of a window and numpy's copy, and drift's comparison of one language (not in a
    # task eval's step, kvant.app.lmeval: it keeps one request's log-probabilities)
    drift = 0 if record.get("task_eval") else _drift(shape, ctx, lang)
    # (a task eval's llama.cpp context is its longest request's room, n_ctx, not the longest
    # request it met: llama.cpp allocates and clears the whole KV cache when it opens)
    kv = kv_bytes(shape, k, record.get("n_ctx") or ctx)
    return s.torch_import + weights + kv + 2 * _logits(shape, ctx) + drift + lm_eval


# What each kind of recorded step adds to the floor: the first rule whose test the step
# passes, in this order (a reference that streams before one that does not, GPTQ's
# quantize before the steps that run an artifact); every other step runs an artifact.
_RULES = (
    (lambda s: s.name == "cards", lambda s: 0.0),
    (lambda s: s.key == "reference" and s.record.get("streamed"), _streamed_reference),
    (lambda s: s.key == "reference", _reference),
    (lambda s: s.key == "mix-torch", _mix_torch),
    (lambda s: s.name.startswith("gguf convert"), _gguf_convert),
    (lambda s: s.key == "llama-quantize", _llama_quantize),
    (lambda s: s.key == "imatrix", _imatrix),
    (lambda s: s.key == "onnx-builder" and s.record.get("source") == "gptq",
     _onnx_builder_from_gptq),
    (lambda s: s.key == "onnx-builder", _onnx_builder),
    (lambda s: s.name.endswith(" quantize") and s.key.startswith("gptq"), _gptq),
    (lambda s: s.name.endswith(" convert") and s.key.startswith("mlx"), _mlx_convert),
    (lambda s: s.name.endswith(" quantize") and s.key.startswith("bnb"), _bnb),
)


def step_peak(record: dict, shape: Shape, ram: int, floor_mib: float | None = None
              ) -> float | None:
    """Predicted peak RAM of one recorded release step (kvant.recorder): ``floor_mib`` (what
    the process tree held when the step started) plus what the plan says the step adds,
    from the shapes (_RULES); None when the plan has no model of the step."""
    floor = (DEFAULT_FLOOR_MIB if floor_mib is None else floor_mib) * MIB
    s = _Step(record, shape, ram)
    for test, rule in _RULES:
        if test(s):
            return floor + rule(s)
    added = _running(s)
    return None if added is None else floor + added
