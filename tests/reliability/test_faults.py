"""20 bakes under API faults: every AWS call the world serves is throttled with probability 0.2
(the service's real throttling code: EC2 `RequestLimitExceeded`/503, query `Throttling`/400,
JSON `ThrottlingException`/400) or answered `InternalError`/500 with probability 0.05, and
its answer is lost after the call took effect (the connection breaks) with probability 0.05,
0.2 for the calls that create something (RunInstances, ImportKeyPair, CreateSecurityGroup,
CreateImage): the case where a careless retry launches a second instance or fails on its own
key pair. Every bake must succeed, leave nothing behind, and never launch a second instance."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from .conftest import World, bakery_ok, gc, report

BAKES = 20
CONCURRENCY = 4
SEED = 2026
CREATES = ("ec2:RunInstances", "ec2:ImportKeyPair", "ec2:CreateSecurityGroup", "ec2:CreateImage")
SPEC = {
    "seed": SEED,
    "rules": [{"action": "*", "throttle": 0.2, "error500": 0.05, "lose": 0.05}]
    + [{"action": a, "throttle": 0.2, "error500": 0.05, "lose": 0.2} for a in CREATES],
}


def test_bakes_survive_throttling_and_500s(world: World, faults, tmp_path):
    recipes = [world.recipe(tmp_path / f"recipe-{n}.toml", ["echo reliability"], subnet=n) for n in range(2)]
    run_id = uuid.uuid4().hex[:6]
    keys = [f"rel-faults-{run_id}-{i:02d}" for i in range(BAKES)]

    def bake(i: int):
        manifest = tmp_path / f"manifest-{i:02d}.json"
        return bakery_ok(world, keys[i], "build", str(recipes[i % 2]), "--manifest", str(manifest), timeout=240)

    faults(SPEC)
    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        runs = list(pool.map(bake, range(BAKES)))
    elapsed = time.monotonic() - t0
    tallies = [world.calls(k, limit=1000) for k in keys]
    world.clear_faults()  # the checks below must not be faulted themselves

    calls = sum(t["total"] for t in tallies)
    injected = {"throttle": 0, "error500": 0, "lose": 0}
    for t in tallies:
        for kind, n in t["faults_injected"].items():
            injected[kind] = injected.get(kind, 0) + n
    # Answers lost after a create took effect: where a careless retry launches a second
    # instance (RunInstances) or fails on its own resource (`…Duplicate`).
    lost = {a: 0 for a in CREATES}
    for t in tallies:
        for c in t["calls"]:
            key = f"{c['service']}:{c['action']}"
            if key in lost and c["fault"] == "lose":
                lost[key] += 1
    failures, leaked, duplicates, amis = [], {}, {}, []
    for r in runs:
        ami = None
        if r.code == 0 and r.event("build_finished"):
            ami = r.event("build_finished")["manifest"]["ami_id"]
            amis.append(ami)
        else:
            failures.append(r.describe())
        build_id = r.build_id
        if build_id is None:
            continue
        # A failed bake must clean up too: leftovers are checked for every bake.
        left = world.leftovers(build_id, keep_image=ami)
        if left:
            leaked[build_id] = left
            gc(world, build_id)  # keep the world clean for what follows; reported below
        launched = world.instances_of(build_id)
        if len(launched) > 1 or (ami and len(launched) != 1):
            duplicates[build_id] = [f"{x['InstanceId']} ({x['State']['Name']})" for x in launched]

    report(
        f"faults: {BAKES} bakes ({CONCURRENCY} at a time, seed {SEED}), {calls} calls, "
        f"{injected.get('throttle', 0)} throttled, {injected.get('error500', 0)} 500s, "
        f"{injected.get('lose', 0)} answers lost ("
        + ", ".join(f"{n} {a.split(':')[1]}" for a, n in lost.items())
        + "), "
        f"{BAKES - len(failures)} succeeded, {sum(len(v) for v in leaked.values())} leaked, "
        f"{len(duplicates)} duplicates, {elapsed:.0f}s"
    )
    for ami in amis:
        world.delete_image(ami)

    assert not failures, f"{len(failures)} of {BAKES} bakes failed under faults:\n\n" + "\n\n".join(failures)
    assert not leaked, f"bakes left resources behind: {leaked}"
    assert not duplicates, f"more (or fewer) than one instance carried a build id: {duplicates}"
    assert all(injected.get(k, 0) > 0 for k in ("throttle", "error500", "lose")), f"faults were injected: {injected}"
    assert all(lost.values()), f"every kind of create must lose an answer for the test to prove anything: {lost}"
