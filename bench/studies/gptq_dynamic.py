"""Can plain transformers load a GPTQ checkpoint with per-module bits (GPTQModel's `dynamic`)?

    python -m kvant.bench.studies.gptq_dynamic --model DIR --out DIR [--calib TEXT]

What a `gptq-mix` would need (docs/formats.md, "Per-module bits"): GPTQModel quantizes the
model at 4 bits, group size 128, with one `dynamic` rule giving layer 1's `mlp.down_proj`
8 bits, and saves it; the folder is then loaded twice, by
`AutoModelForCausalLM.from_pretrained` and by `GPTQModel.load`, and each load says what
that module became (or why it failed). Writes results.json. Prints the verdict; exits 0
either way: this records library behaviour, it tests nothing of Kvant's.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

from kvant.quantize.gptq_pipeline import calibration_samples, import_gptqmodel, working_dir

RULE = r"+:.*\.1\.mlp\.down_proj"
MODULE = "model.layers.1.mlp.down_proj"


def _shapes(folder: Path) -> dict:
    from safetensors import safe_open

    shapes = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            shapes |= {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()
                       if k.startswith(MODULE + ".q")}
    return shapes


def _module(model) -> dict:
    module = model.get_submodule(MODULE)
    return {"class": type(module).__name__, "bits": getattr(module, "bits", None),
            "qweight": list(module.qweight.shape) if hasattr(module, "qweight") else None}


def study(model_dir: Path, out: Path, calib: Path) -> dict:
    gptqmodel = import_gptqmodel()
    folder = out / "checkpoint"
    if not (folder / "config.json").is_file():
        samples = calibration_samples(model_dir, calib.read_text(), 16, 256)
        config = gptqmodel.QuantizeConfig(bits=4, group_size=128,
                                          dynamic={RULE: {"bits": 8}})
        with working_dir(out):
            model = gptqmodel.GPTQModel.load(str(model_dir), config, device="cpu")
            model.quantize(samples, batch_size=1, calibration_data_min_length=1)
            model.save(str(folder))
            del model
    saved = json.loads((folder / "config.json").read_text())["quantization_config"]
    results = {"versions": {p: version(p) for p in ("gptqmodel", "optimum", "transformers")},
               "saved_dynamic": saved.get("dynamic"), "saved_shapes": _shapes(folder)}
    from transformers import AutoModelForCausalLM

    try:
        results["transformers"] = _module(
            AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu"))
    except Exception as error:  # the finding, not a failure of this study
        results["transformers"] = {"error": f"{type(error).__name__}: {error}"[:300]}
    results["gptqmodel"] = _module(gptqmodel.GPTQModel.load(str(folder), device="cpu").model)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calib", type=Path,
                        default=Path("../shared/data/calib/nor.calib-1000.txt"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = study(args.model.resolve(), args.out.resolve(), args.calib)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    sys.stdout.write(json.dumps({k: results[k] for k in
                                 ("versions", "saved_shapes", "transformers", "gptqmodel")},
                                indent=2) + "\n")


if __name__ == "__main__":
    main()
