"""What the worker counts: Prometheus metrics (GET /metrics), each model's `stats` in /v1/models,
and a one-line summary a minute for RunPod's log view.

Figures are recorded at two places only. `Worker.dispatch` records each request once it is answered
(route, model, tier, status and error code, inputs, tokens, and its time split into queue wait,
model time and total), from the `RequestRecord` it puts in `current_record`; the engines fill in
that record (the model a request resolved to, its inputs and tokens, when its work entered the
queue, when the first batch holding it went to the model, when the model answered). The engines
also report each batch they hand to the model (`ModelMetrics.batch_formed`): its rows, and its real
and padded tokens, so batch fill is a ratio.

Every label value comes from the worker's own configuration and registry: served model ids, the
operations' routes, the service tiers, the HTTP statuses and error codes the worker itself writes.
A request naming an unknown model is counted under `model=""` (one naming no operation never
reaches dispatch), so a flood of made-up names adds no series.

The metrics are prometheus-client's own classes: with PROMETHEUS_MULTIPROC_DIR set (several server
processes), their values live in that folder's files and a scrape reads every process's
(`exposition`).
"""

from __future__ import annotations

import asyncio
import bisect
import os
import re
import time
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from .logs import get_logger
from .tiers import TIERS

log = get_logger(__name__)

PREFIX = "embedding_worker"
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Request latencies, in seconds: a millisecond (a small request on a GPU) to two minutes (a large
# batch on a CPU, up to REQUEST_TIMEOUT's default).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
UNMATCHED_ROUTE = "unmatched"  # a job or path that names no operation
NO_MODEL = ""  # a request that never resolved a served model
OTHER_CODE = "other"
_CODE = re.compile(r"[a-z][a-z_]{0,39}")
SUMMARY_INTERVAL_S = 60.0

# No `_created` series beside each counter and histogram: they would double a scrape's series for a
# timestamp that the process's own start time (process_start_time_seconds) already gives.
disable_created_metrics()


@dataclass(slots=True)
class RequestRecord:
    """One request as it goes: filled in by dispatch and the engines, recorded once answered."""

    started: float  # time.perf_counter() when dispatch took it
    route: str = UNMATCHED_ROUTE
    tier: str = ""
    model: str = NO_MODEL
    inputs: int = 0
    tokens: int = 0
    entered: float | None = None  # its first engine call entered the model's queue
    handed: float | None = None  # the first batch holding one of its inputs went to the model
    answered: float | None = None  # its last engine call was answered


current_record: ContextVar[RequestRecord | None] = ContextVar(
    "embedding_worker_request_record", default=None
)


def note_model(served_id: str) -> None:
    """The request in this context resolved to this served model."""
    record = current_record.get()
    if record is not None:
        record.model = served_id


def tag_inputs(inputs: Iterable[Any], record: RequestRecord) -> None:
    """Mark the request's texts with its record, so that the batch handing them to the model can
    tell it when its queue wait ended. Only the worker's own text objects (tokenization's
    `Text`) carry the mark; an image does not."""
    for item in inputs:
        if hasattr(item, "request"):
            item.request = record


def _quantile(buckets: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The q-quantile of observations counted per bucket (counts[i]: those <= buckets[i], one
    more count for those above the last), interpolated within its bucket as Prometheus'
    `histogram_quantile` does; None without observations."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if seen + count >= rank and count:
            if i >= len(buckets):
                return buckets[-1]
            lower = buckets[i - 1] if i else 0.0
            return lower + (buckets[i] - lower) * (rank - seen) / count
        seen += count
    return buckets[-1]


@dataclass
class Tally:
    """Plain counts of requests since start, for `stats` and the summary line (prometheus-client
    keeps the exposition's own; these are read without a scrape)."""

    requests: int = 0
    failed: int = 0
    inputs: int = 0
    tokens: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    rows: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0

    def add(self, other: Tally) -> None:
        self.requests += other.requests
        self.failed += other.failed
        self.inputs += other.inputs
        self.tokens += other.tokens
        self.latency = [a + b for a, b in zip(self.latency, other.latency)]
        self.rows += other.rows
        self.real_tokens += other.real_tokens
        self.padded_tokens += other.padded_tokens

    def minus(self, earlier: Tally) -> Tally:
        return Tally(
            self.requests - earlier.requests,
            self.failed - earlier.failed,
            self.inputs - earlier.inputs,
            self.tokens - earlier.tokens,
            [a - b for a, b in zip(self.latency, earlier.latency)],
            self.rows - earlier.rows,
            self.real_tokens - earlier.real_tokens,
            self.padded_tokens - earlier.padded_tokens,
        )

    def copy(self) -> Tally:
        copy = Tally()
        copy.add(self)
        return copy

    def latency_ms(self, q: float) -> float | None:
        seconds = _quantile(LATENCY_BUCKETS, self.latency, q)
        return None if seconds is None else round(1e3 * seconds, 1)


class ModelMetrics:
    """What one served model reports: the batches it hands to its model and its queue depth.
    Engines hold one (`ModelEngine.metrics`); its calls are safe from any thread."""

    def __init__(self, served_id: str, metrics: Metrics | None = None) -> None:
        self.served_id = served_id
        self.tally = Tally()
        self.queued = [0] * len(TIERS)  # inputs admitted and not answered, by tier
        self._metrics = metrics
        if metrics is not None:
            self._passes = metrics.forward_passes.labels(served_id)
            self._rows = metrics.forward_rows.labels(served_id)
            self._real = metrics.forward_tokens.labels(served_id)
            self._padded = metrics.forward_padded_tokens.labels(served_id)
            self._depth = [metrics.queue_depth.labels(served_id, tier) for tier in TIERS]

    def batch_formed(self, lengths: Sequence[int], inputs: Iterable[Any]) -> None:
        """A batch of texts with these token counts goes to the model now: the requests of its
        `inputs` that waited until now stop waiting."""
        now = time.perf_counter()
        for item in inputs:
            record = getattr(item, "request", None)
            if record is not None and record.handed is None:
                record.handed = now
        rows = len(lengths)
        real = sum(lengths)
        padded = rows * max(lengths, default=0)
        tally = self.tally
        tally.rows += rows
        tally.real_tokens += real
        tally.padded_tokens += padded
        if self._metrics is not None:
            self._passes.inc()
            self._rows.inc(rows)
            self._real.inc(real)
            self._padded.inc(padded)

    def queue_changed(self, tier: int, items: int) -> None:
        """`items` inputs entered (or, negative, left) the queue at tier rank `tier`."""
        self.queued[tier] += items
        if self._metrics is not None:
            self._depth[tier].inc(items)


class Metrics:
    """The worker's metrics: a registry of prometheus-client metrics, and each model's tallies."""

    def __init__(self, model_ids: Sequence[str], routes: Sequence[str]) -> None:
        self.started_at = time.time()
        self.routes = frozenset(routes)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if os.environ.get(MULTIPROCESS_DIR_ENV) is None:  # else each scrape adds it (exposition)
            ProcessCollector(registry=r)
        request = ("route", "model", "tier")
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by route, model, service tier, HTTP status and error code",
            [*request, "status", "code"],
            registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from taking a request to its answer",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            f"{PREFIX}_request_queue_duration_seconds",
            "Time a request's inputs waited in the model's queue before their first batch",
            ["model", "tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_duration = Histogram(
            f"{PREFIX}_request_model_duration_seconds",
            "Time from a request's first batch going to the model to the model's answer",
            ["model", "tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inputs = Counter(
            f"{PREFIX}_inputs", "Inputs (texts, documents, images) computed", request, registry=r
        )
        self.tokens = Counter(
            f"{PREFIX}_tokens", "Tokens of the inputs computed, as billed", request, registry=r
        )
        self.forward_passes = Counter(
            f"{PREFIX}_forward_passes", "Batches handed to the model", ["model"], registry=r
        )
        self.forward_rows = Counter(
            f"{PREFIX}_forward_pass_rows", "Inputs in the batches handed to the model", ["model"],
            registry=r,
        )  # fmt: skip
        self.forward_tokens = Counter(
            f"{PREFIX}_forward_pass_tokens",
            "Real tokens (without padding) of the batches handed to the model",
            ["model"],
            registry=r,
        )
        self.forward_padded_tokens = Counter(
            f"{PREFIX}_forward_pass_padded_tokens",
            "Padded tokens (rows x the longest row) of the batches handed to the model",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Inputs admitted to the model's queue and not yet answered",
            ["model", "tier"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.load_seconds = Gauge(
            f"{PREFIX}_model_load_seconds",
            "Seconds the model took to load",
            ["model"],
            registry=r,
            multiprocess_mode="max",
        )
        self.healthy = Gauge(
            f"{PREFIX}_engine_healthy",
            "1 while the model's engine makes progress, 0 once it stalled or died",
            ["model"],
            registry=r,
            multiprocess_mode="livemin",
        )
        for served_id in model_ids:
            for tier in TIERS:  # present from the start, at 0, so a dashboard sees every model
                self.queue_depth.labels(served_id, tier)
            self.healthy.labels(served_id).set(1)
        self.models = {served_id: ModelMetrics(served_id, self) for served_id in model_ids}
        # Each labelled child once made: `labels()` takes a lock and checks every value each call.
        self._children: dict[tuple[Any, ...], Any] = {}
        self._summary_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------- recording

    def finish(self, record: RequestRecord, status: int, code: str | None) -> None:
        """Record one answered request (dispatch calls this once for each, whatever its end)."""
        now = time.perf_counter()
        route = record.route if record.route in self.routes else UNMATCHED_ROUTE
        model = record.model if record.model in self.models else NO_MODEL
        tier = record.tier if record.tier in TIERS else ""
        code_label = "" if code is None else (code if _CODE.fullmatch(code) else OTHER_CODE)
        child = self._child
        child(self.requests, route, model, tier, str(status), code_label).inc()
        total = now - record.started
        child(self.duration, route, model).observe(total)
        if record.inputs:
            child(self.inputs, route, model, tier).inc(record.inputs)
            child(self.tokens, route, model, tier).inc(record.tokens)
        if record.entered is not None and record.answered is not None:
            handed = record.handed if record.handed is not None else record.entered
            queued, computed = handed - record.entered, record.answered - handed
            child(self.queue_duration, model, tier).observe(max(0.0, queued))
            child(self.model_duration, model, tier).observe(max(0.0, computed))
        counted = self.models.get(model)
        if counted is not None:
            tally = counted.tally
            tally.requests += 1
            tally.failed += status >= 400
            tally.inputs += record.inputs
            tally.tokens += record.tokens
            tally.latency[bisect.bisect_left(LATENCY_BUCKETS, total)] += 1

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def model_loaded(self, served_id: str, seconds: float) -> None:
        if served_id in self.models:
            self.load_seconds.labels(served_id).set(seconds)

    # ------------------------------------------------------------------------------- reading

    def exposition(self, healthy: dict[str, bool]) -> bytes:
        """The Prometheus text of every metric, with each model's health as of now."""
        for served_id, ok in healthy.items():
            if served_id in self.models:
                self.healthy.labels(served_id).set(1 if ok else 0)
        if os.environ.get(MULTIPROCESS_DIR_ENV) is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            ProcessCollector(registry=registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def stats(self, served_id: str) -> dict[str, Any]:
        """A model's `stats` in /v1/models: its figures since the worker started."""
        model = self.models.get(served_id)
        if model is None:
            return {}
        tally = model.tally
        return {
            "since": int(self.started_at),
            "requests": tally.requests,
            "failed": tally.failed,
            "inputs": tally.inputs,
            "tokens": tally.tokens,
            "latency_p50_ms": tally.latency_ms(0.5),
            "latency_p99_ms": tally.latency_ms(0.99),
            "queue_depth": sum(model.queued),
            "batch_fill": _ratio(tally.real_tokens, tally.padded_tokens),
        }

    def totals(self) -> Tally:
        total = Tally()
        for model in self.models.values():
            total.add(model.tally)
        return total

    def summary(self, since: Tally, seconds: float) -> str:
        """One line of the figures since `since` (an earlier `totals()`), over `seconds`."""
        delta = self.totals().minus(since)
        p50, p99 = delta.latency_ms(0.5), delta.latency_ms(0.99)
        fill = _ratio(delta.real_tokens, delta.padded_tokens)
        queued = sum(sum(model.queued) for model in self.models.values())
        return (
            f"last {seconds:.0f} s: {delta.requests} requests ({delta.failed} failed), "
            f"{delta.inputs} inputs, p50 {_ms(p50)} p99 {_ms(p99)}, "
            f"{delta.tokens / max(seconds, 1e-9):.0f} tokens/s, queue depth {queued}, "
            f"batch fill {'-' if fill is None else f'{fill:.2f}'}"
        )

    def start_summaries(self, interval_s: float = SUMMARY_INTERVAL_S) -> None:
        """Log `summary` every `interval_s` while requests come (RunPod queue endpoints, which
        have no /metrics to scrape); idempotent, on the running loop."""
        if self._summary_task is not None and not self._summary_task.done():
            return
        self._summary_task = asyncio.get_running_loop().create_task(
            self._log_summaries(interval_s), name="metrics summary"
        )

    async def _log_summaries(self, interval_s: float) -> None:
        last, at = self.totals(), time.monotonic()
        while True:
            await asyncio.sleep(interval_s)
            now = self.totals()
            queued = any(any(model.queued) for model in self.models.values())
            if now.requests != last.requests or queued:
                log.info("%s", self.summary(last, time.monotonic() - at))
            last, at = now, time.monotonic()


def exposition_without_worker() -> bytes:
    """The Prometheus text while no worker exists yet (models loading): the process's figures."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROCESS_DIR_ENV) is not None:
        MultiProcessCollector(registry)
    ProcessCollector(registry=registry)
    return generate_latest(registry)


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 3) if whole else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g} ms"


__all__ = [
    "CONTENT_TYPE",
    "Metrics",
    "ModelMetrics",
    "RequestRecord",
    "Tally",
    "current_record",
    "exposition_without_worker",
    "note_model",
    "tag_inputs",
]
