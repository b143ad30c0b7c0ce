"""The command: idempotent up, bad input, port in use, down and up-after-crash cleanup."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import WORLD, Box, free_port, read_env, wait_for, world_cmd


def test_up_is_idempotent(world):
    if not world.managed:
        return
    before = (world.dir / "env").read_text()
    pid = world.control("GET", "/_world/status")[1]["pid"]
    t = time.time()
    p = world.cli("up")
    assert p.returncode == 0, p.stderr
    assert time.time() - t < 10
    assert "reused running world" in p.stderr
    assert p.stdout == before == (world.dir / "env").read_text()
    assert world.control("GET", "/_world/status")[1]["pid"] == pid
    env = read_env(world.dir / "env")
    for k in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WORLD_VPC_ID",
              "WORLD_PUBLIC_SUBNETS", "WORLD_PRIVATE_SUBNETS", "WORLD_BASE_AMI", "WORLD_BOOT_DELAY", "WORLD_SNAPSHOT_DELAY"):
        assert env.get(k), k
    assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{world.port}"
    assert len(env["WORLD_PRIVATE_SUBNETS"].split(",")) == 2 and len(env["WORLD_PUBLIC_SUBNETS"].split(",")) == 2


def test_base_network(world, ec2):
    vpc = ec2.describe_vpcs(VpcIds=[world.env["WORLD_VPC_ID"]])["Vpcs"][0]
    assert vpc["CidrBlock"].startswith("127.")
    subs = ec2.describe_subnets(SubnetIds=world.env["WORLD_PUBLIC_SUBNETS"].split(",") + world.env["WORLD_PRIVATE_SUBNETS"].split(","))["Subnets"]
    assert len({s["AvailabilityZone"] for s in subs}) == 2
    assert not any(s["MapPublicIpOnLaunch"] for s in subs)
    assert ec2.describe_nat_gateways(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])["NatGateways"]
    img = ec2.describe_images(ImageIds=[world.env["WORLD_BASE_AMI"]])["Images"][0]
    assert img["State"] == "available" and img["Name"].startswith("amzn")


def test_unknown_and_malformed_instance_ids(world):
    p = world.cli("kill", "i-0123456789abcdef0")
    assert p.returncode == 2 and "unknown instance i-0123456789abcdef0" in p.stderr, p.stderr
    p = world.cli("crash", "not-an-id")
    assert p.returncode == 2 and "not an instance id" in p.stderr


def test_port_in_use_is_named(world, tmp_path):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        d = str(tmp_path / "port-a")
        p = world_cmd({"WORLD_DIR": d, "WORLD_PORT": str(port)}, "up")
        assert p.returncode == 2, p.stderr
        assert f"port {port}" in p.stderr and f"pid {os.getpid()}" in p.stderr, p.stderr
    # and the running world's own port
    d = str(tmp_path / "port-b")
    p = world_cmd({"WORLD_DIR": d, "WORLD_PORT": str(world.port)}, "up")
    assert p.returncode == 2 and f"port {world.port}" in p.stderr and "bakeryworld.server" in p.stderr, p.stderr


def _world_leftovers(sd: Path, port: int, ips: list[str]) -> list[str]:
    from bakeryworld.cli import procs_of_world
    from bakeryworld.world import base_dir_for

    left = [f"pid {p}" for p in procs_of_world(sd)]
    base = str(base_dir_for(sd))
    with open("/proc/self/mountinfo") as f:
        left += [ln.split()[4] for ln in f if base in ln.split()[4]]
    # any mount namespace still holding a body mount
    for n in os.listdir("/proc"):
        if n.isdigit():
            try:
                with open(f"/proc/{n}/mountinfo") as f:
                    if base in f.read():
                        left.append(f"mounts held by pid {n}")
            except OSError:
                pass
    for ip, prt in [("127.0.0.1", port)] + [(ip, 22) for ip in ips]:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((ip, prt)) == 0:
                left.append(f"listener {ip}:{prt}")
    return left


def test_down_leaves_nothing_and_up_cleans_after_a_crash(keypair, tmp_path):
    sd = Path(tempfile.mkdtemp(prefix="bakery-world-life-"))
    port = free_port()
    env = {"WORLD_DIR": str(sd), "WORLD_PORT": str(port)}
    p = world_cmd(env, "up", "--boot-delay", "0.5")
    assert p.returncode == 0, p.stderr
    try:
        from conftest import WorldHandle

        w = WorldHandle(read_env(sd / "env"), managed=True)
        ec2 = w.client("ec2")
        ec2.import_key_pair(KeyName="k", PublicKeyMaterial=(Path(keypair["path"] + ".pub")).read_bytes())

        def boot():
            r = ec2.run_instances(ImageId=w.env["WORLD_BASE_AMI"], MinCount=1, MaxCount=1, KeyName="k",
                                  SubnetId=w.env["WORLD_PRIVATE_SUBNETS"].split(",")[0])
            b = Box(w, ec2, {**keypair, "name": "k"}, r["Instances"][0])
            b.wait_ssh()
            b.ssh("setsid nohup sleep 999 >/dev/null 2>&1 < /dev/null &")
            return b

        b1 = boot()
        # an open SSH session at down time must not survive either
        sess = subprocess.Popen(b1.ssh_args() + ["sleep 600"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        p = world_cmd(env, "down")
        assert p.returncode == 0, p.stderr
        assert not (sd / "env").exists()
        assert _world_leftovers(sd, port, [b1.ip]) == []
        sess.wait(10)

        # crash: SIGKILL the server while a body runs; the next up cleans up first
        p = world_cmd(env, "up", "--boot-delay", "0.5")
        assert p.returncode == 0, p.stderr
        w = WorldHandle(read_env(sd / "env"), managed=True)
        ec2 = w.client("ec2")
        ec2.import_key_pair(KeyName="k", PublicKeyMaterial=(Path(keypair["path"] + ".pub")).read_bytes())
        b2 = boot()
        pid = w.control("GET", "/_world/status")[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split(")")[1][:3],
                 what="server dead")
        p = world_cmd(env, "up", "--boot-delay", "0.5")
        assert p.returncode == 0, p.stderr
        assert "cleaned up after a previous world" in p.stderr, p.stderr
        with socket.socket() as s:
            s.settimeout(0.5)
            assert s.connect_ex((b2.ip, 22)) != 0  # the old body is gone
    finally:
        p = world_cmd(env, "down")
    assert p.returncode == 0, p.stderr
    assert _world_leftovers(sd, port, []) == []
    from bakeryworld.world import base_dir_for

    assert not base_dir_for(sd).exists()
    import shutil

    shutil.rmtree(sd, ignore_errors=True)
