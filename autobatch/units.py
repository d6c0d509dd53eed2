"""Byte sizes as people write them, and back: `parse_bytes("12GiB")`, `format_bytes(1536)`. No torch here.

The convention (also in `--help` and the README): a bare letter or an `iB` unit is binary, an SI `B` unit is
decimal, case-insensitive, so `12G` = `12GiB` = 12 × 2^30 bytes and `12GB` = 12 × 10^9 bytes. `G` is binary
because memory is: a "16G card" holds 16 GiB, and `nvidia-smi`, `free -g` and PyTorch report in powers of
1024; the SI `GB` keeps the meaning a disk or a spec sheet gives it.
"""

from __future__ import annotations

import re

from autobatch.errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"\s*([+-]?)([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")
#: What a size may look like, for error messages and help texts.
EXAMPLES = "300MiB, 80GB, 2.5GiB or plain bytes (G = GiB = 2^30 bytes, GB = 10^9)"


def parse_bytes(text: str | int, name: str = "--memory-budget") -> int:
    """'300MiB', '80GB', '12G', '2.5GiB' or plain bytes -> bytes; the error names `name` (flag or key)."""
    if isinstance(text, int) and not isinstance(text, bool):
        sign, value, unit = "-" if text < 0 else "", float(abs(text)), ""
    else:
        match = _SIZE.fullmatch(str(text))
        if not match or match.group(3).lower() not in _UNITS:
            raise ConfigError(f"{name}: cannot read {text!r} as a size; write e.g. {EXAMPLES}")
        sign, value, unit = match.group(1), float(match.group(2)), match.group(3).lower()
    result = int(value * _UNITS[unit])
    if sign == "-" or result <= 0:
        raise ConfigError(f"{name} must be a positive size, got {text!r}: write e.g. {EXAMPLES}")
    return result


def format_bytes(n: float) -> str:
    """Human-readable binary size: 1536 -> '1.5KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"
