"""A GGUF file's header: its metadata values and tensor table, without the tensor data.

    header = read_header(Path("model-Q4_K_M.gguf"))
    header.fields["llama.context_length"], header.tensors[0].type_name

Written by hand beside gguf-py's GGUFReader, which builds a numpy view for every item of
every metadata array: 2.1 s a file at NorMistral's 51,200 tokens and 50,000 merges. Kvant
reads a file's header several times a command (its kind, its sizes, its context, its
tokenizer) and a mix's sensitivity reads back hundreds of probe files; this walks the header
in about 25 ms. It checks what a reader must before a file is used: the magic and version,
every value inside the file, every tensor's data inside the file. A big-endian file (which
llama.cpp cannot run on a little-endian machine anyway) is read with GGUFReader.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf

# GGUF's fixed-size metadata values: struct's format for each
_SCALAR = {gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b",
           gguf.GGUFValueType.UINT16: "H", gguf.GGUFValueType.INT16: "h",
           gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i",
           gguf.GGUFValueType.FLOAT32: "f", gguf.GGUFValueType.BOOL: "?",
           gguf.GGUFValueType.UINT64: "Q", gguf.GGUFValueType.INT64: "q",
           gguf.GGUFValueType.FLOAT64: "d"}
DEFAULT_ALIGNMENT = 32  # GGUF's, where general.alignment is not set


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    dims: tuple[int, ...]
    """In ggml's order: the row length (ne0) first."""
    type_name: str
    """The ggml type, lower case (q4_k, bf16, ...)."""

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)

    @property
    def n_bytes(self) -> int:
        """Its data's bytes in the file (without the padding to the next tensor)."""
        rows, row_bytes = gguf.quant_shape_to_byte_shape(
            (math.prod(self.dims[1:]), self.dims[0]),
            gguf.GGMLQuantizationType[self.type_name.upper()])
        return rows * row_bytes


@dataclass(frozen=True)
class GGUFHeader:
    fields: dict[str, object] = field(default_factory=dict)
    """Every scalar and string value by key (an array's items are not kept)."""
    array_lengths: dict[str, int] = field(default_factory=dict)
    """Every array's item count by key (tokenizer.ggml.tokens: the vocabulary)."""
    tensors: list[GGUFTensor] = field(default_factory=list)


def read_header(path: Path) -> GGUFHeader:
    """The header of the GGUF file at ``path``; a malformed or truncated file raises
    ValueError. (Not cached: a probe file rewritten within the file system's timestamp
    granularity would look unchanged.)"""
    size = Path(path).stat().st_size
    with open(path, "rb") as handle:
        if size < 24:
            raise ValueError("shorter than a GGUF header")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            magic, version = struct.unpack_from("<II", buf, 0)
            if magic != gguf.GGUF_MAGIC:
                raise ValueError("not a GGUF file (no GGUF magic)")
            if version > 0xFFFF:  # big-endian
                return _from_reader(gguf.GGUFReader(str(path)))
            try:
                return _walk(buf, version, size)
            except (struct.error, IndexError, UnicodeDecodeError) as exc:
                raise ValueError(f"truncated or corrupt header ({exc})") from exc


def _walk(buf, version: int, size: int) -> GGUFHeader:
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}, not 2 or 3")
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24

    def string(at: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", buf, at)
        if at + 8 + length > size:
            raise ValueError("a string runs past the end of the file")
        return bytes(buf[at + 8:at + 8 + length]).decode("utf-8"), at + 8 + length

    def skip(vtype: int, at: int) -> int:
        if vtype == gguf.GGUFValueType.STRING:  # its length only: no need to decode it
            return at + 8 + struct.unpack_from("<Q", buf, at)[0]
        if vtype in _SCALAR:
            return at + struct.calcsize(_SCALAR[vtype])
        if vtype != gguf.GGUFValueType.ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        item, count = struct.unpack_from("<IQ", buf, at)
        at += 12
        if item in _SCALAR:
            return at + count * struct.calcsize(_SCALAR[item])
        for _ in range(count):
            at = skip(item, at)
        return at

    header = GGUFHeader()
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if vtype == gguf.GGUFValueType.STRING:
            header.fields[key], pos = string(pos)
        elif vtype in _SCALAR:
            (header.fields[key],) = struct.unpack_from("<" + _SCALAR[vtype], buf, pos)
            pos = skip(vtype, pos)
        else:
            header.array_lengths[key] = struct.unpack_from("<IQ", buf, pos)[1] \
                if vtype == gguf.GGUFValueType.ARRAY else 0
            pos = skip(vtype, pos)
    ends = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        tensor = GGUFTensor(name, tuple(dims), gguf.GGMLQuantizationType(ggml_type).name.lower())
        header.tensors.append(tensor)
        ends.append((offset + tensor.n_bytes, name))
    alignment = int(header.fields.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-pos // alignment) * alignment
    for end, name in ends:
        if data_start + end > size:
            raise ValueError(f"tensor {name} lies past the end of the file")
    return header


def _from_reader(reader) -> GGUFHeader:
    header = GGUFHeader()
    for key, value in reader.fields.items():
        if not value.types:
            continue
        if value.types[0] == gguf.GGUFValueType.ARRAY:
            header.array_lengths[key] = len(value.data)
        else:
            header.fields[key] = value.contents()
    header.tensors.extend(GGUFTensor(t.name, tuple(int(d) for d in t.shape),
                                     t.tensor_type.name.lower()) for t in reader.tensors)
    return header
