"""A/B of local servers: `handler.py --serve` from several checkouts, against the raw engine,
interleaved.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.server_ab CHECKOUT[|VAR=VALUE...] [CHECKOUT...]
        [--concurrency 16,64] [--rounds 5] [--requests 1024] [--length short|medium]

Each CHECKOUT is a folder holding a copy of this repository (a `git worktree`, say), optionally
followed by `|VAR=VALUE` environment settings for its server. A checkout's server runs on the
checkout's own .venv/bin/python where it has one (`python -m venv .venv && .venv/bin/pip install
-e .` there), so that its own installed package answers; without one it runs on this interpreter,
whose installed embedding_worker is this repository's. All servers run at once, each in its own
process on the bundled MiniLM in float32; rounds of one-text requests go to each in turn and to a
plain Infinity engine in this process (bench/baseline.py), and each server's figure is its paired
median ratio to that engine. Two variants in one run share the machine's load, unlike two runs of
bench/run.py: this is how the README's before/after figures for the server's changes are measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
from typing import Any

from bench.baseline import engine_tokenizer, raw_engine
from bench.common import (
    LENGTHS,
    KeepAliveClient,
    interleaved,
    one_text_each_to_engine,
    one_text_each_to_server,
    paired_ratio,
    start_local_server,
    stop_server,
    texts_of_length,
    wait_listening,
)
from embedding_worker.config import DEFAULT_MODEL_ID, load_config


def start_server(spec: str, log_file: Any) -> tuple[subprocess.Popen, int]:
    """A server for `CHECKOUT[|VAR=VALUE...]`."""
    checkout, *settings = spec.split("|")
    env = dict(setting.split("=", 1) for setting in settings)
    return start_local_server(checkout, env, log_file)


async def compare(args: argparse.Namespace) -> None:
    logs = {spec: tempfile.TemporaryFile() for spec in args.checkouts}
    servers = {spec: start_server(spec, logs[spec]) for spec in args.checkouts}
    engine = raw_engine(load_config({"MODEL_NAMES": DEFAULT_MODEL_ID, "DTYPES": "float32"}))
    texts = texts_of_length(engine_tokenizer(engine), LENGTHS[args.length], args.requests)
    await engine.astart()
    posts = [KeepAliveClient.request("/v1/embeddings", {"input": [t]}) for t in texts]
    try:
        for spec, (server, port) in servers.items():
            await wait_listening(server, port, logs[spec])
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
            line = f"{args.length} c{concurrency}: engine {engine_rps:.0f} req/s | {ratios}"
            print(line, flush=True)
    finally:
        for server, _ in servers.values():
            stop_server(server)
        for log_file in logs.values():
            log_file.close()
        await engine.astop()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.server_ab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkouts", nargs="+", metavar="CHECKOUT[|VAR=VALUE...]")
    parser.add_argument(
        "--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[16, 64]
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--length", choices=sorted(LENGTHS), default="short")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.run(compare(args))


if __name__ == "__main__":
    main()
