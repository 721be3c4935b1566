"""The agent step loop: context, model call, tool calls, steering.

One step is: check for a soft cancel, take steering messages, call the model
(holding a provider slot only for the call), then run the step's tool calls
concurrently. The loop reads and appends state through the store so that a run
parked for an approval can be resumed from the store alone, even after a restart.
State transitions belong to the kernel: the loop returns an outcome and the kernel
records it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral import tracing
from corral.clock import utcnow
from corral.errors import AgentUnavailable, StepLimitExceeded, ToolError
from corral.kernel.agents import AgentRuntime
from corral.kernel.conversations import Conversations
from corral.kernel.runs import RunHandle
from corral.loop.compaction import choose_cut, estimate_tokens, summary_message, summary_request
from corral.loop.messages import StoredMessage, build_context, message_row, steps_taken, unresolved_calls
from corral.metrics import Metrics
from corral.providers.base import (
    ChatMessage,
    ModelRequest,
    Provider,
    TextDelta,
    ToolCall,
    ToolCallsPart,
    Usage,
    reply_text,
)
from corral.store import NewEvent, Store, ops, repo
from corral.store import tables as t
from corral.tools.base import ToolContext
from corral.types import Approval, ApprovalStatus, EventType, ExecPolicy, InputStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SteerInput:
    input_id: str
    content: str


@dataclass(frozen=True)
class Finished:
    text: str


@dataclass(frozen=True)
class Stopped:
    """A soft cancel was honoured at a boundary; ``partial`` is the text so far."""

    partial: str


@dataclass(frozen=True)
class Parked:
    """The step needs decisions on these calls; the run should wait, holding nothing."""

    calls: list[ToolCall]


Outcome = Finished | Stopped | Parked


class _SoftStop(Exception):
    def __init__(self, partial: str):
        self.partial = partial


@dataclass
class StepLoop:
    store: Store
    conversations: Conversations
    agent: AgentRuntime
    handle: RunHandle
    policy: ExecPolicy
    take_steers: Callable[[], list[SteerInput]]
    tool_slot: asyncio.Semaphore
    workspace: Path
    metrics: Metrics
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0})

    @property
    def run_id(self) -> str:
        return self.handle.run_id

    @property
    def session_id(self) -> str:
        return self.handle.session_id

    async def run(self) -> Outcome:
        try:
            return await self._run()
        except _SoftStop as stop:
            return Stopped(stop.partial)

    async def _run(self) -> Outcome:
        compaction, rows = await self.conversations.read(self.session_id)
        summary = compaction.summary if compaction is not None else None
        steps = steps_taken(rows, self.run_id)
        pending = unresolved_calls(rows, self.run_id)
        if not pending:  # a resuming run keeps the context its calls were made in
            summary, rows = await self._compact_if_needed(summary, rows)
        context = self._fixed(summary) + build_context(rows, self.run_id)
        if pending:  # resuming after approvals (or a restart while waiting)
            approvals = await self.store.read(repo.approvals_of_run, self.run_id)
            decided = {a.call_id: ApprovalStatus(a.status) for a in approvals}
            parked = await self._run_calls(pending, context, decided)
            if parked:
                return Parked(parked)
        while True:
            # Cancel first: a stopping run must leave its steers untaken, so they are
            # requeued as the next run instead of dying (or being rolled back) with it.
            if self.handle.soft_cancel_requested:
                raise _SoftStop("")
            self._steer(context)
            if steps >= self.agent.spec.max_steps:
                raise StepLimitExceeded(f"the run used all {self.agent.spec.max_steps} steps of its agent")
            text, calls = await self._call_model(context)
            if not calls:
                return Finished(text)
            steps += 1
            context.append(ChatMessage("assistant", text, tuple(calls)))
            self._record_step(text, calls)
            parked = await self._run_calls(calls, context, {})
            if parked:
                return Parked(parked)

    def _record_step(self, text: str, calls: list[ToolCall]) -> None:
        row = message_row(self.session_id, self.run_id, "assistant", text, tool_calls=calls)
        event = self._event(EventType.MESSAGE_COMPLETED, {"role": "assistant", "content": text,
                                                          "tool_calls": [c.as_json() for c in calls]})
        self.store.submit([ops.Insert(t.messages, [row])], [event]).add_done_callback(_raise_later)

    def _fixed(self, summary: str | None) -> list[ChatMessage]:
        """What precedes the conversation: the agent's system prompt and the compaction summary."""
        prompt = self.agent.spec.system_prompt
        fixed = [ChatMessage("system", prompt)] if prompt else []
        return fixed + ([summary_message(summary)] if summary else [])

    async def _compact_if_needed(
        self, summary: str | None, rows: Sequence[StoredMessage]
    ) -> tuple[str | None, Sequence[StoredMessage]]:
        budget = self.agent.spec.context_budget_tokens
        if budget is None:
            return summary, rows
        fixed = self._fixed(summary)
        before = estimate_tokens(fixed + build_context(rows, self.run_id))
        if before <= budget:
            return summary, rows
        cut = choose_cut(rows, self.run_id, budget, fixed)
        if cut is None:
            return summary, rows
        new_summary = await self._summarise(summary_request(summary, rows[: cut.index]))
        kept = rows[cut.index :]
        after = estimate_tokens(self._fixed(new_summary) + build_context(kept, self.run_id))
        row = {"session_id": self.session_id, "run_id": self.run_id, "through_message_id": cut.through_message_id,
               "summary": new_summary, "created_at": utcnow()}
        event = self._event(EventType.CONTEXT_COMPACTED, {
            "through_message_id": cut.through_message_id, "messages_summarised": cut.index,
            "tokens_before": before, "tokens_after": after})
        self.conversations.forget(self.session_id)
        await self.store.write([ops.Insert(t.compactions, [row])], [event])
        return new_summary, kept

    async def _summarise(self, messages: list[ChatMessage]) -> str:
        provider = self._provider()
        async with self._model_slot():
            text, usage = await reply_text(provider, ModelRequest(messages, (), purpose="summary"))
        self._count(usage)
        return text.strip()

    def _steer(self, context: list[ChatMessage]) -> None:
        steers = self.take_steers()
        if not steers:
            return
        record_steers(self.store, self.handle, steers)
        context.extend(ChatMessage("user", s.content) for s in steers)

    async def _call_model(self, context: list[ChatMessage]) -> tuple[str, list[ToolCall]]:
        provider = self._provider()
        specs = [tool.spec() for tool in self.agent.tools.values()]
        parts: list[str] = []
        calls: list[ToolCall] = []
        asked = time.perf_counter()
        async with self._model_slot(), tracing.model_call(provider.name, self.agent.spec.model, benign=(_SoftStop,)):
            began = time.perf_counter()
            priority = "background" if self.handle.background else "interactive"
            self.metrics.provider_slot_wait.labels(priority).observe(began - asked)
            async with aclosing(provider.stream(ModelRequest(list(context), specs))) as stream:
                async for part in stream:
                    if isinstance(part, TextDelta):
                        parts.append(part.text)
                        self.store.writer.emit([self._event(EventType.MESSAGE_DELTA, {"text": part.text})])
                        if self.handle.soft_cancel_requested:
                            raise _SoftStop("".join(parts))
                    elif isinstance(part, ToolCallsPart):
                        calls.extend(part.calls)
                    elif isinstance(part, Usage):
                        self._count(part)
            self.metrics.model_call.labels(provider.name).observe(time.perf_counter() - began)
        return "".join(parts), calls

    def _model_slot(self) -> AbstractAsyncContextManager[None]:
        slot = self.agent.slot
        return slot.background() if self.handle.background else slot

    def _provider(self) -> Provider:
        provider = self.agent.provider
        if provider is None:  # runs start only on ready agents, so it was closed since: deleted or stopping
            raise AgentUnavailable(f"agent {self.agent.name!r} is gone (deleted or stopping)")
        return provider

    def _count(self, usage: Usage) -> None:
        self.usage["input_tokens"] += usage.input_tokens
        self.usage["output_tokens"] += usage.output_tokens

    async def _run_calls(
        self, calls: list[ToolCall], context: list[ChatMessage], decided: dict[str, ApprovalStatus]
    ) -> list[ToolCall]:
        """Run what may run now, concurrently; return the calls that need a decision."""
        needs_decision: list[ToolCall] = []
        runnable: list[ToolCall] = []
        results: dict[str, str] = {}
        for call in calls:
            verdict = decided.get(call.id)
            if verdict is ApprovalStatus.DENIED:
                results[call.id] = f"error: the call to {call.name} was denied by a human"
            elif verdict is ApprovalStatus.APPROVED:
                runnable.append(call)
            elif verdict is ApprovalStatus.PENDING:
                needs_decision.append(call)
            else:
                approval = self._approval_for(call.name)
                if call.name not in self.agent.tools:
                    results[call.id] = f"error: unknown tool {call.name!r}"
                elif approval is Approval.DENY:
                    results[call.id] = f"error: the policy denies the tool {call.name}"
                elif approval is Approval.ASK:
                    needs_decision.append(call)
                else:
                    runnable.append(call)
        for call_id, text in results.items():
            call = next(c for c in calls if c.id == call_id)
            self._record_result(call, text, is_error=True)
        async with asyncio.TaskGroup() as group:
            tasks = {call.id: group.create_task(self._run_one(call)) for call in runnable}
        for call_id, task in tasks.items():
            results[call_id] = task.result()
        for call in calls:
            if call.id in results:
                context.append(ChatMessage("tool", results[call.id], tool_call_id=call.id))
        return needs_decision

    def _approval_for(self, tool: str) -> Approval:
        if self.policy is ExecPolicy.PAUSE:
            return Approval.DENY if self.agent.spec.policy.approval_for(tool) is Approval.DENY else Approval.ASK
        return self.agent.spec.policy.approval_for(tool)

    @tracing.tool_call
    async def _run_one(self, call: ToolCall) -> str:
        tool = self.agent.tools.get(call.name)  # MCP tools come and go with their servers' listings
        self.store.writer.emit([self._event(EventType.TOOL_STARTED, {"call_id": call.id, "tool": call.name,
                                                                    "arguments": call.arguments})])
        context = ToolContext(self.run_id, self.session_id, self.agent.name, self.workspace)
        is_error = False
        try:
            if tool is None:
                raise ToolError(f"unknown tool {call.name!r} (no longer listed by its MCP server)")
            began = time.perf_counter()
            if tool.spawns_process:
                async with self.tool_slot:
                    self.metrics.tool_slot_wait.observe(time.perf_counter() - began)
                    began = time.perf_counter()
                    text = await tool.call(call.arguments, context)
            else:
                text = await tool.call(call.arguments, context)
            self.metrics.tool_call.labels(call.name).observe(time.perf_counter() - began)
        except ToolError as exc:
            tracing.record_error(exc)
            text, is_error = f"error: {exc}", True
        except Exception as exc:  # a tool bug must not take the run down: the model sees it
            tracing.record_error(exc)
            log.exception("tool %s failed", call.name)
            text, is_error = f"error: {call.name} failed: {type(exc).__name__}: {exc}", True
        self._record_result(call, text, is_error=is_error)
        return text

    def _record_result(self, call: ToolCall, text: str, *, is_error: bool) -> None:
        row = message_row(self.session_id, self.run_id, "tool", text, tool_call_id=call.id)
        event = self._event(EventType.TOOL_COMPLETED, {"call_id": call.id, "tool": call.name,
                                                       "result": text, "is_error": is_error})
        self.store.submit([ops.Insert(t.messages, [row])], [event]).add_done_callback(_raise_later)

    def _event(self, type_: EventType, data: dict[str, Any]) -> NewEvent:
        return NewEvent(self.session_id, type_, self.run_id, data)


def record_steers(store: Store, handle: RunHandle, steers: list[SteerInput]) -> None:
    """Record steering messages as part of the run.

    The steer's message and its input's `consumed` commit together: a restart neither
    delivers it twice nor forgets it.
    """
    sid, run_id = handle.session_id, handle.run_id
    rows = [message_row(sid, run_id, "user", s.content, input_id=s.input_id) for s in steers]
    events = [NewEvent(sid, EventType.RUN_STEERED, run_id, {"input_id": s.input_id, "content": s.content})
              for s in steers]
    unit: list[ops.Op] = [ops.Insert(t.messages, rows),
                          ops.MoveInputs([s.input_id for s in steers], InputStatus.CONSUMED.value)]
    store.submit(unit, events).add_done_callback(_raise_later)


def _raise_later(future: asyncio.Future[Any]) -> None:
    """Surface a failed background write in the log (the run's final write will fail too)."""
    if not future.cancelled() and future.exception() is not None:
        log.error("a run write failed", exc_info=future.exception())
