"""Texts/s of the bge-m3 engine through the worker vs FlagEmbedding's recipe in plain torch, same
texts, same batch size, same run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.bge_m3 [--texts 256] [--batch-size 16] [--rounds 5]
        [--output dense,sparse,multi_vector]

Builds a random model in bge-m3's layout (tests/model_factory.py; default: hidden 256, 4 layers,
the tiny vocabulary; `--hidden-size 1024 --layers 24 --vocab-size 250002` is bge-m3's real shape),
then embeds the same texts two ways, the two alternating round by round:
- worker: concurrent requests of --texts-per-request texts as jobs (`answer_job`) (token counts,
  batching across requests, sorting by length, the worker thread, the answer in base64);
- plain: the recipe (tests/bge_m3_recipe.py), all texts sorted by length, batch after batch of
  --batch-size, on the calling thread, the outputs asked computed as the recipe does.
It prints the median rates and the median of the per-round ratios, and the largest difference
between the two answers' numbers.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import offline, random_model_parser
from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.runpod import answer_job
from tests import model_factory
from tests.bge_m3_recipe import Recipe

ALL = ("dense", "sparse", "multi_vector")


def make_texts(count: int) -> list[str]:
    """Texts of 1 to 6 corpus sentences (about 10 to 120 tokens)."""
    sentences = [s for s in model_factory.CORPUS if len(s.split()) > 4]
    rng = np.random.default_rng(0)
    picks = (rng.integers(len(sentences), size=int(rng.integers(1, 7))) for _ in range(count))
    return [" ".join(sentences[int(j)] for j in pick) for pick in picks]


def _vector(value: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(value), dtype="<f4")


async def through_worker(
    worker: Worker, texts: list[str], per_request: int, outputs: list[str]
) -> tuple[float, list[dict[str, Any]]]:
    jobs = [
        {"input": texts[i : i + per_request], "output": outputs, "encoding_format": "base64"}
        for i in range(0, len(texts), per_request)
    ]
    started = time.perf_counter()
    replies = await asyncio.gather(*(answer_job(worker, job) for job in jobs))
    elapsed = time.perf_counter() - started
    items = []
    for reply in replies:
        assert reply.status == 200, reply.body
        items += reply.body["data"]
    return len(texts) / elapsed, items


def through_recipe(
    recipe: Recipe, texts: list[str], batch_size: int, outputs: list[str]
) -> tuple[float, Any]:
    started = time.perf_counter()
    answer = recipe.encode(
        texts,
        batch_size,
        return_dense="dense" in outputs,
        return_sparse="sparse" in outputs,
        return_colbert_vecs="multi_vector" in outputs,
    )
    return len(texts) / (time.perf_counter() - started), answer


def largest_difference(items: list[dict[str, Any]], answer: Any, outputs: list[str]) -> float:
    dense, lexical, colbert = answer
    worst = 0.0
    for i, item in enumerate(items):
        if "dense" in outputs:
            worst = max(worst, float(np.abs(_vector(item["embedding"]) - dense[i]).max()))
        if "sparse" in outputs:
            got = dict(zip(item["sparse_embedding"]["indices"], item["sparse_embedding"]["values"]))
            assert got.keys() == lexical[i].keys(), "different sparse token ids"
            worst = max([worst, *(abs(got[k] - w) for k, w in lexical[i].items())])
        if "multi_vector" in outputs:
            vectors = np.stack([_vector(v) for v in item["multi_vector"]])
            worst = max(worst, float(np.abs(vectors - colbert[i]).max()))
    return worst


async def compare(path: Path, texts: list[str], args: Any) -> dict[str, float]:
    env = {"MODEL_NAMES": str(path), "BATCH_SIZES": str(args.batch_size), "DTYPES": "float32"}
    worker = Worker.from_config(load_config(env))
    recipe = Recipe(path, max_length=8192)
    outputs = args.output.split(",")
    await worker.start()
    try:
        await through_worker(worker, texts[: args.batch_size], args.texts_per_request, outputs)
        through_recipe(recipe, texts[: args.batch_size], args.batch_size, outputs)  # warm-up
        worker_rates, recipe_rates, ratios = [], [], []
        difference = 0.0
        for round_number in range(args.rounds):
            # A B, B A, ...: load from elsewhere falls on both alike.
            if round_number % 2:
                recipe_rate, answer = through_recipe(recipe, texts, args.batch_size, outputs)
                worker_rate, items = await through_worker(
                    worker, texts, args.texts_per_request, outputs
                )
            else:
                worker_rate, items = await through_worker(
                    worker, texts, args.texts_per_request, outputs
                )
                recipe_rate, answer = through_recipe(recipe, texts, args.batch_size, outputs)
            worker_rates.append(worker_rate)
            recipe_rates.append(recipe_rate)
            ratios.append(worker_rate / recipe_rate)
            difference = max(difference, largest_difference(items, answer, outputs))
        return {
            "worker": statistics.median(worker_rates),
            "recipe": statistics.median(recipe_rates),
            "ratio": statistics.median(ratios),
            "difference": difference,
        }
    finally:
        await worker.stop()


def main() -> None:
    parser = random_model_parser("python -m bench.bge_m3", __doc__, rounds=5)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--texts-per-request", type=int, default=8)
    parser.add_argument("--output", default=",".join(ALL), help="outputs asked, comma-separated")
    args = parser.parse_args()
    offline()

    with tempfile.TemporaryDirectory() as tmp:
        path = model_factory.make_bge_m3(
            Path(tmp) / "bench" / "bge-m3",
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            num_heads=max(1, args.hidden_size // 64),
            intermediate_size=4 * args.hidden_size,
            max_length=8192,
            vocab_size=args.vocab_size,
        )
        texts = make_texts(args.texts)
        result = asyncio.run(compare(path, texts, args))
    print(
        f"model: hidden {args.hidden_size}, {args.layers} layers, vocab "
        f"{args.vocab_size or 'tiny'}; {len(texts)} texts, batch {args.batch_size}, "
        f"{args.texts_per_request} texts per request, output {args.output}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"worker: {result['worker']:8.1f} texts/s")
    print(f"recipe: {result['recipe']:8.1f} texts/s")
    print(f"ratio worker/recipe (median of {args.rounds} rounds): {result['ratio']:.2f}")
    print(f"max |difference|: {result['difference']:.2e}")


if __name__ == "__main__":
    main()
