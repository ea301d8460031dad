"""The reference distributions: the source model's logits per window, kept on disk and
compared one language at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvant.errors import ArtifactError
from kvant.files import sha256_text
from kvant.memory import ram_bytes, reference_dtype_for
from kvant.model import model_info, read_config
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
        return self.folder / f"{sha256_text(','.join(map(str, window)))[:24]}.npy"

    def __getitem__(self, lang: str) -> list[np.ndarray]:
        return [np.load(self.path(w), mmap_mode="r") for w in self.wins[lang]]

    @property
    def size_bytes(self) -> int:
        return sum(self.path(w).stat().st_size
                   for w in {tuple(w): w for ws in self.wins.values() for w in ws}.values())


def reference_logits(model_dir: Path, wins: dict[str, list[list[int]]], folder: Path,
                     device: str = "cpu") -> Reference:
    """The reference distributions of ``wins`` in ``folder`` (created; the caller owns it and
    removes it): windows already there are reused, the rest computed with the source
    checkpoint in transformers, loaded once for all of them. A folder made from another
    model is refused (its `reference.json` names the model's identity)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    identity = {"model": str(Path(model_dir).resolve()),
                "config": sha256_text(json.dumps(read_config(model_dir), sort_keys=True))}
    stamp = folder / "reference.json"
    if stamp.is_file():
        stamped = json.loads(stamp.read_text(encoding="utf-8"))
        if {k: stamped.get(k) for k in identity} != identity:
            raise ArtifactError(f"reference folder '{folder}' was computed from "
                                f"'{stamped.get('model')}', not '{model_dir}'")
        dtype = stamped["dtype"]
    else:
        dtype = reference_dtype(model_dir, device)
        stamp.write_text(json.dumps({**identity, "dtype": dtype}), encoding="utf-8")
    ref = Reference(folder, dtype, wins)
    missing = list({tuple(w): w for ws in wins.values() for w in ws
                    if not ref.path(w).is_file()}.values())
    if missing:
        found = targets(model_dir)[0]
        n_ctx = max(len(w) for w in missing)
        runtime = open_runtime(found, device, n_ctx=n_ctx + 8, dtype=dtype)
        try:
            for win in missing:
                part = ref.path(win).with_suffix(".part")
                with open(part, "wb") as f:  # a killed run leaves no half file under .npy
                    np.save(f, runtime.logits(win))
                part.replace(ref.path(win))
        finally:
            runtime.close()
    return ref


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
