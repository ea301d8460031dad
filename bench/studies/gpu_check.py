"""The GPU check: the CUDA paths of bnb nf4/int8 and GPTQ (Marlin/ExLlama kernels), with
VRAM and tokens/s, written to one results folder. Sized to finish in under 8 minutes on an
H100/H200; never required by the tests (CI has no GPU).

    python -m kvant.bench.studies.gpu_check --out "$OUT"            # builds the stand-in first
    python -m kvant.bench.studies.gpu_check --model DIR --out DIR   # any llama-family checkpoint

Without ../shared/data it needs the text sets' files under --data-dir (offline machines).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from kvant.bench.run import run_bench
from kvant.bench.settings import BenchSettings
from kvant.data import get_mix, get_text
from kvant.paths import cache_dir
from kvant.quantize import bnb_pipeline, gptq_pipeline
from kvant.quantize.bnb import BnbSettings
from kvant.quantize.gptq import GPTQSettings
from kvant.runtimes.reference import reference_logits
from kvant.scoring import drift, eval_windows
from kvant.tiny import TinyRecipe, build_tiny, default_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvant.bench.studies.gpu_check")
    parser.add_argument("--model", type=Path, help="default: the stand-in, built now")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/ud"))
    parser.add_argument("--calib", default="../shared/data/calib/nor.calib-1000.txt")
    parser.add_argument("--ctx", default="512,2048,8192")
    parser.add_argument("--lang", default="nob", help="held-out text set for the quality rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.stderr.write("gpu_check: no CUDA device; nothing to check\n")
        return 2
    started = time.perf_counter()
    model = args.model or _tiny(args.data_dir, args.calib)
    args.out.mkdir(parents=True, exist_ok=True)
    log = {"device": torch.cuda.get_device_name(), "model": str(model), "steps": {},
           "reference_cuda_vs_cpu": _cuda_vs_cpu(model, args.lang, args.data_dir)}
    artifacts = []
    for mode in ("nf4", "int8"):
        out = args.out / f"bnb-{mode}"
        t = time.perf_counter()
        bnb_pipeline.run(model, out, BnbSettings(mode=mode, eval_langs=(args.lang,),
                                                 eval_tokens=1024),
                         source={"id": str(model)}, cache_dir=cache_dir(),
                         data_dir=args.data_dir, force=True, device="cuda")
        log["steps"][f"bnb-{mode}"] = round(time.perf_counter() - t, 1)
        artifacts.append(out)
    if importlib.util.find_spec("gptqmodel") is None:
        log["steps"]["gptq-4bit"] = "skipped: gptqmodel is not installed"
    else:
        out = args.out / "gptq-4bit"
        t = time.perf_counter()
        gptq_pipeline.run(model, out, GPTQSettings(calib=args.calib, samples=64, seqlen=512,
                                                   eval_langs=(args.lang,), eval_tokens=1024),
                          source={"id": str(model)}, cache_dir=cache_dir(),
                          data_dir=args.data_dir, force=True, device="cuda")
        log["steps"]["gptq-4bit"] = round(time.perf_counter() - t, 1)
        artifacts.append(out)
    settings = BenchSettings(langs=(args.lang,), ctx=tuple(args.ctx.split(",")), repeats=3,
                             quality_tokens=2048, device="cuda")
    run_bench(artifacts, model, settings, args.out / "bench", cache_dir=cache_dir(),
              data_dir=args.data_dir)
    results = json.loads((args.out / "bench" / "results.json").read_text())
    log["kernels"] = _kernels(artifacts)
    log["total_s"] = round(time.perf_counter() - started, 1)
    log["bench"] = {name: {"speed": e["speed"], "mean_kld": e.get("quality", {}).get(
                               args.lang, {}).get("mean_kld")}
                    for name, e in results["targets"].items()}
    (args.out / "gpu_check.json").write_text(json.dumps(log, indent=2) + "\n")
    sys.stdout.write(json.dumps(log, indent=2) + "\n")
    return 0


def _cuda_vs_cpu(model: Path, lang: str, data_dir: Path) -> dict:
    """The reference's logits on CUDA against the CPU path, on the same windows."""
    texts = {lang: get_text(lang, cache_dir(), data_dir)}
    wins = eval_windows(model, texts, 1024, 256)
    with tempfile.TemporaryDirectory() as tmp:
        cpu = reference_logits(model, wins, Path(tmp) / "cpu")
        cuda = reference_logits(model, wins, Path(tmp) / "cuda", device="cuda")
        d = drift(cpu[lang], cuda[lang], wins[lang])
        diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                   for a, b in zip(cpu[lang], cuda[lang], strict=True))
    return {"dtype_cpu": cpu.dtype, "dtype_cuda": cuda.dtype, "max_abs_logit_diff": diff,
            "mean_kld": d.mean_kld, "top1_agreement_pct": d.top1_agreement_pct}


def _kernels(artifacts: list[Path]) -> dict:
    """Which linear class each artifact runs on CUDA (Marlin / ExLlama / bnb kernels)."""
    out = {}
    for path in artifacts:
        model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")
        out[path.name] = type(model.model.layers[0].mlp.down_proj).__name__
        del model
    return out


def _tiny(data_dir: Path, calib: str) -> Path:
    train = get_mix(calib, cache_dir(), data_dir)
    recipe = TinyRecipe()
    return build_tiny(default_dir(cache_dir(), recipe, train), train,
                      get_text("nob", cache_dir(), data_dir), recipe)


if __name__ == "__main__":
    sys.exit(main())
