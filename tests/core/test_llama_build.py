"""The llama.cpp build `make setup` installs: checked on this CPU with repacking on, falling
back past a feature the CPU faults on, and never reused on another CPU
(tools/llama_cpp_wheel.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, load_tool, run_kvant

TOOL = REPO / "tools" / "llama_cpp_wheel.py"


@pytest.fixture(scope="module")
def wheel_tool():
    return load_tool("llama_cpp_wheel")


def test_smoke_test_passes_on_this_machine():
    result = subprocess.run([sys.executable, str(TOOL), "--check"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    for tool in ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench",
                 "llama_cpp.Llama"):
        assert f"{tool} " in result.stdout, (tool, result.stdout)


def test_info_build_shows_the_recorded_build(wheel_tool):
    import llama_cpp

    result = run_kvant("info", "--build", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["build"] in {v.name for v in wheel_tool.LADDER}, info
    # the record describes the library that is installed: llama.cpp's own view agrees
    live = sorted(set(re.findall(r"(\w+) = 1", llama_cpp.llama_print_system_info().decode())))
    assert info["CPU features"].split() == live
    record = json.loads(wheel_tool.RECORD.read_text())
    if "amx" in {d for v in wheel_tool.LADDER if v.name == info["build"] for d in v.drops}:
        assert not any(f.startswith("AMX") for f in live)
    assert set(record["smoke_s"]) == {"llama-quantize", "llama-imatrix", "llama-perplexity",
                                      "llama-bench", "llama_cpp.Llama"}
    text = run_kvant("info", "--build")
    assert text.returncode == 0 and f"build              {info['build']}" in text.stdout


def _fake_compiler(cflags: tuple[str, ...]) -> set[str]:
    """What `gcc -march=native` enables on a Xeon with AVX-512 and AMX, less what the
    variant's -mno-* flags take out (GCC's rule: -mno-avx512f drops every AVX-512 part)."""
    features = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni", "amx_tile",
                "amx_int8", "amx_bf16"}
    if "-mno-amx-tile" in cflags:
        features -= {"amx_tile", "amx_int8", "amx_bf16"}
    if "-mno-avx512f" in cflags:
        features = {f for f in features if not f.startswith("avx512")}
    return features


class FakeBuilder:
    """Stands in for compiling llama.cpp: 'builds' each variant by caching the wheel that is
    installed (so the smoke test runs real tools), and remembers what it was asked for."""

    def __init__(self, wheel: Path):
        self.wheel, self.asked = wheel, []

    def __call__(self, version, variant, folder: Path) -> Path:
        self.asked.append(variant.name)
        folder.mkdir(parents=True)
        (folder / self.wheel.name).symlink_to(self.wheel)
        return folder / self.wheel.name


@pytest.fixture
def ladder(wheel_tool, monkeypatch, tmp_path):
    record = json.loads(wheel_tool.RECORD.read_text())
    builder = FakeBuilder(Path(record["wheel"]))
    monkeypatch.setattr(wheel_tool, "install", lambda wheel: None)  # it is installed already
    cpu = {"machine": "x86_64", "model": "Xeon", "flags": "avx2 avx512f amx_tile amx_int8"}

    def choose(fault: str, cpu=cpu):
        monkeypatch.setenv(wheel_tool.FAULT_ENV, fault)
        return wheel_tool.choose(record["version"], cpu, tmp_path / "cache", builder,
                                 _fake_compiler)
    return choose, builder


def test_a_simulated_amx_fault_falls_back_to_a_build_without_amx(ladder, capsys):
    choose, builder = ladder
    record = choose("amx_tile")
    assert record["variant"] == "native-no-amx"
    assert record["faults"] == [{"variant": "native", "tool": "llama-quantize",
                                 "signal": "SIGILL"}]
    assert record["cflags"] == ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
    assert set(record["smoke_s"]) >= {"llama-perplexity", "llama-bench"}
    assert builder.asked == ["native", "native-no-amx"]
    said = [line for line in capsys.readouterr().out.splitlines() if "died on" in line]
    assert len(said) == 1 and "falling back to native-no-amx" in said[0]
    # the next setup on the same CPU skips the faulting build and compiles nothing
    again = choose("amx_tile")
    assert again["variant"] == "native-no-amx" and builder.asked == ["native", "native-no-amx"]
    assert "before; using the next build" in capsys.readouterr().out


def test_an_avx512_fault_walks_the_ladder_to_the_end(ladder):
    choose, builder = ladder
    record = choose("avx512f")
    assert record["variant"] == "native-no-amx-no-avx512"
    assert [f["variant"] for f in record["faults"]] == ["native", "native-no-amx"]
    assert builder.asked == ["native", "native-no-amx", "native-no-amx-no-avx512"]


def test_a_fault_no_build_drops_is_one_clear_error(ladder):
    choose, _ = ladder
    with pytest.raises(SystemExit, match="no build of the ladder drops a feature it uses"):
        choose("avx2")


def test_a_wheel_is_never_reused_on_another_cpu(ladder, wheel_tool):
    choose, builder = ladder
    choose("")
    assert builder.asked == ["native"]
    choose("")  # the same CPU: from the cache
    assert builder.asked == ["native"]
    other = {"machine": "x86_64", "model": "EPYC", "flags": "avx2 avx512f"}
    choose("", cpu=other)  # another CPU: its own key, built (and checked) anew
    assert builder.asked == ["native", "native"]
    assert wheel_tool.cache_key("0.3.36", other) != wheel_tool.cache_key(
        "0.3.36", {**other, "flags": "avx2"})


def test_the_tiny_smoke_gguf_is_what_llama_cpp_reads(wheel_tool, tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    wheel_tool.tiny_gguf(path)
    reader = gguf.GGUFReader(str(path))
    # wide enough for the CPU repacking and AMX kernels: every matrix has 256-wide rows
    widths = {t.name: int(t.shape[0]) for t in reader.tensors if len(t.shape) == 2}
    assert widths["blk.0.ffn_down.weight"] == 512 and widths["token_embd.weight"] == 256
    tokens = reader.get_field("tokenizer.ggml.tokens")
    assert len(tokens.data) == 258  # <s>, </s> and the 256 byte symbols: any text tokenizes
