"""Tokenize and detokenize: POST /tokenize and POST /detokenize at the root, as TEI and vLLM serve
them, each route in both servers' shapes, told apart by the body's fields.

- TEI: `/tokenize` takes `{"inputs": str | [str], "add_special_tokens", "prompt_name"}` and answers,
  for each input, its tokens as `{"id", "text", "special", "start", "stop"}`; `/detokenize` takes
  `{"ids": [int] | [[int]], "skip_special_tokens"}` and answers a list of strings.
- vLLM: `/tokenize` takes `{"model", "prompt", "add_special_tokens", "return_token_strs"}` and
  answers `{"tokens", "count", "max_model_len", "token_strs"}`; `/detokenize` takes
  `{"model", "tokens"}` and answers `{"prompt"}`.

A text is tokenized after the model's prompt, as an embeddings request with the same `prompt_type`
(TEI's `prompt_name`), `instruction` or Cohere's `input_type` prompts it, and with the model's own
preparation of the text: its tokens are the ones an embeddings request bills (each text up to the
model's maximum). Offsets are character offsets into the prompted text.

A standard-flavour job is a tokenize job by `prompt` (vLLM's field) and a detokenize job by
`tokens` or `ids`; after every other operation, so that none of their jobs is taken. TEI's
`inputs` is not recognised there: TEI's embed and other servers' requests hold it too, and a job
that meant to embed must not answer tokens. TEI's shape reaches `/tokenize` by `openai_route`.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, Field, field_validator

from .. import errors, prompts
from ..engines import Capability, ModelEngine, ModelRegistry
from ..engines.tokenization import Tokens
from ..limits import ENVELOPE_BYTES, Limits, check_answer_bytes, utf8_size
from .base import (
    Context,
    ModelName,
    Operation,
    RequestModel,
    chars,
    check_count,
    check_request_tokens,
    nonempty_texts,
    off_loop,
    parse,
)
from .cohere import PROMPTS_OF_INPUT_TYPE, InputType

# Upper estimates of a token's JSON bytes, in TEI's shape less its text, and as a vLLM id; a token
# string, or a decoded token, with its quotes and separator; an offset pair.
TEI_TOKEN_BYTES = 72
ID_BYTES = 8
TOKEN_STRING_BYTES = 32
OFFSET_BYTES = 24
# Special tokens a text may get, and the leading piece some tokenizers add (sentencepiece's "▁").
SPECIAL_TOKENS = 8


class _Prompted(RequestModel):
    model: ModelName | None = None
    add_special_tokens: bool = True
    # The model's prompt, as an embeddings request applies it (prompts.py); TEI names it
    # prompt_name.
    prompt_type: str | None = Field(
        default=None, validation_alias=AliasChoices("prompt_type", "prompt_name")
    )
    instruction: str | None = None
    input_type: InputType | None = None  # Cohere's, mapped as /v2/embed maps it


class TeiTokenizeRequest(_Prompted):
    inputs: list[str]

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> list[str]:
        return nonempty_texts(value)


class VllmTokenizeRequest(_Prompted):
    prompt: str = Field(min_length=1)
    return_token_strs: bool = False
    return_offsets: bool = False  # an extension: each token's [start, stop], null for an added one


def _ids(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty array of token ids")
    if not all(type(v) is int for v in value):  # bool is an int subclass: refused
        raise ValueError(f"{where} must hold only integer token ids")
    return value


class TeiDetokenizeRequest(RequestModel):
    model: ModelName | None = None
    ids: list[list[int]]
    skip_special_tokens: bool = True

    @field_validator("ids", mode="before")
    @classmethod
    def _id_lists(cls, value: Any) -> list[list[int]]:
        if isinstance(value, list) and value and isinstance(value[0], list):
            return [_ids(item, f"item {i}") for i, item in enumerate(value)]
        return [_ids(value, "it")]


class VllmDetokenizeRequest(RequestModel):
    model: ModelName | None = None
    tokens: list[int]
    skip_special_tokens: bool = False  # an extension: vLLM decodes every token

    @field_validator("tokens", mode="before")
    @classmethod
    def _token_ids(cls, value: Any) -> list[int]:
        return _ids(value, "it")


# ------------------------------------------------------------------------------------ the model


def _model(registry: ModelRegistry, name: str | None) -> ModelEngine:
    """The model a request names, whatever it does (every model has a tokenizer); unnamed, the
    only model served, or else the only embedder."""
    if name is not None:
        return registry.resolve(name, Capability.EMBED)  # a name finds any served model
    models = registry.models
    embedders = [m for m in models if m.can(Capability.EMBED)]
    if len(models) == 1:
        return models[0]
    if len(embedders) == 1:
        return embedders[0]
    raise errors.invalid_input(
        f"'model' is required: several models are served: {', '.join(registry.ids)}",
        param="model",
    )


def _tokenizing_model(registry: ModelRegistry, name: str | None) -> ModelEngine:
    model = _model(registry, name)
    if not model.tokens.has_offsets:
        raise errors.invalid_input(
            f"model '{model.served_id}' has no fast tokenizer, which tokenize needs",
            param="model",
        )
    return model


def _prompt_type(model: ModelEngine, request: _Prompted) -> str | None:
    if request.prompt_type is not None or request.input_type is None:
        return request.prompt_type
    names = PROMPTS_OF_INPUT_TYPE[request.input_type]
    return next((name for name in names if name in model.prompts), None)


# ------------------------------------------------------------------------------------ tokenize


def _check_tokens(tokens: list[Tokens], limits: Limits, param: str) -> int:
    """The tokens of a request in all, at most MAX_REQUEST_TOKENS: the answer lists each one."""
    total = sum(len(each.ids) for each in tokens)
    check_request_tokens(total, limits, param)
    return total


def _check_answer(estimate: int, limits: Limits, param: str) -> None:
    check_answer_bytes(
        estimate, limits, answer="the answer", advice="send fewer or shorter texts", param=param
    )


def _token_bytes(request: _Prompted) -> int:
    """An upper estimate of one token's JSON bytes in the answer, its text in TEI's shape aside."""
    if isinstance(request, VllmTokenizeRequest):
        return (
            ID_BYTES
            + TOKEN_STRING_BYTES * request.return_token_strs
            + OFFSET_BYTES * request.return_offsets
        )
    return TEI_TOKEN_BYTES


async def _tokenized(
    context: Context, request: _Prompted, texts: list[str], param: str
) -> tuple[ModelEngine, list[str], list[Tokens]]:
    """The checks and the tokens of a tokenize request: the model, the prompted texts and their
    tokens."""
    model = _tokenizing_model(context.registry, request.model)
    check_count(len(texts), context.limits, param)
    prompt_type = _prompt_type(model, request)
    prefix = prompts.embedding_prefix(model, request.instruction, prompt_type)
    prompted = [prefix + text for text in texts] if prefix else texts
    tokens = await off_loop(
        chars(prompted), model.tokens.tokens_of, prompted, request.add_special_tokens
    )
    total = _check_tokens(tokens, context.limits, param)
    text_bytes = sum(map(utf8_size, prompted)) if isinstance(request, TeiTokenizeRequest) else 0
    estimate = ENVELOPE_BYTES + total * _token_bytes(request) + text_bytes + text_bytes // 8
    _check_answer(estimate, context.limits, param)
    return model, prompted, tokens


def _tei_tokens(text: str, tokens: Tokens) -> list[dict[str, Any]]:
    """TEI's tokens: a special token added by the tokenizer has no offsets and its own string; any
    other token's text is the slice of the prompted text its offsets span."""
    out = []
    for id_, string, special, (start, stop) in zip(
        tokens.ids, tokens.strings, tokens.special, tokens.offsets
    ):
        added = special and start == stop
        out.append(
            {
                "id": id_,
                "text": string if added else text[start:stop],
                "special": special,
                "start": None if added else start,
                "stop": None if added else stop,
            }
        )
    return out


async def tokenize_texts(context: Context, body: dict[str, Any]) -> dict[str, Any] | list[Any]:
    if isinstance(body, dict) and "inputs" in body:
        tei = await parse(TeiTokenizeRequest, body)
        _, prompted, found = await _tokenized(context, tei, tei.inputs, "inputs")
        return await off_loop(
            sum(len(t.ids) for t in found),
            lambda: [_tei_tokens(text, each) for text, each in zip(prompted, found)],
        )
    request = await parse(VllmTokenizeRequest, body)
    model, _, (tokens,) = await _tokenized(context, request, [request.prompt], "prompt")
    answer: dict[str, Any] = {
        "count": len(tokens.ids),
        "max_model_len": model.max_length,
        "tokens": tokens.ids,
        "token_strs": tokens.strings if request.return_token_strs else None,
    }
    if request.return_offsets:
        answer["offsets"] = [
            None if special and start == stop else [start, stop]
            for special, (start, stop) in zip(tokens.special, tokens.offsets)
        ]
    return answer


# ------------------------------------------------------------------------------------ detokenize


def _decoded(model: ModelEngine, id_lists: list[list[int]], skip: bool, param: str) -> list[str]:
    vocab = model.tokens.vocab_size
    for i, ids in enumerate(id_lists):
        for token in ids:
            if not 0 <= token < vocab:
                raise errors.invalid_input(
                    f"'{param}' item {i} holds token id {token}, outside the model's vocabulary "
                    f"(0 to {vocab - 1})",
                    param=param,
                )
    return [model.tokens.decode(ids, skip_special_tokens=skip) for ids in id_lists]


async def detokenize_ids(context: Context, body: dict[str, Any]) -> dict[str, Any] | list[Any]:
    tei = isinstance(body, dict) and "ids" in body
    request: TeiDetokenizeRequest | VllmDetokenizeRequest
    if tei:
        request = await parse(TeiDetokenizeRequest, body)
        id_lists, param = request.ids, "ids"
    else:
        request = await parse(VllmDetokenizeRequest, body)
        id_lists, param = [request.tokens], "tokens"
    model = _model(context.registry, request.model)
    limits = context.limits
    check_count(len(id_lists), limits, param)
    total = sum(map(len, id_lists))
    check_request_tokens(total, limits, param, "token ids")
    texts = await off_loop(total, _decoded, model, id_lists, request.skip_special_tokens, param)
    size = sum(map(utf8_size, texts))
    _check_answer(ENVELOPE_BYTES + size + size // 8, limits, param)
    return texts if tei else {"prompt": texts[0]}


# ------------------------------------------------------------------------------------ batch lines


def estimate_tokenize(context: Context, body: dict[str, Any]) -> int:
    """An upper estimate of a tokenize answer from its fields, reading no text: a token spans at
    least a byte of the prompted text, or is one of the special tokens added to it."""
    tei = "inputs" in body
    value = body.get("inputs") if tei else body.get("prompt")
    items = value if isinstance(value, list) else [value]
    check_count(len(items), context.limits, "inputs" if tei else "prompt")
    name = body.get("model")
    model = _model(context.registry, name if isinstance(name, str) else None)
    instruction = body.get("instruction")
    prefix = max(map(utf8_size, model.prompts.values()), default=0)
    if isinstance(instruction, str):
        prefix += utf8_size(instruction)
    texts = [utf8_size(item) if isinstance(item, str) else 0 for item in items]
    tokens = sum(texts) + len(texts) * (prefix + SPECIAL_TOKENS)
    if tei:
        text_bytes = sum(texts) + len(texts) * prefix
        return ENVELOPE_BYTES + tokens * TEI_TOKEN_BYTES + text_bytes + text_bytes // 8
    per_token = (
        ID_BYTES
        + TOKEN_STRING_BYTES * (body.get("return_token_strs") is True)
        + OFFSET_BYTES * (body.get("return_offsets") is True)
    )
    return ENVELOPE_BYTES + tokens * per_token


def estimate_detokenize(context: Context, body: dict[str, Any]) -> int:
    """An estimate of a detokenize answer from its fields: a decoded token of TOKEN_STRING_BYTES
    each."""
    value = body.get("ids", body.get("tokens"))
    if not isinstance(value, list):
        return ENVELOPE_BYTES
    lists = value if value and isinstance(value[0], list) else [value]
    check_count(len(lists), context.limits, "ids" if "ids" in body else "tokens")
    ids = sum(len(item) if isinstance(item, list) else 1 for item in lists)
    return ENVELOPE_BYTES + ids * TOKEN_STRING_BYTES


OPERATION = Operation(
    name="tokenize",
    run=tokenize_texts,
    route="/tokenize",
    job_fields=("prompt",),
    job_hint="'prompt' (tokenize)",
    batch_line=True,
    answer_bytes=estimate_tokenize,
    scheduled=False,  # no model work: the tokenizer alone
)
DETOKENIZE = Operation(
    name="detokenize",
    run=detokenize_ids,
    route="/detokenize",
    job_fields=("tokens", "ids"),
    job_hint="'tokens' or 'ids' (detokenize)",
    batch_line=True,
    answer_bytes=estimate_detokenize,
    scheduled=False,
)
