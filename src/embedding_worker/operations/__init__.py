"""The worker's operations, one module each, and the registry that dispatch, the HTTP routes and
batch lines all read.

An operation module owns its request model, how it is recognised in a standard-flavour RunPod job
(`job_fields`, read by transports/runpod.py), how it runs, and its answer; it ends with its
`OPERATION`. Adding an operation is adding its module and listing its OPERATION here.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import unquote

from . import (
    batch,
    classify,
    cohere,
    contextualized,
    embeddings,
    infinity_api,
    models,
    rerank,
    tokenize,
)
from .base import Context, Operation

# A standard-flavour job is the first operation here whose fields it holds (and that applies to the
# model it names): classification before embeddings, which share `input`; tokenize and detokenize
# last, so that their fields (`prompt`, `tokens`, `ids`) never take another operation's job.
OPERATIONS: tuple[Operation, ...] = (
    batch.OPERATION,
    rerank.OPERATION,
    classify.OPERATION,
    embeddings.OPERATION,
    models.OPERATION,
    models.RETRIEVE,
    classify.INFINITY,
    *cohere.OPERATIONS,
    *infinity_api.OPERATIONS,
    contextualized.OPERATION,
    tokenize.OPERATION,
    tokenize.DETOKENIZE,
)

# An OpenAI route ("/v1/...") is also served under RunPod's OpenAI proxy path ("/openai/v1/...").
OPENAI_PREFIXES = ("/v1", "/openai/v1")


def _paths(route: str) -> list[str]:
    """The paths of a route: itself, and under every OpenAI prefix if it is an OpenAI route."""
    if not route.startswith("/v1/"):
        return [route]
    return [prefix + route.removeprefix("/v1") for prefix in OPENAI_PREFIXES]


_BY_PATH = {
    path: op
    for op in OPERATIONS
    if op.route is not None and "{" not in op.route
    for path in _paths(op.route)
}
# Routes ending in a parameter ("/v1/models/{model}"): the path before it, and its name. The
# parameter takes the rest of the path, slashes included: model ids hold them.
_TEMPLATES = [
    (path, op.route.partition("{")[2].rstrip("}"), op)
    for op in OPERATIONS
    if op.route is not None and "{" in op.route
    for path in _paths(op.route.partition("{")[0])
]
ROUTES: tuple[str, ...] = tuple(op.route for op in OPERATIONS if op.route is not None)
# The routes a batch line may name, with their operations.
LINE_ROUTES: Mapping[str, Operation] = {
    op.route: op for op in OPERATIONS if op.batch_line and op.route is not None
}


def match_route(route: str) -> tuple[Operation, dict[str, str]] | None:
    """The operation of a route or an HTTP path ("/v1/embeddings", "/openai/v1/models/org/name")
    and the parameters it carries; trailing slashes aside. The one matcher of routes: dispatch
    (the HTTP server, batch lines) and RunPod's `openai_route` ask it."""
    route = route.rstrip("/")
    operation = _BY_PATH.get(route)
    if operation is not None:
        return operation, {}
    for prefix, name, templated in _TEMPLATES:
        if route.startswith(prefix) and len(route) > len(prefix):
            return templated, {name: unquote(route[len(prefix) :])}
    return None


__all__ = [
    "LINE_ROUTES",
    "OPENAI_PREFIXES",
    "OPERATIONS",
    "ROUTES",
    "Context",
    "Operation",
    "match_route",
]
