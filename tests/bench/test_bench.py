"""The bench over the whole artifact matrix at small sizes, its report, and generate."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys

import pytest

from kvant.bench.run import run_bench
from kvant.bench.settings import BenchSettings
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
        "--repeats", "1", "--n-new", "8", "--max-attempts", "1",
        env={"KVANT_DATA_DIR": str(UD_DIR)}, timeout=3600)
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
            # each rate is the phase's tokens over the median of the runs it timed (kept
            # raw), and those runs all happened inside the worker's life, clocked from outside
            for phase, tokens in (("prefill", int(ctx)), ("decode", 8)):
                runs = s[f"{phase}_runs_s"]
                assert len(runs) == s["runs"][phase == "decode"] >= 1, name
                assert s[f"{phase}_tok_s"] == pytest.approx(tokens / statistics.median(runs),
                                                            rel=1e-3), (name, phase)
                assert s[f"{phase}_tok_s_min"] == pytest.approx(tokens / max(runs), rel=1e-3)
                assert s[f"{phase}_tok_s_max"] == pytest.approx(tokens / min(runs), rel=1e-3)
            assert sum(s["prefill_runs_s"]) + sum(s["decode_runs_s"]) + s["load_s"] < \
                s["worker_wall_s"], name
            # on a busy machine a row may be noisy: its contract is to say so and why (one
            # attempt here; retries are test_speed_beside_a_cpu_hog_is_marked_noisy's)
            assert 0 <= s["other_cpu_pct"] <= 100 and s["attempts"] == 1
            assert s["noisy"] == bool(s["noise"]), (name, s)
            assert (s["other_cpu_pct"] > BenchSettings.max_other_cpu_pct) == any(
                r.startswith("other programs used") for r in s["noise"]), (name, s)
            # the process held the weights it ran: its peak is above the file size
            assert s["peak_rss_mib"] * 2**20 > entry["size_bytes"], name
        assert entry["kind"] is not None and len(entry["quality_key"]) == 16, name
        assert len(entry["speed_key"]) == 16 and entry["speed_key"] != entry["quality_key"]
        if entry["backend"] == "llama.cpp":  # the build that ran it is part of its record
            assert entry["engine"]["llama_cpp_python"] and entry["engine"]["features"]
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
        # llama-perplexity tokenizes the raw text itself (exactly, with Kvant's patch); Kvant
        # scores the HF tokenizer's ids: the two agree within 0.1% only if the tokens do
        assert p["tokens"].startswith("exact")
        assert abs(p["kvant"] / p["llama_perplexity"] - 1) < 0.001
        b = entry["peers"]["llama_bench"]
        # like with like: the prompt and depth of Kvant's first row, the same device and offload
        assert (b["n_prompt"], b["decode_depth"], b["n_gen"]) == (int(CTX[0]), int(CTX[0]), 8)
        assert (b["device"], b["n_gpu_layers"], b["repack"], b["flash_attn"]) == ("cpu", 0, False,
                                                                            True)
        assert {"prefill_tok_s", "decode_tok_s", "decode_tok_s_stddev"} <= set(b)
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


def test_rerun_resumes_finished_measurements(bench, tiny_model, cache_dir, gguf_artifact,
                                            bnb_artifacts, gptq_artifact, onnx_artifacts):
    results = _results(bench)
    kept = results["targets"]["tiny-Q8_0"]["speed"]["64"]
    stale = results["targets"]["tiny-Q6_K"]["speed"]["64"]
    del results["targets"]["tiny-Q4_K_M"]["speed"]["128"]
    results["targets"]["tiny-Q6_K"]["speed_key"] = "measured-on-another-artifact"
    (bench / "results.json").write_text(json.dumps(results))
    settings = BenchSettings(langs=("nob", "sme"), ctx=CTX, quality_tokens=1024,
                             quality_ctx=128, repeats=1, n_new=8, max_attempts=1)
    # the fixture's artifacts, all of them: a model left out would leave results.json
    run_bench([gguf_artifact, bnb_artifacts["int8"], bnb_artifacts["nf4"], gptq_artifact,
               onnx_artifacts["int4-b32"]], tiny_model, settings, bench, cache_dir=cache_dir,
              data_dir=UD_DIR)
    again = _results(bench)["targets"]
    assert again["tiny-Q8_0"]["speed"]["64"] == kept  # not measured again
    assert "decode_tok_s" in again["tiny-Q4_K_M"]["speed"]["128"]  # the missing row, measured
    # a row of another artifact (or other settings) is never reused: measured anew
    assert again["tiny-Q6_K"]["speed_key"] != "measured-on-another-artifact"
    assert again["tiny-Q6_K"]["speed"]["64"] != stale


def test_speed_and_quality_keep_keys_of_their_own(gguf_artifact, tiny_model, tmp_path,
                                                  cache_dir, monkeypatch):
    """Another --repeats re-times and never re-scores (hours at 11.4B); another machine or
    engine build re-measures both. The old single key re-scored on --repeats and reused rows
    measured on another machine under this one's description."""
    import kvant.bench.run as bench_run

    target = gguf_artifact / "tiny-Q8_0.gguf"
    scored = []
    real_quality = bench_run.quality
    monkeypatch.setattr(bench_run, "quality",
                        lambda t, *a: scored.append(t.name) or real_quality(t, *a))
    base = dict(langs=("nob",), ctx=("32",), quality_tokens=256, quality_ctx=128, n_new=4,
                peer_checks=False, max_attempts=1)
    out = tmp_path / "b"

    def run(**changes):
        scored.clear()
        run_bench([target], tiny_model, BenchSettings(**{**base, **changes}), out,
                  cache_dir=cache_dir, data_dir=UD_DIR)
        return _results(out)["targets"]["tiny-Q8_0"]

    first = run(repeats=1)
    assert scored == ["reference-bf16", "tiny-Q8_0"]
    second = run(repeats=2)
    assert scored == []  # quality kept
    assert second["quality"] == first["quality"] and second["speed_key"] != first["speed_key"]
    assert second["speed"]["32"]["repeats"] == 2
    real_machine = bench_run.machine
    monkeypatch.setattr(bench_run, "machine", lambda: {**real_machine(), "cpu": "Other CPU"})
    third = run(repeats=2)
    assert scored == ["reference-bf16", "tiny-Q8_0"]  # another machine: nothing reused
    assert third["speed_key"] != second["speed_key"]
    real_engine = bench_run.engine  # on that same machine, another llama.cpp build
    monkeypatch.setattr(bench_run, "engine", lambda b: {**real_engine(b), "variant": "other"}
                        if b == "llama.cpp" else real_engine(b))
    fourth = run(repeats=2)
    assert scored == ["tiny-Q8_0"]  # the reference runs in torch: its build did not change
    assert fourth["quality_key"] != third["quality_key"]


def test_two_files_of_one_name_from_two_folders_keep_their_own_rows(gguf_artifact, tmp_path,
                                                                   cache_dir):
    paths = []
    for folder, source in (("a", "tiny-Q8_0.gguf"), ("b", "tiny-Q4_K_M.gguf")):
        (tmp_path / folder).mkdir()
        shutil.copyfile(gguf_artifact / source, tmp_path / folder / "model.gguf")
        paths.append(tmp_path / folder / "model.gguf")
    settings = BenchSettings(ctx=("32",), n_new=4, repeats=1, quality=False,
                             peer_checks=False, max_attempts=1)
    targets = _results(run_bench(paths, None, settings, tmp_path / "out",
                                 cache_dir=cache_dir))["targets"]
    assert {e["kind"] for e in targets.values()} == {"gguf-q8_0", "gguf-q4_k_m"}
    assert sorted(targets) == [f"model ({tmp_path / 'a'})", f"model ({tmp_path / 'b'})"]


def test_synthetic_reference_is_refused(tiny_model, tmp_path, cache_dir):
    fake = tmp_path / "synthetic"
    shutil.copytree(tiny_model, fake)
    config = json.loads((fake / "config.json").read_text())
    config["kvant_synthetic"] = True
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(SettingsError, match="synthetic weights"):
        run_bench([], fake, BenchSettings(), tmp_path / "out", cache_dir=cache_dir)


def test_generate_streams_exact_greedy_text(gguf_artifact):
    import llama_cpp

    from kvant.tokenization import exact_tokenizer

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
    from kvant.plan.fit import fit_overhead, prediction_errors
    from kvant.plan.kinds import shape_of

    results = _results(bench)
    shape = shape_of(json.loads((tiny_model / "config.json").read_text()))
    fitted, calibration = fit_overhead(results, shape)
    assert set(fitted) == {"torch/bf16", "torch/bnb", "torch/bnb-int8", "torch/gptq",
                           "llama.cpp/gguf", "onnxruntime-genai/onnx"}
    errors = prediction_errors(results, shape, fitted, calibration)
    assert len(errors) >= 10  # held-out targets: every GGUF type, GPTQ
    assert all(abs(e["error_pct"]) < 10 for e in errors), errors
    result = run_kvant("plan", "--model", str(tiny_model), "--bench", str(bench / "results.json"),
                       "--ctx", "64,128", "--budget", "1GiB")
    assert result.returncode == 0, result.stderr
    assert "| gguf-q4_k_m | llama.cpp |" in result.stdout and "held-out" in result.stdout


def test_speed_beside_a_cpu_hog_is_marked_noisy(gguf_artifact, tmp_path, cache_dir, caplog):
    """Other programs spinning on every core: the row is retried, then kept as noisy."""
    hog = "import time\nend = time.time() + 90\nwhile time.time() < end:\n    pass\n"
    hogs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(os.cpu_count() or 2)]
    try:
        settings = BenchSettings(ctx=("64",), n_new=8, repeats=2, quality=False,
                                 peer_checks=False, threads=1, max_attempts=2)
        out = run_bench([gguf_artifact / "tiny-Q4_K_M.gguf"], None, settings, tmp_path / "b",
                        cache_dir=cache_dir)
    finally:
        for h in hogs:
            h.kill()
    assert all(h.wait() is not None for h in hogs)
    row = _results(out)["targets"]["tiny-Q4_K_M"]["speed"]["64"]
    assert row["noisy"] is True and row["attempts"] == 2
    said = [r.getMessage() for r in caplog.records if "tiny-Q4_K_M at 64" in r.getMessage()]
    assert [m.rsplit("; ", 1)[1] for m in said] == ["measuring again", "kept as noisy"], said
    assert row["other_cpu_pct"] > settings.max_other_cpu_pct
    assert any("other programs used" in reason for reason in row["noise"])
    report = (out / "report.md").read_text()
    assert "⚠ noisy rows" in report and "tiny-Q4_K_M at 64" in report


def test_noise_rules():
    from kvant.bench.run import noise

    settings = BenchSettings()
    quiet = {"other_cpu_pct": 2.0, "prefill_spread_pct": 5.0, "decode_spread_pct": 8.0}
    assert noise(quiet, settings) == []
    assert noise({**quiet, "decode_spread_pct": 40.0}, settings) == ["decode repeats spread 40%"]
    assert noise({**quiet, "other_cpu_pct": 55.0}, settings) == [
        "other programs used 55% of the CPU"]


def test_frontier_labels_never_overlap_and_the_frontier_is_pareto():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvant.bench.report import frontier_figure, pareto

    # crowded: ten GGUF types of near-equal size and quality, as on a small model
    targets = {f"normistral-11b-long-Q{i}_K_M": {
        "format": "gguf", "size_bytes": (100 + i) * 2**20,
        "quality": {"nob": {"mean_kld": 0.001 * (1 + 0.05 * i)}}} for i in range(10)}
    targets["gptq"] = {"format": "gptq", "size_bytes": 103 * 2**20,
                       "quality": {"nob": {"mean_kld": 0.0002}}}
    fig, ax, boxes = frontier_figure(targets, plt)
    assert len(boxes) == len(targets)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0
    plt.close(fig)
    points = [(1, 5, "a"), (2, 3, "b"), (3, 4, "c"), (4, 1, "d")]
    assert [p[2] for p in pareto(points)] == ["a", "b", "d"]  # c is beaten by b


def test_a_changed_artifact_is_measured_anew(gguf_artifact, tmp_path, cache_dir):
    """Same name, other bytes (a rebuild): the old numbers are dropped, never reused."""
    target = tmp_path / "model.gguf"
    shutil.copyfile(gguf_artifact / "tiny-Q4_K_M.gguf", target)
    settings = BenchSettings(ctx=("32",), n_new=4, repeats=1, quality=False,
                             peer_checks=False, max_attempts=1)
    out = run_bench([target], None, settings, tmp_path / "b", cache_dir=cache_dir)
    first = _results(out)["targets"]["model"]
    shutil.copyfile(gguf_artifact / "tiny-Q8_0.gguf", target)
    second = _results(run_bench([target], None, settings, tmp_path / "b",
                                cache_dir=cache_dir))["targets"]["model"]
    assert first["kind"] == "gguf-q4_k_m" and second["kind"] == "gguf-q8_0"
    assert second["speed_key"] != first["speed_key"]
    assert second["size_bytes"] == (gguf_artifact / "tiny-Q8_0.gguf").stat().st_size
    assert second["speed"]["32"] != first["speed"]["32"]  # a fresh measurement


def test_a_rerun_keeps_only_the_rows_it_benched_and_no_local_paths(gguf_artifact, tmp_path,
                                                                   cache_dir):
    """results.json is what the report, the plan's fit and a release's upload read: a model
    no longer benched leaves it, and no row names the machine's folders."""
    for name in ("a.gguf", "b.gguf"):
        shutil.copyfile(gguf_artifact / "tiny-Q8_0.gguf", tmp_path / name)
    settings = BenchSettings(ctx=("32",), n_new=4, repeats=1, quality=False,
                             peer_checks=False, max_attempts=1)
    out = tmp_path / "bench"
    run_bench([tmp_path / "a.gguf", tmp_path / "b.gguf"], None, settings, out,
              cache_dir=cache_dir)
    assert set(_results(out)["targets"]) == {"a", "b"}
    run_bench([tmp_path / "b.gguf"], None, settings, out, cache_dir=cache_dir)
    results = _results(out)
    assert set(results["targets"]) == {"b"}
    assert "| a " not in (out / "report.md").read_text()
    assert str(tmp_path) not in (out / "results.json").read_text()
    assert (out / results["targets"]["b"]["path"]).resolve() == (tmp_path / "b.gguf")

