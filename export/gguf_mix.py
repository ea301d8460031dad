"""Per-tensor GGUF types chosen by measured sensitivity: `<type>-mix` and `mix:SIZE`.

llama.cpp's recipes (Q4_K_M, ...) give a few tensors more bits by a hand-written rule. Here
each quantizable tensor (every matrix of every layer, token_embd, output) gets the type that
minimizes the predicted loss under a byte budget:

1. Sensitivity, on the calibration text only: each (tensor, type)'s cost, measured
   (kvant.export.gguf_sensitivity: direct, torch substitution, fisher) or estimated (the
   proxy).
2. Exact bytes: ggml's block and type sizes per tensor and type, with llama.cpp's fallback
   for rows that do not divide (llama-quant.cpp `tensor_type_fallback`).
3. An exact knapsack in bytes (scipy's MILP, HiGHS: one binary per tensor and type) minimizes
   the summed cost. The uniform file's own assignment is always a candidate: a mix never
   predicts worse than its uniform twin, and where no trade helps the uniform is returned.
4. llama-quantize realizes the assignment with one anchored `--tensor-type` override per
   tensor; the written file is read back and every tensor must have its planned type.
5. The verdict: a -MIX worse than its twin on held-out text is withheld (mix_verdict).

Costs are assumed additive over tensors (the usual assumption of mixed-precision search;
the measured KLD of the final file is reported beside the prediction).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvant.errors import KvantError, SettingsError
from kvant.export.gguf_sensitivity import NothingFits, Sensitivity
from kvant.export.gguf_tensors import (
    MIX_KEY,
    PURE_FTYPE,
    Tensor,
    fallback,
    file_types,
    quantize_with,
    tensor_bytes,
    written_types,
)

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
ALIGN = 32  # GGUF's general.alignment default: every tensor's data starts on it
def stored_bytes(tensor: Tensor, type_name: str) -> int:
    """What the tensor takes in the file: its data padded to the next tensor's alignment."""
    return -(-tensor_bytes(tensor, type_name) // ALIGN) * ALIGN


def knapsack(tensors: list[Tensor], types: list, costs: dict, budget: int,
             uniform: dict | None = None,
             size_of: Callable[[Tensor, object], int] = stored_bytes) -> dict:
    """{tensor: type} minimizing the summed cost with the summed stored bytes within
    ``budget``, exactly: a mixed-integer programme (scipy.optimize.milp, HiGHS, no gap),
    one binary per (tensor, type), one type per tensor, one budget row in bytes; the solution
    is checked in integer bytes (and solved again below any excess a solver tolerance let
    through). ``uniform`` (an assignment, e.g. the uniform file's) is returned when nothing
    within the budget is predicted to cost less: the result never predicts worse than it.
    ``size_of(tensor, type)``: its bytes in the file (GGUF's by default; the MLX mix's bits
    per tensor, kvant.export.mlx_mix).

    Why an exact solver: the earlier dynamic programme rounded every option up to 1/8,192 of
    the budget, which at 11.4B is 0.85 MB per tensor and 120-240 MB of budget lost."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # the solver, only when mixing

    n, m = len(tensors), len(types)
    cost = np.array([costs[t.name, ty] for t in tensors for ty in types], dtype=np.float64)
    size = np.array([size_of(t, ty) for t in tensors for ty in types], dtype=np.float64)
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
        over = sum(size_of(t, chosen[t.name]) for t in tensors) - budget
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
        costs = sensitivity.costs_of(types)
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
