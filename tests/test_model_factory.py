"""Sanity checks for tests/model_factory.py: each tiny model loads offline where it should."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")

import numpy as np
import pytest
import torch

from tests import model_factory as mf

TEXTS = [
    "What is the capital of China?",
    "The capital of China is Beijing, a large city in the north.",
    "yes",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("factory")
    paths = {
        "bert_emb": mf.make_bert_embedder(root / "bert-emb"),
        "bert_ce": mf.make_bert_cross_encoder(root / "bert-ce"),
        "qwen_emb": mf.make_qwen3_embedder(root / "qwen-emb"),
        "qwen_lm": mf.make_qwen3_reranker(root / "qwen-rr"),
    }
    paths["qwen_seq"] = mf.make_qwen3_single_logit_reranker(paths["qwen_lm"], root / "qwen-rr-seq")
    return paths


def _engine_args(path: Path):
    from infinity_emb import EngineArgs

    return EngineArgs(
        model_name_or_path=str(path),
        engine="torch",
        device="cpu",
        bettertransformer=False,
        model_warmup=False,
        trust_remote_code=False,
        batch_size=4,
    )


def test_bert_embedder_sentence_transformers(models):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(models["bert_emb"]), device="cpu")
    assert st.max_seq_length == 128
    emb = st.encode(TEXTS, convert_to_numpy=True)
    assert emb.shape == (3, 32)
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert "[UNK]" not in st.tokenizer("Email: x@y.com, #42 ~ok!").tokens()


def test_bert_cross_encoder(models):
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(models["bert_ce"]), device="cpu")
    scores = ce.predict([(TEXTS[0], TEXTS[1]), (TEXTS[0], TEXTS[2])])
    assert scores.shape == (2,)
    assert np.isfinite(scores).all()


def test_deterministic(tmp_path):
    a = mf.make_bert_embedder(tmp_path / "a", seed=3)
    b = mf.make_bert_embedder(tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_infinity_bert_embed_and_rerank(models):
    from infinity_emb import AsyncEngineArray

    async def run():
        array = AsyncEngineArray.from_args(
            [_engine_args(models["bert_emb"]), _engine_args(models["bert_ce"])]
        )
        emb_engine, rr_engine = array[0], array[1]
        assert "embed" in emb_engine.capabilities
        assert rr_engine.capabilities == {"rerank"}
        await array.astart()
        try:
            emb, _ = await emb_engine.embed(sentences=TEXTS)
            ranked, _ = await rr_engine.rerank(query=TEXTS[0], docs=TEXTS[1:])
        finally:
            await array.astop()
        return np.asarray(emb), ranked

    emb, ranked = asyncio.run(run())
    assert emb.shape == (3, 32) and np.isfinite(emb).all()
    assert len(ranked) == 2 and all(np.isfinite(r.relevance_score) for r in ranked)


def test_qwen3_embedder(models):
    from sentence_transformers import SentenceTransformer

    path = models["qwen_emb"]
    st = SentenceTransformer(str(path), device="cpu")
    tok = st.tokenizer
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.padding_side == "left" and tok.pad_token_id == eos
    assert tok("hello world")["input_ids"][-1] == eos
    long = tok(" ".join(["word"] * 50), truncation=True, max_length=8)["input_ids"]
    assert len(long) == 8 and long[-1] == eos  # truncation keeps the appended eos
    assert st.prompts["query"] == mf.QWEN3_QUERY_PROMPT and st.prompts["document"] == ""
    assert st.default_prompt_name is None

    emb = st.encode(TEXTS, convert_to_numpy=True)
    assert emb.shape == (3, 32) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # last-token pooling is right with left padding: batched == one at a time
    single = np.stack([st.encode([t], convert_to_numpy=True)[0] for t in TEXTS])
    np.testing.assert_allclose(emb, single, atol=1e-5)
    q = st.encode(TEXTS[:1], prompt_name="query", convert_to_numpy=True)
    assert np.isfinite(q).all() and not np.allclose(q[0], emb[0])


def test_qwen3_in_infinity(models):
    from infinity_emb import AsyncEngineArray
    from sentence_transformers import SentenceTransformer

    async def run():
        array = AsyncEngineArray.from_args(
            [_engine_args(models["qwen_emb"]), _engine_args(models["qwen_seq"])]
        )
        assert array[1].capabilities == {"rerank"}
        await array.astart()
        try:
            emb, _ = await array[0].embed(sentences=TEXTS)
            ranked, _ = await array[1].rerank(query=TEXTS[0], docs=TEXTS[1:])
        finally:
            await array.astop()
        return np.asarray(emb), ranked

    emb, ranked = asyncio.run(run())
    assert len(ranked) == 2 and all(np.isfinite(r.relevance_score) for r in ranked)
    ref = SentenceTransformer(str(models["qwen_emb"]), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(emb, ref, atol=1e-5)


def test_qwen3_reranker_tokenizer_and_lm(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["qwen_lm"])
    assert tok.padding_side == "left"
    yes_id, no_id = mf.yes_no_token_ids(tok)
    assert tok("yes")["input_ids"] == [yes_id] and tok("no")["input_ids"] == [no_id]
    text = mf.format_reranker_input(TEXTS[0], TEXTS[1])
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] != tok.convert_tokens_to_ids("<|endoftext|>")  # nothing appended
    for special in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert tok.convert_tokens_to_ids(special) in ids
    assert tok.decode(ids) == text  # byte-level round trip, newlines included

    model = AutoModelForCausalLM.from_pretrained(models["qwen_lm"]).eval()
    with torch.no_grad():
        logits = model(**tok([text], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_single_logit_equals_yes_minus_no(models):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    tok = AutoTokenizer.from_pretrained(models["qwen_seq"])
    yes_id, no_id = mf.yes_no_token_ids(tok)
    lm = AutoModelForCausalLM.from_pretrained(models["qwen_lm"]).eval()
    seq = AutoModelForSequenceClassification.from_pretrained(models["qwen_seq"]).eval()
    assert seq.config.architectures == ["Qwen3ForSequenceClassification"]
    assert seq.config.num_labels == 1 and seq.config.pad_token_id == tok.pad_token_id

    texts = [mf.format_reranker_input(TEXTS[0], d) for d in (TEXTS[1], "no", "A long " * 20)]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 0).any()  # really left-padded
    with torch.no_grad():
        last = lm(**batch).logits[:, -1, :]
        single = seq(**batch).logits[:, 0]
    expected = last[:, yes_id] - last[:, no_id]
    assert torch.isfinite(single).all()
    assert (single - expected).abs().max().item() <= 1e-5
