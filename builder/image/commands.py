"""Commands every step runs: a checked `run`, buildah's images and containers, and step 1,
installing buildah and debootstrap when they are absent."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .report import Tools

__all__ = [
    "ISOLATION",
    "ROOT",
    "START_TIMEOUT",
    "CheckFailed",
    "ToolsMissing",
    "container",
    "ensure_tools",
    "image_exists",
    "inspect",
    "log",
    "run",
]

ROOT = Path(__file__).resolve().parents[2]
ISOLATION = ["--isolation", "chroot"]
START_TIMEOUT = 300.0  # seconds for a worker to answer, in the image or on the host


class CheckFailed(RuntimeError):
    """A step of the build or a check of the image failed; the message says which."""


class ToolsMissing(RuntimeError):
    """buildah or debootstrap is absent and cannot be installed here."""


def log(message: str) -> None:
    print(f"[image] {message}", flush=True)


def run(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, its output captured; a failure raises with the command and its output."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise CheckFailed(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{tail}")
    return proc


def ensure_tools() -> Tools:
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    started = time.monotonic()
    if missing:
        if os.geteuid() != 0:
            raise ToolsMissing(f"{', '.join(missing)} absent and not root: cannot apt-get install")
        if shutil.which("apt-get") is None:
            raise ToolsMissing(f"{', '.join(missing)} absent and no apt-get to install them")
        log(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", *missing], env=env)
    elif os.geteuid() != 0:
        raise ToolsMissing("buildah's chroot isolation with overlay storage needs root here")
    version = run(["buildah", "--version"]).stdout.strip()
    return Tools(installed=missing, seconds=round(time.monotonic() - started, 1), buildah=version)


def image_exists(tag: str) -> bool:
    inspected = subprocess.run(["buildah", "inspect", "--type", "image", tag], capture_output=True)
    return inspected.returncode == 0


def inspect(tag: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(run(["buildah", "inspect", "--type", "image", tag]).stdout)
    return data


@contextmanager
def container(tag: str) -> Iterator[str]:
    """A working container of the image, removed on the way out."""
    name = f"embedding-worker-check-{os.getpid()}-{secrets.token_hex(3)}"
    run(["buildah", "from", "--pull=false", "--name", name, tag])
    try:
        yield name
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True)
