"""The local server under hostile and careless clients, over real sockets on 127.0.0.1 (issue 28):
header size and deadline, body deadline, connection limit, the /run queue bound, clients that leave,
/cancel, large bodies parsed off the event loop, and the drain on shutdown.

A fault-injecting engine (`StuckModel`, or a real engine whose forward pass is held) stands in
where a test needs work that does not finish by itself; every raw connection is bounded in count
and time and closes by itself.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports import http as http_module
from embedding_worker.transports.http import LocalServer, ServerSettings, create_app
from tests.helpers import model_and_replica
from tests.test_server import HandlerProcess, ServerThread, free_port, stuck_worker

NO_HANG_S = 30  # a wait longer than this has found a hang


def wait_until(check, timeout_s: float = NO_HANG_S, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=NO_HANG_S)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from `sock`: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data[:200]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed within the body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (EOF or reset within NO_HANG_S)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def request_bytes(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def error_code(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error["code"]


@pytest.fixture(scope="module")
def stuck(bert_embedder):
    """A worker whose engine never answers; a test that sends it work cancels it."""
    return stuck_worker(bert_embedder, "300")


# --- finding 5: connections without bounds --------------------------------------------------------


def test_headers_over_the_limit_get_431_before_the_api_key_is_checked(stuck):
    worker, _ = stuck
    settings = ServerSettings(api_key="k", max_header_bytes=4096)
    with ServerThread(create_app(worker, settings)) as server:
        with connect(server.url) as sock:
            sock.sendall(request_bytes("GET", "/health", X_Fill="a" * 3000))  # under the limit
            status, headers, _ = read_response(sock)
            assert status == 200
            # Unterminated: without the bound this grows in memory as long as the client sends.
            sock.sendall(b"POST /runsync HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
            for _ in range(8):
                try:
                    sock.sendall(b"a" * 1024)
                except (BrokenPipeError, ConnectionResetError):
                    break
            status, headers, body = read_response(sock)
            assert status == 431 and error_code(body) == "headers_too_large"
            assert headers["connection"] == "close"
            assert "SERVER_MAX_HEADER_BYTES" in json.loads(body)["error"]["message"]
            assert closed_by_server(sock)


def test_slow_headers_are_cut_at_the_deadline_and_idle_connections_closed(stuck):
    """Slowloris: connections that trickle their headers are answered 408 and closed at the
    deadline, including a second request on a kept-alive connection; silent ones are closed."""
    worker, _ = stuck
    settings = ServerSettings(header_timeout_s=0.5)
    with ServerThread(create_app(worker, settings)) as server:
        trickling = [connect(server.url) for _ in range(20)]
        silent = [connect(server.url) for _ in range(5)]
        kept = connect(server.url)
        kept.sendall(request_bytes("GET", "/health"))
        assert read_response(kept)[0] == 200
        started = time.monotonic()
        for sock in trickling:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        kept.sendall(b"GET /health HTTP/1.1\r\n")
        open_ = list(trickling)
        while open_ and time.monotonic() - started < NO_HANG_S:  # a byte each 0.1 s from each
            for sock in list(open_):
                try:
                    sock.sendall(b"X")
                except (BrokenPipeError, ConnectionResetError):
                    open_.remove(sock)
            time.sleep(0.1)
            if time.monotonic() - started > 3:
                break  # long past the deadline: the checks below say what happened
        for sock in [*trickling, kept]:
            try:
                status, headers, body = read_response(sock)
            except ConnectionResetError:  # the close overtook our writes: cut all the same
                continue
            assert status == 408 and error_code(body) == "request_timeout"
            assert headers["connection"] == "close"
        for sock in [*trickling, kept, *silent]:
            assert closed_by_server(sock)
            sock.close()
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/health").status_code == 200


def test_a_body_that_does_not_arrive_in_time_gets_408_and_a_closed_connection(stuck):
    worker, model = stuck
    settings = ServerSettings(body_timeout_s=0.5)
    with ServerThread(create_app(worker, settings)) as server:
        with connect(server.url) as sock:
            head = request_bytes("POST", "/v1/embeddings", b'{"input": "x"}')
            sock.sendall(head[:-6])  # the headers, and a body that stops short
            status, headers, body = read_response(sock)
            assert status == 408 and error_code(body) == "request_timeout"
            assert "SERVER_BODY_TIMEOUT_S" in json.loads(body)["error"]["message"]
            assert headers["connection"] == "close"
            assert closed_by_server(sock)
        # A body nobody reads (a 405 here) is not awaited: the answer closes the connection,
        # whose rest would otherwise be read as the next request.
        with connect(server.url) as sock:
            sock.sendall(request_bytes("POST", "/health", b"0123456789")[:-5])
            status, headers, body = read_response(sock)
            assert status == 405 and headers["connection"] == "close"
            assert closed_by_server(sock)
    assert model.pending == 0


def test_connections_beyond_the_limit_get_a_json_503_with_retry_after(stuck):
    worker, _ = stuck
    settings = ServerSettings(max_connections=3)
    with ServerThread(create_app(worker, settings)) as server:
        held = [connect(server.url) for _ in range(3)]
        try:
            with connect(server.url) as extra:
                extra.sendall(request_bytes("GET", "/v1/models"))
                status, headers, body = read_response(extra)
                assert status == 503 and error_code(body) == "server_busy"
                assert headers["retry-after"] == "1" and headers["connection"] == "close"
                assert headers["content-type"] == "application/json"
        finally:
            for sock in held:
                sock.close()
        with httpx.Client(base_url=server.url) as client:
            wait_until(lambda: client.get("/v1/models").status_code == 200, what="a free slot")


# --- finding 6: work nobody waits for -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/runsync", "/v1/embeddings"])
def test_a_client_that_disconnects_cancels_its_request(stuck, path):
    worker, model = stuck
    body = {"input": ["a", "b", "c"]}
    with ServerThread(create_app(worker)) as server, httpx.Client(base_url=server.url) as client:
        before = client.get("/health").json()["jobs"]
        sock = connect(server.url)
        payload = json.dumps({"input": body} if path == "/runsync" else body).encode()
        sock.sendall(request_bytes("POST", path, payload))
        wait_until(lambda: model.pending == 3, what="the request in the engine")
        sock.close()
        wait_until(lambda: model.pending == 0, what="the engine call cancelled")
        jobs = client.get("/health").json()["jobs"]
        assert jobs["inProgress"] == 0
        if path == "/runsync":
            assert jobs["cancelled"] == before["cancelled"] + 1
        # The server goes on serving: the next request is admitted into the engine at once.
        assert client.get("/v1/models").status_code == 200


@pytest.fixture
def held_engine(bert_embedder):
    """A real engine (batches of 2) whose forward pass holds until released, counting the rows it
    computes: to see which work reaches the model after its request is cancelled."""
    env = {"MODEL_NAMES": str(bert_embedder), "BATCH_SIZES": "2", "DTYPES": "float32"}
    worker = Worker.from_config(load_config(env))
    with ServerThread(create_app(worker)) as server:
        _, replica = model_and_replica(worker, "tiny-bert-embedder")
        forward = replica.forward
        release, entered = threading.Event(), threading.Event()
        rows: list[int] = []

        def held(*args, **kwargs):
            features = args[0] if args else kwargs
            rows.append(len(features["input_ids"]))
            entered.set()
            assert release.wait(NO_HANG_S)
            return forward(*args, **kwargs)

        replica.forward = held
        try:
            yield server, release, entered, rows
        finally:
            release.set()


# Over 32 tokens each: batches of BATCH_SIZES (2) rows, not the many rows a batch of short texts.
TEXTS = [f"text number {i} of a request that is cancelled " * 8 for i in range(60)]


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_cancelled_work_that_has_not_reached_the_model_is_dropped(held_engine, how):
    server, release, entered, rows = held_engine
    with httpx.Client(base_url=server.url, timeout=NO_HANG_S) as client:
        if how == "cancel":
            job_id = client.post("/run", json={"input": {"input": TEXTS}}).json()["id"]
            assert entered.wait(NO_HANG_S)  # the first batch is in the model, held
            assert client.post(f"/cancel/{job_id}").json()["status"] == "CANCELLED"
        else:
            sock = connect(server.url)
            sock.sendall(
                request_bytes("POST", "/v1/embeddings", json.dumps({"input": TEXTS}).encode())
            )
            assert entered.wait(NO_HANG_S)
            sock.close()
            time.sleep(0.5)  # the server sees the connection go and cancels the request
        release.set()
        # A request after it runs once the engine has dealt with everything before it.
        after = client.post("/v1/embeddings", json={"input": ["after"]})
        assert after.status_code == 200
        computed = sum(rows) - 1
        assert computed < len(TEXTS) // 2, rows  # most of the cancelled request never ran
        if how == "cancel":
            assert client.get(f"/status/{job_id}").json()["status"] == "CANCELLED"


def test_run_is_bounded_by_queued_bytes_and_jobs(stuck):
    worker, model = stuck
    settings = ServerSettings(max_queued_bytes=3000, max_queued_jobs=4)
    body = {"input": {"input": ["x" * 1000]}}  # about 1030 bytes
    with ServerThread(create_app(worker, settings)) as server:
        with httpx.Client(base_url=server.url) as client:
            ids = [client.post("/run", json=body).json()["id"] for _ in range(2)]
            refused = client.post("/run", json=body)  # 3 x 1030 > 3000
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "queue_full"
            assert int(refused.headers["retry-after"]) >= 1
            assert "SERVER_MAX_QUEUED_BYTES" in refused.json()["error"]["message"]
            assert client.post(f"/cancel/{ids[0]}").json()["status"] == "CANCELLED"
            again = client.post("/run", json=body)  # room again
            assert again.status_code == 200
            ids.append(again.json()["id"])
            small = {"input": {"input": ["y"]}}
            counts = [client.post("/run", json=small) for _ in range(3)]  # 4 unfinished at most
            assert [answer.status_code for answer in counts] == [200, 200, 429]
            assert "SERVER_MAX_QUEUED_JOBS" in counts[2].json()["error"]["message"]
            ids += [answer.json()["id"] for answer in counts[:2]]
            for job_id in ids:
                client.post(f"/cancel/{job_id}")
            # An empty queue takes any one request within SERVER_MAX_BODY_BYTES.
            big = client.post("/run", json={"input": {"input": ["z" * 5000]}})
            assert big.status_code == 200
            client.post(f"/cancel/{big.json()['id']}")
    wait_until(lambda: model.pending == 0, what="the cancelled jobs to leave the engine")


# --- finding 2, the server's share: parsing off the event loop ------------------------------------


def test_a_large_body_is_parsed_off_the_event_loop(stuck, monkeypatch):
    """While a large body is being parsed, /health and /ping answer; small bodies are parsed in
    line (a thread hop costs more than they do)."""
    worker, _ = stuck
    parsed_on: dict[int, str] = {}
    parsing, finish = threading.Event(), threading.Event()
    parse = http_module._parse

    def watched(body: bytes):
        parsed_on[len(body)] = threading.current_thread().name
        if len(body) > http_module.INLINE_JSON_BYTES:
            parsing.set()
            assert finish.wait(NO_HANG_S)  # held until /health has answered
        return parse(body)

    monkeypatch.setattr(http_module, "_parse", watched)
    large = json.dumps({"model": "no-such/model", "input": ["word " * 20] * 2000}).encode()
    small = json.dumps({"model": "no-such/model", "input": "hi"}).encode()
    with ServerThread(create_app(worker)) as server, httpx.Client(base_url=server.url) as client:
        answers: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: answers.append(
                httpx.post(server.url + "/v1/embeddings", content=large, timeout=NO_HANG_S)
            )
        )
        sender.start()
        assert parsing.wait(NO_HANG_S)
        try:
            assert client.get("/health", timeout=5).status_code == 200
            assert client.get("/ping", timeout=5).status_code == 200
            assert client.post("/v1/embeddings", content=small, timeout=5).status_code == 404
        finally:
            finish.set()
            sender.join(NO_HANG_S)
        assert answers[0].status_code == 404  # parsed, then refused for its model
    assert parsed_on[len(small)] == server.thread.name  # the event loop's thread
    assert parsed_on[len(large)] != server.thread.name


# --- finding 7: the drain on shutdown -------------------------------------------------------------


def test_requests_still_running_at_the_drain_deadline_get_a_json_503(stuck):
    worker, model = stuck
    settings = ServerSettings(drain_seconds=0.5)
    answers: list[httpx.Response] = []
    with ServerThread(create_app(worker, settings)) as server:
        sender = threading.Thread(
            target=lambda: answers.append(
                httpx.post(server.url + "/v1/embeddings", json={"input": ["a"]}, timeout=NO_HANG_S)
            )
        )
        sender.start()
        wait_until(lambda: model.pending == 1, what="the request in the engine")
        server.server.should_exit = True  # what SIGTERM does (uvicorn's handle_exit)
        sender.join(NO_HANG_S)
    (answer,) = answers
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "shutting_down"
    assert answer.headers["retry-after"] == "1"
    assert model.pending == 0


async def test_requests_arriving_while_draining_get_a_json_503(stuck):
    """uvicorn stops accepting connections when the drain starts; a request whose headers
    complete meanwhile on an open connection reaches the app, which refuses it. /ping and /health
    answer 503 draining (the load balancer learns from them)."""
    worker, _ = stuck
    app = LocalServer(worker)
    app.start_draining()

    async def call(method: str, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "headers": [(b"host", b"x")]}
        await app(scope, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]

    status, headers, body = await call("POST", "/runsync")
    assert status == 503 and error_code(body) == "shutting_down"
    assert headers[b"retry-after"] == b"1"
    status, headers, body = await call("GET", "/ping")
    assert status == 503 and json.loads(body)["status"] == "draining"


def test_sigterm_answers_work_in_flight_in_json(bert_embedder):
    """A real `--serve` process: SIGTERM while a /runsync runs gives that request JSON (its
    answer, or 503 shutting_down after SERVER_DRAIN_TIMEOUT_S), never a plain-text 500."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = HandlerProcess(
        "--serve",
        "--port",
        str(port),
        env={"MODEL_NAMES": str(bert_embedder), "SERVER_DRAIN_TIMEOUT_S": "0.05"},
    )
    answers: list[httpx.Response] = []
    texts = [f"sentence {i} " + "with many words " * 40 for i in range(2048)]
    try:
        server.wait_until_serving(url, "/health")
        sender = threading.Thread(
            target=lambda: answers.append(
                httpx.post(url + "/runsync", json={"input": {"input": texts}}, timeout=120)
            )
        )
        sender.start()
        wait_until(
            lambda: httpx.get(url + "/health").json()["jobs"]["inProgress"] == 1,
            what="the job in flight",
        )
    finally:
        code = server.stop()
    sender.join(120)
    (answer,) = answers
    assert answer.headers["content-type"] == "application/json", answer.text[:200]
    assert answer.status_code == 503, answer.text[:200]
    assert answer.json()["error"]["code"] == "shutting_down"
    assert code in (0, -15), server.output()[-4000:]
    assert "Application shutdown complete" in server.output()
