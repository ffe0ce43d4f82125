"""One tokenization per text: the engine pads the worker's encodings instead of tokenizing again.

Checked against the replicas' own tokenize step (sentence-transformers on the real tokenizers): the
same tensors exactly, on right-padding WordPiece (MiniLM, tiny BERT) and left-padding BPE (Qwen3).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from embedding_worker.tokenization import ReusedEncodings, TokenCounter, TokenizedText, reuse_encodings
from tests.helpers import answer as embed
from tests.helpers import decode_vectors

# Not the probe texts the reuse is checked on when a model loads.
TEXTS = [
    "\tTabs, CAPITALS and trailing newlines\n\n",
    "émigré façade Zürich — 北京市 ☕",
    "one",
    "a longer sentence that pads every other row of the batch to its own length " * 3,
    "   ",
]


def _served(worker, tail: str):
    model = next(m for m in worker.registry.models if m.served_id.endswith(tail))
    return model, model.engine._model_replicas[0]


def _reused(replica) -> ReusedEncodings:
    step = replica.encode_pre.__wrapped__  # under the batch-thread guard
    assert isinstance(step, ReusedEncodings)
    return step


def _assert_same_tensors(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("tail", ["all-MiniLM-L6-v2", "tiny-bert-embedder", "tiny-qwen3-embedder"])
async def test_padded_encodings_equal_the_models_own_tokenize_step(worker, qwen3_worker, tail):
    model, replica = _served(qwen3_worker if "qwen3" in tail else worker, tail)
    assert model.tokens.reuse_up_to == model.max_length
    texts, lengths = model.tokens.tokenize(TEXTS)
    assert all(isinstance(t, TokenizedText) for t in texts)
    assert [str(t) for t in texts] == TEXTS  # the engine still gets the caller's text
    step = _reused(replica)
    own = step.own_step(TEXTS)
    _assert_same_tensors(step.pad([t.encoding for t in texts]), own)
    assert lengths == own["attention_mask"].sum(dim=1).tolist()


async def test_a_batch_without_encodings_takes_the_models_own_step(worker, monkeypatch):
    model, replica = _served(worker, "tiny-bert-embedder")
    step = _reused(replica)
    calls = []
    own_step = step.own_step
    monkeypatch.setattr(step, "own_step", lambda s: calls.append(list(s)) or own_step(s))
    texts, _ = model.tokens.tokenize(TEXTS[:2])
    step(texts)
    assert calls == []
    step([texts[0], "a plain string"])  # e.g. decoded token-id input
    assert calls == [[texts[0], "a plain string"]]


async def test_a_text_that_needs_truncating_is_left_to_the_engine(worker, ids, bert_embedder):
    model, _ = _served(worker, "tiny-bert-embedder")
    long_text = "many words here " * model.max_length
    texts, lengths = model.tokens.tokenize([long_text, "short"])
    assert not isinstance(texts[0], TokenizedText) and isinstance(texts[1], TokenizedText)
    assert lengths[0] > model.max_length
    # In one batch with a reused text, the answer is still sentence-transformers' (truncated).
    got = decode_vectors(
        await embed(worker, model=ids["embedder"], input=[long_text, "short"], truncate=True)
    )
    expected = SentenceTransformer(str(bert_embedder), device="cpu").encode(
        [long_text, "short"], normalize_embeddings=True
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
    return types.SimpleNamespace(_first_module=lambda: first_module, encode_pre=own_step)


def test_reuse_is_installed_only_where_it_reproduces_the_step_exactly(bert_embedder):
    st = SentenceTransformer(str(bert_embedder), device="cpu")
    faithful = _replica_like(st[0], st.tokenize)
    counter = TokenCounter(st.tokenizer)
    assert reuse_encodings(faithful, counter)
    assert isinstance(faithful.encode_pre, ReusedEncodings)

    # A model whose tokenize step adds to the text: the worker's encodings would differ.
    def own_step(texts):
        return st.tokenize([t + " [extra]" for t in texts])

    different = _replica_like(st[0], own_step)
    counter = TokenCounter(st.tokenizer)
    assert not reuse_encodings(different, counter)
    assert different.encode_pre is own_step
    assert counter.reuse_up_to == 0 and counter.prepare is None
    texts, _ = counter.tokenize(["hello"])
    assert not isinstance(texts[0], TokenizedText)
