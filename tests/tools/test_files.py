"""The file tools: they work inside the workspace and refuse every way out of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from corral.errors import ToolError
from corral.tools import ToolContext, ToolSettings
from corral.tools.files import file_tools

LIMIT = 10


@pytest.fixture
def tools() -> dict[str, object]:
    return {tool.name: tool for tool in file_tools(ToolSettings(file_max_bytes=4096))}


def ctx(tmp_path: Path) -> ToolContext:
    return ToolContext("run_t", "ses_t", "agent", tmp_path / "ws")


async def call(tools: dict[str, object], name: str, tmp_path: Path, **arguments: str) -> str:
    tool = tools[name]
    return await tool.call(arguments, ctx(tmp_path))  # type: ignore[attr-defined, no-any-return]


async def test_write_read_list_and_edit(tmp_path: Path, tools: dict[str, object]) -> None:
    async with asyncio.timeout(LIMIT):
        assert await call(tools, "write_file", tmp_path, path="notes/todo.txt", content="buy milk\n") \
            == "wrote 9 bytes to notes/todo.txt"
        assert await call(tools, "read_file", tmp_path, path="notes/todo.txt") == "buy milk\n"
        assert await call(tools, "list_dir", tmp_path) == "notes/"
        assert await call(tools, "list_dir", tmp_path, path="notes") == "todo.txt  (9 bytes)"
        await call(tools, "edit_file", tmp_path, path="notes/todo.txt", old="milk", new="bread")
        assert (tmp_path / "ws" / "notes" / "todo.txt").read_text() == "buy bread\n"


async def test_edit_needs_exactly_one_match(tmp_path: Path, tools: dict[str, object]) -> None:
    async with asyncio.timeout(LIMIT):
        await call(tools, "write_file", tmp_path, path="a.txt", content="x x")
        with pytest.raises(ToolError, match="occurs 2 times"):
            await call(tools, "edit_file", tmp_path, path="a.txt", old="x", new="y")
        with pytest.raises(ToolError, match="occurs 0 times"):
            await call(tools, "edit_file", tmp_path, path="a.txt", old="z", new="y")


@pytest.mark.parametrize("path", ["../outside.txt", "a/../../outside.txt", "/etc/passwd", "link_out", "dir_out/x"])
async def test_escapes_are_refused(tmp_path: Path, tools: dict[str, object], path: str) -> None:
    async with asyncio.timeout(LIMIT):
        workspace = tmp_path / "ws"
        workspace.mkdir()
        outside = tmp_path / "outside.txt"
        outside.write_text("secret")
        (workspace / "link_out").symlink_to(outside)
        (workspace / "dir_out").symlink_to(tmp_path)
        for name in ("read_file", "write_file", "list_dir"):
            arguments = {"path": path, "content": "pwned"} if name == "write_file" else {"path": path}
            with pytest.raises(ToolError, match="outside the workspace"):
                await call(tools, name, tmp_path, **arguments)
        assert outside.read_text() == "secret"


async def test_limits_and_clear_errors(tmp_path: Path, tools: dict[str, object]) -> None:
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ToolError, match="limit is 4096"):
            await call(tools, "write_file", tmp_path, path="big.txt", content="x" * 5000)
        (tmp_path / "ws").mkdir()
        (tmp_path / "ws" / "big.txt").write_text("y" * 5000)
        text = await call(tools, "read_file", tmp_path, path="big.txt")
        assert text.startswith("y" * 4096) and text.endswith("[... 904 more bytes cut]")
        with pytest.raises(ToolError, match="too large to edit"):
            await call(tools, "edit_file", tmp_path, path="big.txt", old="y", new="z")
        with pytest.raises(ToolError, match="no such file"):
            await call(tools, "read_file", tmp_path, path="missing.txt")
        (tmp_path / "ws" / "blob.bin").write_bytes(b"\xff\xfe\x00")
        with pytest.raises(ToolError, match="not UTF-8"):
            await call(tools, "read_file", tmp_path, path="blob.bin")
        with pytest.raises(ToolError, match="is a directory"):
            await call(tools, "read_file", tmp_path, path=".")


async def test_a_cut_inside_a_character_is_not_called_binary(tmp_path: Path, tools: dict[str, object]) -> None:
    async with asyncio.timeout(LIMIT):
        (tmp_path / "ws").mkdir()
        (tmp_path / "ws" / "odd.txt").write_text("x" + "é" * 3000)  # 6001 bytes: the cut at 4096 splits an "é"
        text = await call(tools, "read_file", tmp_path, path="odd.txt")
        assert text.startswith("x" + "é" * 2047) and text.endswith("[... 1906 more bytes cut]")


async def test_odd_paths_get_clear_errors(tmp_path: Path, tools: dict[str, object]) -> None:
    async with asyncio.timeout(LIMIT):
        await call(tools, "write_file", tmp_path, path="plain", content="a file")
        with pytest.raises(ToolError, match="cannot create the directory of plain/x"):
            await call(tools, "write_file", tmp_path, path="plain/x", content="")
        with pytest.raises(ToolError, match="bad path"):
            await call(tools, "read_file", tmp_path, path="nul\x00byte")
        with pytest.raises(ToolError, match="no such directory"):
            await call(tools, "list_dir", tmp_path, path="nowhere")
        with pytest.raises(ToolError, match="is a file"):
            await call(tools, "list_dir", tmp_path, path="plain")
        with pytest.raises(ToolError, match="no such file"):
            await call(tools, "edit_file", tmp_path, path="missing", old="a", new="b")
        (tmp_path / "ws" / "inside").symlink_to("plain")  # a symlink that stays inside is fine
        assert await call(tools, "read_file", tmp_path, path="inside") == "a file"
