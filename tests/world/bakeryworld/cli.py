"""`scripts/world` commands: up, down, status, kill, crash, faults, calls, env.

State: WORLD_DIR (default <repo>/.world) holds server.pid, server.json, server.log, the env
file, per-body logs/keys; bodies' mount points live under /var/lib/bakery-world/<hash>/.
Port: --port, else WORLD_PORT, else 5599.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .netutil import control, port_in_use
from .world import base_dir_for

REPO = Path(os.environ.get("BAKERY_REPO") or Path(__file__).resolve().parents[3])
REGION = "us-east-1"
SUBNETS = [  # (role, third octet, az); the VPC is 127.<N>.0.0/16, N chosen per world
    ("public", 0, "us-east-1a"),
    ("public", 1, "us-east-1b"),
    ("private", 10, "us-east-1a"),
    ("private", 11, "us-east-1b"),
]
TAG = "bakery-world"


class WorldError(Exception):
    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


def err(msg: str) -> None:
    print(f"world: {msg}", file=sys.stderr, flush=True)


def state_dir() -> Path:
    return Path(os.environ.get("WORLD_DIR") or REPO / ".world").resolve()


def default_port() -> int:
    try:
        return int(os.environ.get("WORLD_PORT") or 5599)
    except ValueError:
        raise WorldError(f"WORLD_PORT must be a port number, got {os.environ.get('WORLD_PORT')!r}", 2)


# ----------------------------------------------------------------------------- processes
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def state_dir_arg(pid: int) -> str | None:
    """The exact `--state-dir` argument of a world server (not a substring: `.world-bench`
    must not match `.world-benchr`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    for i, a in enumerate(argv[:-1]):
        if a == b"--state-dir":
            return argv[i + 1].decode(errors="replace")
    return None


def server_pid(sd: Path) -> int | None:
    for name in ("server.json", "server.pid"):
        p = sd / name
        try:
            txt = p.read_text().strip()
            pid = json.loads(txt)["pid"] if name.endswith(".json") else int(txt)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pid_alive(pid) and "bakeryworld.server" in cmdline(pid) and str(sd) in cmdline(pid):
            return pid
    return None


def running(sd: Path) -> dict | None:
    """The running world's server.json, if its server is alive and answering."""
    pid = server_pid(sd)
    if pid is None:
        return None
    try:
        info = json.loads((sd / "server.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        code, st = control(info["port"], "GET", "/_world/status", timeout=5)
    except OSError:
        return None
    if code != 200 or st.get("settings", {}).get("state_dir") != str(sd):
        return None
    info["status"] = st
    return info


def require_running(sd: Path) -> dict:
    info = running(sd)
    if info is None:
        raise WorldError(f"no world is running for WORLD_DIR={sd}; start one with scripts/world up", 1)
    return info


def procs_of_world(sd: Path) -> list[int]:
    """Processes the world made: anything rooted in a body, the body sshds, the server."""
    base = str(base_dir_for(sd))
    out = []
    me = os.getpid()
    for n in os.listdir("/proc"):
        if not n.isdigit() or int(n) == me:
            continue
        pid = int(n)
        try:
            root = os.readlink(f"/proc/{pid}/root")
        except OSError:
            continue
        cl = cmdline(pid)
        if root.startswith(base + "/") or f"{sd}/bodies/" in cl or (
            "bakeryworld.server" in cl and state_dir_arg(pid) == str(sd)
        ):
            out.append(pid)
    return out


def host_mounts_under(path: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp == path or mp.startswith(path + "/"):
                out.append(mp)
    return sorted(out, key=lambda m: m.count("/"), reverse=True)


def cleanup(sd: Path, quiet: bool = False) -> list[str]:
    """End every process and mount a (possibly crashed) world of this state dir left."""
    done = []
    base = base_dir_for(sd)
    for attempt in range(40):
        pids = procs_of_world(sd)
        if not pids:
            break
        signal_ = signal.SIGTERM if attempt == 0 else signal.SIGKILL
        for pid in pids:
            try:
                os.kill(pid, signal_)
                if attempt == 0:
                    done.append(f"ended pid {pid} ({cmdline(pid)[:80].strip()})")
            except ProcessLookupError:
                pass
        time.sleep(0.25 if attempt == 0 else 0.1)
    for mp in host_mounts_under(str(base)) + host_mounts_under(str(sd / "images")):
        subprocess.run(["umount", "-l", mp], capture_output=True)
        done.append(f"unmounted {mp}")
    if (base / "bodies").is_dir():
        for d in (base / "bodies").iterdir():
            shutil.rmtree(d, ignore_errors=True)
            done.append(f"removed {d}")
    if base.is_dir() and not host_mounts_under(str(base)) and not procs_of_world(sd):
        shutil.rmtree(base, ignore_errors=True)  # bodies' mount points, etc/, world.json
    for name in ("server.json", "server.pid", "env"):
        try:
            (sd / name).unlink()
        except FileNotFoundError:
            pass
    if not quiet:
        for line in done:
            err(line)
    return done


# ----------------------------------------------------------------------------- network
def boto_client(service: str, port: int, region: str = REGION, credentials: dict | None = None):
    import boto3
    from botocore.config import Config

    creds = credentials or {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    return boto3.client(
        service,
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name=region,
        config=Config(retries={"mode": "standard", "max_attempts": 10}),
        **creds,
    )


def _tags(name: str, role: str) -> list[dict]:
    return [{"Key": "Name", "Value": name}, {"Key": TAG, "Value": role}]


def _loopback_listener_octets() -> set[int]:
    out = set()
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] != "0A":
                    continue
                ip_hex = parts[1].split(":")[0]
                b = bytes.fromhex(ip_hex)[::-1]  # little-endian on x86
                if b[0] == 127:
                    out.add(b[1])
    except OSError:
        pass
    return out


def choose_octet(sd: Path, exclude: set[int] = frozenset(), preferred: int | None = None) -> int:
    """Second octet N of this world's VPC 127.N.0.0/16, unique among the worlds running on
    this machine (bodies of two worlds must never share an address). regions.py asks for more
    ranges (other regions, the second account): `exclude` those this world holds already,
    starting from `preferred`."""
    base = base_dir_for(sd)
    taken = {0} | _loopback_listener_octets() | set(exclude)
    root = base.parent
    if root.is_dir():
        for d in root.iterdir():
            if d == base:
                continue
            try:
                claim = json.loads((d / "world.json").read_text())
            except (OSError, ValueError):
                continue
            if server_pid(Path(claim["state_dir"])) is not None:
                taken.add(int(claim["octet"]))
                taken.update(int(o) for o in claim.get("octets", []))  # other regions (regions.py)
    if preferred is None:
        preferred = 10 if sd == (REPO / ".world").resolve() else 16 + int(base.name, 16) % 200
    for i in range(240):
        n = 10 + (preferred - 10 + i) % 240
        if n not in taken:
            return n
    raise WorldError("no free 127.N.0.0/16 range for another world's VPC")


def ensure_network(port: int, sd: Path, region: str = REGION, ec2=None, new_octet=None) -> dict:
    """The base network of one region (default: the home region, whose range is claimed here).
    regions.py passes another region's client and `new_octet()`, which claims a free range."""
    ec2 = ec2 or boto_client("ec2", port)
    vpcs = ec2.describe_vpcs(Filters=[{"Name": f"tag:{TAG}", "Values": ["base"]}])["Vpcs"]
    if vpcs:
        vpc_id = vpcs[0]["VpcId"]
        octet = int(vpcs[0]["CidrBlock"].split(".")[1])
    else:
        if new_octet is not None:
            octet = new_octet()
        else:
            octet = choose_octet(sd)
            base = base_dir_for(sd)
            base.mkdir(parents=True, exist_ok=True)
            (base / "world.json").write_text(json.dumps({"state_dir": str(sd), "octet": octet, "port": port}))
        vpc_id = ec2.create_vpc(
            CidrBlock=f"127.{octet}.0.0/16",
            TagSpecifications=[{"ResourceType": "vpc", "Tags": _tags("bakery-world", "base")}],
        )["Vpc"]["VpcId"]
        ec2.modify_vpc_attribute(VpcId=vpc_id, EnableDnsHostnames={"Value": True})
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]
    by_cidr = {s["CidrBlock"]: s["SubnetId"] for s in subnets}
    ids: dict[str, list[str]] = {"public": [], "private": []}
    for role, third, az in SUBNETS:
        az = region + az[-1]  # the same zone letters in every region
        cidr = f"127.{octet}.{third}.0/24"
        sid = by_cidr.get(cidr)
        if sid is None:
            sid = ec2.create_subnet(
                VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=az,
                TagSpecifications=[{"ResourceType": "subnet", "Tags": _tags(f"bakery-world-{role}-{az[-1]}", role)}],
            )["Subnet"]["SubnetId"]
            ec2.modify_subnet_attribute(SubnetId=sid, MapPublicIpOnLaunch={"Value": False})
        ids[role].append(sid)
    # Internet gateway, NAT gateway, route tables (once).
    igws = ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [vpc_id]}])["InternetGateways"]
    if not igws:
        igw = ec2.create_internet_gateway(
            TagSpecifications=[{"ResourceType": "internet-gateway", "Tags": _tags("bakery-world-igw", "igw")}]
        )["InternetGateway"]["InternetGatewayId"]
        ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc_id)
        pub_rt = ec2.create_route_table(
            VpcId=vpc_id, TagSpecifications=[{"ResourceType": "route-table", "Tags": _tags("bakery-world-public", "public")}]
        )["RouteTable"]["RouteTableId"]
        ec2.create_route(RouteTableId=pub_rt, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
        for sid in ids["public"]:
            ec2.associate_route_table(RouteTableId=pub_rt, SubnetId=sid)
        eip = ec2.allocate_address(Domain="vpc")["AllocationId"]
        nat = ec2.create_nat_gateway(
            SubnetId=ids["public"][0], AllocationId=eip,
            TagSpecifications=[{"ResourceType": "natgateway", "Tags": _tags("bakery-world-nat", "nat")}],
        )["NatGateway"]["NatGatewayId"]
        priv_rt = ec2.create_route_table(
            VpcId=vpc_id, TagSpecifications=[{"ResourceType": "route-table", "Tags": _tags("bakery-world-private", "private")}]
        )["RouteTable"]["RouteTableId"]
        ec2.create_route(RouteTableId=priv_rt, DestinationCidrBlock="0.0.0.0/0", NatGatewayId=nat)
        for sid in ids["private"]:
            ec2.associate_route_table(RouteTableId=priv_rt, SubnetId=sid)
    return {"vpc": vpc_id, "cidr": f"127.{octet}.0.0/16", "public": ids["public"], "private": ids["private"], "base_ami": pick_base_ami(ec2)}


def pick_base_ami(ec2) -> str:
    for pattern in ("amzn2-ami-hvm-*", "al2023-ami-*", "amzn-ami-hvm-*"):
        imgs = ec2.describe_images(
            Owners=["amazon"],
            Filters=[{"Name": "name", "Values": [pattern]}, {"Name": "state", "Values": ["available"]}],
        )["Images"]
        imgs = [i for i in imgs if i.get("Architecture", "x86_64") == "x86_64" and i.get("Platform") != "windows"]
        if imgs:
            imgs.sort(key=lambda i: (i.get("CreationDate", ""), i["ImageId"]), reverse=True)
            return imgs[0]["ImageId"]
    raise WorldError("no built-in Amazon Linux AMI found in moto's image list")


# ----------------------------------------------------------------------------- env file
def read_env(path: Path) -> dict[str, str]:
    out = {}
    try:
        for line in path.read_text().splitlines():
            m = re.match(r"^export ([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
            if m:
                vals = shlex.split(m.group(2))
                out[m.group(1)] = vals[0] if vals else ""
    except OSError:
        pass
    return out


def write_env(path: Path, env: dict[str, str]) -> str:
    text = "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in env.items())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


# ----------------------------------------------------------------------------- commands
def launch_server(sd: Path, port: int, args) -> int:
    log = open(sd / "server.log", "ab")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + (
        ":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.pop("BAKERY_WORLD_NS", None)
    cmd = [
        sys.executable, "-m", "bakeryworld.server", "--state-dir", str(sd), "--port", str(port),
        "--boot-delay", str(args.boot_delay), "--snapshot-delay", str(args.snapshot_delay),
        "--seed", str(args.seed),
        "--interrupt-factor", str(args.interrupt_factor), "--table-delay", str(args.table_delay),
    ]
    cmd += ["--metric-period", str(getattr(args, "metric_period", 10.0))]  # cloudwatch.py
    cmd += ["--copy-delay", str(getattr(args, "copy_delay", 0.2))]  # amis.py: CopyImage s/GiB
    p = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        start_new_session=True, close_fds=True, cwd=str(sd),
    )
    log.close()
    (sd / "server.pid").write_text(str(p.pid))
    deadline = time.time() + 90
    while time.time() < deadline:
        rc = p.poll()
        if rc is not None:
            tail = (sd / "server.log").read_text(errors="replace")[-2000:]
            code = 2 if rc == 3 else 1
            msg = next((ln for ln in tail.splitlines() if "already in use" in ln), None)
            raise WorldError(msg.removeprefix("world: ") if msg else f"world server exited ({rc}); log tail:\n{tail}", code)
        try:
            code, st = control(port, "GET", "/_world/status", timeout=2)
            if code == 200 and st.get("pid") == p.pid:
                return p.pid
        except OSError:
            pass
        time.sleep(0.1)
    raise WorldError(f"world server did not answer on 127.0.0.1:{port} within 90 s (see {sd}/server.log)")


def cmd_up(args) -> int:
    t0 = time.time()
    from . import regions as _regions

    try:
        regions = _regions.parse_regions(getattr(args, "regions", None))
    except ValueError as e:
        raise WorldError(str(e), 2)
    sd = state_dir()
    sd.mkdir(parents=True, exist_ok=True)
    info = running(sd)
    warm = info is not None
    if warm:
        port = info["port"]
        st = info["status"]["settings"]
        if args.port and args.port != port:
            err(f"note: world already running on port {port}; --port {args.port} ignored")
        for flag, key in (("boot_delay", "boot_delay"), ("snapshot_delay", "snapshot_delay")):
            if getattr(args, flag + "_given") and float(getattr(args, flag)) != float(st[key]):
                err(f"note: running world has {key}={st[key]}; run down first to change it")
        boot_delay, snapshot_delay = st["boot_delay"], st["snapshot_delay"]
    else:
        stale = cleanup(sd, quiet=True)
        if stale:
            err(f"cleaned up after a previous world ({len(stale)} item(s)):")
            for line in stale:
                err("  " + line)
        shutil.rmtree(sd / "bodies", ignore_errors=True)
        port = args.port or default_port()
        msg = port_in_use("127.0.0.1", port)
        if msg:
            raise WorldError(msg, 2)
        launch_server(sd, port, args)
        boot_delay, snapshot_delay = args.boot_delay, args.snapshot_delay
    net = ensure_network(port, sd)
    old = read_env(sd / "env") if warm else {}
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "WORLD_DIR": str(sd),
        "WORLD_PORT": str(port),
        "WORLD_VPC_ID": net["vpc"],
        "WORLD_VPC_CIDR": net["cidr"],
        "WORLD_PUBLIC_SUBNETS": ",".join(net["public"]),
        "WORLD_PRIVATE_SUBNETS": ",".join(net["private"]),
        "WORLD_BASE_AMI": net["base_ami"],
        "WORLD_BOOT_DELAY": str(boot_delay),
        "WORLD_SNAPSHOT_DELAY": str(snapshot_delay),
    }
    # Scale-out world (events.py, patches_dynamodb.py): the EC2 events queue and its rule.
    from . import events as _events

    env.update(_events.ensure_route(env["AWS_ENDPOINT_URL"], REGION))
    ist = info["status"].get("interrupts", {}) if warm else {}
    env["WORLD_INTERRUPT_FACTOR"] = str(ist.get("interrupt_factor", args.interrupt_factor))
    env["WORLD_TABLE_DELAY"] = str(info["status"].get("table_delay", args.table_delay) if warm else args.table_delay)
    cw = info["status"].get("cloudwatch", {}) if warm else {}
    env["WORLD_METRIC_PERIOD"] = str(cw.get("metric_period", args.metric_period))
    # Regions and the second account (regions.py): WORLD_REGIONS, each Region's ids, KMS keys.
    env.update(_regions.ensure(sys.modules[__name__], port, sd, regions))
    copy_delay = info["status"]["settings"].get("copy_delay", args.copy_delay) if warm else args.copy_delay
    if warm and args.copy_delay_given and float(args.copy_delay) != float(copy_delay):
        err(f"note: running world has copy_delay={copy_delay}; run down first to change it")
    env["WORLD_COPY_DELAY"] = str(copy_delay)
    for k, v in old.items():  # keep what --stack added earlier
        env.setdefault(k, v)
    # --groups N | R=N,...: a warm stack with fewer groups or Regions gets the missing ones
    # (stack.py is idempotent); --regions given: N groups in each of them (regions.stack_plan).
    if args.stack:
        try:
            build, stack_counts = _regions.stack_plan(
                _regions.parse_groups(args.groups), regions if args.regions else None, regions, env)
        except ValueError as e:
            raise WorldError(str(e), 2)
    if args.stack and build:
        write_env(sd / "env", env)
        try:
            from . import stack  # noqa: F401  (written by part 2)
        except ModuleNotFoundError as e:
            if e.name == "bakeryworld.stack":
                raise WorldError("up --stack needs tests/world/bakeryworld/stack.py, which is not present")
            raise
        extra = stack.create(dict(env), sd, groups=stack_counts, regions=list(stack_counts)) or {}
        env.update({k: str(v) for k, v in extra.items()})
    text = write_env(sd / "env", env)
    sys.stdout.write(text)
    sys.stdout.flush()
    err(f"{'reused running' if warm else 'started'} world on 127.0.0.1:{port} in {time.time() - t0:.2f}s; env file {sd / 'env'}")
    return 0


def cmd_down(args) -> int:
    sd = state_dir()
    pid = server_pid(sd)
    if pid is not None:
        try:
            info = json.loads((sd / "server.json").read_text())
            control(info["port"], "POST", "/_world/shutdown", timeout=5)
        except (OSError, ValueError, KeyError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 45
        while time.time() < deadline and pid_alive(pid):
            time.sleep(0.1)
        if pid_alive(pid):
            err(f"server pid {pid} did not stop in time; killing it")
    cleanup(sd, quiet=False)
    left = procs_of_world(sd)
    mounts = host_mounts_under(str(base_dir_for(sd)))
    if left or mounts:
        raise WorldError(f"left behind: processes {left}, mounts {mounts}")
    print(f"world down (WORLD_DIR={sd})")
    return 0


def cmd_status(args) -> int:
    sd = state_dir()
    info = running(sd)
    if info is None:
        if args.json:
            print(json.dumps({"running": False, "state_dir": str(sd)}))
        else:
            print(f"world: not running (WORLD_DIR={sd})")
        return 1
    st = info["status"]
    st["running"] = True
    if args.json:
        print(json.dumps(st, indent=1, default=str))
        return 0
    s = st["settings"]
    print(f"world running: pid {st['pid']}, {st['endpoint']}, up {st['uptime']}s")
    print(f"  state dir {s['state_dir']}  bodies under {s['base_dir']}")
    print(f"  boot delay {s['boot_delay']}s, snapshot delay {s['snapshot_delay']}s, copy delay {s.get('copy_delay')}s/GiB, "
          f"plug-ins: {', '.join(st['plugins']) or 'none'}")
    print(f"  API calls: {st.get('calls_total', 0)}; fault rules: {len(st.get('faults', {}).get('rules', []))}")
    bodies = st["bodies"]
    print(f"  bodies: {len(bodies)}")
    for b in bodies:
        svcs = ", ".join(f"{n}={v}" for n, v in b["services"].items()) or "-"
        print(f"    {b['instance_id']}  {b['ip']:<15} {b['state']:<9} check={b['status_check']:<12} image={b['image_id']} services: {svcs}")
    imgs = st.get("images", {})
    if imgs:
        print(f"  images with layers: {len(imgs)}")
        for k, v in imgs.items():
            print(f"    {k}  {v.get('state')}  {len(v.get('layers', []))} layer(s)")
    return 0


INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")


def cmd_instance(args) -> int:
    sd = state_dir()
    if not INSTANCE_ID.match(args.instance_id):
        raise WorldError(f"{args.instance_id!r} is not an instance id (expected i-0123456789abcdef0)", 2)
    info = require_running(sd)
    code, res = control(info["port"], "POST", f"/_world/instances/{args.instance_id}/{args.cmd}")
    if code == 404:
        raise WorldError(f"unknown instance {args.instance_id}: no such instance in this world", 2)
    if code != 200:
        raise WorldError(res.get("error", str(res)), 2)
    what = {"kill": "services killed (instance stays running)", "crash": "body crashed (status checks go impaired)",
            "reboot": "rebooting"}[args.cmd]
    print(f"{args.instance_id}: {what}")
    return 0


def cmd_faults(args) -> int:
    sd = state_dir()
    info = require_running(sd)
    port = info["port"]
    if args.action == "show":
        code, res = control(port, "GET", "/_world/faults")
    elif args.action == "clear":
        code, res = control(port, "DELETE", "/_world/faults")
    else:
        if args.spec is None:
            raise WorldError("faults set needs a SPEC (JSON text, @file or - for stdin)", 2)
        raw = args.spec
        if raw == "-":
            raw = sys.stdin.read()
        elif raw.startswith("@"):
            raw = Path(raw[1:]).read_text()
        try:
            spec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise WorldError(f"fault spec is not valid JSON ({e}); example: "
                             '\'{"seed":7,"rules":[{"action":"ec2:RunInstances","throttle":0.2}]}\'', 2)
        code, res = control(port, "POST", "/_world/faults", spec)
    if code != 200:
        raise WorldError(f"bad fault spec: {res.get('error', res)}", 2)
    print(json.dumps(res, indent=1))
    return 0


def cmd_calls(args) -> int:
    from urllib.parse import urlencode

    sd = state_dir()
    info = require_running(sd)
    port = info["port"]
    if args.reset:
        control(port, "POST", "/_world/calls/reset")
        print("call log reset")
        return 0
    params = {"limit": args.limit if args.limit is not None else (1000 if args.json or args.mutating else 0)}
    if args.access_key:
        params["access_key"] = args.access_key
    if args.mutating:
        params["mutating"] = "true"
    if args.since is not None:
        params["since"] = args.since
    if args.served is not None:
        params["served"] = args.served
    code, res = control(port, "GET", f"/_world/calls?{urlencode(params)}")
    if code != 200:
        raise WorldError(f"calls: {res.get('error', res) if isinstance(res, dict) else res}", 2)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    who = f" by access key {args.access_key}" if args.access_key else ""
    print(f"{res['total']} call(s){who}, {res.get('mutating_total', 0)} mutating")
    mutating = res.get("mutating_counts", {})
    for k, v in sorted(res["counts"].items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {v:6d}  {k}{'  (mutating)' if k in mutating else ''}")
    if res.get("faults_injected"):
        print("faults injected: " + ", ".join(f"{k}={v}" for k, v in res["faults_injected"].items()))
    if not args.access_key and res.get("access_keys"):
        print("by access key: " + ", ".join(f"{k}={v}" for k, v in res["access_keys"].items()))
    if res.get("calls"):
        print(f"last {len(res['calls'])} {'mutating ' if args.mutating else ''}call(s):")
        for c in res["calls"]:
            t = time.strftime("%H:%M:%S", time.localtime(c["t"])) + f".{int(c['t'] * 1000) % 1000:03d}"
            extra = f" fault={c['fault']}" if c.get("fault") else ""
            extra += " dry-run" if c.get("dry_run") else ""
            print(f"  {t}  {c['service']}:{c['action']}  {c['status']}  {c['ms']}ms  key={c.get('access_key') or '-'}{extra}")
    return 0


def cmd_interrupt(args) -> int:
    sd = state_dir()
    if not INSTANCE_ID.match(args.instance_id):
        raise WorldError(f"{args.instance_id!r} is not an instance id (expected i-0123456789abcdef0)", 2)
    info = require_running(sd)
    body = {"kind": args.kind, "repeat": args.repeat}
    for k in ("notice", "queue", "action", "code"):
        if getattr(args, k) is not None:
            body[k] = getattr(args, k)
    code, res = control(info["port"], "POST", f"/_world/instances/{args.instance_id}/interrupt", body)
    if code != 200:
        raise WorldError(res.get("error", str(res)) if isinstance(res, dict) else str(res), 2)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    n = sum(len(d["message_ids"]) for d in res["delivered_to"])
    where = ", ".join(d["queue"] for d in res["delivered_to"]) or "no queue (no rule matched)"
    print(f"{args.instance_id}: {res['kind']} event {res['event_id']} -> {n} message(s) on {where}")
    if res.get("ends_at"):
        when = time.strftime("%H:%M:%S", time.localtime(res["ends_at"]))
        print(f"  {res['end_action']} at {when} (in {res['notice_s']:.1f}s)")
    return 0


def cmd_partition(args) -> int:
    sd = state_dir()
    info = require_running(sd)
    port = info["port"]
    if args.clear:
        path = f"/_world/partitions/{args.access_key}" if args.access_key else "/_world/partitions"
        code, res = control(port, "DELETE", path)
    elif args.access_key:
        code, res = control(port, "POST", "/_world/partitions", {"access_key": args.access_key})
    else:
        code, res = control(port, "GET", "/_world/partitions")
    if code != 200:
        raise WorldError(res.get("error", str(res)) if isinstance(res, dict) else str(res), 2)
    parts = res.get("partitions", {})
    if not parts:
        print("no caller is partitioned")
    for k, since in parts.items():
        print(f"{k}: cut off since {time.strftime('%H:%M:%S', time.localtime(since))} (every call dropped)")
    return 0


def cmd_alarm(args) -> int:
    """Force a CloudWatch alarm's state (cloudwatch.py): it holds until --clear."""
    from urllib.parse import quote

    sd = state_dir()
    info = require_running(sd)
    port = info["port"]
    body = {"region": args.region} if args.region else {}
    if not args.name:
        code, res = control(port, "GET", "/_world/alarms")
        for f in res.get("forced", []):
            print(f"{f['region']}/{f['alarm']}: forced {f['state']}")
        if not res.get("forced"):
            print("no alarm is forced")
        return 0
    path = f"/_world/alarms/{quote(args.name, safe='')}"
    if args.clear:
        code, res = control(port, "DELETE", path, body)
    elif args.state:
        code, res = control(port, "POST", path, {**body, "state": args.state})
    else:
        raise WorldError("alarm NAME needs a state (ALARM, OK, INSUFFICIENT_DATA) or --clear", 2)
    if code != 200:
        raise WorldError(res.get("error", str(res)) if isinstance(res, dict) else str(res), 2 if code != 404 else 1)
    if args.clear:
        print(f"{args.name}: {'no longer forced' if res.get('cleared') else 'was not forced'}; evaluated again")
    else:
        print(f"{args.name}: forced {args.state} until `scripts/world alarm {args.name} --clear`")
    return 0


def cmd_env(args) -> int:
    p = state_dir() / "env"
    if not p.exists():
        raise WorldError(f"no env file at {p}; run scripts/world up", 1)
    sys.stdout.write(p.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/world", description="The local AWS world for bakery (see tests/world/README.md)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the world (idempotent) and write the env file")
    up.add_argument("--stack", action="store_true", help="also create the reference architecture")
    up.add_argument("--boot-delay", type=float, default=None)
    up.add_argument("--snapshot-delay", type=float, default=None)
    up.add_argument("--port", type=int, default=None)
    up.add_argument("--seed", type=int, default=0, help="default fault-injection seed")
    up.add_argument("--regions", default=None, metavar="R1,R2,...",
                    help="Regions with a world VPC and bodies, the home Region us-east-1 first "
                         "(default: us-east-1,eu-west-1,ap-northeast-2)")
    up.add_argument("--copy-delay", type=float, default=None, metavar="S",
                    help="CopyImage: seconds pending per GiB of the source's snapshots (default 0.2)")
    up.add_argument("--interrupt-factor", type=float, default=1.0,
                    help="scale interruption notices (spot 120 s) by this factor")
    up.add_argument("--table-delay", type=float, default=1.0,
                    help="seconds a new DynamoDB table stays CREATING")
    up.add_argument("--metric-period", type=float, default=10.0,
                    help="seconds between the load balancer metrics the world publishes (CloudWatch)")
    up.add_argument("--groups", default="1", metavar="N|R=N,...",
                    help="with --stack: N Auto Scaling groups behind the stack's load balancer in the home "
                         "Region (in each Region of --regions when given), or R=N per Region, e.g. "
                         "us-east-1=2,eu-west-1=1")
    sub.add_parser("down", help="end every process and mount of the world")
    stp = sub.add_parser("status")
    stp.add_argument("--json", action="store_true")
    for name, hlp in (("kill", "kill the body's services (the instance stays running)"),
                      ("crash", "kill the whole body (status checks go impaired)"),
                      ("reboot", "reboot the body")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("instance_id")
    fp = sub.add_parser("faults", help="fault injection: set SPEC | clear | show")
    fp.add_argument("action", choices=["set", "clear", "show"])
    fp.add_argument("spec", nargs="?")
    cp = sub.add_parser("calls", help="per-action call counts (optionally one caller's)")
    cp.add_argument("--reset", action="store_true")
    cp.add_argument("--json", action="store_true")
    cp.add_argument("--access-key", metavar="AKID", help="only calls signed with this access key id")
    cp.add_argument("--mutating", action="store_true", help="list the mutating calls (with --json: only those)")
    cp.add_argument("--limit", type=int, default=None, help="log entries to list (default: 1000 with --json or --mutating, else 0)")
    cp.add_argument("--since", type=float, default=None, metavar="T", help="list only calls that arrived at Unix time T or later")
    cp.add_argument("--served", choices=["true", "false"], default=None,
                    help="list only calls that reached moto (true) or were faulted/dropped (false)")
    ip = sub.add_parser("interrupt", help="put an EC2 interruption event on the events queue, then end the instance")
    ip.add_argument("instance_id")
    ip.add_argument("--kind", choices=["spot", "rebalance", "scheduled"], default="spot")
    ip.add_argument("--notice", type=float, default=None, metavar="S",
                    help="seconds until the instance ends (default: spot 120 s, scheduled 14 days, times the interrupt factor; rebalance: never)")
    ip.add_argument("--queue", default=None, metavar="URL|NAME", help="send to this queue only (default: the EventBridge rules' targets)")
    ip.add_argument("--repeat", type=int, default=1, metavar="N", help="deliver the same event N times (duplicates)")
    ip.add_argument("--action", choices=["terminate", "stop", "hibernate"], default=None, help="spot: the instance-action")
    ip.add_argument("--code", default=None, help="scheduled: the AWS Health eventTypeCode")
    ip.add_argument("--json", action="store_true")
    pp = sub.add_parser("partition", help="cut one access key off (every call dropped); --clear heals")
    pp.add_argument("access_key", nargs="?", metavar="AKID")
    pp.add_argument("--clear", action="store_true", help="heal AKID (every partition without AKID)")
    ap_alarm = sub.add_parser("alarm", help="force a CloudWatch alarm's state until --clear (SetAlarmState lasts one evaluation)")
    ap_alarm.add_argument("name", nargs="?", help="alarm name (without it: list the forced alarms)")
    ap_alarm.add_argument("state", nargs="?", choices=["ALARM", "OK", "INSUFFICIENT_DATA"])
    ap_alarm.add_argument("--clear", action="store_true", help="stop forcing; the alarm is evaluated again")
    ap_alarm.add_argument("--region", default=None, help="the alarm's region (default: the world's)")
    sub.add_parser("env", help="print the env file")
    args = ap.parse_args(argv)
    if args.cmd == "up":
        args.boot_delay_given = args.boot_delay is not None
        args.snapshot_delay_given = args.snapshot_delay is not None
        if args.boot_delay is None:
            args.boot_delay = 2.0
        if args.snapshot_delay is None:
            args.snapshot_delay = 3.0
        args.copy_delay_given = args.copy_delay is not None
        if args.copy_delay is None:
            args.copy_delay = 0.2
        if args.copy_delay < 0:
            err("--copy-delay must be >= 0")
            return 2
        if args.boot_delay < 0 or args.snapshot_delay < 0:
            err("delays must be >= 0")
            return 2
        if args.metric_period <= 0:
            err("--metric-period must be > 0")
            return 2
        try:
            from .regions import parse_groups

            parse_groups(args.groups)
        except ValueError as e:
            err(str(e))
            return 2
    if os.geteuid() != 0:
        err("the world needs root (overlay mounts, chroot, sshd)")
        return 1
    handlers = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "kill": cmd_instance,
                "crash": cmd_instance, "reboot": cmd_instance, "faults": cmd_faults, "calls": cmd_calls,
                "env": cmd_env, "interrupt": cmd_interrupt, "partition": cmd_partition,
                "alarm": cmd_alarm}
    try:
        return handlers[args.cmd](args)
    except WorldError as e:
        err(str(e))
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
