"""ONNX int4 study: the GenAI builder's weight quantizer x MatMulNBits accuracy level.

    python -m kvant.bench.studies.onnx_int4 --model DIR --out DIR [--eval-tokens 2048] [--repeats 3]

Builds `kvant export onnx --precision int4 --block-size 32` once per algorithm (rtn, k_quant,
k_quant_last, k_quant_mixed) and accuracy level (1: fp32 activations, 4: int8), each scored
by the pipeline on the five languages' held-out text against the bf16 model, and times
greedy decode on the CPU (the median and range of ``repeats`` runs of 64 tokens after a
128-token prompt). Writes results.json and a markdown table. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from kvant.artifact import read_manifest
from kvant.bench.tables import command_line, markdown, table_doc, write_table
from kvant.export.onnx import INT4_ALGOS, ONNXSettings
from kvant.export.onnx_pipeline import run
from kvant.paths import cache_dir
from kvant.runtimes import open_runtime
from kvant.runtimes.targets import targets

LEVELS = (1, 4)


def decode_speed(folder: Path, repeats: int, prompt: int = 128, new: int = 64) -> list[float]:
    runtime = open_runtime(targets(folder)[0], "cpu", 0, n_ctx=prompt + new + 8,
                           all_logits=False)
    try:
        ids = [1] + [5 + (i * 7) % 1000 for i in range(prompt - 1)]
        runtime.decode(ids, 4)  # warm-up
        return [new / runtime.decode(ids, new) for _ in range(repeats)]
    finally:
        runtime.close()


def study(model: Path, out: Path, eval_tokens: int, repeats: int,
          data_dir: Path | None = None) -> dict:
    rows = {}
    for algo in INT4_ALGOS:
        for level in LEVELS:
            name = f"{algo}-acc{level}"
            folder = out / name
            if not (folder / "manifest.json").is_file():
                settings = ONNXSettings(precision="int4", block_size=32, accuracy_level=level,
                                        int4_algo=algo, eval_tokens=eval_tokens)
                run(model, folder, settings, source={"id": model.name},
                    cache_dir=cache_dir(), data_dir=data_dir)
            validation = read_manifest(folder)["validation"]
            speed = decode_speed(folder, repeats)
            rows[name] = {"algo": algo, "accuracy_level": level,
                          "mean_kld": validation["mean_kld"],
                          "top1_agreement_pct": validation["top1_agreement_pct"],
                          "size_bytes": sum(f.stat().st_size for f in folder.glob("*.onnx*")),
                          "decode_tok_s": statistics.median(speed),
                          "decode_range": [min(speed), max(speed)]}
    return rows


COLUMNS = ["algorithm", "accuracy level", "mean KLD", "top-1 agreement", "size (MiB)",
           "decode tok/s, median (min-max)"]


def table(rows: dict, command: str) -> dict:
    """The study as a results table (kvant.bench.tables)."""
    cells = [[r["algo"], str(r["accuracy_level"]), f"{r['mean_kld']:.6f}",
              f"{r['top1_agreement_pct']:.2f}%", f"{r['size_bytes'] / 2**20:.2f}",
              f"{r['decode_tok_s']:.0f} ({r['decode_range'][0]:.0f}-{r['decode_range'][1]:.0f})"]
             for r in rows.values()]
    return table_doc("ONNX int4 quantizer and accuracy level (block 32, held-out text of every "
                     "language; decode greedy, 64 tokens after 128)", COLUMNS, cells, command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    rows = study(args.model, args.out, args.eval_tokens, args.repeats, args.data_dir)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    doc = table(rows, command_line(module="kvant.bench.studies.onnx_int4"))
    write_table(args.out / "table.json", doc)  # docs/results/onnx-int4.json
    (args.out / "results.md").write_text(markdown(doc) + "\n")
    sys.stdout.write(markdown(doc) + "\n")


if __name__ == "__main__":
    main()
