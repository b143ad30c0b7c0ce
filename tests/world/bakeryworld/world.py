"""The World object: one per server process, shared by the patches, the bodies,
the front door and the plug-in modules (health, asg, ssm).

`world.lock` (re-entrant) serialises every access to moto's models: moto is not thread-safe.
`install_moto_lock` wraps `BaseResponse.call_action` (the one entry point of every moto action)
in it, and every background thread of the world (the body reconciler, the image timers, the
health checker, the ASG processes, the control API) takes it around its own model access.
Slow work (copying layers, starting sshd, running health checks) never runs under it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ACCOUNT = "123456789012"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
# Root-owned parent of every body's chroot (sshd's ChrootDirectory demands that every
# component of the path is root-owned and not group/world-writable: not under /tmp).
BODIES_BASE = Path("/var/lib/bakery-world")


def base_dir_for(state_dir: Path) -> Path:
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    return BODIES_BASE / digest


def is_loopback(ip: str | None) -> bool:
    if not ip:
        return False
    try:
        return ipaddress.ip_address(ip) in LOOPBACK
    except ValueError:
        return False


def cidr_is_loopback(cidr: str | None) -> bool:
    if not cidr:
        return False
    try:
        return ipaddress.ip_network(cidr, strict=False).subnet_of(LOOPBACK)
    except (ValueError, TypeError):
        return False


@dataclass
class Settings:
    state_dir: Path
    port: int = 5599
    boot_delay: float = 2.0
    snapshot_delay: float = 3.0
    # CopyImage: seconds per GiB of the source image's snapshots (regions.py, amis.py)
    copy_delay: float = 0.2
    seed: int = 0
    region: str = "us-east-1"
    host: str = "127.0.0.1"
    account: str = DEFAULT_ACCOUNT
    base_dir: Path = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        if self.base_dir is None:
            self.base_dir = base_dir_for(self.state_dir)

    def as_dict(self) -> dict:
        return {
            "state_dir": str(self.state_dir),
            "base_dir": str(self.base_dir),
            "port": self.port,
            "boot_delay": self.boot_delay,
            "snapshot_delay": self.snapshot_delay,
            "copy_delay": self.copy_delay,
            "seed": self.seed,
            "region": self.region,
        }


class World:
    def __init__(self, settings: Settings):
        from .bodies import BodyManager
        from .images import ImageStore

        self.settings = settings
        self.started_at = time.time()
        self.lock = threading.RLock()
        self.images = ImageStore(self)
        self.bodies = BodyManager(self)
        self.frontdoor = None  # set by server
        self.plugins: dict[str, object] = {}
        self.status_hooks: list = []  # callables(dict) -> None, for plug-ins

    # --- moto access -----------------------------------------------------------
    def install_moto_lock(self) -> threading.RLock:
        """Serialise every moto action on `self.lock` (once per process; idempotent).

        If another world object of this process installed it first, this world adopts that
        lock, so there is exactly one moto lock per process."""
        from moto.core.responses import BaseResponse

        current = BaseResponse.call_action
        existing = getattr(current, "_bakeryworld_lock", None)
        if existing is not None:
            self.lock = existing
            return existing
        lock = self.lock
        original = current

        def call_action(response_self):
            with lock:
                return original(response_self)

        call_action.__wrapped__ = original  # type: ignore[attr-defined]
        call_action._bakeryworld_lock = lock  # type: ignore[attr-defined]
        BaseResponse.call_action = call_action  # type: ignore[method-assign]
        return lock

    def wait_unlocked(self, event: threading.Event, timeout: float) -> bool:
        """Wait for `event`; if this thread holds `self.lock` (at any depth, e.g. inside a moto
        action) the lock is fully released while waiting and re-taken afterwards, so a moto
        action can wait for slow work (a body's layer copy) without stalling every other call.
        Returns whether the event was set."""
        cond = threading.Condition(self.lock)
        if not cond._is_owned():  # type: ignore[attr-defined]
            return event.wait(timeout)
        deadline = time.monotonic() + timeout
        while not event.is_set():
            rem = deadline - time.monotonic()
            if rem <= 0:
                return False
            # Condition.wait releases an RLock completely (all recursion levels) and restores it.
            cond.wait(min(rem, 0.05))
        return True

    def ec2(self, region: str | None = None):
        from moto.ec2.models import ec2_backends

        return ec2_backends[self.settings.account][region or self.settings.region]

    def ec2_backends(self) -> list:
        """Every EC2 backend moto has made so far: one per (account, region) used. Call with
        `self.lock` held. Only backends that exist are listed (none is created here)."""
        from moto.ec2.models import ec2_backends

        out = []
        for _account, by_region in list(dict.items(ec2_backends)):
            out.extend(backend for _region, backend in list(dict.items(by_region)))
        return out

    def find_instance(self, instance_id: str):
        """The moto instance of that id in any account and region, or None. Call with
        `self.lock` held."""
        for backend in self.ec2_backends():
            for reservation in list(backend.reservations.values()):
                for inst in reservation.instances:
                    if inst.id == instance_id:
                        return inst
        return None

    def backend(self, service: str, region: str | None = None):
        from moto.backends import get_backend

        return get_backend(service)[self.settings.account][region or self.settings.region]

    # --- helpers ---------------------------------------------------------------
    def is_world_vpc(self, vpc_id: str | None, region: str | None = None) -> bool:
        if not vpc_id:
            return False
        # without a region: the VPC wherever it is (world VPCs exist in every region, regions.py)
        for backend in [self.ec2(region)] if region else self.ec2_backends():
            try:
                vpc = backend.get_vpc(vpc_id)
            except Exception:
                continue
            return cidr_is_loopback(getattr(vpc, "cidr_block", None))
        return False

    def log(self, msg: str) -> None:
        ts = time.strftime("%H:%M:%S")
        print(f"[{ts}] {msg}", flush=True)

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self.bodies.start()

    def shutdown(self) -> None:
        self.bodies.shutdown()
        self.images.shutdown()

    def status(self) -> dict:
        st = {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime": round(time.time() - self.started_at, 1),
            "endpoint": f"http://{self.settings.host}:{self.settings.port}",
            "settings": self.settings.as_dict(),
            "bodies": [b.describe() for b in self.bodies.all()],
            "images": self.images.describe(),
            "plugins": sorted(self.plugins),
        }
        if self.frontdoor is not None:
            st["calls_total"] = self.frontdoor.total_calls()
            st["faults"] = self.frontdoor.faults_spec()
        for hook in list(self.status_hooks):
            try:
                hook(st)
            except Exception as e:  # a plug-in must not break status
                st.setdefault("hook_errors", []).append(repr(e))
        return st
