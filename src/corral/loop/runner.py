"""The agent step loop: context, model call, tool calls, steering.

One step is: check for a soft cancel, take steering messages, call the model
(holding a provider slot only for the call), then run the step's tool calls
concurrently. The loop reads and appends state through the store so that a run
parked for an approval can be resumed from the store alone, even after a restart.
State transitions belong to the kernel: the loop returns an outcome and the kernel
records it.

A client's request may add tools of its own (the run's ``ModelOptions``): they are offered
with the agent's, and a call of one is not run here: the run parks (``Parked.client_calls``)
until the client sends the result (``kernel/client_tools.py``), as it parks for an approval.

What a step records (its tool calls, their results, the steers it took) is written
without waiting, but never forgotten: before each model call and before the outcome,
the loop waits for those writes, and one that failed fails the run
(``RunWriteFailed``) rather than let it go on with a history that lacks it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass, field
from typing import Any

from corral import tracing
from corral.clock import utcnow
from corral.errors import AgentUnavailable, CorralError, RunWriteFailed, StepLimitExceeded, ToolError
from corral.events import NewEvent
from corral.kernel.agents import AgentRuntime
from corral.kernel.conversations import Conversations, StoredMessage
from corral.kernel.ports import Finished, KernelStore, Outcome, Parked, RunContext, SteerInput, Stopped
from corral.kernel.runs import RunHandle
from corral.loop.compaction import choose_cut, estimate_tokens, summary_message, summary_request
from corral.loop.messages import build_context, steps_taken, unresolved_calls
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
from corral.records import InputMove, NewCompaction, NewMessage, Writes
from corral.text import clean, clean_json
from corral.tools.base import ToolContext
from corral.types import Approval, ApprovalStatus, EventType, ExecPolicy, InputStatus

log = logging.getLogger(__name__)


class _SoftStop(Exception):
    def __init__(self, partial: str):
        self.partial = partial


class RunWrites:
    """The writes a run made without waiting, until each is known to have committed."""

    def __init__(self, store: KernelStore):
        self._store = store
        self._pending: list[asyncio.Future[Any]] = []

    def record(self, writes: Writes) -> None:
        self._pending.append(self._store.record(writes))

    async def settle(self) -> None:
        """Wait for every write made so far; raise ``RunWriteFailed`` if one of them failed."""
        pending, self._pending = self._pending, []
        for future in pending:
            try:
                await asyncio.shield(future)
            except CorralError as exc:
                raise RunWriteFailed(f"a write of this run failed, so its history would be incomplete: {exc}"
                                     ) from exc


@dataclass
class ContextRunner:
    """What every runner shares: the run's context, its token counts, and its unawaited writes."""

    context: RunContext
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0})
    writes: RunWrites = field(init=False)

    def __post_init__(self) -> None:
        self.writes = RunWrites(self.context.store)

    @property
    def store(self) -> KernelStore:
        return self.context.store

    @property
    def agent(self) -> AgentRuntime:
        return self.context.agent

    @property
    def handle(self) -> RunHandle:
        return self.context.handle


@dataclass
class StepLoop(ContextRunner):
    @property
    def conversations(self) -> Conversations:
        return self.context.conversations

    @property
    def policy(self) -> ExecPolicy:
        return self.handle.slot.policy

    @property
    def run_id(self) -> str:
        return self.handle.run_id

    @property
    def session_id(self) -> str:
        return self.handle.session_id

    async def run(self) -> Outcome:
        try:
            outcome: Outcome = await self._run()
        except _SoftStop as stop:
            outcome = Stopped(stop.partial)
        await self.writes.settle()
        return outcome

    async def _run(self) -> Outcome:
        compaction, rows = await self.conversations.read(self.session_id)
        summary = compaction.summary if compaction is not None else None
        steps = steps_taken(rows, self.run_id)
        pending = unresolved_calls(rows, self.run_id)
        if not pending:  # a resuming run keeps the context its calls were made in
            summary, rows = await self._compact_if_needed(summary, rows)
        context = self._fixed(summary) + build_context(rows, self.run_id)
        if pending:  # resuming after approvals (or a restart while waiting)
            approvals = await self.store.approvals_of_run(self.run_id)
            decided = {a.call_id: ApprovalStatus(a.status) for a in approvals}
            parked = await self._run_calls(pending, context, decided)
            if parked is not None:
                return parked
        while True:
            # Cancel first: a stopping run must leave its steers untaken, so they are
            # requeued as the next run instead of dying (or being rolled back) with it.
            if self.handle.soft_cancel_requested:
                raise _SoftStop("")
            self._steer(context)
            if steps >= self.agent.spec.max_steps:
                raise StepLimitExceeded(f"the run used all {self.agent.spec.max_steps} steps of its agent")
            await self.writes.settle()  # the model never sees a step whose record failed
            text, calls = await self._call_model(context)
            if not calls:
                return Finished(text)
            steps += 1
            context.append(ChatMessage("assistant", text, tuple(calls)))
            self._record_step(text, calls)
            parked = await self._run_calls(calls, context, {})
            if parked is not None:
                return parked

    def _record_step(self, text: str, calls: list[ToolCall]) -> None:
        tool_calls = [c.as_json() for c in calls]
        message = NewMessage(self.session_id, self.run_id, "assistant", text, tool_calls=tool_calls)
        event = self._event(EventType.MESSAGE_COMPLETED, {"role": "assistant", "content": text,
                                                          "tool_calls": tool_calls})
        self.writes.record(Writes(messages=[message], events=[event]))

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
        compaction = NewCompaction(self.session_id, self.run_id, cut.through_message_id, new_summary, utcnow())
        event = self._event(EventType.CONTEXT_COMPACTED, {
            "through_message_id": cut.through_message_id, "messages_summarised": cut.index,
            "tokens_before": before, "tokens_after": after})
        self.conversations.forget(self.session_id)
        await self.store.record(Writes(compactions=[compaction], events=[event]))
        return new_summary, kept

    async def _summarise(self, messages: list[ChatMessage]) -> str:
        provider = self._provider()
        async with self._model_slot():
            text, usage = await reply_text(provider, ModelRequest(messages, (), purpose="summary"))
        self._count(usage)
        return text.strip()

    def _steer(self, context: list[ChatMessage]) -> None:
        steers = self.context.take_steers()
        if not steers:
            return
        self.writes.record(steer_writes(self.handle, steers))
        context.extend(ChatMessage("user", s.content) for s in steers)

    def _request(self, context: list[ChatMessage]) -> ModelRequest:
        """The model call: the agent's tools, and what the client's request added (its own tools
        first, shadowing an agent tool of the same name; its tool_choice; its response_format)."""
        specs = [tool.spec() for tool in self.agent.tools.values()]
        options = self.handle.slot.model_options
        if options is None:
            return ModelRequest(list(context), specs)
        names = options.tool_names
        choice = options.tool_choice
        if choice is not None and choice.forces and not self.handle.choice_pending:
            choice = None  # a forced tool binds the request's first model call only
        return ModelRequest(list(context), [*options.tools, *(s for s in specs if s.name not in names)],
                            tool_choice=choice, response_format=options.response_format)

    async def _call_model(self, context: list[ChatMessage]) -> tuple[str, list[ToolCall]]:
        provider = self._provider()
        request = self._request(context)
        self.handle.choice_pending = False
        parts: list[str] = []
        calls: list[ToolCall] = []
        asked = time.perf_counter()
        async with self._model_slot(), tracing.model_call(provider.name, self.agent.spec.model, benign=(_SoftStop,)):
            began = time.perf_counter()
            priority = "background" if self.handle.background else "interactive"
            self.context.metrics.provider_slot_wait.labels(priority).observe(began - asked)
            async with aclosing(provider.stream(request)) as stream:
                async for part in stream:
                    if isinstance(part, TextDelta):
                        delta = clean(part.text)  # corral/text.py: what a model says must be storable
                        parts.append(delta)
                        self.store.emit([self._event(EventType.MESSAGE_DELTA, {"text": delta})])
                        if self.handle.soft_cancel_requested:
                            raise _SoftStop("".join(parts))
                    elif isinstance(part, ToolCallsPart):
                        calls.extend(ToolCall(c.id, clean(c.name), clean_json(c.arguments)) for c in part.calls)
                    elif isinstance(part, Usage):
                        self._count(part)
            self.context.metrics.model_call.labels(provider.name).observe(time.perf_counter() - began)
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
    ) -> Parked | None:
        """Run what may run now, concurrently; return what the run must wait for: the calls that
        need a decision, and the calls of the client's own tools (the client runs them)."""
        needs_decision: list[ToolCall] = []
        client_calls: list[ToolCall] = []
        runnable: list[ToolCall] = []
        results: dict[str, str] = {}
        options = self.handle.slot.model_options
        client_names = options.tool_names if options is not None else frozenset()
        for call in calls:
            verdict = decided.get(call.id)
            if call.name in client_names and verdict is None:
                client_calls.append(call)
            elif verdict is ApprovalStatus.DENIED:
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
        if not needs_decision and not client_calls:
            return None
        return Parked(needs_decision, client_calls, dict(self.usage))

    def _approval_for(self, tool: str) -> Approval:
        if self.policy is ExecPolicy.PAUSE:
            return Approval.DENY if self.agent.spec.policy.approval_for(tool) is Approval.DENY else Approval.ASK
        return self.agent.spec.policy.approval_for(tool)

    @tracing.tool_call
    async def _run_one(self, call: ToolCall) -> str:
        tool = self.agent.tools.get(call.name)  # MCP tools come and go with their servers' listings
        self.store.emit([self._event(EventType.TOOL_STARTED, {"call_id": call.id, "tool": call.name,
                                                             "arguments": call.arguments})])
        context = ToolContext(self.run_id, self.session_id, self.agent.name, self.context.workspace)
        is_error = False
        try:
            if tool is None:
                raise ToolError(f"unknown tool {call.name!r} (no longer listed by its MCP server)")
            began = time.perf_counter()
            if tool.spawns_process:
                async with self.context.tool_slot:
                    self.context.metrics.tool_slot_wait.observe(time.perf_counter() - began)
                    began = time.perf_counter()
                    text = await tool.call(call.arguments, context)
            else:
                text = await tool.call(call.arguments, context)
            self.context.metrics.tool_call.labels(call.name).observe(time.perf_counter() - began)
        except ToolError as exc:
            tracing.record_error(exc)
            text, is_error = f"error: {exc}", True
        except Exception as exc:  # a tool bug must not take the run down: the model sees it
            tracing.record_error(exc)
            log.exception("tool %s failed", call.name)
            text, is_error = f"error: {call.name} failed: {type(exc).__name__}: {exc}", True
        text = clean(text)  # a tool's (or an MCP server's) output may hold a NUL or a lone surrogate
        self._record_result(call, text, is_error=is_error)
        return text

    def _record_result(self, call: ToolCall, text: str, *, is_error: bool) -> None:
        message = NewMessage(self.session_id, self.run_id, "tool", text, tool_call_id=call.id)
        event = self._event(EventType.TOOL_COMPLETED, {"call_id": call.id, "tool": call.name,
                                                       "result": text, "is_error": is_error})
        self.writes.record(Writes(messages=[message], events=[event]))

    def _event(self, type_: EventType, data: dict[str, Any]) -> NewEvent:
        return NewEvent(self.session_id, type_, self.run_id, data)


def steer_writes(handle: RunHandle, steers: list[SteerInput]) -> Writes:
    """What taking steering messages into a run records.

    The steer's message and its input's `consumed` commit together: a restart neither
    delivers it twice nor forgets it.
    """
    sid, run_id = handle.session_id, handle.run_id
    return Writes(
        messages=[NewMessage(sid, run_id, "user", s.content, input_id=s.input_id) for s in steers],
        input_moves=[InputMove([s.input_id for s in steers], InputStatus.CONSUMED)],
        events=[NewEvent(sid, EventType.RUN_STEERED, run_id, {"input_id": s.input_id, "content": s.content})
                for s in steers],
    )
