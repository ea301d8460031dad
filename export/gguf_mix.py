"""Per-tensor GGUF types chosen by measured sensitivity: `<type>-mix` and `mix:SIZE`.

llama.cpp's recipes (Q4_K_M, ...) give a few tensors more bits by a hand-written rule. Here
each quantizable tensor (every matrix of every layer, token_embd, output) gets the type that
minimizes the predicted loss under a byte budget:

1. Sensitivity, on the calibration text only. ``direct`` (small models): for each tensor and
   candidate type, llama-quantize a file where only that tensor has that type and every
   other tensor Q8_0 (`--pure` plus one `--tensor-type` override), and measure its mean KLD
   against the bf16 reference on calibration windows; the tensor's cost is that minus the
   all-Q8_0 file's. ``torch`` (11.4B on a GPU): the same cost with the tensor swapped into
   the transformers model and its input rounded as llama.cpp's matmul rounds it for that
   type (INPUT_ROUNDING), one forward per tensor and type and no llama-quantize each, the
   layers before the tensor's own replayed from one forward of the unmodified model.
   ``proxy`` (where neither fits the time budget: a CPU at 11.4B): no model run; each
   tensor of a `--pure` file of each candidate type is dequantized (gguf-py) and compared
   with the bf16 tensor, weighted per input column by the importance matrix (mean squared
   activation; the output tensor's from llama-imatrix --process-output), token_embd per row
   by the calibration tokens' frequencies. Each method's rank correlation with the direct
   measurement is reported on both stand-ins (docs/formats.md).
2. Exact bytes: ggml's block and type sizes per tensor and type, with llama.cpp's fallback
   for rows that do not divide (llama-quant.cpp `tensor_type_fallback`).
3. An exact knapsack in bytes (scipy's MILP, HiGHS: one binary per tensor and type) minimizes
   the summed cost. The uniform file's own assignment is always a candidate: a mix never
   predicts worse than its uniform twin, and where no trade helps the uniform is returned.
4. llama-quantize realizes the assignment with one anchored `--tensor-type` override per
   tensor; the written file is read back and every tensor must have its planned type.

Costs are assumed additive over tensors (the usual assumption of mixed-precision search;
the measured KLD of the final file is reported beside the prediction).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kvant.errors import KvantError, SettingsError
from kvant.export.gguf_fisher import fisher_costs
from kvant.export.gguf_quantize import quantize
from kvant.export.gguf_tensors import (
    PURE_FTYPE,
    ROWS,
    OverTimeBudget,
    Tensor,
    as_param,
    duration,
    fallback,
    file_types,
    hf_names,
    hf_params,
    pure,
    qk_heads,
    quantizable,
    read_imatrix,
    read_rows,
    read_tensor,
    tensor_bytes,
    tensor_layout,
    written_types,
)
from kvant.model import read_config
from kvant.runtimes.llamacpp import LlamaCppRuntime
from kvant.scoring import kld_per_position

logger = logging.getLogger(__name__)

# What a mix may choose from, per uniform type it replaces: the type itself and its
# neighbours (every type the uniform recipe itself uses is added from its file).
NEIGHBOURS = {
    "q4_k_m": ("q3_k", "q4_k", "q5_k", "q6_k", "q8_0"),
    "q3_k_m": ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k"),
    "iq4_xs": ("q3_k", "iq4_xs", "q4_k", "q5_k", "q6_k", "q8_0"),
    "q5_k_m": ("q4_k", "q5_k", "q6_k", "q8_0"),
}
ALL_CANDIDATES = ("q2_k", "q3_k", "iq4_xs", "q4_k", "q5_k", "q6_k", "q8_0")
BASELINE = "q8_0"
MIX_KEY = "kvant.mix"  # written into a mix file: what it is, for kvant.runtimes.gguf_kind
ALIGN = 32  # GGUF's general.alignment default: every tensor's data starts on it
def quantize_with(base: Path, out: Path, tensors: list[Tensor], assignment: dict[str, str],
                  imatrix: Path | None, threads: int, ftype: str = "Q8_0",
                  tag: str | None = None) -> dict[str, str]:
    """llama-quantize ``base`` (whose quantizable ``tensors`` these are) with one anchored
    override per tensor of ``assignment``, each asked for in the type llama.cpp will write
    (its fallback where the rows do not divide); the file is read back against that. Returns
    the types written."""
    planned = written_types(tensors, assignment)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=out.parent,
                                     delete=False) as handle:
        for name, type_name in planned.items():
            handle.write(f"^{re.escape(name)}$={type_name}\n")
        overrides = Path(handle.name)
    options = ("--pure", "--tensor-type-file", overrides,
               *(("--override-kv", f"{MIX_KEY}=str:{tag}") if tag else ()))
    try:
        quantize(base, out, ftype, imatrix, threads, options)
    except BaseException:
        out.unlink(missing_ok=True)  # llama-quantize may leave a partial file
        raise
    finally:
        overrides.unlink(missing_ok=True)
    written = file_types(out)
    wrong = {n: (t, written.get(n)) for n, t in planned.items() if written.get(n) != t}
    if wrong:
        out.unlink()
        name, (want, got) = next(iter(wrong.items()))
        raise KvantError(f"llama-quantize wrote {len(wrong)} tensor(s) with another type than "
                         f"planned ({name}: {got}, planned {want}); the mix file is not kept")
    return planned


def token_frequencies(ids, vocab: int) -> np.ndarray:
    """Each token's share of ``ids`` (the calibration text's tokens), per vocabulary row."""
    counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab)[:vocab]
    return counts / max(int(counts.sum()), 1)


def proxy_costs(base: Path, tensors: list[Tensor], types: list[str], imatrix: Path | None,
                scratch: Path, threads: int, progress: bool = False,
                token_freq: np.ndarray | None = None) -> dict:
    """{(tensor, type): expected squared error of the tensor's output per token}, no model run.

    A matrix: sum over rows i and input columns j of a_j (w_ij - q_ij)^2, with a_j the
    importance matrix's mean squared activation of column j (the output tensor's too: the
    importance matrix is computed with llama-imatrix --process-output when a mix is made;
    one without that entry weighs its columns equally). token_embd is a lookup, not a
    product: its row i is the output whenever token i is read, so each row's squared error
    is weighed by the token's share f_i of the calibration tokens (``token_freq``), times the
    row count: weights of mean one, the shape of the calibration's use at the scale of the
    unweighted sum (f_i alone, summing to one, made the embedding look 4,000x cheaper than
    its direct cost says on the stand-in: within-type rank correlation 0.41 against 0.59).
    Without frequencies rows weigh equally. One --pure file per type, read back a block of
    rows at a time (bounded memory at any width).
    """
    weights = read_imatrix(imatrix)
    base_layout = tensor_layout(base)
    costs = {}
    for type_name in tqdm(types, desc="mix proxy", disable=not progress):
        path = pure(base, type_name, scratch / f"pure-{type_name}.gguf", imatrix, threads)
        try:
            layout = tensor_layout(path)
            with base.open("rb") as src, path.open("rb") as got:
                for tensor in tensors:
                    by_row = tensor.name == "token_embd.weight" and token_freq is not None
                    a = np.ones(tensor.ne0) if by_row else \
                        weights.get(tensor.name, np.ones(tensor.ne0))
                    total = 0.0
                    for r0 in range(0, tensor.rows, ROWS):
                        r1 = min(r0 + ROWS, tensor.rows)
                        w = read_rows(src, base_layout[tensor.name], r0, r1)
                        q = read_rows(got, layout[tensor.name], r0, r1)
                        err = ((w - q).astype(np.float64) ** 2) @ a
                        total += float(err @ (token_freq[r0:r1] * tensor.rows) if by_row
                                       else err.sum())
                    costs[tensor.name, type_name] = total
        finally:
            path.unlink(missing_ok=True)
    return costs


AUTO_ORDER = ("direct", "torch", "fisher")
"""auto's methods, most exact first: the first whose estimate fits is used."""


def _why(estimate: dict) -> str:
    """Why a method was passed over, from its estimate: its memory, or its time."""
    return estimate.get("reason") or f"would take about {duration(estimate['estimated_s'])}"


class NothingFits(Exception):
    """auto: no measured sensitivity fits the time budget (their estimates in ``tried``)."""

    def __init__(self, tried: list[dict]):
        super().__init__(tried)
        self.tried = tried

    def __str__(self) -> str:
        said = ", ".join(f"{t['mode']} {_why(t['estimate'])}" for t in self.tried)
        return (f"no measured sensitivity fits --mix-time-budget and memory ({said}); raise "
                "the budget or run on a GPU")


def direct_costs(base: Path, tensors: list[Tensor], types: list[str], imatrix: Path | None,
                 ref, wins: list[list[int]], scratch: Path, threads: int,
                 progress: bool = False, time_budget_s: float | None = None
                 ) -> tuple[dict, float, dict]:
    """{(tensor, type): mean KLD on ``wins`` with only that tensor in that type, minus the
    all-Q8_0 file's}, that baseline KLD, and the time estimate: the baseline evaluation is
    timed first and multiplied by the evaluations left (one llama-quantize and one scoring
    each; the cost grows with the square of the model). Over ``time_budget_s`` it stops
    there (OverTimeBudget), before the long part."""
    reference = ref["calib"]
    n_ctx = max(len(w) for w in wins) + 8

    def kld(assignment: dict[str, str]) -> float:
        # unrounded: a tensor's share of the KLD is often below the reports' 6 decimals
        path = scratch / "probe.gguf"
        try:
            quantize_with(base, path, tensors, assignment, imatrix, threads)
            runtime = LlamaCppRuntime(path, threads=threads, n_ctx=n_ctx)
            try:
                return float(np.concatenate([
                    kld_per_position(r[:-1], runtime.logits(w)[:-1])
                    for r, w in zip(reference, wins, strict=True)]).mean())
            finally:
                runtime.close()
        finally:
            path.unlink(missing_ok=True)

    everything = {t.name: BASELINE for t in tensors}
    started = time.perf_counter()
    baseline = kld(everything)
    pairs = [(t, ty) for t in tensors for ty in types]
    evaluations = sum(ty != BASELINE for _, ty in pairs)
    first_s = time.perf_counter() - started
    estimate = {"evaluations": evaluations, "first_s": round(first_s, 2),
                "estimated_s": round(first_s * evaluations), "budget_s": time_budget_s}
    logger.info("direct mix sensitivity: %d evaluations at about %.1f s each, %s in all",
                evaluations, first_s, duration(first_s * evaluations))
    if time_budget_s is not None and first_s * evaluations > time_budget_s:
        raise OverTimeBudget(estimate)
    costs = {}
    for tensor, type_name in tqdm(pairs, desc="mix sensitivity", disable=not progress):
        if type_name == BASELINE:
            costs[tensor.name, type_name] = 0.0
            continue
        costs[tensor.name, type_name] = kld({**everything, tensor.name: type_name}) - baseline
    return costs, baseline, estimate


# llama.cpp's CPU matmul rounds a matmul's input to its weight type's vec_dot_type before the
# dot products (ggml-cpu's type_traits_cpu): q8_K, int8 per 256 values with a float32 scale,
# for the K-quants and IQ4_XS; q8_0 / q8_1, int8 per 32 with an fp16 scale, for the legacy
# types and IQ4_NL. That rounding is part of what a type costs a tensor in llama.cpp: it
# depends on the type (a 256-wide scale is coarse where the input has outliers) and on the
# tensor's input, so the substituted forward rounds the tensor's input the same way. Written
# by hand: gguf-py dequantizes weights but has no activation quantizer, and no library
# emulates ggml's. {written type: (values per scale, fp16 scale)}; token_embd is a row
# lookup, not a matmul, and has none.
INPUT_ROUNDING = {**dict.fromkeys(("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs"),
                                  (256, False)),
                  **dict.fromkeys(("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl"),
                                  (32, True))}


def round_input(x, block: int, fp16_scale: bool):
    """``x`` (torch, last dim a multiple of ``block``) as ggml holds a matmul's input:
    ``fp16_scale`` q8_0 (quantize_row_q8_0_ref: scale absmax / 127, values rounded half away
    from zero, the scale stored in fp16), else q8_K (quantize_row_q8_K_ref: scale from the
    signed value of largest magnitude, rounded half to even, at most 127)."""
    import torch

    blocks = x.float().reshape(-1, block)
    if fp16_scale:
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        v = blocks * inverse
        rounded = torch.sign(v) * torch.floor(v.abs() + 0.5) * d.half().float()
    else:
        extreme = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
        iscale = torch.where(extreme != 0, -127 / extreme, torch.zeros_like(extreme))
        q = torch.clamp(torch.round(iscale * blocks), max=127)
        rounded = torch.where(iscale != 0, q / iscale, torch.zeros_like(q))
    return rounded.reshape(x.shape).to(x.dtype)


def _mean_kld(runtime, reference, wins: list[list[int]]) -> float:
    return float(np.concatenate([kld_per_position(r[:-1], runtime.logits(w)[:-1])
                                 for r, w in zip(reference, wins, strict=True)]).mean())


def _substituted_kld(runtime, param, weights: np.ndarray, tensor: Tensor, heads: dict,
                     reference, wins: list[list[int]], module=None,
                     rounding: tuple[int, bool] | None = None) -> float:
    """Mean KLD on ``wins`` with ``param`` replaced by ``weights`` (the dequantized GGUF
    tensor, float32 rows of ne0), restored afterwards; ``module`` (the Linear that multiplies
    by it) gets its input rounded as ``rounding`` says (INPUT_ROUNDING) meanwhile."""
    import torch

    kept = param.data.clone()
    with torch.no_grad():
        param.data.copy_(torch.from_numpy(as_param(weights, tensor, heads)))
        hook = None if module is None or rounding is None else \
            module.register_forward_pre_hook(
                lambda _, args: (round_input(args[0], *rounding), *args[1:]))
        try:
            return _mean_kld(runtime, reference, wins)
        finally:
            param.data.copy_(kept)
            if hook is not None:
                hook.remove()


def _layer_of(name: str, n_layers: int) -> int:
    """The first decoder layer whose output a substituted GGUF tensor changes: token_embd's
    is 0 (everything), a layer's own index, the output tensor's ``n_layers`` (only the head)."""
    if name.startswith("blk."):
        return int(name.split(".")[1])
    return n_layers if name == "output.weight" else 0


def _decoder_layers(model, n_layers: int):
    """The model's decoder layers (a ModuleList of ``n_layers``), or None where it has none
    by that name: then every evaluation runs the whole model."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if layers is not None and len(layers) == n_layers else None


def _layer_outputs(runtime, layers, wins: list[list[int]]) -> list | None:
    """What each decoder layer gives for each window in one forward of the unmodified model:
    [layer][window] tensors, kept on the CPU. None where a layer gives anything but one
    tensor (transformers before 5 returned tuples; then nothing is replayed)."""
    import torch

    outputs = [[] for _ in layers]
    plain = True

    def keep(index):
        def hook(_module, _args, output):
            nonlocal plain
            plain = plain and isinstance(output, torch.Tensor)
            if plain:
                outputs[index].append(output.detach().to("cpu", copy=True))
        return hook

    hooks = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        for window in wins:
            runtime.logits(window)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs if plain else None


@contextlib.contextmanager
def _replayed(layers, outputs: list | None, first: int):
    """Within: the decoder layers before ``first`` do no work, and the last of them hands
    layer ``first`` what it gave in the unmodified forward of each window in turn. Exact:
    those layers' weights and input are the checkpoint's, so their output is the kept one.
    Why by hand: transformers runs a model whole (no entry at a given layer), and a forward
    hook cannot skip a layer's work."""
    if outputs is None or first == 0:
        yield
        return
    import torch

    feed = iter(outputs[first - 1])

    class Skip(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    class Replay(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return next(feed).to(hidden_states.device)

    kept = [layers[i] for i in range(first)]
    try:
        for i in range(first - 1):
            layers[i] = Skip()
        layers[first - 1] = Replay()
        yield
    finally:
        for i, layer in enumerate(kept):
            layers[i] = layer


def _torch_estimate(seconds: dict, tensors: list[Tensor], n_layers: int, types: int,
                    quantize_s: float, budget: float | None) -> dict:
    """The torch sensitivity's whole time from its first evaluations. ``seconds`` holds the
    whole model's forward and KLD ("full", token_embd substituted) and, where layers are
    replayed, the head's alone ("head", the output tensor: no layer runs), each without
    the dequantization, which is timed apart ("dequant", "dequant_values": the values it
    took that long for) and grows with a tensor's size. An evaluation of a tensor in layer
    L runs the head and the layers from L on: head + (full - head) (n_layers - L) / n_layers.
    """
    full, head = seconds["full"], seconds.get("head")
    if head is None:  # nothing replayed: every evaluation is a whole forward
        per_type = full * len(tensors)
    else:
        per_type = sum(head + max(full - head, 0.0) * (n_layers - _layer_of(t.name, n_layers))
                       / n_layers for t in tensors)
    dequant = seconds["dequant"] / seconds["dequant_values"] * sum(t.rows * t.ne0
                                                                   for t in tensors)
    estimate = {"evaluations": len(tensors) * types, "first_s": round(full, 2),
                "quantize_s": round(quantize_s, 2), "dequant_s": round(dequant, 2),
                "types": types,
                "estimated_s": round((quantize_s + dequant + per_type) * types),
                "budget_s": budget}
    if head is not None:
        estimate["head_s"] = round(head, 2)
    return estimate


def substitution_costs(model_dir: Path, base: Path, tensors: list[Tensor], types: list[str],
                       imatrix: Path | None, ref, wins: list[list[int]], scratch: Path,
                       threads: int, device: str = "cpu", dtype: str = "float32",
                       progress: bool = False, time_budget_s: float | None = None,
                       replay: bool = True) -> tuple[dict, dict]:
    """{(tensor, type): mean calibration KLD against the reference with only that tensor
    quantized to that type, every other weight as in the checkpoint}, and the time estimate.

    One `--pure` llama-quantize file per type (llama.cpp's own quantizer, its fallbacks and
    importance matrix); each tensor of it dequantized with gguf-py (Q/K rows put back in HF's
    order) and swapped into the transformers model, one at a time, for one forward over the
    calibration windows. Its cost is a model forward per evaluation and no llama-quantize per
    evaluation (direct's cost), so it is the method that fits at 11.4B on a GPU. ``replay``:
    the layers before the substituted tensor's are not run again; their output is kept from
    one forward of the unmodified model (:func:`_replayed`; n_layers x the calibration
    tokens x hidden values on the CPU), which halves the layers a forward runs on average.
    Over ``time_budget_s`` (the first quantize, the head's evaluation and the whole model's,
    and their dequantization, timed: :func:`_torch_estimate`) it stops after those."""
    from kvant.runtimes.hf import TorchRuntime  # torch: only for this method

    config = read_config(model_dir)
    n_layers = config["num_hidden_layers"]
    heads = qk_heads(config)
    names = hf_names(model_dir, tensors)
    reference = ref["calib"]
    runtime = TorchRuntime(model_dir, device=device, threads=threads, dtype=dtype)
    params = hf_params(runtime.model)
    modules = dict(runtime.model.named_modules())
    # the matmul each tensor's input goes through (token_embd's rows are looked up)
    linear = {t.name: modules.get(names[t.name].removesuffix(".weight"))
              if t.name != "token_embd.weight" else None for t in tensors}
    layers = _decoder_layers(runtime.model, n_layers) if replay else None
    outputs = _layer_outputs(runtime, layers, wins) if layers is not None else None
    # the head's evaluation first and the whole model's second: the estimate's two timings
    order = sorted(tensors, key=lambda t: (t.name != "output.weight" or outputs is None,
                                           t.name != "token_embd.weight"))
    costs, estimate, seconds = {}, None, {}
    total = len(tensors) * len(types)
    bar = tqdm(total=total, desc="mix sensitivity (torch)", disable=not progress)
    try:
        for type_name in types:
            started = time.perf_counter()
            path = pure(base, type_name, scratch / f"pure-{type_name}.gguf", imatrix, threads)
            pure_s = time.perf_counter() - started
            try:
                layout = tensor_layout(path)
                with path.open("rb") as handle:
                    for tensor in order:
                        started = time.perf_counter()
                        weights = read_tensor(handle, layout[tensor.name], tensor)
                        loaded = time.perf_counter()
                        first = _layer_of(tensor.name, n_layers)
                        with _replayed(layers, outputs, first):
                            costs[tensor.name, type_name] = _substituted_kld(
                                runtime, params[names[tensor.name]], weights, tensor,
                                heads, reference, wins, linear[tensor.name],
                                INPUT_ROUNDING.get(layout[tensor.name][2].name.lower()))
                        bar.update()
                        timed = "full" if first == 0 or outputs is None else \
                            "head" if first == n_layers else None
                        if estimate is None and timed is not None:
                            seconds[timed] = time.perf_counter() - loaded
                            seconds["dequant"] = seconds.get("dequant", 0.0) \
                                + loaded - started
                            seconds["dequant_values"] = seconds.get("dequant_values", 0) \
                                + tensor.rows * tensor.ne0
                            if "full" not in seconds:
                                continue  # the head's alone: the whole model's is next
                            estimate = _torch_estimate(seconds, tensors, n_layers,
                                                       len(types), pure_s, time_budget_s)
                            logger.info("torch mix sensitivity: %d evaluations, about %s",
                                        total, duration(estimate["estimated_s"]))
                            if time_budget_s is not None \
                                    and estimate["estimated_s"] > time_budget_s:
                                raise OverTimeBudget(estimate)
            finally:
                path.unlink(missing_ok=True)
    finally:
        bar.close()
        runtime.close()
    return costs, estimate


def stored_bytes(tensor: Tensor, type_name: str) -> int:
    """What the tensor takes in the file: its data padded to the next tensor's alignment."""
    return -(-tensor_bytes(tensor, type_name) // ALIGN) * ALIGN


def knapsack(tensors: list[Tensor], types: list[str], costs: dict, budget: int,
             uniform: dict[str, str] | None = None) -> dict:
    """{tensor: type} minimizing the summed cost with the summed stored bytes within
    ``budget``, exactly: a mixed-integer programme (scipy.optimize.milp, HiGHS, no gap),
    one binary per (tensor, type), one type per tensor, one budget row in bytes; the solution
    is checked in integer bytes (and solved again below any excess a solver tolerance let
    through). ``uniform`` (an assignment, e.g. the uniform file's) is returned when nothing
    within the budget is predicted to cost less: the result never predicts worse than it.

    Why an exact solver: the earlier dynamic programme rounded every option up to 1/8,192 of
    the budget, which at 11.4B is 0.85 MB per tensor and 120-240 MB of budget lost."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # the solver, only when mixing

    n, m = len(tensors), len(types)
    cost = np.array([costs[t.name, ty] for t in tensors for ty in types], dtype=np.float64)
    size = np.array([stored_bytes(t, ty) for t in tensors for ty in types], dtype=np.float64)
    one_each = np.kron(np.eye(n), np.ones(m))
    cheapest = int(size.reshape(n, m).min(axis=1).sum())
    if cheapest > budget:
        raise SettingsError(f"a mix budget of {budget / 2**20:.1f} MiB for the quantized "
                            f"tensors is below the smallest mix ({cheapest / 2**20:.1f} MiB); "
                            "give a larger size")
    limit = float(budget)
    for _ in range(8):
        found = milp(cost, integrality=np.ones(n * m), bounds=Bounds(0, 1),
                     constraints=[LinearConstraint(one_each, 1, 1),
                                  LinearConstraint(size[None, :], 0, limit)],
                     options={"mip_rel_gap": 0.0})
        if found.x is None:
            raise KvantError(f"the mix solver found no assignment ({found.message})")
        picks = found.x.reshape(n, m).argmax(axis=1)
        chosen = {t.name: types[k] for t, k in zip(tensors, picks, strict=True)}
        over = sum(stored_bytes(t, chosen[t.name]) for t in tensors) - budget
        if over <= 0:
            break
        limit -= over  # a tolerance's worth over the budget: tighten and solve again
    else:
        raise KvantError("the mix solver kept exceeding the budget; report this")
    if uniform is not None:
        def total(assignment):
            return sum(costs[t.name, assignment[t.name]] for t in tensors)

        if total(uniform) <= total(chosen):
            return {t.name: uniform[t.name] for t in tensors}
    return chosen


class Sensitivity:
    """Per (tensor, type) costs of one export, measured once for every mix it makes.

    ``mode`` auto: direct, else torch, else fisher, whichever's estimate (its timed first
    evaluations, and for fisher its memory) is first within ``time_budget_s``; where none
    fits, NothingFits (a ``<type>-mix`` then ships its uniform twin; the proxy is used only
    when asked for, or for mix:SIZE, which has no twin). Once auto has chosen, a later mix
    that needs more types measures them with the same method, within the same budget. The
    choice and the estimates are recorded (``as_dict``) and said in the log.

    ``ref``: the reference's calibration logits (``ref["calib"]``, one array per window of
    ``wins``) and the dtype it was computed in (``ref.dtype``), as
    kvant.runtimes.reference.reference_logits returns them; fisher needs neither."""

    def __init__(self, mode: str, base: Path, imatrix: Path | None, scratch: Path,
                 threads: int, ref=None, wins: list[list[int]] | None = None,
                 progress: bool = False, time_budget_s: float | None = None,
                 model_dir: Path | None = None, device: str = "cpu",
                 token_freq: np.ndarray | None = None):
        self.mode, self.base, self.imatrix, self.scratch = mode, base, imatrix, scratch
        self.requested = mode
        self.token_freq = token_freq  # the proxy's weights for token_embd's rows
        self.threads, self.ref, self.wins, self.progress = threads, ref, wins, progress
        self.time_budget_s, self.model_dir, self.device = time_budget_s, model_dir, device
        self.tensors = quantizable(base)
        self.costs: dict = {}
        self.baseline: float | None = None
        self.estimate: dict | None = None
        self.tried: list[dict] = []
        """Each method auto timed and passed over: {"mode", "estimate"}."""

    def _measure(self, mode: str, types: list[str], budget: float | None) -> dict:
        """One measured method's costs of ``types`` (OverTimeBudget where it does not fit)."""
        if mode == "direct":
            costs, self.baseline, self.estimate = direct_costs(
                self.base, self.tensors, types, self.imatrix, self.ref, self.wins,
                self.scratch, self.threads, self.progress, budget)
            return costs
        if mode == "torch":
            costs, self.estimate = substitution_costs(
                self.model_dir, self.base, self.tensors, types, self.imatrix, self.ref,
                self.wins, self.scratch, self.threads, self.device, self.ref.dtype,
                self.progress, budget)
        else:
            costs, self.estimate = fisher_costs(
                self.model_dir, self.base, self.tensors, types, self.imatrix, self.wins,
                self.scratch, self.threads, self.device,
                self.ref.dtype if self.ref is not None else "float32", self.progress, budget)
        self.baseline = 0.0  # against the checkpoint itself
        return costs

    def of(self, types: list[str]) -> dict:
        """The costs of every type in ``types`` (measured where missing)."""
        missing = [t for t in types if (self.tensors[0].name, t) not in self.costs]
        if not missing:
            return self.costs
        auto = self.requested == "auto"
        if auto and self.tried and not self.costs:
            raise NothingFits(self.tried)  # timed once: the next mix is not timed again
        budget = self.time_budget_s if auto else None
        if self.mode == "proxy":
            return self.proxy(missing)
        order = [self.mode] if not auto or self.costs else AUTO_ORDER
        for mode in order:
            try:
                costs = self._measure(mode, missing, budget)
            except OverTimeBudget as over:
                self.tried.append({"mode": mode, "estimate": over.estimate})
                logger.warning("%s mix sensitivity passed over: %s (--mix-time-budget %s)",
                               mode, _why(over.estimate), duration(budget))
                continue
            self.mode = mode
            self.costs.update(costs)
            return self.costs
        # the proxy chose worse than llama.cpp's own rule on both stand-ins (docs/
        # formats.md): auto never falls back to it; make_mix ships the uniform file
        raise NothingFits(self.tried)

    def proxy(self, types: list[str]) -> dict:
        """The proxy's costs (no model run), asked for or where nothing else is possible."""
        missing = [t for t in types if (self.tensors[0].name, t) not in self.costs]
        self.mode = "proxy"
        self.costs.update(proxy_costs(self.base, self.tensors, missing, self.imatrix,
                                      self.scratch, self.threads, self.progress,
                                      self.token_freq))
        return self.costs

    def predicted_kld(self, assignment: dict[str, str]) -> float | None:
        """Calibration KLD the measured costs predict for ``assignment`` (None for proxy)."""
        if self.mode not in ("direct", "torch"):
            return None
        return self.baseline + self.total(assignment)

    def total(self, assignment: dict[str, str]) -> float:
        return sum(self.costs[n, t] for n, t in assignment.items())

    def as_dict(self) -> dict:
        """For the manifest: the mode, the all-Q8_0 baseline and every measured cost."""
        table: dict = {}
        for (name, type_name), cost in self.costs.items():
            table.setdefault(name, {})[type_name] = cost
        return {"mode": self.mode, "baseline_calib_kld": self.baseline,
                "calib_tokens": sum(len(w) for w in self.wins) if self.wins else None,
                "time_estimate": self.estimate, "passed_over": self.tried, "costs": table}


def overhead_bytes(path: Path, tensors: list[Tensor]) -> int:
    """What a file holds besides the stored data of its quantizable ``tensors``: header,
    metadata, tensor infos, norms (kept f32) and their padding."""
    types = file_types(path)
    return path.stat().st_size - sum(stored_bytes(t, types[t.name]) for t in tensors)


def kv_bytes(key: str, value: str) -> int:
    """The bytes one string key-value pair adds to a GGUF header (gguf.md: u64 key length,
    key, u32 value type, u64 string length, string)."""
    return 8 + len(key.encode()) + 4 + 8 + len(value.encode())


# What llama-quantize's own keys (general.quantization_version, quantize.imatrix.file,
# .dataset, .entries_count, .chunks_count) add to the bf16 file's metadata, with room for a
# long imatrix path; used only for mix:SIZE, which has no uniform file to measure from.
QUANTIZE_METADATA = 4096


def as_candidates(tensors: list[Tensor], written: dict[str, str], types: list[str]
                  ) -> dict[str, str] | None:
    """A file's written types as candidate types (the one each tensor's written type is the
    fallback of, :func:`fallback`), so the solver can price it; None where some tensor has a
    type no candidate writes."""
    out = {}
    for t in tensors:
        found = [ty for ty in types if fallback(ty, t.ne0) == written[t.name]]
        if not found:
            return None
        out[t.name] = found[0]
    return out


def candidates(spec: str, uniform_types: set[str] = frozenset(),
               imatrix: bool = True) -> list[str]:
    """The types a mix chooses from: for ``<type>-mix`` the type's neighbours (NEIGHBOURS)
    and every type its uniform file uses; for ``mix:SIZE`` every candidate. IQ types only
    with an importance matrix.

    >>> candidates("q4_k_m-mix", {"q4_k", "q6_k"})
    ['q3_k', 'q4_k', 'q5_k', 'q6_k', 'q8_0']
    """
    base_type = spec.removesuffix("-mix") if spec.endswith("-mix") else None
    types = [t for t in ALL_CANDIDATES if base_type is None
             or t in NEIGHBOURS.get(base_type, ALL_CANDIDATES) or t in uniform_types]
    return [t for t in types if imatrix or not t.startswith("iq")]


def make_mix(spec: str, base: Path, out: Path, sensitivity: Sensitivity,
             uniform: Path | None, budget_bytes: int | None, threads: int) -> dict:
    """Choose, write and check one mix file; return what goes into the manifest.

    ``uniform``: the uniform file of ``<type>-mix`` (its size is the budget, every type it
    uses is a candidate, and its own assignment is one: where no trade is predicted to help,
    no file is written and the result says ``same_as_uniform``); ``budget_bytes``: the file
    size of ``mix:SIZE``.
    """
    tensors = sensitivity.tensors
    uniform_types, as_uniform = {}, None
    if uniform is not None:
        names = {x.name for x in tensors}
        uniform_types = {n: t for n, t in file_types(uniform).items() if n in names}
        budget_bytes = uniform.stat().st_size
    types = candidates(spec, set(uniform_types.values()), sensitivity.imatrix is not None)
    try:
        costs = sensitivity.of(types)
    except NothingFits as nothing:
        if uniform is not None:  # its uniform twin ships in its place
            return {"sensitivity": None, "candidates": types, "budget_bytes": budget_bytes,
                    "skipped": str(nothing), "passed_over": nothing.tried}
        logger.warning("%s: %s; mix:SIZE has no uniform twin to ship instead, so it is "
                       "chosen by the proxy (no model run, measured worse than llama.cpp's "
                       "rule on the stand-ins)", spec, nothing)
        costs = sensitivity.proxy(types)
    # the mix file is its source's header plus the tag, realigned: exact from the uniform
    # file itself; from the bf16 file plus llama-quantize's keys for mix:SIZE
    tag = kv_bytes(MIX_KEY, spec) + ALIGN
    if uniform is not None:
        room = budget_bytes - overhead_bytes(uniform, tensors) - tag
        as_uniform = as_candidates(tensors, uniform_types, types)
    else:
        room = budget_bytes - overhead_bytes(base, tensors) - QUANTIZE_METADATA - tag
    assignment = knapsack(tensors, types, costs, room, uniform=as_uniform)
    result = {"sensitivity": sensitivity.mode, "candidates": types,
              "budget_bytes": budget_bytes,
              "predicted_calib_kld": sensitivity.predicted_kld(assignment),
              "predicted_cost": sensitivity.total(assignment)}
    if as_uniform is not None:
        result["uniform"] = {"file": uniform.name, "size_bytes": uniform.stat().st_size,
                             "predicted_calib_kld": sensitivity.predicted_kld(as_uniform),
                             "predicted_cost": sensitivity.total(as_uniform)}
        if assignment == as_uniform:
            logger.warning("%s: no trade of bytes between tensors is predicted to help; the "
                           "uniform file is the best at its size", spec)
            return {**result, "same_as_uniform": True}
    # what llama-quantize writes: a row width that does not divide a type's blocks falls back
    # (the byte model already priced each choice so); asked for directly, so it is read back
    written = written_types(tensors, assignment)
    fallbacks = {n: f"{assignment[n]} -> {t}" for n, t in written.items() if t != assignment[n]}
    if fallbacks:
        logger.warning("%s: %d tensor(s) take llama.cpp's fallback type (rows that do not "
                       "divide the chosen type's blocks), e.g. %s", spec, len(fallbacks),
                       next(f"{n}: {f}" for n, f in fallbacks.items()))
    counts = {t: sum(v == t for v in written.values()) for t in dict.fromkeys(written.values())}
    ftype = PURE_FTYPE.get(max(counts, key=counts.get), "Q8_0")
    quantize_with(base, out, tensors, assignment, sensitivity.imatrix, threads, ftype=ftype,
                  tag=spec)
    size = out.stat().st_size
    if size > budget_bytes:
        out.unlink()
        raise KvantError(f"{spec}: the file came out at {size:,} bytes, over its budget of "
                         f"{budget_bytes:,}; report this (the byte model missed something)")
    return {**result, "size_bytes": size, "types": counts, "assignment": written,
            "fallbacks": fallbacks}


NOISE_SIGMAS = 2.0
"""A -MIX may be worse than its uniform twin in one language by at most this many standard
errors of the difference of their mean KLDs (the noise of a few thousand held-out tokens)."""


def mix_verdict(mix: dict, uniform: dict) -> str | None:
    """Why a -MIX must not be published in place of its uniform twin, from both files'
    held-out scores (kvant.runtimes.reference.score_against results); None when it may: its
    mean KLD over languages is lower, and in no language is it worse by more than
    NOISE_SIGMAS standard errors."""
    if mix["mean_kld"] >= uniform["mean_kld"]:
        return (f"its held-out mean KLD {mix['mean_kld']:.6f} is not below the uniform "
                f"file's {uniform['mean_kld']:.6f}")
    for lang, m in mix["per_language"].items():
        u = uniform["per_language"][lang]
        noise = NOISE_SIGMAS * math.hypot(m.get("kld_sem", 0.0), u.get("kld_sem", 0.0))
        if m["mean_kld"] - u["mean_kld"] > noise:
            return (f"in {lang} its held-out KLD {m['mean_kld']:.6f} is worse than the uniform "
                    f"file's {u['mean_kld']:.6f} by more than the noise ({noise:.6f}, "
                    f"{NOISE_SIGMAS:g} standard errors)")
    return None


def uniform_frontier(points: list[tuple[int, float]], size: int) -> float | None:
    """The uniform frontier at ``size`` bytes: the lowest KLD that the uniform files
    (``points``: (bytes, held-out mean KLD) each) reach there, interpolated log-linearly in
    KLD between two of them that bracket ``size`` (the lower envelope: a uniform type that
    lies above the line between its neighbours is dominated and sets no bound). None where
    no two points bracket ``size`` (no extrapolation). A twin can be a poor yardstick: where
    llama.cpp's fallbacks make Q5_K_M barely larger than Q4_K_M and far better, a mix that
    merely finds Q5_K_M's quality beats its twin by 4x and the frontier by much less.

    >>> round(uniform_frontier([(93_510_272, 0.1469), (108_977_120, 0.0633),
    ...                         (112_103_552, 0.0148)], 108_970_272), 4)
    0.0218
    """
    best = None
    for (b0, k0), (b1, k1) in itertools.combinations(sorted(points), 2):
        if not b0 <= size <= b1 or k0 <= 0 or k1 <= 0:
            continue
        t = 0.0 if b1 == b0 else (size - b0) / (b1 - b0)
        kld = math.exp((1 - t) * math.log(k0) + t * math.log(k1))
        best = kld if best is None else min(best, kld)
    return best
