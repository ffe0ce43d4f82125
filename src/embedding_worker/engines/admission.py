"""Admission of work into one model's queue, and whether the model is still making progress.

A request's deadline (REQUEST_TIMEOUT) and the engine's health are two different things. A request
that waits too long is the queue's fault: it is answered with a retryable 503 and the worker stays
healthy. Only an engine that stops making progress (work waits and no batch finishes for
ENGINE_STALL_TIMEOUT) is unhealthy, and it becomes healthy again as soon as a batch finishes.

Work is admitted by its cost in tokens, not only by its count of inputs: a queue that already holds
more tokens than the model gets through before the newcomer's deadline refuses it at the door with
429 and a Retry-After of the time the queue needs to drain, instead of accepting it and timing it
out. The model's pace is measured from the calls it answers (tokens answered per second of busy
time, over about the last minute of work); until it has answered any, the queue holds at most
MAX_QUEUED_TOKENS (by default MAX_REQUEST_TOKENS: one maximum-size request). A request is always
admitted into an empty queue, so one large request can never be refused for ever.

Everything here runs on the event loop, but for `progressed()`, which a model's batch thread calls:
it only stores a float, which needs no lock in CPython.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import errors
from ..errors import APIError
from ..logs import get_logger

log = get_logger(__name__)

# The pace is measured over about this much busy time: long enough to span a few large requests,
# short enough to follow a model whose inputs change from long to short.
PACE_WINDOW_S = 60.0
# Retry-After is capped: a client asked to wait longer would rather go to another worker.
MAX_RETRY_AFTER_S = 300


@dataclass(frozen=True)
class AdmissionSettings:
    max_items: int  # INFINITY_QUEUE_SIZE
    deadline_s: float  # REQUEST_TIMEOUT
    stall_s: float  # ENGINE_STALL_TIMEOUT
    max_tokens: int | None = None  # MAX_QUEUED_TOKENS: fixed; None measures the pace
    unmeasured_max_tokens: int = 300_000  # the bound of a model whose pace is not measured yet


class Admission:
    """The work queued for one model: its inputs and tokens, its pace, and its progress."""

    def __init__(
        self,
        name: str,
        settings: AdmissionSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self.items = 0  # inputs admitted and not yet answered
        self.tokens = 0  # their tokens
        self._busy_since: float | None = None  # when work began to wait with none before it
        self._moved_at: float | None = None  # when a batch last finished (or a call answered)
        self._stalled = False  # latched until the model moves again
        self._accounted_at = 0.0
        self._busy_s = 0.0  # seconds with work queued, over the pace window
        self._answered_tokens = 0.0  # tokens answered in those seconds

    # ----------------------------------------------------------------------------- admission

    def refusal(self, items: int, tokens: int) -> APIError | None:
        """Why `items` inputs of `tokens` tokens cannot join the queue now; None: they can."""
        if not self.items:
            return None
        if self.items + items > self.settings.max_items:
            return errors.overloaded(
                f"model '{self.name}' has {self.items} inputs queued "
                f"(INFINITY_QUEUE_SIZE={self.settings.max_items}); retry later",
                retry_after=self.retry_after(),
            )
        bound = self.max_tokens()
        if self.tokens + tokens > bound:
            return errors.overloaded(
                f"model '{self.name}' has {self.tokens} tokens queued, more than it answers "
                f"within {self.settings.deadline_s:g} s (REQUEST_TIMEOUT) with this request's "
                f"{tokens}; retry later",
                retry_after=self.retry_after(),
            )
        return None

    def max_tokens(self) -> int:
        """The most tokens the queue holds: fixed, or what the model answers before a deadline."""
        if self.settings.max_tokens is not None:
            return self.settings.max_tokens
        pace = self.pace()
        if pace is None:
            return self.settings.unmeasured_max_tokens
        return max(1, int(pace * self.settings.deadline_s))

    def pace(self) -> float | None:
        """Tokens the model answers per second of busy time, recently; None before any."""
        if self._answered_tokens <= 0 or self._busy_s <= 0:
            return None
        return self._answered_tokens / self._busy_s

    def retry_after(self) -> int:
        """Whole seconds until the work queued now is answered, at the measured pace."""
        pace = self.pace()
        if pace is None or not self.tokens:
            return errors.DEFAULT_RETRY_AFTER_S
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self.tokens / pace)))

    def enter(self, items: int, tokens: int) -> None:
        now = self._clock()
        self._account(now)
        if not self.items:
            self._busy_since = now
        self.items += items
        self.tokens += tokens

    def leave(self, items: int, tokens: int, answered: bool) -> None:
        """The call of `items` inputs is over; `answered`: the model computed them all."""
        now = self._clock()
        self._account(now)
        self.items -= items
        self.tokens -= tokens
        if answered:
            self._answered_tokens += tokens
            self.progressed()
        if self._busy_s > PACE_WINDOW_S:  # older work counts less and less
            keep = PACE_WINDOW_S / self._busy_s
            self._busy_s *= keep
            self._answered_tokens *= keep
        if not self.items:
            self._busy_since = None

    def _account(self, now: float) -> None:
        if self.items:
            self._busy_s += now - self._accounted_at
        self._accounted_at = now

    # ----------------------------------------------------------------------------- progress

    def progressed(self) -> None:
        """A batch of this model finished its forward pass. Safe from any thread."""
        self._moved_at = self._clock()
        if self._stalled:
            self._stalled = False
            log.warning("model '%s' moves again: healthy", self.name)

    def stalled(self) -> bool:
        """Whether work has waited and no batch finished for longer than ENGINE_STALL_TIMEOUT;
        once seen, it stays so until the model moves again, even if the waiting calls left."""
        if self._stalled:
            return True
        if self._busy_since is None:
            return False
        since = max(self._busy_since, self._moved_at or self._busy_since)
        if self._clock() - since > self.settings.stall_s:
            self._stalled = True
            log.error(
                "model '%s' finished no batch for %g s while work waited: unhealthy until it does",
                self.name,
                self.settings.stall_s,
            )
        return self._stalled
