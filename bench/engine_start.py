"""The raw Infinity engine's own cold start, the baseline of the worker's: load, start, one answer,
stop.

    HF_HUB_OFFLINE=1 MODEL_NAMES=... DTYPES=float32 .venv/bin/python -m bench.engine_start

bench/run.py runs it as a child process with the environment it gives `python handler.py`, so the
engine is built from the same WorkerConfig (load_config of that environment) and gets exactly the
EngineArgs the worker gives Infinity (bench/baseline.py). Prints "first answer" when the vector is
back.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from bench.baseline import raw_engine
from embedding_worker.config import load_config


async def first_answer() -> None:
    engine = raw_engine(load_config(os.environ))
    await engine.astart()
    try:
        vectors, _ = await engine.embed(sentences=["hello world"])
        print(f"first answer: {len(vectors[0])} dims", flush=True)
    finally:
        await engine.astop()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine_start",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.run(first_answer())


if __name__ == "__main__":
    main()
