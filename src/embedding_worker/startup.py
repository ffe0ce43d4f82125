"""Building the worker at process start: logging, the environment for the hub, memory, the models.

Nothing here runs at import: the entry points call `build_worker()` once their arguments are
parsed, so `--help` and usage errors never wait for a model to load.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

from . import tracing
from .allocator import keep_freed_memory
from .config import ConfigError, WorkerConfig, load_config
from .dispatch import Worker
from .engines import ModelLoadError
from .logs import LOG_FORMATS, RequestFields, formatter
from .model_paths import RUNPOD_VOLUME, volume_download_home
from .threads import prepare_thread_environment, size_compute_threads

log = logging.getLogger("embedding_worker")


class _LoggerNames(logging.Filter):
    """uvicorn logs its ordinary start-up lines as `uvicorn.error` (its name for the server's own
    log, errors or not); shown as `uvicorn`, they do not read as failures."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.error":
            record.name = "uvicorn"
        return True


def configure_logging() -> None:
    # Importing infinity_emb replaces the root handlers with a Rich one that wraps lines at the
    # terminal width; import it first, then install plain one-line records over it.
    import infinity_emb.log_handler  # noqa: F401

    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    log_format = os.environ.get("LOG_FORMAT", "text").strip().lower() or "text"
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        force=True,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_LoggerNames())
        handler.addFilter(RequestFields())
        handler.setFormatter(formatter(log_format))
    if log_format not in LOG_FORMATS:
        log.warning("LOG_FORMAT must be one of %s; writing text", ", ".join(LOG_FORMATS))


def prepare_hub_environment(
    config: WorkerConfig, environ: MutableMapping[str, str], volume: Path = Path(RUNPOD_VOLUME)
) -> None:
    """Set the Hugging Face variables for this start; must run before huggingface_hub is imported.

    Every model on disk (baked, cached, bundled): offline, so no hub look-up can slow the start.
    Otherwise, with a writable network volume, downloads go to it and the next start finds them.
    """
    if config.all_local:
        environ.setdefault("HF_HUB_OFFLINE", "1")
        return
    if not environ.get("HF_HOME", "").strip():
        environ.pop("HF_HOME", None)  # an empty value would put the cache in the working directory
        home = volume_download_home(volume)
        if home is not None:
            environ["HF_HOME"] = str(home)
            log.info("downloading models to the network volume: %s", home)


def load_config_or_exit() -> WorkerConfig:
    try:
        return load_config()
    except ConfigError as exc:
        print(f"embedding worker: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def build_worker(config: WorkerConfig | None = None) -> Worker:
    """Read the configuration and load every model, or exit with a clear message."""
    # Before anything imports torch (Infinity's log handler does): OpenMP reads it once, at load.
    prepare_thread_environment(os.environ)
    configure_logging()
    if config is None:
        config = load_config_or_exit()
    tracing.configure()
    try:
        # before any engine thread allocates: a thread keeps the heap it first got
        if keep_freed_memory(os.environ, config.keep_freed_memory):
            log.info("malloc keeps the memory a batch frees for the next (KEEP_FREED_MEMORY)")
        prepare_hub_environment(config, os.environ)
        size_compute_threads(os.environ)
        worker = Worker.from_config(config)
    except ModelLoadError as exc:
        print(f"embedding worker: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # What is loaded now (the libraries, the models' modules) lives as long as the process: out of
    # the collector's way, a full collection no longer walks its hundreds of thousands of objects
    # while it holds the GIL, a pause that every request in flight, /health included, waits out.
    gc.freeze()
    return worker
