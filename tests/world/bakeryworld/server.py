"""The world server: moto 5.2.5 + fidelity patches + bodies + front door, one process.

Run by `scripts/world up` (detached); by hand:
    python -m bakeryworld.server --state-dir .world --port 5599
It re-executes itself under `unshare --mount --propagation private`, so every mount it
makes (bodies' roots, the image tmpfs, the bind-mounted passwd) stays out of the host's
mount table and vanishes with the process tree.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .netutil import port_in_use
from .world import Settings, World

PLUGINS = ("health", "asg", "ssm", "patches_dynamodb", "patches_sqs", "patches_sts", "events", "cloudwatch")
NS_MARK = "BAKERY_WORLD_NS"


def _run(cmd):
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)


def setup_namespace(settings: Settings) -> None:
    base = settings.base_dir
    for d in (base.parent, base):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, 0, 0)
        os.chmod(d, 0o755)
    # Everything below is private to this mount namespace.
    # sshd's privilege-separation dir, without touching the host's /run.
    _run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "tmpfs", "/run"])
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    # ec2-user with uid 0 (and password fields that sshd does not treat as locked),
    # seen only by this namespace's sshd.
    etc = base / "etc"
    etc.mkdir(exist_ok=True)
    os.chmod(etc, 0o755)
    passwd = Path("/etc/passwd").read_text()
    users = [ln.split(":", 1)[0] for ln in passwd.splitlines() if ln.strip()]
    if "ec2-user" not in users:
        passwd = passwd.rstrip("\n") + "\nec2-user:x:0:0:EC2 default user (bakery world):/root:/bin/bash\n"
        users.append("ec2-user")
    (etc / "passwd").write_text(passwd)
    os.chmod(etc / "passwd", 0o644)
    shadow = "".join(f"{u}:*:19000:0:99999:7:::\n" for u in users)
    (etc / "shadow").write_text(shadow)
    os.chmod(etc / "shadow", 0o600)
    _run(["mount", "--bind", str(etc / "passwd"), "/etc/passwd"])
    _run(["mount", "--bind", str(etc / "shadow"), "/etc/shadow"])
    # sshd (UsePAM no) records logins in wtmp/btmp/lastlog: keep those writes off the host.
    for f in ("/var/log/wtmp", "/var/log/btmp", "/var/log/lastlog"):
        if os.path.isfile(f):
            dst = etc / Path(f).name
            dst.write_bytes(b"")
            _run(["mount", "--bind", str(dst), f])
    # Image layers: a tmpfs (a different filesystem from `/`, see images.py).
    images = settings.state_dir / "images"
    if images.exists():
        shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True, exist_ok=True)
    _run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(images)])


def load_plugins(world: World) -> None:
    for name in PLUGINS:
        modname = f"bakeryworld.{name}"
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                world.log(f"plug-in {name}: absent")
                continue
            raise
        mod.install(world)
        world.plugins[name] = mod
        world.log(f"plug-in {name}: installed")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="bakeryworld.server")
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--port", type=int, default=5599)
    ap.add_argument("--boot-delay", type=float, default=2.0)
    ap.add_argument("--snapshot-delay", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--copy-delay", type=float, default=0.2)  # CopyImage: seconds per GiB
    ap.add_argument("--interrupt-factor", type=float, default=1.0)
    ap.add_argument("--table-delay", type=float, default=1.0)
    ap.add_argument("--metric-period", type=float, default=10.0)  # cloudwatch.py
    args = ap.parse_args(argv)

    if os.environ.get(NS_MARK) != "1":
        os.environ[NS_MARK] = "1"
        os.execvp(
            "unshare",
            ["unshare", "--mount", "--propagation", "private", "--",
             sys.executable, "-m", "bakeryworld.server", *argv],
        )

    settings = Settings(
        state_dir=Path(args.state_dir), port=args.port, boot_delay=args.boot_delay,
        snapshot_delay=args.snapshot_delay, seed=args.seed, region=args.region,
    )
    settings.interrupt_factor = args.interrupt_factor  # events.py: notices scaled by it
    settings.table_delay = args.table_delay  # patches_dynamodb.py: CREATING for this long
    settings.copy_delay = args.copy_delay  # amis.py: a copy is pending this long per GiB
    settings.metric_period = args.metric_period  # cloudwatch.py: ELB metrics every this many s
    msg = port_in_use(settings.host, settings.port)
    if msg:
        print(f"world: {msg}", file=sys.stderr, flush=True)
        return 3

    setup_namespace(settings)

    os.environ.setdefault("MOTO_PORT", str(settings.port))
    os.environ.setdefault("AWS_DEFAULT_REGION", settings.region)
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    from . import patches_ec2
    from .frontdoor import FrontDoor

    world = World(settings)
    patches_ec2.install(world)
    load_plugins(world)

    app = DomainDispatcherApplication(create_backend_app)
    fd = FrontDoor(app, world)
    world.frontdoor = fd
    for mod in world.plugins.values():  # plug-ins' control routes (events.py)
        fd.control_routes.extend(getattr(mod, "ROUTES", ()))

    class Handler(MotoRequestHandler):
        def log_request(self, *a, **k):  # the call log replaces the access log
            pass

    try:
        srv = make_server(settings.host, settings.port, fd, threaded=True, request_handler=Handler)
    except OSError as e:
        print(f"world: port {settings.port} on {settings.host}: {e}", file=sys.stderr, flush=True)
        return 3
    srv.daemon_threads = True

    stopping = threading.Event()

    def request_shutdown():
        if not stopping.is_set():
            stopping.set()
            world.log("shutting down")
            srv.shutdown()

    world.request_shutdown = request_shutdown
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: threading.Thread(target=request_shutdown, daemon=True).start())

    world.start()
    info = {"pid": os.getpid(), "port": settings.port, "state_dir": str(settings.state_dir),
            "base_dir": str(settings.base_dir), "started_at": time.time()}
    (settings.state_dir / "server.json").write_text(json.dumps(info))
    world.log(f"world serving on http://{settings.host}:{settings.port} (state {settings.state_dir})")
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        world.shutdown()
        for p in (settings.state_dir / "images", "/etc/shadow", "/etc/passwd"):
            subprocess.run(["umount", "-l", str(p)], stdin=subprocess.DEVNULL, capture_output=True)
        try:
            (settings.state_dir / "server.json").unlink()
        except FileNotFoundError:
            pass
        world.log("world stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
