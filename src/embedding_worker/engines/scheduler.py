"""The one scheduler of every engine: where batches form, in what order, and when they go.

Every input a model is asked for waits here as a `Work`: its token count, its service tier, its
arrival, the future its answer resolves and the engine's own item. An engine takes batches of
them (Infinity's publisher thread through infinity_adapter.PacedQueue; the engines the worker
batches itself through batching.SelfBatching) and computes them. A batch leaves the model's count
when its forward pass ends, where the engine says so (`forward_finished`: Infinity's replicas,
whose answers are post-processed and resolved on other threads afterwards, so the next batch is
tokenized meanwhile), and at the latest once every one of its futures is done, answered or
abandoned (an engine that fails, or one that says nothing).

The policy, the same for every engine:

- Tiers (tiers.py): each tier waits in a queue of its own and a hand-over takes the highest
  tier's work, so a priority request waits only for the batches already in the model. A lower
  tier is passed over at most `MAX_PASSES` hand-overs in a row, so flex work always progresses.
- What the model can start now: at most `ahead` batches a replica are between leaving the queue
  and their answer (the one computing and one being tokenized behind it for Infinity; one for an
  engine that tokenizes and computes on one thread). Work that waits meanwhile stays here, where
  higher tiers overtake it: the wait of a priority request is a bound in batches of the model,
  whatever the machine's speed.
- Full batches: while the model is busy only full batches go; a part-filled one goes when a
  replica is idle. With `turn_end_wake`, work submitted in one turn of the event loop goes
  together at the turn's end (jobs that arrive together are counted one after another, and the
  first would otherwise go alone); with `full_batch_wake`, a full batch that a later job of the
  turn completes goes at once.
- Flex yields: while work of a tier above flex has come in the last `FLEX_YIELD_S`, flex batches
  go only to an idle replica, and hold what the model computes in about `FLEX_TURN_S` (from the
  seconds a text of its recent full batches took), so such a request waits a few tens of ms.
- Batch forming: a hand-over sorts `window` batches' worth of the tier's oldest work by length
  and cuts batches from it, each holding the oldest input still waiting (no input waits for
  ever behind shorter ones), within the token budget: rows x longest tokens at most
  MAX_BATCH_TOKENS, and at most BATCH_SIZES rows, or `budget.max_batch_rows` where every text is
  short and `wide_short_batches` is on (budget.py).

An out-of-memory forward pass runs again in halves (budget.SplitOnOutOfMemory), in the engine's
forward step. `BatchObserver` is where metrics hook in: a batch formed, a batch through the model,
and `depths()` gives each tier's waiting inputs.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import tracing
from ..tiers import TIERS, current_tier, tier_rank
from .budget import default_max_batch_tokens, max_batch_rows, rows_allowed, token_bounded

__all__ = [
    "AHEAD",
    "FLEX_TURN_S",
    "FLEX_YIELD_S",
    "MAX_PASSES",
    "BatchObserver",
    "Scheduler",
    "Work",
]

# A lower tier's waiting work is passed over for higher tiers' at most this many hand-overs to the
# model in a row; then it goes next, so flex work always progresses, however busy priority is.
MAX_PASSES = 4
FLEX = tier_rank("flex")

# While work of a tier above flex has come in the last FLEX_YIELD_S seconds, flex batches go only
# to an idle replica: none waits behind the one computing, where it would delay the next priority
# request by a whole batch. A flex job alone keeps the batches queued ahead.
FLEX_YIELD_S = 2.0
# Meanwhile a flex batch holds as many texts as the model computes in about FLEX_TURN_S. Where
# batches are that fast anyway (a GPU), flex batches stay whole.
FLEX_TURN_S = 0.03

# Batches a replica may have between leaving the queue and their answer, by default: the one
# computing and one being tokenized behind it.
AHEAD = 2

_arrivals = itertools.count()


@dataclass(eq=False, slots=True)
class Work:
    """One input waiting for its model."""

    tokens: int  # what the model is fed for it, special tokens included, before the model's cut
    future: asyncio.Future  # resolved with its answer (or cancelled when its caller goes)
    payload: Any  # the engine's own item (Infinity's queue item; SelfBatching's Item)
    tier: int = field(default_factory=lambda: tier_rank(current_tier.get()))
    arrival: int = field(default_factory=lambda: next(_arrivals))  # the order of submission
    source: Any = None  # the caller's input it was made of (a tokenization.Text), for metrics
    batch: _Batch | None = None  # set when handed to the model

    @property
    def gone(self) -> bool:
        """Answered, failed, or its caller gone: not worth a forward pass."""
        return self.future.done()


@dataclass(eq=False, slots=True)
class _Batch:
    works: list[Work]
    released: float  # time.monotonic() when handed over
    waiting: int  # its futures not yet done
    left: bool = False  # out of the model's count (its forward pass ended, or all answered)


class BatchObserver(Protocol):
    """What a metrics exporter is told, from any thread; each call must be quick."""

    def batch_formed(self, model: str, tier: str, rows: int, tokens: int, padded: int) -> None:
        """A batch of `rows` inputs, `tokens` real tokens, `padded` once padded to its longest,
        goes to the model."""

    def batch_finished(self, model: str, rows: int, seconds: float) -> None:
        """A batch is through the model, in `seconds` of model time (0 rows: all abandoned)."""


class Scheduler:
    """The waiting work of one model and the rule that hands it over (module docstring).

    `submit` runs on the event loop; `take` and `wait_and_take` run on any thread.
    """

    def __init__(
        self,
        name: str,
        batch_size: int,
        *,
        replicas: int = 1,
        ahead: int = AHEAD,
        window: int = 1,
        max_tokens: int | None = None,
        max_length: int | None = None,
        turn_end_wake: bool = True,
        full_batch_wake: bool = True,
        wide_short_batches: bool = True,
    ) -> None:
        self.name = name
        self.batch_size = batch_size
        self.replicas = replicas
        self.ahead = ahead
        self.window = window  # batches' worth of work sorted by length together
        self.max_tokens = max_tokens or default_max_batch_tokens(batch_size)
        self.max_length = max_length  # the model's cut: no input is fed more tokens than this
        self.turn_end_wake = turn_end_wake
        self.full_batch_wake = full_batch_wake
        self.wide_short_batches = wide_short_batches
        self.queues: list[deque[Work]] = [deque() for _ in TIERS]
        self.passed = [0] * len(TIERS)  # hand-overs each tier's waiting work sat out
        self.in_model = 0  # batches handed over and not yet answered
        self.observers: list[BatchObserver] = []
        # Told of each batch handed over, from the thread that takes it: its inputs' tokens and
        # sources (ModelEngine.batch_formed, metrics.py).
        self.on_batch: Callable[[list[int], list[Any]], None] | None = None
        self._listeners: list[Callable[[], None]] = []
        self._changed = threading.Condition()
        self._wake_pending = False
        self._turn_grew = False  # a later job of the pending turn submitted too
        self._served_above_flex = -FLEX_YIELD_S  # when work above flex last arrived (monotonic)
        self._text_seconds = 0.0  # model seconds a text, recently; 0 before any
        self._last_finish = 0.0
        # Batches in the model's count, by the id of their first input's future (forward_finished).
        self._in_model_batches: dict[int, _Batch] = {}

    def __len__(self) -> int:
        return sum(len(queue) for queue in self.queues)

    def depths(self) -> dict[str, int]:
        """Inputs waiting in each tier."""
        return {tier: len(queue) for tier, queue in zip(TIERS, self.queues)}

    def listen(self, listener: Callable[[], None]) -> None:
        """`listener()` is called whenever a batch may have become releasable (on the thread that
        changed it: the event loop, for submissions and answers)."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------------------ intake

    def submit(self, works: Sequence[Work]) -> None:
        """Queue `works`; each leaves the model's count once its future is done."""
        loop: asyncio.AbstractEventLoop | None = None
        if self.turn_end_wake:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not called from an event loop: nothing more comes with these
                pass
        for work in works:
            work.future.add_done_callback(functools.partial(self._answered, work))
        if tracing.enabled():  # the request's trace learns when its inputs were queued
            tracing.enqueued(work.future for work in works)
        with self._changed:
            first_of_turn = loop is not None and not self._wake_pending
            if loop is not None and first_of_turn:
                self._wake_pending = True
                loop.call_soon(self._turn_ended)  # after the tasks already due in this turn
            elif loop is not None:
                self._turn_grew = True
            before = len(self)
            for work in works:
                self.queues[work.tier].append(work)
                if work.tier < FLEX:
                    self._served_above_flex = time.monotonic()
            completes = before // self.batch_size < len(self) // self.batch_size
        if loop is None:
            self._notify()
        elif self.full_batch_wake and not first_of_turn and completes:
            # A later job of the turn completed a full batch: the model starts on it while the rest
            # of the turn's jobs are still counted. A turn's first request is never split this
            # way, so a request alone is batched the same way every time (the same answer).
            self._notify()

    def _turn_ended(self) -> None:
        with self._changed:
            self._wake_pending = False
            self._turn_grew = False
        self._notify()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()
        for listener in self._listeners:
            listener()

    def _answered(self, work: Work, _future: asyncio.Future) -> None:
        with self._changed:
            batch = work.batch
            if batch is None:  # still waiting: dropped when a hand-over reaches it
                return
            batch.waiting -= 1
            if batch.waiting or batch.left:
                return
            seconds = self._leave(batch)
        self.batch_finished(len(batch.works), seconds)

    def forward_finished(self, futures: Sequence[asyncio.Future]) -> None:
        """The forward pass of the batch of these futures (in hand-over order) has ended, or was
        skipped: from any thread. Its answers may still be on their way."""
        if not futures:
            return
        with self._changed:
            batch = self._in_model_batches.get(id(futures[0]))
            if batch is None or batch.left or batch.works[0].future is not futures[0]:
                return
            seconds = self._leave(batch)
        self.batch_finished(len(batch.works), seconds)

    def _leave(self, batch: _Batch) -> float:
        """`batch` out of the model's count (under the lock): its model time, from when it could
        start (handed over, or the previous batch out)."""
        batch.left = True
        del self._in_model_batches[id(batch.works[0].future)]
        now = time.monotonic()
        seconds = now - max(batch.released, self._last_finish)
        self._last_finish = now
        return seconds

    def batch_finished(self, rows: int = 0, seconds: float = 0.0) -> None:
        """A handed-over batch is out of the model, `rows` inputs in `seconds` of model time."""
        with self._changed:
            self.in_model = max(0, self.in_model - 1)
            # A moving average of the seconds a text takes in full batches (smaller ones cost
            # more a text, and would shrink flex batches further and further).
            if rows >= self.batch_size:
                each = seconds / rows
                self._text_seconds = (
                    each if not self._text_seconds else (0.8 * self._text_seconds + 0.2 * each)
                )
        for observer in self.observers:
            observer.batch_finished(self.name, rows, seconds)
        self._notify()

    # ------------------------------------------------------------------------------ hand-over

    def _peek_tier(self) -> int | None:
        """The tier whose work goes next: the highest that waits, unless a lower one has been
        passed over MAX_PASSES times in a row; None when nothing waits."""
        waiting = [rank for rank, queue in enumerate(self.queues) if queue]
        if not waiting:
            return None
        starved = [rank for rank in waiting if self.passed[rank] >= MAX_PASSES]
        return starved[-1] if starved else waiting[0]

    def _next_tier(self) -> int:
        waiting = [rank for rank, queue in enumerate(self.queues) if queue]
        chosen = self._peek_tier()
        assert chosen is not None
        for rank in waiting:
            self.passed[rank] = 0 if rank == chosen else self.passed[rank] + (rank > chosen)
        return chosen

    def _flex_yields(self) -> bool:
        """Whether flex work, next to go, waits for an idle replica instead of queueing a batch
        ahead of the one computing."""
        if self._peek_tier() != FLEX:
            return False
        return time.monotonic() - self._served_above_flex < FLEX_YIELD_S

    def releasable(self) -> int:
        """How many batches may go now: what waits, while a replica is idle and the submitting
        turn has ended; else whole batches, while the model has room ahead."""
        waiting = len(self)
        room = self.ahead * self.replicas - self.in_model
        if not waiting or room <= 0:
            return 0
        if self.in_model < self.replicas:
            if not self._wake_pending:
                return min(room, -(-waiting // self.batch_size))
            if not self._turn_grew:
                # The turn's first request goes whole at the turn's end, however its batches
                # divide, whenever the publisher happens to look: the same request alone is
                # batched (and padded) the same way every time, so it gets the same answer.
                return 0
        if not self._flex_yields():
            return min(room, waiting // self.batch_size)
        return 0

    def wait_and_take(self, timeout: float, max_batches: int | None = None) -> list[list[Work]]:
        """`take`, once something is releasable or `timeout` seconds have passed."""
        with self._changed:
            if not self._changed.wait_for(self.releasable, timeout):
                return []
        return self.take(max_batches)

    def take(self, max_batches: int | None = None) -> list[list[Work]]:
        """The batches that go to the model now (possibly none), handed over."""
        with self._changed:
            count = self.releasable()
            if max_batches is not None:
                count = min(count, max_batches)
            if count <= 0:
                return []
            tier = self._next_tier()
            yielding = tier == FLEX and self._flex_yields()
            if yielding:
                count = min(count, self.replicas)
            queue = self.queues[tier]
            rows = self._rows(queue, count)
            if yielding and self._text_seconds:
                rows = max(1, min(rows, int(FLEX_TURN_S / self._text_seconds)))
            batches = self._form(queue, rows, count)
            now = time.monotonic()
            for works in batches:
                batch = _Batch(works, now, len(works))
                self._in_model_batches[id(works[0].future)] = batch
                for work in works:
                    work.batch = batch
            self.in_model += len(batches)
        # An input whose future is done by now was dropped above, under the lock; one done later
        # calls back (`_answered`) after the lock is let go, and finds its batch.
        if self.on_batch is not None:
            for works in batches:
                fed = [self.tokens_fed(work) for work in works]
                self.on_batch(fed, [work.source for work in works])
        for observer in self.observers:
            for works in batches:
                fed = [self.tokens_fed(work) for work in works]
                observer.batch_formed(
                    self.name, TIERS[tier], len(works), sum(fed), len(fed) * max(fed)
                )
        return batches

    def tokens_fed(self, work: Work) -> int:
        return min(work.tokens, self.max_length) if self.max_length else work.tokens

    def max_rows(self, longest: int) -> int:
        """The most inputs a batch whose longest input has `longest` tokens may hold."""
        if not self.wide_short_batches:
            return self.batch_size
        return rows_allowed(self.batch_size, longest)

    def _rows(self, queue: deque[Work], count: int) -> int:
        """Inputs a batch may hold: `max_batch_rows` when every input that `count` such batches
        would take is short (SHORT_TEXT_TOKENS), else BATCH_SIZES."""
        if not self.wide_short_batches:
            return self.batch_size
        wide = max_batch_rows(self.batch_size)
        front = itertools.islice(queue, wide * count)
        if all(self.max_rows(self.tokens_fed(work)) == wide for work in front):
            return wide
        return self.batch_size

    def _form(self, queue: deque[Work], rows: int, count: int) -> list[list[Work]]:
        """Up to `count` batches from the front of `queue` (module docstring): the rest of the
        sorted window goes back to the front, in arrival order."""
        window: list[Work] = []
        while queue and len(window) < rows * max(count, self.window):
            work = queue.popleft()
            if not work.gone:  # a caller that went away while it waited
                window.append(work)
        window.sort(key=self.tokens_fed)
        batches: list[list[Work]] = []
        while window and len(batches) < count:
            oldest = min(range(len(window)), key=lambda i: window[i].arrival)
            start = max(0, min(oldest, len(window) - rows))
            runs = token_bounded(
                window[start : start + rows], self.tokens_fed, self.max_tokens, self.max_rows
            )
            batch = next(run for run in runs if any(w is window[oldest] for w in run))
            batches.append(batch)
            taken = {id(work) for work in batch}
            window = [work for work in window if id(work) not in taken]
        window.sort(key=lambda work: work.arrival)
        queue.extendleft(reversed(window))
        return batches
