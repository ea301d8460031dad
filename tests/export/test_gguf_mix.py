"""Mixed-precision GGUF (`<type>-mix`, `mix:SIZE`) on the stand-in: budget, types, quality
on held-out text never used to choose, and the pieces (byte model, knapsack, proxy)."""

from __future__ import annotations

import itertools

import gguf
import numpy as np
import pytest

from kvant.artifact import read_manifest
from kvant.errors import SettingsError
from kvant.export.gguf import GGUFSettings, file_name, mix_size
from kvant.export.gguf_mix import (
    ALL_CANDIDATES,
    Tensor,
    fallback,
    file_types,
    knapsack,
    proxy_costs,
    pure,
    quantizable,
    spearman,
    tensor_bytes,
)
from kvant.runtimes.targets import gguf_kind
from tests.conftest import CALIB_FILE, UD_DIR

LANGS = ("nob", "nno", "sme", "dan", "swe")


def test_q4_k_m_mix_beats_uniform_q4_k_m_at_no_larger_size(mix_artifact):
    files = read_manifest(mix_artifact)["validation"]["files"]
    uniform, mix = files["q4_k_m"], files["q4_k_m-mix"]
    assert mix["file"] == "tiny-Q4_K_M-MIX.gguf"
    assert (mix_artifact / mix["file"]).stat().st_size <= \
        (mix_artifact / uniform["file"]).stat().st_size
    # the goal: mean KLD at most 0.80x the uniform file's, on text never used to choose
    assert mix["mean_kld"] <= 0.80 * uniform["mean_kld"], (mix["mean_kld"], uniform["mean_kld"])
    for lang in LANGS:  # and no language pays for it
        assert mix["per_language"][lang]["mean_kld"] <= \
            uniform["per_language"][lang]["mean_kld"], lang
    assert mix["top1_agreement_pct"] >= uniform["top1_agreement_pct"]


def test_every_tensor_has_its_planned_type_and_the_byte_model_is_exact(mix_artifact):
    files = read_manifest(mix_artifact)["validation"]["files"]
    for spec in ("q4_k_m-mix", "mix:3.6mib"):
        path = mix_artifact / files[spec]["file"]
        plan = files[spec]["mix"]["assignment"]
        assert file_types(path) | plan == file_types(path), spec  # read back independently
        reader = gguf.GGUFReader(str(path))
        written = {t.name: int(t.n_bytes) for t in reader.tensors}
        for tensor in quantizable(path):
            assert tensor_bytes(tensor, plan[tensor.name]) == written[tensor.name], tensor.name
        assert gguf_kind(path) == "gguf-" + spec.replace(":", "-")
    sized = mix_artifact / files["mix:3.6mib"]["file"]
    assert sized.stat().st_size <= mix_size("mix:3.6MiB") == int(3.6 * 2**20)
    assert len(set(files["q4_k_m-mix"]["mix"]["assignment"].values())) > 1


def test_the_card_says_what_mix_means(mix_artifact):
    card = (mix_artifact / "README.md").read_text()
    assert "## MIX files" in card and "tiny-Q4_K_M-MIX.gguf" in card
    assert "never on the evaluation text" in card


def test_proxy_ranks_like_the_direct_measurement(mix_artifact, tiny_model, tmp_path):
    """The 11.4B path's proxy, validated against the stand-in's direct measurement."""
    from kvant.export.gguf_convert import convert

    sensitivity = read_manifest(mix_artifact)["validation"]["mix_sensitivity"]
    assert sensitivity["mode"] == "direct"
    direct = sensitivity["costs"]
    base = tmp_path / "bf16.gguf"
    convert(tiny_model, base, "bf16")
    types = ["q3_k", "q4_k", "q5_k", "q6_k"]
    proxy = proxy_costs(base, quantizable(base), types,
                        mix_artifact / "tiny.imatrix.gguf", tmp_path, 2)
    keys = [(n, t) for n in direct for t in types]
    rho = spearman([direct[n][t] for n, t in keys], [proxy[n, t] for n, t in keys])
    assert rho > 0.7, rho


def test_knapsack_is_optimal_and_within_budget():
    rng = np.random.default_rng(0)
    tensors = [Tensor(f"t{i}", 256 * int(rng.integers(1, 4)), int(rng.integers(8, 64)))
               for i in range(6)]
    types = ["q3_k", "q4_k", "q6_k"]
    costs = {(t.name, ty): float(rng.random()) / (1 + k) for t in tensors
             for k, ty in enumerate(types)}
    budget = sum(tensor_bytes(t, "q4_k") for t in tensors)
    chosen = knapsack(tensors, types, costs, budget)
    assert sum(tensor_bytes(t, chosen[t.name]) for t in tensors) <= budget

    def cost(combo):
        return sum(costs[t.name, ty] for t, ty in zip(tensors, combo, strict=True))

    def size(combo):
        return sum(tensor_bytes(t, ty) for t, ty in zip(tensors, combo, strict=True))

    # sizes are rounded up to 1/8,192 of the budget, so the dynamic programme is exact over
    # every assignment at least one such step per tensor below the budget
    margin = len(tensors) * budget / 8192
    best = min(cost(c) for c in itertools.product(types, repeat=len(tensors))
               if size(c) <= budget - margin)
    assert cost([chosen[t.name] for t in tensors]) <= best + 1e-12


def test_fallback_and_settings():
    assert fallback("q4_k", 256) == "q4_k"
    assert fallback("q4_k", 96) == "q5_0" and fallback("q6_k", 96) == "q8_0"
    assert fallback("iq4_xs", 96) == "iq4_nl" and fallback("q4_k", 100) == "f16"
    assert tensor_bytes(Tensor("x", 96, 10), "q4_k") == 10 * 3 * 22  # Q5_0: 22 bytes / 32
    assert file_name("nm", "q4_k_m-mix") == "nm-Q4_K_M-MIX.gguf"
    assert GGUFSettings(types=("mix:6.5GiB",)).types == ("mix:6.5gib",)
    for bad in ("mix:lots", "q9_k-mix"):
        with pytest.raises(SettingsError):
            GGUFSettings(types=(bad,))
    with pytest.raises(SettingsError, match="importance matrix"):
        GGUFSettings(types=("iq4_xs-mix",), imatrix="none")


# A second stand-in whose widths do not divide 256, as real small models have (hidden 576,
# 9 heads of 64 over 3 KV heads, SwiGLU 1,536): there llama.cpp writes a fallback type for
# every K-quant on a 576-wide row.
ODD_RECIPE = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
              "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 2, "steps": 150,
              "seq_len": 128}


@pytest.fixture(scope="module")
def odd_model(shared_data, cache_dir, eval_text):
    from kvant.data import get_text
    from kvant.tiny import TinyRecipe, build_tiny, default_dir

    train = get_text(CALIB_FILE, cache_dir)
    recipe = TinyRecipe(**ODD_RECIPE)
    return build_tiny(default_dir(cache_dir, recipe, train), train, eval_text, recipe)


@pytest.fixture(scope="module")
def odd_mix(odd_model, cache_dir, tmp_path_factory):
    from kvant.export.gguf_pipeline import export_gguf

    settings = GGUFSettings(types=("q4_k_m", "q4_k_m-mix"), calib=str(CALIB_FILE),
                            imatrix_chunks=32, eval_tokens=1024)
    out = tmp_path_factory.mktemp("odd-mix") / "odd-gguf"
    return export_gguf(odd_model, out, settings, source={"id": "odd"}, cache_dir=cache_dir,
                       data_dir=UD_DIR).out


def test_the_fallback_table_is_llama_cpps(odd_model, tmp_path):
    """kvant's fallback() against what llama-quantize itself writes, for every candidate
    type, on rows of 576 (fall back), 1,536 (divide) and the 64-wide heads' 576."""
    from kvant.export.gguf_convert import convert

    base = tmp_path / "bf16.gguf"
    convert(odd_model, base, "bf16")
    tensors = quantizable(base)
    assert {t.ne0 for t in tensors} == {576, 1536}
    for type_name in ALL_CANDIDATES:
        written = file_types(pure(base, type_name, tmp_path / f"{type_name}.gguf", None, 2))
        for tensor in tensors:
            assert written[tensor.name] == fallback(type_name, tensor.ne0), \
                (type_name, tensor.name, tensor.ne0)
    assert fallback("q3_k", 576) == "q4_0" and fallback("q3_k", 1536) == "q3_k"


def test_mix_on_widths_that_do_not_divide_256(odd_mix):
    files = read_manifest(odd_mix)["validation"]["files"]
    uniform, mix = files["q4_k_m"], files["q4_k_m-mix"]
    path = odd_mix / mix["file"]
    assert path.stat().st_size <= (odd_mix / uniform["file"]).stat().st_size
    # the file holds what the manifest says it planned, fallback types included
    plan = mix["mix"]["assignment"]
    assert {n: file_types(path)[n] for n in plan} == plan
    assert mix["mix"]["fallbacks"], "576-wide rows take llama.cpp's fallback types"
    assert all(plan[n] == f.split(" -> ")[1] for n, f in mix["mix"]["fallbacks"].items())
    # better than the uniform file on held-out text never used to choose
    assert mix["mean_kld"] < uniform["mean_kld"], (mix["mean_kld"], uniform["mean_kld"])
