"""`kvant quantize gptq` settings (light: the CLI builds its flags from :class:`GPTQSettings`).

The work is in gptq_pipeline.py: GPTQ through GPTQModel, calibrated on Norwegian text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvant.data import DEFAULT_CALIB, EvalSettings
from kvant.errors import SettingsError
from kvant.model import read_safetensors_header, refuse_quantized, weight_files


@dataclass(frozen=True)
class GPTQSettings(EvalSettings):
    """GPTQ settings; stored in the manifest."""

    bits: int = 4
    """Bits per weight: 2, 3, 4 or 8."""
    group_size: int = 128
    """Columns per scale; -1 for one scale per row."""
    desc_act: bool = False
    """Quantize columns by decreasing activation (better quality, slower kernels)."""
    sym: bool = True
    """Symmetric quantization (no zero point; the kernels' usual choice)."""
    damp: float = 0.01
    """Hessian dampening, as a fraction of its mean diagonal."""
    calib: str = DEFAULT_CALIB
    """Calibration text: a text file, a set name, or a weighted mix of them
    (nob-train:0.5,nno-train:0.3,...)."""
    samples: int = 256
    """Calibration windows."""
    seqlen: int = 512
    """Tokens per calibration window."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (2, 3, 4, 8):
            raise SettingsError(f"--bits {self.bits}: GPTQ kernels take 2, 3, 4 or 8")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 32):
            raise SettingsError(f"--group-size {self.group_size}: use -1 or a positive "
                                "multiple of 32 (128 is the usual choice)")
        if not 0 < self.damp < 1:
            raise SettingsError(f"--damp {self.damp}: use a fraction such as 0.01")
        for option in ("samples", "seqlen", "eval_tokens", "eval_ctx"):
            if getattr(self, option) <= 10:
                raise SettingsError(f"--{option.replace('_', '-')} {getattr(self, option)}: "
                                    "GPTQ needs more than 10")

    @property
    def kind(self) -> str:
        """The artifact kind (kvant.plan's key): gptq-4bit-g128, gptq-8bit-g-1."""
        return f"gptq-{self.bits}bit-g{self.group_size}"


def check_divides(model_dir: Path, group_size: int) -> None:
    """Every linear layer's input width must split into whole groups; name the first that
    does not (GPTQ would otherwise fail deep inside packing, or silently skip the layer)."""
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
