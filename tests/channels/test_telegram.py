"""A Telegram channel against the fake Bot API (tests/fakes/telegram.py), through a real server.

Each test waits on what the fake saw (``wait_for``: checked after every call it answers), the
channel's state (``wait_state``) or the kernel's events; never on time.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from corral.channels import State
from corral.channels.reply import parse_button
from corral.specs import AgentPolicy, AgentSpec
from corral.types import Approval
from tests.channels.conftest import service, telegram_spec
from tests.fakes import serve
from tests.fakes.telegram import TOKEN, FakeTelegram
from tests.helpers import select_all, wait_run

LIMIT = 30
SLOW = AgentSpec(name="slow", provider="demo", provider_options={"token_ms": 60})
GATED = AgentSpec(name="gated", policy=AgentPolicy(approvals={"wait": Approval.ASK}))


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


async def test_a_message_streams_back_by_edits_no_faster_than_once_a_second(
        tmp_path: Path, token_env: str) -> None:
    fake = FakeTelegram()  # Telegram's own limits: 1 s per chat, 30/s in all
    async with asyncio.timeout(LIMIT), serve(fake, close=fake.close) as base:
        spec = telegram_spec("tg", f"{base}/bot", agent="slow", chat_interval_s=None, edit_interval_s=None)
        async with service(tmp_path, [spec], [SLOW]) as (http, kernel, channels):
            await channels.get("tg").wait_running()
            text = words(40)  # 40 words at 60 ms: ~2.4 s of streaming
            fake.push_text(1, 7, text)
            await fake.wait_for(lambda: fake.texts(1) == [f"echo: {text}"])
            [message] = fake.bot_messages(1)
            assert len(message.edits) >= 2, message.edits  # it grew in place, by edits
            assert all(f"echo: {text}".startswith(edit.removesuffix("")) for edit in message.edits)
            calls = [c.at for c in fake.calls if c.chat_id == "1" and c.method in ("sendMessage", "editMessageText")]
            assert all(b - a >= 1.0 for a, b in zip(calls, calls[1:], strict=False)), calls
            assert fake.violations == []
            assert "1" in fake.typing  # a typing indicator while the run worked


async def test_two_chats_at_once_get_their_own_answers_and_sessions(
        tmp_path: Path, token_env: str, fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    async with asyncio.timeout(LIMIT), service(tmp_path, [telegram_spec("tg", base)]) as (http, kernel, channels):
        await channels.get("tg").wait_running()
        fake.push_text(1, 7, "first chat")
        fake.push_text(2, 8, "second chat")
        await fake.wait_for(lambda: fake.texts(1) == ["echo: first chat"] and fake.texts(2) == ["echo: second chat"])
        sessions = (await http.get("/v1/sessions")).json()
        assert sorted(s["key"] for s in sessions) == ["channel:tg:1", "channel:tg:2"]
        assert {s["owner"] for s in sessions} == {"channel.tg"}
        view = (await http.get("/v1/channels")).json()["channels"][0]
        assert view["chats"] == 2 and view["messages_in"] == 2 and view["state"] == "running"


async def test_a_long_answer_is_split_at_the_limit_and_never_inside_a_code_fence(
        tmp_path: Path, token_env: str, fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    code = "```python\n" + "\n".join(f"print({i})  # a line of code" for i in range(120)) + "\n```"
    prose = "\n\n".join(f"Paragraph {i}. " + "Some words here. " * 12 for i in range(25))
    text = prose + "\n\n" + code + "\n\nThe end."
    async with asyncio.timeout(LIMIT), service(tmp_path, [telegram_spec("tg", base)]) as (http, kernel, channels):
        await channels.get("tg").wait_running()
        fake.push_text(1, 7, text)
        expected = f"echo: {text}"
        await fake.wait_for(lambda: "".join(fake.texts(1)).endswith("The end.") and len(fake.texts(1)) >= 3)
        chunks = fake.texts(1)
        assert all(len(chunk) <= 4096 for chunk in chunks)
        for chunk in chunks:
            assert len(re.findall(r"^```", chunk, re.MULTILINE)) % 2 == 0, chunk[-200:]  # every fence closed
        # Nothing lost: the chunks hold the whole answer (fences closed and reopened aside).
        rebuilt = re.sub(r"\n```\n*```python\n", "\n", "\n\n".join(chunks))
        assert re.sub(r"\s+", " ", rebuilt) == re.sub(r"\s+", " ", expected)
        # Cut at paragraphs while there were some, not mid-sentence.
        assert chunks[0].endswith(".")


async def test_steer_mid_run_and_stop_soft_then_hard(
        tmp_path: Path, token_env: str, fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    async with asyncio.timeout(LIMIT), service(tmp_path, [telegram_spec("tg", base)]) as (http, kernel, channels):
        await channels.get("tg").wait_running()
        # Steer (the default mode): a message while the run works is seen by it.
        fake.push_text(1, 7, "/steps 4 300")
        await fake.wait_for(lambda: "1" in fake.typing)
        fake.push_text(1, 7, "also this")
        await fake.wait_for(lambda: any("steering seen" in t for t in fake.texts(1)))
        assert fake.texts(1) == ['done 4 steps; steering seen: ["also this"]']
        # /stop: soft, then hard.
        fake.push_text(1, 7, "/steps 50 200")
        await fake.wait_for(lambda: fake.typing.count("1") >= 2)
        fake.push_text(1, 7, "/stop")
        await fake.wait_for(lambda: any(t.startswith("Stopping") for t in fake.texts(1)))
        await fake.wait_for(lambda: any(t.endswith("⏹ stopped") for t in fake.texts(1)))
        runs = (await http.get("/v1/runs", params={"status": "cancelled"})).json()["runs"]
        assert len(runs) == 1
        fake.push_text(1, 7, "/stop")
        await fake.wait_for(lambda: fake.texts(1)[-1] == "Nothing is running.")


async def test_stop_twice_is_a_hard_stop(
        tmp_path: Path, token_env: str, fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    async with asyncio.timeout(LIMIT), service(tmp_path, [telegram_spec("tg", base)]) as (http, kernel, channels):
        await channels.get("tg").wait_running()
        fake.push_text(1, 7, "/sleep 30")  # a model call a soft stop waits for (it checks between tokens)
        await fake.wait_for(lambda: "1" in fake.typing)
        fake.push_text(1, 7, "/stop")
        await fake.wait_for(lambda: any(t.startswith("Stopping") for t in fake.texts(1)))
        fake.push_text(1, 7, "/stop")
        await fake.wait_for(lambda: "Stopped." in fake.texts(1))
        [run] = (await http.get("/v1/runs")).json()["runs"]
        await wait_run(kernel, run["id"])
        assert (await http.get(f"/v1/runs/{run['id']}")).json()["status"] == "cancelled"


async def test_an_approval_by_button(
        tmp_path: Path, token_env: str, fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    spec = telegram_spec("tg", base, agent="gated")
    async with asyncio.timeout(LIMIT), service(tmp_path, [spec], [GATED]) as (http, kernel, channels):
        await channels.get("tg").wait_running()
        fake.push_text(1, 7, '/tool wait {"ms": 1}')
        await fake.wait_for(lambda: any(m.buttons for m in fake.bot_messages(1)))
        [question] = [m for m in fake.bot_messages(1) if m.buttons]
        assert question.text.startswith("Allow wait(")
        [(approve, data), (deny, _)] = question.buttons
        assert (approve, deny) == ("Approve", "Deny") and parse_button(data) is not None and len(data) <= 64
        fake.push_press(1, 7, question, data)
        await fake.wait_for(lambda: any(t.startswith("tool results:") for t in fake.texts(1)))
        assert question.text.endswith("— approved") and not question.buttons  # edited, buttons gone
        assert fake.answered and fake.answered[0]["text"] == "Approved."
        # A second press of the same button decides nothing.
        fake.push_press(1, 7, question, data)
        await fake.wait_for(lambda: len(fake.answered) == 2)
        assert fake.answered[1]["text"] == "Already decided."


async def test_a_user_not_allowed_is_refused_and_nothing_runs(
        tmp_path: Path, token_env: str, fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    spec = telegram_spec("tg", base, allow=["7"])
    async with asyncio.timeout(LIMIT), service(tmp_path, [spec]) as (http, kernel, channels):
        await channels.get("tg").wait_running()
        fake.push_text(5, 8, "let me in")
        await fake.wait_for(lambda: bool(fake.texts(5)))
        assert fake.texts(5) == ["Sorry, you are not allowed to talk to this bot."]
        fake.push_text(5, 8, "please")  # refused again, silently (one refusal per user per 10 minutes)
        fake.push_text(1, 7, "an allowed user")
        await fake.wait_for(lambda: fake.texts(1) == ["echo: an allowed user"])
        assert fake.texts(5) == ["Sorry, you are not allowed to talk to this bot."]
        sessions = (await http.get("/v1/sessions")).json()
        assert [s["key"] for s in sessions] == ["channel:tg:1"]
        assert len((await http.get("/v1/runs")).json()["runs"]) == 1
        assert (await http.get("/v1/channels/tg")).json()["refused"] == 2


async def test_the_default_allows_nobody(tmp_path: Path, token_env: str,
                                         fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    spec = telegram_spec("tg", base, allow=[])
    async with asyncio.timeout(LIMIT), service(tmp_path, [spec]) as (http, kernel, channels):
        await channels.get("tg").wait_running()
        fake.push_text(1, 7, "hello")
        await fake.wait_for(lambda: bool(fake.texts(1)))
        assert fake.texts(1) == ["Sorry, you are not allowed to talk to this bot."]
        assert (await http.get("/v1/runs")).json()["runs"] == []


async def test_a_redelivered_update_runs_once_also_after_a_restart(
        tmp_path: Path, token_env: str, fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    async with asyncio.timeout(LIMIT):
        async with service(tmp_path, [telegram_spec("tg", base)]) as (http, kernel, channels):
            await channels.get("tg").wait_running()
            update = fake.push_text(1, 7, "only once")
            await fake.wait_for(lambda: fake.texts(1) == ["echo: only once"])
            fake.redeliver(update)
            fake.push_text(1, 7, "a later one")  # taken after the redelivery: once it is answered, both were seen
            await fake.wait_for(lambda: fake.texts(1) == ["echo: only once", "echo: a later one"])
            assert (await http.get("/v1/channels/tg")).json()["duplicates"] == 1
        async with service(tmp_path, [telegram_spec("tg", base)]) as (http, kernel, channels):
            await channels.get("tg").wait_running()
            fake.redeliver(update)
            fake.push_text(1, 7, "after the restart")
            await fake.wait_for(lambda: len(fake.texts(1)) == 3)
            assert fake.texts(1)[-1] == "echo: after the restart"
            assert len((await http.get("/v1/runs")).json()["runs"]) == 3


async def test_new_and_mode_commands(tmp_path: Path, token_env: str,
                                     fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    async with asyncio.timeout(LIMIT), service(tmp_path, [telegram_spec("tg", base)]) as (http, kernel, channels):
        await channels.get("tg").wait_running()
        fake.push_text(1, 7, "remember me")
        await fake.wait_for(lambda: len(fake.texts(1)) == 1)
        fake.push_text(1, 7, "/recall")
        await fake.wait_for(lambda: len(fake.texts(1)) == 2)
        assert fake.texts(1)[1] == 'recall: ["remember me"]'
        fake.push_text(1, 7, "/new@corral_test_bot")
        await fake.wait_for(lambda: len(fake.texts(1)) == 3)
        assert fake.texts(1)[2] == "New conversation started."
        fake.push_text(1, 7, "/recall")
        await fake.wait_for(lambda: len(fake.texts(1)) == 4)
        assert fake.texts(1)[3] == "recall: []"  # a fresh session
        keys = sorted(s["key"] for s in (await http.get("/v1/sessions")).json())
        assert keys == ["channel:tg:1", "channel:tg:1#2"]
        fake.push_text(1, 7, "/mode reject")
        fake.push_text(1, 7, "/mode sideways")
        fake.push_text(1, 7, "/mode")
        await fake.wait_for(lambda: len(fake.texts(1)) == 7)
        assert fake.texts(1)[4:] == ["Mode set to reject.", fake.texts(1)[5], fake.texts(1)[6]]
        assert fake.texts(1)[5].startswith("Unknown mode 'sideways'")
        assert fake.texts(1)[6].startswith("Mode: reject")
        # reject: a message while the chat's run is busy is refused, and nothing is queued.
        fake.push_text(1, 7, "/sleep 2")
        await fake.wait_for(lambda: fake.typing.count("1") >= 1)
        fake.push_text(1, 7, "too soon")
        await fake.wait_for(lambda: any(t.startswith("Busy") for t in fake.texts(1)))


async def test_429_with_retry_after_is_honoured(tmp_path: Path, token_env: str,
                                                fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    async with asyncio.timeout(LIMIT), service(tmp_path, [telegram_spec("tg", base)]) as (http, kernel, channels):
        await channels.get("tg").wait_running()
        fake.fail("sendMessage", 429, retry_after=2, times=1)
        fake.push_text(1, 7, "hello")
        await fake.wait_for(lambda: fake.texts(1) == ["echo: hello"])
        sends = [c.at for c in fake.calls if c.method == "sendMessage"]
        assert len(sends) == 2 and sends[1] - sends[0] >= 2.0, sends
        assert (await http.get("/v1/channels/tg")).json()["outbox"]["rate_limited"] == 1


async def test_a_delivery_the_platform_refuses_is_kept_failed_and_the_chat_goes_on(
        tmp_path: Path, token_env: str, fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    async with asyncio.timeout(LIMIT), service(tmp_path, [telegram_spec("tg", base)]) as (http, kernel, channels):
        await channels.get("tg").wait_running()
        fake.fail("sendMessage", 400, times=1)
        fake.push_text(1, 7, "lost")
        await fake.wait_for(lambda: fake.count("sendMessage", 1) == 1)  # refused
        [lost] = (await http.get("/v1/runs")).json()["runs"]
        await wait_run(kernel, lost["id"])  # else "kept" could join its opening, in one reply
        fake.push_text(1, 7, "kept")
        await fake.wait_for(lambda: fake.texts(1) == ["echo: kept"])
        failed = (await http.get("/v1/channels/tg/outbox", params={"status": "failed"})).json()["rows"]
        # The refused send, and (when the reply streamed by an edit too) the edit of a message
        # that never existed: both kept, failed, and nothing of "kept"'s reply among them.
        assert failed and {(r["text"], r["status"]) for r in failed} == {("echo: lost", "failed")}
        errors = sorted(r["error"] for r in failed)  # the send's, then any edit's (in either order)
        assert "Internal Error" in errors[0] and all("never delivered" in e for e in errors[1:]), errors
        assert (await http.get("/v1/channels/tg")).json()["outbox"]["failed"] == len(failed)


async def test_5xx_backs_off_and_recovers(tmp_path: Path, token_env: str,
                                          fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    async with asyncio.timeout(LIMIT), service(tmp_path, [telegram_spec("tg", base)]) as (http, kernel, channels):
        runtime = channels.get("tg")
        await runtime.wait_running()
        fake.down()
        fake.push_text(1, 7, "while down")
        await runtime.wait_state(State.BACKING_OFF)
        view = (await http.get("/v1/channels/tg")).json()
        assert view["state"] == "backing_off" and "Bad Gateway" in view["last_error"]
        fake.up()
        await fake.wait_for(lambda: fake.texts(1) == ["echo: while down"])
        await runtime.wait_state(State.RUNNING)


async def test_a_wrong_token_fails_without_leaking_it_and_a_restart_recovers(
        tmp_path: Path, token_env: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTelegram(tokens=("another:token",))
    caplog.set_level(logging.DEBUG)
    async with asyncio.timeout(LIMIT), serve(fake, close=fake.close) as base:
        spec = telegram_spec("tg", f"{base}/bot")
        async with service(tmp_path, [spec]) as (http, kernel, channels):
            runtime = channels.get("tg")
            await runtime.wait_state(State.FAILED)
            view = (await http.get("/v1/channels/tg")).json()
            assert view["state"] == "failed" and "token" in view["last_error"] and view["next_attempt_at"]
            assert TOKEN not in str(view) and TOKEN not in caplog.text
            fake.tokens.add(TOKEN)
            assert (await http.post("/v1/channels/tg/restart")).status_code == 202
            await runtime.wait_running()
            fake.push_text(1, 7, "now it works")
            await fake.wait_for(lambda: fake.texts(1) == ["echo: now it works"])
    assert TOKEN not in caplog.text


async def test_a_missing_secret_variable_fails_that_channel_only(
        tmp_path: Path, token_env: str, fake_telegram: tuple[FakeTelegram, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake, base = fake_telegram
    broken = telegram_spec("broken", base, token_env="TEST_UNSET_TOKEN")
    monkeypatch.delenv("TEST_UNSET_TOKEN", raising=False)
    async with asyncio.timeout(LIMIT), service(tmp_path, [broken, telegram_spec("tg", base)]) as (http, _, channels):
        await channels.get("broken").wait_state(State.FAILED)
        await channels.get("tg").wait_running()
        view = {c["name"]: c for c in (await http.get("/v1/channels")).json()["channels"]}
        assert "TEST_UNSET_TOKEN" in view["broken"]["last_error"] and view["tg"]["state"] == "running"


async def test_telegram_by_webhook(tmp_path: Path, token_env: str, monkeypatch: pytest.MonkeyPatch,
                                   fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    monkeypatch.setenv("TEST_TG_SECRET", "a-webhook-secret-token")
    spec = telegram_spec("tg", base, transport="webhook", secret_env="TEST_TG_SECRET",
                         webhook_url="https://bot.example.com/v1/channels/tg/telegram")
    async with asyncio.timeout(LIMIT), service(tmp_path, [spec], api_token="an-admin-token-long-enough") as (
            http, kernel, channels):
        await channels.get("tg").wait_running()
        assert fake.webhook == "https://bot.example.com/v1/channels/tg/telegram"
        update = {"update_id": 10, "message": {"message_id": 3, "date": 0, "text": "by webhook",
                                               "chat": {"id": 1, "type": "private"}, "from": {"id": 7}}}
        wrong = await http.post("/v1/channels/tg/telegram", json=update,
                                headers={"x-telegram-bot-api-secret-token": "wrong"})
        assert wrong.status_code == 401
        right = await http.post("/v1/channels/tg/telegram", json=update,
                                headers={"x-telegram-bot-api-secret-token": "a-webhook-secret-token"})
        assert right.status_code == 200 and right.json()["taken"][0]["outcome"] == "accepted"
        await fake.wait_for(lambda: fake.texts(1) == ["echo: by webhook"])
        again = await http.post("/v1/channels/tg/telegram", json=update,
                                headers={"x-telegram-bot-api-secret-token": "a-webhook-secret-token"})
        assert again.json()["taken"][0]["outcome"] == "duplicate"
        # The admin routes still need the token.
        assert (await http.get("/v1/channels")).status_code == 401


async def test_a_dead_platform_for_one_channel_leaves_another_unchanged(
        tmp_path: Path, token_env: str) -> None:
    alive, dead = FakeTelegram(chat_interval_s=0.2), FakeTelegram(chat_interval_s=0.2)
    async with asyncio.timeout(60), serve(alive, close=alive.close) as good, serve(dead, close=dead.close) as bad:
        specs = [telegram_spec("good", f"{good}/bot"), telegram_spec("bad", f"{bad}/bot", request_timeout_s=2)]
        async with service(tmp_path, specs) as (http, kernel, channels):
            await channels.get("good").wait_running()
            await channels.get("bad").wait_running()

            async def round_trips(chat: int, n: int) -> list[float]:
                loop, times = asyncio.get_running_loop(), []
                for i in range(n):
                    began = loop.time()
                    alive.push_text(chat, 7, f"ping {i}")
                    await alive.wait_for(lambda i=i: f"echo: ping {i}" in alive.texts(chat))
                    times.append(loop.time() - began)
                return times

            before = await round_trips(1, 5)
            dead.hang()  # every call to it now hangs: its polls time out, its replies wait
            dead.push_text(1, 7, "into the void")
            await channels.get("bad").wait_state(State.BACKING_OFF)
            after = await round_trips(2, 5)
            health = await http.get("/healthz")
            assert health.status_code == 200
            assert max(after) < max(before) * 3 + 0.5, (before, after)
            assert channels.get("good").state is State.RUNNING
            dead.release()


async def test_each_chat_maps_to_a_session_by_scope(
        tmp_path: Path, token_env: str, fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    spec = telegram_spec("tg", base, dm_scope="shared")
    async with asyncio.timeout(LIMIT), service(tmp_path, [spec]) as (http, kernel, channels):
        await channels.get("tg").wait_running()
        fake.push_text(1, 7, "dm one")
        await fake.wait_for(lambda: len(fake.texts(1)) == 1)
        [first] = (await http.get("/v1/runs")).json()["runs"]
        await wait_run(kernel, first["id"])  # else "dm two" would steer it, and its answer go to chat 1
        fake.push_text(2, 8, "dm two")
        await fake.wait_for(lambda: len(fake.texts(2)) == 1)
        fake.push_text(-100, 7, "in a group", chat_type="supergroup", thread_id=5)
        await fake.wait_for(lambda: len(fake.texts(-100)) == 1)
        keys = sorted(s["key"] for s in (await http.get("/v1/sessions")).json())
        assert keys == ["channel:tg:-100:5", "channel:tg:dm"]
        inputs = await select_all(kernel.store, __import__("corral.store.tables", fromlist=["inputs"]).inputs.select())
        assert {row.origin for row in inputs} == {"channel"}


async def test_each_message_of_a_burst_restarts_the_wait_until_the_run_begins(
        tmp_path: Path, token_env: str, fake_telegram: tuple[FakeTelegram, str]) -> None:
    """The window is between messages, not from the first: a message arriving (in an update batch
    of its own) while the burst's run still settles joins that run's opening and restarts its
    wait. It used to steer the unstarted run, so a burst whose messages took longer than the
    window in all (a loaded machine) was split in two."""
    fake, base = fake_telegram
    spec = telegram_spec("tg", base, debounce_ms=60_000)  # the run stays settling for the whole test
    async with asyncio.timeout(LIMIT), service(tmp_path, [spec]) as (http, kernel, channels):
        await channels.get("tg").wait_running()

        def settling() -> Any:
            [runtime] = kernel.sessions.all_live()
            return runtime.lane.active

        def accepted() -> int:
            chats = channels.get("tg").chats
            return chats.counts["accepted"] if chats is not None else 0

        opened_at = 0.0
        for count, part in enumerate(("one", "two", "three"), start=1):
            fake.push_text(1, 7, part)
            await fake.wait_for(lambda count=count: accepted() == count)
            slot = settling()
            assert not slot.started and slot.collect
            assert (len(slot.input_ids), slot.inbox) == (count, [])
            assert slot.last_input_at > opened_at  # each message restarted the wait
            opened_at = slot.last_input_at
        [run] = (await http.get("/v1/runs")).json()["runs"]
        assert run["status"] == "queued"


async def test_a_burst_into_an_idle_chat_is_debounced_into_one_run(
        tmp_path: Path, token_env: str, fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base = fake_telegram
    spec = telegram_spec("tg", base, debounce_ms=500)
    async with asyncio.timeout(LIMIT), service(tmp_path, [spec]) as (http, kernel, channels):
        await channels.get("tg").wait_running()
        for part in ("one", "two", "three"):
            fake.push_text(1, 7, part)
        await fake.wait_for(lambda: bool(fake.texts(1)))
        await fake.wait_for(lambda: fake.texts(1) == ["echo: one\ntwo\nthree"])
        assert len((await http.get("/v1/runs")).json()["runs"]) == 1
