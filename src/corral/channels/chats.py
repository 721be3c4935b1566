"""A channel's chats: who may talk, which session a chat is, and what a message does.

A message from a user not on the channel's allow list is refused politely (at most once per
user in ``REFUSE_EVERY_S``) and reaches no agent. A message seen before (the same platform
message id, redelivered) is dropped. ``/stop``, ``/new``, ``/mode``, ``/help`` are answered
here; anything else is submitted to the chat's session under the idempotency key of its
platform id, with the chat's arrival mode (``mode``, ``/mode``): a message landing while the
chat's run is busy steers it by default. With ``debounce_ms`` a burst that starts while the
chat is idle is collected into one run once it settles: each message of the burst, until the run
begins, restarts the wait, so the window is between messages, not from the first.

Each chat (its scope: a chat and thread, or for direct messages per ``dm_scope`` a chat, a
user, or all of them) has a session keyed ``channel:NAME:SCOPE`` (``#N`` after the N-th
``/new``), owned by the principal ``channel.NAME``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from corral.channels.config import ChannelSpec, DmScope
from corral.channels.followers import Followers
from corral.channels.outbox import Outbox
from corral.channels.platforms.base import Delivery, Inbound
from corral.channels.reply import APPROVE, call_hash, parse_button
from corral.clock import utcnow
from corral.errors import Conflict, InvalidInput, NotFound, SessionBusy, TooManyPending
from corral.lru import Lru
from corral.store import channels as rows
from corral.types import CancelMode, Decision, Mode, RunStatus

if TYPE_CHECKING:
    from corral.kernel import Kernel

log = logging.getLogger(__name__)

REFUSE_EVERY_S = 600.0
REFUSAL = "Sorry, you are not allowed to talk to this bot."
HELP = ("Send a message to talk to the assistant. /stop stops the answer under way (twice: at once), "
        "/new starts a new conversation, /mode MODE sets what a message does while an answer is under way "
        "(queue, collect, steer, interrupt, rollback or reject).")


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REFUSED = "refused"
    COMMAND = "command"
    PRESSED = "pressed"
    IGNORED = "ignored"


@dataclass
class Chat:
    key: str
    session_id: str
    generation: int
    mode: Mode | None


@dataclass(frozen=True)
class Taken:
    outcome: Outcome
    run_id: str | None = None
    session_id: str | None = None


class Chats:
    def __init__(self, kernel: Kernel, spec: ChannelSpec, outbox: Outbox, followers: Followers):
        self.kernel = kernel
        self.spec = spec
        self.outbox = outbox
        self.followers = followers
        self.owner = f"channel.{spec.name}"
        self._chats: Lru[str, Chat] = Lru(10_000)
        self._loading: dict[str, asyncio.Future[Chat]] = {}
        self._seen: Lru[str, bool] = Lru(10_000)
        self._refused: Lru[str, float] = Lru(10_000)
        # The run a chat's last /stop stopped softly: a second /stop for it is hard.
        self._stopping: Lru[str, str] = Lru(10_000)
        self.counts = {outcome.value: 0 for outcome in Outcome}

    def __repr__(self) -> str:
        return f"<Chats {self.spec.name} {self.counts}>"

    async def take(self, message: Inbound) -> Taken:
        taken = await self._take(message)
        self.counts[taken.outcome.value] += 1
        return taken

    async def _take(self, message: Inbound) -> Taken:
        if self._seen.get(message.key) or await self.kernel.store.read(rows.inbound_seen, self.spec.name,
                                                                      message.key):
            self._seen.put(message.key, True)
            return Taken(Outcome.DUPLICATE)
        if not self.spec.allows(message.user_id):
            return await self._refuse(message)
        if message.button is not None:
            return await self._press(message)
        text = message.text.strip()
        if not text:
            await self._record(message)
            return Taken(Outcome.IGNORED)
        chat = await self._chat(message)
        command, _, argument = text.partition(" ")
        handler = {"/stop": self._stop, "/new": self._new, "/mode": self._mode, "/help": self._help,
                   "/start": self._help}.get(command.lower())
        if handler is not None:
            answer = await handler(chat, message, argument.strip())
            await self._answer(message, answer)
            return Taken(Outcome.COMMAND, session_id=chat.session_id)
        return await self._submit(chat, message, text)

    # --- messages ---------------------------------------------------------------------------

    async def _submit(self, chat: Chat, message: Inbound, text: str) -> Taken:
        mode, debounce = chat.mode or self.spec.mode, 0
        if self.spec.debounce_ms and _settling(self.kernel.session_view(chat.session_id)):
            mode, debounce = Mode.COLLECT, self.spec.debounce_ms  # a burst into an idle chat: one run
        try:
            accepted = await self.kernel.submit(chat.session_id, text, mode=mode, debounce_ms=debounce,
                                                idempotency_key=_idempotency_key(self.spec.name, message.key),
                                                origin="channel")
        except SessionBusy:
            await self._answer(message, "Busy with the previous message (mode reject): try again when it is done.")
            return Taken(Outcome.REFUSED, session_id=chat.session_id)
        except TooManyPending:
            await self._answer(message, "Too many messages are waiting: try again in a while.")
            return Taken(Outcome.REFUSED, session_id=chat.session_id)
        except InvalidInput as exc:
            await self._answer(message, f"That message cannot be taken: {exc}")
            return Taken(Outcome.REFUSED, session_id=chat.session_id)
        run = {"run_id": accepted.run_id, "channel": self.spec.name, "chat_id": message.chat_id,
               "thread_id": message.thread_id, "session_id": chat.session_id, "reply_to": message.message_id,
               "created_at": utcnow()}

        def unit(conn: Any) -> None:
            rows.add_run(conn, run)
            self._record_in(conn, message, accepted.run_id, chat.session_id)

        await self.kernel.store.write(unit)
        self._seen.put(message.key, True)
        self.followers.follow(run)
        return Taken(Outcome.ACCEPTED, accepted.run_id, chat.session_id)

    async def _refuse(self, message: Inbound) -> Taken:
        now = asyncio.get_running_loop().time()
        last = self._refused.get(message.user_id)
        if last is None or now - last > REFUSE_EVERY_S:
            self._refused.put(message.user_id, now)
            if message.button is not None and message.press_id is not None:
                await self._acknowledge(message, REFUSAL)
            else:
                await self._answer(message, REFUSAL)
        else:
            await self._record(message)
        log.info("channel %s: refused a message from user %s (not in allow)", self.spec.name, message.user_id)
        return Taken(Outcome.REFUSED)

    async def _answer(self, message: Inbound, text: str) -> None:
        """Reply to a message and record it as taken, in one transaction."""
        reply = Delivery(f"{message.key}:r", message.chat_id, message.thread_id, "send", text,
                         extra={"reply_to": message.message_id, "final": True})
        await self.outbox.put([reply], also=lambda conn: self._record_in(conn, message, None, None))
        self._seen.put(message.key, True)

    async def _acknowledge(self, message: Inbound, text: str) -> None:
        press = Delivery(f"{message.key}:ack", message.chat_id, message.thread_id, "answer", text,
                         extra={"press_id": message.press_id})
        await self.outbox.put([press], also=lambda conn: self._record_in(conn, message, None, None))
        self._seen.put(message.key, True)

    async def _record(self, message: Inbound) -> None:
        await self.kernel.store.write(lambda conn: self._record_in(conn, message, None, None))
        self._seen.put(message.key, True)

    def _record_in(self, conn: Any, message: Inbound, run_id: str | None, session_id: str | None) -> None:
        rows.record_inbound(conn, self.spec.name, message.key, session_id, run_id, utcnow())

    # --- buttons ----------------------------------------------------------------------------

    async def _press(self, message: Inbound) -> Taken:
        assert message.button is not None
        parsed = parse_button(message.button)
        note = "This button is no longer valid."
        if parsed is not None:
            run_id, wanted, choice = parsed
            owed = await self.kernel.store.read(rows.get_run, run_id)
            if owed is not None and owed.channel == self.spec.name:
                note = await self._decide(run_id, wanted, Decision.APPROVE if choice == APPROVE else Decision.DENY)
        if message.press_id is not None:
            await self._acknowledge(message, note)
        else:
            await self._answer(message, note)
        return Taken(Outcome.PRESSED)

    async def _decide(self, run_id: str, wanted: str, decision: Decision) -> str:
        approvals = await self.kernel.store.approvals_of_run(run_id)
        for approval in approvals:
            if call_hash(approval.call_id) == wanted:
                try:
                    await self.kernel.decide(run_id, approval.call_id, decision)
                except (NotFound, Conflict):
                    return "Already decided."
                return "Approved." if decision is Decision.APPROVE else "Denied."
        return "This button is no longer valid."

    # --- commands ---------------------------------------------------------------------------

    async def _stop(self, chat: Chat, message: Inbound, argument: str) -> str:
        active = self.kernel.session_view(chat.session_id)["active_run_id"]
        if active is None:
            return "Nothing is running."
        hard = self._stopping.get(chat.key) == active or argument.lower() == "now"
        try:
            status = await self.kernel.cancel(active, CancelMode.HARD if hard else CancelMode.SOFT)
        except (NotFound, Conflict):
            return "Nothing is running."
        if status.is_terminal and status is not RunStatus.CANCELLED:
            return "Nothing is running."
        self._stopping.put(chat.key, active)
        return "Stopped." if hard else "Stopping… (/stop again to stop at once)"

    async def _new(self, chat: Chat, message: Inbound, argument: str) -> str:
        generation = chat.generation + 1
        fresh = await self._create(chat.key, message, generation, chat.mode)
        self._chats.put(chat.key, fresh)
        return "New conversation started."

    async def _mode(self, chat: Chat, message: Inbound, argument: str) -> str:
        names = ", ".join(m.value for m in Mode)
        if not argument:
            return f"Mode: {(chat.mode or self.spec.mode).value} (one of {names})."
        try:
            mode = Mode(argument.lower())
        except ValueError:
            return f"Unknown mode {argument[:40]!r}: one of {names}."
        chat.mode = mode
        await self._save(chat)
        return f"Mode set to {mode.value}."

    async def _help(self, chat: Chat, message: Inbound, argument: str) -> str:
        return HELP

    # --- which session a chat is ------------------------------------------------------------

    def scope(self, message: Inbound) -> str:
        if not message.is_dm:
            return message.chat_id + (f":{message.thread_id}" if message.thread_id else "")
        if self.spec.dm_scope is DmScope.PER_USER:
            return f"user:{message.user_id}"
        if self.spec.dm_scope is DmScope.SHARED:
            return "dm"
        return message.chat_id

    async def _chat(self, message: Inbound) -> Chat:
        """The chat's state, loaded (or created, with its session) once however many ask at once."""
        key = self.scope(message)
        chat = self._chats.get(key)
        if chat is not None:
            return chat
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Chat] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            row = await self.kernel.store.read(rows.get_chat, self.spec.name, key)
            if row is not None:
                chat = Chat(key, row.session_id, row.generation, Mode(row.mode) if row.mode else None)
            else:
                chat = await self._create(key, message, 1, None)
            self._chats.put(key, chat)
            future.set_result(chat)
            return chat
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            del self._loading[key]

    async def _create(self, key: str, message: Inbound, generation: int, mode: Mode | None) -> Chat:
        session_key = f"channel:{self.spec.name}:{key}" + (f"#{generation}" if generation > 1 else "")
        metadata = {"channel": self.spec.name, "kind": self.spec.kind.value, "chat_id": message.chat_id,
                    "thread_id": message.thread_id, "scope": key}
        row, _ = await self.kernel.sessions.create(self.spec.agent, session_key[:256], metadata, owner=self.owner)
        chat = Chat(key, row["id"], generation, mode)
        await self._save(chat)
        return chat

    async def _save(self, chat: Chat) -> None:
        row = {"channel": self.spec.name, "chat_key": chat.key, "session_id": chat.session_id,
               "generation": chat.generation, "mode": chat.mode.value if chat.mode else None, "updated_at": utcnow()}
        await self.kernel.store.write(lambda conn: rows.put_chat(conn, row))


def _idempotency_key(channel: str, key: str) -> str:
    full = f"channel:{channel}:{key}"
    return full if len(full) <= 200 else f"channel:{channel}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"


def _settling(view: dict[str, Any]) -> bool:
    """Whether a message joins a burst: the chat is idle, or its run has not begun (still settling)."""
    return view["active_run_id"] is None or view["active_status"] == RunStatus.QUEUED
