"""Long inputs: what chunked embedding and late chunking cost against plain embedding, same run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.long_inputs [--texts 8] [--tokens 2048]
        [--documents 8] [--rounds 5]

Chunked (`long_inputs: "chunk"`), on the bundled all-MiniLM-L6-v2 (256 tokens), float32, batches of
32: `--texts` texts of `--tokens` tokens, in requests of 2, through the worker's dispatch; against
the same windows (each text's consecutive windows of 254 content tokens, decoded to text) embedded
as separate texts by the raw Infinity engine (bench/baseline.py), in the same requests; and an A/A
control, a second raw engine. Ratio: raw time / worker time (above 1: the worker is faster).

Late chunking (`late_chunking: true`), on a random-initialised model of bge-small's shape (512
tokens, mean pooling): `--documents` documents of 512 tokens (special tokens included) in 8 chunks
each, one request a document, concurrent; against the same 8 chunks embedded alone through the
worker. The pass is one forward of the whole document, the chunks alone eight short ones.

Variants alternate round by round (bench.common.interleaved); medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from typing import Any

from bench.baseline import engine_tokenizer, raw_engine
from bench.common import RESULTS, interleaved, log, model_dir, offline, paired_ratio
from embedding_worker.allocator import keep_freed_memory
from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.runpod import answer_job
from tests.model_factory import CORPUS

PER_REQUEST = 2
CHUNKS = 8


def long_texts(tokenizer: Any, tokens: int, count: int) -> list[str]:
    """`count` different texts of `tokens` content tokens each, from the corpus."""
    sentences = [s for s in CORPUS if len(s.split()) > 3 and s.isascii()]
    texts = []
    for i in range(count):
        ids: list[int] = []
        j = i * 11
        while len(ids) < tokens:
            ids += tokenizer(sentences[j % len(sentences)], add_special_tokens=False)["input_ids"]
            j += 1
        texts.append(tokenizer.decode(ids[:tokens]))
    return texts


def windows_of(tokenizer: Any, text: str, keep: int) -> list[str]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[i : i + keep]) for i in range(0, len(ids), keep)]


async def chunked_row(texts_count: int, tokens: int, rounds: int) -> dict[str, Any]:
    env = {"MODEL_NAMES": DEFAULT_MODEL_ID, "DTYPES": "float32", "BATCH_SIZES": "32"}
    config = load_config(env)
    worker = Worker.from_config(config)
    engines = [raw_engine(config), raw_engine(config)]
    await worker.start()
    for engine in engines:
        await engine.astart()
    try:
        model = worker.registry.models[0]
        tokenizer = engine_tokenizer(engines[0])
        keep = model.max_length - 2
        texts = long_texts(tokenizer, tokens, texts_count)
        requests = [texts[i : i + PER_REQUEST] for i in range(0, len(texts), PER_REQUEST)]
        windowed = [
            [w for text in request for w in windows_of(tokenizer, text, keep)]
            for request in requests
        ]

        async def through_worker() -> None:
            jobs = [
                {"input": request, "long_inputs": "chunk", "encoding_format": "base64"}
                for request in requests
            ]
            replies = await asyncio.gather(*(answer_job(worker, job) for job in jobs))
            assert all(reply.status == 200 for reply in replies), replies[0].body

        def through_engine(engine: Any) -> Any:
            async def run() -> None:
                await asyncio.gather(*(engine.embed(sentences=w) for w in windowed))

            return run

        variants = {
            "worker": through_worker,
            "raw": through_engine(engines[0]),
            "raw A/A": through_engine(engines[1]),
        }
        for call in variants.values():
            await call()  # warm-up
        times = await interleaved(variants, rounds)
        return {
            "windows": sum(len(w) for w in windowed),
            "worker_vs_raw": paired_ratio(times, "worker", "raw"),
            "aa": paired_ratio(times, "raw A/A", "raw"),
            "median_s": {name: statistics.median(t) for name, t in times.items()},
        }
    finally:
        for engine in engines:
            await engine.astop()
        await worker.stop()


async def late_row(documents: int, rounds: int) -> dict[str, Any]:
    path = model_dir("bge-small", RESULTS / "models")
    env = {"MODEL_NAMES": str(path), "DTYPES": "float32", "BATCH_SIZES": "32"}
    worker = Worker.from_config(load_config(env))
    await worker.start()
    try:
        model = worker.registry.models[0]
        tokenizer = model.tokens.tokenizer
        content = model.max_length - 2  # one pass: the document and its two special tokens
        docs = []
        for text in long_texts(tokenizer, content, documents):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:content]
            size = -(-len(ids) // CHUNKS)
            docs.append([tokenizer.decode(ids[i : i + size]) for i in range(0, len(ids), size)])

        def through_worker(late: bool) -> Any:
            async def run() -> None:
                jobs = [{"input": chunks, "late_chunking": late} for chunks in docs]
                replies = await asyncio.gather(*(answer_job(worker, job) for job in jobs))
                assert all(reply.status == 200 for reply in replies), replies[0].body

            return run

        variants = {"late": through_worker(True), "alone": through_worker(False)}
        for call in variants.values():
            await call()
        times = await interleaved(variants, rounds)
        usage = await answer_job(worker, {"input": docs[0], "late_chunking": True})
        return {
            "pass_tokens": usage.body["usage"]["total_tokens"],
            "late_vs_alone": paired_ratio(times, "late", "alone"),
            "median_s": {name: statistics.median(t) for name, t in times.items()},
        }
    finally:
        await worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.long_inputs", description=__doc__)
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    offline()
    keep_freed_memory(os.environ)  # the worker's malloc settings, as its process has them
    log("chunked long inputs (MiniLM)")
    chunked = asyncio.run(chunked_row(args.texts, args.tokens, args.rounds))
    log("late chunking (bge-small shape)")
    late = asyncio.run(late_row(args.documents, args.rounds))
    print(f"chunked: {args.texts} texts of {args.tokens} tokens, {chunked['windows']} windows")
    print(f"  worker chunked / raw engine on the windows: {chunked['worker_vs_raw']:.3f}x")
    print(f"  A/A (second raw engine / raw engine):       {chunked['aa']:.3f}x")
    print(f"  median seconds: {chunked['median_s']}")
    print(f"late chunking: {args.documents} documents of {late['pass_tokens']} tokens, 8 chunks")
    print(f"  late-chunked / the 8 chunks embedded alone: {late['late_vs_alone']:.3f}x")
    print(f"  median seconds: {late['median_s']}")


if __name__ == "__main__":
    main()
