"""Chat channels: 200 Telegram chats on the fake Bot API (tests/fakes/telegram.py), 5 messages each.

A real `corral serve` with one Telegram channel (Telegram's own limits: one message or edit a
second per chat, 30 a second in all) talks to the fake Bot API, which runs in this process and
counts every limit broken. Each chat behaves like a person: it writes, waits for the whole
answer, thinks for a while (uniform `think_s`), writes again; the chats start spread over one
think time. The agent is the demo model streaming its echo word by word (`token_ms`), so an
answer appears as a message and grows by edits. Measured per message: from the update being
offered to the bot to its answer's first text in the chat (the first sendMessage), and to the
whole answer; the limits broken; answers lost (never complete) or duplicated (a chat holding
more bot messages than answers); the server's CPU time per message.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fakes import serve as serve_fake
from tests.fakes.telegram import TOKEN, FakeTelegram

from bench.report import Row
from bench.server import serve
from bench.stats import summary

FIRST_TEXT_TARGET_MS = 1200.0


@dataclass(frozen=True)
class Plan:
    chats: int = 200
    messages: int = 5
    think_s: tuple[float, float] = (10.0, 20.0)
    words: int = 12  # of each message, echoed back word by word
    token_ms: int = 40
    answer_within_s: float = 120.0


QUICK = Plan(chats=40, messages=3, think_s=(3.0, 6.0))


def _config(path: Path, base: str, plan: Plan) -> Path:
    path.write_text(f"""
[[agents]]
name = "bench"
provider = "demo"
provider_options = {{ token_ms = {plan.token_ms} }}

[[channels]]
name = "tg"
kind = "telegram"
agent = "bench"
token_env = "BENCH_TG_TOKEN"
base_url = "{base}/bot"
allow = ["*"]
mode = "queue"
""")
    return path


async def run(plan: Plan = Plan()) -> dict[str, Any]:
    fake = FakeTelegram()
    rng = random.Random(15)
    first_text: list[float] = []
    whole: list[float] = []
    lost = 0
    async with serve_fake(fake, close=fake.close) as base:
        with tempfile.TemporaryDirectory(prefix="corral-bench-channels-") as tmp:
            config = _config(Path(tmp) / "corral.toml", base, plan)
            env = {"CORRAL_CONFIG": str(config), "BENCH_TG_TOKEN": TOKEN}
            async with serve(Path(tmp) / "data", env) as server:
                await _until_polling(fake)
                loop = asyncio.get_running_loop()

                async def chat(chat_id: int) -> None:
                    nonlocal lost
                    await asyncio.sleep(rng.uniform(0, plan.think_s[1]))
                    for turn in range(plan.messages):
                        text = " ".join(f"c{chat_id}t{turn}w{i}" for i in range(plan.words))
                        answer = f"echo: {text}"
                        before = len(fake.bot_messages(chat_id))
                        began = loop.time()
                        fake.push_text(chat_id, chat_id, text)
                        try:
                            async with asyncio.timeout(plan.answer_within_s):
                                await fake.wait_for(lambda n=before: len(fake.bot_messages(chat_id)) > n)
                                first_text.append(loop.time() - began)
                                await fake.wait_for(lambda n=before, a=answer: fake.bot_messages(chat_id)[n].text == a)
                                whole.append(loop.time() - began)
                        except TimeoutError:
                            lost += 1
                        await asyncio.sleep(rng.uniform(*plan.think_s))

                cpu_before = server.cpu_seconds()
                began = loop.time()
                async with asyncio.TaskGroup() as group:
                    for chat_id in range(1, plan.chats + 1):
                        group.create_task(chat(chat_id))
                seconds = loop.time() - began
                cpu = server.cpu_seconds() - cpu_before
    sent = plan.chats * plan.messages
    duplicated = sum(max(0, len(fake.bot_messages(c)) - plan.messages) for c in range(1, plan.chats + 1))
    counted = [c for c in fake.calls if c.method in ("sendMessage", "editMessageText")]
    return {"plan": {"chats": plan.chats, "messages": plan.messages, "think_s": list(plan.think_s),
                     "words": plan.words, "token_ms": plan.token_ms},
            "messages": sent, "seconds": seconds, "first_text": summary(first_text), "whole": summary(whole),
            "violations": len(fake.violations), "violation_examples": fake.violations[:5], "lost": lost,
            "duplicated": duplicated, "sends": fake.count("sendMessage"), "edits": fake.count("editMessageText"),
            "calls_per_s": len(counted) / seconds if seconds else 0.0,
            "cpu_ms_per_message": cpu / sent * 1000, "cpus": os.cpu_count()}


async def _until_polling(fake: FakeTelegram) -> None:
    """Until the channel's first getUpdates (the channel has started)."""
    async with asyncio.timeout(30):
        await fake.wait_for(lambda: fake.webhook is None and any(c.method == "deleteWebhook" for c in fake.calls))


def rows(results: dict[str, Any]) -> list[Row]:
    plan, first, whole = results["plan"], results["first_text"], results["whole"]
    label = f"channels: {plan['chats']} Telegram chats x {plan['messages']} messages (fake Bot API)"
    return [
        Row(f"{label}: message in to the answer's first text",
            f"p50 {first['p50_ms']:.0f} ms, p99 {first['p99_ms']:.0f} ms, max {first['max_ms']:.0f} ms",
            f"p50 <= {FIRST_TEXT_TARGET_MS:.0f} ms", first["p50_ms"] <= FIRST_TEXT_TARGET_MS),
        Row(f"{label}: message in to the whole answer (streamed over ~{plan['words'] * plan['token_ms']} ms)",
            f"p50 {whole['p50_ms']:.0f} ms, p99 {whole['p99_ms']:.0f} ms"),
        Row(f"{label}: Telegram limits broken (1/s per chat, 30/s in all)",
            f"{results['violations']} ({results['sends']} sends, {results['edits']} edits, "
            f"{results['calls_per_s']:.1f} calls/s)", "0", results["violations"] == 0),
        Row(f"{label}: answers lost / duplicated", f"{results['lost']} / {results['duplicated']}", "0 / 0",
            results["lost"] == 0 and results["duplicated"] == 0),
        Row(f"{label}: server CPU per message", f"{results['cpu_ms_per_message']:.1f} ms"),
    ]
