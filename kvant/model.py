"""Find, validate and describe a checkpoint without loading its weights.

Every pipeline starts with :func:`resolve_model`: a local folder is used as it is; a hub id
(``owner/name``) is fetched once with huggingface_hub into its cache. Validation reads only
config.json, tokenizer.json and the safetensors headers, so it is instant even for the
23 GB NorMistral checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from kvant.errors import ModelError, SettingsError
from kvant.files import sha256_file
from kvant.paths import looks_like_hub_id

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("MistralForCausalLM", "LlamaForCausalLM")

# Only what the pipelines read: never optimizer states, original/ folders or .bin duplicates.
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.md"]


@dataclass(frozen=True)
class ModelInfo:
    """What `kvant info` prints: read from config, tokenizer and safetensors headers."""

    path: str
    architecture: str
    model_type: str
    n_params: int
    dtype: str
    size_bytes: int
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    tied_embeddings: bool
    tokenizer: str
    quantized: str | None
    synthetic: bool

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_model(model: str | Path, revision: str | None = None) -> Path:
    """Return a local folder for ``model`` (a folder, or a hub id downloaded once).

    >>> resolve_model("/models/normistral-11b-long")  # doctest: +SKIP
    PosixPath('/models/normistral-11b-long')
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return validate_model_dir(path)
    if path.exists():
        raise ModelError(f"model path '{model}' is a file, not a folder: pass the folder "
                         "that holds config.json and the *.safetensors weights")
    if not looks_like_hub_id(str(model)):
        raise ModelError(f"model folder '{model}' not found: check the path, or pass a "
                         "hub id such as norallm/normistral-11b-long")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(model), revision=revision, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:  # network, auth, missing repo: all end the same way for a user
        raise ModelError(f"'{model}' is not a local folder and could not be fetched from the "
                         f"Hugging Face Hub ({type(exc).__name__}); pass a local folder or "
                         "check the id and your connection") from exc
    return validate_model_dir(Path(local))


def model_source(model: str, revision: str | None = None) -> tuple[Path, dict]:
    """The local folder of ``model`` and the manifest's source entry: for a hub id the
    revision asked for (a branch, tag or commit; None: the default branch) and the commit it
    resolved to (the snapshot folder is named by it), else the folder's content hash."""
    if Path(model).expanduser().exists() or not looks_like_hub_id(str(model)):
        if revision:
            raise SettingsError(f"--revision {revision} applies to a hub id, and '{model}' is "
                                "a local folder; drop --revision, or pass the hub id")
        path = resolve_model(model)
        # a local folder is named by its name and content, never by where it lies here
        return path, {"id": path.resolve().name, "content_hash": content_hash(path)}
    path = resolve_model(model, revision)
    return path, {"id": str(model), "revision": path.name,
                  "requested_revision": revision or "main"}


def pick_device(requested: str = "auto", backend: str | None = None) -> str:
    """``requested``, or for "auto" cuda when torch sees a GPU, else cpu; for an MLX model
    (``backend`` "mlx") the GPU of an Apple-silicon Mac (Metal), else cpu."""
    if requested != "auto":
        return requested
    if backend == "mlx":
        return "gpu" if sys.platform == "darwin" and platform.machine() == "arm64" else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"'{path}' has no config.json: pass a Hugging Face model folder "
                         "(config.json, tokenizer.json, *.safetensors)")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"'{config_path}' is not valid JSON ({exc}); re-download the model "
                         "folder") from exc


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, sharded or not, in shard order."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelError(f"'{index}' is malformed ({exc}); re-download the model "
                             "folder") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"'{path}' lacks shard(s) {', '.join(missing)} named in "
                             f"{index.name}; finish the download")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = (" (only PyTorch .bin weights: re-save with save_pretrained(..., "
                "safe_serialization=True))" if list(path.glob("*.bin")) else "")
        raise ModelError(f"'{path}' has no *.safetensors weights{hint}; pass a complete "
                         "model folder")
    return files


def read_safetensors_header(file: Path) -> dict[str, dict]:
    """Tensor name -> {dtype, shape}, checking that the file is complete.

    safetensors itself checks that the header's offsets cover the file exactly, which
    catches truncated downloads and foreign files.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as handle:
            return {name: {"dtype": handle.get_slice(name).get_dtype(),
                           "shape": list(handle.get_slice(name).get_shape())}
                    for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"'{file}' is truncated or corrupt ({exc}); delete it and "
                         "download it again") from exc


_TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def raw_header(file: Path) -> tuple[int, dict]:
    """(byte offset of the data, {name: {dtype, shape, data_offsets}}) of a safetensors file."""
    with Path(file).open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def read_tensor(file: Path, name: str):
    """One float tensor of a safetensors file, read with plain file reads into its own buffer.

    Why not safetensors' memory map: every mapped page touched stays in the process's RSS
    until unmapped, so streaming a 23 GB checkpoint through maps shows RSS growing toward the
    model size; plain reads keep the peak at one tensor.
    """
    import torch  # only for the pipelines that stream tensors

    base, header = raw_header(file)
    entry = header[name]
    if entry["dtype"] not in _TORCH_DTYPES:
        raise ModelError(f"tensor {name} in '{file}' is {entry['dtype']}; Kvant takes float "
                         "checkpoints (bf16, f16, f32)")
    start, end = entry["data_offsets"]
    buffer = bytearray(end - start)
    with Path(file).open("rb") as handle:
        handle.seek(base + start)
        handle.readinto(buffer)
    dtype = getattr(torch, _TORCH_DTYPES[entry["dtype"]])
    return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


def validate_model_dir(path: Path) -> Path:
    """Check a model folder and return it; raise ModelError naming the problem and the fix."""
    if not path.is_dir():
        raise ModelError(f"model folder '{path}' not found")
    config = read_config(path)
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelError(f"'{path}' is a {', '.join(archs) or 'model without architectures'}; "
                         f"Kvant supports {' and '.join(SUPPORTED_ARCHITECTURES)} "
                         "(NorMistral and other llama-family models)")
    for file in weight_files(path):
        read_safetensors_header(file)
    return path


# Shipped from the source into every checkpoint-like artifact, never re-saved: a re-save by
# GPTQModel or mlx-lm goes through transformers, whose Mistral regex "fix" would change
# NorMistral's pre-tokenizer (and transformers 5 writes a tokenizer_class older ones lack).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(model_dir: Path, out_dir: Path) -> None:
    """The source's own tokenizer files into ``out_dir`` (replacing any written there)."""
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)


def require_tokenizer(path: Path) -> None:
    """Every pipeline tokenizes with the model's own tokenizer.json: say so up front."""
    if not (Path(path) / "tokenizer.json").is_file():
        raise ModelError(f"'{path}' has no tokenizer.json; pass a complete model folder "
                         "(NorMistral's tokenizer.json is in its hub repository)")


def refuse_synthetic(path: Path) -> None:
    """Perplexity and KL divergence of random weights mean nothing: refuse to measure them."""
    if read_config(Path(path)).get("kvant_synthetic"):
        raise SettingsError(f"'{path}' has synthetic (random) weights: perplexity and KL "
                            "divergence would mean nothing; quantize a real checkpoint")


def refuse_quantized(path: Path) -> None:
    """Quantizing or exporting an already-quantized checkpoint compounds the error: refuse."""
    quant = read_config(path).get("quantization_config")
    if quant:
        method = quant.get("quant_method") or quant.get("format") or "?"
        raise ModelError(f"'{path}' is already quantized ({method}); start from the bf16 "
                         "checkpoint")


# The context NorMistral checkpoints were trained for, where config.json states another:
# norallm/normistral-11b-warm's config carries Mistral-Nemo's max_position_embeddings of
# 1,024,000, and the -long card says it was extended to 32,768 tokens. Keyed by the
# repository name, so a local copy in a folder of that name is recognised too.
TRAINED_CONTEXT = {"normistral-11b-long": 32768}
# Above this a config's context is taken for a placeholder and said so.
SUSPICIOUS_CONTEXT = 131072


def trained_context(config: dict, model_id: str, override: int = 0) -> tuple[int, str | None]:
    """(context length to write into an export, a warning or None).

    ``override`` (``--context-length``) wins; then the table above; then config.json's
    max_position_embeddings, with a warning when it is implausibly large.
    """
    stated = int(config.get("max_position_embeddings") or 0)
    name = Path(str(model_id)).name
    if override:
        return override, None
    if name in TRAINED_CONTEXT:
        known = TRAINED_CONTEXT[name]
        if stated != known:
            return known, (f"config.json says max_position_embeddings {stated:,}; {name} was "
                           f"trained to {known:,} tokens, which is written instead "
                           "(--context-length overrides)")
        return known, None
    if not stated:
        raise ModelError(f"config.json of '{model_id}' states no max_position_embeddings; "
                         "pass --context-length")
    if stated > SUSPICIOUS_CONTEXT:
        return stated, (f"config.json says max_position_embeddings {stated:,}, more than "
                        "most models are trained for; apps that size their KV cache from it "
                        "will try to allocate it all: pass --context-length with the trained "
                        "context")
    return stated, None


def refuse_sliding_window(config: dict, model_dir: Path, fmt: str) -> None:
    """Formats whose runtime would ignore a sliding window must not silently drop it."""
    window = config.get("sliding_window")
    context = int(config.get("max_position_embeddings") or 0)
    if window and (not context or window < context):
        raise ModelError(f"'{model_dir}' uses sliding-window attention ({window} tokens); "
                         f"Kvant's {fmt} export would run it as full attention, so it refuses; "
                         "NorMistral has none (sliding_window null)")


def rope_theta(config: dict) -> float:
    """RoPE base from a config of transformers 4 (`rope_theta`) or 5 (`rope_parameters`)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ModelError(f"RoPE scaling '{rope_type}' is not supported yet; NorMistral uses "
                         "plain RoPE")
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _tokenizer_kind(path: Path) -> str:
    tok = path / "tokenizer.json"
    if not tok.is_file():
        return "sentencepiece" if (path / "tokenizer.model").is_file() else "none"
    data = json.loads(tok.read_text(encoding="utf-8"))
    model = data.get("model", {})
    parts = [f"{model.get('type', '?')} ({len(model.get('vocab', {}))} entries"]
    pre = json.dumps(data.get("pre_tokenizer"))
    if "ByteLevel" in pre:
        parts.append("byte-level")
    if '"Prepend"' in json.dumps(data.get("normalizer")):
        parts.append("prepended space")
    if ".{1,24}" in pre:
        parts.append("24-char chunks")
    return ", ".join(parts) + ")"


def model_info(path: Path) -> ModelInfo:
    """Describe a validated model folder without loading a single weight."""
    config = read_config(path)
    n_params = 0
    size = 0
    dtypes: dict[str, int] = {}
    for file in weight_files(path):
        size += file.stat().st_size
        for spec in read_safetensors_header(file).values():
            count = 1
            for dim in spec["shape"]:
                count *= dim
            n_params += count
            dtypes[spec["dtype"]] = dtypes.get(spec["dtype"], 0) + count
    size += sum(f.stat().st_size for f in path.iterdir()
                if f.is_file() and f.suffix != ".safetensors")
    hidden = config.get("hidden_size", 0)
    n_heads = config.get("num_attention_heads", 0)
    quant = config.get("quantization_config")
    return ModelInfo(
        path=str(path),
        architecture=(config.get("architectures") or ["?"])[0],
        model_type=config.get("model_type", "?"),
        n_params=n_params,
        dtype=max(dtypes, key=dtypes.get) if dtypes else "?",
        size_bytes=size,
        n_layers=config.get("num_hidden_layers", 0),
        hidden_size=hidden,
        intermediate_size=config.get("intermediate_size", 0),
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads", n_heads),
        head_dim=config.get("head_dim") or (hidden // n_heads if n_heads else 0),
        vocab_size=config.get("vocab_size", 0),
        context_length=config.get("max_position_embeddings", 0),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        tokenizer=_tokenizer_kind(path),
        quantized=(quant.get("quant_method") or quant.get("format")) if quant else None,
        synthetic=bool(config.get("kvant_synthetic", False)),
    )


def content_hash(path: Path) -> str:
    """A short identity for a local checkpoint: sha256 over config.json and every weight file.

    Streams the files (about 25 s for 23 GB from a fast disk); a hub revision is recorded
    instead where there is one.
    """
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in weight_files(path):
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()[:16]
