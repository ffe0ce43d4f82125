"""The local server against Infinity's own HTTP server, quiet and beside a busy neighbour process.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.neighbour [--requests 1024] [--rounds 3]
        [--concurrency 64] [--neighbours 1] [--env VAR=VALUE ...]

Both servers run at once on the bundled MiniLM (float32, batch 32): this checkout's `handler.py
--serve` and `infinity_emb v2`. Rounds of one-text requests at `--concurrency` go to each in turn
(alternating which goes first), first quiet, then while `--neighbours` processes that each keep
one core busy (started and stopped by this bench) run beside them: what a shared vCPU is. Prints
each server's requests a second, quiet and beside the neighbour (medians of the rounds), the
server's ratio to Infinity's under the same neighbour, and each one's busy figure over its quiet
one. `--env` sets the worker's server's environment (OMP_NUM_THREADS=2, say, to compare).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import (
    ROOT,
    KeepAliveClient,
    one_text_each_to_server,
    start_local_server,
    stop_server,
    wait_listening,
)
from embedding_worker.config import bundled_model_path

WORDS = "the quick brown fox jumps over a lazy dog near old stone bridges".split()
SERVED = "minilm"


def _busy() -> None:  # pragma: no cover - runs in the neighbour process
    while True:
        pass


# `infinity_emb v2`, with a stand-in for prometheus_fastapi_instrumentator where it is not installed
# (Infinity's `server` extra, which the worker does not need): its server then runs without its
# metrics middleware, a little faster, never slower, than as shipped.
_INFINITY_SERVER = """
import sys, types
try:
    import prometheus_fastapi_instrumentator
except ImportError:
    class Instrumentator:
        def instrument(self, app):
            return self
        def expose(self, app):
            return self
    stand_in = types.ModuleType("prometheus_fastapi_instrumentator")
    stand_in.Instrumentator = Instrumentator
    sys.modules["prometheus_fastapi_instrumentator"] = stand_in
from infinity_emb.cli import cli
sys.argv[0] = "infinity_emb"
cli()
"""


def start_infinity_server(log_file: Any) -> tuple[subprocess.Popen, int]:
    """Infinity's own server (`infinity_emb v2`) on the bundled MiniLM, float32, batch 32."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", _INFINITY_SERVER, "v2", "--model-id"]
    command += [str(bundled_model_path()), "--served-model-name", SERVED, "--port", str(port)]
    command += ["--batch-size", "32", "--dtype", "float32", "--engine", "torch"]
    command += ["--device", "cpu", "--host", "127.0.0.1"]
    env = {**os.environ, "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    return subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT), port


async def rate(port: int, posts: list[bytes], concurrency: int) -> float:
    started = time.perf_counter()
    await one_text_each_to_server(port, posts, concurrency)
    return len(posts) / (time.perf_counter() - started)


async def compare(args: argparse.Namespace) -> None:
    env = dict(setting.split("=", 1) for setting in args.env)
    logs = {name: tempfile.TemporaryFile() for name in ("server", "infinity")}
    servers = {
        "server": start_local_server(ROOT, env, logs["server"]),
        "infinity": start_infinity_server(logs["infinity"]),
    }
    texts = [
        " ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)) + f" {i}"
        for i in range(args.requests)
    ]
    posts = {
        "server": [KeepAliveClient.request("/v1/embeddings", {"input": [t]}) for t in texts],
        "infinity": [
            KeepAliveClient.request("/embeddings", {"model": SERVED, "input": [t]}) for t in texts
        ],
    }
    rates: dict[tuple[str, str], list[float]] = {}
    neighbours: list[multiprocessing.Process] = []
    try:
        for name, (server, port) in servers.items():
            await wait_listening(server, port, logs[name])
        for name, (_, port) in servers.items():  # warm-up
            await rate(port, posts[name][:256], args.concurrency)
        for phase in ("quiet", "neighbour"):
            if phase == "neighbour":
                for _ in range(args.neighbours):
                    neighbour = multiprocessing.Process(target=_busy, daemon=True)
                    neighbour.start()
                    neighbours.append(neighbour)
                time.sleep(1)
            for round_no in range(args.rounds):
                order = list(servers) if round_no % 2 == 0 else list(servers)[::-1]
                for name in order:
                    port = servers[name][1]
                    value = await rate(port, posts[name], args.concurrency)
                    rates.setdefault((name, phase), []).append(value)
    finally:
        for neighbour in neighbours:
            neighbour.terminate()
            neighbour.join()
        for server, _ in servers.values():
            stop_server(server)
    median = {key: statistics.median(values) for key, values in rates.items()}
    print(
        f"{args.requests} one-text requests at concurrency {args.concurrency}, {args.rounds} "
        f"rounds, {args.neighbours} busy neighbour process(es), {os.cpu_count()} CPUs"
        + (f", server env {' '.join(args.env)}" if args.env else "")
    )
    print("| server | quiet req/s | beside the neighbour req/s | neighbour / quiet |")
    print("| --- | ---: | ---: | ---: |")
    for name in servers:
        quiet, busy = median[(name, "quiet")], median[(name, "neighbour")]
        print(f"| {name} | {quiet:.0f} | {busy:.0f} | {busy / quiet:.2f} |")
    quiet_ratio = median[("server", "quiet")] / median[("infinity", "quiet")]
    busy_ratio = median[("server", "neighbour")] / median[("infinity", "neighbour")]
    print(
        f"server / Infinity's server: quiet {quiet_ratio:.2f}, "
        f"beside the neighbour {busy_ratio:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.neighbour",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--neighbours", type=int, default=1)
    parser.add_argument("--env", nargs="*", default=[], help="VAR=VALUE for the worker's server")
    asyncio.run(compare(parser.parse_args()))


if __name__ == "__main__":
    main()
