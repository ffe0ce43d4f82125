"""Request ids (X-Request-Id) on every HTTP answer, in answer ids and log lines, and JSON logs.

A real server (uvicorn in a thread) over a real tiny model; the log lines are read through the
worker's own handler set-up (logs.RequestFields and logs.JsonFormatter, as LOG_FORMAT=json
installs them).
"""

from __future__ import annotations

import io
import json
import logging
import re

import httpx
import pytest

from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.logs import RequestFields, formatter
from embedding_worker.request_context import MAX_REQUEST_ID_CHARS
from embedding_worker.transports.http import create_app
from tests.test_server import ServerThread

SECRET = "the payload text nobody may log"


@pytest.fixture(scope="module")
def server(bert_embedder):
    worker = Worker.from_config(load_config({"MODEL_NAMES": str(bert_embedder)}))
    with ServerThread(create_app(worker)) as running:
        running.model = worker.registry.models[0].served_id
        yield running


@pytest.fixture
def json_lines():
    """The worker's log lines while the test runs, as LOG_FORMAT=json writes them (DEBUG on)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestFields())
    handler.setFormatter(formatter("json"))
    logger = logging.getLogger("embedding_worker")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_given_request_id_comes_back_in_the_header_and_the_answer_id(server):
    answer = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": server.model, "input": ["hello"]},
        headers={"X-Request-Id": "trace-me_42"},
    )
    assert answer.status_code == 200
    assert answer.headers["x-request-id"] == "trace-me_42"
    assert answer.json()["id"] == "embd-trace-me_42"


def test_a_request_without_an_id_gets_a_fresh_one_each_time(server):
    made = []
    for _ in range(2):
        answer = httpx.post(server.url + "/v1/embeddings", json={"input": ["hello"]})
        made.append(answer.headers["x-request-id"])
        assert answer.json()["id"] == f"embd-{made[-1]}"
    assert made[0] != made[1]
    assert all(re.fullmatch(r"[0-9a-f]{32}", each) for each in made)


@pytest.mark.parametrize(
    "bad",
    ["x" * (MAX_REQUEST_ID_CHARS + 1), "a b", "<script>", "id\u00e9"],
    ids=["too long", "space", "markup", "non-ascii"],
)
def test_a_bad_request_id_is_replaced_not_echoed(server, bad):
    answer = httpx.post(
        server.url + "/v1/embeddings",
        json={"input": ["hello"]},
        headers={"X-Request-Id": bad.encode("utf-8")},
    )
    assert answer.status_code == 200
    made = answer.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made), made
    assert bad not in answer.text


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/ping", 200),
        ("GET", "/health", 200),
        ("GET", "/nowhere", 404),
        ("DELETE", "/v1/embeddings", 405),
        ("GET", "/status/no-such-job", 404),
    ],
)
def test_every_answer_carries_the_request_id(server, method, path, status):
    answer = httpx.request(method, server.url + path, headers={"X-Request-Id": "every-1"})
    assert answer.status_code == status
    assert answer.headers["x-request-id"] == "every-1"


def test_runsync_answers_under_the_request_id(server):
    answer = httpx.post(
        server.url + "/runsync",
        json={"input": {"input": ["hello"]}},
        headers={"X-Request-Id": "sync-job-7"},
    )
    assert answer.json()["id"] == "sync-job-7"
    assert answer.json()["output"]["id"] == "embd-sync-job-7"


def test_json_log_lines_carry_the_request_and_never_the_payload(server, json_lines):
    answer = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": "no-such-model", "input": [SECRET]},
        headers={"X-Request-Id": "logged-1"},
    )
    assert answer.status_code == 404
    lines = [line for line in json_lines() if line.get("request_id") == "logged-1"]
    assert len(lines) >= 2, json_lines()  # dispatch's refusal, and the request's own line
    for line in lines:
        assert {"time", "level", "logger", "message", "duration_ms"} <= set(line)
        assert line["route"] == "/v1/embeddings"
        assert line["model"] == "no-such-model"
        assert line["status"] == 404 and line["code"] == "model_not_found"
        assert line["tier"] == "default"
    answered = lines[-1]
    assert answered["message"] == "POST /v1/embeddings answered 404"
    assert SECRET not in json.dumps(json_lines())


def test_text_log_lines_name_the_request(server):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestFields())
    handler.setFormatter(formatter("text"))
    logger = logging.getLogger("embedding_worker")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        httpx.get(server.url + "/nowhere", headers={"X-Request-Id": "text-1"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert "request text-1: GET (no such route) answered 404" in stream.getvalue()
