"""How the arrival of requests shapes the raw engine's batches: the baseline behind the server figure.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/arrival.py [--requests 1500] [--rounds 3]

64 clients each send one short text, wait for the answer, then send the next, straight into Infinity's
engine in this process. "Together": the next request goes at once, so answers released together come
back together and form full batches (what bench/run.py's engine baseline does). "Spread": each client
waits a random 0-1 ms or 0-3 ms first, as requests arriving over sockets do. Infinity pops a batch as
soon as its model takes the previous one, so spread arrivals form smaller batches and lower throughput
of the engine itself, with no HTTP involved. Ratios are paired medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from embedding_worker.config import load_config  # noqa: E402
from embedding_worker.dispatch import Worker  # noqa: E402

SPREADS_S = {"together": 0.0, "spread 0-1 ms": 0.001, "spread 0-3 ms": 0.003}


async def main(args: argparse.Namespace) -> None:
    worker = Worker.from_config(load_config({"DTYPES": "float32"}))
    await worker.start()
    engine = worker.registry.models[0].engine
    texts = [f"{i} the quick brown fox jumps over the dog" for i in range(args.requests)]
    rng = random.Random(0)

    async def run(spread_s: float) -> float:
        todo = iter(texts)

        async def client() -> None:
            for text in todo:
                await engine.embed(sentences=[text])
                if spread_s:
                    await asyncio.sleep(rng.random() * spread_s)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(64)))
        return len(texts) / (time.perf_counter() - started)

    await run(0.0)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in SPREADS_S}
    names = list(SPREADS_S)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            rates[name].append(await run(SPREADS_S[name]))
    await worker.stop()
    print(f"{worker.registry.models[0].served_id}, float32, {args.requests} one-text requests, 64 clients")
    for name in names:
        ratio = statistics.median(s / t for s, t in zip(rates[name], rates["together"]))
        print(f"{name:14} {statistics.median(rates[name]):6.0f} req/s   x together {ratio:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
