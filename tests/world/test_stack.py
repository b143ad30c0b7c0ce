"""`scripts/world up --stack`: the reference architecture (bakeryworld/stack.py)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import read_env, wait_for

KEYS = (
    "WORLD_ASG", "WORLD_TARGET_GROUP_ARN", "WORLD_ALB_ARN", "WORLD_LISTENER_ARN",
    "WORLD_LAUNCH_TEMPLATE_ID", "WORLD_STACK_AMI", "WORLD_DB_INSTANCE", "WORLD_DB_SECRET",
    "WORLD_ALB_SG", "WORLD_APP_SG", "WORLD_DB_SG", "WORLD_INSTANCE_PROFILE", "WORLD_STACK_GROUPS",
)


@pytest.fixture(scope="module")
def stack(world):
    t0 = time.time()
    p = world.cli("up", "--stack", timeout=300)
    assert p.returncode == 0, f"up --stack failed:\n{p.stdout}\n{p.stderr}"
    env = read_env(Path(world.env["WORLD_DIR"]) / "env")
    env["_seconds"] = time.time() - t0
    return env


def ingress(ec2, group_id):
    g = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    return g["IpPermissions"]


def test_env_names_every_resource(stack):
    missing = [k for k in KEYS if not stack.get(k)]
    assert not missing, missing


def test_fleet_of_four_is_healthy_behind_the_alb(world, stack):
    elb, asg = world.client("elbv2"), world.client("autoscaling")
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[stack["WORLD_ASG"]])["AutoScalingGroups"][0]
    assert (g["MinSize"], g["MaxSize"], g["DesiredCapacity"]) == (2, 8, 4)
    assert g["HealthCheckType"] == "ELB" and g["HealthCheckGracePeriod"] > 0
    assert g["TargetGroupARNs"] == [stack["WORLD_TARGET_GROUP_ARN"]]
    assert set(g["VPCZoneIdentifier"].split(",")) == set(world.env["WORLD_PRIVATE_SUBNETS"].split(","))
    ids = {i["InstanceId"] for i in g["Instances"]}
    assert len(ids) == 4
    th = elb.describe_target_health(TargetGroupArn=stack["WORLD_TARGET_GROUP_ARN"])["TargetHealthDescriptions"]
    assert {d["Target"]["Id"] for d in th if d["TargetHealth"]["State"] == "healthy"} >= ids

    tg = elb.describe_target_groups(TargetGroupArns=[stack["WORLD_TARGET_GROUP_ARN"]])["TargetGroups"][0]
    assert (tg["Protocol"], tg["Port"], tg["HealthCheckPath"]) == ("HTTP", 8080, "/healthz")
    assert (tg["HealthCheckIntervalSeconds"], tg["HealthyThresholdCount"], tg["UnhealthyThresholdCount"]) == (1, 2, 2)
    lb = elb.describe_load_balancers(LoadBalancerArns=[stack["WORLD_ALB_ARN"]])["LoadBalancers"][0]
    assert lb["Scheme"] == "internet-facing"
    assert {az["SubnetId"] for az in lb["AvailabilityZones"]} == set(world.env["WORLD_PUBLIC_SUBNETS"].split(","))
    (listener,) = elb.describe_listeners(LoadBalancerArn=stack["WORLD_ALB_ARN"])["Listeners"]
    assert listener["ListenerArn"] == stack["WORLD_LISTENER_ARN"] and listener["Port"] == 80


def test_the_stack_image_really_serves_healthz(world, ec2, stack):
    asg = world.client("autoscaling")
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[stack["WORLD_ASG"]])["AutoScalingGroups"][0]
    iid = g["Instances"][0]["InstanceId"]
    inst = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert inst["ImageId"] == stack["WORLD_STACK_AMI"]
    assert inst["PrivateIpAddress"].startswith("127.")
    with urllib.request.urlopen(f"http://{inst['PrivateIpAddress']}:8080/healthz", timeout=5) as r:
        assert (r.status, r.read()) == (200, b"ok\n")
    lt = ec2.describe_launch_template_versions(LaunchTemplateId=stack["WORLD_LAUNCH_TEMPLATE_ID"])[
        "LaunchTemplateVersions"
    ][0]["LaunchTemplateData"]
    assert lt["ImageId"] == stack["WORLD_STACK_AMI"]
    assert lt["MetadataOptions"]["HttpTokens"] == "required"
    assert lt["IamInstanceProfile"]["Name"] == stack["WORLD_INSTANCE_PROFILE"]
    assert lt["SecurityGroupIds"] == [stack["WORLD_APP_SG"]]
    # Fleet instances carry the app group and the instance profile from the template.
    assert [s["GroupId"] for s in inst["SecurityGroups"]] == [stack["WORLD_APP_SG"]]
    assert inst["IamInstanceProfile"]["Arn"].endswith("/" + stack["WORLD_INSTANCE_PROFILE"])


def test_security_groups_chain_alb_to_app_to_db(world, ec2, stack):
    alb = ingress(ec2, stack["WORLD_ALB_SG"])
    assert [(p["FromPort"], [r["CidrIp"] for r in p["IpRanges"]]) for p in alb] == [(80, ["0.0.0.0/0"])]
    app = ingress(ec2, stack["WORLD_APP_SG"])
    assert [(p["FromPort"], p["ToPort"], [u["GroupId"] for u in p["UserIdGroupPairs"]], p["IpRanges"]) for p in app] == [
        (8080, 8080, [stack["WORLD_ALB_SG"]], [])
    ]
    db = ingress(ec2, stack["WORLD_DB_SG"])
    # The database admits only the instances' group, on 5432, and nothing by address.
    assert [(p["FromPort"], p["ToPort"], [u["GroupId"] for u in p["UserIdGroupPairs"]], p["IpRanges"]) for p in db] == [
        (5432, 5432, [stack["WORLD_APP_SG"]], [])
    ]


def test_database_is_private_and_its_secret_has_the_connection_details(world, stack):
    rds, sm = world.client("rds"), world.client("secretsmanager")
    db = rds.describe_db_instances(DBInstanceIdentifier=stack["WORLD_DB_INSTANCE"])["DBInstances"][0]
    assert db["Engine"] == "postgres" and db["PubliclyAccessible"] is False
    assert [g["VpcSecurityGroupId"] for g in db["VpcSecurityGroups"]] == [stack["WORLD_DB_SG"]]
    assert {s["SubnetIdentifier"] for s in db["DBSubnetGroup"]["Subnets"]} == set(
        world.env["WORLD_PRIVATE_SUBNETS"].split(",")
    )
    secret = json.loads(sm.get_secret_value(SecretId=stack["WORLD_DB_SECRET"])["SecretString"])
    assert secret["host"] == db["Endpoint"]["Address"] and secret["port"] == db["Endpoint"]["Port"]
    assert secret["username"] == db["MasterUsername"] and secret["dbname"] == db["DBName"]
    assert secret["password"]


def test_up_stack_again_reuses_everything(world, stack):
    from bakeryworld import stack as stack_mod

    env = dict(world.env)
    again = stack_mod.create(env, Path(world.env["WORLD_DIR"]))
    assert {k: again[k] for k in KEYS} == {k: stack[k] for k in KEYS}


def test_fleet_heals_after_an_app_crash(world, stack):
    elb, asg = world.client("elbv2"), world.client("autoscaling")
    tg, name = stack["WORLD_TARGET_GROUP_ARN"], stack["WORLD_ASG"]

    def healthy_members():
        g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
        ids = {i["InstanceId"] for i in g["Instances"]}
        th = elb.describe_target_health(TargetGroupArn=tg)["TargetHealthDescriptions"]
        ok = {d["Target"]["Id"] for d in th if d["TargetHealth"]["State"] == "healthy"}
        return ids if len(ids) == 4 and ids <= ok else None

    before = wait_for(healthy_members, timeout=30, what="4 healthy")
    victim = sorted(before)[0]
    assert world.cli("kill", victim).returncode == 0
    after = wait_for(lambda: (m := healthy_members()) and victim not in m and m, timeout=60, what="fleet healed")
    assert len(after - before) == 1


def test_up_stack_groups_puts_n_groups_behind_the_load_balancer(world, stack):
    """`up --stack --groups 2` on the running stack adds `world-web-2` (idempotent)."""
    region = world.env["AWS_REGION"]
    assert stack["WORLD_STACK_GROUPS"] == f"{region}/world-web"
    p = world.cli("up", "--stack", "--groups", "2", timeout=300)
    assert p.returncode == 0, f"up --stack --groups 2 failed:\n{p.stdout}\n{p.stderr}"
    env = read_env(Path(world.env["WORLD_DIR"]) / "env")
    assert env["WORLD_STACK_GROUPS"] == f"{region}/world-web,{region}/world-web-2"
    tgs = env["WORLD_STACK_TARGET_GROUPS"].split(",")
    lts = env["WORLD_STACK_LAUNCH_TEMPLATES"].split(",")
    assert tgs[0] == stack["WORLD_TARGET_GROUP_ARN"] and lts[0] == stack["WORLD_LAUNCH_TEMPLATE_ID"]
    assert len(set(tgs)) == 2 and len(set(lts)) == 2
    assert env["WORLD_ASG"] == stack["WORLD_ASG"]  # the first group is the one it was
    elb, asg = world.client("elbv2"), world.client("autoscaling")
    try:
        g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["world-web-2"])["AutoScalingGroups"][0]
        assert (g["MinSize"], g["MaxSize"], g["DesiredCapacity"], g["HealthCheckType"]) == (2, 8, 4, "ELB")
        assert g["TargetGroupARNs"] == [tgs[1]] and g["LaunchTemplate"]["LaunchTemplateId"] == lts[1]
        ids = {i["InstanceId"] for i in g["Instances"] if i["LifecycleState"] == "InService"}
        th = elb.describe_target_health(TargetGroupArn=tgs[1])["TargetHealthDescriptions"]
        assert len(ids) == 4 and {d["Target"]["Id"] for d in th if d["TargetHealth"]["State"] == "healthy"} >= ids
        # Behind the stack's load balancer: a listener rule routes its host name to it.
        tg = elb.describe_target_groups(TargetGroupArns=[tgs[1]])["TargetGroups"][0]
        assert tg["LoadBalancerArns"] == [stack["WORLD_ALB_ARN"]]
        rules = elb.describe_rules(ListenerArn=stack["WORLD_LISTENER_ARN"])["Rules"]
        (rule,) = [r for r in rules if any(a.get("TargetGroupArn") == tgs[1] for a in r["Actions"])]
        assert rule["Conditions"][0]["HostHeaderConfig"]["Values"] == ["world-web-2.world.internal"]
        # Again: nothing new.
        again = world.cli("up", "--stack", "--groups", "2", timeout=120)
        assert again.returncode == 0 and read_env(Path(world.env["WORLD_DIR"]) / "env")["WORLD_STACK_GROUPS"] == env["WORLD_STACK_GROUPS"]
    finally:
        # Keep the session world light for the modules after this one.
        asg.delete_auto_scaling_group(AutoScalingGroupName="world-web-2", ForceDelete=True)
