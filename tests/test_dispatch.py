"""Routing of both flavours, model choice, the model list, RunPod's job wrapper, the queue bound."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from runpod.serverless.modules.rp_job import run_job

from embedding_worker import errors, operations
from embedding_worker.errors import ErrorKind
from embedding_worker.statuses import HTTP_STATUS, http_status
from embedding_worker.transports import runpod
from embedding_worker.transports.runpod import UNPARSED_JOB, answer_job, runpod_handler
from tests.helpers import bound_queue, call


async def test_standard_flavour_answers_the_body_openai_route_a_one_element_list(worker, ids):
    standard = await answer_job(worker, {"model": ids["minilm"], "input": "hello"})
    assert standard.runpod_output()["object"] == "list"
    proxied = await answer_job(
        worker,
        {
            "openai_route": "/v1/embeddings",
            "openai_input": {"model": ids["minilm"], "input": "hello"},
        },
    )
    output = proxied.runpod_output()
    assert isinstance(output, list) and len(output) == 1
    assert output[0]["data"][0]["embedding"] == standard.body["data"][0]["embedding"]


async def test_rerank_through_the_openai_route(worker, ids):
    reply = await answer_job(
        worker,
        {
            "openai_route": "/v1/rerank",
            "openai_input": {"model": ids["reranker"], "query": "q", "documents": ["a", "b"]},
        },
    )
    assert reply.status == 200 and reply.runpod_output()[0]["object"] == "rerank"


@pytest.mark.parametrize("openai_input", [None, {}])
async def test_models_list_with_roles(worker, ids, openai_input):
    job = {"openai_route": "/v1/models"}
    if openai_input is not None:
        job["openai_input"] = openai_input
    reply = await answer_job(worker, job)
    assert reply.status == 200
    body = reply.runpod_output()[0]
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == set(ids.values())
    for entry in body["data"]:
        assert entry["object"] == "model"
        assert isinstance(entry["created"], int) and isinstance(entry["owned_by"], str)
    assert by_id[ids["minilm"]]["role"] == "embed"
    assert by_id[ids["minilm"]]["dimensions"] == 384
    assert by_id[ids["minilm"]]["max_input_tokens"] == 256
    assert by_id[ids["reranker"]]["role"] == "rerank"


async def test_model_choice_by_id_trailing_part_or_the_only_capable_one(worker, ids):
    by_tail = await answer_job(worker, {"model": "all-MiniLM-L6-v2", "input": "x"})
    assert by_tail.status == 200 and by_tail.body["model"] == ids["minilm"]
    # Two embedders are served: an omitted model is ambiguous for embeddings...
    reply = await answer_job(worker, {"input": "x"})
    assert reply.status == 400 and reply.body["error"]["param"] == "model"
    assert ids["minilm"] in reply.body["error"]["message"]
    # ...but there is only one reranker.
    reply = await answer_job(worker, {"query": "q", "documents": ["a"]})
    assert reply.status == 200 and reply.body["model"] == ids["reranker"]


@pytest.mark.parametrize("name", ["no-such-model", "MiniLM", "tiny-bert"])
async def test_unknown_or_ambiguous_model_is_404_listing_served_ids(worker, ids, name):
    reply = await answer_job(worker, {"model": name, "input": "x"})
    assert reply.status == 404
    error = reply.body["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    for served in ids.values():
        assert served in error["message"]


async def test_wrong_role_is_a_clear_error(worker, ids):
    reply = await answer_job(worker, {"model": ids["reranker"], "input": "x"})
    assert reply.status == 400 and reply.body["error"]["code"] == "model_not_embedding"
    reply = await answer_job(worker, {"model": ids["minilm"], "query": "q", "documents": ["a"]})
    assert reply.status == 400 and reply.body["error"]["code"] == "model_not_reranker"


@pytest.mark.parametrize(
    "job_input, status",
    [
        (None, 400),
        ("text", 400),
        ([1, 2], 400),
        ({}, 400),
        ({"prompt": "x"}, 400),
        ({"openai_route": "/v1/chat/completions", "openai_input": {}}, 404),
        ({"openai_route": 5}, 404),
        ({"openai_route": "/v1/embeddings", "openai_input": "x"}, 400),
    ],
)
async def test_malformed_jobs_are_typed_errors(worker, job_input, status):
    reply = await answer_job(worker, job_input)
    assert reply.status == status
    assert set(reply.body["error"]) == {"message", "type", "param", "code"}


async def test_nested_extra_body_is_accepted(worker, ids):
    reply = await answer_job(
        worker,
        {
            "openai_route": "/v1/embeddings",
            "openai_input": {"model": ids["minilm"], "input": "x", "extra_body": {"dimensions": 8}},
        },
    )
    assert reply.status == 200 and len(reply.body["data"][0]["embedding"]) == 8


async def test_runpod_marks_errors_failed_with_a_string_and_keeps_serving(worker, ids):
    handler = runpod_handler(worker)
    failed = await run_job(handler, {"id": "job-1", "input": {"model": ids["minilm"], "input": ""}})
    assert set(failed) == {"error"}  # no output: the job is FAILED
    assert isinstance(failed["error"], str)
    error = json.loads(failed["error"])
    assert error["status"] == 400
    assert error["error"]["param"] == "input" and error["error"]["code"] == "invalid_input"
    done = await run_job(handler, {"id": "job-2", "input": {"model": ids["minilm"], "input": "x"}})
    assert "error" not in done and done["output"]["data"][0]["index"] == 0
    json.dumps(done)
    ranked = await run_job(
        handler, {"id": "job-3", "input": {"query": "q", "docs": ["a", "b"], "return_docs": True}}
    )
    assert ranked["output"]["results"][0]["document"]["text"] in ("a", "b")
    json.dumps(ranked)


async def test_errors_never_echo_the_payload(worker, ids):
    secret = "hf_" + "S" * 40
    reply = await answer_job(worker, {"model": ids["minilm"], "input": [secret, 5]})
    assert reply.status == 400 and secret not in json.dumps(reply.body)
    reply = await answer_job(worker, {"model": secret + "x" * 10_000, "input": "x"})
    assert reply.status in (400, 404) and len(json.dumps(reply.body)) < 2000


async def test_queue_bound_refuses_then_recovers(worker, ids, monkeypatch):
    model = worker.registry.resolve(ids["embedder"], None)
    bound_queue(monkeypatch, model, max_items=40)
    texts = ["some words to embed"] * 30
    first, second = await asyncio.gather(
        answer_job(worker, {"model": ids["embedder"], "input": texts}),
        answer_job(worker, {"model": ids["embedder"], "input": texts}),
    )
    assert first.status == 200
    assert second.status == 429
    assert (
        second.body["error"]["code"] == "queue_full"
        and "INFINITY_QUEUE_SIZE" in (second.body["error"]["message"])
    )
    assert model.pending == 0
    again = await answer_job(worker, {"model": ids["embedder"], "input": texts})
    assert again.status == 200


async def test_runpod_gets_an_async_handler_and_the_configured_concurrency(worker):
    import dataclasses
    import inspect

    from embedding_worker.dispatch import Worker
    from embedding_worker.transports.runpod import runpod_config

    limited = Worker(dataclasses.replace(worker.config, max_concurrency=17), worker.registry)
    config = runpod_config(limited)
    assert inspect.iscoroutinefunction(config["handler"])  # a sync handler would block the loop
    assert config["concurrency_modifier"](1) == 17


async def test_job_output_is_plain_json_with_a_short_repr(worker, ids):
    """runpod formats each output into DEBUG f-strings even when DEBUG is off, and prints it in a
    local test: the repr is a preview of the answer, short whatever its size."""
    reply = await answer_job(worker, {"model": ids["minilm"], "input": ["a", "b"]})
    output = reply.runpod_output()
    assert json.loads(json.dumps(output)) == reply.body  # JSON sees an ordinary dict
    shown = json.loads(repr(output))
    assert shown["model"] == ids["minilm"] and len(shown["data"]) == 2
    first = reply.body["data"][0]["embedding"]
    assert shown["data"][0]["embedding"][:4] == [round(x, 6) for x in first[:4]]
    assert shown["data"][0]["embedding"][4] == "... 384 numbers"
    assert shown["service_tier"] == "default"  # the worker's own word, shown as it is
    many = await answer_job(worker, {"model": ids["minilm"], "input": ["a"] * 200})
    assert len(repr(many.runpod_output())) < 2 * len(repr(output))
    proxied = await answer_job(
        worker,
        {"openai_route": "/v1/embeddings", "openai_input": {"model": ids["minilm"], "input": "a"}},
    )
    assert len(repr(proxied.runpod_output())) < 2 * len(repr(output))


async def test_one_model_through_the_openai_route(worker, ids):
    for name in ids.values():
        reply = await answer_job(worker, {"openai_route": f"/v1/models/{name}"})
        assert reply.status == 200 and reply.body["id"] == name
        assert reply.runpod_output()[0]["id"] == name
    missing = await answer_job(worker, {"openai_route": "/v1/models/no-such/model"})
    assert missing.status == 404 and missing.body["error"]["code"] == "model_not_found"
    bare = await answer_job(worker, {"openai_route": "/v1/models/"})  # the list, as before
    assert bare.status == 200 and bare.body["object"] == "list"


async def test_a_cohere_embed_body_is_a_standard_job_answered_as_v2(worker, ids):
    body = {
        "model": ids["minilm"],
        "texts": ["hello", "world"],
        "input_type": "search_query",
        "embedding_types": ["float", "int8"],
    }
    job = await answer_job(worker, body)
    assert job.status == 200, job.body
    route = await call(worker, "/v2/embed", body)
    assert job.body["embeddings"] == route.body["embeddings"]
    assert job.body["response_type"] == "embeddings_by_type"
    assert job.body["meta"]["api_version"] == {"version": "2"}
    assert json.loads(repr(job.runpod_output()))["response_type"] == "embeddings_by_type"


async def test_cohere_v2_rerank_bills_the_documents_under_either_key(worker, ids):
    documents = [f"document {i}" for i in range(150)]
    for key in ("documents", "docs"):
        reply = await call(
            worker,
            "/v2/rerank",
            {"model": ids["reranker"], "query": "q", key: documents, "top_n": 1},
        )
        assert reply.status == 200, reply.body
        assert reply.body["meta"] == {
            "api_version": {"version": "2"},
            "billed_units": {"search_units": 2},
        }


def test_core_errors_carry_a_kind_and_no_http_status():
    """The transports map an error's kind to their status (statuses.py): every kind has one."""
    made = [
        errors.invalid_input("x"),
        errors.too_large("x"),
        errors.not_found("x"),
        errors.overloaded("x"),
        errors.unavailable("x"),
        errors.internal(),
    ]
    assert not any(hasattr(error, "status") for error in made)
    assert set(HTTP_STATUS) == set(ErrorKind)
    assert [http_status(e) for e in made] == [400, 413, 404, 429, 503, 500]
    for error in made:
        assert error.retryable == errors.is_retryable(http_status(error))


async def test_finished_sees_every_request_with_route_model_outcome_and_time(
    worker, ids, monkeypatch
):
    seen = []
    monkeypatch.setattr(worker, "finished", seen.append)
    body = {"model": ids["minilm"], "input": "hello"}
    assert (await worker.request("/openai/v1/embeddings", body)).ok
    assert (await answer_job(worker, body)).ok  # the standard flavour: the same operation
    refused = await worker.request("/v1/embeddings", {"model": "no-such-model", "input": "a"})
    assert refused.error is not None
    unparsed = await answer_job(worker, {"nothing": "known"})
    assert not unparsed.ok
    routes = [(s.route, s.model, s.outcome) for s in seen]
    assert routes == [
        ("/v1/embeddings", ids["minilm"], "ok"),
        ("/v1/embeddings", ids["minilm"], "ok"),
        ("/v1/embeddings", "no-such-model", "model_not_found"),
        (UNPARSED_JOB, None, "invalid_input"),
    ]
    assert all(0 < s.started <= time.perf_counter() for s in seen)


async def test_routes_reach_operations_without_a_runpod_job(worker, ids, monkeypatch):
    """The operations' routes and batch lines call dispatch directly: with RunPod's job parsing
    broken, they still answer, and only jobs fail."""

    def broken(*args, **kwargs):
        raise AssertionError("a route went through a RunPod job")

    monkeypatch.setattr(runpod, "parse_job", broken)
    body = {"model": ids["minilm"], "input": "hello"}
    assert (await call(worker, "/v1/embeddings", body)).status == 200
    assert (await call(worker, "/v2/embed", {**body, "texts": ["a"]})).status == 200
    line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": body}
    answered = await worker.serve(operations.batch.OPERATION, {"batch": [line]})
    assert answered.ok, answered.error
    with pytest.raises(AssertionError):
        await answer_job(worker, body)
