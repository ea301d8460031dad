"""`kvant export gguf`: NorMistral to GGUF for llama.cpp, every file validated.

Steps: convert the checkpoint to a bf16 GGUF with our converter (gguf-py; exact tokenizer
embedded), compute a Norwegian importance matrix with llama.cpp's llama-imatrix, make every
other type with llama.cpp's own quantizer (llama-quantize from the llama-cpp-python wheel),
then load each file back in llama.cpp and score it on the HF tokenizer's ids against the
transformers model: logits parity for f32, mean KLD and top-1 agreement for the rest.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvant.data import DEFAULT_CALIB, EvalSettings
from kvant.errors import KvantError, SettingsError
from kvant.registry import unknown_key_message

logger = logging.getLogger(__name__)

# llama.cpp's type names (tools/quantize) in lower case -> gguf.LlamaFileType member
QUANT_TYPES = {
    "q8_0": "MOSTLY_Q8_0", "q6_k": "MOSTLY_Q6_K", "q5_k_m": "MOSTLY_Q5_K_M",
    "q5_k_s": "MOSTLY_Q5_K_S", "q4_k_m": "MOSTLY_Q4_K_M", "q4_k_s": "MOSTLY_Q4_K_S",
    "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_l": "MOSTLY_Q3_K_L", "q3_k_s": "MOSTLY_Q3_K_S",
    "q2_k": "MOSTLY_Q2_K", "q4_0": "MOSTLY_Q4_0", "q5_0": "MOSTLY_Q5_0",
    "iq4_xs": "MOSTLY_IQ4_XS", "iq4_nl": "MOSTLY_IQ4_NL", "iq3_m": "MOSTLY_IQ3_M",
    "iq3_xxs": "MOSTLY_IQ3_XXS", "iq2_m": "MOSTLY_IQ2_M", "iq2_xs": "MOSTLY_IQ2_XS",
}
DIRECT = ("f32", "f16", "bf16")
DEFAULT_TYPES = ("bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "iq4_xs")


@dataclass(frozen=True)
class GGUFSettings(EvalSettings):
    """What `kvant export gguf` makes; stored in the manifest."""

    types: tuple[str, ...] = DEFAULT_TYPES
    imatrix: str = "auto"
    """auto (computed on --calib), none, or the path of an existing imatrix file."""
    calib: str = DEFAULT_CALIB
    imatrix_chunks: int = 64
    imatrix_ctx: int = 512
    pre: str = "ufakzeka"
    """tokenizer.ggml.pre for stock llama.cpp users (ufakzeka, or tekken for old builds)."""
    threads: int = 0
    """0: all cores."""

    def __post_init__(self) -> None:
        from kvant.export.gguf_tokenizer import PRE_TOKENIZERS

        super().__post_init__()
        object.__setattr__(self, "types", tuple(t.lower() for t in self.types))  # Q4_K_M ok
        for t in self.types:
            if t not in DIRECT and t not in QUANT_TYPES:
                raise SettingsError(unknown_key_message("GGUF type", t, [*DIRECT, *QUANT_TYPES]))
        if self.imatrix == "none" and any(t.startswith("iq") for t in self.types):
            bad = ", ".join(t for t in self.types if t.startswith("iq"))
            raise SettingsError(f"{bad} need an importance matrix; drop --imatrix none or "
                                "choose k-quant types")
        if self.pre not in PRE_TOKENIZERS:
            raise SettingsError(unknown_key_message("pre-tokenizer", self.pre, PRE_TOKENIZERS))
        if min(self.imatrix_chunks, self.imatrix_ctx) <= 0:
            raise SettingsError("imatrix sizes must be positive")

    @property
    def n_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


def file_name(model_name: str, gguf_type: str) -> str:
    """The hub's naming: ``<model>-<TYPE>.gguf`` (normistral-11b-long-Q4_K_M.gguf)."""
    return f"{model_name}-{gguf_type.upper()}.gguf"


def llama_tool(name: str) -> Path:
    """A llama.cpp tool shipped in the llama-cpp-python wheel (site-packages/bin)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise KvantError("llama-cpp-python is not installed; run `make setup` (it builds it "
                         "with llama.cpp's tools)") from exc
    tool = Path(llama_cpp.__file__).resolve().parents[1] / "bin" / name
    if not tool.is_file():
        raise KvantError(f"{name} is missing from the llama-cpp-python install; reinstall it "
                         "with LLAMA_BUILD_TOOLS=ON as the Makefile's setup does")
    return tool


def run_tool(cmd: list[str]) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise KvantError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}): "
                         + " | ".join(tail))
    return proc.stdout + proc.stderr


def compute_imatrix(base: Path, calib_text: str, out: Path, settings: GGUFSettings,
                    normalizer=None) -> dict:
    """llama-imatrix over the calibration text; returns what it used.

    llama-imatrix tokenizes with llama.cpp's tokenizer; the text is pre-normalized with
    NorMistral's own normalizer first, which brings that tokenization to 96-99.8% identical
    paragraphs (statistics of activations barely notice the rest).
    """
    text = normalizer.normalize_str(calib_text) if normalizer is not None else calib_text
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.txt"
        calib.write_text(text, encoding="utf-8")
        log = run_tool([llama_tool("llama-imatrix"), "-m", base, "-f", calib, "-o", out,
                    "-c", settings.imatrix_ctx, "--chunks", settings.imatrix_chunks,
                    "-t", settings.n_threads, "-ngl", "0"])
    chunks = re.findall(r"compute_imatrix: computing over (\d+) chunks", log)
    return {"file": out.name, "chunks": int(chunks[-1]) if chunks else None,
            "ctx": settings.imatrix_ctx}


def quantize(base: Path, out: Path, gguf_type: str, imatrix: Path | None, threads: int) -> dict:
    """llama-quantize one type; count the tensors that fell back to another type."""
    cmd = [llama_tool("llama-quantize")]
    if imatrix is not None:
        cmd += ["--imatrix", imatrix]
    log = run_tool([*cmd, base, out, gguf_type.upper(), threads])
    # llama-quant.cpp's summary: "WARNING: N of M tensor(s) required fallback quantization"
    summary = re.search(r"(\d+) of \d+ tensor\(s\) required fallback quantization", log)
    return {"fallback_tensors": int(summary.group(1)) if summary else 0}


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a file holds."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def bits_per_weight(path: Path) -> float:
    import gguf

    reader = gguf.GGUFReader(str(path))
    n = sum(int(t.n_elements) for t in reader.tensors)
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    return round(8 * nbytes / n, 3)




def scratch_dir(near: Path) -> tempfile.TemporaryDirectory:
    """A work folder on the output's disk (GGUF intermediates are model-sized)."""
    near.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".kvant-gguf-", dir=near)


