"""Property: no request, however hostile, gets a 5xx or leaves anything broken (issue 18).

Hypothesis takes a valid body for every write route and puts hostile JSON into one of its
fields (or a field of its own): NULs, lone surrogates, every Unicode plane, nesting from a few
levels to 100,000, numbers past 64 bits, past Python's digit limit and past a double, NaN.
Hostile path segments and headers ride along. Every answer must be a 2xx or a 4xx in the
error envelope, and after each one the listings, the feed and a new message on the same
session must still work. On SQLite and on Postgres, through a real server over loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.settings import Settings
from tests.helpers import new_http_session, post, read_run, uvicorn_server

LIMIT = 240 * max(1, int(os.environ.get("HOSTILE_EXAMPLES", "30")) // 30)
EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "30"))  # per route; raise it for a longer hunt

ODD_TEXT = ["\x00", "a\x00b", "\ud800", "\udfff", "x\udc00", "\ud83d", "\U0010ffff", "\U0001f600", "\ufeff",
            "\u202e", "\uffff", "", " ", "\\u0000", "\\ud800", "%00", "../../etc/passwd", "é" * 300]
text = st.text(st.characters(exclude_categories=()), max_size=40) | st.sampled_from(ODD_TEXT)
numbers = (st.integers() | st.floats() | st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**100, -(10**400), 1e308]))
leaves = st.none() | st.booleans() | numbers | text
nested = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                      max_leaves=12)


class Deep(int):
    """A value nested this many levels, spliced into the body as text (json.dumps would recurse)."""


hostile = nested | st.integers(1, 1200).map(Deep) | st.just(Deep(100_000))
DEEP_MARK = "\x01deep\x01"


def encode(body: dict[str, Any]) -> bytes:
    """As a client would send it: ASCII JSON, so lone surrogates go as ``\\udXXX`` escapes."""
    deep = next((v for v in body.values() if isinstance(v, Deep)), None)
    if deep is None:
        return json.dumps(body, allow_nan=True).encode()
    text = json.dumps({k: DEEP_MARK if v is deep else v for k, v in body.items()})
    opening, closing = ('{"a": ', "}") if deep % 2 else ("[", "]")
    return text.replace(json.dumps(DEEP_MARK), opening * deep + '"bottom"' + closing * deep).encode()


RAW = st.sampled_from([b"\xff\xfe", b"{", b'{"content": 1' + b"9" * 5000 + b"}", b"[" * 100_000, b"null",
                       b'"\\ud800"', b"{}", b"[]", b'{"a": NaN}', b'{"a": -Infinity}']) | st.binary(max_size=64)


def _bases(session: str, run: str) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "sessions": ("/v1/sessions", {"agent": "assistant", "key": "k", "metadata": {"team": "a"}}),
        "messages": (f"/v1/sessions/{session}/messages",
                     {"content": "hi", "mode": "queue", "policy": "continue", "debounce_ms": 0}),
        "cancel": (f"/v1/runs/{run}/cancel", {"mode": "soft"}),
        "approval": (f"/v1/runs/{run}/approvals/call_1", {"decision": "approve"}),
        "agents": ("/v1/agents", {"name": "probe", "provider": "demo", "system_prompt": "be brief",
                                  "provider_options": {"token_ms": 0}, "tools": ["echo"]}),
        "jobs": ("/v1/jobs", {"agent": "assistant", "schedule": {"every_s": 86_400}, "message": "later"}),
        "chat": ("/v1/chat/completions", {"model": "assistant", "messages": [{"role": "user", "content": "hi"}],
                                          "user": "u"}),
    }


def _check_answer(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert all(isinstance(error[k], str) and error[k] for k in ("code", "message", "type")), error
    elif response.status_code < 300 and response.status_code != 204:  # a 3xx is the trailing-slash redirect
        response.json()


def _check_still_whole(http: httpx.Client, session: str) -> None:
    for path in ("/v1/sessions", "/v1/runs", "/v1/agents", "/v1/jobs", f"/v1/sessions/{session}/messages"):
        listing = http.get(path)
        assert listing.status_code == 200, (path, listing.status_code, listing.text[:500])
        listing.json()
    accepted = http.post(f"/v1/sessions/{session}/messages", json={"content": "still whole?"})
    assert accepted.status_code == 202, accepted.text


def _check_feed(http: httpx.Client) -> None:
    with http.stream("GET", "/v1/feed") as feed:
        assert feed.status_code == 200
        assert next(line for line in feed.iter_lines() if line.startswith("event:")) == "event: ready"


def _fuzz(base: str, session: str, run: str) -> None:
    bases = _bases(session, run)
    with httpx.Client(base_url=base, timeout=30.0) as http:

        @settings(max_examples=EXAMPLES * len(bases), deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(route=st.sampled_from(sorted(bases)), data=st.data())
        def one_request(route: str, data: st.DataObject) -> None:
            path, body = bases[route]
            headers: dict[str, str | bytes] = {"content-type": "application/json"}
            if data.draw(st.booleans()):
                field = data.draw(st.sampled_from([*body, "extra"]))
                content = encode({**body, field: data.draw(hostile)})
            else:
                content = data.draw(RAW)
            if data.draw(st.integers(0, 4)) == 0:  # a hostile header, as far as HTTP can carry one
                name = data.draw(st.sampled_from(["idempotency-key", "x-corral-session", "last-event-id"]))
                value = data.draw(st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"),
                                          max_size=300).map(str.strip).filter(bool))
                headers[name] = value.encode("latin-1")
            _check_answer(http.post(path, content=content, headers=headers))
            _check_still_whole(http, session)

        @settings(max_examples=EXAMPLES * 2, deadline=None, database=None)
        @given(segment=text, method=st.sampled_from(["GET", "DELETE", "POST"]),
               prefix=st.sampled_from(["/v1/sessions/", "/v1/runs/", "/v1/agents/", "/v1/jobs/"]))
        def one_path(segment: str, method: str, prefix: str) -> None:
            escaped = quote(segment.encode("utf-8", "surrogatepass"), safe="")
            _check_answer(http.request(method, prefix + escaped))
            _check_answer(http.get("/v1/sessions", params={"agent": escaped, "limit": "5"}))
            _check_still_whole(http, session)

        one_request()
        one_path()
        _check_feed(http)


async def test_no_hostile_request_gets_a_5xx_or_breaks_anything(db_url: str, tmp_path: Path) -> None:
    settings_ = Settings(data_dir=tmp_path, database_url=db_url, shutdown_grace_s=1.0)
    async with asyncio.timeout(LIMIT), uvicorn_server(settings_) as (base, _kernel, _server):
        async with httpx.AsyncClient(base_url=base) as http:
            session = await new_http_session(http)
            first = await post(http, session, "a first run to cancel and to approve in")
            await read_run(http, first["run_id"])
            await asyncio.to_thread(_fuzz, base, session, first["run_id"])
            final = await post(http, session, "the end")
            assert (await read_run(http, final["run_id"]))[-1].event == "run.completed"
