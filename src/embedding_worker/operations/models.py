"""The model list and one model: GET /v1/models and GET /v1/models/{model} (OpenAI's shapes, with
each model's capabilities and its `stats`: requests, inputs, tokens, latency and queue depth since
the worker started, metrics.py)."""

from __future__ import annotations

from typing import Any

from .. import errors
from ..engines import Capability
from .base import Context, Operation


async def list_models(context: Context, body: dict[str, Any]) -> dict[str, Any]:
    return {"object": "list", "data": [with_stats(context, m) for m in context.registry.describe()]}


def with_stats(context: Context, entry: dict[str, Any]) -> dict[str, Any]:
    """A model's entry with its `stats` since the worker started (empty with METRICS off)."""
    metrics = context.metrics
    entry["stats"] = metrics.stats(entry["id"]) if metrics is not None else {}
    return entry


async def retrieve_model(context: Context, body: dict[str, Any]) -> dict[str, Any]:
    """One served model by its id (or any name a request may use for it); 404 model_not_found."""
    name = body.get("model")
    if not isinstance(name, str) or not name or len(name) > 256:
        raise errors.model_not_found("name a served model: GET /v1/models/{model}")
    # With a name given, the capability does not matter: every served model is found.
    return with_stats(context, context.registry.resolve(name, Capability.EMBED).describe())


OPERATION = Operation(
    name="models", run=list_models, route="/v1/models", method="GET", scheduled=False
)
RETRIEVE = Operation(
    name="model", run=retrieve_model, route="/v1/models/{model}", method="GET", scheduled=False
)
