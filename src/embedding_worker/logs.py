"""Log lines that name their job and request, and tracebacks that never carry a payload.

The job id lives in a context variable set by `Worker.serve`, the request in
`request_context.current_request`; asyncio copies both into every task the job starts, so an engine
call deep down still logs under its job and request. Lines logged outside a job (start-up,
Infinity's batch threads) carry neither.

`LOG_FORMAT=json` writes each line as one JSON object (`JsonFormatter`): the time, level, logger
and message, and the request's id, route, model, tier, status and duration where the line belongs
to one. Messages never quote a payload (errors.py), so neither format does.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import MutableMapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

from .request_context import current_request

current_job: ContextVar[str | None] = ContextVar("embedding_worker_job", default=None)

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(request_prefix)s%(message)s"


class JobLogger(logging.LoggerAdapter):
    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        job = current_job.get()
        return (f"job {job}: {msg}" if job is not None else msg), kwargs


def get_logger(name: str) -> JobLogger:
    return JobLogger(logging.getLogger(name), {})


class RequestFields(logging.Filter):
    """Puts the current request on each record (`record.request`, and `request_prefix` for the
    text format), read when the line is logged, in the request's own task."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = current_request.get()
        record.request = context
        if context is None or context.id == current_job.get():  # "job <id>: " names it
            record.request_prefix = ""
        else:
            record.request_prefix = f"request {context.id}: "
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and the request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = getattr(record, "request", None)
        if context is not None:
            line["request_id"] = context.id
            for name in ("route", "model", "tier", "status", "code"):
                value = getattr(context, name)
                if value is not None:
                    line[name] = value
            line["duration_ms"] = round(context.duration_s * 1000, 3)
        job = current_job.get()
        if job is not None and (context is None or job != context.id):
            line["job"] = job
        if record.exc_info:  # only the frames: an exception's message may quote the input
            line["traceback"] = redacted_traceback(record.exc_info[1])  # type: ignore[arg-type]
        return orjson.dumps(line).decode()


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for LOG_FORMAT `log_format` ("text" or "json")."""
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)


def redacted_traceback(exc: BaseException) -> str:
    """Where an exception came from, without its message: messages of tokenizers, pydantic or torch
    can quote the input, and logs must never echo a payload."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    return f"{type(exc).__module__}.{type(exc).__qualname__} (message withheld)\n{frames}"
