"""Every answer names the node that gave it (``x-corral-node``; for a forwarded request, the
session's owner that answered it), so a client can go to the owner directly and save the
hop. Plain ASGI, no body buffering."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class NodeHeader:
    def __init__(self, app: ASGIApp, node_id: str):
        self.app = app
        self.header = (b"x-corral-node", node_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name == b"x-corral-node" for name, _ in headers):  # a forwarded answer names its owner
                    headers.append(self.header)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, tagged)
