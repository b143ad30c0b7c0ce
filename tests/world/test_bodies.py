"""Bodies: SSH, host keys, isolation, images, services, user data, status checks, stop."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
import uuid

from conftest import body_pids, wait_for


def test_ssh_login_as_root_and_ec2_user_with_console_host_key(world, ec2, launch):
    box = launch()
    assert box.ip.startswith("127."), box.ip
    inst = ec2.describe_instances(InstanceIds=[box.id])["Reservations"][0]["Instances"][0]
    assert "PublicIpAddress" not in inst  # world VPCs hand out no public IPs
    took = box.wait_ssh()
    assert took < float(world.env["WORLD_BOOT_DELAY"]) + 10, took
    out = box.console
    assert "-----BEGIN SSH HOST KEY FINGERPRINTS-----" in out
    fp_line = out.split("-----BEGIN SSH HOST KEY FINGERPRINTS-----\n")[1].split("\n")[0]
    # the fingerprint printed is the fingerprint of the key printed, and of the key sshd serves
    key_line = box.known_hosts.read_text().split(" ", 1)[1]
    calc = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=key_line, capture_output=True, text=True, check=True).stdout
    assert fp_line.split()[1] == calc.split()[1]
    assert fp_line.endswith("(ED25519)") and f"root@ip-{box.ip.replace('.', '-')}" in fp_line
    scan = subprocess.run(["ssh-keyscan", "-T", "5", "-t", "ed25519", box.ip], capture_output=True, text=True).stdout
    assert key_line.split()[1] in scan
    # StrictHostKeyChecking=yes with a known_hosts built from the console output
    assert box.ssh("id -u; echo $BAKERY_WORLD_IP").stdout.split() == ["0", box.ip]
    assert box.ssh("id -u", user="ec2-user").stdout.strip() == "0"
    # SFTP works too (internal-sftp inside the chroot)
    src = box.keypair["dir"] / "sftp-probe.txt"
    src.write_text("sftp ok\n")
    p = subprocess.run(["scp", "-s", "-i", box.keypair["path"], "-o", f"UserKnownHostsFile={box.known_hosts}",
                        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", str(src),
                        f"ec2-user@{box.ip}:/root/sftp-probe.txt"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert box.ssh("cat /root/sftp-probe.txt").stdout == "sftp ok\n"


def test_status_check_initializing_then_ok(world, ec2, launch):
    box = launch()
    first = box.status_check()
    assert first == "initializing", first
    box.wait_ssh()
    assert box.status_check() == "ok"


def test_writes_in_a_body_do_not_touch_the_host(launch):
    box = launch()
    name = f"/etc/bakery-world-probe-{uuid.uuid4().hex[:8]}"
    box.ssh(f"echo inside > {name} && rm -f /etc/hostname.bak-probe && cat {name}")
    assert box.ssh(f"cat {name}").stdout == "inside\n"
    assert not os.path.exists(name)
    # and a delete inside the body does not delete on the host
    box.ssh("rm /etc/os-release")
    assert os.path.exists("/etc/os-release")


SERVICE = """[Unit]
Description=probe app
[Service]
Environment="PROBE_WORD=hello world" OTHER=1
ExecStart=/usr/bin/python3 -m http.server --bind ${BAKERY_WORLD_IP} 18080 --directory /opt/probe
[Install]
WantedBy=multi-user.target
"""


def http_get(url: str, timeout: float = 2.0) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        return r.read().decode()


def test_create_image_captures_the_upper_layer_and_services_run(world, ec2, launch):
    src = launch()
    token = uuid.uuid4().hex
    src.ssh(
        "mkdir -p /opt/probe /etc/systemd/system/multi-user.target.wants && "
        f"echo {token} > /opt/probe/token.txt && "
        f"cat > /etc/systemd/system/probe.service <<'EOF'\n{SERVICE}EOF\n"
        "ln -sf /etc/systemd/system/probe.service /etc/systemd/system/multi-user.target.wants/probe.service"
    )
    ami = ec2.create_image(InstanceId=src.id, Name=f"probe-{token[:8]}")["ImageId"]
    img = ec2.describe_images(ImageIds=[ami])["Images"][0]
    assert img["State"] == "pending"
    t0 = time.time()
    wait_for(lambda: ec2.describe_images(ImageIds=[ami])["Images"][0]["State"] == "available",
             timeout=30, what="image available")
    assert time.time() - t0 > float(world.env["WORLD_SNAPSHOT_DELAY"]) - 1.0

    baked = launch(image_id=ami, subnet=1)
    base = launch()
    baked.wait_ssh()
    base.wait_ssh()
    assert baked.ssh("cat /opt/probe/token.txt").stdout.strip() == token
    assert base.ssh("test -e /opt/probe/token.txt", check=False).returncode != 0
    # the enabled service runs on its own IP with its unit's environment
    body = wait_for(lambda: http_get(f"http://{baked.ip}:18080/token.txt"), timeout=10, what="service")
    assert body.strip() == token
    env = baked.ssh(f"cat /proc/$(pgrep -f 'http.server --bind {baked.ip}' | head -1)/environ | tr '\\0' '\\n'").stdout
    assert "PROBE_WORD=hello world" in env and f"BAKERY_WORLD_IP={baked.ip}" in env
    # the base instance runs no such service, and the host's own enabled units never run
    try:
        http_get(f"http://{base.ip}:18080/", timeout=0.5)
        raise AssertionError("base image must not run the probe service")
    except OSError:
        pass
    st = world.control("GET", f"/_world/instances/{base.id}")[1]["body"]
    assert st["services"] == {}, st
    # the source instance rebooted around the capture (no NoReboot) and is back
    src.wait_ssh()


def test_user_data_runs_once_at_first_boot(launch, ec2):
    ud = "#!/bin/bash\necho \"ran on $BAKERY_WORLD_IP\" >> /root/user-data-ran.txt\n"
    box = launch(user_data=ud)
    box.wait_ssh()
    out = wait_for(lambda: box.ssh("cat /root/user-data-ran.txt", check=False).stdout, timeout=10, what="user data")
    assert out == f"ran on {box.ip}\n"
    # stop/start: the body comes back (upper layer kept) and user data does not run again
    ec2.stop_instances(InstanceIds=[box.id])
    wait_for(lambda: box.state() == "stopped", what="stopped")
    ec2.start_instances(InstanceIds=[box.id])
    box.wait_ssh()
    assert box.ssh("cat /root/user-data-ran.txt").stdout == f"ran on {box.ip}\n"


def test_stop_kills_every_process_of_the_body(world, ec2, launch):
    box = launch()
    box.wait_ssh()
    box.ssh("setsid nohup sleep 777 >/dev/null 2>&1 < /dev/null & echo started")
    pids = wait_for(lambda: body_pids(world.dir, box.id), what="body processes")
    assert pids
    ec2.stop_instances(InstanceIds=[box.id])
    wait_for(lambda: box.state() == "stopped", what="stopped")
    wait_for(lambda: not body_pids(world.dir, box.id), timeout=10, what="body processes gone")
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"
    st = subprocess.run(["ssh", *box.ssh_args()[1:], "true"], capture_output=True, timeout=15)
    assert st.returncode != 0  # no sshd while stopped


def test_kill_keeps_the_instance_and_crash_impairs_it(world, ec2, launch):
    box = launch()
    box.wait_ssh()
    box.ssh("setsid nohup sleep 888 >/dev/null 2>&1 < /dev/null &")
    wait_for(lambda: body_pids(world.dir, box.id), what="app process")
    p = world.cli("kill", box.id)
    assert p.returncode == 0, p.stderr
    assert box.status_check() == "ok"
    assert box.ssh("pgrep -f 'slee[p] 888'", check=False).returncode != 0  # the app died, sshd lives
    p = world.cli("crash", box.id)
    assert p.returncode == 0, p.stderr
    assert box.status_check() == "impaired"
    st = ec2.describe_instance_status(InstanceIds=[box.id])["InstanceStatuses"][0]
    assert st["InstanceStatus"]["Details"][0]["Status"] == "failed"
    assert st["SystemStatus"]["Status"] == "ok"
    # Filtered on the status, as a fleet's health check asks: the impaired one, not the others
    # (moto answered every instance whatever the filter).
    other = launch()
    other.wait_ssh()
    impaired = ec2.describe_instance_status(
        Filters=[{"Name": "instance-status.status", "Values": ["impaired"]}])["InstanceStatuses"]
    assert box.id in [s["InstanceId"] for s in impaired] and other.id not in [s["InstanceId"] for s in impaired]
    assert {s["InstanceStatus"]["Status"] for s in impaired} == {"impaired"}
    failed = ec2.describe_instance_status(
        Filters=[{"Name": "instance-status.reachability", "Values": ["failed"]}])["InstanceStatuses"]
    assert box.id in [s["InstanceId"] for s in failed] and other.id not in [s["InstanceId"] for s in failed]
    ok = ec2.describe_instance_status(
        InstanceIds=[box.id, other.id], Filters=[{"Name": "instance-status.status", "Values": ["ok"]}]
    )["InstanceStatuses"]
    assert [s["InstanceId"] for s in ok] == [other.id]
    assert not ec2.describe_instance_status(
        InstanceIds=[box.id, other.id],
        Filters=[{"Name": "system-status.status", "Values": ["impaired"]}])["InstanceStatuses"]
    assert box.state() == "running"
    assert not body_pids(world.dir, box.id)
    # a reboot brings the body back
    ec2.reboot_instances(InstanceIds=[box.id])
    wait_for(lambda: box.status_check() == "ok", timeout=20, what="ok after reboot")
    box.wait_ssh()


def test_create_image_does_not_stall_other_calls(world, ec2, launch):
    """The capture (halt + layer copy) runs with the moto lock released: other calls are
    served while CreateImage waits for it."""
    import threading

    box = launch()
    box.wait_ssh()
    # A process that ignores SIGTERM keeps the halt waiting for its full grace period (1.5 s).
    box.ssh("setsid nohup sh -c 'trap \"\" TERM; while :; do sleep 1; done' >/dev/null 2>&1 < /dev/null & echo ok")
    other = world.client("ec2")
    done: list[tuple[float, float]] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            t = time.time()
            other.describe_vpcs()
            done.append((t, time.time()))

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        time.sleep(0.3)
        t0 = time.time()
        ec2.create_image(InstanceId=box.id, Name=f"stall-{uuid.uuid4().hex[:8]}")
        t1 = time.time()
    finally:
        stop.set()
        th.join(10)
    assert t1 - t0 >= 1.0, f"CreateImage took {t1 - t0:.2f}s: the halt did not wait for the TERM-ignoring process"
    inside = [d for d in done if d[0] >= t0 and d[1] <= t1]
    assert len(inside) >= 3, f"only {len(inside)} DescribeVpcs served during a {t1 - t0:.2f}s CreateImage"
