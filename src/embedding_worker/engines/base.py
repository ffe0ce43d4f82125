"""The interface every served model has: capabilities, and admission of work.

A `ModelEngine` knows its tokenizer and maximum length and runs all work through `_admit()`, which
bounds the queue and the time of every call and fails waiting calls at once when the engine dies.
What a model can do is its set of `capabilities`: an engine that embeds is an `Embedder` (an
`ImageEmbedder` when it embeds images too), one that reranks a `Reranker`; a new kind of work is a
new capability with its own small base class here. An embedder with more than the dense vector
(bge-m3's sparse weights and per-token vectors) is a `MultiOutputEmbedder`: its `outputs` say which
of `EMBEDDING_OUTPUTS` it gives.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from .. import errors
from ..logs import get_logger
from .spec import EngineSettings, ModelSpec
from .tokenization import TokenCounter

if TYPE_CHECKING:
    from PIL.Image import Image

log = get_logger(__name__)

T = TypeVar("T")


class Capability(str, Enum):
    """One kind of work a model does; operations ask the registry for a model that has theirs."""

    EMBED = "embed"
    EMBED_IMAGES = "embed_images"  # images as well as texts, into the same vector space
    RERANK = "rerank"
    CLASSIFY = "classify"

    @property
    def noun(self) -> str:
        return {
            "embed": "an embedding",
            "embed_images": "an image embedding",
            "rerank": "a reranking",
            "classify": "a classification",
        }[self.value]


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model and the reason."""


@dataclass
class Health:
    """Set once an engine is stuck or dead: the worker then asks to be replaced."""

    healthy: bool = True
    reason: str | None = None

    def fail(self, reason: str) -> None:
        if self.healthy:
            log.error("worker marked unhealthy: %s", reason)
        self.healthy = False
        self.reason = reason


class ModelEngine(ABC):
    """One served model. Subclass `Embedder` and/or `Reranker` rather than this class."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    dimensions: int | None = None
    # Named prompts the model declares (sentence-transformers' config), e.g. {"query": "...", ...}.
    prompts: dict[str, str] = {}
    # The prompt sentence-transformers applies when none is named
    # (config_sentence_transformers.json).
    default_prompt_name: str | None = None

    def __init__(
        self,
        spec: ModelSpec,
        tokens: TokenCounter,
        max_length: int,
        *,
        settings: EngineSettings,
        health: Health,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.tokens = tokens
        self.max_length = max_length
        self.queue_size = settings.queue_size
        self.timeout_s = settings.timeout_s
        self.health = health
        self.pending = 0  # items admitted and not yet answered
        # The tasks waiting in _admit, cancelled at once when the engine is reported dead (instead
        # of each waiting for its timeout), and the loop they run on.
        self._admitted: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead_reason: str | None = None

    @property
    def served_id(self) -> str:
        return self.spec.served_id

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    @property
    def role(self) -> Capability:
        """The model's main capability, shown as `role` in /v1/models."""
        return min(self.capabilities, key=list(Capability).index)

    async def start(self) -> None:
        """Start work inside the running event loop; engines without a start step keep this."""

    async def stop(self) -> None:
        """Stop; engines with nothing to stop keep this."""

    def describe(self) -> dict[str, Any]:
        """This model's entry in /v1/models."""
        entry: dict[str, Any] = {
            "id": self.served_id,
            "object": "model",
            "created": 0,
            "owned_by": self.served_id.split("/")[0] if "/" in self.served_id else "local",
            "role": self.role.value,
            "capabilities": [c.value for c in Capability if c in self.capabilities],
            "max_input_tokens": self.max_length,
        }
        if self.dimensions is not None:
            entry["dimensions"] = self.dimensions
        return entry

    def report_dead(self, reason: str) -> None:
        """The engine cannot answer any more (e.g. a batch thread died). Safe from any thread."""
        self.health.fail(reason)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._fail_waiting, reason)

    def _fail_waiting(self, reason: str) -> None:
        # Cancelled calls see `_dead_reason` in _admit and answer 503 engine_failed.
        self._dead_reason = reason
        for task in self._admitted:
            task.cancel()

    async def _admit(self, items: int, call: Callable[[], Awaitable[T]]) -> T:
        """Bounded queue and bounded time for every engine call.

        Infinity's queue is unbounded (INFINITY_QUEUE_SIZE is read only by its own HTTP server), so
        the worker counts what it has handed over and refuses new work beyond the limit. A request
        is always admitted into an empty queue, so a single large request can never be refused
        forever. A call ends at the first of: its answer, REQUEST_TIMEOUT, or the engine reported
        dead (which cancels every waiting call). The call runs in the caller's task: this is on
        every request's path, and a task and `asyncio.wait` per call cost a quarter of the local
        server's event-loop time.
        """
        if not self.health.healthy:
            raise errors.unavailable(f"the worker is unhealthy ({self.health.reason}); retry")
        if self.pending and self.pending + items > self.queue_size:
            raise errors.overloaded(
                f"model '{self.served_id}' has {self.pending} inputs queued "
                f"(INFINITY_QUEUE_SIZE={self.queue_size}); retry later"
            )
        task = asyncio.current_task()
        assert task is not None
        self._loop = task.get_loop()
        self._admitted.add(task)
        self.pending += items
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                return (
                    await call()
                )  # cancelled with its items if it ends early: Infinity skips them
        except asyncio.CancelledError:
            if self._dead_reason is None:
                raise  # the caller was cancelled (a job cancelled, a client gone)
            task.uncancel()
            raise errors.unavailable(
                f"model '{self.served_id}' failed: {self._dead_reason}; the worker asks to be "
                "replaced, retry",
                code="engine_failed",
            ) from None
        except TimeoutError:
            message = f"model '{self.served_id}' did not answer within {self.timeout_s:g} s"
            self.health.fail(message)
            raise errors.unavailable(message, code="timeout") from None
        finally:
            self._admitted.discard(task)
            self.pending -= items
            elapsed_ms = 1e3 * (time.monotonic() - started)
            log.debug("%s: %d items in %.1f ms", self.served_id, items, elapsed_ms)


# What an embeddings request may ask of a model: the one vector of a text; its token weights (a
# sparse vector over the vocabulary); one vector per token (late interaction, ColBERT).
DENSE, SPARSE, MULTI_VECTOR = "dense", "sparse", "multi_vector"
EMBEDDING_OUTPUTS = (DENSE, SPARSE, MULTI_VECTOR)


class Embedder(ModelEngine):
    """A model that embeds texts: callers use `embed`, engines implement `_embed`."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.EMBED})
    outputs: ClassVar[frozenset[str]] = frozenset({DENSE})

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Vectors for `texts`, one row each, in order (float32)."""
        return await self._admit(len(texts), lambda: self._embed(texts))

    @abstractmethod
    async def _embed(self, texts: list[str]) -> np.ndarray: ...


class ImageEmbedder(Embedder):
    """A model that embeds images and texts into one space (CLIP). A decoded image becomes the
    model's input with `prepare_image` (in the request's thread); callers then use
    `embed_inputs`, engines implement `_embed_inputs`. Texts alone still go through `embed`."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.EMBED, Capability.EMBED_IMAGES}
    )

    @abstractmethod
    def prepare_image(self, image: Image) -> Any:
        """The model's input for one decoded RGB image; safe to call from any thread."""

    async def embed_inputs(self, inputs: list[Any]) -> np.ndarray:
        """Vectors for texts (str) and prepared images, one row each, in order (float32)."""
        return await self._admit(len(inputs), lambda: self._embed_inputs(inputs))

    async def _embed(self, texts: list[str]) -> np.ndarray:
        return await self._embed_inputs(list(texts))

    @abstractmethod
    async def _embed_inputs(self, inputs: list[Any]) -> np.ndarray: ...


@dataclass(frozen=True)
class SparseEmbedding:
    """A text's token weights: the token ids that carry weight, ascending, and their weights."""

    indices: np.ndarray  # int64
    values: np.ndarray  # float32


@dataclass(frozen=True)
class TextEmbeddings:
    """What a multi-output embedder computed for one text: each output asked of it, else None."""

    dense: np.ndarray | None = None  # (dimensions,), unit length
    sparse: SparseEmbedding | None = None
    multi_vector: np.ndarray | None = None  # (tokens, dimensions), each row unit length


class MultiOutputEmbedder(Embedder):
    """An embedder with outputs beside the dense vector: callers use `embed_outputs`, engines
    implement `_embed_outputs`; `embed` gives the dense vectors alone."""

    outputs: ClassVar[frozenset[str]] = frozenset(EMBEDDING_OUTPUTS)
    multi_vector_dimensions: int = 0  # the numbers of each of a text's multi_vector vectors

    async def embed_outputs(
        self, texts: list[str], outputs: frozenset[str]
    ) -> list[TextEmbeddings]:
        """For each text, in order, the `outputs` asked (a subset of `self.outputs`)."""
        return await self._admit(len(texts), lambda: self._embed_outputs(texts, outputs))

    async def _embed(self, texts: list[str]) -> np.ndarray:
        embedded = await self._embed_outputs(texts, frozenset({DENSE}))
        return np.stack([text.dense for text in embedded if text.dense is not None])

    @abstractmethod
    async def _embed_outputs(
        self, texts: list[str], outputs: frozenset[str]
    ) -> list[TextEmbeddings]: ...

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The text of each token id, as the model's tokenizer decodes it alone."""
        return [self.tokens.tokenizer.decode([int(i)]) for i in ids]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "output": [o for o in EMBEDDING_OUTPUTS if o in self.outputs]}


class Reranker(ModelEngine):
    """A model that scores documents against a query: callers use `rerank`, engines `_rerank`."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.RERANK})

    def rerank_lengths(self, query: str, docs: Sequence[str], instruction: str | None) -> list[int]:
        """Tokens the model is fed for each (query, document) pair, before truncation."""
        return self.tokens.count_pairs(query, docs)

    async def rerank(
        self, query: str, docs: list[str], instruction: str | None = None
    ) -> np.ndarray:
        """Relevance scores in [0, 1] for `docs`, in the order given (not sorted)."""
        return await self._admit(len(docs), lambda: self._rerank(query, docs, instruction))

    @abstractmethod
    async def _rerank(self, query: str, docs: list[str], instruction: str | None) -> np.ndarray: ...


# One label and its score, for each of a classifier's labels.
LabelScores = list[tuple[str, float]]


class Classifier(ModelEngine):
    """A model that labels texts: callers use `classify`, engines implement `_classify`."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.CLASSIFY})

    async def classify(self, texts: list[str], raw_scores: bool = False) -> list[LabelScores]:
        """For each text, every label with its score (softmax, or sigmoid for a multi-label
        model, as its config says; the logits with `raw_scores`), in the model's label order."""
        return await self._admit(len(texts), lambda: self._classify(texts, raw_scores))

    @abstractmethod
    async def _classify(self, texts: list[str], raw_scores: bool) -> list[LabelScores]: ...
