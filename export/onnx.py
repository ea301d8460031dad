"""`kvant export onnx` settings (light: the CLI builds its flags from :class:`ONNXSettings`).

The work is in onnx_pipeline.py: ONNX Runtime GenAI models with KV cache, fp32 / fp16 / int4.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvant.data import EvalSettings
from kvant.errors import SettingsError
from kvant.registry import unknown_key_message

PRECISIONS = ("fp32", "fp16", "int4")
# the GenAI builder's int4 weight quantizers (its `algo_config`): round to nearest; k_quant
# (llama.cpp-style per-block scale search); k_quant with lm_head in int8 (`_last`), and also
# llama.cpp's sensitive layers in int8 (`_mixed`); or the layers' int4 taken from a GPTQ
# checkpoint (GPTQModel, calibrated on Norwegian: the builder's pre-quantized path, which
# reads the packed 4-bit tensors and never holds the model in float32), lm_head int8 by
# round to nearest
INT4_ALGOS = ("rtn", "k_quant", "k_quant_last", "k_quant_mixed", "gptq")
PROVIDERS = ("cpu", "cuda", "dml")


@dataclass(frozen=True)
class ONNXSettings(EvalSettings):
    """ONNX export settings; stored in the manifest."""

    precision: str = "int4"
    """fp32 (CPU), fp16 (cuda or dml) or int4 (4-bit weights, MatMulNBits)."""
    provider: str = "cpu"
    """Execution provider the model is built for: cpu, cuda or dml (DirectML)."""
    block_size: int = 32
    """int4: weights per scale (MatMulNBits block); 128 is smaller, 32 more accurate with
    round-to-nearest (with k_quant the stand-in measured them alike)."""
    accuracy_level: int = 4
    """int4 on CPU: MatMulNBits compute type (0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8)."""
    int4_algo: str = "k_quant_last"
    """int4 weight quantizer: rtn, k_quant, k_quant_last (default: k_quant, lm_head int8),
    k_quant_mixed, or gptq: from a GPTQ checkpoint of the model (--gptq DIR; in a release the
    recipe's own), 4-bit with group size = --block-size (docs/formats.md, "ONNX int4")."""
    context_length: int = 0
    """Trained context the model is built for (0: NorMistral's known value, else
    config.json); GenAI's max_length and the rotary caches are sized from it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.context_length < 0:
            raise SettingsError(f"--context-length {self.context_length}: give a token count, "
                                "or 0 for the model's trained context")
        if self.precision not in PRECISIONS:
            raise SettingsError(unknown_key_message("precision", self.precision, PRECISIONS))
        if self.provider not in PROVIDERS:
            raise SettingsError(unknown_key_message("provider", self.provider, PROVIDERS))
        if self.precision == "fp16" and self.provider == "cpu":
            raise SettingsError("fp16 is built for --provider cuda or dml (ONNX Runtime's CPU "
                                "path is fp32 or int4); on a CPU use fp32 or int4")
        if self.precision == "fp32" and self.provider != "cpu":
            # the GenAI builder's CUDA/DirectML graphs are fp16 or int4: an fp32 build for
            # them was reported to end in ONNX Runtime's "invalid model", after 51 s of work
            raise SettingsError(f"fp32 is built for --provider cpu only; for {self.provider} "
                                "use --precision fp16 or int4")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise SettingsError(f"--block-size {self.block_size}: use 16, 32, 64, 128 or 256")
        if self.int4_algo not in INT4_ALGOS:
            raise SettingsError(unknown_key_message("int4 algorithm", self.int4_algo,
                                                    INT4_ALGOS))
        if self.int4_algo == "gptq" and self.precision != "int4":
            raise SettingsError(f"--int4-algo gptq builds int4 models; --precision "
                                f"{self.precision} takes the float weights")
        if self.accuracy_level not in range(5):
            raise SettingsError(f"--accuracy-level {self.accuracy_level}: use 0 to 4")

    @property
    def kind(self) -> str:
        """The artifact kind (kvant.plan's key): onnx-int4-b32, onnx-fp16."""
        block = f"-b{self.block_size}" if self.precision == "int4" else ""
        return f"onnx-{self.precision}{block}"
