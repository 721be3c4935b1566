"""The peer's workload: a LangGraph graph whose only node sleeps 50 ms.

It stands for the demo model's ``latency_ms=50`` with no tokens: each run costs the server
one 50 ms wait and whatever the runtime adds around it, which is what the comparison measures.
Loaded by ``langgraph dev`` (see langgraph.json) inside the peer's own venv, never by Corral.
"""

from __future__ import annotations

import asyncio
from typing import TypedDict

from langgraph.graph import END, START, StateGraph


class State(TypedDict, total=False):
    content: str
    reply: str


async def model(state: State) -> State:
    """Stand-in for a 50 ms model call (non-blocking, like the demo model's latency)."""
    await asyncio.sleep(0.05)
    return {"reply": "echo: " + state.get("content", "")}


builder = StateGraph(State)
builder.add_node("model", model)
builder.add_edge(START, "model")
builder.add_edge("model", END)
graph = builder.compile()
