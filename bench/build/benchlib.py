"""Helpers of scripts/bench-build: measurements that need boto3 or SSH, and the report.

Run with the world's virtualenv python (boto3) and the world's env file exported
(AWS_ENDPOINT_URL, WORLD_*). Every address used is inside 127.0.0.0/8.

    benchlib.py run TOOL I TIMEOUT LOG MANIFEST RUNS.jsonl -- COMMAND...
    benchlib.py check-recipes RECIPE PACKER_JSON
    benchlib.py prefix-clash STATE_DIR
    benchlib.py free-port
    benchlib.py inventory OUT.json
    benchlib.py settle [TIMEOUT_S]
    benchlib.py floor PAYLOAD SCRATCH OUT.json
    benchlib.py cleanup BASELINE.json
    benchlib.py leftovers BASELINE.json OUT.json
    benchlib.py report RUNS.jsonl FLOOR.json LEFTOVERS.json
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

BENCH_RE = re.compile(r"BENCH_CMD (\d+) (\d+\.\d+) (\d+\.\d+)")
N_COMMANDS = 5


def die(msg: str, code: int = 1):
    print(f"bench-build: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def endpoint() -> str:
    ep = os.environ.get("AWS_ENDPOINT_URL", "")
    host = ep.split("//", 1)[-1].split(":", 1)[0]
    if not host.startswith("127."):
        die(f"AWS_ENDPOINT_URL={ep!r} is not a loopback address; refusing to run")
    return ep


def ec2():
    import boto3
    from botocore.config import Config

    return boto3.client(
        "ec2",
        endpoint_url=endpoint(),
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        config=Config(retries={"mode": "standard", "max_attempts": 10}),
    )


def world_status() -> dict:
    with urllib.request.urlopen(f"{endpoint()}/_world/status", timeout=5) as r:
        return json.load(r)


# ------------------------------------------------------------------------------- checks
def check_recipes(recipe: str, packer: str) -> None:
    """Both tools must bake the same thing: same upload destination, same five commands."""
    r = tomllib.loads(Path(recipe).read_text())
    p = json.loads(Path(packer).read_text())
    r_prov = r.get("provisioner", [])
    p_prov = p.get("provisioners", [])
    r_shell = [x["inline"] for x in r_prov if x.get("type") == "shell"]
    p_shell = [x["inline"] for x in p_prov if x.get("type") == "shell"]
    r_file = [x["destination"] for x in r_prov if x.get("type") == "file"]
    p_file = [x["destination"] for x in p_prov if x.get("type") == "file"]
    if [x.get("type") for x in r_prov] != [x.get("type") for x in p_prov]:
        die(f"{recipe} and {packer} list different provisioners")
    if r_shell != p_shell or len(r_shell) != 1 or len(r_shell[0]) != N_COMMANDS:
        die(f"{recipe} and {packer} must run the same {N_COMMANDS} shell commands")
    if r_file != p_file:
        die(f"{recipe} and {packer} upload to different destinations: {r_file} vs {p_file}")


def prefix_clash(state_dir: str) -> int:
    """`scripts/world up` (after a crash) and `down` end every `bakeryworld.server` whose command
    line *contains* `--state-dir <our dir>`, so another world whose dir merely starts with ours
    (ours `.world-bench`, theirs `.world-benchr`) would be ended too. Lists such worlds; exit 1
    if there are any."""
    ours = str(Path(state_dir).resolve())
    clash = []
    for n in os.listdir("/proc"):
        if not n.isdigit():
            continue
        try:
            argv = Path(f"/proc/{n}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if not any("bakeryworld.server" in a for a in args) or "--state-dir" not in args:
            continue
        k = args.index("--state-dir")
        theirs = args[k + 1] if k + 1 < len(args) else ""
        if theirs != ours and theirs.startswith(ours):
            clash.append(f"pid {n}: --state-dir {theirs}")
    for c in clash:
        print(c)
    return 1 if clash else 0


def free_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


# ------------------------------------------------------------------------------- one run
def run(tool: str, i: int, timeout: float, log: str, manifest: str, runs: str, cmd: list[str]) -> int:
    """Runs one bake: wall time around the command only, every output line prefixed with the
    epoch time it was read (for Packer's phases), a timeout (SIGTERM, so the tool cleans up,
    then SIGKILL to its process group after 30 s), and SIGINT/SIGTERM forwarded the same way.
    Appends the result to RUNS as a JSON line."""
    import signal
    import threading

    stop = threading.Event()
    got_signal: list[int] = []

    def on_signal(signum, _frame):
        got_signal.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with open(log, "w") as out:
        t0 = time.time()
        p0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)

        def pump():
            for raw in iter(proc.stdout.readline, b""):
                out.write(f"{time.time():.6f} {raw.decode(errors='replace')}")
                out.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        deadline = p0 + timeout
        timed_out = False
        while proc.poll() is None:
            if stop.is_set() or time.perf_counter() > deadline:
                timed_out = not stop.is_set()
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30 if timed_out else 60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                break
            stop.wait(0.01)
        wall = time.perf_counter() - p0
        reader.join(timeout=5)
    rc = 124 if timed_out else proc.returncode
    err = ""
    if timed_out:
        err = f"timed out after {timeout:.0f}s"
    elif got_signal:
        err = "interrupted"
    elif rc != 0:
        err = f"exit {rc}"
    rec = {"tool": tool, "i": i, "ok": rc == 0 and not got_signal, "rc": rc, "error": err,
           "wall_s": round(wall, 4), "t0": t0, "log": log, "manifest": manifest}
    with open(runs, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"bench-build: run {i:2d} {tool:<6} {wall:7.2f}s {err or 'ok'}", file=sys.stderr, flush=True)
    if got_signal:
        return 130
    return 0 if rc == 0 else 1


# ------------------------------------------------------------------------------- inventory
def live_instances(c) -> list[str]:
    out = []
    for page in c.get_paginator("describe_instances").paginate():
        for res in page["Reservations"]:
            for i in res["Instances"]:
                if i["State"]["Name"] not in ("terminated", "shutting-down"):
                    out.append(i["InstanceId"])
    return out


def inventory() -> dict:
    c = ec2()
    return {
        "instances": live_instances(c),
        "key_pairs": [k["KeyName"] for k in c.describe_key_pairs()["KeyPairs"]],
        "security_groups": [
            g["GroupId"] for g in c.describe_security_groups()["SecurityGroups"]
        ],
        "images": [i["ImageId"] for i in c.describe_images(Owners=["self"])["Images"]],
    }


def settle(timeout: float) -> None:
    """Waits until the world has no live body (the previous bake's instance torn down), so a
    run does not share the CPU with the last one's teardown."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bodies = world_status().get("bodies", [])
        if all(b.get("state") in ("terminated", "stopped") for b in bodies):
            return
        time.sleep(0.1)


def cleanup(baseline: dict) -> None:
    """Deregisters the AMIs the benchmark made (and their snapshots): bench housekeeping."""
    c = ec2()
    known = set(baseline["images"])
    n = 0
    for img in c.describe_images(Owners=["self"])["Images"]:
        if img["ImageId"] in known or not img.get("Name", "").startswith("bench-"):
            continue
        c.deregister_image(ImageId=img["ImageId"])
        for bdm in img.get("BlockDeviceMappings", []):
            snap = bdm.get("Ebs", {}).get("SnapshotId")
            if snap:
                try:
                    c.delete_snapshot(SnapshotId=snap)
                except Exception:  # noqa: BLE001  (already gone)
                    pass
        n += 1
    print(f"bench-build: deregistered {n} benchmark AMI(s) and their snapshots", file=sys.stderr)


def leftovers(baseline: dict) -> dict:
    now = inventory()
    left = {
        k: sorted(set(now[k]) - set(baseline[k]))
        for k in ("instances", "key_pairs", "security_groups")
    }
    bodies = [b for b in world_status().get("bodies", []) if b.get("state") != "terminated"]
    left["bodies"] = [b.get("instance_id", "?") for b in bodies]
    return left


# ------------------------------------------------------------------------------- the floor
def ssh_base(key: Path, known: Path) -> list[str]:
    return [
        "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={known}",
        "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
    ]


def timed(cmd: list[str], **kw) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=60, **kw)
    return time.perf_counter() - t


def floor(payload: str, scratch: str) -> dict:
    """Measures, on one instance of our own: the 10 MiB upload at loopback speed over an open SSH
    connection (scp, which is SFTP in OpenSSH 9), and, for information, how long the world
    really takes to boot (RunInstances to sshd accepting) and to snapshot (CreateImage to
    `available`) when polled every 10 ms."""
    c = ec2()
    sd = Path(scratch) / "floor"
    sd.mkdir(parents=True, exist_ok=True)
    key, known, ctl = sd / "id_ed25519", sd / "known_hosts", sd / "ctl"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    name = f"bench-floor-{os.getpid()}"
    subnet = os.environ["WORLD_PRIVATE_SUBNETS"].split(",")[0]
    c.import_key_pair(KeyName=name, PublicKeyMaterial=(key.with_suffix(".pub")).read_bytes())
    iid = image = master = None
    out: dict = {}
    try:
        t0 = time.perf_counter()
        inst = c.run_instances(
            ImageId=os.environ["WORLD_BASE_AMI"], InstanceType="t3.micro", MinCount=1,
            MaxCount=1, SubnetId=subnet, KeyName=name,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]}],
        )["Instances"][0]
        iid, ip = inst["InstanceId"], inst["PrivateIpAddress"]
        if not ip.startswith("127."):
            die(f"instance {iid} got {ip}, not a loopback address")
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection((ip, 22), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    die(f"sshd on {ip} never came up")
                time.sleep(0.01)
        out["boot_s"] = time.perf_counter() - t0
        base = ssh_base(key, known)
        master = subprocess.Popen(
            ["ssh", *base, "-M", "-S", str(ctl), "-N", f"root@{ip}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while subprocess.run(["ssh", "-S", str(ctl), "-O", "check", f"root@{ip}"],
                             capture_output=True).returncode != 0:
            if master.poll() is not None or time.monotonic() > deadline:
                die(f"could not open an SSH connection to {ip} for the upload measurement")
            time.sleep(0.05)
        mux = ["-o", f"ControlPath={ctl}", "-o", "ControlMaster=no"]
        empty = sd / "empty"
        empty.write_bytes(b"")
        scp = ["scp", "-q", *base, *mux]
        size = os.path.getsize(payload)
        full = [timed([*scp, payload, f"root@{ip}:/tmp/p{i}"]) for i in range(5)]
        nil = [timed([*scp, str(empty), f"root@{ip}:/tmp/e{i}"]) for i in range(5)]
        # For information: one command over the open connection, and a whole new connection.
        exec_ = [timed(["ssh", *base, *mux, f"root@{ip}", "true"]) for _ in range(5)]
        conn = [timed(["ssh", *base, "-o", "ControlPath=none", f"root@{ip}", "true"]) for _ in range(3)]
        out.update(ssh_exec_s=statistics.median(exec_), ssh_connect_s=statistics.median(conn))
        # The body's root is an overlay of the host's `/`, so root's (and ec2-user's) bash sources
        # the host's /root/.bashrc on every SSH command. Measure `true` again with it emptied in
        # this throwaway instance (its overlay upper layer; the host's file is not touched).
        subprocess.run(["ssh", *base, *mux, f"root@{ip}", ": > /root/.bashrc"], check=True, timeout=60)
        lean = [timed(["ssh", *base, *mux, f"root@{ip}", "true"]) for _ in range(5)]
        out["ssh_exec_lean_s"] = statistics.median(lean)
        # The bake leaves the payload in /opt/bench: give this image the same content, so
        # CreateImage copies as much as in a bake.
        subprocess.run(["ssh", *base, *mux, f"root@{ip}",
                        "install -d /opt/bench && mv /tmp/p0 /opt/bench/payload && rm -f /tmp/p* /tmp/e*"],
                       check=True, timeout=60)
        out.update(
            payload_bytes=size,
            scp_payload_s=sorted(full),
            scp_empty_s=sorted(nil),
            upload_s=max(0.0, statistics.median(full) - statistics.median(nil)),
        )
        subprocess.run(["ssh", "-S", str(ctl), "-O", "exit", f"root@{ip}"], capture_output=True)
        master.wait(timeout=10)
        master = None
        c.stop_instances(InstanceIds=[iid])
        deadline = time.monotonic() + 60
        while c.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]["Name"] != "stopped":
            if time.monotonic() > deadline:
                die(f"{iid} did not stop")
            time.sleep(0.02)
        t0 = time.perf_counter()
        image = c.create_image(InstanceId=iid, Name=f"{name}-image", NoReboot=True)["ImageId"]
        while c.describe_images(ImageIds=[image])["Images"][0]["State"] != "available":
            if time.perf_counter() - t0 > 120:
                die(f"image {image} never became available")
            time.sleep(0.01)
        out["snapshot_s"] = time.perf_counter() - t0
        return out
    finally:
        if master is not None:
            master.terminate()
            master.wait(timeout=10)
        if image:
            img = c.describe_images(ImageIds=[image])["Images"]
            c.deregister_image(ImageId=image)
            for bdm in (img[0].get("BlockDeviceMappings", []) if img else []):
                if bdm.get("Ebs", {}).get("SnapshotId"):
                    c.delete_snapshot(SnapshotId=bdm["Ebs"]["SnapshotId"])
        if iid:
            c.terminate_instances(InstanceIds=[iid])
        c.delete_key_pair(KeyName=name)
        shutil.rmtree(sd, ignore_errors=True)


# ------------------------------------------------------------------------------- the report
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, w=7, unit="s"):
    return f"{x:{w}.2f}{unit}" if x is not None else f"{'-':>{w}}{' ' * len(unit)}"


def commands_time(log: str) -> tuple[float | None, float | None]:
    """(sum of the five commands' own durations, first start to last end), from the
    `BENCH_CMD n start end` lines the commands print on the instance."""
    seen: dict[int, tuple[float, float]] = {}
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return None, None
    for m in BENCH_RE.finditer(text):
        seen[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    if sorted(seen) != list(range(1, N_COMMANDS + 1)):
        return None, None
    own = sum(e - s for s, e in seen.values())
    span = max(e for _, e in seen.values()) - min(s for s, _ in seen.values())
    return own, span


def bench_cmds(log: str) -> dict[int, tuple[float, float]]:
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return {}
    return {int(m.group(1)): (float(m.group(2)), float(m.group(3))) for m in BENCH_RE.finditer(text)}


def epoch(rfc3339: str) -> float:
    """RFC 3339 with up to nanoseconds (bakery's manifest) to epoch seconds."""
    from datetime import datetime

    m = re.match(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", rfc3339)
    if not m:
        raise ValueError(rfc3339)
    base = datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    return base.timestamp() + float("0." + (m.group(2) or "0"))


def shell_split(r: dict) -> tuple[float, float, float] | None:
    """For a bakery run: (before the first command, between the commands, after the last),
    from the shell step's start/duration in the manifest and the commands' own timestamps."""
    cmds = bench_cmds(r["log"])
    step = next((s for s in r["manifest_data"]["steps"] if s["name"].startswith("provision: shell")), None)
    if step is None or sorted(cmds) != list(range(1, N_COMMANDS + 1)):
        return None
    start = epoch(step["started_at"])
    end = start + step["duration_s"]
    first = min(a for a, _ in cmds.values())
    last = max(b for _, b in cmds.values())
    own = sum(b - a for a, b in cmds.values())
    return first - start, (last - first) - own, end - last


# Packer's progress lines that start each phase, in order (as Packer 1.6.6 prints them).
PACKER_MARKS = [
    ("setup: AMI checks, key pair, security group", None),
    ("launch until Packer looks for SSH", "Launching a source AWS instance"),
    ("wait for SSH (retries every 5 s)", "Waiting for SSH to become available"),
    ("provisioners", "Connected to SSH!"),
    ("stop + CreateImage", "Stopping the source instance"),
    ("wait for the AMI (SDK waiter, 15 s delay)", "Waiting for AMI to become ready"),
    ("terminate, clean up, exit", "Terminating the source AWS instance"),
]


def packer_phases(r: dict) -> list[float] | None:
    try:
        lines = Path(r["log"]).read_text(errors="replace").splitlines()
    except OSError:
        return None
    at: dict[str, float] = {}
    for ln in lines:
        ts, _, msg = ln.partition(" ")
        for _, mark in PACKER_MARKS[1:]:
            if mark in msg and mark not in at:
                at[mark] = float(ts)
    marks = [r["t0"]] + [at.get(m) for _, m in PACKER_MARKS[1:]] + [r["t0"] + r["wall_s"]]
    if any(m is None for m in marks):
        return None
    return [b - a for a, b in zip(marks, marks[1:])]


def tail(path: str, n: int = 15) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("      " + ln for ln in lines[-n:])


def report(runs_path: str, floor_path: str, left_path: str) -> int:
    runs = [json.loads(ln) for ln in Path(runs_path).read_text().splitlines() if ln.strip()]
    fl = json.loads(Path(floor_path).read_text()) if Path(floor_path).exists() else {}
    left = json.loads(Path(left_path).read_text()) if Path(left_path).exists() else None
    boot = float(os.environ["WORLD_BOOT_DELAY"])
    snap = float(os.environ["WORLD_SNAPSHOT_DELAY"])
    for r in runs:
        r["own"], r["span"] = commands_time(r["log"]) if r["ok"] else (None, None)
        r["manifest_data"] = None
        if r["tool"] == "bakery" and r["ok"]:
            try:
                r["manifest_data"] = json.loads(Path(r["manifest"]).read_text())
            except (OSError, ValueError):
                r["ok"] = False
                r["error"] = f"no readable manifest at {r['manifest']}"
    bk = [r for r in runs if r["tool"] == "bakery"]
    pk = [r for r in runs if r["tool"] == "packer"]
    bk_ok = [r for r in bk if r["ok"]]
    pk_ok = [r for r in pk if r["ok"]]
    rc = 0

    print()
    print("== runs (wall time of the whole command, alternating) ==")
    print(f"  {'#':>2}  {'tool':<6}  {'wall':>8}  {'manifest':>8}  {'5 cmds':>8}  result")
    for r in runs:
        m = r["manifest_data"]
        res = "ok" if r["ok"] else f"FAILED ({r.get('error') or 'exit ' + str(r['rc'])})"
        print(f"  {r['i']:>2}  {r['tool']:<6}  {fmt(r['wall_s'])}  "
              f"{fmt(m['duration_s'] if m else None)}  {fmt(r['own'], unit='s')}  {res}")
    for r in runs:
        if not r["ok"]:
            print(f"\n  run {r['i']} ({r['tool']}) failed; last lines of {r['log']}:")
            print(tail(r["log"]))
            rc = 1

    bmed = med([r["wall_s"] for r in bk_ok])
    pmed = med([r["wall_s"] for r in pk_ok])
    own = med([r["own"] for r in bk_ok])
    own_pk = med([r["own"] for r in pk_ok])
    upload = fl.get("upload_s")

    print()
    print("== the floor (what no tool can avoid) ==")
    print(f"  boot delay (WORLD_BOOT_DELAY)          {fmt(boot)}")
    print(f"  snapshot delay (WORLD_SNAPSHOT_DELAY)  {fmt(snap)}")
    print(f"  the five commands' own time            {fmt(own)}   median over bakery runs, "
          f"timestamps taken on the instance (Packer runs: {fmt(own_pk).strip()})")
    if upload is not None:
        print(f"  10 MiB upload at loopback speed        {fmt(upload)}   median scp of the payload "
              f"{fmt(med(fl['scp_payload_s'])).strip()} minus median scp of an empty file "
              f"{fmt(med(fl['scp_empty_s'])).strip()}, over an open SSH connection")
    else:
        print("  10 MiB upload at loopback speed              -   (not measured; see above)")
    floor_s = None
    if own is not None and upload is not None:
        floor_s = boot + snap + own + upload
    print(f"  floor                                  {fmt(floor_s)}")
    if fl.get("boot_s") is not None:
        print("  for information, the world measured directly (not part of the floor above):")
        print(f"    RunInstances to sshd accepting (10 ms probes)   {fmt(fl['boot_s'])}   boot delay + the world's reconciler lag")
        print(f"    CreateImage to `available` (10 ms polls)        {fmt(fl['snapshot_s'])}")
        print(f"    OpenSSH: new connection + `true`                {fmt(fl['ssh_connect_s'])}")
        print(f"    OpenSSH: `true` over an open connection         {fmt(fl['ssh_exec_s'])}")
        if fl.get("ssh_exec_lean_s") is not None:
            print(f"      the same with the body's /root/.bashrc emptied {fmt(fl['ssh_exec_lean_s'])}   "
                  "(bodies overlay the host's /, so every SSH command's bash sources the host's /root/.bashrc)")

    if bk_ok:
        print()
        print("== bakery's steps (manifest; median over runs) ==")
        names: list[str] = []
        for r in bk_ok:
            for s in r["manifest_data"]["steps"]:
                if s["name"] not in names:
                    names.append(s["name"])
        floor_of = {
            "connect": ("boot delay", boot),
            "create_image": ("snapshot delay", snap),
            "provision: file 1": ("upload", upload),
            "provision: shell 2": ("5 commands", own),
        }
        print(f"  {'step':<22}  {'median':>8}  {'floor part':>22}  {'excess':>8}")
        total_excess = 0.0
        for n in names:
            vals = [next((s["duration_s"] for s in r["manifest_data"]["steps"] if s["name"] == n), None)
                    for r in bk_ok]
            m = med(vals)
            label, part = floor_of.get(n, ("", 0.0))
            part_txt = f"{label} {part:.2f}s" if label and part is not None else ""
            excess = m - part if (m is not None and part is not None) else None
            total_excess += excess or 0.0
            print(f"  {n:<22}  {fmt(m)}  {part_txt:>22}  {fmt(excess)}")
        gaps = med([r["manifest_data"]["duration_s"] - sum(s["duration_s"] for s in r["manifest_data"]["steps"])
                    for r in bk_ok])
        proc = med([r["wall_s"] - r["manifest_data"]["duration_s"] for r in bk_ok])
        print(f"  {'(between steps)':<22}  {fmt(gaps)}  {'':>22}  {fmt(gaps)}")
        print(f"  {'(process start/exit)':<22}  {fmt(proc)}  {'':>22}  {fmt(proc)}")
        print(f"  {'sum of the medians':<22}  {'':>8}  {'':>22}  {fmt(total_excess + (gaps or 0) + (proc or 0))}")
        splits = [x for x in (shell_split(r) for r in bk_ok) if x]
        if splits:
            print(f"  shell step around its commands (medians): before the first {med([x[0] for x in splits]):.3f} s "
                  f"(script upload + exec start), between them {med([x[1] for x in splits]):.3f} s, "
                  f"after the last {med([x[2] for x in splits]):.3f} s")

    phases = [x for x in (packer_phases(r) for r in pk_ok) if x]
    if phases:
        print()
        print("== Packer's phases (from its progress lines; median over runs) ==")
        for k, (label, _) in enumerate(PACKER_MARKS):
            print(f"  {label:<44}  {fmt(med([p[k] for p in phases]))}")

    print()
    print("== result ==")
    print(f"  bakery median  {fmt(bmed)}   ({len(bk_ok)} of {len(bk)} runs ok)")
    if pk_ok:
        print(f"  packer median  {fmt(pmed)}   ({len(pk_ok)} of {len(pk)} runs ok)")
    else:
        print("  packer median        -    (Packer made no successful bake; see above)")
    ratio = bmed / pmed if (bmed and pmed) else None
    overhead = bmed - floor_s if (bmed is not None and floor_s is not None) else None
    print(f"  ratio bakery/packer  {ratio:.3f}" if ratio is not None else "  ratio bakery/packer      -")
    print(f"  bakery's overhead over the floor  {fmt(overhead)}   (bakery median - floor)")
    t1 = "PASS" if ratio is not None and ratio <= 0.5 else ("MISS" if ratio is not None else "n/a ")
    t2 = "PASS" if overhead is not None and overhead < 0.5 else ("MISS" if overhead is not None else "n/a ")
    if fl.get("boot_s") is not None and own is not None and upload is not None and bmed is not None:
        bashrc = max(0.0, fl.get("ssh_exec_s", 0.0) - fl.get("ssh_exec_lean_s", fl.get("ssh_exec_s", 0.0)))
        practical = fl["boot_s"] + fl["snapshot_s"] + own + upload + bashrc
        print(f"  (informational: over the world as measured instead - boot {fl['boot_s']:.2f} + snapshot "
              f"{fl['snapshot_s']:.2f} + commands + upload + one SSH command's .bashrc {bashrc:.2f} "
              f"= {practical:.2f} s - bakery's overhead is {bmed - practical:.2f} s)")
    print(f"  [{t1}] bakery's median at most half of Packer's"
          + (f" ({bmed:.2f} s vs {pmed / 2:.2f} s)" if ratio is not None else ""))
    print(f"  [{t2}] bakery's overhead over the floor under 0.5 s"
          + (f" ({overhead:.2f} s)" if overhead is not None else ""))

    print()
    print("== leftovers after all runs (boto3 against the world) ==")
    if left is None:
        print("  not checked")
        rc = 1
    else:
        n = sum(len(v) for v in left.values())
        for k in ("instances", "key_pairs", "security_groups", "bodies"):
            label = {"instances": "instances not terminated", "key_pairs": "key pairs",
                     "security_groups": "security groups", "bodies": "live bodies"}[k]
            print(f"  {label:<26} {len(left[k])}" + (f"  {', '.join(left[k])}" if left[k] else ""))
        print(f"  leftovers: {n}")
        if n:
            rc = 1
    return rc


def main(argv: list[str]) -> int:
    if not argv:
        die(__doc__.strip(), 2)
    cmd, args = argv[0], argv[1:]
    if cmd == "run":
        if "--" not in args or args.index("--") != 6:
            die("usage: run TOOL I TIMEOUT LOG MANIFEST RUNS -- COMMAND...", 2)
        tool, i, timeout, log, manifest, runs = args[:6]
        return run(tool, int(i), float(timeout), log, manifest, runs, args[7:])
    if cmd == "check-recipes":
        check_recipes(*args)
    elif cmd == "prefix-clash":
        return prefix_clash(args[0])
    elif cmd == "free-port":
        free_port()
    elif cmd == "inventory":
        Path(args[0]).write_text(json.dumps(inventory()))
    elif cmd == "settle":
        settle(float(args[0]) if args else 15.0)
    elif cmd == "floor":
        Path(args[2]).write_text(json.dumps(floor(args[0], args[1])))
    elif cmd == "cleanup":
        cleanup(json.loads(Path(args[0]).read_text()))
    elif cmd == "leftovers":
        Path(args[1]).write_text(json.dumps(leftovers(json.loads(Path(args[0]).read_text()))))
    elif cmd == "report":
        return report(*args)
    else:
        die(f"unknown command {cmd!r}", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
