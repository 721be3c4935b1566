"""What the kernel needs from the layers around it, as protocols it owns.

The kernel decides who runs when; it does not know how a run talks to a model, how a
program is spawned or how rows are laid out. Those come in through these ports:

- a :class:`Runner` drives one run (the step loop over a model, or an external ACP
  agent) and returns an :data:`Outcome`; the kernel records it;
- :class:`Backends` bring up what an agent needs (a provider, an external program, MCP
  servers) and build a run's runner; ``corral.wiring`` assembles the real ones;
- :class:`KernelStore` is the store as the kernel uses it: named operations over
  plain records (``corral.records``), never tables or SQL;
- in a cluster, :class:`Ownership` says which node a session's lane lives on, and
  :class:`RemoteSubmit` sends a service's message to that node (``corral.cluster``).

Loop and drivers import these types (and the run and agent types) from the kernel and
nothing else of it, so no import cycle runs between the layers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from corral.events import Event, NewEvent
from corral.records import Writes

if TYPE_CHECKING:
    from corral.kernel.agents import AgentRuntime
    from corral.kernel.conversations import Conversations
    from corral.kernel.runs import RunHandle
    from corral.kernel.sessions import Accepted
    from corral.metrics import Metrics
    from corral.providers.base import Provider, ToolCall
    from corral.specs import AgentSpec
    from corral.tools.base import Tool
    from corral.types import ApprovalStatus, ExecPolicy, Mode

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


# --- a run's outcome, as a runner reports it -----------------------------------------


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
    """The step needs decisions on ``calls`` and the client's results of ``client_calls`` (calls of
    the tools its request brought); the run should wait, holding nothing. ``usage``: the tokens its
    model calls took so far."""

    calls: list[ToolCall]
    client_calls: list[ToolCall] = field(default_factory=list)
    usage: dict[str, int] | None = None


Outcome = Finished | Stopped | Parked


class Runner(Protocol):
    """Drives one run from where it stands to an outcome.

    It may record steps through ``RunContext.store.record`` but never changes the run's
    state: the kernel does that with the outcome. ``usage`` is read after ``run``.
    """

    usage: dict[str, int]

    async def run(self) -> Outcome: ...


AskApproval = Callable[[str, "ToolCall"], Awaitable["ApprovalStatus | None"]]


@dataclass(frozen=True)
class RunContext:
    """Everything a runner may use, handed over by the kernel for one run."""

    store: KernelStore
    conversations: Conversations
    agent: AgentRuntime
    handle: RunHandle
    # The run's input texts; None when it resumes (after approvals, or a restart).
    prompt: list[str] | None
    take_steers: Callable[[], list[SteerInput]]
    ask_approval: AskApproval
    tool_slot: asyncio.Semaphore
    workspace: Path
    metrics: Metrics


# --- what an agent's start brings up ----------------------------------------------


class ExternalAgent(Protocol):
    """An external agent's program (driver ``acp``), in place of a provider."""

    @property
    def killed(self) -> bool: ...

    @property
    def exit_code(self) -> int | None: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class McpServers(Protocol):
    """An agent's MCP servers, started with the agent; their tools join the agent's."""

    def start(self, spawn: Spawn) -> None: ...

    def tools(self) -> dict[str, Tool]: ...

    def statuses(self) -> list[Any]:
        """Each server's state, for the agent's view."""
        ...

    def stop_nowait(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Backends:
    """The factories the kernel starts agents and runs with (``corral.wiring.default_backends``)."""

    runner: Callable[[RunContext], Runner]
    # Refuses a spec its provider cannot serve (``InvalidInput``), before anything is stored.
    validate: Callable[[AgentSpec], None]
    provider: Callable[[AgentSpec], Provider]
    # (spec, workspace, on_exit): the program of an ACP agent, not yet started.
    external_agent: Callable[[AgentSpec, Path, Callable[[Any], None]], ExternalAgent]
    # (agent name, server configs, on_tools_changed): the agent's MCP servers, not yet started.
    mcp: Callable[[str, Any, Callable[[], None]], McpServers]


# --- where a session's lane lives ----------------------------------------------------


class Ownership(Protocol):
    """Which node a session's lane lives on (a cluster on Postgres; absent on one node).

    ``claim`` is called when a session is loaded into memory, before its lane is used.
    """

    @property
    def node_id(self) -> str: ...

    async def claim(self, session_id: str) -> bool:
        """Take the session's lane for this node: True if it was just taken from nobody (or
        from a node that left or died), so its unfinished runs must be recovered first.
        Raises ``OwnedElsewhere`` if a live node holds it, ``StoreUnavailable`` while its
        owner's lease runs out, ``NotFound`` for no such session."""
        ...


class RemoteSubmit(Protocol):
    """Sends a message to the node that holds its session (a cluster's services use it)."""

    async def submit(self, url: str, session_id: str, content: str, *, mode: Mode, policy: ExecPolicy,
                     idempotency_key: str | None) -> Accepted: ...


# --- the store, as the kernel uses it ----------------------------------------------


class KernelStore(Protocol):
    """Named store operations. Writes return at once with the unit's future (FIFO with
    every other write); it fails with ``StoreUnavailable`` or ``StoreConflict``."""

    def accept(self, writes: Writes) -> asyncio.Future[Any]: ...

    def begin_run(self, writes: Writes) -> asyncio.Future[Any]: ...

    def end_run(self, writes: Writes) -> asyncio.Future[Any]: ...

    def record(self, writes: Writes) -> asyncio.Future[Any]: ...

    def emit(self, events: list[NewEvent]) -> None: ...

    async def create_session(self, row: dict[str, Any], history: list[Any]) -> None: ...

    async def create_agent(self, row: dict[str, Any]) -> None: ...

    async def delete_agent(self, name: str) -> None: ...

    async def session_state(self, session_id: str) -> tuple[Any, tuple[int, float], int]: ...

    async def session_by_key(self, owner: str, key: str) -> Any: ...

    async def run_row(self, run_id: str) -> Any: ...

    async def input_by_key(self, session_id: str, key: str) -> Any: ...

    async def unfinished_work(self, session_id: str | None = None) -> tuple[list[Any], Any, Any]: ...

    async def all_agents(self) -> Any: ...

    async def approvals_of_run(self, run_id: str) -> Any: ...

    async def unanswered_client_calls(self, run_ids: list[str]) -> Any:
        """The calls of client tools these runs still wait on (rows with ``run_id, call_id, tool,
        arguments, created_at``), oldest first."""
        ...

    async def client_calls_by_id(self, call_ids: list[str]) -> Any:
        """Client calls with these ids, answered or not, with ``run_status``, ``owner``, ``agent``."""
        ...

    async def last_event_seq(self, session_id: str) -> int: ...

    async def events_after(self, session_id: str, after: int, *, run_id: str | None = None,
                           limit: int = 1000) -> list[Event]: ...

    async def conversation(self, session_id: str) -> tuple[Any, Any]: ...

    async def messages_after(self, session_id: str, after_id: int) -> Any: ...

    def on_messages(self, hook: Callable[[list[dict[str, Any]] | None], None]) -> None:
        """Call ``hook`` on the loop with the messages each commit inserted (rows with their
        ``id``), before the commit's writes resolve; with None if they cannot be told."""
        ...
