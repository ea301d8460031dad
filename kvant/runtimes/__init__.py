"""One way to run every format: a runtime per engine behind one small protocol.

    runtime = open_runtime(target, device="cpu")
    logits = runtime.logits(ids)        # (len(ids), vocab) float32, fresh cache per call
    seconds = runtime.prefill(ids)      # timed prompt processing
    seconds = runtime.decode(ids, 32)   # timed greedy decode of 32 tokens after ids
    runtime.close()

Pipelines validate their output with these runtimes and the bench measures with them, so a
GGUF, an ONNX folder or a GPTQ checkpoint yields logits one way only. The engines (torch,
llama.cpp, ONNX Runtime) are heavy imports: each lives in its own module, imported when a
runtime of that kind is opened.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from kvant.errors import ArtifactError, SettingsError
from kvant.files import sha256_file, sha256_text
from kvant.memory import ram_bytes, reference_dtype_for
from kvant.model import model_info, read_config
from kvant.plan import require_kv_type
from kvant.scoring import drift, mean_over_languages

BACKENDS = ("torch", "llama.cpp", "onnxruntime-genai", "onnxruntime")
MODEL_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".data")


class Runtime(Protocol):
    """What every engine offers for one loaded model."""

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits from an empty cache."""

    def prefill(self, ids: list[int]) -> float:
        """Seconds to process ``ids`` from an empty cache."""

    def decode(self, ids: list[int], n_new: int) -> float:
        """Seconds to generate ``n_new`` greedy tokens after ``ids`` (prefill not counted)."""

    def greedy(self, ids: list[int]) -> Iterator[int]:
        """Greedy next tokens after ``ids``, one at a time, until the caller stops."""

    def sample(self, ids: list[int], sampling) -> Iterator[int]:
        """Next tokens after ``ids`` chosen by ``sampling`` (a kvant.generation.Sampling:
        greedy at temperature 0), one at a time, until the caller stops."""

    def close(self) -> None:
        """Free the engine's memory."""


@dataclass(frozen=True)
class Target:
    """One thing to run: a model folder, one .gguf file, or an ONNX folder."""

    name: str
    path: Path
    backend: str
    """torch, llama.cpp or onnxruntime-genai."""
    fmt: str
    """bf16, bnb, gptq, gguf or onnx: how it was made."""
    size_bytes: int
    kind: str | None = None
    """The artifact kind its manifest records (e.g. gguf-q4_k_m, gptq-4bit-g128), or for a
    plain checkpoint bf16; None when nothing says (kvant.plan then does not predict it)."""
    files: tuple[str, ...] = field(default=(), compare=False)
    """The model files it consists of, relative to the folder (for its identity digest)."""

    def digest(self) -> str:
        """sha256 identity of what is measured: from the manifest's checksums when the
        target sits in a Kvant artifact, else computed from the files."""
        folder = self.path.parent if self.path.is_file() else self.path
        listed = {f["path"]: f["sha256"] for f in _manifest(folder).get("files", [])}
        parts = [f"{name}:{listed.get(name) or sha256_file(folder / name)}"
                 for name in sorted(self.files)]
        return sha256_text("|".join(parts))


def _model_files(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                        if p.is_file() and p.suffix in MODEL_SUFFIXES))


def _size(folder: Path, files: tuple[str, ...]) -> int:
    return sum((folder / f).stat().st_size for f in files)


def gguf_kind(path: Path) -> str | None:
    """The kind of a bare .gguf from its own metadata (no file-name parsing): Kvant's mix tag
    (`kvant.mix`, written by kvant.export.gguf_mix), else `general.file_type`."""
    import gguf  # gguf-py: numpy only, but not needed unless a bare file is given

    mix = _read_gguf(path).get_field("kvant.mix")
    if mix is not None:
        return "gguf-" + str(mix.contents()).lower().replace(":", "-")
    field_ = _read_gguf(path).get_field("general.file_type")
    if field_ is None:
        return None
    name = gguf.LlamaFileType(int(field_.contents())).name  # e.g. MOSTLY_Q4_K_M
    return "gguf-" + name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def targets(path: Path) -> list[Target]:
    """The runnable targets in ``path``: every model file of a GGUF artifact, else one."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        kinds = _manifest(path.parent).get("kinds", {})
        return [Target(path.stem, path, "llama.cpp", "gguf", path.stat().st_size,
                       kinds.get(path.stem) or gguf_kind(path), (path.name,))]
    if not path.is_dir():
        raise ArtifactError(f"'{path}' is neither an artifact folder nor a .gguf file")
    manifest = _manifest(path)
    fmt = manifest.get("format", "bf16")
    kinds = manifest.get("kinds", {})
    ggufs = [f for f in sorted(path.glob("*.gguf")) if not f.name.endswith("imatrix.gguf")]
    if fmt == "gguf" or ggufs and not (path / "config.json").exists():
        return [Target(f.stem, f, "llama.cpp", "gguf", f.stat().st_size,
                       kinds.get(f.stem) or gguf_kind(f), (f.name,)) for f in ggufs]
    files = _model_files(path)
    if fmt == "onnx" or (path / "genai_config.json").is_file():
        return [Target(path.name, path, "onnxruntime-genai", "onnx", _size(path, files),
                       kinds.get(path.name), files)]
    if not (path / "config.json").is_file():
        raise ArtifactError(f"'{path}' holds no model Kvant can run (no config.json, "
                            "*.gguf or genai_config.json)")
    if fmt in ("bf16", "tiny", "synthetic"):  # a plain checkpoint: the reference kind
        kind = None if read_config(path).get("quantization_config") else "bf16"
        return [Target(path.name, path, "torch", "bf16", _size(path, files), kind, files)]
    return [Target(path.name, path, "torch", fmt, _size(path, files), kinds.get(path.name),
                   files)]


# transformers' config names for the llama-family keys a GGUF file carries ({arch}.KEY)
_GGUF_CONFIG = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
                "intermediate_size": "feed_forward_length",
                "num_attention_heads": "attention.head_count",
                "num_key_value_heads": "attention.head_count_kv",
                "head_dim": "attention.key_length", "vocab_size": "vocab_size",
                "max_position_embeddings": "context_length"}


def target_config(target: Target) -> dict:
    """The model's sizes as transformers' config.json names them, from wherever the artifact
    keeps them: config.json (checkpoints, and ONNX folders, which keep the source's), or a
    GGUF file's own metadata (kvant.plan reads its shape from this)."""
    if target.backend != "llama.cpp":
        if target.fmt == "onnx" and not (target.path / "config.json").is_file():
            raise ArtifactError(f"'{target.path}' keeps no config.json (an ONNX export of an "
                                "earlier Kvant); export it again, or plan its source model")
        return read_config(target.path)
    reader = _read_gguf(target.path)
    arch = str(reader.get_field("general.architecture").contents())
    config = {}
    for name, key in _GGUF_CONFIG.items():
        field_ = reader.get_field(f"{arch}.{key}")
        if field_ is not None:
            config[name] = int(field_.contents())
    if "vocab_size" not in config:  # older files: the token list's length
        config["vocab_size"] = len(reader.get_field("tokenizer.ggml.tokens").data)
    return config


def verify(target: Target, checksums: bool = True) -> None:
    """Refuse a target whose files are not what was published.

    Inside a Kvant artifact every model file is checked against the manifest: its size
    always, its sha256 unless ``checksums`` is False (``--no-verify``). A bare .gguf must
    parse as GGUF (header, metadata and tensor table inside the file).
    """
    folder = target.path.parent if target.path.is_file() else target.path
    manifest = _manifest(folder)
    if manifest:
        listed = {f["path"]: f for f in manifest.get("files", [])}
        for name in target.files:
            entry, path = listed.get(name), folder / name
            if entry is None:
                raise ArtifactError(f"'{path}' is not listed in {folder / 'manifest.json'}; "
                                    "the artifact was changed after Kvant wrote it: rebuild it")
            size = path.stat().st_size if path.is_file() else 0
            if size != entry["size_bytes"]:
                raise ArtifactError(f"'{path}' is incomplete ({size:,} of "
                                    f"{entry['size_bytes']:,} bytes); download or build it again")
            if checksums and sha256_file(path) != entry["sha256"]:
                raise ArtifactError(f"'{path}' fails its sha256 check against the manifest "
                                    "(corrupt); download or build it again (or pass "
                                    "--no-verify to use it anyway)")
        return
    if target.backend == "llama.cpp":
        _read_gguf(target.path)


def _read_gguf(path: Path):
    import gguf  # gguf-py checks the header and that every tensor lies inside the file

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # any parse failure means the same thing to a user
        raise ArtifactError(f"'{path}' is not a readable GGUF file (truncated or corrupt: "
                            f"{type(exc).__name__}); download or export it again") from exc


def _manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def open_runtime(target: Target, device: str = "cpu", threads: int = 0, n_ctx: int = 0,
                 all_logits: bool = True, dtype: str = "bfloat16",
                 repack: bool = False, kv_type: str = "f16") -> Runtime:
    """Load ``target`` in its engine.

    ``all_logits`` False keeps only the last position's logits (speed runs: copying
    (tokens x vocab) floats would be measured as compute); ``dtype`` applies to plain
    (unquantized) torch checkpoints; ``repack`` to llama.cpp's CPU weight repacking (see
    kvant.runtimes.llamacpp); ``kv_type`` to the KV cache (kvant.plan.KV_CACHES: f16, q8_0
    and q4_0 in llama.cpp, f16, fp8 and int4 in transformers, f16 in ONNX Runtime GenAI).
    """
    require_kv_type(target.backend, kv_type)
    # Each engine module imports its engine (torch, llama_cpp, onnxruntime) at its top:
    # imported here, on first use, so that opening a GGUF never loads torch.
    if target.backend == "torch":
        from kvant.runtimes.hf import TorchRuntime

        return TorchRuntime(target.path, device, threads, dtype, kv_type=kv_type)
    if target.backend == "llama.cpp":
        from kvant.runtimes.llamacpp import LlamaCppRuntime

        return LlamaCppRuntime(target.path, device, threads, n_ctx, all_logits, repack=repack,
                               kv_type=kv_type)
    if target.backend == "onnxruntime-genai":
        from kvant.runtimes.onnx import GenaiRuntime

        return GenaiRuntime(target.path, device, threads)
    if target.backend == "onnxruntime":
        from kvant.runtimes.onnx import OrtRuntime

        return OrtRuntime(target.path)
    raise SettingsError(f"unknown backend '{target.backend}' (valid: {', '.join(BACKENDS)})")


def score_target(target: Target, wins: dict[str, list[list[int]]], device: str = "cpu",
                 threads: int = 0, dtype: str = "bfloat16") -> dict:
    """Open ``target``, compute logits for every window of every language, close it."""
    n_ctx = max((len(w) for lang_wins in wins.values() for w in lang_wins), default=0)
    runtime = open_runtime(target, device, threads, n_ctx=n_ctx + 8, dtype=dtype)
    try:
        return {lang: [runtime.logits(w) for w in lang_wins]
                for lang, lang_wins in wins.items()}
    finally:
        runtime.close()


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
