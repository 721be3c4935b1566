"""A run on an ACP agent: one ``session/prompt``, its updates as Corral events.

The external program keeps its own conversation, so a run sends only its own input; its
model and tools are the program's business. What Corral still owns: the event stream
(``session/update`` becomes ``message.delta`` and ``tool.*`` events), approvals
(``session/request_permission`` becomes a Corral approval, and the run shows as
``waiting`` until a human decides), and stopping. A soft cancel sends ``session/cancel``;
that is only a notification, so if the prompt has not ended within the agent's
``cancel_grace_s`` the process is killed. A hard cancel kills it at once (and so fails
every other prompt that agent process was serving; the agent then restarts).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from acp import RequestPermissionResponse
from acp.schema import (
    AgentMessageChunk,
    AllowedOutcome,
    PermissionOption,
    TextContentBlock,
    ToolCallProgress,
    ToolCallStart,
    ToolCallUpdate,
)

from corral.drivers.acp_process import CANCELLED, AcpProcess
from corral.errors import AgentUnavailable, ExternalAgentError
from corral.events import NewEvent
from corral.kernel.ports import Finished, Outcome, Stopped
from corral.loop.runner import ContextRunner, steer_writes
from corral.providers.base import ToolCall
from corral.text import clean, clean_json
from corral.types import ApprovalStatus, EventType

# Which option answers a decision, in order of preference.
ALLOW_KINDS = ("allow_once", "allow_always")
REJECT_KINDS = ("reject_once", "reject_always")


@dataclass
class AcpTurn(ContextRunner):
    _parts: list[str] = field(default_factory=list)
    _tools: dict[str, str] = field(default_factory=dict)
    _asked: set[str] = field(default_factory=set)

    @property
    def prompt(self) -> list[str] | None:
        """The run's input texts; None when the run resumes (after approvals, or a restart)."""
        return self.context.prompt

    async def run(self) -> Outcome:
        outcome = await self._run()
        await self.writes.settle()
        return outcome

    async def _run(self) -> Outcome:
        process = self.agent.acp
        if not isinstance(process, AcpProcess):
            raise AgentUnavailable(f"agent {self.agent.name!r} is gone (deleted or restarting)")
        if self.prompt is None:
            # The program's half of this turn died with the process that served it.
            raise ExternalAgentError("the ACP agent's prompt did not survive a restart of Corral or of the agent; "
                                     "send the message again")
        acp_session = await process.session_for(self.handle.session_id)
        process.sinks[acp_session] = self
        try:
            text = "\n\n".join(self.prompt)
            while True:
                if not await self._prompt(process, acp_session, text):
                    return Stopped("".join(self._parts))
                if self.handle.soft_cancel_requested:
                    # Steers stay untaken, so they are re-queued as the next run rather than lost.
                    return Finished("".join(self._parts))
                steers = self.context.take_steers()  # arrived during the prompt: they become the next one
                if not steers:
                    return Finished("".join(self._parts))
                await self.writes.settle()
                self.writes.record(steer_writes(self.handle, steers))
                text = "\n\n".join(steer.content for steer in steers)
        finally:
            if process.sinks.get(acp_session) is self:
                del process.sinks[acp_session]

    async def _prompt(self, process: AcpProcess, acp_session: str, text: str) -> bool:
        """One ``session/prompt``; False if it was stopped by a cancel."""
        prompt = asyncio.ensure_future(process.prompt(acp_session, text))
        cancel = asyncio.ensure_future(self.handle.cancel_signal.wait())
        try:
            await asyncio.wait({prompt, cancel}, return_when=asyncio.FIRST_COMPLETED)
            if not prompt.done():
                return await self._soft_cancel(process, acp_session, prompt)
            try:
                response = prompt.result()
            except Exception as exc:
                raise await process.failure(exc) from None
            self._count(response)
            return bool(response.stop_reason != "cancelled")
        except asyncio.CancelledError:  # a hard cancel: the program goes, with its other prompts
            process.kill()
            raise
        finally:
            cancel.cancel()
            prompt.cancel()

    async def _soft_cancel(self, process: AcpProcess, acp_session: str, prompt: asyncio.Future[Any]) -> bool:
        await process.cancel(acp_session)
        try:
            async with asyncio.timeout(process.spec.cancel_grace_s):
                await asyncio.wait({prompt})
        except TimeoutError:
            process.kill()  # it did not stop when asked
        return False

    def _count(self, response: Any) -> None:
        usage = getattr(response, "usage", None)
        if usage is not None:
            self.usage["input_tokens"] += int(getattr(usage, "input_tokens", 0) or 0)
            self.usage["output_tokens"] += int(getattr(usage, "output_tokens", 0) or 0)

    # --- the session's updates, routed here by AcpProcess ------------------------------

    def on_update(self, update: Any) -> None:
        if isinstance(update, AgentMessageChunk):
            if isinstance(update.content, TextContentBlock) and update.content.text:
                text = clean(update.content.text)  # corral/text.py: what the program says must be storable
                self._parts.append(text)
                self._emit(EventType.MESSAGE_DELTA, {"text": text})
        elif isinstance(update, ToolCallStart):
            self._tools[update.tool_call_id] = update.title
            self._emit(EventType.TOOL_STARTED, {"call_id": update.tool_call_id, "tool": update.title,
                                                "arguments": _arguments(update.raw_input), "kind": update.kind})
            if update.status in ("completed", "failed"):
                self._completed(update)
        elif isinstance(update, ToolCallProgress):
            if update.title:
                self._tools[update.tool_call_id] = update.title
            if update.status in ("completed", "failed"):
                self._completed(update)

    def _completed(self, update: ToolCallStart | ToolCallProgress) -> None:
        self._emit(EventType.TOOL_COMPLETED, {
            "call_id": update.tool_call_id, "tool": self._tools.get(update.tool_call_id, "tool"),
            "result": _result_text(update), "is_error": update.status == "failed"})

    async def on_permission(
        self, tool_call: ToolCallUpdate, options: list[PermissionOption]
    ) -> RequestPermissionResponse:
        call_id, again = tool_call.tool_call_id[:56], 1
        while call_id in self._asked:  # asked again about one call: each question is its own approval
            again += 1
            call_id = f"{tool_call.tool_call_id[:56]}#{again}"
        self._asked.add(call_id)
        name = (tool_call.title or self._tools.get(tool_call.tool_call_id) or tool_call.kind or "tool")[:128]
        call = ToolCall(call_id, name, _arguments(tool_call.raw_input))
        decision = await self.context.ask_approval(self.handle.run_id, call)
        if decision is None:
            return CANCELLED
        kinds = ALLOW_KINDS if decision is ApprovalStatus.APPROVED else REJECT_KINDS
        for kind in kinds:
            for option in options:
                if option.kind == kind:
                    return RequestPermissionResponse(outcome=AllowedOutcome(outcome="selected",
                                                                            option_id=option.option_id))
        return CANCELLED  # the agent offered no option that says what the human said

    def _emit(self, type_: EventType, data: dict[str, Any]) -> None:
        self.context.store.emit([NewEvent(self.handle.session_id, type_, self.handle.run_id, clean_json(data))])


def _arguments(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    return dict(raw) if isinstance(raw, dict) else {"input": raw}


def _result_text(update: ToolCallStart | ToolCallProgress) -> str:
    texts = [item.content.text for item in update.content or ()
             if getattr(item, "type", None) == "content" and isinstance(item.content, TextContentBlock)]
    if texts:
        return "\n".join(texts)
    raw = update.raw_output
    if raw is None:
        return ""
    return raw if isinstance(raw, str) else json.dumps(raw, default=str)
