"""bitsandbytes nf4 / fp4 / int8: pre-quantized checkpoints, reloaded and scored."""

from __future__ import annotations

import json

import pytest

from kvant.artifact import read_manifest, verify_artifact
from kvant.errors import ArtifactError, ModelError, SettingsError
from kvant.quantize.bnb import BnbSettings
from kvant.quantize.bnb_pipeline import run
from tests.conftest import UD_DIR, cpu_gpu_drift, run_kvant


def test_checkpoints_load_pre_quantized(bnb_artifacts):
    import torch
    from transformers import AutoModelForCausalLM

    for mode, out in bnb_artifacts.items():
        assert verify_artifact(out) == []
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "bitsandbytes"
        model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
        layer = type(model.model.layers[0].mlp.down_proj).__name__
        assert layer == ("Linear8bitLt" if mode == "int8" else "Linear4bit")
        if mode != "int8":
            assert config["bnb_4bit_quant_type"] == mode
            weight = model.model.layers[0].mlp.down_proj.weight
            assert weight.dtype == torch.uint8  # stored packed, not re-quantized at load
        assert read_manifest(out)["validation"]["reloaded_from_disk"] is True
        assert read_manifest(out)["kinds"] == {out.name: f"bnb-{mode}"}


def _tensors(folder):
    """{name: tensor} of every safetensors file of a checkpoint folder."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("mode,double_quant", [("nf4", False), ("nf4", True), ("fp4", False),
                                               ("int8", False)])
def test_tensor_by_tensor_is_bit_identical_to_transformers_loading(tiny_model, tmp_path,
                                                                   mode, double_quant):
    """The streaming writer against what transformers itself writes after loading the whole
    model with a BitsAndBytesConfig and saving it: the same tensors, byte for byte, and the
    same config."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvant.quantize.bnb_pipeline import bnb_config, quantize_bnb

    settings = BnbSettings(mode=mode, double_quant=double_quant)
    theirs = tmp_path / "transformers"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, device_map="cpu",
                                                 quantization_config=bnb_config(settings),
                                                 dtype=torch.bfloat16)
    model.save_pretrained(theirs)  # straight after loading: no forward pass (module doc)
    del model
    ours = tmp_path / "kvant"
    ours.mkdir()
    quantize_bnb(tiny_model, ours, settings)
    a, b = _tensors(theirs), _tensors(ours)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].reshape(-1).view(torch.uint8).equal(
            b[name].reshape(-1).view(torch.uint8)), name
    for config in ("config.json", "generation_config.json"):
        assert json.loads((ours / config).read_text()) == \
            json.loads((theirs / config).read_text()), config


def test_a_sharded_checkpoint_reloads_with_every_tensor(tiny_model, tmp_path, monkeypatch):
    """Past one shard the writer leaves save_pretrained's sharded layout (numbered files and
    an index); each shard is bounded, and transformers reloads it with the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    import kvant.quantize.bnb_pipeline as pipeline

    monkeypatch.setattr(pipeline, "SHARD_BYTES", 400_000)
    out = tmp_path / "sharded"
    out.mkdir()
    pipeline.quantize_bnb(tiny_model, out, BnbSettings(mode="nf4"))
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 3 and files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert not list(out.glob(".shard-*"))
    biggest = 4096 * 256 * 2  # the embedding in bf16, the largest tensor that crosses
    assert all(f.stat().st_size <= 400_000 + biggest + 4096 for f in files)
    whole = tmp_path / "whole"
    whole.mkdir()
    monkeypatch.setattr(pipeline, "SHARD_BYTES", 2**30)
    pipeline.quantize_bnb(tiny_model, whole, BnbSettings(mode="nf4"))
    a, b = _tensors(out), _tensors(whole)
    assert sorted(a) == sorted(b) and all(a[n].equal(b[n]) for n in a)
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    ids = torch.tensor([[1, 50, 60, 70]])
    again = AutoModelForCausalLM.from_pretrained(whole, device_map="cpu")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_int8_beats_nf4_beats_fp4(bnb_artifacts):
    kld = {m: read_manifest(out)["validation"]["mean_kld"] for m, out in bnb_artifacts.items()}
    assert kld["int8"] < kld["nf4"] < kld["fp4"]
    for out in bnb_artifacts.values():
        per = read_manifest(out)["validation"]["per_language"]
        assert set(per) == {"nob", "nno", "sme", "dan", "swe"}
        assert all(abs(d["delta_ppl_pct"]) < 20 for d in per.values())


def test_errors(bnb_artifacts, tiny_model, cache_dir, tmp_path):
    with pytest.raises(ModelError, match="already quantized \\(bitsandbytes\\)"):
        run(bnb_artifacts["nf4"], tmp_path / "x", BnbSettings(), source={},
            cache_dir=cache_dir, data_dir=UD_DIR)
    with pytest.raises(ArtifactError, match="already exists"):
        run(tiny_model, bnb_artifacts["nf4"], BnbSettings(), source={}, cache_dir=cache_dir,
            data_dir=UD_DIR)
    with pytest.raises(SettingsError, match="did you mean 'nf4'"):
        BnbSettings(mode="nf5")
    with pytest.raises(SettingsError, match="not int8"):
        BnbSettings(mode="int8", double_quant=True)


def test_cli_quantize_bnb(tiny_model, tmp_path):
    out = tmp_path / "cli-bnb"
    result = run_kvant("--no-progress", "quantize", "bnb", "--model", str(tiny_model), "--out",
                       str(out), "--mode", "nf4", "--double-quant", "--eval-langs", "nob",
                       "--eval-tokens", "512", "--device", "cpu",
                       env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    assert manifest["settings"]["double_quant"] is True
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_use_double_quant"] is True


@pytest.mark.gpu
def test_bnb_cuda(bnb_artifacts):
    """On a GPU bitsandbytes runs its CUDA library (not the CPU one), every quantized layer
    sits on the GPU, and the logits match the CPU path's: mean KLD below 1e-3 over 64
    positions, top-1 agreement of at least 95%."""
    from bitsandbytes import cextension

    assert cextension.BNB_BACKEND == "CUDA" and cextension.lib.compiled_with_cuda
    for mode, out in bnb_artifacts.items():
        kld, top1, layers = cpu_gpu_drift(out)
        assert layers == ({"Linear8bitLt"} if mode == "int8" else {"Linear4bit"}), layers
        assert kld < 1e-3 and top1 >= 0.95, (mode, kld, top1)

