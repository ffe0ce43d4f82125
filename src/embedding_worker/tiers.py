"""Service tiers: `priority`, `default` and `flex` work, as OpenAI's `service_tier` names them.

A request's tier is its `service_tier` field (`auto` is the worker's default tier, SERVICE_TIER),
else the tier of the job it runs in (a batch job's lines), else the worker's default. Dispatch puts
it in `current_tier` for the request's task; the engines' queues read it when work is queued
(engines/scheduler.py) and take priority work first, then default, then flex.
"""

from __future__ import annotations

from contextvars import ContextVar

TIERS = ("priority", "default", "flex")  # the order in which queued work runs
REQUEST_VALUES = ("auto", *TIERS)
DEFAULT_TIER = "default"

current_tier: ContextVar[str | None] = ContextVar("embedding_worker_tier", default=None)


def tier_rank(tier: str | None) -> int:
    """0 for priority, 1 default, 2 flex; no tier (work queued outside a request) is default."""
    return TIERS.index(tier) if tier in TIERS else TIERS.index(DEFAULT_TIER)
