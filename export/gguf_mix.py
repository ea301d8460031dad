"""Per-tensor GGUF types chosen by measured sensitivity: `<type>-mix` and `mix:SIZE`.

llama.cpp's recipes (Q4_K_M, ...) give a few tensors more bits by a hand-written rule. Here
each quantizable tensor (every matrix of every layer, token_embd, output) gets the type that
minimizes the predicted loss under a byte budget:

1. Sensitivity, on the calibration text only. ``direct`` (small models): for each tensor and
   candidate type, llama-quantize a file where only that tensor has that type and every
   other tensor Q8_0 (`--pure` plus one `--tensor-type` override), and measure its mean KLD
   against the bf16 reference on calibration windows; the tensor's cost is that minus the
   all-Q8_0 file's. ``proxy`` (11.4B, where that costs too much): no model run; each tensor
   of a `--pure` file of each candidate type is dequantized (gguf-py) and compared with the
   bf16 tensor, weighted per input column by the importance matrix (mean squared
   activation), relative to the tensor's own weighted energy. Its rank correlation with the
   direct measurement is reported on the stand-in.
2. Exact bytes: ggml's block and type sizes per tensor and type, with llama.cpp's fallback
   for rows that do not divide (llama-quant.cpp `tensor_type_fallback`).
3. A knapsack (dynamic programming over the budget in 8,192 steps, bytes rounded up, so the
   result never exceeds it) minimizes the summed cost.
4. llama-quantize realizes the assignment with one anchored `--tensor-type` override per
   tensor; the written file is read back and every tensor must have its planned type.

Costs are assumed additive over tensors (the usual assumption of mixed-precision search;
the measured KLD of the final file is reported beside the prediction).
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm.auto import tqdm

from kvant.errors import KvantError, SettingsError
from kvant.export.gguf_quantize import quantize
from kvant.runtimes.llamacpp import LlamaCppRuntime
from kvant.scoring import kld_per_position

logger = logging.getLogger(__name__)

# What a mix may choose from, per uniform type it replaces: the type itself and its
# neighbours (every type the uniform recipe itself uses is added from its file).
NEIGHBOURS = {
    "q4_k_m": ("q3_k", "q4_k", "q5_k", "q6_k", "q8_0"),
    "q3_k_m": ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k"),
    "iq4_xs": ("q3_k", "iq4_xs", "q4_k", "q5_k", "q6_k", "q8_0"),
}
ALL_CANDIDATES = ("q2_k", "q3_k", "iq4_xs", "q4_k", "q5_k", "q6_k", "q8_0")
# llama-quantize's file types whose --pure default is the tensor type (tools/quantize)
PURE_FTYPE = {"q2_k": "Q2_K", "q3_k": "Q3_K_M", "q4_k": "Q4_K_M", "q5_k": "Q5_K_M",
              "q6_k": "Q6_K", "q8_0": "Q8_0", "iq4_xs": "IQ4_XS", "q5_0": "Q5_0",
              "q4_0": "Q4_0", "q5_1": "Q5_1", "iq4_nl": "IQ4_NL"}
BASELINE = "q8_0"
_ROWS = 256  # rows dequantized at once by the proxy (ffn_down at 11.4B: 88 MiB)
DP_STEPS = 8192
MIX_KEY = "kvant.mix"  # written into a mix file: what it is, for kvant.runtimes.gguf_kind
SLACK = 16 * 1024  # bytes kept free of the budget: metadata and alignment padding
@dataclass(frozen=True)
class Tensor:
    """A quantizable tensor: its GGUF name, row length (ne0) and row count."""

    name: str
    ne0: int
    rows: int


def ggml(type_name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[type_name.upper()]


# llama-quant.cpp `tensor_type_fallback`: the type written instead when a row of ne0 values
# does not split into the target's blocks (256 for K and most IQ types, 32 for the rest).
_FALLBACK = {**dict.fromkeys(("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs",
                              "iq3_s", "iq4_xs"), "iq4_nl"),
             **dict.fromkeys(("q2_k", "q3_k", "tq1_0", "tq2_0"), "q4_0"),
             "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def fallback(type_name: str, ne0: int) -> str:
    """The type llama.cpp actually writes for ``type_name`` on rows of ``ne0`` values: the
    type itself where the rows divide into its blocks, else its fallback, else f16 (as
    llama-quant.cpp's `tensor_type_fallback`).

    >>> fallback("q3_k", 576), fallback("q6_k", 576), fallback("q4_k", 100)
    ('q4_0', 'q8_0', 'f16')
    """
    block = gguf.GGML_QUANT_SIZES[ggml(type_name)][0]
    if ne0 % block == 0:
        return type_name
    to = _FALLBACK.get(type_name)
    if to is None:
        if block > 32:  # llama.cpp throws "no tensor type fallback is defined"
            raise KvantError(f"llama.cpp has no fallback for {type_name} on rows of {ne0}")
        to = type_name
    return "f16" if ne0 % gguf.GGML_QUANT_SIZES[ggml(to)][0] else to


def tensor_bytes(tensor: Tensor, type_name: str) -> int:
    block, size = gguf.GGML_QUANT_SIZES[ggml(fallback(type_name, tensor.ne0))]
    return tensor.rows * (tensor.ne0 // block) * size


def quantizable(path: Path) -> list[Tensor]:
    """The tensors llama-quantize quantizes: 2-D weights other than norms."""
    found = []
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) == 2 and t.name.endswith("weight") and "_norm" not in t.name:
            found.append(Tensor(t.name, int(t.shape[0]), int(t.shape[1])))
    return found


def file_types(path: Path) -> dict[str, str]:
    """{tensor name: ggml type name, lower case} of a GGUF file."""
    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(path)).tensors}


def written_types(tensors: list[Tensor], assignment: dict[str, str]) -> dict[str, str]:
    """What llama-quantize writes for ``assignment``: each tensor's type, or llama.cpp's
    fallback where its rows do not divide the type's blocks (:func:`fallback`)."""
    widths = {t.name: t.ne0 for t in tensors}
    return {n: fallback(t, widths[n]) for n, t in assignment.items()}


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
    finally:
        overrides.unlink(missing_ok=True)
    written = file_types(out)
    wrong = {n: (t, written.get(n)) for n, t in planned.items() if written.get(n) != t}
    if wrong:
        name, (want, got) = next(iter(wrong.items()))
        raise KvantError(f"llama-quantize wrote {len(wrong)} tensor(s) with another type than "
                         f"planned ({name}: {got}, planned {want}); the mix file is not kept")
    return planned


def pure(base: Path, type_name: str, out: Path, imatrix: Path | None, threads: int) -> Path:
    """Every quantizable tensor in ``type_name`` (llama-quantize --pure)."""
    quantize(base, out, PURE_FTYPE[type_name], imatrix, threads, ("--pure",))
    return out


def read_imatrix(path: Path | None) -> dict[str, np.ndarray]:
    """{tensor name: mean squared activation per input column} from a GGUF imatrix."""
    if path is None:
        return {}
    tensors = {t.name: np.asarray(t.data, dtype=np.float64).ravel()
               for t in gguf.GGUFReader(str(path)).tensors}
    out = {}
    for name, values in tensors.items():
        if name.endswith(".in_sum2"):
            stem = name.removesuffix(".in_sum2")
            count = tensors.get(stem + ".counts")
            out[stem] = values / max(float(count[0]) if count is not None else 1.0, 1.0)
    return out


def _layout(path: Path) -> dict[str, tuple[int, int, gguf.GGMLQuantizationType]]:
    """{tensor: (absolute data offset, bytes per row, type)} of a GGUF file."""
    return {t.name: (int(t.data_offset), int(t.n_bytes) // int(t.shape[-1]), t.tensor_type)
            for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2}


def _rows(handle, layout: tuple, r0: int, r1: int) -> np.ndarray:
    """Rows r0..r1 of a tensor as float32, read with plain file reads: a memory map would
    keep every page it touched in the process's RSS (the whole 23 GB file at 11.4B)."""
    offset, row_bytes, ttype = layout
    handle.seek(offset + r0 * row_bytes)
    raw = np.frombuffer(handle.read((r1 - r0) * row_bytes), dtype=np.uint8)
    return gguf.quants.dequantize(raw.reshape(r1 - r0, row_bytes), ttype)


def proxy_costs(base: Path, tensors: list[Tensor], types: list[str], imatrix: Path | None,
                scratch: Path, threads: int, progress: bool = False) -> dict:
    """{(tensor, type): importance-weighted squared quantization error}, no model run.

    sum over rows i and input columns j of a_j (w_ij - q_ij)^2, with a_j the importance
    matrix's mean squared activation of column j: the expected squared error of the tensor's
    output. Tensors without an importance-matrix entry (token_embd, output) weigh columns
    equally. One --pure file per type, read back a block of rows at a time (bounded memory
    at any width).
    """
    weights = read_imatrix(imatrix)
    base_layout = _layout(base)
    costs = {}
    for type_name in tqdm(types, desc="mix proxy", disable=not progress):
        path = pure(base, type_name, scratch / f"pure-{type_name}.gguf", imatrix, threads)
        try:
            layout = _layout(path)
            with base.open("rb") as src, path.open("rb") as got:
                for tensor in tensors:
                    a = weights.get(tensor.name, np.ones(tensor.ne0))
                    total = 0.0
                    for r0 in range(0, tensor.rows, _ROWS):
                        r1 = min(r0 + _ROWS, tensor.rows)
                        w = _rows(src, base_layout[tensor.name], r0, r1)
                        q = _rows(got, layout[tensor.name], r0, r1)
                        total += float((((w - q).astype(np.float64) ** 2) @ a).sum())
                    costs[tensor.name, type_name] = total
        finally:
            path.unlink(missing_ok=True)
    return costs


def direct_costs(base: Path, tensors: list[Tensor], types: list[str], imatrix: Path | None,
                 ref, wins: list[list[int]], scratch: Path, threads: int,
                 progress: bool = False) -> tuple[dict, float]:
    """{(tensor, type): mean KLD on ``wins`` with only that tensor in that type, minus the
    all-Q8_0 file's}, and that baseline KLD."""
    reference = ref["calib"]
    n_ctx = max(len(w) for w in wins) + 8

    def kld(assignment: dict[str, str]) -> float:
        # unrounded: a tensor's share of the KLD is often below the reports' 6 decimals
        path = scratch / "probe.gguf"
        quantize_with(base, path, tensors, assignment, imatrix, threads)
        runtime = LlamaCppRuntime(path, threads=threads, n_ctx=n_ctx)
        try:
            return float(np.concatenate([
                kld_per_position(r[:-1], runtime.logits(w)[:-1])
                for r, w in zip(reference, wins, strict=True)]).mean())
        finally:
            runtime.close()
            path.unlink(missing_ok=True)

    everything = {t.name: BASELINE for t in tensors}
    baseline = kld(everything)
    costs = {}
    pairs = [(t, ty) for t in tensors for ty in types]
    for tensor, type_name in tqdm(pairs, desc="mix sensitivity", disable=not progress):
        if type_name == BASELINE:
            costs[tensor.name, type_name] = 0.0
            continue
        costs[tensor.name, type_name] = kld({**everything, tensor.name: type_name}) - baseline
    return costs, baseline


def knapsack(tensors: list[Tensor], types: list[str], costs: dict, budget: int) -> dict:
    """{tensor: type} minimizing the summed cost with the summed bytes within ``budget``.

    Dynamic programming over the budget cut into DP_STEPS units, each option's bytes rounded
    up to whole units, so any solution found fits the real budget."""
    unit = max(budget / DP_STEPS, 1.0)
    steps = int(budget // unit)
    inf = np.inf
    best = np.full(steps + 1, inf)
    best[0] = 0.0
    choice = np.zeros((len(tensors), steps + 1), dtype=np.int16)
    for i, tensor in enumerate(tensors):
        new = np.full(steps + 1, inf)
        for k, type_name in enumerate(types):
            size = int(np.ceil(tensor_bytes(tensor, type_name) / unit))
            if size > steps:
                continue
            candidate = np.full(steps + 1, inf)
            candidate[size:] = best[:steps + 1 - size] + costs[tensor.name, type_name]
            better = candidate < new
            new[better] = candidate[better]
            choice[i, better] = k
        best = new
    if not np.isfinite(best).any():
        cheapest = sum(min(tensor_bytes(t, ty) for ty in types) for t in tensors)
        raise SettingsError(f"a mix budget of {budget / 2**20:.1f} MiB for the quantized "
                            f"tensors is below the smallest mix ({cheapest / 2**20:.1f} MiB); "
                            "give a larger size")
    at = int(np.argmin(best))
    assignment = {}
    for i in range(len(tensors) - 1, -1, -1):
        type_name = types[choice[i, at]]
        assignment[tensors[i].name] = type_name
        at -= int(np.ceil(tensor_bytes(tensors[i], type_name) / unit))
    return {t.name: assignment[t.name] for t in tensors}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(values):
        order = np.argsort(values, kind="mergesort")
        r = np.empty(len(values))
        r[order] = np.arange(len(values))
        values = np.asarray(values)
        for v in np.unique(values):  # ties share their mean rank
            r[values == v] = r[values == v].mean()
        return r
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


class Sensitivity:
    """Per (tensor, type) costs of one export, measured once for every mix it makes."""

    def __init__(self, mode: str, base: Path, imatrix: Path | None, scratch: Path,
                 threads: int, ref=None, wins: list[list[int]] | None = None,
                 progress: bool = False):
        self.mode, self.base, self.imatrix, self.scratch = mode, base, imatrix, scratch
        self.threads, self.ref, self.wins, self.progress = threads, ref, wins, progress
        self.tensors = quantizable(base)
        self.costs: dict = {}
        self.baseline: float | None = None

    def of(self, types: list[str]) -> dict:
        missing = [t for t in types if (self.tensors[0].name, t) not in self.costs]
        if missing and self.mode == "direct":
            costs, self.baseline = direct_costs(self.base, self.tensors, missing, self.imatrix,
                                                self.ref, self.wins, self.scratch,
                                                self.threads, self.progress)
            self.costs.update(costs)
        elif missing:
            self.costs.update(proxy_costs(self.base, self.tensors, missing, self.imatrix,
                                          self.scratch, self.threads, self.progress))
        return self.costs

    def predicted_kld(self, assignment: dict[str, str]) -> float | None:
        """Calibration KLD the direct costs predict for ``assignment`` (None for proxy)."""
        if self.mode != "direct":
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
                "costs": table}


def overhead_bytes(base: Path, tensors: list[Tensor]) -> int:
    """What a file holds besides its quantizable tensors: metadata, norms (kept f32), tensor
    alignment; from the bf16 file, whose metadata the quantized files copy."""
    quantizable_names = {t.name for t in tensors}
    reader = gguf.GGUFReader(str(base))
    data_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name in quantizable_names)
    return base.stat().st_size - data_bytes


def make_mix(spec: str, base: Path, out: Path, sensitivity: Sensitivity,
             uniform: Path | None, budget_bytes: int | None, threads: int) -> dict:
    """Choose, write and check one mix file; return what goes into the manifest.

    ``uniform``: the uniform file of ``<type>-mix`` (its size is the budget, and every type
    it uses is a candidate); ``budget_bytes``: the file size of ``mix:SIZE``.
    """
    tensors = sensitivity.tensors
    types = list(ALL_CANDIDATES)
    uniform_types = {}
    if uniform is not None:
        names = {x.name for x in tensors}
        uniform_types = {n: t for n, t in file_types(uniform).items() if n in names}
        base_type = spec.removesuffix("-mix")
        types = [t for t in ALL_CANDIDATES if t in NEIGHBOURS.get(base_type, ALL_CANDIDATES)
                 or t in uniform_types.values()]
        budget_bytes = uniform.stat().st_size
    if sensitivity.imatrix is None:
        types = [t for t in types if not t.startswith("iq")]
    costs = sensitivity.of(types)
    room = budget_bytes - overhead_bytes(base, tensors) - SLACK
    assignment = knapsack(tensors, types, costs, room)
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
    result = {"sensitivity": sensitivity.mode, "candidates": types,
              "budget_bytes": budget_bytes, "size_bytes": size,
              "types": counts, "assignment": written, "fallbacks": fallbacks,
              "predicted_calib_kld": sensitivity.predicted_kld(assignment),
              "predicted_cost": sensitivity.total(assignment)}
    if uniform is not None and all((n, t) in costs for n, t in uniform_types.items()):
        result["uniform"] = {"file": uniform.name, "size_bytes": uniform.stat().st_size,
                             "predicted_calib_kld": sensitivity.predicted_kld(uniform_types),
                             "predicted_cost": sensitivity.total(uniform_types)}
    return result
