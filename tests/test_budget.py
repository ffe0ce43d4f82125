"""Token budgets (MAX_BATCH_TOKENS) and out-of-memory splits, in real engines.

A batch never holds more padded tokens (rows x its longest row) than the model's budget, and a text
over the budget goes alone; a forward pass that runs out of memory runs again in halves and the
requests get the same answers. The out-of-memory error is injected below the worker's wrappers,
where a real one comes from: the model's forward pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from infinity_emb.primitives import ReRankSingle

from embedding_worker.config import ConfigError, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.engines import ModelRegistry
from embedding_worker.engines.budget import (
    SHORT_TEXT_TOKENS,
    TYPICAL_TEXT_TOKENS,
    SplitOnOutOfMemory,
    is_out_of_memory,
    rows_for,
    token_bounded,
)
from embedding_worker.engines.infinity_adapter import PacedQueue, pair_item, queued_tokens
from embedding_worker.engines.scheduler import Work
from embedding_worker.engines.spec import Optimisations
from embedding_worker.engines.tokenization import Text
from embedding_worker.transports.runpod import answer_job
from tests.helpers import answer, decode_vectors, model_and_replica

BUDGET = 200  # tokens; the tiny BERTs cut texts at 128, so two long ones never share a batch
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _texts(count: int, seed: int = 0) -> list[str]:
    """Texts of 1 to 150 words (up to past the tiny models' 128-token cut), shuffled."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 150))) for _ in range(count)]


# ------------------------------------------------------------------------------ the cut itself


@given(
    st.lists(st.integers(1, 300), max_size=60),
    st.integers(1, 1000),
    st.integers(1, 8),
)
def test_token_bounded_runs_stay_within_the_budget_and_keep_every_item(lengths, budget, rows):
    max_rows = rows_for(rows)  # `rows` a batch, 8 x `rows` when none is over SHORT_TEXT_TOKENS
    runs = list(token_bounded(lengths, lambda n: n, budget, max_rows))
    assert [n for run in runs for n in run] == lengths  # all, in order, once
    for run in runs:
        assert len(run) == 1 or (len(run) * max(run) <= budget and len(run) <= max_rows(max(run)))
    for run, following in zip(runs, runs[1:]):  # each run is cut only where the next would not fit
        width, count = max(*run, following[0]), len(run) + 1
        assert width * count > budget or count > max_rows(width)


def test_only_batches_of_short_texts_go_wider_than_the_batch_size():
    max_rows = rows_for(4)
    assert max_rows(SHORT_TEXT_TOKENS) == 32 and max_rows(SHORT_TEXT_TOKENS + 1) == 4
    short_then_long = [10] * 40 + [SHORT_TEXT_TOKENS + 1] * 6
    runs = list(token_bounded(short_then_long, lambda n: n, 10_000, max_rows))
    assert [len(run) for run in runs] == [32, 8, 4, 2]  # the 9th short run closes at a long text


def test_allocation_failures_are_told_from_other_errors():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")
    )
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not from an allocator


def test_a_split_forward_equals_the_whole_one():
    """Halves keep the batch's width, so a split answers row for row what the whole batch does."""
    layer = torch.nn.Linear(4, 3)
    features = {"input_ids": torch.randn(7, 4), "attention_mask": torch.ones(7, 4)}
    calls = []

    def forward(batch):
        calls.append(len(batch["input_ids"]))
        if len(batch["input_ids"]) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return layer(batch["input_ids"])

    with torch.no_grad():
        whole = layer(features["input_ids"])
        split = SplitOnOutOfMemory(forward, "m")(features)
    torch.testing.assert_close(split, whole)
    assert calls == [7, 3, 1, 2, 4, 2, 2]  # 7 -> 3 + 4, 3 -> 1 + 2, 4 -> 2 + 2


def test_a_row_alone_that_does_not_fit_raises_the_original_error():
    error = torch.OutOfMemoryError("CUDA out of memory (injected)")

    def forward(rows):
        raise error

    with pytest.raises(torch.OutOfMemoryError) as raised:
        SplitOnOutOfMemory(forward, "m")(["a", "b", "c"])
    assert raised.value is error


async def test_a_rerank_pair_is_bounded_by_the_pair_count_the_worker_made():
    queue = PacedQueue(type("Inner", (), {})(), batch_size=8, max_tokens=100, max_length=64)
    loop = asyncio.get_running_loop()
    item = pair_item("q", Text("short document", 90), loop)
    work = Work(queued_tokens(item.content), item.future, item)
    assert queue.scheduler.tokens_fed(work) == 64  # the count, cut at the model's maximum
    plain = ReRankSingle(query="q", document="doc")  # Infinity's own, from its `rerank`
    assert queued_tokens(plain) == len("qdoc")  # uncounted: its characters


# ------------------------------------------------------------------------------ configuration


def test_max_batch_tokens_defaults_to_the_batch_size_times_a_typical_text(bert_embedder):
    config = load_config({"MODEL_NAMES": str(bert_embedder), "BATCH_SIZES": "16"})
    assert config.models[0].max_batch_tokens == 16 * TYPICAL_TEXT_TOKENS


def test_max_batch_tokens_per_model(bert_embedder, bert_reranker):
    config = load_config(
        {"MODEL_NAMES": f"{bert_embedder};{bert_reranker}", "MAX_BATCH_TOKENS": "4096;8192"}
    )
    assert [m.max_batch_tokens for m in config.models] == [4096, 8192]


@pytest.mark.parametrize("raw", ["0", "-5", "many", "1;2;3"])
def test_bad_max_batch_tokens_is_a_config_error(bert_embedder, bert_reranker, raw):
    with pytest.raises(ConfigError, match="MAX_BATCH_TOKENS"):
        load_config({"MODEL_NAMES": f"{bert_embedder};{bert_reranker}", "MAX_BATCH_TOKENS": raw})


# ------------------------------------------------------------------------------ real engines


@pytest.fixture(scope="module")
async def budgeted(bert_embedder, bert_reranker):
    """The shared worker's tiny BERTs, with a token budget that cuts their batches."""
    worker = Worker.from_config(
        load_config(
            {
                "MODEL_NAMES": f"{bert_embedder};{bert_reranker}",
                "BATCH_SIZES": "16",
                "DTYPES": "float32",
                "MAX_BATCH_TOKENS": str(BUDGET),
            }
        )
    )
    await worker.start()
    yield worker
    await worker.stop()


def _record_shapes(target, name: str, monkeypatch) -> list[tuple[int, int]]:
    """Record (rows, padded width) of every forward pass of `target.name`."""
    shapes: list[tuple[int, int]] = []
    forward = getattr(target, name)

    def recording(*args, **kwargs):
        features = args[0] if args else kwargs
        shapes.append(tuple(features["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(target, name, recording)
    return shapes


async def test_embedding_batches_stay_within_the_token_budget(budgeted, worker, ids, monkeypatch):
    model, replica = model_and_replica(budgeted, "tiny-bert-embedder")
    shapes = _record_shapes(replica, "forward", monkeypatch)
    texts = _texts(48)
    requests = [texts[i : i + 6] for i in range(0, len(texts), 6)]
    bodies = await asyncio.gather(
        *(answer(budgeted, model=model.served_id, input=chunk) for chunk in requests)
    )
    for rows, width in shapes:
        assert rows == 1 or rows * width <= BUDGET, shapes
    assert any(rows == 1 and width > BUDGET // 2 for rows, width in shapes)  # a long one alone
    assert sum(rows for rows, _ in shapes) == len(texts)
    # Same vectors as the shared worker's, which batches the same model by count only.
    expected = decode_vectors(await answer(worker, model=ids["embedder"], input=texts))
    got = np.concatenate([decode_vectors(body) for body in bodies])
    np.testing.assert_allclose(got, expected, atol=1e-5)


async def test_rerank_batches_stay_within_the_token_budget(budgeted, worker, ids, monkeypatch):
    model, replica = model_and_replica(budgeted, "tiny-bert-reranker")
    shapes = _record_shapes(replica.model, "forward", monkeypatch)
    docs = _texts(24, seed=1)
    body = await answer(budgeted, model=model.served_id, query="alpha beta", documents=docs)
    for rows, width in shapes:
        assert rows == 1 or rows * width <= BUDGET, shapes
    assert len(shapes) > 2  # 24 documents, 16 a batch by count: the budget cut more
    expected = await answer(worker, model=ids["reranker"], query="alpha beta", documents=docs)
    scores = {r["index"]: r["relevance_score"] for r in body["results"]}
    for result in expected["results"]:
        assert scores[result["index"]] == pytest.approx(result["relevance_score"], abs=1e-5)


async def test_short_texts_go_more_than_batch_size_a_batch_by_default(worker, ids, monkeypatch):
    """The shared worker has BATCH_SIZES=16 and no MAX_BATCH_TOKENS: texts of up to
    SHORT_TEXT_TOKENS go up to 8 x 16 a batch, longer ones 16, within 16 x 512 padded tokens."""
    model, replica = model_and_replica(worker, "tiny-bert-embedder")
    shapes = _record_shapes(replica, "forward", monkeypatch)
    short = [" ".join(WORDS[: 1 + i % 5]) for i in range(200)]
    await answer(worker, model=model.served_id, input=short)
    assert max(rows for rows, _ in shapes) == 8 * 16
    assert all(width <= SHORT_TEXT_TOKENS for _, width in shapes)
    shapes.clear()
    longer = [text for text in _texts(96) if len(text.split()) > 40]  # over 32 tokens each
    await answer(worker, model=model.served_id, input=longer)
    assert max(rows for rows, _ in shapes) == 16, shapes
    assert all(rows * width <= 16 * TYPICAL_TEXT_TOKENS for rows, width in shapes)


# ------------------------------------------------------------------------------ out of memory


def _out_of_memory_above(target, name: str, rows: int, error: Exception, monkeypatch) -> list:
    """Make `target.name` fail as an allocator does for batches of more than `rows` rows."""
    forward = getattr(target, name)
    seen: list[int] = []

    def failing(*args, **kwargs):
        features = args[0] if args else kwargs
        seen.append(len(features["input_ids"]))
        if seen[-1] > rows:
            raise error
        return forward(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)
    return seen


OUT_OF_MEMORY = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB (injected)"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
]


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["cuda", "cpu"])
async def test_an_embedding_batch_out_of_memory_runs_in_halves(
    budgeted, worker, ids, error, monkeypatch, caplog
):
    model, replica = model_and_replica(budgeted, "tiny-bert-embedder")
    seen = _out_of_memory_above(replica, "forward", 2, error, monkeypatch)
    texts = [f"short text number {i}" for i in range(10)]
    with caplog.at_level(logging.WARNING):
        body = await answer(budgeted, model=model.served_id, input=texts)
    expected = decode_vectors(await answer(worker, model=ids["embedder"], input=texts))
    np.testing.assert_allclose(decode_vectors(body), expected, atol=1e-5)
    assert max(seen) > 2 and sum(n for n in seen if n <= 2) == len(texts)
    assert "ran out of memory on a batch of 10 rows" in caplog.text
    assert budgeted.healthy


async def test_a_batch_invariant_batch_out_of_memory_runs_in_halves_per_padded_length(
    bert_embedder, worker, ids, monkeypatch
):
    # BATCH_INVARIANT runs one forward pass per padded length (tokenization.BucketedForward):
    # the split goes around each of those.
    invariant = Worker.from_config(
        load_config(
            {"MODEL_NAMES": str(bert_embedder), "DTYPES": "float32", "BATCH_INVARIANT": "true"}
        )
    )
    await invariant.start()
    try:
        model, replica = model_and_replica(invariant, "tiny-bert-embedder")
        seen = _out_of_memory_above(replica, "forward", 2, OUT_OF_MEMORY[1], monkeypatch)
        texts = [f"short text number {i}" for i in range(10)]
        body = await answer(invariant, model=model.served_id, input=texts)
        assert invariant.healthy
    finally:
        await invariant.stop()
    expected = decode_vectors(await answer(worker, model=ids["embedder"], input=texts))
    np.testing.assert_allclose(decode_vectors(body), expected, atol=1e-5)
    assert max(seen) > 2 and sum(n for n in seen if n <= 2) == len(texts)


async def test_a_rerank_batch_out_of_memory_runs_in_halves(budgeted, worker, ids, monkeypatch):
    model, replica = model_and_replica(budgeted, "tiny-bert-reranker")
    seen = _out_of_memory_above(replica.model, "forward", 1, OUT_OF_MEMORY[0], monkeypatch)
    docs = ["one doc", "another doc", "a third doc", "and a fourth"]
    body = await answer(budgeted, model=model.served_id, query="doc", documents=docs)
    expected = await answer(worker, model=ids["reranker"], query="doc", documents=docs)
    assert [r["index"] for r in body["results"]] == [r["index"] for r in expected["results"]]
    assert seen.count(1) == len(docs)
    assert budgeted.healthy


async def test_a_text_alone_out_of_memory_fails_the_engine_as_before(bert_embedder, monkeypatch):
    """Nothing smaller to try: the error goes up, the batch-thread guard reports the engine dead,
    and the job gets 503 engine_failed (test_faults.py), not a hang."""
    worker = Worker.from_config(
        load_config({"MODEL_NAMES": str(bert_embedder), "REQUEST_TIMEOUT": "20"})
    )
    await worker.start()
    try:
        model, replica = model_and_replica(worker, "tiny-bert-embedder")
        _out_of_memory_above(replica, "forward", 0, OUT_OF_MEMORY[0], monkeypatch)
        reply = await asyncio.wait_for(answer_job(worker, {"input": ["one", "two"]}), 30)
        assert reply.status == 503 and reply.body["error"]["code"] == "engine_failed"
        assert not worker.healthy
    finally:
        await worker.stop()


async def test_an_llm_reranker_batch_out_of_memory_runs_in_halves(
    qwen3_worker, qwen3_ids, monkeypatch
):
    model = next(m for m in qwen3_worker.registry.models if m.served_id == qwen3_ids["reranker"])
    docs = ["one doc", "another doc", "a third doc"]
    expected = await answer(qwen3_worker, model=model.served_id, query="which doc", documents=docs)
    forward = model._forward
    seen: list[int] = []

    def failing(batch_ids):
        seen.append(len(batch_ids))
        if len(batch_ids) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(batch_ids)

    monkeypatch.setattr(model, "_forward", failing)
    body = await answer(qwen3_worker, model=model.served_id, query="which doc", documents=docs)
    assert seen == [3, 1, 2, 1, 1]
    for got, want in zip(body["results"], expected["results"]):
        assert got["index"] == want["index"]
        assert got["relevance_score"] == pytest.approx(want["relevance_score"], abs=1e-5)


async def test_llm_reranker_batches_stay_within_the_token_budget(qwen3_reranker, monkeypatch):
    budget = 120
    worker = Worker.from_config(
        load_config(
            {
                "MODEL_NAMES": str(qwen3_reranker),
                "BATCH_SIZES": "8",
                "DTYPES": "float32",
                "MAX_BATCH_TOKENS": str(budget),
            }
        )
    )
    await worker.start()
    try:
        model = worker.registry.models[0]
        forward = model._forward
        shapes: list[tuple[int, int]] = []

        def recording(batch_ids):
            shapes.append((len(batch_ids), max(len(ids) for ids in batch_ids)))
            return forward(batch_ids)

        monkeypatch.setattr(model, "_forward", recording)
        docs = _texts(8, seed=2)
        await answer(worker, model=model.served_id, query="alpha", documents=docs)
        for rows, width in shapes:
            assert rows == 1 or rows * width <= budget, shapes
        assert len(shapes) > 1 and sum(rows for rows, _ in shapes) == len(docs)
    finally:
        await worker.stop()


async def test_a_pop_of_short_texts_takes_wider_batches():
    """The paced queue pops batches of 8 x batch_size texts when every text it would take is short,
    and of batch_size when any is not."""
    from infinity_emb.inference.queue import CustomFIFOQueue

    from tests.test_pacing import _items, _pop

    queue = PacedQueue(CustomFIFOQueue(), batch_size=4)
    queue.extend(_items(40, tokens=SHORT_TEXT_TOKENS))
    await asyncio.sleep(0)
    assert _pop(queue) == [32, 8]  # the model was idle: everything, in wide batches
    for _ in range(2):
        queue.batch_finished()
    queue.extend(_items(6, tokens=10) + _items(1, tokens=SHORT_TEXT_TOKENS + 1))
    await asyncio.sleep(0)
    assert _pop(queue) == [4, 3]  # one text is not short: batches of 4


async def test_without_wide_short_batches_short_texts_go_batch_size_a_batch():
    # What bench.token_budget's short-text part measures against.
    from infinity_emb.inference.queue import CustomFIFOQueue

    from tests.test_pacing import _items, _pop

    queue = PacedQueue(CustomFIFOQueue(), batch_size=4, wide_short_batches=False)
    queue.extend(_items(40, tokens=SHORT_TEXT_TOKENS))
    await asyncio.sleep(0)
    assert _pop(queue) == [4, 4]  # the model was idle: what it can start now, batches of 4


@pytest.mark.parametrize("wide", [True, False])
async def test_the_compiled_backends_follow_the_wide_short_batches_switch(
    bert_embedder, tmp_path, wide, monkeypatch
):
    pytest.importorskip("onnxruntime")
    config = load_config(
        {
            "MODEL_NAMES": str(bert_embedder),
            "BACKEND": "optimum",
            "DTYPES": "float32",
            "BATCH_SIZES": "4",
            "ONNX_CACHE_DIR": str(tmp_path),
        }
    )
    settings = dataclasses.replace(
        config.engine_settings, optimisations=Optimisations(wide_short_batches=wide)
    )
    worker = Worker(config, ModelRegistry.load(config.models, settings))
    (model,) = worker.registry.models
    forward = model._forward_items
    sizes: list[int] = []

    def counted(items):
        sizes.append(len(items))
        return forward(items)

    monkeypatch.setattr(model, "_forward_items", counted)
    await worker.start()
    try:
        body = {"input": [f"short text {i}" for i in range(64)]}
        replies = await asyncio.gather(*(answer_job(worker, body) for _ in range(4)))
        assert all(reply.status == 200 for reply in replies)
    finally:
        await worker.stop()
    assert sum(sizes) == 4 * 64
    assert (max(sizes) > 4) is wide, sizes
