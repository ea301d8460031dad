"""Honesty checks against the peers in the same wheel: llama-perplexity and llama-bench.

Kvant's numbers for a GGUF file should agree with llama.cpp's own tools when both measure
the same thing the same way, so this module reproduces their protocols:

- llama-perplexity (tools/perplexity/perplexity.cpp): tokenize the whole text with
  llama.cpp's tokenizer (NorMistral's exact one in a build with Kvant's patch, and then Kvant
  scores the HF tokenizer's ids), cut it into n_ctx chunks (the remainder dropped), put BOS first in
  each chunk, and score only the second half (`first = n_ctx/2`, n_ctx - 1 - first tokens).
- llama-bench: prompt processing (pp) from an empty cache and token generation (tg) at a
  depth, on the same device, offload and threads as Kvant's own measurement.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from kvant.errors import KvantError
from kvant.machine import child_limit, weights_flops
from kvant.runtimes.llamacpp import (
    LlamaCppRuntime,
    gpu_layers,
    llama_tool,
    repack_flag,
    run_tool,
)
from kvant.scoring import log_softmax
from kvant.tokenization import exact_tokenizer

SPEED_FLASH_ATTN = int(LlamaCppRuntime.flash_attn(all_logits=False))  # as Kvant's speed rows


def kvant_perplexity_llama_protocol(gguf: Path, text: str, n_ctx: int, chunks: int,
                                    threads: int = 0, exact_ids: bool = False,
                                    repack: bool = False) -> float:
    """Perplexity of ``gguf`` on ``text`` by llama-perplexity's protocol, computed by Kvant:
    on llama.cpp's tokens, or (``exact_ids``) on NorMistral's exact HF ids, which a build with
    Kvant's tokenizer patch gives llama-perplexity too."""
    runtime = LlamaCppRuntime(gguf, threads=threads, n_ctx=n_ctx, repack=repack)
    try:
        tokens = (exact_tokenizer(gguf).encode(text).ids if exact_ids
                  else runtime.stock_tokenize(text))
        n_chunk = min(chunks, len(tokens) // n_ctx)
        if n_chunk < 1:
            raise KvantError(f"text gives {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
        first = n_ctx // 2
        nll, count = 0.0, 0
        for i in range(n_chunk):
            chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
            chunk[0] = runtime.llm.token_bos()
            lp = log_softmax(runtime.logits(chunk)[first:n_ctx - 1])
            targets = np.asarray(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx])
            nll -= lp[np.arange(len(targets)), targets].sum()
            count += n_ctx - 1 - first
        return math.exp(nll / count)
    finally:
        runtime.close()


def _limit(gguf: Path, tokens: int) -> float:
    """A llama.cpp tool's time limit for ``tokens`` through the file (kvant.machine)."""
    size = Path(gguf).stat().st_size
    return child_limit(flops=weights_flops(size, tokens), nbytes=size)


def llama_perplexity(gguf: Path, text_file: Path, n_ctx: int, chunks: int,
                     threads: int = 0, repack: bool = False) -> tuple[float, int]:
    """llama-perplexity's own estimate on the same file and settings, CPU weight repacking
    included: (PPL, chunks scored).

    Its running estimate `[i]ppl,` is cumulative over the first i chunks; the last one
    printed is used (its logger thread can exit before the "Final estimate" line is written,
    so that line is not relied on), and the caller scores the same number of chunks.
    """
    log = run_tool([llama_tool("llama-perplexity"), "-m", gguf, "-f", text_file, "-c", n_ctx,
                    "-b", n_ctx, "--chunks", chunks, "-t", threads or os.cpu_count(),
                    "-ngl", "0", repack_flag(repack)],
                   _limit(gguf, n_ctx * chunks))
    running = re.findall(r"\[(\d+)\]([0-9.]+),", log)
    if not running:
        raise KvantError("llama-perplexity printed no perplexity estimate")
    index, value = running[-1]
    return float(value), int(index)


def llama_bench(gguf: Path, n_prompt: int, n_gen: int, device: str = "cpu", threads: int = 0,
                repetitions: int = 3, repack: bool = False) -> dict:
    """llama-bench like Kvant's own rows: prefill of ``n_prompt`` tokens from an empty cache,
    decode of ``n_gen`` tokens at depth ``n_prompt``; same device offload, threads and CPU
    weight repacking."""
    threads = threads or os.cpu_count()
    ngl = 99 if gpu_layers(device) < 0 else 0  # llama-bench's "all layers" is a count
    # each repetition of each depth: a prefill, and the generated tokens at that depth
    tokens = 2 * repetitions * (n_prompt + n_gen) + n_prompt
    log = run_tool([llama_tool("llama-bench"), "-m", gguf, "-p", n_prompt, "-n", n_gen,
                    "-d", f"0,{n_prompt}", "-t", threads, "-r", repetitions, "-ngl", ngl,
                    "--repack", int(repack), "-fa", SPEED_FLASH_ATTN, "-o", "json"],
                   _limit(gguf, tokens))
    rows = json.loads(log[log.index("["):log.rindex("]") + 1])
    out = {"n_prompt": n_prompt, "n_gen": n_gen, "decode_depth": n_prompt, "threads": threads,
           "n_gpu_layers": ngl, "device": device, "repack": repack,
           "flash_attn": bool(SPEED_FLASH_ATTN)}
    for row in rows:
        depth = row.get("n_depth", 0)
        if row.get("n_prompt") and not row.get("n_gen") and depth == 0:
            out["prefill_tok_s"] = round(row["avg_ts"], 2)
            out["prefill_tok_s_stddev"] = round(row.get("stddev_ts", 0.0), 2)
        elif row.get("n_gen") and not row.get("n_prompt") and depth == n_prompt:
            out["decode_tok_s"] = round(row["avg_ts"], 2)
            out["decode_tok_s_stddev"] = round(row.get("stddev_ts", 0.0), 2)
    return out
