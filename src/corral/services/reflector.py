"""The reflector: after a run, in the background, the session's agent writes a title (after the
first turn) and a rolling summary (every few turns) for listings.

Each reflection is a task of the reflector's own task group, under its own concurrency
limit, and asks the model through the agent's slot in the *background* class: a slow or
stuck reflection never delays a session's next run, and never takes a model slot a person
is waiting for. Reflections are best effort: one that fails is logged and skipped.

Ends wait for a free slot in a bounded table of pending sessions, not as tasks: a second end
of a session already pending merges into it, and beyond the bound the oldest is dropped and
counted (see ``Reflector._on_run_end`` for why that is safe).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from corral.errors import AgentUnavailable, CorralError
from corral.kernel import Kernel
from corral.kernel.runs import RunEnd
from corral.loop.compaction import summary_message
from corral.lru import Lru
from corral.providers.base import ChatMessage, ModelRequest, reply_text
from corral.store import repo
from corral.types import RunStatus

log = logging.getLogger(__name__)

TITLE_PROMPT = "Give this conversation a title of at most six words. Reply with the title only."
SUMMARY_PROMPT = "Summarise this conversation in three sentences at most, for someone about to join it."
MAX_TITLE = 200
TITLED_REMEMBERED = 10_000

Hook = Callable[[RunEnd], Awaitable[None]]


@dataclass(frozen=True)
class ReflectorConfig:
    max_concurrent: int = 2
    summary_every: int = 5  # turns; 0 turns summaries off
    timeout_s: float = 60.0
    max_pending: int = 1_000  # sessions waiting for a reflection; beyond, the oldest is dropped


class Reflector:
    def __init__(self, kernel: Kernel, config: ReflectorConfig | None = None, hooks: list[Hook] | None = None):
        self.kernel = kernel
        self.config = config or ReflectorConfig()
        self.hooks: list[Hook] = [self._title_and_summary] if hooks is None else hooks
        # Completed runs waiting for a free slot, one per session, oldest first (a dict keeps
        # insertion order, and assigning to a key already there keeps its place).
        self._pending: dict[str, RunEnd] = {}
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.max_concurrent)
        self.done = 0
        self.failed = 0
        self.merged = 0  # ends folded into a pending one of the same session
        self.dropped = 0  # ends dropped, oldest first, while ``max_pending`` sessions were pending
        self._progressed = asyncio.Event()
        self._titled: Lru[str, bool] = Lru(TITLED_REMEMBERED)  # sessions known to have a title

    def __repr__(self) -> str:
        return (f"<Reflector pending={len(self._pending)} done={self.done} failed={self.failed} "
                f"merged={self.merged} dropped={self.dropped}>")

    def statistics(self) -> dict[str, int]:
        """Ends pending, and reflections done and failed, ends merged and dropped since start."""
        return {"pending": len(self._pending), "done": self.done, "failed": self.failed, "merged": self.merged,
                "dropped": self.dropped}

    def _on_run_end(self, ended: RunEnd) -> None:
        """Note a completed run for reflection. The overflow policy, and why it loses nothing
        that matters: a reflection reads the session as it is when it runs, not as it was when
        the run ended, and a title is tried again after every completed run until one is set.

        - A session already pending keeps its place, and the newer end replaces the pending one
          (counted in ``merged``), unless only the pending one is due a summary: then it stays,
          so that the summary is still made (of the later conversation, which is all the better).
        - A new session beyond ``max_pending`` pending ones pushes out the oldest (counted in
          ``dropped``): that session gets its title at its next completed run, its summary at
          the next one due. The newest ends are kept because their sessions are the live ones.
        """
        if ended.status is not RunStatus.COMPLETED or not self.hooks:
            return
        pending = self._pending.get(ended.session_id)
        if pending is not None:
            if not self._summary_due(pending) or self._summary_due(ended):
                self._pending[ended.session_id] = ended
            self.merged += 1
        else:
            if len(self._pending) >= self.config.max_pending:
                del self._pending[next(iter(self._pending))]
                self.dropped += 1
            self._pending[ended.session_id] = ended
            self._arrived.set()
        self._progressed.set()

    def _summary_due(self, ended: RunEnd) -> bool:
        every = self.config.summary_every
        return bool(every) and ended.completed_runs % every == 0

    async def run(self) -> None:
        async with asyncio.TaskGroup() as reflections:  # cancelled with the service: every reflection stops
            while True:
                # A slot first, then an end: until a slot is free, ends wait in the pending table,
                # where they merge and are bounded, rather than as tasks.
                await self._slots.acquire()
                try:
                    ended = await self._next_pending()
                except BaseException:  # cancelled (the service stops or restarts): the slot is not lost
                    self._slots.release()
                    raise
                for n, hook in enumerate(self.hooks):
                    if n:
                        await self._slots.acquire()
                    reflections.create_task(self._reflect(hook, ended), name=f"reflect:{ended.run_id}")

    async def _next_pending(self) -> RunEnd:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        return self._pending.pop(next(iter(self._pending)))

    async def _reflect(self, hook: Hook, ended: RunEnd) -> None:
        """Run ``hook`` in the slot the loop took for it, and give the slot back."""
        try:
            async with asyncio.timeout(self.config.timeout_s):
                await hook(ended)
            self.done += 1
        except (CorralError, TimeoutError) as exc:
            self.failed += 1
            log.warning("reflection on %s failed: %s", ended.session_id, exc)
        finally:
            self._slots.release()
        self._progressed.set()

    async def wait_reflected(self, count: int) -> None:
        """Until ``count`` reflections have been settled since start: done, failed, or merged
        into another or dropped (an end merged or dropped settles one reflection per hook)."""
        while self.done + self.failed + (self.merged + self.dropped) * len(self.hooks) < count:
            self._progressed.clear()
            await self._progressed.wait()

    async def _title_and_summary(self, ended: RunEnd) -> None:
        store = self.kernel.store
        summary_due = self._summary_due(ended)
        if self._titled.get(ended.session_id) and not summary_due:
            return  # most turns: nothing to read, nothing to ask
        session = await store.read(repo.get_session, ended.session_id)
        if session is None:
            return
        agent = await self.kernel.agents.wait_ready(session.agent)
        external = agent.spec.driver == "acp"  # an external program: Corral has no model of its own to ask
        if session.title is not None:
            self._titled.put(ended.session_id, True)  # a title, once set, stays
            if external or not summary_due:
                return
        # What the session's runs see: the latest compaction's summary and the messages after it,
        # from the kernel's memory. The whole history could outgrow the model's context, and
        # reading it every few turns cost a read that grew with the session.
        compaction, rows = await self.kernel.conversations.read(ended.session_id)
        conversation = [summary_message(compaction.summary)] if compaction is not None else []
        conversation += [ChatMessage(r.role, r.content) for r in rows if r.role in ("user", "assistant") and r.content]
        if session.title is None:
            if external:
                first = next((m.content.strip() for m in conversation if m.role == "user" and m.content.strip()), "")
                title = first.splitlines()[0][:MAX_TITLE] if first else None
            else:
                title = (await self._ask(session.agent, conversation, TITLE_PROMPT)).strip().strip('"')[:MAX_TITLE]
            if title:
                await store.write(lambda conn: repo.update_session(conn, ended.session_id, title=title))
                self._titled.put(ended.session_id, True)  # a title, once set, stays
        if summary_due and not external:
            summary = (await self._ask(session.agent, conversation, SUMMARY_PROMPT)).strip()
            await store.write(lambda conn: repo.update_session(conn, ended.session_id, summary=summary))

    async def _ask(self, agent_name: str, conversation: list[ChatMessage], instruction: str) -> str:
        agent = await self.kernel.agents.wait_ready(agent_name)
        if agent.provider is None:
            raise AgentUnavailable(f"agent {agent_name!r} is gone")
        request = ModelRequest([*conversation, ChatMessage("user", instruction)], (), purpose="reflection")
        async with agent.slot.background():
            text, _ = await reply_text(agent.provider, request)
        return text


def install_reflector(kernel: Kernel, config: ReflectorConfig | None = None,
                      hooks: list[Hook] | None = None) -> Reflector:
    reflector = Reflector(kernel, config, hooks)
    kernel.on_run_end(reflector._on_run_end)
    kernel.add_service("reflector", reflector.run)
    return reflector
