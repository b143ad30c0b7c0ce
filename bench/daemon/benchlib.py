"""Helpers of scripts/bench-daemon: the benchmark fleet, the measured daemon runs and the report.

Run with the world's virtualenv python (boto3) and the world's env file exported
(AWS_ENDPOINT_URL, WORLD_*). Every address used is inside 127.0.0.0/8: the world's endpoint
(refused unless loopback), the daemon's own listen address (127.0.0.1) and the bodies' private
addresses (the world's VPC range 127.N.0.0/16, checked before any probe).

    benchlib.py prep STATE.json GROUPS SIZE WAVE TG_INTERVAL on|off GRACE SMALL_GROUPS TIMEOUT_S MIN_FREE_MB
        Removes what an earlier, killed run left (groups, listeners, target groups, template
        named bench-daemon*), copies the stack's launch template once, then creates GROUPS groups
        of SIZE in waves of WAVE groups, in two /22 subnets of its own. Each group gets its own
        target group (HTTP 8080 /healthz, health checks on|off, interval TG_INTERVAL,
        thresholds 2/2, deregistration delay 1 s) behind the
        stack's ALB through a listener on a port of its own. Before each wave it checks the
        memory left (the last waves' cost per body, MIN_FREE_MB kept free); after each wave it
        waits (TIMEOUT_S) until every instance is InService and `healthy` in its target group,
        and records what the wave cost (time, host memory, world CPU). A wave that cannot get
        healthy in time, or would not fit in memory, ends the scaling: the benchmark goes on
        with the groups made so far and the report names the limit.
    benchlib.py world STATE.json SECONDS
        Samples the idle world (no daemon) for SECONDS: the world server's CPU, the host's CPU
        and memory, and the latency of the calls the daemon makes, for the report.
    benchlib.py run STATE.json LABEL NGROUPS LOOPS KILLS SCRATCH RESULTS.jsonl -- BAKERY [ARGS]
        Writes a daemon config for the first NGROUPS groups, runs `BAKERY daemon` on it (JSON
        logs), skips the warm-up rounds (takeover), then measures LOOPS rounds from its /metrics
        (calls per loop by action, loop duration) and /proc (RSS, CPU), cross-checked with the
        world's call log for the daemon's own access key; then kills KILLS instances' apps in
        different groups, one at a time, and times each kill to the daemon's `marked unhealthy`
        log line; then stops the daemon (SIGTERM, timed). Appends one JSON line to RESULTS.
    benchlib.py shrink STATE.json SIZE TIMEOUT_S
        Scales every benchmark group in to SIZE and waits until each has SIZE healthy targets.
    benchlib.py report STATE.json RESULTS.jsonl
    benchlib.py cleanup STATE.json TIMEOUT_S
        Deletes the benchmark groups (ForceDelete) and waits for their instances to terminate,
        then the listeners, target groups and the launch-template copy.

Daemon settings come from the environment (set by scripts/bench-daemon): BENCH_INTERVAL,
BENCH_THRESHOLD, BENCH_LISTEN, BENCH_SELECT (name|tag), BENCH_API_RATE / BENCH_API_BURST (empty:
the daemon's defaults), BENCH_PROBE_UNHEALTHY (empty: the daemon's default).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import ipaddress
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

PREFIX = "bench-daemon"  # groups bench-daemon-NN, their target groups, the template copy
TAG_KEY = "bench:daemon"
TAG_VALUE = "bakery scripts/bench-daemon"
SET_KEY = "bench:daemon-set"  # `small` for the small configuration's groups, `rest` for the others
LISTENER_PORT0 = 21000  # group i's listener: 21000 + i (API objects only: nothing listens)
MARKED = "marked unhealthy: the group replaces it"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
CLK = os.sysconf("SC_CLK_TCK")


def say(msg: str) -> None:
    print(f"bench-daemon: {msg}", file=sys.stderr, flush=True)


def die(msg: str, code: int = 1):
    say(msg)
    sys.exit(code)


def endpoint() -> str:
    ep = os.environ.get("AWS_ENDPOINT_URL", "")
    if not re.match(r"^http://127\.\d+\.\d+\.\d+:\d+$", ep):
        die(f"AWS_ENDPOINT_URL={ep!r} is not a loopback address; refusing to run")
    return ep


def client(service: str, validate: bool = True):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        service,
        endpoint_url=endpoint(),
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        config=Config(
            retries={"mode": "standard", "max_attempts": 8},
            parameter_validation=validate,
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=32,
        ),
    )


def world_get(path: str, timeout: float = 30.0) -> dict:
    with urllib.request.urlopen(endpoint() + path, timeout=timeout) as r:
        return json.loads(r.read())


def world_post(path: str, timeout: float = 30.0) -> dict:
    req = urllib.request.Request(endpoint() + path, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
        return json.loads(body) if body.strip() else {}


def code_of(e: Exception) -> str:
    return getattr(e, "response", {}).get("Error", {}).get("Code", "")


def wait_for(what: str, timeout: float, probe, every: float = 1.0, fatal: bool = True):
    """Polls probe() -> (done, detail) until done. On timeout: dies (fatal) or returns None."""
    end = time.monotonic() + timeout
    detail = ""
    while True:
        done, detail = probe()
        if done:
            return detail if detail is not None else ""
        if time.monotonic() >= end:
            if fatal:
                die(f"timed out after {timeout:.0f}s waiting for {what}: {detail}")
            say(f"timed out after {timeout:.0f}s waiting for {what}: {detail}")
            return None
        time.sleep(every)


def epoch(rfc3339: str) -> float:
    """RFC 3339 with up to nanoseconds (tracing's `timestamp`) to epoch seconds."""
    from datetime import datetime

    m = re.match(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", rfc3339)
    if not m:
        raise ValueError(f"not RFC 3339: {rfc3339!r}")
    base = datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    frac = float("0." + m.group(2)) if m.group(2) else 0.0
    return base.timestamp() + frac


def load_state(path: str) -> dict:
    return json.loads(Path(path).read_text())


def save_state(path: str, state: dict) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


# ------------------------------------------------------------------------------ host and world
def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        out[k] = int(v.split()[0])  # kB
    return out


def host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f) - idle, sum(f)


def proc_cpu(pid: int) -> float | None:
    """utime + stime of pid, seconds."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def proc_status(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])  # kB
    except OSError:
        return None
    return None


def server_pid() -> int | None:
    try:
        return int(json.loads((Path(os.environ["WORLD_DIR"]) / "server.json").read_text())["pid"])
    except (OSError, KeyError, ValueError):
        return None


class CpuWindow:
    """CPU use between start and stop: the world server's (in cores) and the host's (%)."""

    def __init__(self) -> None:
        self.pid = server_pid()
        self.t0 = time.monotonic()
        self.s0 = proc_cpu(self.pid) if self.pid else None
        self.h0 = host_cpu()

    def read(self) -> dict:
        dt = max(1e-6, time.monotonic() - self.t0)
        s1 = proc_cpu(self.pid) if self.pid else None
        h1 = host_cpu()
        return {
            "seconds": round(dt, 1),
            "world_cores": round((s1 - self.s0) / dt, 2) if s1 is not None and self.s0 is not None else None,
            "host_busy_pct": round(100.0 * (h1[0] - self.h0[0]) / max(1, h1[1] - self.h0[1]), 1),
        }


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def in_world(ip: str | None) -> bool:
    try:
        return ip is not None and ipaddress.ip_address(ip) in LOOPBACK
    except ValueError:
        return False


def http_ok(ip: str, port: int = 8080, path: str = "/healthz", timeout: float = 2.0) -> bool:
    if not in_world(ip):
        return False  # never a packet outside 127.0.0.0/8
    try:
        c = http.client.HTTPConnection(ip, port, timeout=timeout)
        try:
            c.request("GET", path, headers={"Connection": "close"})
            return c.getresponse().status == 200
        finally:
            c.close()
    except (OSError, http.client.HTTPException):
        return False


# ------------------------------------------------------------------------------ the fleet
def group_name(i: int) -> str:
    return f"{PREFIX}-{i:02d}"


def describe_groups(asg, names: list[str]) -> dict[str, dict]:
    out = {}
    for k in range(0, len(names), 50):
        for page in asg.get_paginator("describe_auto_scaling_groups").paginate(AutoScalingGroupNames=names[k:k + 50]):
            for g in page["AutoScalingGroups"]:
                out[g["AutoScalingGroupName"]] = g
    return out


def target_states(elbv2, tg_arn: str) -> dict[str, str]:
    th = elbv2.describe_target_health(TargetGroupArn=tg_arn)["TargetHealthDescriptions"]
    return {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in th}


def private_ips(ec2, ids: list[str]) -> dict[str, dict]:
    out = {}
    for k in range(0, len(ids), 200):
        for r in ec2.describe_instances(InstanceIds=ids[k:k + 200])["Reservations"]:
            for i in r["Instances"]:
                out[i["InstanceId"]] = {
                    "ip": i.get("PrivateIpAddress"),
                    "launched": i["LaunchTime"].timestamp(),
                    "state": i["State"]["Name"],
                }
    return out


def groups_ready(asg, elbv2, groups: list[dict], size: int, tg_health: bool = True):
    """A probe: every group has `size` InService instances, all `healthy` in its target group
    (with the target groups' health checks off: all answering GET :8080/healthz with 200, asked
    by this script), nothing else registered (no draining leftovers)."""
    ec2 = client("ec2")
    answered: set[str] = set()
    ips: dict[str, str | None] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=32)

    def app_up(ids: list[str]) -> None:
        need = [i for i in ids if i not in answered]
        unknown = [i for i in need if i not in ips]
        if unknown:
            for iid, f in private_ips(ec2, unknown).items():
                ips[iid] = f["ip"]
        todo = [i for i in need if ips.get(i)]
        for iid, ok in zip(todo, pool.map(lambda i: http_ok(ips[i], timeout=2.0), todo)):
            if ok:
                answered.add(iid)

    def probe():
        try:
            return _probe()
        except Exception as ex:  # noqa: BLE001  (a busy world may answer 500; try again)
            return False, f"API error: {str(ex)[:200]}"

    def _probe():
        gs = describe_groups(asg, [g["name"] for g in groups])
        ready, total, notes = 0, 0, {}
        for g in groups:
            total += size
            d = gs.get(g["name"])
            if d is None:
                notes["missing group"] = notes.get("missing group", 0) + 1
                continue
            ins = [i for i in d["Instances"] if i["LifecycleState"] == "InService"]
            th = target_states(elbv2, g["tg_arn"])
            if not tg_health:
                # The world answers `unavailable` (Target.HealthCheckDisabled): ask the apps.
                app_up([i["InstanceId"] for i in ins])
                th = {t: ("healthy" if t in answered else ("app not answering" if st == "unavailable" else st))
                      for t, st in th.items()}
            good = [i for i in ins if th.get(i["InstanceId"]) == "healthy"]
            ready += min(size, len(good))
            for i in d["Instances"]:
                k = f"{i['LifecycleState']}/{th.get(i['InstanceId'], 'unregistered')}"
                if k != "InService/healthy":
                    notes[k] = notes.get(k, 0) + 1
            extra = {t: s for t, s in th.items() if t not in {i["InstanceId"] for i in ins}}
            for s in extra.values():
                notes[f"other target {s}"] = notes.get(f"other target {s}", 0) + 1
            if len(d["Instances"]) > size:
                notes["over size"] = notes.get("over size", 0) + 1
        done = ready == total and not notes
        return done, f"{ready} of {total} healthy" + (f"; {notes}" if notes else "")

    return probe


def delete_fleet(state: dict, timeout: float) -> None:
    """Deletes every bench-daemon group (ForceDelete), waits for their instances to terminate,
    then deletes the listeners, target groups and the launch-template copy. By name prefix, so
    a killed run's leftovers go too."""
    asg, elbv2, ec2 = client("autoscaling"), client("elbv2"), client("ec2")
    names = []
    for page in asg.get_paginator("describe_auto_scaling_groups").paginate():
        names += [g["AutoScalingGroupName"] for g in page["AutoScalingGroups"]
                  if g["AutoScalingGroupName"].startswith(PREFIX + "-")]
    if names:
        say(f"deleting {len(names)} group(s) {PREFIX}-* (ForceDelete)")
    for n in names:
        try:
            asg.delete_auto_scaling_group(AutoScalingGroupName=n, ForceDelete=True)
        except Exception as e:  # noqa: BLE001
            if "not found" not in str(e).lower():
                say(f"warning: DeleteAutoScalingGroup {n}: {e}")

    def ours_alive() -> list[str]:
        live = []
        for page in ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": f"tag:{TAG_KEY}", "Values": [TAG_VALUE]},
                     {"Name": "instance-state-name", "Values": ["pending", "running", "shutting-down", "stopping", "stopped"]}]
        ):
            for r in page["Reservations"]:
                live += [i["InstanceId"] for i in r["Instances"]]
        return live

    t0 = time.monotonic()
    swept = [False]

    def gone():
        left = [g for g in describe_groups(asg, names)] if names else []
        if left:
            return False, f"{len(left)} group(s) still exist"
        live = ours_alive()
        if live and not swept[0]:
            # Instances of ours that no group owns any more (a CreateAutoScalingGroup that failed
            # half-way launches some): terminate them directly, once.
            swept[0] = True
            say(f"terminating {len(live)} benchmark instance(s) no group owns")
            for k in range(0, len(live), 100):
                ec2.terminate_instances(InstanceIds=live[k:k + 100])
            return False, f"{len(live)} instance(s) not terminated"
        if live:
            return False, f"{len(live)} instance(s) not terminated"
        return True, ""

    wait_for("the benchmark groups' instances to terminate", timeout, gone, every=2.0)
    say(f"benchmark instances terminated after {time.monotonic() - t0:.0f}s")
    alb = os.environ.get("WORLD_ALB_ARN")
    tgs = [t for t in elbv2.describe_target_groups()["TargetGroups"] if t["TargetGroupName"].startswith(PREFIX + "-")]
    arns = {t["TargetGroupArn"] for t in tgs}
    if alb:
        n = 0
        for lst in elbv2.describe_listeners(LoadBalancerArn=alb)["Listeners"]:
            fwd = {a.get("TargetGroupArn") for a in lst.get("DefaultActions", [])}
            if fwd & arns or lst["ListenerArn"] in state.get("listeners", []):
                elbv2.delete_listener(ListenerArn=lst["ListenerArn"])
                n += 1
        if n:
            say(f"deleted {n} listener(s)")
    for t in tgs:
        for attempt in range(10):
            try:
                elbv2.delete_target_group(TargetGroupArn=t["TargetGroupArn"])
                break
            except Exception as e:  # noqa: BLE001
                if attempt == 9:
                    say(f"warning: DeleteTargetGroup {t['TargetGroupName']}: {e}")
                time.sleep(1)
    if tgs:
        say(f"deleted {len(tgs)} target group(s)")
    for lt in ec2.describe_launch_templates(
        Filters=[{"Name": "launch-template-name", "Values": [PREFIX]}]
    )["LaunchTemplates"]:
        ec2.delete_launch_template(LaunchTemplateId=lt["LaunchTemplateId"])
        say(f"deleted launch template {lt['LaunchTemplateId']} ({PREFIX})")
    for sub in ec2.describe_subnets(Filters=[{"Name": f"tag:{TAG_KEY}", "Values": [TAG_VALUE]}])["Subnets"]:
        ec2.delete_subnet(SubnetId=sub["SubnetId"])
        say(f"deleted subnet {sub['SubnetId']} ({sub['CidrBlock']})")


def make_subnets(ec2, state: dict) -> list[str]:
    """Two /22 subnets of the benchmark's own in the world's VPC (its private /24s hold ~500
    addresses for the world's whole life: moto never frees a terminated instance's address,
    its primary network interface has DeleteOnTermination false), one per AZ of the private
    subnets. Deleted by cleanup."""
    import ipaddress as ipa

    vpc = os.environ["WORLD_VPC_ID"]
    vcidr = ipa.ip_network(os.environ.get("WORLD_VPC_CIDR") or
                           ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"][0]["CidrBlock"])
    existing = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    taken = [ipa.ip_network(x["CidrBlock"]) for x in existing]
    priv = os.environ["WORLD_PRIVATE_SUBNETS"].split(",")
    azs = [x["AvailabilityZone"] for x in existing if x["SubnetId"] in priv] or ["us-east-1a", "us-east-1b"]
    made = []
    for cand in vcidr.subnets(new_prefix=22):
        if len(made) == len(azs):
            break
        if cand.network_address.packed[2] < 64 or any(cand.overlaps(t) for t in taken):
            continue
        sub = ec2.create_subnet(
            VpcId=vpc, CidrBlock=str(cand), AvailabilityZone=azs[len(made)],
            TagSpecifications=[{"ResourceType": "subnet", "Tags": [{"Key": TAG_KEY, "Value": TAG_VALUE},
                                                                   {"Key": "Name", "Value": f"{PREFIX}-{azs[len(made)][-1]}"}]}],
        )["Subnet"]
        made.append(sub["SubnetId"])
        taken.append(cand)
        say(f"subnet {sub['SubnetId']} {cand} in {azs[len(made) - 1]} ({sub['AvailableIpAddressCount']} addresses)")
    if len(made) < len(azs):
        die(f"no free /22 left in {vcidr} for the benchmark's subnets")
    return made


def create_group(state: dict, i: int, asg, elbv2, elbv2_raw) -> dict:
    name = group_name(i)
    iv = int(state["tg_interval"])
    # An interval below AWS's 5 s minimum needs timeout == interval (world-only) and boto3's
    # client-side validation off, as the stack does.
    to = iv if iv < 5 else min(5, iv - 1)
    tg = elbv2_raw.create_target_group(
        Name=name, Protocol="HTTP", Port=8080, VpcId=os.environ["WORLD_VPC_ID"],
        HealthCheckProtocol="HTTP", HealthCheckPath="/healthz", HealthCheckIntervalSeconds=iv,
        HealthCheckTimeoutSeconds=to, HealthyThresholdCount=2, UnhealthyThresholdCount=2,
        HealthCheckEnabled=bool(state["tg_health"]),
        Tags=[{"Key": TAG_KEY, "Value": TAG_VALUE}],
    )["TargetGroups"][0]
    arn = tg["TargetGroupArn"]
    state["target_groups"].append(arn)
    elbv2.modify_target_group_attributes(
        TargetGroupArn=arn, Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": "1"}])
    port = LISTENER_PORT0 + i
    lst = elbv2.create_listener(
        LoadBalancerArn=os.environ["WORLD_ALB_ARN"], Protocol="HTTP", Port=port,
        DefaultActions=[{"Type": "forward", "TargetGroupArn": arn}],
    )["Listeners"][0]
    state["listeners"].append(lst["ListenerArn"])
    subset = "small" if i <= state["small_groups"] else "rest"
    tags = [
        {"Key": TAG_KEY, "Value": TAG_VALUE, "PropagateAtLaunch": True},
        {"Key": SET_KEY, "Value": subset, "PropagateAtLaunch": False},
    ]
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchTemplate={"LaunchTemplateId": state["template_id"], "Version": "$Latest"},
        MinSize=state["size"], MaxSize=state["size"] * 2, DesiredCapacity=state["size"],
        VPCZoneIdentifier=",".join(state["subnets"]),
        TargetGroupARNs=[arn], HealthCheckType="ELB", HealthCheckGracePeriod=state["grace"],
        Tags=[{**t, "ResourceId": name, "ResourceType": "auto-scaling-group"} for t in tags],
    )
    return {"index": i, "name": name, "tg_arn": arn, "listener_arn": lst["ListenerArn"], "port": port}


def prep(state_path: str, ngroups: int, size: int, wave: int, tg_interval: int, tg_health: bool, grace: int,
         small_groups: int, timeout: float, min_free_mb: int) -> None:
    env = os.environ
    for k in ("WORLD_ALB_ARN", "WORLD_LAUNCH_TEMPLATE_ID", "WORLD_PRIVATE_SUBNETS", "WORLD_VPC_ID", "WORLD_ASG"):
        if not env.get(k):
            die(f"{k} is not in the world's env file; start the world with `scripts/world up --stack`")
    asg, elbv2, ec2 = client("autoscaling"), client("elbv2"), client("ec2")
    elbv2_raw = client("elbv2", validate=False)
    state = {
        "requested_groups": ngroups, "size": size, "wave": wave, "tg_interval": tg_interval, "tg_health": tg_health,
        "grace": grace, "small_groups": small_groups, "groups": [], "target_groups": [],
        "listeners": [], "waves": [], "limit": None, "endpoint": endpoint(),
        "world_dir": env.get("WORLD_DIR", ""), "boot_delay": float(env.get("WORLD_BOOT_DELAY", "2")),
    }
    save_state(state_path, state)
    if describe_groups(asg, [group_name(i) for i in range(1, 100)]) or [
        t for t in elbv2.describe_target_groups()["TargetGroups"] if t["TargetGroupName"].startswith(PREFIX + "-")
    ] or ec2.describe_launch_templates(Filters=[{"Name": "launch-template-name", "Values": [PREFIX]}])["LaunchTemplates"] \
            or ec2.describe_subnets(Filters=[{"Name": f"tag:{TAG_KEY}", "Values": [TAG_VALUE]}])["Subnets"]:
        say("removing benchmark groups / target groups / template left by an earlier run")
        delete_fleet(state, timeout)

    stack = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[env["WORLD_ASG"]])["AutoScalingGroups"]
    version = ((stack[0].get("LaunchTemplate") or {}).get("Version") if stack else None) or "$Default"
    src = ec2.describe_launch_template_versions(
        LaunchTemplateId=env["WORLD_LAUNCH_TEMPLATE_ID"], Versions=[version])["LaunchTemplateVersions"][0]
    data = dict(src["LaunchTemplateData"])
    data["TagSpecifications"] = [{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": PREFIX}]}]
    lt = ec2.create_launch_template(
        LaunchTemplateName=PREFIX,
        VersionDescription=f"copy of {env['WORLD_LAUNCH_TEMPLATE_ID']} version {src['VersionNumber']} for scripts/bench-daemon",
        LaunchTemplateData=data,
        TagSpecifications=[{"ResourceType": "launch-template", "Tags": [{"Key": TAG_KEY, "Value": TAG_VALUE}]}],
    )["LaunchTemplate"]
    state["template_id"] = lt["LaunchTemplateId"]
    state["ami"] = data.get("ImageId")
    save_state(state_path, state)
    state["subnets"] = make_subnets(ec2, state)
    save_state(state_path, state)

    per_body_kb = 20 * 1024  # first guess; measured from the first wave on
    i = 0
    while i < ngroups:
        k = min(wave, ngroups - i)
        avail = meminfo()["MemAvailable"]
        need = k * size * per_body_kb
        if avail - need < min_free_mb * 1024:
            state["limit"] = (f"memory: {avail // 1024} MB available, the next wave of {k * size} bodies needs "
                              f"~{need // 1024} MB ({per_body_kb // 1024} MB each) and {min_free_mb} MB must stay free")
            say(f"stopping the scale-up: {state['limit']}")
            break
        mem0, cpu, t0 = avail, CpuWindow(), time.monotonic()
        made = []
        failed = None
        for j in range(i + 1, i + k + 1):
            try:
                made.append(create_group(state, j, asg, elbv2, elbv2_raw))
            except Exception as ex:  # noqa: BLE001
                failed = f"creating {group_name(j)} failed: {str(ex)[:300]}"
                break
            state["groups"].append(made[-1])
            save_state(state_path, state)
        if failed:
            state["limit"] = f"API: {failed}"
            say(f"stopping the scale-up: {state['limit']}")
            for g in made + [{"name": group_name(i + len(made) + 1)}]:
                try:
                    asg.delete_auto_scaling_group(AutoScalingGroupName=g["name"], ForceDelete=True)
                except Exception:  # noqa: BLE001
                    pass
            state["groups"] = [g for g in state["groups"] if g not in made]
            state["dropped"] = [g["name"] for g in made]
            save_state(state_path, state)
            break
        have = len(state["groups"]) * size
        say(f"wave {len(state['waves']) + 1}: created {', '.join(g['name'] for g in made)} "
            f"({k * size} instances, {have} in all); waiting up to {timeout:.0f}s for them to be healthy")
        ok = wait_for(f"wave {len(state['waves']) + 1} to be healthy", timeout,
                      groups_ready(asg, elbv2, made, size, tg_health), every=2.0, fatal=False)
        took = time.monotonic() - t0
        time.sleep(2)  # let the bodies' start-up settle before reading memory
        mem1 = meminfo()["MemAvailable"]
        w = {
            "groups": [g["name"] for g in made], "instances": k * size, "total_instances": have,
            "seconds": round(took, 1), "healthy": ok is not None, "mem_available_mb_before": mem0 // 1024,
            "mem_available_mb_after": mem1 // 1024, "kb_per_body": max(0, (mem0 - mem1)) // (k * size),
            "load1": loadavg(), **cpu.read(),
        }
        w["world_rss_mb"] = (proc_status(cpu.pid, "VmRSS") or 0) // 1024 if cpu.pid else None
        state["waves"].append(w)
        save_state(state_path, state)
        say(f"wave {len(state['waves'])}: {'healthy' if ok is not None else 'NOT healthy'} after {took:.1f}s; "
            f"~{w['kb_per_body'] // 1024} MB per body, {mem1 // 1024} MB available, world server "
            f"{w['world_cores']} cores, host {w['host_busy_pct']}% busy, load {w['load1']}")
        if w["kb_per_body"] > 0:
            per_body_kb = max(per_body_kb, int(w["kb_per_body"] * 1.2))
        if ok is None:
            state["limit"] = (f"time: wave {len(state['waves'])} ({k * size} instances, {have} in all) was not healthy "
                              f"within {timeout:.0f}s")
            # The groups of a failed wave do not take part; remove them.
            for g in made:
                try:
                    asg.delete_auto_scaling_group(AutoScalingGroupName=g["name"], ForceDelete=True)
                except Exception as e:  # noqa: BLE001
                    say(f"warning: {e}")
            state["groups"] = [g for g in state["groups"] if g not in made]
            state["dropped"] = [g["name"] for g in made]
            save_state(state_path, state)
            break
        i += k
    if not state["groups"]:
        die("not a single wave of groups became healthy; see the limit above")
    state["ngroups"] = len(state["groups"])
    state["small_groups"] = min(state["small_groups"], state["ngroups"])
    save_state(state_path, state)
    say(f"fleet ready: {state['ngroups']} groups of {size} ({state['ngroups'] * size} instances)")


def shrink(state_path: str, size: int, timeout: float) -> None:
    state = load_state(state_path)
    asg, elbv2 = client("autoscaling"), client("elbv2")
    for g in state["groups"]:
        asg.update_auto_scaling_group(AutoScalingGroupName=g["name"], MinSize=size, DesiredCapacity=size, MaxSize=size * 2)
    say(f"scaled every group in to {size}; waiting up to {timeout:.0f}s")
    t0 = time.monotonic()
    wait_for(f"the groups at {size}", timeout, groups_ready(asg, elbv2, state["groups"], size, state["tg_health"]), every=2.0)
    # Bodies of the instances scaled in halt in the background; wait for the memory to come back.
    time.sleep(3)
    state["size_now"] = size
    save_state(state_path, state)
    say(f"groups at {size} after {time.monotonic() - t0:.1f}s")


# ------------------------------------------------------------------------------ the idle world
def world_sample(state_path: str, seconds: float) -> None:
    """The idle world at full size, with the benchmark's target-group health checks as
    configured; when they are off, also for a while with them on, to show what they cost."""
    state = load_state(state_path)
    elbv2, asg, ec2 = client("elbv2"), client("autoscaling"), client("ec2")
    names = [g["name"] for g in state["groups"]]

    def measure(secs: float) -> dict:
        cpu = CpuWindow()
        lat: dict[str, list[float]] = {"DescribeTargetHealth": [], "DescribeAutoScalingGroups": [], "DescribeInstanceStatus": []}
        end = time.monotonic() + secs
        while time.monotonic() < end:
            for g in state["groups"][:3]:
                t = time.monotonic()
                elbv2.describe_target_health(TargetGroupArn=g["tg_arn"])
                lat["DescribeTargetHealth"].append(time.monotonic() - t)
            t = time.monotonic()
            asg.describe_auto_scaling_groups(AutoScalingGroupNames=names[:100])
            lat["DescribeAutoScalingGroups"].append(time.monotonic() - t)
            t = time.monotonic()
            ec2.describe_instance_status(Filters=[{"Name": "instance-status.status", "Values": ["impaired"]}])
            lat["DescribeInstanceStatus"].append(time.monotonic() - t)
            time.sleep(0.5)
        c = cpu.read()
        m = meminfo()
        return {
            **c, "load1": loadavg(), "mem_available_mb": m["MemAvailable"] // 1024,
            "mem_total_mb": m["MemTotal"] // 1024,
            "world_rss_mb": (proc_status(cpu.pid, "VmRSS") or 0) // 1024 if cpu.pid else None,
            "latency_ms": {k: {"median": round(1000 * statistics.median(v), 1), "max": round(1000 * max(v), 1), "n": len(v)}
                           for k, v in lat.items() if v},
        }

    def show(label: str, r: dict) -> None:
        say(f"idle world, target-group health checks {label}: server {r['world_cores']} cores, host {r['host_busy_pct']}% busy; "
            "calls (ms, median/max): " + ", ".join(f"{k} {v['median']}/{v['max']}" for k, v in r["latency_ms"].items()))

    def set_checks(on: bool) -> None:
        for g in state["groups"]:
            elbv2.modify_target_group(TargetGroupArn=g["tg_arn"], HealthCheckEnabled=on)

    out = {}
    if state["tg_health"]:
        out["on"] = measure(seconds)
        show("on", out["on"])
    else:
        out["off"] = measure(seconds)
        show("off", out["off"])
        if os.environ.get("BENCH_WORLD_COMPARE", "1") != "0":
            set_checks(True)
            try:
                time.sleep(5)
                out["on"] = measure(seconds)
                show("on (for comparison)", out["on"])
            finally:
                set_checks(False)
            time.sleep(3)
    state["idle_world"] = out
    save_state(state_path, state)


# ------------------------------------------------------------------------------ a daemon run
METRIC_RE = re.compile(r'^([a-z_]+)(?:\{(.*)\})?\s+([0-9.eE+-]+)$')


def scrape(listen: str, timeout: float = 2.0) -> dict | None:
    host, port = listen.rsplit(":", 1)
    if not in_world(host):
        die(f"the daemon's listen address {listen} is not on loopback")
    try:
        c = http.client.HTTPConnection(host, int(port), timeout=timeout)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
    except (OSError, http.client.HTTPException):
        return None
    m: dict = {"calls": {}, "throttles": {}, "errors": {}, "groups": {}}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        r = METRIC_RE.match(line)
        if not r:
            continue
        name, labels, value = r.group(1), r.group(2) or "", float(r.group(3))
        lab = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
        if name == "bakery_api_calls_total":
            m["calls"][lab.get("action", "?")] = value
        elif name == "bakery_api_throttles_total":
            m["throttles"][lab.get("action", "?")] = value
        elif name == "bakery_api_errors_total":
            m["errors"][lab.get("action", "?")] = value
        elif name.startswith("bakery_group_"):
            m["groups"].setdefault(lab.get("group", "?"), {})[name[len("bakery_group_"):]] = value
        else:
            m[name] = value
    return m


class LogTail:
    """Reads the daemon's JSON log lines as they are written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.lines: list[dict] = []
        self.bad = 0
        self._partial = ""

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "r", errors="replace") as f:
                f.seek(self.pos)
                chunk = f.read()
                self.pos = f.tell()
        except OSError:
            return []
        chunk = self._partial + chunk
        *full, self._partial = chunk.split("\n")
        new = []
        for line in full:
            if not line.strip():
                continue
            try:
                new.append(json.loads(line))
            except ValueError:
                self.bad += 1
        self.lines += new
        return new


def write_config(path: Path, state: dict, names: list[str], listen: str) -> str:
    e = os.environ
    lines = [
        "# written by scripts/bench-daemon",
        f'interval = "{e.get("BENCH_INTERVAL", "2")}s"',
        f'unhealthy_threshold = {e.get("BENCH_THRESHOLD", "2")}',
        f'listen = "{listen}"',
    ]
    if e.get("BENCH_API_RATE") or e.get("BENCH_API_BURST"):
        lines.append("[api]")
        if e.get("BENCH_API_RATE"):
            lines.append(f'rate = {float(e["BENCH_API_RATE"])}')
        if e.get("BENCH_API_BURST"):
            lines.append(f'burst = {int(e["BENCH_API_BURST"])}')
    probe = 'probe = { type = "http", port = 8080, path = "/healthz", timeout = "1s"'
    if e.get("BENCH_PROBE_UNHEALTHY"):
        probe += f', unhealthy_threshold = {int(e["BENCH_PROBE_UNHEALTHY"])}'
    probe += " }"
    if e.get("BENCH_SELECT", "name") == "tag":
        sets = ["small"] if len(names) <= state["small_groups"] else ["small", "rest"]
        for s in sets:
            lines += ["[[group]]", f'tag = {{ key = "{SET_KEY}", value = "{s}" }}', probe]
    else:
        for n in names:
            lines += ["[[group]]", f'name = "{n}"', probe]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def calls_of_key(key: str) -> dict:
    w = world_get(f"/_world/calls?access_key={key}&limit=0")
    return {"total": w.get("total", 0), "counts": w.get("counts", {})}


def run(state_path: str, label: str, ngroups: int, loops: int, kills: int, scratch: str, results: str,
        cmd: list[str]) -> int:
    state = load_state(state_path)
    e = os.environ
    interval = float(e.get("BENCH_INTERVAL", "2"))
    threshold = int(e.get("BENCH_THRESHOLD", "2"))
    listen = e.get("BENCH_LISTEN", "127.0.0.1:19593")
    groups = state["groups"][:ngroups]
    names = [g["name"] for g in groups]
    size = state.get("size_now", state["size"])
    sd = Path(scratch)
    cfg = sd / f"daemon-{label}.toml"
    write_config(cfg, state, names, listen)
    errlog, outlog = sd / f"daemon-{label}.log", sd / f"daemon-{label}.out"
    key = "AKBD" + secrets.token_hex(6).upper()
    denv = {k: v for k, v in e.items() if not k.startswith(("AWS_", "BENCH_"))}
    denv.update({
        "AWS_ENDPOINT_URL": endpoint(), "AWS_REGION": e.get("AWS_REGION", "us-east-1"),
        "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    denv.pop("RUST_LOG", None)
    binary = cmd[0]
    try:
        sections = subprocess.run(["readelf", "-S", "-W", binary], capture_output=True, text=True, timeout=30).stdout
        debug_build = ".debug_info" in sections and "/debug/" in os.path.realpath(binary)
    except (OSError, subprocess.SubprocessError):
        debug_build = "/debug/" in os.path.realpath(binary)
    r: dict = {"binary": binary, "binary_mb": os.path.getsize(binary) / 2**20, "debug_build": debug_build}
    r.update({"label": label, "groups": len(groups), "target_groups": len(groups), "size": size,
               "instances": len(groups) * size, "interval": interval, "threshold": threshold,
               "select": e.get("BENCH_SELECT", "name"), "api_rate": e.get("BENCH_API_RATE") or "default",
               "probe_unhealthy_threshold": e.get("BENCH_PROBE_UNHEALTHY") or "default", "config": cfg.read_text()})
    say(f"[{label}] daemon on {len(groups)} groups x {size} ({r['instances']} instances), interval {interval:g}s, "
        f"threshold {threshold}; access key {key}; log {errlog}")
    ef, of = open(errlog, "wb"), open(outlog, "wb")
    proc = subprocess.Popen(cmd + ["daemon", "--config", str(cfg), "--log-format", "json"],
                            env=denv, stdin=subprocess.DEVNULL, stdout=of, stderr=ef, start_new_session=True)
    ef.close()
    of.close()
    pid = proc.pid
    (sd / "daemon.pid").write_text(f"{pid}\n")  # for the script's exit trap, should this process die first
    tail = LogTail(errlog)
    samples: list[dict] = []  # one per completed loop seen
    rss_max = 0
    rss_parts: dict[str, int] = {}
    last_loops = -1
    stopped = False

    def sample(force: bool = False) -> dict | None:
        nonlocal rss_max, last_loops
        rss = proc_status(pid, "VmRSS")
        if rss:
            rss_max = max(rss_max, rss)
            for k in ("RssAnon", "RssFile", "Threads"):
                v = proc_status(pid, k)
                if v is not None:
                    rss_parts[k] = max(rss_parts.get(k, 0), v)
        m = scrape(listen)
        if m is None or "bakery_loops_total" not in m:
            return None
        n = int(m["bakery_loops_total"])
        if n != last_loops or force:
            s = {"t": time.time(), "loops": n, "loop_s": m.get("bakery_loop_duration_seconds"),
                 "errors_total": m.get("bakery_loop_errors_total", 0), "calls": m["calls"],
                 "throttles": m["throttles"], "api_errors": m["errors"], "cpu": proc_cpu(pid), "rss_kb": rss,
                 "groups": m["groups"], "effective_s": m.get("bakery_effective_interval_seconds")}
            if n != last_loops:
                samples.append(s)
            last_loops = n
            return s
        return None

    def wait_loops(n: int, timeout: float) -> dict | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                return None
            s = sample()
            tail.poll()
            if s is not None and s["loops"] >= n:
                return s
            time.sleep(0.05)
        return None

    def stop_daemon() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        if proc.poll() is None:
            t = time.monotonic()
            os.kill(pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
                r["sigterm_exit_s"] = round(time.monotonic() - t, 2)
            except subprocess.TimeoutExpired:
                r["sigterm_exit_s"] = None
                say(f"[{label}] the daemon did not stop within 15 s of SIGTERM; killing pid {pid}")
                os.kill(pid, signal.SIGKILL)
                proc.wait(timeout=10)
        r["exit_code"] = proc.returncode

    try:
        warm = 3
        # A round can take a while on a big fleet in a busy world: allow 5 x interval + 60 s per round.
        per_round = 5 * interval + 60
        b1 = wait_loops(warm, per_round * (warm + 2))
        if b1 is None:
            tail.poll()
            r["failed"] = f"the daemon did not complete {warm} rounds (exit {proc.poll()}); last log: " + \
                "; ".join(l.get("message", "") for l in tail.lines[-5:])
            raise RuntimeError(r["failed"])
        w1 = calls_of_key(key)
        b1 = sample(force=True) or b1
        say(f"[{label}] warm-up done ({b1['loops']} rounds); measuring {loops} rounds")
        b2 = wait_loops(b1["loops"] + loops, per_round * (loops + 2))
        if b2 is None:
            r["failed"] = f"the daemon did not complete {loops} more rounds"
            raise RuntimeError(r["failed"])
        w2 = calls_of_key(key)
        b2 = sample(force=True) or b2
        n = b2["loops"] - b1["loops"]
        # Time the world spent serving the daemon's calls in the measured rounds (its call log).
        entries = [c for c in world_get(f"/_world/calls?access_key={key}&limit=20000").get("calls", [])
                   if b1["t"] <= c.get("t", 0) <= b2["t"]]
        by_action: dict[str, list[float]] = {}
        for c in entries:
            by_action.setdefault(f"{c.get('service')}:{c.get('action')}", []).append(float(c.get("ms") or 0))
        actions = sorted(set(b2["calls"]) | set(b1["calls"]))
        per = {a: (b2["calls"].get(a, 0) - b1["calls"].get(a, 0)) / n for a in actions}
        wper = {a: (w2["counts"].get(a, 0) - w1["counts"].get(a, 0)) / n for a in set(w2["counts"]) | set(w1["counts"])}
        r["steady"] = {
            "loops": n, "from_loop": b1["loops"], "seconds": round(b2["t"] - b1["t"], 2),
            "calls_per_loop": {a: round(v, 3) for a, v in per.items() if v},
            "calls_per_loop_total": round(sum(per.values()), 3),
            "world_calls_per_loop": {a: round(v, 3) for a, v in wper.items() if v},
            "world_calls_per_loop_total": round((w2["total"] - w1["total"]) / n, 3),
            "throttles": int(sum(b2["throttles"].values()) - sum(b1["throttles"].values())),
            "api_errors": int(sum(b2["api_errors"].values()) - sum(b1["api_errors"].values())),
            "loop_errors": int(b2["errors_total"] - b1["errors_total"]),
            "cpu_ms_per_loop": round(1000 * (b2["cpu"] - b1["cpu"]) / n, 1) if b2["cpu"] is not None and b1["cpu"] is not None else None,
            "cpu_pct": round(100 * (b2["cpu"] - b1["cpu"]) / max(1e-6, b2["t"] - b1["t"]), 2),
            "loop_s": [s["loop_s"] for s in samples if b1["loops"] < s["loops"] <= b2["loops"] and s["loop_s"] is not None],
            "rounds_seen": len([s for s in samples if b1["loops"] < s["loops"] <= b2["loops"]]),
            "period_s": round((b2["t"] - b1["t"]) / n, 3),
            # What the daemon says its rounds come at (longer than the interval when the API
            # budget cannot cover a round within it; None from a daemon that does not say).
            "effective_interval_s": b2.get("effective_s"),
            "world_s_per_loop": round(sum(sum(v) for v in by_action.values()) / 1000 / n, 3),
            "world_ms_by_action": {a: {"median": round(statistics.median(v), 1), "max": round(max(v), 1), "n": len(v)}
                                   for a, v in by_action.items()},
        }
        # Rounds with and without the takeover renewal burst (CreateOrUpdateTags).
        spl = [x for x in samples if b1["loops"] <= x["loops"] <= b2["loops"]]
        burst, plain = [], []
        for x0, x1 in zip(spl, spl[1:]):
            if x1["loops"] - x0["loops"] != 1 or x1["loop_s"] is None:
                continue
            d = x1["calls"].get("autoscaling:CreateOrUpdateTags", 0) - x0["calls"].get("autoscaling:CreateOrUpdateTags", 0)
            (burst if d > 0 else plain).append((x1["loop_s"], d))
        r["steady"]["renewal_rounds"] = {
            "with": {"n": len(burst), "median_s": round(statistics.median([b[0] for b in burst]), 3) if burst else None,
                     "tags_per_round": max((b[1] for b in burst), default=0)},
            "without": {"n": len(plain), "median_s": round(statistics.median([b[0] for b in plain]), 3) if plain else None},
        }
        r["warmup"] = {"loops": b1["loops"], "calls": {a: v for a, v in b1["calls"].items()},
                       "calls_total": sum(b1["calls"].values())}
        st = r["steady"]
        say(f"[{label}] {st['calls_per_loop_total']:.2f} calls per round (world log: {st['world_calls_per_loop_total']:.2f}, "
            f"served in {st['world_s_per_loop']:.2f}s per round); "
            f"round {statistics.median(st['loop_s']) if st['loop_s'] else float('nan'):.3f}s median, period {st['period_s']:.2f}s; "
            f"CPU {st['cpu_ms_per_loop']} ms per round; RSS {rss_max // 1024} MB")

        # ------------------------------------------------------------------ detection latency
        r["kills"] = []
        if kills:
            r["kills"] = kill_phase(state, groups, kills, max(interval, st["period_s"], st["effective_interval_s"] or 0),
                                    threshold, pid, tail, sample, label, proc,
                                    samples, r.get("describe_instances_check", {}))
        tail.poll()
        end_sample = sample(force=True)
        if end_sample:
            r["all_loop_s"] = [s["loop_s"] for s in samples if s["loops"] > b1["loops"] and s["loop_s"] is not None]
            r["end_calls"] = end_sample["calls"]
            r["end_loops"] = end_sample["loops"]
    except RuntimeError as ex:
        say(f"[{label}] {ex}")
    except KeyboardInterrupt:
        stop_daemon()
        raise
    finally:
        pre = proc_status(pid, "VmHWM") if proc.poll() is None else None
        if pre:
            r["vmhwm_kb"] = pre
        stop_daemon()
        (sd / "daemon.pid").unlink(missing_ok=True)
        time.sleep(0.2)
        tail.poll()
    r["rss_max_kb"] = rss_max
    r["rss_parts_max"] = rss_parts
    msgs: dict[str, int] = {}
    for line in tail.lines:
        lvl = line.get("level", "")
        if lvl in ("WARN", "ERROR"):
            k = f"{lvl} {line.get('message', '')}"
            msgs[k] = msgs.get(k, 0) + 1
    r["log_warnings"] = msgs
    r["resumed"] = sum(1 for l in tail.lines if l.get("message") == "HealthCheck resumed")
    r["took_over"] = sum(1 for l in tail.lines if str(l.get("message", "")).startswith("took over health decisions"))
    r["log_lines"] = len(tail.lines)
    r["log_unparsed"] = tail.bad
    with open(results, "a") as f:
        f.write(json.dumps(r) + "\n")
    return 0 if "failed" not in r else 1


def kill_phase(state, groups, kills, interval, threshold, pid, tail, sample, label, proc, samples, di_check) -> list[dict]:
    asg, ec2 = client("autoscaling"), client("ec2")
    out = []
    grace = float(state["grace"])
    # Spread over the groups: 1st, then evenly apart.
    step = max(1, len(groups) // kills)
    picks = [groups[(k * step) % len(groups)] for k in range(kills)]
    used: set[str] = set()
    for k, first in enumerate(picks):
        victim = None
        # The picked group, else the next one not used yet that has a victim.
        order = groups[groups.index(first):] + groups[:groups.index(first)]
        for g in [x for x in order if x["name"] not in used] or order:
            d = describe_groups(asg, [g["name"]]).get(g["name"])
            ins = [i["InstanceId"] for i in (d or {}).get("Instances", [])
                   if i["LifecycleState"] == "InService" and i["HealthStatus"] == "Healthy"]
            facts = private_ips(ec2, ins) if ins else {}
            now = time.time()
            # Judged instances only (outside the grace period, with a margin), answering /healthz.
            cands = sorted((i for i in ins if i in facts and facts[i]["state"] == "running"
                            and now - facts[i]["launched"] > grace + 3), key=lambda i: facts[i]["launched"])
            victim = next((i for i in cands if http_ok(facts[i]["ip"])), None)
            if victim is not None:
                break
        if victim is None:
            out.append({"group": first["name"], "error": "no judged, healthy instance to kill in any group"})
            say(f"[{label}] kill {k + 1}: {out[-1]['error']}")
            continue
        used.add(g["name"])
        ip = facts[victim]["ip"]
        t_sent = time.time()
        world_post(f"/_world/instances/{victim}/kill")
        t_done = time.time()
        dead = not http_ok(ip, timeout=1.0)
        # Generous: the probe's own threshold stacks on the group's (see the report), and a
        # round may last longer than the interval.
        deadline_s = max(30.0, (threshold + 4) * interval + 10)
        deadline = time.monotonic() + deadline_s
        found = None
        seen_unhealthy = 0
        while time.monotonic() < deadline and proc.poll() is None:
            sample()
            if samples:
                seen_unhealthy = max(seen_unhealthy, int(samples[-1]["groups"].get(g["name"], {}).get("unhealthy", 0)))
            for line in tail.poll():
                if line.get("message") == MARKED and line.get("instance") == victim:
                    found = line
            if found:
                break
            time.sleep(0.05)
        rec = {"group": g["name"], "instance": victim, "ip": ip, "kill_sent": t_sent,
               "kill_call_s": round(t_done - t_sent, 3), "app_dead": dead,
               "group_unhealthy_max": seen_unhealthy,
               "in_first_describe_instances_page": victim in set(di_check.get("first_page", []))}
        if found:
            ts = epoch(found["timestamp"])
            rec.update({"marked_at": ts, "latency_s": round(ts - t_sent, 3), "reason": found.get("reason"),
                        "evidence": found.get("evidence")})
            say(f"[{label}] kill {k + 1}: {victim} in {g['name']}: marked unhealthy after {rec['latency_s']:.2f}s "
                f"({found.get('reason', '')[:120]})")
        else:
            rec["error"] = (f"no `marked unhealthy` line within {deadline_s:.0f}s; bakery_group_unhealthy of its group stayed "
                            f"at most {seen_unhealthy}; the instance was {'' if rec['in_first_describe_instances_page'] else 'NOT '}"
                            f"in the first page of the daemon's DescribeInstances")
            say(f"[{label}] kill {k + 1}: {victim} in {g['name']}: {rec['error']}")
            # The daemon will not replace it: bring its app back (a reboot restarts its services)
            # so that later runs start from a healthy fleet.
            try:
                world_post(f"/_world/instances/{victim}/reboot")
                rec["rebooted"] = True
            except Exception as ex:  # noqa: BLE001
                say(f"warning: could not reboot {victim}: {ex}")
        out.append(rec)
        # Let the replacement start, and keep kills apart by a round or two.
        pause_end = time.monotonic() + 2 * interval
        while time.monotonic() < pause_end:
            sample()
            tail.poll()
            time.sleep(0.1)
    return out


# ------------------------------------------------------------------------------ report
def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(len(xs) - 1, int(k) + 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def short(a: str) -> str:
    return a.replace("elasticloadbalancing:", "elb:").replace("autoscaling:", "asg:")


def report(state_path: str, results: str) -> int:
    state = load_state(state_path)
    runs = [json.loads(l) for l in Path(results).read_text().splitlines() if l.strip()] if Path(results).exists() else []
    P = print
    P("=" * 100)
    P("bench-daemon: `bakery daemon` on the local world")
    P("=" * 100)
    req = state["requested_groups"] * state["size"]
    made = state.get("ngroups", len(state["groups"])) * state["size"]
    P(f"fleet: asked {state['requested_groups']} groups x {state['size']} = {req} instances; made "
      f"{state.get('ngroups', len(state['groups']))} x {state['size']} = {made}"
      f"; target groups: one per group, HTTP 8080 /healthz, health checks {'on' if state.get('tg_health') else 'off'}, "
      f"interval {state['tg_interval']}s, thresholds 2/2, "
      f"each behind the stack's ALB on its own listener port; grace {state['grace']}s")
    if state.get("limit"):
        P(f"LIMIT: {state['limit']}")
    P("\nscale-up in waves (world = the world's server process; host = all of this machine, other worlds included):")
    P(f"  {'wave':>4} {'inst':>5} {'total':>5} {'secs':>6} {'ok':>3} {'MB/body':>7} {'avail MB':>8} {'world cores':>11} {'host busy':>9} {'load1':>6} {'world RSS':>9}")
    for k, w in enumerate(state["waves"], 1):
        P(f"  {k:>4} {w['instances']:>5} {w['total_instances']:>5} {w['seconds']:>6.1f} {'yes' if w['healthy'] else 'NO':>3} "
          f"{w['kb_per_body'] / 1024:>7.1f} {w['mem_available_mb_after']:>8} {w['world_cores']!s:>11} "
          f"{w['host_busy_pct']:>8}% {w['load1']:>6.2f} {str(w.get('world_rss_mb')) + ' MB':>9}")
    for mode, iw in (state.get("idle_world") or {}).items():
        P(f"idle world at full size, no daemon, target-group health checks {mode} ({iw['seconds']}s): server "
          f"{iw['world_cores']} cores, host {iw['host_busy_pct']}% busy, load {iw['load1']}, {iw['mem_available_mb']} of "
          f"{iw['mem_total_mb']} MB available, server RSS {iw['world_rss_mb']} MB")
        P("  call latency seen by a client (ms, median/max): " +
          ", ".join(f"{k} {v['median']}/{v['max']}" for k, v in iw["latency_ms"].items()))
    if not runs:
        P("\nno daemon run completed")
        return 1

    P("\n--- API calls per loop (daemon /metrics: delta bakery_api_calls_total / delta bakery_loops_total, "
      "after 3 warm-up rounds; world = the world's call log for the daemon's access key)")
    actions = sorted({a for r in runs for a in r.get("steady", {}).get("calls_per_loop", {})}
                     | {a for r in runs for a in r.get("steady", {}).get("world_calls_per_loop", {})})
    hdr = f"  {'action':<40}" + "".join(f"{r['label']:>22}" for r in runs)
    P(f"  {'':<40}" + "".join(f"{str(r['groups']) + ' grp x ' + str(r['size']) + ' = ' + str(r['instances']):>22}" for r in runs))
    P(hdr)
    for a in actions:
        row = ""
        for r in runs:
            st = r.get("steady", {})
            v, wv = st.get("calls_per_loop", {}).get(a, 0), st.get("world_calls_per_loop", {}).get(a, 0)
            row += f"{v:>11.2f} (w {wv:>6.2f})"
        P(f"  {short(a):<40}{row}")
    row = ""
    for r in runs:
        st = r.get("steady", {})
        row += f"{st.get('calls_per_loop_total', 0):>11.2f} (w {st.get('world_calls_per_loop_total', 0):>6.2f})"
    P(f"  {'TOTAL':<40}{row}")
    P("  " + "  ".join(f"{r['label']}: {r.get('steady', {}).get('loops', 0)} rounds, "
                       f"{r.get('steady', {}).get('throttles', 0)} throttles, {r.get('steady', {}).get('api_errors', 0)} API errors, "
                       f"{r.get('steady', {}).get('loop_errors', 0)} failed rounds" for r in runs))
    P("  warm-up (first 3 rounds, takeover included): " + ", ".join(
        f"{r['label']} {r.get('warmup', {}).get('calls_total', 0):.0f} calls "
        f"({r.get('warmup', {}).get('calls', {}).get('ec2:DescribeInstances', 0):.0f} DescribeInstances pages "
        f"for {r.get('instances', 0)} instances' addresses)" for r in runs))

    P("\n--- rounds, memory, CPU")
    P(f"  {'run':<12} {'round s median':>14} {'max':>7} {'p90':>7} {'period s':>9} {'RSS max MB':>10} {'VmHWM MB':>9} {'CPU ms/round':>12} {'CPU %':>6} {'SIGTERM->exit s':>15}")
    for r in runs:
        st = r.get("steady", {})
        ls = st.get("loop_s", [])
        P(f"  {r['label']:<12} {(statistics.median(ls) if ls else float('nan')):>14.3f} {(max(ls) if ls else float('nan')):>7.3f} "
          f"{(pct(ls, 0.9) if ls else float('nan')):>7.3f} {st.get('period_s', float('nan')):>9.2f} "
          f"{r.get('rss_max_kb', 0) / 1024:>10.1f} {r.get('vmhwm_kb', 0) / 1024:>9.1f} {st.get('cpu_ms_per_loop') or float('nan'):>12.1f} "
          f"{st.get('cpu_pct', float('nan')):>6.2f} {str(r.get('sigterm_exit_s')):>15}")
    for r in runs:
        rp = r.get("rss_parts_max") or {}
        if rp:
            P(f"  {r['label']}: max RssAnon {rp.get('RssAnon', 0) / 1024:.1f} MB (heap, stacks), max RssFile {rp.get('RssFile', 0) / 1024:.1f} MB "
              f"(mapped binary and libraries), threads {rp.get('Threads', 0)}")
    P("  time per round: the world serving the daemon's calls (sum of the call log's `ms` for its key) vs the round:")
    for r in runs:
        st = r.get("steady", {})
        ls = st.get("loop_s", [])
        if ls and st.get("world_s_per_loop") is not None:
            mean, world = statistics.mean(ls), st["world_s_per_loop"]
            if world <= mean:
                P(f"    {r['label']:<12} round {mean:.3f}s mean = world {world:.3f}s + "
                  f"{mean - world:.3f}s in the daemon (CPU, API budget waits, probes, client side)")
            else:
                # The target-group calls run concurrently: their times overlap.
                P(f"    {r['label']:<12} round {mean:.3f}s mean; the world spent {world:.3f}s serving its calls, "
                  f"{world / mean:.1f} at a time on average (the DescribeTargetHealth calls run concurrently)")
            P("      per call (ms, median/max): " + ", ".join(
                f"{short(a)} {v['median']}/{v['max']}" for a, v in sorted(st.get("world_ms_by_action", {}).items())))
    P("  effective interval (bakery_effective_interval_seconds: what the API budget allows): " + ", ".join(
        f"{r['label']} {r.get('steady', {}).get('effective_interval_s')}s" for r in runs))
    P("  (round = bakery_loop_duration_seconds sampled once per round; period = wall time per round, interval "
      f"{runs[0]['interval']:g}s; CPU = utime+stime of the daemon over the measured rounds)")
    for r in runs:
        rr = r.get("steady", {}).get("renewal_rounds")
        if rr and rr["with"]["n"]:
            P(f"  {r['label']}: {rr['with']['n']} rounds renewed the takeover tags ({rr['with']['tags_per_round']:.0f} CreateOrUpdateTags "
              f"each, one call per group): median {rr['with']['median_s']}s vs {rr['without']['median_s']}s for the "
              f"{rr['without']['n']} other rounds")
    for r in runs:
        al = r.get("all_loop_s") or []
        if al:
            P(f"  {r['label']}: rounds incl. the kill phase: median {statistics.median(al):.3f}s, max {max(al):.3f}s ({len(al)} rounds)")

    P("\n--- detection latency (POST /_world/instances/ID/kill sent -> `marked unhealthy` log timestamp)")
    lat_all = []
    for r in runs:
        for k in r.get("kills", []):
            if "latency_s" in k:
                lat_all.append((r, k["latency_s"]))
                P(f"  {r['label']:<12} {k['group']:<16} {k['instance']:<20} {k['latency_s']:>6.2f}s  app dead: {k['app_dead']}; "
                  f"reason: {(k.get('reason') or '')[:150]}")
            else:
                P(f"  {r['label']:<12} {k['group']:<16} {k.get('instance', '-'):<20}  ERROR: {k.get('error')}")

    fails = [int(m.group(1)) for r in runs for k in r.get("kills", [])
             for m in [re.search(r"probe :\d+: .*\((\d+) failed in a row\)", k.get("reason") or "")] if m]
    if fails:
        big0 = runs[0]
        pace0 = max(big0["interval"], big0.get("steady", {}).get("effective_interval_s") or 0)
        P(f"  the probe had failed {sorted(set(fails))} rounds in a row when the group threshold ({big0['threshold']}) was reached: "
          f"the probe's own unhealthy_threshold ({big0['probe_unhealthy_threshold']}) must pass before the probe counts as a "
          f"failing signal, then the group's threshold counts rounds again: a kill is marked in the K-th round after it, "
          f"K = probe threshold + threshold - 1 = {max(fails)}, i.e. {(max(fails) - 1) * pace0:g} to "
          f"{max(fails) * pace0:g} s after the kill plus the probe's own time (a round probes first, on "
          f"the effective interval's beat ({pace0:g} s in {big0['label']}), and reads the API after acting), "
          f"against a target of {pace0 * big0['threshold'] + 0.5:g} s")

    P("\n--- daemon log: warnings and errors (count, message)")
    for r in runs:
        w = r.get("log_warnings", {})
        P(f"  {r['label']}: {r.get('log_lines', 0)} lines, took over {r.get('took_over', 0)} groups, resumed {r.get('resumed', 0)} at stop"
          + ("" if not r.get("log_unparsed") else f", {r['log_unparsed']} non-JSON lines"))
        for m, c in sorted(w.items(), key=lambda x: -x[1])[:8]:
            P(f"    {c:>5} {m[:140]}")

    # ------------------------------------------------------------------ verdicts
    P("\n--- targets")
    verdicts = []
    big = next((r for r in runs if r["label"] == "full"), runs[0])
    same = [r for r in runs if r.get("api_rate") == big.get("api_rate")]
    few_inst = next((r for r in same if r["groups"] == big["groups"] and r["size"] < big["size"]), None)
    few_grp = next((r for r in same if r["groups"] < big["groups"] and r["size"] == big["size"]), None)
    # The takeover tag's renewal (CreateOrUpdateTags, one per group every ~20 s) is driven by the
    # clock, not by rounds: how many renewals fall in a window of rounds depends on where it
    # starts. The comparison is on the other calls; the renewals are shown on their own.
    TIMED = ("autoscaling:CreateOrUpdateTags", "autoscaling:SuspendProcesses")

    def tot(r):
        st = r.get("steady", {})
        if "calls_per_loop" not in st:
            return None
        return sum(v for a, v in st["calls_per_loop"].items() if a not in TIMED)

    dth = lambda r: r.get("steady", {}).get("calls_per_loop", {}).get("elasticloadbalancing:DescribeTargetHealth", 0)  # noqa: E731
    ok_scale, why = None, []
    if tot(big) is not None and few_inst is not None and tot(few_inst) is not None:
        d = abs(tot(big) - tot(few_inst))
        flat = d <= max(1.0, 0.1 * tot(big))
        why.append(f"{big['instances']} vs {few_inst['instances']} instances in {big['groups']} groups: "
                   f"{tot(big):.2f} vs {tot(few_inst):.2f} calls/round ({'flat' if flat else 'NOT flat'})")
        ok_scale = flat
    if tot(big) is not None and few_grp is not None and tot(few_grp) is not None:
        grows = tot(big) > tot(few_grp) and abs(dth(big) - big["target_groups"]) < 0.5 and abs(dth(few_grp) - few_grp["target_groups"]) < 0.5
        why.append(f"{big['groups']} vs {few_grp['groups']} groups/target groups: {tot(big):.2f} vs {tot(few_grp):.2f} calls/round, "
                   f"DescribeTargetHealth {dth(big):.2f} vs {dth(few_grp):.2f} per round ({'one per target group' if grows else 'NOT one per target group'})")
        ok_scale = grows if ok_scale is None else ok_scale and grows
    ren = "; ".join(f"{r['label']} {r.get('steady', {}).get('calls_per_loop', {}).get('autoscaling:CreateOrUpdateTags', 0):.2f}"
                    for r in runs)
    why.append(f"(calls other than the takeover renewal; CreateOrUpdateTags per round: {ren})")
    verdicts.append(("calls per loop grow with groups and target groups, not with instances", ok_scale, "; ".join(why) or "needs the comparison runs"))
    rss = max((r.get("rss_max_kb", 0) for r in runs), default=0) / 1024
    anon = max(((r.get("rss_parts_max") or {}).get("RssAnon", 0) for r in runs), default=0) / 1024
    filem = max(((r.get("rss_parts_max") or {}).get("RssFile", 0) for r in runs), default=0) / 1024
    verdicts.append(("RSS under 30 MB", rss < 30 if rss else None,
                     f"max VmRSS {rss:.1f} MB over all runs (sampled every ~50 ms): RssAnon {anon:.1f} MB + RssFile {filem:.1f} MB "
                     f"(pages of the binary {os.path.basename(runs[0].get('binary', 'bakery'))} mapped in: "
                     f"{runs[0].get('binary_mb', 0):.0f} MB on disk, {'a debug build' if runs[0].get('debug_build') else 'not a debug build'})"))
    # Calls per round at the default rate equal the high-rate run's (issue 15): a tight budget
    # stretches rounds, it does not make them read twice.
    for r in [x for x in runs if x.get("api_rate") != big.get("api_rate")]:
        twin = next((x for x in runs if x.get("api_rate") == big.get("api_rate") and x["groups"] == r["groups"]
                     and x["size"] == r["size"]), None)
        if twin is None or tot(twin) is None or tot(r) is None:
            continue
        same_calls = abs(tot(twin) - tot(r)) < 0.5 and abs(dth(twin) - twin["target_groups"]) < 0.5
        verdicts.append((f"calls per round at API rate {twin['api_rate']} equal the run at {r['api_rate']} "
                         f"[{twin['label']} vs {r['label']}]", same_calls,
                         f"{tot(twin):.2f} vs {tot(r):.2f} calls/round, DescribeTargetHealth {dth(twin):.2f} vs {dth(r):.2f} "
                         f"({twin['target_groups']} target groups); failed rounds {twin.get('steady', {}).get('loop_errors')} vs "
                         f"{r.get('steady', {}).get('loop_errors')}"))
    for r in [x for x in runs if x.get("kills")]:
        pace = max(r["interval"], r.get("steady", {}).get("effective_interval_s") or 0)
        bound = pace * r["threshold"] + 0.5
        lats = [k["latency_s"] for k in r["kills"] if "latency_s" in k]
        misses = [k for k in r["kills"] if "latency_s" not in k]
        ok_lat = bool(lats) and max(lats) <= bound and not misses
        verdicts.append((f"detection latency at most effective interval x threshold + 0.5 s = {pace:g} x {r['threshold']} + 0.5 = {bound:.2f} s [{r['label']}, "
                         f"{r['instances']} instances, API rate {r['api_rate']}]", ok_lat,
                         (f"{len(lats)} kill(s) marked: median {statistics.median(lats):.2f}s, max {max(lats):.2f}s" if lats else "none marked")
                         + (f"; {len(misses)} kill(s) never marked" if misses else "")))
    for name, ok, detail in verdicts:
        P(f"  {'PASS' if ok else ('MISS' if ok is False else 'N/A ')}  {name}: {detail}")
    if state.get("limit"):
        P(f"  NOTE  the fleet is smaller than asked: {state['limit']}")
    return 0 if all(r.get("failed") is None for r in runs) else 1


# ------------------------------------------------------------------------------ main
def main(argv: list[str]) -> int:
    if len(argv) < 2:
        die(__doc__ or "usage")
    cmd, a = argv[1], argv[2:]
    if cmd == "prep":
        prep(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), a[5] == "on", int(a[6]), int(a[7]), float(a[8]), int(a[9]))
    elif cmd == "world":
        world_sample(a[0], float(a[1]))
    elif cmd == "run":
        sep = a.index("--")
        return run(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), a[5], a[6], a[sep + 1:])
    elif cmd == "shrink":
        shrink(a[0], int(a[1]), float(a[2]))
    elif cmd == "report":
        return report(a[0], a[1])
    elif cmd == "cleanup":
        st = load_state(a[0]) if Path(a[0]).exists() else {}
        delete_fleet(st, float(a[1]))
    else:
        die(f"unknown command {cmd}")
    return 0


def _on_term(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_term)
    try:
        sys.exit(main(sys.argv))
    except KeyboardInterrupt:
        say("interrupted")
        sys.exit(130)
