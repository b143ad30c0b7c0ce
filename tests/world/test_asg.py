"""Auto Scaling `ReplaceUnhealthy` and `HealthCheck` processes (bakeryworld/asg.py)."""

from __future__ import annotations

import base64
import time
import uuid

import pytest

from conftest import wait_for
from test_health import APP_USER_DATA, elbv2_client, health_of, make_target_group


@pytest.fixture(scope="module")
def asg(world):
    return world.client("autoscaling")


@pytest.fixture(scope="module")
def elb(world):
    return elbv2_client(world)


@pytest.fixture
def group(world, ec2, asg):
    """Create ASGs (launch template from the base AMI, private subnets); delete them after."""
    made: list[str] = []

    def _make(*, desired=2, app=True, target_groups=(), health_check_type="EC2", grace=0):
        name = f"asg-{uuid.uuid4().hex[:8]}"
        data = {"ImageId": world.env["WORLD_BASE_AMI"], "InstanceType": "t3.micro"}
        if app:
            data["UserData"] = base64.b64encode(APP_USER_DATA.encode()).decode()
        lt = ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData=data)["LaunchTemplate"]
        asg.create_auto_scaling_group(
            AutoScalingGroupName=name,
            LaunchTemplate={"LaunchTemplateId": lt["LaunchTemplateId"], "Version": "$Latest"},
            MinSize=1,
            MaxSize=desired + 2,
            DesiredCapacity=desired,
            VPCZoneIdentifier=world.env["WORLD_PRIVATE_SUBNETS"],
            TargetGroupARNs=list(target_groups),
            HealthCheckType=health_check_type,
            HealthCheckGracePeriod=grace,
        )
        made.append(name)
        return name

    yield _make
    for name in made:
        try:
            asg.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
        except Exception:
            pass


def members(asg, name):
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    return {i["InstanceId"]: i["HealthStatus"] for i in g["Instances"]}


def instance_state(ec2, iid):
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]["Name"]


def has_body(ec2, iid):
    """A body writes its SSH host keys into the console output when it boots."""
    out = ec2.get_console_output(InstanceId=iid).get("Output") or ""
    if out and "BEGIN SSH HOST KEY" not in out:
        out = base64.b64decode(out).decode(errors="replace")
    return "BEGIN SSH HOST KEY" in out


def test_instance_marked_unhealthy_is_replaced(world, ec2, asg, group):
    name = group(desired=2, app=False)
    before = members(asg, name)
    assert len(before) == 2 and set(before.values()) == {"Healthy"}
    # Spread over the group's subnets (AZ balance), not all in the first one.
    subnets = {
        i["SubnetId"]
        for r in ec2.describe_instances(InstanceIds=list(before))["Reservations"]
        for i in r["Instances"]
    }
    assert len(subnets) == 2, subnets
    victim = sorted(before)[0]
    asg.set_instance_health(InstanceId=victim, HealthStatus="Unhealthy")

    wait_for(lambda: victim not in members(asg, name), timeout=10, what="unhealthy instance leaves the group")
    assert instance_state(ec2, victim) in ("shutting-down", "terminated")
    after = wait_for(lambda: (m := members(asg, name)) and len(m) == 2 and m, timeout=10, what="capacity kept")
    (new,) = set(after) - set(before)
    assert instance_state(ec2, new) == "running"
    # The replacement is a real instance: it gets a body that boots.
    wait_for(lambda: has_body(ec2, new), timeout=20, what=f"body of replacement {new}")


def test_unhealthy_instance_is_kept_while_replace_unhealthy_is_suspended(world, ec2, asg, group):
    name = group(desired=2, app=False)
    victim = sorted(members(asg, name))[0]
    asg.suspend_processes(AutoScalingGroupName=name, ScalingProcesses=["ReplaceUnhealthy"])
    asg.set_instance_health(InstanceId=victim, HealthStatus="Unhealthy")
    time.sleep(3)  # six loops of the world's ASG processes
    m = members(asg, name)
    assert m.get(victim) == "Unhealthy", m
    assert instance_state(ec2, victim) == "running"

    asg.resume_processes(AutoScalingGroupName=name, ScalingProcesses=["ReplaceUnhealthy"])
    wait_for(lambda: victim not in members(asg, name), timeout=10, what="replacement after resume")
    wait_for(lambda: len(members(asg, name)) == 2, timeout=10, what="capacity kept")


def test_elb_health_check_marks_unhealthy_only_after_grace(world, ec2, asg, elb, group):
    # No app: every target fails its checks and is `unhealthy` within ~3 s of registration.
    tg = make_target_group(world, elb)["TargetGroupArn"]
    grace = 8
    name = group(desired=1, app=False, target_groups=[tg], health_check_type="ELB", grace=grace)
    t0 = time.time()
    (iid,) = members(asg, name)
    wait_for(lambda: (health_of(elb, tg, iid) or {}).get("State") == "unhealthy", timeout=10, what="target unhealthy")
    assert time.time() - t0 < grace - 2, "target turned unhealthy too late to test the grace period"
    # Within the grace period the ASG leaves it alone ...
    time.sleep(max(0.0, grace - 2 - (time.time() - t0)))
    assert members(asg, name) == {iid: "Healthy"}
    # ... after it, HealthCheck marks it and ReplaceUnhealthy replaces it.
    wait_for(lambda: iid not in members(asg, name), timeout=grace + 5, what="replaced after grace")
    assert time.time() - t0 >= grace


def test_elb_health_check_replaces_crashed_app(world, ec2, asg, elb, group):
    tg = make_target_group(world, elb)["TargetGroupArn"]
    name = group(desired=2, app=True, target_groups=[tg], health_check_type="ELB", grace=6)

    def all_healthy():
        m = members(asg, name)
        return len(m) == 2 and all((health_of(elb, tg, i) or {}).get("State") == "healthy" for i in m) and m

    before = wait_for(all_healthy, timeout=30, what="2 healthy targets")
    victim = sorted(before)[0]
    assert world.cli("kill", victim).returncode == 0
    wait_for(lambda: victim not in members(asg, name), timeout=10, what="crashed instance replaced")
    after = wait_for(all_healthy, timeout=30, what="fleet healthy again")
    assert victim not in after and len(set(after) - set(before)) == 1


def test_elb_health_check_suspended_leaves_unhealthy_target_in_service(world, ec2, asg, elb, group):
    tg = make_target_group(world, elb)["TargetGroupArn"]
    grace = 6
    t0 = time.time()
    name = group(desired=1, app=True, target_groups=[tg], health_check_type="ELB", grace=grace)
    (iid,) = members(asg, name)
    wait_for(lambda: (health_of(elb, tg, iid) or {}).get("State") == "healthy", timeout=30, what="healthy")
    asg.suspend_processes(AutoScalingGroupName=name, ScalingProcesses=["HealthCheck"])
    assert world.cli("kill", iid).returncode == 0
    wait_for(lambda: health_of(elb, tg, iid)["State"] == "unhealthy", timeout=10, what="target unhealthy")
    # Well past the grace period, and unhealthy in its target group: still Healthy in the ASG.
    time.sleep(max(2.0, t0 + grace + 2 - time.time()))
    assert health_of(elb, tg, iid)["State"] == "unhealthy"
    assert members(asg, name) == {iid: "Healthy"}
    # A daemon that suspended HealthCheck decides itself: SetInstanceHealth still replaces.
    asg.set_instance_health(InstanceId=iid, HealthStatus="Unhealthy")
    wait_for(lambda: iid not in members(asg, name), timeout=10, what="replaced by the daemon's decision")


def test_scale_in_deregisters_terminated_instances(world, ec2, asg, elb, group):
    tg = make_target_group(world, elb)["TargetGroupArn"]
    name = group(desired=2, app=False, target_groups=[tg])
    wait_for(lambda: len(members(asg, name)) == 2, timeout=10, what="2 instances")
    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=1)
    (kept,) = wait_for(lambda: len(m := members(asg, name)) == 1 and m, timeout=10, what="scale in")
    listed = lambda: {d["Target"]["Id"] for d in elb.describe_target_health(TargetGroupArn=tg)["TargetHealthDescriptions"]}  # noqa: E731
    wait_for(lambda: listed() == {kept}, timeout=10, what="terminated instance drained out")


def test_impaired_status_check_marks_unhealthy_after_grace(world, ec2, asg, group):
    name = group(desired=1, app=False, grace=2)
    (iid,) = members(asg, name)
    wait_for(lambda: has_body(ec2, iid), timeout=20, what="booted")
    assert world.cli("crash", iid).returncode == 0  # the body dies, the instance stays running
    wait_for(lambda: iid not in members(asg, name), timeout=10, what="impaired instance replaced")
    wait_for(lambda: len(members(asg, name)) == 1, timeout=10, what="capacity kept")


def test_instances_report_the_launch_template_version_they_were_launched_with(world, ec2, asg):
    """AWS lists each instance's own template version (a rollout's old and new instances
    differ); moto 5.2.5 listed the group's template at its *default* version for all of them."""
    name = f"asg-ltv-{uuid.uuid4().hex[:8]}"
    lt = ec2.create_launch_template(
        LaunchTemplateName=name,
        LaunchTemplateData={"ImageId": world.env["WORLD_BASE_AMI"], "InstanceType": "t3.micro"},
    )["LaunchTemplate"]["LaunchTemplateId"]
    ec2.create_launch_template_version(LaunchTemplateId=lt, SourceVersion="1", LaunchTemplateData={"InstanceType": "t3.small"})
    # Version 1 stays the default: the group pins version 2.
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateId": lt, "Version": "2"},
        MinSize=0, MaxSize=3, DesiredCapacity=1, VPCZoneIdentifier=world.env["WORLD_PRIVATE_SUBNETS"],
    )
    try:
        def versions():
            g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
            return g["LaunchTemplate"]["Version"], {i["InstanceId"]: i["LaunchTemplate"] for i in g["Instances"]}

        group_version, insts = versions()
        assert group_version == "2"
        ((old, spec),) = insts.items()
        assert spec == {"LaunchTemplateId": lt, "LaunchTemplateName": name, "Version": "2"}
        # A new version, the group moves to $Latest and scales out: the new instance reports the
        # version number it was launched with, the old one keeps its own.
        ec2.create_launch_template_version(LaunchTemplateId=lt, SourceVersion="1", LaunchTemplateData={"InstanceType": "t3.medium"})
        asg.update_auto_scaling_group(
            AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateId": lt, "Version": "$Latest"}, DesiredCapacity=2,
        )
        group_version, insts = wait_for(lambda: (v := versions()) and len(v[1]) == 2 and v, timeout=10, what="scale out")
        assert group_version == "$Latest"
        assert {i: s["Version"] for i, s in insts.items()} == {old: "2", **{i: "3" for i in insts if i != old}}
        details = asg.describe_auto_scaling_instances(InstanceIds=list(insts))["AutoScalingInstances"]
        assert {d["InstanceId"]: d["LaunchTemplate"]["Version"] for d in details} == {i: s["Version"] for i, s in insts.items()}
        types = {
            i["InstanceId"]: i["InstanceType"]
            for r in ec2.describe_instances(InstanceIds=list(insts))["Reservations"] for i in r["Instances"]
        }
        assert types[old] == "t3.small" and {t for i, t in types.items() if i != old} == {"t3.medium"}
    finally:
        asg.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)


def test_terminating_an_instance_no_group_manages_is_a_validation_error(world):
    from botocore.exceptions import ClientError

    client = world.client("autoscaling", retries=0)
    with pytest.raises(ClientError) as e:
        client.terminate_instance_in_auto_scaling_group(InstanceId="i-0123456789abcdef0", ShouldDecrementDesiredCapacity=True)
    err = e.value.response["Error"]
    assert err["Code"] == "ValidationError" and "not found" in err["Message"], err
