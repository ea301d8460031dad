"""Quality at depth: does quantization, of the weights or of the KV cache, hurt late positions
more than early ones?

    python -m kvant.bench.depth ARTIFACT [...] --reference MODEL --out DIR
        [--ctx 32768] [--kv-types f16,q8_0,q4_0,fp8,int4] [--langs nob,nno,sme,dan,swe]

Documents: per language, the held-out text as it stands (its paragraphs in order, blank
lines between them), tokenized once with NorMistral's exact tokenizer (one <s>), the first
``--ctx`` tokens. Nothing is repeated to reach the length (a repeated text would let late
positions copy): a text shorter than ``--ctx`` leaves its late buckets empty, and the report
says how long each document was (with the stand-in's 4,096-entry vocabulary the texts run
20,551 (dan) to 51,992 (swe) tokens; NorMistral's 51,200 entries make them shorter). Every
target scores each document in one window, once per KV cache type its runtime has
(llama.cpp: f16, q8_0, q4_0; transformers: f16, fp8, int4, the window fed through the cache
512 tokens at a time so that later tokens attend to quantized keys; ONNX Runtime GenAI: its
own); the KL divergence of each position against the reference (the bf16 model, float32
logits) is averaged per position bucket, and the perplexity of each bucket set against the
reference's (drift in percent). All targets score identical ids.

On the stand-in (trained on short sequences) this tests the mechanics only; the command is
the one to run on NorMistral-11b-long: the reference's 32k-token logits are kept on disk
(6.7 GB per language at 51,200 entries) and scored 1,024 positions at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from kvant.bench.tables import command_line, markdown_table, table_doc, write_table
from kvant.data import EVAL_SETS, get_text, paragraphs
from kvant.errors import run_script
from kvant.files import sha256_text
from kvant.paths import cache_dir as user_cache
from kvant.plan.kv import KV_TYPES, kv_types_for
from kvant.runtimes import open_runtime
from kvant.runtimes.reference import reference_logits
from kvant.runtimes.targets import targets
from kvant.scoring import position_scores
from kvant.tokenization import exact_tokenizer

BUCKETS = ((0, 1024), (1024, 4096), (4096, 16384), (16384, 32768))


def documents(reference: Path, langs: list[str], ctx: int, cache: Path,
              data_dir: Path | None = None) -> dict[str, list[int]]:
    """{language: the first ``ctx`` exact ids of its held-out text as one document}."""
    tokenizer = exact_tokenizer(reference)
    docs = {}
    for lang in langs:
        text = "\n\n".join(paragraphs(get_text(lang, cache, data_dir).read()))
        docs[lang] = tokenizer.encode(text).ids[:ctx]
    return docs


def bucketed(kld: np.ndarray, nll_ref: np.ndarray, nll: np.ndarray) -> dict[str, dict | None]:
    """Per position bucket (position t predicts token t+1): the mean KLD, the reference's and
    the target's perplexity and the drift between them in percent; None past the end."""
    out = {}
    for lo, hi in BUCKETS:
        if lo >= len(kld):
            out[f"{lo}-{hi}"] = None
            continue
        ppl_ref, ppl = math.exp(nll_ref[lo:hi].mean()), math.exp(nll[lo:hi].mean())
        out[f"{lo}-{hi}"] = {"kld": float(kld[lo:hi].mean()), "ppl_ref": round(ppl_ref, 4),
                             "ppl": round(ppl, 4),
                             "ppl_drift_pct": round(100 * (ppl / ppl_ref - 1), 3)}
    return out


def depth(artifacts: list[Path], reference: Path, docs: dict[str, list[int]],
          kv_types: tuple[str, ...], scratch: Path, threads: int = 0) -> dict:
    """{target: {cache type: {language: {"ids": sha of the ids, "buckets": {...}}}}}.

    Each target runs every cache type of ``kv_types`` its runtime has (kvant.plan.KV_CACHES);
    the reference itself, passed as an artifact, shows what a quantized cache alone costs.
    """
    ref = reference_logits(reference, {lang: [ids] for lang, ids in docs.items()},
                           scratch / "reference")
    results: dict = {}
    longest = max(len(ids) for ids in docs.values())
    for artifact in artifacts:
        for target in targets(artifact):
            for kv in (t for t in kv_types if t in kv_types_for(target.backend)):
                runtime = open_runtime(target, "cpu", threads, n_ctx=longest + 8, kv_type=kv)
                try:
                    for lang, ids in docs.items():
                        kld, nll_ref, nll = position_scores(ref[lang][0][:-1],
                                                            runtime.logits(ids)[:-1], ids)
                        results.setdefault(target.name, {}).setdefault(kv, {})[lang] = {
                            "ids": sha256_text(json.dumps(ids))[:16], "tokens": len(ids),
                            "mean_kld": float(kld.mean()),
                            "ppl_drift_pct": round(100 * (math.exp(nll.mean() - nll_ref.mean())
                                                          - 1), 3),
                            "buckets": bucketed(kld, nll_ref, nll)}
                finally:
                    runtime.close()
    return results


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Columns and rows: mean KLD per bucket, with the perplexity drift (%) in brackets."""
    columns = ["target", "KV cache", "language", "tokens",
               *(f"{lo:,}-{hi:,}" for lo, hi in BUCKETS)]
    rows = []
    for name, by_kv in results.items():
        for kv, by_lang in by_kv.items():
            for lang, r in by_lang.items():
                cells = [f"{b['kld']:.6f} ({b['ppl_drift_pct']:+.2f}%)" if b else "-"
                         for b in r["buckets"].values()]
                rows.append([name, kv, lang, f"{r['tokens']:,}", *cells])
    return columns, rows


def table(results: dict) -> str:
    """Mean KLD per bucket, with the perplexity drift (%) in brackets."""
    return markdown_table(*table_rows(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ctx", type=int, default=32768)
    parser.add_argument("--kv-types", default=",".join(KV_TYPES))
    parser.add_argument("--langs", default=",".join(EVAL_SETS))
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    docs = documents(args.reference, args.langs.split(","), args.ctx, user_cache(),
                     args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as scratch:
        results = depth(args.artifacts, args.reference, docs,
                        tuple(args.kv_types.split(",")), Path(scratch))
    (args.out / "depth.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "depth.md").write_text(table(results) + "\n")
    write_table(args.out / "table.json", table_doc(  # docs/results/depth.json
        "Quality at depth: mean KLD per position bucket against the reference with its own "
        "cache (perplexity drift)", *table_rows(results),
        command_line(module="kvant.bench.depth")))
    sys.stdout.write(table(results) + "\n")


if __name__ == "__main__":
    run_script(main, "kvant.bench.depth")
