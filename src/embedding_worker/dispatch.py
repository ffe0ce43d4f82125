"""One dispatch for every transport: a job's input in, a `Reply` out.

The RunPod handler, the local HTTP server and the batch CLI all call `Worker.dispatch()`; each only
turns the Reply into its own wire format. No exception escapes `dispatch()`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from . import batch, errors, operations
from .config import WorkerConfig
from .engines import ModelRegistry
from .errors import APIError
from .limits import Limits, inspect_request
from .logs import current_job, get_logger, redacted_traceback
from .protocol import EmbeddingRequest, RerankRequest, parse

log = get_logger(__name__)

ROUTES = ("/v1/models", "/v1/embeddings", "/v1/rerank")


class JobOutput(dict):
    """A successful job's output, as runpod receives it: a plain dict with a short repr.

    runpod formats every job's output into two DEBUG f-strings even when DEBUG is off
    (rp_job.run_job): for an answer of thousands of floats that repr costs as much as writing the
    answer itself (0.12 s each for 256 x 1024). JSON encoders see an ordinary dict.
    """

    def __repr__(self) -> str:
        items = self.get("data", self.get("results"))
        count = f"{len(items)} items, " if isinstance(items, list) else ""
        return f"<{self.get('object', 'answer')}: {count}model {self.get('model')}>"


@dataclass(frozen=True)
class Reply:
    """What an operation answered: an HTTP status and a body (the OpenAI body, or an error body)."""

    status: int
    body: dict[str, Any]
    openai_route: bool = False  # asked through RunPod's OpenAI proxy
    refresh_worker: bool = False  # the worker is broken: ask RunPod for a new one

    @property
    def ok(self) -> bool:
        return self.status < 400

    def runpod_output(self) -> Any:
        """The job output RunPod expects.

        Success: the OpenAI body (standard flavour), or a one-element list holding it (OpenAI proxy,
        as RunPod's own OpenAI-compatible workers answer). Failure: a top-level "error" whose value is
        the JSON text of the OpenAI error object plus its status, which makes the job FAILED (runpod's
        local API answers HTTP 500 if that value is not a string).
        """
        if self.ok:
            output = JobOutput(self.body)
            return [output] if self.openai_route else output
        error = dict(self.body, status=self.status)
        output = {"error": json.dumps(error, ensure_ascii=False)}
        if self.refresh_worker:
            output["refresh_worker"] = True
        return output


Operation = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Worker:
    """The served models, the limits, and the routing of requests to operations."""

    def __init__(self, config: WorkerConfig, registry: ModelRegistry) -> None:
        self.config = config
        self.registry = registry
        self.limits = Limits(
            max_inputs=config.max_batch_inputs,
            max_request_tokens=config.max_request_tokens,
            max_request_bytes=config.max_request_bytes,
            max_response_bytes=config.max_response_bytes,
        )
        self._routes: dict[str, Operation] = {
            "/v1/models": self._models,
            "/v1/embeddings": self._embeddings,
            "/v1/rerank": self._rerank,
            "batch": self._batch,  # a RunPod job holding batch lines (batch.py)
        }

    @classmethod
    def from_config(cls, config: WorkerConfig) -> "Worker":
        return cls(config, ModelRegistry.load(config))

    @property
    def healthy(self) -> bool:
        return self.registry.health.healthy

    async def start(self) -> None:
        await self.registry.start()

    async def stop(self) -> None:
        await self.registry.stop()

    async def dispatch(self, job_input: Any, job_id: str | None = None) -> Reply:
        """Answer one job input, in either flavour. Never raises."""
        openai_route = isinstance(job_input, dict) and "openai_route" in job_input
        job = current_job.set(str(job_id) if job_id is not None else "-")
        try:
            route, body = self._route(job_input)
            inspect_request(body, self.limits)
            await self.registry.start()
            result = await self._routes[route](body)
            return Reply(200, result, openai_route)
        except APIError as exc:
            # Messages never hold the payload (errors.py), so they are safe to log.
            if exc.status >= 500:
                log.warning("%s %s: %s", exc.status, exc.code, exc.message)
            else:
                log.debug("%s %s (param %s)", exc.status, exc.code, exc.param)
            return self._error_reply(exc, openai_route)
        except Exception as exc:
            log.error("unexpected error: %s", redacted_traceback(exc))
            return self._error_reply(errors.internal(), openai_route)
        finally:
            current_job.reset(job)

    async def call(self, route: str, body: Any) -> Reply:
        """Answer an OpenAI-route request (local server, batch files)."""
        return await self.dispatch({"openai_route": route, "openai_input": body})

    def _error_reply(self, exc: APIError, openai_route: bool) -> Reply:
        return Reply(exc.status, exc.to_dict(), openai_route, refresh_worker=not self.healthy)

    def _route(self, job_input: Any) -> tuple[str, dict[str, Any]]:
        if not isinstance(job_input, dict):
            raise errors.invalid_input("the job 'input' must be a JSON object")
        if "openai_route" in job_input:
            route = job_input["openai_route"]
            if not isinstance(route, str) or route.rstrip("/") not in ROUTES:
                raise errors.not_found(
                    f"unknown openai_route; this worker serves {', '.join(ROUTES)}"
                )
            body = job_input.get("openai_input")
            if body is None:
                body = {}  # GET /v1/models arrives with no body
            return route.rstrip("/"), _merge_extra_body(body)
        # Standard flavour: the operation is told by the fields present.
        if "batch" in job_input:
            return "batch", job_input
        if "query" in job_input:
            return "/v1/rerank", _merge_extra_body(job_input)
        if "input" in job_input:
            return "/v1/embeddings", _merge_extra_body(job_input)
        raise errors.invalid_input(
            "the job input must hold 'input' (embeddings), 'query' and 'documents' (rerank), "
            "'batch' (batch lines) or 'openai_route'"
        )

    async def _models(self, body: dict[str, Any]) -> dict[str, Any]:
        return operations.list_models(self.registry)

    async def _embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        request = parse(EmbeddingRequest, body)
        return await operations.create_embeddings(self.registry, request, self.limits)

    async def _rerank(self, body: dict[str, Any]) -> dict[str, Any]:
        request = parse(RerankRequest, body)
        return await operations.rerank(self.registry, request, self.limits)

    async def _batch(self, body: dict[str, Any]) -> dict[str, Any]:
        return await batch.answer_job(self, body)


def _merge_extra_body(body: Any) -> Any:
    """Accept a literal nested "extra_body" object (hand-written JSON copied from SDK examples).

    The openai SDK itself merges extra_body into the top level; keys at the top level win.
    """
    if isinstance(body, dict) and isinstance(body.get("extra_body"), dict):
        merged = dict(body["extra_body"])
        merged.update({k: v for k, v in body.items() if k != "extra_body"})
        return merged
    return body
