"""Embeddings on the real Infinity engine: the OpenAI contract, to the letter."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.runpod import answer_job
from tests import model_factory
from tests.helpers import answer as embed
from tests.helpers import decode_vectors

TEXTS = [
    "a kitten sleeps on the sofa",
    "a cat naps on the couch",
    "the stock market fell today",
]


async def embed_error(worker, **body):
    reply = await answer_job(worker, body)
    assert reply.status >= 400, reply.body
    return reply.status, reply.body["error"]


async def test_minilm_matches_sentence_transformers_and_ranks_meaning(worker, ids, minilm_path):
    body = await embed(worker, model=ids["minilm"], input=TEXTS)
    got = decode_vectors(body)
    expected = SentenceTransformer(str(minilm_path), device="cpu").encode(
        TEXTS, normalize_embeddings=True
    )
    assert got.shape == (3, 384)
    cosine = np.sum(got * expected, axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert cosine.min() >= 0.9999
    kitten, cat, market = got
    assert kitten @ cat > kitten @ market + 0.2


@pytest.mark.parametrize("count", [1, 8, 9, 70])  # one text at a time up to 8, batched beyond
async def test_token_counts_equal_the_tokenizers_one_by_one_and_batched(worker, ids, count):
    model = worker.registry.resolve(ids["minilm"], None)
    texts = [f"{i} " + "déjà vu " * (i % 7) for i in range(count)]
    expected = [len(model.tokens.tokenizer(t)["input_ids"]) for t in texts]
    assert model.tokens.count(texts) == expected


async def test_answer_shape_and_usage_counts_real_tokens(worker, ids):
    body = await embed(worker, model=ids["minilm"], input=TEXTS[:2], user="someone")
    assert body["object"] == "list"
    assert body["model"] == ids["minilm"]
    assert body["id"].startswith("embd-") and isinstance(body["created"], int)
    tokenizer = worker.registry.resolve(ids["minilm"], None).tokens.tokenizer
    expected_tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS[:2])  # with [CLS]/[SEP]
    assert body["usage"] == {"prompt_tokens": expected_tokens, "total_tokens": expected_tokens}
    assert len(body["data"]) == 2
    json.dumps(body)  # plain JSON all the way down


async def test_single_string_is_one_embedding(worker, ids):
    body = await embed(worker, model=ids["minilm"], input=TEXTS[0])
    many = await embed(worker, model=ids["minilm"], input=TEXTS)
    assert len(body["data"]) == 1
    np.testing.assert_allclose(decode_vectors(body)[0], decode_vectors(many)[0], atol=1e-5)


async def test_base64_is_little_endian_float32_of_the_samedecode_vectors(worker, ids):
    floats = decode_vectors(await embed(worker, model=ids["minilm"], input=TEXTS))
    b64 = await embed(worker, model=ids["minilm"], input=TEXTS, encoding_format="base64")
    assert all(isinstance(item["embedding"], str) for item in b64["data"])
    np.testing.assert_allclose(decode_vectors(b64), floats, atol=1e-6)


async def test_float_answer_round_trips_float32_in_short_text(worker, ids):
    body = await embed(worker, model=ids["minilm"], input=TEXTS, encoding_format="base64")
    exact = decode_vectors(body)
    body = await embed(worker, model=ids["minilm"], input=TEXTS)
    text = json.dumps(body["data"][0]["embedding"])  # what runpod does with the job result
    assert np.array_equal(np.asarray(json.loads(text), dtype=np.float32), exact[0])
    # float32 widened to a Python float takes ~22 bytes a number; its shortest text far fewer.
    assert len(text) / exact.shape[1] < 15


async def test_dimensions_cut_then_renormalise(worker, ids):
    full = decode_vectors(await embed(worker, model=ids["minilm"], input=TEXTS))
    cut = decode_vectors(await embed(worker, model=ids["minilm"], input=TEXTS, dimensions=64))
    assert cut.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-5)
    same = decode_vectors(await embed(worker, model=ids["minilm"], input=TEXTS, dimensions=384))
    np.testing.assert_allclose(same, full, atol=1e-6)


async def test_token_id_inputs_embed_like_their_text(worker, ids):
    tokenizer = worker.registry.resolve(ids["minilm"], None).tokens.tokenizer
    token_lists = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    from_text = decode_vectors(await embed(worker, model=ids["minilm"], input=TEXTS))
    from_ids = await embed(worker, model=ids["minilm"], input=token_lists)
    np.testing.assert_allclose(decode_vectors(from_ids), from_text, atol=1e-5)
    assert from_ids["usage"]["prompt_tokens"] == sum(len(t) for t in token_lists)
    one = await embed(worker, model=ids["minilm"], input=token_lists[1])
    np.testing.assert_allclose(decode_vectors(one)[0], from_text[1], atol=1e-5)


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"input": ""}, "input", "empty string"),
        ({"input": []}, "input", "empty array"),
        ({"input": ["ok", ""]}, "input", "item 1 is an empty string"),
        ({"input": ["ok", 3]}, "input", "item 1 is not a string"),
        ({"input": [[1, 2], []]}, "input", "item 1 is an empty array"),
        ({"input": [1, "a"]}, "input", "only integer token ids"),
        ({"input": [True, 1]}, "input", "must be a string"),
        ({"input": 42}, "input", "must be a string"),
        ({"input": {"text": "x"}}, "input", "must be a string"),
        ({"input": [[1.5]]}, "input", "only integer token ids"),
        ({"input": [[10**9]]}, "input", "outside the model's vocabulary"),
        ({"input": [[-1]]}, "input", "outside the model's vocabulary"),
        ({"input": "x", "encoding_format": "binary"}, "encoding_format", "'float' or 'base64'"),
        ({"input": "x", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
        ({"input": "x", "dimensions": 385}, "dimensions", "between 1 and 384"),
        ({"input": "x", "dimensions": "64"}, "dimensions", "valid integer"),
        ({"input": "x", "dimensions": True}, "dimensions", "valid integer"),
        ({"input": "x", "dimensions": 64.0}, "dimensions", "valid integer"),
        ({"input": "x", "user": 5}, "user", "valid string"),
        ({"model": 7, "input": "x"}, "model", "valid string"),
    ],
)
async def test_bad_input_is_a_typed_400_naming_the_field(worker, ids, body, param, fragment):
    body = {"model": ids["minilm"], **body}
    status, error = await embed_error(worker, **body)
    assert status == 400
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"]


async def test_missing_input_is_required(worker, ids):
    reply = await answer_job(
        worker, {"openai_route": "/v1/embeddings", "openai_input": {"model": "x"}}
    )
    assert reply.status == 400
    assert reply.body["error"]["param"] == "input"
    assert "'input' is required" in reply.body["error"]["message"]


async def test_more_than_2048_inputs_is_refused(worker, ids):
    status, error = await embed_error(worker, model=ids["embedder"], input=["word"] * 2049)
    assert status == 400 and error["param"] == "input" and "2048" in error["message"]
    body = await embed(worker, model=ids["embedder"], input=["word"] * 2048)
    assert len(body["data"]) == 2048


async def test_tiny_random_embedder_matches_sentence_transformers(worker, ids, bert_embedder):
    texts = ["the quick brown fox", "jumps over the lazy dog", "a"]
    got = decode_vectors(await embed(worker, model=ids["embedder"], input=texts))
    expected = SentenceTransformer(str(bert_embedder), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)


async def test_quantized_types_in_base64_are_their_bytes(worker, ids):
    """/v1/embeddings with embedding_types and encoding_format=base64: each quantized vector is the
    base64 of one byte a number (signed for int8 and binary), the same numbers as the JSON form."""
    types = ["int8", "uint8", "binary", "ubinary", "float"]
    body = {"model": ids["minilm"], "input": ["one text", "and another"], "embedding_types": types}
    numbers = await embed(worker, **body)
    packed = await embed(worker, **body, encoding_format="base64")
    signed = {"int8": "i1", "binary": "i1", "uint8": "u1", "ubinary": "u1", "float": "<f4"}
    for as_numbers, as_base64 in zip(numbers["data"], packed["data"]):
        for kind in types:
            decoded = np.frombuffer(base64.b64decode(as_base64["embedding"][kind]), signed[kind])
            expected = np.asarray(as_numbers["embedding"][kind], dtype=decoded.dtype)
            np.testing.assert_array_equal(decoded, expected)
    assert len(base64.b64decode(packed["data"][0]["embedding"]["binary"])) == 384 // 8


async def test_a_large_answer_is_encoded_in_chunks_to_the_same_text():
    """2048 vectors of 1024 floats take 0.35 s of orjson holding the GIL: they are encoded in a
    thread, a chunk at a time, and the chunks join into exactly the answer one call gives."""
    from embedding_worker.encoding import encode_types, encode_vectors
    from embedding_worker.operations import cohere, embeddings

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2048, 1024)).astype(np.float32)
    assert vectors.size > embeddings.ENCODE_INLINE_NUMBERS  # the chunked path
    for fmt in ("float", "base64"):
        chunked = await embeddings.encoded_off_loop(vectors, encode_vectors, fmt)
        assert chunked == encode_vectors(vectors, fmt)
    types = ["float", "int8", "ubinary", "base64"]
    assert await cohere.encoded_types(vectors[:100], types) == encode_types(vectors[:100], types)


# ------------------------------------------------------------------------------------ normalize


@pytest.fixture(scope="module")
def dot_product_model(models_dir):
    """A model whose sentence-transformers modules end at Pooling: no Normalize."""
    return model_factory.make_bert_embedder(models_dir / "tiny-dot-product", normalize=False)


@pytest.fixture(scope="module")
async def normalize_worker(dot_product_model, bert_embedder):
    names = f"{dot_product_model};{bert_embedder}"
    worker = Worker.from_config(load_config({"MODEL_NAMES": names, "DTYPES": "float32"}))
    await worker.start()
    yield worker
    await worker.stop()


def st_vectors(path, texts, normalize: bool) -> np.ndarray:
    model = SentenceTransformer(str(path), device="cpu")
    return model.encode(texts, normalize_embeddings=normalize)


async def test_a_model_without_normalize_answers_its_own_vectors(
    normalize_worker, dot_product_model
):
    model = str(dot_product_model)
    raw = st_vectors(dot_product_model, TEXTS, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    got = decode_vectors(await embed(normalize_worker, model=model, input=TEXTS))
    np.testing.assert_allclose(got, raw, atol=1e-5)
    off = decode_vectors(await embed(normalize_worker, model=model, input=TEXTS, normalize=False))
    np.testing.assert_allclose(off, raw, atol=1e-5)
    unit = decode_vectors(await embed(normalize_worker, model=model, input=TEXTS, normalize=True))
    np.testing.assert_allclose(unit, st_vectors(dot_product_model, TEXTS, True), atol=1e-5)


async def test_a_model_with_normalize_answers_unit_vectors_whatever_normalize(
    normalize_worker, bert_embedder
):
    """Its own modules normalise: sentence-transformers' `normalize_embeddings=False` gives unit
    vectors too."""
    expected = st_vectors(bert_embedder, TEXTS, normalize=False)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)
    for normalize in (None, True, False):
        fields = {} if normalize is None else {"normalize": normalize}
        body = await embed(normalize_worker, model=str(bert_embedder), input=TEXTS, **fields)
        np.testing.assert_allclose(decode_vectors(body), expected, atol=1e-5)


async def test_dimensions_renormalise_only_normalised_answers(normalize_worker, dot_product_model):
    """sentence-transformers' `truncate_dim`: cut, then normalised only with
    `normalize_embeddings`."""
    model = str(dot_product_model)
    raw = st_vectors(dot_product_model, TEXTS, normalize=False)
    cut = decode_vectors(await embed(normalize_worker, model=model, input=TEXTS, dimensions=8))
    np.testing.assert_allclose(cut, raw[:, :8], atol=1e-5)
    unit = decode_vectors(
        await embed(normalize_worker, model=model, input=TEXTS, dimensions=8, normalize=True)
    )
    expected = raw[:, :8] / np.linalg.norm(raw[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(unit, expected, atol=1e-5)


async def test_normalize_must_be_a_bool(normalize_worker, dot_product_model):
    reply = await answer_job(
        normalize_worker, {"model": str(dot_product_model), "input": "x", "normalize": "yes"}
    )
    assert reply.status == 400 and reply.body["error"]["param"] == "normalize"
