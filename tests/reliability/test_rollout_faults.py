"""A rollout under API faults: every call the rollout makes is throttled with probability 0.2,
answered 500 with probability 0.05, and served but its answer lost with probability 0.1; the
first CreateLaunchTemplateVersion's answer is always lost (the one call whose careless retry
leaves an orphan version behind). The rollout must still succeed, keep the group's healthy
targets at capacity in every sample, leave exactly one new launch-template version, and restore
the group's sizes and processes. The faults apply to the rollout's own access key only, so the
world's load balancer and the sampler are untouched."""

from __future__ import annotations

import random
import time
import uuid

from .conftest import Fleet, HealthSampler, World, bakery, fleet_with_web_ami, report

CAPACITY = 4
LOST_VERSION = "ec2:CreateLaunchTemplateVersion"


def seed_losing_first_answer_only(action: str, p: float) -> int:
    """A fault seed whose rule with `lose` = p loses the first call of `action` and not the
    second (the world draws the n-th call's fault from Random(f"{seed}:{action}:{n}"))."""
    for seed in range(1, 10_000):
        if random.Random(f"{seed}:{action}:0").random() < p <= random.Random(f"{seed}:{action}:1").random():
            return seed
    raise AssertionError("no seed found")


def test_a_rollout_under_throttling_500s_and_lost_answers_converges(world: World, faults, tmp_path):
    key = f"rel-rofault-{uuid.uuid4().hex[:6]}"
    with fleet_with_web_ami(world, "faults", CAPACITY, key + "-bake", tmp_path) as (fleet, ami):
        _roll(world, fleet, faults, key, ami)


def _roll(world: World, fleet: Fleet, faults, key: str, ami: str):
    g0 = fleet.group()
    before = (g0["DesiredCapacity"], g0["MinSize"], g0["MaxSize"])
    seed = seed_losing_first_answer_only(LOST_VERSION, 0.5)
    faults({
        "seed": seed,
        "rules": [
            {"action": "*", "throttle": 0.2, "error500": 0.05, "lose": 0.1, "access_key": key},
            {"action": LOST_VERSION, "lose": 0.5, "access_key": key},
        ],
    })
    t0 = time.monotonic()
    with HealthSampler(fleet) as sampler:
        time.sleep(0.5)
        run = bakery(world, key, "rollout", "--asg", fleet.asg, "--ami", ami, "--health-timeout", "90s")
        run.wait(300)
        time.sleep(1.0)
    elapsed = time.monotonic() - t0
    tally = world.calls(key, limit=2000)
    world.clear_faults()  # the checks below must not be faulted themselves

    injected = tally["faults_injected"]
    lost = {}
    for c in tally["calls"]:
        if c["fault"] == "lose":
            lost[c["action"]] = lost.get(c["action"], 0) + 1
    samples = [n for _, n in sampler.samples]
    low = [(t, n) for t, n in sampler.samples if n < CAPACITY]
    g = fleet.group()
    tags = {t["Key"]: t["Value"] for t in g.get("Tags", [])}
    versions = sorted(
        v["VersionNumber"]
        for v in world.client("ec2").describe_launch_template_versions(LaunchTemplateId=fleet.lt_id)["LaunchTemplateVersions"]
    )
    amis = fleet.amis()
    report(
        f"rollout-faults: {CAPACITY} instances, {tally['total']} calls, {injected.get('throttle', 0)} throttled, "
        f"{injected.get('error500', 0)} 500s, {injected.get('lose', 0)} answers lost ("
        + ", ".join(f"{n} {a}" for a, n in sorted(lost.items()))
        + f"), exit {run.code}, min healthy {min(samples) if samples else None} (floor {CAPACITY}), "
        f"{sum(1 for a in amis if a == ami)}/{len(amis)} on the new AMI, launch-template versions {versions}, {elapsed:.0f}s"
    )

    assert run.code == 0, run.describe()
    assert lost.get("CreateLaunchTemplateVersion", 0) >= 1, f"the version's answer was lost: {lost}"
    assert all(injected.get(k, 0) > 0 for k in ("throttle", "error500", "lose")), f"faults were injected: {injected}"
    assert not sampler.errors, f"DescribeTargetHealth failed while sampling: {sampler.errors[:3]}"
    assert len(samples) > 20, f"too few health samples: {sampler.samples}"
    assert not low, f"healthy targets fell below {CAPACITY}: {low}"
    assert versions == [1, 2], f"one new version, no orphan from the retried call: {versions}"
    assert g["LaunchTemplate"]["Version"] == "2"
    assert amis == [ami] * CAPACITY, f"the group converges on {ami}: {amis}"
    assert (g["DesiredCapacity"], g["MinSize"], g["MaxSize"]) == before, "desired/min/max as before"
    assert not any(k.startswith("bakery:rollout") for k in tags), f"rollout state and lock removed: {tags}"
    assert not any(p["ProcessName"] == "AZRebalance" for p in g.get("SuspendedProcesses", [])), "AZRebalance resumed"
