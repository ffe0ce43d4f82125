"""The three operations: create embeddings, rerank documents, list models.

Each takes a validated request, checks it against the model and the worker's limits, runs the engine
and builds the response body. Transport concerns (RunPod's wrapper, HTTP) live elsewhere.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from . import errors, prompts, protocol
from .encoding import encode_vectors
from .engines import ModelEngine, ModelRegistry, Role
from .limits import Limits, check_embedding_answer, check_rerank_answer
from .protocol import EmbeddingRequest, RerankRequest

# Tokenising on the event loop is cheaper than a thread hop for small requests; big ones go to a
# thread so that other requests keep flowing meanwhile (the Rust tokenizer releases the GIL).
_TOKENIZE_INLINE_MAX = 64

T = TypeVar("T")


async def _tokenize(items: int, tokenize: Callable[..., T], *args: Any) -> T:
    """Run a tokenizer call inline for small requests, in a thread for big ones."""
    if items <= _TOKENIZE_INLINE_MAX:
        return tokenize(*args)
    return await asyncio.to_thread(tokenize, *args)


def _check_lengths(
    model: ModelEngine, lengths: Sequence[int], truncate: bool, limits: Limits, param: str
) -> int:
    """Apply the per-input and per-request token limits; returns the tokens the model will see."""
    if not truncate:
        for i, n in enumerate(lengths):
            if n > model.max_length:
                raise errors.invalid_input(
                    f"'{param}' item {i} has {n} tokens, more than the model's maximum of "
                    f"{model.max_length}; shorten it or send \"truncate\": true",
                    param=param,
                    code="context_length_exceeded",
                )
    total = sum(min(n, model.max_length) for n in lengths)
    if total > limits.max_request_tokens:
        raise errors.invalid_input(
            f"the request holds {total} tokens, more than the limit of {limits.max_request_tokens} "
            "per request (MAX_REQUEST_TOKENS); split it",
            param=param,
            code="request_too_large",
        )
    return total


def _check_count(count: int, limits: Limits, param: str) -> None:
    if count > limits.max_inputs:
        raise errors.invalid_input(
            f"'{param}' holds {count} items, more than the limit of {limits.max_inputs} per request",
            param=param,
        )


def _texts_from_token_ids(model: ModelEngine, token_lists: list[list[int]]) -> list[str]:
    vocab = model.tokens.vocab_size
    for i, ids in enumerate(token_lists):
        for token in ids:
            if not 0 <= token < vocab:
                raise errors.invalid_input(
                    f"'input' item {i} holds token id {token}, outside the model's vocabulary "
                    f"(0 to {vocab - 1})",
                    param="input",
                )
    return [model.tokens.decode(ids) for ids in token_lists]


def _check_dimensions(dimensions: int | None, size: int, model: ModelEngine) -> None:
    if dimensions is not None and dimensions > size:
        raise errors.invalid_input(
            f"'dimensions' must be between 1 and {size} for model '{model.served_id}', "
            f"got {dimensions}",
            param="dimensions",
        )


def _require_role(model: ModelEngine, role: Role) -> None:
    if model.role is not role:
        raise errors.invalid_input(
            f"model '{model.served_id}' is a {model.role.value} model and cannot {role.value}",
            param="model",
            code="model_not_embedding" if role is Role.EMBED else "model_not_reranker",
        )


def _resize(vectors: np.ndarray, dimensions: int | None, model: ModelEngine) -> np.ndarray:
    """Matryoshka: keep the first `dimensions` numbers, then L2-normalise again."""
    size = vectors.shape[1]
    if dimensions is None or dimensions == size:
        return vectors
    _check_dimensions(dimensions, size, model)
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, np.finfo(np.float32).tiny)


def _check_finite(values: np.ndarray, model: ModelEngine) -> None:
    """A model that overflows (float16) gives NaN, which is not JSON: fail instead of answering it."""
    if not np.isfinite(values).all():
        raise errors.internal(
            f"model '{model.served_id}' produced NaN or infinite values; try another DTYPES"
        )


async def create_embeddings(
    registry: ModelRegistry, request: EmbeddingRequest, limits: Limits
) -> dict[str, Any]:
    model = registry.resolve(request.model, Role.EMBED)
    _require_role(model, Role.EMBED)
    _check_count(len(request.input), limits, "input")
    if model.dimensions is not None:
        _check_dimensions(request.dimensions, model.dimensions, model)
    # Refuse an answer RunPod could not carry before any work is done.
    dimensions = request.dimensions or model.dimensions
    count = len(request.input)
    if dimensions is not None:
        check_embedding_answer(count, dimensions, request.encoding_format, limits)

    if request.is_tokens:
        # The caller built these tokens: never prefixed.
        texts = _texts_from_token_ids(model, request.input)  # type: ignore[arg-type]
        lengths = [len(ids) for ids in request.input]  # type: ignore[misc]
    else:
        texts = prompts.apply_embedding_prompt(model, request)
        texts, lengths = await _tokenize(len(texts), model.tokens.tokenize, texts)
    tokens = _check_lengths(model, lengths, request.truncate, limits, "input")

    vectors = await model.embed(texts)
    vectors = _resize(vectors, request.dimensions, model)
    if dimensions is None:
        check_embedding_answer(count, vectors.shape[1], request.encoding_format, limits)
    _check_finite(vectors, model)
    return protocol.embedding_response(
        model.served_id, encode_vectors(vectors, request.encoding_format), tokens
    )


async def rerank(registry: ModelRegistry, request: RerankRequest, limits: Limits) -> dict[str, Any]:
    model = registry.resolve(request.model, Role.RERANK)
    _require_role(model, Role.RERANK)
    docs = request.documents
    _check_count(len(docs), limits, "documents")
    returned = len(docs) if request.top_n is None else min(request.top_n, len(docs))
    check_rerank_answer(docs, returned, request.return_documents, limits)
    lengths = await _tokenize(
        len(docs), model.rerank_lengths, request.query, docs, request.instruction
    )
    tokens = _check_lengths(model, lengths, request.truncate, limits, "documents")

    scores = await model.rerank(request.query, docs, request.instruction)
    _check_finite(scores, model)
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
    return protocol.rerank_response(model.served_id, results, tokens)


def list_models(registry: ModelRegistry) -> dict[str, Any]:
    return protocol.model_list(registry.describe())
