"""``http_fetch``: GET a web page, never one inside the service's own network by default.

Every address a host name resolves to is vetted (loopback, private, link-local — including
the cloud metadata address —, multicast, reserved and unspecified ones are refused unless
``http_allow`` names them), and the request then goes to the vetted address itself (with
the name in the Host header and TLS SNI), so a DNS answer cannot change between the check
and the connection. Redirects are followed by hand, each hop vetted the same way.

httpx (with what it imports) takes a tenth of a second or more to load, which every start
of the service would pay for a tool most agents never call: it is loaded at the first fetch
instead, in a worker thread, so that neither the start nor the event loop waits for it.
"""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import socket
import sys
from urllib.parse import urljoin, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import ToolError
from corral.tools.base import Tool, ToolContext
from corral.tools.config import ToolSettings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
REDIRECTS = frozenset({301, 302, 303, 307, 308})
CONNECT_TIMEOUT_S = 5.0


class FetchArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=8192, description="an http or https URL")


def is_public(address: Address) -> bool:
    """True for an address on the public internet; False for everything ``http_fetch`` refuses.

    ``is_global`` alone would let some through: it calls multicast global, and an IPv6
    address can carry an IPv4 one (mapped, 6to4, Teredo) that is what the packets reach.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # the packets go to the IPv4 address
            return is_public(address.ipv4_mapped)
        embedded = address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None and not is_public(embedded):
            return False
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_unspecified
                                      or address.is_loopback or address.is_link_local)


class Allowance:
    """``http_allow``: host names, addresses and networks that may be fetched although not public."""

    def __init__(self, entries: list[str]):
        self.hosts = {e.lower() for e in entries if not _network(e)}
        self.networks = [n for e in entries if (n := _network(e)) is not None]

    def permits(self, host: str, address: Address) -> bool:
        return host.lower() in self.hosts or any(address in network for network in self.networks)


def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


async def vetted_addresses(host: str, port: int, allowance: Allowance) -> list[Address]:
    """Every address ``host`` resolves to, in resolver order, or a ToolError if any is refused.

    One bad address refuses them all: a name that mixes a public and a private address is
    how a rebinding attack would look.
    """
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ToolError(f"cannot resolve {host}: {exc.strerror}") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    for address in addresses:
        if not is_public(address) and not allowance.permits(host, address):
            raise ToolError(f"refusing to fetch {host}: it resolves to {address}, which is not a public address "
                            "(allow it with tools.http_allow)")
    return addresses


async def _load_httpx() -> None:
    """Import httpx off the event loop, the first time; after it, ``import httpx`` is a lookup."""
    if "httpx" not in sys.modules:
        await asyncio.to_thread(importlib.import_module, "httpx")


def http_fetch_tool(settings: ToolSettings) -> Tool:
    allowance = Allowance(settings.http_allow)

    async def fetch(args: FetchArgs, context: ToolContext) -> str:
        await _load_httpx()
        import httpx

        url = args.url
        try:
            async with asyncio.timeout(settings.http_timeout_s):
                for _ in range(settings.http_max_redirects + 1):
                    response_text, location = await _one_hop(url, allowance, settings.http_max_bytes)
                    if location is None:
                        return response_text
                    url = urljoin(url, location)
                raise ToolError(f"more than {settings.http_max_redirects} redirects")
        except TimeoutError:
            raise ToolError(f"{args.url} did not answer within {settings.http_timeout_s:g} s") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ToolError(f"fetching {url} failed: {type(exc).__name__}: {exc}") from None

    return Tool("http_fetch", "GET an http(s) URL and return its status, content type and text.", FetchArgs, fetch)


async def _one_hop(url: str, allowance: Allowance, limit: int) -> tuple[str, str | None]:
    """One request: the response as the model reads it, or the Location of a redirect."""
    import httpx  # loaded by fetch()

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ToolError(f"only http and https URLs can be fetched, not {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ToolError(f"bad port in {url!r}") from None
    host = parts.hostname
    headers = {"host": parts.netloc.rsplit("@", 1)[-1], "user-agent": "corral-http-fetch"}
    addresses = await vetted_addresses(host, port, allowance)
    for index, address in enumerate(addresses):
        literal = f"[{address}]" if address.version == 6 else str(address)
        direct = urlunsplit((parts.scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))
        try:
            return await _request(direct, host, headers, limit)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            if index == len(addresses) - 1:  # like any client, try the next address when one is unreachable
                raise
    raise AssertionError("getaddrinfo returned no address")


async def _request(direct: str, host: str, headers: dict[str, str], limit: int) -> tuple[str, str | None]:
    # A client per request: a pooled connection opened for one host name is never reused for
    # another. trust_env=False: no proxy from the server's environment, no ~/.netrc credentials.
    # The call's own deadline bounds the whole; the connect timeout only gives up on a silent address early.
    import httpx  # loaded by fetch()

    timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)
    async with (
        httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=timeout) as client,
        client.stream("GET", direct, headers=headers, extensions={"sni_hostname": host}) as response,
    ):
        if response.status_code in REDIRECTS and "location" in response.headers:
            return "", response.headers["location"]
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > limit:
                break
    kind = response.headers.get("content-type", "unknown")
    text = bytes(body[:limit]).decode(response.encoding or "utf-8", errors="replace")
    cut = f"\n[... cut at {limit} bytes]" if len(body) > limit else ""
    return f"HTTP {response.status_code}, content-type {kind}\n\n{text}{cut}", None
