"""`kvant quantize bnb` settings (light: the CLI builds its flags from :class:`BnbSettings`).

The work is in bnb_pipeline.py: bitsandbytes NF4 / FP4 / int8 as pre-quantized checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvant.data import EvalSettings
from kvant.errors import SettingsError
from kvant.registry import unknown_key_message

MODES = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class BnbSettings(EvalSettings):
    """bitsandbytes settings; stored in the manifest."""

    mode: str = "nf4"
    """nf4 (4-bit NormalFloat), fp4 (4-bit float) or int8 (LLM.int8 with outliers in
    16 bits)."""
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

    @property
    def kind(self) -> str:
        """The artifact kind (kvant.plan's key): bnb-nf4, bnb-nf4-dq, bnb-int8."""
        return f"bnb-{self.mode}" + ("-dq" if self.double_quant else "")
