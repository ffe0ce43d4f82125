"""Instruction-aware embeddings (Qwen3-Embedding): exact prompt strings, both flavours, real
clients.

The reference is the Qwen3-Embedding model card's recipe with plain transformers: left padding,
last-token pooling, L2 normalisation, and `Instruct: {task}\\nQuery:{query}` written out here.
"""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from openai import AsyncOpenAI
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.runpod import answer_job
from tests.helpers import answer as embed
from tests.helpers import decode_vectors

TASK = "Given a web search query, retrieve relevant passages that answer the query"
QUERIES = [
    "What is the capital of China?",
    "Explain gravity",
    "how to cook rice on the stove without burning it at the bottom of the pot",
    "why",
    "Which planet is the largest in our solar system, and how many moons does it have?",
    "Paris",
    "Can dogs eat chocolate?",
]


# ------------------------------------------------------------------ the model card, verbatim


def get_detailed_instruct(task_description: str, query: str) -> str:
    return f"Instruct: {task_description}\nQuery:{query}"


def last_token_pool(last_hidden_states, attention_mask):
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    batch_size = last_hidden_states.shape[0]
    return last_hidden_states[
        torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths
    ]


class Reference:
    def __init__(self, path):
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int, max_length: int = 8192) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch_dict = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            outputs = self.model(**batch_dict)
            embeddings = last_token_pool(outputs.last_hidden_state, batch_dict["attention_mask"])
            out.append(F.normalize(embeddings, p=2, dim=1).numpy())
        return np.concatenate(out)

    def tokens(self, texts: list[str]) -> int:
        return sum(len(ids) for ids in self.tokenizer(texts)["input_ids"])


@pytest.fixture(scope="module")
def reference(qwen3_embedder) -> Reference:
    return Reference(qwen3_embedder)


# ------------------------------------------------------------------ helpers


async def error(worker, **body):
    reply = await answer_job(worker, body)
    assert reply.status == 400, reply.body
    return reply.body["error"]


# ------------------------------------------------------------------ golden strings and vectors


@pytest.mark.parametrize("batch_size", [1, 3, len(QUERIES)])
async def test_instruction_matches_the_model_card_across_batches_and_padding(
    qwen3_worker, qwen3_ids, reference, batch_size
):
    task = "Given a question, find the passage that answers it"
    body = await embed(qwen3_worker, model=qwen3_ids["embedder"], input=QUERIES, instruction=task)
    golden = [f"Instruct: {task}\nQuery:{q}" for q in QUERIES]
    assert golden == [get_detailed_instruct(task, q) for q in QUERIES]
    np.testing.assert_allclose(decode_vectors(body), reference.embed(golden, batch_size), atol=1e-5)
    assert body["usage"] == {
        "prompt_tokens": reference.tokens(golden),
        "total_tokens": reference.tokens(golden),
    }


async def test_the_exact_spacing_matters(qwen3_worker, qwen3_ids, reference):
    # What the public fork sent (a space after "Query:") embeds differently: the golden test can
    # fail.
    body = await embed(
        qwen3_worker, model=qwen3_ids["embedder"], input=QUERIES[:3], instruction=TASK
    )
    spaced = reference.embed([f"Instruct: {TASK}\nQuery: {q}" for q in QUERIES[:3]], 3)
    assert np.abs(decode_vectors(body) - spaced).max() > 1e-3


async def test_prompt_type_query_is_the_models_own_prompt(qwen3_worker, qwen3_ids, reference):
    body = await embed(
        qwen3_worker, model=qwen3_ids["embedder"], input=QUERIES, prompt_type="query"
    )
    golden = [
        "Instruct: Given a web search query, retrieve relevant passages that answer the query\n"
        f"Query:{q}"
        for q in QUERIES
    ]
    np.testing.assert_allclose(decode_vectors(body), reference.embed(golden, 4), atol=1e-5)
    assert body["usage"]["prompt_tokens"] == reference.tokens(golden)


@pytest.mark.parametrize(
    "fields",
    [{}, {"prompt_type": "document"}, {"prompt_type": "document", "instruction": "ignored here"}],
)
async def test_documents_and_plain_requests_are_not_prefixed(
    qwen3_worker, qwen3_ids, reference, fields
):
    body = await embed(qwen3_worker, model=qwen3_ids["embedder"], input=QUERIES, **fields)
    np.testing.assert_allclose(decode_vectors(body), reference.embed(QUERIES, 2), atol=1e-5)
    assert body["usage"]["prompt_tokens"] == reference.tokens(QUERIES)


async def test_instruction_with_prompt_type_query_replaces_the_task(
    qwen3_worker, qwen3_ids, reference
):
    task = "Find {braces} and \\n literally"  # braces and backslashes are text, never a template
    body = await embed(
        qwen3_worker,
        model=qwen3_ids["embedder"],
        input=QUERIES[:2],
        prompt_type="query",
        instruction=task,
    )
    golden = [f"Instruct: {task}\nQuery:{q}" for q in QUERIES[:2]]
    np.testing.assert_allclose(decode_vectors(body), reference.embed(golden, 2), atol=1e-5)


async def test_token_id_inputs_are_never_prefixed(qwen3_worker, qwen3_ids, reference):
    ids = [reference.tokenizer.encode(q, add_special_tokens=False) for q in QUERIES[:3]]
    body = await embed(
        qwen3_worker, model=qwen3_ids["embedder"], input=ids, instruction=TASK, prompt_type="query"
    )
    np.testing.assert_allclose(decode_vectors(body), reference.embed(QUERIES[:3], 3), atol=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(len(i) for i in ids)


# ------------------------------------------------------------------ both flavours, real client


async def test_openai_route_top_level_and_nested_extra_body(qwen3_worker, qwen3_ids, reference):
    golden = reference.embed([get_detailed_instruct("Find it", q) for q in QUERIES[:2]], 2)
    base = {"model": qwen3_ids["embedder"], "input": QUERIES[:2]}
    for body in (
        {**base, "instruction": "Find it"},  # what the openai SDK sends for extra_body
        {**base, "extra_body": {"instruction": "Find it"}},  # hand-written JSON
        {**base, "extra_body": {"prompt_type": "query"}, "instruction": "Find it"},
    ):
        reply = await answer_job(
            qwen3_worker, {"openai_route": "/v1/embeddings", "openai_input": body}
        )
        assert reply.status == 200, reply.body
        np.testing.assert_allclose(decode_vectors(reply.runpod_output()[0]), golden, atol=1e-5)
    standard = await embed(qwen3_worker, **base, extra_body={"instruction": "Find it"})
    np.testing.assert_allclose(decode_vectors(standard), golden, atol=1e-5)


async def test_the_openai_sdk_extra_body_reaches_the_model(qwen3_worker, qwen3_ids, reference):
    sent = []

    async def proxy(request: httpx.Request) -> httpx.Response:
        # RunPod's OpenAI proxy: the SDK's body becomes the job's openai_input.
        body = json.loads(request.content)
        sent.append(body)
        route = request.url.path.removeprefix("/openai")
        reply = await answer_job(qwen3_worker, {"openai_route": route, "openai_input": body})
        return httpx.Response(
            reply.status, json=reply.runpod_output()[0] if reply.ok else reply.body
        )

    client = AsyncOpenAI(
        base_url="http://endpoint.invalid/openai/v1",
        api_key="unused",
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(proxy)),
    )
    result = await client.embeddings.create(
        model=qwen3_ids["embedder"], input=QUERIES[:3], extra_body={"instruction": "Find it"}
    )
    assert sent[0]["instruction"] == "Find it" and "extra_body" not in sent[0]
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    golden = [get_detailed_instruct("Find it", q) for q in QUERIES[:3]]
    np.testing.assert_allclose(got, reference.embed(golden, 3), atol=1e-5)
    assert result.usage.prompt_tokens == reference.tokens(golden)


# ------------------------------------------------------------------ errors and other models


async def test_unknown_prompt_type_lists_the_models_prompts(qwen3_worker, qwen3_ids):
    err = await error(qwen3_worker, model=qwen3_ids["embedder"], input="x", prompt_type="passage")
    assert err["param"] == "prompt_type" and err["code"] == "invalid_input"
    assert "'query', 'document'" in err["message"]


@pytest.mark.parametrize("field", ["instruction", "prompt_type"])
async def test_non_string_fields_are_typed_errors(qwen3_worker, qwen3_ids, field):
    err = await error(qwen3_worker, model=qwen3_ids["embedder"], input="x", **{field: 3})
    assert err["param"] == field


async def test_models_without_prompts_are_never_prefixed(worker, ids, bert_embedder):
    plain = await embed(worker, model=ids["embedder"], input=QUERIES[:2])
    expected = SentenceTransformer(str(bert_embedder), device="cpu").encode(
        QUERIES[:2], normalize_embeddings=True
    )
    np.testing.assert_allclose(decode_vectors(plain), expected, atol=1e-5)
    err = await error(worker, model=ids["embedder"], input="x", instruction=TASK)
    assert err["param"] == "instruction" and "no instruction template" in err["message"]
    err = await error(worker, model=ids["embedder"], input="x", prompt_type="query")
    assert err["param"] == "prompt_type" and "its prompts: none" in err["message"]


async def test_default_prompt_name_applies_as_in_sentence_transformers(
    qwen3_embedder, tmp_path, reference
):
    path = tmp_path / "qwen3-default-query"
    shutil.copytree(qwen3_embedder, path)
    st_config = path / "config_sentence_transformers.json"
    st_config.write_text(
        json.dumps({**json.loads(st_config.read_text()), "default_prompt_name": "query"})
    )
    worker = Worker.from_config(load_config({"MODEL_NAMES": str(path), "DTYPES": "float32"}))
    try:
        plain = await embed(worker, input=QUERIES[:3])
        document = await embed(worker, input=QUERIES[:3], prompt_type="document")
    finally:
        await worker.stop()
    expected = SentenceTransformer(str(path), device="cpu").encode(QUERIES[:3])  # default prompt
    np.testing.assert_allclose(decode_vectors(plain), expected, atol=1e-5)
    np.testing.assert_allclose(decode_vectors(document), reference.embed(QUERIES[:3], 3), atol=1e-5)
