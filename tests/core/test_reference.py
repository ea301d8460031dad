"""The reference distributions: computed once, kept on disk, compared one language at a time."""

from __future__ import annotations

import os

import numpy as np
import pytest

import kvant.runtimes.reference
from kvant.errors import ArtifactError
from kvant.runtimes import score_target
from kvant.runtimes.reference import reference_dtype, reference_logits, score_against
from kvant.runtimes.targets import targets
from kvant.scoring import drift_per_language
from tests.conftest import reference_for


def test_reference_is_streamed_from_disk_one_language_at_a_time(tiny_model, gguf_artifact,
                                                                 cache_dir, tmp_path):
    wins, ref = reference_for(tiny_model, ("nob", "sme"), 512, 128, cache_dir,
                              tmp_path / "ref")
    files = sorted((tmp_path / "ref").glob("*.npy"))
    assert len(files) == sum(len(w) for w in wins.values())  # one file per window
    # float32 (tokens x vocab) per window, plus each .npy header
    logits_bytes = sum(len(w) * 128 * 4096 * 4 for w in wins.values())
    assert logits_bytes < ref.size_bytes < logits_bytes + 256 * len(files)
    assert ref.dtype == "float32"  # the stand-in fits: scored from float32 weights
    # streaming per language gives exactly what scoring everything in memory gives
    target = targets(gguf_artifact / "tiny-Q4_K_M.gguf")[0]
    streamed = score_against(target, ref, wins)
    in_memory = drift_per_language({lang: [np.asarray(a) for a in ref[lang]] for lang in wins},
                                   score_target(target, wins), wins)
    assert streamed["per_language"] == in_memory["per_language"]
    assert streamed["mean_kld"] == in_memory["mean_kld"] > 0


def test_a_model_too_big_for_float32_is_scored_from_bf16(tiny_model, monkeypatch):
    real = os.sysconf
    ram = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 10_000}  # 40 MiB: the stand-in's float32
    monkeypatch.setattr(os, "sysconf", lambda name: ram.get(name) or real(name))
    assert reference_dtype(tiny_model) == "bfloat16"  # (23 MiB) is over 40% of it
    ram["SC_PHYS_PAGES"] = 1_000_000
    assert reference_dtype(tiny_model) == "float32"


def test_one_reference_folder_serves_every_scorer_without_loading_the_model_again(
        tiny_model, cache_dir, tmp_path, monkeypatch):
    wins, first = reference_for(tiny_model, ("nob", "sme"), 512, 128, cache_dir,
                                tmp_path / "ref")

    def no_second_load(*args, **kwargs):
        raise AssertionError("the model was loaded although every window was on disk")

    monkeypatch.setattr(kvant.runtimes.reference, "open_runtime", no_second_load)
    # a scorer asking for a subset (one language) and another asking for all of them
    again = reference_logits(tiny_model, {"sme": wins["sme"]}, tmp_path / "ref")
    assert all(np.array_equal(a, b) for a, b in zip(again["sme"], first["sme"], strict=True))
    assert reference_logits(tiny_model, wins, tmp_path / "ref").dtype == first.dtype


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded although every window was on disk")


def test_the_reference_folder_is_keyed_by_the_weights_not_the_path(model_copy, cache_dir,
                                                                   tmp_path, monkeypatch):
    """The old key was the path and config: new weights at the same path reused the old
    distributions, and a byte-identical copy elsewhere was refused."""
    from safetensors.torch import load_file, save_file

    wins, first = reference_for(model_copy, ("nob",), 256, 128, cache_dir, tmp_path / "ref")
    # the hash is computed once and kept beside the cache: not again while the files are
    # the same files
    monkeypatch.setattr(kvant.runtimes.reference, "open_runtime", _no_load)
    monkeypatch.setattr(kvant.runtimes.reference, "content_hash", _no_load)
    assert reference_logits(model_copy, wins, tmp_path / "ref").dtype == first.dtype
    monkeypatch.undo()
    # a byte-identical copy at another path is the same model: its distributions serve
    twin = tmp_path / "twin"
    twin.mkdir()
    for f in model_copy.iterdir():
        twin.joinpath(f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(kvant.runtimes.reference, "open_runtime", _no_load)
    reference_logits(twin, wins, tmp_path / "ref")
    monkeypatch.undo()
    # other weights at the very same path are refused
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="computed from other weights"):
        reference_logits(model_copy, wins, tmp_path / "ref")


def test_a_machine_too_small_for_the_checkpoint_streams_the_reference_bit_for_bit(
        tiny_model, cache_dir, tmp_path, monkeypatch):
    """Where the weights would take most of RAM the reference runs one decoder layer at a
    time (kvant.runtimes.streamed, never the whole model): every window's logits equal the
    whole-model forward's bit for bit, in both dtypes, and the step says how it ran."""
    from kvant.recorder import recording, step
    from kvant.runtimes.reference import STREAM_ENV, should_stream

    real = os.sysconf
    ram = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 4_000}  # 16 MiB: the bf16 stand-in (12 MiB)
    monkeypatch.setattr(os, "sysconf", lambda name: ram.get(name) or real(name))
    monkeypatch.delenv(STREAM_ENV, raising=False)
    assert should_stream(tiny_model, "bfloat16", "cpu")
    assert not should_stream(tiny_model, "bfloat16", "cuda")
    ram["SC_PHYS_PAGES"] = 1_000_000
    assert not should_stream(tiny_model, "bfloat16", "cpu")
    wins, whole = reference_for(tiny_model, ("nob", "sme"), 512, 128, cache_dir,
                                tmp_path / "whole")

    def no_whole_model(*args, **kwargs):
        raise AssertionError("the whole model was loaded although the reference streams")

    monkeypatch.setattr(kvant.runtimes.reference, "open_runtime", no_whole_model)
    monkeypatch.setenv(STREAM_ENV, "1")
    with recording() as steps:
        with step("reference", kind="reference"):
            streamed = reference_logits(tiny_model, wins, tmp_path / "streamed")
    assert steps[0]["streamed"] is True
    assert steps[0]["tokens"] == sum(len(w) for ws in wins.values() for w in ws)
    for lang in wins:
        for a, b in zip(whole[lang], streamed[lang], strict=True):
            assert np.array_equal(a, b)
    from kvant.runtimes.hf import TorchRuntime
    from kvant.runtimes.streamed import streamed_logits

    windows = wins["nob"][:2]
    expected = TorchRuntime(tiny_model, dtype="bfloat16")
    for got, win in zip(streamed_logits(tiny_model, windows, "bfloat16"), windows,
                        strict=True):
        assert np.array_equal(got, expected.logits(win))


def test_a_bare_checkpoints_identity_is_read_once_and_follows_its_bytes(model_copy,
                                                                       monkeypatch):
    """A folder outside any manifest (the user's bf16 model) is hashed once per process for
    the bench's and the eval's keys, and a rewritten file gets a new identity."""
    import kvant.runtimes.targets as module

    calls = []
    real = module.sha256_file
    monkeypatch.setattr(module, "sha256_file", lambda p: calls.append(p) or real(p))
    (model_copy / "manifest.json").unlink()  # as a checkpoint Kvant did not make
    target = targets(model_copy)[0]
    first = target.digest()
    assert target.digest() == first and len(calls) == len(target.files)
    weights = model_copy / target.files[0]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert target.digest() != first
