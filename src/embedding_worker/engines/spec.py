"""What an engine is given: one model to serve (`ModelSpec`) and the settings every engine
shares."""

from __future__ import annotations

from dataclasses import dataclass

from .budget import default_max_batch_tokens

DEFAULT_BATCH_SIZE = 32
DEFAULT_DTYPE = "auto"
DEFAULT_BACKEND = "torch"
AUTO_KIND = "auto"  # the model's files decide its kind (kinds.py)


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve."""

    source: str  # hub id or local directory handed to the loader
    served_id: str  # the id clients use and /v1/models shows
    batch_size: int = DEFAULT_BATCH_SIZE
    dtype: str = DEFAULT_DTYPE
    backend: str = DEFAULT_BACKEND
    kind: str = AUTO_KIND  # a name from kinds.KIND_NAMES
    # Most padded tokens (rows x longest) in one batch (MAX_BATCH_TOKENS); 0 derives it from the
    # batch size (budget.default_max_batch_tokens).
    max_batch_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_tokens <= 0:
            object.__setattr__(self, "max_batch_tokens", default_max_batch_tokens(self.batch_size))


@dataclass(frozen=True)
class EngineSettings:
    """Settings shared by every engine: the queue bounds, the time bounds, and remote code."""

    queue_size: int = 48_000  # most inputs queued per model (INFINITY_QUEUE_SIZE)
    timeout_s: float = 300.0  # most seconds one engine call may take (REQUEST_TIMEOUT)
    # Seconds without a finished batch, while work waits, after which a model is stalled and the
    # worker unhealthy until it moves again (ENGINE_STALL_TIMEOUT).
    stall_timeout_s: float = 300.0
    # Most tokens queued per model (MAX_QUEUED_TOKENS); None: what the model answers within
    # REQUEST_TIMEOUT at its measured pace, and `unmeasured_max_queued_tokens` until it is measured.
    max_queued_tokens: int | None = None
    unmeasured_max_queued_tokens: int = 300_000  # MAX_REQUEST_TOKENS: one maximum-size request
    trust_remote_code: bool = False
    # Embedders pad each text to a length of its own, so its vector does not depend on its batch.
    # Off by default: it costs throughput (bench/RESULTS.md, bench.invariance and bench.run).
    batch_invariant: bool = False
