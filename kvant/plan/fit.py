"""The overheads fitted to `kvant bench` results, and the prediction checked against them."""

from __future__ import annotations

import json
from pathlib import Path

from kvant.plan.kinds import Kind, kind
from kvant.plan.peaks import DEFAULT_OVERHEAD, peak_bytes
from kvant.plan.sizes import MIB
from kvant.synth import Shape


def entry_kind(entry: dict, shape: Shape) -> Kind | None:
    """The Kind of a bench results entry, from the kind its artifact's manifest records."""
    if not entry.get("kind"):
        return None
    return kind(entry["kind"], file_bpw=8 * entry["size_bytes"] / shape.n_params())


def fit_overhead(results: dict, shape: Shape) -> tuple[dict, set[tuple[str, str]]]:
    """Each runtime stack's base overhead from bench results, and the measurements used.

    Per stack, one measurement calibrates: the smallest-context run of its smallest target,
    (peak RSS - weights - KV cache - logits). Every other measurement is held out for checking
    the prediction, other context lengths of the same target included.
    """
    calibration: dict[str, tuple[str, dict, Kind]] = {}
    for name, entry in sorted(results["targets"].items(), key=lambda kv: kv[1]["size_bytes"]):
        k = entry_kind(entry, shape)
        if k is not None and any("error" not in s for s in entry.get("speed", {}).values()):
            calibration.setdefault(k.stack, (name, entry, k))
    fitted, used = {}, set()
    for stack, (name, entry, k) in calibration.items():
        ctx, s = min(((int(c), s) for c, s in entry["speed"].items() if "error" not in s),
                     key=lambda cs: cs[0])
        base = peak_bytes(shape, k, ctx, entry["size_bytes"], {stack: (0.0, DEFAULT_OVERHEAD[
            stack][1])}, kv_type=s.get("kv_type"))
        fitted[stack] = ((s["peak_rss_mib"] * MIB - base) / MIB, DEFAULT_OVERHEAD[stack][1])
        used.add((name, str(ctx)))
    return fitted, used


def prediction_errors(results: dict, shape: Shape, fitted: dict,
                      skip: set[tuple[str, str]] = frozenset()) -> list[dict]:
    """Predicted versus measured peak for every held-out bench measurement of a known kind."""
    rows = []
    for name, entry in results["targets"].items():
        k = entry_kind(entry, shape)
        for ctx, s in entry.get("speed", {}).items():
            if k is None or "error" in s or (name, ctx) in skip:
                continue
            measured = s["peak_rss_mib"] * MIB
            predicted = peak_bytes(shape, k, int(ctx), entry["size_bytes"], fitted,
                                   kv_type=s.get("kv_type"))
            rows.append({"target": name, "ctx": int(ctx), "measured_mib": round(measured / MIB),
                         "predicted_mib": round(predicted / MIB),
                         "error_pct": round(100 * (predicted / measured - 1), 2)})
    return rows


def load_results(path: Path | None) -> dict | None:
    return json.loads(Path(path).read_text()) if path else None
