"""Shared fixtures: real Infinity engines on real and tiny random models, no network."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub or infinity_emb: no hub, no telemetry.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["INFINITY_ANONYMOUS_USAGE_STATS"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from embedding_worker.config import DEFAULT_MODEL_ID, load_config  # noqa: E402
from embedding_worker.dispatch import Worker  # noqa: E402
from tests import model_factory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def bert_embedder(models_dir) -> Path:
    return model_factory.make_bert_embedder(models_dir / "tiny-bert-embedder")


@pytest.fixture(scope="session")
def bert_reranker(models_dir) -> Path:
    return model_factory.make_bert_cross_encoder(models_dir / "tiny-bert-reranker")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from embedding_worker.config import bundled_model_path

    return bundled_model_path()


@pytest.fixture(scope="session")
def worker_env(bert_embedder, bert_reranker) -> dict[str, str]:
    """The environment of the shared worker: the bundled model and two tiny BERTs."""
    return {
        "MODEL_NAMES": f"{DEFAULT_MODEL_ID};{bert_embedder};{bert_reranker}",
        "BATCH_SIZES": "16",
        "DTYPES": "float32",
    }


@pytest.fixture(scope="session")
async def worker(worker_env):
    worker = Worker.from_config(load_config(worker_env))
    await worker.start()
    yield worker
    await worker.stop()


@pytest.fixture(scope="session")
def ids(worker) -> dict[str, str]:
    """Served ids by short name."""
    by_tail = {m.served_id.rsplit("/", 1)[-1]: m.served_id for m in worker.registry.models}
    return {
        "minilm": DEFAULT_MODEL_ID,
        "embedder": by_tail["tiny-bert-embedder"],
        "reranker": by_tail["tiny-bert-reranker"],
    }


# ------------------------------------------------------------------ Qwen3 (instructions, LLM
# rerankers)


@pytest.fixture(scope="session")
def qwen3_embedder(models_dir) -> Path:
    return model_factory.make_qwen3_embedder(models_dir / "tiny-qwen3-embedder")


@pytest.fixture(scope="session")
def qwen3_reranker(models_dir) -> Path:
    return model_factory.make_qwen3_reranker(models_dir / "tiny-qwen3-reranker")


@pytest.fixture(scope="session")
def qwen3_single_logit_reranker(models_dir, qwen3_reranker) -> Path:
    return model_factory.make_qwen3_single_logit_reranker(
        qwen3_reranker, models_dir / "tiny-qwen3-reranker-seq-cls"
    )


@pytest.fixture(scope="session")
async def qwen3_worker(qwen3_embedder, qwen3_reranker, qwen3_single_logit_reranker):
    """A worker serving the tiny Qwen3 embedder, the causal LM reranker and its single-logit form.

    Batch size 3, so that a handful of inputs already spans several batches with padding.
    """
    env = {
        "MODEL_NAMES": f"{qwen3_embedder};{qwen3_reranker};{qwen3_single_logit_reranker}",
        "BATCH_SIZES": "3",
        "DTYPES": "float32",
    }
    worker = Worker.from_config(load_config(env))
    await worker.start()
    yield worker
    await worker.stop()


@pytest.fixture(scope="session")
def qwen3_ids(qwen3_worker) -> dict[str, str]:
    by_tail = {m.served_id.rsplit("/", 1)[-1]: m.served_id for m in qwen3_worker.registry.models}
    return {
        "embedder": by_tail["tiny-qwen3-embedder"],
        "reranker": by_tail["tiny-qwen3-reranker"],
        "single_logit": by_tail["tiny-qwen3-reranker-seq-cls"],
    }


# ------------------------------------------------------------------ bge-m3 (dense, sparse,
# multi-vector)


@pytest.fixture(scope="session")
def bge_m3(models_dir) -> Path:
    return model_factory.make_bge_m3(models_dir / "tiny-bge-m3")


@pytest.fixture(scope="session")
async def bge_m3_worker(bge_m3, bert_embedder):
    """A worker serving the tiny bge-m3 model beside a tiny BERT embedder (dense only).

    Batch size 3, so that a handful of inputs already spans several batches with padding.
    """
    env = {"MODEL_NAMES": f"{bge_m3};{bert_embedder}", "BATCH_SIZES": "3", "DTYPES": "float32"}
    worker = Worker.from_config(load_config(env))
    await worker.start()
    yield worker
    await worker.stop()


# ------------------------------------------------------------------ make test-fast

# What makes a test slow: a process of its own, or models loaded beyond the shared `worker`.
_SLOW_SIGNS = ("subprocess", "Popen", "handler.py", "Worker.from_config", "ModelRegistry.load")
_SHARED = {"worker"}  # the one worker the whole suite shares
# Modules whose helpers (not the tests' own code) start processes.
_SLOW_MODULES = {
    "test_allocator",
    "test_deploy",
    "test_handler_process",
    "test_startup",
    "test_cli",
    "test_image",
}


def _source(function) -> str:
    import inspect

    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def pytest_collection_modifyitems(config, items):
    """Mark `slow` every test whose code, or a fixture it uses, starts a process or loads models
    of its own; `make test-fast` runs the rest (`-m "not slow"`)."""
    for item in items:
        sources = [_source(getattr(item, "function", None))]
        for name, definitions in item._fixtureinfo.name2fixturedefs.items():
            if name not in _SHARED:
                sources += [_source(d.func) for d in definitions]
        slow_module = item.module.__name__.rsplit(".", 1)[-1] in _SLOW_MODULES
        if slow_module or any(sign in text for text in sources for sign in _SLOW_SIGNS):
            item.add_marker(pytest.mark.slow)
