"""Sizes as people write them: '6.5GiB' -> bytes."""

from __future__ import annotations

import re

from kvant.errors import SettingsError

GIB = 2**30
MIB = 2**20
SHARD_BYTES = 2 * GIB
"""The shard size of a checkpoint Kvant writes tensor by tensor (kvant.quantize.bnb_pipeline):
what the writer holds at once, which the plan counts."""
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(GiB|GB|MiB|MB)?", re.IGNORECASE)
_UNITS = {"gib": GIB, "gb": 10**9, "mib": MIB, "mb": 10**6}


def parse_size(text: str, what: str, example: str, default_unit: str | None = None) -> int:
    """'6.5GiB' -> bytes (GiB and MiB binary, GB and MB decimal); a bare number is in
    ``default_unit``, or refused when there is none. ``what`` and ``example`` word the
    error: "--budget lots: write it like 8GiB or 24GB"."""
    match = _SIZE.fullmatch(text.strip())
    if not match or not (match.group(2) or default_unit):
        raise SettingsError(f"{what} {text}: write it like {example}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or default_unit).lower()])
