"""What this machine's CPU is, from Linux's /proc/cpuinfo: its instruction-set flags (the dtype
policy asks for native bfloat16) and its name (runpod's start-up banner, the benchmarks' machine).

Elsewhere, or where the file cannot be read, the flags are empty and the name is what `platform`
knows.
"""

from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["CPUINFO", "cpu_flags", "processor_name"]

CPUINFO = Path("/proc/cpuinfo")


def _first_value(key: str, path: Path) -> str | None:
    """The value of the first `key : value` line (the first processor's), or None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                name, colon, value = line.partition(":")
                if colon and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """The first processor's flags (`avx2`, `avx512_bf16`, ...); empty where none can be read."""
    return frozenset((_first_value("flags", path) or "").split())


def processor_name(path: Path = CPUINFO) -> str:
    """The processor's model name, or the architecture where /proc/cpuinfo has none."""
    return _first_value("model name", path) or platform.processor() or platform.machine()
