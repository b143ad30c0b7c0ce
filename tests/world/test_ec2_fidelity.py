"""EC2 behaviour the world adds to moto (patches_ec2.py): idempotent RunInstances, unique AMI
names, security groups kept while in use."""

from __future__ import annotations

import time
import uuid

import pytest
from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

from conftest import err_of


def test_run_instances_honours_its_client_token_after_a_lost_answer(world, faults):
    ec2 = world.client("ec2", retries=0)
    token = f"token-{uuid.uuid4().hex}"
    kw = dict(
        ImageId=world.env["WORLD_BASE_AMI"], MinCount=1, MaxCount=1, InstanceType="t3.micro",
        SubnetId=world.env["WORLD_PRIVATE_SUBNETS"].split(",")[0], ClientToken=token,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "token", "Value": token}]}],
    )
    faults({"seed": 5, "rules": [{"action": "ec2:RunInstances", "lose": 1}]})
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
        ec2.run_instances(**kw)
    world.control("DELETE", "/_world/faults")
    first = ec2.run_instances(**kw)["Instances"][0]["InstanceId"]
    again = ec2.run_instances(**kw)["Instances"][0]["InstanceId"]
    try:
        assert first == again, "the same token answers with the original instance"
        made = [i["InstanceId"]
                for r in ec2.describe_instances(Filters=[{"Name": "tag:token", "Values": [token]}])["Reservations"]
                for i in r["Instances"]]
        assert made == [first], f"one instance for one token, got {made}"
        code = err_of(lambda: ec2.run_instances(**{**kw, "InstanceType": "t3.small"}))
        assert code and code[0] == "IdempotentParameterMismatch", code
    finally:
        ec2.terminate_instances(InstanceIds=[first])


def test_ami_names_are_unique_per_account(world, launch):
    ec2 = world.client("ec2", retries=0)
    box = launch()
    name = f"unique-{uuid.uuid4().hex[:8]}"
    image = ec2.create_image(InstanceId=box.id, Name=name, NoReboot=True)["ImageId"]
    try:
        code = err_of(lambda: ec2.create_image(InstanceId=box.id, Name=name, NoReboot=True))
        assert code == ("InvalidAMIName.Duplicate", 400), code
        code = err_of(lambda: ec2.copy_image(SourceImageId=image, SourceRegion=world.env["AWS_REGION"], Name=name))
        assert code == ("InvalidAMIName.Duplicate", 400), code
    finally:
        ec2.deregister_image(ImageId=image)


def test_a_security_group_in_use_is_kept_until_its_instance_is_terminated(world):
    ec2 = world.client("ec2", retries=0)
    sg = ec2.create_security_group(
        GroupName=f"in-use-{uuid.uuid4().hex[:8]}", Description="in use", VpcId=world.env["WORLD_VPC_ID"]
    )["GroupId"]
    inst = ec2.run_instances(
        ImageId=world.env["WORLD_BASE_AMI"], MinCount=1, MaxCount=1, InstanceType="t3.micro",
        SubnetId=world.env["WORLD_PRIVATE_SUBNETS"].split(",")[0], SecurityGroupIds=[sg],
    )["Instances"][0]["InstanceId"]
    try:
        code = err_of(lambda: ec2.delete_security_group(GroupId=sg))
        assert code and code[0] == "DependencyViolation", code
    finally:
        ec2.terminate_instances(InstanceIds=[inst])
    deadline = time.time() + 30
    while ec2.describe_instances(InstanceIds=[inst])["Reservations"][0]["Instances"][0]["State"]["Name"] != "terminated":
        assert time.time() < deadline, "instance never terminated"
        time.sleep(0.2)
    ec2.delete_security_group(GroupId=sg)
    assert err_of(lambda: ec2.describe_security_groups(GroupIds=[sg]))[0] == "InvalidGroup.NotFound"


@pytest.fixture
def template(world):
    """A launch template of its own (version 1 on the base image), deleted afterwards."""
    ec2 = world.client("ec2", retries=0)
    lt = ec2.create_launch_template(
        LaunchTemplateName=f"lt-{uuid.uuid4().hex[:8]}", LaunchTemplateData={"ImageId": world.env["WORLD_BASE_AMI"]}
    )["LaunchTemplate"]["LaunchTemplateId"]
    yield lt
    ec2.delete_launch_template(LaunchTemplateId=lt)


def test_launch_template_versions_can_be_deleted_but_not_the_default_and_numbers_are_not_reused(world, template):
    ec2 = world.client("ec2", retries=0)
    ami, lt = world.env["WORLD_BASE_AMI"], template
    for _ in range(3):
        ec2.create_launch_template_version(LaunchTemplateId=lt, LaunchTemplateData={"ImageId": ami})
    out = ec2.delete_launch_template_versions(LaunchTemplateId=lt, Versions=["1", "3", "4", "9"])
    assert [v["VersionNumber"] for v in out["SuccessfullyDeletedLaunchTemplateVersions"]] == [3, 4]
    refused = {v["VersionNumber"]: v["ResponseError"]["Code"] for v in out["UnsuccessfullyDeletedLaunchTemplateVersions"]}
    assert refused == {1: "launchTemplateVersionIsDefaultVersion", 9: "launchTemplateVersionDoesNotExist"}
    listed = ec2.describe_launch_template_versions(LaunchTemplateId=lt)["LaunchTemplateVersions"]
    assert sorted(v["VersionNumber"] for v in listed) == [1, 2]
    code = err_of(lambda: ec2.describe_launch_template_versions(LaunchTemplateId=lt, Versions=["3"]))
    assert code and code[0] == "InvalidLaunchTemplateId.VersionNotFound", code
    latest = ec2.describe_launch_template_versions(LaunchTemplateId=lt, Versions=["$Latest"])
    assert latest["LaunchTemplateVersions"][0]["VersionNumber"] == 2
    made = ec2.create_launch_template_version(LaunchTemplateId=lt, LaunchTemplateData={"ImageId": ami})
    assert made["LaunchTemplateVersion"]["VersionNumber"] == 5, "a deleted number is never reused"


def test_create_launch_template_version_honours_its_client_token(world, faults, template):
    ec2 = world.client("ec2", retries=0)
    ami, lt = world.env["WORLD_BASE_AMI"], template
    token = uuid.uuid4().hex
    faults({"seed": 6, "rules": [{"action": "ec2:CreateLaunchTemplateVersion", "lose": 1}]})
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
        ec2.create_launch_template_version(LaunchTemplateId=lt, LaunchTemplateData={"ImageId": ami}, ClientToken=token)
    world.control("DELETE", "/_world/faults")
    again = ec2.create_launch_template_version(LaunchTemplateId=lt, LaunchTemplateData={"ImageId": ami}, ClientToken=token)
    assert again["LaunchTemplateVersion"]["VersionNumber"] == 2, "the version the lost call made"
    listed = ec2.describe_launch_template_versions(LaunchTemplateId=lt)["LaunchTemplateVersions"]
    assert sorted(v["VersionNumber"] for v in listed) == [1, 2]
    other = ec2.create_launch_template_version(LaunchTemplateId=lt, LaunchTemplateData={"ImageId": ami})
    assert other["LaunchTemplateVersion"]["VersionNumber"] == 3


def test_instances_are_found_by_id_as_they_are_launched_and_an_unknown_id_is_not_found(world):
    """The world's index of instances by id (patches_ec2.py) answers what moto's scan did: every
    instance of a reservation, however many lookups came before it was made."""
    ec2 = world.client("ec2")
    kw = dict(ImageId=world.env["WORLD_BASE_AMI"], InstanceType="t3.micro",
              SubnetId=world.env["WORLD_PRIVATE_SUBNETS"].split(",")[0])
    first = ec2.run_instances(MinCount=1, MaxCount=1, **kw)["Instances"][0]["InstanceId"]
    pair = [i["InstanceId"] for i in ec2.run_instances(MinCount=2, MaxCount=2, **kw)["Instances"]]
    try:
        for iid in [first, *pair]:
            a = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceType")
            assert (a["InstanceId"], a["InstanceType"]["Value"]) == (iid, "t3.micro")
        ec2.terminate_instances(InstanceIds=[pair[0]])
        a = ec2.describe_instance_attribute(InstanceId=pair[0], Attribute="instanceType")
        assert a["InstanceId"] == pair[0], "a terminated instance is still known, as on AWS"
        code = err_of(lambda: ec2.describe_instance_attribute(InstanceId="i-0123456789abcdef0",
                                                              Attribute="instanceType"))
        assert code and code[0] == "InvalidInstanceID.NotFound", code
    finally:
        ec2.terminate_instances(InstanceIds=[first, *pair])
