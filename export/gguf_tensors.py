"""GGUF tensors as the mix sees them: names and shapes, llama.cpp's fallback types and exact
bytes, --pure files of one type, and their tensors dequantized (gguf-py) in the HF
parameter's layout, for every sensitivity method to share."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from kvant.errors import KvantError
from kvant.export.gguf_quantize import quantize
from kvant.gguf_header import read_header
from kvant.model import read_config, read_safetensors_header, weight_files

# llama-quantize's file types whose --pure default is the tensor type (tools/quantize)
PURE_FTYPE = {"q2_k": "Q2_K", "q3_k": "Q3_K_M", "q4_k": "Q4_K_M", "q5_k": "Q5_K_M",
              "q6_k": "Q6_K", "q8_0": "Q8_0", "iq4_xs": "IQ4_XS", "q5_0": "Q5_0",
              "q4_0": "Q4_0", "q5_1": "Q5_1", "iq4_nl": "IQ4_NL"}
ROWS = 256  # rows dequantized at once per read (ffn_down at 11.4B: 88 MiB)


@dataclass(frozen=True)
class Tensor:
    """A quantizable tensor: its GGUF name, row length (ne0) and row count."""

    name: str
    ne0: int
    rows: int


def ggml(type_name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[type_name.upper()]


# llama-quant.cpp `tensor_type_fallback`: the type written instead when a row of ne0 values
# does not split into the target's blocks (256 for K and most IQ types, 32 for the rest).
_FALLBACK = {**dict.fromkeys(("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs",
                              "iq3_s", "iq4_xs"), "iq4_nl"),
             **dict.fromkeys(("q2_k", "q3_k", "tq1_0", "tq2_0"), "q4_0"),
             "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def fallback(type_name: str, ne0: int) -> str:
    """The type llama.cpp actually writes for ``type_name`` on rows of ``ne0`` values: the
    type itself where the rows divide into its blocks, else its fallback, else f16 (as
    llama-quant.cpp's `tensor_type_fallback`).

    >>> fallback("q3_k", 576), fallback("q6_k", 576), fallback("q4_k", 100)
    ('q4_0', 'q8_0', 'f16')
    """
    block = gguf.GGML_QUANT_SIZES[ggml(type_name)][0]
    if ne0 % block == 0:
        return type_name
    to = _FALLBACK.get(type_name)
    if to is None:
        if block > 32:  # llama.cpp throws "no tensor type fallback is defined"
            raise KvantError(f"llama.cpp has no fallback for {type_name} on rows of {ne0}")
        to = type_name
    return "f16" if ne0 % gguf.GGML_QUANT_SIZES[ggml(to)][0] else to


def tensor_bytes(tensor: Tensor, type_name: str) -> int:
    """The bytes llama.cpp writes for ``tensor`` in ``type_name`` (or its fallback)."""
    rows, row_bytes = gguf.quant_shape_to_byte_shape((tensor.rows, tensor.ne0),
                                                     ggml(fallback(type_name, tensor.ne0)))
    return rows * row_bytes


def quantizable(path: Path) -> list[Tensor]:
    """The tensors llama-quantize quantizes: 2-D weights other than norms."""
    return [Tensor(t.name, int(t.dims[0]), int(t.dims[1])) for t in read_header(path).tensors
            if len(t.dims) == 2 and t.name.endswith("weight") and "_norm" not in t.name]


def file_types(path: Path) -> dict[str, str]:
    """{tensor name: ggml type name, lower case} of a GGUF file (read from its header alone,
    kvant.gguf_header: a mix's sensitivity reads back every probe file it writes)."""
    return {t.name: t.type_name for t in read_header(path).tensors}


def written_types(tensors: list[Tensor], assignment: dict[str, str]) -> dict[str, str]:
    """What llama-quantize writes for ``assignment``: each tensor's type, or llama.cpp's
    fallback where its rows do not divide the type's blocks (:func:`fallback`)."""
    widths = {t.name: t.ne0 for t in tensors}
    return {n: fallback(t, widths[n]) for n, t in assignment.items()}


def pure(base: Path, type_name: str, out: Path, imatrix: Path | None, threads: int) -> Path:
    """Every quantizable tensor in ``type_name`` (llama-quantize --pure)."""
    quantize(base, out, PURE_FTYPE[type_name], imatrix, threads, ("--pure",))
    return out


MIX_KEY = "kvant.mix"  # written into a mix file: what it is, for kvant.runtimes.gguf_kind


def quantize_with(base: Path, out: Path, tensors: list[Tensor], assignment: dict[str, str],
                  imatrix: Path | None, threads: int, ftype: str = "Q8_0",
                  tag: str | None = None) -> dict[str, str]:
    """llama-quantize ``base`` (whose quantizable ``tensors`` these are) with one anchored
    override per tensor of ``assignment``, each asked for in the type llama.cpp will write
    (its fallback where the rows do not divide); the file is read back against that. Returns
    the types written."""
    planned = written_types(tensors, assignment)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=out.parent,
                                     delete=False) as handle:
        for name, type_name in planned.items():
            handle.write(f"^{re.escape(name)}$={type_name}\n")
        overrides = Path(handle.name)
    options = ("--pure", "--tensor-type-file", overrides,
               *(("--override-kv", f"{MIX_KEY}=str:{tag}") if tag else ()))
    try:
        quantize(base, out, ftype, imatrix, threads, options)
    except BaseException:
        out.unlink(missing_ok=True)  # llama-quantize may leave a partial file
        raise
    finally:
        overrides.unlink(missing_ok=True)
    written = file_types(out)
    wrong = {n: (t, written.get(n)) for n, t in planned.items() if written.get(n) != t}
    if wrong:
        out.unlink()
        name, (want, got) = next(iter(wrong.items()))
        raise KvantError(f"llama-quantize wrote {len(wrong)} tensor(s) with another type than "
                         f"planned ({name}: {got}, planned {want}); the mix file is not kept")
    return planned


def read_imatrix(path: Path | None) -> dict[str, np.ndarray]:
    """{tensor name: mean squared activation per input column} from a GGUF imatrix."""
    if path is None:
        return {}
    tensors = {t.name: np.asarray(t.data, dtype=np.float64).ravel()
               for t in gguf.GGUFReader(str(path)).tensors}
    out = {}
    for name, values in tensors.items():
        if name.endswith(".in_sum2"):
            stem = name.removesuffix(".in_sum2")
            count = tensors.get(stem + ".counts")
            out[stem] = values / max(float(count[0]) if count is not None else 1.0, 1.0)
    return out


def tensor_layout(path: Path) -> dict[str, tuple[int, int, gguf.GGMLQuantizationType]]:
    """{tensor: (absolute data offset, bytes per row, type)} of a GGUF file."""
    return {t.name: (int(t.data_offset), int(t.n_bytes) // int(t.shape[-1]), t.tensor_type)
            for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2}


def read_rows(handle, layout: tuple, r0: int, r1: int) -> np.ndarray:
    """Rows r0..r1 of a tensor as float32, read with plain file reads: a memory map would
    keep every page it touched in the process's RSS (the whole 23 GB file at 11.4B)."""
    offset, row_bytes, ttype = layout
    handle.seek(offset + r0 * row_bytes)
    raw = np.frombuffer(handle.read((r1 - r0) * row_bytes), dtype=np.uint8)
    return gguf.quants.dequantize(raw.reshape(r1 - r0, row_bytes), ttype)


def read_tensor(handle, layout: tuple, tensor: Tensor) -> np.ndarray:
    """The whole tensor as float32 (rows x ne0), dequantized a block of rows at a time into
    one array: gguf-py's dequantizers hold several float32 temporaries of their input, which
    for the 51,200 x 5,120 embedding would be gigabytes at once."""
    out = np.empty((tensor.rows, tensor.ne0), dtype=np.float32)
    for r0 in range(0, tensor.rows, ROWS):
        r1 = min(r0 + ROWS, tensor.rows)
        out[r0:r1] = read_rows(handle, layout, r0, r1)
    return out


class OverTimeBudget(Exception):
    """A measured sensitivity's estimate (from its timed first evaluation) is over budget."""

    def __init__(self, estimate: dict):
        super().__init__(estimate)
        self.estimate = estimate


def duration(seconds: float) -> str:
    """``seconds`` as a person reads it: 4.2 h, 12 min, 35 s, 0.02 s."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.2g} s"


def hf_names(model_dir: Path, tensors: list[Tensor]) -> dict[str, str]:
    """{GGUF tensor name: the HF parameter it was converted from} (gguf-py's name map)."""
    config = read_config(model_dir)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    found = {}
    for file in weight_files(model_dir):
        for hf_name in read_safetensors_header(file):
            gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is not None:
                found[gguf_name] = hf_name
    if config.get("tie_word_embeddings") and "output.weight" not in found:
        found["output.weight"] = "lm_head.weight"
    return {t.name: found[t.name] for t in tensors}


def qk_heads(config: dict) -> dict[str, int]:
    """Heads per GGUF Q/K tensor kind (attn_q, attn_k), for :func:`as_param`."""
    return {"attn_q": config["num_attention_heads"],
            "attn_k": config.get("num_key_value_heads", config["num_attention_heads"])}


def hf_params(model) -> dict:
    """{HF parameter name: parameter} of a transformers model, the output's name included
    where it is tied to the embedding (the embedding is then the output)."""
    params = dict(model.named_parameters())
    if "lm_head.weight" not in params:
        params["lm_head.weight"] = params["model.embed_tokens.weight"]
    return params


def as_param(weights: np.ndarray, tensor: Tensor, heads: dict) -> np.ndarray:
    """A dequantized GGUF tensor (float32 rows of ne0) in its HF parameter's layout: Q/K
    rows back from llama.cpp's order."""
    from kvant.export.gguf_convert import unpermute_qk

    parts = tensor.name.split(".")
    if parts[0] == "blk" and parts[2] in heads:
        weights = unpermute_qk(weights, heads[parts[2]])
    return np.ascontiguousarray(weights)
