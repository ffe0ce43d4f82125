"""Classification: the worker against its plain recipe, transformers' text-classification
pipeline on the same model, in the same run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.classify [--texts 512] [--rounds 5]

On a random BERT classifier of a small real shape (hidden 384, 6 layers, 3 labels, built here):
texts/s through the worker's dispatch (requests of 16 texts, all sent at once) and through the
pipeline called on the same texts with batch size 32, interleaved rounds, medians, as a ratio; and
the largest score difference between the two.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from tests import model_factory

WORDS = "the quick brown fox jumps over a lazy dog near old stone bridges under quiet stars".split()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.classify", description=__doc__)
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(0)
    texts = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(args.texts)
    ]
    with tempfile.TemporaryDirectory() as folder:
        path = model_factory.make_bert_classifier(
            Path(folder) / "classifier", hidden_size=384, num_layers=6, num_heads=6,
            intermediate_size=1536,
        )  # fmt: skip
        asyncio.run(compare(path, texts, args.rounds))


async def compare(path: Path, texts: list[str], rounds: int) -> None:
    from transformers import pipeline

    recipe = pipeline("text-classification", model=str(path), top_k=None, device="cpu")
    worker = Worker.from_config(
        load_config({"MODEL_NAMES": str(path), "BATCH_SIZES": "32", "DTYPES": "float32"})
    )
    await worker.start()
    requests = [texts[i : i + 16] for i in range(0, len(texts), 16)]

    async def through_worker() -> list[dict]:
        replies = await asyncio.gather(
            *(worker.request("/v1/classify", {"input": chunk}) for chunk in requests)
        )
        return [item for reply in replies for item in reply.body["data"]]

    def through_recipe() -> list[list[dict]]:
        return recipe(texts, batch_size=32, truncation=True)

    try:
        ours, theirs = await through_worker(), through_recipe()  # warm-up, and the scores
        worst = 0.0
        for mine, plain in zip(ours, theirs):
            expected = {e["label"]: e["score"] for e in plain}
            worst = max(worst, max(abs(e["score"] - expected[e["label"]]) for e in mine["labels"]))
        rates: dict[str, list[float]] = {"worker": [], "recipe": []}
        for _ in range(rounds):
            started = time.perf_counter()
            await through_worker()
            rates["worker"].append(len(texts) / (time.perf_counter() - started))
            started = time.perf_counter()
            through_recipe()
            rates["recipe"].append(len(texts) / (time.perf_counter() - started))
    finally:
        await worker.stop()
    worker_rate, recipe_rate = (statistics.median(rates[k]) for k in ("worker", "recipe"))
    print(f"{len(texts)} texts, {rounds} rounds (medians)")
    print(f"worker {worker_rate:.1f} texts/s, recipe {recipe_rate:.1f} texts/s")
    print(f"worker / recipe: {worker_rate / recipe_rate:.2f}")
    print(f"largest score difference: {worst:.1e}")
    assert np.isfinite(worst)


if __name__ == "__main__":
    main()
