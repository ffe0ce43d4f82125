"""The scheduler's pacing (scheduler.py, through infinity_adapter.PacedQueue): full batches for
Infinity when requests arrive one by one.

First the release rule on Infinity's own queue and items, then a real engine whose model is held
busy: requests that arrive one by one meanwhile must run as one batch, where Infinity alone splits
them.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from infinity_emb.inference.queue import CustomFIFOQueue
from infinity_emb.primitives import EmbeddingInner, PrioritizedQueueItem

from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.engines.infinity_adapter import PacedQueue, text_single
from embedding_worker.engines.tokenization import Text
from embedding_worker.transports.runpod import answer_job
from tests.helpers import worker_without


def _items(n: int, tokens: int = 100) -> list[PrioritizedQueueItem]:
    """Queue items of `tokens` tokens each: by default too long for wider batches of short texts
    (budget.SHORT_TEXT_TOKENS), so that a batch holds `batch_size` of them."""
    loop = asyncio.get_running_loop()
    return [
        PrioritizedQueueItem(
            priority=i,
            item=EmbeddingInner(
                content=text_single(Text(f"t{i}", tokens)),
                future=loop.create_future(),
            ),
        )
        for i in range(n)
    ]


async def _submit(queue: PacedQueue, items: list[PrioritizedQueueItem]) -> None:
    """Items in, and the event loop's turn ended (what a request's task does when it awaits)."""
    queue.extend(items)
    await asyncio.sleep(0)


def _pop(queue: PacedQueue, timeout: float = 0.05) -> list[int]:
    """What Infinity's publisher would hand the model now: the size of each batch released."""
    return [len(batch) for batch in queue.pop_optimal_batches(4, 8, timeout=timeout)]


async def test_a_part_filled_batch_waits_while_the_model_is_busy():
    queue = PacedQueue(CustomFIFOQueue(), batch_size=4)
    await _submit(queue, _items(1))
    assert _pop(queue) == [1]  # the model was idle: a lone request goes at once
    await _submit(queue, _items(3))
    assert _pop(queue) == []  # the model is busy: three wait for a fourth
    await _submit(queue, _items(2))
    assert _pop(queue) == [4]  # a full batch goes ahead of the model; the fifth item waits
    await _submit(queue, _items(1))
    assert _pop(queue) == []  # two batches in the model already: nothing more goes
    queue.batch_finished()
    assert _pop(queue) == []  # one is still computing, and what waits is no full batch
    queue.batch_finished()
    assert _pop(queue) == [2]  # the model is idle: everything waiting goes
    assert len(queue) == 0 and queue.in_model == 1


async def test_an_idle_model_takes_what_one_turn_of_the_loop_submits_together():
    queue = PacedQueue(CustomFIFOQueue(), batch_size=4)
    queue.extend(_items(1))  # the first request of a turn...
    assert _pop(queue, timeout=0) == []  # ...waits for the others the same turn submits
    queue.extend(_items(2))
    await asyncio.sleep(0)  # the turn ends
    assert _pop(queue, timeout=0) == [3]  # they go together
    queue.extend(_items(4))
    assert _pop(queue, timeout=0) == [4]  # a full batch need not wait for the turn's end


def _a_full_batch_later_in_the_turn(
    queue: PacedQueue, publisher_timeout: float
) -> tuple[list[list[int]], float]:
    """A lone item, then a full batch in the same turn of the event loop while the publisher
    waits (`publisher_timeout` at most): what it released, and how many seconds after."""
    queue.extend(_items(1))
    released: list[list[int]] = []
    publisher = threading.Thread(
        target=lambda: released.append(_pop(queue, timeout=publisher_timeout))
    )
    publisher.start()
    started = time.monotonic()
    queue.extend(_items(4))  # the same turn: no await between
    publisher.join(10)  # blocks the loop, so the turn cannot end meanwhile
    return released, time.monotonic() - started


async def test_a_full_batch_wakes_the_publisher_before_the_turn_ends():
    # Many jobs in one turn of the loop: the model starts on the first full batch while the turn
    # goes on validating and tokenizing the others (a GPU would otherwise wait for all of them).
    queue = PacedQueue(CustomFIFOQueue(), batch_size=4)
    released, seconds = _a_full_batch_later_in_the_turn(queue, publisher_timeout=5)
    assert released == [[4]] and seconds < 2
    assert len(queue) == 1  # the part-filled rest waits: for the turn's end, then for the model
    await asyncio.sleep(0)
    assert _pop(queue, timeout=0) == []
    queue.batch_finished()
    assert _pop(queue, timeout=0) == [1]


async def test_a_request_alone_in_its_turn_goes_whole_at_the_turns_end():
    # Not split by when the publisher happens to look: the same request batches the same way each
    # time.
    queue = PacedQueue(CustomFIFOQueue(), batch_size=4)
    released: list[list[int]] = []
    publisher = threading.Thread(target=lambda: released.append(_pop(queue, timeout=5)))
    publisher.start()
    queue.extend(_items(6))
    time.sleep(0.2)  # blocks the loop: the turn goes on
    assert not released
    await asyncio.sleep(0)  # the turn ends
    publisher.join(10)
    assert released == [[4, 2]]


async def test_a_batch_leaves_the_model_when_its_forward_pass_ends_not_when_answered():
    # Infinity post-processes a batch and resolves its futures on other threads after its forward
    # pass: the next part-filled batch goes (to be tokenized) as soon as the pass ends.
    queue = PacedQueue(CustomFIFOQueue(), batch_size=4)
    first = _items(1)
    await _submit(queue, first)
    assert _pop(queue) == [1]
    await _submit(queue, _items(2))
    assert _pop(queue, timeout=0) == []  # the model is busy
    queue.scheduler.forward_finished([first[0].item.future])
    assert queue.in_model == 0
    assert _pop(queue, timeout=0) == [2]
    first[0].item.future.set_result(None)  # its answer, later: counted out once only
    await asyncio.sleep(0)
    assert queue.in_model == 1


async def test_a_publisher_that_looks_before_the_turns_end_takes_nothing_of_a_lone_request():
    # Infinity's publisher looks again whenever its wait times out; looking while the turn that
    # submitted a request goes on, it once took the request's first full batch alone, so the same
    # request was cut into batches (and padded) one way or another by chance.
    queue = PacedQueue(CustomFIFOQueue(), batch_size=4)
    queue.extend(_items(6))
    assert _pop(queue, timeout=0) == []
    await asyncio.sleep(0)  # the turn ends
    assert _pop(queue, timeout=0) == [4, 2]


async def test_full_batches_go_together_and_cancelled_items_are_dropped():
    queue = PacedQueue(CustomFIFOQueue(), batch_size=4)
    await _submit(queue, _items(1))
    assert _pop(queue) == [1]
    items = _items(9)
    items[0].item.future.cancel()  # a request that went away while it waited
    await _submit(queue, items)
    # One full batch: with one in the model, only one more goes ahead (the one dropped item is
    # skipped); the rest wait, where higher tiers can overtake them.
    assert _pop(queue) == [4]
    assert len(queue) == 4


async def test_a_waiting_publisher_wakes_when_the_model_finishes_not_at_its_timeout():
    queue = PacedQueue(CustomFIFOQueue(), batch_size=4)
    await _submit(queue, _items(1))
    assert _pop(queue) == [1]
    await _submit(queue, _items(2))
    released: list[list[int]] = []
    publisher = threading.Thread(target=lambda: released.append(_pop(queue, timeout=30)))
    publisher.start()
    await asyncio.sleep(0.2)
    assert not released  # held while the model computes
    started = time.monotonic()
    queue.batch_finished()
    publisher.join(10)
    assert released == [[2]] and time.monotonic() - started < 5


async def test_without_turn_end_wake_a_request_goes_before_its_turn_ends():
    # What bench.handler_ab --without turn-wake measures: the publisher woken at each submission.
    queue = PacedQueue(CustomFIFOQueue(), batch_size=4, turn_end_wake=False)
    queue.extend(_items(1))
    assert _pop(queue, timeout=0) == [1]  # not held for what the rest of the turn submits


async def test_without_full_batch_wake_a_full_batch_waits_for_the_publishers_next_look():
    # What bench.handler_ab --without full-wake measures: the publisher is not woken for a full
    # batch that a later job of the turn completes; it finds it when its wait times out.
    queue = PacedQueue(CustomFIFOQueue(), batch_size=4, full_batch_wake=False)
    released, seconds = _a_full_batch_later_in_the_turn(queue, publisher_timeout=1.0)
    assert released == [[4]] and seconds >= 0.9


@pytest.fixture
async def tiny_worker(bert_embedder):
    """A worker of its own on the tiny BERT (batches of 32)."""
    worker = Worker.from_config(
        load_config({"MODEL_NAMES": str(bert_embedder), "DTYPES": "float32", "BATCH_SIZES": "32"})
    )
    await worker.start()
    yield worker
    await worker.stop()


def _record_batch_sizes(
    model, first_pass_s: float = 0.0, hold: threading.Event | None = None
) -> list[int]:
    """The batch sizes the model's forward pass sees, in order, from now on; the first pass takes
    `first_pass_s` longer, and waits for `hold` where given."""
    replica = model.engine._model_replicas[0]
    guarded = replica.encode_core  # the worker's guard, which also tells the queue
    sizes: list[int] = []

    def encode_core(features):
        # A batch-invariant batch comes split by padded length (tokenization.Buckets).
        rows = getattr(features, "rows", None)
        sizes.append(rows if rows is not None else int(features["input_ids"].shape[0]))
        if len(sizes) == 1:
            time.sleep(first_pass_s)
            if hold is not None:
                assert hold.wait(30)
        return guarded(features)

    replica.encode_core = encode_core
    return sizes


async def test_infinity_tells_the_scheduler_when_a_forward_pass_ends(tiny_worker):
    model = tiny_worker.registry.models[0]
    replica = model.engine._model_replicas[0]
    post = replica.encode_post
    release = threading.Event()
    finished: list[bool] = []  # for each batch out of the model: whether its request was answered

    class Observer:
        def batch_formed(self, *args) -> None:
            pass

        def batch_finished(self, name: str, rows: int, seconds: float) -> None:
            finished.append(task.done())

    def held_post(output):  # post-processing, and so the answer, waits for the test
        assert release.wait(30)
        return post(output)

    replica.encode_post = held_post
    model.scheduler.observers.append(observer := Observer())
    try:
        task = asyncio.ensure_future(model.embed(["one text"], tokens=4))
        deadline = time.monotonic() + 30
        while not finished and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert finished == [False] and model.scheduler.in_model == 0
        release.set()
        vectors = await asyncio.wait_for(task, 30)
        assert vectors.shape[0] == 1 and finished == [False]
    finally:
        release.set()
        replica.encode_post = post
        model.scheduler.observers.remove(observer)


@pytest.fixture
async def busy_engine(tiny_worker):
    """The tiny worker whose first forward pass lasts until its `hold` is set, and the batch sizes
    its model sees."""
    model = tiny_worker.registry.models[0]
    hold = threading.Event()
    yield tiny_worker, model, _record_batch_sizes(model, hold=hold), hold
    hold.set()


async def _one_by_one(model, hold: threading.Event, count: int, embed=None) -> None:
    """One request, then `count` more one at a time while its forward pass runs (through the
    worker's model, or `embed(text)`); the pass ends once they are all queued."""
    embed = embed or (lambda text: model.embed([text], tokens=4))
    first = asyncio.ensure_future(embed("first"))
    await asyncio.sleep(0.3)  # its batch is in the model
    later = []
    for i in range(count):
        later.append(asyncio.ensure_future(embed(f"text {i}")))
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # the last is queued (or, in Infinity's own queue, handed over)
    hold.set()
    vectors = await asyncio.wait_for(asyncio.gather(first, *later), 60)
    assert all(np.asarray(v).shape == (1, model.dimensions) for v in vectors)


async def test_requests_arriving_one_by_one_run_as_one_batch(busy_engine):
    worker, model, sizes, hold = busy_engine
    await _one_by_one(model, hold, 12)
    assert sizes == [1, 12]


async def test_without_pacing_infinity_splits_them(busy_engine):
    """What the paced queue is for: Infinity's own queue hands them over a few at a time."""
    worker, model, sizes, hold = busy_engine
    handler = model.engine._batch_handler
    handler._queue_prio = handler._queue_prio.inner
    await asyncio.sleep(0.5)  # Infinity's publisher asks the paced queue (0.2 s) one last time

    async def infinity_alone(text):  # Infinity's own embed, into its own queue
        vectors, _ = await model.engine.embed(sentences=[text])
        return vectors

    await _one_by_one(model, hold, 12, infinity_alone)
    assert sizes[0] == 1 and sum(sizes) == 13
    assert len(sizes) > 3, sizes


async def test_optimisations_switched_off_in_the_settings_reach_the_paced_queue(bert_embedder):
    # Batches of short texts hold BATCH_SIZES texts, not more, once wide_short_batches is off.
    env = {"MODEL_NAMES": str(bert_embedder), "BATCH_SIZES": "4"}
    worker = worker_without(env, wide_short_batches=False)
    await worker.start()
    try:
        model = worker.registry.models[0]
        sizes = _record_batch_sizes(model)
        texts = [f"text {i}" for i in range(12)]
        vectors = await asyncio.wait_for(model.embed(texts, tokens=48), 60)
        assert vectors.shape[0] == 12
        assert sizes == [4, 4, 4]
    finally:
        await worker.stop()


async def test_jobs_submitted_in_one_turn_of_the_loop_share_batches(tiny_worker):
    """Jobs that arrive together are validated and counted one after another; the model, idle, must
    not take the first job's texts alone before the others are in."""
    model = tiny_worker.registry.models[0]
    sizes = _record_batch_sizes(model)
    for _ in range(3):
        sizes.clear()
        jobs = [
            {"model": model.served_id, "input": [f"job {j} text {i} " * 3 for i in range(16)]}
            for j in range(8)
        ]
        replies = await asyncio.wait_for(
            asyncio.gather(*(answer_job(tiny_worker, j) for j in jobs)), 60
        )
        assert all(r.status == 200 for r in replies)
        # Not the first job's 16 alone: the first batch goes once 32 (BATCH_SIZES) are in, the
        # rest of the turn's texts after it, in batches as wide as the token budget lets them and
        # as the jobs are counted in (quiet, three batches; beside a busy process, four).
        assert sizes[0] >= 32 and sum(sizes) == 128, sizes
        assert len(sizes) <= len(jobs) // 2, f"the jobs hardly shared batches: {sizes}"
