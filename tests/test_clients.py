"""The clients users already have, against the local server: Cohere's SDK (Client and ClientV2) and
litellm's `cohere/`, `infinity/` and `openai/` providers give the OpenAI routes' vectors and scores;
every embedding type follows its definition."""

from __future__ import annotations

import base64
import os

import cohere
import httpx
import numpy as np
import pytest

from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.http import create_app
from tests.test_server import ServerThread

TEXTS = ["A kitten sleeps on the sofa.", "A cat naps on the couch.", "The stock market fell today."]
DOCS = ["Cats sleep most of the day.", "Markets fell sharply.", "Kittens nap often.", "Rain."]


@pytest.fixture(scope="module")
def served(worker_env, qwen3_embedder):
    env = dict(worker_env, MODEL_NAMES=f"{worker_env['MODEL_NAMES']};{qwen3_embedder}")
    worker = Worker.from_config(load_config(env))
    with ServerThread(create_app(worker)) as server:
        by_tail = {m.served_id.rsplit("/", 1)[-1]: m.served_id for m in worker.registry.models}
        server.reranker = by_tail["tiny-bert-reranker"]
        server.qwen3 = by_tail["tiny-qwen3-embedder"]
        yield server


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=120) as client:
        yield client


def openai_vectors(http, model, texts, **fields) -> np.ndarray:
    body = {"model": model, "input": texts, "encoding_format": "float", **fields}
    answer = http.post("/v1/embeddings", json=body).json()
    return np.array([item["embedding"] for item in answer["data"]], dtype=np.float32)


def test_v1_embed_gives_the_openai_routes_vectors(served, http):
    client = cohere.Client(api_key="unused", base_url=served.url)
    answer = client.embed(texts=TEXTS, model=DEFAULT_MODEL_ID, input_type="search_document")
    assert answer.response_type == "embeddings_floats"
    np.testing.assert_allclose(
        np.array(answer.embeddings), openai_vectors(http, DEFAULT_MODEL_ID, TEXTS), atol=1e-6
    )
    assert answer.texts == TEXTS
    assert answer.meta.api_version.version == "1"
    usage = http.post("/v1/embeddings", json={"model": DEFAULT_MODEL_ID, "input": TEXTS}).json()
    assert answer.meta.billed_units.input_tokens == usage["usage"]["prompt_tokens"]


def test_every_embedding_type_follows_its_definition(served, http):
    client = cohere.Client(api_key="unused", base_url=served.url)
    types = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    answer = client.embed(
        texts=TEXTS, model=DEFAULT_MODEL_ID, input_type="search_query", embedding_types=types
    )
    assert answer.response_type == "embeddings_by_type"
    got = answer.embeddings
    floats = openai_vectors(http, DEFAULT_MODEL_ID, TEXTS)
    np.testing.assert_allclose(np.array(got.float_), floats, atol=1e-6)
    for encoded, vector in zip(got.base64, floats):
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(encoded), "<f4"), vector)
    # int8: each vector scaled so its largest magnitude is 127; uint8 the same plus 128.
    int8 = np.array(got.int8)
    expected = np.rint(floats * 127 / np.abs(floats).max(axis=1, keepdims=True))
    assert np.abs(int8 - expected).max() <= 1  # float32 rounding at .5 may go either way
    assert int8.min() >= -127 and int8.max() == 127 and int8.shape == floats.shape
    np.testing.assert_array_equal(np.array(got.uint8), int8 + 128)
    # binary: the sign bits, 8 to a byte, first dimension highest; ubinary the same bytes.
    bits = (floats > 0).astype(np.uint8)
    ubinary = np.array(got.ubinary)
    assert ubinary.shape == (3, 384 // 8)
    np.testing.assert_array_equal(np.unpackbits(ubinary.astype(np.uint8), axis=1), bits)
    np.testing.assert_array_equal(np.array(got.binary), ubinary - 128)
    # The quantized vectors still rank like the floats: the two cat sentences stay closest.
    unit = int8 / np.linalg.norm(int8, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2]


def test_v2_embed_answers_by_type_and_maps_input_type_onto_the_models_prompts(served, http):
    client = cohere.ClientV2(api_key="unused", base_url=served.url)
    query = client.embed(texts=TEXTS, model=served.qwen3, input_type="search_query")
    assert query.response_type == "embeddings_by_type" and query.meta.api_version.version == "2"
    with_prompt = openai_vectors(http, served.qwen3, TEXTS, prompt_type="query")
    np.testing.assert_allclose(np.array(query.embeddings.float_), with_prompt, atol=1e-6)
    document = client.embed(
        texts=TEXTS, model=served.qwen3, input_type="search_document", embedding_types=["int8"]
    )
    assert document.embeddings.float_ is None and len(document.embeddings.int8) == 3
    plain = client.embed(texts=TEXTS, model=served.qwen3, input_type="search_document")
    np.testing.assert_allclose(
        np.array(plain.embeddings.float_), openai_vectors(http, served.qwen3, TEXTS), atol=1e-6
    )
    assert not np.allclose(with_prompt, openai_vectors(http, served.qwen3, TEXTS), atol=1e-4)


def test_truncate_start_keeps_the_end_of_an_over_long_text(served, http, minilm_path):
    from transformers import AutoTokenizer

    words = [f"word{i}" for i in range(400)]  # ~1200 tokens, each word different: order shows
    text = " ".join(words)
    client = cohere.ClientV2(api_key="unused", base_url=served.url)
    start = client.embed(
        texts=[text], model=DEFAULT_MODEL_ID, input_type="search_document", truncate="START"
    )
    end = client.embed(
        texts=[text], model=DEFAULT_MODEL_ID, input_type="search_document", truncate="END"
    )
    # What is kept: the last 254 tokens (256 less [CLS] and [SEP]), from the first that starts a
    # word.
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    words, first = encoded.word_ids(), len(encoded["input_ids"]) - 254
    while words[first] == words[first - 1]:
        first += 1
    kept = text[encoded["offset_mapping"][first][0] :]
    np.testing.assert_allclose(
        np.array(start.embeddings.float_), openai_vectors(http, DEFAULT_MODEL_ID, [kept]), atol=1e-6
    )
    np.testing.assert_allclose(
        np.array(end.embeddings.float_), openai_vectors(http, DEFAULT_MODEL_ID, [text]), atol=1e-6
    )
    assert end.meta.billed_units.input_tokens == 256
    kept_tokens = len(encoded["input_ids"]) - first + 2
    assert 250 < start.meta.billed_units.input_tokens == kept_tokens <= 256
    short = client.embed(
        texts=TEXTS, model=DEFAULT_MODEL_ID, input_type="search_document", truncate="START"
    )
    np.testing.assert_allclose(
        np.array(short.embeddings.float_), openai_vectors(http, DEFAULT_MODEL_ID, TEXTS), atol=1e-6
    )
    with pytest.raises(cohere.BadRequestError):
        client.embed(
            texts=[text], model=DEFAULT_MODEL_ID, input_type="search_document", truncate="NONE"
        )


def test_truncate_start_keeps_the_models_prompt(served, http, qwen3_embedder):
    from transformers import AutoTokenizer

    from tests.model_factory import QWEN3_QUERY_PROMPT

    tokenizer = AutoTokenizer.from_pretrained(qwen3_embedder)
    text = " ".join(f"w{i}" for i in range(5000))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert len(encoded["input_ids"]) > 8192  # the model's maximum
    # Room for the text: 8192 less the whole query prompt and the end-of-text token.
    room = 8192 - len(tokenizer(QWEN3_QUERY_PROMPT, add_special_tokens=False)["input_ids"]) - 1
    words, first = encoded.word_ids(), len(encoded["input_ids"]) - room
    while words[first] == words[first - 1]:
        first += 1
    kept = text[encoded["offset_mapping"][first][0] :]
    client = cohere.ClientV2(api_key="unused", base_url=served.url)
    start = client.embed(
        texts=[text], model=served.qwen3, input_type="search_query", truncate="START"
    )
    expected = openai_vectors(http, served.qwen3, [kept], prompt_type="query")
    np.testing.assert_allclose(np.array(start.embeddings.float_), expected, atol=1e-5)


def test_v2_rerank_gives_the_rerank_routes_scores(served, http):
    client = cohere.ClientV2(api_key="unused", base_url=served.url)
    answer = client.rerank(model=served.reranker, query="cats", documents=DOCS, top_n=3)
    expected = http.post(
        "/v1/rerank", json={"model": served.reranker, "query": "cats", "documents": DOCS}
    ).json()["results"]
    assert [r.index for r in answer.results] == [r["index"] for r in expected[:3]]
    np.testing.assert_allclose(
        [r.relevance_score for r in answer.results],
        [r["relevance_score"] for r in expected[:3]],
        atol=1e-6,
    )
    assert answer.meta.billed_units.search_units == 1
    assert answer.meta.api_version.version == "2"


def test_v1_rerank_returns_documents_when_asked(served):
    client = cohere.Client(api_key="unused", base_url=served.url)
    answer = client.rerank(
        model=served.reranker, query="cats", documents=DOCS, return_documents=True
    )
    assert sorted(r.index for r in answer.results) == list(range(len(DOCS)))
    assert all(r.document.text == DOCS[r.index] for r in answer.results)
    assert answer.meta.billed_units.search_units == 1


@pytest.mark.parametrize(
    "body",
    [
        {"texts": []},
        {"texts": [""]},
        {"texts": ["a"], "embedding_types": ["float16"]},
        {"texts": ["a"], "input_type": "search_everything"},
        {"texts": ["a"], "truncate": "BEGINNING"},
    ],
)
def test_bad_embed_requests_are_typed_400s(http, body):
    for route in ("/v1/embed", "/v2/embed"):
        response = http.post(route, json={"model": DEFAULT_MODEL_ID, **body})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_input"


def test_the_sdk_raises_its_bad_request_error(served):
    client = cohere.ClientV2(api_key="unused", base_url=served.url)
    with pytest.raises(cohere.BadRequestError):
        client.embed(texts=[""], model=DEFAULT_MODEL_ID, input_type="search_query")


def test_the_openai_route_takes_several_embedding_types_at_once(served, http):
    body = {"model": DEFAULT_MODEL_ID, "input": TEXTS, "embedding_types": ["int8", "ubinary"]}
    answer = http.post("/v1/embeddings", json=body).json()
    typed = cohere.Client(api_key="unused", base_url=served.url).embed(
        texts=TEXTS, model=DEFAULT_MODEL_ID, embedding_types=["int8", "ubinary"]
    )
    for i, item in enumerate(answer["data"]):
        assert set(item["embedding"]) == {"int8", "ubinary"}
        assert item["embedding"]["int8"] == typed.embeddings.int8[i]
        assert item["embedding"]["ubinary"] == typed.embeddings.ubinary[i]
    bad = http.post("/v1/embeddings", json={**body, "embedding_types": ["int4"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "embedding_types"


# --- litellm ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm():
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # offline: its bundled model list
    import litellm

    return litellm


@pytest.mark.parametrize("provider", ["infinity", "openai"])
def test_litellm_embeds_through_the_infinity_and_openai_providers(served, http, litellm, provider):
    base = served.url if provider == "infinity" else served.url + "/v1"
    answer = litellm.embedding(
        model=f"{provider}/{DEFAULT_MODEL_ID}", api_base=base, api_key="unused", input=TEXTS
    )
    got = np.array([item["embedding"] for item in answer.data], dtype=np.float32)
    np.testing.assert_allclose(got, openai_vectors(http, DEFAULT_MODEL_ID, TEXTS), atol=1e-6)
    assert answer.usage.prompt_tokens > len(TEXTS)


@pytest.mark.parametrize("provider", ["infinity", "cohere"])
def test_litellm_reranks_through_the_infinity_and_cohere_providers(served, http, litellm, provider):
    answer = litellm.rerank(
        model=f"{provider}/{served.reranker}",
        api_base=served.url,
        api_key="unused",
        query="cats",
        documents=DOCS,
        top_n=2,
        return_documents=provider == "infinity",
    )
    expected = http.post(
        "/v1/rerank", json={"model": served.reranker, "query": "cats", "documents": DOCS}
    ).json()["results"][:2]
    assert [r["index"] for r in answer.results] == [r["index"] for r in expected]
    np.testing.assert_allclose(
        [r["relevance_score"] for r in answer.results],
        [r["relevance_score"] for r in expected],
        atol=1e-6,
    )
