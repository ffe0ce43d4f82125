"""The baseline every benchmark here compares against: a plain Infinity engine.

Built from exactly the EngineArgs the worker gives Infinity for its first model
(embedding_worker.engines.infinity.engine_args), started on its own: Infinity's own queue and
batching, none of the worker's additions (its paced queue, its batch-thread guard, its token reuse).
"""

from __future__ import annotations

import os
from typing import Any

from embedding_worker.config import WorkerConfig


def raw_engine(config: WorkerConfig) -> Any:
    """A new, unstarted `AsyncEmbeddingEngine` loading the first model of a worker's `WorkerConfig`
    the way the worker does."""
    from embedding_worker.engines.infinity import engine_args, quiet_infinity

    quiet_infinity(os.environ)  # as the worker's load: telemetry off before infinity_emb loads
    from infinity_emb import AsyncEmbeddingEngine

    return AsyncEmbeddingEngine.from_args(engine_args(config.models[0], config.engine_settings))


def engine_tokenizer(engine: Any) -> Any:
    """The Hugging Face tokenizer of an Infinity engine's model."""
    return engine._model_replicas[0].tokenizer
