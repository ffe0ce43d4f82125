"""One dispatch for every transport: a job's input in, a `Reply` out.

The RunPod handler, the local HTTP server and batch files all call `Worker.dispatch()` (or
`Worker.call()` for an OpenAI route); each only turns the Reply into its own wire format. The
operation is found in the registry (operations/__init__.py). No exception escapes `dispatch()`.

A body larger than a small constant (`limits.is_small`) is checked in a thread, and its operation
parses and tokenizes it in a thread too: the event loop, which answers /health and every other
request, never does work that grows with the payload.
"""

from __future__ import annotations

import asyncio
from contextvars import Token
from typing import Any

from . import errors, operations, tracing
from .config import WorkerConfig
from .engines import ModelRegistry
from .errors import APIError
from .limits import inspect_request, is_small
from .logs import current_job, get_logger, redacted_traceback
from .operations import Operation
from .reply import Reply
from .request_context import RequestContext, current_request, new_request_id
from .tiers import REQUEST_VALUES, current_tier

log = get_logger(__name__)


class Worker:
    """The served models, the limits, and the routing of requests to operations."""

    line_routes = operations.LINE_ROUTES

    def __init__(self, config: WorkerConfig, registry: ModelRegistry) -> None:
        self.config = config
        self.registry = registry
        self.limits = config.limits

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

    async def dispatch(self, job_input: Any, job_id: str | None = None) -> Reply:
        """Answer one job input, in either flavour. Never raises.

        `job_id` names the job in log lines; without one, the lines keep the current job's name.
        """
        openai_route = isinstance(job_input, dict) and "openai_route" in job_input
        job = current_job.set(str(job_id)) if job_id is not None else None
        outer = current_request.get()
        context, request_token = _request_context(job_id)
        traced_here = request_token is not None and tracing.enabled()
        if traced_here:  # a RunPod job, or a batch line (a child of its job's span)
            tracing.start(context, "job", parent=outer.trace if outer is not None else None)
        tier_token = None
        try:
            operation, body = self._route(job_input)
            context.route = context.route or operation.name
            if isinstance(body, dict):
                model = body.get("model")
                context.model = model if isinstance(model, str) else None
            if is_small(body):
                inspect_request(body, self.limits)
            else:
                await asyncio.to_thread(inspect_request, body, self.limits)
            tier = self._tier(job_input, body)
            tier_token = current_tier.set(tier)
            context.tier = tier
            await self.registry.start()
            result = await operation.run(self, body)
            if operation.scheduled and isinstance(result, dict):
                result["service_tier"] = tier  # the tier the work ran at
            context.status = 200
            if context.trace is not None:
                context.inputs, context.tokens = _inputs_and_tokens(body, result)
            return Reply(200, result, openai_route)
        except APIError as exc:
            context.status, context.code = exc.status, exc.code
            # Messages never hold the payload (errors.py), so they are safe to log.
            if exc.status >= 500:
                log.warning("%s %s: %s", exc.status, exc.code, exc.message)
            else:
                log.debug("%s %s (param %s)", exc.status, exc.code, exc.param)
            return self._error_reply(exc, openai_route)
        except Exception as exc:
            context.status, context.code = 500, "internal_error"
            log.error("unexpected error: %s", redacted_traceback(exc))
            return self._error_reply(errors.internal(), openai_route)
        finally:
            if tier_token is not None:
                current_tier.reset(tier_token)
            if traced_here:
                tracing.finish(context)
            if request_token is not None:
                current_request.reset(request_token)
            if job is not None:
                current_job.reset(job)

    def _tier(self, job_input: Any, body: Any) -> str:
        """The request's service_tier (the body's, else the job input's), else the tier of the
        job it runs in, else the worker's (SERVICE_TIER); `auto` is the worker's."""
        named = body.get("service_tier") if isinstance(body, dict) else None
        if named is None and isinstance(job_input, dict):
            named = job_input.get("service_tier")
        if named is None:
            return current_tier.get() or self.config.service_tier
        if named not in REQUEST_VALUES:
            raise errors.invalid_input(
                f"'service_tier' must be one of {', '.join(REQUEST_VALUES)}", param="service_tier"
            )
        return self.config.service_tier if named == "auto" else named

    async def call(self, route: str, body: Any, line: str | None = None) -> Reply:
        """Answer an OpenAI-route request (local server, batch lines). `line` names a batch line:
        its log lines read `job <job>/<line>`."""
        job_id = None
        if line is not None:
            parent = current_job.get()
            job_id = f"{parent}/{line}" if parent else line
        return await self.dispatch({"openai_route": route, "openai_input": body}, job_id)

    def _error_reply(self, exc: APIError, openai_route: bool) -> Reply:
        return Reply(
            exc.status,
            exc.to_dict(),
            openai_route,
            refresh_worker=not self.healthy,
            retry_after=exc.retry_after,
        )

    def _route(self, job_input: Any) -> tuple[Operation, Any]:
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
            body = job_input.get("openai_input")
            if body is None:
                body = {}  # GET /v1/models arrives with no body
            body = _merge_extra_body(body)
            if params and isinstance(body, dict):
                body = {**body, **params}  # the path's parameters win over the body's
            return operation, body
        recognised = operations.recognise(job_input, self.registry)
        if recognised is None:
            raise errors.invalid_input(
                f"the job input must hold {operations.job_hints()} or 'openai_route'"
            )
        return recognised, _merge_extra_body(job_input)


def _request_context(job_id: str | None) -> tuple[RequestContext, Token | None]:
    """The context this dispatch answers under: the transport's (the local server's request),
    else a new one named by the job (a RunPod job, a batch line: each line its own), and the
    token that restores the outer one."""
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


def _merge_extra_body(body: Any) -> Any:
    """Accept a literal nested "extra_body" object (hand-written JSON copied from SDK examples).

    The openai SDK itself merges extra_body into the top level; keys at the top level win.
    """
    if isinstance(body, dict) and isinstance(body.get("extra_body"), dict):
        merged = dict(body["extra_body"])
        merged.update({k: v for k, v in body.items() if k != "extra_body"})
        return merged
    return body
