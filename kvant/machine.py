"""What the machine is, and how busy other programs kept it while something was measured.

Timing on shared cores needs a witness: llama.cpp's threads spin-wait when the cores are
oversubscribed, and a decode can look hundreds of times slower with nothing in the numbers
to say why. :class:`CpuWatch` reads the kernel's CPU accounting (/proc/stat, all cores) and
subtracts this process's own CPU time (all its threads), so what is left is the CPU time
that other processes took while the measurement ran.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvant.errors import KvantError

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def die_with_parent() -> None:
    """``preexec_fn`` for Kvant's child processes (the ONNX builder, llama.cpp's tools, bench
    workers): on Linux the kernel kills the child when Kvant dies, so a killed run leaves no
    orphan writing into a staging folder the next run has already removed."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):  # not Linux: the child outlives a kill, as before
        pass


# What a Python child (run_python) prints last so that its own peak memory is known: the
# parent cannot read a child's VmHWM after it has exited
PEAK_REPORT = ('\nfrom kvant.memory import peak_rss_mib\n'
               'print("KVANT_PEAK_RSS_MIB", peak_rss_mib())\n')


def run_python(script: str, args: list[str], what: str, env: dict | None = None
               ) -> tuple[str, float, float | None]:
    """Run ``script`` (ending with PEAK_REPORT) in a fresh interpreter with ``args``, dying
    with Kvant, its output kept in a temporary file (a pipe would block a chatty child):
    (its output, seconds, its peak RSS in MiB). A failure is one KvantError naming ``what``
    and the output's last three lines. The ONNX builder and mlx-lm's convert run so: a
    child's peak memory is its own, and what the engine allocates goes with it."""
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=log,
                                stderr=subprocess.STDOUT, text=True,
                                preexec_fn=die_with_parent, env=env)
        proc.wait()
        seconds = time.perf_counter() - started
        log.seek(0)
        text = log.read()
    if proc.returncode:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise KvantError(f"{what} failed: {tail}")
    peak = re.findall(r"KVANT_PEAK_RSS_MIB ([0-9.]+)", text)
    return text, seconds, float(peak[-1]) if peak else None


# A child process (llama.cpp's tools, a bench worker) gets a time limit from the work it was
# given at rates far below any 2-core laptop's, so that it stops a hung child, not a slow one:
# a 10-minute floor plus its matmul FLOPs at 2 GFLOP/s and the bytes it reads and writes at
# 5 MB/s. --timeout-scale (this variable) multiplies every limit, for a slower machine.
TIMEOUT_ENV = "KVANT_TIMEOUT_SCALE"
SLOW_FLOPS = 2e9
SLOW_BYTES = 5e6
FLOOR_S = 600.0


def child_limit(flops: float = 0.0, nbytes: float = 0.0) -> float:
    """Seconds a child doing ``flops`` of matmuls over ``nbytes`` of files may take."""
    try:
        scale = float(os.environ.get(TIMEOUT_ENV) or 1.0)
    except ValueError:
        scale = 1.0
    return scale * (FLOOR_S + flops / SLOW_FLOPS + nbytes / SLOW_BYTES)


def weights_flops(weight_bytes: float, tokens: float) -> float:
    """Matmul FLOPs of ``tokens`` through weights stored in ``weight_bytes``: 2 a parameter
    and token, at up to 2 parameters a byte (4-bit; a bf16 file has 0.5)."""
    return 4.0 * weight_bytes * tokens


def over_limit(name: str, limit_s: float) -> str:
    """The one line that says a child ran past its limit, and how to raise it."""
    shown = f"{limit_s / 3600:.1f} h" if limit_s >= 3600 else f"{limit_s / 60:.0f} min"
    return (f"{name} gave no result within {shown}, its time limit for this work (is it "
            f"hung?); on a machine this slow, raise every limit with --timeout-scale N "
            f"(or ${TIMEOUT_ENV})")


def machine() -> dict:
    """CPU, cores, RAM, platform (and the GPU, when torch is already loaded and sees one)."""
    import sys

    info = {"platform": platform.platform(), "processor": platform.processor() or "?",
            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split()[1]
        info["ram_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    torch = sys.modules.get("torch")  # never import torch just to describe the machine
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _proc_stat() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of all cores since boot, or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / _CLK_TCK, sum(ticks) / _CLK_TCK


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system  # every thread of this process


@dataclass(frozen=True)
class CpuShare:
    """CPU use during one measurement, as percentages of the whole machine's capacity."""

    wall_s: float
    own_pct: float
    other_pct: float
    """What other processes used: 25 on a 2-core machine is half a core taken away."""


class CpuWatch:
    """``with CpuWatch() as w: ...`` then ``w.share``: who used the CPU meanwhile."""

    def __enter__(self) -> CpuWatch:
        self._stat = _proc_stat()
        self._own = _own_cpu_s()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._wall
        own = _own_cpu_s() - self._own
        stat = _proc_stat()
        if self._stat is None or stat is None or stat[1] <= self._stat[1]:
            self.share = CpuShare(round(wall, 6), 0.0, 0.0)
            return
        busy, total = stat[0] - self._stat[0], stat[1] - self._stat[1]
        # /proc/stat ticks at 1/CLK_TCK s: own time can exceed the busy delta by a tick
        other = max(0.0, busy - own)
        self.share = CpuShare(round(wall, 6), round(100 * min(own, total) / total, 2),
                              round(100 * other / total, 2))
