"""The same vector for the same text whatever else is in the batch: under the default dtype
(bfloat16 on a CPU that computes it natively), alone, twice, and among random companions of any
lengths and counts, sent in one request or in many at once. MiniLM and the tiny Qwen3 embedder."""

from __future__ import annotations

import asyncio
import base64
import random

import pytest

from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.engines.tokenization import bucket_width
from tests.helpers import call
from tests.model_factory import CORPUS


def words(rng: random.Random, low: int, high: int) -> str:
    start = rng.randrange(len(CORPUS))
    count = rng.randint(low, high)
    return " ".join((CORPUS * 40)[start : start + count])


@pytest.fixture(scope="module")
async def invariant_worker(qwen3_embedder):
    env = {
        "MODEL_NAMES": f"{DEFAULT_MODEL_ID};{qwen3_embedder}",
        "BATCH_SIZES": "16",
        "BATCH_INVARIANT": "true",
    }
    worker = Worker.from_config(load_config(env))  # DTYPES: the default, auto
    await worker.start()
    yield worker
    await worker.stop()


def vectors(reply) -> list[bytes]:
    assert reply.status == 200, reply.body
    return [base64.b64decode(item["embedding"]) for item in reply.body["data"]]


async def embed(worker, model, texts) -> list[bytes]:
    body = {"model": model, "input": texts, "encoding_format": "base64"}
    return vectors(await call(worker, "/v1/embeddings", body))


@pytest.mark.parametrize("which", [0, 1])
async def test_a_texts_vector_is_the_same_bits_in_any_batch(invariant_worker, which):
    model = invariant_worker.registry.models[which]
    rng = random.Random(which)
    targets = [words(rng, 2, 8), words(rng, 20, 60), words(rng, 100, 180)]
    alone = {t: (await embed(invariant_worker, model.served_id, [t]))[0] for t in targets}
    for text in targets:
        assert (await embed(invariant_worker, model.served_id, [text, text])) == [alone[text]] * 2
    for trial in range(12):
        mix = [words(rng, 1, 200) for _ in range(rng.randint(1, 40))]
        spots = sorted(rng.sample(range(len(mix) + len(targets)), len(targets)))
        batch = list(mix)
        for spot, text in zip(spots, targets):
            batch.insert(spot, text)
        if trial % 2:  # one request
            got = await embed(invariant_worker, model.served_id, batch)
        else:  # many requests at once, batched together by the engine
            parts = await asyncio.gather(
                *(embed(invariant_worker, model.served_id, [t]) for t in batch)
            )
            got = [part[0] for part in parts]
        for spot, text in zip(spots, targets):
            assert got[spot] == alone[text], f"trial {trial}: {len(text.split())} words"


async def test_without_it_the_padded_length_changes_the_vector(invariant_worker):
    """What the bucketing is for: the same text padded to its own length and to a longer one."""
    model = invariant_worker.registry.models[0]
    assert model.settings.batch_invariant
    replica = model.engine._model_replicas[0]
    (short,), _ = model.tokens.tokenize(["a cat"])
    long_width = bucket_width(200)
    exact = replica.encode_post(replica.encode_core(replica.encode_pre.pad([short])))
    wide = replica.encode_post(replica.encode_core(replica.encode_pre.pad([short], long_width)))
    if model.engine._engine_args.dtype.value == "bfloat16":
        assert (exact != wide).any()


def test_bucket_widths_pad_little():
    for tokens in range(1, 1024):
        width = bucket_width(tokens)
        step = 16 if tokens <= 64 else 32 if tokens <= 256 else 64
        assert tokens <= width < tokens + step and width % step == 0


def test_the_switch_turns_it_on():
    assert not load_config({}).engine_settings.batch_invariant
    assert load_config({"BATCH_INVARIANT": "true"}).engine_settings.batch_invariant
