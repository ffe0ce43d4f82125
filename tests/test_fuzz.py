"""Property-based fuzzing of job inputs, both flavours, against the shared worker (real engines).

Every job gets a 200 with a well-formed body or a typed 4xx error carrying the OpenAI error object;
nothing escapes `dispatch`, nothing is a 500, every output survives runpod's own serialisation, and
the worker still answers a valid job afterwards.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from embedding_worker.dispatch import Worker
from embedding_worker.transports.runpod import answer_job

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

SERVED = [
    "sentence-transformers/all-MiniLM-L6-v2",
    "all-MiniLM-L6-v2",
    "tiny-bert-embedder",
    "tiny-bert-reranker",
]
ODD_CHARS = ["\ud800", "\udfff", "\x00", "\n", '"', "\\", "é", "語", "😀", "\u202e"]

chars = st.characters(exclude_categories=()) | st.sampled_from(ODD_CHARS)
texts = st.text(chars, max_size=30)
numbers = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=-3, max_value=400)
    | st.floats(allow_nan=True, allow_infinity=True)
)
scalars = st.none() | st.booleans() | numbers | texts
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=10,
)
model_names = st.sampled_from(SERVED) | texts | json_values
token_ids = st.integers(min_value=-2, max_value=31_000) | st.sampled_from([2**31, 2**70])
embedding_inputs = (
    texts
    | st.lists(texts, max_size=5)
    | st.lists(token_ids, max_size=8)
    | st.lists(st.lists(token_ids, max_size=6), max_size=4)
    | json_values
)
shared_fields = {
    "model": model_names,
    "truncate": st.booleans() | json_values,
    "instruction": texts | json_values,
    "extra_body": st.dictionaries(
        st.sampled_from(["dimensions", "input", "model", "top_n"]), json_values, max_size=2
    ),
}
embedding_bodies = st.fixed_dictionaries(
    {"input": embedding_inputs},
    optional={
        **shared_fields,
        "encoding_format": st.sampled_from(["float", "base64", "binary", ""]) | json_values,
        "dimensions": st.integers(min_value=-2, max_value=400) | json_values,
        "user": texts | json_values,
        "prompt_type": st.sampled_from(["query", "document", "nope"]) | json_values,
    },
)
documents = st.lists(texts | st.fixed_dictionaries({"text": texts}) | json_values, max_size=5)
rerank_bodies = st.fixed_dictionaries(
    {"query": texts | json_values},
    optional={
        **shared_fields,
        "documents": documents | json_values,
        "docs": documents,
        "top_n": st.integers(min_value=-2, max_value=10) | json_values,
        "return_documents": st.booleans() | json_values,
        "return_docs": st.booleans(),
    },
)
routes = st.sampled_from(
    ["/v1/embeddings", "/v1/rerank", "/v1/models", "/v1/embeddings/", "/v1/chat"]
)


def _proxied(bodies):
    return st.fixed_dictionaries(
        {"openai_route": routes | json_values}, optional={"openai_input": bodies | json_values}
    )


jobs = (
    embedding_bodies
    | rerank_bodies
    | _proxied(embedding_bodies)
    | _proxied(rerank_bodies)
    | json_values
)

TYPED = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error"}


def _check_reply(job, reply) -> None:
    event(f"status {reply.status}")
    output = reply.runpod_output()
    # runpod writes the job result with json.dumps(ensure_ascii=False), sent as UTF-8.
    wire = json.dumps(output, ensure_ascii=False, allow_nan=False).encode("utf-8")
    assert wire
    if reply.ok:
        assert reply.status == 200
        body = output[0] if reply.openai_route else output
        assert body["object"] in ("list", "rerank")
        if body["object"] == "rerank":
            scores = [r["relevance_score"] for r in body["results"]]
            assert scores == sorted(scores, reverse=True)
            assert all(0.0 <= s <= 1.0 for s in scores)
        return
    assert reply.status in TYPED, (reply.status, reply.body)
    error = reply.body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == TYPED[reply.status]
    assert isinstance(error["message"], str) and isinstance(error["code"], str)
    assert len(error["message"]) < 2000
    decoded = json.loads(output["error"])
    assert decoded["status"] == reply.status and decoded["error"] == error
    assert "refresh_worker" not in output  # bad input never asks for a new worker


async def _valid_job_still_answers(worker: Worker) -> None:
    reply = await answer_job(worker, {"model": "tiny-bert-embedder", "input": ["still alive"]})
    assert reply.status == 200 and len(reply.body["data"]) == 1
    assert worker.healthy and all(m.pending == 0 for m in worker.registry.models)


@FUZZ
@given(job=jobs)
async def test_fuzzed_jobs_get_an_answer_or_a_typed_error(worker, job):
    _check_reply(job, await answer_job(worker, job, job_id="fuzz"))


# Mostly well-formed jobs, so that most reach the engines: served models, non-empty inputs.
words = st.text(chars, min_size=1, max_size=40)
plausible_embeddings = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["tiny-bert-embedder", "all-MiniLM-L6-v2"]),
        "input": words
        | st.lists(words, min_size=1, max_size=4)
        | st.lists(st.lists(st.integers(0, 1200), min_size=1, max_size=6), min_size=1, max_size=3),
    },
    optional={
        "encoding_format": st.sampled_from(["float", "base64"]),
        "dimensions": st.integers(min_value=1, max_value=400),
        "truncate": st.booleans(),
        "prompt_type": st.sampled_from(["query", "document"]),
    },
)
plausible_reranks = st.fixed_dictionaries(
    {
        "model": st.just("tiny-bert-reranker"),
        "query": words,
        "documents": st.lists(
            words | st.fixed_dictionaries({"text": words}), min_size=1, max_size=5
        ),
    },
    optional={
        "top_n": st.integers(min_value=1, max_value=7),
        "return_documents": st.booleans(),
        "truncate": st.booleans(),
    },
)


@FUZZ
@given(
    body=plausible_embeddings | plausible_reranks,
    proxied=st.booleans(),
)
async def test_fuzzed_plausible_jobs_reach_the_engines(worker, body, proxied):
    route = "/v1/rerank" if "query" in body else "/v1/embeddings"
    job = {"openai_route": route, "openai_input": body} if proxied else body
    reply = await answer_job(worker, job, job_id="fuzz")
    _check_reply(job, reply)
    if reply.ok and route == "/v1/embeddings":
        given_input = body["input"]
        count = (
            1
            if isinstance(given_input, str) or isinstance(given_input[0], int)
            else len(given_input)
        )
        assert [item["index"] for item in reply.body["data"]] == list(range(count))


async def test_the_worker_still_answers_after_fuzzing(worker):
    await _valid_job_still_answers(worker)
