"""Contextualized chunk embeddings: POST /v1/contextualizedembeddings in Voyage's shape, and the
standard flavour's `{"inputs": [[...], ...]}`.

`inputs` is a list of documents, each a list of its chunks in order; every chunk's vector is
computed in its document's context by late chunking (long_inputs.py). The answer nests one list a
document: `data[i].data[j].embedding`, with `index` at both levels, and `usage.total_tokens`.
`input_type` ("query", "document") takes the model's prompt of that name where it declares one;
`output_dimension` cuts the vectors (Matryoshka), `output_dtype` quantizes them (encoding.py), and
`encoding_format: "base64"` sends each as the base64 of its bytes.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from .. import errors, prompts
from ..encoding import encode_types
from ..engines import Capability, Embedder
from ..limits import ENVELOPE_BYTES, ITEM_OVERHEAD_BYTES, Limits, check_answer_bytes
from . import long_inputs
from .base import (
    Context,
    ModelName,
    Operation,
    RequestModel,
    check_count,
    check_finite,
    check_request_tokens,
    model_for,
    parse,
)
from .embeddings import encoded_off_loop, vector_bytes

OutputDtype = Literal["float", "int8", "uint8", "binary", "ubinary"]
SHAPE = "a non-empty array of documents, each a non-empty array of non-empty strings (its chunks)"


class ContextualizedRequest(RequestModel):
    inputs: list[list[str]]
    model: ModelName | None = None
    input_type: Literal["query", "document"] | None = None
    output_dimension: int | None = Field(default=None, ge=1)
    output_dtype: OutputDtype = "float"
    encoding_format: Literal["base64"] | None = None

    @field_validator("inputs", mode="before")
    @classmethod
    def _documents(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be {SHAPE}")
        for i, document in enumerate(value):
            if not isinstance(document, list) or not document:
                raise ValueError(f"document {i} must be a non-empty array of strings")
            for j, chunk in enumerate(document):
                if not isinstance(chunk, str) or not chunk:
                    raise ValueError(f"document {i} chunk {j} must be a non-empty string")
        return value


def _answer_bytes(chunks: int, dimensions: int, request_format: str | None) -> int:
    """An upper estimate of the answer: floats as embeddings' answers are estimated; quantized
    types at most a float's text a number."""
    per_vector = vector_bytes(dimensions, "base64" if request_format == "base64" else "float")
    return ENVELOPE_BYTES + chunks * (per_vector + 2 * ITEM_OVERHEAD_BYTES)


def _check_answer(
    chunks: int, dimensions: int, request: ContextualizedRequest, limits: Limits
) -> None:
    check_answer_bytes(
        _answer_bytes(chunks, dimensions, request.encoding_format),
        limits,
        answer=f"the answer ({chunks} vectors of {dimensions} numbers)",
        advice="send fewer chunks, ask for a smaller 'output_dimension' or 'output_dtype', or "
        'for "encoding_format": "base64"',
        param="inputs",
    )


def _dimensions(request: ContextualizedRequest, model: Embedder) -> int | None:
    size = request.output_dimension
    if size is not None and model.dimensions is not None and size > model.dimensions:
        raise errors.invalid_input(
            f"'output_dimension' must be between 1 and {model.dimensions} for model "
            f"'{model.served_id}', got {size}",
            param="output_dimension",
        )
    return size or model.dimensions


def _shaped(vectors: np.ndarray, request: ContextualizedRequest, model: Embedder) -> np.ndarray:
    """Cut to `output_dimension`, and made unit vectors again where the model's are."""
    size = request.output_dimension
    if size is None or size >= vectors.shape[1]:
        return vectors
    vectors = vectors[:, :size]
    if not model.normalized:
        return vectors
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


def _encode(vectors: np.ndarray, request: ContextualizedRequest) -> list[Any]:
    fmt: Literal["float", "base64"] = "base64" if request.encoding_format else "float"
    return list(encode_types(vectors, [request.output_dtype], fmt)[request.output_dtype])


async def create(context: Context, body: dict[str, Any]) -> dict[str, Any]:
    request = await parse(ContextualizedRequest, body)
    limits = context.limits
    documents = request.inputs
    check_count(len(documents), limits, "inputs")
    chunks = sum(len(document) for document in documents)
    check_count(chunks, limits, "inputs")
    model = model_for(context.registry, request.model, Capability.EMBED)
    assert isinstance(model, Embedder)
    dimensions = _dimensions(request, model)
    if dimensions is not None:
        _check_answer(chunks, dimensions, request, limits)
    model.check_room(chunks, chunks)
    prompt_type = request.input_type if request.input_type in model.prompts else None
    prefix = prompts.embedding_prefix(model, None, prompt_type)
    counted = [
        await long_inputs.count_late_chunks(model, document, prefix, limits, "inputs")
        for document in documents
    ]
    tokens = sum(c.tokens for c in counted)
    check_request_tokens(tokens, limits, "inputs")
    done = await asyncio.gather(*(long_inputs.late_chunk(model, c) for c in counted))
    data = []
    for i, result in enumerate(done):
        vectors = _shaped(result.vectors, request, model)
        check_finite(vectors, model)
        if dimensions is None and i == 0:
            _check_answer(chunks, vectors.shape[1], request, limits)
        encoded = await encoded_off_loop(vectors, _encode, request)
        data.append(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "embedding": vector, "index": j}
                    for j, vector in enumerate(encoded)
                ],
                "index": i,
            }
        )
    return {
        "object": "list",
        "data": data,
        "model": model.served_id,
        "usage": {"total_tokens": sum(result.tokens for result in done)},
    }


def estimate_answer(context: Context, body: dict[str, Any]) -> int:
    """An upper estimate of the answer to `body` from its fields and its model's dimensions (the
    envelope for a model that declares none); reads no text."""
    value = body.get("inputs")
    documents = value if isinstance(value, list) else []
    chunks = sum(len(d) if isinstance(d, list) else 1 for d in documents)
    check_count(len(documents), context.limits, "inputs")
    check_count(chunks, context.limits, "inputs")
    name = body.get("model")
    model = model_for(context.registry, name if isinstance(name, str) else None, Capability.EMBED)
    dimensions = body.get("output_dimension")
    if type(dimensions) is not int or dimensions < 1:
        dimensions = model.dimensions
    if dimensions is None:
        return ENVELOPE_BYTES + chunks * 2 * ITEM_OVERHEAD_BYTES
    fmt = body.get("encoding_format")
    return _answer_bytes(chunks, dimensions, fmt if isinstance(fmt, str) else None)


OPERATION = Operation(
    name="contextualized-embeddings",
    run=create,
    route="/v1/contextualizedembeddings",
    job_fields=("inputs",),
    job_hint="'inputs' (documents as arrays of chunks: contextualized chunk embeddings)",
    batch_line=True,
    answer_bytes=estimate_answer,
)
