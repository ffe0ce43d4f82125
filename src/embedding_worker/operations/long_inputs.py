"""Inputs longer than the model's maximum, and chunks embedded in their document's context: the
checks and engine calls behind `/v1/embeddings`' `long_inputs` and `late_chunking` fields and
behind `/v1/contextualizedembeddings` (docs/long-inputs.md).

- `long_inputs`: "truncate" cuts a text to the model's maximum (the default, LONG_INPUTS per
  model), "error" refuses it, "chunk" embeds it window by window (`TokenPass.chunked`). Texts
  within the maximum are embedded as always; only the longer ones go window by window.
- `late_chunking`: the request's texts are the chunks of one document, encoded together and each
  pooled from its own tokens (`TokenPass.late_chunked`); mean-pooled models only.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .. import errors
from ..engines import Embedder
from ..engines.token_pass import MEAN, PassResult, TokenPass
from ..engines.tokenization import Text
from ..limits import Limits
from .base import chars, check_request_tokens, off_loop

LongInputs = Literal["truncate", "chunk", "error"]
CHUNK = "chunk"


def long_mode(requested: LongInputs | None, truncate: bool, model: Embedder) -> str:
    """What a request does with texts over the model's maximum: its `long_inputs`, else "error"
    where it says `truncate: false`, else the model's LONG_INPUTS."""
    if requested is not None:
        return requested
    if not truncate:
        return "error"
    return model.spec.long_inputs


def token_pass_of(model: Embedder, what: str, param: str) -> TokenPass:
    """The model's token pass, or the error of a model that has none."""
    if model.token_pass is None:
        raise errors.invalid_input(
            f"model '{model.served_id}' cannot {what}: it is not a sentence-transformers "
            "model with a Transformer and a Pooling module",
            param=param,
        )
    return model.token_pass


def _check_input_tokens(tokens: int, limits: Limits, where: str, param: str) -> None:
    if tokens > limits.max_input_tokens:
        raise errors.invalid_input(
            f"{where} has {tokens} tokens, more than the limit of {limits.max_input_tokens} "
            "(MAX_INPUT_TOKENS); shorten it",
            param=param,
            code="context_length_exceeded",
        )


def check_chunked(model: Embedder, lengths: list[int], limits: Limits, param: str) -> int:
    """The limits of a request whose long texts go window by window: each text at most
    MAX_INPUT_TOKENS, and every token embedded (special tokens of each window included) within
    MAX_REQUEST_TOKENS. Returns the tokens embedded."""
    run = token_pass_of(model, 'embed texts window by window ("long_inputs": "chunk")', param)
    total = 0
    for i, tokens in enumerate(lengths):
        _check_input_tokens(tokens, limits, f"'{param}' item {i}", param)
        total += tokens if tokens <= model.max_length else run.window_tokens(tokens)
    check_request_tokens(total, limits, param)
    return total


async def embed_windowed(
    model: Embedder, texts: list[Text], lengths: list[int], *, tokens: int
) -> np.ndarray:
    """Vectors for `texts`, in order: those within the model's maximum as the engine embeds
    them, the longer ones window by window."""
    run = model.token_pass
    assert run is not None  # check_chunked made sure
    long_rows = [i for i, n in enumerate(lengths) if n > model.max_length]
    short_rows = [i for i, n in enumerate(lengths) if n <= model.max_length]
    long_tokens = sum(run.window_tokens(lengths[i]) for i in long_rows)
    long_texts = [texts[i].text for i in long_rows]
    contents = await off_loop(chars(long_texts), model.tokens.content_ids, long_texts)
    windowed = model.embed_chunked(contents, tokens=long_tokens)
    if not short_rows:
        return (await windowed).vectors
    plain = model.embed([texts[i] for i in short_rows], tokens=tokens - long_tokens)
    long_done, short_done = await asyncio.gather(windowed, plain)
    vectors = np.empty((len(texts), long_done.vectors.shape[1]), np.float32)
    vectors[long_rows] = long_done.vectors
    vectors[short_rows] = short_done
    return vectors


def _late_chunk_ids(
    model: Embedder, prefix: str, chunks: list[str]
) -> tuple[np.ndarray, list[np.ndarray]]:
    if not prefix:
        return np.zeros(0, np.int64), model.tokens.content_ids(chunks)
    ids = model.tokens.content_ids([prefix, *chunks])
    return ids[0], ids[1:]


@dataclass(frozen=True)
class LateChunks:
    """One document's chunks counted for late chunking: the prompt's content tokens (context
    that belongs to no chunk), each chunk's, and the tokens of the pass."""

    lead: np.ndarray
    chunks: list[np.ndarray]
    tokens: int


async def count_late_chunks(
    model: Embedder, chunks: list[str], prefix: str, limits: Limits, param: str
) -> LateChunks:
    """The checks of one late-chunked document: a mean-pooled model, no chunk without tokens,
    the document within MAX_INPUT_TOKENS. The request's total is the caller's to check."""
    run = token_pass_of(model, "late-chunk", "late_chunking")
    if run.pooling_mode != MEAN:
        raise errors.invalid_input(
            f"late chunking needs a mean-pooled model; model '{model.served_id}' pools with "
            f"{run.pooling_mode}",
            param="late_chunking",
        )
    size = chars(chunks) + len(prefix)
    lead, chunk_ids = await off_loop(size, _late_chunk_ids, model, prefix, chunks)
    for i, ids in enumerate(chunk_ids):
        if not len(ids):
            raise errors.invalid_input(f"'{param}' item {i} holds no tokens", param=param)
    content = len(lead) + sum(len(ids) for ids in chunk_ids)
    _check_input_tokens(content + run.frame.size, limits, "the document", param)
    return LateChunks(lead, chunk_ids, run.window_tokens(content + run.frame.size))


async def late_chunk(model: Embedder, counted: LateChunks) -> PassResult:
    """One vector per chunk of one document, each from the chunk's own tokens encoded with the
    whole document."""
    return await model.embed_late_chunked(counted.lead, counted.chunks, tokens=counted.tokens)
