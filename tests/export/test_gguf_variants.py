"""The converter beyond the stand-in: LlamaForCausalLM, tied embeddings, K-quant fallbacks."""

from __future__ import annotations

import json
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


def _with_config(tiny_model, folder, **changes):
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_trained_context_not_the_placeholder_is_written(tiny_model, tmp_path, cache_dir):
    """NorMistral-11b-warm's config says 1,024,000 (Mistral-Nemo's value): llama.cpp tools
    would size a 160 GB KV cache from it. The -long model's trained 32,768 is written."""
    import gguf

    from kvant.export import gguf_pipeline
    from kvant.export.gguf import GGUFSettings
    from tests.conftest import UD_DIR

    def context_of(folder, **settings):
        out = tmp_path / f"{folder.name}-{len(list(tmp_path.iterdir()))}"
        made = gguf_pipeline.run(folder, out, GGUFSettings(types=("bf16",), imatrix="none",
                                 eval_langs=("nob",), eval_tokens=256,
                                 **settings),
                                 source={"id": str(folder)}, cache_dir=cache_dir, data_dir=UD_DIR)
        manifest = json.loads((made.out / "manifest.json").read_text())
        reader = gguf.GGUFReader(str(next(made.out.glob("*.gguf"))))
        return int(reader.get_field("llama.context_length").contents()), manifest["warnings"]

    long = _with_config(tiny_model, tmp_path / "src" / "normistral-11b-long",
                        max_position_embeddings=1_024_000)
    context, warnings = context_of(long)
    assert context == 32768 and any("1,024,000" in w for w in warnings)
    other = _with_config(tiny_model, tmp_path / "src" / "another-model",
                         max_position_embeddings=1_024_000)
    context, warnings = context_of(other)
    assert context == 1_024_000 and any("--context-length" in w for w in warnings)
    assert context_of(other, context_length=4096) == (4096, [])


def test_sliding_window_is_refused_not_dropped(tiny_model, tmp_path):
    from tests.conftest import run_kvant

    model = _with_config(tiny_model, tmp_path / "swa", sliding_window=4096)
    result = run_kvant("export", "gguf", "--model", str(model), "--out", str(tmp_path / "g"),
                       "--types", "bf16", "--imatrix", "none")
    assert result.returncode == 2 and "sliding-window attention (4096 tokens)" in result.stderr
    assert not (tmp_path / "g").exists()
