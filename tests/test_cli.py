"""The command line: every mode answers --help and refuses bad arguments before any model loads;
`embedding-worker run` prints the answer; handler.py's flags reach the same modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedding_worker import cli, startup
from tests.conftest import ROOT

FLAGS = {
    "run": ["--test-input", "--full"],
    "serve": ["--host", "--port"],
    "batch": ["--output", "--format", "--concurrency", "--retries", "--no-progress", "--model",
              "--encoding-format", "--dimensions", "--prompt-type", "--instruction", "--endpoint",
              "--jobs", "--chunk-size"],
    "runpod": list(cli.RUNPOD_FLAGS),
}  # fmt: skip


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to build the worker fails the test: what is checked must happen before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model would load")

    monkeypatch.setattr(startup, "build_worker", refuse)


def exit_code(call) -> int:
    with pytest.raises(SystemExit) as stopped:
        call()
    return stopped.value.code


@pytest.mark.parametrize("mode", FLAGS)
def test_help_of_every_mode_lists_every_flag_before_any_model_loads(mode, no_model_loads, capsys):
    assert exit_code(lambda: cli.main([mode, "--help"])) == 0
    shown = capsys.readouterr().out
    for flag in FLAGS[mode]:
        assert flag in shown, flag


def test_handler_help_lists_runpods_flags_and_the_local_modes(no_model_loads, capsys):
    assert exit_code(lambda: cli.handler_main(["--help"])) == 0
    shown = capsys.readouterr().out
    for flag in [*cli.RUNPOD_FLAGS, "--serve", "--batch"]:
        assert flag in shown, flag
    assert exit_code(lambda: cli.handler_main(["--serve", "--help"])) == 0
    assert "--port" in capsys.readouterr().out


def test_the_runpod_flags_are_the_ones_the_sdk_reads():
    from runpod.serverless import parser

    sdk = {flag for action in parser._actions for flag in action.option_strings}
    assert set(cli.RUNPOD_FLAGS) == sdk - {"-h", "--help"}


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--port", "70000"],
        ["serve", "--port", "eighty"],
        ["batch", "no-such-file.jsonl", "--output", "out.jsonl"],
        ["batch", "README.md"],  # no --output
        ["batch", "README.md", "--output", "README.md"],
        ["batch", "README.md", "--output", "x.jsonl", "--chunk-size", "5000"],
        ["run", "--test-input", "no-such-file.json"],
        ["run", "--test-input", '{"no input": 1}'],
        ["runpod", "--rp_api_port", "abc"],
        ["nonsense"],
    ],
)
def test_bad_arguments_fail_before_any_model_loads(argv, no_model_loads, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert exit_code(lambda: cli.main(argv)) == 2
    assert "error" in capsys.readouterr().err


def test_handler_flags_reach_the_same_modes(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "dispatch_mode", lambda args, rest: seen.append((args, rest)) or 0)
    exit_code(lambda: cli.handler_main(["--serve", "--port", "9123"]))
    exit_code(lambda: cli.handler_main(["--batch", "README.md", "--output", "o.jsonl"]))
    exit_code(lambda: cli.handler_main(["--batch=README.md", "--output", "o.jsonl"]))
    exit_code(lambda: cli.handler_main(["--test_input", "{}"]))
    (serve, _), (batch, _), (batch_eq, _), (runpod, rest) = seen
    assert (serve.mode, serve.port) == ("serve", 9123)
    assert batch.mode == batch_eq.mode == "batch" and batch.input == Path("README.md")
    assert runpod.mode == "runpod" and rest == ["--test_input", "{}"]


def test_read_job_takes_a_file_or_json(tmp_path):
    job = {"input": {"input": "hello"}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    assert cli.read_job(str(path)) == job == cli.read_job(json.dumps(job))


def _embedding_worker(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MODEL_NAMES"}
    env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, "-m", "embedding_worker", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_run_prints_the_answer_with_vectors_shortened():
    proc = _embedding_worker("run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout)
    job = json.loads((ROOT / "test_input.json").read_text())
    assert answer["status"] == "COMPLETED" and answer["id"] == "local_test"
    data = answer["output"]["data"]
    assert len(data) == len(job["input"]["input"])
    for item in data:
        *numbers, count = item["embedding"]
        assert len(numbers) == 4 and all(isinstance(x, float) for x in numbers)
        assert count == "... 384 numbers"


def test_run_of_a_failing_job_prints_the_typed_error_and_exits_1():
    proc = _embedding_worker("run", "--test-input", '{"input": {"input": ""}}')
    assert proc.returncode == 1, proc.stderr[-3000:]
    answer = json.loads(proc.stdout)
    assert answer["status"] == "FAILED"
    assert json.loads(answer["error"])["error"]["code"] == "invalid_input"


def test_handler_help_answers_without_importing_the_engine():
    env = {**os.environ, "MODEL_NAMES": "no-such-org/no-such-model"}
    probe = "import sys, runpy; sys.argv = ['handler.py', '--help']\n"
    probe += "try:\n    runpy.run_path('handler.py', run_name='__main__')\n"
    probe += "except SystemExit:\n    print('infinity_emb' in sys.modules, 'torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip().endswith("False False"), proc.stdout + proc.stderr
