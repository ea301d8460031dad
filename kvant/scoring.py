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


def eval_windows(model_dir, texts: dict, n_tokens: int, n_ctx: int) -> dict[str, list]:
    """Per language: the HF tokenizer's ids of its held-out text, cut into scoring windows.

    Paragraphs are encoded one by one (each starts with <s>) and concatenated; the first
    ``n_tokens`` are kept. Every backend scores exactly these ids.
    """
    from pathlib import Path

    from tokenizers import Tokenizer

    from kvant.data import encode_stream, paragraphs

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    out = {}
    for lang, text in texts.items():
        ids = encode_stream(tok, paragraphs(text.read()))
        out[lang] = windows(ids[:n_tokens], n_ctx)
    return out


def hf_logits(model_dir, wins: list[list[int]], dtype: str | None = "float32",
              model=None) -> list[np.ndarray]:
    """Transformers logits for each window: a list of (len(window), vocab) float32 arrays.

    ``dtype`` None keeps the checkpoint's own (quantized checkpoints choose theirs).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if model is None:
        kwargs = {"dtype": getattr(torch, dtype)} if dtype else {"device_map": "cpu"}
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.eval()
    out = []
    with torch.no_grad():
        for win in wins:
            logits = model(torch.tensor([win], device=model.device)).logits[0]
            out.append(logits.float().cpu().numpy())
    return out


def drift_per_language(ref: dict, logits: dict, wins: dict) -> dict:
    """{language: Drift dict} plus the means over languages."""
    per = {lang: drift(ref[lang], logits[lang], wins[lang]).as_dict() for lang in wins}
    n = len(per)
    return {"per_language": per,
            "mean_kld": round(sum(d["mean_kld"] for d in per.values()) / n, 6),
            "top1_agreement_pct": round(sum(d["top1_agreement_pct"] for d in per.values()) / n,
                                        3),
            "delta_ppl_pct": round(sum(d["delta_ppl_pct"] for d in per.values()) / n, 3)}


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


def reference(model_dir, langs, n_tokens: int, n_ctx: int, cache_dir, data_dir=None):
    """(texts, windows, reference logits) per language, for validating an artifact of
    ``model_dir`` against the model itself in float32. Refuses synthetic weights."""
    from pathlib import Path

    from kvant.data import get_text
    from kvant.errors import SettingsError
    from kvant.model import read_config

    if read_config(Path(model_dir)).get("kvant_synthetic"):
        raise SettingsError(f"'{model_dir}' has synthetic (random) weights: perplexity and KL "
                            "divergence would mean nothing; quantize a real checkpoint")

    texts = {lang: get_text(lang, cache_dir, data_dir) for lang in langs}
    wins = eval_windows(model_dir, texts, n_tokens, n_ctx)
    ref = {lang: hf_logits(model_dir, w) for lang, w in wins.items()}
    return texts, wins, ref


def drift_table(validation: dict) -> str:
    """Markdown: one row per language of a drift_per_language result."""
    rows = ["| language | tokens | PPL reference | PPL | ΔPPL | mean KLD | p99 KLD | top-1 |",
            "|---|---|---|---|---|---|---|---|"]
    for lang, d in validation["per_language"].items():
        rows.append(f"| {lang} | {d['tokens']} | {d['ppl_ref']:.2f} | {d['ppl']:.2f} | "
                    f"{d['delta_ppl_pct']:+.2f}% | {d['mean_kld']:.5f} | {d['p99_kld']:.5f} | "
                    f"{d['top1_agreement_pct']:.1f}% |")
    return "\n".join(rows)
