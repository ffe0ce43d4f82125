"""Security: no remote code unless asked, no model loaded by a request, no payload or token in
logs, no web page driving a local server without an API key."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import httpx
import pytest
from runpod.serverless.modules import rp_logger
from runpod.serverless.modules.rp_job import run_job

from embedding_worker.config import load_config
from embedding_worker.engines.infinity import engine_args
from embedding_worker.transports.http import ServerSettings, create_app
from embedding_worker.transports.runpod import answer_job, runpod_handler
from tests.conftest import ROOT
from tests.test_server import ServerThread, stuck_worker

SECRET = "hf_" + "Zq7" * 12  # looks like a Hugging Face token


# ------------------------------------------------------------------------------ trust_remote_code


def test_trust_remote_code_is_off_unless_configured(monkeypatch, bert_embedder):
    from infinity_emb import EngineArgs

    # Infinity's own default is True (INFINITY_TRUST_REMOTE_CODE): the worker must pass False.
    assert EngineArgs(model_name_or_path=str(bert_embedder)).trust_remote_code is True
    monkeypatch.setenv("INFINITY_TRUST_REMOTE_CODE", "true")
    config = load_config({"MODEL_NAMES": str(bert_embedder)})
    assert engine_args(config.models[0], config.engine_settings).trust_remote_code is False
    config = load_config({"MODEL_NAMES": str(bert_embedder), "TRUST_REMOTE_CODE": "true"})
    assert engine_args(config.models[0], config.engine_settings).trust_remote_code is True


def test_the_running_engines_do_not_trust_remote_code(worker):
    for model in worker.registry.models:
        assert model.engine._engine_args.trust_remote_code is False


# ------------------------------------------------------------------------------ model names


@pytest.mark.parametrize(
    "name",
    [
        "BAAI/bge-small-en-v1.5",
        "https://huggingface.co/BAAI/bge-small-en-v1.5",
        "../../../etc/passwd",
        "/tmp",
        "__MODELS_DIR__",  # a real directory holding real models that are not served as such
    ],
)
async def test_a_request_model_name_never_loads_or_downloads_a_model(
    worker, monkeypatch, models_dir, name
):
    import huggingface_hub
    import infinity_emb

    def forbidden(*args, **kwargs):
        raise AssertionError("a request tried to load or download a model")

    for module, attr in [
        (infinity_emb.AsyncEmbeddingEngine, "from_args"),
        (huggingface_hub, "snapshot_download"),
        (huggingface_hub, "hf_hub_download"),
    ]:
        monkeypatch.setattr(module, attr, forbidden)
    name = str(models_dir) if name == "__MODELS_DIR__" else name
    served = list(worker.registry.models)
    for job in (
        {"model": name, "input": "x"},
        {"model": name, "query": "q", "documents": ["a"]},
        {"openai_route": "/v1/embeddings", "openai_input": {"model": name, "input": "x"}},
    ):
        reply = await answer_job(worker, job)
        assert reply.status == 404 and reply.body["error"]["code"] == "model_not_found"
    assert worker.registry.models == served


# ------------------------------------------------------------------------------ logs


def _jobs_carrying_the_secret(ids) -> list[dict]:
    return [
        {"id": "job-ok", "input": {"model": ids["minilm"], "input": [SECRET, "fine"]}},
        {"id": "job-rerank", "input": {"query": SECRET, "docs": [SECRET], "return_docs": True}},
        {"id": "job-bad-type", "input": {"model": ids["minilm"], "input": [SECRET, 5]}},
        {"id": "job-bad-model", "input": {"model": SECRET, "input": "x"}},
        {
            "id": "job-too-long",
            "input": {"model": ids["minilm"], "input": SECRET * 200, "truncate": False},
        },
        {"id": "job-surrogate", "input": {"model": ids["minilm"], "input": SECRET + "\ud800"}},
        {"id": "job-route", "input": {"openai_route": SECRET, "openai_input": {"input": SECRET}}},
    ]


async def test_logs_never_echo_payloads_or_tokens(worker, ids, caplog, capsys, monkeypatch):
    monkeypatch.setattr(rp_logger.RunPodLogger, "level", "INFO")  # the worker's default for runpod
    caplog.set_level(logging.DEBUG)
    handler = runpod_handler(worker)
    model = worker.registry.resolve(ids["minilm"], None)

    def tokenize_that_quotes_its_input(texts):
        raise ValueError(f"tokenizer failed on {texts!r}")  # a library error quoting the payload

    results = [await run_job(handler, job) for job in _jobs_carrying_the_secret(ids)]
    with monkeypatch.context() as patch:
        patch.setattr(model.tokens, "tokenize", tokenize_that_quotes_its_input)
        crashed = await run_job(
            handler, {"id": "job-crash", "input": {"model": ids["minilm"], "input": SECRET}}
        )
    assert "output" in results[0] and "error" in results[2]
    assert json.loads(crashed["error"])["status"] == 500
    assert SECRET not in crashed["error"]
    captured = capsys.readouterr()
    assert "job job-crash" in caplog.text  # the crash was logged, under its job...
    for text in (caplog.text, captured.out, captured.err):
        assert SECRET not in text  # ...and nothing quoted the payload
    # runpod at DEBUG prints every job's output (here the documents the rerank job asked back):
    # the worker's outputs show it a summary instead.
    monkeypatch.setattr(rp_logger.RunPodLogger, "level", "DEBUG")
    await run_job(handler, _jobs_carrying_the_secret(ids)[1])
    debug_out = capsys.readouterr().out
    assert 'Handler output: {"object": "rerank"' in debug_out
    assert SECRET not in debug_out


async def test_each_log_line_of_the_worker_names_its_job(worker, ids, caplog):
    caplog.set_level(logging.DEBUG, logger="embedding_worker")
    await answer_job(worker, {"model": ids["minilm"], "input": "fine"}, job_id="job-a1")
    await answer_job(worker, {"model": ids["minilm"], "input": ""}, job_id="job-b2")
    await answer_job(worker, {"openai_route": "/nope"}, job_id="job-c3")
    ours = [r for r in caplog.records if r.name.startswith("embedding_worker")]
    assert {"job-a1", "job-b2", "job-c3"} <= {r.getMessage().split(":")[0][4:] for r in ours}
    for record in ours:
        assert record.getMessage().startswith("job job-"), record.getMessage()


def test_runpod_logs_at_info_unless_asked_and_start_errors_hide_tokens():
    probe = (
        "from embedding_worker.transports.runpod import import_runpod; import_runpod();"
        "from runpod.serverless.modules.rp_logger import RunPodLogger;"
        "print(RunPodLogger().level)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    level = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert level.stdout.strip() == "INFO", level.stderr[-2000:]
    level = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "RUNPOD_DEBUG_LEVEL": "DEBUG"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert level.stdout.strip() == "DEBUG"

    start = subprocess.run(
        [sys.executable, "handler.py"],
        cwd=ROOT,
        env={**env, "HF_HUB_OFFLINE": "1", "HF_TOKEN": SECRET, "MODEL_NAMES": "no-such/model"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert start.returncode == 2 and "no-such/model" in start.stderr
    assert SECRET not in start.stdout + start.stderr


# ------------------------------------------------------------------------------ web pages


PROBE = json.dumps({"model": "no-such/model", "input": "x"})  # served: 404; refused: 403


@pytest.fixture(scope="module")
def stuck(bert_embedder):
    """A worker whose engine is never reached here: a probe is refused or its model unknown."""
    return stuck_worker(bert_embedder, "300")


def _serve(stuck, **settings) -> ServerThread:
    return ServerThread(create_app(stuck[0], ServerSettings(**settings)))


def _probe(url: str, path: str = "/v1/embeddings", **headers: str) -> tuple[int, str]:
    answer = httpx.post(url + path, content=PROBE, headers=headers)
    code = answer.json()["error"]["code"] if answer.status_code >= 400 else ""
    return answer.status_code, code


def test_a_keyless_server_refuses_cross_site_requests(stuck):
    """A web page may post a form or a text/plain body to any address; its Origin shows it."""
    with _serve(stuck) as server:
        port = server.url.rsplit(":", 1)[1]
        before = httpx.get(server.url + "/health").json()["jobs"]
        for origin in ("http://evil.example", "null", f"http://localhost:{port}"):
            for path in ("/v1/embeddings", "/runsync", "/run"):
                refused = _probe(server.url, path, origin=origin, content_type="text/plain")
                assert refused == (403, "forbidden"), (origin, path)
        assert httpx.get(server.url + "/health").json()["jobs"] == before  # nothing ran
        assert _probe(server.url) == (404, "model_not_found")  # no Origin: curl, SDKs
        assert _probe(server.url, origin=server.url) == (404, "model_not_found")  # same origin
        for path in ("/health", "/ping"):  # probes answer whoever asks
            assert httpx.get(
                server.url + path, headers={"origin": "http://evil.example"}
            ).is_success


def test_a_keyless_loopback_server_refuses_foreign_host_names(stuck):
    """DNS rebinding: a page whose own name now resolves to 127.0.0.1 is same-origin to the
    browser; the Host header still names the page's domain."""
    with _serve(stuck) as server:
        port = server.url.rsplit(":", 1)[1]
        rebound = f"evil.example:{port}"
        assert _probe(server.url, host=rebound, origin=f"http://{rebound}") == (403, "forbidden")
        assert httpx.get(server.url + "/v1/models", headers={"host": rebound}).status_code == 403
        for host in ("localhost", "127.0.0.1", "[::1]", "app.localhost", "LOCALHOST."):
            assert _probe(server.url, host=f"{host}:{port}") == (404, "model_not_found"), host


def test_allowed_hosts_and_origins_are_served(stuck):
    allowed = {"allowed_hosts": ("box.lan",), "allowed_origins": ("https://app.example",)}
    with _serve(stuck, **allowed) as server:
        assert _probe(server.url, host="box.lan:8000") == (404, "model_not_found")
        assert _probe(server.url, host="other.lan")[0] == 403
        assert _probe(server.url, origin="https://app.example") == (404, "model_not_found")
        assert _probe(server.url, origin="https://app.example.evil")[0] == 403
    with _serve(stuck, allowed_hosts=("*",), allowed_origins=("*",)) as server:
        assert _probe(server.url, host="any.name", origin="http://x") == (404, "model_not_found")


def test_a_keyless_server_on_all_interfaces_checks_origin_not_host(stuck):
    """Listening on 0.0.0.0 it is reached under names it cannot know (LAN names, addresses)."""
    with _serve(stuck) as server:
        server.server.config.app.listening_on("0.0.0.0")
        assert _probe(server.url, host="192.168.1.5:8000") == (404, "model_not_found")
        assert _probe(server.url, host="192.168.1.5:8000", origin="http://evil.example")[0] == 403


def test_with_an_api_key_the_key_is_the_protection(stuck):
    """A page cannot attach the key cross-site without a CORS preflight, never approved here."""
    with _serve(stuck, api_key="key-0123") as server:
        foreign = {"host": "evil.example", "origin": "http://evil.example"}
        assert _probe(server.url, **foreign) == (401, "invalid_api_key")
        keyed = {**foreign, "authorization": "Bearer key-0123"}
        assert _probe(server.url, **keyed) == (404, "model_not_found")
        assert httpx.options(server.url + "/v1/embeddings", headers=foreign).status_code == 405
