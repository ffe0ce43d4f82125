"""The baseline every benchmark here compares against: a plain Infinity engine.

Built from exactly the EngineArgs the worker passes for its first model, started on its own: Infinity's
own queue and batching, none of the worker's additions (its paced queue, its batch-thread guard).
"""

from __future__ import annotations

from typing import Any


def raw_engine(config: Any) -> Any:
    """A new, unstarted `AsyncEmbeddingEngine` loading the first model of a worker's `WorkerConfig`
    the way the worker does."""
    from infinity_emb import AsyncEmbeddingEngine

    from embedding_worker.engines import _engine_args

    return AsyncEmbeddingEngine.from_args(_engine_args(config.models[0], config))


def engine_tokenizer(engine: Any) -> Any:
    """The Hugging Face tokenizer of an Infinity engine's model."""
    return engine._model_replicas[0].tokenizer
