"""One message, end to end through the kernel."""

from __future__ import annotations

from corral.kernel import Kernel
from corral.types import Disposition
from tests.helpers import new_session, run_events, wait_run


async def test_a_message_runs_to_completion(kernel: Kernel) -> None:
    session = await new_session(kernel)
    accepted = await kernel.submit(session, "hello there")
    assert accepted.disposition is Disposition.STARTED
    run = await wait_run(kernel, accepted.run_id)
    assert run["status"] == "completed"
    assert run["output"] == "echo: hello there"
    events = await run_events(kernel, accepted.run_id)
    assert [e.type for e in events] == ["run.queued", "run.started", "message.delta", "message.completed",
                                        "run.completed"]
    # The log alone can replay the conversation: run.started carries what the user said.
    assert events[1].data == {"input_ids": [accepted.input_id], "contents": ["hello there"]}
