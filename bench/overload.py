"""`/health` latency while the local server is saturated with maximum-size requests.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.overload [--clients 6] [--seconds 45]
        [--inputs 2048] [--tokens 146]

`handler.py --serve` on the bundled MiniLM in float32 (this checkout). First `/health` is probed
idle; then `--clients` clients each send maximum-size embeddings requests (`--inputs` texts of
`--tokens` tokens: 2048 x 146 = 299,008, just within MAX_REQUEST_TOKENS) one after another, without
waiting for Retry-After, for `--seconds`, while `/health` and `/ping` are probed every 20 ms over
their own connections. It reports each probe's p50, p99 and largest latency idle and saturated, the
saturated / idle ratio of the p99, and how the burst's requests were answered (200, 429, 503).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import tempfile
import time

from bench.baseline import engine_tokenizer, raw_engine
from bench.common import (
    ROOT,
    KeepAliveClient,
    start_local_server,
    stop_server,
    texts_of_length,
    wait_listening,
)
from embedding_worker.config import DEFAULT_MODEL_ID, load_config

PROBE_EVERY_S = 0.02


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


async def probe(port: int, path: str, until: float) -> list[float]:
    """Seconds each `GET path` took, one every PROBE_EVERY_S until `until` (monotonic)."""
    client = await KeepAliveClient.connect(port)
    request = _get(path)
    took = []
    try:
        while time.monotonic() < until:
            started = time.perf_counter()
            status, _ = await client.send(request)
            took.append(time.perf_counter() - started)
            if status >= 500:
                raise RuntimeError(f"{path} answered {status} while saturated")
            await asyncio.sleep(PROBE_EVERY_S)
    finally:
        await client.close()
    return took


async def saturate(port: int, post: bytes, until: float, answered: collections.Counter) -> None:
    """Maximum-size requests one after another until `until`; the last may still run then."""
    client = await KeepAliveClient.connect(port)
    try:
        while time.monotonic() < until:
            status, _ = await client.send(post)
            answered[status] += 1
    finally:
        await client.close()


def summary(name: str, took: list[float]) -> str:
    ms = sorted(1e3 * t for t in took)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return f"{name}: p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms"


def p99(took: list[float]) -> float:
    return sorted(took)[min(len(took) - 1, int(0.99 * len(took)))]


async def measure(args: argparse.Namespace) -> None:
    engine = raw_engine(load_config({"MODEL_NAMES": DEFAULT_MODEL_ID, "DTYPES": "float32"}))
    text = texts_of_length(engine_tokenizer(engine), args.tokens, 1)[0]
    post = KeepAliveClient.request("/v1/embeddings", {"input": [text] * args.inputs})
    with tempfile.TemporaryFile() as log_file:
        server, port = start_local_server(ROOT, {}, log_file)
        try:
            await wait_listening(server, port, log_file)
            idle_until = time.monotonic() + 5
            idle = await asyncio.gather(*(probe(port, p, idle_until) for p in ("/health", "/ping")))
            answered: collections.Counter = collections.Counter()
            until = time.monotonic() + args.seconds
            clients = [saturate(port, post, until, answered) for _ in range(args.clients)]
            probes = [asyncio.gather(*(probe(port, p, until) for p in ("/health", "/ping")))]
            # The clients' last requests may outlast the window: the probes' figures are taken
            # while every client has a request in the worker, which is what saturated means here.
            done, pending = await asyncio.wait(
                [asyncio.ensure_future(c) for c in [*clients, *probes]],
                timeout=args.seconds + 5,
            )
            saturated = next(t.result() for t in done if isinstance(t.result(), list))
            for task in pending:
                task.cancel()
        finally:
            stop_server(server)
    for path, calm, busy in zip(("/health", "/ping"), idle, saturated):
        print(summary(f"{path} idle", calm))
        print(summary(f"{path} saturated", busy))
        print(f"{path} p99 saturated / idle: {p99(busy) / p99(calm):.2f}")
    print(
        f"burst of {args.clients} clients x {args.inputs} inputs of {args.tokens} tokens for "
        f"{args.seconds:g} s: answers {dict(sorted(answered.items()))}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=45)
    parser.add_argument("--inputs", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=146)
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
