"""Synthetic checkpoints with NorMistral-11b-long's exact shapes and random weights.

Speed and memory do not depend on weight values, so hardware benchmarks and scale tests run
on these. They are marked (`kvant_synthetic` in config.json, `synthetic` in the manifest) and
every quality measurement refuses them.

Tensors are written one at a time straight into the safetensors files: the header (names,
dtypes, shapes, offsets) is computed first, then each tensor is generated in row blocks and
appended, so peak RSS stays far below one tensor (the embedding is 500 MiB). Why not
safetensors' save_file: it needs a whole shard's tensors in memory at once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from kvant.artifact import ArtifactWriter, check_free_space
from kvant.errors import SettingsError
from kvant.memory import peak_rss_mib
from kvant.registry import Registry
from kvant.tiny import TinyRecipe
from kvant.tokenization import build_tokenizer, save_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """A llama-family architecture's sizes."""

    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    context: int
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-5

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, shape) of every tensor, in the order transformers saves them."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            out += [(p + "input_layernorm.weight", (self.hidden,)),
                    (p + "self_attn.q_proj.weight", (q, self.hidden)),
                    (p + "self_attn.k_proj.weight", (kv, self.hidden)),
                    (p + "self_attn.v_proj.weight", (kv, self.hidden)),
                    (p + "self_attn.o_proj.weight", (self.hidden, q)),
                    (p + "post_attention_layernorm.weight", (self.hidden,)),
                    (p + "mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                    (p + "mlp.up_proj.weight", (self.intermediate, self.hidden)),
                    (p + "mlp.down_proj.weight", (self.hidden, self.intermediate))]
        out += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab,
                                                                           self.hidden))]
        return out

    def n_params(self) -> int:
        total = 0
        for _, shape in self.tensors():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def config(self) -> dict:
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab, "max_position_embeddings": self.context,
                "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_eps,
                "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": None,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
                "torch_dtype": "bfloat16", "kvant_synthetic": True}


SHAPES: Registry[Shape] = Registry("shape")
# norallm/normistral-11b-long config.json (the -warm config with 32,768 positions)
SHAPES.add("normistral-11b-long", Shape(40, 5120, 14336, 32, 8, 128, 51200, 32768))
# the stand-in's shapes: `kvant release recipes/stand-in.toml --rehearse N` in seconds
_TINY = TinyRecipe()
SHAPES.add("kvant-stand-in", Shape(
    _TINY.num_hidden_layers, _TINY.hidden_size, _TINY.intermediate_size,
    _TINY.num_attention_heads, _TINY.num_key_value_heads, _TINY.head_dim, _TINY.vocab_size,
    _TINY.seq_len))


def _header(tensors, dtype: str = "BF16") -> tuple[bytes, list[int]]:
    header, offset, sizes = {}, 0, []
    for name, shape in tensors:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
        sizes.append(n)
    header["__metadata__"] = {"format": "pt", "kvant_synthetic": "true"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw, sizes


def _shards(tensors, max_shard_bytes: int) -> list[list]:
    shards, current, size = [], [], 0
    for name, shape in tensors:
        n = 2
        for d in shape:
            n *= d
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    return [*shards, current]


def write_weights(folder: Path, shape: Shape, seed: int = 0, max_shard_bytes: int = 2 << 30,
                  progress: bool = False) -> int:
    """Sharded bf16 safetensors plus index; returns total bytes. Norms 1, weights N(0, 0.02)."""
    import torch
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    shards = _shards(shape.tensors(), max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    bar = tqdm(total=len(shape.tensors()), desc="synthetic weights", disable=not progress)
    for shard, file_name in zip(shards, names, strict=True):
        header, _ = _header(shard)
        with (folder / file_name).open("wb") as handle:
            handle.write(header)
            for name, dims in shard:
                if len(dims) == 1:
                    handle.write(torch.ones(dims, dtype=torch.bfloat16).view(torch.int16)
                                 .numpy().tobytes())
                else:  # row blocks of <= 64 MiB of float32: RSS never holds a whole tensor
                    rows = max(1, (64 << 20) // (4 * dims[1]))
                    for start in range(0, dims[0], rows):
                        block = torch.randn((min(rows, dims[0] - start), dims[1]),
                                            generator=gen) * 0.02
                        handle.write(block.to(torch.bfloat16).view(torch.int16).numpy()
                                     .tobytes())
                n = 1
                for d in dims:
                    n *= d
                total += 2 * n
                weight_map[name] = file_name
                bar.update()
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def synthetic_tokenizer(texts: list[str], vocab: int):
    """NorMistral's pipeline trained on ``texts``, padded with <unused_N> to ``vocab``."""
    from tokenizers import AddedToken

    tok = build_tokenizer(texts, vocab)
    missing = vocab - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([AddedToken(f"<unused_{i}>", special=True)
                                for i in range(missing)])
    return tok


def synthesize(out: Path, shape_name: str, texts: list[str], layers: int | None = None,
               force: bool = False, progress: bool = False) -> Path:
    """`kvant synth`: a synthetic checkpoint of ``shape_name`` (optionally fewer layers)."""
    shape = SHAPES[shape_name]
    if layers is not None:
        if not 1 <= layers <= shape.n_layers:
            raise SettingsError(f"--layers {layers}: use 1 to {shape.n_layers}")
        shape = replace(shape, n_layers=layers)
    check_free_space(Path(out).parent, shape.n_params() * 2 + (1 << 30))
    with ArtifactWriter(out, fmt="synthetic", force=force) as art:
        total = write_weights(art.dir, shape, progress=progress)
        config = shape.config()
        (art.dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok = synthetic_tokenizer(texts, shape.vocab)
        save_tokenizer(tok, art.dir, shape.context)
        art.source = {"id": f"synthetic:{shape_name}", "layers": shape.n_layers}
        art.settings = {"shape": shape_name, "layers": shape.n_layers, "seed": 0,
                        "synthetic": True}
        art.validation = {"n_params": shape.n_params(), "weight_bytes": total,
                          "synthetic": True, "peak_rss_mib": peak_rss_mib()}
        art.tags = ["synthetic"]
        art.title = f"Synthetic {shape_name} ({shape.n_layers} layers)"
        art.card_body = (f"**Random weights** with the exact shapes of {shape_name} "
                         f"({shape.n_layers} layers, {shape.n_params() / 1e9:.2f}B parameters). "
                         "For speed and memory benchmarks only: it generates noise, and Kvant "
                         "refuses to measure its perplexity or KL divergence.")
    return out
