"""glibc malloc settings for a model server: the memory a batch frees stays for the next batch.

Every forward pass allocates and frees the same large activations. With glibc's defaults much of
that memory goes back to the kernel after each batch: a chunk over the mmap threshold is unmapped, a
thread's heap is deleted once it is free, the main heap's top is trimmed. The next batch faults the
same pages in again, each zeroed by the kernel: on 2 CPU cores, tens to hundreds of thousands of
page faults a round and up to a sixth of the CPU time, and a loss that depends on each process's
allocation history, so identical engines differ in speed (bench/RESULTS.md, docs/design.md).
These settings keep what was freed, as jemalloc and tcmalloc are configured to in the
CPU set-ups PyTorch recommends, without preloading another allocator: one heap for every thread, no
mmap for large chunks, no trimming.

The cost is resident memory: the process keeps its high-water mark (the largest batch's activations)
instead of handing it back between jobs. KEEP_FREED_MEMORY=auto (the default) applies the settings
where the models compute on the CPU; with a GPU the activations live in torch's own caching
allocator, and a single heap could only make the CPU threads that tokenize wait on each other. true
or false decides for every machine; any MALLOC_* or GLIBC_TUNABLES variable leaves glibc alone:
whoever set one has chosen their own.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Mapping

# mallopt(3) parameters, from <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8

KEEP_SETTINGS = {
    # Every thread allocates from the main heap. A thread's own heap holds at most 64 MB, and glibc
    # maps a larger chunk afresh whatever M_MMAP_MAX says (bge-small, 32 long texts: 577,000 faults
    # a round with the other settings alone).
    M_ARENA_MAX: 1,
    M_MMAP_MAX: 0,  # large chunks come from the heap too, not from fresh mappings
    M_TRIM_THRESHOLD: 2**31 - 1,  # the largest value mallopt takes: in effect, never trim
    M_TOP_PAD: 64 * 1024 * 1024,  # grow the heap in large steps
}


def is_malloc_variable(name: str) -> bool:
    """An environment variable through which glibc malloc is configured at process start."""
    return name == "GLIBC_TUNABLES" or name.startswith("MALLOC_")


def user_chose_allocator(environ: Mapping[str, str]) -> bool:
    return any(is_malloc_variable(name) for name in environ)


def models_compute_on_cpu() -> bool:
    import torch

    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


def keep_freed_memory(environ: Mapping[str, str], enabled: bool | None = None) -> bool:
    """Apply KEEP_SETTINGS to this process's glibc malloc; True if they were applied.
    `enabled` None is auto: where the models compute on the CPU.

    Call it before the process starts threads that allocate: a thread keeps the heap it was given.
    """
    if enabled is None:
        enabled = models_compute_on_cpu()
    if not enabled or user_chose_allocator(environ) or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(param, value) == 1 for param, value in KEEP_SETTINGS.items())
