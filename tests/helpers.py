"""Small helpers shared by the tests."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import numpy as np


def decode_vectors(body: dict[str, Any]) -> np.ndarray:
    """The embeddings of an answer body as a float32 matrix, whichever encoding it used.

    Checks on the way that every item is an embedding object and that `index` runs 0, 1, 2, ...
    """
    rows = []
    for i, item in enumerate(body["data"]):
        assert item["object"] == "embedding" and item["index"] == i, item.keys()
        value = item["embedding"]
        if isinstance(value, str):
            rows.append(np.frombuffer(base64.b64decode(value), dtype="<f4"))
        else:
            rows.append(np.asarray(value, dtype=np.float32))
    return np.stack(rows)


async def answer(worker: Any, **body: Any) -> dict[str, Any]:
    """The body of a standard-flavour job that must succeed."""
    from embedding_worker.transports.runpod import answer_job

    reply = await answer_job(worker, body)
    assert reply.status == 200, reply.body
    return reply.body


def model_and_replica(worker: Any, tail: str) -> tuple[Any, Any]:
    """The served model whose id ends with `tail`, and its (first) Infinity model replica."""
    model = next(m for m in worker.registry.models if m.served_id.endswith(tail))
    return model, model.engine._model_replicas[0]


def worker_without(env: dict[str, str], **switched: bool) -> Any:
    """A worker (not started) for the config `env`, its optimisations switched as given (the
    keyword arguments of engines.spec.Optimisations), as the benchmarks build theirs."""
    from embedding_worker.config import load_config
    from embedding_worker.dispatch import Worker
    from embedding_worker.engines import ModelRegistry
    from embedding_worker.engines.spec import Optimisations

    config = load_config(env)
    optimisations = Optimisations(**switched)
    settings = dataclasses.replace(config.engine_settings, optimisations=optimisations)
    return Worker(config, ModelRegistry.load(config.models, settings))


def bound_queue(monkeypatch: Any, model: Any, **settings: Any) -> None:
    """Change a model's admission bounds (engines/admission.py) for one test."""
    admission = model.admission
    monkeypatch.setattr(admission, "settings", dataclasses.replace(admission.settings, **settings))


async def call(worker: Any, route: str, body: Any, line: str | None = None) -> Any:
    """A route's answer as HTTP sends it (`statuses.Reply`: status, body, retry_after), reached
    as the local server's routes and batch lines reach an operation: no RunPod job on the way."""
    from embedding_worker.statuses import Reply

    return Reply.of(await worker.request(route, body, line))
