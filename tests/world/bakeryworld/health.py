"""ALB target health that follows real health checks.

moto 5.2.5 answers `DescribeTargetHealth` with `healthy` for every registered running instance,
forever. On AWS a target starts `initial`, becomes `healthy` only after the target group's
healthy threshold of consecutive passing checks, `unhealthy` after the unhealthy threshold of
consecutive failing ones, `draining` for the deregistration delay after it leaves, and `unused`
while its instance is stopped. bakery's rollout waits on exactly these states, so the world runs
each target group's HTTP health check against each target's address and answers from it.

Only addresses inside 127.0.0.0/8 are ever contacted: a target outside it has no body, so its
check fails as a timeout would on AWS, without a packet being sent.

Where the world is faster than AWS: AWS's minimum `HealthCheckIntervalSeconds` is 5 and the
timeout must be smaller than the interval. The world honours intervals down to 1 s and accepts
`interval == timeout` when the interval is below AWS's minimum (an interval that small is already
a world-only setting), so the reference stack's fleet turns healthy in about 2 s.

Also filled here: when an Auto Scaling group terminates an instance itself (scale in,
`TerminateInstanceInAutoScalingGroup`, a replacement), moto leaves it registered in the group's
target groups; AWS deregisters it (it drains). And `DescribeTargetHealth` without `Targets` lists
draining targets too, as AWS does.

Every Region and account: the checker walks every ELBv2 backend moto has made, so a load
balancer in another Region (`up --stack --regions`, regions.py) or in the second account checks
its own targets as the home Region's do (on AWS each Region's load balancers check their own).

`moto_lock(world)` is the one lock that serialises moto's request handling with the world's
background loops (health, asg, ssm): moto's models are not thread-safe.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("bakeryworld.health")

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")

# How often the scheduler wakes to start due checks and expire draining targets. Checks
# themselves run at each target group's interval; this only bounds the jitter (and the CPU).
TICK_SECONDS = 0.2
# Concurrent health checks in flight; a check lasts at most its timeout, so this bounds how
# many slow targets can delay the others.
CHECK_WORKERS = 16
# Callables (tg_arn, target_id, http_status or None) told of every health check's outcome; the
# CloudWatch plug-in counts 5xx answers from them (HTTPCode_Target_5XX_Count).
PROBE_LISTENERS: list = []

# --------------------------------------------------------------------------------------------
# The shared moto lock

_LOCK: threading.RLock | None = None
_LOCK_GUARD = threading.Lock()


def moto_lock(world: Any = None) -> Any:
    """The lock held around every moto action and every background loop's model access.

    It is the world's own `world.lock` (a re-entrant lock), installed around
    `BaseResponse.call_action` (the single entry point of every moto action; subclasses that
    override it all call super) by `World.install_moto_lock`, which the core EC2 patches call
    first; this only makes sure it is installed. Without a world (or one lacking the method) a
    process-wide RLock is installed the same way. Being re-entrant, it is harmless if a caller
    already holds it.
    """
    global _LOCK
    with _LOCK_GUARD:
        from moto.core.responses import BaseResponse

        existing = getattr(BaseResponse.call_action, "_bakeryworld_lock", None)
        if world is not None and hasattr(world, "install_moto_lock"):
            _LOCK = world.install_moto_lock()
        elif existing is not None:
            _LOCK = existing
        else:
            lock = getattr(world, "lock", None) if world is not None else None
            if lock is None:
                lock = threading.RLock()
            original = BaseResponse.call_action

            def call_action(self: Any) -> Any:
                with lock:
                    return original(self)

            call_action.__wrapped__ = original  # type: ignore[attr-defined]
            call_action._bakeryworld_lock = lock  # type: ignore[attr-defined]
            BaseResponse.call_action = call_action  # type: ignore[method-assign]
            _LOCK = lock
    if world is not None and getattr(world, "lock", None) is not _LOCK:
        try:
            world.lock = _LOCK
        except Exception:  # a world with a read-only attribute keeps its own
            pass
    return _LOCK


# --------------------------------------------------------------------------------------------
# Per-target state


@dataclass
class TargetState:
    target_id: str
    port: int
    state: str = "initial"
    reason: str | None = "Elb.RegistrationInProgress"
    description: str | None = "Target registration is in progress"
    ok_streak: int = 0
    fail_streak: int = 0
    next_check: float = 0.0
    in_flight: bool = False
    checks: int = 0
    draining_until: float | None = None
    last_failure: tuple[str, str] | None = field(default=None)


class HealthStore:
    """Health of every (target group ARN, target id), updated by the checker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._targets: dict[tuple[str, str], TargetState] = {}

    def registered(self, tg_arn: str, target_id: str, port: int) -> None:
        with self._lock:
            cur = self._targets.get((tg_arn, target_id))
            if cur is not None and cur.draining_until is None and cur.port == port:
                return  # re-registration of a registered target changes nothing on AWS
            self._targets[(tg_arn, target_id)] = TargetState(
                target_id, port, next_check=time.monotonic()
            )

    def deregistered(self, tg_arn: str, target_id: str, delay: float) -> None:
        with self._lock:
            cur = self._targets.get((tg_arn, target_id))
            if cur is None:
                cur = TargetState(target_id, 0)
                self._targets[(tg_arn, target_id)] = cur
            cur.state = "draining"
            cur.reason = "Target.DeregistrationInProgress"
            cur.description = "Target deregistration is in progress"
            cur.draining_until = time.monotonic() + max(0.0, delay)

    def reset(self, tg_arn: str, target_id: str) -> None:
        """Back to `initial` (an instance that was stopped and started again)."""
        with self._lock:
            cur = self._targets.get((tg_arn, target_id))
            if cur is not None and cur.draining_until is None:
                self._targets[(tg_arn, target_id)] = TargetState(
                    target_id, cur.port, next_check=time.monotonic()
                )

    def get(self, tg_arn: str, target_id: str) -> TargetState | None:
        with self._lock:
            return self._targets.get((tg_arn, target_id))

    def state_of(self, tg_arn: str, target_id: str) -> str | None:
        s = self.get(tg_arn, target_id)
        return s.state if s else None

    def draining(self, tg_arn: str) -> list[TargetState]:
        with self._lock:
            return [
                s
                for (arn, _), s in self._targets.items()
                if arn == tg_arn and s.draining_until is not None
            ]

    def expired_drains(self, now: float) -> list[tuple[str, str]]:
        with self._lock:
            done = [
                k
                for k, s in self._targets.items()
                if s.draining_until is not None and s.draining_until <= now
            ]
            for k in done:
                del self._targets[k]
            return done

    def forget_group(self, tg_arn: str) -> None:
        with self._lock:
            for k in [k for k in self._targets if k[0] == tg_arn]:
                del self._targets[k]

    def claim_due(self, tg_arn: str, target_id: str, now: float, interval: float) -> TargetState | None:
        with self._lock:
            s = self._targets.get((tg_arn, target_id))
            if s is None or s.draining_until is not None or s.in_flight or s.next_check > now:
                return None
            s.in_flight = True
            s.next_check = now + interval
            return s

    def record(
        self,
        tg_arn: str,
        target_id: str,
        ok: bool,
        failure: tuple[str, str] | None,
        healthy_threshold: int,
        unhealthy_threshold: int,
    ) -> None:
        with self._lock:
            s = self._targets.get((tg_arn, target_id))
            if s is None:
                return
            s.in_flight = False
            if s.draining_until is not None:
                return
            s.checks += 1
            if ok:
                s.ok_streak += 1
                s.fail_streak = 0
            else:
                s.fail_streak += 1
                s.ok_streak = 0
                s.last_failure = failure
            if ok and s.ok_streak >= healthy_threshold:
                s.state, s.reason, s.description = "healthy", None, None
            elif not ok and s.fail_streak >= unhealthy_threshold:
                s.state = "unhealthy"
                s.reason, s.description = failure or ("Target.FailedHealthChecks", "Health checks failed")
            elif s.state == "initial":
                # Registered, now counting checks towards the first decision.
                s.reason = "Elb.InitialHealthChecking"
                s.description = "Initial health checks in progress"


STORE = HealthStore()


# --------------------------------------------------------------------------------------------
# The check itself


def _code_matches(matcher: dict[str, Any] | None, code: int) -> bool:
    spec = str((matcher or {}).get("HttpCode") or "200")
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            if int(lo) <= code <= int(hi):
                return True
        elif int(part) == code:
            return True
    return False


def in_loopback(ip: str | None) -> bool:
    try:
        return ip is not None and ipaddress.ip_address(ip) in LOOPBACK
    except ValueError:
        return False


def run_check(
    ip: str | None,
    port: int,
    protocol: str,
    path: str | None,
    timeout: float,
    matcher: dict[str, Any] | None,
    codes: list[int] | None = None,
) -> tuple[bool, tuple[str, str] | None]:
    """One health check. Returns (passed, (reason, description) when it failed); the HTTP
    status answered, if any, is appended to `codes`."""
    if not in_loopback(ip):
        # No body can live there and the world never sends a packet outside 127/8.
        return False, ("Target.Timeout", "Request timed out")
    protocol = (protocol or "HTTP").upper()
    try:
        if protocol == "TCP":
            with socket.create_connection((ip, port), timeout=timeout):
                return True, None
        if protocol == "HTTPS":
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # an ALB does not validate target certificates
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                ip, port, timeout=timeout, context=ctx
            )
        else:
            conn = http.client.HTTPConnection(ip, port, timeout=timeout)
        try:
            conn.request(
                "GET",
                path or "/",
                headers={"User-Agent": "ELB-HealthChecker/2.0", "Connection": "close"},
            )
            resp = conn.getresponse()
            code = resp.status
            if codes is not None:
                codes.append(code)
            resp.read(65536)
        finally:
            conn.close()
    except (socket.timeout, TimeoutError):
        return False, ("Target.Timeout", "Request timed out")
    except (OSError, http.client.HTTPException):
        return False, ("Target.FailedHealthChecks", "Health checks failed")
    if _code_matches(matcher, code):
        return True, None
    return False, (
        "Target.ResponseCodeMismatch",
        f"Health checks failed with these codes: [{code}]",
    )


# --------------------------------------------------------------------------------------------
# moto patches


def _delay_of(tg: Any) -> float:
    try:
        return float(tg.attributes.get("deregistration_delay.timeout_seconds", 300))
    except (TypeError, ValueError):
        return 300.0


def _port_of(tg: Any, t: dict[str, Any]) -> int:
    try:
        return int(t.get("Port") or tg.port)
    except (TypeError, ValueError):
        return 80


def _patch_moto() -> None:
    from moto.ec2.models import EC2Backend
    from moto.elbv2 import elbv2_backends
    from moto.elbv2.models import ELBv2Backend, FakeHealthStatus, FakeTargetGroup

    if getattr(FakeTargetGroup, "_bakeryworld_health", False):
        return
    FakeTargetGroup._bakeryworld_health = True  # type: ignore[attr-defined]

    orig_register = FakeTargetGroup.register
    orig_deregister = FakeTargetGroup.deregister
    orig_dereg_terminated = FakeTargetGroup.deregister_terminated_instances
    orig_describe = ELBv2Backend.describe_target_health
    orig_create_tg = ELBv2Backend.create_target_group
    orig_delete_tg = ELBv2Backend.delete_target_group
    orig_terminate = EC2Backend.terminate_instances

    def register(self: Any, targets: list[dict[str, Any]]) -> None:
        orig_register(self, targets)
        for t in targets:
            reg = self.targets.get(t["Id"])
            if reg is not None:
                STORE.registered(self.arn, t["Id"], _port_of(self, reg))

    def deregister(self: Any, targets: list[dict[str, Any]]) -> None:
        orig_deregister(self, targets)
        for t in targets:
            STORE.deregistered(self.arn, t["Id"], _delay_of(self))

    def deregister_terminated_instances(self: Any, instance_ids: list[str]) -> None:
        leaving = [i for i in instance_ids if i in self.targets]
        orig_dereg_terminated(self, instance_ids)
        for i in leaving:
            STORE.deregistered(self.arn, i, _delay_of(self))

    def health_for(self: Any, target: dict[str, Any], ec2_backend: Any) -> Any:
        tid = target["Id"]
        reg = self.targets.get(tid)
        st = STORE.get(self.arn, tid)
        if reg is None:
            if st is not None and st.draining_until is not None:
                port = target.get("Port") or st.port or self.port
                return FakeHealthStatus(
                    tid, port, self.health_check_port, "draining", st.reason, st.description
                )
            return _ORIG_HEALTH_FOR(self, target, ec2_backend)
        if tid.startswith("i-"):
            inst = ec2_backend.get_instance_by_id(tid)
            if inst is not None and inst.state != "running":
                return FakeHealthStatus(
                    tid,
                    reg["Port"],
                    self.health_check_port,
                    "unused",
                    "Target.InvalidState",
                    f"Target is in the {inst.state} state",
                )
        if not self.load_balancer_arns:
            return FakeHealthStatus(
                tid,
                reg["Port"],
                self.health_check_port,
                "unused",
                "Target.NotInUse",
                "Target group is not configured to receive traffic from the load balancer",
            )
        if not checks_enabled(self):
            return FakeHealthStatus(
                tid,
                reg["Port"],
                self.health_check_port,
                "unavailable",
                "Target.HealthCheckDisabled",
                "Health checks are disabled",
            )
        if st is None:
            STORE.registered(self.arn, tid, _port_of(self, reg))
            st = STORE.get(self.arn, tid)
        assert st is not None
        return FakeHealthStatus(
            tid, reg["Port"], self.health_check_port, st.state, st.reason, st.description
        )

    def describe_target_health(self: Any, target_group_arn: str, targets: list[dict[str, Any]]) -> Any:
        result = orig_describe(self, target_group_arn, targets)
        if not targets:
            tg = self.target_groups.get(target_group_arn)
            listed = {r.instance_id for r in result}
            for st in STORE.draining(target_group_arn):
                if st.target_id not in listed:
                    result.append(tg.health_for({"Id": st.target_id, "Port": st.port}, self.ec2_backend))
        return result

    def create_target_group(self: Any, name: str, **kwargs: Any) -> Any:
        interval = kwargs.get("healthcheck_interval_seconds")
        timeout = kwargs.get("healthcheck_timeout_seconds")
        relaxed = (
            interval is not None
            and timeout is not None
            and int(interval) < 5
            and int(timeout) == int(interval)
        )
        if relaxed:
            # World-only: accept interval == timeout below AWS's 5 s minimum interval (see top).
            # moto's validation sees a valid pair; the real values are set right after.
            kwargs["healthcheck_interval_seconds"] = int(timeout) + 1
        tg = orig_create_tg(self, name, **kwargs)
        if relaxed:
            tg.health_check_interval_seconds = int(interval)
        return tg

    def delete_target_group(self: Any, target_group_arn: str) -> Any:
        out = orig_delete_tg(self, target_group_arn)
        STORE.forget_group(target_group_arn)
        return out

    def terminate_instances(self: Any, instance_ids: list[str]) -> Any:
        out = orig_terminate(self, instance_ids)
        # An instance terminated by anyone (an ASG scaling in or replacing, too) leaves its
        # target groups through draining, as on AWS. The TerminateInstances API path already
        # does this in moto; calling it again there is a no-op.
        try:
            region = self.region_name
            elbv2_backends[self.account_id][region].notify_terminate_instances(list(instance_ids))
        except Exception:  # pragma: no cover - elbv2 unused in this region
            log.debug("elbv2 notify failed", exc_info=True)
        return out

    global _ORIG_HEALTH_FOR
    _ORIG_HEALTH_FOR = FakeTargetGroup.health_for
    FakeTargetGroup.register = register  # type: ignore[method-assign]
    FakeTargetGroup.deregister = deregister  # type: ignore[method-assign]
    FakeTargetGroup.deregister_terminated_instances = deregister_terminated_instances  # type: ignore[method-assign]
    FakeTargetGroup.health_for = health_for  # type: ignore[method-assign]
    ELBv2Backend.describe_target_health = describe_target_health  # type: ignore[method-assign]
    ELBv2Backend.create_target_group = create_target_group  # type: ignore[method-assign]
    ELBv2Backend.delete_target_group = delete_target_group  # type: ignore[method-assign]
    EC2Backend.terminate_instances = terminate_instances  # type: ignore[method-assign]


_ORIG_HEALTH_FOR: Any = None


# --------------------------------------------------------------------------------------------
# The checker


def _elbv2_backends() -> list[Any]:
    """Every ELBv2 backend moto has made (every account and Region); none is created here.
    Call with the moto lock held."""
    from moto.elbv2.models import elbv2_backends

    out = []
    for _account, by_region in list(dict.items(elbv2_backends)):
        out.extend(backend for _region, backend in list(dict.items(by_region)))
    return out


@dataclass
class _Job:
    tg_arn: str
    target_id: str
    ip: str | None
    port: int
    protocol: str
    path: str | None
    timeout: float
    matcher: dict[str, Any] | None
    healthy_threshold: int
    unhealthy_threshold: int


class HealthChecker:
    def __init__(self, world: Any) -> None:
        self.world = world
        self.lock = moto_lock(world)
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=CHECK_WORKERS, thread_name_prefix="world-hc")
        self.thread = threading.Thread(target=self._run, name="world-health", daemon=True)
        self._was_stopped: set[tuple[str, str]] = set()

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self.stop.wait(TICK_SECONDS):
            try:
                self.tick()
            except Exception:
                log.exception("health tick failed")

    def _due_jobs(self, now: float) -> list[_Job]:
        jobs: list[_Job] = []
        with self.lock:
            backends = _elbv2_backends()
            for arn, tid in STORE.expired_drains(now):
                for elbv2 in backends:
                    tg = elbv2.target_groups.get(arn)
                    if tg is not None:
                        # Drained: from now on moto answers `unused` / `Target.NotRegistered`.
                        if tg.terminated_targets.pop(tid, None) is not None:
                            tg.deregistered_targets[tid] = {"Id": tid, "Port": tg.port}
            # Every Region's (and account's) target groups: each Region's load balancers check
            # their own targets, as on AWS (an ALB and its target groups are regional).
            for elbv2 in backends:
                jobs.extend(self._backend_jobs(elbv2, now))
        return jobs

    def _backend_jobs(self, elbv2: Any, now: float) -> list[_Job]:
        """Due checks of one ELBv2 backend (one account and Region); the moto lock is held."""
        jobs: list[_Job] = []
        if not elbv2.target_groups:
            return jobs
        ec2 = elbv2.ec2_backend
        for tg in list(elbv2.target_groups.values()):
            if tg.target_type == "lambda" or not checks_enabled(tg):
                continue
            if not tg.load_balancer_arns:
                continue  # AWS runs no checks for a target group no load balancer uses
            interval = max(1.0, float(tg.health_check_interval_seconds or 30))
            timeout = max(0.2, min(float(tg.health_check_timeout_seconds or 5), interval))
            for t in list(tg.targets.values()):
                tid = t["Id"]
                ip: str | None
                if tg.target_type == "ip":
                    ip = tid
                else:
                    inst = ec2.get_instance_by_id(tid)
                    if inst is None:
                        continue
                    if inst.state != "running":
                        self._was_stopped.add((tg.arn, tid))
                        continue
                    if (tg.arn, tid) in self._was_stopped:
                        self._was_stopped.discard((tg.arn, tid))
                        STORE.reset(tg.arn, tid)
                    ip = inst.private_ip
                if STORE.get(tg.arn, tid) is None:
                    STORE.registered(tg.arn, tid, _port_of(tg, t))
                if STORE.claim_due(tg.arn, tid, now, interval) is None:
                    continue
                hc_port = tg.health_check_port
                port = (
                    _port_of(tg, t)
                    if not hc_port or hc_port == "traffic-port"
                    else int(hc_port)
                )
                jobs.append(
                    _Job(
                        tg.arn,
                        tid,
                        ip,
                        port,
                        tg.health_check_protocol or tg.protocol or "HTTP",
                        tg.health_check_path,
                        timeout,
                        getattr(tg, "matcher", None),
                        int(tg.healthy_threshold_count or 5),
                        int(tg.unhealthy_threshold_count or 2),
                    )
                )
        return jobs

    def tick(self) -> None:
        for job in self._due_jobs(time.monotonic()):
            self.pool.submit(self._check, job)

    def _check(self, job: _Job) -> None:
        codes: list[int] = []
        try:
            ok, failure = run_check(job.ip, job.port, job.protocol, job.path, job.timeout, job.matcher, codes)
        except Exception:
            log.exception("health check crashed")
            ok, failure = False, ("Target.FailedHealthChecks", "Health checks failed")
        for listener in list(PROBE_LISTENERS):
            try:
                listener(job.tg_arn, job.target_id, codes[0] if codes else None)
            except Exception:
                log.exception("health probe listener failed")
        STORE.record(
            job.tg_arn, job.target_id, ok, failure, job.healthy_threshold, job.unhealthy_threshold
        )


CHECKER: HealthChecker | None = None


def install(world: Any) -> HealthChecker:
    """Patch moto and start the checker thread. Idempotent per process."""
    global CHECKER
    moto_lock(world)
    _patch_moto()
    if CHECKER is None:
        CHECKER = HealthChecker(world)
        CHECKER.start()
    return CHECKER


def checks_enabled(tg: Any) -> bool:
    """Whether the target group's health checks are on. moto keeps what ModifyTargetGroup was
    given as it came, the string "false" included (which is true to Python); CreateTargetGroup
    parses it."""
    v = tg.health_check_enabled
    if isinstance(v, str):
        return v.strip().lower() != "false"
    return True if v is None else bool(v)


def target_state(tg_arn: str, target_id: str) -> str | None:
    """The world's view of one target's health state, for the ASG `HealthCheck` process."""
    return STORE.state_of(tg_arn, target_id)
