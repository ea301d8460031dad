"""Quality at depth (kvant.bench.depth) on the stand-in: mechanics only (the stand-in was
trained on short sequences)."""

from __future__ import annotations

from kvant.bench.depth import depth, documents
from tests.conftest import UD_DIR


def test_position_buckets_on_identical_ids_for_every_backend_and_cache(gguf_artifact,
                                                                        onnx_artifacts,
                                                                        tiny_model, cache_dir,
                                                                        tmp_path):
    docs = documents(tiny_model, ["nob"], 2048, cache_dir, UD_DIR)
    assert len(docs["nob"]) == 2048 and docs["nob"][0] == 1  # one <s>, then the text
    onnx = onnx_artifacts["int4-b32"]
    files = [gguf_artifact / "tiny-F32.gguf", gguf_artifact / "tiny-Q4_K_M.gguf", tiny_model,
             onnx]
    # each runtime runs the cache types it has: llama.cpp f16 and q4_0, transformers f16 and
    # fp8, ONNX Runtime GenAI its own
    results = depth(files, tiny_model, docs, ("f16", "q4_0", "fp8"), tmp_path)
    assert {n: sorted(r) for n, r in results.items()} == {
        "tiny-F32": ["f16", "q4_0"], "tiny-Q4_K_M": ["f16", "q4_0"],
        tiny_model.name: ["f16", "fp8"], onnx.name: ["f16"]}
    rows = [r for by_kv in results.values() for by_lang in by_kv.values()
            for r in by_lang.values()]
    assert len(rows) == 7 and len({r["ids"] for r in rows}) == 1  # the same ids everywhere
    for r in rows:
        assert r["buckets"]["0-1024"] is not None and r["buckets"]["1024-4096"] is not None
        assert r["buckets"]["4096-16384"] is None  # past the document's 2,048 tokens
    f32 = results["tiny-F32"]
    assert f32["f16"]["nob"]["mean_kld"] < 1e-4  # float32 weights, f16 cache: parity
    assert abs(f32["f16"]["nob"]["ppl_drift_pct"]) < 0.1
    # a quantized cache adds drift on the same ids, at every depth, in both runtimes
    # (transformers' from the second 512-token chunk on, when keys come from the cache)
    torch_rows = results[tiny_model.name]
    for bucket in ("0-1024", "1024-4096"):
        assert f32["q4_0"]["nob"]["buckets"][bucket]["kld"] > \
            f32["f16"]["nob"]["buckets"][bucket]["kld"]
        assert torch_rows["fp8"]["nob"]["buckets"][bucket]["kld"] > \
            torch_rows["f16"]["nob"]["buckets"][bucket]["kld"]
    q4 = results["tiny-Q4_K_M"]["f16"]["nob"]
    assert q4["mean_kld"] > f32["f16"]["nob"]["mean_kld"]
    # every target's bucket is scored against the same reference perplexity (same tokens)
    refs = {r["buckets"]["1024-4096"]["ppl_ref"] for r in rows}
    assert len(refs) == 1


def test_long_context_rows_run_each_artifact_with_its_runtime_s_caches(gguf_artifact,
                                                                      tiny_model, tmp_path):
    from kvant.bench.studies.long_context import artifact_shape, measure, table
    from kvant.runtimes.targets import targets

    files = [gguf_artifact / "tiny-Q4_K_M.gguf", tiny_model]
    results = measure(files, tmp_path, ["256"], ["f16", "q8_0", "fp8"], 1, UD_DIR)
    ran = {kv: {n: e["speed"]["256"]["kv_type"] for n, e in r["targets"].items()}
           for kv, r in results.items()}
    assert ran == {"f16": {"tiny-Q4_K_M": "f16", tiny_model.name: "f16"},
                   "q8_0": {"tiny-Q4_K_M": "q8_0"}, "fp8": {tiny_model.name: "fp8"}}
    shapes = {t.name: artifact_shape(f) for f in files for t in targets(f)}
    assert shapes["tiny-Q4_K_M"] == shapes[tiny_model.name]  # GGUF metadata = config.json
    rows = table(results, shapes, 40).splitlines()[2:]
    assert len(rows) == 4 and all(line.count("|") == 10 for line in rows)  # 9 cells
