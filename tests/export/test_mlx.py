"""MLX export on the stand-in: mlx-lm's folder, run by mlx-lm, with the exact tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvant.app.cli import main
from kvant.artifact import read_manifest, verify_artifact
from kvant.data import EVAL_SETS
from kvant.export.mlx_pipeline import state_rope_theta
from tests.conftest import CALIB_FILE, UD_DIR, run_kvant

TRICKY = "  Dette er ﬁne   ord.\n\nNoreg  har ²to språk:\tbokmål og nynorsk!\n Sámi: čáppa"


@pytest.mark.parametrize("flag, value", [("--bits", "7"), ("--group-size", "48"),
                                         ("--dtype", "float32")])
def test_settings_mlx_cannot_make_are_refused_before_any_work(flag, value, micro_model,
                                                              tmp_path, capsys):
    out = tmp_path / "mlx"
    code = main(["export", "mlx", "--model", str(micro_model), "--out", str(out), flag, value])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag.removeprefix("--").split("-")[0] in err[0], err
    assert not out.exists()


def test_the_rope_base_is_stated_where_mlx_lm_reads_it(tmp_path):
    # transformers 5 saves the base inside rope_parameters; mlx-lm 0.32 reads only a
    # top-level rope_theta and would run 10,000
    config = {"model_type": "mistral", "rope_parameters": {"rope_theta": 1e6,
                                                           "rope_type": "default"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert state_rope_theta(tmp_path, config) is True
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == 1e6 and written["rope_parameters"] == config[
        "rope_parameters"]
    assert state_rope_theta(tmp_path, config) is False  # already there: the file is kept


def test_the_folder_is_mlx_lms_with_the_sources_tokenizer(mlx_artifact, tiny_model):
    assert verify_artifact(mlx_artifact) == []
    manifest = read_manifest(mlx_artifact)
    assert manifest["format"] == "mlx" and manifest["kinds"] == {"mlx-4bit": "mlx-4bit-g64"}
    config = json.loads((mlx_artifact / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (mlx_artifact / name).read_bytes() == (tiny_model / name).read_bytes(), name
    assert not (mlx_artifact / ".scratch").exists()


def test_mlx_lms_own_tokenizer_gives_the_exact_ids(mlx_artifact, tiny_model):
    from mlx_lm import load
    from tokenizers import Tokenizer

    _, theirs = load(str(mlx_artifact))
    exact = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    assert theirs.encode(TRICKY) == exact.encode(TRICKY).ids
    fid = read_manifest(mlx_artifact)["validation"]["mlx_tokenizer"]
    assert set(fid) == set(EVAL_SETS)
    assert all(f["identical_pct"] == 100.0 and f["units"] > 100 for f in fid.values()), fid


def test_mlx_runs_the_model_its_dequantized_weights_make_in_transformers(mlx_artifact,
                                                                       tiny_model):
    """The runtime against another path to the same function: the folder's weights,
    dequantized by MLX, in the transformers model of the source's config (float32). A
    wrong RoPE base, a missed tensor or a mis-read quantization would show here."""
    import mlx.core as mx
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from kvant.runtimes.mlx import MLXRuntime

    quant = json.loads((mlx_artifact / "config.json").read_text())["quantization"]
    weights = mx.load(str(mlx_artifact / "model.safetensors"))
    state = {}
    for name, value in weights.items():
        base = name.removesuffix(".weight")
        if name.endswith((".scales", ".biases")):
            continue
        if f"{base}.scales" in weights:
            # in float32: the bf16 scale times q plus the bf16 bias, exactly (dequantized in
            # bf16 it would round each weight)
            value = mx.dequantize(value, *(weights[f"{base}.{part}"].astype(mx.float32)
                                           for part in ("scales", "biases")),
                                  group_size=quant["group_size"], bits=quant["bits"])
        state[name] = torch.from_numpy(np.array(value.astype(mx.float32)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    text = (UD_DIR / "no_nynorsk-ud-test.conllu").read_text(encoding="utf-8")
    sentence = " ".join(line[9:] for line in text.splitlines()[:400]
                        if line.startswith("# text = "))
    ids = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode(sentence).ids[:200]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    runtime = MLXRuntime(mlx_artifact)
    got = runtime.logits(ids)
    runtime.close()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-3


def test_four_bits_drift_little_on_every_language(mlx_artifact):
    v = read_manifest(mlx_artifact)["validation"]
    assert set(v["per_language"]) == set(EVAL_SETS)
    assert 0 < v["mean_kld"] < 0.01 and v["top1_agreement_pct"] > 80
    assert all(abs(d["delta_ppl_pct"]) < 5 for d in v["per_language"].values())
    assert v["greedy_match_pct"] == 100.0 and v["rope_theta_stated"] is True
    assert 4.4 < v["bits_per_weight"] < 4.6  # 4 bits and a bf16 scale and bias per 64


@pytest.mark.parametrize("bits, group", [(3, 64), (4, 32), (6, 64), (8, 128)])
def test_the_mix_counts_the_bytes_mlx_stores(bits, group):
    import mlx.core as mx

    from kvant.export.gguf_tensors import Tensor
    from kvant.export.mlx_mix import mlx_bytes

    tensor = Tensor("t", 640, 48)  # 640 values a row: 3-bit rows do not fill whole words
    packed, scales, biases = mx.quantize(mx.zeros((48, 640), dtype=mx.bfloat16),
                                         group_size=group, bits=bits)
    assert mlx_bytes(tensor, bits, group) == packed.nbytes + scales.nbytes + biases.nbytes


@pytest.fixture(scope="module")
def mlx_mix(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlx-mix") / "mix"
    result = run_kvant("--no-progress", "export", "mlx", "--model", str(tiny_model), "--out",
                       str(out), "--mix", "--calib", str(CALIB_FILE), "--mix-tokens", "1024",
                       "--eval-tokens", "512", env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_the_mix_beats_its_uniform_twin_in_every_language_at_no_more_bytes(mlx_mix):
    from mlx_lm import load

    v = read_manifest(mlx_mix)["validation"]
    mix = v["mix"]
    assert read_manifest(mlx_mix)["kinds"] == {"mix": "mlx-4bit-g64-mix"}
    assert mix["size_bytes"] <= mix["uniform_size_bytes"]
    assert v["mean_kld"] <= 0.85 * mix["uniform_mean_kld"]  # the goal
    assert all(v["per_language"][lang]["mean_kld"] < kld
               for lang, kld in mix["uniform_per_language"].items())
    # the widths are mlx-lm's to read back: per module in config.json, and loaded so
    stated = json.loads((mlx_mix / "config.json").read_text())["quantization"]
    widths = {b["bits"] for b in stated.values() if isinstance(b, dict)}
    assert len(widths) > 1 and widths <= {3, 4, 5, 6, 8}
    model, _ = load(str(mlx_mix))
    layer = model.model.layers[0].mlp.down_proj
    assert layer.bits == stated["model.layers.0.mlp.down_proj"]["bits"]


def test_a_mix_that_held_out_text_scores_worse_is_not_published(tiny_model, tmp_path,
                                                               monkeypatch, capsys):
    """A forced bad sensitivity (each width's cost negated, so the knapsack picks the worst
    it can afford): the verdict refuses it, and nothing is left behind."""
    import kvant.export.mlx_pipeline as pipeline

    real = pipeline.fisher_bits_costs

    def backwards(*args, **kwargs):
        costs, facts = real(*args, **kwargs)
        return {key: -cost for key, cost in costs.items()}, facts

    monkeypatch.setattr(pipeline, "fisher_bits_costs", backwards)
    monkeypatch.setenv("KVANT_DATA_DIR", str(UD_DIR))
    out = tmp_path / "mix"
    code = main(["--no-progress", "export", "mlx", "--model", str(tiny_model), "--out",
                 str(out), "--mix", "--calib", str(CALIB_FILE), "--mix-tokens", "512",
                 "--eval-tokens", "512"])
    assert code == 2
    # (above it, transformers' own loading bars of the sensitivity's model)
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "not published" in err[0] and "drop --mix" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_without_mlx_the_export_says_which_extra_to_install(micro_model, tmp_path):
    import subprocess
    import sys

    code = ("import sys\nsys.modules['mlx'] = sys.modules['mlx_lm'] = None\n"
            "from kvant.app.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "mlx"
    result = subprocess.run([sys.executable, "-c", code, "export", "mlx", "--model",
                             str(micro_model), "--out", str(out)], capture_output=True,
                            text=True)
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "pip install 'kvant[mlx]'" in err[0], err
    assert not out.exists()


def test_an_mlx_model_runs_on_a_macs_gpu_unless_told_otherwise(monkeypatch):
    import platform
    import sys

    from kvant.model import pick_device

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert pick_device("auto", "mlx") == "gpu"  # Metal
    assert pick_device("cpu", "mlx") == "cpu"
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert pick_device("auto", "mlx") == "cpu"
