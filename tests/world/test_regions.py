"""Regions, the second account and image copies (regions.py, amis.py): what a boto3 caller sees,
as AWS would answer it."""

from __future__ import annotations

import ipaddress
import re
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from conftest import Box, err_of, wait_for

EU = "eu-west-1"
AP = "ap-northeast-2"
HOME = "us-east-1"

SERVICE = """[Unit]
Description=regions probe
[Service]
ExecStart=/usr/bin/python3 -m http.server --bind ${BAKERY_WORLD_IP} 18081 --directory /opt/regions-probe
[Install]
WantedBy=multi-user.target
"""


def http_get(url: str, timeout: float = 2.0) -> str:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        return r.read().decode()


def sfx(region: str) -> str:
    return "" if region == HOME else "_" + region.upper().replace("-", "_")


def client(world, service: str, region: str = HOME, creds: dict | None = None, access_key: str | None = None):
    import boto3
    from botocore.config import Config

    creds = creds or {"aws_access_key_id": access_key or world.env["AWS_ACCESS_KEY_ID"],
                      "aws_secret_access_key": world.env["AWS_SECRET_ACCESS_KEY"]}
    return boto3.client(service, endpoint_url=world.env["AWS_ENDPOINT_URL"], region_name=region,
                        config=Config(retries={"mode": "standard", "max_attempts": 3}), **creds)


def with_key(ec2, keypair) -> None:
    """The test key pair, imported into this client's account and Region (key pairs are regional)."""
    from botocore.exceptions import ClientError

    try:
        ec2.import_key_pair(KeyName=keypair["name"], PublicKeyMaterial=(keypair["dir"] / "id_ed25519.pub").read_bytes())
    except ClientError as e:
        if e.response["Error"]["Code"] != "InvalidKeyPair.Duplicate":
            raise


def launch_in(world, ec2, keypair, image_id: str, subnets: str) -> Box:
    with_key(ec2, keypair)
    inst = ec2.run_instances(ImageId=image_id, MinCount=1, MaxCount=1, InstanceType="t3.micro",
                             KeyName=keypair["name"], SubnetId=subnets.split(",")[0])["Instances"][0]
    return Box(world, ec2, keypair, inst)


def image(ec2, image_id: str) -> dict:
    return ec2.describe_images(ImageIds=[image_id])["Images"][0]


@pytest.fixture(scope="module")
def second(world):
    """Credentials of the second account, by AssumeRole of the role the env file names."""
    c = client(world, "sts").assume_role(RoleArn=world.env["WORLD_SECOND_ACCOUNT_ROLE"],
                                         RoleSessionName="world-test")["Credentials"]
    return {"aws_access_key_id": c["AccessKeyId"], "aws_secret_access_key": c["SecretAccessKey"],
            "aws_session_token": c["SessionToken"]}


@pytest.fixture(scope="module")
def baked(world, keypair):
    """An AMI in the home Region with a token file and an enabled service that serves it."""
    ec2 = client(world, "ec2")
    box = launch_in(world, ec2, keypair, world.env["WORLD_BASE_AMI"], world.env["WORLD_PRIVATE_SUBNETS"])
    try:
        box.wait_ssh()
        token = uuid.uuid4().hex
        box.ssh(
            "mkdir -p /opt/regions-probe /etc/systemd/system/multi-user.target.wants && "
            f"echo {token} > /opt/regions-probe/token.txt && "
            f"cat > /etc/systemd/system/regions-probe.service <<'EOF'\n{SERVICE}EOF\n"
            "ln -sf /etc/systemd/system/regions-probe.service "
            "/etc/systemd/system/multi-user.target.wants/regions-probe.service"
        )
        ami = ec2.create_image(
            InstanceId=box.id, Name=f"regions-{token[:8]}", NoReboot=True,
            TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": "team", "Value": "release"}]}],
        )["ImageId"]
        wait_for(lambda: image(ec2, ami)["State"] == "available", timeout=30, what="baked image available")
    finally:
        ec2.terminate_instances(InstanceIds=[box.id])
    return {"ami": ami, "token": token}


@pytest.fixture(scope="module")
def deprecating(world, second):
    """An AMI shared with the second account whose deprecation time is the next whole minute:
    set when the module starts, checked by the last test (so the wait overlaps the others)."""
    ec2 = client(world, "ec2")
    ami = ec2.register_image(Name=f"deprecating-{uuid.uuid4().hex[:8]}")["ImageId"]
    ec2.modify_image_attribute(ImageId=ami, LaunchPermission={"Add": [{"UserId": world.env["WORLD_SECOND_ACCOUNT_ID"]}]})
    now = datetime.now(timezone.utc)
    at = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    if (at - now).total_seconds() < 2:
        at += timedelta(minutes=1)
    ec2.enable_image_deprecation(ImageId=ami, DeprecateAt=at)
    listed = client(world, "ec2", creds=second).describe_images(ExecutableUsers=["self"])["Images"]
    assert ami in [i["ImageId"] for i in listed], "not deprecated yet: listed for the account it is shared with"
    return {"ami": ami, "at": at}


def test_regions_each_have_their_own_range_and_the_home_names_stay(world, deprecating):
    env = world.env
    assert env["WORLD_REGIONS"].split(",") == [HOME, EU, AP]
    assert env["AWS_REGION"] == HOME and env["WORLD_VPC_ID"] and env["WORLD_BASE_AMI"]
    cidrs = []
    for region in env["WORLD_REGIONS"].split(","):
        for prefix, creds in (("WORLD_", None), ("WORLD_SECOND_ACCOUNT_", "second")):
            cidr = env[f"{prefix}VPC_CIDR{sfx(region)}"]
            net = ipaddress.ip_network(cidr)
            assert net.subnet_of(ipaddress.ip_network("127.0.0.0/8")) and net.prefixlen == 16, cidr
            cidrs.append(cidr)
        ec2 = client(world, "ec2", region)
        vpc = ec2.describe_vpcs(VpcIds=[env[f"WORLD_VPC_ID{sfx(region)}"]])["Vpcs"][0]
        assert vpc["CidrBlock"] == env[f"WORLD_VPC_CIDR{sfx(region)}"]
        subnets = env[f"WORLD_PRIVATE_SUBNETS{sfx(region)}"].split(",") + env[f"WORLD_PUBLIC_SUBNETS{sfx(region)}"].split(",")
        found = ec2.describe_subnets(SubnetIds=subnets)["Subnets"]
        assert {s["VpcId"] for s in found} == {vpc["VpcId"]} and {s["AvailabilityZone"][:-1] for s in found} == {region}
        assert not any(s["MapPublicIpOnLaunch"] for s in found)
        assert image(ec2, env[f"WORLD_BASE_AMI{sfx(region)}"])["State"] == "available"
        key = client(world, "kms", region).describe_key(KeyId=env["WORLD_KMS_ALIAS"])["KeyMetadata"]
        assert key["Arn"] == env[f"WORLD_KMS_KEY_ARN{sfx(region)}"] and f":kms:{region}:" in key["Arn"]
    assert len(set(cidrs)) == len(cidrs) == 6, cidrs
    # the ranges are claimed, so a world started beside this one picks others
    import json

    from bakeryworld.world import base_dir_for

    claim = json.loads((base_dir_for(world.dir) / "world.json").read_text())
    held = {claim["octet"], *claim["octets"]}
    assert held == {int(c.split(".")[1]) for c in cidrs}


def test_up_refuses_regions_it_cannot_serve(world):
    for regions, why in (("eu-west-1,us-east-1", "must start with the home Region us-east-1"),
                         ("us-east-1,ap-east-1", "ap-east-1 is an opt-in Region"),
                         ("us-east-1,mars-north-1", "unknown Region 'mars-north-1'")):
        p = world.cli("up", "--regions", regions)
        assert p.returncode == 2 and why in p.stderr, (regions, p.returncode, p.stderr)


def test_the_second_account_is_reached_by_assume_role(world, second, baked):
    sts = client(world, "sts", creds=second)
    assert sts.get_caller_identity()["Account"] == world.env["WORLD_SECOND_ACCOUNT_ID"] == "111122223333"
    assert world.env["WORLD_SECOND_ACCOUNT_ROLE"] == "arn:aws:iam::111122223333:role/bakery-world-release"
    role = client(world, "iam", creds=second).get_role(RoleName="bakery-world-release")["Role"]
    assert role["Arn"] == world.env["WORLD_SECOND_ACCOUNT_ROLE"]
    mine = {i["ImageId"] for i in client(world, "ec2").describe_images(Owners=["self"])["Images"]}
    theirs = {i["ImageId"] for i in client(world, "ec2", creds=second).describe_images(Owners=["self"])["Images"]}
    assert baked["ami"] in mine and baked["ami"] not in theirs


def test_a_copy_in_another_region_is_pending_for_its_size_then_boots_the_baked_content(world, keypair, baked, faults):
    home, eu = client(world, "ec2"), client(world, "ec2", EU)
    src = image(home, baked["ami"])
    size = sum(m["Ebs"]["VolumeSize"] for m in src["BlockDeviceMappings"] if "Ebs" in m)
    expected = float(world.env["WORLD_COPY_DELAY"]) * size  # seconds per GiB of the source's snapshots
    t0 = time.time()
    copy = eu.copy_image(
        SourceImageId=baked["ami"], SourceRegion=HOME, Name=f"copy-{uuid.uuid4().hex[:8]}",
        Encrypted=True, KmsKeyId=world.env["WORLD_KMS_ALIAS"], CopyImageTags=True,
        TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": "stage", "Value": "eu"}]},
                           {"ResourceType": "snapshot", "Tags": [{"Key": "copy-of", "Value": baked["ami"]}]}],
    )["ImageId"]
    # the home Region's caller is throttled throughout the copy: the copy does not depend on it
    faults({"seed": 3, "rules": [{"action": "ec2:*", "access_key": world.env["AWS_ACCESS_KEY_ID"], "throttle": 1.0}]})
    watcher = client(world, "ec2", EU, access_key="copy-watcher")
    img = image(watcher, copy)
    assert img["State"] == "pending"
    assert img["SourceImageId"] == baked["ami"] and img["SourceImageRegion"] == HOME
    tags = {t["Key"]: t["Value"] for t in img["Tags"]}
    assert tags == {"team": "release", "stage": "eu"}, "CopyImageTags and the image TagSpecifications"
    ebs = img["BlockDeviceMappings"][0]["Ebs"]
    assert ebs["Encrypted"] is True
    progress = []
    while True:
        snap = watcher.describe_snapshots(SnapshotIds=[ebs["SnapshotId"]])["Snapshots"][0]
        state = image(watcher, copy)["State"]
        if state != "pending":
            break
        assert snap["State"] == "pending" and re.fullmatch(r"\d{1,2}%", snap["Progress"]), snap
        progress.append(int(snap["Progress"][:-1]))
        assert time.time() - t0 < expected + 15, "copy still pending"
        time.sleep(0.3)
    took = time.time() - t0
    assert state == "available"
    assert expected - 0.5 <= took <= expected + 3, f"pending {took:.1f}s for {size} GiB at {world.env['WORLD_COPY_DELAY']} s/GiB"
    assert progress == sorted(progress) and progress[-1] > progress[0], progress
    snap = watcher.describe_snapshots(SnapshotIds=[ebs["SnapshotId"]])["Snapshots"][0]
    assert snap["State"] == "completed" and snap["Progress"] == "100%"
    assert snap["Encrypted"] is True and snap["KmsKeyId"] == world.env["WORLD_KMS_KEY_ARN_EU_WEST_1"]
    assert {t["Key"]: t["Value"] for t in snap["Tags"]} == {"copy-of": baked["ami"]}
    world.control("DELETE", "/_world/faults")

    box = launch_in(world, eu, keypair, copy, world.env["WORLD_PRIVATE_SUBNETS_EU_WEST_1"])
    try:
        assert ipaddress.ip_address(box.ip) in ipaddress.ip_network(world.env["WORLD_VPC_CIDR_EU_WEST_1"])
        box.wait_ssh()
        assert box.ssh("cat /opt/regions-probe/token.txt").stdout.strip() == baked["token"]
        served = wait_for(lambda: _get(f"http://{box.ip}:18081/token.txt"), timeout=10, what="baked service in eu-west-1")
        assert served.strip() == baked["token"]
        st = world.control("GET", f"/_world/instances/{box.id}")
        assert st[0] == 200 and st[1]["body"]["image_id"] == copy
    finally:
        eu.terminate_instances(InstanceIds=[box.id])


def _get(url: str) -> str | None:
    try:
        return http_get(url, timeout=1)
    except OSError:
        return None


def test_copy_encryption_keys_tags_and_client_token(world, baked):
    eu = client(world, "ec2", EU)
    # no KmsKeyId: the destination Region's AWS managed key for EBS
    plain = eu.copy_image(SourceImageId=baked["ami"], SourceRegion=HOME, Name=f"enc-{uuid.uuid4().hex[:8]}", Encrypted=True)["ImageId"]
    snap_id = image(eu, plain)["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    snap = eu.describe_snapshots(SnapshotIds=[snap_id])["Snapshots"][0]
    ebs_key = client(world, "kms", EU).describe_key(KeyId="alias/aws/ebs")["KeyMetadata"]["Arn"]
    assert snap["Encrypted"] is True and snap["KmsKeyId"] == ebs_key
    # without Encrypted, a copy of an unencrypted image stays unencrypted; no tags unless asked
    clear = eu.copy_image(SourceImageId=baked["ami"], SourceRegion=HOME, Name=f"clear-{uuid.uuid4().hex[:8]}")["ImageId"]
    img = image(eu, clear)
    assert img["BlockDeviceMappings"][0]["Ebs"]["Encrypted"] is False and not img.get("Tags")
    # a key of another Region (the home Region's key ARN) does not exist in the destination:
    # accepted, then the copy fails ("AWS authenticates the KMS key asynchronously")
    for key in (world.env["WORLD_KMS_KEY_ARN"], "alias/no-such-key"):
        bad = eu.copy_image(SourceImageId=baked["ami"], SourceRegion=HOME, Name=f"badkey-{uuid.uuid4().hex[:8]}",
                            Encrypted=True, KmsKeyId=key)["ImageId"]
        assert image(eu, bad)["State"] == "pending"
        failed = wait_for(lambda: (i := image(eu, bad))["State"] == "failed" and i, timeout=10, what="copy failed")
        assert failed["StateReason"]["Code"] == "Client.InvalidKMSKey.NotFound", failed["StateReason"]
        snap_id = failed["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
        assert eu.describe_snapshots(SnapshotIds=[snap_id])["Snapshots"][0]["State"] == "error"
    # TagSpecifications other than image and snapshot fail the request
    code = err_of(lambda: eu.copy_image(SourceImageId=baked["ami"], SourceRegion=HOME, Name=f"x-{uuid.uuid4().hex[:8]}",
                                        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "a", "Value": "b"}]}]))
    assert code == ("InvalidParameterValue", 400), code
    # ClientToken: a repeat answers with the first copy; other parameters are a mismatch
    token, name = uuid.uuid4().hex, f"token-{uuid.uuid4().hex[:8]}"
    first = eu.copy_image(SourceImageId=baked["ami"], SourceRegion=HOME, Name=name, ClientToken=token)["ImageId"]
    assert eu.copy_image(SourceImageId=baked["ami"], SourceRegion=HOME, Name=name, ClientToken=token)["ImageId"] == first
    code = err_of(lambda: eu.copy_image(SourceImageId=baked["ami"], SourceRegion=HOME, Name=name + "-other", ClientToken=token))
    assert code == ("IdempotentParameterMismatch", 400), code
    assert len(eu.describe_images(Filters=[{"Name": "name", "Values": [name]}])["Images"]) == 1
    # AMIs are regional: the home Region's id is not an image of eu-west-1
    code = err_of(lambda: eu.run_instances(ImageId=baked["ami"], MinCount=1, MaxCount=1, InstanceType="t3.micro",
                                           SubnetId=world.env["WORLD_PRIVATE_SUBNETS_EU_WEST_1"].split(",")[0]))
    assert code == ("InvalidAMIID.NotFound", 400), code


def test_an_image_shared_with_the_second_account_is_listed_and_boots_there(world, keypair, second, baked):
    home, theirs = client(world, "ec2"), client(world, "ec2", creds=second)
    other = world.env["WORLD_SECOND_ACCOUNT_ID"]
    ami = home.copy_image(SourceImageId=baked["ami"], SourceRegion=HOME, Name=f"share-{uuid.uuid4().hex[:8]}")["ImageId"]
    wait_for(lambda: image(home, ami)["State"] == "available", timeout=15, what="copy available")
    # not shared yet: invisible and not launchable
    assert err_of(lambda: theirs.describe_images(ImageIds=[ami]))[0] == "InvalidAMIID.NotFound"
    assert ami not in [i["ImageId"] for i in theirs.describe_images(ExecutableUsers=["self"])["Images"]]
    subnet = world.env["WORLD_SECOND_ACCOUNT_PRIVATE_SUBNETS"].split(",")[0]
    with_key(theirs, keypair)
    code = err_of(lambda: theirs.run_instances(ImageId=ami, MinCount=1, MaxCount=1, InstanceType="t3.micro", SubnetId=subnet))
    assert code == ("InvalidAMIID.NotFound", 400), code

    home.modify_image_attribute(ImageId=ami, LaunchPermission={"Add": [{"UserId": other}]})
    shared = theirs.describe_images(ExecutableUsers=["self"])["Images"]
    assert ami in [i["ImageId"] for i in shared]
    # only images shared with the account: none of the public Amazon images moto listed too
    assert {i["OwnerId"] for i in shared} == {"123456789012"}, {i.get("ImageOwnerAlias") for i in shared}
    assert image(theirs, ami)["ImageId"] == ami
    assert ami in [i["ImageId"] for i in theirs.describe_images(Owners=["123456789012"])["Images"]]
    assert ami not in [i["ImageId"] for i in theirs.describe_images(Owners=["self"])["Images"]]
    # only the owner changes the image
    code = err_of(lambda: theirs.modify_image_attribute(ImageId=ami, LaunchPermission={"Add": [{"UserId": "444455556666"}]}))
    assert code == ("InvalidAMIID.NotFound", 400), code

    box = launch_in(world, theirs, keypair, ami, world.env["WORLD_SECOND_ACCOUNT_PRIVATE_SUBNETS"])
    try:
        assert ipaddress.ip_address(box.ip) in ipaddress.ip_network(world.env["WORLD_SECOND_ACCOUNT_VPC_CIDR"])
        assert theirs.describe_instances(InstanceIds=[box.id])["Reservations"][0]["OwnerId"] == other
        box.wait_ssh()
        assert box.ssh("cat /opt/regions-probe/token.txt").stdout.strip() == baked["token"]
    finally:
        theirs.terminate_instances(InstanceIds=[box.id])

    # copying it into the second account needs read access to its snapshot
    snap = image(home, ami)["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    theirs_eu = client(world, "ec2", EU, creds=second)
    copy = lambda: theirs_eu.copy_image(SourceImageId=ami, SourceRegion=HOME, Name=f"theirs-{uuid.uuid4().hex[:8]}")  # noqa: E731
    assert err_of(copy) == ("InvalidRequest", 400)
    home.modify_snapshot_attribute(SnapshotId=snap, Attribute="createVolumePermission", OperationType="add", UserIds=[other])
    perms = home.describe_snapshot_attribute(SnapshotId=snap, Attribute="createVolumePermission")["CreateVolumePermissions"]
    assert perms == [{"UserId": other}]
    theirs_copy = copy()["ImageId"]
    assert image(theirs_eu, theirs_copy)["OwnerId"] == other

    # organization and OU launch permissions are accepted and kept
    org = "arn:aws:organizations::123456789012:organization/o-abcde12345"
    ou = "arn:aws:organizations::123456789012:ou/o-abcde12345/ou-ab12-34cd56ef"
    home.modify_image_attribute(ImageId=ami, LaunchPermission={"Add": [{"OrganizationArn": org}, {"OrganizationalUnitArn": ou}]})
    perms = home.describe_image_attribute(ImageId=ami, Attribute="launchPermission")["LaunchPermissions"]
    assert {"UserId": other} in perms and {"OrganizationArn": org} in perms and {"OrganizationalUnitArn": ou} in perms


def test_deregistration_protection(world):
    ec2 = client(world, "ec2")
    ami = ec2.register_image(Name=f"protected-{uuid.uuid4().hex[:8]}")["ImageId"]
    assert image(ec2, ami)["DeregistrationProtection"] == "disabled"
    assert ec2.enable_image_deregistration_protection(ImageId=ami)["Return"] == "true"
    assert image(ec2, ami)["DeregistrationProtection"] == "enabled-without-cooldown"
    code = err_of(lambda: ec2.deregister_image(ImageId=ami))
    assert code == ("OperationNotPermitted", 400), code
    ec2.disable_image_deregistration_protection(ImageId=ami)
    assert image(ec2, ami)["DeregistrationProtection"] == "disabled"
    ec2.deregister_image(ImageId=ami)

    ami = ec2.register_image(Name=f"cooldown-{uuid.uuid4().hex[:8]}")["ImageId"]
    ec2.enable_image_deregistration_protection(ImageId=ami, WithCooldown=True)
    assert image(ec2, ami)["DeregistrationProtection"] == "enabled-with-cooldown"
    ec2.disable_image_deregistration_protection(ImageId=ami)
    state = image(ec2, ami)["DeregistrationProtection"]
    m = re.fullmatch(r"disabled-after: (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.000Z", state)
    assert m, state
    until = datetime.fromisoformat(m.group(1)).replace(tzinfo=timezone.utc)
    assert abs((until - datetime.now(timezone.utc)).total_seconds() - 24 * 3600) < 120
    code = err_of(lambda: ec2.deregister_image(ImageId=ami))
    assert code == ("OperationNotPermitted", 400), "still protected during the 24-hour cooldown"
    assert image(ec2, ami)["State"] == "available"


def test_deprecation_time_is_set_rounded_and_cleared(world):
    ec2 = client(world, "ec2")
    ami = ec2.register_image(Name=f"deprecate-{uuid.uuid4().hex[:8]}")["ImageId"]
    assert "DeprecationTime" not in image(ec2, ami)
    at = datetime(2031, 5, 6, 7, 8, 40, tzinfo=timezone.utc)
    assert ec2.enable_image_deprecation(ImageId=ami, DeprecateAt=at)["Return"] is True
    assert image(ec2, ami)["DeprecationTime"] == "2031-05-06T07:09:00.000Z", "rounded to the nearest minute"
    ec2.enable_image_deprecation(ImageId=ami, DeprecateAt=at.replace(second=29))
    assert image(ec2, ami)["DeprecationTime"] == "2031-05-06T07:08:00.000Z"
    assert ec2.disable_image_deprecation(ImageId=ami)["Return"] is True
    assert "DeprecationTime" not in image(ec2, ami)
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    code = err_of(lambda: ec2.enable_image_deprecation(ImageId=ami, DeprecateAt=past))
    assert code == ("InvalidParameterValue", 400), code
    code = err_of(lambda: ec2.enable_image_deprecation(ImageId=ami, DeprecateAt=datetime.now(timezone.utc) + timedelta(days=3700)))
    assert code == ("InvalidParameterValue", 400), code


def test_an_opt_in_region_the_account_did_not_enable_refuses_calls(world):
    region = world.env["WORLD_OPT_IN_REGION"]
    assert region == "ap-east-1"
    ec2 = client(world, "ec2", region)
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as e:
        ec2.describe_vpcs()
    assert e.value.response["Error"]["Code"] == "AuthFailure"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 401
    home = client(world, "ec2")
    enabled = {r["RegionName"] for r in home.describe_regions()["Regions"]}
    assert {HOME, EU, AP} <= enabled and not {"ap-east-1", "me-south-1", "af-south-1"} & enabled
    every = {r["RegionName"]: r["OptInStatus"] for r in home.describe_regions(AllRegions=True)["Regions"]}
    assert every["ap-east-1"] == every["af-south-1"] == every["eu-south-1"] == "not-opted-in"
    assert every[EU] == "opt-in-not-required"
    # CopyImage into such a Region is one of its calls
    code = err_of(lambda: client(world, "ec2", "me-south-1").copy_image(
        SourceImageId=world.env["WORLD_BASE_AMI"], SourceRegion=HOME, Name="never"))
    assert code == ("AuthFailure", 401), code


def test_a_deprecated_shared_image_leaves_the_other_accounts_listings(world, second, deprecating):
    """Last in the module: waits for the deprecation time `deprecating` set at the start."""
    ami, at = deprecating["ami"], deprecating["at"]
    ec2, theirs = client(world, "ec2"), client(world, "ec2", creds=second)
    assert image(ec2, ami)["DeprecationTime"] == at.strftime("%Y-%m-%dT%H:%M:00.000Z")
    wait_for(lambda: datetime.now(timezone.utc) > at + timedelta(seconds=0.5), timeout=70, interval=0.2,
             what="the deprecation time")
    assert ami not in [i["ImageId"] for i in theirs.describe_images(ExecutableUsers=["self"])["Images"]]
    assert ami not in [i["ImageId"] for i in theirs.describe_images()["Images"]]
    listed = theirs.describe_images(ExecutableUsers=["self"], IncludeDeprecated=True)["Images"]
    assert ami in [i["ImageId"] for i in listed]
    assert image(theirs, ami)["ImageId"] == ami, "a deprecated AMI is still described by its id"
    assert ami in [i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]], "the owner still sees it"
