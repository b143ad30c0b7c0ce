"""SQS fidelity patch (plug-in: `install(world)`): long polling that waits without the moto lock.

moto 5.2.5 implements `ReceiveMessage` long polling (`WaitTimeSeconds`, or the queue's
`ReceiveMessageWaitTimeSeconds`) as a loop that waits on the queue's own condition variable,
waking once a second. In the world every moto action runs under the one moto lock
(`World.install_moto_lock`), so a long poll held that lock for the whole wait: every other call
of the world (EC2, Auto Scaling, the `SendMessage` that would end the wait) stalled behind it,
and the poll always ran its full time and came back empty.

AWS: "Long polling ... ReceiveMessage ... waits until a message is available in the queue before
sending a response", returning "as soon as a message becomes available" or an empty response
when the wait time expires (SQS developer guide, *Amazon SQS short and long polling*; the wait
is at most 20 s, which moto validates). The world's wait releases the moto lock (fully, at any
depth) while it sleeps, wakes when a message is sent to the queue, and otherwise re-checks at
the moment the first invisible or delayed message becomes visible again (a
`VisibilityTimeout` / `ChangeMessageVisibility` / `DelaySeconds` that ends during the wait), at
least every second. moto's own loop keeps the deadline and the delivery (visibility, receive
counts, dead-letter redrive).
"""

from __future__ import annotations

import time
from typing import Any

_INSTALLED = False
WORLD: Any = None
MAX_SLICE = 1.0
MIN_SLICE = 0.02


def _next_visible_in(queue: Any, now_ms: float) -> float | None:
    """Seconds until the first message that is invisible or delayed now becomes visible."""
    soonest = None
    for m in list(getattr(queue, "_messages", [])):
        for at in (getattr(m, "visible_at", 0.0), getattr(m, "delayed_until", 0.0)):
            if at and at > now_ms and (soonest is None or at < soonest):
                soonest = at
    return None if soonest is None else (soonest - now_ms) / 1000.0


def _patch() -> None:
    from moto.sqs.models import Queue

    def wait_for_messages(self, timeout: int) -> None:
        lock = getattr(WORLD, "lock", None)
        cond = self._messages_lock
        nxt = _next_visible_in(self, time.time() * 1000.0)
        wait = min(float(timeout), MAX_SLICE)
        if nxt is not None:
            wait = max(MIN_SLICE, min(wait, nxt + 0.005))
        owned = lock is not None and lock._is_owned()
        # Take the queue's condition before letting go of the moto lock: a SendMessage (which
        # needs the moto lock first) cannot notify before this thread waits, so no wake-up is
        # lost. The condition is released before the moto lock is taken again (lock order:
        # moto lock, then the queue's condition).
        state = None
        try:
            with cond:
                if owned:
                    state = lock._release_save()
                cond.wait(wait)
        finally:
            if state is not None:
                lock._acquire_restore(state)

    wait_for_messages.__wrapped__ = Queue.wait_for_messages  # type: ignore[attr-defined]
    Queue.wait_for_messages = wait_for_messages  # type: ignore[method-assign]


def install(world: Any) -> None:
    global _INSTALLED, WORLD
    WORLD = world
    world.install_moto_lock()
    if not _INSTALLED:
        _patch()
        _INSTALLED = True
