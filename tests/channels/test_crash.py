"""kill -9 of a real ``corral serve`` while replies wait in the outbox: after a restart on the same
data directory every reply arrives exactly once (tests/helpers/processes.py, the fake Bot API)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx

from tests.fakes import serve
from tests.fakes.telegram import TOKEN, FakeTelegram
from tests.helpers import corral_serve

CHATS = 6


def config(path: Path, base: str) -> Path:
    path.write_text(f"""
[[channels]]
name = "tg"
kind = "telegram"
token_env = "TEST_TG_TOKEN"
base_url = "{base}/bot"
allow = ["*"]
mode = "queue"
poll_timeout_s = 5
""")
    return path


async def test_kill_9_with_replies_in_the_outbox_then_every_reply_arrives_exactly_once(tmp_path: Path) -> None:
    fake = FakeTelegram()
    async with asyncio.timeout(90), serve(fake, close=fake.close) as base:
        env = {"CORRAL_CONFIG": str(config(tmp_path / "corral.toml", base)), "TEST_TG_TOKEN": TOKEN}
        data = tmp_path / "data"
        async with corral_serve(data, **env) as server:
            async with httpx.AsyncClient(base_url=server.base, timeout=10) as http:
                # Chat 0 is answered before the crash; then the platform holds every send back.
                fake.push_text(100, 7, "before")
                await fake.wait_for(lambda: fake.texts(100) == ["echo: before"])
                fake.fail("sendMessage", 429, retry_after=600, times=10_000)
                for chat in range(CHATS):
                    fake.push_text(chat, 7, f"first {chat}")
                    fake.push_text(chat, 7, f"second {chat}")
                expected_runs = 1 + 2 * CHATS

                async def queued() -> bool:
                    view = (await http.get("/v1/channels/tg")).json()
                    runs = (await http.get("/v1/runs", params={"status": "completed"})).json()["runs"]
                    return (len(runs) == expected_runs and view["replies_in_progress"] == 0
                            and view["outbox"]["depth"] >= 2 * CHATS)

                # Every reply is written to the outbox (a send, and its finishing edit), none sent.
                await fake.wait_for(lambda: fake.count("sendMessage") > CHATS)
                while not await queued():  # noqa: ASYNC110 - another process's state, read over HTTP
                    await asyncio.sleep(0.05)
            server.proc.send_signal(signal.SIGKILL)
            await server.proc.wait()
        assert all(fake.texts(chat) == [] for chat in range(CHATS))
        fake.failures.clear()
        async with corral_serve(data, **env):
            await fake.wait_for(lambda: all(len(fake.texts(chat)) == 2 for chat in range(CHATS)))
            for chat in range(CHATS):
                assert fake.texts(chat) == [f"echo: first {chat}", f"echo: second {chat}"]
            assert fake.texts(100) == ["echo: before"]
            # Exactly once: one accepted sendMessage per reply, before and after the crash.
            accepted = [m for chat in fake.messages.values() for m in chat]
            assert len(accepted) == 1 + 2 * CHATS
            assert fake.violations == []
