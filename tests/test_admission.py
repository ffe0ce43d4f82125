"""Admission by cost and progress (engines/admission.py): a burst is refused at the door, a model
that moves stays healthy, one that stalls is unhealthy only until it moves again."""

from __future__ import annotations

import asyncio
import json

import pytest

from embedding_worker.config import ConfigError, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.engines.admission import (
    MAX_RETRY_AFTER_S,
    Admission,
    AdmissionSettings,
)
from embedding_worker.errors import DEFAULT_RETRY_AFTER_S
from embedding_worker.statuses import http_status
from embedding_worker.transports.runpod import answer_job


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def admission(clock: Clock, **settings) -> Admission:
    defaults = dict(max_items=1000, deadline_s=10.0, stall_s=30.0, unmeasured_max_tokens=5000)
    return Admission("m", AdmissionSettings(**{**defaults, **settings}), clock)


def answered(queue: Admission, clock: Clock, tokens: int, seconds: float) -> None:
    """One call of `tokens` tokens that the model answers in `seconds`, alone in the queue."""
    queue.enter(1, tokens)
    clock.now += seconds
    queue.leave(1, tokens, answered=True)


def test_an_empty_queue_admits_any_request_however_large():
    queue = admission(Clock())
    assert queue.refusal(items=2048, tokens=10**9) is None


def test_before_the_pace_is_known_the_queue_holds_one_maximum_request_of_tokens():
    queue = admission(Clock())
    queue.enter(10, 4000)
    assert queue.refusal(10, 1000) is None
    refused = queue.refusal(10, 1001)
    assert refused is not None and http_status(refused) == 429 and refused.code == "queue_full"
    assert refused.retry_after == DEFAULT_RETRY_AFTER_S  # nothing measured to estimate from
    assert "REQUEST_TIMEOUT" in refused.message


def test_the_measured_pace_bounds_the_queue_to_what_answers_before_the_deadline():
    clock = Clock()
    queue = admission(clock)
    answered(queue, clock, 2000, 2.0)  # 1000 tokens a second
    assert queue.pace() == pytest.approx(1000.0)
    assert queue.max_tokens() == 10_000  # 10 s of deadline at 1000 tokens a second
    queue.enter(1, 6000)
    assert queue.refusal(1, 4000) is None
    refused = queue.refusal(1, 4001)
    assert refused is not None and refused.retry_after == 6  # 6000 tokens at 1000 a second


def test_a_fixed_bound_wins_over_the_pace():
    clock = Clock()
    queue = admission(clock, max_tokens=50)
    queue.enter(1, 40)
    assert queue.refusal(1, 10) is None and queue.refusal(1, 11) is not None


def test_the_inputs_bound_still_holds():
    queue = admission(Clock(), max_items=10)
    queue.enter(8, 8)
    refused = queue.refusal(3, 3)
    assert refused is not None and "INFINITY_QUEUE_SIZE" in refused.message


def test_retry_after_is_capped():
    clock = Clock()
    queue = admission(clock)
    answered(queue, clock, 10, 10.0)  # 1 token a second
    queue.enter(1, 10**6)
    assert queue.retry_after() == MAX_RETRY_AFTER_S


def test_calls_that_time_out_do_not_count_as_answered():
    clock = Clock()
    queue = admission(clock)
    queue.enter(1, 1000)
    clock.now += 1.0
    queue.leave(1, 1000, answered=False)
    assert queue.pace() is None and queue.items == 0 and queue.tokens == 0


def test_a_stall_is_seen_only_while_work_waits_and_ends_when_the_model_moves():
    clock = Clock()
    queue = admission(clock, stall_s=5.0)
    clock.now += 60.0
    assert not queue.stalled()  # idle is not stalled
    queue.enter(1, 10)
    clock.now += 4.0
    assert not queue.stalled()
    queue.progressed()  # a batch finished: the clock starts again
    clock.now += 4.0
    assert not queue.stalled()
    clock.now += 2.0
    assert queue.stalled()
    queue.leave(1, 10, answered=False)  # the waiting call gave up: the engine is still stuck
    assert queue.stalled()
    queue.progressed()
    assert not queue.stalled()


def test_the_pace_follows_recent_work():
    clock = Clock()
    queue = admission(clock)
    for _ in range(20):  # slow: 100 tokens a second, for 200 s of busy time
        answered(queue, clock, 1000, 10.0)
    for _ in range(60):  # then fast: 10,000 tokens a second, for a window's length
        answered(queue, clock, 10_000, 1.0)
    assert queue.pace() > 5000  # the old pace weighs less and less (50x slower than now)


@pytest.mark.parametrize(
    "env, value",
    [({}, None), ({"MAX_QUEUED_TOKENS": "auto"}, None), ({"MAX_QUEUED_TOKENS": "1234"}, 1234)],
)
def test_max_queued_tokens_configuration(env, value):
    config = load_config(env)
    assert config.engine_settings.max_queued_tokens == value
    assert config.engine_settings.unmeasured_max_queued_tokens == config.limits.max_request_tokens


@pytest.mark.parametrize(
    "env",
    [{"MAX_QUEUED_TOKENS": "0"}, {"MAX_QUEUED_TOKENS": "lots"}, {"ENGINE_STALL_TIMEOUT": "-1"}],
)
def test_bad_admission_settings_are_refused_naming_the_variable(env):
    with pytest.raises(ConfigError, match=next(iter(env))):
        load_config(env)


async def test_two_large_requests_at_once_one_is_refused_at_the_door(bert_embedder):
    """Issue 28's finding 1, at the door: the second of two maximum-size requests is refused
    with 429 and Retry-After before any work, instead of being accepted and timed out."""
    worker = Worker.from_config(
        load_config(
            {
                "MODEL_NAMES": str(bert_embedder),
                "DTYPES": "float32",
                "MAX_REQUEST_TOKENS": "20000",
            }
        )
    )
    await worker.start()
    try:
        body = {"input": ["hello " * 20] * 300}  # 18,600 tokens: within every limit
        replies = await asyncio.gather(answer_job(worker, body), answer_job(worker, body))
        statuses = sorted(reply.status for reply in replies)
        assert statuses == [200, 429], [r.body for r in replies]
        refused = next(reply for reply in replies if reply.status == 429)
        assert refused.body["error"]["code"] == "queue_full" and refused.retry_after >= 1
        assert json.loads(refused.runpod_output()["error"])["retry_after"] == refused.retry_after
        assert worker.healthy
        # Once the first is answered, the same request is admitted again.
        assert (await answer_job(worker, body)).status == 200
    finally:
        await worker.stop()


async def test_a_queue_without_room_refuses_before_the_request_is_counted(worker, ids, monkeypatch):
    """A refused request costs no tokenizing: with the queue full even at one token an input, the
    429 comes before the texts are counted."""
    model = worker.registry.resolve(ids["embedder"], None)
    monkeypatch.setattr(model.admission, "items", 1)  # work waits...
    monkeypatch.setattr(model.admission, "tokens", 10**9)  # ...more than the model answers in time
    counted = []
    tokenize = model.tokens.tokenize
    monkeypatch.setattr(
        model.tokens, "tokenize", lambda *a, **k: counted.append(1) or tokenize(*a, **k)
    )
    reply = await answer_job(worker, {"model": ids["embedder"], "input": ["some words"] * 8})
    assert reply.status == 429 and reply.body["error"]["code"] == "queue_full"
    assert counted == []
    monkeypatch.setattr(model.admission, "items", 0)
    monkeypatch.setattr(model.admission, "tokens", 0)
    assert (
        await answer_job(worker, {"model": ids["embedder"], "input": ["some words"]})
    ).status == 200
    assert counted  # the same request, admitted, is counted
