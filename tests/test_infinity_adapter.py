"""The Infinity adapter (engines/infinity_adapter.py) against the pinned infinity-emb: each private
name it reads is where it expects it, and no other module of the worker reads one."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from infinity_emb.inference.batch_handler import BatchHandler
from infinity_emb.inference.queue import CustomFIFOQueue

from embedding_worker.engines import infinity_adapter as adapter
from embedding_worker.engines.tokenization import Text

SRC = Path(__file__).resolve().parent.parent / "src" / "embedding_worker"
# Infinity's private names the adapter reads (its module docstring says why each).
PRIVATE = ("_model_replicas", "_batch_handler", "_queue_prio", "_sync_event")
PRIVATE += ("_infinity_tokenizer", "_first_module", "_pipe", "_threadpool", "_max_workers")


def test_no_module_but_the_adapter_reads_infinitys_private_names():
    pattern = re.compile(r"\.(" + "|".join(PRIVATE) + r")\b")
    readers = [
        path.relative_to(SRC).as_posix()
        for path in SRC.rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert readers == ["engines/infinity_adapter.py"]


def test_the_pinned_version_has_what_the_adapter_reads(worker, ids):
    model = next(m for m in worker.registry.models if m.served_id == ids["minilm"])
    engine = model.engine
    replicas = adapter.replicas(engine)
    assert replicas and all(hasattr(r, stage) for r in replicas for stage in ("encode_pre",))
    handler = adapter.batch_handler(engine)
    assert isinstance(handler, BatchHandler)
    assert isinstance(handler._queue_prio, adapter.PacedQueue)  # installed at start
    assert isinstance(handler._queue_prio.inner, CustomFIFOQueue)
    assert hasattr(handler._queue_prio.inner, "_sync_event")
    assert adapter.replica_count(engine) == len(replicas)
    assert isinstance(handler._threadpool, ThreadPoolExecutor)
    assert handler._threadpool._max_workers >= 2 + 3 * len(replicas)
    first = adapter.first_module(replicas[0])
    assert type(first).__name__ == "Transformer" and first.tokenizer is not None
    assert adapter.replica_tokenizer(replicas[0]) is not None


async def test_the_model_gets_the_workers_text_with_its_ids(worker, ids):
    # What the tokenize step receives for a text that carries its ids, and for one that does not.
    loop = asyncio.get_running_loop()
    carried = Text("hello", 3, ids=np.array([101, 7592, 102]))
    assert adapter.text_item(carried, loop).content.to_input() is carried
    plain = Text("hello", 3)
    assert adapter.text_item(plain, loop).content.to_input() == "hello"
    pair = adapter.pair_item("q", Text("doc", 9), loop)
    assert pair.content.to_input() == ("q", "doc") and adapter.queued_tokens(pair.content) == 9
