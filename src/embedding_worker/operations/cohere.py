"""Cohere's embed and rerank: POST /v1/embed, /v2/embed and /v2/rerank (/v1/rerank is rerank.py's,
whose answer carries Cohere's v1 fields), for `cohere.Client`, `cohere.ClientV2` and litellm's
`cohere/` provider. A standard-flavour job holding `texts` is a v2 embed.

Embed takes `texts`, `input_type` (mapped onto the model's own prompts: search_query -> its "query"
prompt, search_document -> "document" or "passage", classification and clustering -> prompts of
those names; a model without them embeds the text as it is) and `embedding_types` (encoding.py).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from .. import errors, prompts
from ..encoding import EmbeddingType, encode_types
from ..engines import Capability
from ..images import ImageRef
from . import rerank
from .base import (
    Context,
    ModelName,
    Operation,
    RequestModel,
    answer_id,
    chars,
    check_count,
    model_for,
    off_loop,
    parse,
)
from .embeddings import EmbeddingRequest, embed, encoded_off_loop

InputType = Literal["search_document", "search_query", "classification", "clustering"]

# The prompts of the model that each input_type takes, in order of preference.
PROMPTS_OF_INPUT_TYPE: dict[str, tuple[str, ...]] = {
    "search_query": ("query",),
    "search_document": ("document", "passage"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}


class CohereEmbedRequest(RequestModel):
    model: ModelName | None = None
    texts: list[str] = Field(min_length=1)
    input_type: InputType | None = None
    embedding_types: list[EmbeddingType] | None = Field(default=None, min_length=1)
    # END cuts the end of an over-long text, START its start, NONE refuses it.
    truncate: Literal["NONE", "START", "END"] = "END"


def _meta(version: str, **billed: int) -> dict[str, Any]:
    return {"api_version": {"version": version}, "billed_units": billed}


def _prompt_type(context: Context, request: CohereEmbedRequest) -> str | None:
    if request.input_type is None:
        return None
    model = model_for(context.registry, request.model, Capability.EMBED)
    names = PROMPTS_OF_INPUT_TYPE[request.input_type]
    return next((name for name in names if name in model.prompts), None)


async def _keep_ends(
    context: Context, request: CohereEmbedRequest, prompt_type: str | None
) -> list[str]:
    """truncate=START: each text cut at its start, where a word starts, to what fits after the
    model's prompt and special tokens. The prompt is kept whole; where the prompt and the text
    tokenize differently together by a token, the cut at the end takes it."""
    model = model_for(context.registry, request.model, Capability.EMBED)
    check_count(len(request.texts), context.limits, "texts")
    prefix = prompts.embedding_prefix(model, None, prompt_type)
    room = model.max_length - model.tokens.count([prefix])[0]  # the prompt with special tokens
    return await off_loop(
        chars(request.texts), lambda: [model.tokens.keep_end(t, room) for t in request.texts]
    )


async def _embed(context: Context, body: dict[str, Any], version: str) -> dict[str, Any]:
    request = await parse(CohereEmbedRequest, body)
    # Before anything walks the texts: at most MAX_BATCH_INPUTS of them.
    check_count(len(request.texts), context.limits, "texts")
    if any(not text for text in request.texts):
        raise errors.invalid_input("'texts' must not hold an empty string", param="texts")
    types: list[EmbeddingType] = list(dict.fromkeys(request.embedding_types or ["float"]))
    prompt_type = _prompt_type(context, request)
    texts = request.texts
    if request.truncate == "START":
        texts = await _keep_ends(context, request, prompt_type)
    items: list[str | ImageRef] = list(texts)
    as_request = EmbeddingRequest(
        model=request.model,
        input=items,
        modality="text",  # Cohere's texts are texts, whatever they look like
        # The answer's size is estimated in the largest format asked for.
        encoding_format="float" if {"float", "int8", "uint8"} & set(types) else "base64",
        prompt_type=prompt_type,
        truncate=request.truncate != "NONE",
        embedding_types=types,  # for the answer's size: one vector a text for each type
    )
    done = await embed(context, as_request)
    # v1 without embedding_types answers a plain list of float vectors; otherwise one per type.
    by_type = request.embedding_types is not None or version == "2"
    embeddings = await encoded_types(done.vectors, types)
    return {
        "id": answer_id("embed"),
        "embeddings": embeddings if by_type else embeddings["float"],
        "texts": request.texts,
        "meta": _meta(version, input_tokens=done.tokens),
        "response_type": "embeddings_by_type" if by_type else "embeddings_floats",
    }


async def encoded_types(vectors: np.ndarray, types: list[EmbeddingType]) -> dict[str, Any]:
    """Cohere's `embeddings` object; a large one encoded off the event loop, in chunks."""
    if not types:
        return {}
    # One row per vector: each row's encoded form of every type.
    rows = await encoded_off_loop(vectors, _types_by_row, types)
    return {kind: [row[kind] for row in rows] for kind in types}


def _types_by_row(vectors: np.ndarray, types: list[EmbeddingType]) -> list[dict[str, Any]]:
    by_type = encode_types(vectors, types)
    return [{kind: by_type[kind][i] for kind in types} for i in range(len(vectors))]


async def embed_v1(context: Context, body: dict[str, Any]) -> dict[str, Any]:
    return await _embed(context, body, "1")


async def embed_v2(context: Context, body: dict[str, Any]) -> dict[str, Any]:
    return await _embed(context, body, "2")


async def rerank_v2(context: Context, body: dict[str, Any]) -> dict[str, Any]:
    """Cohere v2: plain string documents and no `return_documents`; results and meta only."""
    answer = await rerank.rerank(context, {**body, "return_documents": False})
    return {
        "id": answer["id"],
        "results": answer["results"],
        # The units counted from the documents as parsed, under whichever alias they came.
        "meta": {**answer["meta"], "api_version": {"version": "2"}},
    }


OPERATIONS = (
    Operation(name="cohere-embed-v1", run=embed_v1, route="/v1/embed"),
    # The standard flavour's Cohere body answers in v2's shape (one list of vectors a type).
    Operation(
        name="cohere-embed-v2",
        run=embed_v2,
        route="/v2/embed",
        job_fields=("texts",),
        job_hint="'texts' (Cohere embed)",
    ),
    Operation(name="cohere-rerank-v2", run=rerank_v2, route="/v2/rerank"),
)
