"""The model list: GET /v1/models (OpenAI's shape, with each model's capabilities)."""

from __future__ import annotations

from typing import Any

from .base import Context, Operation


async def list_models(context: Context, body: dict[str, Any]) -> dict[str, Any]:
    return {"object": "list", "data": context.registry.describe()}


OPERATION = Operation(name="models", run=list_models, route="/v1/models", method="GET")
