"""The two tiers: `make check` (fast) never collects a test that builds a model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from tests.conftest import REPO

# What builds a model, an export, a bench or a release, named here by hand so that this test
# does not re-use the rule it checks (tests/conftest.py: slow_fixtures)
EXPENSIVE = {"tiny_model", "odd_model", "model_copy", "gguf_artifact", "mix_artifact",
             "gptq_artifact", "bnb_artifacts", "onnx_artifacts", "mlx_artifact",
             "synth_one_layer",
             "synth_gguf", "tied_llama", "odd_mix", "bench", "evaluated", "release",
             "artifacts", "speed_only", "held", "engine", "server", "client", "gguf_file", "q4"}

PLUGIN = """
import json, os

def pytest_collection_finish(session):
    with open(os.environ["KVANT_TIERS_OUT"], "w") as f:
        json.dump({i.nodeid: sorted(i.fixturenames) for i in session.items}, f)
"""


def _check_markers() -> str:
    found = re.search(r"^CHECK_MARKERS := (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert found, "the Makefile's check target names its markers in CHECK_MARKERS"
    return found.group(1).strip()


def _collected(tmp_path, *args: str) -> dict[str, list[str]]:
    (tmp_path / "tiers_plugin.py").write_text(PLUGIN)
    out = tmp_path / "collected.json"
    env = {"PYTHONPATH": str(tmp_path), "KVANT_TIERS_OUT": str(out),
           **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}}
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                             "-p", "tiers_plugin", "-p", "no:cacheprovider", *args],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(out.read_text())


def test_make_check_collects_no_test_that_builds_a_model(tmp_path):
    fast = _collected(tmp_path, "-m", _check_markers())
    everything = _collected(tmp_path)
    offenders = {test: sorted(EXPENSIVE & set(used)) for test, used in fast.items()
                 if EXPENSIVE & set(used)}
    assert offenders == {}
    # the tier is a real one: the smoke runs are in it, and most of the suite is not
    assert any("test_smoke.py::test_every_pipeline_runs_end_to_end" in t for t in fast)
    assert 50 < len(fast) < len(everything) / 2
    # every expensive fixture is used by some test of the whole suite: a renamed fixture
    # would otherwise drop out of this list unnoticed
    used = set().union(*map(set, everything.values()))
    assert EXPENSIVE <= used, EXPENSIVE - used
