"""`kvant export gguf` settings: which files, which importance matrix, which tokenizer metadata.

A light module (no engine imports) so the CLI builds its flags from :class:`GGUFSettings`;
the work is in gguf_pipeline.py (convert, imatrix, quantize, validate, card).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvant.data import DEFAULT_CALIB, EvalSettings
from kvant.errors import SettingsError
from kvant.plan.sizes import parse_size
from kvant.registry import unknown_key_message

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
# llama.cpp's pre-tokenizer names (src/llama-vocab.cpp). `ufakzeka` has no case split, so
# all-caps words with Æ Ø Å or Sámi letters survive (`EØS`); `tekken` is the fallback for
# older llama.cpp builds.
PRE_TOKENIZERS = ("ufakzeka", "tekken")


MIX_SENSITIVITY = ("auto", "direct", "torch", "fisher", "proxy")


def mix_size(gguf_type: str) -> int:
    """The byte budget of ``mix:SIZE`` (``mix:6.5GiB``)."""
    return parse_size(gguf_type.removeprefix("mix:"), "mix size", "mix:6.5GiB or mix:7GB")


def is_mix(gguf_type: str) -> bool:
    """``<type>-mix`` (no larger than uniform <type>) or ``mix:SIZE`` (an explicit budget)."""
    return gguf_type.endswith("-mix") or gguf_type.startswith("mix:")


def mix_base(gguf_type: str) -> str | None:
    """The uniform type a ``<type>-mix`` must not outgrow (None for ``mix:SIZE``)."""
    return gguf_type.removesuffix("-mix") if gguf_type.endswith("-mix") else None


@dataclass(frozen=True)
class GGUFSettings(EvalSettings):
    """What `kvant export gguf` makes; stored in the manifest."""

    types: tuple[str, ...] = DEFAULT_TYPES
    """Comma-separated llama.cpp types (bf16, q8_0, q6_k, q5_k_m, q4_k_m, q3_k_m, iq4_xs, ...),
    <type>-mix (per-tensor types no larger than uniform <type>) or mix:SIZE (mix:6.5GiB)."""
    imatrix: str = "auto"
    """auto (computed on --calib), none, or the path of an existing imatrix file."""
    calib: str = DEFAULT_CALIB
    """Calibration text of the importance matrix and the mix: a text file, a set name, or
    a weighted mix of them (nob-train:0.5,nno-train:0.3,...)."""
    imatrix_chunks: int = 64
    """Windows of --imatrix-ctx tokens llama-imatrix reads."""
    imatrix_ctx: int = 512
    """Tokens per llama-imatrix window."""
    pre: str = "ufakzeka"
    """tokenizer.ggml.pre for stock llama.cpp users (ufakzeka, or tekken for old builds)."""
    threads: int = 0
    """0: all cores."""
    context_length: int = 0
    """Trained context to write (0: NorMistral's known value, else config.json)."""
    mix_sensitivity: str = "auto"
    """For <type>-mix and mix:SIZE: direct (KLD per tensor and type on calibration windows,
    one llama-quantize each), torch (the same KLD with the one tensor dequantized into the
    transformers model: a forward each), fisher (a second-order estimate of that KLD from a
    few backward passes: minutes where torch takes hours, where the model and its gradients
    fit in memory), proxy (importance-weighted quantization error, no model run; measured
    worse than llama.cpp's own rule) or auto (direct, else torch, else fisher, whichever
    first fits --mix-time-budget and memory; else no <type>-mix is made and its uniform file
    ships in its place)."""
    mix_time_budget: float = 3600.0
    """Seconds the sensitivity may take under auto: each method's first evaluation is timed
    and multiplied by the evaluations left; over this the next method is tried."""
    mix_tokens: int = 2048
    """Calibration tokens the direct sensitivity is measured on."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.context_length < 0:
            raise SettingsError(f"--context-length {self.context_length}: give a token count, "
                                "or 0 for the model's trained context")
        object.__setattr__(self, "types", tuple(t.lower() for t in self.types))  # Q4_K_M ok
        for t in self.types:
            if t.startswith("mix:"):
                mix_size(t)
            elif t not in DIRECT and t not in QUANT_TYPES and mix_base(t) not in QUANT_TYPES:
                raise SettingsError(unknown_key_message(
                    "GGUF type", t, [*DIRECT, *QUANT_TYPES, "<type>-mix", "mix:SIZE"]))
        if self.mix_sensitivity not in MIX_SENSITIVITY:
            raise SettingsError(unknown_key_message("mix sensitivity", self.mix_sensitivity,
                                                    MIX_SENSITIVITY))
        if self.mix_tokens <= 0:
            raise SettingsError("--mix-tokens must be positive")
        if self.mix_time_budget < 0:
            raise SettingsError("--mix-time-budget must be 0 (no measured sensitivity) or "
                                "more seconds")
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

    def kinds(self, model_name: str) -> dict[str, str]:
        """{target name: artifact kind} of the files these settings make."""
        return {file_stem(model_name, t): kind(t) for t in self.types}


def kind(gguf_type: str) -> str:
    """The artifact kind of one GGUF type (kvant.plan's key): gguf-q4_k_m, gguf-q4_k_m-mix,
    gguf-mix-6.5gib."""
    return f"gguf-{gguf_type.lower().replace(':', '-')}"


def file_stem(model_name: str, gguf_type: str) -> str:
    """The hub's naming without the suffix: ``<model>-<TYPE>`` (Q4_K_M, Q4_K_M-MIX,
    MIX-6.5GiB)."""
    if gguf_type.startswith("mix:"):
        return f"{model_name}-MIX-{gguf_type.removeprefix('mix:')}"
    return f"{model_name}-{gguf_type.upper()}"


def file_name(model_name: str, gguf_type: str) -> str:
    """The hub's naming: ``<model>-<TYPE>.gguf`` (normistral-11b-long-Q4_K_M.gguf)."""
    return file_stem(model_name, gguf_type) + ".gguf"


def measures_mix(settings: GGUFSettings, synthetic: bool, rehearsal: bool) -> bool:
    """Whether an export with ``settings`` scores the model on calibration windows for its
    mixes (kvant.export.gguf_pipeline's sensitivity): a measured sensitivity on real
    weights, or a rehearsal's timing of the torch method; never for the proxy."""
    if settings.mix_sensitivity == "proxy" or not any(is_mix(t) for t in settings.types):
        return False
    return rehearsal and settings.mix_sensitivity == "auto" if synthetic else True
