"""Compute threads sized to the CPU the worker may use, and idle ones that sleep.

torch runs a forward pass on a pool of OpenMP threads, by default one a core of the machine, and a
parallel region ends when its slowest thread does. On a shared CPU (a cloud vCPU whose sibling
runs someone else's work, a container with a CPU quota) two things then go wrong: a thread that
the neighbour's work deschedules holds up every other, and the others, done with their part, spin
at the barrier (GNU OpenMP's default), burning the CPU time the late thread needs. A busy
neighbour then costs far more than its share.

So, at start: OpenMP's idle threads sleep instead of spinning (`OMP_WAIT_POLICY=PASSIVE`, set
by the entry points before anything imports torch: OpenMP reads it once, when torch loads it,
and Infinity's modules import torch), and torch's intra-op threads are as many as the CPUs the
process may run on (its affinity, within its cgroup's CPU quota). Where the user sets
OMP_WAIT_POLICY or OMP_NUM_THREADS, theirs hold.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

from .logs import get_logger

__all__ = ["CPU_MAX", "prepare_thread_environment", "size_compute_threads", "usable_cpus"]

log = get_logger(__name__)

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def usable_cpus(cpu_max: Path = CPU_MAX) -> int:
    """The CPUs this process may run on: its affinity, within its cgroup's CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text(encoding="ascii").split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def prepare_thread_environment(environ: MutableMapping[str, str]) -> None:
    """Before torch is imported: OpenMP's idle threads sleep (unless the user chose)."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def size_compute_threads(environ: MutableMapping[str, str]) -> int | None:
    """torch's intra-op threads set to `usable_cpus()`; None where OMP_NUM_THREADS decides."""
    if "OMP_NUM_THREADS" in environ:  # the user's, which torch reads itself
        return None
    import torch

    threads = usable_cpus()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.debug("torch computes on %d threads", threads)
    return threads
