"""Built-in tools that need nothing outside the process."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from corral.tools.base import Tool, ToolContext


class WaitArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ms: float = Field(ge=0, le=24 * 3600 * 1000, description="how long to wait, in milliseconds")


async def _wait(args: WaitArgs, context: ToolContext) -> str:
    await asyncio.sleep(args.ms / 1000)
    return f"waited {args.ms:g} ms"


class EchoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str


async def _echo(args: EchoArgs, context: ToolContext) -> str:
    return args.text


WAIT = Tool("wait", "Wait for a number of milliseconds (cancellable).", WaitArgs, _wait)
ECHO = Tool("echo", "Return the given text unchanged.", EchoArgs, _echo)

BUILTIN_TOOLS = (WAIT, ECHO)
