"""File digests (shared by the data sets, model identities and artifact manifests) and the
JSON writer every results file goes through."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

# {(device, inode): (size, mtime_ns, digest)}: a file is hashed once per process, and
# trusted while its size, inode and modification time stay the same (a release checks every
# artifact's checksums when it resumes, when it amends the card and when lm-eval loads it:
# minutes of reading 60 GB each time at 11.4B)
_DIGESTS: dict[tuple[int, int], tuple[int, int, str]] = {}
RACY_NS = 2_000_000_000


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed (hashlib.file_digest); once per process per file."""
    with Path(path).open("rb") as handle:
        stat = os.fstat(handle.fileno())
        known = _DIGESTS.get((stat.st_dev, stat.st_ino))
        if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
            return known[2]
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    # as git's racy-file rule: a file modified within the clock's granularity of being hashed
    # could change again without its mtime moving, so only an older one is remembered
    if stat.st_mtime_ns < time.time_ns() - RACY_NS:
        _DIGESTS[stat.st_dev, stat.st_ino] = (stat.st_size, stat.st_mtime_ns, digest)
    return digest


def sha256_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes (keys for settings and combined digests)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_json(path: Path, data) -> None:
    """``data`` as indented JSON at ``path``, through a .part file renamed over it: a killed
    run never leaves a half-written file under the finished name."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    part.replace(path)
