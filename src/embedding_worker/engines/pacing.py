"""Full batches for Infinity when requests arrive one by one.

Infinity's publisher thread hands the model a new batch as soon as the previous one has left its
hand-over queue, which is long before the model is free: it pops whatever has arrived by then.
Callers in one process resubmit together and fill whole batches anyway, but requests that come over
sockets trickle in, a few at a time, and the model ends up running small batches where a full one
was waiting a moment later (docs/design.md says what that costs).

`PacedQueue` replaces Infinity's queue of waiting items and only lets a batch go when it is full, or
when the model has nothing else to do. A lone request is never held back: with the model idle it
goes at the end of the event loop's turn that submitted it, together with whatever else that turn
submits (jobs that arrive together are validated and counted one after another in one turn, and the
first would otherwise go alone). A full batch that a later job of the turn completes goes at once,
without waiting for the turn's end. Full batches still run ahead of the model (tokenised while the
previous batch computes) whenever fewer than `AHEAD` per model replica are in it; the full batches
waiting then go in one pop (up to Infinity's 8), which Infinity sorts by length as any pop.

Each batch popped is then cut to the model's token budget (budget.py): rows x longest tokens at most
MAX_BATCH_TOKENS, so a pop of long texts hands over more, smaller batches. A pop whose texts are all
short (`budget.SHORT_TEXT_TOKENS`) takes batches of up to `budget.max_batch_rows` (8 x BATCH_SIZES)
texts instead of BATCH_SIZES, as short texts gain from wider batches. BATCH_SIZES also says when a
batch is full enough to go while the model is busy.

Each service tier (tiers.py) waits in a queue of its own; a pop takes the highest tier's work, so a
priority request waits only for the batches already in the model, never behind queued flex work,
and a lower tier is passed over at most `MAX_PASSES` hand-overs in a row. While requests of the
other tiers keep coming, flex batches go only to an idle model, so such a request waits for at most
the one flex batch computing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import tracing
from ..tiers import current_tier, tier_rank
from .budget import (
    default_max_batch_tokens,
    max_batch_rows,
    rows_allowed,
    token_bounded,
)
from .spec import Optimisations

# A lower tier's waiting work is passed over for higher tiers' at most this many hand-overs to the
# model in a row; then it goes next, so flex work always progresses, however busy priority is.
MAX_PASSES = 4
FLEX = tier_rank("flex")

# While work of a tier above flex has come in the last FLEX_YIELD_S seconds, flex batches go only
# to an idle replica: none waits queued behind the one computing, where it would delay the next
# priority request by a whole batch. A flex job alone keeps the batches queued ahead.
FLEX_YIELD_S = 2.0
# Meanwhile a flex batch holds as many texts as the model computes in about FLEX_TURN_S (from the
# seconds a text its recent full batches took): such a request then waits a few tens of ms, not
# a whole batch (docs/api.md). Where batches are that fast anyway (a GPU), flex batches stay whole.
FLEX_TURN_S = 0.03

# Full batches go while a replica has fewer than this many between leaving the queue and finishing
# its forward pass: the one computing and one being tokenised behind it. What waits meanwhile goes
# in one larger pop, which Infinity sorts by length, so batches pad less.
AHEAD = 2


class HandedOver:
    """The batches handed to Infinity and the futures of their requests, so that a batch whose
    every request has gone (cancelled, timed out, its client away) skips its forward pass:
    Infinity computes every batch it has popped, and one pop takes up to 8 of them.

    Infinity's pre-processing step sees a batch only as the list of its inputs (`to_input()` of
    each item, the very text objects the request queued), so a batch is found again by the
    identity of its inputs; a batch not found (a rerank pair, made afresh by `to_input`) is
    computed as before. Used from Infinity's publisher and pre-processing threads.
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
    """Wraps Infinity's FIFO queue (the three methods its batch handler calls) and releases a batch
    only when it is full or a model replica is idle.

    `batch_finished()` must be called once for every batch released, after its forward pass (the
    worker's batch-thread guard does, see engines.InfinityModel).

    Three of its rules can be switched off, for benchmarks to measure them (spec.Optimisations):
    without `turn_end_wake` the publisher wakes at each submission; without `full_batch_wake` a
    full batch submitted during a turn waits for the turn's end or the publisher's next look;
    without `wide_short_batches` batches of short texts hold `batch_size` texts, as others do.
    """

    def __init__(
        self,
        inner: Any,
        batch_size: int,
        replicas: int = 1,
        max_tokens: int | None = None,
        max_length: int | None = None,
        *,
        turn_end_wake: bool = True,
        full_batch_wake: bool = True,
        wide_short_batches: bool = True,
    ) -> None:
        self.inner = inner  # infinity_emb.inference.queue.CustomFIFOQueue: the default tier's
        # One queue a service tier (tiers.TIERS: priority, default, flex), of Infinity's own kind.
        self.queues = [type(inner)(), inner, type(inner)()]
        self.passed = [0] * len(self.queues)  # hand-overs each tier's waiting work sat out
        self.batch_size = batch_size
        self.replicas = replicas
        self.max_tokens = max_tokens or default_max_batch_tokens(batch_size)
        self.max_length = max_length  # the model's cut: no text is fed more tokens than this
        self.turn_end_wake = turn_end_wake
        self.full_batch_wake = full_batch_wake
        self.wide_short_batches = wide_short_batches
        self.in_model = 0  # batches released and not yet through their forward pass
        self._served_above_flex = -FLEX_YIELD_S  # when work above flex last arrived (monotonic)
        self._text_seconds = 0.0  # forward-pass seconds a text, recently; 0 before any
        self._changed = threading.Condition()
        self._wake_pending = False
        self.handed_over = HandedOver()
        # Told of each batch handed over: its inputs' tokens and the inputs (ModelEngine's).
        self.on_batch: Callable[[list[int], list[Any]], None] | None = None

    def __len__(self) -> int:
        return sum(len(queue) for queue in self.queues)

    def _peek_tier(self) -> int | None:
        """The tier whose work goes next: the highest that waits, unless a lower one has been
        passed over MAX_PASSES times in a row; None when nothing waits."""
        waiting = [rank for rank, queue in enumerate(self.queues) if len(queue)]
        if not waiting:
            return None
        starved = [rank for rank in waiting if self.passed[rank] >= MAX_PASSES]
        return starved[-1] if starved else waiting[0]

    def _next_tier(self) -> int:
        """The tier whose work goes now (`_peek_tier`), counting the hand-over for the others."""
        waiting = [rank for rank, queue in enumerate(self.queues) if len(queue)]
        chosen = self._peek_tier()
        assert chosen is not None
        for rank in waiting:
            self.passed[rank] = 0 if rank == chosen else self.passed[rank] + (rank > chosen)
        return chosen

    def extend(self, items: list[Any]) -> None:
        loop: asyncio.AbstractEventLoop | None = None
        if self.turn_end_wake:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not called from an event loop: nothing more comes with these
                pass
        first_of_turn = loop is not None and not self._wake_pending
        if loop is not None and first_of_turn:
            self._wake_pending = True  # before the items are in: the publisher reads both
            loop.call_soon(self._wake)  # after the tasks already due in this turn of the loop
        before = len(self)
        rank = tier_rank(current_tier.get())
        if tracing.enabled():  # the request's trace learns when its texts were queued
            tracing.enqueued(entry.item.future for entry in items)
        if rank < FLEX:
            self._served_above_flex = time.monotonic()
        self.queues[rank].extend(items)
        if loop is None:
            self._wake()
        elif (
            self.full_batch_wake
            and not first_of_turn
            and before // self.batch_size < len(self) // self.batch_size
        ):
            # A later job of the turn completed a full batch: the model starts on it while the rest
            # of the turn's jobs are still validated and tokenized. A turn's first request is never
            # split this way, so a request alone is batched the same way every time (same answer).
            self._notify()

    def _wake(self) -> None:
        with self._changed:
            self._wake_pending = False
            self._changed.notify_all()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def batch_finished(self, rows: int = 0, seconds: float = 0.0) -> None:
        """A released batch is through its forward pass, of `rows` texts in `seconds`."""
        with self._changed:
            self.in_model = max(0, self.in_model - 1)
            # A moving average of the seconds a text takes in full batches (smaller ones cost
            # more a text, and would shrink flex batches further and further).
            if rows >= self.batch_size:
                each = seconds / rows
                self._text_seconds = (
                    each if not self._text_seconds else (0.8 * self._text_seconds + 0.2 * each)
                )
            self._changed.notify_all()

    def _releasable(self) -> int:
        """How many batches may go now: whole ones while the model has room ahead, or everything
        waiting when a replica is idle and the loop's turn that submitted it has ended."""
        waiting = len(self)
        if not waiting:
            return 0
        if self.in_model < self.replicas and not self._wake_pending:
            return -(-waiting // self.batch_size)
        if self.in_model < AHEAD * self.replicas and not self._flex_yields():
            return waiting // self.batch_size
        return 0

    def _flex_yields(self) -> bool:
        """Whether flex work, next to go, waits for an idle replica instead of queueing a batch
        ahead of the one computing: so while other tiers' requests keep coming, one of them waits
        for at most the flex batch in the model, not for a second one queued behind it."""
        if self._peek_tier() != FLEX:
            return False
        return time.monotonic() - self._served_above_flex < FLEX_YIELD_S

    def pop_optimal_batches(
        self, size: int, max_n_batches: int = 4, timeout: float = 0.2, **kwargs: Any
    ) -> Iterator[list[Any]]:
        # Called by Infinity's publisher thread whenever it is ready to hand over; waiting here (up
        # to `timeout`, then it asks again) is what holds a part-filled batch back.
        with self._changed:
            if not self._changed.wait_for(self._releasable, timeout):
                return
            count = min(self._releasable(), max_n_batches)
            tier = self._next_tier()
            yielding = False
            if tier == FLEX:
                # Flex goes at most AHEAD batches a pop (one a replica while other tiers are
                # served): what is handed over cannot be overtaken, and priority work that comes
                # meanwhile waits behind no more than that.
                yielding = self._flex_yields()
                count = min(count, (1 if yielding else AHEAD) * self.replicas)
            queue = self.queues[tier]
        # A higher tier's few items go as a batch of their own rather than wait to fill one.
        rows = self._rows_to_pop(queue, count)
        if tier == FLEX and yielding and self._text_seconds:
            rows = max(1, min(rows, int(FLEX_TURN_S / self._text_seconds)))
        batches = [
            bounded
            for batch in queue.pop_optimal_batches(rows, count, timeout=0)
            for bounded in self._within_budget(batch)
        ]
        with self._changed:
            self.in_model += len(batches)
        for batch in batches:
            self.handed_over.add(batch)
            if self.on_batch is not None:
                self.on_batch(
                    [self.tokens_of(item) for item in batch], [text_of(item) for item in batch]
                )
        yield from batches

    def max_rows(self, longest: int) -> int:
        """The most texts a batch whose longest text has `longest` tokens may hold (derived from
        `batch_size` on each call, so a changed batch size holds for both rules)."""
        if not self.wide_short_batches:
            return self.batch_size
        return rows_allowed(self.batch_size, longest)

    def _rows_to_pop(self, queue: Any, count: int) -> int:
        """Texts a batch popped from `queue` may hold: `max_batch_rows` when every text that
        `count` such batches would take is short (SHORT_TEXT_TOKENS), else BATCH_SIZES. Decided
        before the pop, so that a pop hands over `count` batches, not more to be cut after."""
        if not self.wide_short_batches:
            return self.batch_size
        wide = max_batch_rows(self.batch_size)
        with queue._lock_queue_event:  # Infinity's CustomFIFOQueue: its lock and its list
            front = queue._queue[: wide * count]
        if front and all(self.max_rows(self.tokens_of(entry.item)) == wide for entry in front):
            return wide
        return self.batch_size

    def tokens_of(self, item: Any) -> int:
        """The tokens one queued item (Infinity's QueueItemInner) is fed: what the worker counted
        (tokenization.CountedText), else its characters, which most tokenizers do not exceed."""
        content = item.content
        text = getattr(content, "document", None)  # a rerank pair: the pair's count is here
        if text is None:
            text = getattr(content, "sentence", None)
        tokens = getattr(text, "tokens", None)
        if tokens is None:
            tokens = len(content.str_repr())
        return min(tokens, self.max_length) if self.max_length else tokens

    def _within_budget(self, batch: list[Any]) -> list[list[Any]]:
        lengths = [self.tokens_of(item) for item in batch]
        longest = max(lengths, default=0)
        if len(batch) * longest <= self.max_tokens and len(batch) <= self.max_rows(longest):
            return [batch]
        # Shortest first, so that each cut pads the least (the order within a batch is free).
        by_length = sorted(zip(lengths, range(len(batch))))
        runs = token_bounded(by_length, lambda pair: pair[0], self.max_tokens, self.max_rows)
        return [[batch[i] for _, i in run] for run in runs]


def text_of(item: Any) -> Any:
    """The text a queued item (Infinity's QueueItemInner) was made of: the worker's own object
    (tokenization.CountedText), a rerank pair's document (which carries the pair's count), else
    None (an image)."""
    content = item.content
    text = getattr(content, "document", None)
    return text if text is not None else getattr(content, "sentence", None)


def install(
    handler: Any,
    max_tokens: int | None = None,
    max_length: int | None = None,
    optimisations: Optimisations | None = None,
) -> PacedQueue:
    """Put a PacedQueue around a started Infinity BatchHandler's queue (before any request arrives),
    with the `optimisations` it takes on (all by default).

    The publisher thread reads `handler._queue_prio` afresh on every turn, so it takes the wrapper
    from its next turn on; waking it turns it over at once instead of after its 0.2 s wait.
    """
    on = optimisations or Optimisations()
    inner = handler._queue_prio
    paced = PacedQueue(
        inner,
        handler.max_batch_size,
        replicas=len(handler.model_worker),
        max_tokens=max_tokens,
        max_length=max_length,
        turn_end_wake=on.turn_end_wake,
        full_batch_wake=on.full_batch_wake,
        wide_short_batches=on.wide_short_batches,
    )
    handler._queue_prio = paced
    inner._sync_event.set()
    return paced
