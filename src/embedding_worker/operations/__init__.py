"""The worker's operations, one module each, and the registry that dispatch, the HTTP routes and
batch lines all read.

An operation module owns its request model, how it is recognised in a standard-flavour job
(`job_fields`), how it runs, and its answer; it ends with one `OPERATION`. Adding an operation is
adding its module and listing its OPERATION here.
"""

from __future__ import annotations

from . import batch, embeddings, models, rerank
from .base import Context, Operation

# Standard-flavour jobs are recognised in this order: the first operation whose fields the job
# holds.
OPERATIONS: tuple[Operation, ...] = (
    batch.OPERATION,
    rerank.OPERATION,
    embeddings.OPERATION,
    models.OPERATION,
)

_BY_ROUTE = {op.route: op for op in OPERATIONS if op.route is not None}
ROUTES: tuple[str, ...] = tuple(_BY_ROUTE)
LINE_ROUTES: tuple[str, ...] = tuple(op.route for op in OPERATIONS if op.batch_line and op.route)


def by_route(route: str) -> Operation | None:
    """The operation of an OpenAI route ("/v1/embeddings"), trailing slashes aside."""
    return _BY_ROUTE.get(route.rstrip("/"))


def recognise(job_input: dict[str, object]) -> Operation | None:
    """The operation of a standard-flavour job input, told by the fields it holds."""
    return next((op for op in OPERATIONS if any(f in job_input for f in op.job_fields)), None)


def job_hints() -> str:
    """What a standard-flavour job may hold, for the error message of one that holds none."""
    return ", ".join(op.job_hint for op in OPERATIONS if op.job_hint)


__all__ = [
    "LINE_ROUTES",
    "OPERATIONS",
    "ROUTES",
    "Context",
    "Operation",
    "by_route",
    "job_hints",
    "recognise",
]
