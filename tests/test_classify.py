"""Classification through the worker, against the models' own scores in plain transformers:
softmax over a sentiment classifier's labels, sigmoid per label for a multi-label one; a
single-label cross-encoder stays a reranker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.runpod import answer_job
from tests import model_factory
from tests.helpers import call

TEXTS = ["what a wonderful day", "this is terrible", "the train leaves at noon", "ok"]


@pytest.fixture(scope="module")
def classifiers(models_dir):
    return {
        "sentiment": model_factory.make_bert_classifier(models_dir / "tiny-sentiment", seed=1),
        "topics": model_factory.make_bert_classifier(
            models_dir / "tiny-topics", labels=("sports", "news", "tech", "art"), multi_label=True
        ),
    }


@pytest.fixture(scope="module")
async def classify_worker(classifiers, bert_reranker, bert_embedder):
    names = ";".join(str(p) for p in [*classifiers.values(), bert_reranker, bert_embedder])
    worker = Worker.from_config(load_config({"MODEL_NAMES": names, "BATCH_SIZES": "3"}))
    await worker.start()
    yield worker
    await worker.stop()


def served_id(worker, path) -> str:
    (model,) = [m for m in worker.registry.models if m.spec.source == str(path)]
    return model.served_id


def reference(path, texts, multi_label: bool, raw: bool = False) -> tuple[np.ndarray, list[str]]:
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    with torch.no_grad():
        logits = model(
            **tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        ).logits
    scores = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return (logits if raw else scores).numpy(), labels


@pytest.mark.parametrize("which, multi_label", [("sentiment", False), ("topics", True)])
async def test_scores_are_the_models_own(classify_worker, classifiers, which, multi_label):
    path = classifiers[which]
    reply = await call(
        classify_worker, "/v1/classify", {"model": served_id(classify_worker, path), "input": TEXTS}
    )
    assert reply.status == 200, reply.body
    expected, labels = reference(path, TEXTS, multi_label)
    assert [item["index"] for item in reply.body["data"]] == list(range(len(TEXTS)))
    for item, row in zip(reply.body["data"], expected):
        got = {entry["label"]: entry["score"] for entry in item["labels"]}
        np.testing.assert_allclose([got[label] for label in labels], row, atol=1e-5)
        scores = [entry["score"] for entry in item["labels"]]
        assert scores == sorted(scores, reverse=True)  # best first
        assert item["label"] == labels[int(np.argmax(row))]
    sums = [sum(e["score"] for e in item["labels"]) for item in reply.body["data"]]
    if multi_label:
        assert not np.allclose(sums, 1.0, atol=1e-3)
    else:
        np.testing.assert_allclose(sums, 1.0, atol=1e-5)
    assert reply.body["usage"]["prompt_tokens"] > len(TEXTS)


@pytest.mark.parametrize("which, multi_label", [("sentiment", False), ("topics", True)])
async def test_raw_scores_are_the_logits(classify_worker, classifiers, which, multi_label):
    path = classifiers[which]
    body = {"model": served_id(classify_worker, path), "input": TEXTS, "raw_scores": True}
    reply = await call(classify_worker, "/v1/classify", body)
    assert reply.status == 200, reply.body
    expected, labels = reference(path, TEXTS, multi_label, raw=True)
    for item, row in zip(reply.body["data"], expected):
        got = {entry["label"]: entry["score"] for entry in item["labels"]}
        np.testing.assert_allclose([got[label] for label in labels], row, atol=1e-5)


async def test_top_k_and_infinitys_shape(classify_worker, classifiers):
    model = served_id(classify_worker, classifiers["topics"])
    full = await call(classify_worker, "/v1/classify", {"model": model, "input": TEXTS})
    top = await call(classify_worker, "/v1/classify", {"model": model, "input": TEXTS, "top_k": 2})
    for whole, cut in zip(full.body["data"], top.body["data"]):
        assert cut["labels"] == whole["labels"][:2]
    infinity = await call(classify_worker, "/classify", {"model": model, "input": TEXTS})
    assert infinity.body["object"] == "classify"
    assert infinity.body["data"] == [item["labels"] for item in full.body["data"]]


async def test_each_model_does_what_it_is(classify_worker, classifiers, bert_reranker):
    described = {m["id"]: m for m in (await call(classify_worker, "/v1/models", None)).body["data"]}
    assert described[served_id(classify_worker, classifiers["sentiment"])]["role"] == "classify"
    reranker = served_id(classify_worker, bert_reranker)
    assert described[reranker]["role"] == "rerank"  # one label: a reranker, not a classifier
    refused = await call(classify_worker, "/v1/classify", {"model": reranker, "input": "x"})
    assert refused.status == 400 and refused.body["error"]["code"] == "model_not_classifier"
    sentiment = served_id(classify_worker, classifiers["sentiment"])
    embed = await call(classify_worker, "/v1/embeddings", {"model": sentiment, "input": "x"})
    assert embed.status == 400 and embed.body["error"]["code"] == "model_not_embedding"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": [3]}, "input"),
        ({"input": "ok", "top_k": 0}, "top_k"),
        ({"input": "ok", "raw_scores": "yes"}, "raw_scores"),
    ],
)
async def test_bad_requests_are_typed_errors(classify_worker, classifiers, body, param):
    model = served_id(classify_worker, classifiers["sentiment"])
    reply = await call(classify_worker, "/v1/classify", {"model": model, **body})
    assert reply.status == 400 and reply.body["error"]["param"] == param


async def test_classification_as_batch_lines(classify_worker, classifiers):
    model = served_id(classify_worker, classifiers["sentiment"])
    lines = [
        {"custom_id": f"c{i}", "url": "/v1/classify", "body": {"model": model, "input": text}}
        for i, text in enumerate(TEXTS)
    ]
    reply = await answer_job(classify_worker, {"batch": lines})
    assert reply.status == 200
    singles = [await call(classify_worker, "/v1/classify", line["body"]) for line in lines]
    for output, single in zip(reply.body["data"], singles):
        assert output["response"]["status_code"] == 200
        (batched,), (alone,) = output["response"]["body"]["data"], single.body["data"]
        assert batched["label"] == alone["label"]
        np.testing.assert_allclose(
            [e["score"] for e in batched["labels"]],
            [e["score"] for e in alone["labels"]],
            atol=1e-6,
        )


async def test_a_standard_job_with_input_does_what_its_model_does(
    classify_worker, classifiers, bert_embedder
):
    """`{"input"}` names a classifier: classified as /v1/classify does; an embedder, or no model
    (the embedder is the only one that embeds): embedded."""
    sentiment = served_id(classify_worker, classifiers["sentiment"])
    body = {"model": sentiment, "input": TEXTS, "top_k": 1}
    job = await answer_job(classify_worker, body)
    assert job.status == 200, job.body
    route = await call(classify_worker, "/v1/classify", body)
    assert [item["labels"] for item in job.body["data"]] == [
        item["labels"] for item in route.body["data"]
    ]
    assert job.body["service_tier"] == "default"
    embedder = served_id(classify_worker, bert_embedder)
    for named in ({"model": embedder}, {}):
        embedded = await answer_job(classify_worker, {**named, "input": TEXTS})
        assert embedded.status == 200 and embedded.body["model"] == embedder
        assert embedded.body["data"][0]["object"] == "embedding"
    unknown = await answer_job(classify_worker, {"model": "no-such-model", "input": TEXTS})
    assert unknown.status == 404 and unknown.body["error"]["code"] == "model_not_found"


async def test_a_standard_job_without_a_model_classifies_where_no_model_embeds(classifiers):
    worker = Worker.from_config(load_config({"MODEL_NAMES": str(classifiers["sentiment"])}))
    await worker.start()
    try:
        reply = await answer_job(worker, {"input": TEXTS})
        assert reply.status == 200, reply.body
        assert [item["object"] for item in reply.body["data"]] == ["classification"] * len(TEXTS)
    finally:
        await worker.stop()
