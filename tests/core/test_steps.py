"""Per-step peak memory: a child's memory counts in the step it ran in, and only there."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvant.errors import KvantError
from kvant.steps import recording, step

HOLD = "import time; b = bytearray({n} << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.4)"


def test_a_childs_peak_counts_in_its_step_and_the_next_step_starts_afresh():
    with recording() as log:
        with step("big child", kind="x") as record:
            subprocess.run([sys.executable, "-c", HOLD.format(n=400)], check=True)
            record["extra"] = 1
        with step("small child"):
            subprocess.run([sys.executable, "-c", HOLD.format(n=20)], check=True)
    big, small = log
    assert (big["step"], big["kind"], big["extra"]) == ("big child", "x", 1)
    assert big["peak_rss_mib"] > small["peak_rss_mib"] + 300  # 400 MiB held by the child
    assert big["wall_s"] >= 0.4


def test_a_child_that_ends_during_a_sample_does_not_stop_the_sampling(monkeypatch):
    """A process can end while the tree is walked (seen in a rehearsal: the sampler thread
    died on /proc/PID/task, and the step's later children went unmeasured)."""
    import psutil

    walk, calls = psutil.Process.children, [0]

    def vanishing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # the sampler's first walk (the first is the step's start)
            raise psutil.NoSuchProcess(self.pid)
        return walk(self, *args, **kwargs)

    monkeypatch.setattr(psutil.Process, "children", vanishing)
    with recording() as log:
        with step("child after a vanished one"):
            subprocess.run([sys.executable, "-c", HOLD.format(n=400)], check=True)
    (record,) = log
    assert calls[0] > 2 and record["peak_rss_mib"] > record["start_rss_mib"] + 300


def test_this_processs_own_peak_is_reset_per_step():
    with recording() as log:
        with step("allocate"):
            block = bytearray(300 << 20)
            block[::4096] = b"x" * len(block[::4096])
            del block
        with step("nothing"):
            pass
    allocate, nothing = log
    assert allocate["peak_rss_mib"] > nothing["peak_rss_mib"] + 250


def test_steps_do_not_nest_and_cost_nothing_outside_a_recording():
    with step("free") as record:  # not recording: no measurement at all
        pass
    assert "wall_s" not in record
    with recording(), step("outer"), pytest.raises(KvantError, match="do not nest"), \
            step("inner"):
        pass
