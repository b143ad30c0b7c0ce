"""Shared helpers of the reliability suite (issue 7).

The suite drives the real `bakery` binary against a running local world (`tests/world/`), the
world named by `WORLD_ENV_FILE` (the env file `scripts/world up --stack` writes). It never
starts a world of its own and never skips: without a world it fails and says how to start one.

    WORLD_ENV_FILE=.world/env .venv/bin/python -m pytest tests/reliability

`BAKERY` names the binary (default `$CARGO_TARGET_DIR/debug/bakery`, else `target/debug/bakery`). The tests set world-global faults,
so they must not share the world with other tests running at the same time; every fault spec
is cleared by a fixture finalizer, also on failure.

Each test prints a summary line (to the real stderr, and again in pytest's terminal summary)
with the figures the README quotes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
BAKERY = os.environ.get("BAKERY") or str(
    Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target") / "debug" / "bakery"
)

# Nothing here may leave 127.0.0.0/8: no proxies, no instance-metadata lookups (boto3 and bakery).
for _k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_k, None)
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.0/8,localhost"

import boto3  # noqa: E402  (after the environment above is clean)
from botocore.config import Config  # noqa: E402

BUILD_ID_TAG = "bakery:build-id"
COMPLETE_TAG = "bakery:complete"

# One summary line per test, repeated at the end of the session.
SUMMARY: list[str] = []
_CONFIG = None


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config


def report(line: str, live: bool = True) -> None:
    """Prints a summary line now, past pytest's output capture (whatever `-s` says), and again
    in the terminal summary (only there when not `live`)."""
    SUMMARY.append(line)
    if not live:
        return
    capman = _CONFIG.pluginmanager.getplugin("capturemanager") if _CONFIG else None
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(f"\nreliability: {line}", file=sys.stderr, flush=True)
    else:
        print(f"\nreliability: {line}", file=sys.stderr, flush=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if SUMMARY:
        terminalreporter.section("reliability figures")
        for line in SUMMARY:
            terminalreporter.write_line(line)


# ------------------------------------------------------------------------------------ the world


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*export ([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if m:
            vals = shlex.split(m.group(2))
            out[m.group(1)] = vals[0] if vals else ""
    return out


class World:
    """The running world of `WORLD_ENV_FILE`: its env, AWS clients, control API, bakery runs."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.endpoint = env["AWS_ENDPOINT_URL"].rstrip("/")
        host = self.endpoint.split("//", 1)[-1].split("/", 1)[0].split(":", 1)[0]
        if not host.startswith("127."):
            raise RuntimeError(f"the world's endpoint {self.endpoint} is not on loopback")
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._clients: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()

    def var(self, k: str) -> str:
        v = self.env.get(k)
        if not v:
            raise RuntimeError(f"{k} is missing from the world's env file (start it with `scripts/world up --stack`)")
        return v

    @property
    def private_subnet(self) -> str:
        return self.private_subnets[0]

    @property
    def private_subnets(self) -> list[str]:
        return self.var("WORLD_PRIVATE_SUBNETS").split(",")

    # ---- AWS clients (boto3), one per (service, access key), retried generously
    def client(self, service: str, access_key: str = "rel-check"):
        with self._lock:
            c = self._clients.get((service, access_key))
            if c is None:
                c = boto3.client(
                    service,
                    endpoint_url=self.endpoint,
                    region_name=self.var("AWS_REGION"),
                    aws_access_key_id=access_key,
                    aws_secret_access_key="testing",
                    config=Config(
                        retries={"mode": "standard", "max_attempts": 10},
                        # the world accepts AWS-impossible health-check timings (interval 1 s)
                        parameter_validation=False,
                        proxies={},
                        connect_timeout=5,
                        read_timeout=60,
                    ),
                )
                self._clients[(service, access_key)] = c
            return c

    # ---- control API
    def control(self, method: str, path: str, body: object | None = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.endpoint + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with self._http.open(req, timeout=10) as r:
            text = r.read().decode()
        return json.loads(text) if text.strip() else None

    def set_faults(self, spec: dict) -> None:
        self.control("POST", "/_world/faults", spec)

    def clear_faults(self) -> None:
        self.control("DELETE", "/_world/faults")

    def calls(self, access_key: str, limit: int = 0) -> dict:
        """The world's call tally of one access key (and its last `limit` calls)."""
        return self.control("GET", f"/_world/calls?access_key={access_key}&limit={limit}")

    # ---- bakery
    def bakery_env(self, access_key: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and "proxy" not in k.lower()}
        env.update(self.env)
        env["AWS_ACCESS_KEY_ID"] = access_key
        env["AWS_EC2_METADATA_DISABLED"] = "true"
        return env

    def recipe(self, path: Path, inline: list[str], subnet: int = 0) -> Path:
        """The minimal recipe: the world's base AMI, one short shell provisioner, root, private IP,
        in private subnet number `subnet` (modulo their count). The world's subnets never get
        the addresses of terminated instances back (moto frees them only when the instance
        object is garbage-collected, and terminated instances stay listed): each /24 takes about
        250 launches per world, so the suite spreads its bakes over the private subnets."""
        subnets = self.private_subnets
        subnet_id = subnets[subnet % len(subnets)]
        lines = ", ".join(json.dumps(c) for c in inline)
        path.write_text(
            f"""[source]
ami = "{self.var('WORLD_BASE_AMI')}"

[instance]
type = "t3.micro"
subnet = "{subnet_id}"

[communicator]
type = "ssh"
user = "root"
interface = "private_ip"
connect_timeout = "90s"

[[provisioner]]
type = "shell"
inline = [{lines}]

[image]
name = "rel-{{{{build_id}}}}"
"""
        )
        return path

    # ---- what a bake left behind
    def instances_of(self, build_id: str) -> list[dict]:
        """Every instance that ever carried the build id (terminated ones included)."""
        out = self.client("ec2").describe_instances(Filters=[{"Name": f"tag:{BUILD_ID_TAG}", "Values": [build_id]}])
        return [i for r in out["Reservations"] for i in r["Instances"]]

    def images_of(self, build_id: str) -> list[dict]:
        out = self.client("ec2").describe_images(Owners=["self"], Filters=[{"Name": f"tag:{BUILD_ID_TAG}", "Values": [build_id]}])
        return out["Images"]

    def leftovers(self, build_id: str, keep_image: str | None = None) -> list[str]:
        """What a bake with this id left behind: instances not terminated, its key pair, security
        groups (by tag and by name), and any image of the build other than `keep_image` (the
        finished AMI of a successful bake, which must carry the completion tag). Empty = clean."""
        ec2 = self.client("ec2")
        left = []
        for i in self.instances_of(build_id):
            if i["State"]["Name"] != "terminated":
                left.append(f"instance {i['InstanceId']} ({i['State']['Name']})")
        key_name = f"bakery-{build_id}"
        for k in ec2.describe_key_pairs()["KeyPairs"]:
            tags = {t["Key"]: t["Value"] for t in k.get("Tags", [])}
            if k["KeyName"] == key_name or tags.get(BUILD_ID_TAG) == build_id:
                left.append(f"key pair {k['KeyName']}")
        groups = {}
        for flt in ({"Name": f"tag:{BUILD_ID_TAG}", "Values": [build_id]}, {"Name": "group-name", "Values": [key_name]}):
            for g in ec2.describe_security_groups(Filters=[flt])["SecurityGroups"]:
                groups[g["GroupId"]] = g
        left += [f"security group {gid}" for gid in groups]
        for img in self.images_of(build_id):
            tags = {t["Key"]: t["Value"] for t in img.get("Tags", [])}
            if img["ImageId"] == keep_image and COMPLETE_TAG in tags:
                continue
            left.append(f"image {img['ImageId']} ({img['State']}, complete={tags.get(COMPLETE_TAG)})")
        return left

    def delete_image(self, image_id: str) -> None:
        """Deregisters a finished test AMI and deletes its snapshots (keeps the world small)."""
        ec2 = self.client("ec2")
        imgs = ec2.describe_images(ImageIds=[image_id])["Images"]
        ec2.deregister_image(ImageId=image_id)
        for img in imgs:
            for m in img.get("BlockDeviceMappings", []):
                snap = m.get("Ebs", {}).get("SnapshotId")
                if snap:
                    try:
                        ec2.delete_snapshot(SnapshotId=snap)
                    except Exception:
                        pass


@pytest.fixture(scope="session")
def world() -> World:
    path = os.environ.get("WORLD_ENV_FILE")
    if not path:
        pytest.fail(
            "WORLD_ENV_FILE is not set: point it at a running world's env file "
            "(`scripts/world up --stack` writes .world/env), or run `scripts/test`",
            pytrace=False,
        )
    p = Path(path)
    if not p.is_file():
        pytest.fail(f"WORLD_ENV_FILE={path}: no such file; is the world running? (`scripts/world up --stack`)", pytrace=False)
    w = World(read_env(p))
    for k in ("AWS_ENDPOINT_URL", "AWS_REGION", "WORLD_BASE_AMI", "WORLD_PRIVATE_SUBNETS"):
        w.var(k)
    try:
        w.clear_faults()  # whatever an aborted earlier run may have left
    except OSError as e:
        pytest.fail(f"the world of {path} does not answer at {w.endpoint}: {e}", pytrace=False)
    # The suite launches about 25 instances in each private subnet; a world whose subnets ran out
    # of addresses answers RunInstances with a bare 500 (see World.recipe): say so up front.
    subnets = w.client("ec2").describe_subnets(SubnetIds=w.private_subnets)["Subnets"]
    low = {s["SubnetId"]: s["AvailableIpAddressCount"] for s in subnets if s["AvailableIpAddressCount"] < 40}
    if low:
        pytest.fail(
            f"the world's private subnets are almost out of addresses {low} (moto never reuses the "
            "addresses of terminated instances): restart the world (`scripts/world down; scripts/world up --stack`)",
            pytrace=False,
        )
    if not Path(BAKERY).is_file():
        pytest.fail(f"no bakery binary at {BAKERY} (build it, or set BAKERY)", pytrace=False)
    return w


@pytest.fixture
def faults(world: World):
    """Sets world-global fault specs; always cleared at the end of the test, even on failure."""
    world.clear_faults()
    yield world.set_faults
    world.clear_faults()


# ------------------------------------------------------------------------------------- bakery


class Run:
    """A `bakery --output json` process: its events as they come, exit code, stderr."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path | None = None):
        self.args = args
        self.events: list[dict] = []
        self.stdout_lines: list[str] = []
        self.stderr = ""
        self.code: int | None = None
        self.cond = threading.Condition()
        self.started = time.monotonic()
        self.ended: float | None = None
        self.proc = self._spawn(args, env, cwd)
        self._out = threading.Thread(target=self._read_stdout, daemon=True)
        self._err = threading.Thread(target=self._read_stderr, daemon=True)
        self._out.start()
        self._err.start()

    @staticmethod
    def _spawn(args, env, cwd):
        # Another engineer may be replacing the binary right now ("Text file busy"): wait a bit.
        for attempt in range(20):
            try:
                return subprocess.Popen(
                    [BAKERY, *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                )
            except OSError as e:
                if e.errno not in (errno.ETXTBSY, errno.ENOENT) or attempt == 19:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")

    def _read_stdout(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            with self.cond:
                self.stdout_lines.append(line)
                if line.startswith("{"):
                    try:
                        self.events.append(json.loads(line))
                    except ValueError:
                        pass
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def _read_stderr(self):
        self.stderr = self.proc.stderr.read()

    def wait_for(self, pred: Callable[[dict], bool], timeout: float) -> dict | None:
        """Waits for the first event matching `pred` (already seen or to come); None if the
        process ended or the timeout passed first."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for e in self.events[seen:]:
                    if pred(e):
                        return e
                seen = len(self.events)
                if self.proc.poll() is not None and not self._out.is_alive():
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.2))

    def signal(self, sig: int) -> bool:
        """Sends `sig` to this process (by its PID, only while it runs); False if it had ended."""
        if self.proc.poll() is not None:
            return False
        os.kill(self.proc.pid, sig)
        return True

    def wait(self, timeout: float = 180) -> int:
        try:
            self.code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._out.join(5)
            self._err.join(5)
            raise AssertionError(f"bakery {' '.join(self.args)} did not end within {timeout}s\n{self.describe()}")
        self._out.join(10)
        self._err.join(10)
        self.ended = time.monotonic()
        return self.code

    def event(self, name: str) -> dict | None:
        return next((e for e in self.events if e.get("event") == name), None)

    @property
    def build_id(self) -> str | None:
        e = self.event("build_started")
        return e["build_id"] if e else None

    def describe(self) -> str:
        out = "\n".join(self.stdout_lines[-60:])
        err = "\n".join(self.stderr.splitlines()[-40:])
        return f"bakery {' '.join(self.args)}: exit {self.code}\n--- stdout (tail)\n{out}\n--- stderr (tail)\n{err}"


def bakery(world: World, access_key: str, *args: str, cwd: Path | None = None) -> Run:
    """Starts `bakery --output json ARGS` as `access_key` (for call-log attribution)."""
    return Run(["--output", "json", *args], world.bakery_env(access_key), cwd)


def bakery_ok(world: World, access_key: str, *args: str, timeout: float = 180, cwd: Path | None = None) -> Run:
    r = bakery(world, access_key, *args, cwd=cwd)
    r.wait(timeout)
    return r


@contextmanager
def fleet_with_web_ami(world: World, name: str, capacity: int, access_key: str, tmp_path: Path):
    """A fleet of its own and the sample web service's AMI, baked while the fleet comes up:
    `(fleet, ami)`. Afterwards the fleet goes, then its AMI."""
    fleet = Fleet(world, name, capacity)
    try:
        ami = bake_web_while(world, fleet, access_key, tmp_path)
        try:
            yield fleet, ami
        finally:
            fleet.delete()  # before its AMI goes
            try:
                world.delete_image(ami)
            except Exception:
                pass
    finally:
        fleet.delete()


def bake_web_while(world: World, fleet: "Fleet", access_key: str, tmp_path: Path) -> str:
    """Bakes the sample web service (examples/web) while `fleet` comes up healthy; its AMI."""
    def bake():
        return bakery_ok(
            world, access_key, "build", "examples/web/recipe.toml",
            "--manifest", str(tmp_path / "web.json"),
            "--var", f"base_ami={world.var('WORLD_BASE_AMI')}",
            "--var", f"subnet={world.private_subnets[-1]}",
            "--var", f"version=rel-{uuid.uuid4().hex[:6]}",
            cwd=REPO, timeout=180,
        )

    with ThreadPoolExecutor(1) as pool:
        baking = pool.submit(bake)
        fleet.wait_healthy(fleet.capacity, timeout=90)
        b = baking.result()
    assert b.code == 0, b.describe()
    return b.event("build_finished")["manifest"]["ami_id"]


def gc(world: World, build_id: str) -> dict:
    """`bakery gc --build-id ID --older-than 0s`: its JSON report."""
    r = bakery_ok(world, f"rel-gc-{uuid.uuid4().hex[:8]}", "gc", "--build-id", build_id, "--older-than", "0s", timeout=120)
    assert r.code == 0, r.describe()
    return json.loads("\n".join(r.stdout_lines))


# -------------------------------------------------------------------------------------- fleets


class Fleet:
    """A group of its own (as `Fleet::create` in tests/common/mod.rs): a target group behind the
    stack's load balancer on a listener port of its own, a launch template on the stack's
    image, and an ASG attached to the target group with ELB health checks."""

    def __init__(self, world: World, name: str, capacity: int, grace: int = 5):
        self.world = world
        self.name = f"rel-{name}-{uuid.uuid4().hex[:6]}"
        self.asg = self.name
        self.capacity = capacity
        self.tg_arn = self.listener_arn = self.lt_id = None
        self.deleted = False
        elb = world.client("elbv2")
        tg = elb.create_target_group(
            Name=self.name, Protocol="HTTP", Port=8080, VpcId=world.var("WORLD_VPC_ID"),
            HealthCheckPath="/healthz", HealthCheckIntervalSeconds=1, HealthCheckTimeoutSeconds=1,
            HealthyThresholdCount=2, UnhealthyThresholdCount=2,
        )
        self.tg_arn = tg["TargetGroups"][0]["TargetGroupArn"]
        elb.modify_target_group_attributes(
            TargetGroupArn=self.tg_arn,
            Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": "1"}],
        )
        port = 20000 + int(self.name[-4:], 16) % 20000
        listener = elb.create_listener(
            LoadBalancerArn=world.var("WORLD_ALB_ARN"), Protocol="HTTP", Port=port,
            DefaultActions=[{"Type": "forward", "TargetGroupArn": self.tg_arn}],
        )
        self.listener_arn = listener["Listeners"][0]["ListenerArn"]
        lt = world.client("ec2").create_launch_template(
            LaunchTemplateName=self.name,
            LaunchTemplateData={
                "ImageId": world.var("WORLD_STACK_AMI"),
                "InstanceType": "t3.micro",
                "SecurityGroupIds": [world.var("WORLD_APP_SG")],
                "MetadataOptions": {"HttpTokens": "required"},
            },
        )
        self.lt_id = lt["LaunchTemplate"]["LaunchTemplateId"]
        world.client("autoscaling").create_auto_scaling_group(
            AutoScalingGroupName=self.asg,
            LaunchTemplate={"LaunchTemplateId": self.lt_id, "Version": "1"},
            MinSize=capacity, MaxSize=capacity * 2, DesiredCapacity=capacity,
            VPCZoneIdentifier=world.var("WORLD_PRIVATE_SUBNETS"),
            TargetGroupARNs=[self.tg_arn], HealthCheckType="ELB", HealthCheckGracePeriod=grace,
        )

    def healthy(self, access_key: str = "rel-check") -> int:
        out = self.world.client("elbv2", access_key).describe_target_health(TargetGroupArn=self.tg_arn)
        return sum(1 for d in out["TargetHealthDescriptions"] if d["TargetHealth"]["State"] == "healthy")

    def wait_healthy(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            h = self.healthy()
            if h >= n:
                return
            assert time.monotonic() < deadline, f"{self.name}: only {h} of {n} targets healthy after {timeout}s"
            time.sleep(0.2)

    def group(self) -> dict:
        out = self.world.client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[self.asg])
        return out["AutoScalingGroups"][0]

    def amis(self) -> list[str]:
        """The AMI of every live (not terminating) instance of the group."""
        ids = [i["InstanceId"] for i in self.group()["Instances"] if not i["LifecycleState"].startswith("Terminat")]
        if not ids:
            return []
        out = self.world.client("ec2").describe_instances(InstanceIds=ids)
        return [i["ImageId"] for r in out["Reservations"] for i in r["Instances"]]

    def delete(self) -> None:
        """Deletes the group (and its instances), listener, target group and launch template.
        Idempotent; never raises."""
        if self.deleted:
            return
        self.deleted = True
        w = self.world
        steps = [
            lambda: w.client("autoscaling").delete_auto_scaling_group(AutoScalingGroupName=self.asg, ForceDelete=True),
            lambda: self.listener_arn and w.client("elbv2").delete_listener(ListenerArn=self.listener_arn),
            lambda: self.tg_arn and w.client("elbv2").delete_target_group(TargetGroupArn=self.tg_arn),
            lambda: self.lt_id and w.client("ec2").delete_launch_template(LaunchTemplateId=self.lt_id),
        ]
        for s in steps:
            try:
                s()
            except Exception as e:  # best effort: report, never mask the test's own failure
                print(f"reliability: deleting {self.name}: {e}", file=sys.__stderr__)


class HealthSampler:
    """Counts a target group's healthy targets every `period` seconds until stopped."""

    def __init__(self, fleet: Fleet, period: float = 0.2):
        self.fleet = fleet
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._key = f"rel-sampler-{uuid.uuid4().hex[:6]}"

    def _run(self):
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append((round(time.monotonic() - t0, 2), self.fleet.healthy(self._key)))
            except Exception as e:
                self.errors.append(str(e))
            self._stop.wait(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(10)
        return False


__all__ = ["World", "Run", "Fleet", "HealthSampler", "fleet_with_web_ami", "bakery", "bakery_ok", "gc", "report"]
