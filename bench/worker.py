"""One speed-and-memory measurement, run in a fresh process (``python -m kvant.bench.worker``).

A fresh process per (target, context length), as optimum-benchmark and llama-bench do, so
that peak memory belongs to this measurement alone and no warm state leaks between targets.
Warm-up first, the device synchronised before each clock read, decode timed apart from
prefill, the median of repeats reported.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path


def measure(spec: dict) -> dict:
    """spec: target (dict), ids (list[int], at least ctx long), ctx, n_new, repeats, device,
    threads. Returns times in seconds, rates in tokens per second, memory in MiB."""
    from kvant.bench.backends import Target, load
    from kvant.memory import peak_rss_mib

    target = Target(**{**spec["target"], "path": Path(spec["target"]["path"])})
    ctx, n_new, repeats = spec["ctx"], spec["n_new"], spec["repeats"]
    ids = spec["ids"][:ctx]
    device = spec["device"]
    started = time.perf_counter()
    backend = load(target, device, spec["threads"], n_ctx=ctx + n_new + 8, all_logits=False)
    load_s = time.perf_counter() - started
    backend.prefill(ids[: min(32, ctx)])  # warm-up: first-call allocations and kernel choice
    prefill = [backend.prefill(ids) for _ in range(repeats)]
    decode = [backend.decode(ids, n_new) for _ in range(repeats)]
    result = {
        "ctx": ctx, "n_new": n_new, "repeats": repeats, "device": device,
        "threads": spec["threads"], "load_s": round(load_s, 3),
        "prefill_s": round(statistics.median(prefill), 4),
        "prefill_tok_s": round(ctx / statistics.median(prefill), 2),
        "decode_s": round(statistics.median(decode), 4),
        "decode_tok_s": round(n_new / statistics.median(decode), 2),
        "peak_rss_mib": peak_rss_mib(),
    }
    if device.startswith("cuda"):
        result.update(_cuda_memory())
    if hasattr(backend, "close"):
        backend.close()
    return result


def _cuda_memory() -> dict:
    import torch

    out = {"peak_vram_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
           "peak_vram_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1)}
    try:  # the whole process's device memory (llama.cpp and ORT allocate outside torch)
        import os

        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                out["process_vram_mib"] = round(proc.usedGpuMemory / 2**20, 1)
    except Exception:  # NVML is optional: torch's own numbers are still reported
        pass
    return out


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = measure(spec)
    Path(sys.argv[2]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
