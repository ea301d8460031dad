"""The converter beyond the stand-in: LlamaForCausalLM, tied embeddings, K-quant fallbacks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from kvant.export.gguf_convert import convert
from kvant.export.gguf_quantize import quantize
from tests.conftest import logits_of


@pytest.fixture(scope="module")
def tied_llama(tiny_model, tmp_path_factory):
    """A random LlamaForCausalLM with tied embeddings and a 320-wide MLP (not a multiple of
    256, so K-quants must fall back on ffn_down), using the stand-in's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=320,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, tie_word_embeddings=True, rope_theta=500000.0,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out = tmp_path_factory.mktemp("llama") / "tied-llama"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, out / name)
    return out


def test_tied_llama_converts_and_matches_transformers(tied_llama, tmp_path):
    import gguf

    f32 = tmp_path / "tied-F32.gguf"
    summary = convert(tied_llama, f32, "f32")
    names = {t.name for t in gguf.GGUFReader(str(f32)).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # llama.cpp ties
    field = gguf.GGUFReader(str(f32)).get_field("llama.rope.freq_base").contents()
    assert field == 500000.0 and summary["skipped_tensors"] == []
    ids = list(range(16, 16 + 200))
    ref = logits_of(tied_llama, [ids])[0]
    got = logits_of(f32, [ids])[0]
    assert float(np.abs(ref - got).max()) < 1e-3 * float(np.abs(ref).max())


def test_k_quant_fallbacks_are_counted(tied_llama, tmp_path):
    bf16 = tmp_path / "tied-BF16.gguf"
    convert(tied_llama, bf16, "bf16")
    result = quantize(bf16, tmp_path / "tied-Q4_K_M.gguf", "q4_k_m", None, 2)
    # ffn_down's rows are 320 wide in both layers: no 256-blocks, so they fall back
    assert result["fallback_tensors"] >= 2
