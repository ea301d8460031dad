"""Scoring on given token ids: logits, perplexity, KL divergence, top-1 agreement.

Pipelines validate their own output with these (quantize/ and export/ never import bench/):
every backend scores the same ids in the same windows, so numbers compare across formats.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def windows(ids: list[int], n_ctx: int, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of ``n_ctx`` tokens (the last, shorter one dropped)."""
    out = [ids[i:i + n_ctx] for i in range(0, len(ids) - n_ctx + 1, n_ctx)]
    return out[:max_windows] if max_windows else out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64. (tokens, vocab) -> (tokens, vocab)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def hf_logits(model_dir, wins: list[list[int]], dtype: str = "float32") -> list[np.ndarray]:
    """Transformers logits for each window: a list of (len(window), vocab) float32 arrays."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()
    out = []
    with torch.no_grad():
        for win in wins:
            logits = model(torch.tensor([win])).logits[0]
            out.append(logits.float().numpy())
    return out


@dataclass(frozen=True)
class Drift:
    """How far one model's predictions are from a reference's, on the same token ids."""

    tokens: int
    ppl_ref: float
    ppl: float
    delta_ppl_pct: float
    mean_kld: float
    p99_kld: float
    top1_agreement_pct: float

    def as_dict(self) -> dict:
        return asdict(self)


def drift(ref_logits: list[np.ndarray], logits: list[np.ndarray],
          wins: list[list[int]]) -> Drift:
    """KL(ref || model) per predicted position, perplexities and top-1 agreement.

    Position t of a window predicts token t+1, so each window scores len(window) - 1 tokens.
    """
    klds, nll_ref, nll, agree = [], 0.0, 0.0, 0
    for ref, cur, win in zip(ref_logits, logits, wins, strict=True):
        lp_ref = log_softmax(ref[:-1])
        lp = log_softmax(cur[:-1])
        targets = np.asarray(win[1:])
        rows = np.arange(len(targets))
        nll_ref -= lp_ref[rows, targets].sum()
        nll -= lp[rows, targets].sum()
        klds.append((np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1))
        agree += int((ref[:-1].argmax(-1) == cur[:-1].argmax(-1)).sum())
    kld = np.concatenate(klds)
    n = len(kld)
    ppl_ref, ppl = math.exp(nll_ref / n), math.exp(nll / n)
    return Drift(tokens=n, ppl_ref=round(ppl_ref, 4), ppl=round(ppl, 4),
                 delta_ppl_pct=round(100 * (ppl / ppl_ref - 1), 3),
                 mean_kld=round(float(kld.mean()), 6),
                 p99_kld=round(float(np.percentile(kld, 99)), 6),
                 top1_agreement_pct=round(100 * agree / n, 3))


def llama_logits(gguf_path, wins: list[list[int]], n_threads: int = 0) -> list[np.ndarray]:
    """llama.cpp logits for each window (fresh KV cache per window), via llama-cpp-python."""
    import os

    import llama_cpp

    n_ctx = max(len(w) for w in wins)
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                          n_threads=n_threads or os.cpu_count(), verbose=False)
    try:
        out = []
        for win in wins:
            llm.reset()
            llm.eval(win)
            out.append(np.array(llm.scores[:len(win)], dtype=np.float32))
        return out
    finally:
        llm.close()


def sequence_nll_bits(gguf_path, sequences: list[list[int]], n_threads: int = 0) -> float:
    """Total negative log-likelihood in bits of each sequence after its first token."""
    import os

    import llama_cpp

    n_ctx = max(len(s) for s in sequences)
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                          n_threads=n_threads or os.cpu_count(), verbose=False)
    try:
        total = 0.0
        for seq in sequences:
            llm.reset()
            llm.eval(seq)
            lp = log_softmax(np.array(llm.scores[:len(seq) - 1]))
            total -= lp[np.arange(len(seq) - 1), np.asarray(seq[1:])].sum()
        return total / math.log(2)
    finally:
        llm.close()
