"""The local HTTP server: RunPod's endpoint routes and OpenAI routes over the one `Worker` dispatch.

`python handler.py --serve` runs it with uvicorn. Every route only reads the request and writes the
`Reply` in its wire format: RunPod's job wrapper for /run, /runsync and /status, the OpenAI body
with its HTTP status for /v1/... and /openai/v1/... . Nothing here knows what an embedding is.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping

import orjson
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import errors
from .config import _float, _int
from .dispatch import Reply, Worker
from .errors import APIError
from .jobs import Job, JobStatus, JobStore
from .logs import redacted_traceback

log = logging.getLogger(__name__)

API_KEY_ENV = "WORKER_API_KEY"
# The server's own variables (README, "Local server"); they do not apply to RunPod serverless.
SERVER_VARIABLES = (
    API_KEY_ENV,
    "SERVER_JOB_TTL_S",
    "SERVER_MAX_FINISHED_JOBS",
    "SERVER_MAX_JOB_RESULT_BYTES",
    "SERVER_MAX_BODY_BYTES",
)
OPENAI_PREFIXES = ("/openai/v1", "/v1")  # RunPod's proxy path, and a plain OpenAI server's


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None  # bearer token every route but /health requires; None: no check
    job_ttl_s: float = 1800.0  # RunPod keeps /run results for 30 minutes
    max_finished_jobs: int = 1000
    max_job_result_bytes: int = 512 * 1024 * 1024
    max_body_bytes: int = 20 * 1024 * 1024  # RunPod's /runsync payload limit

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ServerSettings":
        """Read the server's variables; a bad value raises ConfigError naming it."""
        env = os.environ if env is None else env
        default = cls()
        return cls(
            api_key=env.get(API_KEY_ENV) or None,
            job_ttl_s=_float(env, "SERVER_JOB_TTL_S", default.job_ttl_s),
            max_finished_jobs=_int(env, "SERVER_MAX_FINISHED_JOBS", default.max_finished_jobs),
            max_job_result_bytes=_int(
                env, "SERVER_MAX_JOB_RESULT_BYTES", default.max_job_result_bytes
            ),
            max_body_bytes=_int(env, "SERVER_MAX_BODY_BYTES", default.max_body_bytes),
        )


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    try:
        content = orjson.dumps(body)
    except orjson.JSONEncodeError as exc:  # a bug upstream; the client still gets an error object
        log.error("an answer could not be written as JSON: %s", redacted_traceback(exc))
        error = errors.internal()
        content, status = orjson.dumps(error.to_dict()), error.status
    return Response(content, status, headers, media_type="application/json")


def job_answer(job_id: str, reply: Reply) -> dict[str, Any]:
    """RunPod's job wrapper around `reply.runpod_output()`: COMPLETED with output, or FAILED with
    the error text (the JSON of the OpenAI error object and its status)."""
    output = reply.runpod_output()
    if reply.ok:
        return {"id": job_id, "status": JobStatus.COMPLETED.value, "output": output}
    return {"id": job_id, "status": JobStatus.FAILED.value, "error": output["error"]}


def create_app(worker: Worker, settings: ServerSettings | None = None) -> FastAPI:
    """The ASGI app. Its lifespan starts the worker's engines in the server's event loop and stops
    them (and any unfinished /run job) on shutdown."""
    settings = settings or ServerSettings()
    jobs = JobStore(
        ttl_s=settings.job_ttl_s,
        max_finished=settings.max_finished_jobs,
        max_bytes=settings.max_job_result_bytes,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        try:
            yield
        finally:
            running = [job.task for job in jobs.unfinished() if job.task is not None]
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await worker.stop()

    guarded = [Depends(_bearer_check(settings.api_key))] if settings.api_key else []
    app = FastAPI(
        title="embedding worker",
        lifespan=lifespan,
        openapi_url=None,  # the routes are RunPod's and OpenAI's; the README documents them
        docs_url=None,
        redoc_url=None,
    )
    app.state.jobs = jobs

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return json_response(exc.to_dict(), exc.status, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Unknown paths and wrong methods answer the OpenAI error object too, not FastAPI's shape.
        if exc.status_code == 405:
            error = errors.method_not_allowed(
                f"{request.method} is not allowed on {request.url.path}"
            )
        else:
            error = errors.not_found(f"no route {request.method} {request.url.path}")
        return json_response(error.to_dict(), error.status)

    async def read_json(request: Request) -> Any:
        return await _read_json(request, settings.max_body_bytes)

    # --- RunPod's endpoint routes -------------------------------------------------------------

    @app.post("/runsync", dependencies=guarded)
    async def runsync(request: Request) -> Response:
        job_input = _job_input(await read_json(request))
        job_id = f"sync-{uuid.uuid4()}"
        return json_response(job_answer(job_id, await worker.dispatch(job_input, job_id)))

    @app.post("/run", dependencies=guarded)
    async def run(request: Request) -> Response:
        job_input = _job_input(await read_json(request))
        job = jobs.add()
        job.task = asyncio.create_task(run_job(job, job_input))
        return json_response({"id": job.id, "status": job.status.value})

    async def run_job(job: Job, job_input: Any) -> None:
        job.status = JobStatus.IN_PROGRESS
        try:
            body = job_answer(job.id, await worker.dispatch(job_input, job.id))
            answer = orjson.dumps(body)
        except Exception as exc:  # dispatch never raises; this guards the job against being lost
            log.error("job %s: could not record its answer: %s", job.id, redacted_traceback(exc))
            body = job_answer(job.id, Reply(500, errors.internal().to_dict()))
            answer = orjson.dumps(body)
        jobs.finish(job, JobStatus(body["status"]), answer)

    # RunPod's API answers GET; runpod's local API (--rp_serve_api) only POST: take both.
    @app.api_route("/status/{job_id}", methods=["GET", "POST"], dependencies=guarded)
    async def status(job_id: str) -> Response:
        return status_response(known_job(job_id))

    @app.post("/cancel/{job_id}", dependencies=guarded)
    async def cancel(job_id: str) -> Response:
        job = known_job(job_id)
        if not job.finished:
            if job.task is not None:
                job.task.cancel()
            answer = {"id": job.id, "status": JobStatus.CANCELLED.value}
            jobs.finish(job, JobStatus.CANCELLED, orjson.dumps(answer))
        return status_response(job)

    def known_job(job_id: str) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise errors.not_found("no such job: unknown, or its result has expired")
        return job

    def status_response(job: Job) -> Response:
        if job.answer is not None:
            return Response(job.answer, media_type="application/json")
        return json_response({"id": job.id, "status": job.status.value})

    @app.get("/health")
    async def health() -> Response:
        # Open without the API key, so load balancers and probes can ask.
        body: dict[str, Any] = {
            "status": "ok" if worker.healthy else "unhealthy",
            "jobs": jobs.counts(),
        }
        if not worker.healthy:
            body["reason"] = worker.registry.health.reason
        return json_response(body, 200 if worker.healthy else 503)

    # --- OpenAI routes: the OpenAI body, with its HTTP status -----------------------------------

    async def models() -> Response:
        return reply_response(await worker.call("/v1/models", None))

    async def embeddings(request: Request) -> Response:
        return reply_response(await worker.call("/v1/embeddings", await read_json(request)))

    async def rerank(request: Request) -> Response:
        return reply_response(await worker.call("/v1/rerank", await read_json(request)))

    for prefix in OPENAI_PREFIXES:
        for path, route, method in (
            ("/models", models, "GET"),
            ("/embeddings", embeddings, "POST"),
            ("/rerank", rerank, "POST"),
        ):
            app.add_api_route(prefix + path, route, methods=[method], dependencies=guarded)

    return app


def reply_response(reply: Reply) -> Response:
    return json_response(reply.body, reply.status)


def _bearer_check(api_key: str):
    expected = api_key.encode()

    async def check(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of the key was right.
        given = token.strip().encode("latin-1", errors="replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
            raise errors.unauthorized(
                f"missing or wrong API key: send 'Authorization: Bearer <{API_KEY_ENV}>'"
            )

    return check


async def _read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing bodies over `limit` bytes before reading them whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _body_too_large(limit)
        chunks.append(chunk)
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        raise errors.invalid_input("the request body is not valid JSON") from None


def _body_too_large(limit: int) -> APIError:
    return errors.too_large(f"the request body is over {limit} bytes (SERVER_MAX_BODY_BYTES)")


def _job_input(body: Any) -> Any:
    """RunPod's request shape: {"input": {...}}; the job input is then the worker's business."""
    if not isinstance(body, dict) or "input" not in body:
        raise errors.invalid_input(
            "the request body must be a JSON object with an 'input' field", param="input"
        )
    return body["input"]


def uvicorn_server(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server for `app`, logging through the worker's logging set-up."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",  # engines start in the server's loop; a failed start stops the server
        log_config=None,
        timeout_graceful_shutdown=30,
    )
    return uvicorn.Server(config)


def serve(worker: Worker, host: str, port: int, settings: ServerSettings) -> None:
    """Serve until SIGINT/SIGTERM; the engines stop on the way out."""
    key = "required" if settings.api_key else "off"
    log.info("serving on http://%s:%d (API key %s)", host, port, key)
    uvicorn_server(create_app(worker, settings), host, port).run()
