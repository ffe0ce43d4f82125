"""Several devices: one replica of each model per device (DEVICES), and batches spread across
them; on a CPU, with the device list given in configuration."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.engines.devices import ReplicaSet, parse_devices, resolve_devices
from embedding_worker.env import ConfigError
from tests.helpers import answer


def test_devices_parse_and_refuse_mixtures():
    assert parse_devices("") == ()
    assert parse_devices(" 0, 1 ;2") == ("0", "1", "2")
    assert parse_devices("cpu,CPU") == ("cpu", "cpu")
    with pytest.raises(ValueError):
        parse_devices("cuda:0")
    with pytest.raises(ValueError):
        parse_devices("0,cpu")
    with pytest.raises(ConfigError, match="DEVICES"):
        load_config({"DEVICES": "gpu0"})
    assert load_config({"DEVICES": "0,1"}).engine_settings.devices == ("0", "1")


def test_without_devices_configured_a_machine_without_gpu_has_one_cpu_replica():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert resolve_devices(()) == ("cpu",)
    assert resolve_devices(("cpu", "cpu")) == ("cpu", "cpu")


def test_a_replica_set_gives_each_batch_to_the_least_busy_replica():
    gates = [threading.Event() for _ in range(3)]
    started: list[int] = []

    def replica(index: int):
        def compute(batch: int) -> int:
            started.append(index)
            gates[index].wait(5)
            return index

        return compute

    replicas = ReplicaSet([replica(i) for i in range(3)])
    threads = [threading.Thread(target=replicas.run, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    # Three batches at once: one on each replica, none queued behind a busy one.
    assert sorted(started) == [0, 1, 2] and replicas.busy == [1, 1, 1]
    gates[1].set()
    threads[1].join(5)
    # Replica 1 is the only idle one: the next batch goes there.
    assert replicas.pick() == 1
    replicas.release(1)
    for gate in gates:
        gate.set()
    for thread in threads:
        thread.join(5)
    assert replicas.busy == [0, 0, 0] and sum(replicas.done) == 4


def test_one_after_another_batches_take_turns():
    replicas = ReplicaSet([lambda: "a", lambda: "b"])
    assert [replicas.run() for _ in range(4)] == ["a", "b", "a", "b"]


async def test_a_compiled_backend_builds_a_replica_per_device_and_spreads(bert_embedder, tmp_path):
    pytest.importorskip("onnxruntime")
    config = load_config(
        {
            "MODEL_NAMES": str(bert_embedder),
            "BACKEND": "optimum",
            "DTYPES": "float32",
            "BATCH_SIZES": "4",
            "DEVICES": "cpu,cpu",
            "ONNX_CACHE_DIR": str(tmp_path),
        }
    )
    worker = Worker.from_config(config)
    (model,) = worker.registry.models
    await worker.start()
    try:
        (entry,) = (await answer(worker, openai_route="/v1/models"))["data"]
        texts = [f"text number {i} of the batch" for i in range(4)]
        for _ in range(4):  # one batch each, one after another: they take turns
            await answer(worker, input=texts)
    finally:
        await worker.stop()
    assert entry["replicas"] == 2
    assert len(model.replicas) == 2 and min(model.replicas.done) > 0, model.replicas.done


async def test_torch_builds_a_replica_per_cpu_device_and_both_compute(bert_embedder):
    # Infinity runs three loops per replica on one pool sized for the machine's cores: on two
    # cores, two replicas once left a loop without a thread and every request hung.
    from embedding_worker.engines import infinity_adapter as adapter

    config = load_config(
        {
            "MODEL_NAMES": str(bert_embedder),
            "BACKEND": "torch",
            "DTYPES": "float32",
            "BATCH_SIZES": "4",
            "DEVICES": "cpu,cpu",
        }
    )
    worker = Worker.from_config(config)
    (model,) = worker.registry.models
    replicas = adapter.replicas(model.engine)
    assert len(replicas) == 2
    await worker.start()
    calls = [0, 0]
    try:
        for index, replica in enumerate(replicas):
            forward = replica.encode_core

            def counted(features, _forward=forward, _index=index):
                calls[_index] += 1
                return _forward(features)

            replica.encode_core = counted
        # Over 32 tokens each, so that batches stay BATCH_SIZES wide: 16 of them.
        texts = [f"text number {i} of the burst, " + "with more words " * 10 for i in range(64)]
        body = await asyncio.wait_for(answer(worker, input=texts), 120)
    finally:
        await worker.stop()
    assert len(body["data"]) == len(texts)
    assert min(calls) > 0, calls
