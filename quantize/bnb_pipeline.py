"""`kvant quantize bnb`: bitsandbytes NF4 / FP4 / int8 as pre-quantized checkpoints.

Users load the folder directly (`AutoModelForCausalLM.from_pretrained(folder)`) and skip
quantizing at load time; on a GPU the same folder runs bitsandbytes' CUDA kernels.

Tensor by tensor (:func:`quantize_bnb`): loading the whole model with a BitsAndBytesConfig
holds the mapped bf16 source while it quantizes (35-40 GB at 40 layers). Instead the model's
skeleton is built on the meta device and transformers' own bitsandbytes quantizer replaces
its linears (so the same modules are quantized, lm_head kept); then each tensor is read from
the safetensors files with plain reads, quantized by bitsandbytes exactly as transformers'
loader does (its Params4bit / Int8Params on the skeleton's parameter), and its module's own
state dict (bitsandbytes' serialization) goes into a shard written at SHARD_BYTES. The
folder is what `save_pretrained` writes (sharded with an index past one shard), tensor for
tensor bit-identical, and it is never a model that ran: bitsandbytes 0.50.2 on CPUs with
AVX512-BF16 writes a corrupt 4-bit checkpoint if a forward pass ran before saving. Every
number comes from a fresh reload (kvant.quantize.checkpoint).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from kvant.artifact import PipelineOutput
from kvant.model import raw_header, read_tensor, weight_files
from kvant.plan.sizes import SHARD_BYTES
from kvant.quantize.bnb import COMPUTE_DTYPES, BnbSettings
from kvant.quantize.checkpoint import Quantized, quantize_checkpoint


def bnb_config(settings: BnbSettings) -> BitsAndBytesConfig:
    if settings.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.mode,
                              bnb_4bit_use_double_quant=settings.double_quant,
                              bnb_4bit_compute_dtype=getattr(
                                  torch, COMPUTE_DTYPES[settings.compute_dtype]))


def _skeleton(model_dir: Path, settings: BnbSettings):
    """The model on the meta device with transformers' bitsandbytes quantizer applied: the
    quantized linears (bnb's Linear4bit / Linear8bitLt) where from_pretrained would put them."""
    from transformers import AutoConfig
    from transformers.quantizers import AutoHfQuantizer

    config = AutoConfig.from_pretrained(model_dir)
    quantizer = AutoHfQuantizer.from_config(bnb_config(settings), pre_quantized=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    quantizer.preprocess_model(model, device_map={"": "cpu"}, dtype=torch.bfloat16)
    config.quantization_config = bnb_config(settings)
    return model, config


def _quantized(module, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state dict bitsandbytes saves for ``module`` holding ``weight`` (bf16), quantized
    as transformers' loader does (integrations/bitsandbytes.py: Bnb4bitQuantize and
    Bnb8bitQuantize make the parameter from the skeleton's, then move it to the device)."""
    import bitsandbytes as bnb

    old = module.weight
    kwargs = {k: v for k, v in old.__dict__.items() if k != "SCB"}
    cls = bnb.nn.Params4bit if isinstance(old, bnb.nn.Params4bit) else bnb.nn.Int8Params
    module.weight = cls(weight, requires_grad=False, **kwargs).to("cpu")
    try:
        return {k: v.contiguous() for k, v in
                module.state_dict(prefix=name.removesuffix("weight")).items()}
    finally:
        module.weight = old  # back to meta: nothing kept


def quantize_bnb(model_dir: Path, out_dir: Path, settings: BnbSettings,
                 device: str = "cpu") -> dict:
    """Quantize tensor by tensor into ``out_dir`` in save_pretrained's layout (module doc).
    ``device``: where the reload runs; bitsandbytes quantizes the same on either."""
    import bitsandbytes as bnb
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    started = time.perf_counter()
    model, config = _skeleton(model_dir, settings)
    modules = dict(model.named_modules())
    quantized_types = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    shards: list[dict[str, torch.Tensor]] = [{}]
    written: list[tuple[Path, list[str]]] = []
    size = 0

    def flush() -> None:
        nonlocal size
        part = out_dir / f".shard-{len(written)}.part"
        save_file(shards[0], part, metadata={"format": "pt"})
        written.append((part, list(shards[0])))
        shards[0], size = {}, 0

    for file in weight_files(model_dir):
        for name in raw_header(file)[1]:
            tensor = read_tensor(file, name).to(torch.bfloat16)
            module = modules.get(name.removesuffix(".weight"))
            if name.endswith(".weight") and isinstance(module, quantized_types):
                got = _quantized(module, name, tensor)
            else:
                got = {name: tensor}
            del tensor
            shards[0].update(got)
            size += sum(t.numel() * t.element_size() for t in got.values())
            if size >= SHARD_BYTES:
                flush()
    if shards[0] or not written:
        flush()
    # save_pretrained's names: one model.safetensors, or numbered shards with an index
    if len(written) == 1:
        written[0][0].rename(out_dir / "model.safetensors")
    else:
        weight_map, total = {}, 0
        for i, (part, names) in enumerate(written, 1):
            final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
            part.rename(out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
            total += (out_dir / final).stat().st_size
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.save_pretrained(out_dir)
    if (model_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(model_dir).save_pretrained(out_dir)
    return {"quantize_seconds": round(time.perf_counter() - started, 1), "device": device,
            "method": "tensor by tensor (bitsandbytes through transformers' quantizer)"}


def run(model_dir: Path, out: Path, settings: BnbSettings, *, source: dict, cache_dir: Path,
        data_dir: Path | None = None, force: bool = False, progress: bool = False,
        device: str = "cpu", reference_dir: Path | None = None,
        rehearsal: bool = False) -> PipelineOutput:
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
