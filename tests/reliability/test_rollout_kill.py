"""A rollout SIGKILLed at 5 random points and rerun each time: every rerun resumes from the
state on the group, the group converges on the new AMI, and the number of healthy targets,
sampled every 200 ms from before the first run to after the last, never falls below the
group's capacity (4)."""

from __future__ import annotations

import random
import signal
import subprocess
import time
import uuid

from .conftest import Fleet, HealthSampler, World, bakery, fleet_with_web_ami, report

CAPACITY = 4
KILL_SEEDS = [501, 502, 503, 504, 505]
# The kill instants, counted from the start of the first run: kill k is drawn (with seed k)
# from the k-th of five equal windows of KILL_SPAN, so the kills spread over the whole rollout
# (lock and launch-template version, each batch's surge, wait and retirement), and the last one
# lands before the rollout could be over (4 batches of boot 2 s + 2 health checks: > 16 s).
KILL_SPAN = (0.3, 12.0)
MIN_RUN = 0.3  # a rerun lives at least this long before its kill
MAX_FINAL_RUNS = 3


def test_a_rollout_killed_five_times_converges_without_losing_capacity(world: World, tmp_path):
    key = f"rel-rollout-{uuid.uuid4().hex[:6]}"
    with fleet_with_web_ami(world, "kill", CAPACITY, key + "-bake", tmp_path) as (fleet, ami):
        _converge(world, fleet, ami, key)


def _tags(g: dict) -> dict:
    return {t["Key"]: t["Value"] for t in g.get("Tags", [])}


def _converge(world: World, fleet: Fleet, ami: str, key: str):
    g0 = fleet.group()
    before = (g0["DesiredCapacity"], g0["MinSize"], g0["MaxSize"])
    old_ami = world.var("WORLD_STACK_AMI")
    args = ["rollout", "--asg", fleet.asg, "--ami", ami, "--health-timeout", "60s"]

    kills, runs, state_before = [], [], []
    t0 = time.monotonic()
    with HealthSampler(fleet) as sampler:
        time.sleep(0.5)  # a few samples of the group before anything changes
        lo, hi = KILL_SPAN
        width = (hi - lo) / len(KILL_SEEDS)
        start = time.monotonic()
        for k, seed in enumerate(KILL_SEEDS):
            at = random.Random(seed).uniform(lo + k * width, lo + (k + 1) * width)
            state_before.append("bakery:rollout" in _tags(fleet.group()))
            r = bakery(world, key, *args)
            after = max(MIN_RUN, at - (time.monotonic() - start))
            try:
                r.proc.wait(timeout=after)
            except subprocess.TimeoutExpired:
                pass
            sent = r.signal(signal.SIGKILL)
            r.wait(60)
            runs.append(r)
            g = fleet.group()
            last = r.events[-1]["event"] if r.events else "none"
            kills.append(
                {
                    "seed": seed, "at": at, "after": after, "sent": sent, "code": r.code, "last_event": last,
                    "batches": [e["batch"] for e in r.events if e.get("event") == "batch_started"],
                    "resumed": (r.event("rollout_started") or {}).get("resumed"),
                    "state_kept": "bakery:rollout" in _tags(g),
                    "new": sum(1 for a in fleet.amis() if a == ami),
                    "desired": g["DesiredCapacity"],
                }
            )
            assert sent and r.code == -signal.SIGKILL, (
                f"the rollout ended before its kill at {at:.2f}s (seed {seed}): the kill points "
                f"must land mid-rollout\n{r.describe()}"
            )
        final = None
        for _ in range(MAX_FINAL_RUNS):
            state_before.append("bakery:rollout" in _tags(fleet.group()))
            final = bakery(world, key, *args)
            final.wait(240)
            runs.append(final)
            if final.code == 0:
                break
        time.sleep(1.0)  # and a few samples after it finished
    elapsed = time.monotonic() - t0

    samples = [n for _, n in sampler.samples]
    low = [(t, n) for t, n in sampler.samples if n < CAPACITY]
    g = fleet.group()
    tags = _tags(g)
    versions = world.client("ec2").describe_launch_template_versions(LaunchTemplateId=fleet.lt_id)["LaunchTemplateVersions"]
    lt_version = g["LaunchTemplate"]["Version"]
    version_ami = next((v["LaunchTemplateData"].get("ImageId") for v in versions if str(v["VersionNumber"]) == lt_version), None)
    amis = fleet.amis()
    # A run resumes exactly when it found a rollout's state on the group.
    resumed = [((r.event("rollout_started") or {}).get("resumed"), had) for r, had in zip(runs, state_before)]

    report(
        f"rollout-kill: {CAPACITY} instances, {sum(k['sent'] for k in kills)} SIGKILLs at "
        + ", ".join(f"{k['at']:.1f}s" for k in kills)
        + f", {len(runs)} runs (the last exit {final.code}), {len(samples)} health samples, "
        f"min healthy {min(samples) if samples else None} (floor {CAPACITY}), "
        f"{sum(1 for a in amis if a == ami)}/{len(amis)} on the new AMI, "
        f"{len(versions)} launch-template versions, {elapsed:.0f}s"
    )
    for k in kills:
        report(
            f"  seed {k['seed']}: killed at {k['at']:.2f}s, {k['after']:.2f}s into its run (last event {k['last_event']}, batches "
            f"{k['batches']}, resumed {k['resumed']}): {k['new']} new instances, desired {k['desired']}",
            live=False,
        )

    assert final.code == 0, f"the rollout did not converge in {MAX_FINAL_RUNS} final runs:\n{final.describe()}"
    assert not sampler.errors, f"DescribeTargetHealth failed while sampling: {sampler.errors[:3]}"
    assert len(samples) > 20, f"too few health samples: {sampler.samples}"
    assert not low, f"healthy targets fell below {CAPACITY}: {low} (all samples: {sampler.samples})"
    assert all(got == had for got, had in resumed), f"(resumed, state found) per run: {resumed}"
    assert sum(had for had in state_before) >= len(KILL_SEEDS), f"the kills left a rollout to resume: {state_before}"
    assert amis == [ami] * CAPACITY, f"the group converges on {ami} (old {old_ami}): {amis}"
    assert (g["DesiredCapacity"], g["MinSize"], g["MaxSize"]) == before, "desired/min/max as before"
    assert version_ami == ami, f"the group's launch-template version {lt_version} runs {version_ami}, not {ami}"
    assert not any(k.startswith("bakery:rollout") for k in tags), f"rollout state and lock removed: {tags}"
    assert not any(p["ProcessName"] == "AZRebalance" for p in g.get("SuspendedProcesses", [])), "AZRebalance resumed"
    fleet.wait_healthy(CAPACITY, timeout=10)
