"""OpenAI's Batch API on the worker's server (transports/openai_batches): the unmodified openai SDK
against a real server process (upload, create, poll, download), the error file, validation,
cancellation, a restart after SIGKILL in the middle of a batch, hostile ids and paths, the API key;
and, in this process, the upload parser, the lease, and two servers sharing one folder.
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
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from embedding_worker import errors
from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.env import ConfigError
from embedding_worker.errors import APIError
from embedding_worker.statuses import http_status
from embedding_worker.transports.http import LocalServer, ServerSettings
from embedding_worker.transports.openai_batches import BATCH_VARIABLES, BatchAPI, BatchSettings
from embedding_worker.transports.openai_batches.multipart import FormReader, boundary_of
from embedding_worker.transports.openai_batches.runner import validate
from embedding_worker.transports.openai_batches.store import Lease, Store
from tests.conftest import ROOT
from tests.helpers import decode_vectors
from tests.test_server import ServerThread

API_KEY = "batch-api-test-key"
FINISHED = ("completed", "failed", "cancelled", "expired")
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_LINES = 30_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`handler.py --serve` in a process of its own, on a Batch API folder that outlives it."""

    def __init__(self, env: dict[str, str], batch_dir: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if k not in ("MODEL_NAMES", "BATCH_DIR")}
        self.env.update(
            {"HF_HUB_OFFLINE": "1", "LOG_LEVEL": "INFO", "BATCH_DIR": str(batch_dir), **env}
        )
        self.batch_dir = batch_dir
        self.log = tempfile.TemporaryFile("w+")
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> Server:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "handler.py", "--serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, self.output()[-4000:]
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.output()[-4000:]
            time.sleep(0.2)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0)


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("batch-api")


@pytest.fixture(scope="module")
def server_env(bert_embedder) -> dict[str, str]:
    return {
        "MODEL_NAMES": f"{bert_embedder};{DEFAULT_MODEL_ID}",
        "BATCH_SIZES": "16",
        "DTYPES": "float32",
        "WORKER_API_KEY": API_KEY,
        "BATCH_LEASE_S": "4",
        "BATCH_CONCURRENCY": "16",
        "BATCH_MAX_FILE_BYTES": str(MAX_FILE_BYTES),
        "BATCH_MAX_LINES": str(MAX_LINES),
    }


@pytest.fixture(scope="module")
def server(server_env, batch_dir):
    running = Server(server_env, batch_dir).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tiny(bert_embedder) -> str:
    return f"{bert_embedder.parent.name}/{bert_embedder.name}"


def line(custom_id: str, body: Any, url: str = "/v1/embeddings") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def upload(client: openai.OpenAI, tmp_path: Path, lines: list[str], name: str = "in.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    with open(path, "rb") as source:
        return client.files.create(file=source, purpose="batch")


def wait_for(client: openai.OpenAI, batch_id: str, until, timeout_s: float = 240):
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)


def finished(client: openai.OpenAI, batch_id: str, timeout_s: float = 240):
    return wait_for(client, batch_id, lambda b: b.status in FINISHED, timeout_s)


def content_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(raw) for raw in client.files.content(file_id).content.splitlines()]


def check_vectors(client: openai.OpenAI, outputs: list[dict[str, Any]], bodies: dict[str, Any]):
    """Every output line's vectors equal those of the same request sent on its own."""
    for output in outputs:
        body = bodies[output["custom_id"]]
        assert output["error"] is None and output["response"]["status_code"] == 200
        got = output["response"]["body"]
        assert got["service_tier"] == "flex"
        direct = client.embeddings.with_raw_response.create(**body).http_response.json()
        assert got["model"] == direct["model"] and got["usage"] == direct["usage"]
        assert np.allclose(decode_vectors(got), decode_vectors(direct), atol=1e-5)


# --- the openai SDK end to end ------------------------------------------------------------------


def test_sdk_uploads_runs_and_downloads_a_batch_equal_to_direct_calls(server, tiny, tmp_path):
    client = server.client()
    bodies = {
        f"req-{i}": {
            "model": tiny,
            "input": [f"document number {i}", "a second text"][: 1 + i % 2],
            "encoding_format": "base64" if i % 3 else "float",
        }
        for i in range(60)
    }
    uploaded = upload(client, tmp_path, [line(cid, body) for cid, body in bodies.items()])
    assert uploaded.object == "file" and uploaded.purpose == "batch"
    assert (
        uploaded.filename == "in.jsonl" and uploaded.bytes == (tmp_path / "in.jsonl").stat().st_size
    )
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).content == (tmp_path / "in.jsonl").read_bytes()

    created = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/embeddings",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert created.status == "validating" and created.metadata == {"job": "nightly"}
    assert created.expires_at == created.created_at + 24 * 3600
    batch = finished(client, created.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": 60, "completed": 60, "failed": 0}
    assert batch.error_file_id is None and batch.errors is None
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at

    output = client.files.retrieve(batch.output_file_id)
    assert output.purpose == "batch_output" and output.filename == f"{batch.id}_output.jsonl"
    outputs = content_lines(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(bodies)
    check_vectors(client, outputs, bodies)

    assert batch.id in [b.id for b in client.batches.list()]
    listed = {f.id for f in client.files.list()}
    assert {uploaded.id, batch.output_file_id} <= listed
    assert batch.output_file_id in [f.id for f in client.files.list(purpose="batch_output")]
    # Deleting the output leaves the batch; the file is gone.
    assert client.files.delete(batch.output_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(batch.output_file_id)


def test_bad_lines_go_to_the_error_file_with_their_custom_id(server, tiny, tmp_path):
    client = server.client()
    good = {"model": tiny, "input": "fine"}
    lines = [
        line("ok", good),
        line("empty", {"model": tiny, "input": ""}),
        line("no-body", "not an object"),
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/embeddings", "body": good}),
    ]
    uploaded = upload(client, tmp_path, lines)
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    batch = finished(client, batch.id)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 4, "completed": 1, "failed": 3}
    assert [o["custom_id"] for o in content_lines(client, batch.output_file_id)] == ["ok"]
    failed = {o["custom_id"]: o for o in content_lines(client, batch.error_file_id)}
    assert set(failed) == {"empty", "no-body", "get"}
    empty = failed["empty"]["response"]
    assert empty["status_code"] == 400 and empty["body"]["error"]["code"] == "invalid_input"
    for custom_id, number in (("no-body", 3), ("get", 4)):
        assert failed[custom_id]["response"] is None
        assert failed[custom_id]["error"]["code"] == "invalid_batch_line"
        assert failed[custom_id]["error"]["message"].startswith(f"line {number}:")


@pytest.mark.parametrize(
    ("bad_line", "code"),
    [
        ("{not json", "invalid_json_line"),
        ('["a list"]', "invalid_json_line"),
        (line("x", {"input": "a"}, url="/v1/chat/completions"), "invalid_url"),
        (line("x", {"query": "q", "documents": ["d"]}, url="/v1/rerank"), "mismatched_endpoint"),
        (line("first", {"input": "again"}), "duplicate_custom_id"),
        (
            json.dumps({"url": "/v1/embeddings", "body": {"input": "a"}}),
            "missing_required_parameter",
        ),
    ],
)
def test_a_file_that_is_not_batch_jsonl_fails_validation_naming_the_line(
    server, tiny, tmp_path, bad_line, code
):
    client = server.client()
    uploaded = upload(client, tmp_path, [line("first", {"input": "a"}), "", bad_line])
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    batch = finished(client, batch.id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.output_file_id is None and batch.error_file_id is None
    (error,) = batch.errors.data
    assert (error.code, error.line) == (code, 3)


def test_create_refuses_what_cannot_be_a_batch(server, tiny, tmp_path):
    client = server.client()
    uploaded = upload(client, tmp_path, [line("a", {"model": tiny, "input": "a"})])
    cases = [
        ({"endpoint": "/v1/chat/completions"}, openai.BadRequestError, "endpoint"),
        ({"completion_window": "1h"}, openai.BadRequestError, "completion_window"),
        ({"metadata": {"k": "v" * 600}}, openai.BadRequestError, "metadata"),
        ({"input_file_id": "file-" + "0" * 32}, openai.NotFoundError, None),
    ]
    for change, error, param in cases:
        fields = {
            "input_file_id": uploaded.id,
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
            **change,
        }
        with pytest.raises(error) as raised:
            client.batches.create(**fields)
        if param is not None:
            assert raised.value.body["param"] == param


def test_uploads_are_bounded_in_bytes_lines_and_purpose(server, tmp_path):
    client = server.client()
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * (MAX_FILE_BYTES + 1))
    with open(big, "rb") as source, pytest.raises(openai.APIStatusError) as raised:
        client.files.create(file=source, purpose="batch")
    assert raised.value.status_code == 413 and raised.value.body["code"] == "file_too_large"
    many = tmp_path / "many.jsonl"
    many.write_bytes(b"{}\n" * (MAX_LINES + 1))
    with open(many, "rb") as source, pytest.raises(openai.APIStatusError) as raised:
        client.files.create(file=source, purpose="batch")
    assert raised.value.status_code == 413 and "BATCH_MAX_LINES" in raised.value.message
    with open(many, "rb") as source, pytest.raises(openai.BadRequestError) as raised:
        client.files.create(file=source, purpose="fine-tune")
    assert raised.value.body["param"] == "purpose"
    refused = httpx.post(
        server.url + "/v1/files",
        json={"purpose": "batch"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert refused.status_code == 400
    assert not list((server.batch_dir / "tmp").iterdir()), "a refused upload left a file"


def test_the_api_key_guards_every_batch_route(server):
    routes = [
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
        ("GET", "/v1/batches"),
        ("POST", "/v1/batches"),
        ("GET", "/openai/v1/batches/batch_" + "0" * 32),
        ("POST", "/v1/batches/batch_" + "0" * 32 + "/cancel"),
        ("GET", "/v1/files/file-" + "0" * 32 + "/content"),
        ("DELETE", "/v1/files/file-" + "0" * 32),
    ]
    for method, path in routes:
        answer = httpx.request(method, server.url + path)
        assert answer.status_code == 401, (method, path)
        assert answer.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").batches.list()


def test_hostile_ids_and_paths_stay_inside_the_folder(server, tmp_path):
    client = server.client()
    outside = tmp_path / "outside.json"
    outside.write_text('{"file": {"id": "x", "purpose": "batch"}}')
    headers = {"Authorization": f"Bearer {API_KEY}"}
    hostile = [
        "../../../../etc/passwd",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        f"..%2F..%2F..%2F..{outside.with_suffix('')}",
        "file-" + "0" * 31 + "/",
        "file-" + "0" * 32 + "%00",
        "file-" + "A" * 32,
        "file-" + "0" * 33,
        "%2e%2e",
        "batch_" + "0" * 32,
    ]
    with httpx.Client(base_url=server.url, headers=headers) as http:
        for bad in hostile:
            for method, path in (
                ("GET", f"/v1/files/{bad}"),
                ("GET", f"/v1/files/{bad}/content"),
                ("DELETE", f"/v1/files/{bad}"),
                ("GET", f"/v1/batches/{bad}"),
                ("POST", f"/v1/batches/{bad}/cancel"),
            ):
                answer = http.request(method, path)
                assert answer.status_code == 404, (method, path, answer.text)
                assert "error" in answer.json()
        refused = http.get("/v1/batches", params={"after": "../x"})
        assert refused.status_code == 404
        refused = http.post(
            "/v1/batches",
            json={
                "input_file_id": "../../files/x",
                "endpoint": "/v1/embeddings",
                "completion_window": "24h",
            },
        )
        assert refused.status_code == 404
    # A file name is a label: it names no path here.
    (tmp_path / "in.jsonl").write_text(line("a", {"input": "a"}) + "\n")
    with open(tmp_path / "in.jsonl", "rb") as source:
        stored = client.files.create(file=("../../escape.jsonl", source), purpose="batch")
    assert stored.filename == "escape.jsonl"
    names = {p.relative_to(server.batch_dir).parts[0] for p in server.batch_dir.rglob("*")}
    assert names <= {"files", "batches", "tmp"}
    assert not (server.batch_dir.parent / "escape.jsonl").exists()
    assert outside.read_text().startswith('{"file"')


# --- cancellation and restarts (MiniLM: lines slow enough to catch a batch in flight) -------------


def long_lines(count: int, prefix: str = "") -> dict[str, dict[str, Any]]:
    words = "the quick brown fox jumps over the lazy dog near a quiet river bank".split()
    return {
        f"{prefix}{i}": {
            "model": DEFAULT_MODEL_ID,
            "input": [" ".join(words[(i + k) % 7 :] * 4) + f" {i} {k}" for k in range(2)],
            "encoding_format": "base64",
        }
        for i in range(count)
    }


def test_cancelling_keeps_what_was_answered_and_stops_the_rest(server, tmp_path):
    client = server.client()
    bodies = long_lines(400)
    uploaded = upload(client, tmp_path, [line(cid, body) for cid, body in bodies.items()])
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    wait_for(client, batch.id, lambda b: b.status == "in_progress")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    batch = finished(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at >= batch.cancelling_at
    counts = batch.request_counts
    assert counts.total == 400 and counts.completed + counts.failed < 400
    outputs = content_lines(client, batch.output_file_id)
    assert len(outputs) == counts.completed and counts.failed == 0
    assert len({o["custom_id"] for o in outputs}) == len(outputs)
    # A finished batch is answered as it is; its input may now be deleted.
    assert client.batches.cancel(batch.id).status == "cancelled"
    assert client.files.delete(uploaded.id).deleted


def test_a_batch_killed_mid_run_resumes_after_restart_answering_each_line_once(server, tmp_path):
    """Last of the server's tests: it kills the module's server and starts it again."""
    client = server.client()
    bodies = long_lines(100, prefix="k")
    uploaded = upload(client, tmp_path, [line(cid, body) for cid, body in bodies.items()])
    created = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    running = wait_for(client, created.id, lambda b: b.request_counts.completed >= 10)
    assert running.status == "in_progress"
    server.kill()
    client = server.start().client()
    batch = finished(client, created.id)
    assert batch.status == "completed", server.output()[-3000:]
    assert batch.request_counts.model_dump() == {"total": 100, "completed": 100, "failed": 0}
    assert batch.error_file_id is None
    outputs = content_lines(client, batch.output_file_id)
    ids = [o["custom_id"] for o in outputs]
    assert sorted(ids) == sorted(bodies) and len(ids) == len(set(ids))
    check_vectors(client, outputs[:5] + outputs[-5:], bodies)


def test_load_balancing_mode_takes_batches_while_the_models_load(bert_embedder, tmp_path):
    """Behind RunPod's load balancer: files and batches are answered while the models load (from
    the folder), and the batch runs once they are ready; under /openai/v1 as under /v1."""
    release = threading.Event()

    def load() -> Worker:
        assert release.wait(120)
        return Worker.from_config(load_config({"MODEL_NAMES": str(bert_embedder)}))

    settings = ServerSettings(batches=BatchSettings(dir=tmp_path / "batches", lease_s=4))
    app = LocalServer(None, settings, load=load, runpod_proxy=True)
    with ServerThread(app) as served:
        client = openai.OpenAI(base_url=served.url + "/openai/v1", api_key="x", max_retries=0)
        (tmp_path / "in.jsonl").write_text(line("a", {"input": ["one", "two"]}) + "\n")
        with open(tmp_path / "in.jsonl", "rb") as source:
            uploaded = client.files.create(file=source, purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
        assert httpx.get(served.url + "/ping").status_code == 204  # still loading
        time.sleep(1)
        assert client.batches.retrieve(batch.id).status == "validating"
        release.set()
        batch = finished(client, batch.id, timeout_s=120)
        assert batch.status == "completed"
        (output,) = content_lines(client, batch.output_file_id)
        assert decode_vectors(output["response"]["body"]).shape[0] == 2


# --- in this process ----------------------------------------------------------------------------


def form(boundary: str, purpose: str, content: bytes, filename: str = "a.jsonl") -> bytes:
    return (
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )


def test_the_form_reader_gives_the_same_parts_however_the_body_is_cut():
    content = b'{"custom_id": "a"}\r\n--not-the-boundary\r\n' * 50 + b"\r\n--boun"
    body = form("bound", "batch", content)
    for size in (1, 2, 3, 7, 64, 1000, len(body)):
        received: list[bytes] = []
        reader = FormReader(
            boundary_of("multipart/form-data; boundary=bound"), "file", received.append
        )
        for start in range(0, len(body), size):
            reader.feed(body[start : start + size])
        reader.finish()
        assert b"".join(received) == content
        assert reader.fields == {"purpose": "batch"} and reader.filename == "a.jsonl"
    cut = FormReader(b"bound", "file", lambda data: None)
    cut.feed(body[:-10])
    with pytest.raises(APIError):
        cut.finish()
    with pytest.raises(APIError):
        boundary_of("application/json")


def test_validation_counts_requests_and_names_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([line("a", {}), "", line("b", {}), "nope", line("a", {})]) + "\n")
    total, found = validate(path, "/v1/embeddings", 100)
    assert total == 4
    assert [(e["line"], e["code"]) for e in found] == [
        (4, "invalid_json_line"),
        (5, "duplicate_custom_id"),
    ]
    assert validate(path, "/v1/embeddings", 2)[1][-1]["code"] == "too_many_requests"
    path.write_text("\n\n")
    assert validate(path, "/v1/embeddings", 100)[1][0]["code"] == "empty_file"


def test_a_lease_is_held_by_one_server_until_it_ends(tmp_path):
    path = tmp_path / "b.lease"
    first, second = Lease(path, "one", 0.4), Lease(path, "two", 0.4)
    assert first.acquire() and first.valid
    assert not second.acquire()
    assert first.renew() and not second.acquire()
    time.sleep(0.5)  # the holder stalls past its term
    assert not first.valid
    assert second.acquire() and second.valid
    assert not first.renew(), "a lease taken over is not renewed by its old holder"
    first.release()
    assert path.exists() and second.renew()
    second.release()
    assert not path.exists()


def test_a_renewal_that_reaches_the_disk_after_the_lease_ended_gives_the_lease_up(
    tmp_path, monkeypatch
):
    path = tmp_path / "b.lease"
    first, second = Lease(path, "one", 0.4), Lease(path, "two", 0.4)
    assert first.acquire()
    taken = threading.Event()
    fsync = os.fsync

    def stalling_fsync(fd: int) -> None:
        if threading.current_thread().name == "renewal":
            assert taken.wait(10)  # the disk stalls until another server has taken the lease over
        fsync(fd)

    monkeypatch.setattr(os, "fsync", stalling_fsync)
    renewed: list[bool] = []
    renewal = threading.Thread(target=lambda: renewed.append(first.renew()), name="renewal")
    renewal.start()
    deadline = time.monotonic() + 10
    while not second.acquire():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    taken.set()
    renewal.join(10)
    assert renewed == [False] and not first.valid, "the stalled renewal came after a takeover"
    assert second.renew(), "the new holder's lease file was overwritten"
    first.release()
    assert path.exists() and second.valid
    second.release()
    assert not path.exists() and not list(tmp_path.glob("*.tmp"))


class FakeRequest:
    def __init__(self, body: Any) -> None:
        self.body = body
        self.query = b""

    def header(self, name: bytes) -> bytes:
        return b""

    async def json(self) -> Any:
        return self.body


async def test_two_servers_sharing_a_folder_run_each_batch_once(worker, ids, tmp_path):
    settings = BatchSettings(dir=tmp_path, lease_s=1.0, concurrency=8)
    servers = [BatchAPI(settings), BatchAPI(settings)]
    store = Store(tmp_path)
    batch_ids = []
    for number in range(4):
        file_id = f"file-{number:032x}"
        content = store.temp_path()
        lines = [
            line(f"{number}-{i}", {"model": ids["embedder"], "input": f"t {i}"}) for i in range(150)
        ]
        content.write_text("\n".join(lines) + "\n")
        store.add_file(
            file_id, content, {"file": {"id": file_id, "purpose": "batch"}, "order": number}
        )
        created = await servers[number % 2].create_batch(
            FakeRequest(
                {"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
            )
        )
        batch_ids.append(created.body["id"])
    for api in servers:
        api.start(lambda: worker)
    try:
        async with asyncio.timeout(240):
            while True:
                records = [store.get_batch(b) for b in batch_ids]
                if all(r["batch"]["status"] in FINISHED for r in records):
                    break
                await asyncio.sleep(0.2)
    finally:
        await asyncio.gather(*(api.stop() for api in servers))
    for record in records:
        batch = record["batch"]
        assert batch["status"] == "completed"
        assert batch["request_counts"] == {"total": 150, "completed": 150, "failed": 0}
        raw = store.file_content(batch["output_file_id"]).read_bytes().splitlines()
        custom_ids = [json.loads(r)["custom_id"] for r in raw]
        assert len(custom_ids) == 150 == len(set(custom_ids))
    assert not list(tmp_path.glob("batches/*.lease")), "a lease was left behind"


async def test_a_batch_past_its_window_expires_with_every_line_in_the_error_file(
    worker, ids, tmp_path
):
    settings = BatchSettings(dir=tmp_path, lease_s=2.0)
    api, store = BatchAPI(settings), Store(tmp_path)
    content = store.temp_path()
    content.write_text("\n".join(line(f"e{i}", {"input": "x"}) for i in range(5)) + "\n")
    file_id = "file-" + "e" * 32
    store.add_file(file_id, content, {"file": {"id": file_id, "purpose": "batch"}, "order": 0})
    fields = {"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
    created = (await api.create_batch(FakeRequest(fields))).body
    record = store.get_batch(created["id"])
    record["batch"]["expires_at"] = int(time.time()) - 1  # the window has ended
    store.put_batch(record)
    api.start(lambda: worker)
    try:
        async with asyncio.timeout(120):
            while store.get_batch(created["id"])["batch"]["status"] not in FINISHED:
                await asyncio.sleep(0.1)
    finally:
        await api.stop()
    batch = store.get_batch(created["id"])["batch"]
    assert batch["status"] == "expired" and batch["expired_at"] is not None
    assert batch["request_counts"] == {"total": 5, "completed": 0, "failed": 5}
    assert batch["output_file_id"] is None
    lines = store.file_content(batch["error_file_id"]).read_text().splitlines()
    assert sorted(json.loads(raw)["custom_id"] for raw in lines) == [f"e{i}" for i in range(5)]
    assert {json.loads(raw)["error"]["code"] for raw in lines} == {"batch_expired"}


def test_retention_removes_the_oldest_finished_batches_with_their_files(tmp_path):
    store = Store(tmp_path)
    store.ensure()
    for number, status in enumerate(["completed", "in_progress", "completed", "failed"]):
        output = f"file-{number:032x}"
        temp = store.temp_path()
        temp.write_text("{}\n")
        store.add_file(
            output, temp, {"file": {"id": output, "purpose": "batch_output"}, "order": number}
        )
        batch = {"id": f"batch_{number:032x}", "status": status, "input_file_id": "file-x"}
        batch.update(output_file_id=output, error_file_id=None)
        store.put_batch({"batch": batch, "order": number})
    assert store.prune_batches(3)
    left = [r["batch"]["id"][-1] for r in store.all_batches()]
    assert left == ["1", "3"]  # the oldest finished two went; the unfinished one stays
    assert [r["file"]["id"][-1] for r in store.all_files()] == ["1", "3"]
    assert not store.prune_batches(1)  # only an unfinished batch is left to remove
    with pytest.raises(APIError) as raised:
        store.get_batch("../" + "batches/x")
    assert http_status(raised.value) == 404 and raised.value.code == errors.not_found("").code


def test_every_batch_variable_is_documented_and_checked():
    docs = (ROOT / "docs" / "configuration.md").read_text()
    table = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", docs, re.M))
    assert set(BATCH_VARIABLES) <= table
    assert BatchSettings.from_env({}) == BatchSettings()
    read = BatchSettings.from_env({"BATCH_DIR": "/data/b", "BATCH_LEASE_S": "5"})
    assert read.dir == Path("/data/b") and read.lease_s == 5.0
    for name in BATCH_VARIABLES[1:]:
        with pytest.raises(ConfigError, match=name):
            BatchSettings.from_env({name: "0"})
