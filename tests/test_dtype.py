"""DTYPES=auto: bfloat16 on CPUs that compute it natively, float32 on other CPUs, Infinity's own on
GPUs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from embedding_worker.cpu import cpu_flags
from embedding_worker.dispatch import Worker
from embedding_worker.engines import dtype as dtype_policy
from embedding_worker.engines.dtype import resolve_dtype
from embedding_worker.transports.runpod import answer_job
from tests.helpers import decode_vectors

TEXTS = [
    "a kitten sleeps on the sofa",
    "The central bank raised interest rates by a quarter point on Thursday, citing inflation.",
    "how do I reset my password",
    " ".join(["long passages cover many topics in turn, from weather to markets to sport"] * 12),
]


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "fp8"])
def test_an_explicit_dtype_is_never_changed(dtype, cpu_only, monkeypatch):
    monkeypatch.setattr(dtype_policy, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype(dtype, "torch") == dtype


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_on_a_cpu_follows_native_bfloat16(native, expected, cpu_only, monkeypatch):
    monkeypatch.setattr(dtype_policy, "cpu_has_native_bf16", lambda: native)
    assert resolve_dtype("auto", "torch") == expected


def test_auto_keeps_rerankers_in_float32_and_embedders_in_bfloat16(
    bert_embedder, bert_reranker, minilm_path, cpu_only, monkeypatch
):
    monkeypatch.setattr(dtype_policy, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "torch", str(bert_reranker)) == "float32"
    assert resolve_dtype("auto", "torch", str(bert_embedder)) == "bfloat16"
    assert resolve_dtype("auto", "torch", str(minilm_path)) == "bfloat16"
    assert resolve_dtype("bfloat16", "torch", str(bert_reranker)) == "bfloat16"  # asked for: kept


def test_auto_on_a_gpu_is_left_to_infinity(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dtype_policy, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "torch") == "auto"


def test_auto_with_another_backend_is_left_to_it(cpu_only, monkeypatch):
    monkeypatch.setattr(dtype_policy, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "optimum") == "auto"


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux CPU flags")
def test_native_bf16_probe_agrees_with_the_cpu_flags():
    flags = cpu_flags()
    assert flags  # Linux names them
    assert dtype_policy.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


async def test_auto_vectors_stay_within_cosine_0999_of_float32(worker, ids):
    auto = Worker.from_config(load_config({"MODEL_NAMES": DEFAULT_MODEL_ID, "DTYPES": "auto"}))
    await auto.start()
    try:
        model = auto.registry.models[0]
        loaded = next(model.engine._model_replicas[0].parameters()).dtype
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            assert loaded == (
                torch.bfloat16 if dtype_policy.cpu_has_native_bf16() else torch.float32
            )
        got = await answer_job(auto, {"input": TEXTS, "encoding_format": "base64"})
        ref = await answer_job(worker, {"model": ids["minilm"], "input": TEXTS})
    finally:
        await auto.stop()
    assert got.status == 200 and ref.status == 200
    a, b = decode_vectors(got.body), decode_vectors(ref.body)
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() >= 0.999, cosine
