"""KV-cache precision (llama.cpp's f16, q8_0, q4_0; transformers' fp8, int4): what the
planner predicts against what each runtime holds, and the one-line refusals around context
and cache type."""

from __future__ import annotations

import json

import llama_cpp
import pytest

from kvant.plan.kinds import kind, shape_of
from kvant.plan.kv import kv_bytes
from kvant.runtimes.llamacpp import LlamaCppRuntime
from tests.conftest import run_kvant

TOKENS = 1024


@pytest.fixture(scope="module")
def held(gguf_artifact, tiny_model) -> dict:
    """{cache type: (bytes llama.cpp holds for TOKENS cached tokens, bytes planned)}."""
    shape = shape_of(json.loads((tiny_model / "config.json").read_text()))
    found = {}
    for kv in ("f16", "q8_0", "q4_0"):
        runtime = LlamaCppRuntime(gguf_artifact / "tiny-Q4_K_M.gguf", n_ctx=2 * TOKENS,
                                  all_logits=False, kv_type=kv)
        try:
            runtime.llm.eval(list(range(5, 5 + TOKENS)))
            # llama.cpp's own accounting of the sequence's cache (K and V of every cell it
            # filled, plus a small header of positions)
            size = llama_cpp.llama_state_seq_get_size(runtime.llm.ctx, 0)
        finally:
            runtime.close()
        found[kv] = (size, kv_bytes(shape, kind("gguf-q4_k_m"), TOKENS, kv))
    return found


def test_planned_kv_bytes_match_what_llama_cpp_holds(held):
    for kv, (size, planned) in held.items():
        assert abs(size - planned) / size < 0.05, (kv, size, planned)


def test_q8_0_cache_takes_about_half_of_f16(held):
    assert 0.45 < held["q8_0"][0] / held["f16"][0] < 0.6
    assert 0.25 < held["q4_0"][0] / held["f16"][0] < 0.35


def test_context_and_cache_type_refusals(gguf_artifact, onnx_artifacts):
    path = gguf_artifact / "tiny-Q4_K_M.gguf"
    past = run_kvant("serve", str(path), "--ctx", "40000")
    assert past.returncode == 2 and "past the 32,768 tokens the model was trained for" in \
        past.stderr and len(past.stderr.strip().splitlines()) == 1
    onnx = run_kvant("generate", str(onnx_artifacts["int4-b32"]), "--prompt", "Hei",
                     "--kv-type", "q8_0", "--max-new-tokens", "2")
    assert onnx.returncode == 2 and "onnxruntime-genai runs f16;" in onnx.stderr
    bench = run_kvant("bench", str(path), "--no-quality", "--ctx", "512,40000", "--out",
                      str(path.parent.parent / "bench-refused"))
    assert bench.returncode == 2 and "past the 32,768 tokens" in bench.stderr
    assert not (path.parent.parent / "bench-refused").exists()
    quantized = run_kvant("generate", str(path), "--prompt", "Engelsk: Good morning.\nBokmål:",
                          "--kv-type", "q8_0", "--max-new-tokens", "8")
    assert quantized.returncode == 0 and quantized.stdout.strip(), quantized.stderr


def test_plan_and_bench_take_the_cache_type(held, tiny_model):
    from kvant.bench.settings import BenchSettings
    from kvant.errors import SettingsError
    from kvant.plan.peaks import peak_bytes
    from kvant.synth import SHAPES

    shape = SHAPES["normistral-11b-long"]
    q4 = kind("gguf-q4_k_m")
    # a q8_0 cache lowers the planned peak by what llama.cpp itself holds less (the real
    # width's own accounting is in test_synth_plan)
    tiny = shape_of(json.loads((tiny_model / "config.json").read_text()))
    saved = peak_bytes(tiny, q4, TOKENS) - peak_bytes(tiny, q4, TOKENS, kv_type="q8_0")
    assert abs(saved / (held["f16"][0] - held["q8_0"][0]) - 1) < 0.05
    assert peak_bytes(shape, q4, 32768, kv_type="q8_0") < peak_bytes(shape, q4, 32768)
    # a cache type belongs to its runtime: llama.cpp's q4_0 is no transformers cache
    with pytest.raises(ValueError, match="llama.cpp cache"):
        kv_bytes(shape, kind("bf16"), 4096, "q4_0")
    with pytest.raises(SettingsError, match="KV cache type"):
        BenchSettings(kv_type="q5_1")


@pytest.mark.parametrize("kv", ["f16", "fp8", "int4"])
def test_transformers_cache_holds_what_the_plan_says(tiny_model, kv):
    import torch
    from transformers import DynamicCache

    from kvant.runtimes.hf import CACHE_CHUNK, TorchRuntime, cache_bytes

    shape = shape_of(json.loads((tiny_model / "config.json").read_text()))
    # 1,024 tokens in two chunks, then 127 more: int4 keeps those unquantized (up to 128,
    # the plan's worst case), the rest in 4 bits
    held_tokens = TOKENS + 127
    ids = list(range(5, 5 + held_tokens))
    runtime = TorchRuntime(tiny_model, kv_type=kv)
    plain = TorchRuntime(tiny_model)
    try:
        cache = runtime.cache() or DynamicCache(config=runtime.model.config)
        with torch.no_grad():
            for i in range(0, held_tokens, CACHE_CHUNK):
                runtime.model(torch.tensor([ids[i:i + CACHE_CHUNK]]), past_key_values=cache,
                              use_cache=True)
        held, planned = cache_bytes(cache), kv_bytes(shape, kind("bf16"), held_tokens, kv)
        assert abs(held - planned) / held < 0.05, (held, planned)
        if kv != "f16":  # quantized keys reach the logits from the second chunk on
            quantized, exact = runtime.logits(ids), plain.logits(ids)
            first = slice(0, CACHE_CHUNK)
            assert abs(quantized[first] - exact[first]).max() < 1e-3
            assert abs(quantized[CACHE_CHUNK:] - exact[CACHE_CHUNK:]).max() > 1e-3
            assert held < 0.6 * kv_bytes(shape, kind("bf16"), held_tokens)
    finally:
        runtime.close()
        plain.close()
