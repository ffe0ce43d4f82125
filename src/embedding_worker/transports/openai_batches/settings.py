"""The Batch API's settings (docs/configuration.md): where files and batches are kept, and their
bounds. Read with the server's own settings; they do not apply to RunPod's queue endpoints."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ...env import float_var, int_var

# A RunPod network volume is mounted here: batches kept on it outlive the worker, and every
# worker of the endpoint that mounts it can answer a poll or take over a batch.
RUNPOD_VOLUME = Path("/runpod-volume")

BATCH_VARIABLES = (
    "BATCH_DIR",
    "BATCH_MAX_FILE_BYTES",
    "BATCH_MAX_LINES",
    "BATCH_MAX_FILES",
    "BATCH_RETENTION",
    "BATCH_CONCURRENCY",
    "BATCH_LEASE_S",
)


def default_dir() -> Path:
    """The network volume when one is mounted, else a folder in the user's home."""
    if RUNPOD_VOLUME.is_dir():
        return RUNPOD_VOLUME / "embedding-worker" / "batches"
    return Path.home() / ".local" / "share" / "embedding-worker" / "batches"


@dataclass(frozen=True)
class BatchSettings:
    dir: Path | None = None  # None: default_dir(), looked up when the store is first used
    max_file_bytes: int = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
    max_lines: int = 50_000  # requests in one file (OpenAI's limit)
    max_files: int = 1000  # uploaded files kept; past it the oldest unused upload goes
    retention: int = 1000  # batches kept; past it the oldest finished batch goes, with its files
    concurrency: int = 64  # lines of one batch in flight: enough for the engine's batches
    lease_s: float = 30.0  # a runner's claim on a batch lasts this long unless renewed

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BatchSettings:
        """Read the variables; a bad value raises ConfigError naming it."""
        env = os.environ if env is None else env
        default = cls()
        folder = env.get("BATCH_DIR", "").strip()
        return cls(
            dir=Path(folder) if folder else None,
            max_file_bytes=int_var(env, "BATCH_MAX_FILE_BYTES", default.max_file_bytes),
            max_lines=int_var(env, "BATCH_MAX_LINES", default.max_lines),
            max_files=int_var(env, "BATCH_MAX_FILES", default.max_files),
            retention=int_var(env, "BATCH_RETENTION", default.retention),
            concurrency=int_var(env, "BATCH_CONCURRENCY", default.concurrency),
            lease_s=float_var(env, "BATCH_LEASE_S", default.lease_s),
        )
