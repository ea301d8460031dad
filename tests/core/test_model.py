"""Model folder validation: each bad input gets its own clear error."""

from __future__ import annotations

import json

import pytest

from kvant.errors import ModelError
from kvant.model import looks_like_hub_id, model_info, resolve_model


def test_info_reads_headers_without_loading(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    info = model_info(resolve_model(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    assert info.n_params == sum(p.numel() for p in model.parameters())
    assert (info.architecture, info.dtype, info.tied_embeddings) == ("MistralForCausalLM",
                                                                     "BF16", False)
    assert info.n_heads == 4 * info.n_kv_heads and info.context_length == 32768
    assert info.tokenizer.startswith("BPE (4096 entries, byte-level, prepended space")
    assert info.size_bytes > (tiny_model / "model.safetensors").stat().st_size


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_model(tmp_path / "nowhere")


def test_folder_without_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model(model_copy)


def test_malformed_config(model_copy):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        resolve_model(model_copy)


def test_folder_without_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no \\*.safetensors weights"):
        resolve_model(model_copy)


def test_unsupported_architecture(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="GPT2LMHeadModel; Kvant supports MistralForCausalLM"):
        resolve_model(model_copy)


def test_truncated_safetensors(model_copy):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        resolve_model(model_copy)


def test_corrupt_safetensors(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="truncated or corrupt"):
        resolve_model(model_copy)


def test_missing_shard(model_copy):
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="lacks shard"):
        resolve_model(model_copy)


def test_hub_ids_and_paths_are_told_apart():
    assert looks_like_hub_id("norallm/normistral-11b-long")
    assert not looks_like_hub_id("./models/normistral")
    assert not looks_like_hub_id("/models/normistral")
    assert not looks_like_hub_id("a/b/c")
