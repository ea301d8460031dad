"""The fisher mix sensitivity: a second-order estimate of each (tensor, type)'s KLD.

For a small change d of the weights, the KL divergence of the changed model from the
unchanged one is, to second order, 0.5 d^T F d, with F the Fisher information of the model's
next-token distribution. Kept to its diagonal (HAWQ-V2, SqueezeLLM and their successors),
a tensor quantized to a type costs

    cost(tensor, type) = 0.5 * sum_i F_i (q_i - w_i)^2 / positions

in the same unit as the torch method's measured cost (mean KLD per calibration position
against the checkpoint). q is the tensor as llama.cpp writes it in that type (one --pure
llama-quantize file per type, dequantized by gguf-py, Q/K rows put back in HF's order), w the
checkpoint's. F comes from a few backward passes over the calibration windows: for each
window and draw, next tokens are sampled from the model's own distribution at every
position, and the squared gradient of their summed log-probability is accumulated. With
sampled labels each position's score has mean zero given its context, so the squared
gradient of the window's sum is an unbiased estimate of the summed per-position Fisher
diagonal (labels taken from the text instead, the "empirical Fisher", are biased where the
model is unsure). The noise of one element's estimate averages out over the thousands to
millions of elements a tensor's cost sums.

What it leaves out, against torch: the off-diagonal terms (errors within a row that cancel
or add through correlated inputs) and llama.cpp's rounding of each matmul's input (the
Q8_0 cost of every tensor is the same constant under both, which no knapsack choice sees).
Its cost: draws x windows backward passes and one dequantization per type, against torch's
forward per tensor and type; minutes where torch takes hours. It needs the model, its
gradients and one float32 accumulator per weight in memory at once: at 11.4B that is over
90 GB, so auto passes it over where it does not fit (:func:`memory_need`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

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

logger = logging.getLogger(__name__)

DRAWS = 2
"""Label draws per calibration window: each is one backward pass."""


def memory_need(n_params: int, n_quantized: int, dtype_bytes: int, tokens: int,
                vocab: int, hidden: int, n_layers: int) -> int:
    """Bytes the Fisher pass holds at once: the weights, the gradients of the quantized ones
    (in the weights' dtype) and their float32 accumulator, and a window's activations kept
    for the backward (about 24 hidden-wide float32 values per layer and token, and the
    float32 logits, probabilities and log-probabilities at every position)."""
    return (n_params * dtype_bytes + n_quantized * (dtype_bytes + 4)
            + tokens * (24 * hidden * n_layers + 4 * vocab) * 4)


def available_bytes(device: str) -> int:
    """Free memory where the model runs: the GPU's free memory, or the machine's available
    memory (psutil: what can be had without swapping)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def fisher_diagonal(model, params: dict, wins: list[list[int]], draws: int = DRAWS,
                    seed: int = 0, progress: bool = False) -> tuple[dict, int, float]:
    """{name: summed squared score per element, float32} of ``params`` (name -> Parameter)
    over ``wins``, the positions it sums over (every position but each window's last, as
    the KLD is scored), and the seconds the first window took."""
    import torch

    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    wanted = list(dict.fromkeys(params.values()))  # a tied weight once
    names = {id(p): [n for n, q in params.items() if q is p][0] for p in wanted}
    kept = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in wanted:
        p.requires_grad_(True)
    total = {names[id(p)]: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
             for p in wanted}
    positions, first_s = 0, 0.0
    try:
        for index, window in enumerate(tqdm(wins, desc="mix sensitivity (fisher)",
                                            disable=not progress)):
            started = time.perf_counter()
            logits = model(torch.tensor([window], device=device)).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            probs = logp.detach().exp().cpu()
            for draw in range(draws):
                labels = torch.multinomial(probs, 1, generator=generator).to(device)
                score = logp.gather(1, labels).sum()
                grads = torch.autograd.grad(score, wanted, retain_graph=draw < draws - 1)
                for p, g in zip(wanted, grads, strict=True):
                    total[names[id(p)]].add_(g.float().square())
            positions += len(window) - 1
            if index == 0:
                first_s = time.perf_counter() - started
    finally:
        for p, flag in kept.items():
            p.requires_grad_(flag)
    for value in total.values():
        value.div_(draws)
    return total, positions, first_s


def fisher_costs(model_dir: Path, base: Path, tensors: list[Tensor], types: list[str],
                 imatrix: Path | None, wins: list[list[int]], scratch: Path, threads: int,
                 device: str = "cpu", dtype: str = "float32", progress: bool = False,
                 time_budget_s: float | None = None, draws: int = DRAWS, seed: int = 0
                 ) -> tuple[dict, dict]:
    """{(tensor, type): 0.5 sum F (q - w)^2 / positions} (the module docstring) and the time
    estimate. Passed over (OverTimeBudget, its estimate saying why) where the memory it needs
    is not free, or where the first window's passes, or the first type's quantize and
    dequantization, put the whole over ``time_budget_s``."""
    import torch

    from kvant.runtimes.hf import TorchRuntime  # torch: only for this method

    config = read_config(model_dir)
    n_layers = config["num_hidden_layers"]
    heads = qk_heads(config)
    names = hf_names(model_dir, tensors)
    dtype_bytes = 2 if dtype in ("bfloat16", "float16") else 4
    n_quantized = sum(t.rows * t.ne0 for t in tensors)
    # the checkpoint's parameters are the quantized tensors plus norms: within a percent
    need = memory_need(n_quantized, n_quantized, dtype_bytes,
                       max(len(w) for w in wins), config["vocab_size"],
                       config["hidden_size"], n_layers)
    free = available_bytes(device)
    if need > free:
        raise OverTimeBudget({"evaluations": draws * len(wins), "estimated_s": None,
                              "memory_bytes": need, "available_bytes": free,
                              "budget_s": time_budget_s,
                              "reason": f"needs about {need / 2**30:.1f} GiB, "
                                        f"{free / 2**30:.1f} GiB free"})
    runtime = TorchRuntime(model_dir, device=device, threads=threads, dtype=dtype)
    try:
        params = hf_params(runtime.model)
        wanted = {names[t.name]: params[names[t.name]] for t in tensors}
        started = time.perf_counter()
        fisher, positions, first_s = fisher_diagonal(runtime.model, wanted, wins[:1], draws,
                                                     seed, progress)
        estimate = {"evaluations": draws * len(wins), "first_s": round(first_s, 2),
                    "fisher_s": round(first_s * len(wins), 1), "types": len(types),
                    "budget_s": time_budget_s, "estimated_s": round(first_s * len(wins), 1)}
        if time_budget_s is not None and estimate["estimated_s"] > time_budget_s:
            raise OverTimeBudget(estimate)
        if len(wins) > 1:
            rest, more, _ = fisher_diagonal(runtime.model, wanted, wins[1:], draws,
                                            seed + 1, progress)
            for name, value in rest.items():
                fisher[name].add_(value)
            positions += more
        fisher_s = time.perf_counter() - started
        costs = {}
        for index, type_name in enumerate(tqdm(types, desc="mix costs (fisher)",
                                               disable=not progress)):
            started = time.perf_counter()
            path = pure(base, type_name, scratch / f"pure-{type_name}.gguf", imatrix, threads)
            try:
                layout = tensor_layout(path)
                with path.open("rb") as handle, torch.no_grad():
                    for tensor in tensors:
                        name = names[tensor.name]
                        weights = as_param(read_tensor(handle, layout[tensor.name], tensor),
                                           tensor, heads)
                        delta = torch.from_numpy(weights).to(fisher[name].device) \
                            - params[name].detach().float()
                        costs[tensor.name, type_name] = 0.5 * float(
                            (fisher[name] * delta.square()).sum()) / positions
            finally:
                path.unlink(missing_ok=True)
            if index == 0:
                type_s = time.perf_counter() - started
                estimate.update(fisher_s=round(fisher_s, 1), type_s=round(type_s, 2),
                                estimated_s=round(fisher_s + type_s * len(types), 1))
                logger.info("fisher mix sensitivity: about %s (%d backward passes, %d types)",
                            duration(estimate["estimated_s"]), draws * len(wins), len(types))
                if time_budget_s is not None and estimate["estimated_s"] > time_budget_s:
                    raise OverTimeBudget(estimate)
    finally:
        runtime.close()
    return costs, estimate

