"""LLM rerankers (Qwen3-Reranker and its single-logit conversion) through the worker.

The reference below is the Qwen3-Reranker model card's recipe with plain transformers, kept as
written there (format_instruction, process_inputs, compute_logits), with max_length as a parameter.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from embedding_worker.config import ModelSpec, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.engines import ModelLoadError, ModelRegistry
from embedding_worker.engines.kinds import kind_of
from embedding_worker.engines.llm_reranker import LLMReranker
from embedding_worker.transports.runpod import answer_job
from tests.helpers import bound_queue

# The recipe passes max_length to tokenizer.pad, which ignores it (and says so).
pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored")

QUERY = "What is the capital of China?"
DOCS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to physical "
    "objects and is responsible for the movement of planets around the sun.",
    "Rinse the rice",
    "Paris is the capital of France and a popular destination for tourists.",
    "no",
    "Beijing, Madrid, Rome and Lisbon are capital cities; the train to the airport leaves every "
    "fifteen minutes from platform two, and the museum tour starts at ten.",
    "Water boils at one hundred degrees Celsius at sea level.",
]


# ------------------------------------------------------------------ the model card, verbatim


class Reference:
    def __init__(self, path, max_length: int = 8192):
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.max_length = max_length
        prefix = (
            "<|im_start|>system\nJudge whether the Document meets the requirements based on the "
            'Query and the Instruct provided. Note that the answer can only be "yes" or "no".'
            "<|im_end|>\n<|im_start|>user\n"
        )
        suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        self.prefix_tokens = self.tokenizer.encode(prefix, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(suffix, add_special_tokens=False)

    @staticmethod
    def format_instruction(instruction, query, doc):
        if instruction is None:
            instruction = (
                "Given a web search query, retrieve relevant passages that answer the query"
            )
        return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"

    def process_inputs(self, pairs):
        inputs = self.tokenizer(
            pairs,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        return self.tokenizer.pad(
            inputs, padding=True, return_tensors="pt", max_length=self.max_length
        )

    @torch.no_grad()
    def compute_logits(self, inputs):
        batch_scores = self.model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, self.token_true_id]
        false_vector = batch_scores[:, self.token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        return batch_scores[:, 1].exp().tolist()

    def scores(self, query, docs, instruction=None, batch_size=None) -> np.ndarray:
        batch_size = batch_size or len(DOCS)
        pairs = [self.format_instruction(instruction, query, doc) for doc in docs]
        out = []
        for start in range(0, len(pairs), batch_size):
            out += self.compute_logits(self.process_inputs(pairs[start : start + batch_size]))
        return np.array(out)

    def tokens(self, query, docs, instruction=None) -> list[int]:
        """Tokens fed per pair (padding excluded)."""
        pairs = [self.format_instruction(instruction, query, d) for d in docs]
        return self.process_inputs(pairs)["attention_mask"].sum(dim=1).tolist()


@pytest.fixture(scope="module")
def reference(qwen3_reranker) -> Reference:
    return Reference(qwen3_reranker)


async def rerank(worker, **body) -> dict:
    reply = await answer_job(worker, body)
    assert reply.status == 200, reply.body
    return reply.body


def in_doc_order(body) -> np.ndarray:
    by_index = {r["index"]: r["relevance_score"] for r in body["results"]}
    return np.array([by_index[i] for i in range(len(by_index))])


def model_of(worker, served_id) -> LLMReranker:
    model = worker.registry.resolve(served_id, None)
    assert isinstance(model, LLMReranker)
    return model


# ------------------------------------------------------------------ scores


@pytest.mark.parametrize("which", ["reranker", "single_logit"])
@pytest.mark.parametrize(
    "instruction", [None, "Given a question, find the passage that answers it"]
)
@pytest.mark.parametrize("batch_size", [1, 4, len(DOCS)])
async def test_scores_match_the_model_card_across_batches_and_padding(
    qwen3_worker, qwen3_ids, reference, which, instruction, batch_size
):
    body = {"model": qwen3_ids[which], "query": QUERY, "documents": DOCS}
    if instruction is not None:
        body["instruction"] = instruction
    answer = await rerank(qwen3_worker, **body)
    expected = reference.scores(QUERY, DOCS, instruction, batch_size)
    np.testing.assert_allclose(in_doc_order(answer), expected, rtol=0, atol=1e-5)
    scores = [r["relevance_score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True) and all(type(s) is float for s in scores)
    json.dumps(answer)


async def test_single_logit_checkpoint_by_plain_transformers(
    qwen3_worker, qwen3_ids, qwen3_single_logit_reranker, reference
):
    """The converted checkpoint, run by transformers on the recipe's inputs: sigmoid(logit)."""
    model = AutoModelForSequenceClassification.from_pretrained(
        qwen3_single_logit_reranker, dtype=torch.float32
    ).eval()
    pairs = [reference.format_instruction(None, QUERY, d) for d in DOCS]
    with torch.no_grad():
        expected = torch.sigmoid(model(**reference.process_inputs(pairs)).logits[:, 0]).numpy()
    answer = await rerank(
        qwen3_worker, model=qwen3_ids["single_logit"], query=QUERY, documents=DOCS
    )
    np.testing.assert_allclose(in_doc_order(answer), expected, rtol=0, atol=1e-5)


async def test_the_template_is_exact(qwen3_worker, qwen3_ids, reference):
    model = model_of(qwen3_worker, qwen3_ids["reranker"])
    [ids] = await asyncio.to_thread(model._tokenize, ["<Instruct>: I\n<Query>: q\n<Document>: d"])
    assert model.tokenizer.decode(ids) == (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
        'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
        "<|im_start|>user\n<Instruct>: I\n<Query>: q\n<Document>: d<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # Infinity's whitespace stripping (no trailing "\n\n") scores differently: the tests can fail.
    stripped = reference.process_inputs([reference.format_instruction(None, QUERY, DOCS[0])])
    stripped = {k: v[:, :-1] for k, v in stripped.items()}
    answer = await rerank(
        qwen3_worker, model=qwen3_ids["reranker"], query=QUERY, documents=DOCS[:1]
    )
    assert abs(in_doc_order(answer)[0] - reference.compute_logits(stripped)[0]) > 1e-4


async def test_usage_counts_the_template_tokens_fed(qwen3_worker, qwen3_ids, reference):
    answer = await rerank(
        qwen3_worker, model=qwen3_ids["reranker"], query=QUERY, documents=DOCS, instruction="Judge"
    )
    expected = sum(reference.tokens(QUERY, DOCS, "Judge"))
    assert answer["usage"] == {"prompt_tokens": expected, "total_tokens": expected}
    assert expected > len(DOCS) * len(reference.prefix_tokens + reference.suffix_tokens)


async def test_rerank_through_the_openai_route_with_extra_body(qwen3_worker, qwen3_ids, reference):
    expected = reference.scores(QUERY, DOCS[:3], "Find it")
    base = {"model": qwen3_ids["reranker"], "query": QUERY, "documents": DOCS[:3]}
    for body in (
        {**base, "instruction": "Find it"},
        {**base, "extra_body": {"instruction": "Find it"}},
    ):
        reply = await answer_job(qwen3_worker, {"openai_route": "/v1/rerank", "openai_input": body})
        assert reply.status == 200, reply.body
        np.testing.assert_allclose(in_doc_order(reply.runpod_output()[0]), expected, atol=1e-5)


async def test_listed_as_a_reranker(qwen3_worker, qwen3_ids):
    reply = await answer_job(qwen3_worker, {"openai_route": "/v1/models"})
    by_id = {m["id"]: m for m in reply.body["data"]}
    for which in ("reranker", "single_logit"):
        entry = by_id[qwen3_ids[which]]
        assert entry["role"] == "rerank" and entry["max_input_tokens"] == 8192
    assert by_id[qwen3_ids["embedder"]]["role"] == "embed"


# ------------------------------------------------------------------ truncation


@pytest.fixture(scope="module")
def short_reranker(qwen3_reranker, tmp_path_factory):
    """The same weights with 96 positions: the recipe's max_length becomes 96."""
    path = tmp_path_factory.mktemp("short") / "qwen3-reranker-96"
    shutil.copytree(qwen3_reranker, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 96}))
    return path


async def test_only_the_middle_is_truncated_to_the_max_length(short_reranker):
    reference = Reference(short_reranker, max_length=96)
    worker = Worker.from_config(
        load_config({"MODEL_NAMES": str(short_reranker), "BATCH_SIZES": "2"})
    )
    try:
        docs = [DOCS[1] * 3, DOCS[0], DOCS[5] * 2]
        answer = await rerank(worker, query=QUERY, documents=docs)
        np.testing.assert_allclose(in_doc_order(answer), reference.scores(QUERY, docs), atol=1e-5)
        fed = reference.tokens(QUERY, docs)
        assert max(fed) == 96 and answer["usage"]["prompt_tokens"] == sum(fed)
        reply = await answer_job(worker, {"query": QUERY, "documents": docs, "truncate": False})
        assert reply.status == 400
        assert reply.body["error"]["code"] == "context_length_exceeded"
        assert "'documents' item 0" in reply.body["error"]["message"]
    finally:
        await worker.stop()


# ------------------------------------------------------------------ batching and the event loop


async def test_concurrent_requests_are_batched_together_off_the_event_loop(
    qwen3_worker, qwen3_ids, reference, monkeypatch
):
    model = model_of(qwen3_worker, qwen3_ids["reranker"])
    batches: list[int] = []
    threads: set[threading.Thread] = set()
    forward = model._forward

    def spy(batch_ids):  # records, then runs the real forward
        batches.append(len(batch_ids))
        threads.add(threading.current_thread())
        return forward(batch_ids)

    monkeypatch.setattr(model, "_forward", spy)
    queries = [f"query number {i}: {d[:20]}" for i, d in enumerate(DOCS)]
    requests = [(q, DOCS[i : i + 2]) for i, q in enumerate(queries[:6])]
    answers = await asyncio.gather(
        *(
            rerank(qwen3_worker, model=qwen3_ids["reranker"], query=q, documents=d)
            for q, d in requests
        )
    )
    for (query, docs), answer in zip(requests, answers):
        np.testing.assert_allclose(in_doc_order(answer), reference.scores(query, docs), atol=1e-5)
    # 12 pairs from 6 requests of 2, in full batches of 3: pairs of different requests share them.
    assert batches == [3, 3, 3, 3]
    assert threading.main_thread() not in threads and len(threads) == 1


async def test_a_failing_batch_fails_its_requests_and_the_model_keeps_serving(
    qwen3_worker, qwen3_ids, reference, monkeypatch
):
    model = model_of(qwen3_worker, qwen3_ids["reranker"])
    forward = model._forward
    calls = []

    def fail_once(batch_ids):  # the fault: a forward that raises (say, out of memory)
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return forward(batch_ids)

    monkeypatch.setattr(model, "_forward", fail_once)
    reply = await answer_job(
        qwen3_worker, {"model": qwen3_ids["reranker"], "query": QUERY, "documents": DOCS[:2]}
    )
    assert reply.status == 500 and reply.body["error"]["code"] == "internal_error"
    answer = await rerank(qwen3_worker, model=qwen3_ids["reranker"], query=QUERY, documents=DOCS)
    np.testing.assert_allclose(in_doc_order(answer), reference.scores(QUERY, DOCS), atol=1e-5)
    assert qwen3_worker.healthy


async def test_the_queue_bound_refuses_with_429(qwen3_worker, qwen3_ids, monkeypatch):
    model = model_of(qwen3_worker, qwen3_ids["reranker"])
    bound_queue(monkeypatch, model, max_items=3)
    first, second = await asyncio.gather(
        answer_job(
            qwen3_worker, {"model": qwen3_ids["reranker"], "query": "a", "documents": DOCS[:2]}
        ),
        answer_job(
            qwen3_worker, {"model": qwen3_ids["reranker"], "query": "b", "documents": DOCS[:2]}
        ),
    )
    assert first.status == 200
    assert second.status == 429 and second.body["error"]["code"] == "queue_full"
    assert model.pending == 0


# ------------------------------------------------------------------ errors


async def test_embedding_with_a_reranker_is_a_typed_error(qwen3_worker, qwen3_ids):
    reply = await answer_job(qwen3_worker, {"model": qwen3_ids["reranker"], "input": "x"})
    assert reply.status == 400 and reply.body["error"]["code"] == "model_not_embedding"


async def test_instruction_to_a_cross_encoder_is_an_error(worker, ids):
    reply = await answer_job(
        worker, {"model": ids["reranker"], "query": "q", "documents": ["a"], "instruction": "Judge"}
    )
    assert reply.status == 400 and reply.body["error"]["param"] == "instruction"


async def test_bad_instruction_type(qwen3_worker, qwen3_ids):
    reply = await answer_job(
        qwen3_worker,
        {"model": qwen3_ids["reranker"], "query": "q", "documents": ["a"], "instruction": ["x"]},
    )
    assert reply.status == 400 and reply.body["error"]["param"] == "instruction"


# ------------------------------------------------------------------ detection and MODEL_KINDS


@pytest.fixture(scope="module")
def causal_lm_with_st_layout(qwen3_reranker, tmp_path_factory) -> str:
    """A causal LM in sentence-transformers layout (like LLM-based embedders): not a reranker."""
    path = tmp_path_factory.mktemp("st-causal") / "causal-embedder"
    shutil.copytree(qwen3_reranker, path)
    (path / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
            ]
        )
    )
    return str(path)


def test_detection_from_the_model_files(
    qwen3_reranker,
    qwen3_single_logit_reranker,
    qwen3_embedder,
    bert_reranker,
    bert_embedder,
    causal_lm_with_st_layout,
):
    def kind(path, forced="auto"):
        return kind_of(ModelSpec(source=str(path), served_id="x", kind=forced), False).name

    assert kind(qwen3_reranker) == "llm-reranker"
    assert kind(qwen3_single_logit_reranker) == "llm-reranker"
    assert kind(qwen3_embedder) == "infinity"
    assert kind(bert_reranker) == "infinity"
    assert kind(bert_embedder) == "infinity"
    assert kind(causal_lm_with_st_layout) == "infinity"
    assert kind(qwen3_reranker, "infinity") == "infinity"
    assert kind(causal_lm_with_st_layout, "llm-reranker") == "llm-reranker"


async def test_model_kinds_forces_a_checkpoint_that_detection_misses(
    causal_lm_with_st_layout, reference
):
    config = load_config({"MODEL_NAMES": causal_lm_with_st_layout, "MODEL_KINDS": "llm-reranker"})
    worker = Worker(config, ModelRegistry.load(config.models, config.engine_settings))
    try:
        answer = await rerank(worker, query=QUERY, documents=DOCS[:3])
        np.testing.assert_allclose(
            in_doc_order(answer), reference.scores(QUERY, DOCS[:3]), atol=1e-5
        )
    finally:
        await worker.stop()


def test_forcing_llm_reranker_on_an_encoder_is_a_named_load_error(bert_embedder):
    config = load_config({"MODEL_NAMES": str(bert_embedder), "MODEL_KINDS": "llm-reranker"})
    with pytest.raises(ModelLoadError, match="tiny-bert-embedder.*cannot be an LLM reranker"):
        ModelRegistry.load(config.models, config.engine_settings)


def test_int8_is_refused_for_llm_rerankers(qwen3_reranker):
    config = load_config({"MODEL_NAMES": str(qwen3_reranker), "DTYPES": "int8"})
    with pytest.raises(ModelLoadError, match="tiny-qwen3-reranker.*dtype 'int8'"):
        ModelRegistry.load(config.models, config.engine_settings)
