"""``read_file``, ``write_file``, ``list_dir``, ``edit_file``: confined to the agent's workspace.

A path is resolved against the workspace with every symlink followed, and refused unless the
result is inside the (resolved) workspace: ``..``, absolute paths elsewhere and symlinks that
point out all fail. The final open uses ``O_NOFOLLOW``, so a symlink swapped in after the
check is refused too. File I/O runs in a thread: only the awaiting run waits for a disk.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import stat
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import ToolError
from corral.tools.base import Tool, ToolContext
from corral.tools.config import ToolSettings

MAX_LISTED = 1000


def confine(workspace: Path, path: str) -> Path:
    """The real path of ``path`` inside ``workspace``, or a ToolError saying why not.

    It touches the disk (symlinks are read), so callers run it in a thread.
    """
    try:
        root = workspace.resolve()
        resolved = (root / path).resolve()  # an absolute ``path`` replaces root, and is then checked like any other
    except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, a symlink loop (RuntimeError on 3.11)
        raise ToolError(f"bad path {path!r}: {exc}") from None
    if resolved != root and root not in resolved.parents:
        raise ToolError(f"{path!r} is outside the workspace: tools may only touch files inside it")
    return resolved


def _read(workspace: Path, shown: str, limit: int) -> str:
    path = confine(workspace, shown)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ToolError(f"no such file: {shown}") from None
    except IsADirectoryError:
        raise ToolError(f"{shown} is a directory (use list_dir)") from None
    except OSError as exc:
        raise ToolError(f"cannot read {shown}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ToolError(f"{shown} is a directory (use list_dir)" if stat.S_ISDIR(info.st_mode) else
                            f"{shown} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit)
    finally:
        os.close(fd)
    truncated = info.st_size > len(data)
    # An incremental decoder holds back a character split by the cut instead of calling it binary.
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        text = decoder.decode(data, final=not truncated)
    except UnicodeDecodeError:
        raise ToolError(f"{shown} is not UTF-8 text (a binary file?)") from None
    cut = info.st_size - len(data) + len(decoder.getstate()[0])
    return text + (f"\n[... {cut} more bytes cut]" if truncated else "")


def _write(workspace: Path, shown: str, content: str, limit: int) -> str:
    data = content.encode()
    if len(data) > limit:
        raise ToolError(f"refusing to write {len(data)} bytes: the limit is {limit}")
    workspace.mkdir(parents=True, exist_ok=True)
    path = confine(workspace, shown)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, say
        raise ToolError(f"cannot create the directory of {shown}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    except IsADirectoryError:
        raise ToolError(f"{shown} is a directory") from None
    except OSError as exc:
        raise ToolError(f"cannot write {shown}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return f"wrote {len(data)} bytes to {shown}"


def _list(workspace: Path, shown: str) -> str:
    workspace.mkdir(parents=True, exist_ok=True)
    path = confine(workspace, shown)
    if not path.exists():
        raise ToolError(f"no such directory: {shown}")
    if not path.is_dir():
        raise ToolError(f"{shown} is a file (use read_file)")
    entries = sorted(path.iterdir(), key=lambda p: p.name)
    lines = [f"{e.name}/" if e.is_dir() else f"{e.name}  ({e.lstat().st_size} bytes)" for e in entries[:MAX_LISTED]]
    if len(entries) > MAX_LISTED:
        lines.append(f"[... {len(entries) - MAX_LISTED} more entries]")
    return "\n".join(lines) if lines else "(empty)"


class PathArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=4096, description="relative to the workspace")


class ListArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(".", max_length=4096, description="relative to the workspace")


class WriteArgs(PathArgs):
    content: str


class EditArgs(PathArgs):
    old: str = Field(min_length=1, description="text that occurs exactly once in the file")
    new: str


def file_tools(settings: ToolSettings) -> list[Tool]:
    limit = settings.file_max_bytes

    async def read_file(args: PathArgs, context: ToolContext) -> str:
        return await asyncio.to_thread(_read, context.workspace, args.path, limit)

    async def write_file(args: WriteArgs, context: ToolContext) -> str:
        return await asyncio.to_thread(_write, context.workspace, args.path, args.content, limit)

    async def list_dir(args: ListArgs, context: ToolContext) -> str:
        return await asyncio.to_thread(_list, context.workspace, args.path)

    async def edit_file(args: EditArgs, context: ToolContext) -> str:
        def edit() -> str:
            path = confine(context.workspace, args.path)
            if path.is_file() and path.stat().st_size > limit:
                raise ToolError(f"{args.path} is over {limit} bytes: too large to edit")
            text = _read(context.workspace, args.path, limit)
            count = text.count(args.old)
            if count != 1:
                raise ToolError(f"`old` occurs {count} times in {args.path}; it must occur exactly once")
            written = _write(context.workspace, args.path, text.replace(args.old, args.new), limit)
            return written.replace("wrote", "edited; wrote")

        return await asyncio.to_thread(edit)

    return [
        Tool("read_file", "Read a UTF-8 text file in the workspace.", PathArgs, read_file),
        Tool("write_file", "Write a text file in the workspace (creating directories as needed).", WriteArgs,
             write_file),
        Tool("list_dir", "List a directory of the workspace.", ListArgs, list_dir),
        Tool("edit_file", "Replace the one occurrence of `old` with `new` in a workspace file.", EditArgs, edit_file),
    ]
