"""Front door: throttling with the real codes, 500s, drops, latency, call log, validation."""

from __future__ import annotations

import time
import uuid

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError

from conftest import err_of


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


def test_faults_can_be_scoped_to_one_access_key(world, faults):
    code, _ = faults({"seed": 3, "rules": [{"action": "ec2:DescribeVpcs", "throttle": 1, "access_key": "AKIDSCOPED"}]})
    assert code == 200
    scoped = world.client("ec2", retries=1, access_key="AKIDSCOPED")
    other = world.client("ec2", retries=1, access_key="AKIDOTHER")
    assert err_of(scoped.describe_vpcs) == ("RequestLimitExceeded", 503)
    assert err_of(other.describe_vpcs) is None, "another client is not affected"


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


def test_a_call_waiting_out_its_latency_is_listed_in_flight_until_answered(world, faults):
    import threading

    key = f"AKIDFLIGHT{uuid.uuid4().hex[:8].upper()}"
    faults({"seed": 4, "rules": [{"action": "ec2:DescribeRegions", "latency_ms": 1500, "access_key": key}]})
    ec2 = world.client("ec2", retries=1, access_key=key)
    caller = threading.Thread(target=ec2.describe_regions)
    t = time.time()
    caller.start()
    flying: list = []
    while not flying and time.time() - t < 1.2:
        flying = world.control("GET", f"/_world/calls?access_key={key}")[1]["in_flight"]
    assert [(c["action"], c["access_key"], c["mutating"]) for c in flying] == [("DescribeRegions", key, False)]
    assert flying[0]["t"] >= t - 0.01
    # nobody else's call is listed under this key, and the log has no entry for it yet
    assert not world.control("GET", f"/_world/calls?access_key={key}")[1]["calls"]
    caller.join()
    answered = world.control("GET", f"/_world/calls?access_key={key}")[1]
    assert answered["in_flight"] == []
    assert [c["action"] for c in answered["calls"]] == ["DescribeRegions"]


def test_a_lost_answer_means_the_call_took_effect(world, faults):
    ec2 = world.client("ec2", retries=0)
    name = f"lose-{uuid.uuid4().hex[:8]}"
    faults({"seed": 4, "rules": [{"action": "ec2:CreateSecurityGroup", "lose": 1}]})
    vpc = world.env["WORLD_VPC_ID"]
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
        ec2.create_security_group(GroupName=name, Description="lost answer", VpcId=vpc)
    world.control("DELETE", "/_world/faults")
    groups = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]}])["SecurityGroups"]
    assert len(groups) == 1, "the call was served although its answer was lost"
    # the retry a client makes meets its own group
    assert err_of(lambda: ec2.create_security_group(GroupName=name, Description="again", VpcId=vpc)) == (
        "InvalidGroup.Duplicate", 400)
    calls = world.control("GET", "/_world/calls")[1]["calls"]
    assert any(c["action"] == "CreateSecurityGroup" and c["fault"] == "lose" and c["status"] == "lost 200"
               for c in calls)
    ec2.delete_security_group(GroupId=groups[0]["GroupId"])


def test_faults_are_seeded_and_replayable(world, faults):
    ec2 = world.client("ec2", retries=0)  # every call is one attempt (no backoff sleeps)

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
    ({"rules": [{"action": "*", "access_key": ""}]}, "rules[0].access_key"),
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


# --------------------------------------------------------------------------- call attribution
def unique_key(tag: str) -> str:
    import uuid

    return f"AKIDWORLD{tag}{uuid.uuid4().hex[:12].upper()}"


def test_call_log_attributes_calls_to_access_keys_and_marks_mutating_ones(world):
    import json
    import urllib.request
    import uuid

    ka, kb, kp = unique_key("A"), unique_key("B"), unique_key("P")
    a = world.client("ec2", retries=1, access_key=ka)
    a.describe_vpcs()
    a.describe_vpcs()
    sg = a.create_security_group(
        GroupName=f"call-log-{uuid.uuid4().hex[:8]}", Description="call log probe", VpcId=world.env["WORLD_VPC_ID"]
    )["GroupId"]
    a.delete_security_group(GroupId=sg)
    # a refused mutating call is still a mutating call made
    assert err_of(lambda: a.terminate_instances(InstanceIds=["i-0123456789abcdef0"]))[1] == 400
    # an EC2 DryRun request changes nothing: logged, but not mutating
    assert err_of(lambda: a.run_instances(ImageId=world.env["WORLD_BASE_AMI"], MinCount=1, MaxCount=1,
                                          DryRun=True)) == ("DryRunOperation", 412)
    world.client("ssm", retries=1, access_key=ka).describe_instance_information()  # JSON protocol
    world.client("ec2", retries=1, access_key=kb).describe_subnets()
    # a presigned request carries its key in X-Amz-Credential
    url = world.client("ec2", access_key=kp).generate_presigned_url("describe_regions", Params={}, ExpiresIn=60)
    assert "X-Amz-Credential=" in url and "Authorization" not in url
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=10) as r:
        assert r.status == 200

    code, res = world.control("GET", f"/_world/calls?access_key={ka}")
    assert code == 200 and res["access_key"] == ka
    assert res["counts"] == {
        "ec2:CreateSecurityGroup": 1, "ec2:DeleteSecurityGroup": 1, "ec2:DescribeVpcs": 2,
        "ec2:RunInstances": 1, "ec2:TerminateInstances": 1, "ssm:DescribeInstanceInformation": 1,
    }, res["counts"]
    assert res["total"] == 7
    assert res["mutating_counts"] == {
        "ec2:CreateSecurityGroup": 1, "ec2:DeleteSecurityGroup": 1, "ec2:TerminateInstances": 1,
    }
    assert res["mutating_total"] == 3
    assert [c["access_key"] for c in res["calls"]] == [ka] * 7
    by_action = {c["action"]: c for c in res["calls"]}
    assert by_action["DescribeVpcs"]["mutating"] is False
    assert by_action["TerminateInstances"]["mutating"] is True and by_action["TerminateInstances"]["status"] == 400
    assert by_action["RunInstances"]["mutating"] is False and by_action["RunInstances"]["dry_run"] is True
    assert by_action["DescribeInstanceInformation"]["service"] == "ssm"

    code, res = world.control("GET", f"/_world/calls?access_key={ka}&mutating=true")
    assert [c["action"] for c in res["calls"]] == ["CreateSecurityGroup", "DeleteSecurityGroup", "TerminateInstances"]
    assert res["total"] == 7  # the filter applies to the list only

    res = world.control("GET", f"/_world/calls?access_key={kb}")[1]
    assert res["counts"] == {"ec2:DescribeSubnets": 1} and res["mutating_total"] == 0
    res = world.control("GET", f"/_world/calls?access_key={kp}")[1]
    assert res["counts"] == {"ec2:DescribeRegions": 1}
    assert res["calls"][0]["service"] == "ec2" and res["calls"][0]["access_key"] == kp
    res = world.control("GET", f"/_world/calls?access_key={unique_key('NONE')}")[1]
    assert (res["total"], res["counts"], res["calls"]) == (0, {}, [])
    res = world.control("GET", "/_world/calls?limit=0")[1]
    assert res["access_keys"][ka] == 7 and res["access_keys"][kb] == 1 and res["calls"] == []
    assert world.control("GET", "/_world/calls?mutating=maybe")[0] == 400

    p = world.cli("calls", "--access-key", ka, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["mutating_counts"]["ec2:TerminateInstances"] == 1
    p = world.cli("calls", "--access-key", kb)
    assert p.returncode == 0 and "1 call(s) by access key" in p.stdout and "0 mutating" in p.stdout, p.stdout
    p = world.cli("calls", "--access-key", ka, "--mutating")
    assert "ec2:CreateSecurityGroup  (mutating)" in p.stdout and "DescribeVpcs  (mutating)" not in p.stdout, p.stdout


@pytest.mark.parametrize("service,action,mutating", [
    ("ec2", "DescribeInstances", False),
    ("ec2", "GetConsoleOutput", False),
    ("ec2", "RunInstances", True),
    ("ec2", "CreateTags", True),
    ("autoscaling", "SetDesiredCapacity", True),
    ("elasticloadbalancing", "DescribeTargetHealth", False),
    ("ssm", "ListCommandInvocations", False),
    ("ssm", "SendCommand", True),
    ("sts", "GetCallerIdentity", False),
    ("sts", "AssumeRole", False),
    ("secretsmanager", "BatchGetSecretValue", False),
    ("s3", "GET /bucket/key", False),
    ("s3", "PUT /bucket/key", True),
])
def test_mutating_classification(service, action, mutating):
    from bakeryworld.frontdoor import is_mutating

    assert is_mutating(service, action) is mutating


def test_credential_scope_parsing():
    from bakeryworld.frontdoor import credential_scope

    auth = ("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261127/us-east-1/ec2/aws4_request, "
            "SignedHeaders=host;x-amz-date, Signature=abc")
    assert credential_scope({"HTTP_AUTHORIZATION": auth}) == ("AKIDEXAMPLE", "ec2")
    q = "Action=DescribeRegions&X-Amz-Credential=AKIDQ%2F20261127%2Fus-east-1%2Fsts%2Faws4_request"
    assert credential_scope({"QUERY_STRING": q}) == ("AKIDQ", "sts")
    sigv4a = "AWS4-ECDSA-P256-SHA256 Credential=AKIDV4A/20261127/s3/aws4_request, SignedHeaders=host"
    assert credential_scope({"HTTP_AUTHORIZATION": sigv4a}) == ("AKIDV4A", "s3")
    assert credential_scope({}) == (None, None)
