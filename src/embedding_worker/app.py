"""Process entry: build the worker from the environment, then run one transport.

`python handler.py` is RunPod's serverless worker (and its local test and --rp_serve_api modes);
`python handler.py --serve [--host H] [--port P]` is the local HTTP server (server.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, MutableMapping

# runpod's logger prints every job's input and output at DEBUG, its default level; it reads this
# variable once, when runpod is imported (RUNPOD_LOG_LEVEL or --rp_log_level still override it).
os.environ.setdefault("RUNPOD_DEBUG_LEVEL", "INFO")

from . import batch  # noqa: E402
from .allocator import keep_freed_memory  # noqa: E402
from .config import ConfigError, WorkerConfig, load_config  # noqa: E402
from .dispatch import Worker  # noqa: E402
from .engines import ModelLoadError  # noqa: E402
from .model_paths import RUNPOD_VOLUME, volume_download_home  # noqa: E402

log = logging.getLogger("embedding_worker")


def configure_logging() -> None:
    # Importing infinity_emb replaces the root handlers with a Rich one that wraps lines at the
    # terminal width; import it first, then install plain one-line records over it.
    import infinity_emb.log_handler  # noqa: F401

    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


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


def build_worker() -> Worker:
    """Read the configuration and load every model, or exit with a clear message."""
    configure_logging()
    try:
        config = load_config()
        # before any engine thread allocates: a thread keeps the heap it first got
        if keep_freed_memory(os.environ, config.keep_freed_memory):
            log.info("malloc keeps freed memory for the next batch (KEEP_FREED_MEMORY=false: off)")
        prepare_hub_environment(config, os.environ)
        return Worker.from_config(config)
    except (ConfigError, ModelLoadError) as exc:
        print(f"embedding worker: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def runpod_handler(worker: Worker) -> Callable[[dict[str, Any]], Any]:
    async def handler(job: dict[str, Any]) -> Any:
        reply = await worker.dispatch(job.get("input"), job_id=job.get("id"))
        return reply.runpod_output()

    return handler


def runpod_config(worker: Worker) -> dict[str, Any]:
    """What runpod.serverless.start() is given: the handler and the concurrency per worker."""
    max_concurrency = worker.config.max_concurrency
    return {
        "handler": runpod_handler(worker),
        "concurrency_modifier": lambda current: max_concurrency,
    }


def processor_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def import_runpod() -> Any:
    """Import the runpod SDK without its 1.2 s CPU probe.

    At import, runpod asks py-cpuinfo for the processor's name (shown only in its debug output);
    py-cpuinfo's full probe starts a Python subprocess, about 1.2 s of every cold start here. For that
    one import it gets the name from /proc/cpuinfo instead.
    """
    if "runpod" in sys.modules:
        return sys.modules["runpod"]
    try:
        import cpuinfo  # runpod's own dependency (py-cpuinfo)
    except ImportError:
        import runpod

        return runpod

    full_probe = cpuinfo.get_cpu_info
    cpuinfo.get_cpu_info = lambda: {"brand_raw": processor_name()}
    try:
        import runpod
    finally:
        cpuinfo.get_cpu_info = full_probe
    return runpod


def run_runpod(worker: Worker) -> None:
    runpod = import_runpod()

    try:
        runpod.serverless.start(runpod_config(worker))
    finally:
        # runpod's local test ends with sys.exit(); Infinity's batch threads would keep the process
        # alive after it, so the engines are stopped on the way out.
        worker.registry.stop_blocking()


def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    """This worker's own flags. Everything else (--rp_serve_api, --test_input, ...) is runpod's,
    which reads sys.argv itself, so unknown flags are left alone."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--serve", action="store_true", help="run the local HTTP server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args, _runpod_args = parser.parse_known_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0 to 65535, got {args.port}")
    return args


def run_server(worker: Worker, host: str, port: int) -> None:
    from .server import ServerSettings, serve

    try:
        settings = ServerSettings.from_env()
    except ConfigError as exc:
        print(f"embedding worker: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    serve(worker, host, port, settings)


def main(worker: Worker, argv: list[str]) -> None:
    if batch.wants_batch(argv):  # python handler.py --batch FILE --output FILE ...
        raise SystemExit(batch.main(worker, argv))
    args = parse_serve_args(argv)
    if args.serve:
        run_server(worker, args.host, args.port)
    else:
        run_runpod(worker)
