"""Compute threads sized to the CPU the worker may use, and idle ones that sleep.

torch runs a forward pass on a pool of OpenMP threads, by default one a core of the machine, and a
parallel region ends when its slowest thread does. On a shared CPU (a cloud vCPU whose sibling
runs someone else's work, a container with a CPU quota) two things then go wrong: a thread that
the neighbour's work deschedules holds up every other, and the others, done with their part, spin
at the barrier (GNU OpenMP's default), burning the CPU time the late thread needs. A busy
neighbour then costs far more than its share.

So, at start: OpenMP's idle threads spin only briefly, then sleep (`OMP_WAIT_POLICY=PASSIVE`
with `GOMP_SPINCOUNT=IDLE_SPIN_COUNT`, tens of microseconds: long enough to catch the next
parallel region of the same forward pass without a wake-up, too short to burn a descheduled
peer's time), and torch's intra-op threads are as many as the CPUs the process may run on (its
affinity, within its cgroup's CPU quota). The entry points set the policy before anything
imports torch: OpenMP reads it once, when torch loads it, and Infinity's modules import torch.
Where the user sets OMP_WAIT_POLICY, GOMP_SPINCOUNT or OMP_NUM_THREADS, theirs hold.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

from .logs import get_logger

__all__ = [
    "CPU_MAX",
    "IDLE_SPIN_COUNT",
    "prepare_thread_environment",
    "size_compute_threads",
    "usable_cpus",
]

log = get_logger(__name__)

# Busy-wait iterations of an idle OpenMP thread before it sleeps (GNU OpenMP's default: 300,000,
# some milliseconds; with OMP_WAIT_POLICY=PASSIVE alone, none). bench.neighbour and
# bench.server_ab decide it, quiet and beside a busy process (bench/RESULTS.md).
IDLE_SPIN_COUNT = 3000

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
    """Before torch is imported: OpenMP's idle threads spin briefly, then sleep (unless the user
    chose how they wait)."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # settings for OpenMP, not the worker's
    environ.setdefault("GOMP_SPINCOUNT", str(IDLE_SPIN_COUNT))


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
