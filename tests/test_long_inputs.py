"""Long inputs (`long_inputs`), late chunking (`late_chunking`) and contextualized chunk
embeddings (/v1/contextualizedembeddings), held to the recipe written with plain transformers on
token ids (tests/long_inputs_recipe.py), on MiniLM and on tiny mean, CLS and last-token models."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import numpy as np
import openai
import pytest

from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.encoding import quantize
from embedding_worker.engines import Health, ModelRegistry
from embedding_worker.env import ConfigError
from embedding_worker.transports import runpod
from embedding_worker.transports.batch_files import run_batch
from embedding_worker.transports.batch_run import BatchOptions
from embedding_worker.transports.http import create_app
from embedding_worker.transports.runpod import answer_job, runpod_handler
from tests import model_factory
from tests.helpers import call, decode_vectors
from tests.long_inputs_recipe import Recipe
from tests.test_server import ServerThread

MAX = 24  # the tiny models' maximum, special tokens included: a few sentences span windows

WORDS = (
    "the river carries cold water past the old mill while children count boats and a dog "
    "sleeps under the bridge near seven green houses"
).split()


def text_of(words: int, shift: int = 0) -> str:
    return " ".join(WORDS[(i + shift) % len(WORDS)] for i in range(words))


CONTEXT_ROUTE = "/v1/contextualizedembeddings"


@pytest.fixture(scope="module")
def tiny_paths(models_dir):
    return {
        "mean": model_factory.make_bert_embedder(
            models_dir / "long-mean", max_seq_length=MAX, seed=3
        ),
        "cls": model_factory.make_bert_embedder(
            models_dir / "long-cls", max_seq_length=MAX, seed=4, pooling="cls"
        ),
        "lasttoken": model_factory.make_qwen3_embedder(
            models_dir / "long-last", max_seq_length=MAX, seed=5
        ),
    }


@pytest.fixture(scope="module")
async def tiny_worker(tiny_paths):
    """The three tiny models; batch size 2, so that windows span several batches. The mean
    model chunks by default (LONG_INPUTS), the others truncate."""
    env = {
        "MODEL_NAMES": ";".join(str(tiny_paths[k]) for k in ("mean", "cls", "lasttoken")),
        "BATCH_SIZES": "2",
        "DTYPES": "float32",
        "LONG_INPUTS": "chunk;truncate;truncate",
    }
    worker = Worker.from_config(load_config(env))
    await worker.start()
    yield worker
    await worker.stop()


@pytest.fixture(scope="module")
def tiny_ids(tiny_worker):
    tails = {"long-mean": "mean", "long-cls": "cls", "long-last": "lasttoken"}
    return {tails[m.served_id.rsplit("/", 1)[-1]]: m.served_id for m in tiny_worker.registry.models}


@pytest.fixture(scope="module")
def tiny_recipes(tiny_paths):
    return {kind: Recipe(path, MAX, kind) for kind, path in tiny_paths.items()}


@pytest.fixture(scope="module")
def minilm_recipe(minilm_path):
    return Recipe(minilm_path, 256, "mean")


async def embed(worker, **body):
    body.setdefault("model", DEFAULT_MODEL_ID)  # the shared worker serves several embedders
    reply = await answer_job(worker, body)
    assert reply.status == 200, reply.body
    return decode_vectors(reply.body), reply.body["usage"]["total_tokens"]


async def refused(worker, body, route=None):
    body = {"model": DEFAULT_MODEL_ID, **body}
    reply = await (call(worker, route, body) if route else answer_job(worker, body))
    assert reply.status == 400, reply.body
    return reply.body["error"]


# ------------------------------------------------------------------ chunked long inputs


async def test_minilm_chunks_long_texts_as_the_recipe_and_counts_every_window(
    worker, minilm_recipe
):
    texts = [text_of(600), text_of(300, 5), "a short one"]
    got, tokens = await embed(worker, model=DEFAULT_MODEL_ID, input=texts, long_inputs="chunk")
    want = [minilm_recipe.chunked(text) for text in texts]
    np.testing.assert_allclose(got, np.stack([v for v, _ in want]), atol=1e-5)
    assert tokens == sum(n for _, n in want)
    assert tokens > 600 + 300  # the special tokens of every window count


@pytest.mark.parametrize("kind", ["mean", "cls", "lasttoken"])
async def test_every_pooling_chunks_as_the_recipe(tiny_worker, tiny_ids, tiny_recipes, kind):
    recipe = tiny_recipes[kind]
    texts = [text_of(70), text_of(5), text_of(45, 3), text_of(MAX - 2, 1)]
    got, tokens = await embed(tiny_worker, model=tiny_ids[kind], input=texts, long_inputs="chunk")
    want = [recipe.chunked(text) for text in texts]
    np.testing.assert_allclose(got, np.stack([v for v, _ in want]), atol=1e-5)
    assert tokens == sum(n for _, n in want)


async def test_texts_within_the_maximum_answer_as_without_chunking(worker):
    texts = ["one sentence", "another, a little longer sentence"]
    plain, plain_tokens = await embed(worker, input=texts)
    chunked, chunked_tokens = await embed(worker, input=texts, long_inputs="chunk")
    np.testing.assert_array_equal(plain, chunked)
    assert plain_tokens == chunked_tokens


async def test_truncate_stays_the_default_and_keeps_the_first_window(worker, minilm_recipe):
    text = text_of(600)
    got, tokens = await embed(worker, input=text)
    first = minilm_recipe.windows(minilm_recipe.content_ids(text))[0]
    want = minilm_recipe.pooled(first)
    np.testing.assert_allclose(got[0], want / np.linalg.norm(want), atol=1e-5)
    assert tokens == 256


async def test_the_model_s_long_inputs_setting_is_the_default_a_request_overrides(
    tiny_worker, tiny_ids, tiny_recipes
):
    text = text_of(70)
    by_default, _ = await embed(tiny_worker, model=tiny_ids["mean"], input=text)
    np.testing.assert_allclose(by_default[0], tiny_recipes["mean"].chunked(text)[0], atol=1e-5)
    cut, tokens = await embed(
        tiny_worker, model=tiny_ids["mean"], input=text, long_inputs="truncate"
    )
    assert tokens == MAX and not np.allclose(cut, by_default, atol=1e-4)
    error = await refused(
        tiny_worker, {"model": tiny_ids["mean"], "input": text, "truncate": False}
    )
    assert error["code"] == "context_length_exceeded"
    truncated_model, _ = await embed(tiny_worker, model=tiny_ids["cls"], input=text)
    chunked, _ = await embed(tiny_worker, model=tiny_ids["cls"], input=text, long_inputs="chunk")
    assert not np.allclose(truncated_model, chunked, atol=1e-4)


@pytest.mark.parametrize("extra", [{"long_inputs": "error"}, {"truncate": False}])
async def test_error_refuses_an_over_long_text(worker, extra):
    error = await refused(worker, {"input": ["fine", text_of(600)], **extra})
    assert error["code"] == "context_length_exceeded" and error["param"] == "input"
    assert "item 1" in error["message"]


async def test_max_input_tokens_bounds_a_chunked_text(worker):
    error = await refused(worker, {"input": "word " * 33_000, "long_inputs": "chunk"})
    assert error["code"] == "context_length_exceeded" and "MAX_INPUT_TOKENS" in error["message"]


async def test_max_request_tokens_counts_the_windows(tiny_paths):
    env = {"MODEL_NAMES": str(tiny_paths["mean"]), "DTYPES": "float32"}
    env["MAX_REQUEST_TOKENS"] = "100"
    worker = Worker.from_config(load_config(env))
    await worker.start()
    try:
        # 80 content tokens fit in 100, but four windows add eight special tokens.
        served = worker.registry.models[0].served_id
        body = {"model": served, "input": text_of(96), "long_inputs": "chunk"}
        error = await refused(worker, body)
        assert error["code"] == "request_too_large"
    finally:
        await worker.stop()


async def test_an_unknown_mode_is_refused_naming_the_field(worker):
    error = await refused(worker, {"input": "x", "long_inputs": "split"})
    assert error["param"] == "long_inputs"


def test_long_inputs_is_read_per_model():
    names = f"{DEFAULT_MODEL_ID};other/model"
    config = load_config({"MODEL_NAMES": names, "LONG_INPUTS": "chunk;error"})
    assert [m.long_inputs for m in config.models] == ["chunk", "error"]
    assert load_config({}).models[0].long_inputs == "truncate"
    assert load_config({"MAX_INPUT_TOKENS": "1000"}).limits.max_input_tokens == 1000
    with pytest.raises(ConfigError, match="LONG_INPUTS"):
        load_config({"LONG_INPUTS": "split"})


# ------------------------------------------------------------------ late chunking


async def test_minilm_late_chunking_matches_the_recipe(worker, minilm_recipe):
    chunks = [text_of(40), text_of(25, 4), text_of(60, 9)]
    got, tokens = await embed(worker, input=chunks, late_chunking=True)
    want, want_tokens = minilm_recipe.late_chunked(chunks)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert tokens == want_tokens == 40 + 25 + 60 + 2


async def test_a_document_over_the_maximum_runs_in_consecutive_windows(
    tiny_worker, tiny_ids, tiny_recipes
):
    # Chunks cross window boundaries; every chunk still pools its own tokens only.
    chunks = [text_of(9), text_of(30, 2), text_of(4, 6), text_of(25, 1)]
    got, tokens = await embed(tiny_worker, model=tiny_ids["mean"], input=chunks, late_chunking=True)
    want, want_tokens = tiny_recipes["mean"].late_chunked(chunks)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert tokens == want_tokens
    alone, _ = await embed(tiny_worker, model=tiny_ids["mean"], input=chunks[2])
    assert not np.allclose(got[2], alone[0], atol=1e-3)  # the context changed the chunk's vector


@pytest.mark.parametrize("kind, pooling", [("cls", "cls"), ("lasttoken", "lasttoken")])
async def test_late_chunking_refuses_a_model_that_is_not_mean_pooled(
    tiny_worker, tiny_ids, kind, pooling
):
    error = await refused(
        tiny_worker, {"model": tiny_ids[kind], "input": ["a", "b"], "late_chunking": True}
    )
    assert error["code"] == "invalid_input" and error["param"] == "late_chunking"
    assert pooling in error["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": [[1, 2, 3]]}, "input"),
        ({"input": ["a", "   "]}, "input"),
        ({"input": ["a"], "output": "sparse"}, "output"),
        ({"input": ["a"], "dimensions": 999}, "dimensions"),
    ],
)
async def test_late_chunking_refuses_what_it_cannot_embed(worker, body, param):
    error = await refused(worker, {**body, "late_chunking": True})
    assert error["param"] == param


# ------------------------------------------------------------------ contextualized embeddings


def nested_vectors(body) -> list[np.ndarray]:
    assert body["object"] == "list"
    documents = []
    for i, document in enumerate(body["data"]):
        assert document["index"] == i and document["object"] == "list"
        rows = []
        for j, item in enumerate(document["data"]):
            assert item["index"] == j and item["object"] == "embedding"
            value = item["embedding"]
            if isinstance(value, str):
                rows.append(np.frombuffer(base64.b64decode(value), "<f4"))
            else:
                rows.append(np.asarray(value, np.float32))
        documents.append(np.stack(rows))
    return documents


DOCUMENTS = [[text_of(30), text_of(12, 3)], [text_of(50, 7)], [text_of(8, 1), "x", text_of(20)]]


async def test_contextualized_embeddings_late_chunk_each_document(worker, minilm_recipe):
    reply = await call(worker, CONTEXT_ROUTE, {"model": DEFAULT_MODEL_ID, "inputs": DOCUMENTS})
    assert reply.status == 200, reply.body
    got = nested_vectors(reply.body)
    want = [minilm_recipe.late_chunked(document) for document in DOCUMENTS]
    for vectors, (expected, _) in zip(got, want):
        np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert reply.body["usage"]["total_tokens"] == sum(n for _, n in want)
    assert reply.body["model"] == DEFAULT_MODEL_ID


async def test_output_dimension_dtype_and_base64(worker, minilm_recipe):
    want = [minilm_recipe.late_chunked(document)[0][:, :64] for document in DOCUMENTS]
    want = [w / np.linalg.norm(w, axis=1, keepdims=True) for w in want]
    body = {
        "model": DEFAULT_MODEL_ID,
        "inputs": DOCUMENTS,
        "output_dimension": 64,
        "encoding_format": "base64",
    }
    reply = await call(worker, CONTEXT_ROUTE, body)
    for vectors, expected in zip(nested_vectors(reply.body), want):
        np.testing.assert_allclose(vectors, expected, atol=1e-5)
    int8 = await call(
        worker, CONTEXT_ROUTE, {**body, "output_dtype": "int8", "encoding_format": None}
    )
    floats = nested_vectors(reply.body)
    for document, vectors in zip(int8.body["data"], floats):
        got = np.array([item["embedding"] for item in document["data"]])
        assert np.abs(got - quantize(vectors, "int8")).max() <= 1
    binary = await call(worker, CONTEXT_ROUTE, {**body, "output_dtype": "ubinary"})
    packed = np.frombuffer(base64.b64decode(binary.body["data"][0]["data"][0]["embedding"]), "u1")
    np.testing.assert_array_equal(packed, quantize(floats[0][:1], "ubinary")[0])


@pytest.mark.parametrize(
    "body, code",
    [
        ({"inputs": ["not a list"]}, "invalid_input"),
        ({"inputs": [[]]}, "invalid_input"),
        ({"inputs": [["a", ""]]}, "invalid_input"),
        ({"inputs": [["a"]] * 2049}, "invalid_input"),
        ({"inputs": [["a"] * 1500, ["b"] * 600]}, "invalid_input"),
        ({"inputs": [["word " * 33_000]]}, "context_length_exceeded"),
        ({"inputs": [["a"]], "output_dimension": 999}, "invalid_input"),
        ({"inputs": [["a"]], "output_dtype": "float16"}, "invalid_input"),
    ],
)
async def test_contextualized_bounds_and_typed_errors(worker, body, code):
    error = await refused(worker, body, CONTEXT_ROUTE)
    assert error["code"] == code


async def test_contextualized_refuses_a_model_that_is_not_mean_pooled(tiny_worker, tiny_ids):
    body = {"model": tiny_ids["lasttoken"], "inputs": [["a", "b"]]}
    error = await refused(tiny_worker, body, CONTEXT_ROUTE)
    assert "lasttoken" in error["message"]


def test_a_standard_flavour_job_holding_inputs_is_contextualized():
    registry = ModelRegistry([], Health())
    assert runpod.recognise({"inputs": [["a", "b"]]}, registry).route == CONTEXT_ROUTE
    assert runpod.recognise({"input": ["a", "b"]}, registry).route == "/v1/embeddings"


# ------------------------------------------------------------------ transports


async def test_both_runpod_flavours(worker, minilm_recipe):
    handler = runpod_handler(worker)
    want = [minilm_recipe.late_chunked(document)[0] for document in DOCUMENTS]
    standard = await handler(
        {"id": "job-1", "input": {"model": DEFAULT_MODEL_ID, "inputs": DOCUMENTS}}
    )
    [proxied] = await handler(
        {
            "id": "job-2",
            "input": {
                "openai_route": CONTEXT_ROUTE,
                "openai_input": {"model": DEFAULT_MODEL_ID, "inputs": DOCUMENTS},
            },
        }
    )
    for answer in (standard, proxied):
        for vectors, expected in zip(nested_vectors(answer), want):
            np.testing.assert_allclose(vectors, expected, atol=1e-5)
    text = text_of(600)
    chunked = minilm_recipe.chunked(text)[0]
    body = {"model": DEFAULT_MODEL_ID, "input": text, "long_inputs": "chunk"}
    standard = await handler({"input": body})
    [proxied] = await handler({"input": {"openai_route": "/v1/embeddings", "openai_input": body}})
    late = {"model": DEFAULT_MODEL_ID, "input": DOCUMENTS[0], "extra_body": {"late_chunking": True}}
    [nested] = await handler({"input": {"openai_route": "/v1/embeddings", "openai_input": late}})
    np.testing.assert_allclose(decode_vectors(standard)[0], chunked, atol=1e-5)
    np.testing.assert_allclose(decode_vectors(proxied)[0], chunked, atol=1e-5)
    np.testing.assert_allclose(decode_vectors(nested), want[0], atol=1e-5)
    json.dumps([standard, proxied, nested])


def test_the_local_server_over_http(tiny_paths, tiny_recipes):
    worker = Worker.from_config(
        load_config({"MODEL_NAMES": str(tiny_paths["mean"]), "DTYPES": "float32"})
    )
    recipe = tiny_recipes["mean"]
    text = text_of(70)
    with ServerThread(create_app(worker)) as server, httpx.Client(base_url=server.url) as http:
        for path in (CONTEXT_ROUTE, "/openai" + CONTEXT_ROUTE):
            answer = http.post(path, json={"inputs": DOCUMENTS}, timeout=60)
            assert answer.status_code == 200, answer.text
            for vectors, document in zip(nested_vectors(answer.json()), DOCUMENTS):
                np.testing.assert_allclose(vectors, recipe.late_chunked(document)[0], atol=1e-5)
        bad = http.post(CONTEXT_ROUTE, json={"inputs": "x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "inputs"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        chunked = client.embeddings.create(
            model=worker.registry.models[0].served_id,
            input=[text],
            extra_body={"long_inputs": "chunk"},
        )
        np.testing.assert_allclose(chunked.data[0].embedding, recipe.chunked(text)[0], atol=1e-5)
        assert chunked.usage.total_tokens == recipe.chunked(text)[1]
        late = client.embeddings.create(
            model=worker.registry.models[0].served_id,
            input=DOCUMENTS[0],
            extra_body={"late_chunking": True},
        )
        got = np.array([item.embedding for item in late.data])
        np.testing.assert_allclose(got, recipe.late_chunked(DOCUMENTS[0])[0], atol=1e-5)


async def test_batch_lines(worker, minilm_recipe, tmp_path):
    text = text_of(600)
    lines = [
        {
            "custom_id": "ctx",
            "method": "POST",
            "url": CONTEXT_ROUTE,
            "body": {"model": DEFAULT_MODEL_ID, "inputs": DOCUMENTS},
        },
        {
            "custom_id": "long",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": DEFAULT_MODEL_ID, "input": text, "long_inputs": "chunk"},
        },
    ]
    source = tmp_path / "lines.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "results.jsonl"
    options = BatchOptions(
        input=source, output=output, text=False, defaults={}, progress=False, backoff_s=0.01
    )
    await run_batch(worker, options)
    answers = {}
    for raw in output.read_text().splitlines():
        line = json.loads(raw)
        answers[line["custom_id"]] = line["response"]
    assert answers["ctx"]["status_code"] == 200 and answers["long"]["status_code"] == 200
    for vectors, document in zip(nested_vectors(answers["ctx"]["body"]), DOCUMENTS):
        np.testing.assert_allclose(vectors, minilm_recipe.late_chunked(document)[0], atol=1e-5)
    got = decode_vectors(answers["long"]["body"])[0]
    np.testing.assert_allclose(got, minilm_recipe.chunked(text)[0], atol=1e-5)
    job = await answer_job(worker, {"batch": lines})
    assert job.status == 200
    assert [a["response"]["status_code"] for a in job.body["data"]] == [200, 200]


# --------------------------------------------------------------------------- the pass's scheduler


def _passes_of(monkeypatch, model, seconds: float = 0.0) -> list[int]:
    """The size of each forward pass of the model's token pass, in order; each takes `seconds`
    longer."""
    run = model.token_pass
    forward = run._forward_items
    sizes: list[int] = []

    def counted(items):
        sizes.append(len(items))
        time.sleep(seconds)
        return forward(items)

    monkeypatch.setattr(run, "_forward_items", counted)
    return sizes


async def test_windows_of_concurrent_requests_share_forward_passes(
    tiny_worker, tiny_ids, monkeypatch
):
    model = next(m for m in tiny_worker.registry.models if m.served_id == tiny_ids["mean"])
    sizes = _passes_of(monkeypatch, model)
    assert model.metrics is not None
    rows_before = model.metrics.tally.rows
    bodies = [{"model": tiny_ids["mean"], "input": [text_of(30, shift)]} for shift in (0, 7)]
    replies = await asyncio.gather(*(answer_job(tiny_worker, body) for body in bodies))
    assert all(reply.status == 200 for reply in replies), [r.body for r in replies]
    # Both requests' windows (two or more each) wait in one scheduler: one pass computes them.
    assert len(sizes) == 1 and sizes[0] >= 4, sizes
    assert model.metrics.tally.rows - rows_before == sizes[0]


async def test_a_priority_request_overtakes_a_flex_chunked_job(tiny_worker, tiny_ids, monkeypatch):
    model = next(m for m in tiny_worker.registry.models if m.served_id == tiny_ids["mean"])
    sizes = _passes_of(monkeypatch, model, 0.05)
    finished: dict[str, float] = {}

    async def timed(name: str, texts: list[str], tier: str) -> None:
        body = {"model": tiny_ids["mean"], "input": texts, "service_tier": tier}
        reply = await answer_job(tiny_worker, body)
        assert reply.status == 200, reply.body
        finished[name] = time.monotonic()

    flex = [text_of(60, shift) for shift in range(40)]  # windows for several wide passes
    job = asyncio.ensure_future(timed("flex", flex, "flex"))
    while not sizes:
        await asyncio.sleep(0.01)
    started = len(sizes)
    await asyncio.wait_for(timed("priority", [text_of(30)], "priority"), 60)
    await asyncio.wait_for(job, 120)
    # The priority windows went in a pass of their own, right after the one computing.
    assert any(size <= 2 for size in sizes[started : started + 2]), (started, sizes)
    assert finished["priority"] < finished["flex"]
