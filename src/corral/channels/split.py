"""Splitting a reply at a platform's length limit: at a paragraph, else a line, else a sentence,
else a word, and never inside a code fence.

A chunk that would end inside a fenced block (```) ends before the fence opens instead; a
fenced block longer than a whole chunk is cut at a line inside it, closed with a fence, and
reopened (with its language) at the start of the next chunk, so each message renders alone.

Splitting is a function of the text's prefix: once the text is longer than the limit, the
first chunk never changes as more text streams in. A streaming reply can therefore send
chunk 1 as soon as chunk 2 begins, and a reply rebuilt after a restart splits the same way
(its chunks' idempotency keys match the ones already in the outbox).
"""

from __future__ import annotations

import re

FENCE = re.compile(r"^[ \t]*(```|~~~)(.*)$", re.MULTILINE)
SENTENCE_END = re.compile(r"[.!?…。](?=\s)")


def split_reply(text: str, limit: int) -> list[str]:
    """``text`` as chunks of at most ``limit`` characters (the last may be the unfinished one)."""
    if limit < 20:
        raise ValueError("a limit under 20 characters leaves no room for a fence")
    chunks: list[str] = []
    rest = text
    while len(rest) > limit:
        head, rest = _cut(rest, limit)
        chunks.append(head)
    if rest or not chunks:
        chunks.append(rest)
    return chunks


def _open_fences(text: str) -> list[tuple[int, int, str]]:
    """The fenced blocks of ``text``: (start of the opening line, end of the closing line or
    past the end of ``text`` if still open, the opening fence with its language)."""
    blocks: list[tuple[int, int, str]] = []
    opening: str | None = None
    began = 0
    for match in FENCE.finditer(text):
        if opening is None:
            opening, began = match.group(1) + match.group(2).strip(), match.start()
        elif match.group(1) == opening[:3] and not match.group(2).strip():
            blocks.append((began, match.end(), opening))
            opening = None
    if opening is not None:
        blocks.append((began, len(text) + 1, opening))
    return blocks


def _inside(blocks: list[tuple[int, int, str]], at: int) -> bool:
    return any(start < at < end for start, end, _ in blocks)


def _cut(text: str, limit: int) -> tuple[str, str]:
    """The first chunk (at most ``limit`` characters) and the text left after it."""
    window = text[:limit]
    blocks = _open_fences(window)
    # A cut outside any fence, preferring paragraph, then line, then sentence, then word.
    for finder in (_paragraphs, _lines, _sentences, _words):
        for at in finder(window):
            if at > limit // 4 and not _inside(blocks, at):
                return text[:at].rstrip(), text[at:].lstrip("\n ")
    # Inside a long fenced block (or text with no break at all): cut at a line inside the
    # fence, close it, and reopen it in the next chunk.
    if blocks and blocks[-1][1] > len(window):
        opening = blocks[-1][2]
        room = limit - len("\n```")
        cut = window.rfind("\n", 0, room)
        if cut <= max(limit // 4, blocks[-1][0]):
            cut = room
        head = text[:cut].rstrip("\n")
        return head + "\n" + opening[:3], opening + "\n" + text[cut:].lstrip("\n")
    return window, text[limit:]


def _paragraphs(window: str) -> list[int]:
    return [m.end() for m in reversed(list(re.finditer(r"\n[ \t]*\n", window)))]


def _lines(window: str) -> list[int]:
    return [m.end() for m in reversed(list(re.finditer(r"\n", window)))]


def _sentences(window: str) -> list[int]:
    return [m.end() for m in reversed(list(SENTENCE_END.finditer(window)))]


def _words(window: str) -> list[int]:
    return [m.end() for m in reversed(list(re.finditer(r"\s+", window)))]
