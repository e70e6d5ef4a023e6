"""Sizes written by people: ``123456``, ``"60MB"``, ``"1.5 GiB"`` (for --max-memory, --target-size and the like)."""

from __future__ import annotations

import re

# decimal kB/MB/GB/TB, binary KiB/MiB/GiB/TiB; "K"/"M"/"G" alone are decimal
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
         "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*")


def parse_size(value: int | str, what: str = "size") -> int:
    """Bytes, positive; a ValueError naming ``what`` (the option) for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.fullmatch(str(value))
        if not match or match.group(2).lower() not in UNITS:
            raise ValueError(f"{what} {value!r}: expected a size such as 60MB, 1.5GiB or a number of bytes")
        size = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"{what} {value!r} must be positive")
    return size
