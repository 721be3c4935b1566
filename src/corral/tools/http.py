"""``http_fetch``: GET a web page, never one inside the service's own network by default.

Every address a host name resolves to is vetted (loopback, private, link-local — including
the cloud metadata address —, multicast, reserved and unspecified ones are refused unless
``http_allow`` names them), and the request then goes to the vetted address itself (with
the name in the Host header and TLS SNI), so a DNS answer cannot change between the check
and the connection. Redirects are followed by hand, each hop vetted the same way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field

from corral.errors import ToolError
from corral.tools.base import Tool, ToolContext
from corral.tools.config import ToolSettings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class FetchArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=8192, description="an http or https URL")


def is_public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return is_public(address.ipv4_mapped)
    return not (address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
                or address.is_reserved or address.is_unspecified)


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


async def vetted_address(host: str, port: int, allowance: Allowance) -> Address:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ToolError(f"cannot resolve {host}: {exc.strerror}") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for address in addresses:
        if not is_public(address) and not allowance.permits(host, address):
            raise ToolError(f"refusing to fetch {host}: it resolves to {address}, which is not a public address "
                            "(allow it with tools.http_allow)")
    return addresses[0]


def http_fetch_tool(settings: ToolSettings) -> Tool:
    allowance = Allowance(settings.http_allow)

    async def fetch(args: FetchArgs, context: ToolContext) -> str:
        url = args.url
        try:
            async with asyncio.timeout(settings.http_timeout_s), httpx.AsyncClient(follow_redirects=False) as client:
                for _ in range(settings.http_max_redirects + 1):
                    response_text, location = await _one_hop(client, url, allowance, settings.http_max_bytes)
                    if location is None:
                        return response_text
                    url = urljoin(url, location)
                raise ToolError(f"more than {settings.http_max_redirects} redirects")
        except TimeoutError:
            raise ToolError(f"{args.url} did not answer within {settings.http_timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise ToolError(f"fetching {url} failed: {type(exc).__name__}: {exc}") from None

    return Tool("http_fetch", "GET an http(s) URL and return its status and text.", FetchArgs, fetch)


async def _one_hop(client: httpx.AsyncClient, url: str, allowance: Allowance, limit: int) -> tuple[str, str | None]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ToolError(f"only http and https URLs can be fetched, not {url!r}")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = await vetted_address(host, port, allowance)
    literal = f"[{address}]" if address.version == 6 else str(address)
    direct = urlunsplit((parts.scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))
    headers = {"host": parts.netloc.rsplit("@", 1)[-1], "user-agent": "corral-http-fetch"}
    async with client.stream("GET", direct, headers=headers, extensions={"sni_hostname": host}) as response:
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
