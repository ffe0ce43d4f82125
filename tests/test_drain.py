"""A clean drain on SIGTERM: the server stops taking work, finishes what is in flight within
DRAIN_SECONDS, ends /run jobs with a clear status, then exits.

The main test is a real `handler.py --serve` process over real HTTP, sent a real SIGTERM; the
drain's deadline is checked in-process with an engine that never answers (`stuck_worker`), so
that the jobs it cuts off can be read back after the server has stopped.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from embedding_worker.transports.http import ServerSettings, create_app
from tests.test_server import HandlerProcess, ServerThread, free_port, stuck_worker

NO_HANG_S = 60
LONG_TEXTS = [f"sentence {i} " + "with many words " * 60 for i in range(1024)]


def wait_until(check, what: str, timeout_s: float = NO_HANG_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_sigterm_finishes_the_work_in_flight_and_refuses_new_work(bert_embedder):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = HandlerProcess(
        "--serve",
        "--port",
        str(port),
        env={
            "MODEL_NAMES": str(bert_embedder),
            "MAX_QUEUED_TOKENS": "10000000",  # every job here is admitted
            "DRAIN_SECONDS": "120",
            "LOG_FORMAT": "json",
        },
    )
    answers: list[httpx.Response] = []
    try:
        server.wait_until_serving(url, "/health")
        jobs = [httpx.post(url + "/run", json={"input": {"input": LONG_TEXTS}}).json()["id"]]
        sender = threading.Thread(
            target=lambda: answers.append(
                httpx.post(
                    url + "/runsync",
                    json={"input": {"input": LONG_TEXTS[:256]}},
                    headers={"X-Request-Id": "in-flight-1"},
                    timeout=NO_HANG_S * 4,
                )
            )
        )
        sender.start()
        wait_until(
            lambda: httpx.get(url + "/health").json()["jobs"]["inProgress"] == 2,
            what="the jobs in flight",
        )
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(url + "/ping").status_code == 503, what="/ping 503")

        ping = httpx.get(url + "/ping")
        assert ping.json()["status"] == "draining" and ping.headers["retry-after"] == "1"
        refused = httpx.post(url + "/v1/embeddings", json={"input": ["too late"]})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["connection"] == "close"
        late_job = httpx.post(url + "/run", json={"input": {"input": ["too late"]}})
        assert late_job.status_code == 503

        # The /run job taken before the signal still finishes, and its result can be read: the
        # server waits for it to be fetched (or for DRAIN_SECONDS) before it exits.
        sender.join(NO_HANG_S * 4)
        finished = {}
        for job_id in jobs:
            deadline = time.monotonic() + NO_HANG_S * 4
            while (answer := httpx.get(f"{url}/status/{job_id}").json())["status"] == "IN_PROGRESS":
                assert time.monotonic() < deadline, "the /run job did not finish"
                time.sleep(0.1)
            finished[job_id] = answer
    finally:
        code = server.stop(timeout=NO_HANG_S * 4)
    for done in finished.values():
        assert done["status"] == "COMPLETED", str(done)[:300]
        assert len(done["output"]["data"]) == len(LONG_TEXTS)
    (answer,) = answers
    assert answer.status_code == 200 and answer.json()["status"] == "COMPLETED"
    assert answer.json()["id"] == "in-flight-1"
    assert code in (0, -signal.SIGTERM), server.output()[-4000:]
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    assert any(message.startswith("draining:") for message in messages), messages
    assert "Application shutdown complete." in messages
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)


def test_run_jobs_unfinished_at_the_drain_deadline_end_failed(bert_embedder):
    worker, model = stuck_worker(bert_embedder, "300")
    app = create_app(worker, ServerSettings(drain_seconds=0.5))
    with ServerThread(app) as server:
        job_id = httpx.post(server.url + "/run", json={"input": {"input": ["a"]}}).json()["id"]
        wait_until(lambda: model.pending == 1, what="the job in the engine")
        started = time.monotonic()
        server.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        assert httpx.get(server.url + "/ping").status_code == 503  # still listening, draining
        status = httpx.get(f"{server.url}/status/{job_id}")
        assert status.status_code == 200 and status.json()["status"] == "IN_PROGRESS"
        server.thread.join(NO_HANG_S)
        assert not server.thread.is_alive()
    assert 0.5 <= time.monotonic() - started < NO_HANG_S
    job = app.jobs.get(job_id)
    assert job is not None and job.answer is not None
    answer = json.loads(job.answer)
    assert answer["status"] == "FAILED"
    error = json.loads(answer["error"])
    assert error["error"]["code"] == "shutting_down" and error["status"] == 503
    assert model.pending == 0


def test_an_idle_server_exits_at_once_on_sigterm(bert_embedder):
    worker, _ = stuck_worker(bert_embedder, "300")
    with ServerThread(create_app(worker, ServerSettings(drain_seconds=120))) as server:
        started = time.monotonic()
        server.server.handle_exit(signal.SIGTERM, None)
        server.thread.join(NO_HANG_S)
        assert not server.thread.is_alive()
    assert time.monotonic() - started < 10  # not the 120 s of DRAIN_SECONDS


def test_drain_seconds_reads_its_former_name_too():
    assert ServerSettings.from_env({"DRAIN_SECONDS": "7"}).drain_seconds == 7
    assert ServerSettings.from_env({"SERVER_DRAIN_TIMEOUT_S": "9"}).drain_seconds == 9
    both = {"DRAIN_SECONDS": "7", "SERVER_DRAIN_TIMEOUT_S": "9"}
    assert ServerSettings.from_env(both).drain_seconds == 7
    assert ServerSettings.from_env({}).drain_seconds == 30
