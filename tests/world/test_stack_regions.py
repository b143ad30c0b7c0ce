"""`scripts/world up --stack` over two Regions (bakeryworld/stack.py, regions.py, health.py).

What a boto3 caller sees in the second Region (eu-west-1): the stack's group `InService` from
a copy of the home Region's stack image, its targets `healthy` by real health checks (the
world's checker probes every Region's target groups), a CloudWatch alarm on that Region's
target group going to `ALARM` when its instances are killed and back to `OK` once the group
replaced them, and lifecycle hooks, standby and warm pools behaving there as at home.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from bakeryworld import regions as regions_mod
from conftest import read_env, wait_for

HOME, OTHER = "us-east-1", "eu-west-1"
R = regions_mod.suffix(OTHER)  # EU_WEST_1
LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"


def client(world, service: str, region: str = OTHER, creds: dict | None = None):
    cfg = Config(retries={"mode": "standard", "max_attempts": 5})
    if service == "elbv2":  # the world's 1 s health-check interval is below boto3's minimum
        cfg = cfg.merge(Config(parameter_validation=False))
    creds = creds or {"aws_access_key_id": world.env["AWS_ACCESS_KEY_ID"],
                      "aws_secret_access_key": world.env["AWS_SECRET_ACCESS_KEY"]}
    return boto3.client(service, endpoint_url=world.env["AWS_ENDPOINT_URL"], region_name=region, config=cfg, **creds)


@pytest.fixture(scope="module")
def stack2(world):
    """The home stack (reused if a module before made it), then the same stack grown into
    eu-west-1 with `--groups us-east-1=1,eu-west-1=1`."""
    env_path = Path(world.env["WORLD_DIR"]) / "env"
    p = world.cli("up", "--stack", timeout=300)
    assert p.returncode == 0, f"up --stack failed:\n{p.stdout}\n{p.stderr}"
    home = read_env(env_path)
    t0 = time.time()
    p = world.cli("up", "--stack", "--groups", f"{HOME}=1,{OTHER}=1", timeout=300)
    assert p.returncode == 0, f"up --stack --groups {HOME}=1,{OTHER}=1 failed:\n{p.stdout}\n{p.stderr}"
    env = read_env(env_path)
    env["_home"] = json.dumps(home)
    yield env
    # Keep the session world light for the modules after this one.
    asg = client(world, "autoscaling")
    for g in env["WORLD_STACK_GROUPS"].split(","):
        region, name = g.split("/", 1)
        if region == OTHER:
            try:
                asg.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
            except ClientError:
                pass


def other_groups(env) -> list[tuple[str, str, str]]:
    """(group, target group ARN, launch template id) of the eu-west-1 stack, from the env lists."""
    rows = zip(env["WORLD_STACK_GROUPS"].split(","), env["WORLD_STACK_TARGET_GROUPS"].split(","),
               env["WORLD_STACK_LAUNCH_TEMPLATES"].split(","))
    return [(g.split("/", 1)[1], tg, lt) for g, tg, lt in rows if g.startswith(OTHER + "/")]


def steady(pred, seconds: float, what: str) -> None:
    """`pred` holds for `seconds` (several ticks of the world's 0.5 s Auto Scaling loop)."""
    end = time.time() + seconds
    while time.time() < end:
        assert pred(), what
        time.sleep(0.2)


def members(asg, name) -> dict[str, str]:
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    return {i["InstanceId"]: i["LifecycleState"] for i in g["Instances"]}


def health(elb, tg) -> dict[str, dict]:
    return {d["Target"]["Id"]: d["TargetHealth"]
            for d in elb.describe_target_health(TargetGroupArn=tg)["TargetHealthDescriptions"]}


def arn_dims(tg_arn: str, lb_arn: str) -> list[dict]:
    """CloudWatch dimensions of a target group behind a load balancer (ARN suffixes, as ELB's)."""
    return [{"Name": "TargetGroup", "Value": tg_arn.split(":")[-1]},
            {"Name": "LoadBalancer", "Value": lb_arn.split(":loadbalancer/")[-1]}]


# ----------------------------------------------------------------------------- pure parts
def test_groups_flag_takes_a_count_or_a_count_per_region():
    assert regions_mod.parse_groups("2") == 2
    assert regions_mod.parse_groups(f"{HOME}=2,{OTHER}=1") == {HOME: 2, OTHER: 1}
    for bad in ("0", "x", f"{OTHER}=1", f"{HOME}=0", f"{HOME}=1,{HOME}=2", f"{HOME}=a"):
        with pytest.raises(ValueError):
            regions_mod.parse_groups(bad)


def test_stack_plan_keeps_what_a_warm_stack_has_and_adds_what_is_missing():
    world_regions = [HOME, OTHER, "ap-northeast-2"]
    cold: dict[str, str] = {}
    # N in the home Region only, unless --regions is given or --groups names Regions.
    assert regions_mod.stack_plan(1, None, world_regions, cold) == (True, {HOME: 1})
    assert regions_mod.stack_plan(2, [HOME, OTHER], world_regions, cold) == (True, {HOME: 2, OTHER: 2})
    assert regions_mod.stack_plan({HOME: 2, OTHER: 1}, None, world_regions, cold) == (True, {HOME: 2, OTHER: 1})
    warm = {"WORLD_ASG": "world-web",
            "WORLD_STACK_GROUPS": f"{HOME}/world-web,{HOME}/world-web-2,{OTHER}/world-web"}
    assert regions_mod.stack_plan(1, None, world_regions, warm) == (False, {HOME: 2, OTHER: 1})
    assert regions_mod.stack_plan({HOME: 1, OTHER: 1}, None, world_regions, warm) == (False, {HOME: 2, OTHER: 1})
    assert regions_mod.stack_plan({HOME: 1, OTHER: 2}, None, world_regions, warm) == (True, {HOME: 2, OTHER: 2})
    with pytest.raises(ValueError, match="not a Region of the world"):
        regions_mod.stack_plan({HOME: 1, "us-west-2": 1}, None, world_regions, cold)


# ----------------------------------------------------------------------------- the stack
def test_env_lists_both_regions_home_first(world, stack2):
    home = json.loads(stack2["_home"])
    groups = stack2["WORLD_STACK_GROUPS"].split(",")
    # The home Region's groups first and unchanged (a module before may have added world-web-2).
    assert groups[: len(home["WORLD_STACK_GROUPS"].split(","))] == home["WORLD_STACK_GROUPS"].split(",")
    assert groups[-1] == f"{OTHER}/world-web" and all(g.startswith(HOME + "/") for g in groups[:-1])
    assert len(stack2["WORLD_STACK_TARGET_GROUPS"].split(",")) == len(groups)
    assert len(stack2["WORLD_STACK_LAUNCH_TEMPLATES"].split(",")) == len(groups)
    for key in ("WORLD_ASG", "WORLD_STACK_AMI", "WORLD_TARGET_GROUP_ARN", "WORLD_ALB_ARN"):
        assert stack2[key] == home[key], key
    assert stack2["WORLD_STACK_REGIONS"] == f"{HOME},{OTHER}"
    assert json.loads(stack2["WORLD_STACK_AMIS"]) == {HOME: stack2["WORLD_STACK_AMI"], OTHER: stack2[f"WORLD_STACK_AMI_{R}"]}
    ((name, tg, lt),) = other_groups(stack2)
    assert (stack2[f"WORLD_ASG_{R}"], stack2[f"WORLD_TARGET_GROUP_ARN_{R}"], stack2[f"WORLD_LAUNCH_TEMPLATE_ID_{R}"]) == (name, tg, lt)
    assert f":{OTHER}:" in tg and f":{OTHER}:" in stack2[f"WORLD_ALB_ARN_{R}"]
    for key in ("WORLD_LISTENER_ARN", "WORLD_ALB_SG", "WORLD_APP_SG"):
        assert stack2.get(f"{key}_{R}"), key


def test_second_region_group_is_in_service_from_a_copy_of_the_home_image(world, stack2):
    ec2, asg = client(world, "ec2"), client(world, "autoscaling")
    ((name, tg, lt),) = other_groups(stack2)
    ami = stack2[f"WORLD_STACK_AMI_{R}"]
    (img,) = ec2.describe_images(ImageIds=[ami])["Images"]
    assert img["State"] == "available" and img["Name"] == "world-stack-health-v1"
    assert (img["SourceImageId"], img["SourceImageRegion"]) == (stack2["WORLD_STACK_AMI"], HOME)
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    assert (g["MinSize"], g["MaxSize"], g["DesiredCapacity"], g["HealthCheckType"]) == (2, 8, 4, "ELB")
    assert g["TargetGroupARNs"] == [tg] and g["LaunchTemplate"]["LaunchTemplateId"] == lt
    assert set(g["VPCZoneIdentifier"].split(",")) == set(stack2[f"WORLD_PRIVATE_SUBNETS_{R}"].split(","))
    ids = [i["InstanceId"] for i in g["Instances"] if i["LifecycleState"] == "InService"]
    assert len(ids) == 4
    cidr_prefix = stack2[f"WORLD_VPC_CIDR_{R}"].rsplit(".", 2)[0] + "."  # 127.N.
    for inst in [i for r in ec2.describe_instances(InstanceIds=ids)["Reservations"] for i in r["Instances"]]:
        assert inst["ImageId"] == ami and inst["Placement"]["AvailabilityZone"].startswith(OTHER)
        assert inst["PrivateIpAddress"].startswith(cidr_prefix)
        with urllib.request.urlopen(f"http://{inst['PrivateIpAddress']}:8080/healthz", timeout=5) as r:
            assert (r.status, r.read()) == (200, b"ok\n")
    # Names are regional: the home Region's `world-web` is another group.
    (home_g,) = client(world, "autoscaling", HOME).describe_auto_scaling_groups(
        AutoScalingGroupNames=[name])["AutoScalingGroups"]
    assert f":{HOME}:" in home_g["AutoScalingGroupARN"] and f":{OTHER}:" in g["AutoScalingGroupARN"]
    assert not {i["InstanceId"] for i in home_g["Instances"]} & set(ids)


def test_second_region_targets_are_healthy_by_real_checks(world, stack2):
    elb, asg = client(world, "elbv2"), client(world, "autoscaling")
    ((name, tg, _),) = other_groups(stack2)
    ids = set(members(asg, name))
    th = health(elb, tg)
    assert set(th) >= ids and all(th[i]["State"] == "healthy" for i in ids)
    t = elb.describe_target_groups(TargetGroupArns=[tg])["TargetGroups"][0]
    assert t["LoadBalancerArns"] == [stack2[f"WORLD_ALB_ARN_{R}"]]
    assert (t["HealthCheckPath"], t["HealthCheckIntervalSeconds"], t["VpcId"]) == ("/healthz", 1, stack2[f"WORLD_VPC_ID_{R}"])


def test_up_again_reuses_the_two_region_stack(world, stack2):
    t0 = time.time()
    p = world.cli("up", "--stack", "--groups", f"{HOME}=1,{OTHER}=1", timeout=120)
    assert p.returncode == 0, p.stderr
    assert "waiting for" not in p.stderr  # nothing was built
    env = read_env(Path(world.env["WORLD_DIR"]) / "env")
    for key in ("WORLD_STACK_GROUPS", "WORLD_STACK_TARGET_GROUPS", "WORLD_STACK_LAUNCH_TEMPLATES",
                "WORLD_STACK_AMIS", f"WORLD_ASG_{R}", f"WORLD_ALB_ARN_{R}"):
        assert env[key] == stack2[key], key
    assert time.time() - t0 < 30


def test_alarm_on_second_region_target_group_goes_to_alarm_when_instances_are_killed_and_back(world, stack2):
    elb, asg = client(world, "elbv2"), client(world, "autoscaling")
    cw, cw_home = client(world, "cloudwatch"), client(world, "cloudwatch", HOME)
    ((name, tg, _),) = other_groups(stack2)
    alarm = f"unhealthy-{uuid.uuid4().hex[:6]}"
    spec = dict(AlarmName=alarm, Namespace="AWS/ApplicationELB", MetricName="UnHealthyHostCount",
                Statistic="Maximum", Period=10, EvaluationPeriods=1, Threshold=0.0,
                ComparisonOperator="GreaterThanThreshold")
    cw.put_metric_alarm(**spec, Dimensions=arn_dims(tg, stack2[f"WORLD_ALB_ARN_{R}"]))
    # The same alarm name in the home Region, on the home group: a different alarm.
    cw_home.put_metric_alarm(**spec, Dimensions=arn_dims(stack2["WORLD_TARGET_GROUP_ARN"], stack2["WORLD_ALB_ARN"]))

    def state(c=cw):
        return c.describe_alarms(AlarmNames=[alarm])["MetricAlarms"][0]["StateValue"]

    try:
        # Both settle on OK (the first periods may still count targets that were unhealthy
        # while their app started, as on AWS).
        wait_for(lambda: state() == "OK" and state(cw_home) == "OK", timeout=60, what="both alarms OK")
        killed_at = time.time()
        before = members(asg, name)
        victims = sorted(before)[:2]
        # Held unhealthy until the alarm has seen them: the group would replace them within a
        # tick of its loop otherwise (HealthCheckType=ELB), between two metric samples.
        asg.suspend_processes(AutoScalingGroupName=name, ScalingProcesses=["ReplaceUnhealthy"])
        for iid in victims:
            assert world.cli("kill", iid).returncode == 0
        # The world's checker sees them fail in eu-west-1's target group...
        wait_for(lambda: all(health(elb, tg).get(i, {}).get("State") == "unhealthy" for i in victims),
                 timeout=30, what="killed targets unhealthy")
        assert {health(elb, tg)[i]["Reason"] for i in victims} == {"Target.FailedHealthChecks"}
        # ... CloudWatch in eu-west-1 counts them and the alarm fires; the home alarm does not.
        wait_for(lambda: state() == "ALARM", timeout=40, what=f"{alarm} in {OTHER} to go ALARM")
        a = cw.describe_alarms(AlarmNames=[alarm])["MetricAlarms"][0]
        assert a["StateReason"].startswith("Threshold Crossed") and f":{OTHER}:" in a["AlarmArn"]
        assert state(cw_home) == "OK"
        # The group replaces them; with no unhealthy target left, OK again.
        asg.resume_processes(AutoScalingGroupName=name, ScalingProcesses=["ReplaceUnhealthy"])
        wait_for(lambda: (m := members(asg, name)) and not set(victims) & set(m)
                 and sum(1 for s in m.values() if s == "InService") == 4
                 and all(health(elb, tg).get(i, {}).get("State") == "healthy" for i in m),
                 timeout=90, what="killed instances replaced by healthy ones")
        wait_for(lambda: state() == "OK", timeout=40, what=f"{alarm} in {OTHER} back to OK")
        hist = cw.describe_alarm_history(AlarmName=alarm, HistoryItemType="StateUpdate")["AlarmHistoryItems"]
        assert [h["HistorySummary"] for h in reversed(hist)][-2:] == [
            "Alarm updated from OK to ALARM", "Alarm updated from ALARM to OK"]
        home_hist = cw_home.describe_alarm_history(AlarmName=alarm, HistoryItemType="StateUpdate")["AlarmHistoryItems"]
        assert not [h for h in home_hist if "to ALARM" in h["HistorySummary"]
                    and h["Timestamp"].timestamp() >= killed_at - 1], (home_hist, hist)

        # scripts/world alarm NAME STATE --region: forces the eu-west-1 alarm only.
        p = world.cli("alarm", alarm, "ALARM", "--region", OTHER)
        assert p.returncode == 0, p.stderr
        assert (state(), state(cw_home)) == ("ALARM", "OK")
        p = world.cli("alarm", alarm, "--clear", "--region", OTHER)
        assert p.returncode == 0, p.stderr
        wait_for(lambda: state() == "OK", timeout=30, what="evaluated again after --clear")
    finally:
        cw.delete_alarms(AlarmNames=[alarm])
        cw_home.delete_alarms(AlarmNames=[alarm])


def test_lifecycle_hook_standby_and_warm_pool_work_in_the_second_region(world, stack2):
    ec2, asg, elb = client(world, "ec2"), client(world, "autoscaling"), client(world, "elbv2")
    ((_, _, lt),) = other_groups(stack2)
    suffix = uuid.uuid4().hex[:8]
    name = f"rg-{suffix}"
    tg = elb.create_target_group(
        Name=name, Protocol="HTTP", Port=8080, VpcId=stack2[f"WORLD_VPC_ID_{R}"], HealthCheckPath="/healthz",
        HealthCheckIntervalSeconds=1, HealthCheckTimeoutSeconds=1, HealthyThresholdCount=2, UnhealthyThresholdCount=2,
    )["TargetGroups"][0]["TargetGroupArn"]
    elb.modify_target_group_attributes(TargetGroupArn=tg, Attributes=[
        {"Key": "deregistration_delay.timeout_seconds", "Value": "1"}])
    lb = elb.create_load_balancer(Name=f"lb-{suffix}", Subnets=stack2[f"WORLD_PUBLIC_SUBNETS_{R}"].split(","),
                                  Scheme="internet-facing")["LoadBalancers"][0]["LoadBalancerArn"]
    elb.create_listener(LoadBalancerArn=lb, Protocol="HTTP", Port=80,
                        DefaultActions=[{"Type": "forward", "TargetGroupArn": tg}])

    def complete(iid):
        asg.complete_lifecycle_action(AutoScalingGroupName=name, LifecycleHookName="launch", InstanceId=iid,
                                      LifecycleActionResult="CONTINUE")

    def pool() -> dict[str, str]:
        return {i["InstanceId"]: i["LifecycleState"]
                for i in asg.describe_warm_pool(AutoScalingGroupName=name)["Instances"]}

    def ec2_state(iid):
        return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]["Name"]

    asg.create_auto_scaling_group(
        AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateId": lt, "Version": "$Latest"},
        MinSize=0, MaxSize=3, DesiredCapacity=1, VPCZoneIdentifier=stack2[f"WORLD_PRIVATE_SUBNETS_{R}"],
        TargetGroupARNs=[tg], HealthCheckType="EC2",
        LifecycleHookSpecificationList=[{"LifecycleHookName": "launch", "LifecycleTransition": LAUNCHING,
                                         "HeartbeatTimeout": 120, "DefaultResult": "ABANDON"}],
    )
    try:
        # Launching hook: Pending:Wait, running but not registered, until completed.
        ((iid, st),) = wait_for(lambda: members(asg, name), timeout=10, what="a member").items()
        assert st == "Pending:Wait"
        wait_for(lambda: ec2_state(iid) == "running", timeout=10, what="running")
        steady(lambda: members(asg, name) == {iid: "Pending:Wait"} and iid not in health(elb, tg), 1.5,
               "held in Pending:Wait, not registered")
        complete(iid)
        wait_for(lambda: members(asg, name) == {iid: "InService"}
                 and health(elb, tg).get(iid, {}).get("State") == "healthy", timeout=30, what="InService, healthy")

        # Standby: leaves the load balancer (drains), stays in the group; back on ExitStandby.
        asg.enter_standby(AutoScalingGroupName=name, InstanceIds=[iid], ShouldDecrementDesiredCapacity=True)
        assert members(asg, name) == {iid: "Standby"}
        wait_for(lambda: health(elb, tg).get(iid, {}).get("State") in (None, "draining"), timeout=10,
                 what="standby instance deregistered")
        assert asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0][
            "DesiredCapacity"] == 0
        asg.exit_standby(AutoScalingGroupName=name, InstanceIds=[iid])
        wait_for(lambda: members(asg, name) == {iid: "InService"}
                 and health(elb, tg).get(iid, {}).get("State") == "healthy", timeout=30, what="back from standby")

        # Warm pool: max(MinSize 1, MaxGroupPreparedCapacity 2 - desired 1) = 1 instance, through
        # the launching hook too, then stopped; it joins the group on scale-out.
        asg.put_warm_pool(AutoScalingGroupName=name, MinSize=1, MaxGroupPreparedCapacity=2)
        ((wid, wst),) = wait_for(lambda: pool(), timeout=10, what="a pool instance").items()
        wait_for(lambda: pool() == {wid: "Warmed:Pending:Wait"}, timeout=10, what="Warmed:Pending:Wait")
        complete(wid)
        wait_for(lambda: pool() == {wid: "Warmed:Stopped"}, timeout=30, what="Warmed:Stopped")
        assert ec2_state(wid) == "stopped" and wid not in health(elb, tg)
        asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=2)
        wait_for(lambda: members(asg, name).get(wid) == "Pending:Wait", timeout=15, what="warm instance joins")
        complete(wid)
        wait_for(lambda: members(asg, name) == {iid: "InService", wid: "InService"}
                 and health(elb, tg).get(wid, {}).get("State") == "healthy", timeout=30, what="warm instance InService")
    finally:
        try:
            asg.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
        except ClientError:
            pass
        elb.delete_load_balancer(LoadBalancerArn=lb)
        try:
            elb.delete_target_group(TargetGroupArn=tg)
        except ClientError:
            pass


def test_second_account_target_health_and_metrics_are_its_own(world):
    """The checker probes the second account's target groups too, and their metrics go to that
    account's CloudWatch (ELB publishes into the load balancer owner's account)."""
    from test_health import APP_USER_DATA

    c = client(world, "sts", HOME).assume_role(RoleArn=world.env["WORLD_SECOND_ACCOUNT_ROLE"],
                                               RoleSessionName="stack-regions")["Credentials"]
    creds = {"aws_access_key_id": c["AccessKeyId"], "aws_secret_access_key": c["SecretAccessKey"],
             "aws_session_token": c["SessionToken"]}
    region = OTHER
    ec2, elb, cw = (client(world, svc, region, creds) for svc in ("ec2", "elbv2", "cloudwatch"))
    suffix = uuid.uuid4().hex[:8]
    iid = ec2.run_instances(
        ImageId=world.env[f"WORLD_BASE_AMI_{R}"], InstanceType="t3.micro", MinCount=1, MaxCount=1,
        SubnetId=world.env[f"WORLD_SECOND_ACCOUNT_PRIVATE_SUBNETS_{R}"].split(",")[0], UserData=APP_USER_DATA,
    )["Instances"][0]["InstanceId"]
    tg = lb = None
    try:
        tg = elb.create_target_group(
            Name=f"acct-{suffix}", Protocol="HTTP", Port=8080, VpcId=world.env[f"WORLD_SECOND_ACCOUNT_VPC_ID_{R}"],
            HealthCheckPath="/healthz", HealthCheckIntervalSeconds=1, HealthCheckTimeoutSeconds=1,
            HealthyThresholdCount=2, UnhealthyThresholdCount=2,
        )["TargetGroups"][0]["TargetGroupArn"]
        assert ":111122223333:" in tg and f":{region}:" in tg
        lb = elb.create_load_balancer(
            Name=f"acct-{suffix}", Subnets=world.env[f"WORLD_SECOND_ACCOUNT_PUBLIC_SUBNETS_{R}"].split(","),
            Scheme="internet-facing")["LoadBalancers"][0]["LoadBalancerArn"]
        elb.create_listener(LoadBalancerArn=lb, Protocol="HTTP", Port=80,
                            DefaultActions=[{"Type": "forward", "TargetGroupArn": tg}])
        elb.register_targets(TargetGroupArn=tg, Targets=[{"Id": iid}])
        wait_for(lambda: health(elb, tg).get(iid, {}).get("State") == "healthy", timeout=30,
                 what="second account's target healthy")

        def published(c) -> list:
            return c.list_metrics(Namespace="AWS/ApplicationELB", MetricName="HealthyHostCount",
                                  Dimensions=[{"Name": "TargetGroup", "Value": tg.split(":")[-1]}])["Metrics"]

        def most_healthy() -> float:
            stats = cw.get_metric_statistics(
                Namespace="AWS/ApplicationELB", MetricName="HealthyHostCount", Dimensions=arn_dims(tg, lb),
                StartTime=time.time() - 120, EndTime=time.time() + 60, Period=60, Statistics=["Maximum"],
            )["Datapoints"]
            return max((d["Maximum"] for d in stats), default=-1.0)

        wait_for(lambda: most_healthy() == 1.0, timeout=30, what="HealthyHostCount 1 in the second account")
        assert published(cw)
        assert not published(client(world, "cloudwatch", region))  # not in the default account's
    finally:
        if lb:
            elb.delete_load_balancer(LoadBalancerArn=lb)
        if tg:
            elb.delete_target_group(TargetGroupArn=tg)
        ec2.terminate_instances(InstanceIds=[iid])


def test_up_refuses_bad_groups_before_building_anything(world):
    for groups, msg in (("0", "--groups must be >= 1"), (f"{OTHER}=1", "needs the home Region"),
                        (f"{HOME}=1,{OTHER}=x", "is not REGION=COUNT")):
        p = world.cli("up", "--stack", "--groups", groups)
        assert p.returncode == 2 and msg in p.stderr, (groups, p.stderr)
    # A Region the world has no network in (not in --regions): refused, nothing built there.
    p = world.cli("up", "--stack", "--groups", f"{HOME}=1,us-west-2=1", timeout=120)
    assert p.returncode == 2 and "us-west-2: not a Region of the world" in p.stderr, p.stderr
    assert not client(world, "autoscaling", "us-west-2").describe_auto_scaling_groups()["AutoScalingGroups"]
