"""SSM Run Command executes in the instance's body (bakeryworld/ssm.py)."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
from botocore.exceptions import ClientError

from conftest import wait_for

TERMINAL = {"Success", "Failed", "TimedOut", "Cancelled"}


@pytest.fixture(scope="module")
def ssm(world):
    return world.client("ssm")


@pytest.fixture(scope="module")
def profile(world):
    iam = world.client("iam")
    name = f"ssm-test-{uuid.uuid4().hex[:8]}"
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
    iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))
    iam.create_instance_profile(InstanceProfileName=name)
    iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return name


@pytest.fixture(scope="module")
def managed(world, ec2, ssm, profile):
    """Two managed instances (with an instance profile) and one without, all booted."""
    subnet = world.env["WORLD_PRIVATE_SUBNETS"].split(",")[0]
    tag = uuid.uuid4().hex[:8]
    r = ec2.run_instances(
        ImageId=world.env["WORLD_BASE_AMI"], MinCount=2, MaxCount=2, InstanceType="t3.micro",
        SubnetId=subnet, IamInstanceProfile={"Name": profile},
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "ssm-test", "Value": tag}]}],
    )["Instances"]
    bare = ec2.run_instances(
        ImageId=world.env["WORLD_BASE_AMI"], MinCount=1, MaxCount=1, InstanceType="t3.micro", SubnetId=subnet,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "ssm-test", "Value": tag}]}],
    )["Instances"][0]
    ids = [i["InstanceId"] for i in r]
    online = lambda: {  # noqa: E731
        i["InstanceId"]
        for i in ssm.describe_instance_information(Filters=[{"Key": "PingStatus", "Values": ["Online"]}])["InstanceInformationList"]
    }
    wait_for(lambda: set(ids) <= online(), timeout=30, what="SSM agents online")
    yield {"ids": ids, "ips": [i["PrivateIpAddress"] for i in r], "bare": bare["InstanceId"], "tag": tag}
    ec2.terminate_instances(InstanceIds=ids + [bare["InstanceId"]])


def run(ssm, iid, commands, **params):
    p = {"commands": commands, **{k: [str(v)] for k, v in params.items()}}
    return ssm.send_command(InstanceIds=[iid], DocumentName="AWS-RunShellScript", Parameters=p)["Command"]


def finished(ssm, cmd_id, iid, timeout=30):
    def done():
        inv = ssm.get_command_invocation(CommandId=cmd_id, InstanceId=iid)
        return inv if inv["Status"] in TERMINAL else None

    return wait_for(done, timeout=timeout, what=f"command {cmd_id} on {iid}")


def test_the_cli_shim_runs_the_bodys_python3_when_the_worlds_interpreter_is_out_of_its_sight(tmp_path):
    # A body's overlay of `/` does not show other mounts (check-fresh bind-mounts ~/.pyenv, the
    # world's interpreter): the shim then runs the body's own python3.
    import shutil
    import subprocess
    import sys

    from bakeryworld.ssm import cli_script

    module = tmp_path / "cli.py"
    module.write_text("import sys\nprint(sys.argv[1:], sys.path[1] if len(sys.path) > 1 else '')\n")
    shim = tmp_path / "aws"
    env = {"PATH": f"{os.path.dirname(shutil.which('python3'))}:/usr/bin:/bin"}
    for python in (str(tmp_path / "gone" / "python3.11"), sys.executable):
        shim.write_text(cli_script(python, tmp_path / "packages", module))
        shim.chmod(0o755)
        out = subprocess.run([str(shim), "sts", "get-caller-identity"], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split(" ", 2)[:2] == ["['sts',", "'get-caller-identity']"], out.stdout
        assert str(tmp_path / "packages") in out.stdout, "the packages come with either interpreter"
    # No python3 anywhere: a clear error, not a shell's riddle.
    shim.write_text(cli_script(str(tmp_path / "gone" / "python3.11"), tmp_path / "packages", module))
    out = subprocess.run(["/bin/sh", str(shim)], capture_output=True, text=True, env={"PATH": str(tmp_path)})
    assert out.returncode == 127 and "aws: no python3" in out.stderr, out


def test_instance_information_lists_booted_instances_with_a_profile(world, ssm, managed):
    info = {i["InstanceId"]: i for i in ssm.describe_instance_information()["InstanceInformationList"]}
    for iid, ip in zip(managed["ids"], managed["ips"]):
        assert info[iid]["PingStatus"] == "Online"
        assert info[iid]["IPAddress"] == ip
        assert info[iid]["PlatformType"] == "Linux"
    assert managed["bare"] not in info  # no instance profile: the agent cannot register


def test_command_runs_in_the_body_with_real_output_and_exit_code(world, ssm, managed):
    iid, ip = managed["ids"][0], managed["ips"][0]
    cmd = run(ssm, iid, ["echo hello from $BAKERY_WORLD_IP", "id -u", "echo to-stderr >&2", "echo body > /root/ssm-marker"])
    assert (cmd["Status"], cmd["CompletedCount"]) == ("Pending", 0)  # as SendCommand answers on AWS
    assert cmd["InstanceIds"] == [iid]
    inv = finished(ssm, cmd["CommandId"], iid)
    assert (inv["Status"], inv["StatusDetails"], inv["ResponseCode"]) == ("Success", "Success", 0), inv
    assert inv["StandardOutputContent"] == f"hello from {ip}\n0\n"
    assert inv["StandardErrorContent"] == "to-stderr\n"
    assert inv["ExecutionElapsedTime"].startswith("PT")
    # The write landed in the body, not on the host.
    inv = finished(ssm, run(ssm, iid, ["cat /root/ssm-marker"])["CommandId"], iid)
    assert inv["StandardOutputContent"] == "body\n"
    assert not os.path.exists("/root/ssm-marker")


def test_failing_command_is_failed_with_its_exit_code(world, ssm, managed):
    iid = managed["ids"][0]
    cmd = run(ssm, iid, ["echo before", "echo boom >&2", "exit 3", "echo never"])
    inv = finished(ssm, cmd["CommandId"], iid)
    assert (inv["Status"], inv["ResponseCode"]) == ("Failed", 3), inv
    assert inv["StandardOutputContent"] == "before\n"
    assert "boom" in inv["StandardErrorContent"]
    listed = ssm.list_commands(CommandId=cmd["CommandId"])["Commands"][0]
    assert (listed["Status"], listed["ErrorCount"], listed["CompletedCount"]) == ("Failed", 1, 1)


def test_only_the_named_instance_runs_the_command(world, ssm, managed):
    a, b = managed["ids"]
    marker = f"/root/only-{uuid.uuid4().hex[:6]}"
    cmd = run(ssm, a, [f"touch {marker}"])
    finished(ssm, cmd["CommandId"], a)
    invs = ssm.list_command_invocations(CommandId=cmd["CommandId"])["CommandInvocations"]
    assert [i["InstanceId"] for i in invs] == [a]
    with pytest.raises(ClientError) as e:
        ssm.get_command_invocation(CommandId=cmd["CommandId"], InstanceId=b)
    assert e.value.response["Error"]["Code"] == "InvocationDoesNotExist"
    inv = finished(ssm, run(ssm, b, [f"test -e {marker}"])["CommandId"], b)
    assert (inv["Status"], inv["ResponseCode"]) == ("Failed", 1)


def test_targets_by_tag_reach_only_managed_instances(world, ssm, managed):
    cmd = ssm.send_command(
        Targets=[{"Key": "tag:ssm-test", "Values": [managed["tag"]]}],
        DocumentName="AWS-RunShellScript",
        Parameters={"commands": ["hostname"]},
    )["Command"]
    assert sorted(cmd["InstanceIds"]) == sorted(managed["ids"])
    for iid in managed["ids"]:
        assert finished(ssm, cmd["CommandId"], iid)["Status"] == "Success"
    c = ssm.list_commands(CommandId=cmd["CommandId"])["Commands"][0]
    assert (c["Status"], c["TargetCount"], c["CompletedCount"]) == ("Success", 2, 2)


def test_unmanaged_instance_is_rejected(world, ssm, managed):
    with pytest.raises(ClientError) as e:
        run(ssm, managed["bare"], ["true"])
    assert e.value.response["Error"]["Code"] == "InvalidInstanceId"


def test_output_is_truncated_as_the_api_does(world, ssm, managed):
    iid = managed["ids"][1]
    cmd = run(ssm, iid, ["head -c 30000 /dev/zero | tr '\\0' x"])
    inv = finished(ssm, cmd["CommandId"], iid)
    assert inv["Status"] == "Success"
    assert len(inv["StandardOutputContent"]) == 24000
    detail = ssm.list_command_invocations(CommandId=cmd["CommandId"], Details=True)["CommandInvocations"][0]
    assert len(detail["CommandPlugins"][0]["Output"]) == 2500
    assert detail["CommandPlugins"][0]["ResponseCode"] == 0


def test_execution_timeout_and_cancel(world, ssm, managed):
    iid = managed["ids"][1]
    t0 = time.time()
    slow = run(ssm, iid, ["sleep 30"], executionTimeout=1)
    inv = finished(ssm, slow["CommandId"], iid, timeout=15)
    assert (inv["Status"], inv["StatusDetails"]) == ("TimedOut", "ExecutionTimedOut"), inv
    assert time.time() - t0 < 10

    long = run(ssm, iid, ["sleep 30"])
    wait_for(
        lambda: ssm.get_command_invocation(CommandId=long["CommandId"], InstanceId=iid)["Status"] == "InProgress",
        timeout=10,
        what="InProgress",
    )
    ssm.cancel_command(CommandId=long["CommandId"])
    inv = finished(ssm, long["CommandId"], iid, timeout=10)
    assert inv["Status"] == "Cancelled", inv


def test_cancel_right_after_in_progress_ends_the_command(world, ssm, managed):
    """CancelCommand as soon as the invocation says InProgress, before its process may even
    exist: it still ends (the world used to miss the process and let it run to the end)."""
    iid = managed["ids"][0]
    for _ in range(3):
        cmd = run(ssm, iid, ["sleep 30"])["CommandId"]
        deadline = time.time() + 10
        while ssm.get_command_invocation(CommandId=cmd, InstanceId=iid)["Status"] != "InProgress":
            assert time.time() < deadline, "never InProgress"
        ssm.cancel_command(CommandId=cmd)
        inv = finished(ssm, cmd, iid, timeout=5)
        assert inv["Status"] == "Cancelled", inv


def test_dead_body_loses_its_agent_connection(world, ssm, managed):
    # Last in this file: it kills one of the module's instances.
    iid = managed["ids"][1]
    assert world.cli("crash", iid).returncode == 0

    def ping():
        info = ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [iid]}])
        return [i["PingStatus"] for i in info["InstanceInformationList"]] == ["ConnectionLost"]

    wait_for(ping, timeout=10, what="ConnectionLost")
