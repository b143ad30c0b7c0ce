"""Helpers of scripts/bench-release: the images, the plans, the timed releases and the report.

Run with the world's virtualenv python (boto3) and the world's env file exported
(AWS_ENDPOINT_URL, WORLD_*). Every address used is inside 127.0.0.0/8: the script refuses an
endpoint elsewhere, and the only other address it reaches is the same endpoint's `/_world/` API.
Its own AWS calls are signed with the access key `bench-release-harness` (the world accepts any
key), so the world's call log tells bakery's calls (each run has its own key) from the bench's.

    benchlib.py prep STATE.json SURGE TIMEOUT_S
        Picks the fleet from WORLD_STACK_GROUPS (wave "canary": the home Region's first group;
        wave "rest": its second group and the first group of another Region), reads each group's
        floor inputs (WORLD_BOOT_DELAY; HealthCheckIntervalSeconds and HealthyThresholdCount of
        its target group, in its Region), removes images left by an earlier, killed run, makes
        two CopyImages of the stack image in each Region (A and B: the same content, so as
        healthy) and waits until they are available and every group is healthy.
    benchlib.py plan STATE.json I OUT_DIR
        Writes run I's manifest (image A on odd runs, B on even ones, per Region) and two plans
        naming it: OUT_DIR/run-I.toml (the release, named per run, so each run is a new release)
        and OUT_DIR/run-I-dry.toml (the same waves under another name, for --dry-run). Prints
        both paths.
    benchlib.py run STATE.json I TIMEOUT_S OUT_DIR RUNS.jsonl ACCESS_KEY -- COMMAND...
        Waits for the fleet to settle, then runs COMMAND (the release, `--output json`) with
        DescribeTargetHealth of each group's target group sampled every 250 ms; records the wall
        time, the NDJSON events, the samples, every new instance's first registration / first
        `healthy`, and the calls ACCESS_KEY made. Reads OUT_DIR/run-I.dry.ndjson (the dry run's
        `rollout_plan` per group) for the batches. Appends one JSON line to RUNS.jsonl.
    benchlib.py report STATE.json RUNS.jsonl
    benchlib.py restore STATE.json OUT_DIR
        Writes OUT_DIR/restore.toml: a release of the stack's own images (WORLD_STACK_AMIS) over
        the same groups, to put a world the bench did not start back as it found it.
    benchlib.py cleanup STATE.json
        Deregisters the bench's image copies (and their snapshots) in every Region.
"""

from __future__ import annotations

import json
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

BENCH_TAG = {"Key": "bench:release", "Value": "bakery scripts/bench-release"}
HARNESS_KEY = "bench-release-harness"
SAMPLER_KEY = "bench-release-sampler"
SAMPLE_S = 0.25
GOAL = 1.15


def say(msg: str) -> None:
    print(f"bench-release: {msg}", file=sys.stderr, flush=True)


def die(msg: str, code: int = 1):
    say(msg)
    sys.exit(code)


def endpoint() -> str:
    ep = os.environ.get("AWS_ENDPOINT_URL", "")
    if not re.match(r"^http://127\.\d+\.\d+\.\d+:\d+$", ep):
        die(f"AWS_ENDPOINT_URL={ep!r} is not a loopback address; refusing to run")
    return ep


def client(service: str, region: str | None = None, key: str = HARNESS_KEY):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        service,
        endpoint_url=endpoint(),
        region_name=region or os.environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id=key,
        aws_secret_access_key="testing",
        config=Config(retries={"mode": "standard", "max_attempts": 8}),
    )


def world_get(path: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(endpoint() + path, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(what: str, timeout: float, probe, every: float = 0.25):
    """Polls probe() -> (done, detail) until done; dies naming `what` and the last detail."""
    end = time.monotonic() + timeout
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


def load_state(path: str) -> dict:
    return json.loads(Path(path).read_text())


def save_state(path: str, state: dict) -> None:
    Path(path).write_text(json.dumps(state, indent=1))


def gkey(g: dict) -> str:
    return f"{g['region']}/{g['name']}"


# ------------------------------------------------------------------------------ the fleet
def fleet(g: dict) -> dict:
    """One group as the APIs show it: desired capacity, instances with lifecycle, ASG health,
    AMI and target health, and what is draining in its target group."""
    asg, elbv2, ec2 = client("autoscaling", g["region"]), client("elbv2", g["region"]), client("ec2", g["region"])
    groups = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[g["name"]])["AutoScalingGroups"]
    if not groups:
        return {"exists": False, "instances": [], "desired": 0, "draining": []}
    grp = groups[0]
    th = elbv2.describe_target_health(TargetGroupArn=g["target_group"])["TargetHealthDescriptions"]
    health = {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in th}
    ids = [i["InstanceId"] for i in grp["Instances"]]
    amis = {}
    if ids:
        for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
            for i in r["Instances"]:
                amis[i["InstanceId"]] = i["ImageId"]
    return {
        "exists": True,
        "desired": grp["DesiredCapacity"],
        "min": grp["MinSize"],
        "max": grp["MaxSize"],
        "draining": sorted(k for k, v in health.items() if v == "draining"),
        "instances": [
            {"id": i["InstanceId"], "lifecycle": i["LifecycleState"], "health": i["HealthStatus"],
             "ami": amis.get(i["InstanceId"]), "target": health.get(i["InstanceId"], "unregistered")}
            for i in grp["Instances"]
        ],
    }


def steady(state: dict, want: dict | None = None):
    """A probe: every group at its capacity, every instance InService, Healthy and `healthy` in
    its target group (on want[region] if given), nothing draining, and no body alive that is in
    none of the groups and was not there when the bench began (the last run's retired instances
    have finished dying)."""

    def probe():
        members: set[str] = set()
        for g in state["groups"]:
            f = fleet(g)
            inst = f["instances"]
            members |= {i["id"] for i in inst}
            ami = (want or {}).get(g["region"])
            good = [i for i in inst if i["lifecycle"] == "InService" and i["health"] == "Healthy"
                    and i["target"] == "healthy" and (ami is None or i["ami"] == ami)]
            cap = g["capacity"]
            if f["desired"] != cap or len(inst) != cap or len(good) != cap:
                summary: dict[str, int] = {}
                for i in inst:
                    k = f"{i['lifecycle']}/{i['health']}/{i['target']}" + (
                        "" if ami is None or i["ami"] == ami else f"/{i['ami']}")
                    summary[k] = summary.get(k, 0) + 1
                return False, f"{gkey(g)}: desired {f['desired']}, {len(good)} of {cap} ready; {summary}"
            if f["draining"]:
                return False, f"{gkey(g)}: {len(f['draining'])} target(s) draining"
        foreign = set(state.get("foreign_bodies", []))
        stray = [b["instance_id"] for b in world_get("/_world/status").get("bodies", [])
                 if b.get("state") not in ("terminated", "stopped") and b["instance_id"] not in members
                 and b["instance_id"] not in foreign]
        if stray:
            return False, f"{len(stray)} body(ies) of retired instances still up: {stray}"
        return True, ""

    return probe


def copy_images(state: dict, timeout: float) -> None:
    """Two CopyImages (A, B) of each Region's stack image, tagged, waited for."""
    stamp = state["stamp"]
    made: dict[str, dict[str, str]] = {"a": {}, "b": {}}
    for region, src in state["stack_amis"].items():
        ec2 = client("ec2", region)
        for v in ("a", "b"):
            img = ec2.copy_image(
                SourceImageId=src, SourceRegion=region, Name=f"bench-release-{v}-{stamp}",
                Description=f"scripts/bench-release image {v.upper()}: a copy of the stack image {src}",
                TagSpecifications=[{"ResourceType": "image", "Tags": [BENCH_TAG]}],
            )["ImageId"]
            made[v][region] = img
            state["images"] = made
    say("copying the stack image twice per Region: " + ", ".join(
        f"{v.upper()} {r} {i}" for v, m in made.items() for r, i in m.items()))

    def available():
        waiting = []
        for v, m in made.items():
            for region, img in m.items():
                st = client("ec2", region).describe_images(ImageIds=[img])["Images"][0]["State"]
                if st == "failed":
                    die(f"the copy {img} in {region} failed")
                if st != "available":
                    waiting.append(f"{region} {img} {st}")
        return not waiting, ", ".join(waiting)

    wait_for("the image copies", timeout, available, every=0.5)


def deregister_ours(region: str) -> list[str]:
    """Deregisters every image in `region` carrying the bench's tag, with its snapshots."""
    ec2 = client("ec2", region)
    gone = []
    imgs = ec2.describe_images(Owners=["self"], Filters=[{"Name": f"tag:{BENCH_TAG['Key']}", "Values": [BENCH_TAG["Value"]]}])["Images"]
    for img in imgs:
        ec2.deregister_image(ImageId=img["ImageId"])
        for bdm in img.get("BlockDeviceMappings", []):
            snap = bdm.get("Ebs", {}).get("SnapshotId")
            if snap:
                try:
                    ec2.delete_snapshot(SnapshotId=snap)
                except Exception:  # noqa: BLE001  (shared with another image, or gone)
                    pass
        gone.append(img["ImageId"])
    return gone


def prep(state_path: str, surge: int, timeout: float) -> None:
    env = os.environ
    for k in ("WORLD_STACK_GROUPS", "WORLD_STACK_TARGET_GROUPS", "WORLD_STACK_AMIS", "WORLD_BOOT_DELAY", "AWS_REGION"):
        if not env.get(k):
            die(f"{k} is not in the world's env file; start the world with "
                "`scripts/world up --stack --groups us-east-1=2,eu-west-1=1 --regions us-east-1,eu-west-1`")
    home = env["AWS_REGION"]
    keys = env["WORLD_STACK_GROUPS"].split(",")
    tgs = env["WORLD_STACK_TARGET_GROUPS"].split(",")
    if len(keys) != len(tgs):
        die("WORLD_STACK_GROUPS and WORLD_STACK_TARGET_GROUPS differ in length")
    pairs = [(k.split("/", 1)[0], k.split("/", 1)[1], tg) for k, tg in zip(keys, tgs)]
    at_home = [p for p in pairs if p[0] == home]
    away = [p for p in pairs if p[0] != home]
    if len(at_home) < 2 or not away:
        die(f"the stack has {len(at_home)} group(s) in {home} and {len(away)} elsewhere; the bench needs 2 and 1: "
            "`scripts/world up --stack --groups us-east-1=2,eu-west-1=1 --regions us-east-1,eu-west-1`")
    chosen = [(at_home[0], "canary"), (at_home[1], "rest"), (away[0], "rest")]
    groups = []
    for (region, name, tg_arn), wave in chosen:
        tg = client("elbv2", region).describe_target_groups(TargetGroupArns=[tg_arn])["TargetGroups"][0]
        g = client("autoscaling", region).describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
        if not g:
            die(f"the stack's group {region}/{name} does not exist")
        groups.append({
            "region": region, "name": name, "wave": wave, "target_group": tg_arn,
            "target_group_name": tg["TargetGroupName"], "capacity": g[0]["DesiredCapacity"],
            "interval": float(tg["HealthCheckIntervalSeconds"]), "timeout": float(tg["HealthCheckTimeoutSeconds"]),
            "healthy_threshold": int(tg["HealthyThresholdCount"]),
        })
    stack_amis = json.loads(env["WORLD_STACK_AMIS"])
    for g in groups:
        if g["region"] not in stack_amis:
            die(f"WORLD_STACK_AMIS has no image for {g['region']}")
    state = {
        "home": home, "surge": surge, "groups": groups, "waves": ["canary", "rest"],
        "boot_delay": float(env["WORLD_BOOT_DELAY"]), "endpoint": endpoint(),
        "world_dir": env.get("WORLD_DIR", ""), "stamp": time.strftime("%Y%m%d%H%M%S", time.gmtime()),
        "stack_amis": {r: stack_amis[r] for r in sorted({g["region"] for g in groups})},
        "images": {},
    }
    save_state(state_path, state)
    for region in state["stack_amis"]:
        left = deregister_ours(region)
        if left:
            say(f"deregistered images left by an earlier run in {region}: {', '.join(left)}")
    t0 = time.monotonic()
    copy_images(state, timeout)
    save_state(state_path, state)
    say(f"copies available after {time.monotonic() - t0:.1f}s")
    # Bodies that are not the groups' (other instances of a reused world) are not waited for.
    members = {i["id"] for g in groups for i in fleet(g)["instances"]}
    state["foreign_bodies"] = sorted(
        b["instance_id"] for b in world_get("/_world/status").get("bodies", [])
        if b.get("state") not in ("terminated", "stopped") and b["instance_id"] not in members)
    save_state(state_path, state)
    wait_for("every group to be healthy", timeout, steady(state), every=0.5)
    say("fleet: " + "; ".join(f"{g['wave']}: {gkey(g)} ({g['capacity']} instances, target group "
                              f"{g['target_group_name']})" for g in groups))


# ------------------------------------------------------------------------------ plans
def write_manifest(path: Path, home: str, images: dict[str, str]) -> None:
    """A manifest naming each Region's image, as a promoted build's (`regions`)."""
    m = {
        "bakery_version": "bench", "build_id": f"b-{path.stem}", "recipe": "bench-release", "recipe_sha256": "",
        "region": home, "source_ami": images[home], "ami_id": images[home], "ami_name": path.stem,
        "snapshot_ids": [], "started_at": "", "finished_at": "", "duration_s": 0.0, "steps": [],
        "regions": {r: {"ami_id": i, "snapshot_ids": []} for r, i in images.items()},
    }
    path.write_text(json.dumps(m, indent=1) + "\n")


def plan_text(state: dict, name: str, manifest: str, on_failure: str = "rollback_all") -> str:
    lines = [
        "# scripts/bench-release: 3 groups in 2 waves (the canary group, then the other two in parallel)",
        "[release]", f'name = "{name}"', "",
        "[source]", f'manifest = "{manifest}"', f'on_failure = "{on_failure}"',
    ]
    for wave in state["waves"]:
        targets = ", ".join(f'{{ region = "{g["region"]}", group = "{g["name"]}" }}'
                            for g in state["groups"] if g["wave"] == wave)
        lines += ["", "[[wave]]", f'name = "{wave}"', f"targets = [{targets}]", 'bake = "0s"',
                  f"rollout = {{ max_surge = {state['surge']} }}"]
    return "\n".join(lines) + "\n"


def write_plans(state: dict, i: int, out: Path) -> tuple[Path, Path]:
    v = "a" if i % 2 == 1 else "b"
    man = out / f"image-{v}.manifest.json"
    write_manifest(man, state["home"], state["images"][v])
    plan, dry = out / f"run-{i}.toml", out / f"run-{i}-dry.toml"
    name = f"bench-release-{state['stamp']}-{i}"
    plan.write_text(plan_text(state, name, man.name))
    dry.write_text(plan_text(state, name + "-dry", man.name))
    return plan, dry


# ------------------------------------------------------------------------------ a run
class Sampler(threading.Thread):
    """DescribeTargetHealth of one group's target group every SAMPLE_S on a fixed schedule. Per
    sample: how many targets are `healthy`. Per target: first time seen registered, first time
    seen `healthy`, the states it went through."""

    def __init__(self, g: dict) -> None:
        super().__init__(daemon=True, name=f"sampler {gkey(g)}")
        self.g = g
        self.elbv2 = client("elbv2", g["region"], key=SAMPLER_KEY)
        self.stop_ev = threading.Event()
        self.first_done = threading.Event()
        self.samples: list[dict] = []
        self.inst: dict[str, dict] = {}
        self.errors = 0
        self.late = 0

    def sample(self) -> None:
        t_a = time.time()
        th = self.elbv2.describe_target_health(TargetGroupArn=self.g["target_group"])["TargetHealthDescriptions"]
        t_b = time.time()
        states = {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in th}
        t = (t_a + t_b) / 2
        for iid, st in states.items():
            rec = self.inst.setdefault(iid, {"first_seen": t, "first_seen_lo": t_a, "states": []})
            if not rec["states"] or rec["states"][-1] != st:
                rec["states"].append(st)
            if st == "healthy" and "first_healthy" not in rec:
                rec["first_healthy"] = t
                rec["first_healthy_lo"] = self.samples[-1]["t_b"] if self.samples else t_a
        self.samples.append({"t": t, "t_b": t_b, "healthy": sum(1 for v in states.values() if v == "healthy"),
                             "registered": len(states)})

    def run(self) -> None:
        nxt = time.monotonic()
        while True:
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001
                self.errors += 1
                if self.errors <= 3:
                    say(f"sampler {gkey(self.g)}: {e}")
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
                    self.sample()  # one last look after the release ended
                except Exception:  # noqa: BLE001
                    self.errors += 1
                return


def parse_events(lines: list[tuple[float, str]]) -> list[dict]:
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
    return events


def ev_group(e: dict) -> str | None:
    """The `region/group` an event is about (group_* events say `region/group`, the rollout's own
    events `group` and `region`)."""
    g = e.get("group")
    if not isinstance(g, str):
        return None
    if "/" in g:
        return g
    return f"{e['region']}/{g}" if e.get("region") else None


def dry_batches(path: Path) -> dict[str, dict]:
    """Each group's planned batches from the dry run's `rollout_plan`."""
    out = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if e.get("event") == "rollout_plan":
            p = e.get("plan", {})
            bs = p.get("batches", [])
            out[ev_group(e)] = {
                "batches": len(bs), "sizes": [b.get("launched") for b in bs],
                "least_in_service": min((b.get("least_in_service", 0) for b in bs), default=None),
                "capacity": p.get("capacity"), "to_replace": p.get("instances_to_replace"),
            }
    return out


def run(state_path: str, i: int, timeout: float, out_dir: str, runs_path: str, key: str, cmd: list[str]) -> int:
    state = load_state(state_path)
    stop = threading.Event()
    got_signal: list[int] = []

    def on_signal(signum, _frame):
        got_signal.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    out = Path(out_dir)
    v = "a" if i % 2 == 1 else "b"
    want = state["images"][v]
    plan = dry_batches(out / f"run-{i}.dry.ndjson")

    t_settle = time.monotonic()
    wait_for(f"the fleet to settle before run {i}", 180, steady(state), every=0.25)
    settle_s = time.monotonic() - t_settle
    load_before = os.getloadavg()

    events_path, err_path = out / f"run-{i}.ndjson", out / f"run-{i}.stderr"
    samplers = {gkey(g): Sampler(g) for g in state["groups"]}
    for s in samplers.values():
        s.start()
    for s in samplers.values():
        s.first_done.wait(10)
    pre = {k: set(s.inst) for k, s in samplers.items()}
    lines: list[tuple[float, str]] = []
    with open(err_path, "w") as err:
        t0 = time.time()
        p0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                start_new_session=True, env={**os.environ, "AWS_ACCESS_KEY_ID": key})

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
                    f"stopping the release (pid {proc.pid}) with SIGTERM")
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                break
            stop.wait(0.005)
        wall = time.perf_counter() - p0
        t1 = t0 + wall
        reader.join(timeout=5)
    for s in samplers.values():
        s.stop_ev.set()
    for s in samplers.values():
        s.join(timeout=10)
    load_after = os.getloadavg()
    events_path.write_text("".join(f"{line}\n" for _, line in lines))
    events = parse_events(lines)

    # bakery's calls: everything its own key did (exact counts), and the entries with their times.
    calls_total, counts, mut_counts, calls = 0, {}, {}, []
    try:
        c = world_get(f"/_world/calls?access_key={key}&limit=0")
        calls_total, counts, mut_counts = c["total"], c["counts"], c.get("mutating_counts", {})
        c = world_get(f"/_world/calls?access_key={key}&limit={calls_total + 10}")
        calls = [{"t": float(x["t"]), "k": f"{x['service']}:{x['action']}", "ms": float(x.get("ms", 0)),
                  "m": bool(x.get("mutating"))} for x in c.get("calls", [])]
    except Exception as e:  # noqa: BLE001
        say(f"run {i}: could not read the world's call log: {e}")

    rc = 124 if timed_out else proc.returncode
    err_text = "timed out after %.0fs" % timeout if timed_out else "interrupted" if got_signal else (
        f"exit {rc}" if rc != 0 else "")
    per_group = {}
    for k, s in samplers.items():
        hs = [x["healthy"] for x in s.samples]
        per_group[k] = {
            "samples": s.samples, "errors": s.errors, "late": s.late,
            "instances": {iid: r for iid, r in s.inst.items() if iid not in pre[k]},
            "min_healthy": min(hs) if hs else None,
        }
    fin = next((e for e in events if e["event"] == "release_finished"), None)
    rec = {
        "i": i, "image": v, "want": want, "ok": rc == 0 and not got_signal and bool(fin) and fin.get("result") == "done",
        "rc": rc, "error": err_text or (f"release {fin.get('result')}" if fin and fin.get("result") != "done" else ""),
        "wall_s": round(wall, 4), "t0": t0, "t1": t1, "settle_s": round(settle_s, 2),
        "load_before": load_before, "load_after": load_after, "events": events, "stderr": str(err_path),
        "ndjson": str(events_path), "groups": per_group, "plan": plan, "key": key,
        "calls_total": calls_total, "counts": counts, "mutating_counts": mut_counts, "calls": calls,
    }
    with open(runs_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    say(f"run {i}: {wall:6.2f}s to image {v.upper()} ({rec['error'] or 'exit 0, done'}); "
        f"min healthy " + ", ".join(f"{k} {g['min_healthy']}" for k, g in per_group.items())
        + f"; {calls_total} AWS calls by bakery")
    if got_signal:
        return 130
    if not rec["ok"]:
        failed = next((e for e in events if e["event"] in ("release_failed", "rollout_failed")), None)
        if failed:
            say(f"run {i}: {failed['event']}: {failed.get('error')}")
        try:
            tail = Path(err_path).read_text(errors="replace").strip().splitlines()[-15:]
            say(f"run {i}: bakery's last stderr lines:\n    " + "\n    ".join(tail))
        except OSError:
            pass
        if not world_answers():
            say(f"run {i}: the world stopped answering: {world_gone_reason()}")
        return 1
    # bakery says it is done: check every group independently.
    wait_for(f"every group to run image {v.upper()} after run {i}", 30, steady(state, want), every=0.25)
    return 0


# ------------------------------------------------------------------------------ report
def per_batch_floor(state: dict, g: dict) -> float:
    return state["boot_delay"] + g["healthy_threshold"] * g["interval"]


def floors(state: dict, plan: dict) -> dict:
    """The critical-path floor: per group batches x (boot + threshold x interval), per wave the
    slowest group, summed over the waves."""
    groups = {}
    for g in state["groups"]:
        k = gkey(g)
        nb = (plan.get(k) or {}).get("batches")
        groups[k] = {"batches": nb, "per_batch": per_batch_floor(state, g),
                     "floor": nb * per_batch_floor(state, g) if nb is not None else None}
    waves = {}
    for w in state["waves"]:
        fs = [groups[gkey(g)]["floor"] for g in state["groups"] if g["wave"] == w]
        waves[w] = max(fs) if fs and None not in fs else None
    total = sum(waves.values()) if None not in waves.values() else None
    return {"groups": groups, "waves": waves, "total": total}


def group_breakdown(r: dict, k: str) -> dict | None:
    """One group's rollout split at its events, each batch at what the sampler saw."""
    ev = [e for e in r["events"] if ev_group(e) == k]

    def first(name):
        return next((e["_ts"] for e in ev if e["event"] == name), None)

    gs, rs, rf, gf = first("group_started"), first("rollout_started"), first("rollout_finished"), first("group_finished")
    bs = [e for e in ev if e["event"] == "batch_started"]
    rt = [e for e in ev if e["event"] == "retired"]
    if None in (gs, rs, rf, gf) or not bs or len(bs) != len(rt):
        return None
    inst = r["groups"][k]["instances"]
    bounds = [gs] + [e["_ts"] for e in rt]
    batches = []
    for n, (b, x) in enumerate(zip(bs, rt)):
        lo, hi = bounds[n], bounds[n + 1]
        mine = [v for v in inst.values() if lo <= v["first_seen_lo"] < hi]
        seen = [v["first_seen"] for v in mine]
        healthy = [v.get("first_healthy") for v in mine]
        healthy_lo = [v.get("first_healthy_lo") for v in mine]
        last_h = max(healthy) if healthy and None not in healthy else None
        last_h_lo = max(healthy_lo) if healthy_lo and None not in healthy_lo else None
        nxt = bs[n + 1]["_ts"] if n + 1 < len(bs) else None
        batches.append({
            "batch": b.get("batch", n + 1), "size": b.get("size"),
            "started_to_retired": x["_ts"] - b["_ts"],
            "to_registered": (max(seen) - b["_ts"]) if seen else None,
            "to_healthy": (last_h - b["_ts"]) if last_h is not None else None,
            "to_healthy_early": (last_h_lo - b["_ts"]) if last_h_lo is not None else None,
            "notice_lo": max(0.0, x["_ts"] - last_h) if last_h is not None else None,
            "notice_hi": (x["_ts"] - last_h_lo) if last_h_lo is not None else None,
            "retired_to_next": (nxt - x["_ts"]) if nxt is not None else None,
        })
    return {
        "group_started": gs, "group_finished": gf,
        "to_rollout_started": rs - gs, "to_first_batch": bs[0]["_ts"] - rs,
        "batches": batches, "tail": rf - rt[-1]["_ts"], "to_group_finished": gf - rf,
        "total": gf - gs,
    }


def release_breakdown(state: dict, r: dict) -> dict | None:
    ev = r["events"]

    def find(name, wave=None):
        return next((e["_ts"] for e in ev if e["event"] == name and (wave is None or e.get("wave") == wave)), None)

    rs, rf = find("release_started"), find("release_finished")
    if rs is None or rf is None:
        return None
    waves = []
    for w in state["waves"]:
        ws, wf = find("wave_started", w), find("wave_finished", w)
        gb = {gkey(g): group_breakdown(r, gkey(g)) for g in state["groups"] if g["wave"] == w}
        if ws is None or wf is None or None in gb.values():
            return None
        waves.append({
            "wave": w, "started": ws, "finished": wf, "wall": wf - ws,
            "to_groups_started": max(b["group_started"] for b in gb.values()) - ws,
            "after_groups": wf - max(b["group_finished"] for b in gb.values()),
            "groups": gb,
        })
    gaps = [waves[n + 1]["started"] - waves[n]["finished"] for n in range(len(waves) - 1)]
    return {
        "lead_in": rs - r["t0"], "to_first_wave": waves[0]["started"] - rs, "waves": waves,
        "between_waves": gaps, "tail": rf - waves[-1]["finished"], "exit": r["t1"] - rf,
    }


def bakery_share(r: dict, b: dict) -> tuple[float | None, float | None]:
    """The run's wall time minus, in each wave, the time the wave's last group to finish spent
    until each batch's last new target was healthy (the world's part of the critical path): what
    bakery itself adds, as a range since `healthy` is known to within one sample."""
    late = early = 0.0
    for w in b["waves"]:
        last = max(w["groups"].values(), key=lambda g: g["group_finished"])
        lt = [x["to_healthy"] for x in last["batches"]]
        et = [x["to_healthy_early"] for x in last["batches"]]
        if None in lt or None in et:
            return None, None
        late += sum(lt)
        early += sum(et)
    return r["wall_s"] - late, r["wall_s"] - early


def calls_in(r: dict, lo: float, hi: float) -> list[dict]:
    return [c for c in r["calls"] if lo <= c["t"] <= hi]


def report(state_path: str, runs_path: str) -> int:
    state = load_state(state_path)
    runs = [json.loads(line) for line in Path(runs_path).read_text().splitlines() if line.strip()]
    ok = [r for r in runs if r["ok"]]
    ngroups = len(state["groups"])
    fl = floors(state, runs[0]["plan"] if runs else {})
    rc = 0

    print(f"bench-release: {ngroups} groups over {len(state['stack_amis'])} Regions in 2 waves, "
          f"max_surge {state['surge']}, bake 0 s; world {state['endpoint']}")
    for w in state["waves"]:
        print(f"  wave {w:<7} " + ", ".join(
            f"{gkey(g)} ({g['capacity']} instances, target group {g['target_group_name']}: interval "
            f"{g['interval']:g} s, healthy threshold {g['healthy_threshold']})"
            for g in state["groups"] if g["wave"] == w))
    print(f"  boot delay {state['boot_delay']:g} s (WORLD_BOOT_DELAY); batches per group from `bakery release --dry-run`'s rollout_plan")
    for w in state["waves"]:
        parts = []
        for g in state["groups"]:
            if g["wave"] != w:
                continue
            x = fl["groups"][gkey(g)]
            parts.append(f"{gkey(g)} {x['batches']} x {x['per_batch']:.2f} = {f2(x['floor'], 0)} s")
        print(f"  floor of wave {w}: max({'; '.join(parts)}) = {f2(fl['waves'][w], 0)} s")
    print(f"  critical-path floor = {' + '.join(f2(fl['waves'][w], 0) for w in state['waves'])} = {f2(fl['total'], 0)} s")
    plans = {json.dumps(r["plan"], sort_keys=True) for r in runs}
    if len(plans) > 1:
        print("  note: the runs' dry-run plans differ; the floor above is run 1's")
    print()
    print("== runs ==")
    print("  run  image  wall s  release s  ratio  " + "  ".join(f"{w} s" for w in state["waves"])
          + "  min healthy per group (floor)  AWS calls  load 1m  result")
    for r in runs:
        fin = next((e for e in r["events"] if e["event"] == "release_finished"), {})
        b = release_breakdown(state, r) if r["ok"] else None
        wv = "  ".join(f2(x["wall"], len(x["wave"]) + 2) for x in b["waves"]) if b else ""
        mh = ", ".join(f"{r['groups'][gkey(g)]['min_healthy']}({g['capacity']})" for g in state["groups"])
        print(f"  {r['i']:>3}  {r['image'].upper():>5}  {r['wall_s']:6.2f}  {f2(fin.get('duration_s'), 9)}  "
              f"{f2(r['wall_s'] / fl['total'] if fl['total'] else None, 5)}  {wv}  {mh:<29}  "
              f"{r['calls_total']:>9}  {r['load_before'][0]:7.2f}  {r['error'] or 'ok, ' + str(fin.get('result'))}")

    bds = [(r, release_breakdown(state, r)) for r in ok]
    bds = [(r, b) for r, b in bds if b]
    if bds:
        print()
        print("== where the time goes (seconds; event `ts` from bakery, target health sampled every "
              f"{SAMPLE_S * 1000:.0f} ms per target group) ==")
        print("  per batch: started->retired = [started -> last new target healthy] + [healthy -> retired: bakery")
        print(f"  noticing, a range since `healthy` is known to within one sample]. Floor per batch "
              + ", ".join(sorted({f'{per_batch_floor(state, g):.2f} s' for g in state['groups']})) + ".")
        for r, b in bds:
            print()
            print(f"  run {r['i']} ({r['wall_s']:.2f} s; {r['calls_total']} AWS calls by bakery)")
            print(f"    process start -> release_started             {b['lead_in']:6.2f}")
            print(f"    release_started -> wave {state['waves'][0]} started        {b['to_first_wave']:6.2f}")
            for n, w in enumerate(b["waves"]):
                wfloor = fl["waves"][w["wave"]]
                print(f"    wave {w['wave']}: {w['wall']:.2f} s (floor {f2(wfloor, 0)}, "
                      f"{w['wall'] - wfloor:+.2f}; {len(calls_in(r, w['started'], w['finished']))} calls)")
                print(f"      wave_started -> last group_started          {w['to_groups_started']:6.2f}")
                for k, g in w["groups"].items():
                    gfloor = fl["groups"][k]["floor"]
                    print(f"      {k}: group_started -> group_finished {g['total']:.2f} s (floor {f2(gfloor, 0)}, "
                          f"{g['total'] - gfloor:+.2f})")
                    print(f"        group_started -> rollout_started        {g['to_rollout_started']:6.2f}")
                    print(f"        rollout_started -> batch 1 started      {g['to_first_batch']:6.2f}")
                    print("        batch  size  started->retired  over floor  ->registered  ->healthy  "
                          "healthy->retired  retired->next")
                    pb = fl["groups"][k]["per_batch"]
                    for x in g["batches"]:
                        print(f"        {x['batch']:>5}  {str(x['size']):>4}  {x['started_to_retired']:16.2f}  "
                              f"{x['started_to_retired'] - pb:+10.2f}  {f2(x['to_registered'], 12)}  "
                              f"{f2(x['to_healthy'], 9)}  {rng(x['notice_lo'], x['notice_hi']):>16}  "
                              f"{f2(x['retired_to_next'], 13)}")
                    print(f"        last retired -> rollout_finished        {g['tail']:6.2f}")
                    print(f"        rollout_finished -> group_finished      {g['to_group_finished']:6.2f}")
                print(f"      last group_finished -> wave_finished        {w['after_groups']:6.2f}")
                if n < len(b["between_waves"]):
                    print(f"    wave_finished -> next wave_started           {b['between_waves'][n]:6.2f}")
            print(f"    last wave_finished -> release_finished       {b['tail']:6.2f}")
            print(f"    release_finished -> process exit             {b['exit']:6.2f}")

        print()
        print(f"  medians over {len(bds)} run(s):")
        allg = [g for _, b in bds for w in b["waves"] for g in w["groups"].values()]
        allb = [x for g in allg for x in g["batches"]]
        rows = [
            ("process start -> release_started", med([b["lead_in"] for _, b in bds])),
            ("release_started -> first wave_started", med([b["to_first_wave"] for _, b in bds])),
            ("wave_started -> last group_started", med([w["to_groups_started"] for _, b in bds for w in b["waves"]])),
            ("group_started -> rollout_started", med([g["to_rollout_started"] for g in allg])),
            ("rollout_started -> batch 1 started", med([g["to_first_batch"] for g in allg])),
            ("a batch: started -> retired", med([x["started_to_retired"] for x in allb])),
            ("  started -> last new target registered", med([x["to_registered"] for x in allb])),
            ("  started -> last new target healthy", med([x["to_healthy"] for x in allb])),
            ("  healthy -> retired (bakery noticing, at least)", med([x["notice_lo"] for x in allb])),
            ("  healthy -> retired (bakery noticing, at most)", med([x["notice_hi"] for x in allb])),
            ("retired -> next batch started", med([x["retired_to_next"] for x in allb if x["retired_to_next"] is not None])),
            ("last retired -> rollout_finished", med([g["tail"] for g in allg])),
            ("rollout_finished -> group_finished", med([g["to_group_finished"] for g in allg])),
            ("last group_finished -> wave_finished", med([w["after_groups"] for _, b in bds for w in b["waves"]])),
            ("wave_finished -> next wave_started", med([x for _, b in bds for x in b["between_waves"]])),
            ("last wave_finished -> release_finished", med([b["tail"] for _, b in bds])),
            ("release_finished -> process exit", med([b["exit"] for _, b in bds])),
        ]
        for label, v in rows:
            print(f"    {label:<52} {f2(v)}")
        for w in state["waves"]:
            walls = [x["wall"] for _, b in bds for x in b["waves"] if x["wave"] == w]
            print(f"    wave {w:<8} {f2(med(walls))} s against its floor {f2(fl['waves'][w])} s "
                  f"({med(walls) / fl['waves'][w]:.2f}x)")
        over = med([r["wall_s"] - sum(x["wall"] for x in b["waves"]) for r, b in bds])
        print(f"    outside the waves (start, between waves, end, exit): {f2(over)} s")
        slack = med([sum(x["wall"] for x in b["waves"]) - fl["total"] for _, b in bds])
        print(f"    inside the waves over their floors: {f2(slack)} s")
        shares = [bakery_share(r, b) for r, b in bds]
        if shares and None not in [x[0] for x in shares]:
            lo, hi = med([x[0] for x in shares]), med([x[1] for x in shares])
            print(f"    bakery's own time per run (wall minus, per wave, its last group's waits for new targets to "
                  f"turn healthy): {rng(lo, hi)} s ({100 * lo / fl['total']:.0f}..{100 * hi / fl['total']:.0f}% of the floor)")

        print()
        print("  AWS calls by bakery (the world's call log of the run's own access key):")
        totals = [r["calls_total"] for r, _ in bds]
        print(f"    per run: median {med(totals):.0f} (runs {', '.join(str(t) for t in totals)}); "
              f"per group: {med(totals) / ngroups:.1f} ({ngroups} groups)")
        muts = [sum(r["mutating_counts"].values()) for r, _ in bds]
        print(f"    mutating per run: median {med(muts):.0f}, per group {med(muts) / ngroups:.1f}")
        for w in state["waves"]:
            n_g = sum(1 for g in state["groups"] if g["wave"] == w)
            inw = [len(calls_in(r, x["started"], x["finished"])) for r, b in bds for x in b["waves"] if x["wave"] == w]
            dur = [x["wall"] for _, b in bds for x in b["waves"] if x["wave"] == w]
            print(f"    during wave {w} ({n_g} group{'s' if n_g > 1 else ''}): median {med(inw):.0f}, "
                  f"{med(inw) / n_g:.1f} per group, {med(inw) / n_g / med(dur):.1f} per group-second")
        outside = [r["calls_total"] - sum(len(calls_in(r, x["started"], x["finished"])) for x in b["waves"]) for r, b in bds]
        print(f"    outside the waves (resolving the plan, the record, the end): median {med(outside):.0f}")
        print("    by action, median per run (per group), mean server ms:")
        keys = sorted({k for r, _ in bds for k in r["counts"]})
        for k in keys:
            n = med([r["counts"].get(k, 0) for r, _ in bds])
            ms = [c["ms"] for r, _ in bds for c in r["calls"] if c["k"] == k]
            mut = "*" if any(c["m"] for r, _ in bds for c in r["calls"] if c["k"] == k) else " "
            if n:
                print(f"      {mut} {k:<52} {n:6.0f}  ({n / ngroups:6.1f})  {statistics.mean(ms) if ms else 0:6.1f} ms")
        print("      (* mutating)")

    print()
    print("== result ==")
    walls = [r["wall_s"] for r in ok]
    m = med(walls)
    print(f"  runs ok        {len(ok)} of {len(runs)}")
    print(f"  times          {', '.join(f'{w:.2f}' for w in walls) or '-'} s")
    print(f"  median         {f2(m)} s")
    print(f"  floor          {f2(fl['total'])} s (critical path: the slowest group of each wave, summed)")
    ratio = m / fl["total"] if m and fl["total"] else None
    print(f"  ratio          {f2(ratio)}   (median / floor; goal <= {GOAL})")
    verdict = "PASS" if ratio is not None and ratio <= GOAL and len(ok) == len(runs) else "MISS"
    print(f"  [{verdict}] median release at most {GOAL} x its critical-path floor"
          + (f" ({m:.2f} s vs {GOAL * fl['total']:.2f} s)" if m and fl["total"] else ""))
    cap_ok = bool(runs)
    lows = []
    for g in state["groups"]:
        k = gkey(g)
        mins = [r["groups"][k]["min_healthy"] for r in runs]
        low = min(mins) if mins and None not in mins else None
        floor_h = g["capacity"]
        planned = [r["plan"].get(k, {}).get("least_in_service") for r in runs]
        good = low is not None and low >= floor_h
        cap_ok = cap_ok and good
        n = sum(len(r["groups"][k]["samples"]) for r in runs)
        lows.append(f"{k} min {low} of floor {floor_h} (planned least in service {min((p for p in planned if p is not None), default='-')}; {n} samples)")
    print(f"  [{'PASS' if cap_ok else 'MISS'}] healthy targets never below each group's floor (its desired capacity): "
          + "; ".join(lows))
    if bds:
        totals = [r["calls_total"] for r, _ in bds]
        print(f"  AWS calls      {med(totals):.0f} per release, {med(totals) / ngroups:.1f} per group (median)")
    if ratio is not None and verdict == "MISS" and bds:
        print("  the ratio misses: see `where the time goes` above (per wave, the gaps around and between batches)")
    if len(ok) != len(runs) or not cap_ok:
        rc = 1
    return rc


# ------------------------------------------------------------------------------ the rest
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
        prep(args[0], int(args[1]), float(args[2]))
    elif cmd == "plan":
        state = load_state(args[0])
        plan, dry = write_plans(state, int(args[1]), Path(args[2]))
        print(plan)
        print(dry)
    elif cmd == "run":
        if "--" not in args or args.index("--") != 6:
            die("usage: run STATE I TIMEOUT OUT_DIR RUNS ACCESS_KEY -- COMMAND...", 2)
        st, i, timeout, out_dir, runs, key = args[:6]
        return run(st, int(i), float(timeout), out_dir, runs, key, args[7:])
    elif cmd == "report":
        return report(args[0], args[1])
    elif cmd == "restore":
        state = load_state(args[0])
        out = Path(args[1])
        man = out / "restore.manifest.json"
        write_manifest(man, state["home"], state["stack_amis"])
        plan = out / "restore.toml"
        plan.write_text(plan_text(state, f"bench-release-{state['stamp']}-restore", man.name))
        print(plan)
    elif cmd == "steady":
        state = load_state(args[0])
        want = state["stack_amis"] if len(args) > 1 and args[1] == "stack" else None
        wait_for("every group to be healthy", float(os.environ.get("BENCH_CLEANUP_TIMEOUT", "120")),
                 steady(state, want), every=0.5)
    elif cmd == "cleanup":
        state = load_state(args[0])
        if not world_answers():
            say(f"the world at {endpoint()} is not answering, so nothing of the benchmark is left in it "
                f"(its state lives in the server's memory): {world_gone_reason()}")
            return 1
        for region in state["stack_amis"]:
            for img in deregister_ours(region):
                say(f"deregistered {img} in {region}")
    else:
        die(f"unknown command {cmd!r}", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
