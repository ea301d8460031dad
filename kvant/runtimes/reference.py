"""The reference distributions: the source model's logits per window, kept on disk and
compared one language at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from kvant.errors import ArtifactError
from kvant.files import sha256_text
from kvant.memory import ram_bytes, reference_dtype_for
from kvant.model import content_hash, model_info, weight_files
from kvant.recorder import note, step
from kvant.runtimes import open_runtime
from kvant.runtimes.targets import Target, targets
from kvant.scoring import drift, mean_over_languages


def reference_dtype(model_dir: Path, device: str = "cpu") -> str:
    """float32 where the model fits in it with room to spare (the stand-in, small models),
    else bfloat16: NorMistral-11b in float32 is 46 GB, twice its checkpoint. The logits are
    turned into float32 either way (TorchRuntime.logits) before any log-softmax."""
    if device.startswith("cuda"):
        import torch  # only asked when the reference runs on a GPU

        room = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        room = ram_bytes()
    return reference_dtype_for(model_info(model_dir).n_params, room)


def window_file(folder: Path, window: list[int]) -> Path:
    """Where a reference folder keeps ``window``'s logits: named by the hash of its ids."""
    return Path(folder) / f"{sha256_text(','.join(map(str, window)))[:24]}.npy"


def missing_windows(folder: Path, wins: dict[str, list[list[int]]]) -> list[list[int]]:
    """The distinct windows of ``wins`` that ``folder`` holds no logits for."""
    return list({tuple(w): w for ws in wins.values() for w in ws
                 if not window_file(folder, w).is_file()}.values())


class Reference:
    """The reference distributions: the source model's float32 logits for each window, kept
    on disk as one .npy file per window (51,200 x 2,048 x 4 bytes = 0.4 GB at NorMistral's
    size), named by the hash of the window's ids, and read back memory-mapped one language at
    a time, so no run holds every language's full-vocabulary distributions at once. Keyed by
    ids, one folder serves every pipeline and the bench of a release: the model is loaded
    once, and only for windows no file holds yet."""

    def __init__(self, folder: Path, dtype: str, wins: dict[str, list[list[int]]]):
        self.folder, self.dtype, self.wins = Path(folder), dtype, wins

    def path(self, window: list[int]) -> Path:
        return window_file(self.folder, window)

    def __getitem__(self, lang: str) -> list[np.ndarray]:
        return [np.load(self.path(w), mmap_mode="r") for w in self.wins[lang]]

    @property
    def size_bytes(self) -> int:
        return sum(self.path(w).stat().st_size
                   for w in {tuple(w): w for ws in self.wins.values() for w in ws}.values())


def _signature(model_dir: Path) -> dict:
    """Each weight file's and config.json's size, inode and modification time: what says,
    without reading gigabytes, that the files are the ones hashed before."""
    files = [Path(model_dir) / "config.json", *weight_files(Path(model_dir))]
    return {f.name: [(st := f.stat()).st_size, st.st_ino, st.st_mtime_ns] for f in files}


def _stamped(folder: Path) -> dict | None:
    stamp = Path(folder) / "reference.json"
    return json.loads(stamp.read_text(encoding="utf-8")) if stamp.is_file() else None


def model_identity(model_dir: Path, stamped: dict | None = None) -> dict:
    """The checkpoint's identity by content: its content hash (config.json and every weight
    file's sha256, kvant.model.content_hash) and the file signature it was computed for.
    ``stamped``: an identity recorded before; its hash is reused when the signature still
    matches, so a 23 GB checkpoint is hashed once per reference folder, not per run."""
    signature = _signature(model_dir)
    if stamped and stamped.get("signature") == signature and stamped.get("content_hash"):
        return {"content_hash": stamped["content_hash"], "signature": signature}
    return {"content_hash": content_hash(Path(model_dir)), "signature": signature}


def reference_matches(folder: Path, model_dir: Path) -> bool:
    """Whether the reference folder (when there is one) was computed from these weights."""
    stamped = _stamped(folder)
    return (stamped is None
            or model_identity(model_dir, stamped)["content_hash"] == stamped.get("content_hash"))


STREAM_ENV = "KVANT_STREAM_REFERENCE"
"""1: always stream the reference layer by layer, 0: never; unset: where the checkpoint would
not fit (should_stream). Rehearsals set it to measure the 24 GB CPU-only path."""


def should_stream(model_dir: Path, dtype: str, device: str) -> bool:
    """Whether the reference runs one layer at a time (kvant.runtimes.streamed): on the CPU
    when the weights in ``dtype`` would take more than 60% of RAM (NorMistral-11b's 23 GB of
    bf16 on a 24 or 32 GB machine), or as $KVANT_STREAM_REFERENCE says."""
    forced = os.environ.get(STREAM_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1" and not device.startswith("cuda")
    if device.startswith("cuda"):
        return False
    width = 4 if dtype == "float32" else 2
    return width * model_info(model_dir).n_params > 0.6 * ram_bytes()


def reference_logits(model_dir: Path, wins: dict[str, list[list[int]]], folder: Path,
                     device: str = "cpu") -> Reference:
    """The reference distributions of ``wins`` in ``folder`` (created; the caller owns it and
    removes it): windows already there are reused, the rest computed with the source
    checkpoint in transformers, loaded once for all of them. The folder is keyed by the
    model's content (`reference.json`, model_identity): computed from other weights it is
    refused, even at the same path; a byte-identical copy elsewhere is accepted."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "reference.json"
    stamped = _stamped(folder)
    identity = {**model_identity(model_dir, stamped), "model": str(Path(model_dir).resolve())}
    if stamped is not None:
        if stamped.get("content_hash") != identity["content_hash"]:
            raise ArtifactError(f"reference folder '{folder}' was computed from other weights "
                                f"(content {stamped.get('content_hash')}, from "
                                f"'{stamped.get('model')}') than '{model_dir}' holds "
                                f"({identity['content_hash']}); remove the folder")
        dtype = stamped["dtype"]
    else:
        dtype = reference_dtype(model_dir, device)
    stamp.write_text(json.dumps({**identity, "dtype": dtype}), encoding="utf-8")
    ref = Reference(folder, dtype, wins)
    missing = missing_windows(folder, wins)
    streamed = bool(missing) and should_stream(model_dir, dtype, device)
    if missing:  # for the plan: how, and over how many tokens
        note(streamed=streamed, tokens=sum(len(w) for w in missing), dtype=dtype)
    if streamed:
        from kvant.runtimes.streamed import streamed_logits  # torch: only when computing

        for win, logits in zip(missing, streamed_logits(model_dir, missing, dtype),
                               strict=True):
            _save(ref.path(win), logits)
    elif missing:
        found = targets(model_dir)[0]
        n_ctx = max(len(w) for w in missing)
        runtime = open_runtime(found, device, n_ctx=n_ctx + 8, dtype=dtype)
        try:
            for win in missing:
                _save(ref.path(win), runtime.logits(win))
        finally:
            runtime.close()
    return ref


def pipeline_reference(model_dir: Path, wins: dict[str, list[list[int]]],
                       reference_dir: Path | None, scratch: Path, ctx: int,
                       device: str = "cpu") -> Reference:
    """The reference a pipeline scores against: in a release's shared ``reference_dir``
    (computed there once, its step the release's), else in ``scratch`` as the pipeline's own
    "reference" step (:func:`reference_logits`). Windows the shared folder lacks are computed
    in a "reference" step of the pipeline's, so that no load of the model goes unrecorded
    (and unplanned)."""
    folder = reference_dir or scratch / "reference"
    if reference_dir is not None and not missing_windows(folder, wins):
        return reference_logits(model_dir, wins, folder, device)
    with step("reference", kind="reference", ctx=ctx):
        return reference_logits(model_dir, wins, folder, device)


def _save(path: Path, logits: np.ndarray) -> None:
    part = path.with_suffix(".part")
    with open(part, "wb") as f:  # a killed run leaves no half file under .npy
        np.save(f, logits)
    part.replace(path)


def score_against(target: Target, ref, wins: dict[str, list[list[int]]], device: str = "cpu",
                  threads: int = 0, dtype: str = "bfloat16", extra=None) -> dict:
    """Drift of ``target`` against the reference, one language at a time: open the runtime
    once, compute a language's logits, compare, let them go. Returns drift_per_language's
    result plus the largest |logit difference|; ``extra(lang, logits)`` may add per-language
    fields (bits per byte, ...)."""
    n_ctx = max((len(w) for lang_wins in wins.values() for w in lang_wins), default=0)
    runtime = open_runtime(target, device, threads, n_ctx=n_ctx + 8, dtype=dtype)
    per, worst = {}, 0.0
    try:
        for lang, lang_wins in wins.items():
            logits = [runtime.logits(w) for w in lang_wins]
            reference = ref[lang]
            worst = max([worst, *(float(np.abs(a - b).max())
                                  for a, b in zip(reference, logits, strict=True))])
            per[lang] = drift(reference, logits, lang_wins).as_dict()
            if extra is not None:
                per[lang].update(extra(lang, per[lang]))
            del logits, reference
    finally:
        runtime.close()
    return {**mean_over_languages(per), "max_abs_logit_diff": round(worst, 6)}
