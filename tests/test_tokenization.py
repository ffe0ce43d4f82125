"""One tokenization per text: the engine pads the worker's token ids instead of tokenizing again.

Checked against the replicas' own tokenize step (sentence-transformers on the real tokenizers): the
same tensors exactly, on right-padding WordPiece (MiniLM, tiny BERT) and left-padding BPE (Qwen3).
"""

from __future__ import annotations

import inspect
import types

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from embedding_worker.engines.tokenization import (
    ReusedTokenIds,
    Text,
    TokenCounter,
    pad_ids,
    reuse_token_ids,
)
from tests.helpers import answer as embed
from tests.helpers import decode_vectors, model_and_replica, worker_without

# Not the probe texts the reuse is checked on when a model loads.
TEXTS = [
    "\tTabs, CAPITALS and trailing newlines\n\n",
    "émigré façade Zürich — 北京市 ☕",
    "one",
    "a longer sentence that pads every other row of the batch to its own length " * 3,
    "   ",
]


def _reused(replica) -> ReusedTokenIds:
    step = inspect.unwrap(replica.encode_pre)  # under the worker's wrappers
    assert isinstance(step, ReusedTokenIds)
    return step


def _assert_same_tensors(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("tail", ["all-MiniLM-L6-v2", "tiny-bert-embedder", "tiny-qwen3-embedder"])
async def test_padded_ids_equal_the_models_own_tokenize_step(worker, qwen3_worker, tail):
    model, replica = model_and_replica(qwen3_worker if "qwen3" in tail else worker, tail)
    assert model.tokens.model_input is not None
    assert model.tokens.model_input.max_length == model.max_length
    texts = [*TEXTS, "words to cut " * model.max_length]
    tokenized, lengths = model.tokens.tokenize(texts)
    assert all(isinstance(t, Text) and t.ids is not None for t in tokenized)
    assert [t.text for t in tokenized] == texts  # the engine still gets the caller's text
    assert lengths[-1] > model.max_length == len(tokenized[-1].ids)  # counted whole, then cut
    step = _reused(replica)
    own = step.own_step(texts)
    _assert_same_tensors(step.pad(tokenized), own)
    assert lengths[:-1] == own["attention_mask"].sum(dim=1).tolist()[:-1]


async def test_a_batch_without_ids_takes_the_models_own_step(worker, monkeypatch):
    model, replica = model_and_replica(worker, "tiny-bert-embedder")
    step = _reused(replica)
    calls = []
    own_step = step.own_step
    monkeypatch.setattr(step, "own_step", lambda s: calls.append(list(s)) or own_step(s))
    texts, _ = model.tokens.tokenize(TEXTS[:2])
    step(texts)
    assert calls == []
    step([texts[0], "a plain string"])  # e.g. decoded token-id input
    assert calls == [[texts[0].text, "a plain string"]]  # the own step gets strings


async def test_a_cut_text_in_a_batch_embeds_as_in_sentence_transformers(worker, ids, bert_embedder):
    long_text = "many words here " * 200
    got = decode_vectors(
        await embed(worker, model=ids["embedder"], input=[long_text, "short"], truncate=True)
    )
    expected = SentenceTransformer(str(bert_embedder), device="cpu").encode(
        [long_text, "short"], normalize_embeddings=True
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)


async def test_with_reuse_off_the_engine_tokenizes_and_answers_the_same(bert_embedder):
    # What bench.handler_ab --without reuse measures against.
    worker = worker_without(
        {"MODEL_NAMES": str(bert_embedder), "DTYPES": "float32"}, reuse_token_ids=False
    )
    await worker.start()
    try:
        model, replica = model_and_replica(worker, "tiny-bert-embedder")
        assert model.tokens.model_input is None
        assert not isinstance(inspect.unwrap(replica.encode_pre), ReusedTokenIds)
        tokenized, _ = model.tokens.tokenize(TEXTS)
        assert not any(t.ids is not None for t in tokenized)
        got = decode_vectors(await embed(worker, model=model.served_id, input=TEXTS))
    finally:
        await worker.stop()
    expected = SentenceTransformer(str(bert_embedder), device="cpu").encode(
        TEXTS, normalize_embeddings=True
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)


async def test_usage_counts_the_text_the_model_sees(qwen3_worker, qwen3_ids, qwen3_embedder):
    # sentence-transformers strips each text before tokenizing; byte-level BPE counts spaces.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen3_embedder)
    text = "   padded with spaces   "
    assert len(tokenizer(text)["input_ids"]) != len(tokenizer(text.strip())["input_ids"])
    body = await embed(qwen3_worker, model=qwen3_ids["embedder"], input=[text])
    assert body["usage"]["prompt_tokens"] == len(tokenizer(text.strip())["input_ids"])


def _replica_like(first_module, own_step) -> types.SimpleNamespace:
    return types.SimpleNamespace(encode_pre=own_step)


@pytest.mark.parametrize("side", ["right", "left"])
def test_reuse_is_installed_only_where_it_reproduces_the_step_exactly(bert_embedder, side):
    st = SentenceTransformer(str(bert_embedder), device="cpu")
    st.tokenizer.truncation_side = side
    faithful = _replica_like(st[0], st.tokenize)
    counter = TokenCounter(st.tokenizer)
    assert reuse_token_ids(faithful, st[0], counter)
    assert isinstance(faithful.encode_pre, ReusedTokenIds)
    texts = ["first words " * 100 + "the end", "short"]
    tokenized, _ = counter.tokenize(texts)
    _assert_same_tensors(faithful.encode_pre.pad(tokenized), st.tokenize(texts))

    # A model whose tokenize step adds to the text: the worker's ids would differ.
    def own_step(texts):
        return st.tokenize([t + " [extra]" for t in texts])

    different = _replica_like(st[0], own_step)
    counter = TokenCounter(st.tokenizer)
    assert not reuse_token_ids(different, st[0], counter)
    assert different.encode_pre is own_step
    assert counter.model_input is None
    tokenized, _ = counter.tokenize(["hello"])
    assert tokenized[0].ids is None


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_ids_pads_as_the_tokenizer_does(bert_embedder, side):
    # The one padding step of every engine that pads ids itself (Infinity's embedders on reuse,
    # bge-m3, the LLM rerankers): the tensors of the tokenizer's own `pad`, dtype included.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bert_embedder)
    tokenizer.padding_side = side
    encoded = tokenizer(TEXTS)
    expected = dict(tokenizer.pad(encoded, return_tensors="pt"))
    type_ids = [np.array(row) for row in encoded["token_type_ids"]]
    got = pad_ids(
        encoded["input_ids"],
        tokenizer.pad_token_id,
        left=side == "left",
        type_ids=type_ids,
        pad_type_id=tokenizer.pad_token_type_id,
    )
    _assert_same_tensors(got, expected)
    without_types = pad_ids(encoded["input_ids"], tokenizer.pad_token_id, left=side == "left")
    assert without_types.keys() == {"input_ids", "attention_mask"}


def test_pad_ids_pads_to_a_width_longer_than_the_longest_row():
    right = pad_ids([[5, 6], [7]], 0, width=4)
    assert right["input_ids"].tolist() == [[5, 6, 0, 0], [7, 0, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    left = pad_ids([[5, 6], [7]], 0, left=True, width=1)  # a width shorter: the longest row's
    assert left["input_ids"].tolist() == [[5, 6], [0, 7]]


def test_long_texts_count_and_cut_as_the_tokenizer_does(minilm_path):
    """A few long texts take `encode_batch`, which releases the GIL (`encode` holds it for all of a
    text), and the cut at the start reads one token's word and offsets at a time: the counts and
    the kept ends are the tokenizer's own."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    counter = TokenCounter(tokenizer)
    words = " ".join(f"word{i} ünïcödé" for i in range(3000))  # ~50 kB, past the one-by-one rule
    texts = [words, "short", words[:20_000]]
    want = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    assert counter.count(texts) == want
    assert counter.tokenize(texts)[1] == want
    encoded = tokenizer(words, add_special_tokens=False, return_offsets_mapping=True)
    word_ids, first = encoded.word_ids(), len(encoded["input_ids"]) - 254
    while word_ids[first] == word_ids[first - 1]:
        first += 1
    assert counter.keep_end(words, 254) == words[encoded["offset_mapping"][first][0] :]
    assert counter.keep_end("short", 254) == "short"


async def test_a_text_far_past_the_maximum_is_cut_to_the_same_ids(worker, ids):
    """Past 8 times the model's maximum, a text is cut by a tokenizer that cuts while it encodes
    (`truncate` of the whole encoding held the GIL for seconds): the ids are those of the cut."""
    model = worker.registry.resolve(ids["minilm"], None)
    counter = model.tokens
    spec = counter.model_input
    assert spec is not None  # MiniLM takes the counter's ids
    text = " ".join(f"Word{i}, again" for i in range(2000))  # ~8,000 tokens: 30x the maximum
    [tokenized], [length] = counter.tokenize([text])
    whole = counter._fast.encode(spec.prepare(text), add_special_tokens=False)
    specials = counter._fast.num_special_tokens_to_add(False)
    assert length == len(whole) + specials > 8 * spec.max_length
    whole.truncate(spec.max_length - specials, direction=spec.truncation_side)
    want = counter._fast.post_process(whole)
    assert tokenized.ids.tolist() == want.ids and len(want.ids) == spec.max_length
    assert tokenized.type_ids.tolist() == want.type_ids
