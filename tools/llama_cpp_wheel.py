"""Install llama-cpp-python with Kvant's NorMistral tokenizer patch, built for this CPU and
checked on it.

    CMAKE_ARGS='...' .venv/bin/python tools/llama_cpp_wheel.py     # `make setup` runs this
    .venv/bin/python tools/llama_cpp_wheel.py --check              # the smoke test alone

llama-cpp-python ships only an sdist, which vendors llama.cpp: this downloads the version
pyproject.toml pins, applies the patch to its vendored llama.cpp and builds the wheel with
CMAKE_ARGS (as a plain pip install would) for this machine's CPU (llama.cpp's default
GGML_NATIVE, `-march=native`).

A native build can compile in instructions that the CPU advertises but its hypervisor does
not really run: ggml's AMX kernels (`tilezero`) die with SIGILL on some Xeon cloud VMs,
reached through llama.cpp's CPU weight repacking. So after every install, built or taken
from the cache, a smoke test runs the tools Kvant uses (llama-quantize, llama-imatrix,
llama-perplexity, llama-bench, and llama_cpp.Llama in Python) on a tiny GGUF made on the
spot, with repacking on. If one dies on a signal, the next build of the ladder drops the
faulting feature class (AMX first, then AVX-512) and is checked the same way; each step is
said in one line. Which build passed, its CPU features (llama.cpp's own system info) and the
faults seen are recorded in the environment (`kvant info --build` shows them).

The wheels are kept in pip's cache directory under a key made of the version, the patch,
CMAKE_ARGS and the CPU's model and feature flags, so a wheel is never handed to a CPU it was
not built and checked on; a variant that faulted on this CPU is remembered there (for the
llama.cpp version, whatever the patch) and skipped. pip's own
wheel cache cannot do this: it never caches wheels built from a local (patched) source tree.

``KVANT_SMOKE_FAULT=FEATURE`` (e.g. ``amx_tile``) simulates the fault for tests: a build whose
compiler features include FEATURE has its first smoke tool die with SIGILL.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "patches" / "llama.cpp" / "normistral-tokenizer.patch"
# Where the chosen build is recorded: beside the environment it was installed into.
RECORD = Path(sys.prefix) / "share" / "kvant" / "llama-cpp-build.json"
FAULT_ENV = "KVANT_SMOKE_FAULT"


@dataclass(frozen=True)
class Variant:
    """One build of the ladder: its name, the compiler flags it adds to `-march=native`, and
    the compiler features (as `gcc -dM -E` names them, lower case) it drops."""

    name: str
    cflags: tuple[str, ...]
    drops: tuple[str, ...]


# GCC's explicit -mno-* win over -march=native whatever their order (ix86_isa_flags_explicit),
# so CFLAGS can take a feature class out of a native build. -mno-avx512f also drops every
# AVX-512 extension that depends on it (VNNI, BF16, VBMI, FP16, ...).
_NO_AMX = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
LADDER = (
    Variant("native", (), ()),
    Variant("native-no-amx", _NO_AMX, ("amx",)),
    Variant("native-no-amx-no-avx512", (*_NO_AMX, "-mno-avx512f"), ("amx", "avx512")),
)


def pinned(name: str, extra: str = "gguf") -> str:
    """The requirement pyproject.toml gives ``name`` in an extra, e.g. 'gguf>=0.19,<0.20'."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"][extra]
    for dep in deps:
        if re.match(rf"{re.escape(name)}\b", dep):
            return dep
    sys.exit(f"tools/llama_cpp_wheel.py: pyproject.toml's [{extra}] extra has no {name}")


def pinned_version() -> str:
    match = re.fullmatch(r"llama-cpp-python==([\w.]+)", pinned("llama-cpp-python"))
    if not match:
        sys.exit("tools/llama_cpp_wheel.py: pyproject.toml pins no llama-cpp-python==VERSION")
    return match.group(1)


def pip(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=True, **kwargs)


def say(line: str) -> None:
    sys.stdout.write(f"llama.cpp: {line}\n")
    sys.stdout.flush()


def cache_root() -> Path:
    try:
        out = pip("cache", "dir", capture_output=True, text=True).stdout.strip()
        if out:
            return Path(out) / "kvant-llama-cpp"
    except subprocess.CalledProcessError:  # pip's cache is disabled: keep Kvant's own
        pass
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvant" / "wheels"


def cpu_identity() -> dict:
    """The CPU as a build depends on it: its model and its feature flags (Linux's
    /proc/cpuinfo; elsewhere what the platform module says)."""
    model, flags = platform.processor() or platform.machine(), ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        text = cpuinfo.read_text(errors="replace")
        if found := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
            model = found.group(1).strip()
        if found := re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M):
            flags = " ".join(sorted(set(found.group(1).split())))
    return {"machine": platform.machine(), "model": model, "flags": flags}


def compiler_features(cflags: tuple[str, ...] = ()) -> set[str]:
    """The x86 instruction-set extensions the C compiler enables for `-march=native` plus
    ``cflags`` (its predefined __AVX512F__-style macros, lower case): what a native ggml build
    compiles in. Empty where the compiler does not say (not x86, no cc)."""
    cc = os.environ.get("CC", "cc")
    try:
        out = subprocess.run([cc, "-march=native", *cflags, "-dM", "-E", "-x", "c", os.devnull],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {m.group(1).lower() for m in re.finditer(r"#define __(AVX\w*|AMX\w*|F16C|FMA)__ 1",
                                                    out)}


def cache_key(version: str, cpu: dict) -> str:
    parts = [version.encode(), PATCH.read_bytes(), os.environ.get("CMAKE_ARGS", "").encode(),
             json.dumps(cpu, sort_keys=True).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def build(version: str, variant: Variant, folder: Path) -> Path:
    """The patched wheel of ``variant``, built into ``folder``."""
    with tempfile.TemporaryDirectory(prefix="kvant-llama-cpp-") as tmp:
        tmp = Path(tmp)
        pip("download", "-q", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={version}", "-d", str(tmp))
        sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        source = tmp / sdist.name.removesuffix(".tar.gz")
        subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(PATCH), "-d",
                        str(source / "vendor" / "llama.cpp")], check=True,
                       stdout=subprocess.DEVNULL)
        flags = " ".join(variant.cflags)
        say(f"building llama-cpp-python {version} ({variant.name}{': ' + flags if flags else ''})"
            " with the NorMistral tokenizer patch (once per machine; minutes)")
        # CMake takes CFLAGS/CXXFLAGS as its initial CMAKE_C(XX)_FLAGS on a fresh configure
        env = {**os.environ, "CFLAGS": f"{os.environ.get('CFLAGS', '')} {flags}".strip(),
               "CXXFLAGS": f"{os.environ.get('CXXFLAGS', '')} {flags}".strip()}
        pip("wheel", "-q", "--no-deps", "-w", str(tmp / "wheel"), str(source), env=env)
        wheel = next((tmp / "wheel").glob("*.whl"))
        part = folder.with_name(folder.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        shutil.copy2(wheel, part / wheel.name)
        part.replace(folder)  # nothing half-copied ever looks like a cached wheel
    return next(folder.glob("*.whl"))


def install(wheel: Path) -> None:
    pip("install", "-q", "--no-deps", "--force-reinstall", str(wheel))
    # its own requirements (numpy, jinja2, ...) and gguf-py, which the smoke test writes with
    pip("install", "-q", str(wheel), pinned("gguf"))


# --- the smoke test --------------------------------------------------------------------

def tiny_gguf(path: Path) -> None:
    """A 2-layer llama-architecture GGUF with random f32 weights, wide enough (256) for
    llama.cpp's CPU repacking and AMX kernels to take its matrices, and a byte-level BPE
    vocabulary (the 256 byte symbols, <s>, </s>) so that any text tokenizes."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    n_embd, n_ff, n_head, n_kv, n_layer, head = 256, 512, 2, 1, 2, 128
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head)
    w.add_value_length(head)
    w.add_rope_dimension_count(head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # GPT-2's printable stand-ins for the 256 bytes (bytes_to_unicode)
    visible = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = iter(range(256, 512))
    symbols = [chr(b) if b in visible else chr(next(shifted)) for b in range(256)]
    tokens = ["<s>", "</s>", *symbols]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * 256)
    w.add_token_merges([f"{symbols[32]} {symbols[116]}"])  # "Ġ t": merges must exist
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    n_vocab = len(tokens)

    def tensor(name: str, *shape: int) -> None:  # shape as numpy has it: (rows, columns)
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    tensor("token_embd.weight", n_vocab, n_embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    tensor("output.weight", n_vocab, n_embd)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        tensor(f"blk.{i}.attn_q.weight", n_head * head, n_embd)
        tensor(f"blk.{i}.attn_k.weight", n_kv * head, n_embd)
        tensor(f"blk.{i}.attn_v.weight", n_kv * head, n_embd)
        tensor(f"blk.{i}.attn_output.weight", n_embd, n_head * head)
        tensor(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        tensor(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        tensor(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_PYTHON_LOAD = """
import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=128, verbose=False)  # repacking on: its default
llm.eval(llm.tokenize(b"Hei p\\xc3\\xa5 deg. God morgen."))
assert llm.n_tokens > 0
"""


def _bin() -> Path:
    """site-packages/bin of the build just installed (found, not imported: a fresh process
    loads the library each time)."""
    import importlib.util

    importlib.invalidate_caches()
    return Path(importlib.util.find_spec("llama_cpp").origin).resolve().parents[1] / "bin"


def system_info() -> dict:
    """The installed build's own view of itself (a fresh process: the wheel may have just been
    replaced): llama.cpp's system info and its CPU features compiled in."""
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    features = sorted({m.group(1) for m in re.finditer(r"(\w+) = 1", out)})
    return {"system_info": out, "features": features}


class SmokeFault(Exception):
    """A smoke-test tool died on a signal: the build uses an instruction this CPU faults on."""

    def __init__(self, tool: str, signame: str):
        super().__init__(f"{tool} died on {signame}")
        self.tool, self.signame = tool, signame


def smoke(compiled: set[str]) -> dict:
    """Run every llama.cpp tool Kvant uses on a tiny GGUF, repacking on. Returns each step's
    seconds; raises SmokeFault when one dies on a signal, SystemExit on any other failure.
    ``compiled``: the build's compiler features (for the simulated fault)."""
    fault = os.environ.get(FAULT_ENV, "").strip().lower()
    threads = str(min(os.cpu_count() or 1, 4))
    bin_dir = _bin()
    with tempfile.TemporaryDirectory(prefix="kvant-llama-smoke-") as tmp:
        tmp = Path(tmp)
        f32, q4 = tmp / "tiny-f32.gguf", tmp / "tiny-q4_0.gguf"
        tiny_gguf(f32)
        text = tmp / "text.txt"
        text.write_text("Hei på deg. God morgen, alle sammen! Det er en fin dag i dag.\n" * 40,
                        encoding="utf-8")
        steps = [
            ("llama-quantize", [bin_dir / "llama-quantize", f32, q4, "Q4_0", threads]),
            ("llama-imatrix", [bin_dir / "llama-imatrix", "-m", q4, "-f", text, "-o",
                               tmp / "imatrix.gguf", "-c", "64", "--chunks", "2", "-t",
                               threads, "-ngl", "0", "--repack"]),
            ("llama-perplexity", [bin_dir / "llama-perplexity", "-m", q4, "-f", text, "-c",
                                  "64", "--chunks", "2", "-t", threads, "-ngl", "0",
                                  "--repack"]),
            ("llama-bench", [bin_dir / "llama-bench", "-m", q4, "-p", "32", "-n", "4", "-r",
                             "1", "-t", threads, "-ngl", "0", "--repack", "1"]),
            ("llama_cpp.Llama", [sys.executable, "-c", _PYTHON_LOAD, q4]),
        ]
        seconds = {}
        for i, (tool, cmd) in enumerate(steps):
            if i == 0 and fault and fault in compiled:  # the simulated fault (tests)
                cmd = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), "
                       "signal.SIGILL)"]
            start = time.perf_counter()
            proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
            seconds[tool] = round(time.perf_counter() - start, 2)
            if proc.returncode < 0:
                raise SmokeFault(tool, signal.Signals(-proc.returncode).name)
            if proc.returncode != 0:
                tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
                sys.exit(f"tools/llama_cpp_wheel.py: {tool} failed (exit {proc.returncode}) "
                         f"in the smoke test: {tail}")
    return seconds


# --- choosing the build ------------------------------------------------------------------

def next_variant(faulted: Variant, compiled: set[str]) -> Variant | None:
    """The first variant after ``faulted`` that drops a feature class the faulted build
    compiled in (a build that drops nothing it had would fault the same way)."""
    later = LADDER[LADDER.index(faulted) + 1:]
    for variant in later:
        dropped = set(variant.drops) - set(faulted.drops)
        if any(f.startswith(d) for f in compiled for d in dropped):
            return variant
    return None


def choose(version: str, cpu: dict, cache: Path, builder=build,
           features=compiler_features) -> dict:
    """Install the first variant of the ladder that passes the smoke test on this CPU,
    building what the cache lacks, and return its record. ``builder`` and ``features`` are
    parameters so that the tests can walk the ladder without compiling llama.cpp."""
    key = cache / f"{version}-{cache_key(version, cpu)}"
    # faults are the CPU's (and the llama.cpp version's), not the patch's: kept across patches
    seen_dir = cache / "faults" / hashlib.sha256(
        json.dumps([version, cpu], sort_keys=True).encode()).hexdigest()[:16]
    faults, variant = [], LADDER[0]
    while variant is not None:
        compiled = features(variant.cflags)
        known = seen_dir / f"{variant.name}.json"
        if known.is_file():  # faulted on this CPU before: skip to the next build at once
            seen = json.loads(known.read_text())
            faults.append(seen)
            say(f"the {variant.name} build died on {seen['signal']} in {seen['tool']} on this "
                "CPU before; using the next build")
            variant = next_variant(variant, compiled)
            continue
        folder = key / variant.name
        wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
        wheel = wheels[0] if wheels else builder(version, variant, folder)
        install(wheel)
        try:
            seconds = smoke(compiled)
        except SmokeFault as fault:
            seen = {"variant": variant.name, "tool": fault.tool, "signal": fault.signame}
            faults.append(seen)
            seen_dir.mkdir(parents=True, exist_ok=True)
            known.write_text(json.dumps(seen))
            variant, faulted = next_variant(variant, compiled), variant
            if variant is None:
                sys.exit(f"tools/llama_cpp_wheel.py: the {faulted.name} build died on "
                         f"{fault.signame} in {fault.tool} and no build of the ladder drops "
                         "a feature it uses; report this CPU (/proc/cpuinfo) to Kvant")
            say(f"the {faulted.name} build died on {fault.signame} in {fault.tool} on this CPU "
                f"({', '.join(sorted(set(variant.drops) - set(faulted.drops)))} advertised but "
                f"not run); falling back to {variant.name}")
            continue
        return {"version": version, "variant": variant.name, "cflags": list(variant.cflags),
                "cmake_args": os.environ.get("CMAKE_ARGS", ""), "cpu": cpu,
                "compiler_features": sorted(compiled), **system_info(), "smoke_s": seconds,
                "faults": faults, "wheel": str(wheel),
                "checked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    sys.exit("tools/llama_cpp_wheel.py: every build of the ladder faulted on this CPU before; "
             f"remove {seen_dir} to try again")


def write_record(record: dict) -> None:
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    part = RECORD.with_suffix(".part")
    part.write_text(json.dumps(record, indent=2), encoding="utf-8")
    part.replace(RECORD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only run the smoke test on the installed build")
    args = parser.parse_args()
    if args.check:
        record = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
        variant = next((v for v in LADDER if v.name == record.get("variant")), LADDER[0])
        try:
            seconds = smoke(compiler_features(variant.cflags))
        except SmokeFault as fault:
            sys.exit(f"tools/llama_cpp_wheel.py: the installed build ({variant.name}) died on "
                     f"{fault.signame} in {fault.tool}; run `make setup` again")
        say(f"smoke test passed ({variant.name}): " + ", ".join(f"{k} {v} s"
                                                                for k, v in seconds.items()))
        return
    version = pinned_version()
    record = choose(version, cpu_identity(), cache_root())
    write_record(record)
    say(f"llama-cpp-python {version} ({record['variant']}, CPU features "
        f"{' '.join(record['features'])}) passed the smoke test with repacking on")


if __name__ == "__main__":
    main()
