"""Install llama-cpp-python with Kvant's NorMistral tokenizer patch (patches/llama.cpp).

    CMAKE_ARGS='...' .venv/bin/python tools/llama_cpp_wheel.py     # `make setup` runs this

llama-cpp-python ships only an sdist, which vendors llama.cpp: this downloads the version
pyproject.toml pins, applies the patch to its vendored llama.cpp, builds the wheel (with
CMAKE_ARGS, as a plain pip install would) and keeps it in pip's cache directory under a key
made of the version, the patch and CMAKE_ARGS, so each machine compiles once per patch.
Later runs install the cached wheel in seconds. pip's own wheel cache cannot do this: it
never caches wheels built from a local (patched) source tree.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "patches" / "llama.cpp" / "normistral-tokenizer.patch"


def pinned_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["gguf"]
    for dep in deps:
        if match := re.fullmatch(r"llama-cpp-python==([\w.]+)", dep):
            return match.group(1)
    sys.exit("tools/llama_cpp_wheel.py: pyproject.toml pins no llama-cpp-python==VERSION")


def pip(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=True, **kwargs)


def cache_root() -> Path:
    try:
        out = pip("cache", "dir", capture_output=True, text=True).stdout.strip()
        if out:
            return Path(out) / "kvant-llama-cpp"
    except subprocess.CalledProcessError:  # pip's cache is disabled: keep Kvant's own
        pass
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvant" / "wheels"


def build(version: str, folder: Path) -> Path:
    """The patched wheel, built into ``folder``."""
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
        sys.stdout.write(f"llama-cpp-python {version}: building with the NorMistral tokenizer "
                         "patch (once per machine; minutes)\n")
        sys.stdout.flush()
        pip("wheel", "-q", "--no-deps", "-w", str(tmp / "wheel"), str(source))
        wheel = next((tmp / "wheel").glob("*.whl"))
        part = folder.with_name(folder.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        shutil.copy2(wheel, part / wheel.name)
        part.replace(folder)  # nothing half-copied ever looks like a cached wheel
    return next(folder.glob("*.whl"))


def main() -> None:
    version = pinned_version()
    key = hashlib.sha256(b"\0".join([version.encode(), PATCH.read_bytes(),
                                     os.environ.get("CMAKE_ARGS", "").encode()]))
    folder = cache_root() / f"{version}-{key.hexdigest()[:16]}"
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    wheel = wheels[0] if wheels else build(version, folder)
    pip("install", "-q", "--no-deps", "--force-reinstall", str(wheel))
    sys.stdout.write(f"llama-cpp-python {version} with the NorMistral tokenizer patch: {wheel}\n")


if __name__ == "__main__":
    main()
