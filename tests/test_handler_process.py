"""`python handler.py` as a user runs it: the local test, --test_input, start-up errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from embedding_worker.threads import IDLE_SPIN_COUNT
from tests.conftest import ROOT


def run_handler(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    without: tuple[str, ...] = (),
):
    """`python handler.py *args` in the repository, with `env` on top of this environment, less
    MODEL_NAMES and the variables whose names start with one of `without`."""
    full_env = {
        k: v for k, v in os.environ.items() if k != "MODEL_NAMES" and not k.startswith(without)
    }
    full_env.update({"HF_HUB_OFFLINE": "1", "RUNPOD_DEBUG_LEVEL": "INFO", **(env or {})})
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "handler.py", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - started


def test_local_test_input_json_completes_and_exits():
    proc, _ = run_handler()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Job local_test completed successfully" in output
    assert "Local testing complete" in output


def test_failed_test_input_exits_nonzero_with_the_typed_error():
    job = {"input": {"openai_route": "/v1/embeddings", "openai_input": {"input": ""}}}
    proc, _ = run_handler("--test_input", json.dumps(job))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "invalid_input" in output


def test_bad_configuration_stops_the_start_naming_the_variable():
    proc, _ = run_handler(env={"MODEL_NAMES": "a/b", "DTYPES": "float64"}, timeout=60)
    assert proc.returncode == 2
    assert "DTYPES" in proc.stderr and "float64" in proc.stderr


def test_a_model_that_cannot_load_stops_the_start_quickly_naming_it():
    missing = "no-such-org/no-such-model"
    proc, elapsed = run_handler(env={"MODEL_NAMES": missing}, timeout=120)
    assert proc.returncode == 2
    assert f"could not load model '{missing}'" in proc.stderr
    assert elapsed < 60


def test_the_worker_starts_openmp_with_sleeping_idle_threads():
    """OpenMP, which reads its environment once when torch loads it, sees the wait policy (its own
    report of the spin count), though Infinity's modules import torch before any model loads."""
    job = {"input": {"input": ["idle threads sleep"]}}
    proc, _ = run_handler(
        "--test_input",
        json.dumps(job),
        env={"OMP_DISPLAY_ENV": "verbose"},
        without=("OMP_", "GOMP_"),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    spin_counts = [
        line.split("=")[1].strip() for line in output.splitlines() if "GOMP_SPINCOUNT" in line
    ]
    assert spin_counts and set(spin_counts) == {f"'{IDLE_SPIN_COUNT}'"}, spin_counts
