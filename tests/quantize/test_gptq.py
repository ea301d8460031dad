"""GPTQ through GPTQModel on the stand-in, via the console script."""

from __future__ import annotations

import json

import pytest

from kvant.artifact import read_manifest, verify_artifact
from kvant.errors import DataError, SettingsError
from kvant.quantize.gptq import GPTQSettings, check_divides
from kvant.quantize.gptq_pipeline import calibration_samples
from kvant.scoring import drift_per_language
from tests.conftest import (
    CALIB_FILE,
    GPTQ_EVAL_TOKENS,
    UD_DIR,
    cpu_gpu_drift,
    logits_of,
    reference_for,
    run_kvant,
)


def _rtn_4bit_g128(model):
    """Round-to-nearest on GPTQ's own symmetric 4-bit grid, same groups: the baseline."""
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "layers." in name:
                w = module.weight.float()
                groups = w.reshape(w.shape[0], -1, 128)
                scale = 2 * groups.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 15
                q = (torch.round(groups / scale) + 8).clamp(0, 15)
                module.weight.copy_(((q - 8) * scale).reshape(w.shape))
    return model


def test_checkpoint_format_and_reload(gptq_artifact, tiny_model):
    from transformers import AutoModelForCausalLM

    assert verify_artifact(gptq_artifact) == []
    config = json.loads((gptq_artifact / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"], config["sym"],
            config["desc_act"], config["checkpoint_format"]) == ("gptq", 4, 128, True, False,
                                                                 "gptq")
    # the original tokenizer, not GPTQModel's re-save with the Mistral regex "fix"
    assert (gptq_artifact / "tokenizer.json").read_bytes() == (
        tiny_model / "tokenizer.json").read_bytes()
    assert "fix_mistral_regex" not in (gptq_artifact / "tokenizer_config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(gptq_artifact, device_map="cpu")
    assert "qweight" in dict(model.model.layers[0].self_attn.q_proj.named_buffers())
    validation = read_manifest(gptq_artifact)["validation"]
    assert validation["reloaded_from_disk"] and validation["calibration_samples"] == 32


def test_gptq_beats_round_to_nearest(gptq_artifact, tiny_model, cache_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    settings = GPTQSettings()
    wins, ref = reference_for(tiny_model, settings.eval_langs, GPTQ_EVAL_TOKENS,
                              settings.eval_ctx, cache_dir, tmp_path / "reference")
    rtn = _rtn_4bit_g128(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32))
    rtn.save_pretrained(tmp_path / "rtn")
    (tmp_path / "rtn" / "tokenizer.json").write_bytes((tiny_model / "tokenizer.json").read_bytes())
    rtn_logits = {lang: logits_of(tmp_path / "rtn", w) for lang, w in wins.items()}
    rtn_kld = drift_per_language(ref, rtn_logits, wins)["mean_kld"]
    gptq_kld = read_manifest(gptq_artifact)["validation"]["mean_kld"]
    assert gptq_kld < rtn_kld


def test_group_size_that_does_not_divide_names_the_layer(tiny_model):
    with pytest.raises(SettingsError, match=r"^model\.layers\.0\.mlp\.gate_proj: input width "
                                            "256 does not divide into groups of 96"):
        check_divides(tiny_model, 96)
    with pytest.raises(SettingsError, match="--bits 5"):
        GPTQSettings(bits=5)


def test_calibration_is_cut_to_whole_samples(tiny_model, tmp_path):
    samples = calibration_samples(tiny_model, CALIB_FILE.read_text(encoding="utf-8"), 8, 100)
    assert len(samples) == 8 and all(len(s["input_ids"]) == 100 for s in samples)
    with pytest.raises(DataError, match="fewer than one --seqlen 512 sample"):
        calibration_samples(tiny_model, "Kort tekst.", 8, 512)


def test_cli_errors(tiny_model, tmp_path, gptq_artifact):
    env = {"KVANT_DATA_DIR": str(UD_DIR)}
    missing = run_kvant("quantize", "gptq", "--model", str(tiny_model), "--out",
                        str(tmp_path / "a"), "--calib", str(tmp_path / "none.txt"), env=env)
    assert missing.returncode == 2 and "not found" in missing.stderr
    again = run_kvant("quantize", "gptq", "--model", str(tiny_model), "--out",
                      str(gptq_artifact), "--calib", str(CALIB_FILE), env=env)
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr
    quantized = run_kvant("quantize", "gptq", "--model", str(gptq_artifact), "--out",
                          str(tmp_path / "b"), "--calib", str(CALIB_FILE), env=env)
    assert quantized.returncode == 2 and "already quantized (gptq)" in quantized.stderr


@pytest.mark.gpu
def test_gptq_cuda_kernels(gptq_artifact):
    """On a GPU GPTQModel picks a CUDA kernel (Marlin, ExLlamaV2, Triton), not its torch
    fallback, and its logits match the CPU path's: mean KLD below 1e-3 over 64 positions
    and top-1 agreement of at least 95% (4-bit kernels accumulate in other orders)."""
    kld, top1, layers = cpu_gpu_drift(gptq_artifact)
    assert layers and not any(name.startswith("Torch") for name in layers), layers
    assert kld < 1e-3 and top1 >= 0.95, (kld, top1)



def test_no_file_names_a_folder_of_the_machine_that_made_it(gptq_artifact, tiny_model):
    """GPTQModel saves its offload folder (scratch inside the staging folder, gone once the
    artifact is published) into config.json and quantize_config.json: a published file names
    models and texts, never the publisher's folders."""
    import tempfile
    from pathlib import Path

    from tests.conftest import REPO

    folders = [str(Path(tempfile.gettempdir())), str(Path.home()), str(REPO),
               str(tiny_model.parent)]
    for file in gptq_artifact.iterdir():
        if file.suffix in (".json", ".md", ".txt") or file.name == "SHA256SUMS":
            text = file.read_text(encoding="utf-8")
            assert not [f for f in folders if f in text], (file.name, folders)
