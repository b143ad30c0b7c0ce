"""Helpers of scripts/bench-rollout: the benchmark group, the timed rollouts and the report.

Run with the world's virtualenv python (boto3) and the world's env file exported
(AWS_ENDPOINT_URL, WORLD_*). Every address used is inside 127.0.0.0/8: the script refuses an
endpoint elsewhere, and the only other address it reaches is the same endpoint's `/_world/` API.

    benchlib.py prep STATE.json CAPACITY SURGE CANARY TIMEOUT_S [RAMP]
        Reads the floor's inputs (WORLD_BOOT_DELAY; HealthCheckIntervalSeconds and
        HealthyThresholdCount of WORLD_TARGET_GROUP_ARN from DescribeTargetGroups), removes a
        benchmark group left by an earlier, killed run, copies the stack's launch template and
        creates the benchmark group from the copy (WORLD_PRIVATE_SUBNETS, the stack's target
        group, HealthCheckType ELB, the stack group's grace period), then waits until all its
        instances are InService and healthy in the target group. With RAMP `exponential`, the
        floor counts the ramp's batches (canary, then canary x 2^(n-1) up to SURGE), and the
        report also gives the floors of fixed batches: of SURGE, and of the canary's size.
    benchlib.py run STATE.json I AMI TIMEOUT_S OUT_DIR RUNS.jsonl -- COMMAND...
        Waits for the world to settle, then runs COMMAND (the rollout, `--output json`) with
        DescribeTargetHealth sampled every 250 ms; records its wall time, its NDJSON events,
        the samples, every new instance's first registration / first `healthy`, and the API
        calls made during the run. Appends one JSON line to RUNS.jsonl.
    benchlib.py report STATE.json RUNS.jsonl
    benchlib.py cleanup STATE.json [AMI...]
        Deletes the benchmark group (ForceDelete), waits for its instances to terminate and their
        bodies to go, deletes the launch-template copy, deregisters the given AMIs.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

BENCH_NAME = "bench-rollout"  # the benchmark group and its launch-template copy
BENCH_TAG = {"Key": "bench:rollout", "Value": "bakery scripts/bench-rollout"}
ASG_TAG = "aws:autoscaling:groupName"
SAMPLE_S = 0.25


def say(msg: str) -> None:
    print(f"bench-rollout: {msg}", file=sys.stderr, flush=True)


def die(msg: str, code: int = 1):
    say(msg)
    sys.exit(code)


def endpoint() -> str:
    ep = os.environ.get("AWS_ENDPOINT_URL", "")
    if not re.match(r"^http://127\.\d+\.\d+\.\d+:\d+$", ep):
        die(f"AWS_ENDPOINT_URL={ep!r} is not a loopback address; refusing to run")
    return ep


def client(service: str, **cfg):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        service,
        endpoint_url=endpoint(),
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        config=Config(retries={"mode": "standard", "max_attempts": 8}, **cfg),
    )


def world_get(path: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(endpoint() + path, timeout=timeout) as r:
        return json.loads(r.read())


def code_of(e: Exception) -> str:
    return getattr(e, "response", {}).get("Error", {}).get("Code", "")


def wait_for(what: str, timeout: float, probe, every: float = 0.25):
    """Polls probe() -> (done, detail) until done; dies naming `what` and the last detail."""
    end = time.monotonic() + timeout
    detail = ""
    while True:
        done, detail = probe()
        if done:
            return detail
        if time.monotonic() >= end:
            die(f"timed out after {timeout:.0f}s waiting for {what}: {detail}")
        time.sleep(every)


def epoch(rfc3339: str) -> float:
    """RFC 3339 with up to nanoseconds (bakery's `ts`) to epoch seconds."""
    from datetime import datetime

    m = re.match(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", rfc3339)
    if not m:
        raise ValueError(f"not RFC 3339: {rfc3339!r}")
    base = datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    frac = float("0." + m.group(2)) if m.group(2) else 0.0
    return base.timestamp() + frac


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rng(lo, hi) -> str:
    return f"{lo:.2f}..{hi:.2f}" if lo is not None and hi is not None else "-"


def f2(x, w: int = 6) -> str:
    return f"{x:{w}.2f}" if x is not None else f"{'-':>{w}}"


# ------------------------------------------------------------------------------ the group
def load_state(path: str) -> dict:
    return json.loads(Path(path).read_text())


def fleet(asg, elbv2, ec2, state: dict) -> dict:
    """The benchmark group as the APIs show it: instances with lifecycle, ASG health, AMI and
    target health."""
    groups = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[state["group"]])["AutoScalingGroups"]
    if not groups:
        return {"exists": False, "instances": [], "desired": 0}
    g = groups[0]
    th = elbv2.describe_target_health(TargetGroupArn=state["target_group"])["TargetHealthDescriptions"]
    health = {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in th}
    ids = [i["InstanceId"] for i in g["Instances"]]
    amis = {}
    if ids:
        for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
            for i in r["Instances"]:
                amis[i["InstanceId"]] = i["ImageId"]
    return {
        "exists": True,
        "desired": g["DesiredCapacity"],
        "draining": sorted(k for k, v in health.items() if v == "draining"),
        "instances": [
            {
                "id": i["InstanceId"],
                "lifecycle": i["LifecycleState"],
                "health": i["HealthStatus"],
                "ami": amis.get(i["InstanceId"]),
                "target": health.get(i["InstanceId"], "unregistered"),
            }
            for i in g["Instances"]
        ],
    }


def steady(state: dict, want_ami: str | None = None):
    """A probe: the group at capacity, every instance InService, Healthy and `healthy` in the
    target group (on `want_ami` if given), nothing draining, and no body alive that belongs to
    no group (the last run's retired instances have finished dying)."""
    asg, elbv2, ec2 = client("autoscaling"), client("elbv2"), client("ec2")
    cap = state["capacity"]

    def probe():
        f = fleet(asg, elbv2, ec2, state)
        inst = f["instances"]
        good = [
            i for i in inst
            if i["lifecycle"] == "InService" and i["health"] == "Healthy" and i["target"] == "healthy"
            and (want_ami is None or i["ami"] == want_ami)
        ]
        if f["desired"] != cap or len(inst) != cap or len(good) != cap:
            summary = {}
            for i in inst:
                k = f"{i['lifecycle']}/{i['health']}/{i['target']}" + (
                    "" if want_ami is None or i["ami"] == want_ami else f"/{i['ami']}")
                summary[k] = summary.get(k, 0) + 1
            return False, f"desired {f['desired']}, {len(good)} of {cap} ready; {summary}"
        if f["draining"]:
            return False, f"{len(f['draining'])} target(s) draining"
        members = {i["id"] for i in inst} | set(stack_members(asg))
        stray = [b["instance_id"] for b in world_get("/_world/status").get("bodies", [])
                 if b.get("state") not in ("terminated", "stopped") and b["instance_id"] not in members]
        if stray:
            return False, f"{len(stray)} body(ies) of retired instances still up: {stray}"
        return True, ""

    return probe


def stack_members(asg) -> list[str]:
    name = os.environ.get("WORLD_ASG")
    if not name:
        return []
    gs = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    return [i["InstanceId"] for i in gs[0]["Instances"]] if gs else []


def delete_group(state: dict, timeout: float) -> None:
    """Deletes the benchmark group (ForceDelete) and its launch-template copy, waiting until its
    instances are terminated and their bodies gone."""
    asg, ec2 = client("autoscaling"), client("ec2")
    name = state["group"]
    gs = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    if gs:
        say(f"deleting Auto Scaling group {name} ({len(gs[0]['Instances'])} instances, ForceDelete)")
        try:
            asg.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
        except Exception as e:  # noqa: BLE001
            if "not found" not in str(e):
                raise

    def gone():
        if asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]:
            return False, "the group still exists"
        live = []
        for page in ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": f"tag:{ASG_TAG}", "Values": [name]},
                     {"Name": "instance-state-name", "Values": ["pending", "running", "shutting-down", "stopping", "stopped"]}]
        ):
            for r in page["Reservations"]:
                live += [i["InstanceId"] for i in r["Instances"]]
        if live:
            return False, f"{len(live)} instance(s) not terminated: {live}"
        ids_alive = [b["instance_id"] for b in world_get("/_world/status").get("bodies", [])
                     if b.get("state") not in ("terminated", "stopped")]
        members = set(stack_members(asg))
        stray = [i for i in ids_alive if i not in members]
        if stray:
            return False, f"bodies still up: {stray}"
        return True, ""

    wait_for(f"group {name}'s instances to terminate", timeout, gone, every=0.5)
    for lt in ec2.describe_launch_templates(
        Filters=[{"Name": "launch-template-name", "Values": [state["template_name"]]}]
    )["LaunchTemplates"]:
        ec2.delete_launch_template(LaunchTemplateId=lt["LaunchTemplateId"])
        say(f"deleted launch template {lt['LaunchTemplateId']} ({state['template_name']})")


def ramp_batches(capacity: int, surge: int, canary: int, ramp: str) -> list[int]:
    """Batch sizes as bakery plans them (plan::batch_size): the canary, then `surge` each
    (fixed) or canary x 2^(n-1) capped at `surge` (exponential), the last one what is left."""
    sizes, left, n = [], capacity, 1
    while left > 0:
        if n == 1:
            size = canary
        elif ramp == "exponential":
            size = min(surge, canary * 2 ** (n - 1))
        else:
            size = surge
        sizes.append(min(max(size, 1), left))
        left -= sizes[-1]
        n += 1
    return sizes


def prep(state_path: str, capacity: int, surge: int, canary: int, timeout: float, ramp: str = "fixed") -> None:
    env = os.environ
    for k in ("WORLD_TARGET_GROUP_ARN", "WORLD_LAUNCH_TEMPLATE_ID", "WORLD_PRIVATE_SUBNETS", "WORLD_BOOT_DELAY", "WORLD_ASG"):
        if not env.get(k):
            die(f"{k} is not in the world's env file; start the world with `scripts/world up --stack`")
    asg, elbv2, ec2 = client("autoscaling"), client("elbv2"), client("ec2")
    tg_arn = env["WORLD_TARGET_GROUP_ARN"]
    tg = elbv2.describe_target_groups(TargetGroupArns=[tg_arn])["TargetGroups"][0]
    stack = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[env["WORLD_ASG"]])["AutoScalingGroups"]
    if not stack:
        die(f"the stack's group {env['WORLD_ASG']} does not exist")
    stack = stack[0]
    state = {
        "group": BENCH_NAME,
        "template_name": BENCH_NAME,
        "target_group": tg_arn,
        "target_group_name": tg["TargetGroupName"],
        "capacity": capacity,
        "surge": surge,
        "canary": canary,
        "boot_delay": float(env["WORLD_BOOT_DELAY"]),
        "interval": float(tg["HealthCheckIntervalSeconds"]),
        "timeout": float(tg["HealthCheckTimeoutSeconds"]),
        "healthy_threshold": int(tg["HealthyThresholdCount"]),
        "unhealthy_threshold": int(tg["UnhealthyThresholdCount"]),
        "grace": int(stack.get("HealthCheckGracePeriod") or 0),
        "endpoint": endpoint(),
        "world_dir": env.get("WORLD_DIR", ""),
    }
    # Batches as bakery plans them: the canary, then batches of `surge` (or the ramp's).
    per_batch = state["boot_delay"] + state["healthy_threshold"] * state["interval"]
    state["ramp"] = ramp
    state["batch_sizes"] = ramp_batches(capacity, surge, canary, ramp)
    state["batches"] = len(state["batch_sizes"])
    state["floor"] = state["batches"] * per_batch
    if ramp == "exponential":
        fixed = ramp_batches(capacity, surge, canary, "fixed")
        small = ramp_batches(capacity, canary, canary, "fixed")
        state["fixed_sizes"], state["fixed_floor"] = fixed, len(fixed) * per_batch
        state["small_sizes"], state["small_floor"] = small, len(small) * per_batch
    Path(state_path).write_text(json.dumps(state, indent=1))

    # A group left behind by a killed run: remove it first (it is ours by name and tag).
    left = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[BENCH_NAME])["AutoScalingGroups"]
    left_lt = ec2.describe_launch_templates(
        Filters=[{"Name": "launch-template-name", "Values": [BENCH_NAME]}])["LaunchTemplates"]
    if left or left_lt:
        say("removing a benchmark group / launch template left by an earlier run")
        delete_group(state, timeout)

    version = (stack.get("LaunchTemplate") or {}).get("Version") or "$Default"
    src = ec2.describe_launch_template_versions(
        LaunchTemplateId=env["WORLD_LAUNCH_TEMPLATE_ID"], Versions=[version]
    )["LaunchTemplateVersions"][0]
    data = dict(src["LaunchTemplateData"])
    data["TagSpecifications"] = [
        {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": BENCH_NAME}, BENCH_TAG]}
    ]
    lt = ec2.create_launch_template(
        LaunchTemplateName=BENCH_NAME,
        VersionDescription=f"copy of {env['WORLD_LAUNCH_TEMPLATE_ID']} version {src['VersionNumber']} for scripts/bench-rollout",
        LaunchTemplateData=data,
        TagSpecifications=[{"ResourceType": "launch-template", "Tags": [BENCH_TAG]}],
    )["LaunchTemplate"]
    state["template_id"] = lt["LaunchTemplateId"]
    state["start_ami"] = data.get("ImageId")
    Path(state_path).write_text(json.dumps(state, indent=1))
    asg.create_auto_scaling_group(
        AutoScalingGroupName=BENCH_NAME,
        LaunchTemplate={"LaunchTemplateId": lt["LaunchTemplateId"], "Version": "$Latest"},
        MinSize=capacity,
        MaxSize=capacity + surge,
        DesiredCapacity=capacity,
        VPCZoneIdentifier=env["WORLD_PRIVATE_SUBNETS"],
        TargetGroupARNs=[tg_arn],
        HealthCheckType="ELB",
        HealthCheckGracePeriod=state["grace"],
        Tags=[{**BENCH_TAG, "PropagateAtLaunch": True, "ResourceId": BENCH_NAME, "ResourceType": "auto-scaling-group"}],
    )
    say(f"created group {BENCH_NAME} of {capacity} from launch template {lt['LaunchTemplateId']} "
        f"(copy of {env['WORLD_LAUNCH_TEMPLATE_ID']} {version}), target group {tg['TargetGroupName']}, "
        f"grace {state['grace']}s; waiting for {capacity} healthy targets")
    t0 = time.monotonic()
    wait_for(f"{capacity} healthy instances in {BENCH_NAME}", timeout, steady(state, state["start_ami"]), every=0.5)
    say(f"{capacity} instances healthy after {time.monotonic() - t0:.1f}s")


# ------------------------------------------------------------------------------ a run
class Sampler(threading.Thread):
    """DescribeTargetHealth every SAMPLE_S on a fixed schedule. Per sample: how many of the
    benchmark group's instances (tag aws:autoscaling:groupName) are `healthy`, and how many
    targets are healthy in all. Per benchmark instance: first time seen registered, first time
    seen `healthy`, the states it went through."""

    def __init__(self, state: dict) -> None:
        super().__init__(daemon=True, name="sampler")
        self.state = state
        self.elbv2 = client("elbv2")
        self.ec2 = client("ec2")
        self.stop_ev = threading.Event()
        self.first_done = threading.Event()
        self.group_of: dict[str, str] = {}
        self.samples: list[dict] = []
        self.inst: dict[str, dict] = {}
        self.calls: dict[str, int] = {}
        self.errors = 0
        self.late = 0

    def _count(self, key: str) -> None:
        self.calls[key] = self.calls.get(key, 0) + 1

    def _learn(self, ids: list[str]) -> None:
        unknown = [i for i in ids if i not in self.group_of]
        if not unknown:
            return
        self._count("ec2:DescribeInstances")
        for r in self.ec2.describe_instances(InstanceIds=unknown)["Reservations"]:
            for i in r["Instances"]:
                tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
                self.group_of[i["InstanceId"]] = tags.get(ASG_TAG, "")

    def sample(self) -> None:
        t_a = time.time()
        self._count("elasticloadbalancing:DescribeTargetHealth")
        th = self.elbv2.describe_target_health(TargetGroupArn=self.state["target_group"])["TargetHealthDescriptions"]
        t_b = time.time()
        states = {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in th}
        self._learn(list(states))
        group = self.state["group"]
        mine = {k: v for k, v in states.items() if self.group_of.get(k) == group}
        t = (t_a + t_b) / 2  # the answer reflects some moment inside the call
        for iid, st in mine.items():
            rec = self.inst.setdefault(iid, {"first_seen": t, "first_seen_lo": t_a, "states": []})
            if not rec["states"] or rec["states"][-1] != st:
                rec["states"].append(st)
            if st == "healthy" and "first_healthy" not in rec:
                rec["first_healthy"] = t
                rec["first_healthy_lo"] = self.samples[-1]["t_b"] if self.samples else t_a
        self.samples.append({
            "t": t, "t_b": t_b, "call_s": t_b - t_a,
            "healthy": sum(1 for v in mine.values() if v == "healthy"),
            "healthy_all": sum(1 for v in states.values() if v == "healthy"),
            "registered": len(mine),
        })

    def run(self) -> None:
        nxt = time.monotonic()
        while True:
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001
                self.errors += 1
                if self.errors <= 3:
                    say(f"sampler: {e}")
            self.first_done.set()
            if self.stop_ev.is_set():
                return
            nxt += SAMPLE_S
            delay = nxt - time.monotonic()
            if delay < 0:
                self.late += 1
                nxt = time.monotonic()
                delay = 0
            if self.stop_ev.wait(delay):
                try:
                    self.sample()  # one last look after the rollout ended
                except Exception:  # noqa: BLE001
                    self.errors += 1
                return


def call_counts() -> tuple[int, dict]:
    c = world_get("/_world/calls?limit=0")
    return c["total"], c["counts"]


def run(state_path: str, i: int, ami: str, timeout: float, out_dir: str, runs_path: str, cmd: list[str]) -> int:
    state = load_state(state_path)
    stop = threading.Event()
    got_signal: list[int] = []

    def on_signal(signum, _frame):
        got_signal.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # Settle: the previous run's retired instances gone, the group at capacity and healthy.
    t_settle = time.monotonic()
    wait_for(f"the group to settle before run {i}", 120, steady(state), every=0.25)
    settle_s = time.monotonic() - t_settle
    load_before = os.getloadavg()

    out = Path(out_dir)
    events_path, err_path = out / f"run-{i}.ndjson", out / f"run-{i}.stderr"
    total0, counts0 = call_counts()
    sampler = Sampler(state)
    sampler.start()
    sampler.first_done.wait(10)
    base_healthy = sampler.samples[-1]["healthy"] if sampler.samples else None
    lines: list[tuple[float, str]] = []
    with open(err_path, "w") as err:
        t0 = time.time()
        p0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                start_new_session=True)

        def pump():
            for raw in iter(proc.stdout.readline, b""):
                lines.append((time.time(), raw.decode(errors="replace").rstrip("\n")))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        deadline = p0 + timeout
        timed_out = False
        while proc.poll() is None:
            if stop.is_set() or time.perf_counter() > deadline:
                timed_out = not stop.is_set()
                say(f"run {i}: {'timed out after %.0fs' % timeout if timed_out else 'interrupted'}; "
                    f"stopping the rollout (pid {proc.pid}) with SIGTERM")
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                break
            stop.wait(0.005)
        wall = time.perf_counter() - p0
        t1 = t0 + wall
        reader.join(timeout=5)
    sampler.stop_ev.set()
    sampler.join(timeout=10)
    load_after = os.getloadavg()
    total1, counts1 = call_counts()

    events_path.write_text("".join(f"{line}\n" for _, line in lines))
    events = []
    for recv, line in lines:
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(ev, dict) and "event" in ev:
            ev["_recv"] = recv
            try:
                ev["_ts"] = epoch(ev["ts"])
            except (KeyError, ValueError):
                ev["_ts"] = recv
            events.append(ev)

    # The calls of the run's window, from the world's own log (bakery's and the sampler's).
    calls = []
    try:
        c = world_get(f"/_world/calls?limit={total1 - total0 + 10}")
        calls = [x for x in c.get("calls", []) if t0 - 0.05 <= float(x.get("t", 0)) <= t1 + 0.05]
    except Exception as e:  # noqa: BLE001
        say(f"run {i}: could not read the world's call log: {e}")
    by_action: dict[str, dict] = {}
    for x in calls:
        k = f"{x.get('service')}:{x.get('action')}"
        a = by_action.setdefault(k, {"n": 0, "ms": []})
        a["n"] += 1
        a["ms"].append(float(x.get("ms", 0)))
    delta = {k: counts1.get(k, 0) - counts0.get(k, 0) for k in counts1 if counts1.get(k, 0) != counts0.get(k, 0)}

    rc = 124 if timed_out else proc.returncode
    err_text = ""
    if timed_out:
        err_text = f"timed out after {timeout:.0f}s"
    elif got_signal:
        err_text = "interrupted"
    elif rc != 0:
        err_text = f"exit {rc}"
    pre = set()
    if sampler.samples:
        first_t = sampler.samples[0]["t"]
        pre = {k for k, v in sampler.inst.items() if v["first_seen"] <= first_t}
    healthy_during = [s["healthy"] for s in sampler.samples]
    # The world's own account of each new body's boot (from launch seen to services started).
    boots = {}
    try:
        log_text = (Path(state["world_dir"]) / "server.log").read_text(errors="replace")
        for m in re.finditer(r"(i-[0-9a-f]+): booted at \S+ in ([\d.]+)s", log_text):
            if m.group(1) in sampler.inst and m.group(1) not in pre:
                boots[m.group(1)] = float(m.group(2))
    except OSError:
        pass
    rec = {
        "i": i, "ami": ami, "ok": rc == 0 and not got_signal, "rc": rc, "error": err_text,
        "wall_s": round(wall, 4), "t0": t0, "t1": t1, "settle_s": round(settle_s, 2),
        "load_before": load_before, "load_after": load_after,
        "events": events, "stderr": str(err_path), "ndjson": str(events_path),
        "samples": sampler.samples, "sampler_calls": sampler.calls, "sampler_errors": sampler.errors,
        "sampler_late": sampler.late,
        "instances": {k: v for k, v in sampler.inst.items() if k not in pre},
        "pre_instances": sorted(pre),
        "boots": boots,
        "min_healthy": min(healthy_during) if healthy_during else None,
        "min_healthy_all": min((s["healthy_all"] for s in sampler.samples), default=None),
        "base_healthy": base_healthy,
        "calls_delta": delta, "calls_window": by_action,
    }
    with open(runs_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    fin = next((e for e in events if e["event"] == "rollout_finished"), None)
    say(f"run {i}: {wall:6.2f}s to {ami} ({err_text or 'exit 0'}"
        f"{', ' + fin.get('result', '') if fin else ''}); min healthy {rec['min_healthy']}, "
        f"{len(sampler.samples)} samples")
    if got_signal:
        return 130
    if rc != 0:
        try:
            tail = Path(err_path).read_text(errors="replace").strip().splitlines()[-15:]
            say(f"run {i}: bakery's last stderr lines:\n    " + "\n    ".join(tail))
        except OSError:
            pass
        if not world_answers():
            say(f"run {i}: the world stopped answering: {world_gone_reason()}")
        return 1
    # bakery says it is done: check the group independently.
    wait_for(f"the group to run {ami} everywhere after run {i}", 30, steady(state, ami), every=0.25)
    return 0


# ------------------------------------------------------------------------------ report
def breakdown(state: dict, r: dict) -> dict | None:
    """Splits one run's wall time at its events, and each batch at what the sampler saw."""
    ev = r["events"]

    def first(name):
        return next((e["_ts"] for e in ev if e["event"] == name), None)

    started, finished = first("rollout_started"), first("rollout_finished")
    bs = [e for e in ev if e["event"] == "batch_started"]
    rt = [e for e in ev if e["event"] == "retired"]
    if started is None or finished is None or not bs or len(bs) != len(rt):
        return None
    bounds = [r["t0"]] + [e["_ts"] for e in rt]
    inst = r["instances"]
    batches = []
    for k, (b, x) in enumerate(zip(bs, rt)):
        lo, hi = bounds[k], bounds[k + 1]
        mine = {iid: v for iid, v in inst.items() if lo <= v["first_seen_lo"] < hi or (k == 0 and v["first_seen_lo"] < lo)}
        seen = [v["first_seen"] for v in mine.values()]
        healthy = [v.get("first_healthy") for v in mine.values()]
        healthy_lo = [v.get("first_healthy_lo") for v in mine.values()]
        last_h = max(healthy) if healthy and None not in healthy else None
        last_h_lo = max(healthy_lo) if healthy_lo and None not in healthy_lo else None
        nxt = bs[k + 1]["_ts"] if k + 1 < len(bs) else None
        batches.append({
            "batch": b.get("batch", k + 1),
            "size": b.get("size"),
            "n_seen": len(mine),
            "started_to_retired": x["_ts"] - b["_ts"],
            "to_registered": (max(seen) - b["_ts"]) if seen else None,
            "to_healthy": (last_h - b["_ts"]) if last_h is not None else None,
            "to_healthy_early": (last_h_lo - b["_ts"]) if last_h_lo is not None else None,
            # The last new target turned healthy between two samples: bakery's reaction time is
            # at least retired - (the sample that showed it), at most retired - (the one before).
            "notice_lo": max(0.0, x["_ts"] - last_h) if last_h is not None else None,
            "notice_hi": (x["_ts"] - last_h_lo) if last_h_lo is not None else None,
            "inst_reg_to_healthy": [v["first_healthy"] - v["first_seen"] for v in mine.values() if "first_healthy" in v],
            "went_unhealthy": sum(1 for v in mine.values() if "unhealthy" in v["states"]),
            "retired_to_next": (nxt - x["_ts"]) if nxt is not None else None,
        })
    return {
        "lead_in": started - r["t0"],
        "to_first_batch": bs[0]["_ts"] - started,
        "batches": batches,
        "tail": finished - rt[-1]["_ts"],
        "exit": r["t1"] - finished,
    }


def bakery_share(r: dict, b: dict) -> tuple[float | None, float | None]:
    """Wall time minus the time each batch spent until its last new target was healthy (as a
    range, since `healthy` is known to within one sample)."""
    late = [x["to_healthy"] for x in b["batches"]]
    early = [x["to_healthy_early"] for x in b["batches"]]
    if None in late or None in early:
        return None, None
    return r["wall_s"] - sum(late), r["wall_s"] - sum(early)


def report(state_path: str, runs_path: str) -> int:
    state = load_state(state_path)
    runs = [json.loads(line) for line in Path(runs_path).read_text().splitlines() if line.strip()]
    ok = [r for r in runs if r["ok"]]
    cap, nb = state["capacity"], state["batches"]
    per_batch = state["boot_delay"] + state["healthy_threshold"] * state["interval"]
    rc = 0

    print(f"bench-rollout: {cap} instances, batches of {state['surge']} (canary {state['canary']}), "
          f"world {state['endpoint']}")
    print(f"  boot delay {state['boot_delay']:g} s (WORLD_BOOT_DELAY); target group {state['target_group_name']}: "
          f"interval {state['interval']:g} s, timeout {state['timeout']:g} s, healthy threshold "
          f"{state['healthy_threshold']} (DescribeTargetGroups)")
    print(f"  floor = {nb} batches x ({state['boot_delay']:g} s boot + {state['healthy_threshold']} x "
          f"{state['interval']:g} s healthy threshold) = {nb} x {per_batch:.2f} s = {state['floor']:.2f} s")
    print()
    print("== runs ==")
    print("  run  to AMI                  wall s  bakery s  ratio  min healthy (of group / in TG)  API calls  load 1m  result")
    for r in runs:
        fin = next((e for e in r["events"] if e["event"] == "rollout_finished"), {})
        n_calls = sum(r["calls_delta"].values()) - sum(r["sampler_calls"].values())
        print(f"  {r['i']:>3}  {r['ami']:<22} {r['wall_s']:7.2f}  {f2(fin.get('duration_s'), 8)}  "
              f"{r['wall_s'] / state['floor']:5.2f}  {str(r['min_healthy']):>5} / {str(r['min_healthy_all']):<5}"
              f"{'':>19}  {n_calls:>9}  {r['load_before'][0]:7.2f}  "
              f"{'ok' if r['ok'] else r['error']}{', ' + fin['result'] if fin.get('result') else ''}")

    bds = [(r, breakdown(state, r)) for r in ok]
    bds = [(r, b) for r, b in bds if b]
    if bds:
        print()
        print("== where the time goes (seconds; event `ts` from bakery, target health sampled every "
              f"{SAMPLE_S * 1000:.0f} ms) ==")
        print("  per batch: started->retired = [started -> last new target healthy] + [healthy -> retired: bakery noticing].")
        print(f"  'healthy' is the first sample that showed it, so it is known to within one sample ({SAMPLE_S:g} s):")
        print("  bakery's noticing time is given as a range. Floor per batch "
              f"{per_batch:.2f} s.")
        for r, b in bds:
            print()
            print(f"  run {r['i']} ({r['wall_s']:.2f} s; API calls by bakery "
                  f"{sum(r['calls_delta'].values()) - sum(r['sampler_calls'].values())})")
            print(f"    process start -> rollout_started      {b['lead_in']:6.2f}")
            print(f"    rollout_started -> batch 1 started    {b['to_first_batch']:6.2f}")
            print("    batch  size  started->retired  over floor  ->registered  ->healthy  healthy->retired  "
                  "retired->next started")
            for x in b["batches"]:
                print(f"    {x['batch']:>5}  {str(x['size']):>4}  {x['started_to_retired']:16.2f}  "
                      f"{x['started_to_retired'] - per_batch:+10.2f}  {f2(x['to_registered'], 12)}  "
                      f"{f2(x['to_healthy'], 9)}  {rng(x['notice_lo'], x['notice_hi']):>16}  "
                      f"{f2(x['retired_to_next'], 21)}")
            print(f"    last retired -> rollout_finished      {b['tail']:6.2f}")
            print(f"    rollout_finished -> process exit      {b['exit']:6.2f}")
            tot = (b["lead_in"] + b["to_first_batch"] + b["tail"] + b["exit"]
                   + sum(x["started_to_retired"] + (x["retired_to_next"] or 0) for x in b["batches"]))
            own = bakery_share(r, b)
            print(f"    (sum {tot:.2f} s; not waiting for new targets to turn healthy: {rng(*own)} s)")

        print()
        print(f"  medians over {len(bds)} run(s):")
        allb = [x for _, b in bds for x in b["batches"]]
        batches_sum = med([sum(x["started_to_retired"] for x in b["batches"]) for _, b in bds])
        gaps_sum = med([sum(x["retired_to_next"] or 0 for x in b["batches"]) for _, b in bds])
        fixed = med([b["lead_in"] + b["to_first_batch"] + b["tail"] + b["exit"] for _, b in bds])
        reg_h = [v for x in allb for v in x["inst_reg_to_healthy"]]
        rows = [
            ("process start -> rollout_started", med([b["lead_in"] for _, b in bds])),
            ("rollout_started -> batch 1 started", med([b["to_first_batch"] for _, b in bds])),
            ("a batch: started -> retired", med([x["started_to_retired"] for x in allb])),
            ("  started -> last new target registered", med([x["to_registered"] for x in allb])),
            ("  started -> last new target healthy", med([x["to_healthy"] for x in allb])),
            ("  healthy -> retired (bakery noticing, at least)", med([x["notice_lo"] for x in allb])),
            ("  healthy -> retired (bakery noticing, at most)", med([x["notice_hi"] for x in allb])),
            ("  one target: registered -> healthy", med(reg_h)),
            ("retired -> next batch started", med([x["retired_to_next"] for x in allb if x["retired_to_next"] is not None])),
            ("last retired -> rollout_finished", med([b["tail"] for _, b in bds])),
            ("rollout_finished -> process exit", med([b["exit"] for _, b in bds])),
        ]
        for label, v in rows:
            print(f"    {label:<52} {f2(v)}")
        if reg_h:
            hist: dict[float, int] = {}
            for v in reg_h:
                k = round(v * 4) / 4
                hist[k] = hist.get(k, 0) + 1
            print(f"    one target registered -> healthy, to the nearest {SAMPLE_S:g} s: "
                  + ", ".join(f"{k:.2f} s x{n}" for k, n in sorted(hist.items()))
                  + f" ({len(reg_h)} instances; {sum(x['went_unhealthy'] for x in allb)} were `unhealthy` while booting)")
        boots = [v for r, _ in bds for v in r.get("boots", {}).values()]
        if boots:
            print(f"    world boot (server.log 'booted in'): median {med(boots):.2f} s, max {max(boots):.2f} s "
                  f"(boot delay {state['boot_delay']:g} s)")
        if batches_sum is not None:
            print(f"    totals per run: batches {batches_sum:.2f} (floor {state['floor']:.2f}, "
                  f"{batches_sum - state['floor']:+.2f}), between batches {gaps_sum:.2f}, before/after the batches {fixed:.2f}")
        shares = [bakery_share(r, b) for r, b in bds]
        print(f"    bakery's own time per run (wall minus the waits for new targets to turn healthy): "
              f"{rng(med([x[0] for x in shares]), med([x[1] for x in shares]))} s "
              f"({100 * med([x[0] for x in shares]) / state['floor']:.0f}..{100 * med([x[1] for x in shares]) / state['floor']:.0f}% of the floor)")

        print()
        print("  API calls by bakery per run (world call log minus the sampler's own; median count, mean server ms):")
        keys = sorted({k for r, _ in bds for k in r["calls_delta"]})
        for k in keys:
            n = med([r["calls_delta"].get(k, 0) - r["sampler_calls"].get(k, 0) for r, _ in bds])
            ms = [m for r, _ in bds for m in r["calls_window"].get(k, {}).get("ms", [])]
            if n:
                print(f"    {k:<52} {n:6.0f}   {statistics.mean(ms) if ms else 0:6.1f} ms")

    print()
    print("== result ==")
    walls = [r["wall_s"] for r in ok]
    m = med(walls)
    print(f"  runs ok        {len(ok)} of {len(runs)}")
    print(f"  times          {', '.join(f'{w:.2f}' for w in walls) or '-'} s")
    print(f"  median         {f2(m)} s")
    print(f"  floor          {state['floor']:6.2f} s")
    ratio = m / state["floor"] if m else None
    print(f"  ratio          {f2(ratio)}   (median / floor; target <= 1.15)")
    verdict = "PASS" if ratio is not None and ratio <= 1.15 and len(ok) == len(runs) else "MISS"
    print(f"  [{verdict}] median rollout at most 1.15 x the floor"
          + (f" ({m:.2f} s vs {1.15 * state['floor']:.2f} s)" if m else ""))
    mins = [r["min_healthy"] for r in runs if r["min_healthy"] is not None]
    low = min(mins) if mins else None
    cap_ok = low is not None and low >= cap and len(mins) == len(runs)
    print(f"  [{'PASS' if cap_ok else 'FAIL'}] healthy targets of the group never below {cap} "
          f"(minimum seen {low}; {sum(len(r['samples']) for r in runs)} samples)")
    if state.get("ramp") == "exponential" and m:
        print()
        print("== the exponential ramp against fixed batches (floors: batches x "
              f"{state['floor'] / state['batches']:.2f} s) ==")
        print(f"  ramp            batches {state['batch_sizes']}: floor {state['floor']:6.2f} s, median {m:.2f} s")
        small, fixed = state["small_floor"], state["fixed_floor"]
        print(f"  fixed, batches of the ramp's first size ({state['canary']}): {state['small_sizes']}: "
              f"floor {small:6.2f} s; median / that floor {m / small:.2f}")
        print(f"  fixed, batches of the same surge ({state['surge']}): {state['fixed_sizes']}: "
              f"floor {fixed:6.2f} s; median / that floor {m / fixed:.2f} (a ramp never has fewer batches "
              "than fixed batches of its own cap: it trades speed for a cautious start)")
        verdict = "PASS" if m / small <= 0.7 and len(ok) == len(runs) else "MISS"
        print(f"  [{verdict}] median ramped rollout at most 0.7 x the floor of fixed batches of its first size")
    if len(ok) != len(runs) or not cap_ok:
        rc = 1
    return rc


def world_answers() -> bool:
    try:
        world_get("/_world/status", timeout=5)
        return True
    except Exception:  # noqa: BLE001
        return False


def world_gone_reason() -> str:
    """Why the world stopped answering, from the end of its server.log."""
    log = Path(os.environ.get("WORLD_DIR", "")) / "server.log"
    try:
        last = log.read_text(errors="replace").strip().splitlines()[-12:]
    except OSError:
        return f"no server.log at {log}"
    shut = [line for line in last if "shutting down" in line]
    if shut:
        return (f"its server shut down ({shut[-1].strip()}: SIGTERM or POST /_world/shutdown). Another process "
                "ended it; note that `scripts/world down` (and `up` after a crash) for a WORLD_DIR that is a "
                "prefix of this one, e.g. .world-bench for .world-benchr, ends this world's server too "
                "(cli.procs_of_world matches `--state-dir DIR` as a substring)")
    return "the end of its server.log:\n    " + "\n    ".join(last)


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except Exception:
        if argv and argv[0] != "report" and not world_answers():
            die(f"the world at {os.environ.get('AWS_ENDPOINT_URL')} stopped answering: {world_gone_reason()}")
        raise


def _main(argv: list[str]) -> int:
    if not argv:
        die(__doc__.strip(), 2)
    cmd, args = argv[0], argv[1:]
    if cmd == "prep":
        prep(args[0], int(args[1]), int(args[2]), int(args[3]), float(args[4]), *(args[5:6]))
    elif cmd == "run":
        if "--" not in args or args.index("--") != 6:
            die("usage: run STATE I AMI TIMEOUT OUT_DIR RUNS -- COMMAND...", 2)
        st, i, ami, timeout, out_dir, runs = args[:6]
        return run(st, int(i), ami, float(timeout), out_dir, runs, args[7:])
    elif cmd == "report":
        return report(args[0], args[1])
    elif cmd == "cleanup":
        state = load_state(args[0])
        if not world_answers():
            say(f"the world at {endpoint()} is not answering, so nothing of the benchmark is left in it "
                f"(its state lives in the server's memory): {world_gone_reason()}")
            return 1
        delete_group(state, float(os.environ.get("BENCH_CLEANUP_TIMEOUT", "120")))
        ec2 = client("ec2")
        for ami in args[1:]:
            try:
                img = ec2.describe_images(ImageIds=[ami])["Images"]
                ec2.deregister_image(ImageId=ami)
                for bdm in (img[0].get("BlockDeviceMappings", []) if img else []):
                    snap = bdm.get("Ebs", {}).get("SnapshotId")
                    if snap:
                        try:
                            ec2.delete_snapshot(SnapshotId=snap)
                        except Exception:  # noqa: BLE001
                            pass
                say(f"deregistered {ami}")
            except Exception as e:  # noqa: BLE001
                say(f"warning: could not deregister {ami}: {e}")
    else:
        die(f"unknown command {cmd!r}", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
