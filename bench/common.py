"""What the benchmarks share: the bench models and inputs, interleaved measuring, the local server.

bench/run.py measures every layer in one run; the A/B scripts (allocator_ab, engine_aa, handler_ab,
server_ab) isolate one of its rows. Both take their models, inputs and measuring from here, so a
script's figure is comparable with the row of bench/run.py it isolates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from embedding_worker.config import DEFAULT_MODEL_ID, WorkerConfig, bundled_model_path, load_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# Inputs per length, and the random-initialised real-size shapes (speed does not depend on the
# weights).
LENGTHS = {"short": 12, "medium": 110, "long": 500}
SHAPES: dict[str, dict[str, Any]] = {
    "minilm-shape": dict(
        family="bert",
        hidden_size=384,
        num_layers=6,
        num_heads=12,
        intermediate_size=1536,
        vocab_size=30522,
        max_seq_length=256,
    ),
    "bge-small": dict(
        family="bert",
        hidden_size=384,
        num_layers=12,
        num_heads=12,
        intermediate_size=1536,
        vocab_size=30522,
        max_seq_length=512,
    ),
    "bge-base": dict(
        family="bert",
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        vocab_size=30522,
        max_seq_length=512,
    ),
    "bge-large": dict(
        family="bert",
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        intermediate_size=4096,
        vocab_size=30522,
        max_seq_length=512,
    ),
    "qwen3-0.6b": dict(
        family="qwen3",
        hidden_size=1024,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=3072,
        vocab_size=151669,
        max_seq_length=8192,
    ),
}
FULL_MODELS = ["minilm", "bge-small", "bge-large", "qwen3-0.6b"]
REQUEST_SIZE = 16  # inputs per request: many concurrent requests, batched together by the engine


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- models and inputs


def model_dir(name: str, cache: Path) -> Path:
    """The bundled MiniLM, or a random-initialised model of a real model's shape (built once,
    cached)."""
    if name == "minilm":
        return bundled_model_path()
    return random_model(name, SHAPES[name], cache)


def random_model(name: str, shape: dict[str, Any], cache: Path) -> Path:
    """A random-initialised model of `shape` (a SHAPES entry) in `cache`/`name`, built once."""
    from tests import model_factory

    shape = dict(shape)
    family = shape.pop("family")
    path = cache / name
    if (path / "modules.json").is_file():
        return path
    log(f"building random-initialised {name} in {path}")
    if family == "bert":
        return model_factory.make_bert_embedder(path, max_position=512, **shape)
    return model_factory.make_qwen3_embedder(path, **shape)


def model_source(path: Path) -> str:
    """What MODEL_NAMES says for a model directory of model_dir (the bundled MiniLM by its id)."""
    return DEFAULT_MODEL_ID if path == bundled_model_path() else str(path)


def float32_config(name: str) -> WorkerConfig:
    """The worker configuration the A/B scripts run a bench model with: float32, batches of 32."""
    path = model_dir(name, RESULTS / "models")
    return load_config(
        {"MODEL_NAMES": model_source(path), "DTYPES": "float32", "BATCH_SIZES": "32"}
    )


def in_requests(texts: list[str]) -> list[list[str]]:
    """The texts as the benchmark sends them: requests of REQUEST_SIZE inputs."""
    return [texts[i : i + REQUEST_SIZE] for i in range(0, len(texts), REQUEST_SIZE)]


def texts_of_length(tokenizer: Any, tokens: int, count: int) -> list[str]:
    """`count` different texts of about `tokens` tokens each (special tokens included)."""
    from tests.model_factory import CORPUS

    sentences = [s for s in CORPUS if len(s.split()) > 3 and s.isascii()]
    texts = []
    for i in range(count):
        words: list[str] = []
        j = i * 7
        while len(words) < tokens * 2:
            words += sentences[j % len(sentences)].split()
            j += 1
        lo, hi = 1, len(words)
        while lo < hi:  # the most words that stay within `tokens`
            mid = (lo + hi + 1) // 2
            if len(tokenizer(" ".join(words[:mid]), verbose=False)["input_ids"]) <= tokens:
                lo = mid
            else:
                hi = mid - 1
        texts.append(" ".join(words[:lo]))
    return texts


# --------------------------------------------------------------------------- measuring


async def interleaved(
    variants: dict[str, Callable[[], Awaitable[Any]]],
    repeats: int,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, in rotating order: round r starts with variant r.

    `cpu`, if given, receives this process's CPU seconds per call (all its threads): on a shared
    machine far steadier than wall time, and what the worker's own overhead costs shows up in it."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            await variants[name]()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - start_cpu)
    return times


def paired_ratio(times: dict[str, list[float]], variant: str, baseline: str) -> float:
    """Median over rounds of baseline time / variant time: > 1 means the variant is faster."""
    return statistics.median(b / v for v, b in zip(times[variant], times[baseline]))


# --------------------------------------------------------------------------- local HTTP server


class KeepAliveClient:
    """One HTTP/1.1 keep-alive connection that posts pre-encoded JSON: the leanest client Python
    has.

    httpx costs the client ~2.5 ms of CPU a request here (one pool of 64: ~10 ms), CPU the server on
    the same 2 cores then lacks; this one ~0.1 ms, so the figure is the server's, not the client's.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> KeepAliveClient:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    @staticmethod
    def request(path: str, body: Any) -> bytes:
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        return (head + f"Content-Length: {len(data)}\r\n\r\n").encode() + data

    async def send(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        at = head.lower().index(b"content-length:") + len(b"content-length:")
        body = await self.reader.readexactly(int(head[at : head.index(b"\r\n", at)]))
        return status, body

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def one_text_each_to_server(port: int, posts: list[bytes], concurrency: int) -> None:
    """`posts` (KeepAliveClient.request bodies) over `concurrency` keep-alive connections."""
    todo = iter(posts)

    async def connection() -> None:
        # Fresh connections each round: uvicorn closes idle ones after 5 s.
        client = await KeepAliveClient.connect(port)
        try:
            for request in todo:
                status, body = await client.send(request)
                if status != 200:
                    raise RuntimeError(f"server answered {status}: {body[:300]!r}")
        finally:
            await client.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))


async def one_text_each_to_engine(engine: Any, texts: list[str], concurrency: int) -> None:
    """The same requests straight into an Infinity engine, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(text: str) -> None:
        async with gate:
            await engine.embed(sentences=[text])

    await asyncio.gather(*(one(t) for t in texts))


def checkout_python(checkout: Path | str) -> str:
    """The interpreter that runs `checkout`'s own code: this one for this repository; for another
    checkout its .venv's, where it has one (the package installed there is the checkout's), else
    this one."""
    own = Path(checkout) / ".venv" / "bin" / "python"
    if Path(checkout).resolve() == ROOT or not own.is_file():
        return sys.executable
    return str(own)


def start_local_server(
    checkout: Path | str, env: dict[str, str], log_file: Any
) -> tuple[subprocess.Popen, int]:
    """`handler.py --serve` of `checkout` on a free loopback port, float32, with `env` on top."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    full_env.update(
        {"MODEL_NAMES": DEFAULT_MODEL_ID, "DTYPES": "float32", "LOG_LEVEL": "WARNING", **env}
    )
    command = [checkout_python(checkout), "handler.py", "--serve"]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        cwd=checkout,
        env=full_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    return server, port


async def wait_listening(
    server: subprocess.Popen, port: int, log_file: Any, limit_s: float = 600
) -> None:
    """Until the server has loaded its model and listens; its log's tail if it exits instead."""
    deadline = time.monotonic() + limit_s
    while True:
        if server.poll() is not None:
            log_file.seek(0)
            raise RuntimeError(f"server exited: {log_file.read()[-2000:].decode(errors='replace')}")
        try:
            await (await KeepAliveClient.connect(port)).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not listen within {limit_s:g} s") from None
            await asyncio.sleep(0.5)


def stop_server(server: subprocess.Popen, wait_s: float = 60) -> None:
    """Terminate a server of start_local_server; kill it if it does not exit within `wait_s`."""
    server.terminate()
    try:
        server.wait(wait_s)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def random_model_parser(prog: str, description: str | None, rounds: int) -> argparse.ArgumentParser:
    """The options of a benchmark of an engine against its plain recipe on a random model: the
    rounds, the batch size and the model's shape (hidden 256, 4 layers, the tiny vocabulary)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=None)
    return parser


def offline() -> None:
    """No model hub, no telemetry, no tokenizer threads beside torch's (unless the caller set
    them)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
