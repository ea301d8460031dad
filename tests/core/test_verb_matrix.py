"""Every user-facing verb on every artifact kind a release makes: `info`, `generate`
(greedy, sampled, --stop-at-newline), `serve`'s /v1/completions, `bench --no-quality`, `plan`,
`eval` and `lm-eval`. Each verb runs through the installed console script on one kind (CONSOLE); its
other cells run the same command line in this process (`kvant.app.cli.main`; serve's app in a
thread), which spares a fresh interpreter and torch import per cell.

The expected greedy text of each kind comes from another path than the one under test: the
runtime's full-window logits (no KV cache, no sampler, no streaming), argmax token by token.
Where two runtimes compute the same function (the bf16 folder in float32, the bf16 GGUF,
ONNX fp32) their generated texts must be equal.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import run_kvant
from tests.serve.test_serve import _free_port, post

PROMPT = "I dag er det mandag.\nBokmål:"
N_NEW = 12
STOP = " det"
# the kind key each artifact's manifest (or a GGUF's own metadata) records
KINDS = {"bf16": "bf16", "gptq": "gptq-4bit-g128", "bnb-nf4": "bnb-nf4",
         "bnb-int8": "bnb-int8", "gguf-bf16": "gguf-bf16", "gguf-q8_0": "gguf-q8_0",
         "gguf-q4_k_m": "gguf-q4_k_m", "gguf-iq4_xs": "gguf-iq4_xs",
         "gguf-q4_k_m-mix": "gguf-q4_k_m-mix", "onnx-int4": "onnx-int4-b32",
         "onnx-fp16": "onnx-fp16", "onnx-fp32": "onnx-fp32", "mlx-4bit": "mlx-4bit-g64"}
AGREE = ("bf16", "gguf-bf16", "onnx-fp32")
# the kind each verb runs through the console script, as a user runs it: a different kind
# (backend) per verb
CONSOLE = {"info": "bnb-nf4", "generate": "gguf-q4_k_m-mix", "serve": "onnx-int4",
           "plan": "gptq", "lm-eval": "gguf-iq4_xs"}


def kvant(verb: str, kind: str, *args: str) -> subprocess.CompletedProcess:
    """`kvant VERB ARGS`: the console script for CONSOLE[verb]'s kind, else in process."""
    if CONSOLE[verb] == kind:
        return run_kvant(verb, *args)
    from kvant.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([verb, *args])
    return subprocess.CompletedProcess([verb, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def artifacts(tiny_model, gptq_artifact, bnb_artifacts, gguf_artifact, mix_artifact,
              onnx_artifacts, mlx_artifact) -> dict[str, Path]:
    return {"bf16": tiny_model, "gptq": gptq_artifact, "bnb-nf4": bnb_artifacts["nf4"],
            "bnb-int8": bnb_artifacts["int8"], "gguf-bf16": gguf_artifact / "tiny-BF16.gguf",
            "gguf-q8_0": gguf_artifact / "tiny-Q8_0.gguf",
            "gguf-q4_k_m": gguf_artifact / "tiny-Q4_K_M.gguf",
            "gguf-iq4_xs": gguf_artifact / "tiny-IQ4_XS.gguf",
            "gguf-q4_k_m-mix": mix_artifact / "tiny-Q4_K_M-MIX.gguf",
            "onnx-int4": onnx_artifacts["int4-b32"], "onnx-fp16": onnx_artifacts["fp16"],
            "onnx-fp32": onnx_artifacts["fp32"], "mlx-4bit": mlx_artifact}


@functools.cache
def expected_greedy(path: Path) -> str:
    """The greedy continuation of PROMPT from full-window logits, token by token."""
    from kvant.runtimes import open_runtime
    from kvant.runtimes.targets import targets
    from kvant.tokenization import exact_tokenizer

    target = targets(path)[0]
    tok = exact_tokenizer(target.path)
    ids, new = tok.encode(PROMPT).ids, []
    runtime = open_runtime(target, n_ctx=len(ids) + N_NEW + 8, dtype="float32")
    try:
        while len(new) < N_NEW:
            token = int(runtime.logits(ids + new)[-1].argmax())
            if token == tok.token_to_id("</s>"):
                break
            new.append(token)
    finally:
        runtime.close()
    return tok.decode(ids + new)[len(tok.decode(ids)):]


@functools.cache
def generated(kind: str, path: Path, *options: str) -> str:
    result = kvant("generate", kind if not options else "", str(path), "--prompt", PROMPT,
                   "--max-new-tokens", str(N_NEW), *options)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]


@pytest.mark.parametrize("kind", KINDS)
def test_info(artifacts, kind):
    result = kvant("info", kind, str(artifacts[kind]), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout)
    assert info["kind"] == KINDS[kind]
    assert int(info["context"].replace(",", "")) == 32768  # what the artifact states
    size = sum(f.stat().st_size for f in Path(artifacts[kind]).glob("*")
               if f.suffix in (".gguf", ".safetensors", ".onnx", ".data")) \
        if artifacts[kind].is_dir() else artifacts[kind].stat().st_size
    assert info["size on disk"] == f"{size / 2**20:,.1f} MiB"


@pytest.mark.parametrize("kind", KINDS)
def test_generate_greedy_is_the_logits_argmax(artifacts, kind):
    text = generated(kind, artifacts[kind])
    assert text.strip(), "no text"
    assert text == expected_greedy(artifacts[kind])


def test_runtimes_that_compute_the_same_function_generate_the_same_text(artifacts):
    texts = {kind: generated(kind, artifacts[kind]) for kind in AGREE}
    assert len(set(texts.values())) == 1, texts


@pytest.mark.parametrize("kind", KINDS)
def test_generate_stops_at_a_newline_or_a_stop_text(artifacts, kind):
    # the stand-in's greedy continuations rarely reach a newline within a few tokens, so the
    # stop machinery is also walked with a text it does reach (" det", checked below)
    greedy = generated(kind, artifacts[kind])
    stopped = generated(kind, artifacts[kind], "--stop-at-newline", "--stop", STOP)
    assert stopped == greedy.split("\n")[0].split(STOP)[0]


def test_the_stop_text_is_reached(artifacts):
    """So that the stop cells stop something: most kinds' greedy text holds STOP."""
    reached = [k for k in KINDS if STOP in generated(k, artifacts[k])]
    assert len(reached) >= len(KINDS) // 2, reached


@pytest.mark.parametrize("kind", KINDS)
def test_generate_samples_with_top_k_1_as_greedy(artifacts, kind):
    # hot sampling restricted to the best token is greedy: a sampler that ignored top-k
    # (or the temperature's place after it) would wander off
    sampled = generated(kind, artifacts[kind], "--temperature", "1.5", "--top-k", "1",
                        "--seed", "3")
    assert sampled == generated(kind, artifacts[kind])


@contextlib.contextmanager
def serving(kind: str, path: Path):
    """The base URL of `kvant serve PATH --ctx 256`: the console script for CONSOLE["serve"],
    else create_app over the same Engine in a thread of this process."""
    if CONSOLE["serve"] != kind:
        from kvant.app.serve import create_app
        from kvant.engine import Engine
        from tests.serve.test_serve import Server

        engine = Engine(path, "cpu", 256)
        engine.load()  # as `kvant serve` does before it listens
        running = Server(create_app(engine))
        try:
            yield running.url
        finally:
            running.stop()
            engine.close()
        return
    port = _free_port()
    exe = Path(sys.executable).with_name("kvant")
    proc = subprocess.Popen([str(exe), "serve", str(path), "--port", str(port), "--ctx", "256"],
                            stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}/v1" in banner, banner
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline and proc.poll() is None, "no server"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("kind", KINDS)
def test_serve_completions(artifacts, kind):
    with serving(kind, artifacts[kind]) as base:
        url = f"{base}/v1/completions"
        status, greedy = post(url, {"prompt": PROMPT, "max_tokens": N_NEW, "temperature": 0})
        assert status == 200, greedy
        assert greedy["choices"][0]["text"] == generated(kind, artifacts[kind])
        hot = {"prompt": PROMPT, "max_tokens": N_NEW, "temperature": 1.5}
        first = [post(url, {**hot, "seed": seed})[1]["choices"][0]["text"] for seed in (5, 6)]
        again = post(url, {**hot, "seed": 5})[1]["choices"][0]["text"]
        assert again == first[0], "the same seed must give the same text"
        assert any(t != greedy["choices"][0]["text"] for t in first), "sampling is greedy"


@pytest.fixture(scope="module")
def speed_only(artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed-only")
    result = run_kvant("--no-progress", "bench", *map(str, artifacts.values()), "--no-quality",
                       "--ctx", "64", "--repeats", "1", "--n-new", "4", "--no-peer-checks",
                       "--max-attempts", "1",
                       "--out", str(out), timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("kind", KINDS)
def test_bench_no_quality(speed_only, kind):
    entries = [e for e in speed_only["targets"].values() if e["kind"] == KINDS[kind]]
    assert len(entries) == 1, [e["kind"] for e in speed_only["targets"].values()]
    entry = entries[0]
    speed = entry["speed"]["64"]
    assert "error" not in speed, speed
    assert speed["prefill_tok_s"] > 0 and speed["decode_tok_s"] > 0
    assert speed["peak_rss_mib"] * 2**20 > entry["size_bytes"]  # it held what it ran
    assert not entry.get("quality")


@pytest.mark.parametrize("kind", KINDS)
def test_plan(artifacts, kind):
    result = kvant("plan", kind, "--model", str(artifacts[kind]), "--ctx", "512,32768",
                   "--budget", "1GiB")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines()
            if line.startswith(f"| {KINDS[kind]} |")]
    assert rows, result.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    from kvant.runtimes.targets import targets

    size = targets(artifacts[kind])[0].size_bytes
    assert cells[2] == f"{size / 2**30:.2f}"  # the artifact's own bytes, not a prediction
    small, large = (float(c.split()[0]) for c in cells[3:5])
    assert size / 2**30 < small < large  # weights plus a cache that grows with the context
    assert cells[3].endswith(" fits")


def test_eval_on_every_kind(artifacts, tmp_path):
    """`kvant eval` on every kind at once against the bf16 folder: each model gets the same
    requests, and the kinds that compute the same function as the reference (the bf16 GGUF,
    ONNX fp32) give its log-likelihoods within 0.4 nats per choice (a choice is a sentence:
    0.01 nats per token over 40)."""
    from tests.conftest import UD_DIR

    out = tmp_path / "eval"
    kinds = [k for k in KINDS if k != "bf16"]
    result = run_kvant("--no-progress", "eval", *(str(artifacts[k]) for k in kinds),
                       "--reference", str(artifacts["bf16"]), "--tasks",
                       "kvant_cloze_nob,kvant_complete_nob", "--limit", "3", "--out",
                       str(out), "--device", "cpu", env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    names = {k: (artifacts[k].stem if artifacts[k].suffix == ".gguf" else artifacts[k].name)
             for k in KINDS}
    assert set(data["models"]) == set(names.values())

    def log(kind, task):
        path = out / "lm-eval" / names[kind] / f"samples_{task}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    for task in ("kvant_cloze_nob", "kvant_complete_nob"):
        asked = log("bf16", task)
        for kind in kinds:
            rows = log(kind, task)
            assert [r["arguments"] for r in rows] == [r["arguments"] for r in asked], kind
            assert all(r["resps"] and r["resps"][0] for r in rows), kind
    reference = [c[0][0] for r in log("bf16", "kvant_cloze_nob") for c in r["resps"]]
    for kind in ("gguf-bf16", "onnx-fp32"):
        theirs = [c[0][0] for r in log(kind, "kvant_cloze_nob") for c in r["resps"]]
        assert max(abs(a - b) for a, b in zip(reference, theirs, strict=True)) < 0.01 * 40, \
            kind


@functools.cache
def lm_evaluated(kind: str, path: Path, out: Path) -> list[dict]:
    """`kvant lm-eval --model kvant --model_args artifact=PATH` as the README gives it (no
    --device: lm-eval's default, cuda, falls back to the CPU here), its logged requests."""
    result = kvant("lm-eval", kind, "--model", "kvant", "--model_args", f"artifact={path}",
                   "--tasks", "kvant_cloze_nob", "--limit", "2", "--output_path",
                   str(out / kind), "--log_samples")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kvant_cloze_nob" in result.stdout  # lm-eval's table, on stdout
    (samples,) = (out / kind).rglob("samples_kvant_cloze_nob_*.jsonl")
    return [json.loads(line) for line in samples.read_text().splitlines()]


@pytest.fixture(scope="module")
def lm_eval_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lm-eval")


@pytest.mark.parametrize("kind", KINDS)
def test_lm_eval_on_every_kind(artifacts, kind, lm_eval_root, monkeypatch):
    """lm-eval's own command line on every kind: the same requests as the bf16 folder's,
    each answered with a finite log-likelihood."""
    import math

    from tests.conftest import UD_DIR

    monkeypatch.setenv("KVANT_DATA_DIR", str(UD_DIR))
    rows = lm_evaluated(kind, artifacts[kind], lm_eval_root)
    asked = lm_evaluated("bf16", artifacts["bf16"], lm_eval_root)
    assert [r["arguments"] for r in rows] == [r["arguments"] for r in asked]
    assert rows and all(math.isfinite(float(c[0][0])) for r in rows for c in r["resps"])
