"""Speed and memory at depth, per KV cache type, against the plan.

    python -m kvant.bench.studies.long_context ARTIFACT [...] --out DIR
        [--ctx 4096,16384,32768] [--kv-types f16,q8_0,q4_0,fp8,int4] [--repeats 2]
        [--full-layers 40]

For each cache type, every artifact whose runtime has it goes through `kvant bench` (speed
only, each row in a fresh process: prefill of the context, decode of 32 tokens after it,
peak RSS, other programs' CPU share) into DIR/kv-<type>/ (resumable: finished rows are
kept), then DIR/long-context.md: every row beside `kvant plan`'s prediction for the file's
own shape, and with --full-layers the plan for the whole model (a rehearsal file of a few
layers at NorMistral's width is measured; its layers are what the plan scales).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from kvant.bench.run import run_bench
from kvant.bench.settings import BenchSettings
from kvant.errors import run_script
from kvant.model import read_config
from kvant.paths import cache_dir as user_cache
from kvant.plan.fit import entry_kind
from kvant.plan.kinds import shape_of, weight_bytes
from kvant.plan.kv import KV_TYPES, kv_types_for
from kvant.plan.peaks import peak_bytes
from kvant.plan.sizes import GIB, MIB
from kvant.runtimes.targets import targets
from kvant.synth import Shape


def artifact_shape(path: Path) -> Shape:
    """NorMistral's dimensions as an artifact states them: a GGUF file's metadata, or a
    folder's config.json (transformers checkpoints; ONNX folders keep theirs beside)."""
    if path.suffix != ".gguf":
        return shape_of(read_config(path))
    import gguf  # reads the metadata only

    fields = {f.name.split(".", 1)[1]: f for f in gguf.GGUFReader(str(path)).fields.values()
              if f.name.startswith("llama.")}

    def value(key: str) -> int:
        return int(fields[key].contents())

    return Shape(value("block_count"), value("embedding_length"), value("feed_forward_length"),
                 value("attention.head_count"), value("attention.head_count_kv"),
                 value("attention.key_length"), value("vocab_size"), value("context_length"))


def measure(files: list[Path], out: Path, ctxs: list[str], kv_types: list[str],
            repeats: int, data_dir: Path | None) -> dict[str, dict]:
    """{cache type: kvant bench results}; each artifact with the cache types its runtime has."""
    results = {}
    for kv in kv_types:
        runs = [f for f in files if kv in kv_types_for(targets(f)[0].backend)]
        if not runs:
            continue
        settings = BenchSettings(ctx=tuple(ctxs), kv_type=kv, quality=False, peer_checks=False,
                                 repeats=repeats, max_attempts=1, verify=False)
        run_bench(runs, None, settings, out / f"kv-{kv}", cache_dir=user_cache(),
                  data_dir=data_dir)
        results[kv] = json.loads((out / f"kv-{kv}" / "results.json").read_text())
    return results


def table(results: dict[str, dict], shapes: dict[str, Shape], full_layers: int) -> str:
    head = ["target", "KV cache", "ctx", "prefill tok/s", "decode tok/s", "peak RSS (MiB)",
            "plan (MiB)", "plan error"]
    if full_layers:
        head.append(f"plan at {full_layers} layers (GiB)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kv, res in results.items():
        for name, entry in res["targets"].items():
            shape = shapes[name]
            k = entry_kind(entry, shape)
            for ctx, s in entry.get("speed", {}).items():
                kv_ran = s.get("kv_type", kv)  # a runtime without the type ran its own
                if "error" in s:
                    lines.append(f"| {name} | {kv} | {int(ctx):,} | {s['error']} |")
                    continue
                plan = peak_bytes(shape, k, int(ctx), entry["size_bytes"], kv_type=kv_ran)
                cells = [name, kv_ran, f"{int(ctx):,}",
                         f"{s['prefill_tok_s']:,.1f} ({s['prefill_tok_s_min']:,.1f}-"
                         f"{s['prefill_tok_s_max']:,.1f})",
                         f"{s['decode_tok_s']:,.2f} ({s['decode_tok_s_min']:,.2f}-"
                         f"{s['decode_tok_s_max']:,.2f})",
                         f"{s['peak_rss_mib']:,.0f}", f"{plan / MIB:,.0f}",
                         f"{100 * (plan / (s['peak_rss_mib'] * MIB) - 1):+.1f}%"]
                if full_layers:
                    full = replace(shape, n_layers=full_layers)
                    at_full = peak_bytes(full, k, int(ctx), weight_bytes(full, k),
                                         kv_type=kv_ran)
                    cells.append(f"{at_full / GIB:.2f}")
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path, help=".gguf files or folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ctx", default="4096,16384,32768")
    parser.add_argument("--kv-types", default=",".join(KV_TYPES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--full-layers", type=int, default=0)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    results = measure(args.artifacts, args.out, args.ctx.split(","), args.kv_types.split(","),
                      args.repeats, args.data_dir)
    shapes = {t.name: artifact_shape(a) for a in args.artifacts for t in targets(a)}
    text = table(results, shapes, args.full_layers)
    (args.out / "long-context.md").write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    run_script(main, "kvant.bench.studies.long_context")
