"""The Auto Scaling instance lifecycle that moto 5.2.5 skips: lifecycle hooks, capacity, scale-in
protection, standby.

moto puts every instance `InService` at launch, ignores lifecycle hooks (and has no
`CompleteLifecycleAction` / `RecordLifecycleActionHeartbeat`: a 500), counts only `InService`
instances against the desired capacity, registers every group member (any state) with the
group's target groups, scales in whatever comes first in its list (a `Standby` instance too)
and moves instances in and out of `Standby` without touching the load balancer. The world
follows the Amazon EC2 Auto Scaling user guide ("Amazon EC2 Auto Scaling instance lifecycle",
"lifecycle hooks", "Temporarily remove instances ... (standby)", "Use instance scale-in
protection", "Control which instances terminate during scale in"):

- **Launch**: an instance starts `Pending`; with an `autoscaling:EC2_INSTANCE_LAUNCHING` hook it
  waits in `Pending:Wait` (not registered with the target groups, not `InService`, but counted
  against the desired capacity) until every launching hook's action is completed
  (`CompleteLifecycleAction` by `InstanceId` or `LifecycleActionToken`) or times out
  (`HeartbeatTimeout`, default 3600 s; `RecordLifecycleActionHeartbeat` restarts it; never
  past the global timeout, 100 x the heartbeat timeout or 48 h, whichever is smaller). Then
  the result (or the hook's `DefaultResult`, default `ABANDON`) decides: `CONTINUE` ->
  `Pending:Proceed` -> `InService` (registered with the target groups now; the health check
  grace period starts now); `ABANDON` -> the instance is terminated and the group launches a
  replacement. Without a hook an instance is `InService` at once, as before.
- **Termination** (scale in, `TerminateInstanceInAutoScalingGroup`, a health replacement):
  `Terminating` - the instance is deregistered from the target groups first (it drains) - then,
  with an `autoscaling:EC2_INSTANCE_TERMINATING` hook, `Terminating:Wait` until completed or
  timed out (either result goes on), `Terminating:Proceed`, and the EC2 instance is terminated
  and leaves the group. A terminating instance no longer counts against the desired capacity,
  so its replacement (if any) launches at once. The world does not wait for the draining to
  end before the wait state (AWS may show a `WaitingForELBConnectionDraining` activity).
- Hooks do not apply to attaching or detaching instances, to standby, or to deleting a group,
  as the guide's availability table says. `DeleteLifecycleHook` completes outstanding actions
  (`ABANDON` for launching, `CONTINUE` for terminating instances). A hook whose
  `NotificationTargetARN` is an SQS queue of the world gets the test notification and one
  message per lifecycle action (with its `LifecycleActionToken`), as AWS sends them.
  `CreateAutoScalingGroup`'s `LifecycleHookSpecificationList` is honoured, so the group's first
  instances wait too.
- **Capacity**: the desired capacity counts `Pending*` and `InService` instances. The group
  launches (from its warm pool first, see warmpool.py) or scales in to match it, on every call
  that changes it and on every tick (so a protected instance losing its protection, or a
  `Standby` instance coming back, is handled), unless `Launch` / `Terminate` is suspended.
- **Scale in** (default termination policy): among instances *not* protected from scale in, the
  Availability Zone with the most instances, then instances launched from the oldest launch
  template version (not the group's current one first), then the oldest instance. If every
  instance is protected the desired capacity is still lowered and nothing is terminated ("the
  Auto Scaling group can't terminate the required number of instances until their instance
  scale-in protection settings are disabled"); scale-in protection does not protect against
  health check replacement.
- **Standby**: `EnterStandby` needs `InService` instances of the group (`ValidationError`
  otherwise, or if decrementing would go below the minimum size); the instance becomes
  `Standby`, is deregistered from the target groups, is not health-checked or replaced, and
  stays in the group; without `ShouldDecrementDesiredCapacity` the group launches a replacement.
  `ExitStandby` (`Standby` instances only; not above the maximum size) increments the desired
  capacity, the instance goes `Pending` -> `InService` and is registered again; if the group
  then has more instances than it needs, it scales in.
- `SetInstanceProtection` for an instance that is not in the group: `ValidationError`.
- Deleting a group terminates its instances at once (no hooks, as with `ForceDelete`) and
  deletes its lifecycle hooks (moto kept them, so a new group of the same name inherited them).

World-only: `HeartbeatTimeout` below AWS's minimum of 30 s is accepted (tests use 2 s).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("bakeryworld.lifecycle")

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
CAPACITY = ("Pending", "Pending:Wait", "Pending:Proceed", "InService")
GLOBAL_TIMEOUT_MAX = 172800  # 48 h

WORLD: Any = None


@dataclass
class Action:
    hook: str
    transition: str
    token: str
    deadline: float
    global_deadline: float
    heartbeat: float
    result: str | None = None


# --------------------------------------------------------------------------------------------
# Bookkeeping on moto's objects


def waits(group: Any) -> dict[str, dict[str, Action]]:
    """instance id -> hook name -> its lifecycle action, for the group's waiting instances."""
    w = getattr(group, "_bakeryworld_waits", None)
    if w is None:
        w = group._bakeryworld_waits = {}
    return w


def hooks_of(backend: Any, group_name: str, transition: str) -> list[Any]:
    return [
        h for h in list(backend.lifecycle_hooks.values())
        if h.auto_scaling_group_name == group_name and h.lifecycle_transition == transition
    ]


def suspended(group: Any) -> set[str]:
    return {p["ProcessName"] for p in group.suspended_processes}


def find(backend: Any, instance_id: str) -> tuple[Any, Any] | tuple[None, None]:
    for group in backend.autoscaling_groups.values():
        for st in group.instance_states:
            if st.instance.id == instance_id:
                return group, st
    return None, None


def _validation(msg: str) -> Exception:
    from moto.autoscaling.exceptions import ValidationError

    return ValidationError(msg)


# --------------------------------------------------------------------------------------------
# Load balancer membership


def register(backend: Any, group: Any, st: Any) -> None:
    if "AddToLoadBalancer" in suspended(group):
        return  # AWS: instances launched while it is suspended are not added
    iid = st.instance.id
    for arn in list(group.target_group_arns or []):
        tg = backend.elbv2_backend.target_groups.get(arn)
        if tg is None or iid in tg.targets:
            continue
        try:
            backend.elbv2_backend.register_targets(arn, [{"Id": iid, "Port": tg.port}])
        except Exception as e:  # noqa: BLE001 - e.g. the instance is not running (yet)
            log.debug("register %s in %s: %r", iid, arn, e)
    if group.load_balancer_names:
        try:
            for name in group.load_balancer_names:
                backend.elb_backend.register_instances(name, [iid], from_autoscaling=True)
        except Exception as e:  # noqa: BLE001
            log.debug("classic ELB register %s: %r", iid, e)


def deregister(backend: Any, group: Any, st: Any) -> None:
    """Out of the group's target groups (the target drains), and its classic load balancers."""
    iid = st.instance.id
    for arn in list(group.target_group_arns or []):
        tg = backend.elbv2_backend.target_groups.get(arn)
        if tg is not None and iid in tg.targets:
            backend.elbv2_backend.deregister_targets(arn, [{"Id": iid}])
    if group.load_balancer_names:
        try:
            for name in group.load_balancer_names:
                backend.elb_backend.deregister_instances(name, [iid], from_autoscaling=True)
        except Exception as e:  # noqa: BLE001
            log.debug("classic ELB deregister %s: %r", iid, e)


def enter_service(backend: Any, group: Any, st: Any, restart_grace: bool = True) -> None:
    from . import asg

    st.lifecycle_state = "InService"
    if restart_grace:
        asg._LAUNCHED[st.instance.id] = time.monotonic()  # the grace period starts InService
    register(backend, group, st)


# --------------------------------------------------------------------------------------------
# Lifecycle actions


def _notify(backend: Any, hook: Any, body: dict[str, Any]) -> None:
    """Send a lifecycle notification to the hook's SQS queue, if it is one of the world's."""
    arn = getattr(hook, "notification_target_arn", None) or ""
    parts = arn.split(":")
    if len(parts) < 6 or parts[2] != "sqs":
        return
    try:
        from moto.sqs.models import sqs_backends

        sqs = sqs_backends[parts[4]][parts[3]]
        sqs.send_message(parts[5], json.dumps(body))
    except Exception as e:  # noqa: BLE001 - no such queue: AWS would have refused the hook
        log.warning("lifecycle hook %s: notification to %s not sent: %r", hook.name, arn, e)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"


def begin_wait(backend: Any, group: Any, st: Any, hooks: list[Any], transition: str, prefix: str = "") -> None:
    now = time.monotonic()
    actions: dict[str, Action] = {}
    for h in hooks:
        hb = float(h.heartbeat_timeout or 3600)
        gt = float(getattr(h, "global_timeout", None) or min(100 * hb, GLOBAL_TIMEOUT_MAX))
        a = Action(h.name, transition, str(uuid.uuid4()), now + hb, now + gt, hb)
        actions[h.name] = a
        launching = transition == LAUNCHING
        body = {
            "Origin": "EC2" if launching else "AutoScalingGroup",
            "Destination": ("WarmPool" if prefix else "AutoScalingGroup") if launching else "EC2",
            "Service": "AWS Auto Scaling",
            "Time": _now_iso(),
            "RequestId": str(uuid.uuid4()),
            "LifecycleActionToken": a.token,
            "AccountId": backend.account_id,
            "AutoScalingGroupName": group.name,
            "LifecycleHookName": h.name,
            "EC2InstanceId": st.instance.id,
            "LifecycleTransition": transition,
        }
        if getattr(h, "notification_metadata", None):
            body["NotificationMetadata"] = h.notification_metadata
        _notify(backend, h, body)
    waits(group)[st.instance.id] = actions
    st.lifecycle_state = prefix + ("Pending:Wait" if transition == LAUNCHING else "Terminating:Wait")
    log.info("asg %s: %s %s (%s)", group.name, st.instance.id, st.lifecycle_state, ", ".join(actions))


def on_launch(backend: Any, group: Any, st: Any, warm: bool = False) -> None:
    """An instance the group just launched (or took from its warm pool): Pending:Wait if a
    launching hook exists, else InService (Warmed:Pending for the warm pool)."""
    hooks = hooks_of(backend, group.name, LAUNCHING)
    prefix = "Warmed:" if warm else ""
    if hooks:
        begin_wait(backend, group, st, hooks, LAUNCHING, prefix)
    elif warm:
        st.lifecycle_state = "Warmed:Pending"
    else:
        enter_service(backend, group, st)


def _finish_termination(backend: Any, group: Any, st: Any) -> None:
    from . import asg

    iid = st.instance.id
    waits(group).pop(iid, None)
    group.instance_states = [s for s in group.instance_states if s.instance.id != iid]
    asg._LAUNCHED.pop(iid, None)
    if st.instance.state not in ("terminated", "shutting-down"):
        backend.ec2_backend.terminate_instances([iid])  # drains it out of what it is left in


def begin_termination(backend: Any, group: Any, st: Any, hooks: bool = True) -> None:
    """Terminating: deregistered first, then Terminating:Wait (hooks) or terminated now."""
    st.lifecycle_state = "Terminating"
    deregister(backend, group, st)
    ths = hooks_of(backend, group.name, TERMINATING) if hooks else []
    if ths and st.instance.state == "running":
        begin_wait(backend, group, st, ths, TERMINATING)
    else:
        _finish_termination(backend, group, st)


def find_action(group: Any, hook_name: str, instance_id: str | None, token: str | None) -> tuple[str, Action] | None:
    for iid, actions in waits(group).items():
        a = actions.get(hook_name)
        if a is None or a.result is not None:
            continue
        if (instance_id and iid == instance_id) or (token and a.token == token):
            return iid, a
    return None


def advance(backend: Any, group: Any) -> None:
    """Timeouts, completed actions, and the one-tick `Proceed` states. Under the moto lock."""
    now = time.monotonic()
    members = {st.instance.id: st for st in group.instance_states}
    w = waits(group)
    for iid in [i for i in w if i not in members and not _in_warm_pool(group, i)]:
        del w[iid]
    for st in list(group.instance_states) + list(getattr(group, "_bakeryworld_warm", []) or []):
        iid = st.instance.id
        state = st.lifecycle_state
        if state == "Pending":  # back from Standby: no hooks apply
            enter_service(backend, group, st, restart_grace=False)
        elif state.endswith("Pending:Proceed"):
            if state.startswith("Warmed:"):
                st.lifecycle_state = "Warmed:Pending"
            else:
                enter_service(backend, group, st)
        elif state == "Terminating:Proceed":
            _finish_termination(backend, group, st)
        elif state.endswith(":Wait") and iid in w:
            actions = w[iid]
            for a in actions.values():
                if a.result is None and now >= min(a.deadline, a.global_deadline):
                    hook = backend.lifecycle_hooks.get(f"{group.name}_{a.hook}")
                    a.result = (getattr(hook, "default_result", None) or "ABANDON").upper()
                    log.info("asg %s: %s hook %s timed out -> %s", group.name, iid, a.hook, a.result)
            if any(a.result is None for a in actions.values()):
                continue
            del w[iid]
            abandoned = any(a.result == "ABANDON" for a in actions.values())
            if state.endswith("Pending:Wait"):
                if abandoned:
                    log.info("asg %s: launch of %s abandoned", group.name, iid)
                    if state.startswith("Warmed:"):
                        from . import warmpool

                        warmpool.drop(backend, group, st)
                    else:
                        st.lifecycle_state = "Terminating"
                        _finish_termination(backend, group, st)
                else:
                    st.lifecycle_state = state.replace(":Wait", ":Proceed")
            else:  # Terminating:Wait: either result goes on to the termination
                st.lifecycle_state = "Terminating:Proceed"


def _in_warm_pool(group: Any, iid: str) -> bool:
    return any(s.instance.id == iid for s in (getattr(group, "_bakeryworld_warm", None) or []))


# --------------------------------------------------------------------------------------------
# Capacity


def _version_of(st: Any) -> int:
    rec = getattr(st.instance, "_bakeryworld_launch_template", None) or {}
    try:
        return int(rec.get("Version") or 0)
    except (TypeError, ValueError):
        return 0


def _current_version(group: Any) -> int | None:
    lt = getattr(group, "ec2_launch_template", None)
    if lt is None:
        return None
    try:
        return int(lt.get_version(group.launch_template_version).number)
    except Exception:  # noqa: BLE001
        return None


def scale_in_victims(group: Any, count: int) -> list[Any]:
    """The default termination policy, over instances not protected from scale in."""
    chosen: list[Any] = []
    candidates = [
        st for st in group.instance_states
        if st.lifecycle_state in CAPACITY and not st.protected_from_scale_in
    ]
    everyone = [st for st in group.instance_states if st.lifecycle_state in CAPACITY]
    current = _current_version(group)
    order = {id(st): i for i, st in enumerate(group.instance_states)}
    while len(chosen) < count and candidates:
        per_zone: dict[str, int] = {}
        for st in everyone:
            if st not in chosen:
                per_zone[st.availability_zone] = per_zone.get(st.availability_zone, 0) + 1
        zones = {st.availability_zone for st in candidates}
        zone = max(sorted(zones), key=lambda z: per_zone.get(z, 0))
        in_zone = [st for st in candidates if st.availability_zone == zone]
        in_zone.sort(key=lambda st: (_version_of(st) == current, _version_of(st), order[id(st)]))
        victim = in_zone[0]
        chosen.append(victim)
        candidates.remove(victim)
    return chosen


LAUNCH_RETRY_SECONDS = 10.0


def launch(group: Any, count: int, propagated_tags: dict[str, str] | None = None, retry: bool = False) -> None:
    """Launch `count` instances into the group: from its warm pool first, as AWS does. A launch
    that fails (a deleted launch template version, say) fails as a scaling activity would: the
    call that asked for capacity succeeds, and the loop (`retry`) tries again every
    LAUNCH_RETRY_SECONDS."""
    from . import asg, warmpool

    now = time.monotonic()
    if retry and now < getattr(group, "_bakeryworld_launch_retry_at", 0.0):
        return
    backend = group.autoscaling_backend
    try:
        count -= warmpool.take(backend, group, count)
        if count > 0:
            asg._launch_from_group(group, count, dict(propagated_tags or group.get_propagated_tags()))
        group._bakeryworld_launch_retry_at = 0.0
    except Exception as e:  # noqa: BLE001
        group._bakeryworld_launch_retry_at = now + LAUNCH_RETRY_SECONDS
        log.warning("%s: launching %d instance(s) failed: %r", group.name, count, e)


def reconcile(group: Any, retry: bool = False) -> None:
    """Launch or scale in to the desired capacity (unless Launch / Terminate is suspended)."""
    from . import warmpool

    backend = group.autoscaling_backend
    procs = suspended(group)
    counted = [st for st in group.instance_states if st.lifecycle_state in CAPACITY]
    desired = int(group.desired_capacity or 0)
    if len(counted) < desired and "Launch" not in procs:
        launch(group, desired - len(counted), retry=retry)
    elif len(counted) > desired and "Terminate" not in procs:
        for st in scale_in_victims(group, len(counted) - desired):
            if not warmpool.reuse(backend, group, st):
                log.info("asg %s: scale in terminates %s", group.name, st.instance.id)
                begin_termination(backend, group, st)


# --------------------------------------------------------------------------------------------
# moto patches


def _patch_moto() -> None:
    from moto.autoscaling.models import (
        AutoScalingBackend,
        EnterStandbyActivity,
        ExitStandbyActivity,
        FakeAutoScalingGroup,
        LifecycleHook,
    )
    from moto.autoscaling.responses import AutoScalingResponse
    from moto.core.responses import EmptyResult

    if getattr(FakeAutoScalingGroup, "_bakeryworld_lifecycle", False):
        return
    FakeAutoScalingGroup._bakeryworld_lifecycle = True  # type: ignore[attr-defined]

    orig_set_desired = FakeAutoScalingGroup.set_desired_capacity
    orig_delete = AutoScalingBackend.delete_auto_scaling_group
    orig_delete_hook = AutoScalingBackend.delete_lifecycle_hook
    orig_create_response = AutoScalingResponse.create_auto_scaling_group

    def set_desired_capacity(self: Any, new_capacity: int | None) -> None:
        if self.mixed_instances_policy:
            return orig_set_desired(self, new_capacity)
        self.desired_capacity = self.min_size if new_capacity is None else new_capacity
        reconcile(self)
        if self.name in self.autoscaling_backend.autoscaling_groups:
            self.autoscaling_backend.update_attached_elbs(self.name)
            self.autoscaling_backend.update_attached_target_groups(self.name)

    def update_attached_target_groups(self: Any, group_name: str) -> None:
        # Only InService instances belong in the target groups (moto registered every member,
        # Pending:Wait and Standby ones too).
        group = self.autoscaling_groups[group_name]
        for st in group.instance_states:
            if st.lifecycle_state == "InService":
                register(self, group, st)

    def delete_auto_scaling_group(self: Any, group_name: str) -> None:
        from . import warmpool

        group = self.autoscaling_groups.get(group_name)
        if group is not None:
            ids = [st.instance.id for st in group.instance_states if st.instance.state not in ("terminated",)]
            ids += warmpool.clear(self, group)
            group.instance_states = []
            waits(group).clear()
            if ids:
                self.ec2_backend.terminate_instances(ids)
        out = orig_delete(self, group_name)
        for key in [k for k, h in self.lifecycle_hooks.items() if h.auto_scaling_group_name == group_name]:
            del self.lifecycle_hooks[key]
        return out

    def delete_lifecycle_hook(self: Any, as_name: str, name: str) -> None:
        # "If there are any outstanding lifecycle actions, they are completed first (ABANDON for
        # launching instances, CONTINUE for terminating instances)."
        group = self.autoscaling_groups.get(as_name)
        if group is not None:
            for actions in waits(group).values():
                a = actions.get(name)
                if a is not None and a.result is None:
                    a.result = "ABANDON" if a.transition == LAUNCHING else "CONTINUE"
        orig_delete_hook(self, as_name, name)
        if group is not None:
            advance(self, group)

    def enter_standby_instances(self: Any, group_name: str, instance_ids: list[str], should_decrement: bool) -> Any:
        group = self.autoscaling_groups.get(group_name)
        if group is None:
            raise _validation(f"AutoScalingGroup name not found - AutoScalingGroup {group_name} not found")
        sts = []
        for iid in instance_ids:
            st = next((s for s in group.instance_states if s.instance.id == iid), None)
            if st is None:
                raise _validation(f"The instance {iid} is not part of Auto Scaling group {group_name}.")
            if st.lifecycle_state != "InService":
                raise _validation(f"The instance {iid} is not in InService.")
            sts.append(st)
        original = group.desired_capacity
        if should_decrement and original - len(sts) < (group.min_size or 0):
            raise _validation(
                f"AutoScalingGroup {group_name} has min-size={group.min_size}, max-size={group.max_size}, "
                f"and desired-size={original}. To place into standby {len(sts)} instance"
                f"{'s' if len(sts) > 1 else ''}, please update the AutoScalingGroup sizes appropriately."
            )
        if should_decrement:
            group.desired_capacity = original - len(sts)
        activities = []
        for st in sts:
            st.lifecycle_state = "Standby"
            deregister(self, group, st)
            activities.append(EnterStandbyActivity(st.instance, original))
        reconcile(group)  # without decrementing: a replacement
        return activities

    def exit_standby_instances(self: Any, group_name: str, instance_ids: list[str]) -> Any:
        group = self.autoscaling_groups.get(group_name)
        if group is None:
            raise _validation(f"AutoScalingGroup name not found - AutoScalingGroup {group_name} not found")
        sts = []
        for iid in instance_ids:
            st = next((s for s in group.instance_states if s.instance.id == iid), None)
            if st is None:
                raise _validation(f"The instance {iid} is not part of Auto Scaling group {group_name}.")
            if st.lifecycle_state != "Standby":
                raise _validation(f"The instance {iid} is not in Standby.")
            sts.append(st)
        original = group.desired_capacity
        if original + len(sts) > (group.max_size if group.max_size is not None else original + len(sts)):
            raise _validation(
                f"AutoScalingGroup {group_name} has min-size={group.min_size}, max-size={group.max_size}, "
                f"and desired-size={original}. To exit standby {len(sts)} instance"
                f"{'s' if len(sts) > 1 else ''}, please update the AutoScalingGroup sizes appropriately."
            )
        group.desired_capacity = original + len(sts)
        activities = []
        for st in sts:
            st.lifecycle_state = "Pending"  # -> InService at the next tick, registered again
            activities.append(ExitStandbyActivity(st.instance, original))
        return activities

    def set_instance_protection(self: Any, group_name: str, instance_ids: list[str], protected_from_scale_in: bool | None) -> None:
        group = self.autoscaling_groups.get(group_name)
        if group is None:
            raise _validation(f"AutoScalingGroup name not found - AutoScalingGroup {group_name} not found")
        members = {st.instance.id: st for st in group.instance_states}
        for iid in instance_ids:
            if iid not in members:
                raise _validation(f"The instance {iid} is not part of Auto Scaling group {group_name}.")
        for iid in instance_ids:
            members[iid].protected_from_scale_in = bool(protected_from_scale_in)

    FakeAutoScalingGroup.set_desired_capacity = set_desired_capacity  # type: ignore[method-assign]
    AutoScalingBackend.update_attached_target_groups = update_attached_target_groups  # type: ignore[method-assign]
    AutoScalingBackend.delete_auto_scaling_group = delete_auto_scaling_group  # type: ignore[method-assign]
    AutoScalingBackend.delete_lifecycle_hook = delete_lifecycle_hook  # type: ignore[method-assign]
    AutoScalingBackend.enter_standby_instances = enter_standby_instances  # type: ignore[method-assign]
    AutoScalingBackend.exit_standby_instances = exit_standby_instances  # type: ignore[method-assign]
    AutoScalingBackend.set_instance_protection = set_instance_protection  # type: ignore[method-assign]

    # ---- the lifecycle hook API -----------------------------------------------------------

    def put_hook(backend: Any, group_name: str, spec: dict[str, Any]) -> Any:
        name = spec.get("LifecycleHookName")
        key = f"{group_name}_{name}"
        old = backend.lifecycle_hooks.get(key)
        transition = spec.get("LifecycleTransition") or (old.lifecycle_transition if old else None)
        if transition not in (LAUNCHING, TERMINATING):
            raise _validation(
                f"Invalid value '{transition}' for LifecycleTransition: valid values are {LAUNCHING} and {TERMINATING}"
            )
        result = spec.get("DefaultResult") or (old.default_result if old else "ABANDON")
        if result not in ("CONTINUE", "ABANDON"):
            raise _validation(f"Invalid value '{result}' for DefaultResult: valid values are CONTINUE and ABANDON")
        timeout = spec.get("HeartbeatTimeout")
        timeout = int(timeout) if timeout is not None else (old.heartbeat_timeout if old else 3600)
        hook = LifecycleHook(name, group_name, transition, timeout, result)
        # PutLifecycleHook on an existing hook changes only what it names.
        for attr, param in (("notification_target_arn", "NotificationTargetARN"), ("role_arn", "RoleARN"),
                            ("notification_metadata", "NotificationMetadata")):
            value = spec.get(param)
            setattr(hook, attr, value if value is not None else (getattr(old, attr, None) if old else None))
        hook.global_timeout = min(100 * int(timeout), GLOBAL_TIMEOUT_MAX)
        backend.lifecycle_hooks[key] = hook
        if hook.notification_target_arn and (old is None or old.notification_target_arn != hook.notification_target_arn):
            group = backend.autoscaling_groups.get(group_name)
            _notify(backend, hook, {
                "AccountId": backend.account_id,
                "RequestId": str(uuid.uuid4()),
                "AutoScalingGroupARN": group.arn if group is not None else None,
                "AutoScalingGroupName": group_name,
                "Service": "AWS Auto Scaling",
                "Event": "autoscaling:TEST_NOTIFICATION",
                "Time": _now_iso(),
            })
        return hook

    def put_lifecycle_hook(self: Any) -> Any:
        params = self._get_params()
        put_hook(self.autoscaling_backend, params.get("AutoScalingGroupName"), params)
        return EmptyResult()

    def create_auto_scaling_group(self: Any) -> Any:
        # LifecycleHookSpecificationList: the hooks exist before the first launch (moto ignored
        # them, so the group's first instances never waited).
        params = self._get_params()
        specs = params.get("LifecycleHookSpecificationList") or []
        name = params.get("AutoScalingGroupName")
        backend = self.autoscaling_backend
        added = []
        if name not in backend.autoscaling_groups:
            for spec in specs:
                put_hook(backend, name, spec)
                added.append(f"{name}_{spec.get('LifecycleHookName')}")
        try:
            return orig_create_response(self)
        except Exception:
            for key in added:
                backend.lifecycle_hooks.pop(key, None)
            raise

    def _action_params(self: Any) -> tuple[Any, Any, str, str | None, str | None]:
        backend = self.autoscaling_backend
        group_name = self._get_param("AutoScalingGroupName")
        hook_name = self._get_param("LifecycleHookName")
        iid = self._get_param("InstanceId")
        token = self._get_param("LifecycleActionToken")
        group = backend.autoscaling_groups.get(group_name)
        if group is None:
            raise _validation(f"AutoScalingGroup name not found - AutoScalingGroup {group_name} not found")
        if f"{group_name}_{hook_name}" not in backend.lifecycle_hooks:
            raise _validation(f"No Lifecycle Hook found with name {hook_name} for AutoScalingGroup {group_name}")
        if not iid and not token:
            raise _validation("Either InstanceId or LifecycleActionToken must be specified")
        return backend, group, hook_name, iid, token

    def _no_action(iid: str | None, token: str | None) -> Exception:
        if token and not iid:
            return _validation(f"No active Lifecycle Action found with token {token}")
        return _validation(f"No active Lifecycle Action found with instance ID {iid}")

    def complete_lifecycle_action(self: Any) -> Any:
        backend, group, hook_name, iid, token = _action_params(self)
        result = (self._get_param("LifecycleActionResult") or "").upper()
        if result not in ("CONTINUE", "ABANDON"):
            raise _validation("LifecycleActionResult must be CONTINUE or ABANDON")
        found = find_action(group, hook_name, iid, token)
        if found is None:
            raise _no_action(iid, token)
        found[1].result = result
        advance(backend, group)
        return EmptyResult()

    def record_lifecycle_action_heartbeat(self: Any) -> Any:
        backend, group, hook_name, iid, token = _action_params(self)
        found = find_action(group, hook_name, iid, token)
        if found is None:
            raise _no_action(iid, token)
        a = found[1]
        a.deadline = min(time.monotonic() + a.heartbeat, a.global_deadline)
        return EmptyResult()

    AutoScalingResponse.put_lifecycle_hook = put_lifecycle_hook  # type: ignore[method-assign]
    AutoScalingResponse.create_auto_scaling_group = create_auto_scaling_group  # type: ignore[method-assign]
    AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action  # type: ignore[attr-defined]
    AutoScalingResponse.record_lifecycle_action_heartbeat = record_lifecycle_action_heartbeat  # type: ignore[attr-defined]


def install(world: Any) -> None:
    global WORLD
    WORLD = world
    _patch_moto()
