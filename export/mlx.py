"""`kvant export mlx` settings (light: the CLI builds its flags from :class:`MLXSettings`).

The work is in mlx_pipeline.py: mlx-lm's own convert and quantize, for Apple silicon (Metal),
and on any CPU through MLX's CPU backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvant.data import DEFAULT_CALIB, EvalSettings
from kvant.errors import SettingsError
from kvant.registry import unknown_key_message

# MLX's affine quantization: bits per weight and weights per scale it supports
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class MLXSettings(EvalSettings):
    """MLX export settings; stored in the manifest."""

    bits: int = 4
    """Bits per quantized weight (MLX affine: 2, 3, 4, 5, 6 or 8)."""
    group_size: int = 64
    """Weights per scale and bias (32, 64 or 128); a tensor whose rows it does not divide
    stays unquantized, as mlx-lm leaves it."""
    dtype: str = "bfloat16"
    """What the unquantized tensors, scales and biases are stored in: bfloat16 or float16."""
    mix: bool = False
    """Per-tensor bits (3, 4, 5, 6 or 8 at --group-size) chosen by the Fisher sensitivity
    within the uniform --bits file's bytes; published only if held-out text scores it better
    than the uniform file (in the mean, no language worse), else the uniform file is."""
    calib: str = DEFAULT_CALIB
    """--mix's calibration text: a text file, a set name, or a weighted mix of them."""
    mix_tokens: int = 2048
    """Calibration tokens --mix's sensitivity is measured on."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in BITS:
            raise SettingsError(f"--bits {self.bits}: MLX quantizes to "
                                f"{', '.join(map(str, BITS))} bits; pick one of those")
        if self.group_size not in GROUP_SIZES:
            raise SettingsError(f"--group-size {self.group_size}: MLX takes "
                                f"{', '.join(map(str, GROUP_SIZES))}; pick one of those")
        if self.dtype not in DTYPES:
            raise SettingsError(unknown_key_message("dtype", self.dtype, DTYPES))
        if self.mix_tokens <= 0:
            raise SettingsError("--mix-tokens must be positive")

    @property
    def kind(self) -> str:
        """The artifact kind (kvant.plan's key): mlx-4bit-g64, or mlx-4bit-g64-mix for a
        published mix (no larger than the uniform file)."""
        return f"mlx-{self.bits}bit-g{self.group_size}" + ("-mix" if self.mix else "")
