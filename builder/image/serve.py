"""Step 5, the image's CMD run twice: as RunPod's local test (`python handler.py` answering
test_input.json), then as a load-balancing endpoint (the HTTP server) with .runpod/tests.json's
configuration and a local stand-in for each of its models that cannot be downloaded: /ping, one
/v1/embeddings compared with the same worker started on the host, every tests.json case through
/runsync; each start is timed to its first answer, the host's too."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from embedding_worker.config import DEFAULT_MODEL_ID

from .commands import ISOLATION, ROOT, START_TIMEOUT, CheckFailed, log, run
from .report import Answer, Case, Handler, Image, ServerRun, Servers

__all__ = ["EMBED_REQUEST", "run_handler", "run_servers", "start_in_container", "start_on_host"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(method: str, url: str, body: Any = None, timeout: float = 120.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def run_handler(ctr: str, cmd: list[str]) -> Handler:
    """The image's CMD as RunPod's local test: it answers test_input.json and exits."""
    started = time.monotonic()
    proc = subprocess.run(
        ["buildah", "run", *ISOLATION, ctr, "--", *cmd],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    output = proc.stdout + proc.stderr
    answer = next((line for line in output.splitlines() if "Job result:" in line), "")
    return Handler(
        rc=proc.returncode,
        seconds=round(time.monotonic() - started, 2),
        completed="Job local_test completed successfully" in output,
        answer=answer.split("Job result:", 1)[-1].strip(),
        output_tail=output[-2000:],
    )


EMBED_REQUEST: dict[str, Any] = {
    "input": ["A kitten sleeps on the sofa.", "The stock market fell today."],
    "encoding_format": "base64",
}


def serve_and_ask(
    argv: list[str], env: dict[str, str], port: int, model: str, cases: list[dict[str, Any]]
) -> ServerRun:
    """Start a worker in load-balancing mode, time it to its first answer, then send the cases."""
    url = f"http://127.0.0.1:{port}"
    output = tempfile.TemporaryFile()  # a pipe nobody reads would stall a talkative worker
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
    )
    pings: list[int] = []
    first_ping_s = 0.0
    try:
        while True:
            if proc.poll() is not None:
                raise CheckFailed(f"the worker exited {proc.returncode} before it was ready")
            if time.monotonic() - started > START_TIMEOUT:
                raise CheckFailed(f"no /ping 200 after {START_TIMEOUT:.0f} s")
            try:
                status: int | None = http("GET", f"{url}/ping", timeout=5)[0]
            except OSError:
                status = None
            if status is not None and (not pings or pings[-1] != status):
                if not pings:
                    first_ping_s = round(time.monotonic() - started, 3)
                pings.append(status)
            if status == 200:
                ready_s = round(time.monotonic() - started, 3)
                break
            if status not in (None, 204):
                raise CheckFailed(f"/ping answered {status} while loading")
            time.sleep(0.05)
        status, body = http("POST", f"{url}/v1/embeddings", {"model": model, **EMBED_REQUEST})
        embeddings = Answer(status=status, body=body)
        first_answer_s = round(time.monotonic() - started, 3)
        answered = []
        for case in cases:
            status, body = http(
                "POST", f"{url}/runsync", {"input": case["input"]}, timeout=case["timeout"] / 1000
            )
            answered.append(Case(name=case["name"], http_status=status, answer=body))
    except CheckFailed as exc:
        stop(proc)
        raise CheckFailed(f"{exc}; {argv[0]} said:\n{tail(output)}") from None
    finally:
        stop(proc)
        output_tail = tail(output)
        output.close()
    return ServerRun(
        pings=pings,
        first_ping_s=first_ping_s,
        ready_s=ready_s,
        first_answer_s=first_answer_s,
        embeddings=embeddings,
        cases=answered,
        output_tail=output_tail,
    )


def tail(output: IO[bytes]) -> str:
    output.seek(0)
    return output.read().decode(errors="replace")[-3000:]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """The process group this script started (buildah run and the worker under it)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def hub_environment() -> tuple[dict[str, str], list[dict[str, Any]]]:
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text())
    return {pair["key"]: pair["value"] for pair in tests["config"].get("env", [])}, tests["tests"]


def stand_ins(names: list[str], work: Path) -> dict[str, Path]:
    """A local model for each hub id that is neither bundled nor downloadable here: a tiny random
    cross-encoder from the test suite's factory (the Hub's tests name a reranker)."""
    spec = importlib.util.spec_from_file_location(
        "model_factory", ROOT / "tests" / "model_factory.py"
    )
    assert spec is not None and spec.loader is not None
    model_factory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_factory)

    made = {}
    for name in names:
        if name != DEFAULT_MODEL_ID:
            made[name] = model_factory.make_bert_cross_encoder(work / "stand-ins" / name)
            # safetensors writes its file 0600: the image's user (not root) must read it, as it
            # must read any model mounted into the container.
            run(["chmod", "-R", "a+rX", str(made[name])])
    return made


def max_difference(a: list[str], b: list[str]) -> float | None:
    if len(a) != len(b) or not a:
        return None
    worst = 0.0
    for x, y in zip(a, b):
        u, v = base64.b64decode(x), base64.b64decode(y)
        if len(u) != len(v):
            return None
        fu = struct.unpack(f"<{len(u) // 4}f", u)
        fv = struct.unpack(f"<{len(v) // 4}f", v)
        worst = max(worst, max(abs(p - q) for p, q in zip(fu, fv)))
    return worst


LOAD_BALANCER = {"RUNPOD_LOAD_BALANCER": "true", "LOG_LEVEL": "INFO"}


def start_on_host(
    env: dict[str, str], local: dict[str, Path], work: Path, model: str, cases: list[dict[str, Any]]
) -> ServerRun:
    """The same worker from the virtual environment, the stand-ins in its MODELS_DIR."""
    host_models = work / "host-models"
    for name, path in local.items():
        if not (host_models / name).exists():
            (host_models / name).parent.mkdir(parents=True, exist_ok=True)
            (host_models / name).symlink_to(path)
    port = free_port()
    host_env = {
        **os.environ,
        **env,
        **LOAD_BALANCER,
        "PORT": str(port),
        "PORT_HEALTH": str(port),
        "MODELS_DIR": str(host_models),
        "INFINITY_HOME": str(work / "infinity"),
    }
    host_env.pop("HF_HUB_OFFLINE", None)  # the worker goes offline itself: every model is on disk
    return serve_and_ask([sys.executable, "-u", "handler.py"], host_env, port, model, cases)


def start_in_container(
    image: Image,
    ctr: str,
    env: dict[str, str],
    local: dict[str, Path],
    model: str,
    cases: list[dict[str, Any]],
) -> ServerRun:
    """The image's CMD, the stand-ins mounted where baked models are looked for."""
    port = free_port()
    models_dir = image.models_dir
    argv = ["buildah", "run", *ISOLATION]
    for key, value in {**env, **LOAD_BALANCER, "PORT": str(port), "PORT_HEALTH": str(port)}.items():
        argv += ["--env", f"{key}={value}"]
    for name, path in local.items():
        argv += ["-v", f"{path}:{models_dir}/{name}:ro"]
    return serve_and_ask([*argv, ctr, "--", *image.cmd], dict(os.environ), port, model, cases)


def run_servers(image: Image, ctr: str, work: Path) -> Servers:
    env, cases = hub_environment()
    names = env["MODEL_NAMES"].split(";")
    local = stand_ins(names, work)
    log("host: python handler.py in load-balancing mode")
    host = start_on_host(env, local, work, names[0], [])
    log("container: the image's CMD in load-balancing mode, tests.json's configuration")
    inside = start_in_container(image, ctr, env, local, names[0], cases)
    ours, theirs = inside.embeddings.b64_vectors(), host.embeddings.b64_vectors()
    return Servers(
        config=env,
        stand_ins=sorted(local),
        embed_request=EMBED_REQUEST,
        host=host,
        container=inside,
        vectors_equal=bool(ours) and ours == theirs,
        vectors_max_difference=max_difference(ours, theirs),
    )
