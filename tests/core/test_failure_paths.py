"""The failure paths, as a user meets them through the installed `kvant` command.

Each bad input is one line on stderr with exit status 2 and leaves every byte of the input
and of earlier artifacts as it was; a run killed at any point leaves nothing that looks
finished, and the next run cleans what it left.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CALIB_FILE, UD_DIR, run_kvant

ENV = {"KVANT_DATA_DIR": str(UD_DIR)}


def tree(path: Path) -> dict[str, str]:
    """Every file below ``path`` with its sha256: the bytes a failure must not touch."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_line_error(result, text: str) -> str:
    """Exit 2, no traceback, and exactly one `kvant: error:` line, which names ``text``."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("kvant: error:")]
    assert len(errors) == 1 and text in errors[0], result.stderr[-2000:]
    return errors[0]


# 1. --force replaces only a finished Kvant artifact

def test_force_never_replaces_the_input_model_or_its_parent(model_copy):
    before = tree(model_copy)
    for out in (model_copy, model_copy.parent):
        result = run_kvant("quantize", "bnb", "--model", str(model_copy), "--out", str(out),
                           "--force", env=ENV)
        one_line_error(result, "is the input model")
    assert tree(model_copy) == before


def test_force_never_replaces_a_folder_kvant_did_not_make(model_copy, tmp_path):
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me\n")
    result = run_kvant("export", "gguf", "--model", str(model_copy), "--out", str(mine),
                       "--force", "--types", "q8_0", "--imatrix", "none", env=ENV)
    one_line_error(result, "not one (no Kvant manifest.json)")
    assert (mine / "todo.txt").read_text() == "keep me\n" and len(list(mine.iterdir())) == 1


# 2. corrupt files are never used

def test_corrupt_and_truncated_files_are_refused(gguf_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(gguf_artifact, art)
    q4 = art / "tiny-Q4_K_M.gguf"
    data = bytearray(q4.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle
    q4.write_bytes(bytes(data))
    before = tree(art)  # what the refused commands must leave as it is
    for args in (("bench", str(q4), "--no-quality", "--ctx", "16", "--out",
                  str(tmp_path / "b")),
                 ("generate", str(q4), "--prompt", "Hei")):
        one_line_error(run_kvant(*args), "fails its sha256 check")
    assert not (tmp_path / "b").exists() and tree(art) == before
    # the user who knows can still use it
    assert run_kvant("generate", str(q4), "--prompt", "Hei", "--max-new-tokens", "2",
                     "--no-verify").returncode == 0
    q4.write_bytes(bytes(data[: len(data) // 2]))
    one_line_error(run_kvant("generate", str(q4), "--prompt", "Hei"), "is incomplete")
    bare = tmp_path / "bare.gguf"  # no manifest beside it: it must at least parse
    bare.write_bytes(bytes(data[: len(data) // 2]))
    one_line_error(run_kvant("generate", str(bare), "--prompt", "Hei"),
                   "is not a readable GGUF file")
    one_line_error(run_kvant("bench", str(bare), "--no-quality", "--ctx", "16", "--out",
                             str(tmp_path / "b")), "is not a readable GGUF file")


# 3 and 4. scratch space and a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MiB filesystem (tmpfs), for disk-full runs."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); needs root")
    yield mount
    if subprocess.run(["umount", str(mount)]).returncode:
        subprocess.run(["umount", "-l", str(mount)])  # detach it anyway, then say why
        pytest.fail("the small disk stayed busy: a file on it was left open")


def test_too_little_disk_is_refused_before_any_work(model_copy, small_disk):
    started = time.perf_counter()
    result = run_kvant("export", "gguf", "--model", str(model_copy), "--out",
                       str(small_disk / "g"), "--types", "f32,bf16,q8_0", "--imatrix", "none",
                       env=ENV)
    one_line_error(result, "not enough disk space")
    assert time.perf_counter() - started < 30 and list(small_disk.iterdir()) == []


def test_disk_full_mid_write_is_one_error_and_leaves_nothing(model_copy, small_disk, cache_dir,
                                                             monkeypatch):
    from kvant.errors import ArtifactError
    from kvant.export import gguf_pipeline
    from kvant.export.gguf import GGUFSettings

    # the estimate says it fits (as a wrong estimate would): the disk fills mid-write
    monkeypatch.setattr(gguf_pipeline, "disk_need", lambda *args, **kwargs: 0)
    settings = GGUFSettings(types=("f32", "bf16"), imatrix="none", eval_langs=("nob",),
                            eval_tokens=256)
    with pytest.raises(ArtifactError, match="disk full while writing") as caught:
        gguf_pipeline.run(model_copy, small_disk / "g", settings, source={},
                          cache_dir=cache_dir, data_dir=UD_DIR)
    assert "\n" not in str(caught.value)
    assert list(small_disk.iterdir()) == []


# 5. bad input is caught before work

def test_model_without_tokenizer(model_copy, tmp_path):
    (model_copy / "tokenizer.json").unlink()
    result = run_kvant("export", "gguf", "--model", str(model_copy), "--out",
                       str(tmp_path / "g"), "--types", "q8_0", env=ENV)
    one_line_error(result, "has no tokenizer.json")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("content", ["", "Berre ei linje.\n"])
def test_empty_or_one_line_eval_text(tiny_model, tmp_path, content):
    text = tmp_path / "short.txt"
    text.write_text(content)
    for args in (("export", "gguf", "--types", "q8_0", "--imatrix", "none"),
                 ("quantize", "bnb")):
        result = run_kvant(*args, "--model", str(tiny_model), "--out", str(tmp_path / "o"),
                           "--eval-langs", str(text), env=ENV)
        one_line_error(result, "fewer than one")
    result = run_kvant("bench", str(tiny_model), "--reference", str(tiny_model), "--langs",
                       str(text), "--out", str(tmp_path / "b"), env=ENV)
    one_line_error(result, "fewer than one")
    assert not (tmp_path / "o").exists() and not (tmp_path / "b").exists()


def test_inputs_are_checked_before_work(tiny_model, tmp_path):
    started = time.perf_counter()
    one_line_error(run_kvant("export", "onnx", "--model", str(tiny_model), "--out",
                             str(tmp_path / "o"), "--provider", "cuda", "--precision", "fp32"),
                   "fp32 is built for --provider cpu only")
    one_line_error(run_kvant("export", "gguf", "--model", str(tiny_model), "--out",
                             str(tmp_path / "g"), "--types", "q4_k_m", "--imatrix",
                             str(tmp_path / "missing.imatrix")), "not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(run_kvant("export", "gguf", "--model", str(tiny_model), "--out",
                             str(tmp_path / "g"), "--types", "q4_k_m", "--calib", str(empty),
                             env=ENV), "fewer than one --imatrix-ctx")
    one_line_error(run_kvant("quantize", "gptq", "--model", str(tiny_model), "--out",
                             str(tmp_path / "q"), "--samples", "5"),
                   "--samples 5: GPTQ needs more than 10")
    assert time.perf_counter() - started < 60  # each refused in seconds, not after the work
    assert not any(tmp_path.glob("[ogq]"))


# 7. prompts past the trained context

def test_prompt_past_the_trained_context_is_refused(gguf_artifact):
    prompt = "7" * 40_000  # digits are one token each: > 32,768 tokens
    one_line_error(run_kvant("generate", str(gguf_artifact / "tiny-Q4_K_M.gguf"), "--prompt",
                             prompt), "and the model was trained for 32,768")


# 8. smaller ones

def test_recorded_command_is_quoted_and_names_no_local_folder(tiny_model, tmp_path):
    out = tmp_path / "with space" / "bnb int8"
    result = run_kvant("--no-progress", "quantize", "bnb", "--model", str(tiny_model), "--out",
                       str(out), "--mode", "int8", "--eval-langs", "nob", "--eval-tokens",
                       "256", env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    command = json.loads((out / "manifest.json").read_text())["command"]
    argv = shlex.split(command)  # quoted as a shell needs it; a folder by its name only
    assert argv[argv.index("--out") + 1] == "bnb int8"
    assert argv[argv.index("--model") + 1] == tiny_model.name
    assert str(tmp_path) not in command and str(tiny_model.parent) not in command
    assert "n_ctx_train" not in result.stderr


# kills at several points of each pipeline

def _kill_when(args: list[str], ready, timeout: float = 300) -> None:
    exe = Path(sys.executable).with_name("kvant")
    proc = subprocess.Popen([str(exe), "--no-progress", *args], env={**os.environ, **ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before the kill point"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _staged(parent: Path, name: str, pattern: str) -> bool:
    return any(p for partial in parent.glob(f".{name}.partial-*") for p in partial.glob(pattern))


def _assert_clean_after_rerun(parent: Path, name: str, args: list[str]) -> None:
    assert not (parent / name).exists()  # nothing finished-looking after a kill
    assert list(parent.glob(f".{name}.partial-*"))  # only the hidden staging folder
    result = run_kvant("--no-progress", *args, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [] and not list((parent / name).rglob(".scratch"))
    assert "removing" in result.stderr  # the rerun says what it cleaned


def test_gguf_export_killed_at_each_step(tiny_model, tmp_path):
    args = ["export", "gguf", "--model", str(tiny_model), "--out", str(tmp_path / "g"),
            "--types", "q4_k_m,q8_0", "--calib", str(CALIB_FILE), "--imatrix-chunks", "4",
            "--eval-langs", "nob", "--eval-tokens", "512"]
    for point in (".scratch/*-BF16.gguf", "*.imatrix.gguf", "*-Q8_0.gguf"):
        _kill_when(args, lambda p=point: _staged(tmp_path, "g", p))
    _assert_clean_after_rerun(tmp_path, "g", args)


def test_quantize_and_onnx_killed_at_each_step(tiny_model, tmp_path):
    runs = {"b": (["quantize", "bnb", "--mode", "nf4"], (".scratch", "model.safetensors")),
            "q": (["quantize", "gptq", "--samples", "16", "--seqlen", "128", "--calib",
                   str(CALIB_FILE)], (".scratch/logs", "model.safetensors")),
            "o": (["export", "onnx", "--precision", "int4"], (".scratch/builder-*",
                                                              "model.onnx"))}
    for name, (verb, points) in runs.items():
        args = [*verb, "--model", str(tiny_model), "--out", str(tmp_path / name),
                "--eval-langs", "nob", "--eval-tokens", "256"]
        for point in points:  # as the work starts, and once the model is written
            _kill_when(args, lambda n=name, p=point: _staged(tmp_path, n, p))
        _assert_clean_after_rerun(tmp_path, name, args)
