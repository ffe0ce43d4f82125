"""The README runs as written: its shell blocks are run here (the two first ones by .ci/run), its
links and the docs' links lead somewhere, and it stays short."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests import doc_blocks
from tests.conftest import ROOT

README = ROOT / "README.md"
BLOCKS = doc_blocks.blocks()
KINDS = {"setup", "tests", "run", "server", "skip"}


def test_the_readme_is_for_users_and_short():
    assert len(README.read_text().splitlines()) <= 350


def test_every_shell_block_says_how_it_is_checked():
    assert doc_blocks.bash_block_count() == len(BLOCKS)
    assert {b.kind for b in BLOCKS} <= KINDS
    assert [b.kind for b in BLOCKS][:2] == ["setup", "tests"]
    assert all(b.why for b in BLOCKS if b.kind == "skip")


def test_ci_runs_the_readmes_two_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "doc_blocks.py setup" in ci and "doc_blocks.py tests" in ci


def _links(path):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize(
    "page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name
)
def test_relative_links_lead_to_files(page):
    missing = [t for t in _links(page) if not (page.parent / t).exists()]
    assert not missing


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize(
    "code", [b.code for b in BLOCKS if b.kind == "run"] or [None], ids=lambda c: "run"
)
def test_run_blocks_run_as_written(code):
    if code is None:
        pytest.skip("the README has no run block")
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


@pytest.fixture(scope="module")
def readme_server():
    """`embedding-worker serve` on the bundled model, on a free port standing in for 8000."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "embedding_worker", "serve", "--port", str(port)]
    env = {k: v for k, v in _env().items() if k != "MODEL_NAMES"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            raise AssertionError("the server did not come up")
        yield port
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize(
    "code", [b.code for b in BLOCKS if b.kind == "server"], ids=lambda c: c.split("\n")[0][:40]
)
def test_server_blocks_answer(code, readme_server):
    code = code.replace("localhost:8000", f"127.0.0.1:{readme_server}")
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{readme_server}")
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stdout.strip()
