"""The reference forward one decoder layer at a time, for a machine whose RAM cannot hold the
checkpoint (NorMistral-11b's 23 GB of bf16 on a 24 GB CPU-only machine).

    for logits in streamed_logits(model_dir, windows, dtype="bfloat16"):  # (len, vocab) f32
        ...

As GPTQ does: every window's hidden states through one layer, then the next. The model's
skeleton is built on the meta device and each piece (the embedding, one layer, the final
norm and lm_head) is given its weights from the safetensors files with plain reads
(kvant.model.read_tensor), run on every window, and put back on the meta device, so what
is held is one layer's weights, the windows' hidden states and one window's logits, not the
model (nor the mapped pages of its files). The pieces are transformers' own modules called
as the model calls them (rotary embeddings, the causal mask, each decoder layer), so the
logits equal a whole-model forward's (tested bit for bit on the stand-in). Written here
because accelerate's disk offload streams weights per forward (per window), which re-reads
the checkpoint once for every window.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import create_causal_mask

from kvant.memory import return_freed_memory
from kvant.model import raw_header, read_tensor, weight_files


def _locations(model_dir: Path) -> dict[str, Path]:
    found = {}
    for file in weight_files(model_dir):
        found.update(dict.fromkeys(raw_header(file)[1], file))
    return found


def _materialize(module: torch.nn.Module, prefix: str, where: dict[str, Path],
                 dtype: torch.dtype) -> torch.nn.Module:
    """``module`` (on the meta device) given its weights ``prefix.*`` from the checkpoint."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in module.named_parameters():
            key = f"{prefix}.{name}"
            param.copy_(read_tensor(where[key], key))  # converted in place: no second copy
    return module


def _release(module: torch.nn.Module) -> None:
    """Back to the meta device, and the freed memory back to the kernel: without the trim
    glibc's arenas keep each layer's freed activations and RSS climbs about 30 MiB a layer
    (measured over 10 real-width layers; flat with it)."""
    module.to("meta")
    return_freed_memory()


def streamed_logits(model_dir: Path, windows: list[list[int]], dtype: str = "bfloat16",
                    threads: int = 0) -> Iterator[np.ndarray]:
    """Float32 logits (len, vocab) of each window in turn, one decoder layer at a time (module
    doc); each is made when the previous has been taken, so one window's are held."""
    if threads:
        torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    where = _locations(Path(model_dir))
    if "lm_head.weight" not in where:  # tied: the embedding is the output
        where["lm_head.weight"] = where["model.embed_tokens.weight"]
        head_key = "model.embed_tokens"
    else:
        head_key = "lm_head"
    inner = model.model
    rotary = type(inner.rotary_emb)(config=model.config)  # built here: on the CPU
    with torch.no_grad():
        embed = _materialize(inner.embed_tokens, "model.embed_tokens", where, torch_dtype)
        hidden = [embed(torch.tensor([w])) for w in windows]
        _release(embed)
        positions = [torch.arange(len(w)).unsqueeze(0) for w in windows]
        extras = [(create_causal_mask(config=model.config, inputs_embeds=h,
                                      attention_mask=None, cache=None, position_ids=p),
                   rotary(h, position_ids=p)) for h, p in zip(hidden, positions, strict=True)]
        for i, layer in enumerate(inner.layers[: config.num_hidden_layers]):
            _materialize(layer, f"model.layers.{i}", where, torch_dtype)
            hidden = [layer(h, attention_mask=mask, position_ids=p, use_cache=False,
                            position_embeddings=rope)
                      for h, p, (mask, rope) in zip(hidden, positions, extras, strict=True)]
            _release(layer)
        norm = _materialize(inner.norm, "model.norm", where, torch_dtype)
        hidden = [norm(h) for h in hidden]
        _release(norm)
        head = model.lm_head
        head.to_empty(device="cpu")
        head.weight.copy_(read_tensor(where["lm_head.weight"], f"{head_key}.weight"))
        for i in range(len(hidden)):
            logits = head(hidden[i])[0].float().numpy()
            hidden[i] = None  # each window's states go once its logits are made
            yield logits
            del logits
        _release(head)
