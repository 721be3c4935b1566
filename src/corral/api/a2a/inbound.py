"""What an A2A client's message says: the text of a new input, or the answer to an approval.

A message's content is its text parts, one per line; a data part counts as its JSON text.
File parts (``raw``, ``url``) are refused: Corral's agents take text.

A message on a task in ``input-required`` answers the question, in either form:

- a data part ``{"decision": "approve" | "deny", "call_id": "..."}``, one per call; without
  ``call_id`` it decides every call the task waits for (that another part does not name);
- text that is exactly ``approve`` or ``deny`` (or ``yes`` / ``no``; case, surrounding blanks
  and a final ``.`` or ``!`` aside), which decides every call the task waits for.

Anything else is refused with the question repeated, so a client cannot approve by accident.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from a2a.types.a2a_pb2 import Message
from a2a.utils.errors import ContentTypeNotSupportedError, InvalidParamsError
from google.protobuf.json_format import MessageToDict

from corral.api.a2a.tasks import Pending
from corral.types import Decision

_WORDS = {"approve": Decision.APPROVE, "yes": Decision.APPROVE, "deny": Decision.DENY, "no": Decision.DENY}


def content_of(message: Message) -> str:
    """The message as one input's text."""
    pieces: list[str] = []
    for part in message.parts:
        kind = part.WhichOneof("content")
        if kind == "text":
            pieces.append(part.text)
        elif kind == "data":
            pieces.append(json.dumps(MessageToDict(part.data)))
        else:
            raise ContentTypeNotSupportedError(message=f"a {kind or 'empty'} part: Corral's agents take text "
                                                       "(text parts, or data parts as JSON)")
    text = "\n".join(pieces)
    if not text.strip():
        raise InvalidParamsError(message="the message has no text")
    return text


def decisions_of(message: Message, pending: Sequence[Pending]) -> dict[str, Decision]:
    """The decision for each pending call the message answers (at least one), by call id."""
    waiting = {p.call_id for p in pending}
    named: dict[str, Decision] = {}
    for_all: Decision | None = None
    for part in message.parts:
        kind = part.WhichOneof("content")
        if kind == "data":
            answer = MessageToDict(part.data)
            decision = _decision(answer.get("decision") if isinstance(answer, dict) else None)
            if decision is None:
                continue
            call_id = answer.get("call_id")
            if call_id is None:
                for_all = decision
            elif call_id in waiting:
                named[str(call_id)] = decision
            else:
                raise InvalidParamsError(message=f"the task waits for no call {call_id!r}",
                                         data={"approvals": [p.as_json() for p in pending]})
        elif kind == "text":
            decision = _decision(part.text.strip().rstrip(".!").strip().lower())
            if decision is not None:
                for_all = decision
    if for_all is not None:
        named.update({call_id: for_all for call_id in waiting if call_id not in named})
    if not named:
        raise InvalidParamsError(
            message="the task waits for an approval: answer 'approve' or 'deny', or with a data part "
                    '{"decision": "approve" | "deny", "call_id": "..."}',
            data={"approvals": [p.as_json() for p in pending]})
    return named


def _decision(word: object) -> Decision | None:
    return _WORDS.get(word) if isinstance(word, str) else None
