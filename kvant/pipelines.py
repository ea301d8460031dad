"""The registry of pipelines: one key names the module, the CLI verb and the artifact folder.

Modules are imported only when a pipeline is used, so `kvant --help` stays instant.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvant.registry import Registry


@dataclass(frozen=True)
class Pipeline:
    group: str
    """CLI group: export or quantize."""
    settings_path: str
    """module:Class of its frozen settings dataclass."""
    run_path: str
    """module:function(model_dir, out, settings, *, source, cache_dir, data_dir, force, ...)."""
    folder: Callable[[object], str]
    """The artifact folder's suffix for given settings."""
    help: str

    def _load(self, path: str):
        module, name = path.split(":")
        return getattr(importlib.import_module(module), name)

    @property
    def settings(self):
        return self._load(self.settings_path)

    def run(self, model_dir: Path, out: Path, settings, **kwargs) -> Path:
        """Run with the keyword arguments its function takes (progress, device, ...)."""
        function = self._load(self.run_path)
        accepted = inspect.signature(function).parameters
        return function(model_dir, out, settings,
                        **{k: v for k, v in kwargs.items() if k in accepted})


PIPELINES: Registry[Pipeline] = Registry("pipeline")
PIPELINES.add("gguf", Pipeline(
    "export", "kvant.export.gguf:GGUFSettings", "kvant.export.gguf_pipeline:export_gguf",
    lambda s: "gguf", "GGUF for llama.cpp: bf16 and llama.cpp's quant types, Norwegian "
    "importance matrix, every file validated"))
PIPELINES.add("onnx", Pipeline(
    "export", "kvant.export.onnx:ONNXSettings", "kvant.export.onnx:run",
    lambda s: f"onnx-{s.precision}", "ONNX Runtime GenAI: fp32/fp16/int4 with KV cache, "
    "logits-verified"))
PIPELINES.add("gptq", Pipeline(
    "quantize", "kvant.quantize.gptq:GPTQSettings", "kvant.quantize.gptq:run",
    lambda s: f"gptq-{s.bits}bit", "GPTQ through GPTQModel, calibrated on Norwegian text"))
PIPELINES.add("bnb", Pipeline(
    "quantize", "kvant.quantize.bnb:BnbSettings", "kvant.quantize.bnb:run",
    lambda s: f"bnb-{s.mode}", "bitsandbytes nf4 / fp4 / int8"))
