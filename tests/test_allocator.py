"""The worker's malloc settings (allocator.py): freed activations stay in the process for the next
batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from statistics import median

import pytest

from embedding_worker.allocator import is_malloc_variable, keep_freed_memory
from tests.conftest import ROOT

# A real worker process on the bundled MiniLM: the page faults of its later batches of long texts.
# Each batch allocates chunks above glibc's largest mmap threshold (the attention scores of 16 x 256
# tokens), which its defaults map and unmap every time.
FAULTS = """
import asyncio, json, resource, sys
from embedding_worker import startup
from tests.model_factory import CORPUS
from embedding_worker.transports.runpod import answer_job

worker = startup.build_worker()
texts = [" ".join(CORPUS[i:] + CORPUS[:i]) for i in range(16)]  # each over the 256-token maximum

async def main():
    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        reply = await answer_job(worker, {"input": texts})
        assert reply.status == 200, reply.body
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    await worker.registry.stop()
    return faults

print(json.dumps(asyncio.run(main())))
"""


def page_faults_per_batch(keep: str | None) -> list[int]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not is_malloc_variable(k) and k != "KEEP_FREED_MEMORY"
    }
    # on the CPU, where auto keeps freed memory, on any machine
    env.update(CUDA_VISIBLE_DEVICES="", DTYPES="float32", TOKENIZERS_PARALLELISM="false")
    if keep is not None:
        env["KEEP_FREED_MEMORY"] = keep
    proc = subprocess.run(
        [sys.executable, "-c", FAULTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_a_cpu_worker_keeps_freed_memory_and_its_batches_stop_faulting_pages_in():
    # the default (auto) and glibc's own; both after the batches that grow the heap
    kept = page_faults_per_batch(None)[3:]
    released = page_faults_per_batch("false")[3:]
    # glibc's defaults give large chunks back and fault them in again, batch after batch ...
    assert median(released) > 1_000, released
    # ... the kept heap serves the typical batch from memory already resident (the odd batch
    # still grows it, so the median, not the sum)
    assert median(kept) < median(released) / 10, (kept, released)


def test_the_settings_are_left_alone_when_off_or_when_malloc_is_configured_already():
    # none of these reach mallopt, so this process's allocator is untouched
    assert keep_freed_memory({}, enabled=False) is False
    assert keep_freed_memory({"MALLOC_ARENA_MAX": "4"}) is False
    assert keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) is False
