"""`kvant quantize bnb`: bitsandbytes NF4 / FP4 / int8 as pre-quantized checkpoints.

Users load the folder directly (`AutoModelForCausalLM.from_pretrained(folder)`) and skip
quantizing at load time; on a GPU the same folder runs bitsandbytes' CUDA kernels.

Hazard handled (measured on this machine): bitsandbytes 0.50.2 on CPUs with AVX512-BF16
writes a corrupt 4-bit checkpoint (without double quant) if any forward pass ran before
saving, and a model loaded from a bnb checkpoint cannot be re-saved. So the model is saved
straight after loading, before any forward pass, and every number comes from a fresh reload.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kvant.data import EvalSettings
from kvant.errors import SettingsError
from kvant.registry import unknown_key_message

logger = logging.getLogger(__name__)

MODES = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class BnbSettings(EvalSettings):
    """bitsandbytes settings; stored in the manifest."""

    mode: str = "nf4"
    double_quant: bool = False
    """Quantize the 4-bit scales too (about 0.4 bits/weight less)."""
    compute_dtype: str = "bf16"
    """dtype of the 4-bit matmuls (bf16, fp16, fp32)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise SettingsError(unknown_key_message("bnb mode", self.mode, MODES))
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise SettingsError(unknown_key_message("compute dtype", self.compute_dtype,
                                                    COMPUTE_DTYPES))
        if self.mode == "int8" and self.double_quant:
            raise SettingsError("--double-quant applies to nf4/fp4, not int8")


def bnb_config(settings: BnbSettings):
    import torch
    from transformers import BitsAndBytesConfig

    if settings.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.mode,
                              bnb_4bit_use_double_quant=settings.double_quant,
                              bnb_4bit_compute_dtype=getattr(
                                  torch, COMPUTE_DTYPES[settings.compute_dtype]))


def quantize_bnb(model_dir: Path, out_dir: Path, settings: BnbSettings,
                 device: str = "cpu") -> dict:
    """Load with bitsandbytes and save at once (no forward pass in between)."""
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(
        settings), device_map=device, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    del model
    return {"quantize_seconds": round(time.perf_counter() - started, 1), "device": device}


def run(model_dir: Path, out: Path, settings: BnbSettings, *, source: dict, cache_dir: Path,
        data_dir: Path | None = None, force: bool = False, device: str = "cpu") -> Path:
    """`kvant quantize bnb`: quantize, save, reload from disk, score, publish ``out``."""
    import shutil

    from kvant.artifact import ArtifactWriter, refuse_existing, settings_dict
    from kvant.model import refuse_quantized
    from kvant.quantize.gptq import TOKENIZER_FILES
    from kvant.scoring import drift_per_language, drift_table, hf_logits, reference

    refuse_existing(out, force)
    refuse_quantized(model_dir)
    texts, wins, ref = reference(model_dir, settings.eval_langs, settings.eval_tokens,
                                 settings.eval_ctx, cache_dir, data_dir)
    with ArtifactWriter(out, fmt="bnb", force=force) as art:
        facts = quantize_bnb(model_dir, art.dir, settings, device)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, art.dir / name)
        logits = {lang: hf_logits(art.dir, w, dtype=None) for lang, w in wins.items()}
        art.validation = {"reference": "source model, float32", "reloaded_from_disk": True,
                          **facts, **drift_per_language(ref, logits, wins)}
        art.source, art.settings = source, settings_dict(settings)
        art.data = [t.as_manifest() for t in texts.values()]
        art.tags = ["bitsandbytes", settings.mode]
        name = Path(source.get("id", model_dir.name)).name
        art.title = f"{name} bitsandbytes {settings.mode.upper()}"
        art.card_body = (
            f"bitsandbytes {settings.mode} (double quant {settings.double_quant}, compute "
            f"{settings.compute_dtype}), pre-quantized: load it with "
            "`AutoModelForCausalLM.from_pretrained(folder)`, no quantizing at load time.\n\n"
            "Drift against the source model on identical held-out token ids:\n\n"
            + drift_table(art.validation))
    return out
