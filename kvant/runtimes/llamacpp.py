"""The llama.cpp runtime (llama-cpp-python), and where llama.cpp's own tools live."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np

from kvant.errors import KvantError
from kvant.machine import die_with_parent, over_limit
from kvant.tokenization import GGUF_PRE_EXACT, exact_tokenizer

# llama-cpp-python hands llama.cpp's own log (every file load's metadata dump, 80 lines and
# more) to this logger, and prints everything while its level is unset: quiet unless the
# application asked for it (the CLI's -v sets DEBUG before this module is imported)
LLAMA_LOG = logging.getLogger("llama-cpp-python")
if LLAMA_LOG.level == logging.NOTSET:
    LLAMA_LOG.setLevel(logging.ERROR)


def llama_tool(name: str) -> Path:
    """A llama.cpp tool shipped in the llama-cpp-python wheel (site-packages/bin)."""
    tool = Path(llama_cpp.__file__).resolve().parents[1] / "bin" / name
    if not tool.is_file():
        raise KvantError(f"{name} is missing from the llama-cpp-python install; reinstall it "
                         "with LLAMA_BUILD_TOOLS=ON as the Makefile's setup does")
    return tool


# Written by tools/llama_cpp_wheel.py (`make setup`) beside the environment it installed into.
BUILD_RECORD = Path(sys.prefix) / "share" / "kvant" / "llama-cpp-build.json"


def build_info() -> dict:
    """The llama.cpp build in use: llama.cpp's own system info (the CPU features compiled
    in), and what `make setup` recorded when it chose and smoke-tested the build on this CPU
    (variant, compiler flags, faults seen); ``recorded`` False for an install it did not
    make."""
    info = {"llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode().strip()}
    info["features"] = sorted({m.group(1) for m in re.finditer(r"(\w+) = 1",
                                                             info["system_info"])})
    if BUILD_RECORD.is_file():
        record = json.loads(BUILD_RECORD.read_text(encoding="utf-8"))
        info.update({k: record.get(k) for k in ("variant", "cflags", "faults", "smoke_s",
                                                "checked", "cpu")}, recorded=True)
    else:
        info["recorded"] = False
    return info


def run_tool(cmd: list, limit_s: float) -> str:
    """Run a llama.cpp tool; its output, or one error line with the end of its log, or
    with ``limit_s`` (kvant.machine.child_limit), after which it is killed."""
    try:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                              preexec_fn=die_with_parent, timeout=limit_s)
    except subprocess.TimeoutExpired:
        raise KvantError(over_limit(Path(cmd[0]).name, limit_s)) from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise KvantError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}): "
                         + " | ".join(tail))
    return proc.stdout + proc.stderr


def repack_flag(repack: bool) -> str:
    """llama.cpp's common flag for CPU weight repacking (its tools default to on), so that a
    tool Kvant starts runs with the setting of the runtime it is compared with."""
    return "--repack" if repack else "--no-repack"


# llama.cpp's KV cache types (ggml_type ids); quantized V needs flash attention there
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}


def gpu_layers(device: str) -> int:
    """llama.cpp's offload for a device: every layer on a GPU, none on the CPU."""
    return -1 if device.startswith("cuda") else 0


_PARAMS_LOCK = threading.Lock()


@contextlib.contextmanager
def _model_params(repack: bool):
    """llama-cpp-python 0.3.36's Llama() does not expose llama.cpp's `use_extra_bufts` (the
    CPU weight repacking that llama-bench calls --repack), so the default parameters it
    starts from are adjusted while a model loads."""
    bindings = llama_cpp.llama_cpp  # the ctypes module Llama() calls
    default = bindings.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = repack
        return p

    with _PARAMS_LOCK:
        bindings.llama_model_default_params = params
        try:
            yield
        finally:
            bindings.llama_model_default_params = default


class LlamaCppRuntime:
    """One GGUF file in llama.cpp.

    ``repack``: let llama.cpp repack weights for its CPU SIMD kernels (its default). Off
    here: it keeps a second copy of every repacked tensor beside the mapped file (the
    40-layer Q4_K_M peaked at 11.9 GB against 6.7 GB planned), and on this project's 2-core
    EPYC at NorMistral's width it made prefill 1.85x slower, decode 5% faster (docs/bench.md).
    """

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0, n_ctx: int = 0,
                 all_logits: bool = True, n_batch: int = 512, repack: bool = False,
                 kv_type: str = "f16"):
        threads = threads or os.cpu_count()
        n_ctx = n_ctx or 4096
        # Scoring evaluates a whole window at once (n_batch = n_ctx) on the plain attention
        # path validated against transformers; speed runs use llama.cpp's batch of 512 and
        # flash attention, as llama.cpp's tools resolve their "auto" on a CPU (llama-bench
        # is run with the same, see kvant.bench.peers).
        with _model_params(repack):
            self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx,
                                       n_batch=n_ctx if all_logits else n_batch,
                                       logits_all=all_logits,
                                       verbose=LLAMA_LOG.level <= logging.DEBUG,
                                       flash_attn=self.flash_attn(all_logits) or
                                       kv_type != "f16",
                                       type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type],
                                       n_gpu_layers=gpu_layers(device), n_threads=threads,
                                       n_threads_batch=threads)

    @staticmethod
    def flash_attn(all_logits: bool) -> bool:
        """Flash attention for speed runs (last-position logits), not for scoring."""
        return not all_logits

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - start

    def _last_logits(self) -> np.ndarray:
        """The newest position's logits straight from llama.cpp (valid with or without
        logits_all; llama-cpp-python's `scores` buffer is only n_batch rows without it)."""
        pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),))

    def decode(self, ids: list[int], n_new: int) -> float:
        self.llm.reset()
        self.llm.eval(ids)
        token = int(np.argmax(self._last_logits()))
        start = time.perf_counter()
        for _ in range(n_new):
            self.llm.eval([token])
            token = int(np.argmax(self._last_logits()))
        return time.perf_counter() - start

    def greedy(self, ids: list[int]) -> Iterator[int]:
        self.llm.reset()
        self.llm.eval(ids)
        while True:
            token = int(np.argmax(self._last_logits()))
            yield token
            self.llm.eval([token])

    def sample(self, ids: list[int], sampling) -> Iterator[int]:
        """Tokens after ``ids`` from llama.cpp's samplers (``sampling``: a
        kvant.engine.Sampling; greedy at temperature 0). Reuses the KV cache of the
        prefix the previous call shared."""
        random = sampling.seed is None
        self.llm.set_seed(secrets.randbits(31) if random else sampling.seed)
        return self.llm.generate(ids, temp=max(sampling.temperature, 0.0),
                                 top_p=sampling.top_p, top_k=sampling.top_k, min_p=0.0,
                                 repeat_penalty=1.0)

    def stock_tokenize(self, text: str) -> list[int]:
        """This llama.cpp build's own tokenization, with <s>: what its tools (llama-cli,
        llama-perplexity) get; exact for a file with tokenizer.ggml.pre_exact in a build with
        Kvant's patch, else what stock clients such as Ollama get."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def close(self) -> None:
        self.llm.close()


class StockTokenizer:
    """llama.cpp's own tokenizer from a file's vocabulary alone. Loads no weights and creates
    no context (llama_cpp.Llama(vocab_only=True) still makes one, and its "n_ctx_train (0)"
    warning cluttered stderr).

    ``stock`` (default): what a stock llama.cpp build gets (llama-cli, Ollama, LM Studio),
    also under Kvant's patched build: the file's tokenizer.ggml.pre_exact is overridden
    away. ``stock=False``: this build's own best, exact where it has Kvant's patch.
    """

    def __init__(self, path: Path, stock: bool = True):
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        if stock:  # kept on self: llama.cpp reads the array while loading
            self._overrides = (llama_cpp.llama_model_kv_override * 2)()
            self._overrides[0].key = GGUF_PRE_EXACT.encode()
            self._overrides[0].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            self._overrides[0].value.val_str = b""
            params.kv_overrides = self._overrides
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise KvantError(f"llama.cpp could not read the vocabulary of '{path}'")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        data = text.encode("utf-8")
        room = len(data) + 2  # byte-level BPE: never more tokens than bytes, plus <s>
        tokens = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, room, add_bos, False)
        if n < 0:
            raise KvantError(f"llama.cpp's tokenizer needed {-n} tokens for {len(data)} bytes")
        return list(tokens[:n])

    def detokenize(self, ids: list[int]) -> str:
        """llama.cpp's text for ``ids`` (<s> and other special tokens left out)."""
        tokens = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
        room = 16 * len(ids) + 16
        buf = ctypes.create_string_buffer(room)
        n = llama_cpp.llama_detokenize(self.vocab, tokens, len(ids), buf, room, True, False)
        if n < 0:
            raise KvantError(f"llama.cpp's detokenizer needed {-n} bytes")
        return buf.raw[:n].decode("utf-8", errors="replace")

    def close(self) -> None:
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None


# Every part of NorMistral's tokenizer that stock llama.cpp lacks: the leading space, the
# newline rule (trailing spaces, a blank line, an indented line), NFKC (a ligature, an
# ellipsis, a no-break space, full-width letters), an all-caps word with Ø (the Tekken split
# with Unicode cases) and a word longer than 24 bytes (the chunks).
TOKENIZER_PROBE = ("EØS-avtalen gjelder \ufb01re år\u2026\n\nDet er  \n  samisk: Sámediggi, "
                   "čáppa ŋ \uff26\uff55\uff4c\uff4c\u00a0bredde, "
                   "Donaudampfschifffahrtsgesellschaftskapitän")


def native_exact(path: Path) -> bool:
    """Whether this llama.cpp build tokenizes ``path`` exactly as NorMistral's HF tokenizer
    (a build with Kvant's patch, patches/llama.cpp, reading the file's
    tokenizer.ggml.pre_exact). Checked on the ids of :data:`TOKENIZER_PROBE`."""
    exact = exact_tokenizer(Path(path)).encode(TOKENIZER_PROBE).ids
    native = StockTokenizer(path, stock=False)
    try:
        return native.tokenize(TOKENIZER_PROBE) == exact
    finally:
        native.close()


def tokenizer_path(exact: bool) -> str:
    """Which tokenizer feeds llama.cpp for a GGUF file, in words (`kvant info`), given
    :func:`native_exact` of it."""
    if exact:
        return ("llama.cpp's own: this build has Kvant's NorMistral tokenizer patch and the file "
                "asks for it (tokenizer.ggml.pre_exact); llama.cpp's tools get exact ids")
    return ("Kvant's exact Python tokenizer (embedded tokenizer.huggingface.json) feeds "
            "llama.cpp; llama.cpp's own tokenizer differs here (a build without Kvant's patch, "
            "or a file exported before tokenizer.ggml.pre_exact)")
