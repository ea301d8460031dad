"""`kvant quantize bnb`: bitsandbytes NF4 / FP4 / int8 as pre-quantized checkpoints.

Users load the folder directly (`AutoModelForCausalLM.from_pretrained(folder)`) and skip
quantizing at load time; on a GPU the same folder runs bitsandbytes' CUDA kernels.

Hazard handled (measured on this machine): bitsandbytes 0.50.2 on CPUs with AVX512-BF16
writes a corrupt 4-bit checkpoint (without double quant) if any forward pass ran before
saving, and a model loaded from a bnb checkpoint cannot be re-saved. So the model is saved
straight after loading, before any forward pass, and every number comes from a fresh reload
(kvant.quantize.checkpoint).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from kvant.artifact import Made
from kvant.quantize.bnb import COMPUTE_DTYPES, BnbSettings
from kvant.quantize.checkpoint import Quantized, quantize_checkpoint


def bnb_config(settings: BnbSettings) -> BitsAndBytesConfig:
    if settings.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.mode,
                              bnb_4bit_use_double_quant=settings.double_quant,
                              bnb_4bit_compute_dtype=getattr(
                                  torch, COMPUTE_DTYPES[settings.compute_dtype]))


def quantize_bnb(model_dir: Path, out_dir: Path, settings: BnbSettings,
                 device: str = "cpu") -> dict:
    """Load with bitsandbytes and save at once (no forward pass in between)."""
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(
        settings), device_map=device, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    del model
    return {"quantize_seconds": round(time.perf_counter() - started, 1), "device": device}


def run(model_dir: Path, out: Path, settings: BnbSettings, *, source: dict, cache_dir: Path,
        data_dir: Path | None = None, force: bool = False, progress: bool = False,
        device: str = "cpu", reference_dir: Path | None = None,
        rehearsal: bool = False) -> Made:
    """`kvant quantize bnb`: quantize, save, reload from disk, score, publish ``out``."""

    def quantize(folder: Path, scratch: Path) -> Quantized:
        name = Path(source.get("id", model_dir.name)).name
        return Quantized(
            facts=quantize_bnb(model_dir, folder, settings, device),
            title=f"{name} bitsandbytes {settings.mode.upper()}",
            tags=["bitsandbytes", settings.mode],
            description=(
                f"bitsandbytes {settings.mode} (double quant {settings.double_quant}, compute "
                f"{settings.compute_dtype}), pre-quantized: load it with "
                "`AutoModelForCausalLM.from_pretrained(folder)`, no quantizing at load time."))

    return quantize_checkpoint(model_dir, out, settings, fmt="bnb", kind=settings.kind,
                               source=source, cache_dir=cache_dir, data_dir=data_dir,
                               force=force, quantize=quantize, device=device,
                               reference_dir=reference_dir, rehearsal=rehearsal)
