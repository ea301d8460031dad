"""Shared fixtures: the stand-in model (built once, cached by recipe hash) and the data folder.

Nothing here downloads: text sets are read from ../shared/data/ud (the same bytes the
pinned URLs serve) through the offline data-dir override.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def load_tool(name: str):
    """A script of tools/ as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
SHARED = REPO.parent / "shared" / "data"
UD_DIR = SHARED / "ud"
EVAL_DIR = SHARED / "eval"
CALIB_FILE = SHARED / "calib" / "nor.calib-1000.txt"
GGUF_TYPES = ("f32", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "iq4_xs")
GPTQ_EVAL_TOKENS = 1024
BNB_MODES = ("nf4", "fp4", "int8")
EVAL_FILES = {"nob": "nob.ud-test.txt", "nno": "nno.ud-test.txt", "sme": "sme.ud-test.txt",
              "dan": "dan.ud-test.txt", "swe": "swe.ud-test.txt"}


# `make check` runs the tests not marked slow. A test is slow when it uses (directly or
# through another fixture) a session- or module-scoped fixture of tests/ outside this set:
# those build models, exports, benches and releases once per run. So a new expensive fixture
# is slow from the day it is written, and nothing has to remember to mark its tests.
CHEAP_FIXTURES = frozenset({"shared_data", "cache_dir", "eval_text", "micro_model", "texts",
                            "documents", "wheel_tool"})


def slow_fixtures(item) -> list[str]:
    """The fixtures that make ``item`` slow (see CHEAP_FIXTURES)."""
    info = getattr(item, "_fixtureinfo", None)
    found = []
    for name, defs in (info.name2fixturedefs.items() if info else ()):
        fixture = defs[-1]
        source = inspect.getsourcefile(fixture.func) or ""
        if (fixture.scope in ("session", "package", "module") and name not in CHEAP_FIXTURES
                and Path(source).is_relative_to(TESTS)):
            found.append(name)
    return sorted(found)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if slow_fixtures(item):
            item.add_marker(pytest.mark.slow)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


# Pipelines, evals and benches run inside this process, and every recorded step starts with a
# full garbage collection (kvant.memory.return_freed_memory), as do CPython's own periodic
# ones: each walks every object alive, and the libraries' import-time objects (about 550,000:
# torch, transformers, lm-eval) never die. Measured on tests/bench/test_eval.py: 30 steps
# took 7.3 s in collections, and the module 87 s; with those objects imported first and
# frozen out of the collector (gc.freeze, CPython's advice for long-lived startup state),
# 0.5 s and 62 s. Only objects alive at the freeze are exempt: what tests make is collected.
SUITE_LIBRARIES = ("torch", "transformers", "transformers.models.mistral.modeling_mistral",
                   "transformers.models.llama.modeling_llama", "lm_eval", "lm_eval.evaluator",
                   "llama_cpp", "onnxruntime", "scipy.stats",
                   "kvant.app.commands", "kvant.app.lmeval", "kvant.export.gguf_pipeline",
                   "kvant.bench.run")


def pytest_collection_finish(session):
    if any("slow" in item.keywords for item in session.items):  # the fast tier imports less
        for name in SUITE_LIBRARIES:
            importlib.import_module(name)
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data must be there: a suite that skips most of itself is not a green run."""
    missing = [p for p in (UD_DIR / "no_bokmaal-ud-test.conllu", CALIB_FILE, EVAL_DIR)
               if not p.exists()]
    if missing:
        pytest.fail(f"missing {', '.join(map(str, missing))}: put the project's shared/data "
                    "(UD test treebanks, calibration text) beside the checkout", pytrace=False)
    return SHARED


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The user cache (or $KVANT_CACHE_DIR): the stand-in is cached there by recipe hash."""
    from kvant.paths import cache_dir as user_cache

    return user_cache()


@pytest.fixture(scope="session")
def eval_text(shared_data, cache_dir):
    from kvant.data import get_text

    return get_text("nob", cache_dir, data_dir=UD_DIR)


@pytest.fixture(scope="session")
def tiny_model(shared_data, cache_dir, eval_text) -> Path:
    """The default stand-in, trained on the shared calibration text (built once, a few min)."""
    from kvant.data import get_text
    from kvant.tiny import TinyRecipe, build_tiny, default_dir

    train = get_text(CALIB_FILE, cache_dir)
    recipe = TinyRecipe()
    return build_tiny(default_dir(cache_dir, recipe, train), train, eval_text, recipe)


# An untrained model of a few hundred KB with the stand-in's architecture and tokenizer
# design (one 64-wide layer, 512 tokens): `make check`'s smoke runs take every pipeline end to
# end on it in seconds. Untrained, its logits are near uniform: its drift numbers only order
# precisions; quality claims are the stand-in's and the real model's.
MICRO_RECIPE = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 64, "seq_len": 64, "batch_size": 2, "steps": 1,
                "max_train_chars": 50_000, "eval_tokens": 256}


@pytest.fixture(scope="session")
def micro_model(shared_data, cache_dir, eval_text, tmp_path_factory) -> Path:
    """The micro model, built afresh each session (about 3 s)."""
    from kvant.data import get_text
    from kvant.tiny import TinyRecipe, build_tiny

    train = get_text(CALIB_FILE, cache_dir)
    out = tmp_path_factory.mktemp("micro") / "micro"
    return build_tiny(out, train, eval_text, TinyRecipe(**MICRO_RECIPE))


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    """A copy of the stand-in that a test may break (or check is left untouched)."""
    dest = tmp_path / "model"
    shutil.copytree(tiny_model, dest)
    return dest


# Artifacts shared by the tests of their pipeline and by the bench tests: built once a session.

# A second stand-in whose widths do not divide 256, as real small models have (hidden 576,
# 9 heads of 64 over 3 KV heads, SwiGLU 1,536): there llama.cpp writes a fallback type for
# every K-quant on a 576-wide row.
ODD_RECIPE = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
              "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 2, "steps": 150,
              "seq_len": 128}


@pytest.fixture(scope="session")
def odd_model(shared_data, cache_dir, eval_text):
    from kvant.data import get_text
    from kvant.tiny import TinyRecipe, build_tiny, default_dir

    train = get_text(CALIB_FILE, cache_dir)
    recipe = TinyRecipe(**ODD_RECIPE)
    return build_tiny(default_dir(cache_dir, recipe, train), train, eval_text, recipe)


@pytest.fixture(scope="session")
def gguf_artifact(tiny_model, cache_dir, tmp_path_factory):
    """Every GGUF type the issue names, Norwegian imatrix, all five languages scored."""
    from kvant.export import gguf_pipeline
    from kvant.export.gguf import GGUFSettings

    settings = GGUFSettings(types=GGUF_TYPES, calib=str(CALIB_FILE), imatrix_chunks=32,
                            eval_tokens=1024)
    out = tmp_path_factory.mktemp("gguf") / "tiny-gguf"
    return gguf_pipeline.run(tiny_model, out, settings, source={"id": "tiny"}, cache_dir=cache_dir,
                             data_dir=UD_DIR).out


@pytest.fixture(scope="session")
def mix_artifact(tiny_model, cache_dir, tmp_path_factory):
    """Uniform Q4_K_M and Q4_K_M-MIX with the same importance matrix, a MIX-3.6MiB, all
    scored on the five languages' held-out text."""
    from kvant.export import gguf_pipeline
    from kvant.export.gguf import GGUFSettings

    settings = GGUFSettings(types=("q4_k_m", "q4_k_m-mix", "mix:3.6MiB"),
                            calib=str(CALIB_FILE), imatrix_chunks=32, eval_tokens=1024)
    out = tmp_path_factory.mktemp("mix") / "tiny-gguf"
    return gguf_pipeline.run(tiny_model, out, settings, source={"id": "tiny"}, cache_dir=cache_dir,
                             data_dir=UD_DIR).out


@pytest.fixture(scope="session")
def gptq_artifact(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "tiny-gptq"
    result = run_kvant("--no-progress", "quantize", "gptq", "--model", str(tiny_model), "--out",
                       str(out), "--calib", str(CALIB_FILE), "--samples", "32", "--seqlen",
                       "256", "--eval-tokens", str(GPTQ_EVAL_TOKENS), "--device", "cpu",
                       env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(out)
    return out


@pytest.fixture(scope="session")
def bnb_artifacts(tiny_model, cache_dir, tmp_path_factory):
    from kvant.quantize.bnb import BnbSettings
    from kvant.quantize.bnb_pipeline import run

    root = tmp_path_factory.mktemp("bnb")
    settings = {m: BnbSettings(mode=m, eval_tokens=1024) for m in BNB_MODES}
    return {m: run(tiny_model, root / m, settings[m], source={"id": "tiny"},
                   cache_dir=cache_dir, data_dir=UD_DIR).out for m in BNB_MODES}


@pytest.fixture(scope="session")
def onnx_artifacts(tiny_model, cache_dir, tmp_path_factory):
    from kvant.export.onnx import ONNXSettings
    from kvant.export.onnx_pipeline import run

    variants = {"fp32": ONNXSettings(precision="fp32", eval_tokens=1024),
                "fp16": ONNXSettings(precision="fp16", provider="cuda", eval_tokens=1024),
                "int4-b128": ONNXSettings(precision="int4", block_size=128, eval_tokens=1024)}
    root = tmp_path_factory.mktemp("onnx")
    outs = {name: run(tiny_model, root / name, settings, source={"id": "tiny"},
                      cache_dir=cache_dir, data_dir=UD_DIR).out
            for name, settings in variants.items()}
    # int4 block 32 through the console script, as a user runs it
    outs["int4-b32"] = root / "int4-b32"
    result = run_kvant("--no-progress", "export", "onnx", "--model", str(tiny_model), "--out",
                       str(outs["int4-b32"]), "--precision", "int4", "--block-size", "32",
                       "--eval-tokens", "1024", env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert result.returncode == 0, result.stderr[-2000:]
    return outs


@pytest.fixture(scope="session")
def mlx_artifact(tiny_model, tmp_path_factory) -> Path:
    """The stand-in in MLX 4-bit at group size 64 (the defaults), through the console script."""
    out = tmp_path_factory.mktemp("mlx") / "mlx-4bit"
    result = run_kvant("--no-progress", "export", "mlx", "--model", str(tiny_model), "--out",
                       str(out), "--eval-tokens", "1024", env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def logits_of(path: Path, wins: list[list[int]], dtype: str = "float32") -> list:
    """Logits of each window from any model path, through Kvant's one runtime layer."""
    from kvant.runtimes import score_target
    from kvant.runtimes.targets import targets

    return score_target(targets(path)[0], {"w": wins}, dtype=dtype)["w"]


def reference_for(model: Path, langs, n_tokens: int, n_ctx: int, cache: Path, folder: Path):
    """(windows, reference logits in ``folder``) per language, as every pipeline computes
    them."""
    from kvant.data import get_text
    from kvant.runtimes.reference import reference_logits
    from kvant.scoring import eval_windows

    texts = {lang: get_text(lang, cache, UD_DIR) for lang in langs}
    wins = eval_windows(model, texts, n_tokens, n_ctx)
    return wins, reference_logits(model, wins, folder)


def run_kvant(*args: str, env: dict | None = None, timeout: int = 900, cwd: Path | None = None):
    """The installed console script, as a user runs it (in ``cwd``, else this folder)."""
    exe = Path(sys.executable).with_name("kvant")
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=cwd)


def cpu_gpu_drift(path, n_tokens: int = 64) -> tuple[float, float, set[str]]:
    """Kvant's CPU path and its CUDA path on the same ids: (mean KLD of the CUDA
    distributions from the CPU ones, top-1 agreement, the classes of the quantized layers
    that ran on the GPU)."""
    import numpy as np

    from kvant.runtimes.hf import TorchRuntime

    ids = [1, *range(300, 300 + n_tokens - 1)]
    found = []
    for device in ("cpu", "cuda"):
        runtime = TorchRuntime(path, device=device)
        try:
            found.append(np.asarray(runtime.logits(ids), dtype=np.float64))
            if device == "cuda":
                layers = {type(m).__name__ for m in runtime.model.modules()
                          if "Linear" in type(m).__name__ and type(m).__name__ != "Linear"
                          and any(t.is_cuda for t in [*m.parameters(recurse=False),
                                                      *m.buffers(recurse=False)])}
        finally:
            runtime.close()

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    cpu, gpu = (log_softmax(x) for x in found)
    kld = float((np.exp(cpu) * (cpu - gpu)).sum(-1).mean())
    top1 = float((cpu.argmax(-1) == gpu.argmax(-1)).mean())
    return kld, top1, layers
