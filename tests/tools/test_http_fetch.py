"""``http_fetch``: private addresses refused unless allowed, limits, redirects vetted hop by hop."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from corral.errors import ToolError
from corral.tools import ToolContext, ToolSettings
from corral.tools.http import http_fetch_tool, is_public

LIMIT = 15


@asynccontextmanager
async def server(replies: dict[str, bytes], seen: list[bytes] | None = None) -> AsyncIterator[int]:
    """A raw HTTP server on loopback: path → whole response; unknown paths never answer.

    Each request's head is appended to ``seen``.
    """

    open_writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_writers.append(writer)
        request = await reader.readuntil(b"\r\n\r\n")
        if seen is not None:
            seen.append(request)
        path = request.split(b" ")[1].decode()
        reply = replies.get(path)
        if reply is None:
            await reader.read()  # hang until the client gives up
        else:
            writer.write(reply)
            await writer.drain()
        writer.close()

    listening = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield listening.sockets[0].getsockname()[1]
    finally:
        listening.close()
        for writer in open_writers:
            writer.close()
        await listening.wait_closed()


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def ctx(tmp_path: Path) -> ToolContext:
    return ToolContext("run_t", "ses_t", "agent", tmp_path)


def test_the_address_classifier() -> None:
    for refused in ("10.0.0.1", "192.168.1.1", "172.16.0.1", "169.254.169.254", "127.0.0.1", "::1", "fc00::1",
                    "fe80::1", "0.0.0.0", "224.0.0.1", "::ffff:127.0.0.1", "ff02::1",
                    "100.100.100.200",  # shared address space (CGNAT); a cloud metadata service lives here
                    "2002:a9fe:a9fe::1"):  # 6to4 wrapping 169.254.169.254
        assert not is_public(ipaddress.ip_address(refused)), refused
    for allowed in ("93.184.216.34", "::ffff:93.184.216.34", "2606:4700::1"):
        assert is_public(ipaddress.ip_address(allowed)), allowed


async def test_loopback_is_refused_by_default_and_allowed_when_configured(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), server({"/hello": ok(b"hi there")}) as port:
        url = f"http://127.0.0.1:{port}/hello"
        with pytest.raises(ToolError, match="not a public address"):
            await http_fetch_tool(ToolSettings()).call({"url": url}, ctx(tmp_path))
        allowed = http_fetch_tool(ToolSettings(http_allow=["127.0.0.0/8"]))
        assert await allowed.call({"url": url}, ctx(tmp_path)) == \
            "HTTP 200, content-type text/plain\n\nhi there"
        by_name = http_fetch_tool(ToolSettings(http_allow=["localhost"]))
        assert (await by_name.call({"url": f"http://localhost:{port}/hello"}, ctx(tmp_path))).endswith("hi there")


async def test_size_cap_timeout_and_schemes(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), server({"/big": ok(b"z" * 5000)}) as port:
        tool = http_fetch_tool(ToolSettings(http_allow=["127.0.0.1"], http_max_bytes=1024, http_timeout_s=0.5))
        big = await tool.call({"url": f"http://127.0.0.1:{port}/big"}, ctx(tmp_path))
        assert big.endswith("z" * 1024 + "\n[... cut at 1024 bytes]")
        with pytest.raises(ToolError, match="did not answer within 0.5 s"):
            await tool.call({"url": f"http://127.0.0.1:{port}/never"}, ctx(tmp_path))
        for url in ("file:///etc/passwd", "ftp://example.com/x", "gopher://x"):
            with pytest.raises(ToolError, match="only http and https"):
                await tool.call({"url": url}, ctx(tmp_path))


async def test_a_redirect_to_a_forbidden_address_is_refused(tmp_path: Path) -> None:
    to_metadata = b"HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/latest/\r\ncontent-length: 0\r\n\r\n"
    async with asyncio.timeout(LIMIT), server({"/go": to_metadata}) as port:
        tool = http_fetch_tool(ToolSettings(http_allow=["127.0.0.1"]))
        with pytest.raises(ToolError, match="169.254.169.254"):
            await tool.call({"url": f"http://127.0.0.1:{port}/go"}, ctx(tmp_path))


def redirect(location: str) -> bytes:
    return b"HTTP/1.1 302 Found\r\nlocation: %s\r\ncontent-length: 0\r\n\r\n" % location.encode()


async def test_the_request_goes_to_the_vetted_address_with_the_name_in_host(tmp_path: Path) -> None:
    seen: list[bytes] = []
    async with asyncio.timeout(LIMIT), server({"/a": redirect("/b"), "/b": ok(b"landed")}, seen) as port:
        tool = http_fetch_tool(ToolSettings(http_allow=["localhost"]))
        assert (await tool.call({"url": f"http://localhost:{port}/a"}, ctx(tmp_path))).endswith("landed")
        assert [head.split(b"\r\n")[0] for head in seen] == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1"]
        assert all(f"host: localhost:{port}".encode() in head.lower() for head in seen)


async def test_redirect_limits_schemes_and_bad_urls(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), server({"/loop": redirect("/loop"), "/file": redirect("file:///etc/passwd")}) \
            as port:
        tool = http_fetch_tool(ToolSettings(http_allow=["127.0.0.1"], http_max_redirects=2))
        with pytest.raises(ToolError, match="more than 2 redirects"):
            await tool.call({"url": f"http://127.0.0.1:{port}/loop"}, ctx(tmp_path))
        with pytest.raises(ToolError, match="only http and https"):
            await tool.call({"url": f"http://127.0.0.1:{port}/file"}, ctx(tmp_path))
        with pytest.raises(ToolError, match="bad port"):
            await tool.call({"url": "http://127.0.0.1:99999/"}, ctx(tmp_path))
