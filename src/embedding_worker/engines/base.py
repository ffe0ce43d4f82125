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
from ..metrics import ModelMetrics, current_record, tag_inputs
from ..tiers import current_tier, tier_rank
from .admission import Admission, AdmissionSettings
from .spec import EngineSettings, ModelSpec
from .token_pass import PassResult, TokenPass
from .tokenization import Text, TokenCounter, as_texts

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


class Health:
    """Whether the worker can serve. An engine that died (a batch thread raised) fails it for
    good: the worker asks to be replaced. An engine that stalls (work waits and no batch finishes
    for ENGINE_STALL_TIMEOUT, admission.py) fails it only until the engine moves again. A request
    that merely waited too long fails neither."""

    def __init__(self) -> None:
        self._dead: str | None = None
        self._engines: list[ModelEngine] = []

    def watch(self, engine: ModelEngine) -> None:
        self._engines.append(engine)

    def fail(self, reason: str) -> None:
        if self._dead is None:
            log.error("worker marked unhealthy: %s", reason)
            self._dead = reason

    @property
    def dead(self) -> bool:
        return self._dead is not None

    @property
    def reason(self) -> str | None:
        """Why the worker cannot serve now; None while it can."""
        if self._dead is not None:
            return self._dead
        for engine in self._engines:
            if engine.admission.stalled():
                return engine.stall_reason()
        return None

    @property
    def healthy(self) -> bool:
        return self.reason is None


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
        self.timeout_s = settings.timeout_s
        self.admission = Admission(
            spec.served_id,
            AdmissionSettings(
                max_items=settings.queue_size,
                deadline_s=settings.timeout_s,
                stall_s=settings.stall_timeout_s,
                max_tokens=settings.max_queued_tokens,
                unmeasured_max_tokens=settings.unmeasured_max_queued_tokens,
            ),
        )
        self.health = health
        health.watch(self)
        # The tasks waiting in _admit, cancelled at once when the engine is reported dead (instead
        # of each waiting for its timeout), and the loop they run on.
        self._admitted: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead_reason: str | None = None
        # Where the engine reports its batches and queue (metrics.py); None: metrics are off.
        self.metrics: ModelMetrics | None = None
        self.load_seconds = 0.0  # how long `load` took (registry.py)

    @property
    def served_id(self) -> str:
        return self.spec.served_id

    @property
    def pending(self) -> int:
        """Inputs admitted and not yet answered."""
        return self.admission.items

    def progressed(self) -> None:
        """A batch finished its forward pass: the engine is alive. Safe from any thread."""
        self.admission.progressed()

    def batch_formed(self, lengths: Sequence[int], inputs: Sequence[Any]) -> None:
        """A batch of inputs with these token counts goes to the model now (metrics.py). Safe
        from any thread."""
        if self.metrics is not None:
            self.metrics.batch_formed(lengths, inputs)

    def stall_reason(self) -> str:
        return (
            f"model '{self.served_id}' finished no batch for "
            f"{self.admission.settings.stall_s:g} s while work waited (ENGINE_STALL_TIMEOUT)"
        )

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

    def check_room(self, items: int, tokens: int) -> None:
        """Raise the retryable error that work of `items` inputs and `tokens` tokens would get now:
        the engine dead or stalled, or its queue without room (admission.py). Operations call it
        before they count a request's tokens, with one token an input: a request the queue cannot
        take even so is refused before the work of counting it."""
        if self.health.dead:
            raise errors.unavailable(f"the worker is unhealthy ({self.health.reason}); retry")
        admission = self.admission
        if admission.stalled():
            raise errors.unavailable(
                f"{self.stall_reason()}; retry, here later or on another worker",
                code="engine_stalled",
                retry_after=admission.retry_after(),
            )
        refused = admission.refusal(items, tokens)
        if refused is not None:
            raise refused

    async def _admit(
        self,
        items: int,
        tokens: int,
        call: Callable[[], Awaitable[T]],
        inputs: Sequence[Any] = (),
    ) -> T:
        """Bounded queue and bounded time for every engine call.

        Infinity's queue is unbounded (INFINITY_QUEUE_SIZE is read only by its own HTTP server), so
        the worker counts what it has handed over, in inputs and in tokens, and refuses work the
        model could not answer in time with a retryable 429 (admission.py). A call ends at the
        first of: its answer, REQUEST_TIMEOUT (a retryable 503 `timeout`; the worker stays
        healthy, and the call's inputs that have not reached the model are dropped), or the engine
        reported dead (which cancels every waiting call). The call runs in the caller's task: this
        is on every request's path, and a task and `asyncio.wait` per call cost a quarter of the
        local server's event-loop time. The call's `inputs`, where given, are marked with the
        request's metrics record (metrics.py), which the batch that takes them to the model reads.
        """
        billed = tokens
        tokens = max(tokens, items)  # an input costs at least one token (an image counts none)
        self.check_room(items, tokens)
        admission = self.admission
        task = asyncio.current_task()
        assert task is not None
        self._loop = task.get_loop()
        self._admitted.add(task)
        admission.enter(items, tokens)
        record = current_record.get()
        if record is not None:
            record.model = self.served_id
            if record.entered is None:
                record.entered = time.perf_counter()
            tag_inputs(inputs, record)
        sink = self.metrics
        rank = tier_rank(current_tier.get())
        if sink is not None:
            sink.queue_changed(rank, items)
        answered = False
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                # Cancelled with its items if it ends early: Infinity skips them.
                result = await call()
            answered = True
            return result
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
            admission.stalled()  # seen now, while the call still counts as waiting
            raise errors.unavailable(
                f"model '{self.served_id}' did not answer within {self.timeout_s:g} s "
                "(REQUEST_TIMEOUT); the worker is busy, retry",
                code="timeout",
                retry_after=admission.retry_after(),
            ) from None
        finally:
            self._admitted.discard(task)
            admission.leave(items, tokens, answered)
            if sink is not None:
                sink.queue_changed(rank, -items)
            if record is not None and answered:
                record.answered = time.perf_counter()
                record.inputs += items
                record.tokens += billed
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
    # Whether the model's own vectors are unit vectors (a sentence-transformers model whose modules
    # end in Normalize; bge-m3 and CLIP dense outputs): what a request's `normalize` defaults to.
    normalized: bool = True

    async def embed(self, texts: Sequence[str | Text], *, tokens: int) -> np.ndarray:
        """Vectors for `texts`, one row each, in order (float32); `tokens`: what the texts cost,
        as the request counted them (a plain string: `Text.uncounted`)."""
        typed = as_texts(texts)
        return await self._admit(len(typed), tokens, lambda: self._embed(typed), typed)

    @abstractmethod
    async def _embed(self, texts: list[Text]) -> np.ndarray: ...

    # The model's modules run on token ids (token_pass.py), for long inputs and late chunking;
    # None for an engine that cannot run them.
    token_pass: TokenPass | None = None

    async def embed_chunked(self, contents: list[np.ndarray], *, tokens: int) -> PassResult:
        """One vector per text from its windows (`TokenPass.chunked`); `contents`: each text's
        token ids without special tokens; `tokens`: what the windows cost."""
        run = self._token_pass()
        return await self._admit(len(contents), tokens, lambda: run.chunked(contents))

    async def embed_late_chunked(
        self, lead: np.ndarray, chunks: list[np.ndarray], *, tokens: int
    ) -> PassResult:
        """One vector per chunk of one document (`TokenPass.late_chunked`)."""
        run = self._token_pass()
        return await self._admit(len(chunks), tokens, lambda: run.late_chunked(lead, chunks))

    def _token_pass(self) -> TokenPass:
        assert self.token_pass is not None, "callers check token_pass first"
        return self.token_pass


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

    async def embed_inputs(self, inputs: Sequence[Any], *, tokens: int) -> np.ndarray:
        """Vectors for texts (`Text` or str) and prepared images, one row each, in order
        (float32)."""
        typed = [Text.uncounted(item) if isinstance(item, str) else item for item in inputs]
        return await self._admit(len(typed), tokens, lambda: self._embed_inputs(typed), typed)

    async def _embed(self, texts: list[Text]) -> np.ndarray:
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
        self, texts: Sequence[str | Text], outputs: frozenset[str], *, tokens: int
    ) -> list[TextEmbeddings]:
        """For each text, in order, the `outputs` asked (a subset of `self.outputs`)."""
        typed = as_texts(texts)
        return await self._admit(
            len(typed), tokens, lambda: self._embed_outputs(typed, outputs), typed
        )

    async def _embed(self, texts: list[Text]) -> np.ndarray:
        embedded = await self._embed_outputs(texts, frozenset({DENSE}))
        return np.stack([text.dense for text in embedded if text.dense is not None])

    @abstractmethod
    async def _embed_outputs(
        self, texts: list[Text], outputs: frozenset[str]
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
        self,
        query: str,
        docs: Sequence[str | Text],
        instruction: str | None = None,
        *,
        tokens: int,
    ) -> np.ndarray:
        """Relevance scores in [0, 1] for `docs`, in the order given (not sorted); `tokens`: the
        pairs' tokens, as the request counted them (each `Text` document's: its pair's)."""
        typed = as_texts(docs)
        return await self._admit(
            len(typed), tokens, lambda: self._rerank(query, typed, instruction), typed
        )

    @abstractmethod
    async def _rerank(
        self, query: str, docs: list[Text], instruction: str | None
    ) -> np.ndarray: ...


# One label and its score, for each of a classifier's labels.
LabelScores = list[tuple[str, float]]


class Classifier(ModelEngine):
    """A model that labels texts: callers use `classify`, engines implement `_classify`."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.CLASSIFY})

    async def classify(
        self, texts: Sequence[str | Text], raw_scores: bool = False, *, tokens: int
    ) -> list[LabelScores]:
        """For each text, every label with its score (softmax, or sigmoid for a multi-label
        model, as its config says; the logits with `raw_scores`), in the model's label order."""
        typed = as_texts(texts)
        return await self._admit(
            len(typed), tokens, lambda: self._classify(typed, raw_scores), typed
        )

    @abstractmethod
    async def _classify(self, texts: list[Text], raw_scores: bool) -> list[LabelScores]: ...
