"""Small typed helpers over Corral's HTTP API, shared by the scenarios."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp


async def create_agent(http: aiohttp.ClientSession, base: str, name: str, *, ready: bool = True,
                       **provider_options: Any) -> dict[str, Any]:
    """A demo-model agent; waits until it is ready unless ``ready`` is False."""
    body = {"name": name, "provider": "demo", "provider_options": provider_options}
    async with http.post(f"{base}/v1/agents", json=body) as response:
        agent: dict[str, Any] = await response.json()
        if response.status != 201:
            raise RuntimeError(f"POST /v1/agents: {response.status} {agent}")
    deadline = time.monotonic() + 30
    while ready and agent["state"] != "ready":
        if agent["state"] == "failed" or time.monotonic() > deadline:
            raise RuntimeError(f"agent {name} did not start: {agent}")
        await asyncio.sleep(0.02)
        async with http.get(f"{base}/v1/agents/{name}") as response:
            agent = await response.json()
    return agent


async def create_session(http: aiohttp.ClientSession, base: str, agent: str = "assistant") -> str:
    async with http.post(f"{base}/v1/sessions", json={"agent": agent}) as response:
        body = await response.json()
        if response.status != 201:
            raise RuntimeError(f"POST /v1/sessions: {response.status} {body}")
    return str(body["id"])


async def send(http: aiohttp.ClientSession, base: str, session_id: str, content: str) -> dict[str, Any]:
    """POST a message; returns the 202 body (input_id, run_id, disposition)."""
    async with http.post(f"{base}/v1/sessions/{session_id}/messages", json={"content": content}) as response:
        body: dict[str, Any] = await response.json()
        if response.status != 202:
            raise RuntimeError(f"POST messages: {response.status} {body}")
    return body


async def runs(http: aiohttp.ClientSession, base: str, *, session_id: str | None = None,
               statuses: tuple[str, ...] = (), limit: int = 1000) -> list[dict[str, Any]]:
    """Every run matching the filters, following the pages."""
    found: list[dict[str, Any]] = []
    while True:
        params: list[tuple[str, str]] = [("limit", str(limit)), ("offset", str(len(found)))]
        params += [("status", status) for status in statuses]
        if session_id:
            params.append(("session_id", session_id))
        async with http.get(f"{base}/v1/runs", params=params) as response:
            page = (await response.json())["runs"]
        found += page
        if len(page) < limit:
            return found


async def cancel(http: aiohttp.ClientSession, base: str, run_id: str, mode: str = "hard") -> None:
    async with http.post(f"{base}/v1/runs/{run_id}/cancel", json={"mode": mode}) as response:
        await response.read()


async def until(check: Callable[[], Awaitable[bool]], *, every: float = 0.1, within: float = 120.0,
                what: str = "the condition") -> None:
    """Poll ``check`` until it holds. State held by the server (or another process) has no
    event to await here, so polling at a known interval is the honest way to wait for it."""
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not hold within {within:g} s")
        await asyncio.sleep(every)
