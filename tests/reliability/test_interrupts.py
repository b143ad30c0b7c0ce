"""20 bakes interrupted at a point drawn from a fixed seed list, cycling SIGINT, SIGTERM and
SIGKILL. SIGINT/SIGTERM: bakery cleans up itself and exits 130/143 with nothing left behind.
SIGKILL: `bakery gc --build-id ID --older-than 0s` removes what the dead bake left, and then
nothing is left behind."""

from __future__ import annotations

import random
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from .conftest import World, bakery, gc, report

SEEDS = list(range(701, 721))  # one interruption per seed
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
CONCURRENCY = 4
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}

# Where a bake can be interrupted: after one of these events (each seed picks one), plus a
# random delay, so the signal lands before, during or after the calls around it. All of them
# come before the image is finished, so every bake is interrupted mid-way.
POINTS = [
    ("build_started", None),
    ("step_started", "prepare"),
    ("resource_created", "security group"),
    ("resource_created", "key pair"),
    ("step_started", "launch"),
    ("resource_created", "instance"),
    ("step_started", "wait_running"),
    ("step_started", "connect"),
    ("step_started", "provision: shell 1"),
    ("output", None),
    ("step_started", "stop"),
    ("step_started", "create_image"),
    ("resource_created", "image"),
]
MAX_DELAY = 0.25  # seconds after the event

# A SIGKILLed process cannot take back a call it already sent: the world may still be serving
# it. gc runs after the calls in flight have ended (the world answers each in well under this).
IN_FLIGHT_GRACE = 1.0


def matches(point, e: dict) -> bool:
    name, what = point
    if e.get("event") != name:
        return False
    if what is None:
        return True
    return e.get("step") == what or e.get("kind") == what


def test_interrupted_bakes_leave_nothing_behind(world: World, tmp_path):
    recipe = world.recipe(tmp_path / "recipe.toml", ["echo start", "sleep 0.2", "echo done"])
    run_id = uuid.uuid4().hex[:6]

    def one(i: int) -> dict:
        seed = SEEDS[i]
        rng = random.Random(seed)
        point = rng.choice(POINTS)
        delay = rng.uniform(0, MAX_DELAY)
        sig = SIGNALS[i % len(SIGNALS)]
        r = bakery(world, f"rel-int-{run_id}-{i:02d}", "build", str(recipe), "--manifest", str(tmp_path / f"m{i:02d}.json"))
        hit = r.wait_for(lambda e: matches(point, e), timeout=120)
        out = {"seed": seed, "point": point, "delay": delay, "sig": sig, "run": r, "problems": []}
        if hit is None:
            r.wait(60)
            out["problems"].append(f"the bake never reached {point}:\n{r.describe()}")
            return out
        time.sleep(delay)
        steps = [e["step"] for e in r.events if e.get("event") == "step_started"]
        out["landed_in"] = steps[-1] if steps else "start"
        sent = r.signal(sig)
        code = r.wait(120)
        build_id = r.build_id
        if not sent:
            out["problems"].append(f"the bake ended before {sig.name} ({point} + {delay:.2f}s): {r.describe()}")
        elif sig == signal.SIGKILL:
            if code != -signal.SIGKILL:
                out["problems"].append(f"expected death by SIGKILL, got exit {code}")
            time.sleep(IN_FLIGHT_GRACE)
            before = world.leftovers(build_id)
            report_ = gc(world, build_id)
            out["left_by_kill"] = before
            out["gc"] = [f"{f['kind']} {f['id']}: {f['action']}" for f in report_["findings"]]
            bad = [f for f in report_["findings"] if f["action"] != "removed"]
            if bad:
                out["problems"].append(f"gc did not remove everything: {bad}")
        else:
            if code != EXIT[sig]:
                out["problems"].append(f"{sig.name} should exit {EXIT[sig]}, got {code}")
            failed = r.event("build_failed")
            if not failed or failed.get("exit_code") != EXIT[sig]:
                out["problems"].append(f"build_failed event with exit_code {EXIT[sig]} expected, got {failed}")
            if r.event("resource_kept"):
                out["problems"].append("a single signal must not abort the cleanup (resource_kept events)")
        if build_id is None:
            out["problems"].append("no build_started event")
        else:
            left = world.leftovers(build_id)
            if left:
                out["problems"].append(f"left behind: {left}")
            out["left"] = left
            out["instances"] = len(world.instances_of(build_id))
            if out["instances"] > 1:
                out["problems"].append(f"{out['instances']} instances carried the build id")
        if out["problems"]:
            out["problems"].insert(0, f"seed {seed}: {sig.name} after {point} + {delay:.2f}s (in {out.get('landed_in')}), build {build_id}")
            out["problems"].append(r.describe())
        return out

    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(one, range(len(SEEDS))))
    elapsed = time.monotonic() - t0

    by_sig = {s.name: sum(1 for r in results if r["sig"] == s) for s in SIGNALS}
    leaked = sum(len(r.get("left", [])) for r in results)
    swept = sum(len(r.get("left_by_kill", [])) for r in results)
    steps = sorted({r.get("landed_in", "?") for r in results})
    report(
        f"interrupts: {len(results)} bakes (seeds {SEEDS[0]}-{SEEDS[-1]}; "
        + ", ".join(f"{n} {k}" for k, n in by_sig.items())
        + f"), interrupted in {len(steps)} different steps, {swept} resources left by SIGKILL removed by gc, "
        f"{leaked} leaked, {elapsed:.0f}s"
    )
    problems = [p for r in results for p in r["problems"]]
    assert not problems, "\n\n".join(problems)
