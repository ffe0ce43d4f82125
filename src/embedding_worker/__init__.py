"""A RunPod serverless worker for text embeddings and reranking on the Infinity engine.

The public surface: `Worker` (one dispatch for every transport), `Answer` (what it answers) and
`load_config` (the configuration from the environment); the `embedding-worker` command is
`embedding_worker.cli:main`. They are imported on first use, so the command's `--help` is quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"  # the one copy: pyproject.toml reads it ([tool.setuptools.dynamic])

__all__ = ["Answer", "Worker", "WorkerConfig", "__version__", "load_config"]

if TYPE_CHECKING:
    from .config import WorkerConfig, load_config
    from .dispatch import Worker
    from .reply import Answer

_HOMES = {
    "Worker": "dispatch",
    "Answer": "reply",
    "WorkerConfig": "config",
    "load_config": "config",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
