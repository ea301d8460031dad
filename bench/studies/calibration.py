"""Which calibration text quantizes best? A measurement, not a belief.

Quantizes one GGUF type with an importance matrix from each calibration text (and without
one), or GPTQ 4-bit with each text (`--type gptq`, same token count for each), and reports
mean KLD and top-1 agreement per held-out language, all on identical HF
token ids against the transformers model::

    python -m kvant.bench.studies.calibration --model ./tiny --data-dir ../shared/data/ud \\
        --calib none --calib eng --calib ../shared/data/calib/nor.calib-1000.txt

(On an English-centric model, an English imatrix beat a Norwegian one on Norwegian text;
NorMistral may differ: run this on it.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from tokenizers import Tokenizer

from kvant.bench.tables import command_line, markdown, table_doc, write_table
from kvant.data import get_mix
from kvant.export.gguf import GGUFSettings
from kvant.export.gguf_convert import convert
from kvant.export.gguf_quantize import compute_imatrix, quantize
from kvant.model import refuse_synthetic
from kvant.paths import cache_dir, default_data_dir
from kvant.quantize.gptq import GPTQSettings
from kvant.quantize.gptq_pipeline import calibration_samples, quantize_gptq
from kvant.runtimes.reference import reference_logits, score_against
from kvant.runtimes.targets import targets
from kvant.scoring import held_out


def _reference(model_dir: Path, settings, cache: Path, data_dir: Path | None, scratch: Path):
    refuse_synthetic(model_dir)
    _, wins = held_out(model_dir, settings, cache, data_dir)
    return wins, reference_logits(model_dir, wins, scratch / "reference")


def _drifts(path: Path, ref, wins: dict) -> dict:
    return score_against(targets(path)[0], ref, wins)["per_language"]


def compare(model_dir: Path, calibs: list[str], gguf_type: str, cache: Path,
            data_dir: Path | None, settings: GGUFSettings | None = None) -> dict:
    """{calibration label: {language: drift dict}} for ``gguf_type``."""
    settings = settings or GGUFSettings(types=(gguf_type,))
    normalizer = Tokenizer.from_file(str(model_dir / "tokenizer.json")).normalizer
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        wins, ref = _reference(model_dir, settings, cache, data_dir, Path(tmp))
        base = Path(tmp) / "base-BF16.gguf"
        convert(model_dir, base, "bf16")
        for label in calibs:
            imatrix = None
            if label != "none":
                text = get_mix(label, cache, data_dir)
                imatrix = Path(tmp) / f"{len(results)}.imatrix.gguf"
                compute_imatrix(base, text.read(), imatrix, settings, normalizer)
            quant = Path(tmp) / f"{len(results)}.gguf"
            quantize(base, quant, gguf_type, imatrix, settings.n_threads)
            results[_label(label)] = _drifts(quant, ref, wins)
    return results


def compare_gptq(model_dir: Path, calibs: list[str], cache: Path, data_dir: Path | None,
                 settings: GPTQSettings | None = None) -> dict:
    """{calibration label: {language: drift dict}} for GPTQ, same token count for each text."""
    settings = settings or GPTQSettings()
    texts = {label: get_mix(label, cache, data_dir).read() for label in calibs}
    sample_sets = {label: calibration_samples(model_dir, text, settings.samples,
                                              settings.seqlen) for label, text in texts.items()}
    n = min(len(s) for s in sample_sets.values())  # same token count for every text
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        wins, ref = _reference(model_dir, settings, cache, data_dir, Path(tmp))
        for i, (label, samples) in enumerate(sample_sets.items()):
            out = Path(tmp) / str(i)
            out.mkdir()
            quantize_gptq(model_dir, out, settings, samples[:n])
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (out / name).write_bytes((model_dir / name).read_bytes())
            results[_label(label)] = _drifts(out, ref, wins)
    return results


def _label(spec: str) -> str:
    """`none`, a set name, a file's stem, or the parts of a mix: `eng+nor.calib-1000`."""
    parts = [p.strip().rsplit(":", 1)[0] if p.strip()[-1:].isdigit() else p.strip()
             for p in spec.split(",")]
    return "+".join(Path(p).name.removesuffix(".txt") for p in parts)


def table(results: dict, gguf_type: str, command: str) -> dict:
    """Mean KLD (top-1 agreement) per language and calibration text (kvant.bench.tables)."""
    langs = list(next(iter(results.values())))
    rows = [[label, *(f"{per_lang[lang]['mean_kld']:.5f} "
                      f"({per_lang[lang]['top1_agreement_pct']:.1f}%)" for lang in langs)]
            for label, per_lang in results.items()]
    name = "GPTQ 4-bit g128" if gguf_type == "gptq" else gguf_type.upper()
    return table_doc(f"{name} mean KLD (top-1 agreement) by calibration text",
                     ["calibration", *langs], rows, command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvant.bench.studies.calibration")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calib", action="append", required=True,
                        help="none, a set name, a path or a weighted mix; repeat to compare")
    parser.add_argument("--type", default="q4_k_m", help="a GGUF type, or gptq")
    parser.add_argument("--samples", type=int, default=128, help="gptq: samples per text")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--imatrix-chunks", type=int, default=64)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--table", type=Path,
                        help="write the results table here (docs/results/calibration-*.json)")
    args = parser.parse_args(argv)
    if args.type == "gptq":
        settings = GPTQSettings(samples=args.samples, seqlen=256, eval_tokens=args.eval_tokens)
        results = compare_gptq(args.model, args.calib, cache_dir(), args.data_dir, settings)
    else:
        settings = replace(GGUFSettings(types=(args.type,)), eval_tokens=args.eval_tokens,
                           imatrix_chunks=args.imatrix_chunks)
        results = compare(args.model, args.calib, args.type, cache_dir(), args.data_dir,
                          settings)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    doc = table(results, args.type, command_line(argv, "kvant.bench.studies.calibration"))
    if args.table:
        write_table(args.table, doc)
    sys.stdout.write(markdown(doc) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
