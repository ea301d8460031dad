"""`kvant quantize gptq`: GPTQ through GPTQModel, calibrated on Norwegian text.

GPTQModel is AutoGPTQ's maintained successor and the GPTQ path transformers 5 uses. It
quantizes layer by layer (one decoder layer's activations on the device at a time, the rest
offloaded), which is what lets 11.4B fit a 24 GB GPU. The checkpoint is written in the
`gptq` checkpoint_format (GPTQ v1 packing with a quantize_config / quantization_config that
transformers, vLLM and SGLang read); GPTQModel's internal v2 layout is converted at save.

Hazards handled (measured on this machine): on few cores GPTQModel needs
GPTQMODEL_CPU_WORKERS, else "Virtual pool ... requests 2 workers but parent 'cpu' only has 1";
the in-memory model right after quantize() gives garbage logits, so validation always reloads
from disk; calibration texts of 10 tokens or fewer are dropped silently, so samples are cut to
exactly --seqlen tokens and counted; it writes a logs/ folder into the working directory, so
it runs inside the staging folder's scratch space.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from tokenizers import Tokenizer

from kvant.artifact import PipelineOutput, refuse_existing
from kvant.data import encode_stream, get_mix, paragraphs
from kvant.errors import DataError
from kvant.memory import peak_rss_mib
from kvant.quantize.checkpoint import Quantized, quantize_checkpoint
from kvant.quantize.gptq import GPTQSettings, check_divides


def calibration_samples(model_dir: Path, text: str, samples: int, seqlen: int) -> list[dict]:
    """Cut the calibration text into ``samples`` windows of exactly ``seqlen`` HF tokens."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = encode_stream(tok, paragraphs(text))
    n = min(samples, len(ids) // seqlen)
    if n == 0:
        raise DataError(f"the calibration text gives {len(ids)} tokens, fewer than one "
                        f"--seqlen {seqlen} sample; pass a longer text or a smaller --seqlen")
    return [{"input_ids": ids[i * seqlen:(i + 1) * seqlen],
             "attention_mask": [1] * seqlen} for i in range(n)]


def import_gptqmodel():
    # GPTQModel sizes its CPU worker pool from this variable and fails on 2-core machines
    # without it; a user's own setting wins. Imported here, not at the top: the variable
    # must be set before GPTQModel's import reads it.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    import gptqmodel

    return gptqmodel


@contextlib.contextmanager
def working_dir(path: Path):
    """GPTQModel writes logs/ into the current directory: keep it in scratch space."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def forget_folders(path: Path, folders: tuple[Path, ...]) -> None:
    """Drop from the JSON file ``path`` every setting whose value names one of ``folders``:
    GPTQModel saves its ``offload_to_disk_path``, a scratch folder of the machine that made
    the checkpoint and gone once it is published."""
    if not path.is_file():
        return
    named = tuple(str(f) for f in folders)

    def keep(value):
        if isinstance(value, dict):
            return {k: keep(v) for k, v in value.items()
                    if not (isinstance(v, str) and v.startswith(named))}
        return value

    data = json.loads(path.read_text(encoding="utf-8"))
    cleaned = keep(data)
    if cleaned != data:
        path.write_text(json.dumps(cleaned, indent=2) + "\n", encoding="utf-8")


def quantize_gptq(model_dir: Path, out_dir: Path, settings: GPTQSettings, samples: list[dict],
                  device: str = "cpu", scratch: Path | None = None) -> dict:
    """Quantize and save into ``out_dir`` (which must exist); return timing facts.

    ``scratch`` holds GPTQModel's logs/ and its layer offload (model-sized for 11.4B);
    default: a folder inside ``out_dir`` that is removed afterwards.
    """
    gptqmodel = import_gptqmodel()
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    own_scratch = scratch is None
    scratch = Path(scratch or out_dir / ".scratch").resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    config = gptqmodel.QuantizeConfig(bits=settings.bits, group_size=settings.group_size,
                                      desc_act=settings.desc_act, sym=settings.sym,
                                      damp_percent=settings.damp,
                                      offload_to_disk_path=str(scratch / "offload"))
    started = time.perf_counter()
    with working_dir(scratch):
        model = gptqmodel.GPTQModel.load(str(model_dir), config, device=device)
        model.quantize(samples, batch_size=1, calibration_data_min_length=1)
        model.save(str(out_dir))
        del model  # its in-memory weights are not valid after quantize(); never score them
    if own_scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    for name in ("config.json", "quantize_config.json"):
        forget_folders(out_dir / name, (scratch, out_dir))
    seconds = time.perf_counter() - started
    (out_dir / "quant_log.csv").unlink(missing_ok=True)
    facts = {"quantize_seconds": round(seconds, 1), "device": device,
             "checkpoint_format": "gptq", "process_peak_rss_mib": peak_rss_mib()}
    if device.startswith("cuda"):
        import torch  # already loaded by GPTQModel; only asked for on a GPU

        facts["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return facts


def run(model_dir: Path, out: Path, settings: GPTQSettings, *, source: dict, cache_dir: Path,
        data_dir: Path | None = None, force: bool = False, progress: bool = False,
        device: str = "cpu", reference_dir: Path | None = None,
        rehearsal: bool = False) -> PipelineOutput:
    """`kvant quantize gptq`: quantize, reload from disk, score, publish ``out``."""
    refuse_existing(out, force)
    check_divides(model_dir, settings.group_size)
    calib = get_mix(settings.calib, cache_dir, data_dir, progress)
    samples = calibration_samples(model_dir, calib.read(), settings.samples, settings.seqlen)

    def quantize(folder: Path, scratch: Path) -> Quantized:
        facts = quantize_gptq(model_dir, folder, settings, samples, device, scratch)
        warnings = [] if len(samples) >= settings.samples else [
            f"calibration text gave {len(samples)} samples of {settings.seqlen} tokens, "
            f"fewer than the {settings.samples} asked for"]
        return Quantized(
            facts={"calibration_samples": len(samples), **facts},
            title=f"{Path(source.get('id', model_dir.name)).name} GPTQ {settings.bits}-bit",
            tags=["gptq", f"{settings.bits}bit", "gptqmodel"], data=[calib],
            warnings=warnings,
            description=(
                f"GPTQ {settings.bits}-bit, group size {settings.group_size}, desc_act "
                f"{settings.desc_act}, sym {settings.sym}, made with GPTQModel on "
                f"{len(samples)} samples of {settings.seqlen} tokens of `{calib.name}`.\n\n"
                "Load it with `AutoModelForCausalLM.from_pretrained(folder)` (GPTQModel "
                "installed); vLLM and SGLang read its `quantization_config` (checkpoint_format "
                "`gptq`)."))

    return quantize_checkpoint(model_dir, out, settings, fmt="gptq", kind=settings.kind,
                               source=source, cache_dir=cache_dir, data_dir=data_dir,
                               force=force, quantize=quantize, device=device,
                               reference_dir=reference_dir, rehearsal=rehearsal)
