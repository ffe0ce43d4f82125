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
- the answer is read as a stream and abandoned past IMAGE_MAX_BYTES; the whole fetch, redirects
  included, has IMAGE_URL_TIMEOUT seconds.

Every refusal is an invalid_input naming the item, never the URL (messages do not echo payloads).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Sequence
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
    headers = {"Host": host if default_port else f"{host}:{port}", "Accept": "image/*"}
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    return client.build_request("GET", target + path, headers=headers, extensions=extensions)


async def _fetch_one(client: Any, url: str, index: int, limits: Limits) -> bytes:
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
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limits.max_image_bytes:
                raise _too_large(index, limits)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limits.max_image_bytes:
                    raise _too_large(index, limits)
            return bytes(body)
        finally:
            await response.aclose()
    raise _refused(index, f"is an image URL that redirects more than {MAX_REDIRECTS} times")


def _too_large(index: int, limits: Limits) -> APIError:
    return _refused(
        index, f"is an image URL of more than {limits.max_image_bytes} bytes (IMAGE_MAX_BYTES)"
    )


async def fetch_all(urls: Sequence[tuple[int, str]], limits: Limits) -> list[bytes]:
    """The bytes of each (item index, URL), fetched under the policy above, in order."""
    import httpx

    if not urls:
        return []
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its line per request holds the URL
    timeout = limits.image_url_timeout_s
    gate = asyncio.Semaphore(_CONCURRENT_FETCHES)
    async with httpx.AsyncClient(
        transport=NETWORK.transport(),
        follow_redirects=False,
        trust_env=False,  # no proxy from the environment: the address checked is the one reached
        timeout=timeout,
    ) as client:

        async def fetch(index: int, url: str) -> bytes:
            async with gate:
                try:
                    async with asyncio.timeout(timeout):
                        return await _fetch_one(client, url, index, limits)
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

        if len(urls) == 1:
            return [await fetch(*urls[0])]
        # The first refusal cancels the other fetches, before the client closes under them.
        try:
            async with asyncio.TaskGroup() as group:
                fetches = [group.create_task(fetch(index, url)) for index, url in urls]
        except* APIError as refused:
            raise refused.exceptions[0] from None
        return [done.result() for done in fetches]
