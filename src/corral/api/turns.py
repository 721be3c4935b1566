"""A turn of an OpenAI-style client, whatever its wire format: started with the client's own tools,
resumed with their results, and followed to where the client must act.

The OpenAI endpoints (chat completions, ``api/chat_tools.py``; the Responses API) differ only in
their wire formats; what a request does to Corral is one of two things:

- ``begin_turn``: a new input (the user's text) in a session, with what the request adds to the
  run's model calls (``ModelOptions``: the client's own tools, tool_choice, response_format). A
  run of the same session that still waits for this client's tool results is answered from the
  request's history when the history has them all, and otherwise abandoned (cancelled): the
  client moved on without them.
- ``resume_turn``: the client's results of the calls a run waits for (``{call id: text}``). The
  run is found by those call ids (so a client that pins no session needs nothing else), the
  results are recorded, and the same run goes on.

Either gives a :class:`Turn`; ``follow`` then yields what the client sees of it: the text as the
model streams it (:class:`TurnText`), and finally either :class:`TurnCalls` (the run parked,
waiting for the client's results of these calls) or :class:`TurnEnded` (the run's end). A
stream that stops without either means the server is stopping: the run goes on after a restart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from corral.errors import InvalidInput
from corral.kernel import Kernel
from corral.principals import Principal
from corral.providers.base import ChatMessage, ModelOptions, ToolCall
from corral.types import EventType, RunStatus


@dataclass(frozen=True)
class Turn:
    """A request's share of a run: the run's events after ``after``, once the results of
    ``answered`` (call ids) are among them (a retried request re-reads the run from its start)."""

    session_id: str
    run_id: str
    after: int = 0
    answered: frozenset[str] = frozenset()

    @property
    def id(self) -> str:
        """Unique per turn, and the same for a retry of the request: the run, and for a resumed
        run the first call it was answered for (clients such as LangGraph key messages by it)."""
        return self.run_id if not self.answered else f"{self.run_id}-{min(self.answered)}"


@dataclass(frozen=True)
class TurnText:
    text: str


@dataclass(frozen=True)
class TurnCalls:
    """The run waits for the client's results of ``calls``; ``text`` is what the model said with them."""

    calls: list[ToolCall]
    text: str
    usage: dict[str, int]


@dataclass(frozen=True)
class TurnEnded:
    status: RunStatus
    output: str | None
    error: dict[str, Any] | None
    usage: dict[str, int] | None


TurnEvent = TurnText | TurnCalls | TurnEnded


@dataclass(frozen=True)
class Begun:
    turn: Turn
    duplicate: bool = False  # an Idempotency-Key seen before: the run its first request started
    created: bool = False  # the session was created by this request


async def begin_turn(kernel: Kernel, principal: Principal, agent: str, content: str, *,
                     history: Sequence[ChatMessage] = (), key: str | None = None,
                     model_options: ModelOptions | None = None, idempotency_key: str | None = None,
                     origin: str = "openai", metadata: Mapping[str, Any] | None = None) -> Begun:
    """Submit ``content`` as a new input, in the caller's session of ``key`` (created, and seeded
    with ``history``, on first use) or in a new session seeded with ``history``.

    A run waiting for this client's tool results is settled first (see the module docstring):
    the pinned session's, and, without a pinned session, any run of the caller's that waits for
    a call ``history`` holds."""
    session, created = await kernel.sessions.create(agent, key, dict(metadata or {"channel": origin}),
                                                    owner=principal.name, history=history)
    if session["agent"] != agent:
        raise InvalidInput(f"session {key!r} belongs to agent {session['agent']!r}, not {agent!r}")
    session_id = session["id"]
    await _settle_waiting(kernel, principal, agent, session_id, history, model_options, idempotency_key,
                          pinned=key is not None and not created)
    accepted = await kernel.submit(session_id, content, origin=origin, idempotency_key=idempotency_key,
                                   model_options=model_options)
    return Begun(Turn(session_id, accepted.run_id), accepted.duplicate, created)


async def resume_turn(kernel: Kernel, principal: Principal, agent: str, results: Mapping[str, str], *,
                      key: str | None = None, model_options: ModelOptions | None = None) -> Turn:
    """Send the client's ``results`` (call id -> text) to the run that waits for them, which goes on.

    The run is the one of the caller's (``key``'s session, when given) whose calls these are. The
    results must answer every call the run waits for; a retry of the same request (the results
    recorded already) follows the same run again. 400 ``InvalidInput`` otherwise."""
    ids = sorted(results)
    located = await kernel.client_tools.locate(ids, owner=None if principal.admin else principal.name, agent=agent)
    if located is None:
        raise InvalidInput(f"no run of model {agent!r} waits for the results of tool call(s) {', '.join(ids)}: "
                           "send a user message to start a new turn")
    if key is not None:
        session = await kernel.store.session_by_key(principal.name, key)
        if session is None or session.id != located.session_id:
            raise InvalidInput(f"the tool calls {', '.join(ids)} were not made in session {key!r}")
    if located.pending != frozenset(ids):
        if located.pending:  # some answered already, some not: not a retry, and not whole
            raise InvalidInput(f"the results of tool call(s) {', '.join(sorted(located.answered))} were sent "
                               "already; send the others alone")
        return Turn(located.session_id, located.run_id, 0, frozenset(ids))  # a retry: read the run again
    handle = kernel.run_handle(located.run_id)
    missing = sorted(set(handle.pending_client_calls) - set(ids)) if handle is not None else []
    if missing:
        raise InvalidInput(f"the results of tool call(s) {', '.join(missing)} are missing: the model made "
                           "them in the same step, and the run goes on with all of them")
    answered = await kernel.answer_client_calls(located.run_id, results, model_options=model_options)
    return Turn(located.session_id, located.run_id, answered.after, frozenset(ids))


async def _settle_waiting(kernel: Kernel, principal: Principal, agent: str, session_id: str,
                          history: Sequence[ChatMessage], model_options: ModelOptions | None,
                          idempotency_key: str | None, *, pinned: bool) -> None:
    results = {m.tool_call_id: m.content for m in history if m.role == "tool" and m.tool_call_id}
    parked = kernel.client_tools.pending_in(session_id)
    if parked is not None:
        if idempotency_key is not None:
            seen = await kernel.store.input_by_key(session_id, idempotency_key)
            if seen is not None and seen.run_id == parked.run_id:
                return  # a retry of the request that started it: it attaches to that run
        pending = set(parked.pending_client_calls)
        if pinned and pending <= set(results):
            await kernel.answer_client_calls(parked.run_id, {cid: results[cid] for cid in pending},
                                             model_options=model_options)
        else:
            await kernel.client_tools.abandon(parked.run_id)
    elif not pinned:
        asked = [call.id for m in history for call in m.tool_calls]
        if asked:  # a client that pins no session moved on from a run of its elsewhere
            owner = None if principal.admin else principal.name
            for run_id in await kernel.client_tools.waiting_on_any(asked, owner=owner, agent=agent):
                await kernel.client_tools.abandon(run_id)


async def follow(kernel: Kernel, turn: Turn) -> AsyncIterator[TurnEvent]:
    """What the client sees of ``turn``: the text as it streams, then the calls the run waits for,
    or its end. Ends without either only when the server is stopping."""
    waiting_for = set(turn.answered) if turn.after == 0 else set()
    step_text = ""
    async for event in kernel.hub.observe(kernel.store, turn.session_id, after=turn.after, run_id=turn.run_id,
                                          stop=kernel.stopping):
        if waiting_for:  # a retried resume: skip what happened before this request's results
            if event.type == EventType.TOOL_COMPLETED and event.data.get("call_id") in waiting_for:
                waiting_for.discard(event.data["call_id"])
            if not event.is_terminal:
                continue
        if event.type == EventType.MESSAGE_DELTA:
            yield TurnText(event.data["text"])
        elif event.type == EventType.MESSAGE_COMPLETED and event.data.get("tool_calls"):
            step_text = event.data.get("content") or ""  # what the model said with its calls
        elif event.type == EventType.RUN_WAITING and event.data.get("client_calls"):
            calls = [ToolCall.from_json(c) for c in event.data["client_calls"]]
            yield TurnCalls(calls, step_text, dict(event.data.get("usage") or {}))
            return
        elif event.is_terminal:
            data = event.data
            yield TurnEnded(RunStatus(data.get("status", RunStatus.FAILED.value)), data.get("output"),
                            data.get("error"), data.get("usage"))
            return
