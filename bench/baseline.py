"""The baseline every benchmark here compares against: a plain Infinity engine.

Built from exactly the EngineArgs the worker passes for its first model, started on its own: Infinity's
own queue and batching, none of the worker's additions (its paced queue, its batch-thread guard).
"""

from __future__ import annotations

from typing import Any


def raw_engine_for(worker: Any) -> Any:
    """A new, unstarted `AsyncEmbeddingEngine` loading the worker's first model the way it does."""
    from infinity_emb import AsyncEmbeddingEngine

    from embedding_worker.engines import _engine_args

    model = worker.registry.models[0]
    return AsyncEmbeddingEngine.from_args(_engine_args(model.spec, worker.config))
