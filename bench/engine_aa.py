"""Identical raw Infinity engines against each other in one process: how far apart equal subjects
land.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.engine_aa [--model minilm] [--length medium]
        [--inputs 64] [--engines 4] [--rounds 11] [--shared-weights] [--glibc-malloc]

Every engine is built from the same EngineArgs (bench/baseline.py) and called in interleaved rounds
of concurrent 16-input requests, as bench/run.py calls its variants. Prints each engine's paired
median ratio to the first one and its time per round. --shared-weights points every engine's
parameters at the first engine's tensors, to tell where the weights sit in memory apart from
everything else per engine. The process runs with the worker's malloc settings; under glibc's
defaults (--glibc-malloc) each engine's allocation history sets its speed apart
(src/embedding_worker/allocator.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from typing import Any

from bench.baseline import engine_tokenizer, raw_engine
from bench.common import (
    FULL_MODELS,
    LENGTHS,
    float32_config,
    in_requests,
    interleaved,
    paired_ratio,
    texts_of_length,
)
from embedding_worker.allocator import keep_freed_memory


async def compare(args: argparse.Namespace) -> None:
    # the worker's malloc settings, unless told otherwise
    keep_freed_memory(os.environ, False if args.glibc_malloc else None)
    config = float32_config(args.model)
    engines = [raw_engine(config) for _ in range(args.engines)]
    for engine in engines:
        await engine.astart()
    if args.shared_weights:
        first = dict(engines[0]._model_replicas[0].named_parameters())
        for engine in engines[1:]:
            for name, parameter in engine._model_replicas[0].named_parameters():
                parameter.data = first[name].data
    texts = texts_of_length(engine_tokenizer(engines[0]), LENGTHS[args.length], args.inputs)
    requests = in_requests(texts)

    def calls(engine: Any) -> Any:
        async def call() -> None:
            await asyncio.gather(*(engine.embed(sentences=r) for r in requests))

        return call

    variants = {f"engine {i}": calls(engine) for i, engine in enumerate(engines)}
    await interleaved(variants, 2)  # warm-up
    times = await interleaved(variants, args.rounds)
    shared = ", weights shared" if args.shared_weights else ""
    print(f"{args.model} {args.length} x{args.inputs}, {args.rounds} rounds{shared}:")
    for name, seconds in times.items():
        print(
            f"  {name} / engine 0: {paired_ratio(times, name, 'engine 0'):.3f}   "
            f"median {1e3 * statistics.median(seconds):.0f} ms a round"
        )
    for engine in engines:
        await engine.astop()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine_aa",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=FULL_MODELS, default="minilm")
    parser.add_argument("--length", choices=list(LENGTHS), default="medium")
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--shared-weights", action="store_true")
    parser.add_argument(
        "--glibc-malloc",
        action="store_true",
        help="glibc's default malloc settings, not the worker's "
        "(src/embedding_worker/allocator.py)",
    )
    asyncio.run(compare(parser.parse_args()))


if __name__ == "__main__":
    main()
