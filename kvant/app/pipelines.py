"""The registry of pipelines: one key names the module, the CLI verb and the artifact folder.

App layer. The settings classes are light modules imported here; each pipeline's
implementation imports its engines (torch, GPTQModel, llama.cpp, ONNX Runtime) at its top,
so it is imported inside the runner below, only when that pipeline runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvant.artifact import PipelineOutput
from kvant.errors import SettingsError
from kvant.export.gguf import GGUFSettings
from kvant.export.mlx import MLXSettings
from kvant.export.onnx import ONNXSettings
from kvant.quantize.bnb import BnbSettings
from kvant.quantize.gptq import GPTQSettings
from kvant.registry import Registry


def _run_gguf(model_dir: Path, out: Path, settings: GGUFSettings, **kwargs) -> PipelineOutput:
    from kvant.export import gguf_pipeline  # heavy: gguf-py, torch, llama.cpp

    return gguf_pipeline.run(model_dir, out, settings, **kwargs)


def _run_onnx(model_dir: Path, out: Path, settings: ONNXSettings, **kwargs) -> PipelineOutput:
    from kvant.export.onnx_pipeline import run  # heavy: onnxruntime, transformers

    return run(model_dir, out, settings, **kwargs)


def _run_mlx(model_dir: Path, out: Path, settings: MLXSettings, **kwargs) -> PipelineOutput:
    try:
        from kvant.export.mlx_pipeline import run  # heavy: mlx, mlx-lm, torch
    except ImportError as exc:
        raise SettingsError(f"kvant export mlx needs MLX ({exc.name} is missing); install it "
                            "with pip install 'kvant[mlx]' (macOS or Linux)") from exc

    return run(model_dir, out, settings, **kwargs)


def _run_gptq(model_dir: Path, out: Path, settings: GPTQSettings, **kwargs) -> PipelineOutput:
    from kvant.quantize.gptq_pipeline import run  # heavy: GPTQModel

    return run(model_dir, out, settings, **kwargs)


def _run_bnb(model_dir: Path, out: Path, settings: BnbSettings, **kwargs) -> PipelineOutput:
    from kvant.quantize.bnb_pipeline import run  # heavy: transformers, bitsandbytes

    return run(model_dir, out, settings, **kwargs)


@dataclass(frozen=True)
class Pipeline:
    group: str
    """CLI group: export or quantize."""
    settings: type
    """Its frozen settings dataclass (the CLI's flags are made from its fields)."""
    run: Callable[..., PipelineOutput]
    """run(model_dir, out, settings, *, source, cache_dir, data_dir, force, progress, device)."""
    suffix: Callable[[object], str]
    """The artifact folder's suffix for given settings: <model>-<suffix>."""
    help: str
    inputs: tuple[tuple[str, str], ...] = ()
    """Artifacts besides the model that a run may read: (name, help); the CLI's --NAME DIR
    is passed to run() as NAME_dir."""

    def folder(self, model_name: str, settings) -> str:
        """The one naming rule for artifact folders (CLI default and release alike)."""
        return f"{model_name}-{self.suffix(settings)}"


PIPELINES: Registry[Pipeline] = Registry("pipeline")
PIPELINES.add("gguf", Pipeline(
    "export", GGUFSettings, _run_gguf, lambda s: "gguf",
    "GGUF for llama.cpp: bf16 and llama.cpp's quant types, Norwegian importance matrix, "
    "every file validated"))
PIPELINES.add("onnx", Pipeline(
    "export", ONNXSettings, _run_onnx, lambda s: f"onnx-{s.precision}",
    "ONNX Runtime GenAI: fp32/fp16/int4 with KV cache, logits-verified",
    (("gptq", "with --int4-algo gptq: the GPTQ checkpoint of --model whose 4-bit weights the "
              "int4 model takes (kvant quantize gptq --group-size = --block-size)"),)))
PIPELINES.add("mlx", Pipeline(
    "export", MLXSettings, _run_mlx, lambda s: f"mlx-{s.bits}bit" + ("-mix" if s.mix else ""),
    "MLX for Apple silicon (mlx-lm, LM Studio): 2-8 bit affine through mlx-lm's convert"))
PIPELINES.add("gptq", Pipeline(
    "quantize", GPTQSettings, _run_gptq, lambda s: f"gptq-{s.bits}bit",
    "GPTQ through GPTQModel, calibrated on Norwegian text"))
PIPELINES.add("bnb", Pipeline(
    "quantize", BnbSettings, _run_bnb, lambda s: f"bnb-{s.mode}",
    "bitsandbytes nf4 / fp4 / int8"))
