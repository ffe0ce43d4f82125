"""Reranking on the real Infinity engine: Cohere/Jina shape, plain JSON numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder

from embedding_worker.transports.runpod import answer_job
from tests.helpers import answer as rerank

QUERY = "which product has warranty coverage"
DOCS = [
    "product a comes with a two year warranty",
    "product b is available in red and blue",
    "all electronics include a standard one year warranty",
    "the weather is nice today",
]


async def test_scores_match_the_cross_encoder_sorted_with_original_indexes(
    worker, ids, bert_reranker
):
    body = await rerank(worker, model=ids["reranker"], query=QUERY, documents=DOCS)
    assert body["object"] == "rerank" and body["model"] == ids["reranker"]
    assert body["id"].startswith("rerank-") and isinstance(body["created"], int)
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCS)))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(type(s) is float for s in scores)
    expected = CrossEncoder(str(bert_reranker), device="cpu").predict(
        [(QUERY, d) for d in DOCS], activation_fct=torch.nn.Sigmoid()
    )
    by_index = {r["index"]: r["relevance_score"] for r in results}
    np.testing.assert_allclose([by_index[i] for i in range(len(DOCS))], expected, atol=1e-5)
    assert "document" not in results[0]
    json.dumps(body)
    assert body["usage"]["total_tokens"] > 0


async def test_top_n_and_return_documents(worker, ids):
    full = await rerank(worker, model=ids["reranker"], query=QUERY, documents=DOCS)
    top = await rerank(
        worker, model=ids["reranker"], query=QUERY, documents=DOCS, top_n=2, return_documents=True
    )
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full["results"][:2]]
    for result in top["results"]:
        assert result["document"] == {"text": DOCS[result["index"]]}
    everything = await rerank(worker, model=ids["reranker"], query=QUERY, documents=DOCS, top_n=99)
    assert len(everything["results"]) == len(DOCS)


async def test_legacy_field_names_and_document_objects(worker, ids):
    legacy = await rerank(worker, model=ids["reranker"], query=QUERY, docs=DOCS, return_docs=True)
    objects = await rerank(
        worker, model=ids["reranker"], query=QUERY, documents=[{"text": d} for d in DOCS]
    )
    assert [r["index"] for r in legacy["results"]] == [r["index"] for r in objects["results"]]
    assert legacy["results"][0]["document"]["text"] == DOCS[legacy["results"][0]["index"]]


async def test_usage_counts_query_document_pairs(worker, ids):
    body = await rerank(worker, model=ids["reranker"], query=QUERY, documents=DOCS)
    tokenizer = worker.registry.resolve(ids["reranker"], None).tokens.tokenizer
    expected = sum(len(tokenizer(QUERY, d)["input_ids"]) for d in DOCS)
    assert body["usage"] == {"prompt_tokens": expected, "total_tokens": expected}


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"query": "", "documents": DOCS}, "query", "at least 1 character"),
        ({"query": 3, "documents": DOCS}, "query", "valid string"),
        ({"query": "q", "documents": []}, "documents", "empty array"),
        ({"query": "q", "documents": "one doc"}, "documents", "array of strings"),
        ({"query": "q", "documents": ["a", 1]}, "documents", "item 1 must be a string"),
        ({"query": "q", "documents": DOCS, "top_n": 0}, "top_n", "greater than or equal to 1"),
        ({"query": "q", "documents": DOCS, "top_n": -3}, "top_n", "greater than or equal to 1"),
        ({"query": "q", "documents": DOCS, "return_documents": "yes"}, "return_documents", "bool"),
    ],
)
async def test_bad_rerank_input_is_a_typed_400(worker, ids, body, param, fragment):
    reply = await answer_job(worker, {"model": ids["reranker"], **body})
    assert reply.status == 400, reply.body
    assert reply.body["error"]["param"] == param
    assert fragment in reply.body["error"]["message"]


async def test_missing_documents(worker, ids):
    reply = await answer_job(worker, {"model": ids["reranker"], "query": "q"})
    assert reply.status == 400
    assert "'documents' is required" in reply.body["error"]["message"]
