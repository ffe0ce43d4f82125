"""Faults injected into a real Infinity engine: a batch thread that raises, an engine that stalls.

Infinity's upstream issue #609: an exception in a batch thread kills it and every pending request
waits for ever. The worker must answer every request with an error within REQUEST_TIMEOUT, mark
itself unhealthy and ask RunPod for a replacement (`refresh_worker`, which runpod turns into
stopPod). An engine that stalls (no batch finishes for ENGINE_STALL_TIMEOUT while work waits) is
unhealthy too, but only until it moves again.

Each test gets its own worker (the shared one must stay healthy). The fault is injected below the
worker's guard, where a real failure would come from: the model's forward pass or its tokenize step.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time

import pytest
from runpod.serverless.modules.rp_job import run_job

from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.engines.scheduler import AHEAD
from embedding_worker.transports.runpod import answer_job, runpod_handler
from tests.helpers import model_and_replica

TIMEOUT_S = 4.0
STALL_S = 2.0  # ENGINE_STALL_TIMEOUT: shorter than the requests' deadline, so a stall shows first
NO_HANG_S = TIMEOUT_S + 20  # a test that waits longer than this has found a hang


@pytest.fixture
async def fragile(bert_embedder, bert_reranker):
    """A worker of its own, with a short REQUEST_TIMEOUT, that a test may break."""
    worker = Worker.from_config(
        load_config(
            {
                "MODEL_NAMES": f"{bert_embedder};{bert_reranker}",
                "DTYPES": "float32",
                "REQUEST_TIMEOUT": str(TIMEOUT_S),
                "ENGINE_STALL_TIMEOUT": str(STALL_S),
            }
        )
    )
    await worker.start()
    yield worker
    await worker.stop()


def _raise_once(target, name: str, exc: Exception, after_s: float = 0.0) -> None:
    original = getattr(target, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(after_s)  # a failure that takes a moment: the other jobs queue meanwhile
            raise exc
        return original(*args, **kwargs)

    setattr(target, name, failing)


def _jobs(model_id: str, n: int) -> list[dict]:
    if "reranker" in model_id:
        body = {"model": model_id, "query": "q", "documents": ["one doc", "another doc", "third"]}
    else:
        body = {"model": model_id, "input": ["some text", "some other text"]}
    return [{"id": f"job-{i}", "input": body} for i in range(n)]


def _assert_failed_asking_for_a_new_worker(result: dict, code: str) -> dict:
    assert set(result) == {"error", "stopPod"}, result  # FAILED, and runpod replaces the worker
    assert result["stopPod"] is True
    error = json.loads(result["error"])
    assert error["status"] == 503 and error["error"]["code"] == code
    assert error["error"]["type"] == "server_error"
    return error


def _forward_of_embedder(replica):
    return replica, "forward"


def _tokenizer_of_embedder(replica):
    # The worker's token ids are padded there instead of tokenizing again (tokenization.py).
    return inspect.unwrap(replica.encode_pre), "pad"


def _forward_of_cross_encoder(replica):
    return replica.model, "forward"


@pytest.mark.parametrize(
    "tail, where",
    [
        ("tiny-bert-embedder", _forward_of_embedder),
        ("tiny-bert-embedder", _tokenizer_of_embedder),
        ("tiny-bert-reranker", _forward_of_cross_encoder),
    ],
)
async def test_a_batch_thread_that_raises_fails_every_waiting_job_at_once(fragile, tail, where):
    model, replica = model_and_replica(fragile, tail)
    target, name = where(replica)
    _raise_once(target, name, RuntimeError("CUDA error: an illegal memory access (injected)"), 0.5)
    handler = runpod_handler(fragile)

    started = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(*(run_job(handler, job) for job in _jobs(model.served_id, 8))), NO_HANG_S
    )
    elapsed = time.monotonic() - started

    # Every job is answered once: the ones in the failed batch and the ones queued behind the dead
    # thread alike, by the guard ("engine_failed"), not by the timeout.
    for result in results:
        error = _assert_failed_asking_for_a_new_worker(result, "engine_failed")
        assert "batch thread died" in error["error"]["message"]
    assert elapsed < TIMEOUT_S
    assert not fragile.healthy and "batch thread died" in fragile.registry.health.reason
    assert model.pending == 0

    # Later jobs, for any model, are refused at once and ask for a replacement too.
    for other in fragile.registry.models:
        later = await asyncio.wait_for(run_job(handler, _jobs(other.served_id, 1)[0]), NO_HANG_S)
        _assert_failed_asking_for_a_new_worker(later, "engine_unavailable")


async def test_without_the_guard_infinity_hangs_until_the_timeout(fragile):
    """The upstream failure itself, to show what the guard is for: the timeout still ends it."""
    model, replica = model_and_replica(fragile, "tiny-bert-embedder")
    # Inject the fault above the guard: the batch thread dies and nobody is told.
    _raise_once(replica, "encode_core", RuntimeError("injected"))
    handler = runpod_handler(fragile)
    results = await asyncio.wait_for(
        asyncio.gather(*(run_job(handler, job) for job in _jobs(model.served_id, 3))), NO_HANG_S
    )
    for result in results:
        _assert_failed_asking_for_a_new_worker(result, "timeout")
    assert not fragile.healthy and model.pending == 0


async def test_an_engine_that_stalls_answers_503_within_the_timeout(fragile):
    model, replica = model_and_replica(fragile, "tiny-bert-embedder")
    release = threading.Event()
    original = replica.forward

    def stalled(*args, **kwargs):
        release.wait(60)  # a hung kernel; released at the end so the engine can stop
        return original(*args, **kwargs)

    replica.forward = stalled
    handler = runpod_handler(fragile)
    try:
        started = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(*(run_job(handler, job) for job in _jobs(model.served_id, 4))),
            NO_HANG_S,
        )
        elapsed = time.monotonic() - started
        for result in results:
            error = _assert_failed_asking_for_a_new_worker(result, "timeout")
            assert f"{TIMEOUT_S:g} s" in error["error"]["message"]
            assert error["retry_after"] >= 1  # retryable, elsewhere or later
        assert TIMEOUT_S <= elapsed < NO_HANG_S
        assert not fragile.healthy and model.pending == 0
        assert "ENGINE_STALL_TIMEOUT" in fragile.registry.health.reason
        # Meanwhile the stalled model refuses new work at once; the other model still serves.
        refused = await answer_job(fragile, _jobs(model.served_id, 1)[0]["input"])
        assert refused.status == 503 and refused.body["error"]["code"] == "engine_stalled"
        other = next(m for m in fragile.registry.models if m is not model)
        assert (await answer_job(fragile, _jobs(other.served_id, 1)[0]["input"])).status == 200
    finally:
        release.set()
    # The kernel returns: the model moves again, and so the worker is healthy again.
    deadline = time.monotonic() + NO_HANG_S
    while not fragile.healthy:
        assert time.monotonic() < deadline, fragile.registry.health.reason
        await asyncio.sleep(0.05)
    reply = await answer_job(fragile, _jobs(model.served_id, 1)[0]["input"])
    assert reply.status == 200


async def test_a_request_past_its_deadline_leaves_a_moving_engine_healthy(bert_embedder):
    """Issue 28's finding 1: a request that waits longer than REQUEST_TIMEOUT behind work that
    moves fails alone, retryably; the worker stays healthy, the request's batches that have not
    reached the model are dropped, and the next request is served."""
    worker = Worker.from_config(
        load_config(
            {"MODEL_NAMES": str(bert_embedder), "DTYPES": "float32", "REQUEST_TIMEOUT": "1"}
        )
    )
    await worker.start()
    try:
        model, replica = model_and_replica(worker, "tiny-bert-embedder")
        forward = replica.forward
        forwards = []

        def slow(*args, **kwargs):
            forwards.append(1)
            time.sleep(0.3)  # every batch moves, slowly
            return forward(*args, **kwargs)

        replica.forward = slow
        # 40 batches of 32 texts (too long for wider batches of short texts): 12 s of work.
        texts = [f"text number {i} " + "with a few more words " * 8 for i in range(40 * 32)]
        reply = await asyncio.wait_for(answer_job(worker, {"input": texts}), NO_HANG_S)
        assert reply.status == 503 and reply.body["error"]["code"] == "timeout"
        assert reply.retry_after is not None and reply.retry_after >= 1
        assert not reply.refresh_worker and worker.healthy
        at_timeout = len(forwards)
        after = await asyncio.wait_for(answer_job(worker, {"input": ["right after"]}), NO_HANG_S)
        assert after.status == 200
        await asyncio.sleep(1.0)  # time for a few more 0.3 s batches, were any left to run
        # The request's batches still waiting were dropped when it gave up: past that, at most
        # those already handed to the model ran (the one computing finishes, the ones behind it
        # are skipped), and the one right after.
        assert len(forwards) <= at_timeout + AHEAD + 1
        assert model.pending == 0 and worker.healthy
    finally:
        replica.forward = forward
        await worker.stop()
