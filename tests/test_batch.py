"""Batch files: thousands of lines through the one dispatch, resuming, the RunPod job form, and a
RunPod endpoint (runpod's own local API in a subprocess), checked line by line against single
requests."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embedding_worker import errors
from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.operations import batch
from embedding_worker.statuses import http_status
from embedding_worker.transports import batch_run
from embedding_worker.transports.batch_files import run_batch, run_local
from embedding_worker.transports.batch_run import BatchOptions, BatchRun
from embedding_worker.transports.remote import run_endpoint
from embedding_worker.transports.runpod import answer_job, runpod_handler
from tests.conftest import ROOT
from tests.helpers import call, decode_vectors

WORDS = (
    "the quick brown fox jumps over a lazy dog while rain falls on quiet hills near old stone "
    "bridges and children read books about stars rivers machines music gardens"
).split()


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def make_lines(count: int, ids: dict[str, str], seed: int = 0) -> list[str]:
    """JSONL text lines: embeddings (float and base64, 1-3 inputs), rerank, and every kind of bad
    line, blank lines and a repeated custom_id among them."""
    rng = random.Random(seed)
    bad = [
        "{not json",
        json.dumps([1, 2, 3]),
        json.dumps({"method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}),
        json.dumps({"custom_id": "{cid}", "method": "GET", "url": "/v1/embeddings", "body": {}}),
        json.dumps({"custom_id": "{cid}", "method": "POST", "url": "/v1/chat", "body": {}}),
        json.dumps({"custom_id": "{cid}", "method": "POST", "url": "/v1/embeddings", "body": "x"}),
        # Valid lines whose request is refused: answered with the HTTP error.
        json.dumps({"custom_id": "{cid}", "url": "/v1/embeddings", "body": {"input": ""}}),
        json.dumps(
            {
                "custom_id": "{cid}",
                "url": "/v1/embeddings",
                "body": {"model": "no-such-model", "input": "x"},
            }
        ),
    ]
    lines = []
    for n in range(count):
        cid = f"req-{n}"
        if n % 97 == 13:
            lines.append(bad[(n // 97) % len(bad)].replace("{cid}", cid))
        elif n % 250 == 7:
            lines.append("")
        elif n % 25 == 3:
            body = {
                "model": ids["reranker"],
                "query": _text(rng),
                "documents": [_text(rng) for _ in range(3)],
                "return_documents": n % 2 == 0,
            }
            lines.append(
                json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/rerank", "body": body})
            )
        else:
            texts = [_text(rng) for _ in range(rng.randint(1, 3))]
            body = {
                "model": ids["embedder"],
                "input": texts,
                "encoding_format": "base64" if n % 3 == 0 else "float",
            }
            lines.append(
                json.dumps(
                    {"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": body}
                )
            )
    # A custom_id repeated: the first occurrence is the one answered.
    lines.insert(
        10,
        json.dumps(
            {
                "custom_id": "req-1",
                "url": "/v1/embeddings",
                "body": {"model": ids["embedder"], "input": "a repeat"},
            }
        ),
    )
    return lines


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def options(tmp_path: Path, source: Path, **overrides: Any) -> BatchOptions:
    values = dict(
        input=source,
        output=tmp_path / "results.jsonl",
        text=False,
        defaults={},
        progress=False,
        backoff_s=0.01,
        poll_s=0.05,
    )
    values.update(overrides)
    return BatchOptions(**values)


def assert_same_answer(got: dict[str, Any], want_status: int, want: dict[str, Any]) -> None:
    """A batch answer against the single request's: equal but for ids, timestamps and the float
    noise of being batched with other requests."""
    assert got["status_code"] == want_status
    body = got["body"]
    if want_status != 200:
        assert body == want
        return
    assert body["model"] == want["model"] and body["usage"] == want["usage"]
    if want["object"] == "rerank":
        scores = {r["index"]: r["relevance_score"] for r in body["results"]}
        expected = {r["index"]: r["relevance_score"] for r in want["results"]}
        assert scores.keys() == expected.keys()
        assert np.allclose([scores[i] for i in expected], list(expected.values()), atol=1e-5)
        assert [r.get("document") for r in sorted(body["results"], key=lambda r: r["index"])] == [
            r.get("document") for r in sorted(want["results"], key=lambda r: r["index"])
        ]
    else:
        assert [type(d["embedding"]) for d in body["data"]] == [
            type(d["embedding"]) for d in want["data"]
        ]
        for mine, theirs in zip(decode_vectors(body), decode_vectors(want), strict=True):
            assert mine.shape == theirs.shape and np.allclose(mine, theirs, atol=1e-5)


async def check_against_single_requests(worker, source: Path, outputs: list[dict[str, Any]]):
    """Every line of `source` has exactly one output line, matching what the same request answers
    on its own through worker.dispatch, or the line's error."""
    by_id = {o["custom_id"]: o for o in outputs}
    assert len(by_id) == len(outputs), "a custom_id was written twice"
    expected_ids, requests = set(), []
    for line_no, raw in enumerate(source.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        cid = value.get("custom_id") if isinstance(value, dict) else None
        if cid is None:
            cid = f"line-{line_no}"
        if cid in expected_ids:
            continue  # a repeated custom_id: answered once, for its first line
        expected_ids.add(cid)
        output = by_id[cid]
        assert set(output) == {"id", "custom_id", "response", "error"}
        assert output["id"].startswith("batch_req_")
        runnable = (
            isinstance(value, dict)
            and isinstance(value.get("custom_id"), str)
            and value.get("method", "POST") == "POST"
            and value.get("url") in ("/v1/embeddings", "/v1/rerank")
            and isinstance(value.get("body"), dict)
        )
        if runnable:
            assert output["error"] is None
            requests.append((output, value["url"], value["body"]))
        else:
            assert output["response"] is None
            assert output["error"]["code"] == "invalid_batch_line"
            assert f"line {line_no}:" in output["error"]["message"]
    assert set(by_id) == expected_ids
    for start in range(0, len(requests), 200):
        group = requests[start : start + 200]
        singles = await asyncio.gather(*(call(worker, url, body) for _, url, body in group))
        for (output, _, _), single in zip(group, singles):
            assert_same_answer(output["response"], single.status, single.body)
    return requests


async def test_thousands_of_lines_match_single_requests(worker, ids, tmp_path):
    source = write_lines(tmp_path / "requests.jsonl", make_lines(2500, ids))
    summary = await run_batch(worker, options(tmp_path, source))
    outputs = read_output(tmp_path / "results.jsonl")
    requests = await check_against_single_requests(worker, source, outputs)
    assert len(requests) > 2300
    assert any(url == "/v1/rerank" for _, url, _ in requests)
    assert summary.duplicates == 1 and summary.unanswered == 0 and summary.aborted is None
    assert summary.answered == len(outputs)
    assert summary.failed == sum(
        1 for o in outputs if o["error"] or o["response"]["status_code"] >= 400
    )


async def test_a_rerun_counts_each_answered_custom_id_once(worker, ids, tmp_path):
    texts = [{"custom_id": f"doc-{i}", "text": f"text {i}"} for i in range(6)]
    lines = [json.dumps(t) for t in [*texts, texts[2]]]  # doc-2 twice
    source = write_lines(tmp_path / "plain.jsonl", lines)
    first = await run_batch(worker, options(tmp_path, source, defaults={"model": ids["minilm"]}))
    assert (first.answered, first.duplicates) == (6, 1)
    again = await run_batch(worker, options(tmp_path, source, defaults={"model": ids["minilm"]}))
    assert (again.answered, again.already_done, again.duplicates) == (0, 6, 1)
    assert "6 already there" in again.describe(tmp_path / "results.jsonl")


async def test_an_interrupted_run_resumes_without_loss_or_duplicates(worker, ids, tmp_path):
    source = write_lines(tmp_path / "requests.jsonl", make_lines(1200, ids, seed=1))
    result = tmp_path / "results.jsonl"
    first = BatchRun(options(tmp_path, source, concurrency=16))
    with first:
        task = asyncio.create_task(run_local(worker, first))
        while first.summary.answered < 300:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    kept = result.read_bytes()
    assert 300 <= len(kept.splitlines()) < 1000
    # A kill in the middle of writing a line leaves it half written.
    with open(result, "ab") as out:
        out.write(b'{"id": "batch_req_0", "custom_id": "req-11')

    summary = await run_batch(worker, options(tmp_path, source))
    assert result.read_bytes().startswith(kept)  # what was written stays as it was
    outputs = read_output(result)
    assert len(outputs) == len(kept.splitlines()) + summary.answered
    await check_against_single_requests(worker, source, outputs)

    again = await run_batch(worker, options(tmp_path, source))
    assert again.answered == 0 and again.already_done >= 1000


async def test_lines_are_read_only_as_slots_free_up():
    """The input is pulled lazily: never more than `limit` lines read ahead of those finished, and
    that many really run at once (what lets the engine batch them)."""
    pulled = finished = most_ahead = 0

    def lines():
        nonlocal pulled
        for number in range(300):
            pulled += 1
            yield number

    async def work(number: int) -> None:
        nonlocal finished, most_ahead
        most_ahead = max(most_ahead, pulled - finished)
        await asyncio.sleep(0.001 * (number % 3))
        finished += 1

    await batch.bounded(lines(), work, 8)
    assert finished == 300 and most_ahead == 8


async def test_a_foreign_output_file_is_refused_not_appended(worker, ids, tmp_path):
    source = write_lines(tmp_path / "requests.jsonl", make_lines(5, ids))
    foreign = tmp_path / "results.jsonl"
    foreign.write_text('{"something": "else"}\n')
    with pytest.raises(batch_run.OutputFileError, match="line 1"):
        await run_batch(worker, options(tmp_path, source))
    assert foreign.read_text() == '{"something": "else"}\n'


async def test_plain_text_lines_use_the_command_line_options(worker, ids, tmp_path):
    source = tmp_path / "docs.jsonl"
    source.write_text(
        json.dumps({"text": "first document"})
        + "\n"
        + json.dumps({"text": "second", "custom_id": "mine"})
        + "\n"
        + json.dumps({"text": ""})
        + "\n"
    )
    defaults = {"model": ids["embedder"], "dimensions": 8, "encoding_format": "base64"}
    await run_batch(worker, options(tmp_path, source, defaults=defaults))
    outputs = {o["custom_id"]: o for o in read_output(tmp_path / "results.jsonl")}
    assert set(outputs) == {"line-1", "mine", "line-3"}
    single = await call(worker, "/v1/embeddings", {**defaults, "input": "first document"})
    assert_same_answer(outputs["line-1"]["response"], single.status, single.body)
    assert len(decode_vectors(outputs["mine"]["response"]["body"])[0]) == 8
    # An empty text is a valid line whose request is refused.
    assert outputs["line-3"]["response"]["status_code"] == 400


async def test_the_runpod_batch_job_answers_its_lines_in_order(worker, ids):
    lines = [json.loads(raw) for raw in make_lines(40, ids) if raw and raw != "{not json"]
    output = await runpod_handler(worker)({"id": "job-1", "input": {"batch": lines}})
    assert output["object"] == "list"
    data = output["data"]
    assert len(data) == len(lines)  # each line answered, a repeated custom_id too
    for value, answer in zip(lines, data):
        if isinstance(value, dict) and isinstance(value.get("custom_id"), str):
            assert answer["custom_id"] == value["custom_id"]
    request = lines[1]
    single = await call(worker, request["url"], request["body"])
    assert_same_answer(data[1]["response"], single.status, single.body)
    json.dumps(output)  # what runpod serialises


@pytest.mark.parametrize(
    "job_input, status",
    [
        ({"batch": []}, 400),
        ({"batch": "x"}, 400),
        ({"batch": [{}] * (batch.JOB_MAX_LINES + 1)}, 413),
    ],
)
async def test_a_batch_job_out_of_bounds_is_a_typed_error(worker, job_input, status):
    reply = await answer_job(worker, job_input)
    assert reply.status == status and reply.body["error"]["param"] == "batch"
    assert "error" in reply.runpod_output()


# --------------------------------------------------------------------------------------------- #
# Retrying: one policy (errors.py), the server's Retry-After honoured


def test_the_retry_policy_is_the_errors_own():
    """Batch lines, batch files and endpoint jobs see only statuses: they retry exactly what the
    worker's own errors call retryable."""
    retryable = [
        errors.overloaded("busy"),
        errors.unavailable("engine down"),
        errors.request_timeout("slow body"),
    ]
    final = [errors.invalid_input("bad"), errors.internal(), errors.too_large("big")]
    assert all(e.retryable and errors.is_retryable(http_status(e)) for e in retryable)
    assert not any(e.retryable or errors.is_retryable(http_status(e)) for e in final)
    assert errors.is_retryable(502) and errors.is_retryable(504) and not errors.is_retryable(None)


def test_a_retry_waits_for_the_servers_retry_after_capped():
    assert errors.retry_wait(2, 0.5) == 2.0  # exponential backoff without a Retry-After
    assert errors.retry_wait(0, 0.5, retry_after=5) == 5  # the server's word when longer
    assert errors.retry_wait(3, 0.5, retry_after=1) == 4.0  # never shorter than the backoff
    assert errors.retry_wait(0, 0.5, retry_after=3600) == errors.MAX_RETRY_WAIT_S


async def test_a_line_refused_with_retry_after_is_retried_after_that_wait(bert_embedder):
    """Two maximum-size lines at once on a real engine: the second is refused at the door with 429
    and a Retry-After (engines/admission.py), and its retry waits that long, not the backoff."""
    worker = Worker.from_config(
        load_config(
            {
                "MODEL_NAMES": str(bert_embedder),
                "DTYPES": "float32",
                "MAX_REQUEST_TOKENS": "20000",
                "MAX_QUEUED_TOKENS": "20000",  # one such line at a time, whatever the pace
            }
        )
    )
    await worker.start()
    body = {"input": ["hello " * 20] * 300}  # 18,600 tokens: within every limit
    lines = [batch.LineRequest(f"big-{n}", "/v1/embeddings", body) for n in range(2)]

    async def timed(line: batch.LineRequest, retries: int) -> tuple[dict[str, Any], float]:
        start = time.monotonic()
        output = await batch.answer(worker, line, retries=retries, backoff_s=0.01)
        return output, time.monotonic() - start

    try:
        # Without retries the refusal is the answer, and the line carries the wait.
        answered = await asyncio.gather(*(timed(line, 0) for line in lines))
        refused = next(o["response"] for o, _ in answered if batch.status_of(o) == 429)
        assert refused["retry_after"] >= 1 and refused["body"]["error"]["code"] == "queue_full"
        assert batch.retry_after_of({"response": refused}) == refused["retry_after"]
        # With retries both are answered; the refused one waited at least a second (the backoff
        # alone would have been 0.01 s, then 0.02 s, ...).
        answered = await asyncio.gather(*(timed(line, 3) for line in lines))
        assert [batch.status_of(o) for o, _ in answered] == [200, 200]
        assert "retry_after" not in answered[0][0]["response"]
        assert max(elapsed for _, elapsed in answered) >= 1.0
    finally:
        await worker.stop()


# --------------------------------------------------------------------------------------------- #
# A deployed endpoint: runpod's own local API serving this worker, in a subprocess


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MODEL_NAMES"}
    env.update({"HF_HUB_OFFLINE": "1", "RUNPOD_DEBUG_LEVEL": "WARN", "LOG_LEVEL": "WARNING"})
    env.update(extra)
    return env


API_KEY = "batch-test-key"
# Small enough that 32 lines' answers together pass it (the job is refused and split), large enough
# for any one line's.
MAX_RESPONSE_BYTES = 20000
SERVERS = {
    # runpod's own local API: POST /status only; /run stores the job until a /status runs it.
    "runpod": (["--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port"], "/docs"),
    # this worker's local server (handler.py --serve), with an API key.
    "serve": (["--serve", "--host", "127.0.0.1", "--port"], "/health"),
}


@pytest.fixture(scope="module", autouse=True)
def endpoint_servers(bert_embedder, bert_reranker, tmp_path_factory):
    """Both local endpoints on the tiny BERTs (the same files as the test worker), started with the
    module so that they load while the tests before the endpoint tests run."""
    logs = tmp_path_factory.mktemp("endpoints")
    env = _env(
        MODEL_NAMES=f"{bert_embedder};{bert_reranker}",
        BATCH_SIZES="16",
        DTYPES="float32",
        MAX_RESPONSE_BYTES=str(MAX_RESPONSE_BYTES),
        WORKER_API_KEY=API_KEY,
    )
    servers = {}
    for name, (flags, ready_path) in SERVERS.items():
        port = _free_port()
        log_file = open(logs / f"{name}.log", "w")  # a pipe nobody reads would block the server
        process = subprocess.Popen(
            [sys.executable, "handler.py", *flags, str(port)],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        servers[name] = (process, f"http://127.0.0.1:{port}", ready_path, logs / f"{name}.log")
        log_file.close()  # the child has its own copy
    yield servers
    for process, *_ in servers.values():
        process.terminate()
    for process, *_ in servers.values():
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_ready(server) -> str:
    process, url, ready_path, log_path = server
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + ready_path, timeout=1).status_code < 500:  # /docs redirects
                return url
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{url} did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.3)


class FaultyNetwork(httpx.AsyncBaseTransport):
    """The real network to the real server, with faults injected: the first /run answers 503 with
    a Retry-After of 2 s (as an HTTP date), and the first completed job answers its first line with
    a full queue (429) that asks for 1 s. Records job sizes and when each was sent."""

    def __init__(self) -> None:
        self.real = httpx.AsyncHTTPTransport()
        self.job_sizes: list[int] = []
        self.job_sent: list[tuple[float, str]] = []  # when each job was sent, its first custom_id
        self.queue_full_sent: str | None = None
        self.queue_full_at = 0.0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/run":
            lines = json.loads(request.content)["input"]["batch"]
            self.job_sizes.append(len(lines))
            self.job_sent.append((time.monotonic(), lines[0]["custom_id"]))
            if len(self.job_sizes) == 1:
                later = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
                return httpx.Response(503, text="upstream busy", headers={"Retry-After": later})
        response = await self.real.handle_async_request(request)
        if not request.url.path.startswith("/status/") or self.queue_full_sent:
            return response
        await response.aread()
        status = response.json()
        if status.get("status") != "COMPLETED":
            return response
        first = status["output"]["data"][0]
        self.queue_full_sent = first["custom_id"]
        self.queue_full_at = time.monotonic()
        queue_full = {"error": {"code": "queue_full"}}
        first["response"] = {
            "status_code": 429,
            "request_id": "r",
            "body": queue_full,
            "retry_after": 1,
        }
        return httpx.Response(200, json=status)

    async def aclose(self) -> None:
        await self.real.aclose()


@pytest.mark.parametrize("server", list(SERVERS))
async def test_endpoint_mode_sends_chunks_as_jobs_retries_and_writes_the_same_file(
    worker, ids, endpoint_servers, server, tmp_path, monkeypatch
):
    url = wait_ready(endpoint_servers[server])
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    source = write_lines(tmp_path / "requests.jsonl", make_lines(300, ids, seed=2))
    network = FaultyNetwork()
    run = BatchRun(options(tmp_path, source, endpoint=url, chunk_size=32, jobs=4))
    with run:
        await run_endpoint(run, transport=network)
    assert run.summary.unanswered == 0 and run.summary.aborted is None
    outputs = read_output(tmp_path / "results.jsonl")
    await check_against_single_requests(worker, source, outputs)
    # The refused /run was sent again, and so was the line answered 429 (in a job of its own),
    # each after the Retry-After it was given (the backoff alone is 0.01 s).
    assert network.job_sizes[0] == network.job_sizes[1] == 32 and 1 in network.job_sizes
    refused_at, refused_id = network.job_sent[0]
    resent_at = next(at for at, first in network.job_sent[1:] if first == refused_id)
    assert resent_at - refused_at >= 1.0
    retried = next(o for o in outputs if o["custom_id"] == network.queue_full_sent)
    assert retried["response"]["status_code"] == 200
    sent = zip(network.job_sent, network.job_sizes)
    resent_at = next(at for (at, first), size in sent if (first, size) == (retried["custom_id"], 1))
    assert resent_at - network.queue_full_at >= 1.0
    # 32 lines' answers were over the endpoint's MAX_RESPONSE_BYTES: those jobs were split.
    assert 16 in network.job_sizes


async def test_a_batch_job_whose_answers_together_are_too_large_is_refused(worker, ids):
    lines = [json.loads(raw) for raw in make_lines(40, ids) if raw and raw != "{not json"]
    small = dataclasses.replace(worker.limits, max_response_bytes=MAX_RESPONSE_BYTES)
    original, worker.limits = worker.limits, small
    try:
        reply = await answer_job(worker, {"batch": lines})
        one = await answer_job(worker, {"batch": lines[:1]})
    finally:
        worker.limits = original
    assert reply.status == 413 and reply.body["error"]["code"] == "response_too_large"
    assert reply.body["error"]["param"] == "batch"
    assert f"{MAX_RESPONSE_BYTES} (MAX_RESPONSE_BYTES" in reply.body["error"]["message"]
    assert one.status == 200


async def test_a_batch_job_whose_answer_cannot_fit_is_refused_before_any_line_runs(
    worker, ids, monkeypatch
):
    """50 lines of 2048 inputs ran 228 s before their 413 (issue 28, finding 4). Each line's
    answer fits alone (2048 vectors of 384 floats: about 12.7 MB), all of them cannot: the job is
    refused before any line reaches the dispatch, let alone the engine."""
    lines = [
        {
            "custom_id": f"big-{i}",
            "url": "/v1/embeddings",
            "body": {"model": ids["minilm"], "input": ["a short text"] * 2048},
        }
        for i in range(50)
    ]
    calls = 0
    request = worker.request

    async def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return await request(*args, **kwargs)

    monkeypatch.setattr(worker, "request", counting)
    reply = await answer_job(worker, {"batch": lines})
    assert reply.status == 413 and reply.body["error"]["code"] == "response_too_large"
    assert reply.body["error"]["param"] == "batch" and calls == 0
    # Lines of 64 inputs fit, and run.
    small = [{**line, "body": {**line["body"], "input": ["a short text"] * 64}} for line in lines]
    assert (await answer_job(worker, {"batch": small[:2]})).status == 200
    assert calls == 2


async def test_a_batch_jobs_answer_estimate_bounds_its_answer(worker, ids):
    """The estimate the job is refused by is never below the answer it bounds, and not far above
    it: a job that fits is not refused."""
    lines = [json.loads(raw) for raw in make_lines(200, ids) if raw and raw != "{not json"]
    lines.append(
        {
            "custom_id": "docs",
            "url": "/v1/rerank",
            "body": {
                "model": ids["reranker"],
                "query": "q",
                "documents": ["a document " * 50] * 20,
                "return_documents": True,
            },
        }
    )
    output = await runpod_handler(worker)({"id": "job-1", "input": {"batch": lines}})
    written = len(json.dumps(output, ensure_ascii=False).encode())
    estimate = batch.answers_estimate(worker, lines)
    assert written <= estimate <= 2 * written, (written, estimate)


async def test_endpoint_that_refuses_the_key_stops_the_run_with_a_clear_message(
    ids, endpoint_servers, tmp_path, monkeypatch
):
    url = wait_ready(endpoint_servers["serve"])
    monkeypatch.setenv("RUNPOD_API_KEY", "not-the-key")
    source = write_lines(tmp_path / "requests.jsonl", make_lines(20, ids))
    run = BatchRun(options(tmp_path, source, endpoint=url))
    with run:
        await run_endpoint(run)
    assert "RUNPOD_API_KEY" in (run.summary.aborted or "")
    # Only lines answered locally (bad lines) were written; the rest waits for the next run.
    assert all(o["response"] is None for o in read_output(tmp_path / "results.jsonl"))


def test_command_line_resumes_a_text_file_into_the_same_output(bert_embedder, tmp_path):
    """`python handler.py --batch docs.txt ...` as a user runs it, after a run killed mid-write."""
    docs = tmp_path / "docs.txt"
    rng = random.Random(3)
    texts = [_text(rng) if n % 17 else "" for n in range(1, 401)]
    docs.write_text("\n".join(texts) + "\n")
    result = tmp_path / "vectors.jsonl"
    # An earlier run was killed after writing two lines and part of a third.
    answered = {"status_code": 200, "request_id": "x", "body": {}}
    done = [
        {"id": "batch_req_a", "custom_id": "line-1", "response": answered, "error": None},
        {"id": "batch_req_b", "custom_id": "line-2", "response": answered, "error": None},
    ]
    result.write_text("".join(json.dumps(o) + "\n" for o in done) + '{"id": "batch_req_c", "cus')
    served = "/".join(Path(bert_embedder).parts[-2:])
    proc = subprocess.run(
        [
            sys.executable,
            "handler.py",
            "--batch",
            str(docs),
            "--output",
            str(result),
            "--model",
            served,
            "--encoding-format",
            "base64",
            "--dimensions",
            "16",
        ],
        cwd=ROOT,
        env=_env(MODEL_NAMES=str(bert_embedder)),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = read_output(result)
    expected = {f"line-{n}" for n, text in enumerate(texts, 1) if text}
    assert [o["custom_id"] for o in outputs[:2]] == ["line-1", "line-2"]
    assert sorted(o["custom_id"] for o in outputs) == sorted(expected)
    for output in outputs[2:]:
        body = output["response"]["body"]
        assert body["model"] == served
        assert len(decode_vectors(body)[0]) == 16
    assert "cut off a partly written last line" in proc.stderr
    assert "line/s" in proc.stderr  # the progress bar
    assert f"{len(expected) - 2} lines answered" in proc.stderr
