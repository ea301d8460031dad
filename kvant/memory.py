"""Peak resident memory of this process, measured the way that survives fork and exec.

getrusage's ru_maxrss is carried across fork and execve, so a child started by a large
parent (a Python process with torch loaded) reports the parent's RSS as its own peak. The
kernel's VmHWM belongs to the address space, which exec replaces, so it is the child's own.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB (VmHWM on Linux, else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def ram_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def reference_dtype_for(n_params: int, room: int) -> str:
    """The reference's dtype: float32 where the weights take at most 40% of ``room`` (RAM
    or GPU memory), else bfloat16 (NorMistral-11b in float32 is 46 GB)."""
    return "float32" if 4 * n_params <= 0.4 * room else "bfloat16"


def return_freed_memory() -> None:
    """Hand memory that Python, torch and numpy have freed back to the kernel (glibc keeps
    freed blocks in its arenas otherwise, and a long run's RSS only grows). No-op off glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
