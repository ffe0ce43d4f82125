"""Embedding types: how much smaller the quantized answers are, and what they cost.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.embedding_types [--inputs 256] [--rounds 9]

On the bundled all-MiniLM-L6-v2 (real weights), one request of `--inputs` short texts through the
worker's dispatch, answered as float JSON, base64, and each of Cohere's quantized types (through
`/v1/embed` with one `embedding_types` entry, as Cohere writes them: JSON numbers), and each of them
as base64 of its bytes (`/v1/embeddings` with `embedding_types` and `encoding_format: base64`). For
each: the bytes of the answer as runpod sends it (json.dumps), as a ratio to the float answer; and
the time of the request, the answer's writing included, as a ratio to base64's, measured in the same
run (variants interleaved, medians).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.runpod import answer_job

WORDS = "the quick brown fox jumps over a lazy dog near old stone bridges under quiet stars".split()
TYPES = ("int8", "uint8", "binary", "ubinary")


def requests(texts: list[str]) -> dict[str, dict]:
    openai = {"model": DEFAULT_MODEL_ID, "input": texts}
    cohere = {"model": DEFAULT_MODEL_ID, "texts": texts}
    variants = {
        "float": {"openai_route": "/v1/embeddings", "openai_input": openai},
        "base64": {
            "openai_route": "/v1/embeddings",
            "openai_input": {**openai, "encoding_format": "base64"},
        },
    }
    for kind in TYPES:
        body = {**cohere, "embedding_types": [kind]}
        variants[kind] = {"openai_route": "/v1/embed", "openai_input": body}
    for kind in TYPES:  # the /v1/embeddings extension: each vector as the base64 of its bytes
        body = {**openai, "embedding_types": [kind], "encoding_format": "base64"}
        variants[f"{kind} base64"] = {"openai_route": "/v1/embeddings", "openai_input": body}
    return variants


async def measure(worker: Worker, variants: dict[str, dict], rounds: int) -> dict[str, dict]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    sizes: dict[str, int] = {}
    for name, job in variants.items():  # warm-up, and each answer's size
        reply = await answer_job(worker, job)
        assert reply.ok, reply.body
        sizes[name] = len(json.dumps(reply.runpod_output()))
    for round_no in range(rounds):
        order = list(variants)
        random.Random(round_no).shuffle(order)
        for name in order:
            started = time.perf_counter()
            reply = await answer_job(worker, variants[name])
            json.dumps(reply.runpod_output())
            times[name].append(time.perf_counter() - started)
    base64_time = statistics.median(times["base64"])
    return {
        name: {
            "bytes": sizes[name],
            "float_over_size": sizes["float"] / sizes[name],
            "time_over_base64": statistics.median(times[name]) / base64_time,
        }
        for name in variants
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.embedding_types", description=__doc__)
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    rng = random.Random(0)
    texts = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(args.inputs)
    ]

    async def run() -> dict[str, dict]:
        worker = Worker.from_config(load_config({"MODEL_NAMES": DEFAULT_MODEL_ID}))
        await worker.start()
        try:
            return await measure(worker, requests(texts), args.rounds)
        finally:
            await worker.stop()

    results = asyncio.run(run())
    print(f"{args.inputs} texts a request, {args.rounds} rounds")
    print("| type | answer bytes | float JSON / this | time / base64 |")
    print("| --- | --- | --- | --- |")
    for name, row in results.items():
        print(
            f"| {name} | {row['bytes']} | {row['float_over_size']:.1f}x "
            f"| {row['time_over_base64']:.2f} |"
        )


if __name__ == "__main__":
    main()
