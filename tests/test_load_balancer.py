"""RunPod's load-balancing endpoints: the server listens while the models load (/ping 204, every
other route 503 model_provisioning with Retry-After), then serves the RunPod and OpenAI routes on
PORT, with /ping also on PORT_HEALTH. Real HTTP, a real engine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from embedding_worker.cli import load_balancer_mode
from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.http import PROVISIONING_RETRY_S, LocalServer
from tests.conftest import ROOT
from tests.test_server import ServerThread


def wait_for(check, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_routes_wait_for_the_models_and_ping_tells_the_load_balancer(bert_embedder):
    release = threading.Event()

    def load() -> Worker:
        assert release.wait(120)
        return Worker.from_config(load_config({"MODEL_NAMES": str(bert_embedder)}))

    body = {"input": ["hello"]}
    with ServerThread(LocalServer(None, load=load)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.get("/ping").status_code == 204
            for method, path, payload in [
                ("POST", "/v1/embeddings", body),
                ("POST", "/openai/v1/embeddings", body),
                ("POST", "/runsync", {"input": body}),
                ("GET", "/v1/models", None),
                ("GET", "/health", None),
            ]:
                response = http.request(method, path, json=payload)
                assert response.status_code == 503, path
                assert response.json()["error"]["code"] == "model_provisioning"
                assert response.headers["retry-after"] == str(PROVISIONING_RETRY_S)
            release.set()
            wait_for(lambda: http.get("/ping").status_code == 200)
            assert http.get("/ping").json() == {"status": "healthy"}
            answer = http.post("/v1/embeddings", json=body)
            assert answer.status_code == 200 and len(answer.json()["data"]) == 1
            job = http.post("/runsync", json={"input": body}).json()
            assert job["status"] == "COMPLETED"


def test_a_load_that_fails_makes_ping_unhealthy():
    def load() -> Worker:
        raise RuntimeError("no such model")

    with ServerThread(LocalServer(None, load=load)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            wait_for(lambda: http.get("/ping").status_code == 503)
            response = http.post("/v1/embeddings", json={"input": "x"})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "engine_unavailable"


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"PORT": "8080"}, None),  # not on RunPod: a PORT alone is not enough
        ({"RUNPOD_POD_ID": "p", "PORT": "8080"}, (8080, 8080)),
        ({"RUNPOD_POD_ID": "p", "PORT": "8080", "PORT_HEALTH": "8081"}, (8080, 8081)),
        ({"RUNPOD_POD_ID": "p", "PORT": "80", "RUNPOD_WEBHOOK_GET_JOB": "https://q"}, None),
        ({"RUNPOD_LOAD_BALANCER": "true"}, (80, 80)),
        ({"RUNPOD_LOAD_BALANCER": "false", "RUNPOD_POD_ID": "p", "PORT": "80"}, None),
    ],
)
def test_the_environment_tells_the_load_balancing_mode(env, expected):
    assert load_balancer_mode(env) == expected


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_handler_py_serves_a_load_balancing_endpoint(bert_embedder):
    """`python handler.py` as RunPod starts it on a load-balancing endpoint."""
    port, health_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update(
        {
            "RUNPOD_POD_ID": "test-pod",
            "PORT": str(port),
            "PORT_HEALTH": str(health_port),
            "MODEL_NAMES": str(bert_embedder),
            "HF_HUB_OFFLINE": "1",
        }
    )
    process = subprocess.Popen(
        [sys.executable, "handler.py"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def ping() -> int | None:
            try:
                return httpx.get(f"http://127.0.0.1:{health_port}/ping", timeout=2).status_code
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read()
                return None

        seen = {wait_for(ping)}
        seen.add(wait_for(lambda: ping() == 200 and 200))
        assert seen <= {204, 200}
        base = f"http://127.0.0.1:{port}"
        answer = httpx.post(f"{base}/v1/embeddings", json={"input": ["hello"]}, timeout=60)
        assert answer.status_code == 200
        job = httpx.post(f"{base}/runsync", json={"input": {"input": "hi"}}, timeout=60).json()
        assert job["status"] == "COMPLETED"
        # Through RunPod's proxy: the endpoint's domain as Host, a web app's Origin (RunPod has
        # checked the caller's RunPod API key). No WORKER_API_KEY, and still served.
        proxied = {"host": "abc123.api.runpod.ai", "origin": "https://app.example.com"}
        answer = httpx.post(
            f"{base}/v1/embeddings", json={"input": ["hi"]}, headers=proxied, timeout=60
        )
        assert answer.status_code == 200, answer.text
    finally:
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert process.wait(60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in process.stderr.read()
