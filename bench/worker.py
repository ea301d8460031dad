"""One speed-and-memory measurement, run in a fresh process (``python -m kvant.bench.worker``).

A fresh process per (target, context length), as optimum-benchmark and llama-bench do, so
that peak memory belongs to this measurement alone and no warm state leaks between targets.
Warm-up first, the device synchronised before each clock read, decode timed apart from
prefill; every repeat is kept with the CPU time other programs took meanwhile
(kvant.machine.CpuWatch), and the median, min and max are reported.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

from kvant.machine import CpuWatch
from kvant.memory import peak_rss_mib
from kvant.runtimes import open_runtime
from kvant.runtimes.targets import Target


def _rates(tokens: int, seconds: list[float]) -> dict:
    """Median, min and max tokens/s, and the spread: (max - min) / median over a few runs,
    the 10th-90th percentile range over ten or more (one outlier among 200 short runs is
    not the machine being noisy)."""
    rates = sorted(tokens / s for s in seconds)
    median = tokens / statistics.median(seconds)  # the rate of the median run
    low, high = rates[0], rates[-1]
    if len(rates) >= 10:
        deciles = statistics.quantiles(rates, n=10)
        low, high = deciles[0], deciles[-1]
    return {"median": round(median, 2), "min": round(rates[0], 2), "max": round(rates[-1], 2),
            "spread_pct": round(100 * (high - low) / median, 1)}


# The kernel's CPU accounting ticks at 1/100 s: a witness window shorter than this would be
# mostly rounding (a 5 ms prefill reads as 0% or 50% "other"). Short runs are repeated until
# the phase lasts this long, as timeit's autorange does, which also steadies their median.
MIN_PHASE_S = 0.5
MAX_REPEATS = 200


def _timed_phase(run, repeats: int) -> tuple[list[float], float]:
    """Seconds of each run (at least ``repeats``, more until the phase lasts MIN_PHASE_S),
    and the other programs' share of the CPU over the whole phase."""
    seconds = []
    with CpuWatch() as watch:
        while len(seconds) < repeats or (sum(seconds) < MIN_PHASE_S
                                         and len(seconds) < MAX_REPEATS):
            seconds.append(run())
    return seconds, watch.share.other_pct


def measure(spec: dict) -> dict:
    """spec: target (dict), ids (list[int], at least ctx long), ctx, n_new, repeats, device,
    threads. Returns times in seconds, rates in tokens per second, memory in MiB, and the
    other programs' share of the CPU during the timed runs (percent of the machine)."""
    target = Target(**{**spec["target"], "path": Path(spec["target"]["path"]),
                       "files": tuple(spec["target"]["files"])})
    ctx, n_new, repeats = spec["ctx"], spec["n_new"], spec["repeats"]
    ids = spec["ids"][:ctx]
    device = spec["device"]
    vram = VramWatch(_gpu_index(device)) if device.startswith("cuda") else None
    if vram is not None:
        vram.start()
    started = time.perf_counter()
    runtime = open_runtime(target, device, spec["threads"], n_ctx=ctx + n_new + 8,
                           all_logits=False, repack=spec.get("repack", False),
                           kv_type=spec.get("kv_type", "f16"))
    load_s = time.perf_counter() - started
    # warm-up of both phases: first-call allocations and kernel choice (a single-token step
    # runs other kernels than a prefill)
    runtime.prefill(ids[: min(32, ctx)])
    runtime.decode(ids[: min(32, ctx)], 2)
    prefill, other_prefill = _timed_phase(lambda: runtime.prefill(ids), repeats)
    decode, other_decode = _timed_phase(lambda: runtime.decode(ids, n_new), repeats)
    other = [other_prefill, other_decode]
    pre, dec = _rates(ctx, prefill), _rates(n_new, decode)
    result = {
        "ctx": ctx, "n_new": n_new, "repeats": repeats, "runs": [len(prefill), len(decode)],
        "device": device, "repack": spec.get("repack", False),
        "kv_type": spec.get("kv_type", "f16"),
        "threads": spec["threads"] or os.cpu_count(), "load_s": round(load_s, 3),
        "prefill_s": round(statistics.median(prefill), 6), "prefill_tok_s": pre["median"],
        "prefill_tok_s_min": pre["min"], "prefill_tok_s_max": pre["max"],
        "prefill_spread_pct": pre["spread_pct"],
        "decode_s": round(statistics.median(decode), 6), "decode_tok_s": dec["median"],
        "decode_tok_s_min": dec["min"], "decode_tok_s_max": dec["max"],
        "decode_spread_pct": dec["spread_pct"],
        "other_cpu_pct": max(other), "other_cpu_pct_per_phase": other,
        "peak_rss_mib": peak_rss_mib(),
        # every timed run, so the rates above can be checked against what was timed
        "prefill_runs_s": [round(x, 6) for x in prefill],
        "decode_runs_s": [round(x, 6) for x in decode],
    }
    if vram is not None:
        result.update(vram.stop())
    if device.startswith("cuda") and target.backend == "torch":
        result.update(_torch_allocator())
    runtime.close()
    return result


def _gpu_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _torch_allocator() -> dict:
    """torch's own allocator peaks: meaningful for torch targets only (llama.cpp and ONNX
    Runtime allocate device memory outside it, where it reads near zero)."""
    import torch

    return {"peak_vram_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "peak_vram_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1)}


def process_tree(root: int) -> set[int]:
    """``root`` and every process below it (runtimes may start helpers)."""
    try:
        return {root} | {p.pid for p in psutil.Process(root).children(recursive=True)}
    except psutil.NoSuchProcess:
        return {root}


class VramWatch:
    """The peak device memory of this process tree, read from NVML (nvidia-ml-py) every
    ``every_s`` on a thread while the measurement runs: what the driver has given the
    processes, whatever allocates it (torch, llama.cpp's CUDA backend, ONNX Runtime).
    Without NVML the row says so instead of a number."""

    SOURCE = "NVML, this process tree, peak of samples every 20 ms"

    def __init__(self, index: int = 0, every_s: float = 0.02):
        self.index, self.every_s = index, every_s
        self.peak, self.samples, self.error = 0, 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        try:
            import pynvml  # nvidia-ml-py (the `gpu` extra)

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception as exc:  # no NVML (ImportError, driver library missing)
            self.error = f"{type(exc).__name__}: {exc}"
            return
        self._thread.start()

    def sample(self) -> int:
        """Bytes the device holds for this process tree now."""
        tree = process_tree(os.getpid())
        procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        return sum(p.usedGpuMemory or 0 for p in procs if p.pid in tree)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.sample())
            self.samples += 1
            if self._stop.wait(self.every_s):
                return

    def stop(self) -> dict:
        if self.error is not None:
            return {"vram_source": f"not measured: NVML unavailable ({self.error}); install "
                                   "nvidia-ml-py (pip install 'kvant[gpu]')"}
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())
        return {"peak_vram_mib": round(self.peak / 2**20, 1), "vram_samples": self.samples,
                "vram_source": self.SOURCE}


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = measure(spec)
    Path(sys.argv[2]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
