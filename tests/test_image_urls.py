"""Image URLs: refused unless their host is allowed, and never fetched from inside the network.

A real HTTP server on 127.0.0.1 is refused even when its name is on IMAGE_URL_HOSTS: that is the
SSRF guarantee, checked over real sockets. A fetch that succeeds needs a public address, which a
test cannot reach, so those tests replace `image_urls.NETWORK` (DNS and the connection) and every
check runs on what it gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import http.server
import ipaddress
import threading
import time
import tracemalloc
import zlib

import httpx
import numpy as np
import pytest

from embedding_worker import image_urls
from embedding_worker.config import ConfigError, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.runpod import answer_job
from tests.helpers import answer, decode_vectors
from tests.test_images import IMAGES, uri_of

PUBLIC = "93.184.215.14"  # a global unicast address
PNG = IMAGES["png"]


@pytest.fixture(scope="module")
async def url_worker(models_dir):
    from tests import model_factory

    clip = model_factory.make_clip(models_dir / "tiny-clip-urls")
    env = {
        "MODEL_NAMES": str(clip),
        "DTYPES": "float32",
        "IMAGE_URL_HOSTS": "images.example.com;localhost;127.0.0.1;internal.example.com",
        "IMAGE_URL_TIMEOUT": "0.5",
    }
    worker = Worker.from_config(load_config(env))
    await worker.start()
    yield worker
    await worker.stop()


async def refusal(worker, *items) -> str:
    reply = await answer_job(worker, {"input": ["a cat", *items]})
    assert reply.status == 400, reply.body
    error = reply.body["error"]
    assert error["param"] == "input" and error["code"] == "invalid_input"
    assert "example" not in error["message"] and "127.0.0.1" not in error["message"]  # no URL
    return error["message"]


@pytest.mark.parametrize(
    "address, public",
    [
        ("93.184.215.14", True),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # shared address space (carrier NAT)
        ("169.254.169.254", False),  # cloud metadata
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:169.254.169.254", False),
        ("::", False),
        ("ff02::1", False),
    ],
)
def test_only_public_addresses_are_allowed(address, public):
    assert image_urls.allowed_address(address) is public


class _Server(http.server.BaseHTTPRequestHandler):
    requests = 0

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests += 1
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def loopback_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


async def test_a_loopback_server_is_refused_even_when_its_name_is_allowed(
    url_worker, loopback_server
):
    # The server answers plain HTTP clients: only the worker's policy stands in the way.
    assert httpx.get(f"http://127.0.0.1:{loopback_server}/cat.png").content == PNG
    before = _Server.requests
    for host in ("localhost", "127.0.0.1"):
        url = f"http://{host}:{loopback_server}/cat.png"
        message = await refusal(url_worker, {"type": "image_url", "image_url": {"url": url}})
        assert "item 1 is an image URL whose host resolves to a private, loopback" in message
    assert _Server.requests == before  # nothing reached it
    await answer(url_worker, input=[uri_of("png")])  # and the worker serves on


class FakeNetwork(image_urls.Network):
    """DNS answers from a table; connections answered by `handler` (an httpx MockTransport)."""

    def __init__(self, handler, addresses=None):
        self.addresses = {"images.example.com": [PUBLIC], **(addresses or {})}
        self.handler = handler
        self.seen: list[httpx.Request] = []

    async def resolve(self, host, port):
        try:
            return [str(ipaddress.ip_address(host))]  # an address resolves to itself
        except ValueError:
            pass
        if host not in self.addresses:
            raise OSError("no such host")
        return self.addresses[host]

    def transport(self):
        async def handle(request):
            self.seen.append(request)
            response = await self.handler(request)
            if not hasattr(response, "_content"):
                return response
            # A body given whole is read already; the worker reads the raw stream, as off a socket.
            return httpx.Response(
                response.status_code, headers=response.headers, stream=_Stream(response.content)
            )

        return httpx.MockTransport(handle)


class _Stream(httpx.AsyncByteStream):
    def __init__(self, data: bytes):
        self.data = data

    async def __aiter__(self):
        yield self.data


def _png(request):
    return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})


async def _answer_png(request):
    return _png(request)


@pytest.fixture
def network(monkeypatch):
    def install(handler=_answer_png, addresses=None) -> FakeNetwork:
        fake = FakeNetwork(handler, addresses)
        monkeypatch.setattr(image_urls, "NETWORK", fake)
        return fake

    return install


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_an_allowed_url_is_fetched_from_the_checked_address(url_worker, network, scheme):
    fake = network()
    url = f"{scheme}://Images.Example.com/cats/1.png?size=small"
    body = await answer(
        url_worker, input=[{"type": "image_url", "image_url": {"url": url}}, uri_of("png")]
    )
    vectors = decode_vectors(body)
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)  # the same image both ways
    (request,) = fake.seen
    # Connected to the address that was checked, the name in the Host header and TLS.
    assert request.url.host == PUBLIC and request.url.raw_path == b"/cats/1.png?size=small"
    assert request.headers["host"] == "images.example.com"
    assert request.extensions.get("sni_hostname") == (
        "images.example.com" if scheme == "https" else None
    )


async def test_infinity_style_url_strings_with_modality_image(url_worker, network):
    network()
    body = await answer(url_worker, input=["https://images.example.com/a.png"], modality="image")
    assert len(body["data"]) == 1


@pytest.mark.parametrize(
    "url, reason",
    [
        ("https://other.example.org/a.png", "host is not on IMAGE_URL_HOSTS"),
        ("https://images.example.com.evil.org/a.png", "host is not on IMAGE_URL_HOSTS"),
        ("ftp://images.example.com/a.png", "not http or https"),
        ("file:///etc/passwd", "not http or https"),
        ("https://user:secret@images.example.com/a.png", "credentials"),
        ("https://internal.example.com/a.png", "private, loopback"),
        ("https://rebinding.example.com/a.png", "private, loopback"),
        ("https://images.example.com:99999/a.png", "invalid port"),
    ],
)
async def test_urls_outside_the_policy_are_refused_before_any_connection(
    url_worker, network, monkeypatch, url, reason
):
    fake = network(
        addresses={
            "internal.example.com": ["10.0.0.5"],
            # One public and one loopback answer: any refused address refuses the URL.
            "rebinding.example.com": [PUBLIC, "127.0.0.1"],
        }
    )
    limits = dataclasses.replace(
        url_worker.limits,
        image_url_hosts=url_worker.limits.image_url_hosts | {"rebinding.example.com"},
    )
    monkeypatch.setattr(url_worker, "limits", limits)
    message = await refusal(url_worker, {"type": "image", "image": url})
    assert message.startswith("'input' item 1 is an image URL") and reason in message
    assert fake.seen == []


async def test_redirects_are_checked_at_every_hop(url_worker, network):
    hops = {
        "/to-internal": "https://internal.example.com/a.png",
        "/to-other": "https://other.example.org/a.png",
        "/to-loopback": "http://127.0.0.1/a.png",
        "/relative": "/final.png",
        "/loop": "/loop",
    }

    async def handle(request):
        target = hops.get(request.url.path)
        if target is not None:
            return httpx.Response(302, headers={"location": target})
        return _png(request)

    fake = network(handle, {"internal.example.com": ["10.0.0.5"]})
    for path, reason in [
        ("/to-internal", "private, loopback"),
        ("/to-other", "not on IMAGE_URL_HOSTS"),
        ("/to-loopback", "private, loopback"),
        ("/loop", "redirects more than 3 times"),
    ]:
        url = f"https://images.example.com{path}"
        assert reason in await refusal(url_worker, {"type": "image", "image": url})
    fake.seen.clear()
    await answer(
        url_worker, input=[{"type": "image", "image": "https://images.example.com/relative"}]
    )
    assert [r.url.path for r in fake.seen] == ["/relative", "/final.png"]
    assert all(r.url.host == PUBLIC for r in fake.seen)


async def test_size_time_and_status_limits(url_worker, network, monkeypatch):
    monkeypatch.setattr(
        url_worker, "limits", dataclasses.replace(url_worker.limits, max_image_bytes=len(PNG) - 1)
    )

    async def streamed(request):  # no Content-Length: the limit is applied while reading
        async def chunks():
            for start in range(0, len(PNG), 100):
                yield PNG[start : start + 100]

        return httpx.Response(200, content=chunks())

    async def slow(request):
        await asyncio.sleep(5)
        return _png(request)

    async def missing(request):
        return httpx.Response(404)

    url = {"type": "image", "image": "https://images.example.com/a.png"}
    network(_answer_png)
    assert "more than" in await refusal(url_worker, url)  # declared Content-Length
    network(streamed)
    assert "more than" in await refusal(url_worker, url)
    monkeypatch.undo()
    network(missing)
    assert "answered HTTP 404" in await refusal(url_worker, url)
    network(slow)
    started = asyncio.get_running_loop().time()
    assert "did not answer within 0.5 s (IMAGE_URL_TIMEOUT)" in await refusal(url_worker, url, url)
    assert asyncio.get_running_loop().time() - started < 3
    assert url_worker.healthy
    network(_answer_png)
    await answer(url_worker, input=[url, url])


async def test_urls_are_refused_without_an_allow_list(url_worker, network, monkeypatch):
    fake = network()
    monkeypatch.setattr(
        url_worker, "limits", dataclasses.replace(url_worker.limits, image_url_hosts=frozenset())
    )
    message = await refusal(url_worker, {"type": "image", "image": "https://images.example.com/a"})
    assert "fetches none (no IMAGE_URL_HOSTS)" in message and fake.seen == []


@pytest.mark.parametrize(
    "value", ["https://images.example.com", "images.example.com:443", "*.example.com", "a;;b"]
)
def test_the_allow_list_holds_host_names_only(value):
    with pytest.raises(ConfigError, match="IMAGE_URL_HOSTS"):
        load_config({"IMAGE_URL_HOSTS": value})


def test_the_allow_list_is_read_lower_case():
    limits = load_config({"IMAGE_URL_HOSTS": " Images.Example.com. ; cdn.example.org"}).limits
    assert limits.image_url_hosts == {"images.example.com", "cdn.example.org"}


# A real HTTP server on 127.0.0.1 behind the Network seam: DNS gives a public address, and the
# connection goes to the server over a real socket (a test cannot reach a public one). What the
# worker reads is what a server sends, bytes and timing, not what httpx makes of a Response object.


class _ToLoopback(httpx.AsyncBaseTransport):
    def __init__(self, port: int):
        self.port = port
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request):
        request.url = request.url.copy_with(scheme="http", host="127.0.0.1", port=self.port)
        return await self.inner.handle_async_request(request)

    async def aclose(self):
        await self.inner.aclose()


class LocalNetwork(image_urls.Network):
    def __init__(self, port: int):
        self.port = port

    async def resolve(self, host, port):
        return [PUBLIC]

    def transport(self):
        return _ToLoopback(self.port)


def _noise_png(side: int, seed: int) -> bytes:
    from tests.test_images import _noise, encoded

    return encoded(_noise(side, side, seed=seed))


ZEROS = 64_000_000  # a bomb's inflated size: 64 times the 1 MB limit its tests set
BIG_PNG = _noise_png(600, seed=11)  # about 1 MB of noise, which PNG cannot compress


class _Served(http.server.BaseHTTPRequestHandler):
    """Bodies by path: bombs, a compressed image, a drip, a large image."""

    bodies: dict[str, tuple[bytes, str | None]] = {}
    accept_encodings: list[str] = []
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).accept_encodings.append(self.headers.get("Accept-Encoding", ""))
        if self.path == "/drip":
            return self._drip()
        body, coding = self.bodies[self.path]
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if coding:
            self.send_header("Content-Encoding", coding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass  # the worker hung up: it was refused

    def _drip(self):
        """200 bytes, one each 50 ms: each read answers in time, the whole takes 10 s."""
        self.send_response(200)
        self.send_header("Content-Length", "200")
        self.end_headers()
        try:
            for _ in range(200):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


@pytest.fixture(scope="module")
def local_server():
    import brotli

    zeros = bytes(ZEROS)
    _Served.bodies = {
        "/gzip-bomb": (_gzip(zeros), "gzip"),
        "/deflate-bomb": (zlib.compress(zeros), "deflate"),
        "/brotli-bomb": (brotli.compress(zeros, quality=5), "br"),
        "/gzip.png": (_gzip(PNG), "gzip"),
        "/deflate.png": (zlib.compress(PNG), "deflate"),
        "/cut-gzip.png": (_gzip(PNG)[:-20], "gzip"),
        "/twice.png": (_gzip(_gzip(PNG)), "gzip, gzip"),
        "/big.png": (BIG_PNG, None),
    }
    assert all(
        len(body) < 1_000_000 for path, (body, _) in _Served.bodies.items() if "bomb" in path
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Served)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def served(local_server, monkeypatch):
    monkeypatch.setattr(image_urls, "NETWORK", LocalNetwork(local_server))
    _Served.accept_encodings.clear()
    return lambda path: {"type": "image", "image": f"https://images.example.com{path}"}


def _limit(worker, monkeypatch, **limits):
    monkeypatch.setattr(worker, "limits", dataclasses.replace(worker.limits, **limits))


@contextlib.contextmanager
def peak_memory():
    """The peak of memory the Python and numpy allocators hold (where bodies and their copies
    live) above what they held at the start, in bytes, in `peak[0]` when the block ends."""
    peak = [0]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        yield peak
        peak[0] = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("path", ["/gzip-bomb", "/deflate-bomb"])
async def test_a_compression_bomb_inflates_no_further_than_the_byte_limit(
    url_worker, served, monkeypatch, path
):
    # Finding (issue 28): httpx inflated a 6.5 KB brotli body to 4 GiB before the byte check.
    _limit(url_worker, monkeypatch, max_image_bytes=1_000_000)
    with peak_memory() as peak:
        message = await refusal(url_worker, served(path))
    assert "item 1 is an image URL of more than 1000000 bytes (IMAGE_MAX_BYTES)" in message
    assert peak[0] < 8_000_000  # the body inflates to 64 MB
    assert _Served.accept_encodings == ["identity"]  # the server compressed it unasked
    assert url_worker.healthy


async def test_a_coding_other_than_gzip_or_deflate_is_refused_unread(url_worker, served):
    with peak_memory() as peak:
        message = await refusal(url_worker, served("/brotli-bomb"))
    assert "compressed in a way not decoded here" in message and peak[0] < 8_000_000
    # Codings stacked are refused alike: one inflation, one bound.
    assert "compressed in a way not decoded here" in await refusal(url_worker, served("/twice.png"))


async def test_an_image_compressed_unasked_is_inflated_and_embedded(url_worker, served):
    body = await answer(
        url_worker, input=[served("/gzip.png"), served("/deflate.png"), uri_of("png")]
    )
    vectors = decode_vectors(body)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    np.testing.assert_allclose(vectors[1], vectors[2], atol=1e-6)
    assert _Served.accept_encodings == ["identity", "identity"]
    assert "compressed answer is damaged" in await refusal(url_worker, served("/cut-gzip.png"))


async def test_a_body_that_drips_is_cut_at_the_whole_download_deadline(url_worker, served):
    # Every byte arrives within the 0.5 s IMAGE_URL_TIMEOUT of the one before; the whole would
    # take 10 s, and then be no image.
    message = await refusal(url_worker, served("/drip"))
    assert "did not answer within 0.5 s (IMAGE_URL_TIMEOUT)" in message
    assert url_worker.healthy


async def test_a_request_of_many_large_images_holds_a_bounded_number_of_bytes(
    url_worker, served, monkeypatch
):
    # Finding (issue 28): 400 copies of one 9.7 MB image were all held before any was decoded
    # (+4.1 GB). Here 40 copies of 1 MB, two at a time in flight: each is decoded as it arrives.
    copies = 40
    _limit(
        url_worker,
        monkeypatch,
        max_image_bytes=len(BIG_PNG) + 1,
        image_url_bytes_in_flight=2 * len(BIG_PNG) + 2,
    )
    with peak_memory() as peak:
        body = await answer(url_worker, input=[served("/big.png")] * copies)
    vectors = decode_vectors(body)
    assert len(vectors) == copies
    np.testing.assert_allclose(vectors, np.repeat(vectors[:1], copies, axis=0), atol=1e-6)
    # Measured: 7 MB (two bodies, their copies and decoding); all of them held, 40 to 80.
    assert peak[0] < 12 * len(BIG_PNG)


async def test_image_urls_are_charged_to_the_request_pixels_as_they_arrive(
    url_worker, network, monkeypatch
):
    from embedding_worker import images

    network()
    pixels = 40 * 30  # PNG's
    decoded = []
    real_decode = images.decode

    def counted(data, index, limits, budget=None):
        image = real_decode(data, index, limits, budget)
        decoded.append(index)
        return image

    monkeypatch.setattr(images, "decode", counted)
    url = {"type": "image", "image": "https://images.example.com/a.png"}
    _limit(url_worker, monkeypatch, max_request_image_pixels=3 * pixels)
    await answer(url_worker, input=[url, url, uri_of("png")])
    reply = await answer_job(url_worker, {"input": [url, url, url, url]})
    assert reply.status == 413 and reply.body["error"]["code"] == "request_too_large"
    assert "IMAGE_MAX_REQUEST_PIXELS" in reply.body["error"]["message"]
    assert len(decoded) == 3 + 3  # never the fourth
    # Data URIs are charged first, all of them, before any URL is fetched or image decoded.
    _limit(url_worker, monkeypatch, max_request_image_pixels=2 * pixels)
    decoded.clear()
    fetched = len(image_urls.NETWORK.seen)
    reply = await answer_job(
        url_worker, {"input": [url, uri_of("png"), uri_of("png"), uri_of("png")]}
    )
    assert reply.status == 413 and decoded == [] and len(image_urls.NETWORK.seen) == fetched
