"""OpenTelemetry traces over OTLP/HTTP to a real receiver started here, decoded from protobuf.

The worker exports with the SDK's own OTLP exporter, configured by the standard variables; the
receiver is a plain HTTP server that decodes each ExportTraceServiceRequest (opentelemetry-proto).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from embedding_worker import tracing
from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.http import create_app
from embedding_worker.transports.runpod import runpod_handler
from tests.test_server import ServerThread

SECRET = "a sentence that must never reach a span"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP trace receiver: keeps every request's raw body and decoded spans."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.requests: list[ExportTraceServiceRequest] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                assert self.path == "/v1/traces"
                assert self.headers["content-type"] == "application/x-protobuf"
                receiver.bodies.append(body)
                receiver.requests.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list:
        return [
            span
            for request in self.requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def service_names(self) -> set[str]:
        return {
            attribute.value.string_value
            for request in self.requests
            for resource_spans in request.resource_spans
            for attribute in resource_spans.resource.attributes
            if attribute.key == "service.name"
        }


def attributes(span) -> dict:
    values = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = getattr(value, value.WhichOneof("value"))
    return values


@pytest.fixture
def receiver(monkeypatch):
    running = Receiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", running.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "traced-worker")
    assert tracing.configure()
    yield running
    tracing.shutdown()
    running.server.shutdown()


@pytest.fixture(scope="module")
def worker(bert_embedder):
    return Worker.from_config(load_config({"MODEL_NAMES": str(bert_embedder)}))


def test_a_request_is_one_span_with_its_stages_and_the_callers_trace(worker, receiver):
    embedder = worker.registry.models[0].served_id
    with ServerThread(create_app(worker)) as server:
        answer = httpx.post(
            server.url + "/v1/embeddings",
            json={"model": embedder, "input": [SECRET, "another text"]},
            headers={
                "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
                "X-Request-Id": "traced-1",
            },
        )
        assert answer.status_code == 200
        failed = httpx.post(
            server.url + "/v1/embeddings",
            json={"model": "no-such-model", "input": ["x"]},
            headers={"traceparent": "00-" + "f" * 5000, "X-Request-Id": "traced-2"},
        )
        assert failed.status_code == 404
        queued = httpx.post(
            server.url + "/run",
            json={"input": {"model": embedder, "input": ["queued"]}},
            headers={"X-Request-Id": "traced-3"},
        )
        job_id = queued.json()["id"]
        while httpx.get(f"{server.url}/status/{job_id}").json()["status"] != "COMPLETED":
            time.sleep(0.05)
    tracing.shutdown()  # sends what is buffered

    assert receiver.service_names() == {"traced-worker"}
    spans = receiver.spans()
    (root,) = [s for s in spans if attributes(s).get("request.id") == "traced-1"]
    assert root.trace_id.hex() == TRACE_ID and root.parent_span_id.hex() == PARENT_ID
    assert root.name == "POST /v1/embeddings"
    said = attributes(root)
    assert said["embedding_worker.model"] == embedder
    assert said["embedding_worker.tier"] == "default"
    assert said["embedding_worker.inputs"] == 2
    assert said["embedding_worker.tokens"] == answer.json()["usage"]["total_tokens"] > 0
    assert said["http.response.status_code"] == 200

    children = [s for s in spans if s.parent_span_id == root.span_id]
    names = sorted(child.name for child in children)
    assert {"tokenize", "queue wait", "forward pass", "serialise"} <= set(names), names
    for child in children:
        assert child.trace_id == root.trace_id
        assert root.start_time_unix_nano <= child.start_time_unix_nano
        assert child.start_time_unix_nano <= child.end_time_unix_nano <= root.end_time_unix_nano
    passes = [child for child in children if child.name == "forward pass"]
    assert sum(attributes(p)["embedding_worker.rows"] for p in passes) == 2
    (wait,) = [child for child in children if child.name == "queue wait"]
    assert wait.end_time_unix_nano <= min(p.start_time_unix_nano for p in passes)

    # A traceparent that is not one starts a trace of its own; the failure is on the span.
    (other,) = [s for s in spans if attributes(s).get("request.id") == "traced-2"]
    assert other.trace_id.hex() != TRACE_ID and not other.parent_span_id
    assert attributes(other)["error.type"] == "model_not_found"
    assert attributes(other)["http.response.status_code"] == 404

    # A /run job is a span of its own, a child of the span of the request that queued it.
    queued_spans = [s for s in spans if attributes(s).get("request.id") == "traced-3"]
    (post,) = [s for s in queued_spans if s.name == "POST /run"]
    (job,) = [s for s in queued_spans if s.name == "job /run"]
    assert job.parent_span_id == post.span_id and job.trace_id == post.trace_id
    assert "forward pass" in {s.name for s in spans if s.parent_span_id == job.span_id}

    assert all(SECRET.encode() not in body for body in receiver.bodies)


async def test_a_job_without_http_is_a_span_of_its_own(receiver, bert_reranker):
    worker = Worker.from_config(load_config({"MODEL_NAMES": str(bert_reranker)}))
    reranker = worker.registry.models[0].served_id
    await worker.start()
    try:
        handler = runpod_handler(worker)
        reply = await handler(
            {"id": "job-9", "input": {"model": reranker, "query": "q", "documents": [SECRET, "b"]}}
        )
        line = {"url": "/v1/rerank", "body": {"model": reranker, "query": "q", "documents": ["d"]}}
        lines = [dict(line, custom_id=name) for name in ("first", "second")]
        batch = await handler({"id": "batch-1", "input": {"batch": lines}})
    finally:
        await worker.stop()
    assert "error" not in reply and "error" not in batch
    tracing.shutdown()
    spans = receiver.spans()
    (root,) = [s for s in spans if attributes(s).get("request.id") == "job-9"]
    assert root.name == "job /v1/rerank" and not root.parent_span_id
    assert attributes(root)["embedding_worker.inputs"] == 2
    children = {s.name for s in spans if s.parent_span_id == root.span_id}
    assert "tokenize" in children
    # A batch job's lines are spans of their own, children of the job's.
    (job,) = [s for s in spans if attributes(s).get("request.id") == "batch-1"]
    line_spans = [s for s in spans if attributes(s).get("request.id", "").startswith("batch-1/")]
    assert sorted(attributes(s)["request.id"] for s in line_spans) == [
        "batch-1/first",
        "batch-1/second",
    ]
    assert all(s.parent_span_id == job.span_id and s.trace_id == job.trace_id for s in line_spans)
    assert all(SECRET.encode() not in body for body in receiver.bodies)


async def test_the_engines_the_worker_runs_itself_trace_their_forward_passes(
    receiver, qwen3_reranker
):
    worker = Worker.from_config(load_config({"MODEL_NAMES": str(qwen3_reranker)}))
    reranker = worker.registry.models[0].served_id
    await worker.start()
    try:
        reply = await runpod_handler(worker)(
            {"id": "job-llm", "input": {"model": reranker, "query": "q", "documents": ["a", "b"]}}
        )
    finally:
        await worker.stop()
    assert "error" not in reply
    tracing.shutdown()
    spans = receiver.spans()
    (root,) = [s for s in spans if attributes(s).get("request.id") == "job-llm"]
    passes = [s for s in spans if s.parent_span_id == root.span_id and s.name == "forward pass"]
    assert passes and sum(attributes(p)["embedding_worker.rows"] for p in passes) == 2


@pytest.mark.parametrize(
    ("env", "wanted"),
    [
        ({}, []),
        ({"OTEL_SERVICE_NAME": "x"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, []),
    ],
)
def test_traces_are_off_unless_the_variables_ask(env, wanted):
    assert tracing.traces_wanted(env) == wanted


def test_off_by_default_nothing_is_recorded():
    tracing.shutdown()
    assert not tracing.configure({})
    assert not tracing.enabled()
    with tracing.phase("tokenize"):
        pass  # no trace, no error


@pytest.mark.parametrize(
    "raw",
    [f"00-{TRACE_ID}-{PARENT_ID}-01", "00-" + "a" * 200, "00-ABC", "00-\n-x", ""],
)
def test_a_traceparent_is_bounded_before_it_is_parsed(raw):
    expected = raw if raw.startswith(f"00-{TRACE_ID}") else None
    assert tracing.valid_traceparent(raw.encode()) == expected
