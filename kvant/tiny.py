"""The small NorMistral stand-in: same architecture and tokenizer design, a few MB.

The real NorMistral-11b-long cannot be downloaded on every machine, so every pipeline is
exercised on this model. It keeps what matters for quantization and export:

- the tokenizer pipeline of ltgoslo/norallm ``pretraining/stage_1_tokenizer_change.py``
  (byte-level BPE with ignore_merges, no byte fallback; prepended space, NFKC and the
  newline rule; the Tekken split regex; 24-character chunks), trained on Norwegian text;
- MistralForCausalLM with NorMistral's proportions: GQA 4:1, head_dim 128 decoupled from
  hidden_size / heads (as NorMistral's 32 x 128 = 4096 inside a 5120 model), untied
  embeddings, RMSNorm eps 1e-5, rope theta 1e6, 32,768 positions, and every linear
  dimension a multiple of 256 (GPTQ groups of 128, GGUF K-quant blocks of 256);
- weights trained for a few minutes, so that quantization error shows in perplexity.

The build is deterministic and cached by a content hash of its recipe and training text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from kvant.artifact import ArtifactWriter, read_manifest
from kvant.data import TextFile, encode_stream, paragraphs
from kvant.errors import ArtifactError, SettingsError
from kvant.tokenization import SPECIAL_TOKENS, build_tokenizer, save_tokenizer

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when the build changes in a way the recipe fields do not show

# From NorMistral-11b-warm/-long config.json (norallm on the Hugging Face Hub).
NORMISTRAL = {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "mask_token_id": 4,
              "tie_word_embeddings": False, "hidden_act": "silu", "sliding_window": None}
@dataclass(frozen=True)
class TinyRecipe:
    """How the stand-in is built; its hash names the cached folder."""

    vocab_size: int = 4096
    """BPE vocabulary incl. 16 specials; a multiple of 256 (it is lm_head's output width)."""
    hidden_size: int = 256
    """Model width; a multiple of 256 so every matmul input splits into K-quant blocks, as
    NorMistral's 5,120 does (a multiple of 32 is accepted: real small models such as 576-wide
    ones, where llama.cpp falls back to 32-blocks for K-quant types)."""
    intermediate_size: int = 768
    """SwiGLU width; NorMistral's ratio 14336/5120 = 2.8, rounded to a multiple of 256 (of 32
    accepted, as hidden_size)."""
    num_hidden_layers: int = 4
    """Decoder layers (NorMistral has 40)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 1
    """GQA 4:1 as NorMistral's 32/8."""
    head_dim: int = 128
    """NorMistral's head_dim; like NorMistral, heads x head_dim differs from hidden_size."""
    seq_len: int = 256
    """Training window in tokens."""
    batch_size: int = 8
    """Training windows per step."""
    steps: int = 300
    """Training steps (AdamW, cosine schedule)."""
    lr: float = 3e-3
    """Peak learning rate."""
    seed: int = 20240601
    """Seed of the initial weights and the training windows."""
    max_train_chars: int = 1_000_000
    """Characters of training text used (UD train splits are larger than needed)."""
    eval_tokens: int = 8192
    """Held-out tokens of the evaluation text scored for the perplexity report."""

    def __post_init__(self) -> None:
        if self.vocab_size % 256:
            raise SettingsError(f"vocab_size={self.vocab_size} must be a multiple of 256")
        # GGUF's smallest blocks are 32 values: every matmul input width must split into them
        # (o_proj's, heads x head_dim, always does: head_dim is 64 or 128)
        for name in ("hidden_size", "intermediate_size"):
            width = getattr(self, name)
            if width % 32:
                raise SettingsError(f"{name}={width} must be a multiple of 32 (GGUF blocks; "
                                    "256 splits into K-quant blocks as NorMistral's widths do)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise SettingsError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim not in (64, 128):
            raise SettingsError(f"head_dim={self.head_dim}: NorMistral uses 128; use 64 or 128")
        if self.vocab_size <= len(SPECIAL_TOKENS) + 256:
            raise SettingsError("vocab_size must exceed the 16 specials and 256 byte symbols")
        if min(self.seq_len, self.batch_size, self.steps, self.eval_tokens) <= 0:
            raise SettingsError("seq_len, batch_size, steps and eval_tokens must be positive")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def recipe_hash(recipe: TinyRecipe, train_text: TextFile) -> str:
    blob = json.dumps({"recipe": asdict(recipe), "version": RECIPE_VERSION,
                       "train_sha256": train_text.sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_dir(cache_dir: Path, recipe: TinyRecipe, train_text: TextFile) -> Path:
    """Where the stand-in of this recipe lives in the cache; its name names the GGUF files."""
    return Path(cache_dir) / "tiny" / f"normistral-tiny-{recipe_hash(recipe, train_text)}"


def model_config(recipe: TinyRecipe):
    from transformers import MistralConfig

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim")
    return MistralConfig(**{k: getattr(recipe, k) for k in keys}, **NORMISTRAL)


def perplexity(model, ids, window: int) -> float:
    """Perplexity over non-overlapping windows of ``window`` tokens (all tokens scored once)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor(ids[start:start + window + 1]).unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total += loss.item()
            count += chunk.shape[1] - 1
    return math.exp(total / count)


def _train(model, ids: list[int], recipe: TinyRecipe, progress: bool) -> list[float]:
    import torch
    from tqdm.auto import tqdm

    data = torch.tensor(ids)
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    warmup = max(1, recipe.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / recipe.steps))))
    losses = []
    model.train()
    for _ in tqdm(range(recipe.steps), desc="training stand-in", disable=not progress):
        starts = torch.randint(0, len(data) - recipe.seq_len, (recipe.batch_size,),
                               generator=gen)
        batch = torch.stack([data[s:s + recipe.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def build_tiny(out: Path, train_text: TextFile, eval_text: TextFile,
               recipe: TinyRecipe = TinyRecipe(), force: bool = False,
               progress: bool = False) -> Path:
    """Build the stand-in into ``out`` (reused when its recipe hash matches) and return it.

    >>> build_tiny(Path("~/.cache/kvant/tiny"), get_text(...), get_text("nob"))  # doctest: +SKIP
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    digest = recipe_hash(recipe, train_text)
    if out.exists() and not force:
        try:
            if read_manifest(out)["settings"].get("recipe_hash") == digest:
                logger.info("reusing %s (recipe %s)", out, digest)
                return out
        except (ArtifactError, KeyError, json.JSONDecodeError):
            pass
        raise ArtifactError(f"'{out}' exists and holds something else; pass --force to "
                            "rebuild it or choose another --out")

    torch.manual_seed(recipe.seed)
    text = train_text.read()[: recipe.max_train_chars]
    units = paragraphs(text)
    started = time.perf_counter()
    tok = build_tokenizer(units, recipe.vocab_size)
    train_ids = encode_stream(tok, units)
    eval_ids = encode_stream(tok, paragraphs(eval_text.read()))[: recipe.eval_tokens]
    if len(train_ids) < 4 * recipe.seq_len:
        raise SettingsError(f"training text '{train_text.path}' gives only {len(train_ids)} "
                            "tokens; pass a longer text")

    model = AutoModelForCausalLM.from_config(model_config(recipe), dtype=torch.float32)
    ppl_untrained = perplexity(model, eval_ids, recipe.seq_len)
    losses = _train(model, train_ids, recipe, progress)
    train_seconds = time.perf_counter() - started

    with ArtifactWriter(out, fmt="tiny", force=True) as art:
        model.to(torch.bfloat16).save_pretrained(art.dir)
        save_tokenizer(tok, art.dir, NORMISTRAL["max_position_embeddings"])
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).save_pretrained(art.dir)
        reloaded = AutoModelForCausalLM.from_pretrained(art.dir, dtype=torch.bfloat16)
        ppl_trained = perplexity(reloaded, eval_ids, recipe.seq_len)
        n_params = sum(p.numel() for p in reloaded.parameters())
        art.source = {"id": "kvant-tiny", "recipe_hash": digest}
        art.settings = {**asdict(recipe), "recipe_hash": digest, "recipe_version": RECIPE_VERSION}
        art.data = [train_text.as_manifest(), eval_text.as_manifest()]
        art.validation = {
            "eval_set": eval_text.name,
            "eval_tokens": len(eval_ids),
            "ppl_untrained": round(ppl_untrained, 3),
            "ppl_trained_bf16": round(ppl_trained, 3),
            "train_tokens": len(train_ids),
            "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "build_seconds": round(train_seconds, 1),
            "n_params": n_params,
        }
        art.tags = ["stand-in", "tiny"]
        art.title = "Kvant's NorMistral stand-in"
        art.card_body = (
            "A small MistralForCausalLM with NorMistral-11b-long's architecture and "
            f"tokenizer design ({n_params / 1e6:.1f}M parameters, {recipe.num_hidden_layers} "
            f"layers, hidden {recipe.hidden_size}, vocabulary {recipe.vocab_size}), trained "
            f"for {recipe.steps} steps on Norwegian text so that quantization error shows.\n\n"
            f"Held-out perplexity on `{eval_text.name}` ({len(eval_ids)} tokens): "
            f"{ppl_untrained:.1f} untrained, {ppl_trained:.1f} trained (bf16).\n\n"
            "It is a test fixture, not a language model to use: its numbers say nothing about "
            "NorMistral's quality.")
    logger.info("stand-in: ppl %s -> %.1f on %s", ppl_untrained, ppl_trained, eval_text.name)
    return out
