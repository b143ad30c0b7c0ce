"""Auto Scaling warm pools (bakeryworld/warmpool.py), through the Auto Scaling API."""

from __future__ import annotations

import base64
import urllib.request

import pytest

from conftest import wait_for
from test_health import elbv2_client, make_target_group
from test_lifecycle import desired, ec2_state, error_of, group, instances, registered, steady  # noqa: F401

# Pre-initialization, as on AWS: the user data installs the app as a service (so it starts on
# every later boot) and counts its own runs in /var/lib/warm/runs; the app serves that count.
WARM_USER_DATA = """#!/bin/sh
mkdir -p /opt/app /var/lib/warm /etc/systemd/system/multi-user.target.wants
echo run >> /var/lib/warm/runs
cat > /opt/app/app.py <<'EOF'
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = open("/var/lib/warm/runs").read().encode()
        self.send_response(200 if self.path in ("/healthz", "/runs") else 404); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer((os.environ["BAKERY_WORLD_IP"], 8080), H).serve_forever()
EOF
cat > /etc/systemd/system/app.service <<'EOF'
[Service]
ExecStart=/usr/bin/python3 /opt/app/app.py
[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/app.service /etc/systemd/system/multi-user.target.wants/app.service
"""


@pytest.fixture(scope="module")
def asg(world):
    return world.client("autoscaling", retries=0)


@pytest.fixture(scope="module")
def elb(world):
    return elbv2_client(world)


def pool(asg, name) -> dict:
    return asg.describe_warm_pool(AutoScalingGroupName=name)


def pool_states(asg, name) -> dict[str, str]:
    return {i["InstanceId"]: i["LifecycleState"] for i in pool(asg, name)["Instances"]}


def ip_of(ec2, iid) -> str:
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["PrivateIpAddress"]


def test_warm_pool_keeps_prepared_stopped_instances_that_join_on_scale_out(world, ec2, asg, elb, group):
    tg = make_target_group(world, elb)["TargetGroupArn"]
    name = group(desired=1, min_size=0, max_size=3, user_data=WARM_USER_DATA, target_groups=[tg])
    (first,) = instances(asg, name)
    asg.put_warm_pool(AutoScalingGroupName=name, MinSize=1, MaxGroupPreparedCapacity=2)
    # Pool size max(MinSize 1, MaxGroupPreparedCapacity 2 - desired 1) = 1: one instance boots
    # once (its user data runs), then is stopped.
    warm = wait_for(lambda: pool_states(asg, name), timeout=3, what="a pool instance")
    ((wid, state),) = warm.items()
    assert state == "Warmed:Pending"
    wait_for(lambda: pool_states(asg, name) == {wid: "Warmed:Stopped"}, timeout=30, what="Warmed:Stopped")
    assert ec2_state(ec2, wid) == "stopped"
    cfg = pool(asg, name)["WarmPoolConfiguration"]
    assert (cfg["MinSize"], cfg["MaxGroupPreparedCapacity"], cfg["PoolState"]) == (1, 2, "Stopped")
    # Not in the group, not behind the load balancer.
    assert set(instances(asg, name)) == {first} and wid not in registered(elb, tg)
    (lt_version,) = {pool(asg, name)["Instances"][0]["LaunchTemplate"]["Version"]}
    assert lt_version == "1"

    # A new launch template version, then scale out: the group takes the warm instance first (it
    # keeps the version it was launched with); the pool refills from the new version.
    lt_id = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]["LaunchTemplate"]["LaunchTemplateId"]
    ec2.create_launch_template_version(LaunchTemplateId=lt_id, SourceVersion="1", LaunchTemplateData={"InstanceType": "t3.small"})
    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=2)
    assert instances(asg, name) == {first: "InService", wid: "InService"}
    assert ec2_state(ec2, wid) == "running"
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    assert {i["InstanceId"]: i["LaunchTemplate"]["Version"] for i in g["Instances"]}[wid] == "1"
    # It boots again: its service (installed by the user data of its first boot) answers, and
    # the user data did not run a second time.
    wait_for(lambda: registered(elb, tg).get(wid) == "healthy", timeout=20, what="healthy in the target group")
    with urllib.request.urlopen(f"http://{ip_of(ec2, wid)}:8080/runs", timeout=5) as r:
        assert r.read().decode().split() == ["run"]
    # max(1, 2 - 2) = 1: the pool refills with an instance of the current version.
    refill = wait_for(lambda: (p := pool(asg, name)["Instances"]) and p[0]["InstanceId"] != wid and p, timeout=5,
                      what="refilled")
    assert refill[0]["LaunchTemplate"]["Version"] == "2"


def test_scale_in_returns_instances_to_the_pool_with_reuse_on_scale_in(world, ec2, asg, group):
    name = group(desired=2, min_size=0, max_size=2)
    ids = set(instances(asg, name))
    asg.put_warm_pool(AutoScalingGroupName=name, MinSize=0, InstanceReusePolicy={"ReuseOnScaleIn": True})
    assert pool(asg, name)["WarmPoolConfiguration"]["InstanceReusePolicy"] == {"ReuseOnScaleIn": True}
    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=1)
    (kept,) = instances(asg, name)
    (back,) = ids - {kept}
    assert ec2_state(ec2, back) == "stopped"
    wait_for(lambda: pool_states(asg, name) == {back: "Warmed:Stopped"}, timeout=10, what="back in the pool")
    # ... and scale out takes it again.
    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=2)
    assert set(instances(asg, name)) == ids and ec2_state(ec2, back) == "running"


def test_delete_warm_pool(world, ec2, asg, group):
    name = group(desired=0, min_size=0, max_size=2)
    asg.put_warm_pool(AutoScalingGroupName=name, PoolState="Running")
    warm = wait_for(lambda: (p := pool_states(asg, name)) and len(p) == 2 and p, timeout=3, what="2 pool instances")
    wait_for(lambda: set(pool_states(asg, name).values()) == {"Warmed:Running"}, timeout=30, what="Warmed:Running")
    assert {ec2_state(ec2, i) for i in warm} == {"running"}
    asg.delete_warm_pool(AutoScalingGroupName=name)
    assert pool(asg, name)["WarmPoolConfiguration"]["Status"] == "PendingDelete"
    wait_for(lambda: "WarmPoolConfiguration" not in pool(asg, name), timeout=3, what="pool deleted")
    assert pool(asg, name)["Instances"] == []
    assert {ec2_state(ec2, i) for i in warm} <= {"shutting-down", "terminated"}
    code, _ = error_of(lambda: asg.delete_warm_pool(AutoScalingGroupName=name))
    assert code == "ValidationError"
    # ForceDelete: gone at once.
    asg.put_warm_pool(AutoScalingGroupName=name, MinSize=1)
    wait_for(lambda: pool_states(asg, name), timeout=3, what="a pool instance")
    asg.delete_warm_pool(AutoScalingGroupName=name, ForceDelete=True)
    after = pool(asg, name)
    assert after["Instances"] == [] and "WarmPoolConfiguration" not in after
