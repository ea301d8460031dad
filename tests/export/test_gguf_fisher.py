"""The fisher mix sensitivity and the uniform frontier: the second-order estimate against a
measured KLD, its ranking against llama.cpp-direct, auto's choice, and the frontier maths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvant.artifact import read_manifest
from kvant.export.gguf_mix import uniform_frontier
from tests.conftest import CALIB_FILE


def _calib_windows(model, cache_dir, tokens: int):
    from kvant.data import get_text
    from kvant.scoring import eval_windows

    return eval_windows(model, {"calib": get_text(CALIB_FILE, cache_dir)}, tokens, 256)


def test_the_second_order_estimate_predicts_a_measured_kld(tiny_model, cache_dir):
    """0.5 sum F d^2 / positions against the KLD a forward measures, for a small random
    change of one matrix: the Fisher's scale (a draw's sum over positions, the positions it
    is divided by) and its sampled labels are what this checks; a wrong factor of 2 or of the
    window length fails it."""
    import torch

    from kvant.export.gguf_fisher import fisher_diagonal
    from kvant.runtimes.hf import TorchRuntime
    from kvant.scoring import kld_per_position

    wins = _calib_windows(tiny_model, cache_dir, 1024)["calib"]
    runtime = TorchRuntime(tiny_model, dtype="float32")
    model = runtime.model
    name = "model.layers.1.mlp.down_proj.weight"
    param = dict(model.named_parameters())[name]
    fisher, positions, _ = fisher_diagonal(model, {name: param}, wins, draws=16)
    reference = [runtime.logits(w) for w in wins]
    generator = torch.Generator().manual_seed(1)
    delta = 0.02 * param.detach().abs().mean() * torch.randn(param.shape, generator=generator)
    predicted = 0.5 * float((fisher[name] * delta.square()).sum()) / positions
    with torch.no_grad():
        param.add_(delta)
    measured = float(np.concatenate([kld_per_position(r[:-1], runtime.logits(w)[:-1])
                                     for r, w in zip(reference, wins, strict=True)]).mean())
    runtime.close()
    assert measured > 0
    assert 0.6 < predicted / measured < 1.6, (predicted, measured)


def test_fisher_ranks_like_the_direct_measurement(mix_artifact, tiny_model, cache_dir,
                                                  tmp_path):
    """The trades the knapsack makes are within a type: fisher's costs against llama.cpp-
    direct's on the same calibration text, each less the tensor's own Q8_0 cost (what the
    knapsack sees; direct measures against the all-Q8_0 file)."""
    from kvant.bench.studies.mix_proof import rank_agreement
    from kvant.export.gguf_convert import convert
    from kvant.export.gguf_fisher import fisher_costs
    from kvant.export.gguf_tensors import quantizable

    direct = read_manifest(mix_artifact)["validation"]["mix_sensitivity"]["costs"]
    wins = _calib_windows(tiny_model, cache_dir, 2048)["calib"]
    base = tmp_path / "bf16.gguf"
    convert(tiny_model, base, "bf16")
    types = ["q3_k", "q4_k", "q5_k", "q6_k", "q8_0"]
    costs, estimate = fisher_costs(tiny_model, base, quantizable(base), types,
                                   mix_artifact / "tiny.imatrix.gguf", wins, tmp_path, 2)
    assert estimate["evaluations"] == 2 * len(wins)
    table: dict = {}
    for (name, type_name), cost in costs.items():
        table.setdefault(name, {})[type_name] = cost
    agreement = rank_agreement(table, direct)
    assert agreement["all_pairs"] > 0.85, agreement
    assert agreement["within_mean"] >= 0.7, agreement
    assert not list(tmp_path.glob("pure-*.gguf"))  # its scratch files are gone


def test_fisher_is_passed_over_where_it_does_not_fit_in_memory(tiny_model, cache_dir,
                                                               tmp_path, monkeypatch):
    """At 11.4B the model, its gradients and a float32 accumulator do not fit a 24 GB
    machine: the estimate says so and nothing is loaded."""
    from kvant.export import gguf_fisher
    from kvant.export.gguf_convert import convert
    from kvant.export.gguf_tensors import OverTimeBudget, quantizable

    monkeypatch.setattr(gguf_fisher, "available_bytes", lambda device: 2**20)
    loaded = []
    monkeypatch.setattr("kvant.runtimes.hf.TorchRuntime.__init__",
                        lambda *a, **k: loaded.append(1))
    base = tmp_path / "bf16.gguf"
    convert(tiny_model, base, "bf16")
    wins = _calib_windows(tiny_model, cache_dir, 512)["calib"]
    with pytest.raises(OverTimeBudget) as over:
        gguf_fisher.fisher_costs(tiny_model, base, quantizable(base), ["q4_k"], None, wins,
                                 tmp_path, 2)
    assert "GiB free" in over.value.estimate["reason"] and loaded == []
    # at 11.4B in bf16 with 2,048-token windows: the 24 GB machine is far too small
    need = gguf_fisher.memory_need(11_400_000_000, 11_100_000_000, 2, 2048, 51_200, 5120, 40)
    assert need > 80 * 2**30


def test_auto_takes_fisher_when_direct_and_torch_are_over_budget(tiny_model, cache_dir,
                                                                 tmp_path, monkeypatch):
    """auto's order is direct, torch, fisher: each timed and passed over when its estimate
    is over --mix-time-budget; every pass-over is recorded."""
    from kvant.export import gguf_sensitivity
    from kvant.export.gguf_convert import convert
    from kvant.export.gguf_tensors import OverTimeBudget

    def over(*args, **kwargs):
        raise OverTimeBudget({"evaluations": 1, "estimated_s": 10**6, "budget_s": 60})

    monkeypatch.setattr(gguf_sensitivity, "direct_costs", over)
    monkeypatch.setattr(gguf_sensitivity, "substitution_costs", over)
    base = tmp_path / "bf16.gguf"
    convert(tiny_model, base, "bf16")
    wins = _calib_windows(tiny_model, cache_dir, 512)["calib"]
    class Reference(dict):  # fisher needs no reference logits, only their dtype
        dtype = "float32"

    sensitivity = gguf_sensitivity.Sensitivity("auto", base, None, tmp_path, 2, Reference(),
                                                wins, time_budget_s=600, model_dir=tiny_model)
    costs = sensitivity.costs_of(["q4_k", "q6_k"])
    assert sensitivity.mode == "fisher"
    assert [t["mode"] for t in sensitivity.tried] == ["direct", "torch"]
    assert all(costs[t.name, "q4_k"] > costs[t.name, "q6_k"] for t in sensitivity.tensors)
    # a later mix's extra type is measured by the chosen method, within the same budget
    seen = []
    real = gguf_sensitivity.fisher_costs

    def recording(*args, **kwargs):
        seen.append(args[11])  # time_budget_s
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_sensitivity, "fisher_costs", recording)
    sensitivity.costs_of(["q4_k", "q5_k"])
    assert seen == [600] and (sensitivity.tensors[0].name, "q5_k") in sensitivity.costs


def test_the_uniform_frontier():
    """The issue's numbers (SmolLM2-135M: Q3_K_M 93,510,272 bytes at 0.1469, Q4_K_M
    108,977,120 at 0.0633, Q5_K_M 112,103,552 at 0.0148): the frontier at the mix's
    108,970,272 bytes is 0.0217, set by Q3_K_M and Q5_K_M; Q4_K_M lies above that line."""
    points = [(93_510_272, 0.1469), (108_977_120, 0.0633), (112_103_552, 0.0148)]
    assert uniform_frontier(points, 108_970_272) == pytest.approx(0.0217, abs=2e-4)
    assert uniform_frontier(points, 112_103_552) == pytest.approx(0.0148)
    assert uniform_frontier(points, 93_510_272) == pytest.approx(0.1469)
    assert uniform_frontier(points, 90_000_000) is None  # no extrapolation
    assert uniform_frontier(points, 120_000_000) is None
    # halfway in bytes between two points is their geometric mean
    assert uniform_frontier([(100, 0.01), (200, 0.04)], 150) == pytest.approx(0.02)
    assert math.isclose(uniform_frontier([(100, 0.01), (200, 0.04), (150, 0.001)], 150),
                        0.001)



def test_a_failed_llama_quantize_leaves_no_mix_or_probe_file(tmp_path, monkeypatch):
    """quantize_with (a mix file) and direct_costs (its probe file): whatever llama-quantize
    left before failing is removed, and its override list too."""
    from kvant.errors import KvantError
    from kvant.export import gguf_sensitivity, gguf_tensors
    from kvant.export.gguf_tensors import Tensor

    def failing(base, out, *args, **kwargs):
        out.write_bytes(b"half a GGUF")
        raise KvantError("llama-quantize failed")

    monkeypatch.setattr(gguf_tensors, "quantize", failing)
    tensors = [Tensor("blk.0.ffn_down.weight", 256, 256)]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(KvantError):
        gguf_tensors.quantize_with(tmp_path / "bf16.gguf", scratch / "x-MIX.gguf", tensors,
                                   {"blk.0.ffn_down.weight": "q4_k"}, None, 1)
    assert list(scratch.iterdir()) == []
    with pytest.raises(KvantError):
        gguf_sensitivity.direct_costs(tmp_path / "bf16.gguf", tensors, ["q4_k"], None,
                                      {"calib": [np.zeros((4, 8))]}, [[1, 2, 3, 4]], scratch,
                                      1)
    assert list(scratch.iterdir()) == []
