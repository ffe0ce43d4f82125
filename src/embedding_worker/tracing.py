"""OpenTelemetry traces of requests, when the standard OTEL_* variables ask for them.

Off unless `OTEL_TRACES_EXPORTER` names an exporter or an OTLP endpoint is set
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); `OTEL_SDK_DISABLED=true`
turns it off whatever else is set. Then every request is one span (`start`, `finish`): its route,
model, tier, inputs, tokens, status and error code, never a text. Its children are the time it
waited in its model's queue, the worker's tokenization, each forward pass it rode in (with the
rows of the batch and how many were its own) and the serialisation of its answer. An incoming W3C
`traceparent` header continues the caller's trace.

The children are recorded as plain timestamps while the request runs (`phase`, `enqueued`,
`forward_pass`, the last from the engine's batch thread) and made into spans when the request
ends, in its own task: the batch thread never touches the SDK, and a request that is not traced
costs a context-variable read at each of those points. Spans go to the exporter in batches from
the SDK's own thread (`BatchSpanProcessor`), flushed at exit.

Exporters: `otlp` (OTLP over HTTP/protobuf; the SDK reads the endpoint, headers, timeout and
`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` itself) and `console` (one JSON span a line on
stdout, for a look without a collector).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .request_context import RequestContext, current_request

log = logging.getLogger(__name__)

SERVICE_NAME = "embedding-worker"  # the service name unless OTEL_SERVICE_NAME says another
EXPORTERS = ("otlp", "console")
# A valid traceparent is 55 characters (version 00); later versions may append fields.
MAX_TRACEPARENT_CHARS = 128
_TRACEPARENT_CHARS = frozenset("0123456789abcdef-")

_tracer: Any = None  # the SDK's tracer while traces are exported, else None
_provider: Any = None  # its TracerProvider
# The trace of each queued text's future, until its forward pass: set in the request's task, read
# from the engine's batch thread.
_owners: weakref.WeakKeyDictionary[Any, Trace] = weakref.WeakKeyDictionary()
_owners_lock = threading.Lock()


@dataclass
class ForwardPass:
    start_ns: int
    end_ns: int
    rows: int  # texts in the batch
    own: int  # of which this request's


@dataclass
class Trace:
    """One request's span, and the timestamps of its children until the request ends."""

    span: Any
    queued_ns: int | None = None  # when its first text entered a model's queue
    phases: list[tuple[str, int, int]] = field(default_factory=list)  # (name, start, end)
    passes: dict[int, ForwardPass] = field(default_factory=dict)  # by id of the batch's futures


def traces_wanted(env: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks for; none when traces are off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        return [name.strip() for name in named.split(",") if name.strip() not in ("", "none")]
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return ["otlp"] if endpoint else []


def configure(env: Mapping[str, str] | None = None, exporter: Any = None) -> bool:
    """Export traces if the environment asks for them (see the module's docstring), or to
    `exporter` (an SDK SpanExporter: benchmarks); whether it does. Unknown exporter names are
    logged and skipped."""
    global _tracer, _provider
    shutdown()
    env = os.environ if env is None else env
    exporters = traces_wanted(env) if exporter is None else ["given"]
    if not exporters:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    named_service = env.get("OTEL_SERVICE_NAME", "").strip()
    resource = Resource.create({} if named_service else {"service.name": SERVICE_NAME})
    provider = TracerProvider(resource=resource)
    added = 0
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
        exporters, added = [], 1
    for name in exporters:
        if name == "otlp":  # over HTTP/protobuf, whatever OTEL_EXPORTER_OTLP_PROTOCOL says
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            log.warning("OTEL_TRACES_EXPORTER: no exporter %r (%s)", name, ", ".join(EXPORTERS))
            continue
        added += 1
    if not added:
        return False
    _tracer, _provider = provider.get_tracer("embedding_worker"), provider
    log.info("exporting traces (%s)", ", ".join(exporters) or type(exporter).__name__)
    return True


def shutdown() -> None:
    """Stop exporting, after sending what is buffered (tests; the SDK flushes at exit itself)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def flush() -> None:
    """Hand every span ended so far to the exporter, now."""
    if _provider is not None:
        _provider.force_flush()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """No traces within the block, the exporter kept (benchmarks: traced and untraced rounds)."""
    global _tracer
    kept, _tracer = _tracer, None
    try:
        yield
    finally:
        _tracer = kept


def enabled() -> bool:
    return _tracer is not None


def valid_traceparent(raw: bytes | str | None) -> str | None:
    """`raw` if it may be a W3C traceparent (bounded, lower-case hex and dashes), else None."""
    if not raw or len(raw) > MAX_TRACEPARENT_CHARS:
        return None
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    return text if _TRACEPARENT_CHARS.issuperset(text) else None


def start(
    context: RequestContext,
    name: str,
    traceparent: bytes | str | None = None,
    parent: Trace | None = None,
) -> None:
    """Start the request's span when traces are exported, a child of the caller's `traceparent`
    (if valid) or of `parent`; the span goes on the request's context, named `name` and then the
    route (`finish`)."""
    if _tracer is None:
        return
    from opentelemetry.trace import SpanKind, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    outer = None
    header = valid_traceparent(traceparent)
    if header is not None:
        outer = TraceContextTextMapPropagator().extract({"traceparent": header})
    elif parent is not None:
        outer = set_span_in_context(parent.span)
    kind = SpanKind.SERVER if parent is None else SpanKind.INTERNAL
    context.trace = Trace(_tracer.start_span(name, context=outer, kind=kind))


def finish(context: RequestContext) -> None:
    """End the request's span: its attributes from the context, its children from what was
    recorded."""
    trace = context.trace
    if trace is None:
        return
    context.trace = None
    span = trace.span
    if context.route is not None:
        span.update_name(f"{span.name} {context.route}")
    span.set_attribute("request.id", context.id)
    for key, value in (
        ("embedding_worker.route", context.route),
        ("embedding_worker.model", context.model),
        ("embedding_worker.tier", context.tier),
        ("embedding_worker.inputs", context.inputs),
        ("embedding_worker.tokens", context.tokens),
        ("http.response.status_code", context.status),
        ("error.type", context.code),
    ):
        if value is not None:
            span.set_attribute(key, value)
    if context.status is not None and context.status >= 500:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, context.code or str(context.status)))
    _children(trace)
    span.end()


def _children(trace: Trace) -> None:
    from opentelemetry.trace import set_span_in_context

    parent = set_span_in_context(trace.span)
    passes = sorted(trace.passes.values(), key=lambda each: each.start_ns)
    if trace.queued_ns is not None and passes:
        child = _tracer.start_span("queue wait", context=parent, start_time=trace.queued_ns)
        child.end(end_time=max(trace.queued_ns, passes[0].start_ns))
    for each in passes:
        child = _tracer.start_span(
            "forward pass",
            context=parent,
            start_time=each.start_ns,
            attributes={
                "embedding_worker.batch.rows": each.rows,
                "embedding_worker.rows": each.own,
            },
        )
        child.end(end_time=each.end_ns)
    for name, start_ns, end_ns in trace.phases:
        child = _tracer.start_span(name, context=parent, start_time=start_ns)
        child.end(end_time=end_ns)


def current() -> Trace | None:
    context = current_request.get()
    return context.trace if context is not None else None


@contextlib.contextmanager
def _timed(trace: Trace, name: str) -> Iterator[None]:
    started = time.time_ns()
    try:
        yield
    finally:
        trace.phases.append((name, started, time.time_ns()))


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    """A child span `name` around a block of the current request, if it is traced."""
    trace = current()
    if trace is None:
        return contextlib.nullcontext()
    return _timed(trace, name)


# --- the engine's hooks -----------------------------------------------------------------------


def enqueued(futures: Iterable[Any]) -> None:
    """The current request's texts entered a model's queue, each answered by one of `futures`
    (called where the engine queues them, in the request's task)."""
    trace = current()
    if trace is None:
        return
    if trace.queued_ns is None:
        trace.queued_ns = time.time_ns()
    with _owners_lock:
        for future in futures:
            _owners[future] = trace


def forward_pass(futures: list[Any], start_ns: int, end_ns: int) -> None:
    """A forward pass ran from `start_ns` to `end_ns` for the texts answered by `futures` (called
    from the engine's batch thread, after the pass)."""
    if not _owners:
        return
    counts: dict[int, tuple[Trace, int]] = {}
    with _owners_lock:
        for future in futures:
            trace = _owners.pop(future, None)
            if trace is not None:
                known = counts.get(id(trace))
                counts[id(trace)] = (trace, known[1] + 1 if known else 1)
    for trace, own in counts.values():
        trace.passes[start_ns] = ForwardPass(start_ns, end_ns, len(futures), own)
