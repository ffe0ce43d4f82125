"""Batching for the engines the worker runs itself (LLM rerankers, bge-m3), beside Infinity.

Items from concurrent calls wait in one queue; a batcher task takes up to 8 x batch_size of them in
arrival order, tokenizes them, sorts them by length and runs batch_size chunks (as Infinity does),
each cut to the model's MAX_BATCH_TOKENS and run again in halves if it runs out of memory
(budget.py).
Tokenizing and forwards run on one worker thread per model, never on the event loop. A call whose
caller has gone (timeout, cancellation) is skipped; a batch that fails fails its calls, and the
batcher goes on with the next.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import errors
from ..logs import get_logger, redacted_traceback
from .budget import SplitOnOutOfMemory, token_bounded
from .spec import ModelSpec

log = get_logger(__name__)

# A text's token ids as the model is fed them: a list, or the array a `TokenizedText` carries.
TokenIds = Sequence[int] | np.ndarray

WINDOW = 8  # batches taken from the queue at once, sorted by length together (Infinity's factor)


@dataclass
class Call:
    """One engine call waiting for the results of its items."""

    future: asyncio.Future
    results: list[Any]
    remaining: int
    options: Any  # what the call asks of every item (the engine's own type)


@dataclass
class Item:
    """One text of a call, as the batcher carries it to the model."""

    call: Call
    index: int  # position in its call
    text: str
    ids: TokenIds = field(default_factory=list)  # set by the engine's `_tokenize`


def _item_tokens(item: Item) -> int:
    return len(item.ids)


class SelfBatching(ABC):
    """The batcher of an engine; the engine gives `_tokenize` and `_forward_items`, both run on
    its worker thread."""

    spec: ModelSpec
    served_id: str
    batch_size: int

    # ModelEngine.progressed of the engine: told after every forward pass (admission.py).
    progressed: Callable[[], None]
    # ModelEngine.batch_formed of the engine: told of each batch before its forward pass.
    batch_formed: Callable[[Sequence[int], Sequence[Any]], None]

    def _init_batching(self) -> None:
        self._waiting: list[Item] = []
        self._wake: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._thread: ThreadPoolExecutor | None = None

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
        self._fail(self._waiting, errors.unavailable(f"model '{self.served_id}' is stopping"))
        self._waiting.clear()
        assert self._thread is not None
        self._thread.shutdown(wait=False, cancel_futures=True)
        self._thread = None

    async def _submit(self, texts: Sequence[str], options: Any = None) -> list[Any]:
        """The results of `texts`, in order, once the batcher has run them all."""
        if self._batcher is None or self._wake is None:
            raise errors.unavailable(f"model '{self.served_id}' is not started")
        call = Call(
            asyncio.get_running_loop().create_future(), [None] * len(texts), len(texts), options
        )
        self._waiting.extend(Item(call, i, text) for i, text in enumerate(texts))
        self._wake.set()
        return await call.future

    # --------------------------------------------------------------------------- the batcher

    async def _batch_loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                taken = self._waiting[: WINDOW * self.batch_size]
                del self._waiting[: len(taken)]
                # A call that timed out or was cancelled is not worth a forward.
                window = [item for item in taken if not item.call.future.done()]
                if window:
                    await self._run_window(loop, window)

    async def _run_window(self, loop: asyncio.AbstractEventLoop, window: list[Item]) -> None:
        try:
            ids = await loop.run_in_executor(
                self._thread, self._tokenize, [item.text for item in window]
            )
            for item, item_ids in zip(window, ids):
                item.ids = item_ids
            window.sort(key=lambda item: len(item.ids))
            # The forward pass, run again in halves if a batch runs out of memory.
            forward = SplitOnOutOfMemory(self._forward_items, self.served_id)
            for start in range(0, len(window), self.batch_size):
                chunk = window[start : start + self.batch_size]
                for batch in token_bounded(chunk, _item_tokens, self.spec.max_batch_tokens):
                    live = [item for item in batch if not item.call.future.done()]
                    if not live:
                        continue
                    self.batch_formed(
                        [len(item.ids) for item in live], [item.text for item in live]
                    )
                    results = await loop.run_in_executor(self._thread, forward, live)
                    self.progressed()
                    for item, result in zip(live, results):
                        self._deliver(item, result)
        except asyncio.CancelledError:  # stopping: nobody will answer these
            self._fail(window, errors.unavailable(f"model '{self.served_id}' is stopping"))
            raise
        except Exception as exc:  # the batcher survives; the calls in this window fail
            log.error("%s: batch failed: %s", self.served_id, redacted_traceback(exc))
            self._fail(window, exc)

    @staticmethod
    def _fail(items: list[Item], exc: BaseException) -> None:
        for item in items:
            if not item.call.future.done():
                item.call.future.set_exception(exc)

    @staticmethod
    def _deliver(item: Item, result: Any) -> None:
        call = item.call
        if call.future.done():
            return
        call.results[item.index] = result
        call.remaining -= 1
        if call.remaining == 0:
            call.future.set_result(call.results)
