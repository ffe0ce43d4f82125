"""What an engine is given: one model to serve (`ModelSpec`) and the settings every engine
shares."""

from __future__ import annotations

from dataclasses import dataclass, field

from .budget import default_max_batch_tokens

DEFAULT_BATCH_SIZE = 32
DEFAULT_DTYPE = "auto"
DEFAULT_BACKEND = "torch"
LONG_INPUTS = ("truncate", "chunk", "error")
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
    # What a text longer than the model's maximum gets when a request does not say
    # (LONG_INPUTS): cut ("truncate"), embedded window by window ("chunk"), or refused ("error").
    long_inputs: str = "truncate"

    def __post_init__(self) -> None:
        if self.max_batch_tokens <= 0:
            object.__setattr__(self, "max_batch_tokens", default_max_batch_tokens(self.batch_size))


@dataclass(frozen=True)
class Optimisations:
    """The worker's optimisations of how an engine is fed, each on unless switched off here: the
    benchmarks switch one off to measure what it gains (bench.handler_ab, bench.token_budget).
    None is a setting of the worker's: each is on in every deployment."""

    # Texts carry the token ids counted for them, and the engine pads those instead of tokenizing
    # again (tokenization.py: Infinity's embedders and bge-m3). Infinity's embedders pad by
    # `batch_invariant` only on it.
    reuse_token_ids: bool = True
    # The paced queue wakes Infinity's publisher at the end of the event loop's turn that
    # submitted work, not at each submission (scheduler.py).
    turn_end_wake: bool = True
    # A full batch that a later job of a turn completes goes to the model at once, not at the
    # turn's end (scheduler.py).
    full_batch_wake: bool = True
    # Batches of short texts hold more than the batch size (budget.py; every engine).
    wide_short_batches: bool = True


@dataclass(frozen=True)
class EngineSettings:
    """Settings shared by every engine: the queue bounds, the time bounds, remote code, and the
    optimisations on."""

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
    # Where BACKEND=optimum keeps its exports (ONNX_CACHE_DIR); empty: onnx.default_cache_dir.
    onnx_cache_dir: str = ""
    # The devices each model gets a replica on (DEVICES, devices.py); empty: every visible GPU.
    devices: tuple[str, ...] = ()
    optimisations: Optimisations = field(default_factory=Optimisations)
