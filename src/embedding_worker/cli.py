"""The command line: `embedding-worker run | serve | batch | runpod`, and `python handler.py`.

Every mode parses and checks its arguments before any model loads, so `--help` answers at once and
a usage error costs nothing; only then is the worker built (startup.py) and the transport run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Called first by the entry points: OpenMP reads its environment once, when torch loads it.
from .threads import prepare_thread_environment

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
TEST_INPUT = "test_input.json"

# The flags runpod's SDK reads from sys.argv itself (runpod.serverless's parser), named here so that
# `--help` lists them and a bad value fails before any model loads; tests check they match the SDK.
RUNPOD_FLAGS: dict[str, dict[str, Any]] = {
    "--test_input": {"metavar": "JSON", "help": "a job to run instead of ./test_input.json"},
    "--rp_serve_api": {"action": "store_true", "help": "runpod's local API server"},
    "--rp_api_host": {"metavar": "HOST", "help": "its host (default localhost)"},
    "--rp_api_port": {"type": int, "metavar": "PORT", "help": "its port (default 8000)"},
    "--rp_api_concurrency": {"type": int, "metavar": "N", "help": "its workers (only 1 works)"},
    "--rp_log_level": {"metavar": "LEVEL", "help": "runpod's log level: ERROR, WARN, INFO, DEBUG"},
    "--rp_debugger": {"action": "store_true", "help": "runpod's debugger output"},
}


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535, got {value}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address (default {DEFAULT_HOST})")
    parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--health-port", type=_port, help="also answer on this port (RunPod's PORT_HEALTH)"
    )
    parser.add_argument(
        "--load-in-background",
        action="store_true",
        help="listen at once and load the models meanwhile: /ping answers 204 until they are "
        "ready, every other route 503 model_provisioning (RunPod's load-balancing endpoints)",
    )


def load_balancer_mode(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(PORT, PORT_HEALTH) when this process runs on a RunPod load-balancing endpoint, else None.

    RUNPOD_LOAD_BALANCER=true or false decides; unset, a RunPod worker (RUNPOD_POD_ID) that is
    given a PORT and no job queue (RUNPOD_WEBHOOK_GET_JOB) is one. RunPod's defaults: 80 for both.
    """
    chosen = environ.get("RUNPOD_LOAD_BALANCER", "").strip().lower()
    if chosen in ("0", "false", "no", "off"):
        return None
    on_runpod = bool(environ.get("RUNPOD_POD_ID")) and not environ.get("RUNPOD_WEBHOOK_GET_JOB")
    if chosen not in ("1", "true", "yes", "on") and not (on_runpod and environ.get("PORT")):
        return None
    port = _port(environ.get("PORT", "").strip() or "80")
    return port, _port(environ.get("PORT_HEALTH", "").strip() or str(port))


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--test-input",
        default=TEST_INPUT,
        metavar="FILE_OR_JSON",
        help=f"the job to answer: a file, or the job as JSON (default ./{TEST_INPUT})",
    )
    parser.add_argument(
        "--full", action="store_true", help="print every number (default: vectors shortened)"
    )


def add_runpod_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runpod's flags (read by the runpod SDK)")
    for flag, options in RUNPOD_FLAGS.items():
        group.add_argument(flag, **options)


def build_parser() -> argparse.ArgumentParser:
    from .transports import batch_files

    parser = argparse.ArgumentParser(
        prog="embedding-worker",
        description="Text embeddings and reranking on Infinity, as a RunPod worker or locally. "
        "Models and settings come from the environment (MODEL_NAMES, BATCH_SIZES, DTYPES, ...).",
        allow_abbrev=False,
    )
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    run = modes.add_parser(
        "run", help="answer one job (./test_input.json) and print the answer", allow_abbrev=False
    )
    add_run_arguments(run)
    run.set_defaults(mode_parser=run)
    serve = modes.add_parser(
        "serve", help="the local HTTP server: RunPod's and OpenAI's routes", allow_abbrev=False
    )
    add_serve_arguments(serve)
    serve.set_defaults(mode_parser=serve)
    batch = modes.add_parser(
        "batch",
        help="answer a batch file into an OpenAI Batch output file (resumable)",
        description='Answer a batch file (OpenAI Batch JSONL, plain {"text"} lines, or a .txt '
        "file with one document per line) into an OpenAI Batch output file; resumable.",
        allow_abbrev=False,
    )
    batch_files.add_arguments(batch)
    batch.set_defaults(mode_parser=batch)
    runpod = modes.add_parser(
        "runpod",
        help="RunPod's serverless worker (what python handler.py runs)",
        allow_abbrev=False,
    )
    add_runpod_arguments(runpod)
    runpod.set_defaults(mode_parser=runpod)
    return parser


def handler_parser() -> argparse.ArgumentParser:
    """`python handler.py`: RunPod's worker, with the local modes behind --serve and --batch."""
    parser = argparse.ArgumentParser(
        prog="python handler.py",
        description="RunPod's serverless worker. On RunPod it takes jobs; elsewhere runpod runs "
        f"./{TEST_INPUT} (or --test_input) once and prints the answer.",
        epilog="Local modes: python handler.py --serve [--host H] [--port P] runs the local HTTP "
        "server; python handler.py --batch FILE --output FILE [...] answers a batch file "
        "(--serve --help and --batch FILE --help list their flags). The same modes: "
        "embedding-worker run | serve | batch | runpod.",
        allow_abbrev=False,
    )
    add_runpod_arguments(parser)
    parser.set_defaults(mode="runpod", mode_parser=parser)
    return parser


def _handler_argv(argv: list[str]) -> list[str]:
    """handler.py's flags as embedding-worker's: --serve ... is `serve ...`, --batch FILE ... is
    `batch FILE ...`, anything else is `runpod ...`."""
    if "--serve" in argv:
        return ["serve", *(a for a in argv if a != "--serve")]
    for i, arg in enumerate(argv):
        if arg == "--batch":
            return ["batch", *argv[:i], *argv[i + 1 :]]
        if arg.startswith("--batch="):
            return ["batch", arg.removeprefix("--batch="), *argv[:i], *argv[i + 1 :]]
    return ["runpod", *argv]


def read_job(source: str) -> dict[str, Any]:
    """A job `{"input": ...}` from a file, or from JSON text."""
    text = source
    if not source.lstrip().startswith("{"):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{source}: no such file")
        text = path.read_text(encoding="utf-8")
    try:
        job = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc.msg})") from None
    if not isinstance(job, dict) or "input" not in job:
        raise ValueError(f'{source}: a job is a JSON object with an "input" field')
    return job


def run_job(worker: Any, job: dict[str, Any], full: bool) -> int:
    """Answer one job as RunPod would and print RunPod's answer; 0 if it COMPLETED."""
    from .reply import preview
    from .transports.runpod import answer_job, job_answer

    job_id = str(job.get("id", "local_test"))

    async def once() -> Any:
        try:
            return await answer_job(worker, job["input"], job_id)
        finally:
            await worker.stop()

    reply = asyncio.run(once())
    answer = job_answer(job_id, reply)
    print(json.dumps(answer if full else preview(answer), indent=2, ensure_ascii=False))
    return 0 if reply.ok else 1


def dispatch_mode(args: argparse.Namespace, argv: list[str]) -> int:
    """Check the mode's arguments, then build the worker and run it. `argv`: runpod's flags."""
    from .startup import build_worker, load_config_or_exit

    parser: argparse.ArgumentParser = args.mode_parser
    if args.mode == "run":
        try:
            job = read_job(args.test_input)
        except ValueError as exc:
            parser.error(str(exc))
        return run_job(build_worker(), job, args.full)
    if args.mode == "serve":
        serve_http(args.host, args.port, args.health_port, args.load_in_background)
        return 0
    if args.mode == "batch":
        from .transports import batch_files

        options = batch_files.options_from_args(args, parser)
        if options.endpoint:  # the deployed endpoint answers: no model loads here
            return batch_files.main(None, options)
        return batch_files.main(build_worker(load_config_or_exit()), options)
    balanced = load_balancer_mode(os.environ)
    if balanced is not None:  # requests come straight to this process's HTTP server
        serve_http("0.0.0.0", balanced[0], balanced[1], load_in_background=True, runpod_proxy=True)
        return 0
    from .transports.runpod import run_runpod

    sys.argv = [sys.argv[0], *argv]  # runpod reads its flags from sys.argv
    run_runpod(build_worker())
    return 0


def serve_http(
    host: str,
    port: int,
    health_port: int | None,
    load_in_background: bool,
    runpod_proxy: bool = False,
) -> None:
    """The HTTP server on the worker: built first, or (load_in_background) while it listens.
    `runpod_proxy`: behind RunPod's load balancer (LocalServer)."""
    from .startup import build_worker, configure_logging, load_config_or_exit
    from .transports.http import LocalServer, ServerSettings
    from .transports.serving import serve

    try:
        settings = ServerSettings.from_env()
    except ValueError as exc:  # ConfigError
        print(f"embedding worker: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if load_in_background:
        configure_logging()
        config = load_config_or_exit()  # a bad setting still stops the start at once
        app = LocalServer(
            None, settings, load=lambda: build_worker(config), runpod_proxy=runpod_proxy
        )
    else:
        app = LocalServer(build_worker(), settings, runpod_proxy=runpod_proxy)
    serve(app, host, port, health_port)


def main(argv: Sequence[str] | None = None) -> None:
    """The `embedding-worker` console script."""
    prepare_thread_environment(os.environ)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    rest = argv[1:] if args.mode == "runpod" else []
    raise SystemExit(dispatch_mode(args, rest))


def handler_main(argv: Sequence[str] | None = None) -> None:
    """`python handler.py [...]`: RunPod's worker, or a local mode (--serve, --batch)."""
    prepare_thread_environment(os.environ)
    argv = list(sys.argv[1:] if argv is None else argv)
    translated = _handler_argv(argv)
    if translated[0] == "runpod":
        raise SystemExit(dispatch_mode(handler_parser().parse_args(argv), argv))
    main(translated)
