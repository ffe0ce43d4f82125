"""The wire protocol: request models (validated) and response bodies (OpenAI / Cohere shapes).

Requests are pydantic models in strict mode: a JSON string is never silently turned into a number, a
bool into an int, or a float into an int. `parse()` turns any validation failure into one APIError
that names the field at fault.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import APIError, invalid_input

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


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, populate_by_name=True)


# Model ids are short; a longer one is refused before it can be echoed in an error message.
ModelName = Annotated[str, Field(min_length=1, max_length=256)]


class EmbeddingRequest(_Request):
    """POST /v1/embeddings, and the standard flavour's `{"model", "input", ...}`."""

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


class RerankRequest(_Request):
    """POST /v1/rerank (Cohere / Jina shape), and the standard flavour's `{"query", "docs"}`."""

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


RequestT = TypeVar("RequestT", bound=_Request)


def parse(model: type[RequestT], body: Any) -> RequestT:
    """Validate a request body; any failure becomes one invalid_input APIError naming the field."""
    if not isinstance(body, dict):
        raise invalid_input("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _to_api_error(exc) from None


def _to_api_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = [str(part) for part in first["loc"]]
    field = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    if first["type"] == "missing":
        message = f"'{where}' is required"
    else:
        text = first["msg"].removeprefix("Value error, ")
        message = f"'{where}': {text}"
    return invalid_input(message, param=field)


# --------------------------------------------------------------------------------------------- #
# Response bodies. Plain dicts: they are built for every request, and runpod serialises them with
# the standard json module; the keys follow the OpenAI and Cohere references.
# --------------------------------------------------------------------------------------------- #


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def embedding_response(model: str, vectors: list, tokens: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "embedding": vector, "index": i}
            for i, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": usage(tokens),
        "id": _id("embd"),
        "created": int(time.time()),
    }


def rerank_response(model: str, results: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    return {
        "object": "rerank",
        "model": model,
        "results": results,
        "usage": usage(tokens),
        "id": _id("rerank"),
        "created": int(time.time()),
    }


def model_list(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": models}
