"""The engines the worker runs itself (LLM rerankers, bge-m3, the compiled backends, the
long-input token passes), behind the worker's scheduler.

Each text of a call waits in the model's `Scheduler` (scheduler.py), with its token count, tier
and future, as Infinity's do: the same tiers, token budget, batch forming and pacing. The batcher
task takes one batch whenever the model is free (what it can start now: the model tokenizes and
computes on one thread, so nothing is gained by handing it more), sorted by length from a window
of `WINDOW` batches' worth of waiting work. Tokenizing (where a text carries no ids) and the
forward pass run on one worker thread per model, never on the event loop; a forward pass that
runs out of memory runs again in halves (budget.py), and the requests' traces get its span. A text
whose caller has gone (timeout, cancellation) is skipped; a batch that fails fails its texts, and
the batcher goes on.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import errors, tracing
from ..logs import get_logger, redacted_traceback
from .budget import SplitOnOutOfMemory
from .scheduler import Scheduler, Work
from .spec import ModelSpec
from .tokenization import Text

log = get_logger(__name__)

# A text's token ids as the model is fed them: a list, or the array a `Text` carries.
TokenIds = Sequence[int] | np.ndarray

WINDOW = 8  # batches' worth of waiting work sorted by length together (Infinity's factor)


@dataclass(eq=False, slots=True)
class Item:
    """One text of a call, as the model computes it."""

    text: Text
    options: Any  # what its call asks of every text (the engine's own type)
    ids: TokenIds | None = None  # the text's own, or made by the engine's `_tokenize`


def _fed(item: Item) -> int:
    return 0 if item.ids is None else len(item.ids)


class SelfBatching(ABC):
    """The batcher of an engine; the engine gives `_tokenize` and `_forward_items`, both run on
    its worker thread."""

    spec: ModelSpec
    served_id: str
    batch_size: int
    max_length: int

    # ModelEngine.progressed of the engine: told after every forward pass (admission.py).
    progressed: Callable[[], None]
    # ModelEngine.batch_formed of the engine: told of each batch handed to the model (metrics.py).
    batch_formed: Callable[[Sequence[int], Sequence[Any]], None]

    def _init_batching(self, wide_short_batches: bool = True) -> None:
        self.scheduler = Scheduler(
            self.served_id,
            self.batch_size,
            ahead=1,
            window=WINDOW,
            max_tokens=self.spec.max_batch_tokens,
            max_length=self.max_length,
            wide_short_batches=wide_short_batches,
        )
        self._wake: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._thread: ThreadPoolExecutor | None = None
        self.scheduler.listen(self._changed)
        self.scheduler.on_batch = self.batch_formed

    def _changed(self) -> None:
        # The scheduler calls this on the event loop: a submission, an answer, a turn's end.
        if self._wake is not None:
            self._wake.set()

    @abstractmethod
    def _tokenize(self, texts: list[str]) -> list[TokenIds]:
        """Token ids of each text, as the model is fed them (truncated, special tokens added)."""

    @abstractmethod
    def _forward_items(self, items: list[Item]) -> list[Any]:
        """One result per item of one batch (items sorted by length, all of them live)."""

    # --------------------------------------------------------------------------- lifecycle

    async def _start_batching(self, thread_name: str) -> None:
        if self._batcher is not None:
            return
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        self._wake = asyncio.Event()
        self._batcher = asyncio.create_task(self._batch_loop(), name=f"batcher {self.served_id}")

    async def _stop_batching(self) -> None:
        if self._batcher is None:
            return
        self._batcher.cancel()
        try:
            await self._batcher
        except asyncio.CancelledError:
            pass
        self._batcher = None
        stopping = errors.unavailable(f"model '{self.served_id}' is stopping")
        for queue in self.scheduler.queues:
            self._fail(list(queue), stopping)
            queue.clear()
        assert self._thread is not None
        self._thread.shutdown(wait=False, cancel_futures=True)
        self._thread = None

    async def _submit(self, texts: Sequence[Text], options: Any = None) -> list[Any]:
        """The results of `texts`, in order, once the batcher has run them all."""
        if self._batcher is None or self._wake is None:
            raise errors.unavailable(f"model '{self.served_id}' is not started")
        loop = asyncio.get_running_loop()
        works = [
            Work(text.tokens, loop.create_future(), Item(text, options, text.ids), source=text)
            for text in texts
        ]
        self.scheduler.submit(works)
        try:
            return list(await asyncio.gather(*(work.future for work in works)))
        except BaseException:  # one text failed, or the call ended: the rest are not computed
            for work in works:
                work.future.cancel()
            raise

    # --------------------------------------------------------------------------- the batcher

    async def _batch_loop(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            batches = self.scheduler.take()
            if not batches:
                await self._wake.wait()
                continue
            for batch in batches:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[Work]) -> None:
        loop = asyncio.get_running_loop()
        try:
            # A text whose caller went away meanwhile is not worth tokenizing.
            live = [work for work in batch if not work.gone]
            items: list[Item] = [work.payload for work in live]
            missing = [item for item in items if item.ids is None]
            if missing:
                made = await loop.run_in_executor(
                    self._thread, self._tokenize, [item.text.text for item in missing]
                )
                for item, ids in zip(missing, made):
                    item.ids = ids
            order = sorted(range(len(live)), key=lambda i: _fed(items[i]))
            live = [live[i] for i in order]
            items = [items[i] for i in order]
            if not any(not work.gone for work in live):
                return
            forward = SplitOnOutOfMemory(self._forward_items, self.served_id)
            started = time.time_ns()
            results = await loop.run_in_executor(self._thread, forward, items)
            tracing.forward_pass([work.future for work in live], started, time.time_ns())
            self.progressed()
            for work, result in zip(live, results):
                if not work.gone:
                    work.future.set_result(result)
        except asyncio.CancelledError:  # stopping: nobody will answer these
            self._fail(batch, errors.unavailable(f"model '{self.served_id}' is stopping"))
            raise
        except Exception as exc:  # the batcher survives; the texts of this batch fail
            log.error("%s: batch failed: %s", self.served_id, redacted_traceback(exc))
            self._fail(batch, exc)

    @staticmethod
    def _fail(works: list[Work], exc: BaseException) -> None:
        for work in works:
            if not work.gone:
                work.future.set_exception(exc)
