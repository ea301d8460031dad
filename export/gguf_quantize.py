"""llama.cpp's own tools on a bf16 GGUF: importance matrix, quantization, and file facts."""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from pathlib import Path

from kvant.export.gguf import GGUFSettings
from kvant.gguf_header import read_header
from kvant.machine import child_limit
from kvant.runtimes.llamacpp import llama_tool, repack_flag, run_tool


def compute_imatrix(base: Path, calib_text: str, out: Path, settings: GGUFSettings,
                    normalizer=None, scratch: Path | None = None,
                    process_output: bool = False) -> dict:
    """llama-imatrix over the calibration text; returns what it used.

    ``process_output`` (when a mix is made): the output tensor's activations are recorded
    too (--process-output), which the mix proxy weighs its error by; llama-quantize then
    uses them for the output tensor of every type made with this file, the uniform twins
    included, so a mix and its twin come from the same importance matrix.

    Repacking off, as Kvant's runtime (kvant.runtimes.llamacpp) runs every GGUF.
    llama-imatrix tokenizes with llama.cpp's tokenizer; the text is pre-normalized with
    NorMistral's own normalizer first, which brings that tokenization to 96-99.8% identical
    paragraphs (statistics of activations barely notice the rest).
    """
    text = normalizer.normalize_str(calib_text) if normalizer is not None else calib_text
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        calib = Path(tmp) / "calib.txt"
        calib.write_text(text, encoding="utf-8")
        # a bf16 file: 2 bytes a parameter, 2 FLOPs a parameter and token
        tokens, size = settings.imatrix_ctx * settings.imatrix_chunks, base.stat().st_size
        log = run_tool([llama_tool("llama-imatrix"), "-m", base, "-f", calib, "-o", out,
                        "-c", settings.imatrix_ctx, "--chunks", settings.imatrix_chunks,
                        "-t", settings.n_threads, "-ngl", "0", repack_flag(False),
                        *(("--process-output",) if process_output else ())],
                       child_limit(flops=size * tokens, nbytes=size))
    chunks = re.findall(r"compute_imatrix: computing over (\d+) chunks", log)
    return {"file": out.name, "chunks": int(chunks[-1]) if chunks else None,
            "ctx": settings.imatrix_ctx, "process_output": process_output}


def quantize(base: Path, out: Path, gguf_type: str, imatrix: Path | None, threads: int,
             options: tuple = ()) -> dict:
    """llama-quantize one type (``options``: more of its flags, such as --pure); count the
    tensors that fell back to another type."""
    cmd = [llama_tool("llama-quantize"), *options]
    if imatrix is not None:
        cmd += ["--imatrix", imatrix]
    # read once, written once smaller; the K-quant search is far under the byte rate here
    log = run_tool([*cmd, base, out, gguf_type.upper(), threads],
                   child_limit(nbytes=2 * base.stat().st_size))
    # llama-quant.cpp's summary: "WARNING: N of M tensor(s) required fallback quantization"
    summary = re.search(r"(\d+) of \d+ tensor\(s\) required fallback quantization", log)
    return {"fallback_tensors": int(summary.group(1)) if summary else 0}


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a file holds."""
    return dict(Counter(t.type_name.upper() for t in read_header(path).tensors))


def bits_per_weight(path: Path) -> float:
    tensors = read_header(path).tensors
    return round(8 * sum(t.n_bytes for t in tensors) / sum(t.n_elements for t in tensors), 3)

