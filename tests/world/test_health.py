"""ALB target health follows real health checks (bakeryworld/health.py), through the ELBv2 API."""

from __future__ import annotations

import time
import uuid

import boto3
import pytest
from botocore.config import Config

from conftest import wait_for

# A tiny app for user data: /healthz answers 200 on the body's own address, :8080.
APP_USER_DATA = """#!/bin/sh
mkdir -p /opt/app
cat > /opt/app/app.py <<'EOF'
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200 if self.path == "/healthz" else 404
        self.send_response(code); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer((os.environ["BAKERY_WORLD_IP"], 8080), H).serve_forever()
EOF
exec python3 /opt/app/app.py
"""

INTERVAL, HEALTHY, UNHEALTHY = 1, 2, 2
SLACK = 2.5


def elbv2_client(world):
    # The world's 1 s interval is below boto3's client-side minimum: validation off, as bakery's
    # Rust SDK does not validate ranges either.
    return boto3.client(
        "elbv2",
        endpoint_url=world.env["AWS_ENDPOINT_URL"],
        region_name=world.env["AWS_REGION"],
        aws_access_key_id=world.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=world.env["AWS_SECRET_ACCESS_KEY"],
        config=Config(parameter_validation=False, retries={"mode": "standard", "max_attempts": 5}),
    )


def make_target_group(world, elb, *, path="/healthz", with_listener=True, name=None):
    """A target group like the reference stack's; behind an ALB unless with_listener=False."""
    suffix = uuid.uuid4().hex[:8]
    tg = elb.create_target_group(
        Name=name or f"hc-{suffix}",
        Protocol="HTTP",
        Port=8080,
        VpcId=world.env["WORLD_VPC_ID"],
        HealthCheckPath=path,
        HealthCheckIntervalSeconds=INTERVAL,
        HealthCheckTimeoutSeconds=1,
        HealthyThresholdCount=HEALTHY,
        UnhealthyThresholdCount=UNHEALTHY,
    )["TargetGroups"][0]
    arn = tg["TargetGroupArn"]
    elb.modify_target_group_attributes(
        TargetGroupArn=arn, Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": "1"}]
    )
    if with_listener:
        lb = elb.create_load_balancer(
            Name=f"lb-{suffix}", Subnets=world.env["WORLD_PUBLIC_SUBNETS"].split(","), Scheme="internet-facing"
        )["LoadBalancers"][0]["LoadBalancerArn"]
        elb.create_listener(
            LoadBalancerArn=lb, Protocol="HTTP", Port=80, DefaultActions=[{"Type": "forward", "TargetGroupArn": arn}]
        )
    return tg


def health_of(elb, tg_arn, target_id):
    for d in elb.describe_target_health(TargetGroupArn=tg_arn)["TargetHealthDescriptions"]:
        if d["Target"]["Id"] == target_id:
            return d["TargetHealth"]
    return None


def explicit_health(elb, tg_arn, target_id):
    return elb.describe_target_health(TargetGroupArn=tg_arn, Targets=[{"Id": target_id}])[
        "TargetHealthDescriptions"
    ][0]["TargetHealth"]


@pytest.fixture(scope="module")
def elb(world):
    return elbv2_client(world)


def test_target_goes_initial_then_healthy_then_unhealthy_after_kill(world, elb, launch):
    tg = make_target_group(world, elb)
    arn = tg["TargetGroupArn"]
    assert (tg["HealthCheckIntervalSeconds"], tg["HealthCheckTimeoutSeconds"]) == (1, 1)
    box = launch(user_data=APP_USER_DATA)
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": box.id}])

    first = health_of(elb, arn, box.id)
    assert first["State"] == "initial", first
    assert first["Reason"] in ("Elb.RegistrationInProgress", "Elb.InitialHealthChecking"), first

    # Healthy only once the app answers (boot delay + app start + 2 passing checks).
    wait_for(lambda: health_of(elb, arn, box.id)["State"] == "healthy", timeout=30, what="healthy")
    assert "Reason" not in health_of(elb, arn, box.id)

    # An app crash: unhealthy within interval x threshold (+ slack for the poll and scheduling).
    p = world.cli("kill", box.id)
    assert p.returncode == 0, p.stderr
    t0 = time.time()
    wait_for(lambda: health_of(elb, arn, box.id)["State"] == "unhealthy", timeout=15, interval=0.1, what="unhealthy")
    took = time.time() - t0
    assert took <= INTERVAL * UNHEALTHY + SLACK, took
    h = health_of(elb, arn, box.id)
    assert h["Reason"] == "Target.FailedHealthChecks", h  # connection refused: nothing listens


def test_deregistered_target_drains_then_is_not_registered(world, elb, launch):
    arn = make_target_group(world, elb)["TargetGroupArn"]
    box = launch(user_data=APP_USER_DATA)
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": box.id}])
    wait_for(lambda: health_of(elb, arn, box.id)["State"] == "healthy", timeout=30, what="healthy")

    elb.deregister_targets(TargetGroupArn=arn, Targets=[{"Id": box.id}])
    h = health_of(elb, arn, box.id)  # still listed while draining, as on AWS
    assert h and h["State"] == "draining" and h["Reason"] == "Target.DeregistrationInProgress", h
    wait_for(lambda: health_of(elb, arn, box.id) is None, timeout=5, what="drained (delay 1 s)")
    h = explicit_health(elb, arn, box.id)
    assert (h["State"], h["Reason"]) == ("unused", "Target.NotRegistered"), h


def test_wrong_status_code_is_response_code_mismatch(world, elb, launch):
    arn = make_target_group(world, elb, path="/nope")["TargetGroupArn"]
    box = launch(user_data=APP_USER_DATA)
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": box.id}])
    wait_for(lambda: health_of(elb, arn, box.id)["State"] == "unhealthy", timeout=30, what="unhealthy")
    # Before the app is up the failures are refusals; once it answers, the code is the reason.
    wait_for(
        lambda: health_of(elb, arn, box.id).get("Reason") == "Target.ResponseCodeMismatch",
        timeout=15,
        what="ResponseCodeMismatch",
    )
    assert "404" in health_of(elb, arn, box.id)["Description"]


def test_stopped_instance_is_unused(world, elb, ec2, launch):
    arn = make_target_group(world, elb)["TargetGroupArn"]
    box = launch(user_data=APP_USER_DATA)
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": box.id}])
    wait_for(lambda: health_of(elb, arn, box.id)["State"] == "healthy", timeout=30, what="healthy")
    ec2.stop_instances(InstanceIds=[box.id])
    wait_for(lambda: box.state() == "stopped", timeout=15, what="stopped")
    h = health_of(elb, arn, box.id)
    assert (h["State"], h["Reason"]) == ("unused", "Target.InvalidState"), h


def test_target_group_without_load_balancer_is_not_in_use(world, elb, launch):
    arn = make_target_group(world, elb, with_listener=False)["TargetGroupArn"]
    box = launch(user_data=APP_USER_DATA)
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": box.id}])
    h = health_of(elb, arn, box.id)
    assert (h["State"], h["Reason"]) == ("unused", "Target.NotInUse"), h


def test_terminated_instance_drains_out_of_its_target_group(world, elb, ec2, launch):
    arn = make_target_group(world, elb)["TargetGroupArn"]
    box = launch(user_data=APP_USER_DATA)
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": box.id}])
    wait_for(lambda: health_of(elb, arn, box.id)["State"] == "healthy", timeout=30, what="healthy")
    ec2.terminate_instances(InstanceIds=[box.id])
    assert health_of(elb, arn, box.id)["State"] == "draining"
    wait_for(lambda: health_of(elb, arn, box.id) is None, timeout=5, what="drained")


def test_health_checks_turned_off_by_modify_target_group_leave_targets_unavailable(world, elb, launch):
    """ModifyTargetGroup(HealthCheckEnabled=false), as AWS does: no more checks, every target
    `unavailable` (moto kept the string "false", which counted as on)."""
    tg = make_target_group(world, elb)
    arn = tg["TargetGroupArn"]
    box = launch(user_data=APP_USER_DATA)
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": box.id}])
    wait_for(lambda: health_of(elb, arn, box.id)["State"] == "healthy", timeout=30, what="healthy")
    elb.modify_target_group(TargetGroupArn=arn, HealthCheckEnabled=False)
    h = health_of(elb, arn, box.id)
    assert (h["State"], h["Reason"]) == ("unavailable", "Target.HealthCheckDisabled"), h
    # A crash is no longer seen by checks that do not run.
    assert world.cli("kill", box.id).returncode == 0
    time.sleep(INTERVAL * UNHEALTHY + SLACK)
    assert health_of(elb, arn, box.id)["State"] == "unavailable"
    elb.modify_target_group(TargetGroupArn=arn, HealthCheckEnabled=True)
    wait_for(lambda: health_of(elb, arn, box.id)["State"] == "unhealthy", timeout=15, what="checked again")
