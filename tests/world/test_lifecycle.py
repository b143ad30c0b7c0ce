"""Auto Scaling lifecycle hooks (bakeryworld/lifecycle.py), through the Auto Scaling API.

Heartbeat timeouts of a few seconds are world-only (AWS's minimum is 30 s).
"""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
from botocore.exceptions import ClientError

from conftest import wait_for
from test_health import APP_USER_DATA, elbv2_client, health_of, make_target_group

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"


@pytest.fixture(scope="module")
def asg(world):
    return world.client("autoscaling", retries=0)


@pytest.fixture(scope="module")
def elb(world):
    return elbv2_client(world)


@pytest.fixture
def group(world, ec2, asg):
    """Make ASGs from the base AMI in the private subnets; ForceDelete them after."""
    made: list[str] = []

    def _make(*, desired=1, min_size=0, max_size=4, app=False, target_groups=(), hooks=(), user_data=None,
              health_check_type="EC2", grace=0, protected=False) -> str:
        name = f"lc-{uuid.uuid4().hex[:8]}"
        data = {"ImageId": world.env["WORLD_BASE_AMI"], "InstanceType": "t3.micro"}
        ud = user_data or (APP_USER_DATA if app else None)
        if ud:
            data["UserData"] = base64.b64encode(ud.encode()).decode()
        lt = ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData=data)["LaunchTemplate"]
        kw = {"LifecycleHookSpecificationList": list(hooks)} if hooks else {}
        asg.create_auto_scaling_group(
            AutoScalingGroupName=name,
            LaunchTemplate={"LaunchTemplateId": lt["LaunchTemplateId"], "Version": "$Latest"},
            MinSize=min_size, MaxSize=max_size, DesiredCapacity=desired,
            VPCZoneIdentifier=world.env["WORLD_PRIVATE_SUBNETS"], TargetGroupARNs=list(target_groups),
            HealthCheckType=health_check_type, HealthCheckGracePeriod=grace,
            NewInstancesProtectedFromScaleIn=protected, **kw,
        )
        made.append(name)
        return name

    yield _make
    for name in made:
        try:
            asg.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
        except ClientError:
            pass


def instances(asg, name) -> dict[str, str]:
    """instance id -> LifecycleState, as DescribeAutoScalingGroups lists them."""
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    return {i["InstanceId"]: i["LifecycleState"] for i in g["Instances"]}


def desired(asg, name) -> int:
    return asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]["DesiredCapacity"]


def ec2_state(ec2, iid) -> str:
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]["Name"]


def registered(elb, tg) -> dict[str, str]:
    return {d["Target"]["Id"]: d["TargetHealth"]["State"]
            for d in elb.describe_target_health(TargetGroupArn=tg)["TargetHealthDescriptions"]}


def error_of(fn) -> tuple[str, str]:
    with pytest.raises(ClientError) as e:
        fn()
    return e.value.response["Error"]["Code"], e.value.response["Error"]["Message"]


def hook(name, transition, timeout, result="ABANDON", **kw) -> dict:
    return {"LifecycleHookName": name, "LifecycleTransition": transition, "HeartbeatTimeout": timeout,
            "DefaultResult": result, **kw}


def steady(pred, seconds: float, what: str) -> None:
    """`pred` holds for `seconds` (several ticks of the world's 0.5 s Auto Scaling loop)."""
    end = time.time() + seconds
    while time.time() < end:
        assert pred(), what
        time.sleep(0.2)


def test_launching_hook_holds_the_instance_in_pending_wait_until_completed(world, ec2, asg, elb, group):
    tg = make_target_group(world, elb)["TargetGroupArn"]
    name = group(desired=1, app=True, target_groups=[tg], hooks=[hook("launch", LAUNCHING, 300)])
    ((iid, state),) = instances(asg, name).items()
    assert state == "Pending:Wait"
    (detail,) = asg.describe_auto_scaling_instances(InstanceIds=[iid])["AutoScalingInstances"]
    assert detail["LifecycleState"] == "Pending:Wait"
    (h,) = asg.describe_lifecycle_hooks(AutoScalingGroupName=name)["LifecycleHooks"]
    assert (h["LifecycleHookName"], h["LifecycleTransition"], h["HeartbeatTimeout"], h["DefaultResult"],
            h["GlobalTimeout"]) == ("launch", LAUNCHING, 300, "ABANDON", 30000)
    # The instance runs (a custom action could configure it) but gets no traffic: it is not
    # registered, and the group does not launch another for it.
    assert ec2_state(ec2, iid) == "running"
    steady(lambda: instances(asg, name) == {iid: "Pending:Wait"} and iid not in registered(elb, tg), 2, "waiting")

    asg.complete_lifecycle_action(AutoScalingGroupName=name, LifecycleHookName="launch", InstanceId=iid,
                                  LifecycleActionResult="CONTINUE")
    wait_for(lambda: instances(asg, name) == {iid: "InService"}, timeout=3, what="InService")
    wait_for(lambda: registered(elb, tg).get(iid) == "healthy", timeout=20, what="registered and healthy")
    # Its action is over: completing it again is an error, as on AWS.
    code, msg = error_of(lambda: asg.complete_lifecycle_action(
        AutoScalingGroupName=name, LifecycleHookName="launch", InstanceId=iid, LifecycleActionResult="CONTINUE"))
    assert code == "ValidationError" and f"No active Lifecycle Action found with instance ID {iid}" in msg


def test_heartbeat_timeout_takes_the_default_result_and_a_heartbeat_extends_it(world, ec2, asg, group):
    name = group(desired=0)
    asg.put_lifecycle_hook(AutoScalingGroupName=name, LifecycleHookName="slow", LifecycleTransition=LAUNCHING,
                           HeartbeatTimeout=3, DefaultResult="CONTINUE")
    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=1)
    t0 = time.time()
    ((iid, state),) = instances(asg, name).items()
    assert state == "Pending:Wait"
    time.sleep(max(0.0, t0 + 1.5 - time.time()))  # half way through the heartbeat timeout
    asg.record_lifecycle_action_heartbeat(AutoScalingGroupName=name, LifecycleHookName="slow", InstanceId=iid)
    # Past the first timeout (t0 + 3): the heartbeat restarted it (now t0 + 4.5).
    time.sleep(max(0.0, t0 + 3.6 - time.time()))
    assert instances(asg, name) == {iid: "Pending:Wait"}
    wait_for(lambda: instances(asg, name) == {iid: "InService"}, timeout=4, what="DefaultResult CONTINUE")
    assert time.time() - t0 >= 4.4


def test_abandon_terminates_the_instance_and_the_group_replaces_it(world, ec2, asg, group):
    name = group(desired=0)
    asg.put_lifecycle_hook(AutoScalingGroupName=name, LifecycleHookName="gate", LifecycleTransition=LAUNCHING,
                           HeartbeatTimeout=2)  # DefaultResult: ABANDON
    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=1)
    (first,) = instances(asg, name)
    # Times out, ABANDON: terminated, and a replacement waits in its turn.
    second = wait_for(lambda: (m := instances(asg, name)) and first not in m and m, timeout=5, what="replaced")
    assert list(second.values()) == ["Pending:Wait"]
    wait_for(lambda: ec2_state(ec2, first) in ("shutting-down", "terminated"), timeout=3, what="terminated")
    # An explicit ABANDON does the same, at once.
    (iid,) = second
    asg.complete_lifecycle_action(AutoScalingGroupName=name, LifecycleHookName="gate", InstanceId=iid,
                                  LifecycleActionResult="ABANDON")
    third = wait_for(lambda: (m := instances(asg, name)) and iid not in m and m, timeout=3, what="replaced again")
    assert list(third.values()) == ["Pending:Wait"]
    assert ec2_state(ec2, iid) in ("shutting-down", "terminated")


def test_terminating_hook_deregisters_then_waits_before_terminating(world, ec2, asg, elb, group):
    tg = make_target_group(world, elb)["TargetGroupArn"]
    name = group(desired=1, app=True, target_groups=[tg], hooks=[hook("drain", TERMINATING, 300, "CONTINUE")])
    ((iid, state),) = instances(asg, name).items()
    assert state == "InService"  # no launching hook
    wait_for(lambda: registered(elb, tg).get(iid) == "healthy", timeout=20, what="healthy")

    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=0)
    assert instances(asg, name) == {iid: "Terminating:Wait"}
    # Deregistered first (draining), while the instance still runs for the custom action.
    assert registered(elb, tg).get(iid) == "draining"
    steady(lambda: instances(asg, name) == {iid: "Terminating:Wait"} and ec2_state(ec2, iid) == "running", 1.5, "waits")

    asg.complete_lifecycle_action(AutoScalingGroupName=name, LifecycleHookName="drain", InstanceId=iid,
                                  LifecycleActionResult="CONTINUE")
    wait_for(lambda: instances(asg, name) == {}, timeout=3, what="gone from the group")
    assert ec2_state(ec2, iid) in ("shutting-down", "terminated")


def test_terminate_instance_in_auto_scaling_group_runs_the_terminating_hook(world, ec2, asg, group):
    name = group(desired=1, hooks=[hook("drain", TERMINATING, 2, "ABANDON")])
    (iid,) = instances(asg, name)
    asg.terminate_instance_in_auto_scaling_group(InstanceId=iid, ShouldDecrementDesiredCapacity=False)
    m = instances(asg, name)
    assert m[iid] == "Terminating:Wait"
    # Not decremented: the replacement launches at once, beside the waiting instance.
    assert sorted(m.values()) == ["InService", "Terminating:Wait"] and desired(asg, name) == 1
    # ABANDON on a terminating instance also goes on to terminate it (after the 2 s timeout).
    wait_for(lambda: iid not in instances(asg, name), timeout=5, what="terminated after the timeout")
    assert ec2_state(ec2, iid) in ("shutting-down", "terminated")


def test_notifications_carry_the_token_that_completes_the_action(world, asg, group):
    sqs = world.client("sqs")
    url = sqs.create_queue(QueueName=f"hooks-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    name = group(desired=0)
    asg.put_lifecycle_hook(AutoScalingGroupName=name, LifecycleHookName="notify", LifecycleTransition=LAUNCHING,
                           HeartbeatTimeout=300, NotificationTargetARN=arn,
                           RoleARN="arn:aws:iam::123456789012:role/hooks", NotificationMetadata="hello")

    def messages(n):
        got = []
        deadline = time.time() + 5
        while len(got) < n and time.time() < deadline:
            for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
                got.append(json.loads(m["Body"]))
                sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        return got

    (test,) = messages(1)
    assert (test["Event"], test["AutoScalingGroupName"]) == ("autoscaling:TEST_NOTIFICATION", name)
    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=1)
    (msg,) = messages(1)
    (iid,) = instances(asg, name)
    assert (msg["LifecycleTransition"], msg["EC2InstanceId"], msg["LifecycleHookName"], msg["NotificationMetadata"]) == (
        LAUNCHING, iid, "notify", "hello")
    assert len(msg["LifecycleActionToken"]) == 36
    bad = str(uuid.uuid4())
    code, text = error_of(lambda: asg.complete_lifecycle_action(
        AutoScalingGroupName=name, LifecycleHookName="notify", LifecycleActionToken=bad, LifecycleActionResult="CONTINUE"))
    assert code == "ValidationError" and bad in text
    asg.complete_lifecycle_action(AutoScalingGroupName=name, LifecycleHookName="notify",
                                  LifecycleActionToken=msg["LifecycleActionToken"], LifecycleActionResult="CONTINUE")
    wait_for(lambda: instances(asg, name) == {iid: "InService"}, timeout=3, what="InService")
    (h,) = asg.describe_lifecycle_hooks(AutoScalingGroupName=name)["LifecycleHooks"]
    assert (h["NotificationTargetARN"], h["RoleARN"], h["NotificationMetadata"]) == (
        arn, "arn:aws:iam::123456789012:role/hooks", "hello")


def test_deleting_a_hook_completes_its_outstanding_actions(world, ec2, asg, group):
    name = group(desired=0)
    asg.put_lifecycle_hook(AutoScalingGroupName=name, LifecycleHookName="gate", LifecycleTransition=LAUNCHING,
                           HeartbeatTimeout=300, DefaultResult="CONTINUE")
    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=1)
    (iid,) = instances(asg, name)
    asg.delete_lifecycle_hook(AutoScalingGroupName=name, LifecycleHookName="gate")
    # ABANDON for a launching instance; its replacement has no hook to wait for.
    m = wait_for(lambda: (m := instances(asg, name)) and iid not in m and m, timeout=3, what="abandoned")
    assert list(m.values()) == ["InService"]
    assert asg.describe_lifecycle_hooks(AutoScalingGroupName=name)["LifecycleHooks"] == []


def test_lifecycle_action_errors(world, asg, group):
    name = group(desired=1, hooks=[hook("launch", LAUNCHING, 300)])
    (iid,) = instances(asg, name)
    code, msg = error_of(lambda: asg.complete_lifecycle_action(
        AutoScalingGroupName=name, LifecycleHookName="nope", InstanceId=iid, LifecycleActionResult="CONTINUE"))
    assert code == "ValidationError" and "nope" in msg
    code, _ = error_of(lambda: asg.record_lifecycle_action_heartbeat(
        AutoScalingGroupName=name, LifecycleHookName="launch", InstanceId="i-0123456789abcdef0"))
    assert code == "ValidationError"
    code, _ = error_of(lambda: asg.put_lifecycle_hook(
        AutoScalingGroupName=name, LifecycleHookName="x", LifecycleTransition="autoscaling:EC2_INSTANCE_REBOOTING"))
    assert code == "ValidationError"
    # A group's hooks go with it (a new group of that name starts without them).
    asg.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
    assert asg.describe_lifecycle_hooks(AutoScalingGroupName=name)["LifecycleHooks"] == []
