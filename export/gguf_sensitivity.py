"""Each (tensor, type)'s cost for a -MIX, measured once per export (:class:`Sensitivity`).

``direct`` (small models): for each tensor and candidate type, llama-quantize a file where
only that tensor has that type and every other tensor Q8_0 (`--pure` plus one `--tensor-type`
override), and measure its mean KLD against the bf16 reference on calibration windows; the
tensor's cost is that minus the all-Q8_0 file's. ``torch`` (kvant.export.gguf_substitution:
11.4B on a GPU): the same cost with the tensor swapped into the transformers model. ``fisher``
(kvant.export.gguf_fisher): a second-order estimate of that cost from a few backward passes.
``proxy`` (asked for, or mix:SIZE where nothing measured fits): no model run; each tensor of
a `--pure` file of each candidate type is dequantized (gguf-py) and compared with the bf16
tensor, weighted per input column by the importance matrix (mean squared activation; the
output tensor's from llama-imatrix --process-output), token_embd per row by the calibration
tokens' frequencies. Each method's rank correlation with the direct measurement is reported
on both stand-ins (docs/formats.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kvant.export.gguf_fisher import fisher_costs
from kvant.export.gguf_substitution import substitution_costs
from kvant.export.gguf_tensors import (
    ROWS,
    OverTimeBudget,
    Tensor,
    duration,
    pure,
    quantizable,
    quantize_with,
    read_imatrix,
    read_rows,
    tensor_layout,
)
from kvant.runtimes.llamacpp import LlamaCppRuntime
from kvant.scoring import mean_kld

logger = logging.getLogger(__name__)

BASELINE = "q8_0"
"""direct's reference file: every tensor in this type, one at a time in another."""


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
        path = scratch / "probe.gguf"
        try:
            quantize_with(base, path, tensors, assignment, imatrix, threads)
            runtime = LlamaCppRuntime(path, threads=threads, n_ctx=n_ctx)
            try:
                return mean_kld(runtime, reference, wins)
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

    def costs_of(self, types: list[str]) -> dict:
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


