"""A service's message for a session whose lane lives on another node, sent there.

The API forwards a client's request as it came (``corral.api.forward``); a service of the
kernel (the scheduler firing a job, a subagent reporting to its parent) has no request to
forward, so it posts the message itself, authenticated with the cluster secret, which the
owner takes as its own admin. An Idempotency-Key makes the retry of a lost answer safe.
"""

from __future__ import annotations

from typing import Any

import httpx

from corral.api.forward import SECRET_HEADER
from corral.errors import CorralError, NotFound, SessionBusy, StoreUnavailable, TooManyPending
from corral.kernel.sessions import Accepted
from corral.metrics import Metrics
from corral.types import Disposition, ExecPolicy, Mode

# The owner's refusals, back in the kernel's terms.
REFUSALS: dict[int, type[CorralError]] = {404: NotFound, 409: SessionBusy, 429: TooManyPending}


class HttpRemote:
    def __init__(self, secret: str, metrics: Metrics, timeout_s: float = 30.0):
        self._secret = secret
        self._metrics = metrics
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=2.0))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def submit(self, url: str, session_id: str, content: str, *, mode: Mode, policy: ExecPolicy,
                     idempotency_key: str | None) -> Accepted:
        headers = {SECRET_HEADER: self._secret}
        if idempotency_key is not None:
            headers["idempotency-key"] = idempotency_key
        body: dict[str, Any] = {"content": content, "mode": mode.value, "policy": policy.value}
        try:
            answer = await self._client.post(f"{url}/v1/sessions/{session_id}/messages", json=body, headers=headers)
        except httpx.HTTPError as exc:
            self._metrics.forwarded_requests.labels("unreachable").inc()
            raise StoreUnavailable(f"the node that holds session {session_id} did not answer: {exc}") from exc
        self._metrics.forwarded_requests.labels("sent").inc()
        if answer.status_code == 202:
            data = answer.json()
            return Accepted(session_id, data["input_id"], data["run_id"], Disposition(data["disposition"]))
        message = answer.json().get("error", {}).get("message", answer.text) if answer.content else ""
        refusal = REFUSALS.get(answer.status_code, StoreUnavailable)
        raise refusal(f"the node that holds session {session_id} refused the message ({answer.status_code}): "
                      f"{message}")
