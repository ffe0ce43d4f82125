"""POST /tokenize and /detokenize, TEI's and vLLM's shapes: the ids of the model's own tokenizer
(transformers' AutoTokenizer is the reference), counts equal to what an embeddings request bills,
offsets that map back to the text, both RunPod flavours, the local server and batch lines."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
from transformers import AutoTokenizer

from embedding_worker.transports.http import create_app
from embedding_worker.transports.runpod import answer_job, runpod_handler
from tests.helpers import call
from tests.test_server import ServerThread

TEXTS = [
    "Hello world",
    "  Leading and trailing spaces \n",
    "naïve café, Ærøskøbing, 東京, 🙂",
    "Tokenization splits words: unbelievably.",
]
TASK = "Given a web search query, retrieve relevant passages that answer the query"


@pytest.fixture(scope="module")
def minilm_tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def qwen3_tokenizer(qwen3_embedder):
    return AutoTokenizer.from_pretrained(qwen3_embedder)


async def ok(worker, job_input):
    reply = await answer_job(worker, job_input)
    assert reply.status == 200, reply.body
    return reply.body


async def tei_tokenize(worker, **body):
    return await ok(worker, {"openai_route": "/tokenize", "openai_input": body})


async def bad(worker, route, body):
    reply = await answer_job(worker, {"openai_route": route, "openai_input": body})
    assert reply.status in (400, 413), reply.body
    return reply.status, reply.body["error"]


# ------------------------------------------------------------------ ids, offsets, special tokens


@pytest.mark.parametrize("special", [True, False])
async def test_ids_are_the_tokenizers_with_and_without_special_tokens(
    worker, ids, minilm_tokenizer, special
):
    tokens = await tei_tokenize(
        worker, model=ids["minilm"], inputs=TEXTS, add_special_tokens=special
    )
    # sentence-transformers strips a text before its tokenizer sees it, and so does the count.
    want = minilm_tokenizer([t.strip() for t in TEXTS], add_special_tokens=special)["input_ids"]
    assert [[token["id"] for token in each] for each in tokens] == want
    for each in tokens:
        specials = [token["special"] for token in each]
        assert specials == (
            [True] + [False] * (len(each) - 2) + [True] if special else [False] * len(each)
        )


async def test_offsets_map_back_to_the_text(worker, ids, minilm_tokenizer):
    (tokens,) = await tei_tokenize(worker, model=ids["minilm"], inputs=[TEXTS[1]])
    assert tokens[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert tokens[-1]["text"] == "[SEP]" and tokens[-1]["start"] is None
    words = tokens[1:-1]
    # Each token's text is its slice of the input (spaces it stripped included in the positions).
    assert [TEXTS[1][t["start"] : t["stop"]] for t in words] == [t["text"] for t in words]
    assert words[0]["start"] == TEXTS[1].index("Leading")
    # WordPiece lower-cases: the slice is the text's own case, the token string the vocabulary's.
    strings = minilm_tokenizer.convert_ids_to_tokens([t["id"] for t in words])
    assert [s.removeprefix("##") for s in strings] == [t["text"].lower() for t in words]


async def test_vllm_shape_counts_and_token_strings(worker, ids, minilm_tokenizer):
    text = TEXTS[3]
    body = {"model": ids["minilm"], "prompt": text, "return_token_strs": True}
    answer = await ok(worker, {"openai_route": "/tokenize", "openai_input": body})
    want = minilm_tokenizer(text)["input_ids"]
    assert answer["tokens"] == want and answer["count"] == len(want)
    assert answer["token_strs"] == minilm_tokenizer.convert_ids_to_tokens(want)
    assert answer["max_model_len"] == 256  # all-MiniLM-L6-v2's max_seq_length
    plain = await ok(worker, {"model": ids["minilm"], "prompt": text, "return_offsets": True})
    assert plain["token_strs"] is None and plain["tokens"] == want
    offsets = plain["offsets"]
    assert offsets[0] is None and offsets[-1] is None
    assert text[offsets[1][0] : offsets[1][1]] == "Tokenization"[: offsets[1][1]]


# ------------------------------------------------------------------ what embeddings bill


@pytest.mark.parametrize(
    "prompt",
    [{}, {"prompt_type": "query"}, {"instruction": TASK}, {"input_type": "search_query"}],
)
async def test_the_count_is_what_embeddings_bill_after_the_models_prompt(
    qwen3_worker, qwen3_ids, qwen3_tokenizer, prompt
):
    model = qwen3_ids["embedder"]
    query = "What is the capital of China?"
    counted = await ok(qwen3_worker, {"model": model, "prompt": query, **prompt})
    embedding_fields = {"prompt_type": "query"} if "input_type" in prompt else prompt
    embedded = await ok(qwen3_worker, {"model": model, "input": [query], **embedding_fields})
    assert counted["count"] == embedded["usage"]["prompt_tokens"]
    prefix = "" if not prompt else f"Instruct: {TASK}\nQuery:"
    assert counted["tokens"] == qwen3_tokenizer(prefix + query)["input_ids"]
    # TEI's prompt_name is prompt_type; its token texts spell the prompted text.
    tei = await tei_tokenize(qwen3_worker, model=model, inputs=query, prompt_name="query")
    assert "".join(t["text"] for t in tei[0] if not t["special"]) == (
        f"Instruct: {TASK}\nQuery:" + query
    )


# ------------------------------------------------------------------ detokenize


async def test_detokenize_round_trips_in_both_shapes(worker, ids, minilm_tokenizer):
    id_lists = minilm_tokenizer(TEXTS[:2])["input_ids"]
    route = {"openai_route": "/detokenize"}
    tei = await ok(worker, {**route, "openai_input": {"model": ids["minilm"], "ids": id_lists}})
    assert tei == [t.strip().lower() for t in TEXTS[:2]]  # MiniLM's vocabulary is lower-case
    kept = await ok(
        worker,
        {
            **route,
            "openai_input": {
                "model": ids["minilm"],
                "ids": id_lists[0],
                "skip_special_tokens": False,
            },
        },
    )
    assert kept == ["[CLS] hello world [SEP]"]
    vllm = await ok(worker, {"model": ids["minilm"], "tokens": id_lists[0]})  # standard flavour
    assert vllm == {"prompt": minilm_tokenizer.decode(id_lists[0])}


# ------------------------------------------------------------------ flavours, server, batch lines


async def test_standard_jobs_are_told_apart_without_taking_other_jobs(worker, ids):
    embedded = await ok(worker, {"model": ids["minilm"], "input": "hello", "prompt": "x"})
    assert embedded["object"] == "list"  # `input` stays an embeddings job
    counted = await ok(worker, {"model": ids["minilm"], "prompt": "hello"})
    assert counted["count"] == 3 and "service_tier" not in counted
    decoded = await ok(worker, {"model": ids["minilm"], "ids": [7592]})
    assert decoded == ["hello"]
    # A standard-flavour `inputs` is contextualized chunk embeddings' (documents of chunks), never
    # tokenize's: TEI's string is refused naming the shape.
    reply = await answer_job(worker, {"model": ids["minilm"], "inputs": "hello"})
    assert reply.status == 400 and reply.body["error"]["param"] == "inputs"
    assert "documents" in reply.body["error"]["message"]
    # The OpenAI proxy flavour answers in a one-element list.
    proxied = await runpod_handler(worker)(
        {
            "id": "j",
            "input": {
                "openai_route": "/tokenize",
                "openai_input": {"inputs": "hello", "model": ids["minilm"]},
            },
        }
    )
    assert [[t["id"] for t in each] for each in proxied[0]] == [[101, 7592, 102]]


async def test_the_local_server_answers_over_http(worker, ids, minilm_tokenizer):
    with ServerThread(create_app(worker)) as server, httpx.Client(base_url=server.url) as http:
        tei = http.post("/tokenize", json={"model": ids["minilm"], "inputs": ["Hello world"]})
        assert tei.status_code == 200
        assert [t["text"] for t in tei.json()[0]] == ["[CLS]", "Hello", "world", "[SEP]"]
        vllm = http.post("/tokenize", json={"model": ids["minilm"], "prompt": "Hello world"})
        assert vllm.json()["tokens"] == minilm_tokenizer("Hello world")["input_ids"]
        back = http.post(
            "/detokenize", json={"model": ids["minilm"], "tokens": vllm.json()["tokens"]}
        )
        assert back.json() == {"prompt": "[CLS] hello world [SEP]"}
        refused = http.post("/tokenize", json={"model": ids["minilm"], "inputs": [3]})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "inputs"


async def test_batch_lines_answer_as_single_requests(worker, ids):
    lines = [
        {
            "custom_id": "tei",
            "url": "/tokenize",
            "body": {"model": ids["minilm"], "inputs": ["a b"]},
        },
        {
            "custom_id": "vllm",
            "url": "/tokenize",
            "body": {"model": ids["minilm"], "prompt": "a b"},
        },
        {
            "custom_id": "back",
            "url": "/detokenize",
            "body": {"model": ids["minilm"], "ids": [1037]},
        },
    ]
    output = await runpod_handler(worker)({"id": "job-1", "input": {"batch": lines}})
    by_id = {line["custom_id"]: line["response"] for line in output["data"]}
    for line in lines:
        single = await call(worker, line["url"], line["body"])
        assert by_id[line["custom_id"]]["status_code"] == 200
        assert by_id[line["custom_id"]]["body"] == single.body
    json.dumps(output)


# ------------------------------------------------------------------ bad input


async def test_bad_input_gets_the_typed_errors_of_embeddings(worker, ids):
    model = ids["minilm"]
    limit = worker.limits.max_inputs
    status, error = await bad(worker, "/tokenize", {"model": model, "inputs": ["x"] * (limit + 1)})
    assert (status, error["param"]) == (400, "inputs") and str(limit) in error["message"]
    status, error = await bad(worker, "/tokenize", {"model": model, "inputs": ["ok", 7]})
    assert (status, error["code"], error["param"]) == (400, "invalid_input", "inputs")
    status, error = await bad(worker, "/tokenize", {"model": model, "prompt": ""})
    assert error["param"] == "prompt"
    status, error = await bad(
        worker, "/tokenize", {"model": model, "prompt": "x", "prompt_type": "q"}
    )
    assert error["param"] == "prompt_type"  # MiniLM declares no prompts
    status, error = await bad(worker, "/detokenize", {"model": model, "ids": [[101], [10**9]]})
    assert error["param"] == "ids" and "vocabulary" in error["message"]
    assert str(10**9) in error["message"]  # the id, which is not payload text
    status, error = await bad(worker, "/detokenize", {"model": model, "tokens": [-1]})
    assert error["param"] == "tokens"
    status, error = await bad(worker, "/detokenize", {"model": model, "tokens": [True]})
    assert error["param"] == "tokens"
    reply = await answer_job(worker, {"prompt": "x"})  # three models served: name one
    assert reply.status == 400 and reply.body["error"]["param"] == "model"


async def test_the_token_limit_of_a_request_holds(worker, ids, monkeypatch):
    monkeypatch.setattr(worker, "limits", dataclasses.replace(worker.limits, max_request_tokens=10))
    status, error = await bad(worker, "/tokenize", {"model": ids["minilm"], "prompt": "a " * 20})
    assert (status, error["code"]) == (400, "request_too_large")
    status, error = await bad(
        worker, "/detokenize", {"model": ids["minilm"], "tokens": [1037] * 11}
    )
    assert (status, error["code"]) == (400, "request_too_large")
    assert (await call(worker, "/tokenize", {"model": ids["minilm"], "prompt": "a " * 8})).ok
