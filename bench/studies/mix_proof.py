"""Mixed precision, the proof: each uniform type against its -MIX by each sensitivity method.

    python -m kvant.bench.studies.mix_proof --model DIR --out DIR [--eval-tokens 2048]
        [--methods direct,torch,proxy] [--types q3_k_m,iq4_xs,q4_k_m,q5_k_m]

One `kvant export gguf` per method (the pipeline itself: the uniform files and the -MIX of
each, the same importance matrix, made once and reused by the next methods), each file scored
on the five languages' held-out text against the bf16 model. A -MIX the pipeline withheld
(not better than its twin on held-out text) is reported with its scores and the reason. Also
the rank correlation of each method's costs with direct's (all pairs, and within each type:
the trades the knapsack makes). Writes results.json, table.json (docs/results/) and a
markdown table. Run it alone on the machine: the times are in the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from kvant.artifact import read_manifest
from kvant.bench.tables import command_line, markdown, table_doc, write_table
from kvant.export.gguf import GGUFSettings
from kvant.export.gguf_mix import spearman
from kvant.export.gguf_pipeline import export_gguf
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


def rank_agreement(costs: dict, direct: dict) -> dict:
    """Spearman of a method's costs against direct's: over all (tensor, type) and per type."""
    types = sorted({t for per in direct.values() for t in per if t != "q8_0"}
                   & {t for per in costs.values() for t in per})
    names = sorted(set(direct) & set(costs))
    pairs = [(n, t) for n in names for t in types]
    within = {t: spearman([direct[n][t] for n in names], [costs[n][t] for n in names])
              for t in types}
    return {"all_pairs": spearman([direct[n][t] for n, t in pairs],
                                  [costs[n][t] for n, t in pairs]),
            "within": within, "within_mean": float(np.mean(list(within.values())))}


def study(model: Path, out: Path, calib: Path, methods: list[str], types: list[str],
          eval_tokens: int, data_dir: Path | None) -> dict:
    results, imatrix = {"model": str(model), "methods": {}}, None
    for method in methods:
        folder = out / method
        if not (folder / "manifest.json").is_file():
            settings = GGUFSettings(types=tuple(x for t in types for x in (t, f"{t}-mix")),
                                    calib=str(calib), imatrix_chunks=32,
                                    eval_tokens=eval_tokens, mix_sensitivity=method,
                                    imatrix=str(imatrix) if imatrix else "auto")
            started = time.perf_counter()
            export_gguf(model, folder, settings, source={"id": model.name},
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
    return results


COLUMNS = ["file", "sensitivity", "size (bytes)", "mean KLD", "ratio", "top-1",
           *(f"{lang} KLD / top-1" for lang in LANGS), "published"]


def table(results: dict, command: str, label: str) -> dict:
    """The study as a results table (kvant.bench.tables): a row per uniform type, then its
    -MIX by each method."""
    methods = results["methods"]
    first = next(iter(methods.values()))["files"]
    cells = []
    for uniform in (t for t in first if not t.endswith("-mix")):
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
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = study(args.model, args.out, args.calib, args.methods.split(","),
                    args.types.split(","), args.eval_tokens, args.data_dir)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    doc = table(results, command_line(module="kvant.bench.studies.mix_proof"), args.label)
    write_table(args.out / "table.json", doc)  # docs/results/gguf-mix-proof*.json
    (args.out / "results.md").write_text(markdown(doc) + "\n")
    sys.stdout.write(markdown(doc) + "\n")


if __name__ == "__main__":
    main()
