"""Metrics: GET /metrics in Prometheus' text format on the local server and in load-balancing
mode, read back by a real Prometheus server; `stats` in /v1/models; the summary line a minute for
RunPod queue endpoints. Real HTTP, real engines."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.http import LocalServer, ServerSettings, create_app
from embedding_worker.transports.runpod import runpod_handler
from tests.conftest import ROOT
from tests.test_server import ServerThread, free_port

API_KEY = "metrics-test-key"
TEXTS = ["The cat sits on the warm windowsill.", "Quarterly revenue grew by twelve percent."]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and wanted <= ls)


@pytest.fixture(scope="module")
def served(bert_embedder, bert_reranker):
    env = {"MODEL_NAMES": f"{bert_embedder};{bert_reranker}", "BATCH_SIZES": "8"}
    worker = Worker.from_config(load_config(env))
    app = create_app(worker, ServerSettings(api_key=API_KEY))
    with ServerThread(app) as server:
        server.app = app
        server.worker = worker
        server.embedder, server.reranker = worker.registry.ids
        yield server


@pytest.fixture(scope="module")
def http(served):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=served.url, timeout=120, headers=headers) as client:
        yield client


def scrape(served) -> dict:
    response = httpx.get(served.url + "/metrics", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def test_a_request_is_counted_with_its_route_model_tier_and_batches(served, http):
    before = scrape(served)
    answer = http.post(
        "/v1/embeddings", json={"model": served.embedder, "input": TEXTS, "service_tier": "flex"}
    )
    assert answer.status_code == 200
    tokens = answer.json()["usage"]["prompt_tokens"]
    after = scrape(served)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    request = {"route": "/v1/embeddings", "model": served.embedder, "tier": "flex"}
    assert grew("embedding_worker_requests_total", **request, status="200", code="") == 1
    assert grew("embedding_worker_inputs_total", **request) == len(TEXTS)
    assert grew("embedding_worker_tokens_total", **request) == tokens
    routed = {"route": "/v1/embeddings", "model": served.embedder}
    assert grew("embedding_worker_request_duration_seconds_count", **routed) == 1
    for split in ("queue", "model"):
        name = f"embedding_worker_request_{split}_duration_seconds_count"
        assert grew(name, model=served.embedder, tier="flex") == 1
    total = grew("embedding_worker_request_duration_seconds_sum", **routed)
    queued = grew("embedding_worker_request_queue_duration_seconds_sum", model=served.embedder)
    model = grew("embedding_worker_request_model_duration_seconds_sum", model=served.embedder)
    assert 0 < queued + model <= total
    # The batch that computed the texts: its rows, and its real tokens within the padded ones.
    by_model = {"model": served.embedder}
    assert grew("embedding_worker_forward_passes_total", **by_model) >= 1
    assert grew("embedding_worker_forward_pass_rows_total", **by_model) == len(TEXTS)
    real = grew("embedding_worker_forward_pass_tokens_total", **by_model)
    padded = grew("embedding_worker_forward_pass_padded_tokens_total", **by_model)
    assert real == tokens and padded >= real
    assert value(after, "embedding_worker_queue_depth", model=served.embedder) == 0


def test_failures_are_counted_by_status_and_code(served, http):
    before = scrape(served)
    assert http.post("/v1/embeddings", json={"model": served.embedder}).status_code == 400
    assert http.post("/v1/rerank", json={"model": served.reranker, "query": "q"}).status_code == 400
    after = scrape(served)
    for route in ("/v1/embeddings", "/v1/rerank"):
        labels = {"route": route, "status": "400", "code": "invalid_input"}
        grown = value(after, "embedding_worker_requests_total", **labels) - value(
            before, "embedding_worker_requests_total", **labels
        )
        assert grown == 1, route


def test_engine_health_model_load_and_process_figures_are_exported(served):
    found = scrape(served)
    for model in (served.embedder, served.reranker):
        assert value(found, "embedding_worker_engine_healthy", model=model) == 1
        assert value(found, "embedding_worker_model_load_seconds", model=model) > 0
        for tier in ("priority", "default", "flex"):
            assert (
                "embedding_worker_queue_depth",
                frozenset({("model", model), ("tier", tier)}),
            ) in found
    assert value(found, "process_resident_memory_bytes") > 0
    assert value(found, "process_cpu_seconds_total") > 0


def test_a_flood_of_unknown_paths_and_models_adds_no_series(served, http):
    def series() -> set:
        return set(scrape(served))

    # Each kind of failure once, so that the series they are counted under exist.
    http.post("/v1/embeddings", json={"model": "no-such-model-0", "input": "x"})
    http.post("/v1/nothing-here-0", json={})
    http.post("/runsync", json={"input": {"openai_route": "/v1/made-up-0", "openai_input": {}}})
    http.post("/runsync", json={"input": {"model": "nobody-0", "input": "x"}})
    http.get("/v1/models/unknown-0")
    known = series()
    for i in range(1, 60):
        http.post("/v1/embeddings", json={"model": f"no-such-model-{i}", "input": "x"})
        http.post(f"/v1/nothing-here-{i}", json={})
        http.get(f"/some/path/{i}")
        http.post(
            "/runsync", json={"input": {"openai_route": f"/v1/made-up-{i}", "openai_input": {}}}
        )
        http.post("/runsync", json={"input": {"model": f"nobody-{i}", "input": "x"}})
        http.get(f"/v1/models/unknown-{i}")
    found = scrape(served)
    assert set(found) == known
    unknown_models = {dict(ls).get("model") for (_, ls) in found} - {
        None,
        "",
        served.embedder,
        served.reranker,
    }
    assert not unknown_models
    routes = {dict(ls).get("route") for (_, ls) in found} - {None}
    assert not any("made-up" in r or "nothing-here" in r for r in routes)
    nobody = {"route": "/v1/embeddings", "model": "", "code": "model_not_found"}
    assert value(found, "embedding_worker_requests_total", **nobody) >= 120


def test_metrics_need_no_key_unless_metrics_require_key_says_so(served):
    assert httpx.get(served.url + "/v1/models").status_code == 401  # the key guards the rest
    assert httpx.get(served.url + "/metrics").status_code == 200
    settings = served.app.settings
    served.app.settings = dataclasses.replace(
        settings,
        metrics_require_key=ServerSettings.from_env(
            {"METRICS_REQUIRE_KEY": "true"}
        ).metrics_require_key,
    )
    try:
        assert httpx.get(served.url + "/metrics").status_code == 401
        authorised = {"Authorization": f"Bearer {API_KEY}"}
        response = httpx.get(served.url + "/metrics", headers=authorised)
        assert response.status_code == 200
        assert "embedding_worker_requests_total" in response.text
    finally:
        served.app.settings = settings


@pytest.mark.parametrize("flavour", ["openai", "standard"])
def test_models_carry_stats_since_start(served, http, flavour):
    http.post("/v1/embeddings", json={"model": served.embedder, "input": TEXTS})
    if flavour == "openai":
        data = http.get("/v1/models").json()["data"]
    else:
        job = http.post("/runsync", json={"input": {"openai_route": "/v1/models"}}).json()
        data = job["output"][0]["data"]
    stats = {entry["id"]: entry["stats"] for entry in data}
    embedder = stats[served.embedder]
    assert embedder["requests"] >= 1 and embedder["inputs"] >= len(TEXTS)
    assert embedder["tokens"] >= embedder["inputs"]
    assert 0 < embedder["latency_p50_ms"] <= embedder["latency_p99_ms"]
    assert embedder["queue_depth"] == 0
    assert 0 < embedder["batch_fill"] <= 1
    assert embedder["since"] <= time.time()
    one = http.get(f"/v1/models/{served.embedder}").json()
    assert one["stats"]["requests"] >= embedder["requests"]


def test_models_carry_empty_stats_with_metrics_off(bert_embedder):
    worker = Worker.from_config(load_config({"MODEL_NAMES": str(bert_embedder), "METRICS": "0"}))
    with ServerThread(create_app(worker)) as server:
        data = httpx.get(server.url + "/v1/models", timeout=60).json()["data"]
        assert [entry["stats"] for entry in data] == [{}]
        assert httpx.get(server.url + "/metrics", timeout=60).status_code == 404


def _counted(caplog) -> dict[str, int]:
    """The summary lines logged so far, each with the requests it counts."""
    lines = {}
    for record in caplog.records:
        found = re.search(r"last \d+ s: (\d+) requests", record.getMessage())
        if found:
            lines[record.getMessage()] = int(found.group(1))
    return lines


async def test_a_queue_endpoint_logs_a_summary_while_jobs_run(worker, ids, caplog):
    metrics = worker.metrics
    handler = runpod_handler(worker)
    caplog.set_level(logging.INFO, logger="embedding_worker.metrics")
    metrics._summary_task = None
    metrics.start_summaries(interval_s=0.3)
    try:
        job = {"id": "j1", "input": {"model": ids["embedder"], "input": TEXTS}}
        output = await handler(job)
        assert "data" in output
        deadline = time.monotonic() + 10
        while not any(_counted(caplog)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        metrics._summary_task.cancel()
    # On a slow machine a line may come while the job still runs (nothing answered, its inputs
    # queued); the job is counted once, in the line after its answer.
    counted = _counted(caplog)
    assert sum(counted.values()) == 1, list(counted)
    line = next(line for line, count in counted.items() if count)
    parts = ("1 requests (0 failed)", "p50 ", "p99 ", "tokens/s", "queue depth 0", "batch fill")
    for part in parts:
        assert part in line, line


def test_metrics_answer_while_the_models_load(bert_embedder):
    """Load-balancing mode: /metrics on the same port, the process's figures while loading."""
    release = threading.Event()

    def load() -> Worker:
        assert release.wait(120)
        return Worker.from_config(load_config({"MODEL_NAMES": str(bert_embedder)}))

    with ServerThread(LocalServer(None, load=load)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            loading = samples(client.get("/metrics").text)
            assert value(loading, "process_resident_memory_bytes") > 0
            assert not value(loading, "embedding_worker_requests_total")
            release.set()
            deadline = time.monotonic() + 120
            while client.get("/ping").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert client.post("/v1/embeddings", json={"input": TEXTS}).status_code == 200
            ready = samples(client.get("/metrics").text)
            assert value(ready, "embedding_worker_requests_total", status="200") == 1


# ------------------------------------------------------------------ a real Prometheus server


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Debian's `prometheus`, installed with apt-get where it is missing (as tests/test_image.py
    gets buildah); skipped, saying why, where it cannot be."""
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("prometheus is not installed, and apt-get cannot install it here (not root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "prometheus"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"apt-get could not install prometheus: {done.stderr[-500:]}")
    found = shutil.which("prometheus")
    if not found:
        pytest.skip("apt-get installed no prometheus binary")
    return found


@pytest.fixture
def prometheus(prometheus_binary, served, tmp_path: Path):
    """A Prometheus server scraping the worker every second, and a client of its query API."""
    worker_address = served.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: worker\n"
        f"    static_configs:\n      - targets: ['{worker_address}']\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [
            prometheus_binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                try:
                    if client.get("/-/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "prometheus did not start"
                time.sleep(0.2)
            yield client
    finally:
        process.terminate()
        process.wait(30)


def query(client: httpx.Client, promql: str) -> list[dict]:
    answer = client.get("/api/v1/query", params={"query": promql}).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for_value(client: httpx.Client, promql: str, at_least: float) -> float:
    deadline = time.monotonic() + 60
    while True:
        result = query(client, promql)
        if result and float(result[0]["value"][1]) >= at_least:
            return float(result[0]["value"][1])
        assert time.monotonic() < deadline, f"{promql}: {result}"
        time.sleep(0.5)


def test_a_real_prometheus_scrapes_the_worker(served, http, prometheus):
    for _ in range(5):
        answer = http.post("/v1/embeddings", json={"model": served.embedder, "input": TEXTS})
        assert answer.status_code == 200
    http.post("/v1/embeddings", json={"model": "no-such-model", "input": "x"})
    wait_for_value(prometheus, 'up{job="worker"}', 1)
    requests = 'sum(embedding_worker_requests_total{route="/v1/embeddings",status="200"})'
    served_now = value(
        scrape(served), "embedding_worker_requests_total", route="/v1/embeddings", status="200"
    )
    assert wait_for_value(prometheus, requests, served_now) == served_now
    not_found = 'embedding_worker_requests_total{code="model_not_found",model=""}'
    assert wait_for_value(prometheus, not_found, 1) >= 1
    fill = (
        f'sum(embedding_worker_forward_pass_tokens_total{{model="{served.embedder}"}}) / '
        f'sum(embedding_worker_forward_pass_padded_tokens_total{{model="{served.embedder}"}})'
    )
    assert 0 < wait_for_value(prometheus, fill, 0.01) <= 1
    p99 = (
        "histogram_quantile(0.99, sum by (le) "
        f'(embedding_worker_request_duration_seconds_bucket{{model="{served.embedder}"}}))'
    )
    assert 0 < wait_for_value(prometheus, p99, 1e-6) <= 120
    health = f'embedding_worker_engine_healthy{{model="{served.reranker}"}}'
    assert wait_for_value(prometheus, health, 1) == 1


# ------------------------------------------------------------------ several server processes

RECORD_ONE_REQUEST = """
import sys, time
from embedding_worker.metrics import Metrics, RequestRecord
metrics = Metrics(["org/model"], ["/v1/embeddings"])
record = RequestRecord(time.perf_counter(), "/v1/embeddings", "default", "org/model", 3, 30)
metrics.finish(record, 200, None)
if sys.argv[1] == "scrape":
    sys.stdout.write(metrics.exposition({"org/model": True}).decode())
"""


def test_several_processes_add_up_in_one_scrape(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR, each process's counts go to that folder and a scrape of any
    process reads them all."""
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }

    def run(role: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", RECORD_ONE_REQUEST, role],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    run("record")
    run("record")
    found = samples(run("scrape"))
    labels = {"route": "/v1/embeddings", "model": "org/model", "status": "200"}
    assert value(found, "embedding_worker_requests_total", **labels) == 3
    assert value(found, "embedding_worker_inputs_total", model="org/model") == 9
    assert value(found, "embedding_worker_request_duration_seconds_count", model="org/model") == 3
    assert value(found, "process_resident_memory_bytes") > 0
