"""The reflector: after a run, in the background, the session's agent writes a title (after the
first turn) and a rolling summary (every few turns) for listings.

Each reflection is a task of the reflector's own task group, under its own concurrency
limit, and asks the model through the agent's slot in the *background* class: a slow or
stuck reflection never delays a session's next run, and never takes a model slot a person
is waiting for. Reflections are best effort: one that fails is logged and skipped.
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


class Reflector:
    def __init__(self, kernel: Kernel, config: ReflectorConfig | None = None, hooks: list[Hook] | None = None):
        self.kernel = kernel
        self.config = config or ReflectorConfig()
        self.hooks: list[Hook] = [self._title_and_summary] if hooks is None else hooks
        self._ended: asyncio.Queue[RunEnd] = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.config.max_concurrent)
        self.done = 0
        self.failed = 0
        self._progress = asyncio.Condition()
        self._titled: Lru[str, bool] = Lru(TITLED_REMEMBERED)  # sessions known to have a title

    def __repr__(self) -> str:
        return f"<Reflector pending={self._ended.qsize()} done={self.done} failed={self.failed}>"

    def _on_run_end(self, ended: RunEnd) -> None:
        if ended.status is RunStatus.COMPLETED:
            self._ended.put_nowait(ended)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as reflections:  # cancelled with the service: every reflection stops
            while True:
                ended = await self._ended.get()
                for hook in self.hooks:
                    reflections.create_task(self._reflect(hook, ended), name=f"reflect:{ended.run_id}")

    async def _reflect(self, hook: Hook, ended: RunEnd) -> None:
        async with self._slots:
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    await hook(ended)
                self.done += 1
            except (CorralError, TimeoutError) as exc:
                self.failed += 1
                log.warning("reflection on %s failed: %s", ended.session_id, exc)
        async with self._progress:
            self._progress.notify_all()

    async def wait_reflected(self, count: int) -> None:
        """Until ``count`` reflections have finished (done or failed) since start."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.done + self.failed >= count)

    async def _title_and_summary(self, ended: RunEnd) -> None:
        store, every = self.kernel.store, self.config.summary_every
        summary_due = bool(every) and ended.completed_runs % every == 0
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
