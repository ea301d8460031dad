"""The layers hold (core <- pipelines <- bench <- app <- studies, each a set of folders), no
cycles, no private reach-ins, and the parser builds without the engines."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.conftest import REPO, load_tool

arch = load_tool("check_architecture")


def test_the_tree_respects_its_layers():
    assert arch.check() == []


def test_every_mapped_package_is_walked():
    names = set(arch.modules())
    assert {"kvant.app.cli", "kvant.runtimes", "kvant.runtimes.llamacpp", "kvant.quantize.gptq",
            "kvant.export.gguf_pipeline", "kvant.bench.run"} <= names
    assert arch.layer("kvant.runtimes.hf") == "core"
    assert arch.layer("kvant.export.onnx") == "pipeline"
    assert arch.layer("kvant.plan.peaks") == "core"
    assert arch.layer("kvant.bench.worker") == "bench"
    assert arch.layer("kvant.app.release") == "app"
    assert arch.layer("kvant.bench.studies.onnx_int4") == "study"


def test_every_module_lives_in_its_layers_folder():
    """The layer is the folder: every app module under kvant/app/, every study under
    bench/studies/, and no core module (kvant/, kvant/plan/, kvant/runtimes/) that drives
    a release, a server or the command line."""
    layers = {name: arch.layer(name) for name in arch.modules()}
    app = {n for n, layer in layers.items() if layer == "app"}
    assert {"kvant.app.cli", "kvant.app.pipelines", "kvant.app.release",
            "kvant.app.release_cards", "kvant.app.rehearsal", "kvant.app.serve",
            "kvant.app.generate"} <= app
    assert all(n.startswith("kvant.app") for n in app)
    assert all(n.startswith("kvant.bench.studies") for n, layer in layers.items()
               if layer == "study")


def _copy(tmp_path):
    for name in ("kvant", "quantize", "export", "bench"):
        shutil.copytree(REPO / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(path, text):
    path.write_text(path.read_text() + text)


def test_planted_violations_are_each_caught(tmp_path):
    root = _copy(tmp_path)
    _append(root / "kvant" / "scoring.py", "\n\ndef _up():\n    from kvant.bench import run\n")
    _append(root / "export" / "onnx.py", "\nfrom kvant.quantize.gptq import GPTQSettings\n")
    _append(root / "kvant" / "data.py", "\nfrom kvant.scoring import windows\n")  # a cycle
    _append(root / "quantize" / "bnb.py", "\nfrom kvant.tiny import _train\n")
    _append(root / "kvant" / "plan" / "peaks.py",
            "\n\ndef _lazy():\n    from kvant.errors import KvantError\n")
    _append(root / "bench" / "report.py", "\nfrom kvant.app.serve import create_app\n")
    _append(root / "kvant" / "app" / "serve.py", "\nfrom kvant.bench.studies import real_size\n")
    problems = "\n".join(arch.check(root))
    assert "core module kvant.scoring imports bench module kvant.bench.run" in problems
    assert "bench module kvant.bench.report imports app module kvant.app.serve" in problems
    assert "app module kvant.app.serve imports study module kvant.bench.studies.real_size" \
        in problems
    assert "(quantize and export are independent)" in problems
    cycles = [line for line in problems.splitlines() if line.startswith("import cycle: ")]
    assert any("kvant.data <->" in c and "kvant.scoring" in c for c in cycles)
    assert "private name _train imported from kvant.tiny" in problems
    assert "function-local import of kvant.errors, which is light" in problems


def test_a_folder_without_a_layer_fails(tmp_path):
    root = _copy(tmp_path)
    (root / "kvant" / "extras").mkdir()
    (root / "kvant" / "extras" / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text((root / "pyproject.toml").read_text().replace(
        '"kvant.bench.studies"]', '"kvant.bench.studies", "kvant.extras"]'))
    problems = arch.check(root)
    assert any(p.startswith("kvant/extras/__init__.py: kvant/extras/ has no layer")
               for p in problems), problems


def test_building_the_parser_loads_no_engine():
    code = ("import sys\nfrom kvant.app.cli import build_parser\nbuild_parser()\n"
            "heavy = [m for m in ('torch', 'transformers', 'llama_cpp', 'onnxruntime', "
            "'gptqmodel', 'numpy') if m in sys.modules]\nprint(','.join(heavy))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == ""


def test_each_optional_engine_stays_optional():
    """A user with only torch (pip install kvant[bnb]) can still bench and release: no
    module outside an engine's own imports llama.cpp, ONNX Runtime, GPTQModel or MLX."""
    code = ("import sys\n"
            "for m in ('llama_cpp', 'onnxruntime', 'onnxruntime_genai', 'gptqmodel', 'gguf',\n"
            "          'mlx', 'mlx_lm'):\n"
            "    sys.modules[m] = None  # import fails as if not installed\n"
            "import kvant.bench.run, kvant.app.generate, kvant.app.release, kvant.app.cli\n"
            "import kvant.quantize.bnb_pipeline, kvant.runtimes.hf\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1500:]
