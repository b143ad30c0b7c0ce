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

# One interruption per seed: the seed picks the point (below) and the delay after it. This list
# was chosen (as a whole, once) so that the 20 bakes hit every point and SIGKILL hits six
# different steps; the cycle of signals is fixed by the position in the list.
SEEDS = list(range(961, 981))
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
CONCURRENCY = 4
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}

# Where a bake can be interrupted: after one of these events, plus a random delay up to the
# third field, so the signal lands before, during or after the calls around it. Every point
# comes well before the image is available, so every bake is interrupted mid-way.
POINTS = [
    ("build_started", None, 0.1),
    ("step_started", "prepare", 0.05),
    ("resource_created", "security group", 0.05),
    ("resource_created", "key pair", 0.05),
    ("step_started", "launch", 0.05),
    ("resource_created", "instance", 0.1),
    ("step_started", "wait_running", 0.1),
    ("step_started", "connect", 2.0),  # boot delay 2 s: waiting for the console / SSH
    ("step_started", "provision: shell 1", 0.3),
    ("step_started", "stop", 0.1),
    ("step_started", "create_image", 0.2),
    ("resource_created", "image", 2.5),  # snapshot delay 3 s: the image is pending
]

# A SIGKILLed process cannot take back a call it already sent: the world may still be serving
# it. gc runs after the calls in flight have ended (the world answers each in well under this).
IN_FLIGHT_GRACE = 1.0


def matches(point, e: dict) -> bool:
    name, what, _ = point
    if e.get("event") != name:
        return False
    if what is None:
        return True
    return e.get("step") == what or e.get("kind") == what


def test_interrupted_bakes_leave_nothing_behind(world: World, tmp_path):
    recipes = [world.recipe(tmp_path / f"recipe-{n}.toml", ["echo start", "sleep 0.2", "echo done"], subnet=n) for n in range(2)]
    run_id = uuid.uuid4().hex[:6]

    def one(i: int) -> dict:
        seed = SEEDS[i]
        rng = random.Random(seed)
        point = rng.choice(POINTS)
        delay = rng.uniform(0, point[2])
        sig = SIGNALS[i % len(SIGNALS)]
        r_key = f"rel-int-{run_id}-{i:02d}"
        r = bakery(world, r_key, "build", str(recipes[i % 2]), "--manifest", str(tmp_path / f"m{i:02d}.json"))
        hit = r.wait_for(lambda e: matches(point, e), timeout=120)
        where = f"{point[0]} {point[1] or ''}".strip()
        out = {"seed": seed, "point": where, "delay": delay, "sig": sig, "run": r, "problems": []}
        if hit is None:
            r.wait(60)
            out["problems"].append(f"the bake never reached {where}:\n{r.describe()}")
            return out
        time.sleep(delay)
        steps = [e["step"] for e in r.events if e.get("event") == "step_started"]
        out["landed_in"] = steps[-1] if steps else "start"
        sent = r.signal(sig)
        code = r.wait(120)
        build_id = r.build_id
        if not sent:
            out["problems"].append(f"the bake ended before {sig.name} ({where} + {delay:.2f}s): {r.describe()}")
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
                calls = world.calls(r_key, limit=1000)["calls"]
                t0 = calls[0]["t"] if calls else 0
                out["problems"].append(
                    "calls (the world's log):\n" + "\n".join(
                        f"  start +{c['t'] - t0:6.2f}s  end +{c['t'] - t0 + c['ms'] / 1000:6.2f}s  {c['action']} -> {c['status']}"
                        for c in sorted(calls, key=lambda c: c["t"])
                    )
                )
                gc(world, build_id)  # keep the world clean for what follows; reported above
            out["left"] = left
            out["instances"] = len(world.instances_of(build_id))
            if out["instances"] > 1:
                out["problems"].append(f"{out['instances']} instances carried the build id")
        if out["problems"]:
            out["problems"].insert(0, f"seed {seed}: {sig.name} after {where} + {delay:.2f}s (in {out.get('landed_in')}), build {build_id}")
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
    for r in results:
        what = f"exit {r['run'].code}" if r["sig"] != signal.SIGKILL else "gc: " + (", ".join(r.get("gc", [])) or "nothing found")
        report(
            f"  seed {r['seed']} {r['sig'].name:7} after {r['point']} +{r['delay']:.2f}s "
            f"(landed in {r.get('landed_in', '?')}): {what}; left {len(r.get('left', []))}",
            live=False,
        )
    problems = [p for r in results for p in r["problems"]]
    assert not problems, "\n\n".join(problems)
