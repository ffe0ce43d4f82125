"""Pairs/s of the LLM reranker through the worker vs a plain batched forward, same pairs, same
run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.bench_llm_reranker [--pairs 96] [--batch-size 16]
        [--rounds 3]

Builds a random Qwen3-Reranker-shaped causal LM (tests/model_factory.py; default: hidden 256,
4 layers, the tiny 2k-token vocabulary), then scores the same (query, document) pairs two ways:
- worker: concurrent rerank requests of --docs-per-request documents as jobs (`answer_job`)
  (template, usage counting, batching across requests, sorting by length, the worker thread, answer
  building);
- plain: the model card's recipe with transformers (process_inputs + compute_logits), batch after
  batch of --batch-size pairs in order, on the calling thread.
It prints both rates and their ratio, and the largest score difference between the two.
--vocab-size 151669 gives Qwen3's real vocabulary: the recipe computes logits over the whole
vocabulary at every position, the worker only the "yes"/"no" rows at the last one.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import offline, random_model_parser
from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.engines.llm_reranker import PREFIX, SUFFIX, format_pair
from embedding_worker.transports.runpod import answer_job
from tests import model_factory

Pairs = list[tuple[str, str]]


def make_pairs(count: int) -> Pairs:
    sentences = [s for s in model_factory.CORPUS if len(s.split()) > 4]
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(count):
        query = sentences[int(rng.integers(len(sentences)))]
        picks = rng.integers(len(sentences), size=int(rng.integers(1, 5)))
        doc = " ".join(sentences[int(j)] for j in picks)
        pairs.append((query, doc))
    return pairs


class Plain:
    """The model card's recipe with plain transformers, batch after batch in order."""

    def __init__(self, path: Path, batch_size: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.yes = self.tokenizer.convert_tokens_to_ids("yes")
        self.no = self.tokenizer.convert_tokens_to_ids("no")
        self.prefix = self.tokenizer.encode(PREFIX, add_special_tokens=False)
        self.suffix = self.tokenizer.encode(SUFFIX, add_special_tokens=False)
        self.batch_size = batch_size

    @torch.no_grad()
    def _batch(self, texts: list[str]) -> list[float]:
        inputs = self.tokenizer(
            texts,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=8192 - len(self.prefix) - len(self.suffix),
        )
        inputs["input_ids"] = [self.prefix + ids + self.suffix for ids in inputs["input_ids"]]
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt")
        logits = self.model(**inputs).logits[:, -1, :]
        pair = torch.stack([logits[:, self.no], logits[:, self.yes]], dim=1)
        return torch.log_softmax(pair, dim=1)[:, 1].exp().tolist()

    def run(self, pairs: Pairs) -> tuple[float, np.ndarray]:
        texts = [format_pair(q, d, None) for q, d in pairs]
        started = time.perf_counter()
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            scores += self._batch(texts[start : start + self.batch_size])
        return len(texts) / (time.perf_counter() - started), np.array(scores)


async def through_worker(
    worker: Worker, pairs: Pairs, per_request: int
) -> tuple[float, np.ndarray]:
    """Concurrent requests of `per_request` documents (one query each) through the dispatch."""
    jobs = [
        {"query": pairs[i][0], "documents": [d for _, d in pairs[i : i + per_request]]}
        for i in range(0, len(pairs), per_request)
    ]
    started = time.perf_counter()
    replies = await asyncio.gather(*(answer_job(worker, job) for job in jobs))
    elapsed = time.perf_counter() - started
    scores: list[float] = []
    for reply in replies:
        assert reply.status == 200, reply.body
        by_index = {r["index"]: r["relevance_score"] for r in reply.body["results"]}
        scores += [by_index[i] for i in range(len(by_index))]
    return len(pairs) / elapsed, np.array(scores)


async def compare(path: Path, pairs: Pairs, args: Any) -> tuple[float, float, float]:
    """Best of --rounds for each, the two alternating (other load on the machine hits both
    alike)."""
    env = {"MODEL_NAMES": str(path), "BATCH_SIZES": str(args.batch_size), "DTYPES": "float32"}
    worker = Worker.from_config(load_config(env))
    plain = Plain(path, args.batch_size)
    await worker.start()
    try:
        await through_worker(
            worker, pairs[: args.docs_per_request], args.docs_per_request
        )  # warm-up
        plain.run(pairs[: args.batch_size])
        worker_best = plain_best = 0.0
        difference = 0.0
        for _ in range(args.rounds):
            worker_rate, worker_scores = await through_worker(worker, pairs, args.docs_per_request)
            plain_rate, plain_scores = plain.run(pairs)
            worker_best, plain_best = max(worker_best, worker_rate), max(plain_best, plain_rate)
            difference = max(difference, float(np.abs(worker_scores - plain_scores).max()))
        return worker_best, plain_best, difference
    finally:
        await worker.stop()


def main() -> None:
    parser = random_model_parser("python -m bench.bench_llm_reranker", __doc__, rounds=3)
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--docs-per-request", type=int, default=8)
    args = parser.parse_args()
    offline()

    with tempfile.TemporaryDirectory() as tmp:
        path = model_factory.make_qwen3_reranker(
            Path(tmp) / "bench" / "qwen3-reranker",
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            num_heads=4,
            num_kv_heads=2,
            head_dim=args.hidden_size // 4,
            intermediate_size=3 * args.hidden_size,
            vocab_size=args.vocab_size,
        )
        pairs = make_pairs(args.pairs)
        # One query per request: both runs score exactly the same (query, document) pairs.
        per = args.docs_per_request
        pairs = [(pairs[i - i % per][0], d) for i, (_, d) in enumerate(pairs)]
        worker_rate, plain_rate, difference = asyncio.run(compare(path, pairs, args))
    print(
        f"model: hidden {args.hidden_size}, {args.layers} layers, vocab "
        f"{args.vocab_size or 'tiny'}; {len(pairs)} pairs, batch {args.batch_size}, "
        f"{per} docs per request, torch threads {torch.get_num_threads()}"
    )
    print(f"worker: {worker_rate:8.1f} pairs/s")
    print(f"plain:  {plain_rate:8.1f} pairs/s")
    print(f"ratio worker/plain: {worker_rate / plain_rate:.2f}")
    print(f"max |score difference|: {difference:.2e}")


if __name__ == "__main__":
    main()
