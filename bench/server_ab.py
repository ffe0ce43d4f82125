"""A/B of local servers: `handler.py --serve` from several checkouts, against the raw engine, interleaved.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/server_ab.py CHECKOUT[|VAR=VALUE...] [CHECKOUT...]
        [--concurrency 16,64] [--rounds 5] [--requests 1024] [--length short|medium]

Each CHECKOUT is a folder holding a copy of this repository (a `git worktree`, say), optionally followed
by `|VAR=VALUE` environment settings for its server. All servers run at once, each in its own process on
the bundled MiniLM in float32; rounds of one-text requests go to each in turn and to a plain Infinity
engine in this process (bench/baseline.py), and each server's figure is its paired median ratio to that
engine. This is how the README's before/after figures for the server's changes were measured: two
variants in one run share the machine's load, unlike two runs of bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.baseline import raw_engine_for  # noqa: E402
from bench.run import (  # noqa: E402
    LENGTHS,
    KeepAliveClient,
    interleaved,
    one_text_each_to_engine,
    one_text_each_to_server,
    paired_ratio,
    texts_of_length,
)
from embedding_worker.config import DEFAULT_MODEL_ID, load_config  # noqa: E402
from embedding_worker.dispatch import Worker  # noqa: E402


def start_server(spec: str) -> tuple[subprocess.Popen, int]:
    checkout, *settings = spec.split("|")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update({"MODEL_NAMES": DEFAULT_MODEL_ID, "DTYPES": "float32", "LOG_LEVEL": "WARNING"})
    env.update(setting.split("=", 1) for setting in settings)
    command = [sys.executable, "handler.py", "--serve", "--port", str(port)]
    server = subprocess.Popen(command, cwd=checkout, env=env, stdout=subprocess.DEVNULL)
    return server, port


async def wait_listening(server: subprocess.Popen, port: int) -> None:
    while True:
        if server.poll() is not None:
            raise SystemExit(f"a server exited with {server.returncode}")
        try:
            await (await KeepAliveClient.connect(port)).close()
            return
        except OSError:
            await asyncio.sleep(0.5)


async def main(args: argparse.Namespace) -> None:
    servers = {spec: start_server(spec) for spec in args.checkouts}
    worker = Worker.from_config(load_config({"MODEL_NAMES": DEFAULT_MODEL_ID, "DTYPES": "float32"}))
    texts = texts_of_length(worker.registry.models[0].tokens.tokenizer, LENGTHS[args.length], args.requests)
    engine = raw_engine_for(worker)
    del worker
    await engine.astart()
    posts = [KeepAliveClient.request("/v1/embeddings", {"input": [t]}) for t in texts]
    try:
        for server, port in servers.values():
            await wait_listening(server, port)
        for concurrency in args.concurrency:
            variants = {
                "engine": lambda c=concurrency: one_text_each_to_engine(engine, texts, c),
                **{
                    spec: lambda p=port, c=concurrency: one_text_each_to_server(p, posts, c)
                    for spec, (_, port) in servers.items()
                },
            }
            await interleaved(variants, 1)
            times = await interleaved(variants, args.rounds)
            engine_rps = args.requests / statistics.median(times["engine"])
            ratios = " | ".join(f"{s}: {paired_ratio(times, s, 'engine'):.3f}" for s in servers)
            print(f"{args.length} c{concurrency}: engine {engine_rps:.0f} req/s | {ratios}", flush=True)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(60)
        await engine.astop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+")
    parser.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[16, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--length", choices=sorted(LENGTHS), default="short")
    asyncio.run(main(parser.parse_args()))
