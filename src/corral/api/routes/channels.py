"""Chat channels: their state (admin), a restart, their outbox, and the routes platforms push to.

The push routes (``/inbound`` for the webhook channel, ``/telegram`` for a Telegram webhook,
``/slack/events`` for Slack's Events API)
need no API token: the platform cannot send one. Each request is checked by its channel's
client instead (an HMAC signature and a fresh timestamp, Telegram's secret token), and
answers only once what it carried is durable, so a platform retries what a crash cut off.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from corral.api.deps import PrincipalDep, require_admin
from corral.api.errors import error_body
from corral.api.json_body import CheckedRoute
from corral.channels import ChannelRuntime, Channels, Kind
from corral.channels.errors import ChannelNotRunning
from corral.channels.platforms.slack import UrlVerification
from corral.errors import NotFound
from corral.store import channels as rows

router = APIRouter(prefix="/v1/channels", tags=["channels"], route_class=CheckedRoute)

# What a push is told while its channel is not running: the platform tries again later.
NOT_RUNNING_RETRY_S = 5


def channels_of(request: Request) -> Channels:
    channels: Channels = request.app.state.channels
    return channels


@router.get("")
async def list_channels(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """Each channel's state (starting, running, backing_off, failed), last error, chats, messages
    in and out, and outbox."""
    require_admin(principal)
    return {"channels": await channels_of(request).view()}


@router.get("/{name}")
async def get_channel(name: str, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    require_admin(principal)
    return await channels_of(request).get(name).view()


@router.post("/{name}/restart", status_code=202)
async def restart_channel(name: str, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """End the channel's current attempt (or its wait before the next) and start it afresh."""
    require_admin(principal)
    runtime = channels_of(request).get(name)
    runtime.restart()
    return {"name": name, "state": runtime.state.value, "restarting": True}


@router.get("/{name}/outbox")
async def outbox(
    name: str, request: Request, principal: PrincipalDep,
    status: Annotated[str | None, Query(pattern="^(pending|sent|failed|superseded)$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """The channel's outbox rows, newest first: ``?status=failed`` lists the deliveries given up."""
    require_admin(principal)
    runtime = channels_of(request).get(name)
    found = await runtime.kernel.store.read(rows.outbox_rows, name, status, limit)
    return {"rows": [_row(row) for row in found]}


@router.post("/{name}/inbound", include_in_schema=True)
async def webhook_inbound(name: str, request: Request) -> JSONResponse:
    """The webhook channel's messages, signed (docs/channels.md)."""
    return await _push(request, name, Kind.WEBHOOK)


@router.post("/{name}/telegram")
async def telegram_webhook(name: str, request: Request) -> JSONResponse:
    """Telegram's updates for a channel with ``transport = "webhook"``."""
    return await _push(request, name, Kind.TELEGRAM)


@router.post("/{name}/slack/events")
async def slack_events(name: str, request: Request) -> JSONResponse:
    """Slack's Events API and interactivity requests for a channel with ``transport = "events"``:
    signed, answered within Slack's 3 s once durable; a retry (``x-slack-retry-num``) is a duplicate."""
    return await _push(request, name, Kind.SLACK)


async def _push(request: Request, name: str, kind: Kind) -> JSONResponse:
    runtime = _pushed_to(request, name, kind)
    body = await request.body()
    try:
        taken = await runtime.take_push(request.headers, body)
    except ChannelNotRunning as exc:
        return JSONResponse(error_body(exc.code, str(exc), type="server_error"), status_code=503,
                            headers={"retry-after": str(NOT_RUNNING_RETRY_S)})
    except UrlVerification as check:
        return JSONResponse({"challenge": check.challenge})
    return JSONResponse({"taken": [{"outcome": t.outcome.value, "run_id": t.run_id, "session_id": t.session_id}
                                   for t in taken]})


def _pushed_to(request: Request, name: str, kind: Kind) -> ChannelRuntime:
    try:
        runtime = channels_of(request).get(name)
    except NotFound:
        runtime = None
    if runtime is None or runtime.spec.kind is not kind:
        raise NotFound(f"no {kind.value} channel {name!r}")
    return runtime


def _row(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    for field in ("created_at", "sent_at"):
        if out.get(field) is not None:
            out[field] = out[field].isoformat()
    return out
