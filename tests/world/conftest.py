"""Fixtures for the world's own tests.

The session's world is started with `scripts/world up` in its own WORLD_DIR and on a free
loopback port, and taken down at the end. Set WORLD_TEST_ENV=/path/to/.world/env to run
the tests against an already running world instead (it is then left running).
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORLD = str(REPO / "scripts" / "world")
sys.path.insert(0, str(HERE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^export ([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if m:
            vals = shlex.split(m.group(2))
            out[m.group(1)] = vals[0] if vals else ""
    return out


def world_cmd(env: dict, *args: str, timeout: float = 180, input: str | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env)
    return subprocess.run(
        [WORLD, *args], env=e, capture_output=True, text=True, timeout=timeout, input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


class WorldHandle:
    def __init__(self, env: dict[str, str], managed: bool):
        self.env = env
        self.managed = managed
        self.dir = Path(env["WORLD_DIR"])
        self.port = int(env["WORLD_PORT"])
        self.cli_env = {"WORLD_DIR": env["WORLD_DIR"], "WORLD_PORT": env["WORLD_PORT"]}

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return world_cmd(self.cli_env, *args, **kw)

    def client(self, service: str, retries: int = 5, access_key: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client(
            service,
            endpoint_url=self.env["AWS_ENDPOINT_URL"],
            region_name=self.env["AWS_REGION"],
            aws_access_key_id=access_key or self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            config=Config(retries={"mode": "standard", "max_attempts": retries}),
        )

    def control(self, method: str, path: str, body=None):
        from bakeryworld.netutil import control

        return control(self.port, method, path, body)


@pytest.fixture(scope="session")
def world():
    given = os.environ.get("WORLD_TEST_ENV")
    if given:
        yield WorldHandle(read_env(Path(given)), managed=False)
        return
    sd = Path(tempfile.mkdtemp(prefix="bakery-world-test-"))
    port = free_port()
    env = {"WORLD_DIR": str(sd), "WORLD_PORT": str(port)}
    p = world_cmd(env, "up", "--boot-delay", "1", "--snapshot-delay", "2", "--metric-period", "1")
    assert p.returncode == 0, f"world up failed:\n{p.stdout}\n{p.stderr}"
    h = WorldHandle(read_env(sd / "env"), managed=True)
    try:
        yield h
    finally:
        if world_cmd(env, "down").returncode == 0:
            import shutil

            shutil.rmtree(sd, ignore_errors=True)


@pytest.fixture(scope="session")
def ec2(world):
    return world.client("ec2")


@pytest.fixture(scope="session")
def keypair(world, ec2, tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    key = d / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    name = f"world-test-{uuid.uuid4().hex[:8]}"
    ec2.import_key_pair(KeyName=name, PublicKeyMaterial=(d / "id_ed25519.pub").read_bytes())
    return {"name": name, "path": str(key), "dir": d}


class Box:
    """One launched instance and SSH to it, host key pinned from the console output."""

    def __init__(self, world, ec2, keypair, inst):
        self.world, self.ec2, self.keypair = world, ec2, keypair
        self.id = inst["InstanceId"]
        self.ip = inst["PrivateIpAddress"]
        self.launched = time.time()
        self.known_hosts = Path(keypair["dir"]) / f"known_hosts-{self.id}"
        self.console = None

    def wait_console(self, timeout: float = 30) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.ec2.get_console_output(InstanceId=self.id).get("Output")
            if out and "BEGIN SSH HOST KEY KEYS" in out:
                self.console = out
                key = re.search(r"-----BEGIN SSH HOST KEY KEYS-----\n(.+?)\n", out).group(1)
                self.known_hosts.write_text(f"{self.ip} {key}\n")
                return out
            time.sleep(0.1)
        raise AssertionError(f"{self.id}: no host keys in console output after {timeout}s")

    def ssh_args(self, user: str = "root") -> list[str]:
        return [
            "ssh", "-i", self.keypair["path"],
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", f"{user}@{self.ip}",
        ]

    def ssh(self, cmd: str, user: str = "root", timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        if self.console is None:
            self.wait_console()
        p = subprocess.run(self.ssh_args(user) + [cmd], capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check:
            assert p.returncode == 0, f"ssh {user}@{self.ip} {cmd!r} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def wait_ssh(self, user: str = "root", timeout: float = 30) -> float:
        """Seconds from RunInstances to an accepted login."""
        self.wait_console(timeout)
        deadline = time.time() + timeout
        while True:
            p = self.ssh("true", user=user, check=False)
            if p.returncode == 0:
                return time.time() - self.launched
            if time.time() > deadline:
                raise AssertionError(f"ssh to {self.ip} failed: {p.stderr}")
            time.sleep(0.2)

    def state(self) -> str:
        return self.ec2.describe_instances(InstanceIds=[self.id])["Reservations"][0]["Instances"][0]["State"]["Name"]

    def status_check(self) -> str:
        s = self.ec2.describe_instance_status(InstanceIds=[self.id])["InstanceStatuses"]
        return s[0]["InstanceStatus"]["Status"] if s else "none"


@pytest.fixture
def launch(world, ec2, keypair):
    boxes = []

    def _launch(image_id: str | None = None, user_data: str | None = None, subnet: int = 0) -> Box:
        kw = {}
        if user_data:
            kw["UserData"] = user_data
        r = ec2.run_instances(
            ImageId=image_id or world.env["WORLD_BASE_AMI"], MinCount=1, MaxCount=1,
            InstanceType="t3.micro", KeyName=keypair["name"],
            SubnetId=world.env["WORLD_PRIVATE_SUBNETS"].split(",")[subnet], **kw,
        )
        b = Box(world, ec2, keypair, r["Instances"][0])
        boxes.append(b)
        return b

    yield _launch
    if boxes:
        ec2.terminate_instances(InstanceIds=[b.id for b in boxes])


def body_pids(world_dir: Path, instance_id: str) -> list[int]:
    """PIDs on this host whose root is the given body's root."""
    from bakeryworld.world import base_dir_for

    root = str(base_dir_for(world_dir) / "bodies" / instance_id / "root")
    out = []
    for n in os.listdir("/proc"):
        if n.isdigit():
            try:
                if os.readlink(f"/proc/{n}/root") == root:
                    out.append(int(n))
            except OSError:
                pass
    return out


@pytest.fixture
def faults(world):
    """Sets the world's fault spec; cleared when the test ends, also on failure."""
    yield lambda spec: world.control("POST", "/_world/faults", spec)
    world.control("DELETE", "/_world/faults")


def err_of(fn):
    """The AWS error code and HTTP status `fn()` fails with, or None if it succeeds."""
    from botocore.exceptions import ClientError

    try:
        fn()
    except ClientError as e:
        return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]
    return None


def wait_for(pred, timeout: float = 20, interval: float = 0.1, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def decode_b64(s: str) -> str:
    return base64.b64decode(s).decode()
