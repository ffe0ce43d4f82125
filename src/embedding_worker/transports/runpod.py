"""RunPod's serverless transport: the handler runpod calls for every job, and its start-up.

The handler only hands the job's input to `Worker.dispatch` and returns the Reply's RunPod output.
`python handler.py` runs this on RunPod, and locally runpod's own test mode (./test_input.json, or
`--test_input`), which prints the answer (a preview: see reply.JobOutput).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

from ..cpu import processor_name
from ..dispatch import Worker
from ..reply import Reply
from .jobs import JobStatus


def job_answer(job_id: str, reply: Reply) -> dict[str, Any]:
    """RunPod's job wrapper around `reply.runpod_output()`: COMPLETED with output, or FAILED with
    the error text (the JSON of the OpenAI error object and its status)."""
    output = reply.runpod_output()
    if reply.ok:
        return {"id": job_id, "status": JobStatus.COMPLETED.value, "output": output}
    return {"id": job_id, "status": JobStatus.FAILED.value, "error": output["error"]}


def runpod_handler(worker: Worker) -> Callable[[dict[str, Any]], Any]:
    """The handler runpod calls for each job. A queue endpoint has no /metrics to scrape, so the
    worker logs a line of its figures each minute while jobs come (metrics.py)."""

    async def handler(job: dict[str, Any]) -> Any:
        if worker.metrics is not None:
            worker.metrics.start_summaries()
        reply = await worker.dispatch(job.get("input"), job_id=job.get("id"))
        return reply.runpod_output()

    return handler


def runpod_config(worker: Worker) -> dict[str, Any]:
    """What runpod.serverless.start() is given: the handler and the concurrency per worker."""
    max_concurrency = worker.config.max_concurrency
    return {
        "handler": runpod_handler(worker),
        "concurrency_modifier": lambda current: max_concurrency,
    }


def import_runpod(environ: MutableMapping[str, str] = os.environ) -> Any:
    """Import the runpod SDK quietly and without its CPU probe subprocess.

    runpod's logger prints every job's input and output at DEBUG, its default level; it reads
    RUNPOD_DEBUG_LEVEL once, at import, so INFO is set first unless the user chose a level
    (RUNPOD_LOG_LEVEL or --rp_log_level still override it). At import, runpod also asks py-cpuinfo
    for the processor's name (shown only in its debug output); py-cpuinfo's full probe starts a
    Python subprocess, a cost on every cold start (docs/design.md). For that one import it gets the
    name from /proc/cpuinfo instead.
    """
    if "runpod" in sys.modules:
        return sys.modules["runpod"]
    environ.setdefault("RUNPOD_DEBUG_LEVEL", "INFO")
    try:
        import cpuinfo  # runpod's own dependency (py-cpuinfo)
    except ImportError:
        import runpod

        return runpod

    full_probe = cpuinfo.get_cpu_info
    cpuinfo.get_cpu_info = lambda: {"brand_raw": processor_name()}
    try:
        import runpod
    finally:
        cpuinfo.get_cpu_info = full_probe
    return runpod


def run_runpod(worker: Worker) -> None:
    runpod = import_runpod()
    try:
        runpod.serverless.start(runpod_config(worker))
    finally:
        # runpod's local test ends with sys.exit(); Infinity's batch threads would keep the process
        # alive after it, so the engines are stopped on the way out.
        worker.registry.stop_blocking()
