"""Auto Scaling warm pools: pre-initialized instances the group takes on scale-out.

moto 5.2.5 stores `PutWarmPool` and keeps the pool empty (`DescribeWarmPool` always lists no
instances). On AWS (EC2 Auto Scaling user guide, "Warm pools"; API reference, `PutWarmPool`):

- The pool holds `max(MinSize, MaxGroupPreparedCapacity - DesiredCapacity)` instances
  (`MaxSize` stands for `MaxGroupPreparedCapacity` when that is not set or is -1; never fewer
  than 0). Instances beyond that are terminated, missing ones launched.
- A pool instance is launched from the group's launch template like any other, goes
  `Warmed:Pending` (with an `autoscaling:EC2_INSTANCE_LAUNCHING` hook: `Warmed:Pending:Wait` ->
  `Warmed:Pending:Proceed`), boots once (its user data runs), and is then put in the pool state:
  `Warmed:Stopped` (EC2 `stopped`), `Warmed:Running`, or `Warmed:Hibernated` (the world stops
  it: there is no hibernation). Pool instances are not in the group: not in
  `DescribeAutoScalingGroups`' `Instances`, not in its target groups, not counted against the
  desired capacity; `DescribeWarmPool` lists them.
- On scale-out the group takes ready pool instances (`Warmed:Stopped/Running/Hibernated`) first:
  each is started, goes `Pending` (launching hooks apply again) -> `InService`, is registered
  with the target groups, and inherits the group's `NewInstancesProtectedFromScaleIn`; new
  instances are launched only for the rest. The pool then refills.
- A pool instance keeps the launch template version it was launched with (so a group that moved
  to a new version still takes old-version instances from its pool, as on AWS, where an
  instance refresh replaces them).
- `InstanceReusePolicy.ReuseOnScaleIn`: scale-in returns instances to the pool (stopped) instead
  of terminating them.
- `DeleteWarmPool`: the pool's `Status` is `PendingDelete` while its instances terminate, then
  the pool is gone; `ForceDelete` deletes it at once.

When the world puts a booted instance in its pool state: AWS does it once the launch and its
lifecycle actions complete; the world waits until the instance's user data script has exited
(at most `USER_DATA_WAIT` seconds after boot), so the pre-initialization the pool is for has
happened. An instance without a body (outside the world's 127.0.0.0/8 VPCs) is ready at once.
World-only: lifecycle hooks for instances leaving the pool by scale-in or pool shrink
(`Warmed:Terminating:Wait`) are not run.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("bakeryworld.warmpool")

READY = ("Warmed:Stopped", "Warmed:Running", "Warmed:Hibernated")
USER_DATA_WAIT = 60.0

WORLD: Any = None


def pool(group: Any) -> list[Any]:
    p = getattr(group, "_bakeryworld_warm", None)
    if p is None:
        p = group._bakeryworld_warm = []
    return p


def deleting(group: Any) -> bool:
    return bool(getattr(group, "_bakeryworld_warm_deleting", False))


def _int(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def size_wanted(group: Any) -> int:
    wp = getattr(group, "warm_pool", None)
    if wp is None or deleting(group):
        return 0
    mgpc = _int(wp.max_group_prepared_capacity)
    cap = mgpc if mgpc is not None and mgpc >= 0 else int(group.max_size or 0)
    return max(int(_int(wp.min_size) or 0), cap - int(group.desired_capacity or 0), 0)


def _terminate(backend: Any, group: Any, sts: list[Any]) -> None:
    from . import lifecycle

    p = pool(group)
    for st in sts:
        if st in p:
            p.remove(st)
        lifecycle.waits(group).pop(st.instance.id, None)
    ids = [st.instance.id for st in sts if st.instance.state not in ("terminated", "shutting-down")]
    if ids:
        backend.ec2_backend.terminate_instances(ids)


def drop(backend: Any, group: Any, st: Any) -> None:
    """A pool instance whose launch was abandoned: terminated (the pool refills)."""
    _terminate(backend, group, [st])


def clear(backend: Any, group: Any) -> list[str]:
    """Empty the pool (the group is being deleted); returns the ids to terminate."""
    p = pool(group)
    ids = [st.instance.id for st in p if st.instance.state not in ("terminated", "shutting-down")]
    p.clear()
    return ids


def take(backend: Any, group: Any, count: int) -> int:
    """Move up to `count` ready pool instances into the group; returns how many."""
    from . import lifecycle

    if count <= 0 or getattr(group, "warm_pool", None) is None or deleting(group):
        return 0
    p = pool(group)
    ready = [st for st in p if st.lifecycle_state in READY and st.instance.state in ("stopped", "running")]
    taken = ready[:count]
    for st in taken:
        p.remove(st)
        if st.instance.state == "stopped":
            backend.ec2_backend.start_instances([st.instance.id])
        st.protected_from_scale_in = group.new_instances_protected_from_scale_in
        st.health_status = "Healthy"
        st.lifecycle_state = "Pending"
        group.instance_states.append(st)
        log.info("asg %s: %s leaves the warm pool", group.name, st.instance.id)
        lifecycle.on_launch(backend, group, st)
    return len(taken)


def reuse(backend: Any, group: Any, st: Any) -> bool:
    """Scale-in with ReuseOnScaleIn: back to the pool instead of terminated."""
    from . import lifecycle

    wp = getattr(group, "warm_pool", None)
    policy = (getattr(wp, "instance_reuse_policy", None) or {}) if wp is not None else {}
    if wp is None or deleting(group) or str(policy.get("ReuseOnScaleIn")).lower() != "true":
        return False
    lifecycle.deregister(backend, group, st)
    group.instance_states = [s for s in group.instance_states if s is not st]
    _to_pool_state(backend, wp, st)
    pool(group).append(st)
    log.info("asg %s: scale in returns %s to the warm pool", group.name, st.instance.id)
    return True


def _to_pool_state(backend: Any, wp: Any, st: Any) -> None:
    """Running: ready now. Stopped / Hibernated: the instance is stopped, and ready once its body
    has halted (`_halted`), so a start that follows at once boots it again."""
    state = (wp.pool_state or "Stopped").capitalize()
    if state == "Running":
        st.lifecycle_state = "Warmed:Running"
        return
    if st.instance.state == "running":
        backend.ec2_backend.stop_instances([st.instance.id])
    st.lifecycle_state = "Warmed:Pending"
    st._bakeryworld_stopping = "Warmed:Hibernated" if state == "Hibernated" else "Warmed:Stopped"


def _halted(st: Any) -> bool:
    body = WORLD.bodies.get(st.instance.id) if WORLD is not None else None
    return body is None or body.state in ("stopped", "terminated")


def _prepared(st: Any) -> bool:
    """The instance booted once and its user data has run (see the module docstring)."""
    from .world import is_loopback

    inst = st.instance
    if inst.state != "running":
        return False
    if not is_loopback(getattr(inst, "private_ip", None)) or WORLD is None:
        return True
    body = WORLD.bodies.get(inst.id)
    if body is None or not body.booted():
        return False
    ud = getattr(body, "user_data", None) or b""
    if not ud.startswith(b"#!") or body.user_data_rc is not None:
        return True
    return body.booted_at is not None and time.time() - body.booted_at > USER_DATA_WAIT


def tick(backend: Any, group: Any) -> None:
    """Keep the pool at its size and move booted instances to the pool state."""
    from . import asg, lifecycle

    p = pool(group)
    for st in list(p):
        if st.instance.state in ("terminated", "shutting-down"):
            p.remove(st)
            lifecycle.waits(group).pop(st.instance.id, None)
    wp = getattr(group, "warm_pool", None)
    if wp is None or deleting(group):
        # PendingDelete: the instances terminate (listed as Warmed:Terminating until they are
        # gone, at the next tick); then the pool goes.
        if p:
            for st in p:
                st.lifecycle_state = "Warmed:Terminating"
            ids = [st.instance.id for st in p if st.instance.state not in ("terminated", "shutting-down")]
            if ids:
                backend.ec2_backend.terminate_instances(ids)
        elif deleting(group):
            group.warm_pool = None
            group._bakeryworld_warm_deleting = False
        return
    for st in list(p):
        if st.lifecycle_state != "Warmed:Pending":
            continue
        stopping = getattr(st, "_bakeryworld_stopping", None)
        if stopping is not None:
            if _halted(st):
                st.lifecycle_state, st._bakeryworld_stopping = stopping, None
                log.info("asg %s: %s is %s", group.name, st.instance.id, st.lifecycle_state)
        elif _prepared(st):
            _to_pool_state(backend, wp, st)
    want = size_wanted(group)
    if len(p) < want and "Launch" not in lifecycle.suspended(group):
        if time.monotonic() >= getattr(group, "_bakeryworld_pool_retry_at", 0.0):
            try:
                asg._launch_from_group(group, want - len(p), group.get_propagated_tags(), into_pool=True)
            except Exception as e:  # noqa: BLE001 - as a failed scaling activity: tried again later
                group._bakeryworld_pool_retry_at = time.monotonic() + lifecycle.LAUNCH_RETRY_SECONDS
                log.warning("asg %s: warm pool launch failed: %r", group.name, e)
    elif len(p) > want:
        # Not-yet-ready instances go first, then the newest.
        extra = sorted(p, key=lambda st: (st.lifecycle_state in READY, -p.index(st)))[: len(p) - want]
        _terminate(backend, group, extra)


# --------------------------------------------------------------------------------------------
# moto patches


def _patch_moto() -> None:
    from moto.autoscaling.models import AutoScalingBackend
    from moto.autoscaling.responses import AutoScalingResponse
    from moto.core.responses import ActionResult, EmptyResult

    if getattr(AutoScalingBackend, "_bakeryworld_warmpool", False):
        return
    AutoScalingBackend._bakeryworld_warmpool = True  # type: ignore[attr-defined]

    def _group(self: Any) -> Any:
        from . import lifecycle

        name = self._get_param("AutoScalingGroupName")
        group = self.autoscaling_backend.autoscaling_groups.get(name)
        if group is None:
            raise lifecycle._validation(f"AutoScalingGroup name not found - AutoScalingGroup {name} not found")
        return group

    orig_put = AutoScalingResponse.put_warm_pool

    def put_warm_pool(self: Any) -> Any:
        group = _group(self)
        out = orig_put(self)
        group._bakeryworld_warm_deleting = False
        return out

    def describe_warm_pool(self: Any) -> Any:
        group = _group(self)
        wp = group.warm_pool
        config = None
        if wp is not None:
            config = {"MinSize": int(_int(wp.min_size) or 0), "PoolState": wp.pool_state or "Stopped"}
            mgpc = _int(wp.max_group_prepared_capacity)
            if mgpc is not None and mgpc >= 0:
                config["MaxGroupPreparedCapacity"] = mgpc
            if wp.instance_reuse_policy:
                config["InstanceReusePolicy"] = {
                    "ReuseOnScaleIn": str(wp.instance_reuse_policy.get("ReuseOnScaleIn")).lower() == "true"
                }
            if deleting(group):
                config["Status"] = "PendingDelete"
        instances = []
        for st in pool(group):
            item = {
                "InstanceId": st.instance.id,
                "InstanceType": st.instance.instance_type,
                "AvailabilityZone": st.availability_zone,
                "LifecycleState": st.lifecycle_state,
                "HealthStatus": st.health_status,
                "ProtectedFromScaleIn": False,
            }
            lt = st.launch_template
            if lt:
                item["LaunchTemplate"] = lt
            instances.append(item)
        max_records = min(50, int(self._get_param("MaxRecords") or 50))
        token = self._get_param("NextToken")
        start = int(token) if token and str(token).isdigit() else 0
        result: dict[str, Any] = {"Instances": instances[start: start + max_records]}
        if config is not None:
            result["WarmPoolConfiguration"] = config
        if start + max_records < len(instances):
            result["NextToken"] = str(start + max_records)
        return ActionResult(result)

    def delete_warm_pool(self: Any) -> Any:
        group = _group(self)
        backend = self.autoscaling_backend
        if group.warm_pool is None:
            from . import lifecycle

            raise lifecycle._validation(f"No warm pool found for Auto Scaling group {group.name}")
        if self._get_bool_param("ForceDelete", False):
            ids = clear(backend, group)
            if ids:
                backend.ec2_backend.terminate_instances(ids)
            group.warm_pool = None
            group._bakeryworld_warm_deleting = False
        else:
            group._bakeryworld_warm_deleting = True  # PendingDelete until the next tick
        return EmptyResult()

    AutoScalingResponse.put_warm_pool = put_warm_pool  # type: ignore[method-assign]
    AutoScalingResponse.describe_warm_pool = describe_warm_pool  # type: ignore[method-assign]
    AutoScalingResponse.delete_warm_pool = delete_warm_pool  # type: ignore[method-assign]


def install(world: Any) -> None:
    global WORLD
    WORLD = world
    _patch_moto()
