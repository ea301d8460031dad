"""`make check`'s smoke runs: every pipeline end to end on the micro model, in seconds.

Each run goes through the command line in process (`kvant.app.cli.main`: parsing, the
pipeline, its validation, the artifact writer), then `kvant info` on what it wrote. The slow
tier runs the same verbs through the console script on the trained stand-in and checks what
they measure.
"""

from __future__ import annotations

import json

import pytest

from kvant.app.cli import main
from kvant.artifact import read_manifest, verify_artifact
from kvant.data import EVAL_SETS
from tests.conftest import CALIB_FILE, UD_DIR

EVAL = ["--eval-tokens", "256", "--eval-ctx", "64"]
RUNS = {
    "gguf": ["export", "gguf", "--types", "q8_0,q4_k_m", "--imatrix", "none", *EVAL],
    "gptq": ["quantize", "gptq", "--calib", str(CALIB_FILE), "--group-size", "32",
             "--samples", "16", "--seqlen", "64", "--device", "cpu", *EVAL],
    "bnb": ["quantize", "bnb", "--mode", "nf4", *EVAL],
    "onnx": ["export", "onnx", "--precision", "int4", "--block-size", "32", *EVAL],
    "mlx": ["export", "mlx", "--bits", "4", "--group-size", "32", *EVAL],
}


def _scored(validation: dict) -> list[dict]:
    """Each scored file's entry (a GGUF export scores several files, the others one)."""
    return list(validation["files"].values()) if "files" in validation else [validation]


@pytest.mark.parametrize("pipeline", RUNS)
def test_every_pipeline_runs_end_to_end_on_the_micro_model(pipeline, micro_model, tmp_path,
                                                           monkeypatch, capsys):
    monkeypatch.setenv("KVANT_DATA_DIR", str(UD_DIR))
    out = tmp_path / pipeline
    assert main(["--no-progress", *RUNS[pipeline], "--model", str(micro_model),
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)  # stdout is the path, for scripts
    assert verify_artifact(out) == []
    manifest = read_manifest(out)
    for scored in _scored(manifest["validation"]):
        target = out / scored["file"] if "file" in scored else out
        assert main(["info", "--json", str(target)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["kind"] == (scored.get("kind") or manifest["kinds"][pipeline]), info
    assert manifest["format"] == pipeline
    for scored in _scored(manifest["validation"]):
        assert set(scored["per_language"]) == set(EVAL_SETS)
        # near-uniform logits of an untrained model: drift is small, and not zero at 4 bits
        assert 0 <= scored["mean_kld"] < 0.01
        assert scored["top1_agreement_pct"] > 50
    if pipeline == "gguf":
        files = manifest["validation"]["files"]
        assert files["q8_0"]["mean_kld"] < files["q4_k_m"]["mean_kld"]
        assert files["q8_0"]["size_bytes"] > files["q4_k_m"]["size_bytes"]
        # 64-wide rows do not split into K-quant blocks of 256: llama.cpp falls back
        assert files["q4_k_m"]["fallback_tensors"] > 0


def test_a_second_run_into_the_same_folder_is_refused_and_leaves_it_as_it_was(micro_model,
                                                                              tmp_path,
                                                                              monkeypatch,
                                                                              capsys):
    monkeypatch.setenv("KVANT_DATA_DIR", str(UD_DIR))
    out = tmp_path / "bnb"
    args = ["--no-progress", *RUNS["bnb"], "--model", str(micro_model), "--out", str(out)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
