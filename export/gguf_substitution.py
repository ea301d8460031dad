"""The torch sensitivity: each (tensor, type)'s calibration KLD with the one tensor, as
llama.cpp writes it, dequantized into the transformers model (:func:`substitution_costs`).

Its input is rounded as llama.cpp's matmul rounds it for that type (INPUT_ROUNDING), one
forward per tensor and type and no llama-quantize each, the layers before the tensor's own
replayed from one forward of the unmodified model: the method that fits at 11.4B on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kvant.export.gguf_tensors import (
    OverTimeBudget,
    Tensor,
    as_param,
    duration,
    hf_names,
    hf_params,
    pure,
    qk_heads,
    read_tensor,
    tensor_layout,
)
from kvant.model import read_config
from kvant.scoring import mean_kld

logger = logging.getLogger(__name__)


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
            return mean_kld(runtime, reference, wins)
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


