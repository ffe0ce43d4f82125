"""Embeddings: POST /v1/embeddings (OpenAI's shape), and the standard flavour's `{"input": ...}`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from .. import errors, prompts
from ..encoding import EmbeddingType, encode_types, encode_vectors
from ..engines import Capability, Embedder, ModelEngine
from ..limits import ENVELOPE_BYTES, FLOAT_BYTES, ITEM_OVERHEAD_BYTES, Limits
from .base import (
    Context,
    ModelName,
    Operation,
    RequestModel,
    answer_id,
    check_count,
    check_finite,
    check_lengths,
    created,
    model_for,
    parse,
    tokenize,
    usage,
)

INPUT_SHAPES = (
    "a string, an array of strings, an array of token ids, or an array of arrays of token ids"
)


def _is_token_id(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass: reject it


def _token_list(value: list, where: str) -> list[int]:
    if not value:
        raise ValueError(f"{where} is an empty array of token ids")
    if not all(_is_token_id(v) for v in value):
        raise ValueError(f"{where} must hold only integer token ids")
    return value


class EmbeddingRequest(RequestModel):
    model: ModelName | None = None
    # Normalised by the validator to a list of strings or a list of token-id lists.
    input: list[str] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    # Instruction-aware models (see prompts.py).
    instruction: str | None = None
    prompt_type: str | None = None
    # Over-long inputs: cut to the model's maximum length (True) or refuse the request (False).
    truncate: bool = True
    # An extension (Cohere's types): each item's "embedding" is then an object, one entry a type.
    embedding_types: list[EmbeddingType] | None = Field(default=None, min_length=1)

    @field_validator("input", mode="before")
    @classmethod
    def _normalise_input(cls, value: Any) -> list[str] | list[list[int]]:
        if isinstance(value, str):
            if not value:
                raise ValueError("must not be an empty string")
            return [value]
        if not isinstance(value, list):
            raise ValueError(f"must be {INPUT_SHAPES}")
        if not value:
            raise ValueError("must not be an empty array")
        first = value[0]
        if isinstance(first, str):
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise ValueError(f"item {i} is not a string; arrays must not mix types")
                if not item:
                    raise ValueError(f"item {i} is an empty string")
            return value
        if _is_token_id(first):
            return [_token_list(value, "input")]
        if isinstance(first, list):
            for i, item in enumerate(value):
                if not isinstance(item, list):
                    raise ValueError(f"item {i} is not an array of token ids")
                _token_list(item, f"item {i}")
            return value
        raise ValueError(f"must be {INPUT_SHAPES}")

    @property
    def is_tokens(self) -> bool:
        return bool(self.input) and isinstance(self.input[0], list)


# ------------------------------------------------------------------------------------ the answer


def answer_bytes(count: int, dimensions: int, encoding_format: str) -> int:
    """An upper estimate of the JSON size of an embeddings answer."""
    if encoding_format == "base64":
        per_vector = 4 * math.ceil(4 * dimensions / 3) + 2
    else:
        per_vector = FLOAT_BYTES * dimensions
    return ENVELOPE_BYTES + count * (per_vector + ITEM_OVERHEAD_BYTES)


def check_answer_size(count: int, dimensions: int, encoding_format: str, limits: Limits) -> None:
    """Refuse an answer RunPod could not carry, before any work is done."""
    estimate = answer_bytes(count, dimensions, encoding_format)
    if estimate <= limits.max_response_bytes:
        return
    advice = "send fewer inputs or ask for fewer 'dimensions'"
    if encoding_format != "base64":
        advice = 'ask for "encoding_format": "base64" (about 3x smaller), ' + advice
    raise errors.too_large(
        f"the answer ({count} vectors of {dimensions} numbers) would be about {estimate} bytes, "
        f"more than the limit of {limits.max_response_bytes} (MAX_RESPONSE_BYTES; RunPod drops "
        f"answers over its 20 MB payload limit); {advice}",
        param="input",
        code="response_too_large",
    )


def embedding_response(model: str, vectors: list, tokens: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "embedding": vector, "index": i}
            for i, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": usage(tokens),
        "id": answer_id("embd"),
        "created": created(),
    }


# ------------------------------------------------------------------------------------ the work


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


def _resize(vectors: np.ndarray, dimensions: int | None, model: ModelEngine) -> np.ndarray:
    """Matryoshka: keep the first `dimensions` numbers, then L2-normalise again."""
    size = vectors.shape[1]
    if dimensions is None or dimensions == size:
        return vectors
    _check_dimensions(dimensions, size, model)
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class Embedded:
    """What an embeddings request computed: its model, one vector a row, the tokens it used."""

    model: ModelEngine
    vectors: np.ndarray
    tokens: int


async def embed(context: Context, request: EmbeddingRequest) -> Embedded:
    """The checks and the engine call of an embeddings request; every route that embeds uses it.

    `request.encoding_format` is the format the answer size is estimated for."""
    limits = context.limits
    model = model_for(context.registry, request.model, Capability.EMBED)
    assert isinstance(model, Embedder)
    check_count(len(request.input), limits, "input")
    if model.dimensions is not None:
        _check_dimensions(request.dimensions, model.dimensions, model)
    dimensions = request.dimensions or model.dimensions
    # Vectors in the answer: one per input for each embedding type asked.
    count = len(request.input) * len(set(request.embedding_types or ["float"]))
    if dimensions is not None:
        check_answer_size(count, dimensions, request.encoding_format, limits)

    if request.is_tokens:
        # The caller built these tokens: never prefixed.
        texts = _texts_from_token_ids(model, request.input)  # type: ignore[arg-type]
        lengths = [len(ids) for ids in request.input]
    else:
        plain: list[str] = request.input  # type: ignore[assignment]
        texts = prompts.apply_embedding_prompt(
            model, plain, request.instruction, request.prompt_type
        )
        texts, lengths = await tokenize(len(texts), model.tokens.tokenize, texts)
    tokens = check_lengths(model, lengths, request.truncate, limits, "input")

    vectors = await model.embed(texts)
    vectors = _resize(vectors, request.dimensions, model)
    if dimensions is None:
        check_answer_size(count, vectors.shape[1], request.encoding_format, limits)
    check_finite(vectors, model)
    return Embedded(model, vectors, tokens)


async def create_embeddings(context: Context, body: dict[str, Any]) -> dict[str, Any]:
    request = parse(EmbeddingRequest, body)
    done = await embed(context, request)
    if request.embedding_types is None:
        encoded = encode_vectors(done.vectors, request.encoding_format)
    else:
        by_type = encode_types(
            done.vectors, list(dict.fromkeys(request.embedding_types)), request.encoding_format
        )
        encoded = [
            {kind: values[i] for kind, values in by_type.items()} for i in range(len(done.vectors))
        ]
    return embedding_response(done.model.served_id, encoded, done.tokens)


OPERATION = Operation(
    name="embeddings",
    run=create_embeddings,
    route="/v1/embeddings",
    job_fields=("input",),
    job_hint="'input' (embeddings)",
    batch_line=True,
)
