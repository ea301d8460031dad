"""Wall time and peak memory of each step of a run, for `kvant release --rehearse`.

    with recording() as log:
        with step("gguf quantize q4_k_m", kind="llama-quantize"):
            ...
    log  # [{"step": ..., "wall_s": ..., "peak_rss_mib": ..., ...}]

Outside ``recording()`` a step only hands freed memory back to the kernel (as it does
inside), so a run and its rehearsal hold the same. A step's peak RAM is the most this
process and every process below it (llama-quantize, the ONNX builder, bench workers) held:
this process's own peak exactly (the kernel's VmHWM, reset at the step's start through
/proc/self/clear_refs), its children's by sampling them with psutil every 20 ms. The reset
is by hand: no library resets a process's peak (psutil samples only). Steps do not nest: an
inner step would reset the outer one's peak.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from kvant.errors import KvantError
from kvant.memory import peak_rss_mib, return_freed_memory

REHEARSAL_WARNING = ("rehearsal on synthetic weights: run for time and memory only, every "
                     "quality number here is meaningless; never publish it")
_SAMPLE_S = 0.02
_log: list[dict] | None = None
_open = threading.local()


@contextlib.contextmanager
def recording() -> Iterator[list[dict]]:
    """Record every step run inside the block into the list it yields."""
    global _log
    before, _log = _log, []
    try:
        yield _log
    finally:
        _log = before


def _tree_rss(pid: int) -> tuple[int, int]:
    """(this process's RSS, its descendants' RSS together).

    A child between fork and exec still maps its parent's pages and would count them twice
    (a 2.3 GB parent starting a 0.6 GB bench worker measured as 4.3 GB): a child whose
    command line is still its parent's is skipped until it has exec'd.
    """
    try:
        root = psutil.Process(pid)
        own, todo = root.memory_info().rss, [(c, root) for c in root.children()]
    except psutil.Error:
        return 0, 0
    below = 0
    while todo:
        child, parent = todo.pop()
        try:  # either may end while being read
            if child.cmdline() != parent.cmdline():
                below += child.memory_info().rss
            todo += [(c, child) for c in child.children()]
        except psutil.Error:
            continue
    return own, below


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux 4.0+)
        return True
    except OSError:
        return False


def _cuda():
    torch = sys.modules.get("torch")  # only when something already loaded it
    return torch if torch is not None and torch.cuda.is_available() else None


def note(**facts) -> None:
    """Add ``facts`` to the step running now (how it did its work, for the plan); nothing
    outside a recorded step."""
    record = getattr(_open, "record", None)
    if record is not None:
        record.update(facts)


@contextlib.contextmanager
def step(name: str, **facts) -> Iterator[dict]:
    """Measure the block as one step; ``facts`` (and what the block adds to the yielded
    dict) are recorded with it."""
    record = {"step": name, **facts}
    return_freed_memory()  # what earlier steps freed is not this step's (nor kept by a run)
    if _log is None:
        yield record
        return
    if getattr(_open, "name", None):
        raise KvantError(f"step '{name}' inside step '{_open.name}': steps do not nest")
    _open.name, _open.record = name, record
    exact = _reset_hwm()
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.wait(_SAMPLE_S):
            try:
                own, below = _tree_rss(os.getpid())
            except OSError:  # /proc changed under the walk: the next sample sees the tree
                continue
            peak[0] = max(peak[0], own + below)

    torch = _cuda()
    if torch is not None:
        torch.cuda.reset_peak_memory_stats()
    own, below = _tree_rss(os.getpid())
    record["start_rss_mib"] = round((own + below) / 2**20, 1)
    record["torch_loaded"] = "torch" in sys.modules  # its import is this step's if not
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        yield record
    finally:
        stop.set()
        sampler.join()
        _open.name = _open.record = None
        own, below = _tree_rss(os.getpid())
        hwm = peak_rss_mib() * 2**20 if exact else None
        record["wall_s"] = round(time.perf_counter() - started, 2)
        record["peak_rss_mib"] = round(max(peak[0], own + below, hwm or 0) / 2**20, 1)
        torch = _cuda()
        if torch is not None:
            record["peak_vram_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        _log.append(record)


def language_tokens(wins: dict[str, list[list[int]]]) -> int:
    """The most tokens any one language's windows hold (a scoring step's reference share)."""
    return max((sum(len(w) for w in ws) for ws in wins.values()), default=0)
