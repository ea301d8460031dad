"""What there is to run in a path: every model file of an artifact, its kind, its sizes,
and whether its files are still what was published.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kvant.errors import ArtifactError
from kvant.files import sha256_file, sha256_text
from kvant.model import read_config

MODEL_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".data")


@dataclass(frozen=True)
class Target:
    """One thing to run: a model folder, one .gguf file, or an ONNX folder."""

    name: str
    path: Path
    backend: str
    """torch, llama.cpp, onnxruntime-genai or mlx."""
    fmt: str
    """bf16, bnb, gptq, gguf, onnx or mlx: how it was made."""
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
        parts = [f"{name}:{listed.get(name) or _identity(folder / name)}"
                 for name in sorted(self.files)]
        return sha256_text("|".join(parts))


_IDENTITIES: dict[tuple, str] = {}


def _identity(path: Path) -> str:
    """sha256 of a file outside any manifest, read once per process while its inode, size
    and mtime stay the same: a release keys the bench's and the eval's bf16 results on the
    same 23 GB checkpoint (an identity for resuming, never a check of published files)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _IDENTITIES:
        _IDENTITIES[key] = sha256_file(path)
    return _IDENTITIES[key]


def _model_files(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                        if p.is_file() and p.suffix in MODEL_SUFFIXES))


def _size(folder: Path, files: tuple[str, ...]) -> int:
    return sum((folder / f).stat().st_size for f in files)


def gguf_kind(path: Path) -> str | None:
    """The kind of a bare .gguf from its own metadata (no file-name parsing): Kvant's mix tag
    (`kvant.mix`, written by kvant.export.gguf_tensors.quantize_with), else `general.file_type`."""
    import gguf  # gguf-py: numpy only, but not needed unless a bare file is given

    fields = _read_gguf(path).fields
    if "kvant.mix" in fields:
        return "gguf-" + str(fields["kvant.mix"]).lower().replace(":", "-")
    if "general.file_type" not in fields:
        return None
    name = gguf.LlamaFileType(int(fields["general.file_type"])).name  # e.g. MOSTLY_Q4_K_M
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
    if fmt == "mlx":
        return [Target(path.name, path, "mlx", "mlx", _size(path, files), kinds.get(path.name),
                       files)]
    if not (path / "config.json").is_file():
        raise ArtifactError(f"'{path}' holds no model Kvant can run (no config.json, "
                            "*.gguf or genai_config.json)")
    if fmt in ("bf16", "tiny", "synthetic", "peer"):  # a plain checkpoint: the reference kind
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
    header = _read_gguf(target.path)
    arch = str(header.fields["general.architecture"])
    config = {name: int(header.fields[f"{arch}.{key}"]) for name, key in _GGUF_CONFIG.items()
              if f"{arch}.{key}" in header.fields}
    if "vocab_size" not in config:  # older files: the token list's length
        config["vocab_size"] = header.array_lengths["tokenizer.ggml.tokens"]
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
    """The header (kvant.gguf_header), checked: its values and every tensor's data lie
    inside the file."""
    from kvant.gguf_header import read_header  # gguf-py's constants: numpy

    try:
        return read_header(path)
    except Exception as exc:  # any parse failure means the same thing to a user
        raise ArtifactError(f"'{path}' is not a readable GGUF file (truncated or corrupt: "
                            f"{type(exc).__name__}); download or export it again") from exc


def _manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
