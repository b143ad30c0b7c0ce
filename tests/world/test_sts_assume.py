"""STS AssumeRole in the world (bakeryworld/patches_sts.py): only of a role that exists in its
account and whose trust policy allows the caller, else `AccessDenied` (HTTP 403), as AWS answers.
moto 5.2.5 alone hands out credentials for any role ARN.
"""

from __future__ import annotations

import json
import uuid

import pytest
from botocore.exceptions import ClientError

DEFAULT_ACCOUNT = "123456789012"


def trust(principal, **cond) -> str:
    stmt = {"Effect": "Allow", "Action": "sts:AssumeRole", "Principal": principal}
    if cond:
        stmt["Condition"] = cond
    return json.dumps({"Version": "2012-10-17", "Statement": [stmt]})


@pytest.fixture(scope="module")
def sts(world):
    return world.client("sts")


@pytest.fixture(scope="module")
def iam(world):
    return world.client("iam")


def denied(call, role_arn: str, caller_arn: str):
    with pytest.raises(ClientError) as e:
        call()
    err = e.value.response
    assert err["Error"]["Code"] == "AccessDenied", err
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert err["Error"]["Message"] == (
        f"User: {caller_arn} is not authorized to perform: sts:AssumeRole on resource: {role_arn}")


def test_second_account_role_still_assumable(world, sts):
    role = world.env["WORLD_SECOND_ACCOUNT_ROLE"]
    assert role == "arn:aws:iam::111122223333:role/bakery-world-release"
    c = sts.assume_role(RoleArn=role, RoleSessionName="release")["Credentials"]
    import boto3

    other = boto3.client("sts", endpoint_url=world.env["AWS_ENDPOINT_URL"], region_name=world.env["AWS_REGION"],
                         aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretAccessKey"],
                         aws_session_token=c["SessionToken"])
    me = other.get_caller_identity()
    assert me["Account"] == "111122223333"
    assert me["Arn"] == "arn:aws:sts::111122223333:assumed-role/bakery-world-release/release"


def test_role_that_does_not_exist_is_refused(sts):
    me = sts.get_caller_identity()["Arn"]
    for arn in ("arn:aws:iam::111122223333:role/no-such-role",
                f"arn:aws:iam::{DEFAULT_ACCOUNT}:role/no-such-role",
                "arn:aws:iam::444455556666:role/bakery-world-release"):  # an account the world lacks
        denied(lambda: sts.assume_role(RoleArn=arn, RoleSessionName="sess"), arn, me)


def test_deleted_role_is_refused(sts, iam):
    name = f"gone-{uuid.uuid4().hex[:8]}"
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust({"AWS": DEFAULT_ACCOUNT}))["Role"]["Arn"]
    assert sts.assume_role(RoleArn=arn, RoleSessionName="sess")["AssumedRoleUser"]["Arn"].endswith(f"/{name}/sess")
    iam.delete_role(RoleName=name)
    denied(lambda: sts.assume_role(RoleArn=arn, RoleSessionName="sess"), arn, sts.get_caller_identity()["Arn"])


def test_trust_policy_must_name_the_caller(world, sts, iam):
    me = sts.get_caller_identity()["Arn"]
    # trusts only the second account: the default account's caller is refused
    name = f"only-second-{uuid.uuid4().hex[:8]}"
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust({"AWS": "arn:aws:iam::111122223333:root"}))["Role"]["Arn"]
    denied(lambda: sts.assume_role(RoleArn=arn, RoleSessionName="sess"), arn, me)
    # ... and a session of the second account's role is let in (role chaining)
    c = sts.assume_role(RoleArn=world.env["WORLD_SECOND_ACCOUNT_ROLE"], RoleSessionName="chain")["Credentials"]
    import boto3

    second = boto3.client("sts", endpoint_url=world.env["AWS_ENDPOINT_URL"], region_name=world.env["AWS_REGION"],
                          aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretAccessKey"],
                          aws_session_token=c["SessionToken"])
    got = second.assume_role(RoleArn=arn, RoleSessionName="back")["AssumedRoleUser"]["Arn"]
    assert got == f"arn:aws:sts::{DEFAULT_ACCOUNT}:assumed-role/{name}/back"

    # a service principal only (an instance role): no IAM caller may assume it
    svc = iam.create_role(RoleName=f"svc-{uuid.uuid4().hex[:8]}",
                          AssumeRolePolicyDocument=trust({"Service": "ec2.amazonaws.com"}))["Role"]["Arn"]
    denied(lambda: sts.assume_role(RoleArn=svc, RoleSessionName="sess"), svc, me)

    # an ExternalId condition
    ext = iam.create_role(RoleName=f"ext-{uuid.uuid4().hex[:8]}",
                          AssumeRolePolicyDocument=trust({"AWS": f"arn:aws:iam::{DEFAULT_ACCOUNT}:root"},
                                                         StringEquals={"sts:ExternalId": "s3cret"}))["Role"]["Arn"]
    denied(lambda: sts.assume_role(RoleArn=ext, RoleSessionName="sess"), ext, me)
    denied(lambda: sts.assume_role(RoleArn=ext, RoleSessionName="sess", ExternalId="wrong"), ext, me)
    assert sts.assume_role(RoleArn=ext, RoleSessionName="sess", ExternalId="s3cret")["Credentials"]["AccessKeyId"]

    # an explicit Deny wins over an Allow
    both = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "sts:AssumeRole", "Principal": {"AWS": "*"}},
        {"Effect": "Deny", "Action": "sts:*", "Principal": {"AWS": DEFAULT_ACCOUNT}},
    ]})
    dn = iam.create_role(RoleName=f"deny-{uuid.uuid4().hex[:8]}", AssumeRolePolicyDocument=both)["Role"]["Arn"]
    denied(lambda: sts.assume_role(RoleArn=dn, RoleSessionName="sess"), dn, me)


def test_refusals_are_logged_as_served_calls(world, sts):
    world.control("POST", "/_world/calls/reset")
    arn = "arn:aws:iam::111122223333:role/missing"
    with pytest.raises(ClientError):
        sts.assume_role(RoleArn=arn, RoleSessionName="sess")
    calls = world.control("GET", "/_world/calls?limit=5")[1]["calls"]
    assert [(c["service"], c["action"], c["status"]) for c in calls] == [("sts", "AssumeRole", 403)]
