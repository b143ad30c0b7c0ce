"""Deterministic interruptions while a create call is in flight.

The world delays one create call (fault `latency_ms`, added before the call is served) and the
bake is interrupted while that call is on the wire. bakery records each resource on its undo
stack *before* the call that creates it, by the name or tag it chose, "so even a call
interrupted mid-flight is found" (README, What a bake does); after SIGINT/SIGTERM nothing may be
left behind once the delayed call has been served. The random interruptions of
test_interrupts.py land in such a window only now and then (when the world is busy); these
cases put them there every time.
"""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from .conftest import World, bakery, gc, report

LATENCY_MS = 1500
SIGNAL_AFTER = 0.5  # seconds after the step that makes the call started

CASES = [
    # (delayed action, step during which it is made, signal, other delays)
    ("ec2:ImportKeyPair", "prepare", signal.SIGINT, {}),
    ("ec2:CreateSecurityGroup", "prepare", signal.SIGTERM, {}),
    # The instance can only be made while its key pair and group exist: the cleanup's deletion
    # of the group is slowed down so the delayed launch lands before it (as a busy API would).
    ("ec2:RunInstances", "launch", signal.SIGTERM, {"ec2:DeleteSecurityGroup": 2500}),
    ("ec2:CreateImage", "create_image", signal.SIGINT, {}),
]
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


@pytest.mark.parametrize("action,step,sig,others", CASES, ids=[c[0].split(":")[1] for c in CASES])
def test_an_interrupt_during_an_in_flight_create_leaves_nothing(world: World, faults, tmp_path, action, step, sig, others):
    recipe = world.recipe(tmp_path / "recipe.toml", ["true"], subnet=[c[0] for c in CASES].index(action))
    key = f"rel-inflight-{uuid.uuid4().hex[:6]}"
    rules = [{"action": action, "latency_ms": LATENCY_MS}]
    rules += [{"action": a, "latency_ms": ms} for a, ms in others.items()]
    faults({"seed": 1, "rules": rules})
    r = bakery(world, key, "build", str(recipe), "--manifest", str(tmp_path / "m.json"))
    assert r.wait_for(lambda e: e.get("event") == "step_started" and e.get("step") == step, 120), r.describe()
    time.sleep(SIGNAL_AFTER)
    assert r.signal(sig), f"the bake ended before {sig.name}: {r.describe()}"
    code = r.wait(120)
    # Wait until the delayed call has been served (the log records a call when it ends).
    name = action.split(":")[1]
    deadline = time.monotonic() + LATENCY_MS / 1000 + 10
    deadline += sum(others.values()) / 1000
    while world.calls(key)["counts"].get(action, 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    world.clear_faults()
    tally = world.calls(key, limit=1000)
    calls = tally["calls"]
    t0 = calls[0]["t"] if calls else 0
    timeline = "\n".join(
        f"  start +{c['t'] - t0:6.2f}s  end +{c['t'] - t0 + c['ms'] / 1000:6.2f}s  {c['action']} -> {c['status']}"
        for c in sorted(calls, key=lambda c: c["t"])
    )
    build_id = r.build_id
    left = world.leftovers(build_id)
    events = [
        f"{e['event']} {e.get('kind', '')} {e.get('id', '')}".strip()
        for e in r.events
        if e["event"] in ("resource_created", "resource_released", "resource_kept", "cleanup_failed", "build_failed")
    ]
    if left:  # keep the world clean for the tests after this one; the failure is reported below
        gc(world, build_id)
    report(f"in-flight {name}: {sig.name} {SIGNAL_AFTER}s into {step} with the call delayed {LATENCY_MS} ms: exit {code}, left {left or 'nothing'}")
    assert code == EXIT[sig], r.describe()
    assert tally["counts"].get(action, 0) >= 1, f"{action} was never made: the signal came too early\n{timeline}"
    assert not left, (
        f"{sig.name} while {action} was in flight: bakery exited {code} but left {left} behind "
        f"(build {build_id}).\nevents: {events}\ncalls of {key} (the world's log):\n{timeline}"
    )
