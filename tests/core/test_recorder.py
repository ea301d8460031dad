"""Per-step peak memory: a child's memory counts in the step it ran in, and only there."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvant.errors import KvantError
from kvant.recorder import recording, step

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


def test_a_hung_llama_cpp_tool_is_stopped_at_its_limit_with_one_line(monkeypatch):
    """A child that never answers: killed at its limit, one line naming it, the limit and
    how to raise it; --timeout-scale (its variable) multiplies every limit."""
    import time

    from kvant.errors import KvantError
    from kvant.machine import TIMEOUT_ENV, child_limit
    from kvant.runtimes.llamacpp import run_tool

    started = time.monotonic()
    with pytest.raises(KvantError) as raised:
        run_tool(["sleep", "60"], 0.5)
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert "sleep gave no result within" in message and "--timeout-scale" in message
    assert "\n" not in message
    base = child_limit(flops=4e9, nbytes=1e7)
    assert base == pytest.approx(600 + 2 + 2)
    monkeypatch.setenv(TIMEOUT_ENV, "3")
    assert child_limit(flops=4e9, nbytes=1e7) == pytest.approx(3 * base)


def test_a_hung_bench_worker_is_an_error_row_and_the_bench_goes_on(micro_model, monkeypatch):
    """The bench worker past its limit: that row says why (a rerun measures it again), and
    the bench is not stopped."""
    import kvant.bench.run as bench_run
    from kvant.bench.settings import BenchSettings
    from kvant.runtimes.targets import targets

    monkeypatch.setattr(bench_run, "child_limit", lambda **_: 0.05)
    target = targets(micro_model)[0]
    row = bench_run.speed(target, list(range(16, 80)), 32, BenchSettings(repeats=1, n_new=2),
                          "cpu")
    assert "no result within" in row["error"] and target.name in row["error"]
