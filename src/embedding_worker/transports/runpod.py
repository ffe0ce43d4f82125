"""RunPod's serverless transport: a job's input parsed into an operation and its request, the
answer written as RunPod's job output, the handler runpod calls for every job, and its start-up.

A job comes in two flavours: `openai_route` (RunPod's OpenAI proxy: the route and its body), and
the standard one, recognised by the fields it holds and, where fields are shared, by what the model
it names can do (`recognise`). `python handler.py` runs this on RunPod, and locally runpod's own
test mode (./test_input.json, or `--test_input`), which prints the answer (a preview: see
JobOutput). The local server's /run and /runsync use it too: they are RunPod's transport.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from .. import errors, operations
from ..cpu import processor_name
from ..dispatch import Served, Worker, route_body
from ..engines import ModelRegistry
from ..errors import APIError
from ..logs import get_logger
from ..operations import Operation
from ..reply import Answer, preview
from ..statuses import Reply, http_status
from .jobs import JobStatus

log = get_logger(__name__)

# The route `Worker.finished` sees for a job that names no operation.
UNPARSED_JOB = "runpod job"

# ------------------------------------------------------------------------------------ job input


def recognise(job_input: dict[str, Any], registry: ModelRegistry) -> Operation | None:
    """The operation of a standard-flavour job input, told by the fields it holds and, where
    fields are shared, by what the model it names can do: the first operation of the registry
    whose `job_fields` the job holds and whose `job_applies` agrees."""
    return next(
        (
            op
            for op in operations.OPERATIONS
            if any(f in job_input for f in op.job_fields)
            and (op.job_applies is None or op.job_applies(registry, job_input))
        ),
        None,
    )


def job_hints() -> str:
    """What a standard-flavour job may hold, for the error message of one that holds none."""
    return ", ".join(op.job_hint for op in operations.OPERATIONS if op.job_hint)


def parse_job(
    job_input: Any, registry: ModelRegistry
) -> tuple[Operation, Any, dict[str, str], str | None]:
    """A job input's operation, its request body, the path's parameters and the route it named
    (None: the standard flavour). Raises APIError for a job that names no operation."""
    if not isinstance(job_input, dict):
        raise errors.invalid_input("the job 'input' must be a JSON object")
    if "openai_route" in job_input:
        route = job_input["openai_route"]
        matched = operations.match_route(route) if isinstance(route, str) else None
        if matched is None:
            raise errors.not_found(
                f"unknown openai_route; this worker serves {', '.join(operations.ROUTES)}"
            )
        operation, params = matched
        return operation, job_input.get("openai_input"), params, route
    recognised = recognise(job_input, registry)
    if recognised is None:
        raise errors.invalid_input(f"the job input must hold {job_hints()} or 'openai_route'")
    return recognised, job_input, {}, None


async def answer_job(worker: Worker, job_input: Any, job_id: str | None = None) -> JobReply:
    """Answer one job input, in either flavour. Never raises.

    `job_id` names the job in log lines; without one, the lines keep the current job's name."""
    openai_route = isinstance(job_input, dict) and "openai_route" in job_input
    try:
        operation, body, params, route = parse_job(job_input, worker.registry)
    except APIError as exc:
        log.debug("job %s: %s (param %s)", job_id, exc.code, exc.param)
        refused = Answer(error=exc)
        worker.finished(Served(UNPARSED_JOB, job_input, refused, time.perf_counter()))
        return JobReply.of_answer(refused, openai_route, worker.healthy)
    if route is not None:
        body = route_body(body, params)
    tier = job_input.get("service_tier")  # the OpenAI flavour's tier sits beside its body
    answer = await worker.serve(operation, body, tier, job_id)
    return JobReply.of_answer(answer, openai_route, worker.healthy)


# ------------------------------------------------------------------------------------ job output


class JobOutput(dict):
    """A successful job's output, as runpod receives it: a plain dict whose repr is a preview.

    runpod formats every job's output into two DEBUG f-strings even when DEBUG is off
    (rp_job.run_job), and prints it once in a local test run: a preview costs a few items whatever
    the answer's size, where the full repr of 256 x 1024 floats costs as much as writing the answer.
    JSON encoders see an ordinary dict.
    """

    def __repr__(self) -> str:
        return json.dumps(preview(dict(self)), ensure_ascii=False)


class JobList(list):
    """A successful job's output that is a list (TEI's shapes), with a preview for its repr, as
    `JobOutput`."""

    def __repr__(self) -> str:
        return json.dumps(preview(list(self)), ensure_ascii=False)


@dataclass(frozen=True)
class JobReply(Reply):
    """An answer as a RunPod job carries it: HTTP's view (the status goes in a failure's error
    text), and how the job asked and how the worker stands."""

    openai_route: bool = False  # asked through RunPod's OpenAI proxy
    refresh_worker: bool = False  # the worker is broken: ask RunPod for a new one

    @classmethod
    def of_answer(cls, answer: Answer, openai_route: bool, healthy: bool) -> JobReply:
        error = answer.error
        if error is None:
            assert answer.body is not None
            return cls(200, answer.body, openai_route=openai_route)
        return cls(
            http_status(error),
            error.to_dict(),
            error.retry_after,
            openai_route=openai_route,
            refresh_worker=not healthy,
        )

    def runpod_output(self) -> Any:
        """The job output RunPod expects.

        Success: the OpenAI body (standard flavour), or a one-element list holding it (OpenAI proxy,
        as RunPod's own OpenAI-compatible workers answer). Failure: a top-level "error" whose value
        is the JSON text of the OpenAI error object plus its status, which makes the job FAILED
        (runpod's local API answers HTTP 500 if that value is not a string).
        """
        if self.ok:
            output = JobOutput(self.body) if isinstance(self.body, dict) else JobList(self.body)
            return [output] if self.openai_route else output
        assert isinstance(self.body, dict)  # an error body
        error = dict(self.body, status=self.status)
        if self.retry_after is not None:  # no headers on a job: the wait goes in the error text
            error["retry_after"] = self.retry_after
        failed: dict[str, Any] = {"error": json.dumps(error, ensure_ascii=False)}
        if self.refresh_worker:
            failed["refresh_worker"] = True
        return failed


def job_answer(job_id: str, reply: JobReply) -> dict[str, Any]:
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
        reply = await answer_job(worker, job.get("input"), job_id=job.get("id"))
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
