"""Process entry: build the worker from the environment, then run one transport.

`python handler.py` is RunPod's serverless worker (and its local test and --rp_serve_api modes).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

# runpod's logger prints every job's input and output at DEBUG, its default level; it reads this
# variable once, when runpod is imported (RUNPOD_LOG_LEVEL or --rp_log_level still override it).
os.environ.setdefault("RUNPOD_DEBUG_LEVEL", "INFO")

from .config import ConfigError, load_config  # noqa: E402
from .dispatch import Worker  # noqa: E402
from .engines import ModelLoadError  # noqa: E402


def configure_logging() -> None:
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def build_worker() -> Worker:
    """Read the configuration and load every model, or exit with a clear message."""
    configure_logging()
    try:
        return Worker.from_config(load_config())
    except (ConfigError, ModelLoadError) as exc:
        print(f"embedding worker: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def runpod_handler(worker: Worker) -> Callable[[dict[str, Any]], Any]:
    async def handler(job: dict[str, Any]) -> Any:
        reply = await worker.dispatch(job.get("input"), job_id=job.get("id"))
        return reply.runpod_output()

    return handler


def run_runpod(worker: Worker) -> None:
    import runpod

    max_concurrency = worker.config.max_concurrency
    try:
        runpod.serverless.start(
            {
                "handler": runpod_handler(worker),
                "concurrency_modifier": lambda current: max_concurrency,
            }
        )
    finally:
        # runpod's local test ends with sys.exit(); Infinity's batch threads would keep the process
        # alive after it, so the engines are stopped on the way out.
        worker.registry.stop_blocking()


def main(worker: Worker, argv: list[str]) -> None:
    run_runpod(worker)
