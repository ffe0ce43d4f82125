"""The local server (`python handler.py --serve`) with real clients: the official openai SDK,
plain HTTP, and RunPod's own local API answering the same jobs.

The in-process server runs uvicorn in a background thread with its own event loop (the engines start
in that loop, as they do under `--serve`), on a free loopback port.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from transformers import AutoTokenizer

from embedding_worker import operations
from embedding_worker.config import DEFAULT_MODEL_ID, ConfigError, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.engines import Embedder, EngineSettings, Health, ModelRegistry
from embedding_worker.engines.tokenization import TokenCounter
from embedding_worker.reply import Answer
from embedding_worker.transports.http import (
    API_KEY_ENV,
    SERVER_VARIABLES,
    ServerSettings,
    create_app,
)
from embedding_worker.transports.serving import uvicorn_server
from tests import model_factory
from tests.conftest import ROOT
from tests.helpers import decode_vectors

TEXTS = [
    "The cat sits on the warm windowsill.",
    "A kitten is resting by the window in the sun.",
    "Quarterly revenue grew by twelve percent.",
]
DOCS = [
    "Paris is the capital and largest city of France.",
    "Bananas are rich in potassium.",
    "France's capital, Paris, lies on the Seine.",
]


class ServerThread:
    """uvicorn serving `app` in a background thread on a free loopback port."""

    def __init__(self, app) -> None:
        self.server = uvicorn_server(app, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert self.thread.is_alive(), "the server stopped during start-up"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def qwen3_embedder(models_dir):
    return model_factory.make_qwen3_embedder(models_dir / "tiny-qwen3-embedder")


@pytest.fixture(scope="module")
def served(worker_env, qwen3_embedder):
    env = dict(worker_env, MODEL_NAMES=f"{worker_env['MODEL_NAMES']};{qwen3_embedder}")
    worker = Worker.from_config(load_config(env))
    with ServerThread(create_app(worker)) as server:
        by_tail = {m.served_id.rsplit("/", 1)[-1]: m.served_id for m in worker.registry.models}
        server.ids = {
            "minilm": DEFAULT_MODEL_ID,
            "embedder": by_tail["tiny-bert-embedder"],
            "reranker": by_tail["tiny-bert-reranker"],
            "qwen3": by_tail["tiny-qwen3-embedder"],
        }
        yield server
    assert not worker.registry._started, "the engines were not stopped on shutdown"


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=120) as client:
        yield client


def sdk(served, prefix: str = "/v1", api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + prefix, api_key=api_key, max_retries=0)


def vectors(response) -> np.ndarray:
    return np.array([item.embedding for item in response.data], dtype=np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- the official openai SDK, unmodified ----------------------------------------------------------


def test_sdk_default_base64_decodes_to_the_float_answer(served):
    client = sdk(served)
    default = client.embeddings.create(model=served.ids["minilm"], input=TEXTS)  # sends base64
    floats = client.embeddings.create(
        model=served.ids["minilm"], input=TEXTS, encoding_format="float"
    )
    np.testing.assert_allclose(vectors(default), vectors(floats), atol=1e-6)
    got = vectors(default)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # A real model: the two cat sentences are closer to each other than to revenue.
    assert cosine(got[0], got[1]) > cosine(got[0], got[2]) + 0.2
    assert default.model == served.ids["minilm"]
    assert default.usage.prompt_tokens > len(TEXTS)


def test_sdk_dimensions_cut_and_renormalise(served):
    client = sdk(served)
    full = vectors(client.embeddings.create(model=served.ids["minilm"], input=TEXTS))
    cut = vectors(client.embeddings.create(model=served.ids["minilm"], input=TEXTS, dimensions=64))
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-5)


def test_sdk_token_id_input_embeds_like_its_text(served, minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path))
    token_lists = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    client = sdk(served)
    from_ids = client.embeddings.create(model=served.ids["minilm"], input=token_lists)
    from_text = client.embeddings.create(model=served.ids["minilm"], input=TEXTS)
    np.testing.assert_allclose(vectors(from_ids), vectors(from_text), atol=1e-5)
    assert from_ids.usage.prompt_tokens == sum(len(ids) for ids in token_lists)


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
def test_sdk_lists_the_served_models(served, prefix):
    listed = sdk(served, prefix).models.list()
    assert sorted(model.id for model in listed.data) == sorted(served.ids.values())


def test_sdk_unknown_model_raises_not_found(served):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(served).embeddings.create(model="no-such/model", input="hello")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert served.ids["minilm"] in caught.value.message  # names what is served


def test_sdk_bad_input_raises_bad_request_naming_the_field(served):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(served).embeddings.create(model=served.ids["minilm"], input=["fine", ""])
    assert caught.value.param == "input"
    assert caught.value.code == "invalid_input"


def test_sdk_instruction_and_prompt_type_through_extra_body(served):
    client = sdk(served)
    model = served.ids["qwen3"]
    query, task = "what is a cat", "Find animal facts"

    def embed(text: str, **extra) -> np.ndarray:
        response = client.embeddings.create(
            model=model, input=[text], encoding_format="float", extra_body=extra or None
        )
        return vectors(response)[0]

    plain = embed(query)
    with_instruction = embed(query, instruction=task)
    formatted = embed(f"Instruct: {task}\nQuery:{query}")
    np.testing.assert_allclose(with_instruction, formatted, atol=1e-5)
    as_query = embed(query, prompt_type="query")
    np.testing.assert_allclose(as_query, embed(model_factory.QWEN3_QUERY_PROMPT + query), atol=1e-5)
    np.testing.assert_allclose(embed(query, prompt_type="document"), plain, atol=1e-5)
    assert cosine(with_instruction, plain) < 0.9999  # the prefix reached the model
    with pytest.raises(openai.BadRequestError) as caught:
        embed(query, prompt_type="passage")
    assert "query" in caught.value.message and "document" in caught.value.message


# --- plain HTTP: rerank, RunPod's routes, errors --------------------------------------------------


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
def test_rerank_cohere_shape(served, http, prefix):
    body = {
        "model": served.ids["reranker"],
        "query": "What is the capital of France?",
        "documents": DOCS,
        "top_n": 2,
        "return_documents": True,
    }
    response = http.post(f"{prefix}/rerank", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 2
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(r["document"]["text"] == DOCS[r["index"]] for r in results)
    # The same request through RunPod's route is answered by the same dispatch.
    job = http.post("/runsync", json={"input": body}).json()
    assert [r["relevance_score"] for r in job["output"]["results"]] == scores


def test_rerank_jina_shape_scores_every_document_in_unit_range(served, http):
    body = {
        "model": served.ids["reranker"],
        "query": "capital of France",
        "docs": [{"text": d} for d in DOCS],
        "return_docs": False,
    }
    response = http.post("/v1/rerank", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    assert all(0.0 <= r["relevance_score"] <= 1.0 and "document" not in r for r in results)


def test_runsync_wraps_the_same_answer_as_the_openai_route(served, http):
    body = {"model": served.ids["minilm"], "input": TEXTS}
    direct = http.post("/v1/embeddings", json=body).json()
    job = http.post("/runsync", json={"input": body}).json()
    assert job["status"] == "COMPLETED" and job["id"]
    np.testing.assert_allclose(decode_vectors(job["output"]), decode_vectors(direct), atol=1e-6)
    assert job["output"]["usage"] == direct["usage"]
    proxied = http.post(
        "/runsync", json={"input": {"openai_route": "/v1/embeddings", "openai_input": body}}
    ).json()
    assert isinstance(proxied["output"], list) and len(proxied["output"]) == 1
    np.testing.assert_allclose(
        decode_vectors(proxied["output"][0]), decode_vectors(direct), atol=1e-6
    )


def test_runsync_failure_is_a_failed_job_with_the_typed_error(served, http):
    job = http.post("/runsync", json={"input": {"model": served.ids["minilm"], "input": ""}})
    assert job.status_code == 200
    answer = job.json()
    assert answer["status"] == "FAILED" and "output" not in answer
    error = json.loads(answer["error"])
    assert error["status"] == 400 and error["error"]["code"] == "invalid_input"


def test_run_answers_at_once_then_status_gives_the_result(served, http):
    body = {"input": {"model": served.ids["embedder"], "input": ["one", "two"]}}
    queued = http.post("/run", json=body).json()
    assert queued["status"] == "IN_QUEUE" and queued["id"]
    finished = poll(http, queued["id"])
    assert finished["status"] == "COMPLETED"
    expected = http.post("/runsync", json=body).json()["output"]
    np.testing.assert_allclose(
        decode_vectors(finished["output"]), decode_vectors(expected), atol=1e-6
    )
    # Asking again gives the same answer; cancelling a finished job changes nothing.
    assert http.get(f"/status/{queued['id']}").json() == finished
    assert http.post(f"/status/{queued['id']}").json() == finished  # runpod's local API uses POST
    assert http.post(f"/cancel/{queued['id']}").json()["status"] == "COMPLETED"
    failed = poll(http, http.post("/run", json={"input": {"input": []}}).json()["id"])
    assert failed["status"] == "FAILED" and "empty array" in failed["error"]


def poll(http: httpx.Client, job_id: str, timeout: float = 60, method: str = "GET") -> dict:
    deadline = time.monotonic() + timeout
    while True:
        answer = http.request(method, f"/status/{job_id}").json()
        if answer["status"] not in ("IN_QUEUE", "IN_PROGRESS"):
            return answer
        assert time.monotonic() < deadline, f"job {job_id} still {answer['status']}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "method, path, content, status, code",
    [
        ("POST", "/v1/embeddings", b'{"input": ', 400, "invalid_input"),  # not JSON
        ("POST", "/v1/embeddings", b"", 400, "invalid_input"),
        ("POST", "/runsync", b'{"inputs": {}}', 400, "invalid_input"),  # no "input"
        ("POST", "/run", b"[1, 2]", 400, "invalid_input"),
        ("GET", "/status/no-such-job", None, 404, "not_found"),
        ("POST", "/cancel/no-such-job", None, 404, "not_found"),
        ("GET", "/v1/chat/completions", None, 404, "not_found"),
        ("GET", "/v1/embeddings", None, 405, "method_not_allowed"),
    ],
)
def test_http_errors_are_openai_error_objects(http, method, path, content, status, code):
    response = http.request(method, path, content=content)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    if status == 405:
        assert response.headers["allow"] == "POST"  # RFC 9110: a 405 names the methods allowed


@pytest.mark.parametrize("path", ["/health", "/ping", "/v1/models", "/openai/v1/models", "/models"])
def test_head_answers_where_get_does_with_the_same_headers_and_no_body(http, path):
    got, head = http.get(path), http.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == got.headers["content-length"] != "0"
    assert head.headers["content-type"] == "application/json"


def test_a_405_names_head_beside_get(http):
    refused = http.post("/health")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"
    assert http.delete("/status/some-job").headers["allow"] == "GET, POST, HEAD"
    assert http.head("/v1/embeddings").status_code == 405  # no GET there, so no HEAD


@pytest.mark.parametrize(
    "path, operation",
    [
        ("/v1/embeddings", "embeddings"),
        ("/openai/v1/rerank/", "rerank"),
        ("/openai/v1/models/org/name", "model"),
        ("/v1/models/", "models"),
        ("/v2/embed", "cohere-embed-v2"),
        ("/embeddings", "infinity-embeddings"),
        ("/openai/v2/embed", None),  # only OpenAI's /v1 routes are under RunPod's proxy path
        ("/openai/embeddings", None),
        ("/v1/model", None),
    ],
)
def test_the_server_routes_a_path_as_the_operations_match_it(http, path, operation):
    """One matcher (operations.match_route) for jobs' openai_route and the server's paths: a
    method the route does not take is a 405 naming the one it does, a path it does not match
    a 404."""
    matched = operations.match_route(path)
    assert (matched[0].name if matched else None) == operation
    refused = http.delete(path)
    if operation is None:
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    else:
        method = matched[0].method
        assert refused.status_code == 405
        assert refused.headers["allow"] == ("GET, HEAD" if method == "GET" else method)


def test_health_reports_ok_and_job_counts(http):
    poll(http, http.post("/run", json={"input": {"openai_route": "/v1/models"}}).json()["id"])
    response = http.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["jobs"]["completed"] >= 1 and body["jobs"]["inProgress"] == 0
    before = body["jobs"]
    http.post("/runsync", json={"input": {"openai_route": "/v1/models"}})
    http.post("/runsync", json={"input": {"input": ""}})  # FAILED: an empty string
    after = http.get("/health").json()["jobs"]
    assert after["completed"] == before["completed"] + 1
    assert after["failed"] == before["failed"] + 1
    assert after["inProgress"] == 0


def test_many_concurrent_clients_each_get_their_own_answer(served, http):
    """Requests in flight together are batched by the engine; none gets another's answer."""
    clients = 24
    requests = []
    for i in range(clients):
        if i % 3 == 2:
            body = {
                "model": served.ids["reranker"],
                "query": f"question {i} about France",
                "documents": DOCS[i % 3 :] + [f"document number {i}"],
            }
            requests.append(("/v1/rerank", body))
        else:
            body = {
                "model": served.ids["minilm"],
                "input": [f"client {i} says {TEXTS[i % 3]}"],
                "encoding_format": "float",
            }
            requests.append(("/v1/embeddings", body))

    def answer(request) -> np.ndarray:
        path, body = request
        with httpx.Client(base_url=served.url, timeout=120) as client:
            reply = client.post(path, json=body)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        if path == "/v1/rerank":
            in_order = sorted(data["results"], key=lambda r: r["index"])
            return np.array([r["relevance_score"] for r in in_order])
        return decode_vectors(data)[0]

    one_by_one = [answer(r) for r in requests]
    with ThreadPoolExecutor(clients) as pool:
        together = list(pool.map(answer, requests))
    for i, (alone, batched) in enumerate(zip(one_by_one, together)):
        np.testing.assert_allclose(batched, alone, atol=1e-5, err_msg=f"client {i}")
    embeddings = [v for (path, _), v in zip(requests, one_by_one) if path == "/v1/embeddings"]
    distinct = min(
        np.abs(a - b).max() for i, a in enumerate(embeddings) for b in embeddings[i + 1 :]
    )
    assert distinct > 1e-3  # a swapped answer would show


# --- a stuck engine (a fault injected in place of the engine) -------------------------------------


class StuckModel(Embedder):
    """An engine that never answers: to watch cancel, timeouts and health."""

    dimensions = 8

    async def _embed(self, texts):
        await asyncio.Event().wait()


def stuck_worker(model_path, timeout_s: str, stall_s: float = 300.0) -> tuple[Worker, StuckModel]:
    config = load_config({"MODEL_NAMES": str(model_path), "REQUEST_TIMEOUT": timeout_s})
    health = Health()
    tokens = TokenCounter(AutoTokenizer.from_pretrained(str(model_path)))
    settings = EngineSettings(
        queue_size=100, timeout_s=config.request_timeout_s, stall_timeout_s=stall_s
    )
    model = StuckModel(config.models[0], tokens, 128, settings=settings, health=health)
    return Worker(config, ModelRegistry([model], health)), model


def test_cancel_stops_a_running_job_and_shutdown_ends_unfinished_ones(bert_embedder):
    worker, model = stuck_worker(bert_embedder, "300")
    with ServerThread(create_app(worker)) as server, httpx.Client(base_url=server.url) as http:
        job_id = http.post("/run", json={"input": {"input": ["a", "b"]}}).json()["id"]
        deadline = time.monotonic() + 30
        while model.pending != 2:  # the job is inside the engine call
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert http.get(f"/status/{job_id}").json()["status"] == "IN_PROGRESS"
        cancelled = http.post(f"/cancel/{job_id}")
        assert cancelled.json() == {"id": job_id, "status": "CANCELLED"}
        assert http.get(f"/status/{job_id}").json()["status"] == "CANCELLED"
        deadline = time.monotonic() + 30
        while model.pending:  # the engine call was abandoned, its queue place freed
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert http.get("/health").json()["jobs"]["cancelled"] == 1
        http.post("/run", json={"input": {"input": ["left running"]}})
    # Leaving the block shut the server down with a job still in the engine (ServerThread checks).
    assert model.pending == 0


def test_a_timeout_alone_leaves_the_worker_healthy(bert_embedder):
    worker, _ = stuck_worker(bert_embedder, "0.3")
    with ServerThread(create_app(worker)) as server, httpx.Client(base_url=server.url) as http:
        job = http.post("/runsync", json={"input": {"input": "hello"}}).json()
        assert job["status"] == "FAILED"
        error = json.loads(job["error"])
        assert error["error"]["code"] == "timeout" and error["retry_after"] >= 1
        assert "stopPod" not in job and "refresh_worker" not in job
        timed_out = http.post("/v1/embeddings", json={"input": "hello"})
        assert timed_out.status_code == 503 and int(timed_out.headers["retry-after"]) >= 1
        assert http.get("/health").status_code == 200


def test_a_stalled_engine_makes_health_answer_503(bert_embedder):
    worker, _ = stuck_worker(bert_embedder, "0.3", stall_s=0.1)
    with ServerThread(create_app(worker)) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/health").status_code == 200
        job = http.post("/runsync", json={"input": {"input": "hello"}}).json()
        assert job["status"] == "FAILED"
        assert json.loads(job["error"])["error"]["code"] == "timeout"
        health = http.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "unhealthy"
        assert "ENGINE_STALL_TIMEOUT" in health.json()["reason"]
        assert http.get("/ping").status_code == 503
        after = http.post("/v1/embeddings", json={"input": "hello"})
        assert after.status_code == 503 and after.json()["error"]["code"] == "engine_stalled"


# --- the processes a user starts ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HandlerProcess:
    """`python handler.py ARGS` in a subprocess, serving on a loopback port."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        full_env = {k: v for k, v in os.environ.items() if k != "WORKER_API_KEY"}
        # COLUMNS: the log handler wraps lines at the terminal width, which would split messages.
        full_env.update(
            {"HF_HUB_OFFLINE": "1", "RUNPOD_DEBUG_LEVEL": "INFO", "COLUMNS": "1000", **env}
        )
        self.log = tempfile.TemporaryFile("w+")  # a pipe could fill up and stall the server
        self.proc = subprocess.Popen(
            [sys.executable, "handler.py", *args],
            cwd=ROOT,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_until_serving(self, url: str, path: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()[-4000:]
            try:
                httpx.get(url + path, timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError("the server did not start:\n" + self.output()[-4000:])

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()


def test_serve_flag_with_api_key_and_bounded_results(bert_embedder):
    port, key = free_port(), "test-key-0123456789"
    url = f"http://127.0.0.1:{port}"
    server = HandlerProcess(
        "--serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env={
            "MODEL_NAMES": str(bert_embedder),
            "WORKER_API_KEY": key,
            "SERVER_MAX_FINISHED_JOBS": "2",
        },
    )
    try:
        server.wait_until_serving(url, "/health")
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        missing = httpx.get(url + "/v1/models")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer " + key[:-1] + "x"}
        refused = httpx.post(url + "/runsync", json={"input": {"input": "a"}}, headers=wrong)
        assert refused.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        listed = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).models.list()
        assert [m.id for m in listed.data] == [f"{bert_embedder.parent.name}/{bert_embedder.name}"]

        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
            job_ids = []
            for text in ("first", "second", "third"):
                job_ids.append(http.post("/run", json={"input": {"input": text}}).json()["id"])
                assert poll(http, job_ids[-1])["status"] == "COMPLETED"
            # SERVER_MAX_FINISHED_JOBS=2: the oldest result is gone, the two newest remain.
            assert http.get(f"/status/{job_ids[0]}").status_code == 404
            assert [http.get(f"/status/{i}").status_code for i in job_ids[1:]] == [200, 200]
    finally:
        code = server.stop()
    output = server.output()
    # uvicorn shuts down cleanly, then re-raises SIGTERM so the parent sees it: -15, not 0.
    assert code in (0, -signal.SIGTERM), output[-4000:]
    assert "Application shutdown complete" in output
    assert key not in output


def test_serve_refuses_a_bad_server_setting_naming_it(bert_embedder):
    server = HandlerProcess(
        "--serve",
        "--port",
        str(free_port()),
        env={"MODEL_NAMES": str(bert_embedder), "SERVER_JOB_TTL_S": "soon"},
    )
    assert server.proc.wait(120) == 2
    assert "SERVER_JOB_TTL_S" in server.output()


def test_runpod_local_api_answers_the_same_jobs(served, http, bert_embedder):
    """RunPod's own `--rp_serve_api` (no OpenAI routes) and this server answer alike."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    runpod_api = HandlerProcess(
        "--rp_serve_api",
        "--rp_api_host",
        "127.0.0.1",
        "--rp_api_port",
        str(port),
        # the served fixture's dtype: DTYPES=auto is bfloat16 on CPUs with native bfloat16
        env={"MODEL_NAMES": str(bert_embedder), "DTYPES": "float32"},
    )
    model = served.ids["embedder"]
    embed_job = {"input": {"model": model, "input": TEXTS, "encoding_format": "float"}}
    proxy_job = {"input": {"openai_route": "/v1/embeddings", "openai_input": embed_job["input"]}}
    bad_job = {"input": {"model": model, "input": ["ok", ""]}}
    try:
        runpod_api.wait_until_serving(url, "/docs")
        with httpx.Client(base_url=url, timeout=120) as theirs:
            for job in (embed_job, proxy_job):
                ours = http.post("/runsync", json=job).json()
                rp = theirs.post("/runsync", json=job).json()
                assert rp["status"] == ours["status"] == "COMPLETED", rp
                ours_out, rp_out = ours["output"], rp["output"]
                if isinstance(ours_out, list):
                    assert isinstance(rp_out, list) and len(rp_out) == 1
                    ours_out, rp_out = ours_out[0], rp_out[0]
                np.testing.assert_allclose(
                    decode_vectors(rp_out), decode_vectors(ours_out), atol=1e-6
                )
            rp_failed = theirs.post("/runsync", json=bad_job).json()
            ours_failed = http.post("/runsync", json=bad_job).json()
            assert rp_failed["status"] == ours_failed["status"] == "FAILED"
            assert json.loads(rp_failed["error"]) == json.loads(ours_failed["error"])
            # runpod's /run only stores the job; its first /status (POST only, there) runs it.
            queued = theirs.post("/run", json=embed_job).json()
            finished = poll(theirs, queued["id"], timeout=120, method="POST")
            assert finished["status"] == "COMPLETED"
            expected = decode_vectors(http.post("/runsync", json=embed_job).json()["output"])
            np.testing.assert_allclose(decode_vectors(finished["output"]), expected, atol=1e-6)
    finally:
        try:
            runpod_api.stop(timeout=30)
        except subprocess.TimeoutExpired:
            pass  # killed: runpod's API server is not this test's subject


def test_an_answer_that_cannot_be_written_is_a_500_error_object_not_a_lost_job(bert_embedder):
    worker, _ = stuck_worker(bert_embedder, "300")

    async def broken_serve(*args, **kwargs):  # the fault: a body JSON cannot hold
        return Answer({"value": object()})

    worker.serve = broken_serve
    with ServerThread(create_app(worker)) as server, httpx.Client(base_url=server.url) as http:
        direct = http.get("/v1/models")
        assert direct.status_code == 500
        assert direct.json()["error"]["code"] == "internal_error"
        failed = poll(http, http.post("/run", json={"input": {"input": "a"}}).json()["id"])
        assert failed["status"] == "FAILED"
        assert json.loads(failed["error"])["error"]["code"] == "internal_error"


LISTS = {"SERVER_ALLOWED_HOSTS", "SERVER_ALLOWED_ORIGINS"}
SWITCHES = {"METRICS_REQUIRE_KEY"}


@pytest.mark.parametrize(
    "name", [n for n in SERVER_VARIABLES if n not in {API_KEY_ENV, *LISTS, *SWITCHES}]
)
def test_server_settings_refuse_bad_values_naming_the_variable(name):
    with pytest.raises(ConfigError, match=name):
        ServerSettings.from_env({name: "0"})
    assert ServerSettings.from_env({name: "7"}) != ServerSettings()


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_server_switches_read_true_or_false_and_refuse_anything_else(name):
    field = name.lower()
    assert getattr(ServerSettings.from_env({name: "true"}), field) is True
    assert getattr(ServerSettings.from_env({name: "0"}), field) is False
    with pytest.raises(ConfigError, match=name):
        ServerSettings.from_env({name: "maybe"})


@pytest.mark.parametrize(
    "name, good, bad",
    [
        (
            "SERVER_ALLOWED_HOSTS",
            {"Example.COM, 10.0.0.5,::1": ("example.com", "10.0.0.5", "::1"), "*": ("*",)},
            ["http://example.com", "example.com:80", "[::1]", "a..b", "7", "a,,b"],
        ),
        (
            "SERVER_ALLOWED_ORIGINS",
            {"https://App.example.com, http://localhost:3000": (
                "https://app.example.com", "http://localhost:3000"
            ), "*, https://a.b": ("*",)},
            ["app.example.com", "ftp://a.b", "https://a.b/path", "null", "https://"],
        ),
    ],
)  # fmt: skip
def test_server_settings_read_host_and_origin_lists(name, good, bad):
    field = name.removeprefix("SERVER_").lower()
    for raw, expected in good.items():
        assert getattr(ServerSettings.from_env({name: raw}), field) == expected
    for raw in bad:
        with pytest.raises(ConfigError, match=name):
            ServerSettings.from_env({name: raw})


def test_every_server_variable_is_in_the_configuration_table():
    docs = (ROOT / "docs" / "configuration.md").read_text()
    table = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", docs, re.M))
    assert set(SERVER_VARIABLES) <= table
    assert ServerSettings.from_env({"WORKER_API_KEY": "k"}).api_key == "k"
    assert ServerSettings.from_env({"WORKER_API_KEY": ""}).api_key is None


def test_a_body_over_the_limit_is_refused_with_413(bert_embedder):
    worker, model = stuck_worker(bert_embedder, "300")
    app = create_app(worker, ServerSettings(max_body_bytes=1000))
    body = json.dumps({"input": ["x" * 600, "y" * 600]}).encode()
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as http:
        declared = http.post("/v1/embeddings", content=body)
        streamed = http.post("/runsync", content=iter([body[:500], body[500:]]))  # no length given
        for response in (declared, streamed):
            assert response.status_code == 413, response.text
            assert response.json()["error"]["code"] == "request_too_large"
        assert "transfer-encoding" in streamed.request.headers
        small = http.post("/v1/embeddings", json={"input": "fits", "model": "no-such/model"})
        assert small.status_code == 404  # under the limit: read and dispatched
    assert model.pending == 0


# --- one model, and Infinity's own routes at the root ---------------------------------------------


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
def test_sdk_retrieves_one_model_by_its_id(served, prefix):
    client = sdk(served, prefix)
    for name in served.ids.values():  # ids with a slash in them: the path's rest is the id
        model = client.models.retrieve(name)
        assert model.id == name and model.object == "model"
    tail = served.ids["minilm"].rsplit("/", 1)[-1]
    assert client.models.retrieve(tail).id == served.ids["minilm"]
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such/model")
    assert caught.value.code == "model_not_found"


def test_one_model_is_its_entry_in_the_list(http, served):
    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    for name in served.ids.values():
        assert http.get(f"/v1/models/{name}").json() == listed[name]
    assert http.post(f"/v1/models/{served.ids['minilm']}").status_code == 405


def test_infinity_routes_at_the_root_answer_in_infinitys_shapes(http, served):
    texts = {"model": served.ids["minilm"], "input": TEXTS, "encoding_format": "float"}
    root = http.post("/embeddings", json=texts).json()
    openai_route = http.post("/v1/embeddings", json=texts).json()
    np.testing.assert_allclose(
        [d["embedding"] for d in root["data"]],
        [d["embedding"] for d in openai_route["data"]],
        atol=1e-6,
    )
    assert http.get("/models").json()["data"] == http.get("/v1/models").json()["data"]
    docs = ["a cat sleeps", "stocks fell", "kittens nap"]
    body = {"model": served.ids["reranker"], "query": "cats", "documents": docs}
    ranked = http.post("/rerank", json={**body, "return_documents": True}).json()
    cohere_shape = http.post("/v1/rerank", json={**body, "return_documents": True}).json()
    assert [r["index"] for r in ranked["results"]] == [r["index"] for r in cohere_shape["results"]]
    for result in ranked["results"]:
        assert result["document"] == docs[result["index"]]  # the text itself, as Infinity answers
    plain = http.post("/rerank", json=body).json()
    assert all(r["document"] is None for r in plain["results"])
