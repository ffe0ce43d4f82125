"""Image URLs, fetched only from the hosts an operator allows, never from inside the network.

A worker that fetches URLs a client names is a server-side request forgery hole: the client could
make it reach the cloud's metadata service, the pod's neighbours or its own loopback. So:

- nothing is fetched unless IMAGE_URL_HOSTS lists the URL's host name (exactly, case aside);
- http and https only, on any port; no user name or password in the URL;
- the host's addresses are resolved here and every one is checked: a private, loopback,
  link-local, shared (100.64/10), reserved, multicast or unspecified address refuses the URL,
  whatever name led to it (IPv4-mapped IPv6 addresses are checked as the IPv4 address they hold);
- the connection goes to the address that was checked, with the host name in the Host header and
  the TLS server name (its certificate is verified against the name), so a second DNS answer
  cannot swap in another address (DNS rebinding);
- redirects are followed here, at most MAX_REDIRECTS, each new URL checked as the first was;
- the answer is read as a stream and abandoned past IMAGE_MAX_BYTES; the worker asks for no
  compression, inflates a gzip or deflate answer as a stream, keeping at most IMAGE_MAX_BYTES of it
  (a compression bomb never inflates past the limit), and refuses any other Content-Encoding;
- the whole fetch, redirects and body included, has IMAGE_URL_TIMEOUT seconds;
- a request holds at most IMAGE_URL_BYTES_IN_FLIGHT bytes of bodies at once (Fetcher), each image
  decoded as it arrives and its bytes given back, so many large images are never all held.

Every refusal is an invalid_input naming the item, never the URL (messages do not echo payloads).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import zlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urljoin, urlsplit

from . import errors
from .errors import APIError
from .limits import Limits

MAX_REDIRECTS = 3
SCHEMES = {"http": 80, "https": 443}
_REDIRECTS = {301, 302, 303, 307, 308}
_CONCURRENT_FETCHES = 8  # per request


class Network:
    """DNS and the connection: the one seam tests replace, since a test cannot reach a public
    address; every check above runs on what it gives, as in production."""

    async def resolve(self, host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [str(info[4][0]) for info in infos]

    def transport(self) -> Any:
        """The httpx transport a fetch connects through (None: httpx's own)."""
        return None


NETWORK = Network()


def _refused(index: int, reason: str) -> APIError:
    return errors.invalid_input(f"'input' item {index} {reason}", param="input")


def allowed_address(address: str) -> bool:
    """Whether an address is on the public internet."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone never reaches a public host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


async def _checked_target(url: str, index: int, limits: Limits) -> tuple[Any, str]:
    """The URL's parts and the address to connect to, after every check of the policy."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise _refused(index, "is an image URL that is not http or https")
    if parts.username is not None or parts.password is not None:
        raise _refused(index, "is an image URL with credentials in it")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host or host not in limits.image_url_hosts:
        raise _refused(index, "is an image URL whose host is not on IMAGE_URL_HOSTS")
    try:
        port = parts.port or SCHEMES[scheme]
    except ValueError:
        raise _refused(index, "is an image URL with an invalid port") from None
    try:
        addresses = await NETWORK.resolve(host, port)
    except (OSError, UnicodeError):
        raise _refused(index, "is an image URL whose host does not resolve") from None
    if not addresses:
        raise _refused(index, "is an image URL whose host does not resolve")
    if not all(allowed_address(address) for address in addresses):
        raise _refused(
            index,
            "is an image URL whose host resolves to a private, loopback, link-local or "
            "reserved address; such addresses are never fetched",
        )
    return parts, addresses[0]


def _request(client: Any, parts: Any, address: str) -> Any:
    """A GET to the checked address that names the host in its Host header and TLS."""
    scheme = parts.scheme.lower()
    host = parts.hostname.rstrip(".").lower()
    port = parts.port or SCHEMES[scheme]
    ip_host = f"[{address}]" if ":" in address else address
    default_port = port == SCHEMES[scheme]
    target = f"{scheme}://{ip_host}{'' if default_port else f':{port}'}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    headers = {
        "Host": host if default_port else f"{host}:{port}",
        "Accept": "image/*",
        "Accept-Encoding": "identity",  # images gain nothing from compression
    }
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    return client.build_request("GET", target + path, headers=headers, extensions=extensions)


async def _fetch_one(
    client: Any, url: str, index: int, limits: Limits, room: _Reservation
) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        parts, address = await _checked_target(url, index, limits)
        response = await client.send(_request(client, parts, address), stream=True)
        try:
            if response.status_code in _REDIRECTS:
                location = response.headers.get("location")
                if not location:
                    raise _refused(index, "is an image URL that redirects nowhere")
                url = urljoin(url, location)
                continue
            if response.status_code != 200:
                raise _refused(index, f"is an image URL that answered HTTP {response.status_code}")
            coding = _content_coding(response.headers, index)
            declared = response.headers.get("content-length", "")
            if declared.isdigit():
                if int(declared) > limits.max_image_bytes:
                    raise _too_large(index, limits)
                if coding is None:  # the body is the image: it needs no more room than it says
                    room.shrink(int(declared))
            body = _Body(index, limits, coding)
            # Raw: httpx would inflate a compressed body in full before handing any of it over.
            async for chunk in response.aiter_raw():
                await body.add(chunk)
            return body.finish()
        finally:
            await response.aclose()
    raise _refused(index, f"is an image URL that redirects more than {MAX_REDIRECTS} times")


def _too_large(index: int, limits: Limits) -> APIError:
    return _refused(
        index, f"is an image URL of more than {limits.max_image_bytes} bytes (IMAGE_MAX_BYTES)"
    )


# zlib's window bits for the codings a server may send although the worker asks for none: images
# gain nothing from them, but some servers compress whatever they serve.
_INFLATED = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Bytes inflated at a time, between which other requests run.
_INFLATE_STEP = 1 << 20


def _content_coding(headers: Any, index: int) -> str | None:
    """The answer's Content-Encoding: None for none, gzip or deflate; any other is refused
    (brotli and zstd included), before any of the body is read."""
    codings = [c.strip().lower() for c in headers.get_list("content-encoding", split_commas=True)]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _INFLATED:
        return codings[0]
    raise _refused(
        index,
        "is an image URL whose answer is compressed in a way not decoded here (a "
        "Content-Encoding other than gzip or deflate, which the worker did not ask for)",
    )


class _Body:
    """A body as it arrives, inflated as a stream where the server compressed it: the bytes kept
    stop at IMAGE_MAX_BYTES, so a compression bomb never inflates past the limit."""

    def __init__(self, index: int, limits: Limits, coding: str | None) -> None:
        self._index = index
        self._limits = limits
        self._limit = limits.max_image_bytes
        self._received = 0
        self.data = bytearray()
        self._inflate = zlib.decompressobj(_INFLATED[coding]) if coding else None

    async def add(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._received > self._limit:
            raise _too_large(self._index, self._limits)
        if self._inflate is None:
            self._keep(chunk)
            return
        pending = chunk
        while pending and not self._inflate.eof:
            # At most one byte past the limit, and a bounded step, however much the input holds.
            room = min(self._limit - len(self.data) + 1, _INFLATE_STEP)
            try:
                self._keep(self._inflate.decompress(pending, room))
            except zlib.error:
                raise self._damaged() from None
            pending = self._inflate.unconsumed_tail
            if pending:
                await asyncio.sleep(0)

    def _keep(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > self._limit:
            raise _too_large(self._index, self._limits)

    def _damaged(self) -> APIError:
        return _refused(self._index, "is an image URL whose compressed answer is damaged")

    def finish(self) -> bytes:
        if self._inflate is not None and not self._inflate.eof:
            raise self._damaged()  # cut short
        return bytes(self.data)


class _BytesInFlight:
    """The bytes of image URL bodies one request holds: room for a body is taken before its
    download starts, first come first served, and given back once its image is decoded; a
    download waits while the room is taken."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, amount: int) -> None:
        if not self._waiting and self.held + amount <= self.total:
            self.held += amount
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (amount, waiter)
        self._waiting.append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give(amount)  # granted as it was cancelled
            else:
                self._waiting.remove(entry)
                self._wake()
            raise

    def give(self, amount: int) -> None:
        self.held -= amount
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self.held + self._waiting[0][0] <= self.total:
            amount, waiter = self._waiting.popleft()
            if not waiter.done():
                self.held += amount
                waiter.set_result(None)


class _Reservation:
    """The room one download holds: a whole image's at first, less once the body declares its
    length."""

    def __init__(self, budget: _BytesInFlight, amount: int) -> None:
        self._budget = budget
        self.amount = amount

    def shrink(self, amount: int) -> None:
        if amount < self.amount:
            self._budget.give(self.amount - amount)
            self.amount = amount


class Fetcher:
    """One request's image URL downloads, under the policy above: one client, at most
    _CONCURRENT_FETCHES at once, and at most IMAGE_URL_BYTES_IN_FLIGHT bytes held at once, from
    the start of a download until its image is decoded, so a request of many large images never
    holds them all."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._gate = asyncio.Semaphore(_CONCURRENT_FETCHES)
        self._in_flight = _BytesInFlight(limits.image_url_bytes_in_flight)
        self._client: Any = None

    async def __aenter__(self) -> Fetcher:
        import httpx

        logging.getLogger("httpx").setLevel(logging.WARNING)  # its line per request holds the URL
        self._client = httpx.AsyncClient(
            transport=NETWORK.transport(),
            follow_redirects=False,
            trust_env=False,  # no proxy from the environment: the checked address is reached
            timeout=self._limits.image_url_timeout_s,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.aclose()

    @contextlib.asynccontextmanager
    async def fetched(self, index: int, url: str) -> AsyncIterator[bytes]:
        """The body of one (item index, URL), held against the request's bytes in flight until the
        block ends."""
        import httpx

        limits = self._limits
        room = _Reservation(self._in_flight, limits.max_image_bytes)
        await self._in_flight.take(room.amount)
        try:
            async with self._gate:
                timeout = limits.image_url_timeout_s
                try:
                    # The whole download, redirects and every byte of the body included.
                    async with asyncio.timeout(timeout):
                        body = await _fetch_one(self._client, url, index, limits, room)
                except TimeoutError:
                    raise _refused(
                        index,
                        f"is an image URL that did not answer within {timeout:g} s "
                        "(IMAGE_URL_TIMEOUT)",
                    ) from None
                except httpx.HTTPError as exc:
                    raise _refused(
                        index, f"is an image URL that could not be fetched ({type(exc).__name__})"
                    ) from None
            yield body
        finally:
            self._in_flight.give(room.amount)
