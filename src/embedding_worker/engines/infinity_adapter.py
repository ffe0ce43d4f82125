"""Every private name of Infinity (`infinity-emb`, the pinned version) that the worker touches, and
why; nothing else in the worker reads one (tests/test_infinity_adapter.py checks each against the
installed version).

- `AsyncEmbeddingEngine._model_replicas`: the loaded model replicas. Their tokenizer, limits and
  the three stage methods (`encode_pre`, `encode_core`, `encode_post`, public) are what the worker
  reads and wraps; Infinity offers no public way to reach them.
- `AsyncEmbeddingEngine._batch_handler` and its `_queue_prio`: the queue Infinity's publisher
  thread pops batches from. The worker puts `PacedQueue` there, which hands over the batches of
  the worker's scheduler (scheduler.py), and queues Infinity's own queue items (public classes of
  `infinity_emb.primitives`) itself, so that they carry their token counts and tier.
  `CustomFIFOQueue._sync_event` wakes the publisher from its wait on the queue it replaces.
- `BatchHandler._threadpool`, and its `_max_workers` (the standard library's ThreadPoolExecutor):
  Infinity runs its publisher, its result reader and three loops per replica for the engine's life
  on one default-sized pool of min(32, cores + 4) threads. With several replicas on a small machine
  (`DEVICES=cpu,cpu` on 2 cores: 8 loops, 6 threads) a loop never gets a thread and requests hang;
  `give_every_loop_a_thread` widens the pool at start.
- A replica's `_infinity_tokenizer` (models without a `tokenizer` attribute), its
  `_first_module()` (sentence-transformers' own, for its tokenizer and text preparation) and a
  classifier's `_pipe` (transformers' pipeline, called for logits).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from .scheduler import Scheduler, Work
from .tokenization import Text

__all__ = [
    "HandedOver",
    "PacedQueue",
    "batch_handler",
    "classifier_pipeline",
    "compute",
    "first_module",
    "give_every_loop_a_thread",
    "image_item",
    "install_queue",
    "pair_item",
    "predict_item",
    "queued_tokens",
    "replica_tokenizer",
    "replica_count",
    "replicas",
    "text_item",
    "text_single",
]


def replicas(engine: Any) -> list[Any]:
    """The engine's loaded model replicas."""
    return list(engine._model_replicas)


def batch_handler(engine: Any) -> Any:
    """The engine's BatchHandler (made anew by each `astart`)."""
    return engine._batch_handler


def replica_tokenizer(replica: Any) -> Any:
    return getattr(replica, "tokenizer", None) or replica._infinity_tokenizer


def first_module(replica: Any) -> Any:
    """A sentence-transformers replica's first module (its models.Transformer), else None."""
    first = getattr(replica, "_first_module", None)
    return first() if first is not None else None


def classifier_pipeline(replica: Any) -> Any:
    """A classifier replica's transformers text-classification pipeline."""
    return replica._pipe


# --------------------------------------------------------------------------------- queue items


@functools.cache
def _items() -> SimpleNamespace:
    """Infinity's queue item classes, and the worker's two kinds of its items that carry their
    counts; imported on first use, as infinity_emb is only after `quiet_infinity`."""
    from infinity_emb.primitives import (
        EmbeddingInner,
        EmbeddingSingle,
        ImageInner,
        ImageSingle,
        PredictInner,
        ReRankInner,
        ReRankSingle,
    )

    @dataclass(kw_only=True)
    class TextSingle(EmbeddingSingle):
        """Infinity's text item, with the worker's `Text`: the model's tokenize step gets the
        `Text` where it carries its ids (tokenization.ReusedTokenIds pads them), else the
        string."""

        text: Text

        def to_input(self) -> Any:
            return self.text if self.text.ids is not None else self.sentence

    @dataclass(kw_only=True)
    class PairSingle(ReRankSingle):
        """Infinity's rerank item, with the pair's tokens as the worker counted them."""

        tokens: int

    return SimpleNamespace(
        TextSingle=TextSingle,
        PairSingle=PairSingle,
        EmbeddingInner=EmbeddingInner,
        PredictInner=PredictInner,
        ReRankInner=ReRankInner,
        ImageInner=ImageInner,
        ImageSingle=ImageSingle,
    )


def text_single(text: Text) -> Any:
    """Infinity's text item for a worker's `Text`."""
    return _items().TextSingle(sentence=text.text, text=text)


def queued_tokens(content: Any) -> int:
    """The tokens of one of Infinity's queue items: the worker's count where it made the item;
    for an item Infinity's own `embed`, `rerank` made (a caller outside the worker), its
    characters, which most tokenizers do not exceed."""
    kinds = _items()
    if isinstance(content, kinds.TextSingle):
        return int(content.text.tokens)
    if isinstance(content, kinds.PairSingle):
        return int(content.tokens)
    return len(content.str_repr())


def text_item(text: Text, loop: asyncio.AbstractEventLoop) -> Any:
    return _items().EmbeddingInner(content=text_single(text), future=loop.create_future())


def predict_item(text: Text, loop: asyncio.AbstractEventLoop) -> Any:
    return _items().PredictInner(content=text_single(text), future=loop.create_future())


def pair_item(query: str, document: Text, loop: asyncio.AbstractEventLoop) -> Any:
    kinds = _items()
    content = kinds.PairSingle(query=query, document=document.text, tokens=document.tokens)
    return kinds.ReRankInner(content=content, future=loop.create_future())


def image_item(image: Any, loop: asyncio.AbstractEventLoop) -> Any:
    kinds = _items()
    return kinds.ImageInner(content=kinds.ImageSingle(image=image), future=loop.create_future())


async def compute(scheduler: Scheduler, items: Sequence[Any], sources: Sequence[Any]) -> list[Any]:
    """The answers of Infinity queue items (`text_item`, ...), made of the caller's `sources`
    (one each), once the scheduler has handed them to Infinity's threads and Infinity has
    answered each."""
    works = [
        Work(queued_tokens(item.content), item.future, item, source=source)
        for item, source in zip(items, sources)
    ]
    scheduler.submit(works)
    return list(await asyncio.gather(*(work.future for work in works)))


# --------------------------------------------------------------------------------- the queue


class HandedOver:
    """The batches handed to Infinity and the futures of their requests, so that a batch whose
    every request has gone (cancelled, timed out, its client away) skips its forward pass.

    Infinity's pre-processing step sees a batch only as the list of its inputs (`to_input()` of
    each item, the very objects the request queued), so a batch is found again by the identity of
    its inputs; a batch not found (a rerank pair, made afresh by `to_input`) is computed as
    before. Used from Infinity's publisher and pre-processing threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_first: dict[int, list[tuple[list[Any], list[Any]]]] = {}

    def add(self, batch: list[Any]) -> None:
        if not batch:
            return
        inputs = [item.content.to_input() for item in batch]
        futures = [item.future for item in batch]
        with self._lock:
            self._by_first.setdefault(id(inputs[0]), []).append((inputs, futures))

    def futures_of(self, inputs: list[Any]) -> list[Any] | None:
        """The futures of the batch made of exactly these input objects (forgotten then)."""
        if not inputs:
            return None
        with self._lock:
            entries = self._by_first.get(id(inputs[0]), [])
            for i, (known, futures) in enumerate(entries):
                if len(known) == len(inputs) and all(a is b for a, b in zip(known, inputs)):
                    del entries[i]
                    if not entries:
                        del self._by_first[id(inputs[0])]
                    return futures
        return None


class PacedQueue:
    """Stands in for Infinity's queue (CustomFIFOQueue: the three methods its batch handler
    calls): its publisher thread pops the batches the scheduler releases. Items that Infinity's own
    `embed`, `rerank` queue (callers outside the worker) join the scheduler too."""

    def __init__(
        self,
        inner: Any,
        batch_size: int | None = None,
        *,
        scheduler: Scheduler | None = None,
        **settings: Any,
    ) -> None:
        self.inner = inner  # the CustomFIFOQueue replaced
        if scheduler is None:
            assert batch_size is not None
            scheduler = Scheduler("", batch_size, **settings)
        self.scheduler = scheduler
        self.handed_over = HandedOver()

    def __len__(self) -> int:
        return len(self.scheduler)

    @property
    def in_model(self) -> int:
        return self.scheduler.in_model

    def batch_finished(self, rows: int = 0, seconds: float = 0.0) -> None:
        self.scheduler.batch_finished(rows, seconds)

    def extend(self, items: list[Any]) -> None:
        """Infinity's PrioritizedQueueItems, queued at the tier of the caller's context."""
        inner = [entry.item for entry in items]
        self.scheduler.submit([Work(queued_tokens(i.content), i.future, i) for i in inner])

    def pop_optimal_batches(
        self, size: int, max_n_batches: int = 4, timeout: float = 0.2, **kwargs: Any
    ) -> Iterator[list[Any]]:
        # Called by Infinity's publisher thread whenever it is ready to hand over; waiting here (up
        # to `timeout`, then it asks again) is what holds work back.
        for works in self.scheduler.wait_and_take(timeout, max_n_batches):
            batch = [work.payload for work in works]
            self.handed_over.add(batch)
            yield batch


def install_queue(engine: Any, scheduler: Scheduler) -> PacedQueue:
    """Put a PacedQueue of `scheduler` in place of a started engine's queue (before any request
    arrives). The publisher thread reads `_queue_prio` afresh on every turn, so it takes the new
    queue from its next turn on; waking it turns it over at once instead of after its 0.2 s
    wait."""
    handler = batch_handler(engine)
    inner = handler._queue_prio
    paced = PacedQueue(inner, scheduler=scheduler)
    handler._queue_prio = paced
    inner._sync_event.set()
    return paced


# Infinity's threads that loop for the engine's life: its publisher and result reader, and the
# pre-process, forward and post-process loops of each replica.
SHARED_LOOPS = 2
LOOPS_PER_REPLICA = 3
# Threads beyond the loops, for the pool's short tasks (token counts).
SPARE_THREADS = 2


def give_every_loop_a_thread(engine: Any) -> None:
    """Widen a started engine's pool so that each of its loops has a thread, with spare threads
    for the short tasks; the loops still waiting for one start at once."""
    handler = batch_handler(engine)
    pool = handler._threadpool
    loops = SHARED_LOOPS + LOOPS_PER_REPLICA * len(handler.model_worker)
    wanted = loops + SPARE_THREADS
    if pool._max_workers < wanted:
        missing = wanted - pool._max_workers
        pool._max_workers = wanted
        # The pool starts a thread per submission while none is idle; each new thread first
        # takes the loop that waits longest.
        for _ in range(missing):
            pool.submit(_nothing)


def _nothing() -> None:
    return None


def replica_count(engine: Any) -> int:
    return len(batch_handler(engine).model_worker)
