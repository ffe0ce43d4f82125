"""The local HTTP server: RunPod's endpoint routes and OpenAI routes over the one `Worker` dispatch.

`embedding-worker serve` (or `python handler.py --serve`) runs it with uvicorn. Every route only
reads the request and writes the `Reply` in its wire format: RunPod's job wrapper for /run, /runsync
and /status, the OpenAI body with its HTTP status for /v1/... and /openai/v1/... . Nothing here
knows what an embedding is.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn

from .. import errors, operations
from ..dispatch import Worker
from ..env import float_var, int_var
from ..errors import APIError
from ..logs import redacted_traceback
from ..reply import Reply
from .jobs import Job, JobStatus, JobStore
from .runpod import job_answer

log = logging.getLogger(__name__)

API_KEY_ENV = "WORKER_API_KEY"
# The server's own variables (docs/configuration.md); they do not apply to RunPod serverless.
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
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerSettings:
        """Read the server's variables; a bad value raises ConfigError naming it."""
        env = os.environ if env is None else env
        default = cls()
        return cls(
            api_key=env.get(API_KEY_ENV) or None,
            job_ttl_s=float_var(env, "SERVER_JOB_TTL_S", default.job_ttl_s),
            max_finished_jobs=int_var(env, "SERVER_MAX_FINISHED_JOBS", default.max_finished_jobs),
            max_job_result_bytes=int_var(
                env, "SERVER_MAX_JOB_RESULT_BYTES", default.max_job_result_bytes
            ),
            max_body_bytes=int_var(env, "SERVER_MAX_BODY_BYTES", default.max_body_bytes),
        )


Headers = Sequence[tuple[bytes, bytes]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[["Request"], Awaitable["Response"]]


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: Headers = ()


def json_response(body: Any, status: int = 200, headers: Headers = ()) -> Response:
    try:
        content = orjson.dumps(body)
    except orjson.JSONEncodeError as exc:  # a bug upstream; the client still gets an error object
        log.error("an answer could not be written as JSON: %s", redacted_traceback(exc))
        error = errors.internal()
        content, status, headers = orjson.dumps(error.to_dict()), error.status, ()
    return Response(status, content, headers)


PROVISIONING_RETRY_S = 5  # the Retry-After of a request that arrives while the models load


def error_response(error: APIError) -> Response:
    headers: Headers = ()
    if error.status == 401:
        headers = ((b"www-authenticate", b"Bearer"),)
    elif error.retry_after is not None:
        headers = ((b"retry-after", str(error.retry_after).encode()),)
    return json_response(error.to_dict(), error.status, headers)


class Request:
    """One HTTP request as a route sees it: its path parameter, headers, and a bounded body."""

    def __init__(self, scope: Mapping[str, Any], receive: Receive, param: str, max_body: int):
        self.param = param  # the {job_id} of /status/{job_id} and /cancel/{job_id}
        self._headers: list[tuple[bytes, bytes]] = scope["headers"]  # names lower-case (ASGI)
        self._receive = receive
        self._max_body = max_body

    def header(self, name: bytes) -> bytes:
        return next((value for key, value in self._headers if key == name), b"")

    async def json(self) -> Any:
        """The body as JSON, refusing bodies over the limit before reading them whole."""
        declared = self.header(b"content-length")
        if declared.isdigit() and int(declared) > self._max_body:
            raise _body_too_large(self._max_body)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise errors.invalid_input("the client went away before sending its body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise _body_too_large(self._max_body)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            return orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError:
            raise errors.invalid_input("the request body is not valid JSON") from None


class LocalServer:
    """The ASGI app: a table of routes over the worker, and the ASGI lifespan that starts the
    worker's engines in the server's event loop and stops them (and any unfinished /run job).

    Plain ASGI, not a web framework: every request is one dict lookup and one call. On a 2-core
    machine a framework's layers take as much CPU per request as the worker itself, CPU the model
    then lacks (docs/design.md).
    """

    def __init__(
        self,
        worker: Worker | None,
        settings: ServerSettings | None = None,
        load: Callable[[], Worker] | None = None,
    ) -> None:
        """`worker`, or with `load` a function that builds it: the server then listens at once
        and loads the models in the background (RunPod's load-balancing endpoints), answering
        /ping 204 and every other route 503 model_provisioning until they are ready."""
        assert (worker is None) != (load is None), "a worker, or how to load one"
        self._worker = worker
        self._load = load
        self._load_failed: str | None = None
        self._loading: asyncio.Task[None] | None = None
        self.settings = settings or ServerSettings()
        self.jobs = JobStore(
            ttl_s=self.settings.job_ttl_s,
            max_finished=self.settings.max_finished_jobs,
            max_bytes=self.settings.max_job_result_bytes,
        )
        self._api_key = self.settings.api_key.encode() if self.settings.api_key else None
        # path -> {method: handler}; /status/ and /cancel/ take the job id as the rest of the path.
        self._routes: dict[str, dict[str, Handler]] = {
            "/runsync": {"POST": self.runsync},
            "/run": {"POST": self.run},
            # RunPod's API answers GET; runpod's local API (--rp_serve_api) only POST: take both.
            "/status/": {"GET": self.status, "POST": self.status},
            "/cancel/": {"POST": self.cancel},
            "/health": {"GET": self.health},
            "/ping": {"GET": self.ping},  # RunPod's load balancer: 204 loading, 200 ready
        }
        # Every operation with a route (operations/__init__.py): OpenAI's /v1 routes also under
        # RunPod's proxy path; a route ending in a parameter ("/v1/models/{model}") by its prefix.
        self._prefixed: list[tuple[str, dict[str, Handler]]] = []
        for operation in operations.OPERATIONS:
            if operation.route is None:
                continue
            route, templated, _ = operation.route.partition("{")
            handler = self._route_handler(route, operation.method)
            paths = [route]
            if route.startswith("/v1/"):
                paths = [prefix + route.removeprefix("/v1") for prefix in OPENAI_PREFIXES]
            for path in paths:
                if templated:
                    self._prefixed.append((path, {operation.method: handler}))
                else:
                    self._routes[path] = {operation.method: handler}
        # Answered without the API key, for load balancers and probes.
        self._open = {"/health", "/ping"}

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            if self._load_failed is not None:
                raise errors.unavailable(f"the models did not load: {self._load_failed}")
            raise errors.unavailable(
                "the models are loading; retry shortly",
                code="model_provisioning",
                retry_after=PROVISIONING_RETRY_S,
            )
        return self._worker

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            response = await self._respond(scope, receive)
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(response.body)).encode()),
                *response.headers,
            ]
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            await send({"type": "http.response.body", "body": response.body})
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _respond(self, scope: dict[str, Any], receive: Receive) -> Response:
        path = scope["path"].rstrip("/") or "/"
        method = scope["method"]
        methods, param = self._routes.get(path), ""
        if methods is None:
            head, slash, param = path.partition("/")[2].partition("/")
            methods = self._routes.get(f"/{head}/") if slash and param else None
        if methods is None:
            for prefix, handlers in self._prefixed:
                if path.startswith(prefix) and len(path) > len(prefix):
                    methods, param = handlers, path[len(prefix) :]
                    break
        try:
            if methods is None:
                raise errors.not_found(f"no route {method} {scope['path']}")
            handler = methods.get(method)
            if handler is None:
                error = errors.method_not_allowed(f"{method} is not allowed on {scope['path']}")
                allow = ((b"allow", ", ".join(methods).encode()),)
                return json_response(error.to_dict(), error.status, allow)
            request = Request(scope, receive, param, self.settings.max_body_bytes)
            if self._api_key is not None and path not in self._open:
                self._check_bearer(request.header(b"authorization"))
            return await handler(request)
        except APIError as exc:
            return error_response(exc)
        except Exception as exc:  # a bug: answered as an error object, never a dropped connection
            log.error("%s %s failed: %s", method, scope["path"], redacted_traceback(exc))
            return error_response(errors.internal())

    def _check_bearer(self, authorization: bytes) -> None:
        assert self._api_key is not None
        scheme, _, token = authorization.partition(b" ")
        # compare_digest: the time taken does not tell how much of the key was right.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._api_key):
            raise errors.unauthorized(
                f"missing or wrong API key: send 'Authorization: Bearer <{API_KEY_ENV}>'"
            )

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self._load is not None:
                    self._loading = asyncio.create_task(self._load_in_background(self._load))
                    await send({"type": "lifespan.startup.complete"})
                    continue
                try:
                    await self.worker.start()
                except Exception as exc:  # uvicorn then exits: a worker without engines is no use
                    log.error("the engines did not start: %s", redacted_traceback(exc))
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                running = [job.task for job in self.jobs.unfinished() if job.task is not None]
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)
                if self._loading is not None and not self._loading.done():
                    await asyncio.wait([self._loading])  # a load in a thread cannot be cut short
                if self._worker is not None:
                    await self._worker.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _load_in_background(self, load: Callable[[], Worker]) -> None:
        """Load the models on a thread (the event loop keeps answering /ping), then start them."""
        try:
            worker = await asyncio.to_thread(load)
            await worker.start()
        except (Exception, SystemExit) as exc:  # SystemExit: the start's own message is printed
            self._load_failed = (
                "see the worker's log" if isinstance(exc, SystemExit) else type(exc).__name__
            )
            log.error("the models did not load: %s", redacted_traceback(exc))
            return
        self._worker = worker
        log.info("models loaded: ready")

    # --- RunPod's endpoint routes -------------------------------------------------------------

    async def runsync(self, request: Request) -> Response:
        job_input = _job_input(await request.json())
        job_id = f"sync-{uuid.uuid4()}"
        worker = self.worker  # 503 while the models load
        self.jobs.sync_started()
        status = JobStatus.CANCELLED  # the client went away while the job ran
        try:
            reply = await worker.dispatch(job_input, job_id)
            status = JobStatus.COMPLETED if reply.ok else JobStatus.FAILED
        finally:
            self.jobs.sync_finished(status)
        return json_response(job_answer(job_id, reply))

    async def run(self, request: Request) -> Response:
        job_input = _job_input(await request.json())
        job = self.jobs.add()
        job.task = asyncio.create_task(self._run_job(job, job_input))
        return json_response({"id": job.id, "status": job.status.value})

    async def _run_job(self, job: Job, job_input: Any) -> None:
        job.status = JobStatus.IN_PROGRESS
        try:
            body = job_answer(job.id, await self.worker.dispatch(job_input, job.id))
            answer = orjson.dumps(body)
        except Exception as exc:  # dispatch never raises; this guards the job against being lost
            log.error("job %s: could not record its answer: %s", job.id, redacted_traceback(exc))
            body = job_answer(job.id, Reply(500, errors.internal().to_dict()))
            answer = orjson.dumps(body)
        self.jobs.finish(job, JobStatus(body["status"]), answer)

    async def status(self, request: Request) -> Response:
        return self._status_response(self._known_job(request.param))

    async def cancel(self, request: Request) -> Response:
        job = self._known_job(request.param)
        if not job.finished:
            if job.task is not None:
                job.task.cancel()
            answer = {"id": job.id, "status": JobStatus.CANCELLED.value}
            self.jobs.finish(job, JobStatus.CANCELLED, orjson.dumps(answer))
        return self._status_response(job)

    def _known_job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise errors.not_found("no such job: unknown, or its result has expired")
        return job

    @staticmethod
    def _status_response(job: Job) -> Response:
        if job.answer is not None:
            return Response(200, job.answer)
        return json_response({"id": job.id, "status": job.status.value})

    async def ping(self, request: Request) -> Response:
        """RunPod's load-balancer health check: 204 while the models load, 200 when ready, 503
        once the load failed or an engine stopped answering."""
        if self._worker is None:
            if self._load_failed is not None:
                return json_response({"status": "unhealthy", "reason": self._load_failed}, 503)
            return Response(204, b"")
        if not self._worker.healthy:
            return json_response({"status": "unhealthy"}, 503)
        return json_response({"status": "healthy"}, 200)

    async def health(self, request: Request) -> Response:
        healthy = self.worker.healthy
        body: dict[str, Any] = {
            "status": "ok" if healthy else "unhealthy",
            "jobs": self.jobs.counts(),
        }
        if not healthy:
            body["reason"] = self.worker.registry.health.reason
        return json_response(body, 200 if healthy else 503)

    # --- the operations' routes: the answer body, with its HTTP status -------------------------

    def _route_handler(self, route: str, method: str) -> Handler:
        """`route` is the operation's route, or the part before its parameter, which the request's
        path then holds (`Request.param`)."""

        async def answer(request: Request) -> Response:
            body = None if method == "GET" else await request.json()
            return reply_response(await self.worker.call(route + request.param, body))

        return answer


def create_app(worker: Worker, settings: ServerSettings | None = None) -> LocalServer:
    return LocalServer(worker, settings)


def reply_response(reply: Reply) -> Response:
    headers: Headers = ()
    if reply.retry_after is not None:
        headers = ((b"retry-after", str(reply.retry_after).encode()),)
    return json_response(reply.body, reply.status, headers)


def _body_too_large(limit: int) -> APIError:
    return errors.too_large(f"the request body is over {limit} bytes (SERVER_MAX_BODY_BYTES)")


def _job_input(body: Any) -> Any:
    """RunPod's request shape: {"input": {...}}; the job input is then the worker's business."""
    if not isinstance(body, dict) or "input" not in body:
        raise errors.invalid_input(
            "the request body must be a JSON object with an 'input' field", param="input"
        )
    return body["input"]


def uvicorn_server(app: LocalServer, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server for `app`, logging through the worker's logging set-up."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",  # engines start in the server's loop; a failed start stops the server
        log_config=None,
        # No line per request (the worker logs failures), and no X-Forwarded-* rewriting of the
        # client address nobody reads: both cost CPU on every request.
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=30,
    )
    return uvicorn.Server(config)


def serve(app: LocalServer, host: str, port: int, health_port: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM; the engines stop on the way out. With `health_port` (RunPod's
    PORT_HEALTH) the same routes answer on that port too."""
    key = "required" if app.settings.api_key else "off"
    log.info("serving on http://%s:%d (API key %s)", host, port, key)
    server = uvicorn_server(app, host, port)
    if health_port is None or health_port == port:
        server.run()
        return
    log.info("health checks also on port %d", health_port)
    sockets = []
    for each in (port, health_port):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, each))
        sockets.append(sock)
    server.run(sockets=sockets)
