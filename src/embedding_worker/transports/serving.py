"""uvicorn under the local server: the bounds its HTTP protocol lacks, the drain, and `serve`.

This is the one module that reaches into uvicorn's internals: a subclass of its httptools protocol
(`HttpToolsProtocol`: its `cycle`, `connections`, `app` and `transport`) and of its `Server`
(`handle_exit`, `on_tick`, `shutdown`, `_captured_signals`), checked against the pinned uvicorn
by tests/test_server_limits.py. The ASGI app itself (transports/http.py) knows nothing of them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from http import HTTPStatus
from types import FrameType
from typing import Any, ClassVar

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .. import errors
from ..errors import APIError
from ..request_context import request_id_of
from ..statuses import http_status
from .http import LocalServer, Receive, Send, ServerSettings

log = logging.getLogger(__name__)


class BoundedProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools) with the bounds it lacks, in one place.

    - Headers: the request line and headers must arrive within SERVER_HEADER_TIMEOUT_S of the
      connection (or, on a kept-alive one, of the request's first byte) and within
      SERVER_MAX_HEADER_BYTES; otherwise 408 or 431 and the connection closes. uvicorn has no
      header deadline and httptools no size limit: a slowloris client held a connection for
      ever, 100 MB of unterminated headers cost 130 MB. (The body has its deadline in
      `Request.body`, which answers it with 408 in JSON.)
    - Connections: a request on a connection beyond SERVER_MAX_CONNECTIONS is answered 503
      server_busy in JSON with Retry-After (uvicorn's own limit answers in plain text).
    - A client that disconnects while its request runs has its request cancelled: the work it
      asked for that has not reached the model is dropped. uvicorn only marks the request
      disconnected; cancelling here costs nothing per request, where an ASGI app watching
      `receive()` needs a task of its own for every request.
    """

    settings: ClassVar[ServerSettings]  # set on a subclass for each server (uvicorn_server)
    _header_timer: asyncio.TimerHandle | None = None
    _in_headers = True  # the bytes arriving belong to a request's line and headers
    _header_bytes = 0  # bytes received since the current request's headers began
    _task: asyncio.Task[None] | None = None  # the request running on this connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        cycle = self.cycle
        if self._task is not None and cycle is not None and not cycle.response_complete:
            self._task.cancel()
        self._task = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_headers:
            super().data_received(data)
            return
        self._header_bytes += len(data)
        super().data_received(data)
        # Checked after parsing, so a chunk that completes the headers and carries a body is
        # not counted against them: httptools holds at most one read (256 KB) beyond the limit.
        if self._in_headers and self._header_bytes > self.settings.max_header_bytes:
            self._refuse(
                errors.headers_too_large(
                    f"the request line and headers are over {self.settings.max_header_bytes} "
                    "bytes (SERVER_MAX_HEADER_BYTES)"
                )
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # a later request on a kept-alive connection
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        self._in_headers = False
        self._header_bytes = 0
        if len(self.connections) <= self.settings.max_connections:
            super().on_headers_complete()
            return
        app, self.app = self.app, _server_busy  # the request's task runs `self.app`
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_headers = True  # what arrives next is the next request

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # uvicorn's, keeping the task to cancel when the client leaves (reset_contextvars, which
        # runs the task in a fresh context, is off in uvicorn_server's Config).
        task = self.loop.create_task(cycle.run_asgi(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)
        self._task = task

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(
            self.settings.header_timeout_s, self._headers_too_slow
        )

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self._header_bytes:  # nothing sent: an idle connection is closed without a word
            self.transport.close()
            return
        self._refuse(
            errors.request_timeout(
                f"the request headers did not arrive within {self.settings.header_timeout_s:g} s "
                "(SERVER_HEADER_TIMEOUT_S)"
            )
        )

    def _refuse(self, error: APIError) -> None:
        """Answer `error` before any request was made of the headers, and close."""
        self._stop_header_timer()
        if not self.transport.is_closing():
            self.transport.write(_raw_response(error))
            self.transport.close()


def _raw_response(error: APIError) -> bytes:
    """A whole HTTP response for `error`, written by the protocol itself, closing the connection."""
    body = orjson.dumps(error.to_dict())
    head = [
        f"HTTP/1.1 {http_status(error)} {HTTPStatus(http_status(error)).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if error.retry_after is not None:
        head.append(f"retry-after: {error.retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _server_busy(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The answer to a request on a connection beyond SERVER_MAX_CONNECTIONS."""
    error = errors.unavailable(
        "the server has too many connections open (SERVER_MAX_CONNECTIONS); retry",
        code="server_busy",
        retry_after=1,
    )
    body = orjson.dumps(error.to_dict())
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id_of(scope["headers"]).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain before its shutdown.

    On SIGTERM (or SIGINT) uvicorn would close its listening sockets at once: a load balancer
    still sending there gets connections refused, and the /run jobs in flight are cut off. Here
    the first signal starts the app's drain instead (`LocalServer.start_draining`): the server
    keeps listening and answers /ping 503 and new work 503 with Retry-After, while the requests
    and /run jobs in flight finish. Once none is left, or DRAIN_SECONDS after the signal,
    uvicorn's own shutdown runs, with what is left of the drain time for requests still running
    (then cancelled, and answered 503). A second signal ends the drain at once.
    """

    drain_started: float | None = None  # monotonic time of the first signal
    _hurry = False  # a second signal: what is still running is cut short

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.app
        if self.drain_started is None and not self.should_exit and isinstance(app, LocalServer):
            self._captured_signals.append(sig)  # uvicorn raises it again on its way out
            self.drain_started = time.monotonic()
            app.start_draining()
            return
        self._hurry = self.drain_started is not None
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        app = self.config.app
        if self.drain_started is not None and isinstance(app, LocalServer) and not self.should_exit:
            if app.drained or time.monotonic() >= self.drain_started + app.settings.drain_seconds:
                self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        if isinstance(app, LocalServer):
            app.start_draining()
            left = app.settings.drain_seconds
            if self.drain_started is not None:
                left += self.drain_started - time.monotonic()
            # uvicorn waits for ever on a timeout of 0: a drain that is over cancels at once.
            self.config.timeout_graceful_shutdown = 0.001 if self._hurry else max(left, 0.001)  # type: ignore[assignment]
        await super().shutdown(sockets)


def uvicorn_server(app: LocalServer, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server for `app` on `host`, with the server's bounds (`BoundedProtocol`),
    logging through the worker's logging set-up."""
    app.listening_on(host)
    settings = app.settings
    protocol = type("ServerProtocol", (BoundedProtocol,), {"settings": settings})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        lifespan="on",  # engines start in the server's loop; a failed start stops the server
        log_config=None,
        # No line per request (the worker logs failures), and no X-Forwarded-* rewriting of the
        # client address nobody reads: both cost CPU on every request.
        access_log=False,
        proxy_headers=False,
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # a float works
        timeout_graceful_shutdown=settings.drain_seconds,  # type: ignore[arg-type]
    )
    return DrainingServer(config)


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
