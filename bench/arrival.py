"""How the arrival of requests shapes Infinity's batches, and what the worker's paced queue
changes.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.arrival [--requests 1500] [--rounds 3]

64 clients each send one short text, wait for the answer, then send the next, straight into an
engine in this process (no HTTP). "Together": the next request goes at once, so answers released
together come back together and form full batches (what bench/run.py's engine baseline does).
"Spread": each client waits a random 0-1 ms or 0-3 ms first, as requests arriving over sockets do.

Two engines, same model and EngineArgs: Infinity on its own, which pops a batch as soon as its model
takes the previous one (spread arrivals then make small batches), and the worker's engine, whose
paced queue (src/embedding_worker/engines/scheduler.py) holds a part-filled batch while the model is
busy. Every rate is given as a ratio to the plain engine with arrivals together, paired by round,
rounds interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from typing import Any

from bench.baseline import raw_engine
from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker

SPREADS_S = {"together": 0.0, "spread 0-1 ms": 0.001, "spread 0-3 ms": 0.003}


async def compare(args: argparse.Namespace) -> None:
    worker = Worker.from_config(load_config({"DTYPES": "float32"}))
    await worker.start()
    engines = {
        "Infinity": raw_engine(worker.config),
        "worker (paced)": worker.registry.models[0].engine,
    }
    await engines["Infinity"].astart()
    texts = [f"{i} the quick brown fox jumps over the dog" for i in range(args.requests)]
    rng = random.Random(0)

    async def run(engine: Any, spread_s: float) -> float:
        todo = iter(texts)

        async def client() -> None:
            for text in todo:
                await engine.embed(sentences=[text])
                if spread_s:
                    await asyncio.sleep(rng.random() * spread_s)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(64)))
        return len(texts) / (time.perf_counter() - started)

    cases = [(e, s) for e in engines for s in SPREADS_S]
    for engine_name in engines:  # warm-up
        await run(engines[engine_name], 0.0)
    rates: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    for r in range(args.rounds):
        for engine_name, spread in cases[r % len(cases) :] + cases[: r % len(cases)]:
            rates[engine_name, spread].append(await run(engines[engine_name], SPREADS_S[spread]))
    await engines["Infinity"].astop()
    await worker.stop()
    served = worker.registry.models[0].served_id
    print(f"{served}, float32, {args.requests} one-text requests, 64 clients")
    base = rates["Infinity", "together"]
    for engine_name, spread in cases:
        got = rates[engine_name, spread]
        ratio = statistics.median(g / b for g, b in zip(got, base))
        print(
            f"{engine_name:15} {spread:14} {statistics.median(got):6.0f} req/s   "
            f"x Infinity together {ratio:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.arrival",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.run(compare(args))


if __name__ == "__main__":
    main()
