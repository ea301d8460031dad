"""The bench's device-memory witness (NVML, per process tree), walked on the CPU with an
NVML that reports what a driver would: the peak over time of this process tree's memory,
never another process's, and a row that says so."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types

import pytest

from kvant.bench.worker import VramWatch, process_tree


class _FakeNVML(types.ModuleType):
    """pynvml's four calls the watch uses; `usage` maps pid -> bytes, changed by the test."""

    def __init__(self, usage: dict[int, int]):
        super().__init__("pynvml")
        self.usage, self.lock = usage, threading.Lock()

    def nvmlInit(self):  # noqa: N802 (pynvml's names)
        pass

    def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle):  # noqa: N802
        with self.lock:
            return [types.SimpleNamespace(pid=pid, usedGpuMemory=used)
                    for pid, used in self.usage.items()]


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_the_peak_is_this_process_trees_over_time(monkeypatch, child):
    other = os.getppid()  # not below this process: never counted
    assert child in process_tree(os.getpid()) and other not in process_tree(os.getpid())
    nvml = _FakeNVML({os.getpid(): 300 << 20, child: 200 << 20, other: 9000 << 20})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    watch = VramWatch(every_s=0.005)
    watch.start()
    time.sleep(0.2)
    with nvml.lock:  # a transient peak (a prefill's activations), then memory freed
        nvml.usage[child] = 1200 << 20
    time.sleep(0.2)
    with nvml.lock:
        nvml.usage[child] = 0
    time.sleep(0.1)
    row = watch.stop()
    assert row["peak_vram_mib"] == 1500.0
    assert row["vram_samples"] > 10 and "process tree" in row["vram_source"]


def test_without_nvml_the_row_says_it_was_not_measured(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    watch = VramWatch()
    watch.start()
    row = watch.stop()
    assert "peak_vram_mib" not in row
    assert row["vram_source"].startswith("not measured: NVML unavailable")
    assert "nvidia-ml-py" in row["vram_source"]
