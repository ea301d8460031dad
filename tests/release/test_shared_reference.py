"""A release loads the model for its reference once: every window any pipeline scores is in
the shared folder before the pipelines run, the -MIX's calibration windows included."""

from __future__ import annotations

import pytest

import kvant.runtimes.reference
from kvant.app.release import _shared_reference
from kvant.bench.settings import BenchSettings
from kvant.data import get_mix
from kvant.export.gguf import GGUFSettings, measures_mix
from kvant.export.gguf_pipeline import calibration_windows
from kvant.recorder import recording
from kvant.runtimes.reference import pipeline_reference
from kvant.scoring import eval_windows
from tests.conftest import CALIB_FILE, UD_DIR

MIX = GGUFSettings(types=("q4_k_m", "q4_k_m-mix"), calib=str(CALIB_FILE), eval_langs=("nob",),
                   eval_tokens=256, eval_ctx=128, mix_tokens=256)


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded outside the release's reference step")


def test_a_mixs_calibration_windows_are_in_the_shared_reference(micro_model, cache_dir,
                                                                tmp_path, monkeypatch):
    folder = tmp_path / "reference"
    bench = BenchSettings(langs=("nob",), quality_tokens=256, quality_ctx=128)
    with recording() as steps:
        _shared_reference(micro_model, {"gguf": ("gguf", MIX)}, bench, folder, cache_dir,
                          UD_DIR)
    assert [s["step"] for s in steps] == ["reference"]
    monkeypatch.setattr(kvant.runtimes.reference, "open_runtime", _no_load)
    wins = calibration_windows(micro_model, MIX, get_mix(MIX.calib, cache_dir, UD_DIR))
    assert wins["calib"]
    with recording() as steps:  # what the GGUF pipeline's sensitivity asks for
        pipeline_reference(micro_model, wins, folder, tmp_path / "scratch", MIX.eval_ctx)
    assert steps == []


def test_windows_a_shared_reference_lacks_are_a_recorded_step(micro_model, cache_dir,
                                                             tmp_path):
    folder = tmp_path / "reference"
    text = get_mix(MIX.calib, cache_dir, UD_DIR)
    held = eval_windows(micro_model, {"calib": text}, 128, 128)
    pipeline_reference(micro_model, held, folder, tmp_path / "scratch", 128)
    more = eval_windows(micro_model, {"calib": text}, 384, 128)
    with recording() as steps:
        pipeline_reference(micro_model, more, folder, tmp_path / "scratch", 128)
    assert [s["step"] for s in steps] == ["reference"]
    assert steps[0]["tokens"] == 256  # only the windows the folder lacked


@pytest.mark.parametrize(("types", "sensitivity", "synthetic", "rehearsal", "measured"), [
    (("q4_k_m",), "auto", False, False, False),  # no mix
    (("q4_k_m-mix",), "proxy", False, False, False),  # the proxy runs no model
    (("q4_k_m-mix",), "auto", False, False, True),
    (("mix:3GiB",), "direct", False, False, True),
    (("q4_k_m-mix",), "auto", True, False, False),  # synthetic weights: the proxy
    (("q4_k_m-mix",), "auto", True, True, True),  # a rehearsal times the torch method
])
def test_which_exports_score_calibration_windows(types, sensitivity, synthetic, rehearsal,
                                                 measured):
    settings = GGUFSettings(types=types, mix_sensitivity=sensitivity)
    assert measures_mix(settings, synthetic, rehearsal) is measured
