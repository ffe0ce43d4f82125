"""Limits on requests and answers, and the input JSON lets through but nothing else can handle."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from embedding_worker import limits
from embedding_worker.limits import Limits
from embedding_worker.operations.embeddings import answer_bytes, check_answer_size
from embedding_worker.statuses import http_status
from embedding_worker.transports.runpod import answer_job


def _wire(reply) -> bytes:
    """What runpod sends back: json.dumps(ensure_ascii=False) written as UTF-8."""
    return json.dumps(reply.runpod_output(), ensure_ascii=False).encode("utf-8")


def _error(reply, status: int, code: str) -> dict:
    assert reply.status == status, reply.body
    error = reply.body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    _wire(reply)
    return error


def _both_flavours(body: dict, route: str = "/v1/embeddings") -> list:
    return [body, {"openai_route": route, "openai_input": body}]


@pytest.fixture
def small_limits(worker, monkeypatch):
    def set_limits(**values):
        monkeypatch.setattr(worker, "limits", Limits(**values))

    return set_limits


# ------------------------------------------------------------------------------------ request size


async def test_a_request_over_max_request_bytes_is_413_naming_the_limit(worker, ids, small_limits):
    small_limits(max_request_bytes=10_000)
    big = {"model": ids["embedder"], "input": ["word " * 100] * 30}  # about 15,000 bytes
    for job in _both_flavours(big):
        error = _error(await answer_job(worker, job), 413, "request_too_large")
        assert "MAX_REQUEST_BYTES" in error["message"] and "10000" in error["message"]
        assert error["param"] == "input"
    fits = {"model": ids["embedder"], "input": ["word " * 100] * 10}  # about 5,000 bytes
    for job in _both_flavours(fits):
        assert (await answer_job(worker, job)).status == 200


async def test_request_size_counts_utf8_bytes_and_token_ids(worker, ids, small_limits):
    small_limits(max_request_bytes=10_000)
    # 2,000 characters of 3 UTF-8 bytes each: 6,000 bytes, under; 4,000 of them: 12,000, over.
    assert (
        await answer_job(worker, {"model": ids["embedder"], "input": "語" * 2000})
    ).status == 200
    reply = await answer_job(worker, {"model": ids["embedder"], "input": "語" * 4000})
    _error(reply, 413, "request_too_large")
    # 3,000 five-digit token ids are about 18,000 bytes of JSON.
    reply = await answer_job(worker, {"model": ids["embedder"], "input": [10000] * 3000})
    _error(reply, 413, "request_too_large")


def test_request_size_estimate_is_close_to_the_json_text():
    body = {
        "model": "m",
        "input": ["héllo wörld " * 20] * 50,
        "user": "u",
        "dimensions": 64,
        "extra": [12345] * 500 + [None, True, 1.5],
    }
    text = len(json.dumps(body, ensure_ascii=False).encode("utf-8"))
    size = text  # the estimate must stop just above the real size and pass just below it
    limits.inspect_request(body, Limits(max_request_bytes=int(size * 1.1)))
    with pytest.raises(Exception) as refused:
        limits.inspect_request(body, Limits(max_request_bytes=int(size * 0.9)))
    assert http_status(refused.value) == 413


# ------------------------------------------------------------------------------------ answer size


def test_every_answer_bound_is_one_check_with_one_message():
    """limits.check_answer_bytes: an estimate at the limit passes; over it, a 413 that says what
    the answer holds, its size, the limit and its variable, and how to ask for less."""
    small = Limits(max_response_bytes=1000)
    limits.check_answer_bytes(1000, small, answer="the answer", advice="ask less", param="input")
    with pytest.raises(Exception) as refused:
        limits.check_answer_bytes(
            1001, small, answer="the answers of 3 lines", advice="send fewer", param="batch"
        )
    error = refused.value
    assert (http_status(error), error.code, error.param) == (413, "response_too_large", "batch")
    assert error.message.startswith("the answers of 3 lines would be about 1001 bytes")
    assert "1000 (MAX_RESPONSE_BYTES" in error.message and "20 MB" in error.message
    assert error.message.endswith("; send fewer")


def test_default_answer_limit_refuses_2048_float_vectors_of_1024_dims_but_not_base64():
    # FINDINGS: about 40 MB of float JSON (RunPod drops it), about 11 MB of base64.
    with pytest.raises(Exception) as refused:
        check_answer_size(2048, 1024, "float", Limits())
    assert http_status(refused.value) == 413 and refused.value.code == "response_too_large"
    assert "base64" in refused.value.message and "MAX_RESPONSE_BYTES" in refused.value.message
    check_answer_size(2048, 1024, "base64", Limits())
    check_answer_size(2048, 384, "float", Limits())  # MiniLM at full batch: ~13 MB


async def test_answer_estimate_bounds_the_real_answer_closely(worker, ids):
    texts = [f"sentence number {i} about various things" for i in range(64)]
    for encoding in ("float", "base64"):
        for dimensions in (None, 32):
            body = {"model": ids["minilm"], "input": texts, "encoding_format": encoding}
            if dimensions:
                body["dimensions"] = dimensions
            for job in _both_flavours(body):
                reply = await answer_job(worker, job)
                real = len(_wire(reply))
                estimate = answer_bytes(len(texts), dimensions or 384, encoding)
                assert real <= estimate <= 1.6 * real + 1024, (encoding, dimensions, real, estimate)


async def test_an_answer_over_max_response_bytes_is_refused_before_any_work(
    worker, ids, small_limits, monkeypatch
):
    model = worker.registry.resolve(ids["minilm"], None)

    async def must_not_run(*args, **kwargs):
        raise AssertionError("the engine ran for a request that had to be refused")

    texts = ["a short text"] * 100
    # 100 x 384 floats: ~620 kB as float, ~210 kB as base64.
    small_limits(max_response_bytes=400_000)
    with monkeypatch.context() as patch:
        patch.setattr(model, "embed", must_not_run)
        for job in _both_flavours({"model": ids["minilm"], "input": texts}):
            error = _error(await answer_job(worker, job), 413, "response_too_large")
            assert "MAX_RESPONSE_BYTES" in error["message"] and "400000" in error["message"]
            assert "base64" in error["message"] and "20 MB" in error["message"]
        small_limits(max_response_bytes=100_000)
        reply = await answer_job(
            worker, {"model": ids["minilm"], "input": texts, "encoding_format": "base64"}
        )
        error = _error(reply, 413, "response_too_large")
        assert "encoding_format" not in error["message"]  # already base64: fewer inputs or dims
    small_limits(max_response_bytes=400_000)
    base64 = {"model": ids["minilm"], "input": texts, "encoding_format": "base64"}
    assert (await answer_job(worker, base64)).status == 200
    fewer_dims = {"model": ids["minilm"], "input": texts, "dimensions": 128}
    assert (await answer_job(worker, fewer_dims)).status == 200


async def test_a_rerank_answer_with_documents_over_the_limit_is_refused(worker, ids, small_limits):
    small_limits(max_response_bytes=50_000)
    docs = ["x" * 5_000] * 20  # 100 kB of documents
    body = {"model": ids["reranker"], "query": "q", "documents": docs, "return_documents": True}
    for job in _both_flavours(body, "/v1/rerank"):
        error = _error(await answer_job(worker, job), 413, "response_too_large")
        assert "return_documents" in error["message"] and "top_n" in error["message"]
    assert (await answer_job(worker, dict(body, return_documents=False))).status == 200
    assert (await answer_job(worker, dict(body, top_n=5))).status == 200


# ------------------------------------------------------------------------------------ odd JSON

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": [NAN]}, "input"),
        ({"input": "x", "dimensions": NAN}, "dimensions"),
        ({"input": "x", "dimensions": INF}, "dimensions"),
        ({"input": "x", "user": -INF}, "user"),
        ({"input": "x", "anything": {"deep": [1, NAN]}}, "anything"),
        ({"input": "\ud800"}, "input"),
        ({"input": ["fine", "bad \udfff end"]}, "input"),
        ({"input": "x", "model": "m\ud83d"}, "model"),
        ({"input": "x", "prompt_type": "\ud800"}, "prompt_type"),
    ],
)
async def test_nan_infinity_and_lone_surrogates_are_typed_400s(worker, ids, body, param):
    body = {"model": ids["embedder"], **body}
    for job in _both_flavours(body):
        error = _error(await answer_job(worker, job), 400, "invalid_input")
        assert error["param"] == param


@pytest.mark.parametrize(
    "body, param",
    [
        ({"query": "\ud800", "documents": ["a"]}, "query"),
        ({"query": "q", "documents": ["a", {"text": "b\udc00"}]}, "documents"),
        ({"query": "q", "documents": ["a"], "top_n": INF}, "top_n"),
    ],
)
async def test_rerank_odd_json_is_a_typed_400(worker, ids, body, param):
    for job in _both_flavours({"model": ids["reranker"], **body}, "/v1/rerank"):
        error = _error(await answer_job(worker, job), 400, "invalid_input")
        assert error["param"] == param


async def test_deep_nesting_is_a_typed_400_without_recursion(worker, ids):
    deep: list = [1]
    for _ in range(100_000):
        deep = [deep]
    for job in _both_flavours({"model": ids["embedder"], "input": deep}):
        error = _error(await answer_job(worker, job), 400, "invalid_input")
        assert "nested deeper than" in error["message"] and error["param"] == "input"
    # Nesting at the limit's edge inside ignored fields is fine; one level more is not.
    ok: list = []
    for _ in range(limits.MAX_JSON_DEPTH - 2):
        ok = [ok]
    assert (
        await answer_job(worker, {"model": ids["embedder"], "input": "x", "meta": ok})
    ).status == 200


async def test_a_wide_request_is_walked_with_bounded_cost(worker, ids, small_limits):
    # A million tiny values: refused at the byte limit, long before pydantic would see them all.
    small_limits(max_request_bytes=100_000)
    reply = await answer_job(
        worker, {"model": ids["embedder"], "input": "x", "meta": [0] * 1_000_000}
    )
    _error(reply, 413, "request_too_large")


# ------------------------------------------------------------------------------------ ranges


@pytest.mark.parametrize("dimensions", [0, -1, -(2**70), 385, 2**70])
async def test_dimensions_out_of_range(worker, ids, dimensions):
    reply = await answer_job(
        worker, {"model": ids["minilm"], "input": "x", "dimensions": dimensions}
    )
    assert _error(reply, 400, "invalid_input")["param"] == "dimensions"


@pytest.mark.parametrize("top_n", [0, -1, -(2**70), "2", True, 1.0])
async def test_top_n_out_of_range(worker, ids, top_n):
    body = {"model": ids["reranker"], "query": "q", "documents": ["a", "b"], "top_n": top_n}
    assert _error(await answer_job(worker, body), 400, "invalid_input")["param"] == "top_n"


async def test_top_n_above_the_documents_returns_them_all(worker, ids):
    body = {"model": ids["reranker"], "query": "q", "documents": ["a", "b"], "top_n": 2**70}
    reply = await answer_job(worker, body)
    assert reply.status == 200 and len(reply.body["results"]) == 2


@pytest.mark.parametrize("token", [-1, -(2**70), 2**31, 2**70])
async def test_token_ids_outside_the_vocabulary(worker, ids, token):
    reply = await answer_job(worker, {"model": ids["minilm"], "input": [[101, token]]})
    error = _error(reply, 400, "invalid_input")
    assert error["param"] == "input" and "vocabulary" in error["message"]


async def test_each_embedding_type_asked_counts_in_the_answer_estimate(
    worker, ids, small_limits, monkeypatch
):
    """Three types a text are three vectors a text: an answer that one type keeps within the limit
    and three do not is refused before the engine runs."""
    model = worker.registry.resolve(ids["minilm"], None)
    texts = ["a short text"] * 100
    body = {"model": ids["minilm"], "input": texts, "encoding_format": "base64"}
    small_limits(max_response_bytes=400_000)  # 100 x 384 in base64: ~210 kB
    assert (await answer_job(worker, {**body, "embedding_types": ["int8"]})).status == 200

    async def must_not_run(*args, **kwargs):
        raise AssertionError("the engine ran for a request that had to be refused")

    monkeypatch.setattr(model, "embed", must_not_run)
    several = {**body, "embedding_types": ["float", "int8", "binary"]}
    _error(await answer_job(worker, several), 413, "response_too_large")
    cohere = {
        "model": ids["minilm"],
        "texts": texts,
        "embedding_types": ["base64", "int8", "binary"],
    }
    proxied = {"openai_route": "/v2/embed", "openai_input": cohere}
    _error(await answer_job(worker, proxied), 413, "response_too_large")


# ------------------------------------------------------------------------------------ event loop


async def _largest_loop_gap(work) -> tuple[object, float]:
    """`await work`, and the longest the event loop went without running a task meanwhile (in
    seconds): the wait /health and every other request would see."""
    largest = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal largest
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            largest = max(largest, now - last - 0.01)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    try:
        result = await work
    finally:
        done.set()
        await ticking
    return result, largest


# Each of these stalled the event loop for seconds (issue 28, finding 2): 6 MB in one text (10 s
# here); 64 texts of 100 kB, which were tokenized on the loop for being 64 items (7 s); 6.6 million
# empty objects, walked and parsed on the loop before their 400 (13 s); 2 million token ids, checked
# and decoded on the loop (MiniLM's "a" then "##a": one long word, one token to count). A gap of a
# second is 10x what the loop sees now: no machine is slow enough to reach it by chance.
LOOP_STALLERS = {
    "one 6 MB text": ({"input": "hello " * 1_000_000}, 200),
    "64 texts of 100 kB": ({"input": ["hello " * 16_000] * 64}, 200),
    "6.6 million empty objects": ({"input": [{}] * 6_600_000}, 400),
    "2 million token ids": ({"input": [[1037] + [2050] * 2_000_000]}, 200),
}


@pytest.mark.parametrize("body, status", LOOP_STALLERS.values(), ids=LOOP_STALLERS.keys())
async def test_a_large_request_leaves_the_event_loop_free(worker, ids, body, status):
    job = {"openai_route": "/v1/embeddings", "openai_input": {**body, "model": ids["minilm"]}}
    reply, gap = await _largest_loop_gap(answer_job(worker, job))
    assert reply.status == status, reply.body
    assert gap < 1.0, f"the event loop stalled {gap:.1f} s"


def test_is_small_decides_in_bounded_steps():
    assert limits.is_small({"model": "m", "input": ["a text"] * 100})
    assert not limits.is_small({"input": ["a text"] * (limits.SMALL_VALUES + 1)})
    assert not limits.is_small({"input": "x" * (limits.SMALL_CHARS + 1)})
    assert not limits.is_small({"input": ["x" * 1000] * 20})  # 20,000 characters
    assert not limits.is_small({"a": {"b": [[0] * 100] * 3}})  # nested lists count too
    # A list too long is told by its length, without a step over its items.
    assert not limits.is_small({"input": [0] * 10_000_000})


async def test_small_requests_stay_on_the_event_loop_and_large_ones_leave_it(
    worker, ids, monkeypatch
):
    """The fast path: a small request is checked, parsed and tokenized where it arrives, without a
    thread hop; a large one is tokenized in another thread."""
    model = worker.registry.resolve(ids["minilm"], None)
    threads: list[threading.Thread] = []
    tokenize = model.tokens.tokenize

    def spy(texts):
        threads.append(threading.current_thread())
        return tokenize(texts)

    monkeypatch.setattr(model.tokens, "tokenize", spy)
    small = {"model": ids["minilm"], "input": ["a short text"] * 8}
    assert (await answer_job(worker, small)).status == 200
    assert threads == [threading.current_thread()]
    body = {"model": ids["minilm"], "input": ["a longer text " * 100] * 32}  # 44,800 characters
    assert (await answer_job(worker, body)).status == 200
    assert threads[1] is not threading.current_thread()
