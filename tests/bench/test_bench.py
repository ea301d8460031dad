"""The bench over the whole artifact matrix at small sizes, its report, and generate."""

from __future__ import annotations

import json
import shutil

import pytest

from kvant.errors import SettingsError
from tests.conftest import UD_DIR, run_kvant

CTX = ("64", "128")


@pytest.fixture(scope="module")
def bench(tiny_model, gguf_artifact, bnb_artifacts, gptq_artifact, onnx_artifacts,
          tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report"
    result = run_kvant(
        "--no-progress", "bench", str(gguf_artifact), str(bnb_artifacts["int8"]),
        str(bnb_artifacts["nf4"]), str(gptq_artifact), str(onnx_artifacts["int4-b32"]),
        "--reference", str(tiny_model), "--out", str(out), "--langs", "nob,sme",
        "--ctx", ",".join(CTX), "--quality-tokens", "1024", "--quality-ctx", "128",
        "--repeats", "1", "--n-new", "8", env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(out / "report.md")
    return out


def _results(out):
    return json.loads((out / "results.json").read_text())


def test_every_target_measured(bench):
    results = _results(bench)
    names = set(results["targets"])
    assert {"reference-bf16", "int8", "nf4", "tiny-gptq", "int4-b32"} <= names
    assert {f"tiny-{t.upper()}" for t in ("f32", "q8_0", "q4_k_m", "iq4_xs")} <= names
    for name, entry in results["targets"].items():
        assert set(entry["quality"]) == {"nob", "sme"}, name
        for ctx in CTX:
            s = entry["speed"][ctx]
            assert "error" not in s, (name, s)
            assert s["prefill_tok_s"] > 0 and s["decode_tok_s"] > 0 and s["peak_rss_mib"] > 0
    backends = {e["backend"] for e in results["targets"].values()}
    assert backends == {"torch", "llama.cpp", "onnxruntime-genai"}


def test_quality_ordering(bench):
    t = _results(bench)["targets"]
    for lang in ("nob", "sme"):
        kld = {name: t[name]["quality"][lang]["mean_kld"] for name in t}
        assert kld["tiny-Q8_0"] < kld["tiny-Q4_K_M"]
        assert kld["int8"] < kld["nf4"]
        assert kld["tiny-F32"] < 1e-5
        # bits/byte is tokenizer-independent: the same text, so the reference's agrees
        q = t["tiny-F32"]["quality"][lang]
        assert abs(q["bits_per_byte"] - q["bits_per_byte_ref"]) < 1e-3


def test_perplexity_agrees_with_llama_perplexity(bench):
    t = _results(bench)["targets"]
    gguf = [e for e in t.values() if e["format"] == "gguf"]
    assert len(gguf) == 8
    for entry in gguf:
        p = entry["peers"]["perplexity"]
        assert abs(p["kvant"] / p["llama_perplexity"] - 1) < 0.005
        assert entry["peers"]["llama_bench"]["decode_tok_s"] > 0
        assert set(entry["tokenizer_agreement"]) == {"nob", "nno", "sme", "dan", "swe"}


def test_report_files_consistent_with_results(bench):
    results = _results(bench)
    report = (bench / "report.md").read_text()
    for name, entry in results["targets"].items():
        assert f"| {name} |" in report
        assert f"{entry['quality']['nob']['mean_kld']:.6f}" in report
        assert f"{entry['speed']['64']['decode_tok_s']:,.2f}" in report
    assert "2 cores" in report or f"{results['machine']['cpu_count']} cores" in report
    for plot in ("frontier.png", "decode.png", "memory.png"):
        data = (bench / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_rerun_resumes_finished_measurements(bench, tiny_model, cache_dir, gguf_artifact):
    from kvant.bench.run import BenchSettings, run_bench

    results = _results(bench)
    kept = results["targets"]["tiny-Q8_0"]["speed"]["64"]
    del results["targets"]["tiny-Q4_K_M"]["speed"]["128"]
    (bench / "results.json").write_text(json.dumps(results))
    settings = BenchSettings(langs=("nob", "sme"), ctx=CTX, quality_tokens=1024,
                             quality_ctx=128, repeats=1, n_new=8)
    run_bench([gguf_artifact], tiny_model, settings, bench, cache_dir=cache_dir,
              data_dir=UD_DIR)
    again = _results(bench)["targets"]
    assert again["tiny-Q8_0"]["speed"]["64"] == kept  # not measured again
    assert again["tiny-Q4_K_M"]["speed"]["128"]["decode_tok_s"] > 0  # measured again


def test_synthetic_reference_is_refused(tiny_model, tmp_path, cache_dir):
    from kvant.bench.run import BenchSettings, run_bench

    fake = tmp_path / "synthetic"
    shutil.copytree(tiny_model, fake)
    config = json.loads((fake / "config.json").read_text())
    config["kvant_synthetic"] = True
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(SettingsError, match="synthetic weights"):
        run_bench([], fake, BenchSettings(), tmp_path / "out", cache_dir=cache_dir)


def test_generate_streams_exact_greedy_text(gguf_artifact):
    import llama_cpp

    from kvant.bench.generate import exact_tokenizer

    gguf = gguf_artifact / "tiny-F32.gguf"
    prompt = "Engelsk: Good morning.\nBokmål:"
    result = run_kvant("generate", str(gguf), "--prompt", prompt, "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    tok = exact_tokenizer(gguf)
    ids = tok.encode(prompt).ids
    llm = llama_cpp.Llama(str(gguf), n_ctx=128, logits_all=True, verbose=False)
    new = []
    llm.eval(ids)
    for _ in range(12):
        new.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval([new[-1]])
    llm.close()
    expected = tok.decode(ids + new)[len(tok.decode(ids)):]
    assert result.stdout == expected + "\n"
    stopped = run_kvant("generate", str(gguf), "--prompt", prompt, "--max-new-tokens", "12",
                        "--stop-at-newline")
    assert stopped.stdout == expected.split("\n")[0] + "\n"


def test_plan_predicts_the_measured_peaks_within_10_percent(bench, tiny_model):
    from kvant.plan import fit_overhead, prediction_errors, shape_of

    results = _results(bench)
    shape = shape_of(json.loads((tiny_model / "config.json").read_text()))
    fitted, calibration = fit_overhead(results, shape)
    assert set(fitted) == {"torch/bf16", "torch/bnb", "torch/gptq", "llama.cpp/gguf",
                           "onnxruntime-genai/onnx"}
    errors = prediction_errors(results, shape, fitted, calibration)
    assert len(errors) >= 10  # held-out targets: every GGUF type, GPTQ
    assert all(abs(e["error_pct"]) < 10 for e in errors), errors
    result = run_kvant("plan", "--model", str(tiny_model), "--bench", str(bench / "results.json"),
                       "--ctx", "64,128", "--budget", "1GiB")
    assert result.returncode == 0, result.stderr
    assert "| gguf-q4_k_m | llama.cpp |" in result.stdout and "held-out" in result.stdout
