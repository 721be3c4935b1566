"""Splitting replies at a platform's limit (corral/channels/split.py)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.channels.split import split_reply


def fences_balanced(chunk: str) -> bool:
    """Every fence opened in ``chunk`` is closed in it (CommonMark: only a bare fence closes one)."""
    inside = False
    for line in chunk.splitlines():
        stripped = line.strip()
        if not inside and stripped.startswith("```"):
            inside = True
        elif inside and stripped == "```":
            inside = False
    return not inside


def test_a_short_reply_is_one_chunk() -> None:
    assert split_reply("hello", 100) == ["hello"]
    assert split_reply("", 100) == [""]


def test_it_cuts_at_a_paragraph_then_a_line_then_a_sentence_then_a_word() -> None:
    para = "a" * 40 + "\n\n" + "b" * 40 + "\nc" * 10
    assert split_reply(para, 60)[0] == "a" * 40
    lines = "a" * 30 + "\n" + "b" * 20 + "\n" + "c" * 30
    assert split_reply(lines, 60)[0] == "a" * 30 + "\n" + "b" * 20
    sentences = "One sentence here. Another one there. " + "x" * 40
    assert split_reply(sentences, 60)[0] == "One sentence here. Another one there."
    spaced = "word " * 30
    first = split_reply(spaced, 60)[0]
    assert first.endswith("word") and len(first) <= 60
    assert split_reply("x" * 130, 60) == ["x" * 60, "x" * 60, "x" * 10]


def test_it_never_cuts_inside_a_code_fence_when_it_can_cut_before() -> None:
    text = "Intro paragraph.\n\n" + "```py\n" + "print(1)\n" * 5 + "```\n\nAfter."
    chunks = split_reply(text, 60)
    assert chunks[0] == "Intro paragraph."
    assert all(fences_balanced(chunk) for chunk in chunks)


def test_a_fence_longer_than_a_chunk_is_closed_and_reopened_with_its_language() -> None:
    text = "```python\n" + "".join(f"line_{i} = {i}\n" for i in range(60)) + "```\nDone."
    chunks = split_reply(text, 200)
    assert len(chunks) > 3
    assert all(len(chunk) <= 200 and fences_balanced(chunk) for chunk in chunks)
    assert all(chunk.startswith("```python\n") for chunk in chunks[1:])
    assert all(chunk.rstrip().endswith("```") for chunk in chunks[:-1])
    body = "".join(re.sub(r"^```python\n|\n?```$", "", c.split("\n```\nDone.")[0]) + "\n" for c in chunks)
    assert [f"line_{i} = {i}" for i in range(60)] == [line for line in body.splitlines() if line]


texts = st.lists(st.sampled_from(["word", "Sentence.", " ", "\n", "\n\n", "```py\n", "```\n", "x" * 37]),
                 max_size=120).map("".join)


@settings(max_examples=300, deadline=None)
@given(texts, st.integers(min_value=40, max_value=200))
def test_every_chunk_fits_and_keeps_its_fences(text: str, limit: int) -> None:
    chunks = split_reply(text, limit)
    assert all(len(chunk) <= limit for chunk in chunks)
    assert all(fences_balanced(chunk) for chunk in chunks[:-1])


@settings(max_examples=300, deadline=None)
@given(texts, texts, st.integers(min_value=40, max_value=200))
def test_chunks_before_the_last_never_change_as_the_text_grows(text: str, more: str, limit: int) -> None:
    """What a streaming reply relies on: a chunk it has moved past stays as it was sent, and a
    reply rebuilt after a restart splits into the same chunks (same idempotency keys)."""
    now, later = split_reply(text, limit), split_reply(text + more, limit)
    assert later[: len(now) - 1] == now[:-1]
