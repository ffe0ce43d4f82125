"""The local HTTP server: RunPod's endpoint routes and OpenAI routes over the one `Worker` dispatch.

`embedding-worker serve` (or `python handler.py --serve`) runs it with uvicorn. Every route only
reads the request and writes the answer in its wire format: /run, /runsync and /status are RunPod's
transport (a job parsed and answered by transports/runpod.py, in RunPod's job wrapper); the
operations' routes (/v1/..., /openai/v1/..., Cohere's, Infinity's, TEI's) go straight to
`Worker.request` and answer the body with its HTTP status (statuses.py). Nothing here knows what an
embedding is.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

from .. import errors, operations, tracing
from ..dispatch import Worker
from ..env import ConfigError, bool_var, float_var, int_var
from ..errors import APIError
from ..logs import redacted_traceback
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..metrics import exposition_without_worker
from ..reply import Answer
from ..request_context import RequestContext, current_request, request_id, request_id_of
from ..statuses import http_status
from .jobs import Job, JobStatus, JobStore
from .openai_batches import BatchAnswer, BatchAPI, BatchSettings
from .runpod import JobReply, answer_job, job_answer

log = logging.getLogger(__name__)

API_KEY_ENV = "WORKER_API_KEY"
# The server's own variables (docs/configuration.md); they do not apply to RunPod serverless.
SERVER_VARIABLES = (
    API_KEY_ENV,
    "SERVER_JOB_TTL_S",
    "SERVER_MAX_FINISHED_JOBS",
    "SERVER_MAX_JOB_RESULT_BYTES",
    "SERVER_MAX_BODY_BYTES",
    "SERVER_MAX_HEADER_BYTES",
    "SERVER_HEADER_TIMEOUT_S",
    "SERVER_BODY_TIMEOUT_S",
    "SERVER_KEEP_ALIVE_S",
    "SERVER_MAX_CONNECTIONS",
    "SERVER_MAX_QUEUED_JOBS",
    "SERVER_MAX_QUEUED_BYTES",
    "DRAIN_SECONDS",
    "SERVER_DRAIN_TIMEOUT_S",  # DRAIN_SECONDS' former name, still read
    "SERVER_ALLOWED_HOSTS",
    "SERVER_ALLOWED_ORIGINS",
    "METRICS_REQUIRE_KEY",
)


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None  # bearer token all but /health and /ping require; None: no check
    job_ttl_s: float = 1800.0  # RunPod keeps /run results for 30 minutes
    max_finished_jobs: int = 1000
    max_job_result_bytes: int = 512 * 1024 * 1024
    max_body_bytes: int = 20 * 1024 * 1024  # RunPod's /runsync payload limit
    max_header_bytes: int = 16 * 1024  # the request line and headers (h11's and Node's default)
    header_timeout_s: float = 10.0  # from the connection (or a request's first byte) to headers
    body_timeout_s: float = 120.0  # from the headers to the whole body: 20 MiB at 170 KB/s
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this (uvicorn's)
    max_connections: int = 1024  # open connections; a request on one beyond is 503 server_busy
    max_queued_jobs: int = 256  # unfinished /run jobs; beyond, /run answers 429 queue_full
    max_queued_bytes: int = 64 * 1024 * 1024  # request bytes of unfinished /run jobs; beyond, 429
    drain_seconds: float = 30.0  # on SIGTERM, how long the work in flight may still take
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides loopback ones; "*": any
    allowed_origins: tuple[str, ...] = ()  # cross-site Origins served without a key; "*": any
    batches: BatchSettings = field(default_factory=BatchSettings)  # the Batch API's (BATCH_*)
    metrics_require_key: bool = False  # GET /metrics asks for WORKER_API_KEY too

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
            max_header_bytes=int_var(env, "SERVER_MAX_HEADER_BYTES", default.max_header_bytes),
            header_timeout_s=float_var(env, "SERVER_HEADER_TIMEOUT_S", default.header_timeout_s),
            body_timeout_s=float_var(env, "SERVER_BODY_TIMEOUT_S", default.body_timeout_s),
            keep_alive_s=float_var(env, "SERVER_KEEP_ALIVE_S", default.keep_alive_s),
            max_connections=int_var(env, "SERVER_MAX_CONNECTIONS", default.max_connections),
            max_queued_jobs=int_var(env, "SERVER_MAX_QUEUED_JOBS", default.max_queued_jobs),
            max_queued_bytes=int_var(env, "SERVER_MAX_QUEUED_BYTES", default.max_queued_bytes),
            drain_seconds=float_var(
                env,
                "DRAIN_SECONDS",
                float_var(env, "SERVER_DRAIN_TIMEOUT_S", default.drain_seconds),
            ),
            allowed_hosts=_names(env, "SERVER_ALLOWED_HOSTS", _host_entry),
            allowed_origins=_names(env, "SERVER_ALLOWED_ORIGINS", _origin_entry),
            batches=BatchSettings.from_env(env),
            metrics_require_key=bool_var(env, "METRICS_REQUIRE_KEY", default.metrics_require_key),
        )


def _names(env: Mapping[str, str], name: str, check: Callable[[str], str]) -> tuple[str, ...]:
    """A comma-separated list, each entry lower-cased and checked; "*" alone allows any."""
    raw = env.get(name, "").strip()
    if not raw:
        return ()
    entries = tuple(part.strip().lower() for part in raw.split(","))
    if "*" in entries:
        return ("*",)
    for entry in entries:
        if not entry or check(entry) != entry:
            raise ConfigError(f"{name}: {entry!r} is not {check.__doc__}")
    return entries


def _host_entry(entry: str) -> str:
    """a host name or address without scheme or port (example.com, 10.0.0.5, ::1)"""
    if entry.strip("[]") != entry:
        return ""
    try:
        return str(ipaddress.ip_address(entry))
    except ValueError:
        pass
    labels = entry.split(".")
    if entry.isdigit() or any(not label.replace("-", "").isalnum() for label in labels):
        return ""
    return entry


def _origin_entry(entry: str) -> str:
    """an origin: scheme://host[:port] (https://app.example.com, http://localhost:3000)"""
    scheme, sep, rest = entry.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
        return ""
    return entry


Headers = Sequence[tuple[bytes, bytes]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[["Request"], Awaitable["Response"]]


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: Headers = ()
    content_type: bytes = b"application/json"
    stream: AsyncGenerator[bytes, None] | None = None  # the body, sent as it comes (`body` unused)


def json_response(body: Any, status: int = 200, headers: Headers = ()) -> Response:
    try:
        with tracing.phase("serialise"):
            content = orjson.dumps(body)
    except orjson.JSONEncodeError as exc:  # a bug upstream; the client still gets an error object
        log.error("an answer could not be written as JSON: %s", redacted_traceback(exc))
        error = errors.internal()
        content, status, headers = orjson.dumps(error.to_dict()), http_status(error), ()
    return Response(status, content, headers)


PROVISIONING_RETRY_S = 5  # the Retry-After of a request that arrives while the models load


def error_response(error: APIError) -> Response:
    headers: Headers = ()
    status = http_status(error)
    if status == 401:
        headers = ((b"www-authenticate", b"Bearer"),)
    elif error.retry_after is not None:
        headers = ((b"retry-after", str(error.retry_after).encode()),)
    return json_response(error.to_dict(), status, headers)


# Bodies up to this size are parsed on the event loop: a thread hop costs more than parsing them
# (about 0.1 ms of orjson), and small requests are most of the traffic. Larger ones are parsed on a
# thread, so that a 20 MB body of millions of tiny values stalls no other request.
INLINE_JSON_BYTES = 64 * 1024
_parse = orjson.loads  # one name for both paths, so a test can watch where parsing runs


class Request:
    """One HTTP request as a route sees it: its path and path parameter, headers, and a bounded
    body that must arrive within the body deadline."""

    def __init__(
        self,
        scope: Mapping[str, Any],
        receive: Receive,
        path: str,
        param: str,
        server: LocalServer,
    ):
        self.path = path  # without trailing slashes
        self.param = param  # the {job_id} of /status/{job_id} and /cancel/{job_id}
        self.query: bytes = scope.get("query_string", b"")
        self._headers: list[tuple[bytes, bytes]] = scope["headers"]  # names lower-case (ASGI)
        self._receive = receive
        self._settings = server.settings
        self.body_read = False  # the whole body has been received

    def header(self, name: bytes) -> bytes:
        return next((value for key, value in self._headers if key == name), b"")

    @property
    def has_body(self) -> bool:
        """Whether the request declares a body (which may not have been read)."""
        length = self.header(b"content-length")
        return (bool(length) and length != b"0") or bool(self.header(b"transfer-encoding"))

    async def body(self) -> bytes:
        """The raw body, refusing bodies over the limit before reading them whole, and bodies
        that do not arrive within SERVER_BODY_TIMEOUT_S (a client trickling bytes would otherwise
        hold its connection and buffer for ever)."""
        settings = self._settings
        chunks = [c async for c in self.stream(settings.max_body_bytes, settings.body_timeout_s)]
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def json(self) -> Any:
        return await parse_json(await self.body())

    async def stream(
        self,
        limit: int,
        timeout_s: float,
        too_large: Callable[[int], APIError] | None = None,
    ) -> AsyncIterator[bytes]:
        """The body as it arrives (a route that stores it rather than holds it reads it so): at
        most `limit` bytes, refused with `too_large(limit)` (by default SERVER_MAX_BODY_BYTES's
        413), all within `timeout_s` (SERVER_BODY_TIMEOUT_S, or a deadline made from it)."""
        refuse = too_large or _body_too_large
        declared = self.header(b"content-length")
        if declared.isdigit() and int(declared) > limit:
            raise refuse(limit)
        size = 0
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await self._receive()
            except TimeoutError:
                raise errors.request_timeout(
                    f"the request body did not arrive within {timeout_s:g} s "
                    "(SERVER_BODY_TIMEOUT_S)"
                ) from None
            if message["type"] == "http.disconnect":
                raise errors.invalid_input("the client went away before sending its body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise refuse(limit)
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self.body_read = True
                return


async def parse_json(body: bytes) -> Any:
    """`body` as JSON: small bodies inline, large ones on a thread (INLINE_JSON_BYTES)."""
    try:
        if len(body) <= INLINE_JSON_BYTES:
            return _parse(body)
        return await asyncio.to_thread(_parse, body)
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
        runpod_proxy: bool = False,
    ) -> None:
        """`worker`, or with `load` a function that builds it: the server then listens at once
        and loads the models in the background (RunPod's load-balancing endpoints), answering
        /ping 204 and every other route 503 model_provisioning until they are ready.
        `runpod_proxy`: requests come through RunPod's load balancer, which checks the caller's
        RunPod API key (see `_check_origin`)."""
        assert (worker is None) != (load is None), "a worker, or how to load one"
        self._worker = worker
        self._load = load
        self._load_failed: str | None = None
        self._loading: asyncio.Task[None] | None = None
        self.settings = settings or ServerSettings()
        self.batches = BatchAPI(self.settings.batches, self.settings.body_timeout_s)
        self.jobs = JobStore(
            ttl_s=self.settings.job_ttl_s,
            max_finished=self.settings.max_finished_jobs,
            max_bytes=self.settings.max_job_result_bytes,
        )
        self._api_key = self.settings.api_key.encode() if self.settings.api_key else None
        self._runpod_proxy = runpod_proxy
        self._hosts: frozenset[str] | None = None  # Host names served; None: any (listening_on)
        self._origins = frozenset(self.settings.allowed_origins)
        self._draining = False  # set when the server starts shutting down
        self._in_flight = 0  # HTTP requests being answered
        self._owed: set[str] = set()  # /run jobs unfinished when the drain began, until fetched
        self._run_reserved = 0  # bytes of /run bodies admitted and still being parsed
        # path -> {method: handler}; /status/ and /cancel/ take the job id as the rest of the path.
        self._routes: dict[str, dict[str, Handler]] = {
            "/runsync": {"POST": self.runsync},
            "/run": {"POST": self.run},
            # RunPod's API answers GET; runpod's local API (--rp_serve_api) only POST: take both.
            "/status/": {"GET": self.status, "POST": self.status},
            "/cancel/": {"POST": self.cancel},
            "/health": {"GET": self.health},
            "/ping": {"GET": self.ping},  # RunPod's load balancer: 204 loading, 200 ready
            "/metrics": {"GET": self.metrics},  # Prometheus' text format
        }
        # Every operation with a route, by operation name: the path is matched by
        # operations.match_route, which also serves OpenAI's routes under RunPod's proxy path.
        self._operations: dict[str, dict[str, Handler]] = {
            operation.name: {operation.method: self._operation_handler(operation.method)}
            for operation in operations.OPERATIONS
            if operation.route is not None
        }
        # Answered without the API key or the Origin and Host checks, for load balancers and
        # probes, and while the server drains.
        self._open = {"/health", "/ping"}

    def listening_on(self, host: str) -> None:
        """Which Host headers to serve, given the address the server listens on.

        Without an API key, a server on a loopback address serves only loopback names (and
        SERVER_ALLOWED_HOSTS): a web page on a name its attacker controls that re-points the name
        at 127.0.0.1 (DNS rebinding) sends its own name as Host, and is refused. A server on any
        other address (0.0.0.0, a LAN address, RunPod's load balancer, whose Host is the
        endpoint's domain) is reached under names this process cannot know, so it checks Host
        only against SERVER_ALLOWED_HOSTS when that is set; such a server wants WORKER_API_KEY.
        """
        allowed = self.settings.allowed_hosts
        if "*" in allowed or self._api_key is not None:
            self._hosts = None
            return
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            loopback = False
        if not loopback and not allowed:
            self._hosts = None
            return
        self._hosts = frozenset({"localhost", "127.0.0.1", "::1", host.strip("[]"), *allowed})

    def start_draining(self) -> None:
        """The server is shutting down (SIGTERM): /ping and /health answer 503, so a load
        balancer sends nothing more; new requests are refused with 503 shutting_down and
        Retry-After; /status and /cancel still answer, so a /run job's result can be fetched.
        Requests still running when the drain time (DRAIN_SECONDS) is up are answered 503 too
        (not uvicorn's plain-text 500), and /run jobs still unfinished then end FAILED."""
        if not self._draining:
            self._owed = {job.id for job in self.jobs.unfinished()}
            log.info(
                "draining: no new work; up to %g s for the work in flight (DRAIN_SECONDS)",
                self.settings.drain_seconds,
            )
        self._draining = True

    @property
    def drained(self) -> bool:
        """Whether nothing is left to do: no request being answered, and every /run job that was
        unfinished when the drain began has finished and had its answer fetched (or cancelled)."""
        return self._in_flight == 0 and not self._owed

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
            context = RequestContext(request_id_of(scope["headers"]))
            token = current_request.set(context)
            if tracing.enabled():
                tracing.start(context, scope["method"], _header(scope, b"traceparent"))
            self._in_flight += 1
            try:
                response, close = await self._respond(scope, receive)
                context.status = response.status
                if log.isEnabledFor(logging.DEBUG):  # one line a request, with LOG_LEVEL=DEBUG
                    route = context.route or "(no such route)"
                    log.debug("%s %s answered %d", scope["method"], route, response.status)
            finally:
                self._in_flight -= 1
                current_request.reset(token)
                tracing.finish(context)
            headers = [
                (b"content-type", response.content_type),
                (b"x-request-id", context.id.encode()),
                *response.headers,
            ]
            if response.stream is None:
                headers.append((b"content-length", str(len(response.body)).encode()))
            # An unread body's rest would be read as the next request; while draining, a client
            # that keeps its connection would keep sending to a server that is going away.
            if close or self._draining:
                headers.append((b"connection", b"close"))
            body = b"" if scope["method"] == "HEAD" else response.body
            try:
                await send(
                    {"type": "http.response.start", "status": response.status, "headers": headers}
                )
                if response.stream is not None and scope["method"] != "HEAD":
                    async for chunk in response.stream:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": body})
            except asyncio.CancelledError:
                pass  # the client left while its answer was written: nothing more to do
            finally:
                if response.stream is not None:
                    await response.stream.aclose()
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _respond(self, scope: dict[str, Any], receive: Receive) -> tuple[Response, bool]:
        """The answer, and whether to close the connection after it (a body left unread)."""
        path = scope["path"].rstrip("/") or "/"
        method = scope["method"]
        methods, param = self._routes.get(path), ""
        if methods is None:
            matched = operations.match_route(path)
            if matched is not None:
                methods = self._operations[matched[0].name]
        if methods is None:
            methods = self._batch_routes(path)
        if methods is None:
            head, slash, param = path.partition("/")[2].partition("/")
            methods = self._routes.get(f"/{head}/") if slash and param else None
        context = current_request.get()
        if context is not None and methods is not None:  # a path the server knows, never any text
            context.route = f"/{head}/" if param else path
        request = Request(scope, receive, path, param, self)
        try:
            response = await self._answer(request, path, method, methods)
        except APIError as exc:
            response = error_response(exc)
        except asyncio.CancelledError:
            # uvicorn cancels a request when its client disconnects (serving.py), and when the
            # drain time is up: the first has nobody to answer, the second gets a JSON 503.
            response = error_response(_shutting_down())
        except Exception as exc:  # a bug: answered as an error object, never a dropped connection
            log.error("%s %s failed: %s", method, scope["path"], redacted_traceback(exc))
            response = error_response(errors.internal())
        return response, not request.body_read and request.has_body

    async def _answer(
        self, request: Request, path: str, method: str, methods: dict[str, Handler] | None
    ) -> Response:
        if methods is None:
            raise errors.not_found(f"no route {method} {path}")
        handler = methods.get(method)
        if handler is None and method == "HEAD":
            handler = methods.get("GET")  # the same answer, without its body (__call__)
        if handler is None:
            error = errors.method_not_allowed(f"{method} is not allowed on {path}")
            allowed = [*methods, "HEAD"] if "GET" in methods else list(methods)
            return json_response(
                error.to_dict(), http_status(error), ((b"allow", ", ".join(allowed).encode()),)
            )
        if path not in self._open:
            if self._draining and not request.param:  # /status/{id}, /cancel/{id} still answer
                raise _shutting_down()
            if self._api_key is not None and (
                path != "/metrics" or self.settings.metrics_require_key
            ):
                self._check_bearer(request.header(b"authorization"))
            else:
                self._check_origin(request)
        return await handler(request)

    def _check_origin(self, request: Request) -> None:
        """Without an API key, refuse what a web page could send: a request whose Host is not
        one this server answers to (DNS rebinding, see `listening_on`), and a cross-site request
        (an `Origin` other than the server's own), such as a form's `text/plain` POST, which a
        browser sends without asking first. With an API key the key is the protection: a page
        cannot attach it cross-site without a CORS preflight, which this server never approves.
        Behind RunPod's load balancer the caller's RunPod API key is, so Origin is checked only
        against SERVER_ALLOWED_ORIGINS when that is set."""
        host = request.header(b"host")
        if self._hosts is not None and host and _host_name(host) not in self._hosts:
            if not _host_name(host).endswith(".localhost"):  # RFC 6761: always loopback
                raise errors.forbidden(
                    "this server does not answer to that Host name; add it to "
                    "SERVER_ALLOWED_HOSTS, or set WORKER_API_KEY"
                )
        origin = request.header(b"origin")
        if not origin or "*" in self._origins or (self._runpod_proxy and not self._origins):
            return
        text = origin.decode("latin-1").lower()
        if text in self._origins:
            return
        if text.partition("://")[2] != host.decode("latin-1").lower():
            raise errors.forbidden(
                "cross-site requests are refused without an API key; add the origin to "
                "SERVER_ALLOWED_ORIGINS, or set WORKER_API_KEY"
            )

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
                self.batches.start(lambda: self._worker)
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
                self._fail_unfinished_jobs()
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)
                await self.batches.stop()
                if self._loading is not None and not self._loading.done():
                    await asyncio.wait([self._loading])  # a load in a thread cannot be cut short
                if self._worker is not None:
                    await self._worker.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _fail_unfinished_jobs(self) -> None:
        """/run jobs still unfinished when the server stops end FAILED with 503 shutting_down,
        a status a client polling /status can act on (resubmit), rather than IN_PROGRESS."""
        for job in self.jobs.unfinished():
            failed = orjson.dumps(job_answer(job.id, _shutting_down_reply()))
            self.jobs.finish(job, JobStatus.FAILED, failed)
            log.warning("job %s: not finished within the drain time; failed", job.id)

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
        job_id = request_id() or f"sync-{uuid.uuid4()}"
        worker = self.worker  # 503 while the models load
        self.jobs.sync_started()
        status = JobStatus.CANCELLED  # the client went away while the job ran
        try:
            reply = await answer_job(worker, job_input, job_id)
            status = JobStatus.COMPLETED if reply.ok else JobStatus.FAILED
        finally:
            self.jobs.sync_finished(status)
        return json_response(job_answer(job_id, reply))

    async def run(self, request: Request) -> Response:
        """Queue a job, bounded by the unfinished jobs' count and request bytes: a job's bytes
        are known before any parsing, hold its memory until it finishes (the parsed input is
        several times larger), and measure every kind of input alike, texts, images, documents
        (the engine then bounds the work it takes in by tokens). A queue holding nothing admits
        any one request, so a request within SERVER_MAX_BODY_BYTES is never refused for ever."""
        body = await request.body()
        cost = len(body)
        queued = self.jobs.queued_bytes + self._run_reserved
        settings = self.settings
        if self.jobs.unfinished_count >= settings.max_queued_jobs or (
            queued and queued + cost > settings.max_queued_bytes
        ):
            raise errors.overloaded(
                f"{self.jobs.unfinished_count} /run jobs of {queued} bytes are queued "
                "(SERVER_MAX_QUEUED_JOBS, SERVER_MAX_QUEUED_BYTES); retry later"
            )
        self._run_reserved += cost  # admitted: counted while it is parsed on a thread
        try:
            job_input = _job_input(await parse_json(body))
        finally:
            self._run_reserved -= cost
        job = self.jobs.add(cost)
        submitted = current_request.get()  # read now: the request's span ends with its answer
        trace = submitted.trace if submitted is not None else None
        job.task = asyncio.create_task(
            self._run_job(job, job_input, submitted.id if submitted else job.id, trace)
        )
        return json_response({"id": job.id, "status": job.status.value})

    async def _run_job(
        self, job: Job, job_input: Any, submitter_id: str, submitted: tracing.Trace | None
    ) -> None:
        """Run a /run job in its own request context (its task's), under the id of the request
        that submitted it, and traced as a child of that request's span (`submitted`)."""
        context = RequestContext(submitter_id, route="/run")
        current_request.set(context)
        tracing.start(context, "job", parent=submitted)
        job.status = JobStatus.IN_PROGRESS
        try:
            body = job_answer(job.id, await answer_job(self.worker, job_input, job.id))
            answer = orjson.dumps(body)
        except Exception as exc:  # dispatch never raises; this guards the job against being lost
            log.error("job %s: could not record its answer: %s", job.id, redacted_traceback(exc))
            failed = Answer(error=errors.internal())
            body = job_answer(job.id, JobReply.of_answer(failed, False, healthy=True))
            answer = orjson.dumps(body)
        finally:
            tracing.finish(context)
        self.jobs.finish(job, JobStatus(body["status"]), answer)

    async def status(self, request: Request) -> Response:
        job = self._known_job(request.param)
        if job.finished:
            self._owed.discard(job.id)
        return self._status_response(job)

    async def cancel(self, request: Request) -> Response:
        job = self._known_job(request.param)
        if not job.finished:
            if job.task is not None:
                job.task.cancel()
            answer = {"id": job.id, "status": JobStatus.CANCELLED.value}
            self.jobs.finish(job, JobStatus.CANCELLED, orjson.dumps(answer))
        self._owed.discard(job.id)
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
        once the load failed or an engine stopped answering, and while the server drains."""
        if self._draining:
            return self._draining_response()
        if self._worker is None:
            if self._load_failed is not None:
                return json_response({"status": "unhealthy", "reason": self._load_failed}, 503)
            return Response(204, b"")
        if not self._worker.healthy:
            return json_response({"status": "unhealthy"}, 503)
        return json_response({"status": "healthy"}, 200)

    async def metrics(self, request: Request) -> Response:
        """The worker's metrics (metrics.py) in Prometheus' text format; without the API key
        unless METRICS_REQUIRE_KEY. While the models load, the process's own figures alone."""
        worker = self._worker
        if worker is None:
            text = exposition_without_worker()
        elif worker.metrics is None:
            raise errors.not_found("metrics are off (METRICS=false)")
        else:
            health = worker.registry.health
            healthy = {
                model.served_id: not health.dead and not model.admission.stalled()
                for model in worker.registry.models
            }
            text = worker.metrics.exposition(healthy)
        return Response(200, text, content_type=METRICS_CONTENT_TYPE.encode())

    async def health(self, request: Request) -> Response:
        if self._draining:
            return self._draining_response()
        healthy = self.worker.healthy
        body: dict[str, Any] = {
            "status": "ok" if healthy else "unhealthy",
            "jobs": self.jobs.counts(),
        }
        if not healthy:
            body["reason"] = self.worker.registry.health.reason
        return json_response(body, 200 if healthy else 503)

    def _draining_response(self) -> Response:
        body = {"status": "draining", "jobs": self.jobs.counts()}
        return json_response(body, 503, ((b"retry-after", str(DRAIN_RETRY_S).encode()),))

    # --- the operations' routes: the answer body, with its HTTP status -------------------------

    def _batch_routes(self, path: str) -> dict[str, Handler] | None:
        """The Batch API's routes (/v1/files, /v1/batches): transports/openai_batches."""
        handlers = self.batches.routes(path)
        if handlers is None:
            return None

        async def respond(
            handler: Callable[..., Awaitable[BatchAnswer]], request: Request
        ) -> Response:
            answer = await handler(request)
            if answer.download is None:
                return json_response(answer.body, answer.status)
            length = ((b"content-length", str(answer.download.size).encode()),)
            return Response(200, b"", length, b"application/octet-stream", answer.download.chunks)

        return {method: partial(respond, handler) for method, handler in handlers.items()}

    def _operation_handler(self, method: str) -> Handler:
        """An operation's route: the request's path names the operation and its parameters;
        dispatch answers it directly, no RunPod job on the way."""

        async def answer(request: Request) -> Response:
            body = None if method == "GET" else await request.json()
            return answer_response(await self.worker.request(request.path, body))

        return answer


def create_app(worker: Worker, settings: ServerSettings | None = None) -> LocalServer:
    return LocalServer(worker, settings)


def answer_response(answer: Answer) -> Response:
    """An operation's answer: its body, or its error with the error's HTTP status."""
    if answer.error is not None:
        return error_response(answer.error)
    return json_response(answer.body)


def _shutting_down() -> APIError:
    return errors.unavailable(
        "the server is shutting down; retry", code="shutting_down", retry_after=DRAIN_RETRY_S
    )


def _shutting_down_reply() -> JobReply:
    return JobReply.of_answer(Answer(error=_shutting_down()), False, healthy=True)


DRAIN_RETRY_S = 1  # another worker, or this one restarted, may answer at once


def _header(scope: Mapping[str, Any], name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


def _host_name(host: bytes) -> str:
    """The name of a Host header: "Name.:8000" -> "name", "[::1]:8000" -> "::1"."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")]
    return (text.rpartition(":")[0] if ":" in text else text).rstrip(".")


def _body_too_large(limit: int) -> APIError:
    return errors.too_large(f"the request body is over {limit} bytes (SERVER_MAX_BODY_BYTES)")


def _job_input(body: Any) -> Any:
    """RunPod's request shape: {"input": {...}}; the job input is then the worker's business."""
    if not isinstance(body, dict) or "input" not in body:
        raise errors.invalid_input(
            "the request body must be a JSON object with an 'input' field", param="input"
        )
    return body["input"]
