"""Where Kvant keeps things: the cache, the offline text folder, and what names a hub model.

The only environment variables Kvant reads are named here; the CLI and the app-layer scripts
call these functions, library code takes paths as arguments.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ENV_DATA_DIR = "KVANT_DATA_DIR"
ENV_CACHE_DIR = "KVANT_CACHE_DIR"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """$KVANT_CACHE_DIR, else $XDG_CACHE_HOME/kvant, else ~/.cache/kvant."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "kvant"


def default_data_dir() -> Path | None:
    """$KVANT_DATA_DIR: a folder of the raw text-set files, for offline machines."""
    value = os.environ.get(ENV_DATA_DIR)
    return Path(value) if value else None


def looks_like_hub_id(model: str) -> bool:
    """True for ``owner/name`` ids; paths that start with ``.``, ``/`` or ``~`` are never ids.

    >>> looks_like_hub_id("norallm/normistral-11b-long"), looks_like_hub_id("./tiny")
    (True, False)
    """
    return bool(_HUB_ID.match(model)) and not model.startswith((".", "/", "~"))
