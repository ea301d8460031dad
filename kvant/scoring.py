"""Scoring on given token ids: windows, perplexity, KL divergence, top-1 agreement.

Pure arithmetic on logits that a runtime (kvant.runtimes) produced: every format scores the
same ids in the same windows, so the numbers compare across formats.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kvant.data import TextFile, get_text, paragraphs
from kvant.errors import DataError


def windows(ids: list[int], n_ctx: int, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of ``n_ctx`` tokens (the last, shorter one dropped)."""
    out = [ids[i:i + n_ctx] for i in range(0, len(ids) - n_ctx + 1, n_ctx)]
    return out[:max_windows] if max_windows else out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64. (tokens, vocab) -> (tokens, vocab).

    By hand, not scipy.special.log_softmax (the same values): scipy's holds four
    (tokens, vocab) float64 arrays at its peak where this holds two (1,600 against 800 MiB
    for 1,024 positions of NorMistral's vocabulary, on every scored window), and it took
    0.36 s against 0.26 s (medians of 12); kvant.plan's scoring model counts this one."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def held_out(model_dir: Path, settings, cache_dir: Path, data_dir: Path | None,
             progress: bool = False, langs: tuple[str, ...] | None = None
             ) -> tuple[dict[str, TextFile], dict[str, list[list[int]]]]:
    """What a pipeline scores: per language of ``settings.eval_langs`` (or ``langs``) its
    held-out text, and that text's first ``settings.eval_tokens`` ids in windows of
    ``settings.eval_ctx`` (:func:`eval_windows`)."""
    langs = settings.eval_langs if langs is None else langs
    texts = {lang: get_text(lang, cache_dir, data_dir, progress) for lang in langs}
    return texts, eval_windows(model_dir, texts, settings.eval_tokens, settings.eval_ctx)


def eval_windows(model_dir: Path, texts: dict[str, TextFile], n_tokens: int,
                 n_ctx: int) -> dict[str, list[list[int]]]:
    """Per language: the HF tokenizer's ids of its held-out text, cut into scoring windows.

    Paragraphs are encoded one by one (each starts with <s>) and concatenated; the first
    ``n_tokens`` are kept (:func:`leading_ids`). Every runtime scores exactly these ids.
    """
    return text_windows(model_dir, texts, n_tokens, n_ctx)[0]


def text_windows(model_dir: Path, texts: dict[str, TextFile], n_tokens: int, n_ctx: int
                 ) -> tuple[dict[str, list[list[int]]], dict[str, float]]:
    """:func:`eval_windows`, and each text's UTF-8 bytes per token (the bench's bits per
    byte)."""
    from tokenizers import Tokenizer  # Rust extension; only needed here

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    wins, bytes_per_token = {}, {}
    for lang, text in texts.items():
        ids, n_bytes = leading_ids(tok, text.read(), n_tokens)
        wins[lang] = require_windows(lang, windows(ids[:n_tokens], n_ctx), len(ids), n_ctx)
        bytes_per_token[lang] = n_bytes / len(ids)
    return wins, bytes_per_token


def leading_ids(tokenizer, text: str, n_tokens: int) -> tuple[list[int], int]:
    """The ids of ``text``'s paragraphs, each encoded alone (from <s>) and concatenated,
    until there are ``n_tokens`` (or the text ends), and those paragraphs' UTF-8 bytes (each
    with its separator): every scorer's windows, and the bench's bytes per token."""
    ids, n_bytes = [], 0
    for unit in paragraphs(text):
        ids += tokenizer.encode(unit).ids
        n_bytes += len(unit.encode("utf-8")) + 1
        if len(ids) >= n_tokens:
            break
    return ids, n_bytes


def require_windows(name: str, wins: list[list[int]], n_ids: int, n_ctx: int) -> list:
    """``wins``, or one clear error when a text is too short for a single window."""
    if not wins:
        raise DataError(f"held-out text '{name}' gives {n_ids} tokens, fewer than one "
                        f"{n_ctx}-token scoring window; pass a longer text or a smaller "
                        "window (--eval-ctx / --quality-ctx)")
    return wins


def sequence_nll_bits(logits: np.ndarray, ids: list[int]) -> float:
    """Negative log-likelihood in bits of ``ids[1:]`` given (len(ids), vocab) logits."""
    lp = log_softmax(logits[: len(ids) - 1])
    return float(-lp[np.arange(len(ids) - 1), np.asarray(ids[1:])].sum() / math.log(2))


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
    kld_sem: float = 0.0
    """Standard error of mean_kld over the scored positions (its noise)."""

    def as_dict(self) -> dict:
        return asdict(self)


def kld_per_position(ref: np.ndarray, cur: np.ndarray, rows: int = 1024) -> np.ndarray:
    """KL(ref || cur) of each row of two (positions, vocab) logit arrays, in float64, worked
    through ``rows`` positions at a time (a 2,048-token window at NorMistral's vocabulary
    would otherwise take five 0.8 GB float64 arrays at once)."""
    out = np.empty(len(ref))
    for lo in range(0, len(ref), rows):
        lp_ref, lp = log_softmax(ref[lo:lo + rows]), log_softmax(cur[lo:lo + rows])
        out[lo:lo + rows] = (np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1)
    return out


def mean_kld(runtime, reference: list[np.ndarray], wins: list[list[int]]) -> float:
    """Mean KLD over every position of ``wins`` but each window's last, of ``runtime``'s
    logits (any kvant.runtimes runtime) against ``reference``'s, unrounded (a tensor's share
    of a mix's KLD is often below the reports' six decimals)."""
    return float(np.concatenate([kld_per_position(r[:-1], runtime.logits(w)[:-1])
                                 for r, w in zip(reference, wins, strict=True)]).mean())


def position_scores(ref: np.ndarray, cur: np.ndarray, ids: list[int], rows: int = 1024
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per predicted position (t predicts ids[t+1]): KL(ref || cur), the reference's and the
    model's negative log-likelihood. Worked through ``rows`` positions at a time, so that a
    32,768-token document at NorMistral's 51,200-entry vocabulary needs a few hundred MB of
    float64 rather than 13 GB."""
    n = len(ids) - 1
    kld, nll_ref, nll = np.empty(n), np.empty(n), np.empty(n)
    targets = np.asarray(ids[1:])
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        lp_ref, lp = log_softmax(ref[lo:hi]), log_softmax(cur[lo:hi])
        kld[lo:hi] = (np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1)
        picked = np.arange(hi - lo), targets[lo:hi]
        nll_ref[lo:hi], nll[lo:hi] = -lp_ref[picked], -lp[picked]
    return kld, nll_ref, nll


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
                 top1_agreement_pct=round(100 * agree / n, 3),
                 kld_sem=round(float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0, 8))


def drift_per_language(ref, logits: dict, wins: dict) -> dict:
    """{language: Drift dict} plus the means over languages."""
    return mean_over_languages({lang: drift(ref[lang], logits[lang], wins[lang]).as_dict()
                                for lang in wins})


def mean_over_languages(per: dict) -> dict:
    """{"per_language": per} plus the means of mean KLD, top-1 agreement and ΔPPL."""
    n = len(per)
    return {"per_language": per,
            "mean_kld": round(sum(d["mean_kld"] for d in per.values()) / n, 6),
            "top1_agreement_pct": round(sum(d["top1_agreement_pct"] for d in per.values()) / n,
                                        3),
            "delta_ppl_pct": round(sum(d["delta_ppl_pct"] for d in per.values()) / n, 3)}


def drift_table(validation: dict) -> str:
    """Markdown: one row per language of a drift_per_language result."""
    rows = ["| language | tokens | PPL reference | PPL | ΔPPL | mean KLD | p99 KLD | top-1 |",
            "|---|---|---|---|---|---|---|---|"]
    for lang, d in validation["per_language"].items():
        rows.append(f"| {lang} | {d['tokens']} | {d['ppl_ref']:.2f} | {d['ppl']:.2f} | "
                    f"{d['delta_ppl_pct']:+.2f}% | {d['mean_kld']:.5f} | {d['p99_kld']:.5f} | "
                    f"{d['top1_agreement_pct']:.1f}% |")
    return "\n".join(rows)
