"""Log lines that name their job, and tracebacks that never carry a payload.

The job id lives in a context variable set by `Worker.serve`; asyncio copies it into every task
the job starts, so an engine call deep down still logs under its job. Lines logged outside a job
(start-up, Infinity's batch threads) carry no prefix.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

current_job: ContextVar[str | None] = ContextVar("embedding_worker_job", default=None)


class JobLogger(logging.LoggerAdapter):
    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        job = current_job.get()
        return (f"job {job}: {msg}" if job is not None else msg), kwargs


def get_logger(name: str) -> JobLogger:
    return JobLogger(logging.getLogger(name), {})


def redacted_traceback(exc: BaseException) -> str:
    """Where an exception came from, without its message: messages of tokenizers, pydantic or torch
    can quote the input, and logs must never echo a payload."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    return f"{type(exc).__module__}.{type(exc).__qualname__} (message withheld)\n{frames}"
