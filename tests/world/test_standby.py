"""Standby and scale-in protection (bakeryworld/lifecycle.py), through the Auto Scaling API."""

from __future__ import annotations

import pytest

from conftest import wait_for
from test_health import elbv2_client, make_target_group
from test_lifecycle import desired, ec2_state, error_of, group, instances, registered, steady  # noqa: F401


@pytest.fixture(scope="module")
def asg(world):
    return world.client("autoscaling", retries=0)


@pytest.fixture(scope="module")
def elb(world):
    return elbv2_client(world)


def protection(asg, ids) -> dict[str, bool]:
    return {i["InstanceId"]: i["ProtectedFromScaleIn"]
            for i in asg.describe_auto_scaling_instances(InstanceIds=list(ids))["AutoScalingInstances"]}


def health(asg, name) -> dict[str, str]:
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    return {i["InstanceId"]: i["HealthStatus"] for i in g["Instances"]}


# ------------------------------------------------------------------------------ standby


def test_standby_leaves_the_target_group_and_exit_standby_brings_it_back(world, ec2, asg, elb, group):
    tg = make_target_group(world, elb)["TargetGroupArn"]
    name = group(desired=2, min_size=1, max_size=3, app=True, target_groups=[tg])
    ids = set(instances(asg, name))
    wait_for(lambda: all(registered(elb, tg).get(i) == "healthy" for i in ids), timeout=30, what="2 healthy")
    victim = sorted(ids)[0]

    (activity,) = asg.enter_standby(AutoScalingGroupName=name, InstanceIds=[victim],
                                    ShouldDecrementDesiredCapacity=True)["Activities"]
    assert activity["Description"] == f"Moving EC2 instance to StandBy: {victim}"
    assert instances(asg, name)[victim] == "Standby" and desired(asg, name) == 1
    # Deregistered (draining, then gone); still in the group; no replacement (decremented).
    assert registered(elb, tg).get(victim) == "draining"
    wait_for(lambda: victim not in registered(elb, tg), timeout=5, what="drained")
    steady(lambda: instances(asg, name).keys() == ids, 1.5, "no replacement while decremented")
    assert ec2_state(ec2, victim) == "running"

    asg.exit_standby(AutoScalingGroupName=name, InstanceIds=[victim])
    assert desired(asg, name) == 2
    wait_for(lambda: instances(asg, name) == {i: "InService" for i in ids}, timeout=3, what="InService again")
    wait_for(lambda: registered(elb, tg).get(victim) == "healthy", timeout=10, what="registered again")


def test_standby_without_decrement_launches_a_replacement(world, asg, group):
    name = group(desired=2, min_size=1, max_size=4)
    ids = set(instances(asg, name))
    victim = sorted(ids)[0]
    asg.enter_standby(AutoScalingGroupName=name, InstanceIds=[victim], ShouldDecrementDesiredCapacity=False)
    m = instances(asg, name)
    assert desired(asg, name) == 2 and len(m) == 3 and m[victim] == "Standby"
    assert sorted(v for i, v in m.items() if i != victim) == ["InService", "InService"]
    # Back in service, the desired capacity is incremented: all three are kept.
    asg.exit_standby(AutoScalingGroupName=name, InstanceIds=[victim])
    assert desired(asg, name) == 3
    wait_for(lambda: list(instances(asg, name).values()) == ["InService"] * 3, timeout=3, what="3 InService")


def test_a_standby_instance_is_not_health_checked(world, ec2, asg, group):
    name = group(desired=1, min_size=0, max_size=2, grace=0)
    (iid,) = instances(asg, name)
    asg.enter_standby(AutoScalingGroupName=name, InstanceIds=[iid], ShouldDecrementDesiredCapacity=True)
    wait_for(lambda: world.cli("crash", iid).returncode == 0, timeout=20, what="body up to crash")
    wait_for(lambda: (ec2.describe_instance_status(InstanceIds=[iid])["InstanceStatuses"] or [{}])[0]
             .get("InstanceStatus", {}).get("Status") == "impaired", timeout=5, what="impaired")
    # An InService instance would be replaced within a tick; a Standby one keeps its health.
    steady(lambda: instances(asg, name) == {iid: "Standby"} and health(asg, name) == {iid: "Healthy"}, 2, "left alone")


def test_standby_validation_errors(world, asg, group):
    name = group(desired=1, min_size=1, max_size=2)
    (iid,) = instances(asg, name)
    code, msg = error_of(lambda: asg.enter_standby(AutoScalingGroupName=name, InstanceIds=[iid],
                                                   ShouldDecrementDesiredCapacity=True))
    assert code == "ValidationError" and "min-size=1" in msg and "standby" in msg
    code, msg = error_of(lambda: asg.exit_standby(AutoScalingGroupName=name, InstanceIds=[iid]))
    assert code == "ValidationError" and "not in Standby" in msg
    code, msg = error_of(lambda: asg.enter_standby(AutoScalingGroupName=name, InstanceIds=["i-0123456789abcdef0"],
                                                   ShouldDecrementDesiredCapacity=False))
    assert code == "ValidationError" and "not part of Auto Scaling group" in msg
    asg.enter_standby(AutoScalingGroupName=name, InstanceIds=[iid], ShouldDecrementDesiredCapacity=False)
    code, msg = error_of(lambda: asg.enter_standby(AutoScalingGroupName=name, InstanceIds=[iid],
                                                   ShouldDecrementDesiredCapacity=False))
    assert code == "ValidationError" and "not in InService" in msg


# ------------------------------------------------------------------------------ scale-in protection


def test_scale_in_terminates_only_unprotected_instances(world, ec2, asg, group):
    name = group(desired=3, min_size=0, max_size=4)
    ids = sorted(instances(asg, name))
    keep = ids[:2]
    asg.set_instance_protection(AutoScalingGroupName=name, InstanceIds=keep, ProtectedFromScaleIn=True)
    assert protection(asg, ids) == {ids[0]: True, ids[1]: True, ids[2]: False}

    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=1)
    # The unprotected one goes; the group cannot go below its two protected instances, but the
    # desired capacity is lowered all the same (as the user guide says).
    assert set(instances(asg, name)) == set(keep) and desired(asg, name) == 1
    assert ec2_state(ec2, ids[2]) in ("shutting-down", "terminated")
    steady(lambda: set(instances(asg, name)) == set(keep), 1.5, "protected instances stay")
    # Protection removed: the group scales in to its desired capacity.
    asg.set_instance_protection(AutoScalingGroupName=name, InstanceIds=[keep[1]], ProtectedFromScaleIn=False)
    wait_for(lambda: set(instances(asg, name)) == {keep[0]}, timeout=3, what="scaled in to 1")


def test_new_instances_protected_from_scale_in(world, asg, group):
    name = group(desired=2, min_size=0, max_size=3, protected=True)
    ids = set(instances(asg, name))
    assert set(protection(asg, ids).values()) == {True}
    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=0)
    assert desired(asg, name) == 0
    steady(lambda: set(instances(asg, name)) == ids, 1.5, "all protected: nothing terminated")
    # The group setting applies to instances launched from now on only.
    asg.update_auto_scaling_group(AutoScalingGroupName=name, NewInstancesProtectedFromScaleIn=False, DesiredCapacity=3)
    new = wait_for(lambda: (m := set(instances(asg, name)) - ids) and m, timeout=3, what="scale out")
    assert protection(asg, new) == {i: False for i in new}


def test_health_replacement_ignores_scale_in_protection(world, ec2, asg, group):
    name = group(desired=1, min_size=1, max_size=2, protected=True)
    (iid,) = instances(asg, name)
    asg.set_instance_health(InstanceId=iid, HealthStatus="Unhealthy")
    after = wait_for(lambda: (m := instances(asg, name)) and iid not in m and m, timeout=5, what="replaced")
    assert list(after.values()) == ["InService"]
    assert ec2_state(ec2, iid) in ("shutting-down", "terminated")


def test_set_instance_protection_of_a_stranger_is_a_validation_error(world, asg, group):
    name = group(desired=1)
    code, msg = error_of(lambda: asg.set_instance_protection(
        AutoScalingGroupName=name, InstanceIds=["i-0123456789abcdef0"], ProtectedFromScaleIn=True))
    assert code == "ValidationError" and "not part of Auto Scaling group" in msg
