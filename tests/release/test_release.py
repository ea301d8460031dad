"""`kvant release` on a reduced stand-in recipe: artifacts, cards, index, checksums, upload."""

from __future__ import annotations

import json

import pytest

from kvant.artifact import read_manifest, verify_artifact
from kvant.errors import SettingsError
from kvant.release import load_recipe, run_release
from tests.conftest import CALIB_FILE, UD_DIR, run_kvant

RECIPE = """
[release]
name = "mini"
model = "@stand-in"
out = "{out}"
langs = ["nob", "sme"]
eval_tokens = 256

[gguf]
types = ["q8_0", "q4_k_m"]
imatrix = "none"

[gptq]
samples = 16
seqlen = 128

[bnb]
modes = ["int8"]

[onnx]
precision = "int4"

[bench]
ctx = [64]
quality_tokens = 256
quality_ctx = 128
repeats = 1
n_new = 4
"""
FOLDERS = ("mini-gguf", "mini-gptq-4bit", "mini-bnb-int8", "mini-onnx-int4")


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("release")
    recipe = root / "mini.toml"
    recipe.write_text(RECIPE.format(out=root / "out"))
    result = run_kvant("--no-progress", "release", str(recipe), "--calib", str(CALIB_FILE),
                       env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "out", recipe, result.stdout


def test_every_artifact_built_benched_and_verified(release):
    out, _, _ = release
    for folder in FOLDERS:
        assert verify_artifact(out / folder) == [], folder
        manifest = read_manifest(out / folder)
        assert manifest["validation"]["bench"], folder  # bench results in the manifest
        card = (out / folder / "README.md").read_text()
        assert "\n## Benchmark\n" in card and "![frontier.png](frontier.png)" in card
        for name in manifest["validation"]["bench"]:
            assert f"| {name} |" in card
        listed = {f["path"] for f in manifest["files"]}
        assert {"frontier.png", "decode.png", "memory.png", "README.md"} <= listed


def test_index_card_and_root_checksums(release):
    import hashlib

    out, recipe, _ = release
    index = (out / "README.md").read_text()
    results = json.loads((out / "bench" / "results.json").read_text())
    for name in results["targets"]:
        if name != "reference-bf16":
            assert f"| {name} |" in index
    for gb in (8, 12, 16, 24):
        assert f"- **{gb} GB**: " in index
    assert (out / "recipe.toml").read_text() == recipe.read_text()
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, path = line.split("  ", 1)
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == digest


def test_push_dry_run_lists_every_file_and_no_text(release):
    out, _, stdout = release
    lines = [line for line in stdout.splitlines() if line.startswith("would upload ")]
    for folder in FOLDERS:
        files = [p for p in (out / folder).rglob("*") if p.is_file()]
        repo_lines = [x for x in lines if x.startswith(f"would upload ORG/{folder}: ")]
        assert len(repo_lines) == len(files), folder
    assert any(x.startswith("would upload ORG/mini-kvant: README.md") for x in lines)
    assert not any(x.split(": ")[1].endswith((".txt ", ".conllu")) for x in lines)
    assert stdout.strip().splitlines()[-1] == f"report: {out / 'bench' / 'report.md'}"


def test_killed_release_resumes_from_finished_artifacts(release, cache_dir):
    import shutil

    out, recipe, _ = release
    gguf_file = out / "mini-gguf" / "kvant-stand-in-Q8_0.gguf"
    before = gguf_file.stat().st_mtime_ns
    shutil.rmtree(out / "mini-bnb-int8")
    (out / "mini-gptq-4bit" / "model.safetensors").write_bytes(b"torn")  # a broken one
    root, _ = run_release(recipe, cache_dir=cache_dir, data_dir=UD_DIR, calib=str(CALIB_FILE))
    assert verify_artifact(out / "mini-bnb-int8") == []
    assert verify_artifact(out / "mini-gptq-4bit") == []  # rebuilt, not trusted
    # the GGUF folder was finished: kept as it was (only its card took the new bench)
    assert gguf_file.stat().st_mtime_ns == before
    assert verify_artifact(out / "mini-gguf") == []


def test_recipe_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[release]\nname = "x"\nmodel = "@stand-in"\n[gguf]\ntypez = ["q8_0"]\n')
    with pytest.raises(SettingsError, match="unknown key gguf.typez; did you mean gguf.types"):
        load_recipe(bad)
    bad.write_text('[relase]\nname = "x"\n')
    with pytest.raises(SettingsError, match="unknown section \\[relase\\]"):
        load_recipe(bad)
    result = run_kvant("release", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "not found" in result.stderr
