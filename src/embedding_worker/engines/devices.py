"""Replicas of one model, one per device, and how batches are spread across them.

DEVICES names the devices (`0,1`: CUDA devices 0 and 1; `cpu,cpu`: two CPU replicas, for tests);
unset, every visible CUDA device gets a replica, or the CPU one. Infinity's engines take the list
as their `device_id` (one replica per device, fed by the one scheduler, scheduler.py); the compiled
backends (backends.py) keep a `ReplicaSet`, which hands each batch to the replica with the fewest
batches in progress, the earliest-used first among equals.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

R = TypeVar("R")

CPU = "cpu"


def parse_devices(raw: str) -> tuple[str, ...]:
    """DEVICES: CUDA indices or `cpu`, separated by commas or semicolons; empty is automatic."""
    parts = [p.strip().lower() for p in raw.replace(";", ",").split(",")]
    devices = tuple(p for p in parts if p)
    for device in devices:
        if device != CPU and not device.isdigit():
            raise ValueError(f"DEVICES holds {device!r}: give CUDA device indices or 'cpu'")
    if len({d == CPU for d in devices}) > 1:
        raise ValueError("DEVICES mixes 'cpu' with CUDA devices: give one kind")
    return devices


def resolve_devices(configured: Sequence[str]) -> tuple[str, ...]:
    """The devices to place replicas on: those configured, else every visible CUDA device, else
    the CPU once."""
    if configured:
        return tuple(configured)
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no torch build with CUDA: the CPU
        count = 0
    return tuple(str(i) for i in range(count)) or (CPU,)


def engine_placement(devices: Sequence[str]) -> dict[str, Any]:
    """Infinity's EngineArgs fields for the devices: `device` and `device_id` (CUDA indices, or
    one index per CPU replica, which Infinity turns into that many CPU replicas); nothing when
    none are configured."""
    if not devices:
        return {}
    from infinity_emb.primitives import Device, DeviceID

    if all(d == CPU for d in devices):
        return {"device": Device.cpu, "device_id": DeviceID(list(range(len(devices))))}
    return {"device": Device.cuda, "device_id": DeviceID([int(d) for d in devices])}


class ReplicaSet(Generic[R]):
    """Replicas of one model's compute, each a callable; `run` gives a batch to the least busy.

    Safe from several threads: each call picks its replica under a lock, then computes outside it.
    """

    def __init__(self, replicas: Sequence[Callable[..., R]]) -> None:
        if not replicas:
            raise ValueError("a model needs at least one replica")
        self.replicas = list(replicas)
        self.busy = [0] * len(self.replicas)  # batches in progress, per replica
        self.done = [0] * len(self.replicas)  # batches computed, per replica
        self._order = itertools.count()
        self._last_used = [0] * len(self.replicas)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.replicas)

    def pick(self) -> int:
        """The replica the next batch goes to (counted busy until `release`)."""
        with self._lock:
            index = min(range(len(self.replicas)), key=lambda i: (self.busy[i], self._last_used[i]))
            self.busy[index] += 1
            self._last_used[index] = next(self._order) + 1
            return index

    def release(self, index: int) -> None:
        with self._lock:
            self.busy[index] -= 1
            self.done[index] += 1

    def run(self, *args: object) -> R:
        index = self.pick()
        try:
            return self.replicas[index](*args)
        finally:
            self.release(index)
