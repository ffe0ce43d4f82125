"""Service tiers: the field on every operation and its echo, and the paced queue taking priority
work first, then default, then flex, with flex passed over a bounded number of times."""

from __future__ import annotations

import asyncio
import time

import pytest
from infinity_emb.inference.queue import CustomFIFOQueue

from embedding_worker.config import ConfigError, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.engines.infinity_adapter import PacedQueue
from embedding_worker.engines.scheduler import MAX_PASSES
from embedding_worker.tiers import current_tier
from embedding_worker.transports.runpod import answer_job
from tests.helpers import call
from tests.test_pacing import _items, _record_batch_sizes


async def _submit_at(queue: PacedQueue, tier: str, n: int) -> list:
    token = current_tier.set(tier)
    try:
        items = _items(n)
        queue.extend(items)
    finally:
        current_tier.reset(token)
    await asyncio.sleep(0)
    return items


def _pop_items(queue: PacedQueue) -> list:
    return [item for batch in queue.pop_optimal_batches(4, 2, timeout=0.05) for item in batch]


async def test_priority_work_goes_before_queued_flex_work():
    queue = PacedQueue(CustomFIFOQueue(), batch_size=4)
    flex = await _submit_at(queue, "flex", 16)
    priority = await _submit_at(queue, "priority", 1)
    default = await _submit_at(queue, "default", 4)
    first = _pop_items(queue)
    assert first == [priority[0].item]  # alone, not waiting to fill a batch
    queue.batch_finished()
    assert _pop_items(queue) == [d.item for d in default]
    queue.batch_finished()
    assert {id(i) for i in _pop_items(queue)} <= {id(f.item) for f in flex}


async def test_flex_is_passed_over_at_most_max_passes_times():
    queue = PacedQueue(CustomFIFOQueue(), batch_size=4)
    flex = {id(f.item) for f in await _submit_at(queue, "flex", 4)}
    popped_flex_at = None
    for hand_over in range(MAX_PASSES + 3):
        await _submit_at(queue, "priority", 4)  # priority work never stops coming
        popped = _pop_items(queue)
        queue.batch_finished()
        queue.batch_finished()
        if {id(item) for item in popped} & flex:
            popped_flex_at = hand_over
            break
    assert popped_flex_at == MAX_PASSES


@pytest.fixture
async def tiny_worker(bert_embedder):
    worker = Worker.from_config(
        load_config({"MODEL_NAMES": str(bert_embedder), "DTYPES": "float32", "BATCH_SIZES": "8"})
    )
    await worker.start()
    yield worker
    await worker.stop()


async def test_a_priority_request_overtakes_a_flex_job_in_a_real_engine(tiny_worker):
    model = tiny_worker.registry.models[0]
    sizes = _record_batch_sizes(model, first_pass_s=0.5)
    finished: dict[str, float] = {}

    async def timed(name: str, body: dict) -> None:
        reply = await answer_job(tiny_worker, body)
        assert reply.status == 200, reply.body
        assert reply.body["service_tier"] == body["service_tier"]
        finished[name] = time.monotonic()

    flex = {"input": [f"flex text {i}" for i in range(160)], "service_tier": "flex"}
    job = asyncio.ensure_future(timed("flex", flex))
    await asyncio.sleep(0.2)  # the flex job's first batch is in the model, 20 wait
    await timed("priority", {"input": "a question", "service_tier": "priority"})
    await asyncio.wait_for(job, 60)
    assert finished["priority"] < finished["flex"]
    assert 1 in sizes[:4]  # the priority text went in a batch of its own, among the first


async def test_the_answer_names_the_tier_and_auto_is_the_workers(worker, ids):
    body = {"model": ids["minilm"], "input": "x"}
    assert (await answer_job(worker, body)).body["service_tier"] == "default"
    for tier in ("priority", "default", "flex"):
        reply = await call(worker, "/v1/embeddings", {**body, "service_tier": tier})
        assert reply.body["service_tier"] == tier
    auto = await call(worker, "/v1/embeddings", {**body, "service_tier": "auto"})
    assert auto.body["service_tier"] == "default"
    rerank = {"model": ids["reranker"], "query": "q", "documents": ["a", "b"]}
    assert (await answer_job(worker, {**rerank, "service_tier": "flex"})).body[
        "service_tier"
    ] == "flex"
    outer = {"openai_route": "/v1/embeddings", "openai_input": body, "service_tier": "priority"}
    assert (await answer_job(worker, outer)).body["service_tier"] == "priority"


@pytest.mark.parametrize("tier", ["urgent", "", 3, None])
async def test_an_unknown_tier_is_invalid_input(worker, ids, tier):
    reply = await answer_job(worker, {"model": ids["minilm"], "input": "x", "service_tier": tier})
    if tier is None:
        assert reply.status == 200  # null: no tier named
    else:
        assert reply.status == 400 and reply.body["error"]["param"] == "service_tier"


async def test_batch_lines_run_at_the_jobs_tier_unless_they_name_theirs(worker, ids):
    line = {"url": "/v1/embeddings", "body": {"model": ids["minilm"], "input": "x"}}
    own = {"url": "/v1/embeddings", "body": {**line["body"], "service_tier": "priority"}}
    lines = [{"custom_id": "a", **line}, {"custom_id": "b", **own}]
    reply = await answer_job(worker, {"batch": lines, "service_tier": "flex"})
    tiers = [output["response"]["body"]["service_tier"] for output in reply.body["data"]]
    assert tiers == ["flex", "priority"]


def test_the_workers_default_tier_comes_from_the_environment():
    assert load_config({}).service_tier == "default"
    assert load_config({"SERVICE_TIER": "flex"}).service_tier == "flex"
    with pytest.raises(ConfigError, match="SERVICE_TIER"):
        load_config({"SERVICE_TIER": "auto"})


async def test_flex_goes_only_to_an_idle_model_while_other_tiers_are_served(monkeypatch):
    """A flex job alone keeps a batch queued ahead of the one computing; once priority work has
    come, flex waits for the model to be idle, so the next priority request waits for one flex
    batch at most, not two."""
    queue = PacedQueue(CustomFIFOQueue(), batch_size=4)
    await _submit_at(queue, "flex", 16)
    assert len(_pop_items(queue)) == 8  # idle, flex alone: one batch to compute, one queued ahead
    queue.batch_finished()
    await _submit_at(queue, "priority", 1)
    assert len(_pop_items(queue)) == 1  # priority goes first, ahead of the computing flex batch
    queue.batch_finished()
    queue.batch_finished()  # both through: the model is idle
    assert len(_pop_items(queue)) == 4  # one flex batch, to the idle model
    assert _pop_items(queue) == []  # not a second behind it: priority came a moment ago
    monkeypatch.setattr(queue.scheduler, "_served_above_flex", time.monotonic() - 60)
    assert len(_pop_items(queue)) == 4  # no priority for a while: flex queues ahead again (the
    # last 4)


async def test_flex_batches_shrink_to_the_models_turn_while_other_tiers_are_served():
    from embedding_worker.engines.scheduler import FLEX_TURN_S

    queue = PacedQueue(CustomFIFOQueue(), batch_size=4)
    queue.batch_finished(rows=4, seconds=4 * FLEX_TURN_S / 2)  # full batches: 2 texts a turn
    queue.batch_finished(rows=1, seconds=100.0)  # a small batch: not what the turn is told by
    await _submit_at(queue, "flex", 16)
    assert len(_pop_items(queue)) == 8  # flex alone: whole batches, one queued ahead
    queue.batch_finished()
    await _submit_at(queue, "priority", 1)
    assert len(_pop_items(queue)) == 1
    queue.batch_finished()
    queue.batch_finished()
    assert [len(b) for b in queue.pop_optimal_batches(4, 2, timeout=0.05)] == [2]


def _slowed(monkeypatch, model, method: str, seconds: float) -> list[int]:
    """Each forward pass of a self-batching model (its `method`, on the model's thread) takes
    `seconds` longer; the batch sizes it sees, in order."""
    forward = getattr(model, method)
    sizes: list[int] = []

    def slow(batch):
        sizes.append(len(batch))
        time.sleep(seconds)
        return forward(batch)

    monkeypatch.setattr(model, method, slow)
    return sizes


async def _priority_overtakes(
    worker, flex: dict, priority: dict, sizes: list[int]
) -> dict[str, float]:
    """Runs a flex job and, while it computes, a priority request; when each finished, and
    checks that the priority input went in a batch of its own right after the batch computing
    when it came."""
    finished: dict[str, float] = {}

    async def timed(name: str, body: dict) -> None:
        reply = await answer_job(worker, body)
        assert reply.status == 200, reply.body
        assert reply.body["service_tier"] == body["service_tier"]
        finished[name] = time.monotonic()

    job = asyncio.ensure_future(timed("flex", {**flex, "service_tier": "flex"}))
    await asyncio.sleep(0.3)  # the flex job's first batches are through, the rest wait
    started = len(sizes)  # the batch computing now is sizes[started], if not already recorded
    await asyncio.wait_for(timed("priority", {**priority, "service_tier": "priority"}), 60)
    assert 1 in sizes[started : started + 2], (started, sizes)
    await asyncio.wait_for(job, 120)
    return finished


async def test_a_priority_request_overtakes_a_flex_job_on_the_llm_reranker(
    qwen3_worker, qwen3_ids, monkeypatch
):
    model = next(m for m in qwen3_worker.registry.models if m.served_id == qwen3_ids["reranker"])
    sizes = _slowed(monkeypatch, model, "_forward", 0.1)
    docs = [f"flex document number {i} about a topic" for i in range(30)]  # 10 batches of 3
    flex = {"model": model.served_id, "query": "which topic", "documents": docs}
    priority = {"model": model.served_id, "query": "a question", "documents": ["an answer"]}
    finished = await _priority_overtakes(qwen3_worker, flex, priority, sizes)
    assert finished["priority"] < finished["flex"]


async def test_a_priority_request_overtakes_a_flex_job_on_bge_m3(bge_m3_worker, monkeypatch):
    model = next(m for m in bge_m3_worker.registry.models if m.served_id.endswith("tiny-bge-m3"))
    sizes = _slowed(monkeypatch, model, "_forward_items", 0.1)
    # Not short texts (budget.SHORT_TEXT_TOKENS): 10 batches of 3, not one wide batch.
    texts = [f"flex text number {i} " + "about a topic " * 12 for i in range(30)]
    finished = await _priority_overtakes(
        bge_m3_worker,
        {"model": model.served_id, "input": texts},
        {"model": model.served_id, "input": "a question"},
        sizes,
    )
    assert finished["priority"] < finished["flex"]
