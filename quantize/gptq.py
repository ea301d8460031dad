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
exactly --seqlen tokens and counted.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kvant.data import DEFAULT_CALIB, EvalSettings, get_mix
from kvant.errors import DataError, SettingsError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class GPTQSettings(EvalSettings):
    """GPTQ settings; stored in the manifest."""

    bits: int = 4
    group_size: int = 128
    """Columns per scale; -1 for one scale per row."""
    desc_act: bool = False
    """Quantize columns by decreasing activation (better quality, slower kernels)."""
    sym: bool = True
    damp: float = 0.01
    """Hessian dampening, as a fraction of its mean diagonal."""
    calib: str = DEFAULT_CALIB
    samples: int = 256
    seqlen: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (2, 3, 4, 8):
            raise SettingsError(f"--bits {self.bits}: GPTQ kernels take 2, 3, 4 or 8")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 32):
            raise SettingsError(f"--group-size {self.group_size}: use -1 or a positive "
                                "multiple of 32 (128 is the usual choice)")
        if not 0 < self.damp < 1:
            raise SettingsError(f"--damp {self.damp}: use a fraction such as 0.01")
        if min(self.samples, self.seqlen, self.eval_tokens, self.eval_ctx) <= 10:
            raise SettingsError("samples, seqlen and the eval sizes must be above 10")


def check_divides(model_dir: Path, group_size: int) -> None:
    """Every linear layer's input width must split into whole groups; name the first that
    does not (GPTQ would otherwise fail deep inside packing, or silently skip the layer)."""
    from kvant.model import read_safetensors_header, refuse_quantized, weight_files

    refuse_quantized(model_dir)
    if group_size == -1:
        return
    for file in weight_files(model_dir):
        for name, spec in read_safetensors_header(file).items():
            if (len(spec["shape"]) == 2 and "layers." in name
                    and spec["shape"][1] % group_size):
                raise SettingsError(
                    f"{name.removesuffix('.weight')}: input width {spec['shape'][1]} does not "
                    f"divide into groups of {group_size}; choose a --group-size that divides it "
                    "or -1")


def calibration_samples(model_dir: Path, text: str, samples: int, seqlen: int) -> list[dict]:
    """Cut the calibration text into ``samples`` windows of exactly ``seqlen`` HF tokens."""
    from tokenizers import Tokenizer

    from kvant.data import encode_stream, paragraphs

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = encode_stream(tok, paragraphs(text))
    n = min(samples, len(ids) // seqlen)
    if n == 0:
        raise DataError(f"the calibration text gives {len(ids)} tokens, fewer than one "
                        f"--seqlen {seqlen} sample; pass a longer text or a smaller --seqlen")
    return [{"input_ids": ids[i * seqlen:(i + 1) * seqlen],
             "attention_mask": [1] * seqlen} for i in range(n)]


def _gptqmodel():
    # GPTQModel sizes its CPU worker pool from this variable and fails on 2-core machines
    # without it; a user's own setting wins.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    import gptqmodel

    return gptqmodel


def quantize_gptq(model_dir: Path, out_dir: Path, settings: GPTQSettings, samples: list[dict],
                  device: str = "cpu") -> dict:
    """Quantize and save into ``out_dir`` (which must exist); return timing facts."""
    gptqmodel = _gptqmodel()
    config = gptqmodel.QuantizeConfig(bits=settings.bits, group_size=settings.group_size,
                                      desc_act=settings.desc_act, sym=settings.sym,
                                      damp_percent=settings.damp)
    started = time.perf_counter()
    model = gptqmodel.GPTQModel.load(str(model_dir), config, device=device)
    model.quantize(samples, batch_size=1, calibration_data_min_length=1)
    model.save(str(out_dir))
    seconds = time.perf_counter() - started
    del model  # its in-memory weights are not valid after quantize(); never score them
    # GPTQModel re-saves the tokenizer with transformers' Mistral regex "fix" switched on,
    # which would change NorMistral's pre-tokenizer: ship the original files instead.
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    (out_dir / "quant_log.csv").unlink(missing_ok=True)
    facts = {"quantize_seconds": round(seconds, 1), "device": device,
             "checkpoint_format": "gptq", "process_peak_rss_mib": _peak_rss_mib()}
    if device.startswith("cuda"):
        import torch

        facts["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return facts


def _peak_rss_mib() -> float:
    from kvant.memory import peak_rss_mib

    return peak_rss_mib()




def run(model_dir: Path, out: Path, settings: GPTQSettings, *, source: dict, cache_dir: Path,
        data_dir: Path | None = None, force: bool = False, device: str = "cpu") -> Path:
    """`kvant quantize gptq`: quantize, reload from disk, score, publish ``out``."""
    from kvant.artifact import ArtifactWriter, refuse_existing, settings_dict
    from kvant.scoring import drift_per_language, drift_table, hf_logits, reference

    refuse_existing(out, force)
    check_divides(model_dir, settings.group_size)
    calib = get_mix(settings.calib, cache_dir, data_dir)
    samples = calibration_samples(model_dir, calib.read(), settings.samples, settings.seqlen)
    texts, wins, ref = reference(model_dir, settings.eval_langs, settings.eval_tokens,
                                 settings.eval_ctx, cache_dir, data_dir)
    with ArtifactWriter(out, fmt="gptq", force=force) as art:
        if len(samples) < settings.samples:
            art.warn(f"calibration text gave {len(samples)} samples of {settings.seqlen} "
                     f"tokens, fewer than the {settings.samples} asked for")
        facts = quantize_gptq(model_dir, art.dir, settings, samples, device)
        logits = {lang: hf_logits(art.dir, w, dtype=None) for lang, w in wins.items()}
        art.validation = {"reference": "source model, float32", "reloaded_from_disk": True,
                          "calibration_samples": len(samples), **facts,
                          **drift_per_language(ref, logits, wins)}
        art.source, art.settings = source, settings_dict(settings)
        art.data = [calib.as_manifest(), *(t.as_manifest() for t in texts.values())]
        art.tags = ["gptq", f"{settings.bits}bit", "gptqmodel"]
        art.title = f"{Path(source.get('id', model_dir.name)).name} GPTQ {settings.bits}-bit"
        art.card_body = (
            f"GPTQ {settings.bits}-bit, group size {settings.group_size}, desc_act "
            f"{settings.desc_act}, sym {settings.sym}, made with GPTQModel on "
            f"{len(samples)} samples of {settings.seqlen} tokens of `{calib.name}`.\n\n"
            "Load it with `AutoModelForCausalLM.from_pretrained(folder)` (GPTQModel installed); "
            "vLLM and SGLang read its `quantization_config` (checkpoint_format `gptq`).\n\n"
            "Drift against the source model on identical held-out token ids:\n\n"
            + drift_table(art.validation))
    return out
