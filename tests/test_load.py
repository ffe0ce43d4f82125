"""Load through the RunPod handler in-process, and determinism of the vectors.

Thousands of jobs at RunPod's concurrency go through `runpod_handler` and runpod's own `run_job`:
every job is answered exactly once, with the right vectors in the right order for its own inputs,
and memory does not grow with the number of jobs. Throughput figures live in bench/load.py, not
here.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
from pathlib import Path

import numpy as np
from runpod.serverless.modules.rp_job import run_job

from embedding_worker.transports.runpod import answer_job, runpod_handler
from tests.helpers import decode_vectors

WORDS = "alpha beta gamma delta river stone cloud paper light green quick slow open".split()


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for i in range(n)]


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def _reference(worker, model: str, texts: list[str]) -> dict[str, np.ndarray]:
    reply = await answer_job(worker, {"model": model, "input": texts, "encoding_format": "base64"})
    assert reply.status == 200
    return dict(zip(texts, decode_vectors(reply.body)))


def _make_jobs(model: str, texts: list[str], count: int, seed: int, prefix: str) -> list[dict]:
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        chosen = rng.sample(texts, rng.randint(1, 4))
        body = {"model": model, "input": chosen, "encoding_format": rng.choice(["float", "base64"])}
        if i % 2:
            body = {"openai_route": "/v1/embeddings", "openai_input": body}
        jobs.append({"id": f"{prefix}-{i}", "input": body})
    return jobs


async def _run_all(handler, jobs: list[dict], concurrency: int) -> dict[str, list]:
    """Every job through runpod's run_job, `concurrency` at a time; results collected per job id."""
    answers: dict[str, list] = collections.defaultdict(list)
    calls = collections.Counter()
    gate = asyncio.Semaphore(concurrency)

    async def counted(job):
        calls[job["id"]] += 1
        return await handler(job)

    async def one(job):
        async with gate:
            answers[job["id"]].append(await run_job(counted, job))

    await asyncio.wait_for(asyncio.gather(*(one(job) for job in jobs)), 600)
    assert all(calls[job["id"]] == 1 for job in jobs)
    return answers


def _check_answers(jobs, answers, reference) -> None:
    assert set(answers) == {job["id"] for job in jobs}
    for job in jobs:
        (result,) = answers[job["id"]]  # exactly once
        assert "error" not in result, result
        body = job["input"]
        proxied = "openai_route" in body
        request = body["openai_input"] if proxied else body
        output = result["output"]
        answer = output[0] if proxied else output
        got = decode_vectors(answer)
        expected = np.stack([reference[text] for text in request["input"]])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        json.dumps(result, ensure_ascii=False)


async def test_thousands_of_concurrent_jobs_answered_once_right_vectors_bounded_memory(worker, ids):
    model_id = ids["embedder"]
    model = worker.registry.resolve(model_id, None)
    texts = _texts(300, seed=1)
    reference = await _reference(worker, model_id, texts)
    handler = runpod_handler(worker)
    concurrency = worker.config.max_concurrency  # what RunPod hands the worker at once

    warm = _make_jobs(model_id, texts, 600, seed=2, prefix="warm")
    _check_answers(warm, await _run_all(handler, warm, concurrency), reference)
    rss_before = _rss_bytes()

    jobs = _make_jobs(model_id, texts, 2400, seed=3, prefix="load")
    answers = await _run_all(handler, jobs, concurrency)
    _check_answers(jobs, answers, reference)
    del answers
    rss_growth = _rss_bytes() - rss_before

    # Nothing left behind: the worker's queue count and Infinity's queue and result store are empty.
    assert model.pending == 0 and worker.healthy
    batch_handler = model.engine._batch_handler
    assert len(batch_handler._queue_prio) == 0 and len(batch_handler._result_store) == 0
    # 2,400 jobs carry about 35 MB of answers; memory must not keep them.
    assert rss_growth < 64 * 2**20, f"RSS grew by {rss_growth / 2**20:.1f} MiB"


async def test_the_same_request_twice_gives_identical_answers(worker, ids):
    texts = _texts(20, seed=4)
    for model in (ids["minilm"], ids["embedder"]):
        for encoding in ("float", "base64"):
            body = {"model": model, "input": texts, "encoding_format": encoding}
            first, second = await answer_job(worker, body), await answer_job(worker, body)
            assert first.body["data"] == second.body["data"]
    body = {"model": ids["reranker"], "query": "stone river", "documents": texts}
    first, second = await answer_job(worker, body), await answer_job(worker, body)
    assert first.body["results"] == second.body["results"]


async def test_a_texts_vector_does_not_depend_on_its_batch_mates(worker, ids):
    # Short and long texts mixed, so that padding differs between a text alone and in a batch.
    texts = _texts(40, seed=5) + ["x", "a much longer text " * 20]
    for model in (ids["minilm"], ids["embedder"]):
        alone = {}
        for text in texts[::5] + texts[-2:]:
            reply = await answer_job(
                worker, {"model": model, "input": text, "encoding_format": "base64"}
            )
            alone[text] = decode_vectors(reply.body)[0]
        # The whole batch, sent while other jobs share the engine's batches.
        noise = [
            answer_job(worker, {"model": model, "input": _texts(8, seed=100 + i)}) for i in range(6)
        ]
        together, *_ = await asyncio.gather(
            answer_job(worker, {"model": model, "input": texts, "encoding_format": "base64"}),
            *noise,
        )
        in_batch = dict(zip(texts, decode_vectors(together.body)))
        for text, vector in alone.items():
            np.testing.assert_allclose(in_batch[text], vector, atol=1e-5)
