"""Auto Scaling processes that moto 5.2.5 only records: `HealthCheck` and `ReplaceUnhealthy`.

moto stores `SetInstanceHealth` and never acts on it, and never looks at target health. On AWS
two processes of every group do:

- `HealthCheck` marks an InService instance `Unhealthy` when
  - its instance is not `running` (at once), or
  - after the group's `HealthCheckGracePeriod` from its launch: its EC2 status checks are
    impaired (in the world: its body has booted and is no longer alive), or, with
    `HealthCheckType=ELB`, it is `unhealthy` in any of the group's target groups.
- `ReplaceUnhealthy` terminates each `Unhealthy` instance and launches a replacement, keeping
  the desired capacity. If `Launch` is suspended the unhealthy instance is still terminated but
  not replaced; if `Terminate` is suspended it is not replaced at all.

Either stops while that process is suspended (`SuspendProcesses`), as on AWS. A daemon that takes
over health decisions suspends `HealthCheck` and sets health itself.

Also filled here, because a replacement must come from the group's own launch template: moto
launches every ASG instance with the template's *default* version and into the first subnet
only. The world launches from the group's version (`$Latest`, `$Default` or a number), spreads
instances over the group's subnets (fewest first, as AZ balancing does), and associates the
template's `IamInstanceProfile`, which moto ignores (SSM needs it). Each instance then reports
(`DescribeAutoScalingGroups` `Instances[].LaunchTemplate`, `DescribeAutoScalingInstances`) the
template and version number it was launched with, as on AWS; moto reported the group's current
template at its default version.

TerminateInstanceInAutoScalingGroup for an instance no group manages (already terminated, say,
by the first attempt of a retried call) answers `ValidationError: Instance Id not found - No
managed instance found for instance ID: …` as AWS does; moto failed with a 500.

The instance lifecycle itself (lifecycle hooks, capacity and scale-in protection, standby) is
lifecycle.py's, warm pools are warmpool.py's; this loop drives them for every group.

The loop runs every `LOOP_SECONDS` under the world's moto lock.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from . import health, lifecycle, warmpool

log = logging.getLogger("bakeryworld.asg")

LOOP_SECONDS = 0.5

# instance id -> monotonic time the world first saw it InService in a group (its grace start).
_LAUNCHED: dict[str, float] = {}


def _launch_from_group(
    group: Any, count_needed: int, propagated_tags: dict[str, str], into_pool: bool = False
) -> None:
    """`FakeAutoScalingGroup.replace_autoscaling_group_instances`, with AWS's behaviour. Each
    instance then enters the lifecycle (lifecycle.on_launch): `InService`, or `Pending:Wait`
    under a launching hook; with `into_pool`, it goes to the group's warm pool instead."""
    from moto.autoscaling.models import ASG_NAME_TAG, InstanceState

    propagated_tags[ASG_NAME_TAG] = group.name
    propagated_tags.update(group.instance_tags)
    ec2 = group.autoscaling_backend.ec2_backend
    subnets = [s for s in (group.vpc_zone_identifier or "").split(",") if s] or [None]

    launch_template = None
    launched_with: dict[str, str] | None = None
    profile: dict[str, Any] = {}
    if group.ec2_launch_template is not None:
        version = group.ec2_launch_template.get_version(group.launch_template_version)
        launch_template = {
            "LaunchTemplateId": group.ec2_launch_template.id,
            "Version": str(version.number),
        }
        # What DescribeAutoScalingGroups / DescribeAutoScalingInstances report for the instance
        # from now on: the template and the version *number* it was launched with.
        launched_with = {
            "LaunchTemplateId": group.ec2_launch_template.id,
            "LaunchTemplateName": group.ec2_launch_template.name,
            "Version": str(version.number),
        }
        profile = version.data.get("IamInstanceProfile") or {}
    elif group.launch_config is not None and getattr(group.launch_config, "instance_profile_name", None):
        profile = {"Name": group.launch_config.instance_profile_name}
    associate_public_ip = (
        group.launch_config.associate_public_ip_address if group.launch_config else None
    )

    for _ in range(count_needed):
        in_subnet = {s: 0 for s in subnets}
        for st in group.instance_states:
            sid = getattr(st.instance, "subnet_id", None)
            if sid in in_subnet:
                in_subnet[sid] += 1
        subnet_id = min(subnets, key=lambda s: in_subnet[s])
        placement = None
        if subnet_id:
            placement = ec2.get_subnet(subnet_id).availability_zone
        elif group.availability_zones:
            placement = group.availability_zones[len(group.instance_states) % len(group.availability_zones)]
        reservation = ec2.run_instances(
            group.image_id,
            1,
            group.user_data,
            group.security_groups,
            instance_type=group.instance_type,
            tags={"instance": dict(propagated_tags)},
            placement=placement,
            launch_config=group.launch_config,
            launch_template=launch_template,
            is_instance_type_default=False,
            associate_public_ip=associate_public_ip,
            subnet_id=subnet_id,
        )
        for instance in reservation.instances:
            instance.autoscaling_group = group
            if launched_with is not None:
                instance._bakeryworld_launch_template = dict(launched_with)  # type: ignore[attr-defined]
            if (profile.get("Name") or profile.get("Arn")) and instance.id not in ec2.iam_instance_profile_associations:
                try:
                    ec2.associate_iam_instance_profile(
                        instance_id=instance.id,
                        iam_instance_profile_name=profile.get("Name"),
                        iam_instance_profile_arn=profile.get("Arn"),
                    )
                except Exception:
                    log.warning(
                        "instance profile %s of group %s not associated with %s",
                        profile,
                        group.name,
                        instance.id,
                        exc_info=True,
                    )
            st = InstanceState(
                instance,
                protected_from_scale_in=group.new_instances_protected_from_scale_in,
            )
            backend = group.autoscaling_backend
            if into_pool:
                st.protected_from_scale_in = False
                warmpool.pool(group).append(st)
                lifecycle.on_launch(backend, group, st, warm=True)
            else:
                group.instance_states.append(st)
                lifecycle.on_launch(backend, group, st)


def _patch_moto() -> None:
    from moto.autoscaling.models import FakeAutoScalingGroup, InstanceState

    if getattr(FakeAutoScalingGroup, "_bakeryworld_asg", False):
        return
    FakeAutoScalingGroup._bakeryworld_asg = True  # type: ignore[attr-defined]
    original = FakeAutoScalingGroup.replace_autoscaling_group_instances

    def replace_autoscaling_group_instances(
        self: Any, count_needed: int, propagated_tags: dict[str, str]
    ) -> None:
        if self.mixed_instances_policy:
            return original(self, count_needed, propagated_tags)
        try:
            lifecycle.launch(self, count_needed, propagated_tags)  # the warm pool first
        except Exception as e:  # noqa: BLE001
            # AWS accepts the capacity change and fails the launch as a scaling activity (a
            # deleted launch-template version, say); the call that asked for capacity succeeds.
            log.warning("%s: launching %d instance(s) failed: %r", self.name, count_needed, e)

    FakeAutoScalingGroup.replace_autoscaling_group_instances = replace_autoscaling_group_instances  # type: ignore[method-assign]

    # Per-instance `LaunchTemplate`: moto answers with the group's *current* template and that
    # template's *default* version number; AWS reports the template and version the instance
    # was launched with (a rollout's old and new instances differ). Instances the world launched
    # carry that record; any other (attached, mixed instances policy) keeps moto's answer.
    orig_lt = InstanceState.launch_template

    def launch_template(self: Any) -> dict[str, Any] | None:
        rec = getattr(self.instance, "_bakeryworld_launch_template", None)
        if rec is not None:
            return dict(rec)
        return orig_lt.fget(self)

    InstanceState.launch_template = property(launch_template)  # type: ignore[method-assign,assignment]

    from moto.autoscaling.exceptions import ValidationError
    from moto.autoscaling.models import AutoScalingBackend

    orig_terminate = AutoScalingBackend.terminate_instance

    def terminate_instance(self: Any, instance_id: str, should_decrement: bool) -> Any:
        from moto.autoscaling.models import TerminateInstanceActivity

        group, st = lifecycle.find(self, instance_id)
        if st is None:
            raise ValidationError(f"Instance Id not found - No managed instance found for instance ID: {instance_id}")
        if group.mixed_instances_policy:
            return orig_terminate(self, instance_id, should_decrement)
        original_size = group.desired_capacity
        if st.lifecycle_state.startswith("Terminating"):
            return TerminateInstanceActivity(st.instance, original_size)  # already on its way
        if should_decrement:
            group.desired_capacity = max(0, original_size - 1)
        # Deregistered, then Terminating:Wait under a terminating hook, else terminated now;
        # the group replaces it unless the desired capacity was decremented.
        lifecycle.begin_termination(self, group, st)
        lifecycle.reconcile(group)
        return TerminateInstanceActivity(st.instance, original_size)

    AutoScalingBackend.terminate_instance = terminate_instance  # type: ignore[method-assign]


def _impaired(body: Any) -> bool:
    """The instance's EC2 status check is `impaired`: its body died (a crash, not an app kill)."""
    if body is None:
        return False
    status_check = getattr(body, "status_check", None)
    if status_check is not None:
        return status_check() == "impaired"
    return body.booted() and not body.alive()


class AsgProcesses:
    def __init__(self, world: Any) -> None:
        self.world = world
        self.lock = health.moto_lock(world)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="world-asg", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()

    def _run(self) -> None:
        while not self.stop.wait(LOOP_SECONDS):
            try:
                with self.lock:
                    self.tick()
            except Exception:
                log.exception("asg tick failed")

    # The decisions, one group at a time. Called with the moto lock held.
    def tick(self) -> None:
        from moto.autoscaling.models import autoscaling_backends

        now = time.monotonic()
        live: set[str] = set()
        # Every region's groups (only backends that exist: none is created here).
        for _account, by_region in list(dict.items(autoscaling_backends)):
            for _region, backend in list(dict.items(by_region)):
                live |= self._tick_backend(backend, now)
        for iid in [i for i in _LAUNCHED if i not in live]:
            del _LAUNCHED[iid]

    def _tick_backend(self, backend: Any, now: float) -> set[str]:
        for group in list(backend.autoscaling_groups.values()):
            try:
                suspended = {p["ProcessName"] for p in group.suspended_processes}
                lifecycle.advance(backend, group)  # hook timeouts, Proceed states
                if "HealthCheck" not in suspended:
                    self._health_check(group, now)
                if "ReplaceUnhealthy" not in suspended and "Terminate" not in suspended:
                    self._replace_unhealthy(backend, group, launch="Launch" not in suspended)
                if not group.mixed_instances_policy:
                    warmpool.tick(backend, group)
                    lifecycle.reconcile(group, retry=True)  # desired capacity, protection, standby
            except Exception:  # one group's trouble does not stop the others'
                log.exception("asg tick: group %s", group.name)
        return {
            st.instance.id for g in backend.autoscaling_groups.values() for st in g.instance_states
        }

    def _health_check(self, group: Any, now: float) -> None:
        grace = float(group.health_check_grace_period or 0)
        for st in list(group.instance_states):
            if st.lifecycle_state != "InService" or st.health_status == "Unhealthy":
                continue
            iid = st.instance.id
            launched = _LAUNCHED.setdefault(iid, now)
            if st.instance.state != "running":
                self._mark(st, f"instance is {st.instance.state}")
                continue
            if now - launched < grace:
                continue
            if _impaired(self.world.bodies.get(iid)):
                self._mark(st, "EC2 status checks impaired")
                continue
            if (group.health_check_type or "EC2").upper() == "ELB":
                for arn in list(group.target_group_arns or []):
                    if health.target_state(arn, iid) == "unhealthy":
                        self._mark(st, f"unhealthy in target group {arn}")
                        break

    @staticmethod
    def _mark(st: Any, why: str) -> None:
        log.info("asg %s: instance %s Unhealthy (%s)", st.auto_scaling_group_name, st.instance.id, why)
        st.health_status = "Unhealthy"

    def _replace_unhealthy(self, backend: Any, group: Any, launch: bool) -> None:
        doomed = [
            st
            for st in group.instance_states
            if st.health_status == "Unhealthy" and st.lifecycle_state == "InService"
        ]
        if not doomed:
            return
        ids = [st.instance.id for st in doomed]
        log.info("asg %s: replacing unhealthy %s", group.name, ids)
        if not group.mixed_instances_policy:
            # Terminating (deregistered; Terminating:Wait under a terminating hook), whether or
            # not it is protected from scale in; the replacement launches at once.
            for st in doomed:
                lifecycle.begin_termination(backend, group, st)
            if launch:
                lifecycle.reconcile(group)
            return
        group.instance_states = [st for st in group.instance_states if st.instance.id not in ids]
        running = [st.instance.id for st in doomed if st.instance.state not in ("terminated",)]
        if running:
            backend.ec2_backend.terminate_instances(running)
        for iid in ids:
            _LAUNCHED.pop(iid, None)
        if launch:
            # moto's own capacity logic: launches the difference to DesiredCapacity and
            # registers the new instances with the group's target groups.
            group.set_desired_capacity(group.desired_capacity)
            backend.update_attached_elbs(group.name)


PROCESSES: AsgProcesses | None = None


def install(world: Any) -> AsgProcesses:
    global PROCESSES
    health.moto_lock(world)
    _patch_moto()
    lifecycle.install(world)
    warmpool.install(world)
    if PROCESSES is None:
        PROCESSES = AsgProcesses(world)
        PROCESSES.start()
    return PROCESSES
