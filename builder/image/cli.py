"""The command line: every step in order, one report, an exit status the test suite reads."""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path

from embedding_worker.config import DEFAULT_MODEL_ID

from .base import BASE_TAG, ensure_base
from .build import DEFAULT_TAG, build, describe
from .check import check_traces, check_user
from .commands import ROOT, CheckFailed, ToolsMissing, container, ensure_tools, log
from .report import Report
from .serve import run_handler, run_servers

__all__ = ["DEFAULT_CACHE", "DEFAULT_REPORT", "SKIP", "main"]

DEFAULT_CACHE = Path("/var/cache/embedding-worker-image")
DEFAULT_REPORT = ROOT / "bench" / "results" / "image.json"
SKIP = 77  # the exit status that tells the test buildah cannot be had here


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m builder.image",
        description="Build the worker's CPU image with buildah and check it from the inside.",
    )
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"default {DEFAULT_CACHE}"
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    report = Report(tag=args.tag)
    try:
        report.tools = ensure_tools()
    except ToolsMissing as exc:
        print(f"builder.image: {exc}", file=sys.stderr)
        return SKIP
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    canary = f"hf_canary_{secrets.token_hex(16)}"
    with tempfile.TemporaryDirectory(prefix="embedding-worker-image.") as tmp:
        work = Path(tmp)
        try:
            report.base = ensure_base(args.cache_dir)
            log_file = args.report.with_suffix(".build.log")
            report.build = build(args.tag, BASE_TAG, DEFAULT_MODEL_ID, canary, work, log_file)
            image = report.image = describe(args.tag)
            with container(args.tag) as ctr:
                mounted = [part for m in report.build.mounts for part in m.split(":")[:2]]
                host_paths = [str(work), str(args.cache_dir), *mounted]
                report.traces = check_traces(image, ctr, canary, host_paths)
                report.user = check_user(ctr)
                log("container: python handler.py (RunPod's local test)")
                report.handler = run_handler(ctr, image.cmd)
                report.servers = run_servers(image, ctr, work)
        except CheckFailed as exc:
            report.error = str(exc)
    report.seconds = round(time.monotonic() - started, 1)
    report.failures = report.find_failures()
    args.report.write_text(report.to_json())
    print(report.summary())
    for failure in report.failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if report.failures else 0
