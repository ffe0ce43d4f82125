"""Compute threads sized to the CPU the worker may use (threads.py)."""

from __future__ import annotations

import os

import torch

from embedding_worker.threads import (
    IDLE_SPIN_COUNT,
    prepare_thread_environment,
    size_compute_threads,
    usable_cpus,
)


def test_the_cgroup_quota_bounds_the_cpus(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == affinity  # no quota: the affinity
    cpu_max.write_text("50000 100000\n")
    assert usable_cpus(cpu_max) == 1  # half a CPU's time: one thread
    cpu_max.write_text(f"{150000 * affinity} 100000\n")
    assert usable_cpus(cpu_max) == affinity  # a quota above the affinity does not add CPUs
    assert usable_cpus(tmp_path / "missing") == affinity


def test_idle_openmp_threads_sleep_unless_the_user_chose():
    environ: dict[str, str] = {}
    prepare_thread_environment(environ)
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": str(IDLE_SPIN_COUNT)}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}):
        before = dict(chosen)
        prepare_thread_environment(chosen)
        assert chosen == before


def test_torch_threads_follow_the_usable_cpus_unless_omp_num_threads_is_set():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, usable_cpus() + 1))
        assert size_compute_threads({"OMP_NUM_THREADS": "1"}) is None
        assert torch.get_num_threads() == usable_cpus() + 1  # the user's choice stands
        assert size_compute_threads({}) == usable_cpus() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
