"""The MLX mix: bits per tensor, chosen by the GGUF mix's own sensitivity and knapsack.

One sensitivity method serves both formats: the diagonal Fisher of the transformers model
over calibration windows (kvant.export.gguf_fisher.fisher_diagonal), times each candidate's
error, summed per tensor:

    cost(tensor, bits) = 0.5 * sum_i F_i (q_i - w_i)^2 / positions

where q is the tensor as mlx-lm writes it at those bits (MLX's own `mx.quantize` of the
weight in the export's dtype, dequantized by `mx.dequantize`, scales and biases in float32),
and w the checkpoint's. The exact knapsack (kvant.export.gguf_mix.knapsack) then picks one
width per tensor within the uniform file's bytes, with MLX's bytes per tensor: `bits` per
weight plus a scale and a bias (2 bytes each) per group. mlx-lm stores the choice per module
in config.json (`quantization`), which `mlx_lm.load` reads back.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from kvant.export.gguf_fisher import DRAWS, fisher_diagonal
from kvant.export.gguf_mix import knapsack
from kvant.export.gguf_tensors import Tensor
from kvant.model import read_safetensors_header, weight_files

logger = logging.getLogger(__name__)

CANDIDATE_BITS = (3, 4, 5, 6, 8)
# Bytes kept back from the budget for the safetensors header, whose JSON grows with the
# digits of the mix's packed shapes (16 bytes on the stand-in): the file stays no larger
HEADER_SLACK = 4096


def quantizable(model_dir: Path, group_size: int) -> list[Tensor]:
    """The weights mlx-lm quantizes, as Tensor(module path, row length, rows): every 2-D
    Linear or Embedding weight whose rows divide into groups (it leaves the others)."""
    found = []
    for file in weight_files(model_dir):
        for name, spec in read_safetensors_header(file).items():
            shape = spec["shape"]
            if (name.endswith(".weight") and len(shape) == 2 and "norm" not in name
                    and shape[1] % group_size == 0):
                found.append(Tensor(name.removesuffix(".weight"), shape[1], shape[0]))
    return sorted(found, key=lambda t: t.name)


def mlx_bytes(tensor: Tensor, bits: int, group_size: int) -> int:
    """What mlx-lm stores for ``tensor`` at ``bits``: the packed weights (in uint32 words)
    and a 16-bit scale and bias per group."""
    words = -(-tensor.ne0 * bits // 32)
    return tensor.rows * (4 * words + 4 * (tensor.ne0 // group_size))


def fisher_bits_costs(model_dir: Path, tensors: list[Tensor], bits: tuple[int, ...],
                      group_size: int, dtype: str, wins: list[list[int]], device: str = "cpu",
                      draws: int = DRAWS, progress: bool = False) -> tuple[dict, dict]:
    """{(module path, bits): estimated KLD} and what the estimate took."""
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.eval()
    params = dict(model.named_parameters())
    wanted = {t.name: params[f"{t.name}.weight"] for t in tensors}
    fisher, positions, _ = fisher_diagonal(model, wanted, wins, draws, progress=progress)
    fisher_s = time.perf_counter() - started
    costs = {}
    store = getattr(mx, dtype)
    for tensor in tensors:
        weight = wanted[tensor.name].detach().float().cpu().numpy()
        stored = mx.array(weight).astype(store)
        weight_f = fisher[tensor.name].cpu().numpy()
        for b in bits:
            packed, scales, biases = mx.quantize(stored, group_size=group_size, bits=b)
            back = mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32),
                                 group_size=group_size, bits=b)
            delta = np.array(back) - weight
            costs[tensor.name, b] = float(0.5 * (weight_f * delta * delta).sum() / positions)
    del model, fisher
    facts = {"method": "fisher", "draws": draws, "positions": positions,
             "fisher_s": round(fisher_s, 1),
             "costs_s": round(time.perf_counter() - started - fisher_s, 1)}
    return costs, facts


def choose_bits(tensors: list[Tensor], costs: dict, bits: int, group_size: int) -> dict:
    """{module path: bits} of least summed cost within the uniform ``bits`` file's bytes
    (less HEADER_SLACK), or the uniform assignment where nothing cheaper fits."""
    budget = sum(mlx_bytes(t, bits, group_size) for t in tensors) - HEADER_SLACK
    return knapsack(tensors, list(CANDIDATE_BITS), costs, budget,
                    uniform={t.name: bits for t in tensors},
                    size_of=lambda t, b: mlx_bytes(t, b, group_size))
