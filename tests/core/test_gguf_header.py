"""kvant.gguf_header walks a GGUF header by hand (gguf-py's GGUFReader takes seconds on
NorMistral's vocabulary): it must read what GGUFReader reads, and refuse what it refuses."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from kvant.gguf_header import GGUFTensor, read_header


def _write(path):
    """A file with every kind of metadata value (nested arrays and arrays of strings among
    them) and tensors of several types."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("k.u8", 7)
    writer.add_int16("k.i16", -3)
    writer.add_uint32("llama.context_length", 32768)
    writer.add_float32("k.f32", 0.5)
    writer.add_bool("k.bool", True)
    writer.add_uint64("k.u64", 2**40)
    writer.add_float64("k.f64", 1.25)
    writer.add_string("k.str", "Blåbærsyltetøy")
    writer.add_array("tokenizer.ggml.tokens", ["", "ø", "a longer entry", *map(str, range(300))])
    writer.add_array("k.ints", list(range(1000)))
    writer.add_array("k.nested", [[1, 2], [3]])
    writer.add_tensor("blk.0.ffn_up.weight", np.ones((3, 64), np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float16))
    q8 = np.zeros((5, 2 * 34), np.uint8)  # two Q8_0 blocks of 32 values per row
    writer.add_tensor("token_embd.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_header_is_what_gguf_py_reads(tmp_path):
    path = _write(tmp_path / "m.gguf")
    header, reader = read_header(path), gguf.GGUFReader(str(path))
    assert header.tensors == [GGUFTensor(t.name, tuple(int(d) for d in t.shape),
                                         t.tensor_type.name.lower()) for t in reader.tensors]
    assert header.tensors[2] == GGUFTensor("token_embd.weight", (64, 5), "q8_0")
    assert [(t.n_elements, t.n_bytes) for t in header.tensors] == [
        (int(t.n_elements), int(t.n_bytes)) for t in reader.tensors]
    arrays = {k: len(f.data) for k, f in reader.fields.items()
              if f.types and f.types[0] == gguf.GGUFValueType.ARRAY}
    scalars = {k: f.contents() for k, f in reader.fields.items()
               if f.types and f.types[0] != gguf.GGUFValueType.ARRAY
               and not k.startswith("GGUF.")}  # gguf-py's own entries for the counts
    # gguf-py keeps a nested array's inner items flat: its count is of the outer items here
    assert header.array_lengths == {**arrays, "k.nested": 2}
    assert arrays["tokenizer.ggml.tokens"] == 303
    assert header.fields == scalars
    assert header.fields["k.str"] == "Blåbærsyltetøy" and header.fields["k.u64"] == 2**40


def test_a_truncated_or_foreign_file_is_refused(tmp_path):
    whole = _write(tmp_path / "m.gguf").read_bytes()
    header_end = whole.index(b"token_embd.weight") + 200  # past the tensor table
    # the last tensor's 340 bytes (5 rows of two Q8_0 blocks) end the file, padded to 32
    for name, data in (("short", whole[:-100]), ("headless", whole[:header_end // 2]),
                       ("tiny", whole[:10]), ("foreign", b"PK\x03\x04" + whole[4:])):
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(data)
        with pytest.raises(ValueError):
            read_header(bad)
