"""One dispatch for every transport: an operation and its request in, an `Answer` out.

The local HTTP server and batch lines call `Worker.request()` with a route; RunPod's transport
parses a job into its operation (transports/runpod.py) and calls `Worker.serve()`. Each transport
only writes the Answer in its own wire format. Operations are found in the registry
(operations/__init__.py). No exception escapes `serve()`, and `finished()` sees every request.

A body larger than a small constant (`limits.is_small`) is checked in a thread, and its operation
parses and tokenizes it in a thread too: the event loop, which answers /health and every other
request, never does work that grows with the payload.
"""

from __future__ import annotations

import asyncio
import time
from contextvars import Token
from dataclasses import dataclass
from typing import Any

from . import errors, operations, tracing
from .config import WorkerConfig
from .engines import ModelRegistry
from .errors import APIError, ErrorKind
from .limits import inspect_request, is_small
from .logs import current_job, get_logger, redacted_traceback
from .metrics import Metrics, RequestRecord, current_record
from .operations import Operation
from .reply import Answer
from .request_context import RequestContext, current_request, new_request_id
from .statuses import http_status
from .tiers import REQUEST_VALUES, current_tier

log = get_logger(__name__)


class Worker:
    """The served models, the limits, and the routing of requests to operations."""

    line_routes = operations.LINE_ROUTES

    def __init__(self, config: WorkerConfig, registry: ModelRegistry) -> None:
        self.config = config
        self.registry = registry
        self.limits = config.limits
        # The request and batch figures (GET /metrics, `stats` in /v1/models); None: METRICS off.
        self.metrics: Metrics | None = None
        if config.metrics:
            self.metrics = Metrics(registry.ids, [route_label(op) for op in operations.OPERATIONS])
            for model in registry.models:
                model.metrics = self.metrics.models[model.served_id]
                self.metrics.model_loaded(model.served_id, model.load_seconds)

    @classmethod
    def from_config(cls, config: WorkerConfig) -> Worker:
        return cls(config, ModelRegistry.load(config.models, config.engine_settings))

    @property
    def healthy(self) -> bool:
        return self.registry.health.healthy

    async def start(self) -> None:
        await self.registry.start()

    async def stop(self) -> None:
        await self.registry.stop()

    async def serve(
        self,
        operation: Operation,
        body: Any,
        named_tier: Any = None,
        job_id: str | None = None,
    ) -> Answer:
        """Answer one request for `operation`. Never raises: a failure is the answer's error.

        `named_tier`: the service_tier the request's envelope names (a RunPod job input's), used
        when the body names none. `job_id` names the request in log lines; without one, the lines
        keep the current job's name. The answer is counted in the metrics (metrics.py), with
        what the engines noted of it in the request's record.
        """
        started = time.perf_counter()
        job = current_job.set(str(job_id)) if job_id is not None else None
        outer = current_request.get()
        context, request_token = _request_context(job_id)
        traced_here = request_token is not None and tracing.enabled()
        if traced_here:  # a RunPod job, or a batch line (a child of its job's span)
            tracing.start(context, "job", parent=outer.trace if outer is not None else None)
        context.route = context.route or route_label(operation)
        tier_token = None
        record = None
        if self.metrics is not None:
            record = RequestRecord(started, route_label(operation))
        record_token = current_record.set(record)
        body = merge_extra_body(body)
        if isinstance(body, dict):
            model = body.get("model")
            context.model = model if isinstance(model, str) else None
        try:
            if is_small(body):
                inspect_request(body, self.limits)
            else:
                await asyncio.to_thread(inspect_request, body, self.limits)
            tier = self._tier(body, named_tier)
            tier_token = current_tier.set(tier)
            context.tier = tier
            if record is not None:
                record.tier = tier
            await self.registry.start()
            result = await operation.run(self, body)
            if operation.scheduled and isinstance(result, dict):
                result["service_tier"] = tier  # the tier the work ran at
            answer = Answer(result)
            context.status = 200
            if context.trace is not None:
                context.inputs, context.tokens = _inputs_and_tokens(body, result)
        except APIError as exc:
            context.status, context.code = http_status(exc), exc.code
            # Messages never hold the payload (errors.py), so they are safe to log.
            if exc.kind in _SERVER_KINDS:
                log.warning("%s %s: %s", exc.kind.value, exc.code, exc.message)
            else:
                log.debug("%s %s (param %s)", exc.kind.value, exc.code, exc.param)
            answer = Answer(error=exc)
        except Exception as exc:
            context.status, context.code = 500, "internal_error"
            log.error("unexpected error: %s", redacted_traceback(exc))
            answer = Answer(error=errors.internal())
        finally:
            current_record.reset(record_token)
            if tier_token is not None:
                current_tier.reset(tier_token)
            if traced_here:
                tracing.finish(context)
            if request_token is not None:
                current_request.reset(request_token)
            if job is not None:
                current_job.reset(job)
        self.finished(Served(route_label(operation), body, answer, started))
        if record is not None and self.metrics is not None:
            error = answer.error
            status, code = (200, None) if error is None else (http_status(error), error.code)
            self.metrics.finish(record, status, code)
        return answer

    def finished(self, served: Served) -> None:
        """Called once for every request `serve` answered, with its route, model, outcome and
        timing: the one place a request is known whole, for metrics and tracing to hook."""

    def _tier(self, body: Any, named_tier: Any) -> str:
        """The request's service_tier (the body's, else its envelope's), else the tier of the job
        it runs in, else the worker's (SERVICE_TIER); `auto` is the worker's."""
        named = body.get("service_tier") if isinstance(body, dict) else None
        if named is None:
            named = named_tier
        if named is None:
            return current_tier.get() or self.config.service_tier
        if named not in REQUEST_VALUES:
            raise errors.invalid_input(
                f"'service_tier' must be one of {', '.join(REQUEST_VALUES)}", param="service_tier"
            )
        return self.config.service_tier if named == "auto" else named

    async def request(self, route: str, body: Any, line: str | None = None) -> Answer:
        """Answer a request to a route or HTTP path ("/v1/embeddings", "/openai/v1/models/x"):
        the local server's operation routes and batch lines. `body` None: a request
        without one (GET). `line` names a batch line: its log lines read `job <job>/<line>`."""
        job_id = None
        if line is not None:
            parent = current_job.get()
            job_id = f"{parent}/{line}" if parent else line
        matched = operations.match_route(route)
        if matched is None:
            return Answer(error=unknown_route())
        operation, params = matched
        return await self.serve(operation, route_body(body, params), job_id=job_id)


# Failures of the worker rather than of the request: logged as warnings.
_SERVER_KINDS = frozenset({ErrorKind.INTERNAL, ErrorKind.UNAVAILABLE})


def route_label(operation: Operation) -> str:
    """How a request is named in metrics and traces: its operation's route (a template:
    "/v1/models/{model}"), else the operation's name."""
    return operation.route or operation.name


def unknown_route() -> APIError:
    return errors.not_found(f"unknown route; this worker serves {', '.join(operations.ROUTES)}")


@dataclass(frozen=True, slots=True)
class Served:
    """One answered request, as `Worker.finished` sees it."""

    # Its operation's route (a template: "/v1/models/{model}"), else the operation's name: one
    # label an operation, whichever transport or path it came by.
    route: str
    body: Any  # the request body (read `model` from it; never log it)
    answer: Answer
    started: float  # time.perf_counter() when it arrived

    @property
    def model(self) -> str | None:
        """The model the request named, if it named one."""
        model = self.body.get("model") if isinstance(self.body, dict) else None
        return model if isinstance(model, str) else None

    @property
    def outcome(self) -> str:
        """ "ok", or the error's code."""
        return "ok" if self.answer.error is None else self.answer.error.code


def _request_context(job_id: str | None) -> tuple[RequestContext, Token | None]:
    """The context this request is answered under: the transport's (the local server's HTTP
    request), else a new one named by the job (a RunPod job, a batch line: each line its own),
    and the token that restores the outer one."""
    outer = current_request.get()
    if outer is not None and not outer.dispatched:
        outer.dispatched = True
        return outer, None
    context = RequestContext(str(job_id) if job_id is not None else new_request_id())
    context.dispatched = True
    return context, current_request.set(context)


def _inputs_and_tokens(body: Any, result: Any) -> tuple[int | None, int | None]:
    """What a trace says of a request's size: its inputs (or documents) and the tokens it was
    billed."""
    inputs = None
    if isinstance(body, dict):
        items = body.get("input", body.get("documents", body.get("texts")))
        inputs = len(items) if isinstance(items, list) else (1 if items is not None else None)
    usage = result.get("usage") if isinstance(result, dict) else None
    tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
    return inputs, tokens if isinstance(tokens, int) else None


def route_body(body: Any, params: dict[str, str]) -> Any:
    """The request body of a route: `body` (None: a request without one, as GET /v1/models) with
    the path's parameters, which win over the body's."""
    if body is None:
        body = {}
    if params and isinstance(body, dict):
        body = {**merge_extra_body(body), **params}
    return body


def merge_extra_body(body: Any) -> Any:
    """Accept a literal nested "extra_body" object (hand-written JSON copied from SDK examples).

    The openai SDK itself merges extra_body into the top level; keys at the top level win.
    """
    if isinstance(body, dict) and isinstance(body.get("extra_body"), dict):
        merged = dict(body["extra_body"])
        merged.update({k: v for k, v in body.items() if k != "extra_body"})
        return merged
    return body
