"""Batch-invariant vectors: what padding each text to its own length bucket costs or gains, on
texts of mixed lengths (5 to 250 words), against padding each batch to its longest text.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.invariance [--texts 512] [--rounds 7]

On the bundled all-MiniLM-L6-v2 (DTYPES=auto), one engine, the two ways toggled between
interleaved rounds: texts/s of requests of 16 texts sent all at once, medians, as a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.runpod import answer_job

WORDS = "the quick brown fox jumps over a lazy dog near old stone bridges under quiet stars".split()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.invariance", description=__doc__)
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(0)
    texts = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 250))) for _ in range(args.texts)
    ]
    requests = [texts[i : i + 16] for i in range(0, len(texts), 16)]

    async def run() -> dict[bool, list[float]]:
        worker = Worker.from_config(load_config({"MODEL_NAMES": DEFAULT_MODEL_ID}))
        await worker.start()
        step = worker.registry.models[0].engine._model_replicas[0].encode_pre
        rates: dict[bool, list[float]] = {True: [], False: []}
        try:
            for round_no in range(args.rounds + 1):
                for bucketed in (True, False) if round_no % 2 else (False, True):
                    step.bucketed = bucketed
                    started = time.perf_counter()
                    replies = await asyncio.gather(
                        *(answer_job(worker, {"input": chunk}) for chunk in requests)
                    )
                    assert all(r.ok for r in replies)
                    if round_no:  # the first round warms up
                        rates[bucketed].append(len(texts) / (time.perf_counter() - started))
        finally:
            await worker.stop()
        return rates

    rates = asyncio.run(run())
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"{args.texts} texts of 5 to 250 words, {args.rounds} rounds (medians)")
    print(f"bucketed (batch-invariant) {on:.1f} texts/s, padded to the longest {off:.1f} texts/s")
    print(f"bucketed / padded to the longest: {on / off:.2f}")


if __name__ == "__main__":
    main()
