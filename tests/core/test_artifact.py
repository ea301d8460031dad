"""Atomic artifact folders, manifests, checksums and model cards."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import kvant.artifact
from kvant.artifact import (
    CARD,
    MANIFEST,
    ArtifactWriter,
    amend_artifact,
    check_free_space,
    exchange,
    read_manifest,
    verify_artifact,
)
from kvant.errors import ArtifactError


def _write(out, force=False, payload=b"weights"):
    with ArtifactWriter(out, fmt="test", force=force) as art:
        (art.dir / "model.bin").write_bytes(payload)
        (art.dir / "sub").mkdir()
        (art.dir / "sub" / "extra.json").write_text("{}")
        art.settings = {"bits": 4}
        art.source = {"id": "norallm/normistral-11b-long", "revision": "abc"}
        art.warn("layer lm_head left in bf16")
    return out


def test_manifest_lists_every_file_with_matching_checksums(tmp_path):
    out = _write(tmp_path / "art")
    manifest = read_manifest(out)
    paths = {f["path"] for f in manifest["files"]}
    assert paths == {"model.bin", "sub/extra.json", "README.md"}
    assert verify_artifact(out) == []
    assert manifest["settings"] == {"bits": 4}
    assert manifest["warnings"] == ["layer lm_head left in bf16"]
    assert manifest["schema_version"] == 1 and "torch" in manifest["libraries"]
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 3
    (out / "model.bin").write_bytes(b"weightz")
    assert verify_artifact(out) == ["checksum mismatch model.bin"]
    (out / "stray.txt").write_text("x")
    assert "unlisted stray.txt" in verify_artifact(out)


def test_model_card_metadata(tmp_path):
    import yaml

    card = (_write(tmp_path / "art") / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "norallm/normistral-11b-long"
    assert meta["license"] == "apache-2.0"
    # `no` must be quoted, or YAML reads Norwegian as the boolean false
    assert meta["language"] == ["no", "nb", "nn", "se"]
    assert meta["tags"][:2] == ["kvant", "normistral"]


def test_existing_output_is_refused_without_force(tmp_path):
    out = _write(tmp_path / "art")
    with pytest.raises(ArtifactError, match="already exists; pass --force"):
        _write(out, payload=b"new")
    assert (out / "model.bin").read_bytes() == b"weights"
    _write(out, force=True, payload=b"new")
    assert (out / "model.bin").read_bytes() == b"new" and verify_artifact(out) == []
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no leftovers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("from a")
    (b / "f").write_text("from b")
    assert exchange(a, b) is True
    assert ((a / "f").read_text(), (b / "f").read_text()) == ("from b", "from a")


def test_force_with_the_swap_used_leaves_the_new_artifact_and_nothing_else(tmp_path,
                                                                             monkeypatch):
    used = []
    real = kvant.artifact.exchange
    monkeypatch.setattr(kvant.artifact, "exchange", lambda a, b: used.append(1) or real(a, b))
    out = _write(tmp_path / "art")
    _write(out, force=True, payload=b"new")
    assert used and (out / "model.bin").read_bytes() == b"new" and verify_artifact(out) == []
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_a_force_killed_between_its_renames_keeps_the_only_finished_copy(tmp_path,
                                                                          monkeypatch):
    """Where the swap is not available (two renames), a run dying after moving the old
    artifact aside leaves it as .NAME.old-PID; the next run puts it back, and never
    deletes it as a stale partial."""
    out = _write(tmp_path / "art")
    monkeypatch.setattr(kvant.artifact, "exchange", lambda a, b: False)
    real_rename, calls = type(out).rename, []

    def rename(self, target):
        calls.append(target)
        if len(calls) == 2:  # staging -> out: the process dies here
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(type(out), "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        _write(out, force=True, payload=b"new")
    monkeypatch.setattr(type(out), "rename", real_rename)
    aside = next(tmp_path.glob(".art.old-*"))
    assert not out.exists() and (aside / "model.bin").read_bytes() == b"weights"
    dead = aside.with_name(".art.old-999999999")  # as a killed process leaves it
    aside.rename(dead)
    with pytest.raises(ArtifactError, match="already exists"):
        _write(out, payload=b"other")  # the next run restores it, then refuses as usual
    assert (out / "model.bin").read_bytes() == b"weights" and verify_artifact(out) == []
    assert not dead.exists()


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_amend_adds_files_and_a_card_section_and_keeps_the_weights_untouched(tmp_path):
    out = _write(tmp_path / "art")
    weights = os.stat(out / "model.bin")
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"png")
    amend_artifact(out, card_section="| a | 1 |", files={"plot.png": plot},
                   validation={"bench": {"a": 1}})
    assert verify_artifact(out) == []
    manifest = read_manifest(out)
    assert manifest["validation"]["bench"] == {"a": 1}
    assert "plot.png" in {f["path"] for f in manifest["files"]}
    assert (out / CARD).read_text().endswith("\n## Benchmark\n\n| a | 1 |\n")
    kept = os.stat(out / "model.bin")  # the same file, not a copy: no gigabytes rewritten
    assert (kept.st_ino, kept.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)
    assert [p.name for p in tmp_path.iterdir()] == ["art", "plot.png"]


def test_amend_refuses_a_file_changed_after_publishing(tmp_path):
    """The old amend re-hashed whatever was on disk: a corrupted file got a valid checksum."""
    out = _write(tmp_path / "art")
    (out / "model.bin").write_bytes(b"bit rot")
    before = _snapshot(out)
    with pytest.raises(ArtifactError, match="checksum mismatch model.bin.*rebuild it"):
        amend_artifact(out, card_section="x", files={})
    assert _snapshot(out) == before
    assert verify_artifact(out) == ["checksum mismatch model.bin"]


def test_an_amend_that_fails_midway_leaves_the_artifact_as_it_was(tmp_path, monkeypatch):
    """The old amend rewrote README.md and the files in place before the manifest."""
    out = _write(tmp_path / "art")
    before = _snapshot(out)
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"png")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kvant.artifact, "build_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        amend_artifact(out, card_section="new", files={"plot.png": plot})
    assert _snapshot(out) == before and verify_artifact(out) == []
    assert json.loads((out / MANIFEST).read_text())["validation"] == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "plot.png"]


def test_error_inside_the_block_publishes_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError), ArtifactWriter(out, fmt="test") as art:
        (art.dir / "half.bin").write_bytes(b"x")
        raise RuntimeError("quantizer crashed")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_one_clear_error(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(ArtifactError, match="disk full while writing"), \
            ArtifactWriter(out, fmt="test"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not out.exists()
    with pytest.raises(ArtifactError, match="not enough disk space"):
        check_free_space(tmp_path, 1 << 60)


def test_killed_run_leaves_no_final_folder(tmp_path):
    out = tmp_path / "art"
    script = textwrap.dedent(f"""
        import time
        from kvant.artifact import ArtifactWriter
        with ArtifactWriter({str(out)!r}, fmt="test") as art:
            with open(art.dir / "big.bin", "wb") as f:
                f.write(b"x" * 1000)
                f.flush()
                print("writing", flush=True)
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    partials = list(tmp_path.glob(".art.partial-*"))
    assert len(partials) == 1  # hidden and named partial: nothing looks finished
    # the next run cleans up what the killed one left and publishes normally
    time.sleep(0.1)
    _write(out)
    assert not list(tmp_path.glob(".art.partial-*"))
    assert json.loads((out / "manifest.json").read_text())["format"] == "test"


def test_a_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    """A release verifies each artifact several times: the second check of an unchanged file
    reads nothing; a changed one (size or mtime) is hashed again; a file written moments
    before it was hashed is not trusted (its next change may not move its mtime)."""
    import hashlib
    import os

    from kvant import files

    calls = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda *a: calls.append(1) or real(*a))
    old = tmp_path / "old.bin"
    old.write_bytes(b"a" * 1000)
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))
    first = files.sha256_file(old)
    assert files.sha256_file(old) == first and len(calls) == 1
    old.write_bytes(b"b" * 1000)  # same size, new mtime
    assert files.sha256_file(old) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert len(calls) == 2
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"c")
    files.sha256_file(fresh)
    files.sha256_file(fresh)
    assert len(calls) == 4
