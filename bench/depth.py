"""Quality at depth: does quantization, of the weights or of the KV cache, hurt late positions
more than early ones?

    python -m kvant.bench.depth ARTIFACT [...] --reference MODEL --out DIR
        [--ctx 32768] [--kv-types f16,q8_0,q4_0] [--langs nob,nno,sme,dan,swe]

Documents: per language, the held-out text as it stands (its paragraphs in order, blank
lines between them), tokenized once with NorMistral's exact tokenizer (one <s>), the first
``--ctx`` tokens. Nothing is repeated to reach the length (a repeated text would let late
positions copy); the UD texts are shorter than 32,768 tokens, so buckets past a document's
end stay empty and the report says how long each document was. Every target scores each
document in one window, once per KV cache type for GGUF files (llama.cpp) and with its own
cache otherwise; the KL divergence of each position against the reference (the bf16 model,
float32 logits) is averaged per position bucket. All targets score identical ids.

On the stand-in (trained on short sequences) this tests the mechanics only; the command is
the one to run on NorMistral-11b-long, on a machine that holds its 32k-token logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from kvant.data import EVAL_SETS, get_text, paragraphs
from kvant.files import sha256_text
from kvant.paths import cache_dir as user_cache
from kvant.plan import KV_TYPES
from kvant.runtimes import open_runtime, reference_logits, targets
from kvant.scoring import kld_per_position
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


def bucketed(kld: np.ndarray) -> dict[str, float | None]:
    """Mean KLD per position bucket (position t predicts token t+1); None past the end."""
    out = {}
    for lo, hi in BUCKETS:
        part = kld[lo:hi]
        out[f"{lo}-{hi}"] = float(part.mean()) if len(part) else None
    return out


def depth(artifacts: list[Path], reference: Path, docs: dict[str, list[int]],
          kv_types: tuple[str, ...], scratch: Path, threads: int = 0) -> dict:
    """{target: {cache type: {language: {"ids": sha of the ids, "buckets": {...}}}}}."""
    ref = reference_logits(reference, {lang: [ids] for lang, ids in docs.items()},
                           scratch / "reference")
    results: dict = {}
    longest = max(len(ids) for ids in docs.values())
    for artifact in artifacts:
        for target in targets(artifact):
            caches = kv_types if target.backend == "llama.cpp" else ("f16",)
            for kv in caches:
                runtime = open_runtime(target, "cpu", threads, n_ctx=longest + 8, kv_type=kv)
                try:
                    for lang, ids in docs.items():
                        kld = kld_per_position(ref[lang][0][:-1], runtime.logits(ids)[:-1])
                        results.setdefault(target.name, {}).setdefault(kv, {})[lang] = {
                            "ids": sha256_text(json.dumps(ids))[:16], "tokens": len(ids),
                            "mean_kld": float(kld.mean()), "buckets": bucketed(kld)}
                finally:
                    runtime.close()
    return results


def table(results: dict) -> str:
    heads = [f"{lo:,}-{hi:,}" for lo, hi in BUCKETS]
    lines = ["| target | KV cache | language | tokens | " + " | ".join(heads) + " |",
             "|---|---|---|---|" + "---|" * len(BUCKETS)]
    for name, by_kv in results.items():
        for kv, by_lang in by_kv.items():
            for lang, r in by_lang.items():
                cells = [f"{v:.6f}" if v is not None else "-" for v in r["buckets"].values()]
                lines.append(f"| {name} | {kv} | {lang} | {r['tokens']:,} | "
                             + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    sys.stdout.write(table(results) + "\n")


if __name__ == "__main__":
    main()
