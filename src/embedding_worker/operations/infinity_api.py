"""Infinity's own routes at the root: /embeddings, /rerank and /models, in Infinity's shapes, for
Infinity's clients and litellm's `infinity/` provider (vLLM serves the same paths).

The requests are the OpenAI routes' requests; the answers are the same, but for rerank, where
Infinity's `document` is the document's text itself (or null), not Cohere's `{"text": ...}`.
"""

from __future__ import annotations

from typing import Any

from . import embeddings, models, rerank
from .base import Context, Operation


async def infinity_rerank(context: Context, body: dict[str, Any]) -> dict[str, Any]:
    answer = await rerank.rerank(context, body)
    for result in answer["results"]:
        document = result.pop("document", None)
        result["document"] = document["text"] if document is not None else None
    return answer


OPERATIONS = (
    Operation(name="infinity-embeddings", run=embeddings.create_embeddings, route="/embeddings"),
    Operation(name="infinity-rerank", run=infinity_rerank, route="/rerank"),
    Operation(
        name="infinity-models",
        run=models.list_models,
        route="/models",
        method="GET",
        scheduled=False,
    ),
)
