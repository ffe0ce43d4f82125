"""Token budgets (MAX_BATCH_TOKENS): peak memory of a burst of long texts against count-only
batching, and short texts in batches larger than 32.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.token_budget [--long 64] [--short 4096] [--rounds 5]

Peak memory: a random BERT of a long-context shape (hidden 384, 6 layers, 2048 positions, built
here), 32 texts a batch by count, fed a burst of texts of ~2000 tokens, once with the default
budget (32 x 512 tokens: 8 such texts a batch) and once with a budget no batch reaches (count-only
batching, as Infinity alone does). Each runs in fresh processes, alternating; the figures are the
process's peak resident memory (and CUDA's peak allocation on a GPU) above what it held before the
burst, and the burst's texts/s, medians.

Short texts: the bundled all-MiniLM-L6-v2 (DTYPES=auto) fed ~12-token texts in requests of 16, by
three workers whose batches hold exactly 32, 128 and 256 texts (BATCH_SIZES, the wider batches of
short texts off), in turn, interleaved rounds, medians: whether batches larger than BATCH_SIZES's
default would gain for short texts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.engines import ModelRegistry
from embedding_worker.engines.budget import default_max_batch_tokens
from embedding_worker.engines.spec import Optimisations
from embedding_worker.transports.runpod import answer_job
from tests import model_factory

from .common import texts_of_length

LONG_TOKENS = 2000
COUNT_ONLY = 10**9  # a budget no batch reaches


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _burst(path: str, budget: int, count: int) -> dict[str, float]:
    """One process's measurement: load, then a burst of `count` long texts at once."""
    import torch

    env = {"MODEL_NAMES": path, "BATCH_SIZES": "32", "DTYPES": "float32"}
    if budget:  # 0: the default
        env["MAX_BATCH_TOKENS"] = str(budget)
    worker = Worker.from_config(load_config(env))
    await worker.start()
    model = worker.registry.models[0]
    texts = texts_of_length(model.tokens.tokenizer, LONG_TOKENS, count)
    await answer_job(worker, {"input": texts[:1]})  # warm up
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    before = _resident_bytes()
    started = time.perf_counter()
    replies = await asyncio.gather(
        *(answer_job(worker, {"input": texts[i : i + 16]}) for i in range(0, count, 16))
    )
    elapsed = time.perf_counter() - started
    assert all(r.ok for r in replies), [r.body for r in replies if not r.ok][:1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result = {"rss_peak_mib": (peak - before) / 2**20, "texts_per_s": count / elapsed}
    if torch.cuda.is_available():
        result["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - cuda_before) / 2**20
    await worker.stop()
    return result


def _measure_in_a_fresh_process(path: Path, budget: int, count: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.token_budget", "--burst", str(path), str(budget), str(count)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LOG_LEVEL": "WARNING"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_memory(count: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = model_factory.make_bert_embedder(
            Path(folder) / "long-bert", hidden_size=384, num_layers=6, num_heads=6,
            intermediate_size=1536, max_position=2048, max_seq_length=2048,
        )  # fmt: skip
        runs: dict[str, list[dict[str, float]]] = {"budget": [], "count": []}
        for round_no in range(repeats):  # alternating, so that load from elsewhere falls on both
            for name in ("budget", "count") if round_no % 2 == 0 else ("count", "budget"):
                budget = 0 if name == "budget" else COUNT_ONLY  # 0: the default budget
                runs[name].append(_measure_in_a_fresh_process(path, budget, count))
    budgeted, count_only = (
        {key: statistics.median(run[key] for run in runs[name]) for key in runs[name][0]}
        for name in ("budget", "count")
    )
    print(
        f"peak memory: a burst of {count} texts of ~{LONG_TOKENS} tokens, BATCH_SIZES=32, "
        f"medians of {repeats} processes each"
    )
    for name, figures in (("default budget (16384)", budgeted), ("count only", count_only)):
        shown = ", ".join(f"{k} {v:.1f}" for k, v in figures.items())
        print(f"  {name}: {shown}")
    ratio = budgeted["rss_peak_mib"] / count_only["rss_peak_mib"]
    speed = budgeted["texts_per_s"] / count_only["texts_per_s"]
    print(f"  budget / count-only: peak resident memory {ratio:.2f}x, texts/s {speed:.2f}x")
    if "cuda_peak_mib" in budgeted:
        print(f"  CUDA peak: {budgeted['cuda_peak_mib'] / count_only['cuda_peak_mib']:.2f}x")


def _worker_of_batch_size(cap: int) -> Worker:
    """A worker whose batches hold exactly `cap` texts, whatever their length (within the budget
    of 32 texts a batch): BATCH_SIZES=`cap`, without the wider batches of short texts."""
    config = load_config(
        {
            "MODEL_NAMES": DEFAULT_MODEL_ID,
            "BATCH_SIZES": str(cap),
            "MAX_BATCH_TOKENS": str(default_max_batch_tokens(32)),
        }
    )
    narrow = Optimisations(wide_short_batches=False)
    settings = dataclasses.replace(config.engine_settings, optimisations=narrow)
    return Worker(config, ModelRegistry.load(config.models, settings))


async def short_batches(count: int, rounds: int, tokens: int = 12) -> None:
    caps = (32, 128, 256)
    workers = {cap: _worker_of_batch_size(cap) for cap in caps}
    for worker in workers.values():
        await worker.start()
    tokenizer = workers[32].registry.models[0].tokens.tokenizer
    texts = texts_of_length(tokenizer, tokens, count)
    requests = [texts[i : i + 16] for i in range(0, len(texts), 16)]
    rates: dict[int, list[float]] = {cap: [] for cap in caps}
    cpu_rates: dict[int, list[float]] = {cap: [] for cap in caps}  # steadier on a shared machine
    try:
        for round_no in range(rounds + 1):
            for cap in caps if round_no % 2 else caps[::-1]:
                worker = workers[cap]
                started, started_cpu = time.perf_counter(), time.process_time()
                replies = await asyncio.gather(
                    *(answer_job(worker, {"input": r}) for r in requests)
                )
                assert all(r.ok for r in replies)
                if round_no:  # the first round warms up
                    rates[cap].append(count / (time.perf_counter() - started))
                    cpu_rates[cap].append(count / (time.process_time() - started_cpu))
    finally:
        for worker in workers.values():
            await worker.stop()
    base, cpu_base = statistics.median(rates[32]), statistics.median(cpu_rates[32])
    print(f"{count} texts of ~{tokens} tokens, all-MiniLM-L6-v2, DTYPES=auto, medians")
    for cap in caps:
        rate, cpu_rate = statistics.median(rates[cap]), statistics.median(cpu_rates[cap])
        print(
            f"  {cap} a batch: {rate:.1f} texts/s ({rate / base:.2f}x of 32), "
            f"{cpu_rate:.1f} texts per CPU second ({cpu_rate / cpu_base:.2f}x of 32)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.token_budget", description=__doc__)
    parser.add_argument("--long", type=int, default=64, help="long texts in the burst")
    parser.add_argument("--short", type=int, default=4096, help="short texts a round")
    parser.add_argument("--rounds", type=int, default=5, help="short-text rounds")
    parser.add_argument("--repeats", type=int, default=2, help="processes per burst variant")
    parser.add_argument("--short-tokens", type=int, default=12, help="tokens of a short text")
    parser.add_argument("--only", choices=("memory", "short"), help="one of the two parts")
    parser.add_argument("--burst", nargs=3, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.burst:
        path, budget, count = args.burst
        print(json.dumps(asyncio.run(_burst(path, int(budget), int(count)))))
        return
    if args.only != "short":
        peak_memory(args.long, args.repeats)
    if args.only != "memory":
        asyncio.run(short_batches(args.short, args.rounds, args.short_tokens))


if __name__ == "__main__":
    main()
