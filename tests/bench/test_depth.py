"""Quality at depth (kvant.bench.depth) on the stand-in: mechanics only (the stand-in was
trained on short sequences)."""

from __future__ import annotations

from kvant.bench.depth import depth, documents
from tests.conftest import UD_DIR


def test_position_buckets_on_identical_ids_for_every_backend_and_cache(gguf_artifact,
                                                                        tiny_model, cache_dir,
                                                                        tmp_path):
    docs = documents(tiny_model, ["nob"], 2048, cache_dir, UD_DIR)
    assert len(docs["nob"]) == 2048 and docs["nob"][0] == 1  # one <s>, then the text
    files = [gguf_artifact / "tiny-F32.gguf", gguf_artifact / "tiny-Q4_K_M.gguf"]
    results = depth(files, tiny_model, docs, ("f16", "q4_0"), tmp_path)
    rows = [r for by_kv in results.values() for by_lang in by_kv.values()
            for r in by_lang.values()]
    assert len(rows) == 4 and len({r["ids"] for r in rows}) == 1  # the same ids everywhere
    for r in rows:
        assert r["buckets"]["0-1024"] is not None and r["buckets"]["1024-4096"] is not None
        assert r["buckets"]["4096-16384"] is None  # past the document's 2,048 tokens
    f32 = results["tiny-F32"]
    assert f32["f16"]["nob"]["mean_kld"] < 1e-4  # float32 weights, f16 cache: parity
    # a q4_0 cache adds drift on the same ids, at every depth
    for bucket in ("0-1024", "1024-4096"):
        assert f32["q4_0"]["nob"]["buckets"][bucket] > f32["f16"]["nob"]["buckets"][bucket]
    q4 = results["tiny-Q4_K_M"]["f16"]["nob"]["mean_kld"]
    assert q4 > f32["f16"]["nob"]["mean_kld"]
