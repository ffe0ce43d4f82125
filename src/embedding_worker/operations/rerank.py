"""Rerank: POST /v1/rerank (Cohere's and Jina's shape), and the standard flavour's
`{"query", "documents"}`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import AliasChoices, Field, field_validator

from .. import tracing
from ..engines import Capability, Reranker
from ..engines.tokenization import Text, counted
from ..limits import ENVELOPE_BYTES, RERANK_ITEM_BYTES, Limits, check_answer_bytes, utf8_size
from .base import (
    Context,
    ModelName,
    Operation,
    RequestModel,
    answer_id,
    chars,
    check_count,
    check_finite,
    check_lengths,
    created,
    model_for,
    off_loop,
    parse,
    usage,
)


class RerankRequest(RequestModel):
    model: ModelName | None = None
    query: str = Field(min_length=1)
    documents: list[str] = Field(validation_alias=AliasChoices("documents", "docs"))
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = Field(
        default=False, validation_alias=AliasChoices("return_documents", "return_docs")
    )
    instruction: str | None = None
    truncate: bool = True

    @field_validator("documents", mode="before")
    @classmethod
    def _document_texts(cls, value: Any) -> list[str]:
        # Cohere accepts {"text": ...} objects beside plain strings.
        if not isinstance(value, list):
            raise ValueError("must be an array of strings")
        if not value:
            raise ValueError("must not be an empty array")
        texts = []
        for i, item in enumerate(value):
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                item = item["text"]
            if not isinstance(item, str):
                raise ValueError(f"item {i} must be a string or an object with a string 'text'")
            texts.append(item)
        return texts


def check_answer_size(
    documents: Sequence[str], returned: int, return_documents: bool, limits: Limits
) -> None:
    """`returned` results, each with its document's text when asked: the largest ones, to be
    safe."""
    check_answer_bytes(
        answer_estimate(documents, returned, return_documents),
        limits,
        answer="the answer",
        advice="leave out 'return_documents', set 'top_n', or send fewer documents",
        param="documents",
    )


def answer_estimate(documents: Sequence[str], returned: int, return_documents: bool) -> int:
    """An upper estimate of the answer's JSON bytes."""
    estimate = ENVELOPE_BYTES + returned * RERANK_ITEM_BYTES
    if return_documents:
        # runpod writes JSON with ensure_ascii=False: UTF-8 bytes, plus an allowance of 1/8 for
        # escaped quotes, backslashes and control characters.
        sizes = sorted(map(utf8_size, documents), reverse=True)[:returned]
        text = sum(sizes)
        estimate += text + text // 8
    return estimate


def estimate_answer(context: Context, body: dict[str, Any]) -> int:
    """An upper estimate of the answer to `body`, from its fields alone (a batch job's bound)."""
    documents = body.get("documents", body.get("docs"))
    if not isinstance(documents, list):
        return ENVELOPE_BYTES
    check_count(len(documents), context.limits, "documents")
    texts: list[str] = []
    for document in documents:
        text = document.get("text") if isinstance(document, dict) else document
        if isinstance(text, str):
            texts.append(text)
    top_n = body.get("top_n")
    returned = min(top_n, len(texts)) if type(top_n) is int and top_n >= 1 else len(texts)
    wanted = body.get("return_documents", body.get("return_docs")) is True
    check_answer_size(texts, returned, wanted, context.limits)
    return answer_estimate(texts, returned, wanted)


def search_units(documents: int) -> int:
    """Cohere's billing unit: one query with up to 100 documents."""
    return max(1, -(-documents // 100))


def rerank_response(
    model: str, results: list[dict[str, Any]], tokens: int, documents: int
) -> dict[str, Any]:
    """OpenAI-style fields (object, usage, created) beside Cohere's v1 ones (id, results, meta)."""
    return {
        "object": "rerank",
        "model": model,
        "results": results,
        "usage": usage(tokens),
        "id": answer_id("rerank"),
        "created": created(),
        "meta": {
            "api_version": {"version": "1"},
            "billed_units": {"search_units": search_units(documents)},
        },
    }


def _counted_pairs(model: Reranker, request: RerankRequest) -> tuple[list[Text], list[int]]:
    """Each document carrying its pair's tokens, which bound the engine's batches (budget.py), and
    those counts; one call, so that a large request does both in one thread (each `Text`
    is a copy of its document)."""
    lengths = model.rerank_lengths(request.query, request.documents, request.instruction)
    return counted(request.documents, lengths), lengths


async def rerank(context: Context, body: dict[str, Any]) -> dict[str, Any]:
    request = await parse(RerankRequest, body)
    limits = context.limits
    model = model_for(context.registry, request.model, Capability.RERANK)
    assert isinstance(model, Reranker)
    docs = request.documents
    check_count(len(docs), limits, "documents")
    returned = len(docs) if request.top_n is None else min(request.top_n, len(docs))
    size = chars(docs) + len(request.query) * len(docs)  # each pair holds the query
    await off_loop(size, check_answer_size, docs, returned, request.return_documents, limits)
    model.check_room(len(docs), len(docs))  # before the pairs are counted
    with tracing.phase("tokenize"):
        pairs, lengths = await off_loop(size, _counted_pairs, model, request)
    tokens = check_lengths(model, lengths, request.truncate, limits, "documents")
    scores = await model.rerank(request.query, pairs, request.instruction, tokens=tokens)
    check_finite(scores, model)
    # Stable sort by score, highest first: equal scores keep the documents' order.
    order = np.argsort(-scores, kind="stable")
    if request.top_n is not None:
        order = order[: request.top_n]
    results = []
    for i in order.tolist():
        result: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
        if request.return_documents:
            result["document"] = {"text": docs[i]}
        results.append(result)
    return rerank_response(model.served_id, results, tokens, len(docs))


OPERATION = Operation(
    name="rerank",
    run=rerank,
    route="/v1/rerank",
    job_fields=("query",),
    job_hint="'query' and 'documents' (rerank)",
    batch_line=True,
    answer_bytes=estimate_answer,
)
