"""Front door: throttling with the real codes, 500s, drops, latency, call log, validation."""

from __future__ import annotations

import time

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError


@pytest.fixture
def faults(world):
    yield lambda spec: world.control("POST", "/_world/faults", spec)
    world.control("DELETE", "/_world/faults")


def err_of(fn):
    try:
        fn()
    except ClientError as e:
        return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]
    return None


def test_throttling_uses_each_protocols_real_code(world, faults):
    code, _ = faults({"seed": 1, "rules": [
        {"action": "ec2:DescribeVpcs", "throttle": 1},
        {"action": "ssm:*", "throttle": 1},
        {"action": "autoscaling:DescribeAutoScalingGroups", "throttle": 1},
    ]})
    assert code == 200
    ec2, ssm, asg = (world.client(s, retries=1) for s in ("ec2", "ssm", "autoscaling"))
    assert err_of(ec2.describe_vpcs) == ("RequestLimitExceeded", 503)
    assert err_of(ssm.describe_instance_information) == ("ThrottlingException", 400)
    assert err_of(asg.describe_auto_scaling_groups) == ("Throttling", 400)
    assert err_of(ec2.describe_subnets) is None  # other actions untouched
    # the SDK's own retry logic treats them as throttles and retries
    ec2r = world.client("ec2", retries=3)
    world.control("POST", "/_world/calls/reset")
    with pytest.raises(ClientError):
        ec2r.describe_vpcs()
    # Config(retries max_attempts=3) is 3 retries after the first attempt
    assert world.control("GET", "/_world/calls")[1]["counts"]["ec2:DescribeVpcs"] == 4


def test_500_drop_and_latency(world, faults):
    faults({"seed": 2, "rules": [
        {"action": "ec2:DescribeSubnets", "error500": 1},
        {"action": "ec2:DescribeVpcs", "drop": 1},
        {"action": "ec2:DescribeRegions", "latency_ms": 300},
    ]})
    ec2 = world.client("ec2", retries=1)
    assert err_of(ec2.describe_subnets) == ("InternalError", 500)
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
        ec2.describe_vpcs()
    t = time.time()
    ec2.describe_regions()
    assert time.time() - t >= 0.3
    calls = world.control("GET", "/_world/calls")[1]["calls"]
    faults_seen = {(c["action"], c["fault"]) for c in calls}
    assert ("DescribeSubnets", "error500") in faults_seen and ("DescribeVpcs", "drop") in faults_seen


def test_faults_are_seeded_and_replayable(world, faults):
    ec2 = world.client("ec2", retries=1)

    def run():
        faults({"seed": 42, "rules": [{"action": "ec2:DescribeVpcs", "throttle": 0.5}]})
        return [err_of(ec2.describe_vpcs) is not None for _ in range(20)]

    a, b = run(), run()
    assert a == b and 3 < sum(a) < 17


def test_control_api_never_faulted(world, faults):
    faults({"rules": [{"action": "*", "throttle": 1}]})
    code, st = world.control("GET", "/_world/status")
    assert code == 200 and st["settings"]["port"] == world.port
    assert err_of(world.client("ec2", retries=1).describe_vpcs) == ("RequestLimitExceeded", 503)


def test_call_log_counts_actions(world):
    world.control("POST", "/_world/calls/reset")
    ec2 = world.client("ec2")
    for _ in range(3):
        ec2.describe_instances()
    world.client("ssm").describe_instance_information()
    code, res = world.control("GET", "/_world/calls")
    assert code == 200
    assert res["counts"]["ec2:DescribeInstances"] == 3
    assert res["counts"]["ssm:DescribeInstanceInformation"] == 1
    last = res["calls"][-1]
    assert last["service"] == "ssm" and last["status"] == 200 and "t" in last
    p = world.cli("calls")
    assert "ec2:DescribeInstances" in p.stdout


@pytest.mark.parametrize("spec,field", [
    ({"rules": [{"action": "ec2:RunInstances", "throttle": 1.5}]}, "rules[0].throttle"),
    ({"rules": [{"action": "RunInstances"}]}, "rules[0].action"),
    ({"rules": [{"action": "*", "latency": 5}]}, "latency"),
    ({"seed": "x", "rules": []}, "seed"),
    ({"rules": {"action": "*"}}, "rules"),
])
def test_malformed_fault_spec_is_rejected_naming_the_field(world, spec, field):
    import json

    code, res = world.control("POST", "/_world/faults", spec)
    assert code == 400 and field in res["error"], res
    p = world.cli("faults", "set", json.dumps(spec))
    assert p.returncode == 2 and field in p.stderr, p.stderr
    assert world.control("GET", "/_world/faults")[1]["rules"] == []


def test_fault_spec_not_json(world):
    p = world.cli("faults", "set", "{oops")
    assert p.returncode == 2 and "not valid JSON" in p.stderr
