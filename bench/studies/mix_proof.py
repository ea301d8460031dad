"""Mixed precision, the proof: each uniform type against its -MIX by each sensitivity method.

    python -m kvant.bench.studies.mix_proof --model DIR --out DIR [--eval-tokens 2048]
        [--methods direct,torch,proxy] [--types q3_k_m,iq4_xs,q4_k_m,q5_k_m]
        [--repeat-calib TEXT]

One `kvant export gguf` per method (the pipeline itself: the uniform files and the -MIX of
each, the same importance matrix, made once and reused by the next methods), each file scored
on the five languages' held-out text against the bf16 model. A -MIX the pipeline withheld
(not better than its twin on held-out text) is reported with its scores and the reason. Also
the rank correlation of each method's costs with direct's (all pairs, and within each type:
the trades the knapsack makes). Writes results.json, table.json and agreement.json
(docs/results/) and the tables in markdown. Run it alone on the machine: the times are in
the results.

``--repeat-calib TEXT`` measures how far a ranking can be trusted at all: direct and torch run
again with their sensitivity windows cut from a second calibration text (the same importance
matrix), and each method's costs on the two texts are rank-correlated with themselves. Where
direct against itself ranks a type's tensors at 0.6, no method can rank them at 0.8 against
it: the agreement asked of another method is bounded by direct's own repeatability.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from kvant.artifact import read_manifest
from kvant.bench.tables import command_line, markdown, table_doc, write_table
from kvant.export import gguf_pipeline
from kvant.export.gguf import GGUFSettings
from kvant.paths import cache_dir

LANGS = ("nob", "nno", "sme", "dan", "swe")


def _files(folder: Path) -> dict:
    """{type: held-out scores and size}, withheld mixes included (with their reason)."""
    validation = read_manifest(folder)["validation"]
    files = dict(validation["files"])
    for spec, withheld in validation.get("withheld_mixes", {}).items():
        if "held_out" in withheld:
            files[spec] = {**withheld["held_out"], "withheld": withheld["reason"]}
        else:  # same_as_uniform: no file was written
            files[spec] = {"withheld": withheld["reason"], "same_as_uniform": True}
    return files


def relative(costs: dict) -> dict:
    """Each tensor's costs less its own cost at Q8_0. Direct measures a tensor against the
    all-Q8_0 file, torch against the bf16 model: torch's costs carry each tensor's Q8_0 cost
    on top. The knapsack gives every tensor exactly one type, so a constant per tensor never
    changes its choice; compared raw, that constant alone would rank the tensors (on the
    odd-width stand-in the Q6_K of a 576-wide row is written as Q8_0, cost 0 for direct and
    the Q8_0 cost for torch). Methods are therefore compared on what the knapsack sees."""
    return {n: {t: v - per.get("q8_0", 0.0) for t, v in per.items()}
            for n, per in costs.items()}


def rank_agreement(costs: dict, direct: dict) -> dict:
    """Spearman of a method's costs against direct's, each relative to the tensor's Q8_0
    (:func:`relative`): over all (tensor, type) and per type."""
    costs, direct = relative(costs), relative(direct)
    types = sorted({t for per in direct.values() for t in per if t != "q8_0"}
                   & {t for per in costs.values() for t in per})
    names = sorted(set(direct) & set(costs))
    pairs = [(n, t) for n in names for t in types]
    within = {t: float(spearmanr([direct[n][t] for n in names],
                                 [costs[n][t] for n in names]).statistic) for t in types}
    return {"all_pairs": float(spearmanr([direct[n][t] for n, t in pairs],
                                         [costs[n][t] for n, t in pairs]).statistic),
            "within": within, "within_mean": float(np.mean(list(within.values())))}


def study(model: Path, out: Path, calib: Path, methods: list[str], types: list[str],
          eval_tokens: int, data_dir: Path | None, imatrix: Path | None = None,
          uniform_only: tuple[str, ...] = ()) -> dict:
    """One export per method: ``types`` and their -MIX, and ``uniform_only`` types without
    one (the uniform frontier's other points)."""
    results = {"model": str(model), "calib": str(calib), "methods": {}}
    for method in methods:
        folder = out / method
        if not (folder / "manifest.json").is_file():
            settings = GGUFSettings(types=(*uniform_only,
                                           *(x for t in types for x in (t, f"{t}-mix"))),
                                    calib=str(calib), imatrix_chunks=32,
                                    eval_tokens=eval_tokens, mix_sensitivity=method,
                                    imatrix=str(imatrix) if imatrix else "auto")
            started = time.perf_counter()
            gguf_pipeline.run(model, folder, settings, source={"id": model.name},
                              cache_dir=cache_dir(), data_dir=data_dir)
            (folder / "wall_s.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
        imatrix = imatrix or next(folder.glob("*.imatrix.gguf"))
        validation = read_manifest(folder)["validation"]
        results["methods"][method] = {
            "files": _files(folder), "sensitivity": validation["mix_sensitivity"],
            "export_wall_s": float((folder / "wall_s.txt").read_text())}
    direct = results["methods"].get("direct", {}).get("sensitivity", {}).get("costs")
    if direct:
        for method, got in results["methods"].items():
            if method != "direct":
                got["rank_vs_direct"] = rank_agreement(got["sensitivity"]["costs"], direct)
    results["imatrix"] = str(imatrix)
    return results


def repeatability(first: dict, second: dict) -> dict:
    """Each method's costs from the second calibration text against its own from the first,
    and, on the second text, each method against direct (all pairs and within a type)."""
    out = {}
    for method, got in second["methods"].items():
        costs = got["sensitivity"]["costs"]
        out[method] = {"vs_itself": rank_agreement(
            costs, first["methods"][method]["sensitivity"]["costs"])}
        if method != "direct" and "direct" in second["methods"]:
            out[method]["vs_direct"] = rank_agreement(
                costs, second["methods"]["direct"]["sensitivity"]["costs"])
    return out


COLUMNS = ["file", "sensitivity", "size (bytes)", "mean KLD", "ratio", "top-1",
           *(f"{lang} KLD / top-1" for lang in LANGS), "published"]


def table(results: dict, command: str, label: str) -> dict:
    """The study as a results table (kvant.bench.tables): a row per uniform type, then its
    -MIX by each method."""
    methods = results["methods"]
    first = next(iter(methods.values()))["files"]
    cells = []
    for uniform in (t for t in first if f"{t}-mix" in first):
        u = first[uniform]
        rows = [(uniform.upper(), "(llama.cpp's rule)", u)]
        rows += [(f"{uniform.upper()}-MIX", m, got["files"][f"{uniform}-mix"])
                 for m, got in methods.items()]
        for name, method, f in rows:
            if f.get("same_as_uniform"):
                cells.append([name, method, "-", "-", "-", "-", *("-" for _ in LANGS),
                              "no: the uniform file is optimal"])
                continue
            ratio = "" if f is u else f"{f['mean_kld'] / u['mean_kld']:.2f}"
            cells.append([name, method, f"{f['size_bytes']:,}", f"{f['mean_kld']:.6f}", ratio,
                          f"{f['top1_agreement_pct']:.2f}%",
                          *(f"{f['per_language'][lang]['mean_kld']:.6f} / "
                            f"{f['per_language'][lang]['top1_agreement_pct']:.1f}%"
                            for lang in LANGS),
                          "" if f is u else ("no: " + f["withheld"] if "withheld" in f
                                             else "yes")])
    notes = []
    for m, got in methods.items():
        if "rank_vs_direct" in got:
            r = got["rank_vs_direct"]
            notes.append(f"{m} against direct, Spearman: all pairs {r['all_pairs']:.3f}, "
                         "within a type " + ", ".join(f"{t} {v:.3f}"
                                                     for t, v in r["within"].items())
                         + f" (mean {r['within_mean']:.3f})")
        notes.append(f"{m}: export with every file and its sensitivity "
                     f"{got['export_wall_s']:.0f} s")
    return table_doc(f"Uniform types and their -MIX by each sensitivity method, {label}: "
                     "held-out text of all five languages, KLD against the bf16 model",
                     COLUMNS, cells, command, notes="; ".join(notes) + ".")


AGREEMENT_COLUMNS = ["costs", "against", "calibration text", "all pairs",
                     *(f"{t} (within)" for t in ("q2_k", "q3_k", "iq4_xs", "q4_k", "q5_k",
                                                 "q6_k")), "mean within"]


def agreement_table(results: dict, command: str, label: str) -> dict:
    """How far the rankings agree, as a results table: each method against direct on the
    first text and (``--repeat-calib``) on the second, then direct and torch each against
    themselves across the two texts: the repeatability that bounds any agreement with direct.
    The notes give, per type, torch's -MIX's held-out KLD over direct's on each text."""
    first, repeat = results["methods"], results.get("repeat", {})
    texts = (Path(results["calib"]).name, Path(repeat.get("calib", "-")).name)
    rows = [(m, "direct", texts[0], got["rank_vs_direct"]) for m, got in first.items()
            if "rank_vs_direct" in got]
    rank = repeat.get("rank", {})
    rows += [(m, "direct", texts[1], got["vs_direct"]) for m, got in rank.items()
             if "vs_direct" in got]
    rows += [(m, f"{m} on {texts[0]}", texts[1], got["vs_itself"]) for m, got in rank.items()]
    types = [c.removesuffix(" (within)") for c in AGREEMENT_COLUMNS[4:-1]]
    cells = [[m, against, text, f"{r['all_pairs']:.3f}",
              *(f"{r['within'][t]:.3f}" if t in r["within"] else "-" for t in types),
              f"{r['within_mean']:.3f}"] for m, against, text, r in rows]
    notes = []
    for text, methods in zip(texts, (first, repeat.get("methods", {})), strict=True):
        if "direct" in methods and "torch" in methods:
            d, t = methods["direct"]["files"], methods["torch"]["files"]
            notes.append(f"torch's -MIX held-out mean KLD over direct's, calibrated on {text}: "
                         + ", ".join(f"{k.upper()} {t[k]['mean_kld'] / d[k]['mean_kld']:.2f}"
                                     for k in d if k.endswith("-mix") and "mean_kld" in d[k]
                                     and "mean_kld" in t.get(k, {})))
    return table_doc(f"Rank agreement of the mix sensitivities, {label}: Spearman of the "
                     "(tensor, type) costs, over all pairs and within each type",
                     AGREEMENT_COLUMNS, cells, command, notes="; ".join(notes) + ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--label", default="the stand-in")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--methods", default="direct,torch,proxy")
    parser.add_argument("--types", default="q3_k_m,iq4_xs,q4_k_m,q5_k_m")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--repeat-calib", type=Path,
                        help="a second calibration text: direct and torch again on its "
                             "windows, each ranked against itself")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    types = args.types.split(",")
    results = study(args.model, args.out, args.calib, args.methods.split(","), types,
                    args.eval_tokens, args.data_dir)
    if args.repeat_calib:
        again = study(args.model, args.out / "repeat", args.repeat_calib,
                      [m for m in ("direct", "torch") if m in args.methods.split(",")], types,
                      args.eval_tokens, args.data_dir, imatrix=Path(results["imatrix"]))
        results["repeat"] = {**again, "rank": repeatability(results, again)}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    doc = table(results, command_line(module="kvant.bench.studies.mix_proof"), args.label)
    write_table(args.out / "table.json", doc)  # docs/results/gguf-mix-proof*.json
    agreement = agreement_table(results, doc["command"], args.label)
    write_table(args.out / "agreement.json", agreement)  # docs/results/gguf-mix-agreement*
    text = markdown(doc) + "\n\n" + markdown(agreement) + "\n"
    (args.out / "results.md").write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
