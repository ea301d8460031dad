"""Every quality claim on a real pretrained model: SmolLM2-135M-Instruct beside the stand-in.

    python -m kvant.bench.studies.real_model --out out/real --calib CALIB.txt
        [--model DIR] [--parts uniform,mix,checkpoints,mlx] [--methods fisher,proxy]
        [--eval-tokens 2048] [--data-dir DIR] [--gptq-samples 64]

Without --model the model is ``kvant peer smollm2`` (cached after the first run). What it
measures, each file on the same held-out windows of the five languages against the float32
model, with the bench's metrics (mean KLD, top-1 agreement, ΔPPL, per language):

- ``uniform``: every uniform GGUF type the release makes (Q8_0, Q6_K, Q5_K_M, Q4_K_M, IQ4_XS,
  Q3_K_M) with no importance matrix (IQ4_XS needs one), with the Norwegian one (--calib) and
  with an English one (the UD English EWT text): three `kvant export gguf` runs;
- ``mix``: the -MIX of Q3_K_M, IQ4_XS, Q4_K_M and Q5_K_M by each sensitivity method in
  --methods (kvant.bench.studies.mix_proof: one export per method, the same importance
  matrix), each beside its twin and the uniform frontier at its bytes
  (kvant.export.gguf_mix.uniform_frontier, over the uniform files of the same export);
- ``checkpoints``: GPTQ 4-bit g64 and g32 (the model's 576-wide rows do not divide into
  the release's groups of 128), bitsandbytes nf4 and int8, ONNX int4 by
  k_quant_last and from the g32 GPTQ checkpoint, each beside the GGUF uniform frontier
  (Norwegian importance matrix) at its bytes;
- ``mlx``: MLX 4-bit at group size 64 and its mix (kvant export mlx --mix: the Fisher
  sensitivity, calibrated on --calib) and at group size 32, beside the Norwegian export's
  GGUF files scored on the same windows (--mlx-tokens per language: MLX's CPU backend is
  slow).

Writes results.json and docs tables (real-gguf-uniform.json, real-gguf-mix.json,
real-checkpoints.json, real-mlx.json; --prefix names them) beside it; the checkpoints and
mlx tables need the uniform part's Norwegian export in the same --out. Its limits go with
every table: the model's weights once passed through Q4_1 (Q4_0/Q4_1 files of it flatter;
K-quants and IQ types are fair), and it is English-first (Norwegian text measures drift,
not fluency).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from kvant.app.pipelines import PIPELINES
from kvant.artifact import read_manifest
from kvant.bench.studies import mix_proof
from kvant.bench.tables import command_line, markdown, table_doc, write_table
from kvant.data import get_text
from kvant.export.gguf import GGUFSettings
from kvant.export.gguf_mix import uniform_frontier
from kvant.export.mlx import MLXSettings
from kvant.export.mlx_pipeline import MixWithheld
from kvant.export.onnx import ONNXSettings
from kvant.paths import cache_dir
from kvant.peer import PEERS, default_dir, get_peer
from kvant.quantize.bnb import BnbSettings
from kvant.quantize.gptq import GPTQSettings
from kvant.runtimes.reference import reference_logits, score_against
from kvant.runtimes.targets import targets
from kvant.scoring import eval_windows

LANGS = mix_proof.LANGS
UNIFORM = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs", "q3_k_m")
MIXED = ("q3_k_m", "iq4_xs", "q4_k_m", "q5_k_m")
LIMITS = PEERS["smollm2"].limits
PEER_LABEL = "SmolLM2-135M-Instruct"


def measured_on(label: str) -> str:
    """Who the numbers are from, with the peer's limits when it is the peer."""
    return f"Measured on {label}" + (f": {LIMITS}" if label == PEER_LABEL else "")


def _timed(folder: Path, make) -> float:
    """Make ``folder`` (once: a rerun reuses it) and return how long that took."""
    stamp = folder / "wall_s.txt"
    if not (folder / "manifest.json").is_file():
        started = time.perf_counter()
        make()
        stamp.write_text(f"{time.perf_counter() - started:.1f}\n")
    return float(stamp.read_text()) if stamp.is_file() else float("nan")


def uniform_part(model: Path, out: Path, calib: Path, english: Path, eval_tokens: int,
                 data_dir: Path | None) -> dict:
    """{imatrix text: {type: held-out scores}}: the uniform types without an importance
    matrix, with the Norwegian one and with the English one."""
    found = {}
    for label, imatrix, text in (("none", "none", calib), ("Norwegian", "auto", calib),
                                 ("English", "auto", english)):
        folder = out / f"uniform-{label.lower()}"
        types = tuple(t for t in UNIFORM if imatrix != "none" or not t.startswith("iq"))
        settings = GGUFSettings(types=types, calib=str(text), imatrix=imatrix,
                                imatrix_chunks=32, eval_tokens=eval_tokens)
        wall = _timed(folder, lambda f=folder, s=settings: PIPELINES["gguf"].run(
            model, f, s, source={"id": model.name}, cache_dir=cache_dir(), data_dir=data_dir))
        found[label] = {"files": read_manifest(folder)["validation"]["files"],
                        "calib": None if imatrix == "none" else
                        "UD English EWT dev" if text == english else text.name,
                        "wall_s": wall}
    return found


def checkpoint_part(model: Path, out: Path, calib: Path, eval_tokens: int,
                    data_dir: Path | None, gptq_samples: int) -> dict:
    """{name: validation} of the torch and ONNX checkpoints."""
    gptq = {"calib": str(calib), "eval_tokens": eval_tokens, "samples": gptq_samples}
    runs = {
        # 576-wide rows do not divide into groups of 128: g64 is the nearest that does
        "gptq-4bit-g64": ("gptq", GPTQSettings(bits=4, group_size=64, **gptq), {}),
        "gptq-4bit-g32": ("gptq", GPTQSettings(bits=4, group_size=32, **gptq), {}),
        "bnb-nf4": ("bnb", BnbSettings(mode="nf4", eval_tokens=eval_tokens), {}),
        "bnb-int8": ("bnb", BnbSettings(mode="int8", eval_tokens=eval_tokens), {}),
        "onnx-int4-k_quant_last": ("onnx", ONNXSettings(int4_algo="k_quant_last",
                                                        eval_tokens=eval_tokens), {}),
        "onnx-int4-from-gptq-g32": ("onnx", ONNXSettings(int4_algo="gptq", block_size=32,
                                                         eval_tokens=eval_tokens),
                                    {"gptq_dir": out / "gptq-4bit-g32"}),
    }
    return _made(model, out, runs, data_dir)


def mlx_part(model: Path, out: Path, calib: Path, eval_tokens: int,
             data_dir: Path | None) -> dict:
    """MLX 4-bit at group size 64 (mlx-lm's default) and its mix (the mix's export scores
    its uniform twin too), MLX 4-bit at group size 32, and the GGUF files of the uniform
    part's Norwegian export scored again on the same windows: MLX's CPU backend takes
    seconds per window where llama.cpp takes a fraction of one, so this part may use fewer
    --mlx-tokens than the rest."""
    settings = MLXSettings(bits=4, group_size=64, mix=True, calib=str(calib),
                           eval_tokens=eval_tokens)
    folder = out / "mlx-4bit-mix"
    found: dict = {}
    try:
        wall = _timed(folder, lambda: PIPELINES["mlx"].run(
            model, folder, settings, source={"id": model.name}, cache_dir=cache_dir(),
            data_dir=data_dir))
        v = read_manifest(folder)["validation"]
        mix = v["mix"]
        found["mlx-4bit-g64"] = {
            "mean_kld": mix["uniform_mean_kld"], "size_bytes": mix["uniform_size_bytes"],
            "top1_agreement_pct": mix["uniform_top1_agreement_pct"],
            "delta_ppl_pct": mix["uniform_delta_ppl_pct"],
            "per_language": {lang: {"mean_kld": k}
                             for lang, k in mix["uniform_per_language"].items()}}
        found["mlx-4bit-g64-mix"] = {**v, "size_bytes": mix["size_bytes"], "wall_s": wall,
                                     "published": "yes"}
    except MixWithheld as withheld:
        found["mlx-4bit-g64"] = withheld.scores["uniform"]
        found["mlx-4bit-g64-mix"] = {**withheld.scores["mix"], "published": f"no: {withheld}"}
    # group size 32 beside mlx-lm's 64: a model whose weights passed through Q4_1 (blocks
    # of 32 with a scale and a minimum) is on a grid that MLX's groups of 32 reproduce
    found.update(_made(model, out, {"mlx-4bit-g32": ("mlx", MLXSettings(
        bits=4, group_size=32, eval_tokens=eval_tokens), {})}, data_dir))
    texts = {lang: get_text(lang, cache_dir(), data_dir) for lang in LANGS}
    wins = eval_windows(model, texts, eval_tokens, settings.eval_ctx)
    gguf = out / "uniform-norwegian"
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        ref = reference_logits(model, wins, Path(scratch) / "reference")
        for target in targets(gguf):
            if target.kind and target.kind.removeprefix("gguf-") in UNIFORM:
                found[f"GGUF {target.kind.removeprefix('gguf-').upper()}"] = {
                    **score_against(target, ref, wins), "size_bytes": target.size_bytes}
    return found


def mlx_table(found: dict, command: str, label: str, eval_tokens: int) -> dict:
    """MLX uniform and mix beside the GGUF uniform files, all on the same windows: bytes,
    scores, the ratio to the MLX uniform file and to the GGUF frontier at each one's bytes."""
    points = [(f["size_bytes"], f["mean_kld"]) for n, f in found.items()
              if n.startswith("GGUF")]
    uniform = found["mlx-4bit-g64"]["mean_kld"]
    # the stand-in's KLDs are 100x a real model's smaller: six decimals where four show 0
    kld = ".6f" if max(f["mean_kld"] for f in found.values()) < 0.01 else ".4f"
    cells = []
    for name, f in sorted(found.items(), key=lambda item: -item[1]["size_bytes"]):
        frontier = uniform_frontier([p for p in points if p[0] != f["size_bytes"]],
                                    f["size_bytes"])
        cells.append([name, f"{f['size_bytes']:,}", *_scores(f, kld),
                      f"{f['mean_kld'] / uniform:.2f}" if name.startswith("mlx") else "",
                      f"{f['mean_kld'] / frontier:.2f}" if frontier else "-",
                      f.get("published", "")])
    return table_doc(
        f"MLX 4-bit and its mix on {label}, beside the GGUF uniform types (Norwegian "
        f"importance matrix) on the same {eval_tokens:,} held-out tokens per language",
        ["file", "size (bytes)", *SCORE_COLUMNS, "vs MLX 4-bit", "vs GGUF frontier",
         "published"], cells, command,
        notes=f"{measured_on(label)}; MLX scored by mlx-lm on the CPU with float32 "
              "activations; GGUF frontier: the best GGUF uniform KLD at the file's bytes, "
              "interpolated log-linearly between the two that bracket it (a GGUF row's own "
              "point left out; '-' below the smallest or above the largest GGUF file: no "
              "extrapolation); size: the model files' bytes.")


def _made(model: Path, out: Path, runs: dict, data_dir: Path | None) -> dict:
    """Run each (pipeline, settings, inputs) of ``runs`` into out/NAME once; {name: its
    validation, model files' bytes and wall time}."""
    found = {}
    for name, (key, settings, extra) in runs.items():
        folder = out / name
        wall = _timed(folder, lambda f=folder, k=key, s=settings, e=extra: PIPELINES[k].run(
            model, f, s, source={"id": model.name}, cache_dir=cache_dir(), data_dir=data_dir,
            **e))
        manifest = read_manifest(folder)
        size = sum(f["size_bytes"] for f in manifest["files"] if f["path"].endswith(
            (".safetensors", ".onnx", ".onnx.data", ".data")))
        found[name] = {**manifest["validation"], "size_bytes": size, "wall_s": wall}
    return found


def _scores(f: dict, kld: str = ".4f") -> list[str]:
    return [f"{f['mean_kld']:{kld}}", f"{f['top1_agreement_pct']:.2f}%",
            f"{f['delta_ppl_pct']:+.2f}%",
            *(f"{f['per_language'][lang]['mean_kld']:{kld}}" for lang in LANGS)]


SCORE_COLUMNS = ["mean KLD", "top-1", "ΔPPL", *(f"{lang} KLD" for lang in LANGS)]


def uniform_table(found: dict, command: str, label: str) -> dict:
    cells = []
    for t in UNIFORM:
        for imatrix, got in found.items():
            if t not in got["files"]:  # IQ types need an importance matrix
                continue
            f = got["files"][t]
            cells.append([t.upper(), imatrix if got["calib"] is None
                          else f"{imatrix} ({got['calib']})", f"{f['size_bytes']:,}",
                          *_scores(f)])
    return table_doc(f"Uniform GGUF types on {label}, without and with an importance matrix: "
                     "held-out text of five languages, KLD against the float32 model",
                     ["type", "importance matrix", "size (bytes)", *SCORE_COLUMNS], cells,
                     command, notes=f"{measured_on(label)}.")


def frontier_points(files: dict) -> list[tuple[int, float]]:
    return [(f["size_bytes"], f["mean_kld"]) for t, f in files.items()
            if not t.endswith("-mix") and "mean_kld" in f and "withheld" not in f]


def mix_table(results: dict, command: str, label: str) -> dict:
    """A row per uniform type and its -MIX by each method: bytes, KLD, the ratio to the twin
    and to the uniform frontier at the mix's bytes, and whether it was published."""
    cells = []
    methods = results["methods"]
    for t in MIXED:
        first = next(iter(methods.values()))["files"]
        twin = first[t]
        points = frontier_points(first)
        twin_frontier = uniform_frontier([p for p in points if p[0] != twin["size_bytes"]],
                                         twin["size_bytes"])
        dominated = twin_frontier is not None and twin_frontier < twin["mean_kld"]
        cells.append([t.upper(), "(llama.cpp's rule)", f"{twin['size_bytes']:,}",
                      *_scores(twin), "1.00",
                      "dominated" if dominated else "on the frontier", ""])
        for method, got in methods.items():
            f = got["files"].get(f"{t}-mix", {})
            if "mean_kld" not in f:
                cells.append([f"{t.upper()}-MIX", method, "-", *("-" for _ in SCORE_COLUMNS),
                              "-", "-", "no: " + f.get("withheld", "not made")])
                continue
            frontier = uniform_frontier(frontier_points(got["files"]), f["size_bytes"])
            cells.append([f"{t.upper()}-MIX", method, f"{f['size_bytes']:,}", *_scores(f),
                          f"{f['mean_kld'] / twin['mean_kld']:.2f}",
                          f"{f['mean_kld'] / frontier:.2f}" if frontier else "-",
                          "no: " + f["withheld"] if "withheld" in f else "yes"])
    notes = [measured_on(label),
             "uniform frontier: the best uniform KLD at the file's bytes, interpolated "
             "log-linearly between two uniform files of the same export that bracket it "
             "(Q8_0, Q6_K, Q5_K_M, Q4_K_M, IQ4_XS, Q3_K_M); a twin is dominated where that "
             "line, without it, lies below it"]
    for method, got in methods.items():
        notes.append(f"{method}: the export with every file (each mix's sensitivity, every "
                     f"file scored) {got['export_wall_s']:.0f} s")
    return table_doc(f"-MIX files on {label}, by sensitivity method, against their twin and "
                     "the uniform frontier: held-out text of five languages",
                     ["file", "sensitivity", "size (bytes)", *SCORE_COLUMNS, "vs twin",
                      "vs uniform frontier", "published"], cells, command,
                     notes="; ".join(notes) + ".")


def checkpoint_table(found: dict, gguf_files: dict, command: str, label: str,
                     what: str = "GPTQ, bitsandbytes and ONNX int4") -> dict:
    points = frontier_points(gguf_files)
    q4 = gguf_files["q4_k_m"]
    cells = [["GGUF Q4_K_M (Norwegian imatrix)", f"{q4['size_bytes']:,}", *_scores(q4), "1.00"]]
    for name, f in found.items():
        frontier = uniform_frontier(points, f["size_bytes"])
        cells.append([name, f"{f['size_bytes']:,}", *_scores(f),
                      f"{f['mean_kld'] / frontier:.2f}" if frontier else "beyond Q8_0"])
    return table_doc(f"{what} on {label}, against the GGUF uniform "
                     "frontier at their bytes: held-out text of five languages",
                     ["artifact", "weights (bytes)", *SCORE_COLUMNS, "vs GGUF frontier"],
                     cells, command, notes=f"{measured_on(label)}; weights: the "
                     "model files' bytes (safetensors or ONNX data), embeddings included.")


def _against_gguf(out: Path, found: dict, command: str, label: str, name: str,
                  what: str) -> dict | None:
    """The table of ``found`` beside the Norwegian-imatrix GGUF export of the uniform
    part (None when that part has not run into ``out``)."""
    gguf = out / "uniform-norwegian"
    if not (gguf / "manifest.json").is_file():
        return None
    doc = checkpoint_table(found, read_manifest(gguf)["validation"]["files"], command, label,
                           what)
    write_table(out / name, doc)
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calib", type=Path, required=True,
                        help="the Norwegian calibration text (importance matrix, GPTQ)")
    parser.add_argument("--model", type=Path, help="default: kvant peer smollm2")
    parser.add_argument("--label", default=PEER_LABEL)
    parser.add_argument("--parts", default="uniform,mix,checkpoints")
    parser.add_argument("--prefix", default="real",
                        help="the tables' file names: PREFIX-gguf-uniform.json, ...")
    parser.add_argument("--methods", default="fisher,proxy")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--mlx-tokens", type=int, default=0,
                        help="held-out tokens per language of the mlx part (0: --eval-tokens)")
    parser.add_argument("--data-dir", type=Path)
    # GPTQModel's 256 windows of 512 tokens take 37 min per checkpoint on 2 CPU cores; 64
    # (32,768 tokens, 57 per column of the 576-wide model) is what the checkpoints table uses
    parser.add_argument("--gptq-samples", type=int, default=64)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or get_peer("smollm2", default_dir(cache_dir(), "smollm2"))
    parts = args.parts.split(",")
    command = command_line(module="kvant.bench.studies.real_model")
    results: dict = {"model": model.name, "parts": parts}
    texts = []
    if "uniform" in parts:
        english = get_text("eng", cache_dir(), args.data_dir).path
        results["uniform"] = uniform_part(model, args.out, args.calib, english,
                                          args.eval_tokens, args.data_dir)
        doc = uniform_table(results["uniform"], command, args.label)
        write_table(args.out / f"{args.prefix}-gguf-uniform.json", doc)
        texts.append(markdown(doc))
    if "mix" in parts:
        results["mix"] = mix_proof.study(model, args.out / "mix", args.calib,
                                         args.methods.split(","), list(MIXED),
                                         args.eval_tokens, args.data_dir,
                                         uniform_only=("q8_0", "q6_k"))
        doc = mix_table(results["mix"], command, args.label)
        write_table(args.out / f"{args.prefix}-gguf-mix.json", doc)
        texts.append(markdown(doc))
    if "checkpoints" in parts:
        results["checkpoints"] = checkpoint_part(model, args.out, args.calib,
                                                 args.eval_tokens, args.data_dir,
                                                 args.gptq_samples)
        doc = _against_gguf(args.out, results["checkpoints"], command, args.label,
                            f"{args.prefix}-checkpoints.json",
                            "GPTQ, bitsandbytes and ONNX int4")
        texts += [markdown(doc)] if doc else []
    if "mlx" in parts:
        tokens = args.mlx_tokens or args.eval_tokens
        results["mlx"] = mlx_part(model, args.out, args.calib, tokens, args.data_dir)
        doc = mlx_table(results["mlx"], command, args.label, tokens)
        write_table(args.out / f"{args.prefix}-mlx.json", doc)
        texts.append(markdown(doc))
    (args.out / f"results-{'-'.join(parts)}.json").write_text(
        json.dumps(results, indent=2, default=str) + "\n")
    sys.stdout.write("\n\n".join(texts) + "\n")


if __name__ == "__main__":
    main()
