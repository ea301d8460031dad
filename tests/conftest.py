"""Shared fixtures: the stand-in model (built once, cached by recipe hash) and the data folder.

Nothing here downloads: text sets are read from ../shared/data/ud (the same bytes the
pinned URLs serve) through the offline data-dir override.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
UD_DIR = SHARED / "ud"
EVAL_DIR = SHARED / "eval"
CALIB_FILE = SHARED / "calib" / "nor.calib-1000.txt"
EVAL_FILES = {"nob": "nob.ud-test.txt", "nno": "nno.ud-test.txt", "sme": "sme.ud-test.txt",
              "dan": "dan.ud-test.txt", "swe": "swe.ud-test.txt"}


def pytest_collection_modifyitems(config, items):
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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not UD_DIR.is_dir():
        pytest.skip("../shared/data (UD files and calibration text) is not beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The user cache (or $KVANT_CACHE_DIR): the stand-in is cached there by recipe hash."""
    from kvant.cli import cache_dir as user_cache

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


def run_kvant(*args: str, env: dict | None = None, timeout: int = 900):
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("kvant")
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
