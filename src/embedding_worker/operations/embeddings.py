"""Embeddings: POST /v1/embeddings (OpenAI's shape), and the standard flavour's `{"input": ...}`.

Extensions: `embedding_types` (Cohere's types for `embedding`), and for multi-output models
(bge-m3) `output`: any of dense (`embedding`), sparse (`sparse_embedding`: token ids and weights,
with `return_tokens` their strings) and multi_vector (`multi_vector`: one vector per token).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from .. import errors, images, prompts, tracing
from ..encoding import EmbeddingType, encode_types, encode_vectors
from ..engines import Capability, Embedder, ImageEmbedder, ModelEngine
from ..engines.base import (
    DENSE,
    EMBEDDING_OUTPUTS,
    MULTI_VECTOR,
    SPARSE,
    MultiOutputEmbedder,
    SparseEmbedding,
    TextEmbeddings,
)
from ..engines.tokenization import Text, counted
from ..images import ImageRef, is_image_data_uri
from ..limits import (
    ENVELOPE_BYTES,
    FLOAT_BYTES,
    ITEM_OVERHEAD_BYTES,
    Limits,
    check_answer_bytes,
)
from . import long_inputs
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
    check_request_tokens,
    created,
    model_for,
    off_loop,
    parse,
    usage,
)
from .long_inputs import LongInputs

T = TypeVar("T")

EmbeddingOutput = Literal["dense", "sparse", "multi_vector"]
assert get_args(EmbeddingOutput) == EMBEDDING_OUTPUTS

INPUT_SHAPES = (
    "a string, an array of strings and image objects, an array of token ids, or an array of "
    "arrays of token ids"
)
OBJECT_TYPES = "text, image or image_url"


def _is_token_id(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass: reject it


def _token_list(value: list, where: str) -> list[int]:
    if not value:
        raise ValueError(f"{where} is an empty array of token ids")
    if not all(_is_token_id(v) for v in value):
        raise ValueError(f"{where} must hold only integer token ids")
    return value


def _object_item(value: dict, i: int) -> str | ImageRef:
    """An item sent as an object: {"type": "text", "text": ...}, {"type": "image", "image": ...}
    or {"type": "image_url", "image_url": {"url": ...}} (the image_url may be a plain string)."""
    kind = value.get("type")
    if kind == "text":
        text = value.get("text")
        if not isinstance(text, str) or not text:
            raise ValueError(f"item {i} of type text needs a non-empty string 'text'")
        return text
    if kind == "image":
        source = value.get("image")
    elif kind == "image_url":
        source = value.get("image_url")
        if isinstance(source, dict):
            source = source.get("url")
    else:
        raise ValueError(f"item {i} is an object whose 'type' is not {OBJECT_TYPES}")
    if not isinstance(source, str) or not source:
        raise ValueError(f"item {i} of type {kind} needs a non-empty string data URI or URL")
    return ImageRef(source)


class EmbeddingRequest(RequestModel):
    model: ModelName | None = None
    # Infinity's field: "image" makes every string item an image (a data URI or URL), "text" every
    # one a text; unset, a string is an image only when it is an image data URI. Before `input`,
    # whose validator reads it.
    modality: Literal["text", "image"] | None = None
    # Normalised by the validator to a list of strings and images or a list of token-id lists.
    input: list[str | ImageRef] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    # An extension (TEI's field): unit vectors (true) or the model's own output (false); unset, what
    # the model's own modules give (Embedder.normalized).
    normalize: bool | None = None
    user: str | None = None
    # Instruction-aware models (see prompts.py).
    instruction: str | None = None
    prompt_type: str | None = None
    # Over-long inputs: cut to the model's maximum length (True) or refuse the request (False).
    truncate: bool = True
    # An extension (long_inputs.py): what texts over the model's maximum get, "truncate",
    # "chunk" (window by window) or "error"; unset, `truncate` false refuses, else LONG_INPUTS.
    long_inputs: LongInputs | None = None
    # An extension (long_inputs.py): `input` is the chunks of one document, in order, each
    # embedded in the document's context.
    late_chunking: bool = False
    # An extension (Cohere's types): each item's "embedding" is then an object, one entry a type.
    embedding_types: list[EmbeddingType] | None = Field(default=None, min_length=1)
    # An extension (bge-m3): the outputs each item carries, one name or a list; dense by default.
    output: list[EmbeddingOutput] | None = Field(default=None, min_length=1)
    # With the sparse output: each token id's string too, as the tokenizer decodes it alone.
    return_tokens: bool = False

    @field_validator("output", mode="before")
    @classmethod
    def _one_output_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("input", mode="before")
    @classmethod
    def _normalise_input(
        cls, value: Any, info: ValidationInfo
    ) -> list[str | ImageRef] | list[list[int]]:
        modality = info.data.get("modality")
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"must be {INPUT_SHAPES}")
        if not value:
            raise ValueError("must not be an empty array")
        first = value[0]
        if isinstance(first, (str, dict)):
            items: list[str | ImageRef] = []
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    items.append(_object_item(item, i))
                elif not isinstance(item, str):
                    raise ValueError(
                        f"item {i} is not a string or an object; arrays must not mix types"
                    )
                elif not item:
                    raise ValueError(f"item {i} is an empty string")
                elif modality == "image" or (modality is None and is_image_data_uri(item)):
                    items.append(ImageRef(item))
                else:
                    items.append(item)
            if modality == "text" and any(isinstance(item, ImageRef) for item in items):
                raise ValueError('holds an image object, but "modality" is "text"')
            return items
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

    @property
    def outputs(self) -> frozenset[str]:
        return frozenset(self.output) if self.output else frozenset({DENSE})

    def normalized(self, model: Embedder) -> bool:
        """Whether the answer's dense vectors are unit vectors."""
        return model.normalized if self.normalize is None else self.normalize


# ------------------------------------------------------------------------------------ the answer


def vector_bytes(dimensions: int, encoding_format: str) -> int:
    """An upper estimate of the JSON size of one encoded vector."""
    if encoding_format == "base64":
        return 4 * math.ceil(4 * dimensions / 3) + 2
    return FLOAT_BYTES * dimensions


def answer_bytes(count: int, dimensions: int, encoding_format: str) -> int:
    """An upper estimate of the JSON size of an embeddings answer."""
    per_vector = vector_bytes(dimensions, encoding_format)
    return ENVELOPE_BYTES + count * (per_vector + ITEM_OVERHEAD_BYTES)


def check_answer_size(count: int, dimensions: int, encoding_format: str, limits: Limits) -> None:
    """Refuse an answer RunPod could not carry, before any work is done."""
    check_answer_bytes(
        answer_bytes(count, dimensions, encoding_format),
        limits,
        answer=f"the answer ({count} vectors of {dimensions} numbers)",
        advice=_smaller(encoding_format, "send fewer inputs or ask for fewer 'dimensions'"),
        param="input",
    )


def _smaller(encoding_format: str, advice: str) -> str:
    """How to ask for a smaller answer: base64 first, when the request asks for floats."""
    if encoding_format == "base64":
        return advice
    return 'ask for "encoding_format": "base64" (about 3x smaller), ' + advice


def embedding_response(model: str, vectors: list, tokens: int) -> dict[str, Any]:
    data = [
        {"object": "embedding", "embedding": vector, "index": i} for i, vector in enumerate(vectors)
    ]
    return response(model, data, tokens)


def response(model: str, data: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
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


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


def _dense(vectors: np.ndarray, request: EmbeddingRequest, model: Embedder) -> np.ndarray:
    """The model's dense vectors as the request asks them: cut to `dimensions` (Matryoshka), and
    L2-normalised when the answer is normalised (`normalize`) and the model's are not, or are cut:
    sentence-transformers' `truncate_dim` with `normalize_embeddings`."""
    size = vectors.shape[1]
    cut = request.dimensions is not None and request.dimensions != size
    if cut:
        _check_dimensions(request.dimensions, size, model)
        vectors = vectors[:, : request.dimensions]
    if request.normalized(model) and (cut or not model.normalized):
        return _unit(vectors)
    return vectors


@dataclass(frozen=True)
class Embedded:
    """What an embeddings request computed: its model, one vector a row, the tokens it used."""

    model: ModelEngine
    vectors: np.ndarray
    tokens: int


def _check_image_model(
    model: ModelEngine, image_items: list[tuple[int, ImageRef]], limits: Limits
) -> None:
    """Refuse images a model cannot take, and URLs the worker may not fetch, before any work."""
    if not image_items:
        return
    first = image_items[0][0]
    if not model.can(Capability.EMBED_IMAGES):
        raise errors.invalid_input(
            f"'input' item {first} is an image, and model '{model.served_id}' embeds only texts",
            param="input",
            code="model_not_image_embedding",
        )
    urls = [i for i, ref in image_items if not ref.is_data_uri]
    if urls and not limits.image_url_hosts:
        raise errors.invalid_input(
            f"'input' item {urls[0]} is an image URL, and this worker fetches none (no "
            "IMAGE_URL_HOSTS); send the image as a data URI (data:image/png;base64,...)",
            param="input",
        )


async def _prepared_images(
    model: ImageEmbedder, image_items: list[tuple[int, ImageRef]], limits: Limits
) -> list[Any]:
    """Every image item fetched or unpacked, decoded and made the model's input, in order."""
    return await images.prepare_all(image_items, model.prepare_image, limits)


def _prompted_tokens(
    model: Embedder, texts: list[str], instruction: str | None, prompt_type: str | None
) -> tuple[list[Text], list[int]]:
    """The texts with the model's prompt, as the engine gets them, and their token counts: one
    call, so that a large request does both in one thread."""
    prompted = prompts.apply_embedding_prompt(model, texts, instruction, prompt_type)
    return model.tokens.tokenize(prompted)


@dataclass(frozen=True)
class Counted:
    """An embeddings request checked and counted, ready for its model: the texts as the model
    gets them (texts only), each item's token count (untruncated; an image's is 0), the tokens
    the model will see, and the image items by their index."""

    model: Embedder
    texts: list[Text]
    lengths: list[int]
    tokens: int
    images: list[tuple[int, ImageRef]]
    windowed: bool = False  # texts over the model's maximum go window by window


def _check_outputs(model: Embedder, request: EmbeddingRequest) -> None:
    outputs = request.outputs
    missing = [name for name in EMBEDDING_OUTPUTS if name in outputs - model.outputs]
    if missing:
        raise errors.invalid_input(
            f"model '{model.served_id}' has no {' or '.join(missing)} output (it gives "
            f"{', '.join(o for o in EMBEDDING_OUTPUTS if o in model.outputs)}); a model of "
            "bge-m3's layout gives dense, sparse and multi_vector",
            param="output",
        )
    if request.return_tokens and SPARSE not in outputs:
        raise errors.invalid_input(
            "'return_tokens' needs \"sparse\" in 'output'", param="return_tokens"
        )
    if request.embedding_types is not None and DENSE not in outputs:
        raise errors.invalid_input(
            "'embedding_types' needs \"dense\" in 'output'", param="embedding_types"
        )


async def count(context: Context, request: EmbeddingRequest) -> Counted:
    """The checks of an embeddings request before its model is called, in the documented order;
    `request.encoding_format` is the format the answer size is estimated for."""
    limits = context.limits
    image_items = [(i, item) for i, item in enumerate(request.input) if isinstance(item, ImageRef)]
    # Unnamed, a request with images goes to the model that takes them, if one is served; a model
    # that takes none is refused below, naming the first image.
    image_models = any(m.can(Capability.EMBED_IMAGES) for m in context.registry.models)
    by_images = image_items and request.model is None and image_models
    capability = Capability.EMBED_IMAGES if by_images else Capability.EMBED
    model = model_for(context.registry, request.model, capability)
    assert isinstance(model, Embedder)
    _check_outputs(model, request)
    check_count(len(request.input), limits, "input")
    _check_image_model(model, image_items, limits)
    if model.dimensions is not None:
        _check_dimensions(request.dimensions, model.dimensions, model)
    dimensions = request.dimensions or model.dimensions
    # Vectors in the answer: one per input for each embedding type asked.
    count = len(request.input) * len(set(request.embedding_types or ["float"]))
    if dimensions is not None and DENSE in request.outputs:
        check_answer_size(count, dimensions, request.encoding_format, limits)
    # A queue without room for the inputs at one token each refuses before they are counted.
    model.check_room(len(request.input), len(request.input))

    if request.is_tokens:
        # The caller built these tokens: never prefixed.
        token_lists: list[list[int]] = request.input  # type: ignore[assignment]
        lengths = [len(ids) for ids in token_lists]
        decoded = await off_loop(sum(lengths), _texts_from_token_ids, model, token_lists)
        texts = counted(decoded, lengths)
    else:
        plain = [item for item in request.input if isinstance(item, str)]
        with tracing.phase("tokenize"):
            texts, lengths = await off_loop(
                chars(plain),
                _prompted_tokens,
                model,
                plain,
                request.instruction,
                request.prompt_type,
            )
    if image_items:
        # An image counts no tokens; the lengths keep each text at its item's index.
        text_lengths = iter(lengths)
        lengths = [
            0 if isinstance(item, ImageRef) else next(text_lengths) for item in request.input
        ]
    mode = long_inputs.long_mode(request.long_inputs, request.truncate, model)
    if mode == long_inputs.CHUNK and any(n > model.max_length for n in lengths):
        tokens = long_inputs.check_chunked(model, lengths, limits, "input")
        return Counted(model, texts, lengths, tokens, image_items, windowed=True)
    tokens = check_lengths(model, lengths, mode != "error", limits, "input")
    return Counted(model, texts, lengths, tokens, image_items)


async def embed(context: Context, request: EmbeddingRequest) -> Embedded:
    """The checks and the engine call of a request for dense vectors; every route that embeds uses
    it."""
    if request.late_chunking:
        return await _embed_late_chunked(context, request)
    counted = await count(context, request)
    model = counted.model
    if counted.windowed:
        vectors = await long_inputs.embed_windowed(
            model, counted.texts, counted.lengths, tokens=counted.tokens
        )
    elif counted.images:
        assert isinstance(model, ImageEmbedder)
        prepared = iter(await _prepared_images(model, counted.images, context.limits))
        texts = iter(counted.texts)
        inputs = [next(prepared if isinstance(item, ImageRef) else texts) for item in request.input]
        vectors = await model.embed_inputs(inputs, tokens=counted.tokens)
    else:
        vectors = await model.embed(counted.texts, tokens=counted.tokens)
    vectors = _dense(vectors, request, model)
    if request.dimensions is None and model.dimensions is None:
        check_answer_size(len(vectors), vectors.shape[1], request.encoding_format, context.limits)
    check_finite(vectors, model)
    return Embedded(model, vectors, counted.tokens)


async def _embed_late_chunked(context: Context, request: EmbeddingRequest) -> Embedded:
    """`input` as the chunks of one document, each embedded in the document's context."""
    limits = context.limits
    model = model_for(context.registry, request.model, Capability.EMBED)
    assert isinstance(model, Embedder)
    if request.outputs != {DENSE}:
        raise errors.invalid_input("late chunking gives the dense output only", param="output")
    if request.is_tokens or any(isinstance(item, ImageRef) for item in request.input):
        raise errors.invalid_input(
            "late chunking takes 'input' as an array of texts, the chunks of one document",
            param="input",
        )
    check_count(len(request.input), limits, "input")
    if model.dimensions is not None:
        _check_dimensions(request.dimensions, model.dimensions, model)
        vectors_out = len(request.input) * len(set(request.embedding_types or ["float"]))
        size = request.dimensions or model.dimensions
        check_answer_size(vectors_out, size, request.encoding_format, limits)
    model.check_room(len(request.input), len(request.input))
    prefix = prompts.embedding_prefix(model, request.instruction, request.prompt_type)
    chunks: list[str] = request.input  # type: ignore[assignment]
    counted = await long_inputs.count_late_chunks(model, chunks, prefix, limits, "input")
    check_request_tokens(counted.tokens, limits, "input")
    done = await long_inputs.late_chunk(model, counted)
    vectors = _dense(done.vectors, request, model)
    check_finite(vectors, model)
    return Embedded(model, vectors, done.tokens)


async def create_embeddings(context: Context, body: dict[str, Any]) -> dict[str, Any]:
    request = await parse(EmbeddingRequest, body)
    if request.outputs != {DENSE} and not request.late_chunking:
        return await _create_multi_output(context, request)
    done = await embed(context, request)
    encoded = await encoded_off_loop(done.vectors, _encode_dense, request)
    return embedding_response(done.model.served_id, encoded, done.tokens)


# Numbers an answer encodes on the event loop: about 1 ms of orjson in "float". A larger answer is
# encoded in a thread, ENCODE_CHUNK numbers a call: orjson holds the GIL for a whole call, so
# chunks let the loop in between (2048 vectors of 1024 floats: 0.35 s in one call).
ENCODE_INLINE_NUMBERS = 8192
ENCODE_CHUNK = 16_384


async def encoded_off_loop(
    vectors: np.ndarray, encode: Callable[..., list[T]], *args: Any
) -> list[T]:
    """`encode(vectors, *args)`, one item a row: inline for a small answer, else in a thread, a
    chunk of rows at a time."""
    if vectors.size <= ENCODE_INLINE_NUMBERS:
        return encode(vectors, *args)
    return await asyncio.to_thread(_encode_chunked, vectors, encode, *args)


def _encode_chunked(vectors: np.ndarray, encode: Callable[..., list[T]], *args: Any) -> list[T]:
    """`encode(vectors, *args)`, ENCODE_CHUNK numbers a call."""
    rows = max(1, ENCODE_CHUNK // max(1, vectors.shape[1]))
    encoded: list[T] = []
    for start in range(0, len(vectors), rows):
        encoded.extend(encode(vectors[start : start + rows], *args))
    return encoded


def _encode_dense(vectors: np.ndarray, request: EmbeddingRequest) -> list:
    if request.embedding_types is None:
        return encode_vectors(vectors, request.encoding_format)
    by_type = encode_types(
        vectors, list(dict.fromkeys(request.embedding_types)), request.encoding_format
    )
    return [{kind: values[i] for kind, values in by_type.items()} for i in range(len(vectors))]


# ------------------------------------------------------------------------------------ multi-output

# A sparse entry in JSON: a token id of up to 7 digits and its separator, its weight, and with
# `return_tokens` its string (a few characters; 32 covers the long ones, escaped).
SPARSE_ENTRY_BYTES = 9 + FLOAT_BYTES
TOKEN_STRING_BYTES = 32


def _check_multi_output_size(counted: Counted, request: EmbeddingRequest, limits: Limits) -> None:
    """Refuse an answer RunPod could not carry, from the token counts, before the model runs."""
    model = counted.model
    assert isinstance(model, MultiOutputEmbedder)
    dimensions = request.dimensions or model.dimensions or 0
    tokens = [min(n, model.max_length) for n in counted.lengths]
    estimate = ENVELOPE_BYTES + len(tokens) * ITEM_OVERHEAD_BYTES
    if DENSE in request.outputs:
        estimate += len(tokens) * vector_bytes(dimensions, request.encoding_format)
    if SPARSE in request.outputs:
        per_entry = SPARSE_ENTRY_BYTES + TOKEN_STRING_BYTES * request.return_tokens
        estimate += sum(tokens) * per_entry
    if MULTI_VECTOR in request.outputs:
        per_vector = vector_bytes(model.multi_vector_dimensions, request.encoding_format)
        estimate += sum(n - 1 for n in tokens) * per_vector
    outputs = ", ".join(o for o in EMBEDDING_OUTPUTS if o in request.outputs)
    check_answer_bytes(
        estimate,
        limits,
        answer=f"the answer ({outputs} of {len(tokens)} inputs, {sum(tokens)} tokens)",
        advice=_smaller(
            request.encoding_format, "send fewer or shorter inputs, or ask for fewer outputs"
        ),
        param="input",
    )


def _encode_sparse(
    model: MultiOutputEmbedder, sparse: SparseEmbedding, return_tokens: bool
) -> dict[str, Any]:
    encoded: dict[str, Any] = {
        "indices": sparse.indices.tolist(),
        "values": encode_vectors(sparse.values[None, :], "float")[0],
    }
    if return_tokens:
        encoded["tokens"] = model.token_strings(encoded["indices"])
    return encoded


async def _create_multi_output(context: Context, request: EmbeddingRequest) -> dict[str, Any]:
    counted = await count(context, request)
    model = counted.model
    assert isinstance(model, MultiOutputEmbedder)  # _check_outputs made sure
    outputs = request.outputs
    _check_multi_output_size(counted, request, context.limits)
    embedded: list[TextEmbeddings] = await model.embed_outputs(
        counted.texts, outputs, tokens=counted.tokens
    )
    numbers = sum(
        (e.dense.size if e.dense is not None else 0)
        + (e.sparse.values.size if e.sparse is not None else 0)
        + (e.multi_vector.size if e.multi_vector is not None else 0)
        for e in embedded
    )
    if numbers <= ENCODE_INLINE_NUMBERS:
        data = _multi_output_data(model, request, embedded)
    else:
        data = await asyncio.to_thread(_multi_output_data, model, request, embedded)
    return response(model.served_id, data, counted.tokens)


def _multi_output_data(
    model: MultiOutputEmbedder, request: EmbeddingRequest, embedded: list[TextEmbeddings]
) -> list[dict[str, Any]]:
    """The answer's items; each matrix encoded ENCODE_CHUNK numbers a call."""
    outputs = request.outputs
    data: list[dict[str, Any]] = [{"object": "embedding"} for _ in embedded]
    if DENSE in outputs:
        dense = _dense(np.stack([e.dense for e in embedded if e.dense is not None]), request, model)
        check_finite(dense, model)
        for item, vector in zip(data, _encode_chunked(dense, _encode_dense, request)):
            item["embedding"] = vector
    for item, text in zip(data, embedded):
        if text.sparse is not None:
            check_finite(text.sparse.values, model)
            item["sparse_embedding"] = _encode_sparse(model, text.sparse, request.return_tokens)
        if text.multi_vector is not None:
            check_finite(text.multi_vector, model)
            item["multi_vector"] = _encode_chunked(
                text.multi_vector, encode_vectors, request.encoding_format
            )
    for i, item in enumerate(data):
        item["index"] = i
    return data


def estimate_answer(context: Context, body: dict[str, Any]) -> int:
    """An upper estimate of the answer to `body`, from its fields and its model's dimensions, as
    `count` estimates it; without dimensions (a model that declares none), the envelope. Reads
    no text: a batch job estimates every line's answer before any line runs."""
    value = body.get("input")
    if isinstance(value, list) and value and not _is_token_id(value[0]):
        items = len(value)
    else:
        items = 1  # a string, or one list of token ids
    check_count(items, context.limits, "input")
    output = body.get("output")
    if output is not None and "dense" not in (output if isinstance(output, list) else [output]):
        return ENVELOPE_BYTES + items * ITEM_OVERHEAD_BYTES  # sparse and multi_vector aside
    name = body.get("model")
    model = model_for(context.registry, name if isinstance(name, str) else None, Capability.EMBED)
    dimensions = body.get("dimensions")
    if type(dimensions) is not int or dimensions < 1:
        dimensions = model.dimensions
    if dimensions is None:
        return ENVELOPE_BYTES + items * ITEM_OVERHEAD_BYTES
    types = body.get("embedding_types")
    vectors = items * (len(set(types)) if isinstance(types, list) and types else 1)
    fmt = "base64" if body.get("encoding_format") == "base64" else "float"
    check_answer_size(vectors, dimensions, fmt, context.limits)
    return answer_bytes(vectors, dimensions, fmt)


OPERATION = Operation(
    name="embeddings",
    run=create_embeddings,
    route="/v1/embeddings",
    job_fields=("input",),
    job_hint="'input' (embeddings; with a classifier, classification)",
    batch_line=True,
    answer_bytes=estimate_answer,
)
