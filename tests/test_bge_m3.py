"""bge-m3 models (dense, sparse and multi-vector outputs) through the worker, against
FlagEmbedding's recipe written out in plain torch (tests/bge_m3_recipe.py), to 1e-5."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from embedding_worker.config import ModelSpec, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.engines import ModelLoadError, ModelRegistry
from embedding_worker.engines.bge_m3 import BGEM3Embedder
from embedding_worker.engines.kinds import kind_of
from embedding_worker.transports.batch_files import run_batch
from embedding_worker.transports.batch_run import BatchOptions
from embedding_worker.transports.http import create_app
from embedding_worker.transports.runpod import answer_job, runpod_handler
from tests import model_factory
from tests.bge_m3_recipe import Recipe
from tests.helpers import bound_queue, call, worker_without
from tests.test_server import ServerThread

TEXTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to physical "
    "objects and is responsible for the movement of planets around the sun.",
    "Rinse the rice",
    "Paris is the capital of France, and Paris is a popular destination for tourists in Paris.",
    "no",
    "naïve café, Ærøskøbing, 東京, 🙂 and <unk>-looking text",
    "Water boils at one hundred degrees Celsius at sea level.",
]
ALL = ["dense", "sparse", "multi_vector"]


@pytest.fixture(scope="module")
def recipe(bge_m3) -> Recipe:
    return Recipe(bge_m3)


@pytest.fixture(scope="module")
def m3_id(bge_m3_worker) -> str:
    return next(m.served_id for m in bge_m3_worker.registry.models if "bge-m3" in m.served_id)


@pytest.fixture(scope="module")
def bert_id(bge_m3_worker) -> str:
    return next(m.served_id for m in bge_m3_worker.registry.models if "bert" in m.served_id)


def model_of(worker, served_id) -> BGEM3Embedder:
    model = worker.registry.resolve(served_id, None)
    assert isinstance(model, BGEM3Embedder)
    return model


# ------------------------------------------------------------------ reading answers


def as_vector(value) -> np.ndarray:
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4")
    return np.asarray(value, dtype=np.float32)


def read_answer(body):
    """(dense rows or None, sparse dicts or None, multi-vectors or None) of an answer body."""
    data = body["data"]
    assert [item["index"] for item in data] == list(range(len(data)))
    dense = sparse = multi = None
    if "embedding" in data[0]:
        dense = np.stack([as_vector(item["embedding"]) for item in data])
    if "sparse_embedding" in data[0]:
        sparse = []
        for item in data:
            entry = item["sparse_embedding"]
            assert entry["indices"] == sorted(set(entry["indices"]))
            sparse.append(dict(zip(entry["indices"], entry["values"])))
    if "multi_vector" in data[0]:
        multi = [np.stack([as_vector(v) for v in item["multi_vector"]]) for item in data]
    return dense, sparse, multi


def assert_matches_recipe(body, recipe: Recipe, texts: list[str], outputs=ALL) -> None:
    dense, sparse, multi = read_answer(body)
    want_dense, want_sparse, want_multi = recipe.encode(texts)
    assert (dense is not None) == ("dense" in outputs)
    assert (sparse is not None) == ("sparse" in outputs)
    assert (multi is not None) == ("multi_vector" in outputs)
    if dense is not None:
        np.testing.assert_allclose(dense, want_dense, rtol=0, atol=1e-5)
    if sparse is not None:
        for got, want in zip(sparse, want_sparse, strict=True):
            assert got.keys() == want.keys()
            np.testing.assert_allclose(
                [got[k] for k in want], [want[k] for k in want], rtol=0, atol=1e-5
            )
    if multi is not None:
        for got, want in zip(multi, want_multi, strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(recipe.tokens(texts))


# ------------------------------------------------------------------ the outputs, exactly


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
@pytest.mark.parametrize(
    "outputs", [ALL, ["sparse"], ["multi_vector"], ["dense", "sparse"], ["dense"]]
)
async def test_outputs_match_the_recipe_across_batches(
    bge_m3_worker, m3_id, recipe, outputs, encoding_format
):
    body = {"model": m3_id, "input": TEXTS, "output": outputs, "encoding_format": encoding_format}
    reply = await answer_job(bge_m3_worker, body)
    assert reply.status == 200, reply.body
    assert_matches_recipe(reply.body, recipe, TEXTS, outputs)
    if encoding_format == "base64" and "multi_vector" in outputs:
        assert all(isinstance(v, str) for v in reply.body["data"][0]["multi_vector"])
    json.dumps(reply.body)


async def test_without_output_the_answer_is_openais_dense_shape(bge_m3_worker, m3_id, recipe):
    reply = await answer_job(bge_m3_worker, {"model": m3_id, "input": TEXTS[:2]})
    assert reply.status == 200
    assert [set(item) for item in reply.body["data"]] == [{"object", "embedding", "index"}] * 2
    np.testing.assert_allclose(read_answer(reply.body)[0], recipe.encode(TEXTS[:2])[0], atol=1e-5)


async def test_one_output_may_be_named_alone(bge_m3_worker, m3_id, recipe):
    reply = await answer_job(bge_m3_worker, {"model": m3_id, "input": "Rinse", "output": "sparse"})
    assert reply.status == 200
    assert set(reply.body["data"][0]) == {"object", "sparse_embedding", "index"}


async def test_sparse_drops_special_and_unknown_tokens_and_keeps_one_entry_an_id(
    bge_m3_worker, m3_id, recipe
):
    model = model_of(bge_m3_worker, m3_id)
    assert set(model.unweighted_ids.tolist()) == {0, 1, 2, 3}  # <s>, <pad>, </s>, <unk>
    unknown, repeated = TEXTS[5], TEXTS[3]  # outside the tiny vocabulary; "Paris" three times
    assert recipe.tokenizer.unk_token_id in recipe.tokenizer(unknown)["input_ids"]
    paris = recipe.tokenizer("Paris", add_special_tokens=False)["input_ids"][-1]
    assert recipe.tokenizer(repeated)["input_ids"].count(paris) >= 3
    reply = await answer_job(
        bge_m3_worker, {"model": m3_id, "input": [unknown, repeated], "output": ALL}
    )
    [first, second] = [item["sparse_embedding"]["indices"] for item in reply.body["data"]]
    assert not set(first) & {0, 1, 2, 3}
    assert second.count(paris) <= 1
    assert_matches_recipe(reply.body, recipe, [unknown, repeated])


async def test_return_tokens_gives_each_ids_string_as_the_tokenizer_decodes_it(
    bge_m3_worker, m3_id, recipe
):
    reply = await answer_job(
        bge_m3_worker,
        {"model": m3_id, "input": TEXTS[:3], "output": ["sparse"], "return_tokens": True},
    )
    for item in reply.body["data"]:
        entry = item["sparse_embedding"]
        assert entry["tokens"] == [recipe.tokenizer.decode([i]) for i in entry["indices"]]
        assert len(entry["tokens"]) == len(entry["values"])


async def test_dimensions_and_embedding_types_shape_the_dense_output_alone(
    bge_m3_worker, m3_id, recipe
):
    body = {"model": m3_id, "input": TEXTS[:2], "output": ALL, "dimensions": 8}
    reply = await answer_job(bge_m3_worker, {**body, "embedding_types": ["int8", "float"]})
    assert reply.status == 200, reply.body
    item = reply.body["data"][0]
    assert set(item["embedding"]) == {"int8", "float"} and len(item["embedding"]["float"]) == 8
    cut = recipe.encode(TEXTS[:1])[0][0, :8]
    np.testing.assert_allclose(item["embedding"]["float"], cut / np.linalg.norm(cut), atol=1e-5)
    assert len(item["multi_vector"][0]) == 32


async def test_truncation_follows_the_recipe(tmp_path):
    path = model_factory.make_bge_m3(tmp_path / "bge-m3-16", max_length=16)
    worker = Worker.from_config(load_config({"MODEL_NAMES": str(path), "DTYPES": "float32"}))
    try:
        texts = [TEXTS[1], TEXTS[0]]
        reply = await answer_job(worker, {"input": texts, "output": ALL})
        assert reply.status == 200, reply.body
        recipe = Recipe(path, max_length=16)
        assert recipe.tokens(texts)[0] == 16
        assert_matches_recipe(reply.body, recipe, texts)
        refused = await answer_job(worker, {"input": texts, "output": ALL, "truncate": False})
        assert refused.status == 400 and refused.body["error"]["code"] == "context_length_exceeded"
    finally:
        await worker.stop()


async def test_the_worker_s_token_ids_are_reused_and_equal_the_recipe_s(bge_m3_worker, m3_id):
    model = model_of(bge_m3_worker, m3_id)
    assert model.reuses_token_ids
    texts, _ = model.tokens.tokenize(TEXTS)
    assert [t.ids.tolist() for t in texts] == model._tokenize_texts(TEXTS)


async def test_with_reuse_off_the_worker_thread_tokenizes_and_answers_the_same(bge_m3, recipe):
    worker = worker_without(
        {"MODEL_NAMES": str(bge_m3), "BATCH_SIZES": "3", "DTYPES": "float32"},
        reuse_token_ids=False,
    )
    await worker.start()
    try:
        model = worker.registry.models[0]
        assert isinstance(model, BGEM3Embedder) and not model.reuses_token_ids
        assert model.tokens.model_input is None
        reply = await answer_job(worker, {"model": model.served_id, "input": TEXTS, "output": ALL})
        assert reply.status == 200, reply.body
        assert_matches_recipe(reply.body, recipe, TEXTS)
    finally:
        await worker.stop()


# ------------------------------------------------------------------ every transport


def _base64(body):
    return {**body, "encoding_format": "base64"}


async def test_both_runpod_flavours_through_the_handler(bge_m3_worker, m3_id, recipe):
    handler = runpod_handler(bge_m3_worker)
    body = {"model": m3_id, "input": TEXTS, "output": ALL, "encoding_format": "base64"}
    standard = await handler({"id": "job-1", "input": body})
    assert_matches_recipe(standard, recipe, TEXTS)
    [proxied] = await handler(
        {"id": "job-2", "input": {"openai_route": "/v1/embeddings", "openai_input": body}}
    )
    assert_matches_recipe(proxied, recipe, TEXTS)
    extra = {"model": m3_id, "input": TEXTS, "extra_body": {"output": ALL}}
    [nested] = await handler({"input": {"openai_route": "/v1/embeddings", "openai_input": extra}})
    assert_matches_recipe(nested, recipe, TEXTS)
    json.dumps([standard, proxied])


def test_the_local_server_over_http(bge_m3, bert_embedder, recipe):
    worker = Worker.from_config(
        load_config({"MODEL_NAMES": f"{bge_m3};{bert_embedder}", "DTYPES": "float32"})
    )
    m3 = next(m.served_id for m in worker.registry.models if "bge-m3" in m.served_id)
    body = {"model": m3, "input": TEXTS, "output": ALL, "return_tokens": True}
    with ServerThread(create_app(worker)) as server, httpx.Client(base_url=server.url) as http:
        for path in ("/v1/embeddings", "/openai/v1/embeddings", "/embeddings"):
            answer = http.post(path, json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            assert_matches_recipe(answer.json(), recipe, TEXTS)
        run = http.post("/runsync", json={"input": _base64(body)}, timeout=60).json()
        assert run["status"] == "COMPLETED"
        assert_matches_recipe(run["output"], recipe, TEXTS)
        models = http.get("/v1/models").json()["data"]
        outputs = {m["id"]: m.get("output") for m in models}
        assert outputs[m3] == ALL and next(v for k, v in outputs.items() if k != m3) is None
        refused = http.post("/v1/embeddings", json={**body, "output": ["sparse", "lexical"]})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "output"
        # The openai SDK (base64 by default) keeps the extra outputs on each item.
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        answer = client.embeddings.create(
            model=m3, input=TEXTS, extra_body={"output": ALL, "return_tokens": True}
        )
        want_dense, want_sparse, want_multi = recipe.encode(TEXTS)
        np.testing.assert_allclose([d.embedding for d in answer.data], want_dense, atol=1e-5)
        for item, sparse, multi in zip(answer.data, want_sparse, want_multi):
            entry = item.model_extra["sparse_embedding"]
            assert entry["indices"] == sorted(sparse) and len(entry["tokens"]) == len(sparse)
            vectors = np.stack([as_vector(v) for v in item.model_extra["multi_vector"]])
            np.testing.assert_allclose(vectors, multi, atol=1e-5)


async def test_batch_file_lines_match_single_requests(bge_m3_worker, m3_id, recipe, tmp_path):
    source = tmp_path / "lines.jsonl"
    bodies = [
        {"model": m3_id, "input": TEXTS[i : i + 2], "output": ALL, "encoding_format": "base64"}
        for i in range(0, len(TEXTS), 2)
    ]
    lines = [
        {"custom_id": f"m3-{i}", "method": "POST", "url": "/v1/embeddings", "body": body}
        for i, body in enumerate(bodies)
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "results.jsonl"
    options = BatchOptions(
        input=source, output=output, text=False, defaults={}, progress=False, backoff_s=0.01
    )
    await run_batch(bge_m3_worker, options)
    answers = {}
    for raw in output.read_text().splitlines():
        line = json.loads(raw)
        answers[line["custom_id"]] = line["response"]
    for i, body in enumerate(bodies):
        response = answers[f"m3-{i}"]
        assert response["status_code"] == 200
        assert_matches_recipe(response["body"], recipe, body["input"])
    # The RunPod batch job answers the same lines.
    job = await answer_job(bge_m3_worker, {"batch": lines})
    assert job.status == 200
    for line, answer in zip(lines, job.body["data"]):
        assert_matches_recipe(answer["response"]["body"], recipe, line["body"]["input"])


async def test_cohere_embed_serves_the_dense_output(bge_m3_worker, m3_id, recipe):
    reply = await call(bge_m3_worker, "/v2/embed", {"model": m3_id, "texts": TEXTS[:3]})
    assert reply.status == 200, reply.body
    got = np.array(reply.body["embeddings"]["float"], dtype=np.float32)
    np.testing.assert_allclose(got, recipe.encode(TEXTS[:3])[0], atol=1e-5)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"output": ["sparse", "lexical"]}, "output"),
        ({"output": []}, "output"),
        ({"output": 3}, "output"),
        ({"output": ["dense"], "return_tokens": True}, "return_tokens"),
        ({"output": ["sparse"], "return_tokens": "yes"}, "return_tokens"),
        ({"output": ["multi_vector"], "embedding_types": ["int8"]}, "embedding_types"),
    ],
)
async def test_bad_fields_are_typed_errors(bge_m3_worker, m3_id, extra, param):
    reply = await answer_job(bge_m3_worker, {"model": m3_id, "input": "x", **extra})
    assert reply.status == 400
    assert reply.body["error"]["code"] == "invalid_input" and reply.body["error"]["param"] == param
    assert "'x'" not in reply.body["error"]["message"]


@pytest.mark.parametrize("output", [["sparse"], ["multi_vector"], ["dense", "sparse"]])
async def test_sparse_or_multi_vector_of_a_dense_only_model_is_a_typed_error(
    bge_m3_worker, bert_id, output
):
    reply = await answer_job(bge_m3_worker, {"model": bert_id, "input": "x", "output": output})
    assert reply.status == 400
    error = reply.body["error"]
    assert error["code"] == "invalid_input" and error["param"] == "output"
    assert "has no" in error["message"] and "bge-m3" in error["message"]
    dense = await answer_job(bge_m3_worker, {"model": bert_id, "input": "x", "output": ["dense"]})
    assert dense.status == 200


async def test_an_answer_too_large_is_refused_before_the_model_runs(bge_m3, monkeypatch):
    env = {"MODEL_NAMES": str(bge_m3), "DTYPES": "float32", "MAX_RESPONSE_BYTES": "20000"}
    worker = Worker.from_config(load_config(env))
    model = worker.registry.models[0]
    called = []
    monkeypatch.setattr(model, "_forward_items", lambda items: called.append(items))
    try:
        texts = [TEXTS[1]] * 4  # 4 x 31 tokens: 120 vectors of 32 numbers
        reply = await answer_job(worker, {"input": texts, "output": ["multi_vector"]})
        assert reply.status == 413 and reply.body["error"]["code"] == "response_too_large"
        assert "base64" in reply.body["error"]["message"] and not called
    finally:
        await worker.stop()


# ------------------------------------------------------------------ batching, bounds, faults


async def test_concurrent_requests_share_batches_off_the_event_loop(
    bge_m3_worker, m3_id, recipe, monkeypatch
):
    model = model_of(bge_m3_worker, m3_id)
    batches: list[int] = []
    threads: set[threading.Thread] = set()
    forward = model._forward_items

    def spy(items):
        batches.append(len(items))
        threads.add(threading.current_thread())
        return forward(items)

    monkeypatch.setattr(model, "_forward_items", spy)
    requests = [
        {"model": m3_id, "input": TEXTS[i : i + 2], "output": outputs}
        for i, outputs in zip(range(6), [ALL, ["sparse"], ["dense"], ["multi_vector"]] * 2)
    ]
    replies = await asyncio.gather(*(answer_job(bge_m3_worker, r) for r in requests))
    for request, reply in zip(requests, replies):
        assert reply.status == 200, reply.body
        assert_matches_recipe(reply.body, recipe, request["input"], request["output"])
    # 12 texts from 6 requests of 2, in full batches of 3: texts of different requests share them.
    assert batches == [3, 3, 3, 3]
    assert threading.main_thread() not in threads and len(threads) == 1


async def test_the_queue_bound_refuses_with_429(bge_m3_worker, m3_id, monkeypatch):
    model = model_of(bge_m3_worker, m3_id)
    bound_queue(monkeypatch, model, max_items=3)
    body = {"model": m3_id, "input": TEXTS[:2], "output": ALL}
    first, second = await asyncio.gather(
        answer_job(bge_m3_worker, body), answer_job(bge_m3_worker, body)
    )
    assert first.status == 200
    assert second.status == 429 and second.body["error"]["code"] == "queue_full"
    assert model.pending == 0


async def test_a_failing_batch_fails_its_requests_and_the_model_keeps_serving(
    bge_m3_worker, m3_id, recipe, monkeypatch
):
    model = model_of(bge_m3_worker, m3_id)
    forward = model._forward_items
    calls = []

    def fail_once(items):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return forward(items)

    monkeypatch.setattr(model, "_forward_items", fail_once)
    reply = await answer_job(bge_m3_worker, {"model": m3_id, "input": TEXTS[:2], "output": ALL})
    assert reply.status == 500 and reply.body["error"]["code"] == "internal_error"
    reply = await answer_job(bge_m3_worker, {"model": m3_id, "input": TEXTS, "output": ALL})
    assert_matches_recipe(reply.body, recipe, TEXTS)
    assert bge_m3_worker.healthy


async def test_a_stalled_model_answers_503_within_the_timeout(bge_m3, monkeypatch):
    env = {
        "MODEL_NAMES": str(bge_m3),
        "DTYPES": "float32",
        "REQUEST_TIMEOUT": "1",
        "ENGINE_STALL_TIMEOUT": "0.5",
    }
    worker = Worker.from_config(load_config(env))
    model = worker.registry.models[0]
    release = threading.Event()
    forward = model._forward_items

    def stalled(items):
        release.wait(30)
        return forward(items)

    monkeypatch.setattr(model, "_forward_items", stalled)
    try:
        started = time.monotonic()
        reply = await answer_job(worker, {"input": TEXTS[:2], "output": ["sparse"]})
        assert 1 <= time.monotonic() - started < 10
        assert reply.status == 503 and reply.body["error"]["code"] == "timeout"
        assert reply.refresh_worker and not worker.healthy and model.pending == 0
    finally:
        release.set()
        await worker.stop()


# ------------------------------------------------------------------ detection and MODEL_KINDS


def test_detection_from_the_model_files(bge_m3, bert_embedder, qwen3_embedder, tmp_path):
    def kind(path, forced="auto"):
        return kind_of(ModelSpec(source=str(path), served_id="x", kind=forced), False).name

    one_head = tmp_path / "one-head"
    shutil.copytree(bge_m3, one_head)
    (one_head / "colbert_linear.pt").unlink()
    assert kind(bge_m3) == "bge-m3"
    assert kind(one_head) == "infinity"
    assert kind(bert_embedder) == "infinity"
    assert kind(qwen3_embedder) == "infinity"
    assert kind(bge_m3, "infinity") == "infinity"


async def test_model_kinds_infinity_serves_the_same_dense_vectors(bge_m3, recipe):
    config = load_config(
        {"MODEL_NAMES": str(bge_m3), "MODEL_KINDS": "infinity", "DTYPES": "float32"}
    )
    worker = Worker(config, ModelRegistry.load(config.models, config.engine_settings))
    try:
        reply = await answer_job(worker, {"input": TEXTS})
        assert reply.status == 200
        np.testing.assert_allclose(read_answer(reply.body)[0], recipe.encode(TEXTS)[0], atol=1e-5)
        refused = await answer_job(worker, {"input": TEXTS, "output": ["sparse"]})
        assert refused.status == 400 and refused.body["error"]["param"] == "output"
    finally:
        await worker.stop()


def test_forcing_bge_m3_on_a_model_without_its_heads_is_a_named_load_error(bert_embedder):
    config = load_config({"MODEL_NAMES": str(bert_embedder), "MODEL_KINDS": "bge-m3"})
    with pytest.raises(ModelLoadError, match="tiny-bert-embedder.*no sparse_linear.pt"):
        ModelRegistry.load(config.models, config.engine_settings)


def test_int8_is_refused_for_bge_m3(bge_m3):
    config = load_config({"MODEL_NAMES": str(bge_m3), "DTYPES": "int8"})
    with pytest.raises(ModelLoadError, match="tiny-bge-m3.*dtype 'int8'"):
        ModelRegistry.load(config.models, config.engine_settings)
