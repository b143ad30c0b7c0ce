"""Regions and accounts: the world as several AWS Regions and a second account.

Server side (`install(world)`, called by `patches_ec2.install`):

- Opt-in Regions. Opt-in Regions are disabled until an account enables them (AWS Account
  Management guide, "Specify which AWS Regions your account can use"); an EC2
  call signed for such a Region by an account that has not enabled it fails with `AuthFailure`
  ("AWS was not able to validate the provided access credentials", HTTP 401): credentials
  are not valid in a disabled Region. No account of the world opts in, so `ap-east-1` (the
  one the env file names as `WORLD_OPT_IN_REGION`), `me-south-1`, `af-south-1`, ... refuse
  every EC2 call. moto 5.2.5 serves every Region and lists `af-south-1`, `eu-south-1` and
  `ap-southeast-3` as `opt-in-not-required` (all three are opt-in Regions); DescribeRegions
  lists only enabled Regions unless `AllRegions=true` ("Indicates whether to display all
  Regions, including Regions that are disabled for your account"), with `OptInStatus`
  `not-opted-in` for the disabled ones.
- Bodies in every Region and account: the body reconciler walks every EC2 backend moto has
  made (`World.ec2_backends`); each Region's world VPC has its own 127.N.0.0/16.

`up` side (`ensure`, called by `cli.cmd_up`): the base network of every Region of
`--regions` (the first, `us-east-1`, is the home Region made by `cli.ensure_network`; env names
unchanged), a KMS key `alias/world-ebs` per Region, and the second account (`111122223333`):
the IAM role `bakery-world-release` (assumed through STS; moto switches to the account of the
role ARN) and its own base network in every Region. Env names: see `tests/world/README.md`.

`up --stack` side (`parse_groups`, `stack_plan`, called by `cli.cmd_up`): which Regions get the
reference stack and how many groups each (`--groups N` with `--regions`, or `--groups R=N,...`);
stack.py builds them.
"""

from __future__ import annotations

import functools
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HOME_REGION = "us-east-1"
DEFAULT_REGIONS = ("us-east-1", "eu-west-1", "ap-northeast-2")
SECOND_ACCOUNT = "111122223333"
RELEASE_ROLE = "bakery-world-release"
KMS_ALIAS = "alias/world-ebs"
# An opt-in Region (Asia Pacific (Hong Kong)) no account of the world has enabled.
OPT_IN_EXAMPLE = "ap-east-1"
# The commercial Regions that need no opt-in (enabled by default: those launched before March
# 2019); every other Region botocore knows is an opt-in Region. moto 5.2.5 counts af-south-1,
# eu-south-1 and ap-southeast-3 here too; AWS documents them as opt-in Regions.
NO_OPT_IN = frozenset({
    "ap-northeast-1", "ap-northeast-2", "ap-northeast-3", "ap-south-1", "ap-southeast-1",
    "ap-southeast-2", "ca-central-1", "eu-central-1", "eu-north-1", "eu-west-1", "eu-west-2",
    "eu-west-3", "sa-east-1", "us-east-1", "us-east-2", "us-west-1", "us-west-2",
})
# Regions an account has enabled, beyond those that need no opt-in. None by default.
ENABLED: dict[str, set[str]] = {}

AUTH_FAILURE = "AWS was not able to validate the provided access credentials"


def suffix(region: str) -> str:
    """`eu-west-1` -> `EU_WEST_1` (env names of Regions other than the home Region)."""
    return region.upper().replace("-", "_")


def env_name(base: str, region: str, home: str = HOME_REGION) -> str:
    return base if region == home else f"{base}_{suffix(region)}"


@functools.lru_cache(maxsize=1)
def commercial_regions() -> frozenset[str]:
    import botocore.session

    return frozenset(botocore.session.get_session().get_available_regions("ec2"))


def opt_in_regions() -> frozenset[str]:
    return commercial_regions() - NO_OPT_IN


def region_enabled(account_id: str, region: str) -> bool:
    return region not in opt_in_regions() or region in ENABLED.get(account_id, set())


# ----------------------------------------------------------------------------- server side
_installed = False


def install(world) -> None:
    global _installed
    if _installed:
        return
    _installed = True

    from moto.core.responses import ActionResult, BaseResponse
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models.availability_zones_and_regions import RegionsAndZonesBackend
    from moto.ec2.responses import EC2Response
    from moto.ec2.responses.availability_zones_and_regions import AvailabilityZonesAndRegions

    for r in RegionsAndZonesBackend.regions:
        if r.name in opt_in_regions():
            r.opt_in_status = "not-opted-in"

    def call_action(self):
        # Before the moto lock: the refusal reads nothing of moto's models.
        region = getattr(self, "region", None)
        account = getattr(self, "current_account", None)
        if region and account and not region_enabled(account, region):
            status, headers, body = self.serialized(ActionResult(EC2ClientError("AuthFailure", AUTH_FAILURE)))
            headers["status"] = "401"
            return 401, headers, body
        return BaseResponse.call_action(self)  # the moto lock's wrapper (World.install_moto_lock)

    EC2Response.call_action = call_action  # type: ignore[method-assign]

    class Listed:
        """A Region as DescribeRegions reports it to this account."""

        def __init__(self, region, status):
            self.name, self.endpoint, self.opt_in_status = region.name, region.endpoint, status

    def describe_regions(self):
        self.error_on_dryrun()
        names = self._get_param("RegionNames", [])
        every = self._get_bool_param("AllRegions", False)
        account = self.current_account
        out = []
        for r in self.ec2_backend.describe_regions(names):
            status = r.opt_in_status
            if status != "opt-in-not-required":
                status = "opted-in" if region_enabled(account, r.name) else "not-opted-in"
            if status == "not-opted-in" and not every and not names:
                continue
            out.append(Listed(r, status))
        return ActionResult({"Regions": out})

    AvailabilityZonesAndRegions.describe_regions = describe_regions
    world.log(f"regions: {len(opt_in_regions())} opt-in Regions (e.g. {OPT_IN_EXAMPLE}) refused for every account")


# ----------------------------------------------------------------------------- `up` side
def parse_regions(text: str | None) -> list[str]:
    """The Regions of `up --regions` (ValueError names what is wrong)."""
    if not text:
        return list(DEFAULT_REGIONS)
    regions = [r.strip() for r in text.split(",") if r.strip()]
    if not regions or regions[0] != HOME_REGION:
        raise ValueError(f"--regions must start with the home Region {HOME_REGION} (got {text!r})")
    if len(set(regions)) != len(regions):
        raise ValueError(f"--regions names a Region twice: {text!r}")
    for r in regions:
        if r not in commercial_regions():
            raise ValueError(f"--regions: unknown Region {r!r}")
        if not region_enabled("", r):
            raise ValueError(f"--regions: {r} is an opt-in Region the world's accounts have not enabled")
    return regions


class OctetClaims:
    """Claims more 127.N.0.0/16 ranges for this world (world.json `octets`), thread-safe."""

    def __init__(self, cli, sd: Path) -> None:
        from .world import base_dir_for

        self.cli = cli
        self.sd = sd
        self.path = base_dir_for(sd) / "world.json"
        self.lock = threading.Lock()

    def __call__(self) -> int:
        with self.lock:
            claim = json.loads(self.path.read_text())
            mine = {int(claim["octet"]), *(int(o) for o in claim.get("octets", []))}
            n = self.cli.choose_octet(self.sd, exclude=mine, preferred=max(mine) + 1)
            claim["octets"] = sorted(mine - {int(claim["octet"])} | {n})
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(claim))
            tmp.replace(self.path)
            return n


def _kms_key(kms) -> str:
    """The ARN of the world's customer managed key `alias/world-ebs` (made once)."""
    for a in kms.list_aliases()["Aliases"]:
        if a["AliasName"] == KMS_ALIAS and a.get("TargetKeyId"):
            return kms.describe_key(KeyId=a["TargetKeyId"])["KeyMetadata"]["Arn"]
    key = kms.create_key(Description="bakery world: EBS encryption for image copies",
                         Tags=[{"TagKey": "bakery-world", "TagValue": "ebs"}])["KeyMetadata"]
    kms.create_alias(AliasName=KMS_ALIAS, TargetKeyId=key["KeyId"])
    return key["Arn"]


def second_account_credentials(cli, port: int) -> dict:
    """Credentials of the second account: AssumeRole of its release role."""
    sts = cli.boto_client("sts", port)
    c = sts.assume_role(RoleArn=f"arn:aws:iam::{SECOND_ACCOUNT}:role/{RELEASE_ROLE}",
                        RoleSessionName="bakery-world-up")["Credentials"]
    return {"aws_access_key_id": c["AccessKeyId"], "aws_secret_access_key": c["SecretAccessKey"],
            "aws_session_token": c["SessionToken"]}


def _release_role(cli, port: int, creds: dict) -> str:
    from botocore.exceptions import ClientError

    iam = cli.boto_client("iam", port, credentials=creds)
    try:
        return iam.get_role(RoleName=RELEASE_ROLE)["Role"]["Arn"]
    except ClientError as e:
        if e.response["Error"]["Code"] != "NoSuchEntity":
            raise
    trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "sts:AssumeRole",
        "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
    }]}
    return iam.create_role(RoleName=RELEASE_ROLE, AssumeRolePolicyDocument=json.dumps(trust),
                           Description="bakery world: the second account's release role")["Role"]["Arn"]


def ensure(cli, port: int, sd: Path, regions: list[str]) -> dict[str, str]:
    """Every Region's base network and KMS key, and the second account with its role and a base
    network in every Region; returns the env entries. The home Region's own network
    is made by `cli.ensure_network`, its env names are `cli.cmd_up`'s. `cli`: the running
    command's module (`scripts/world` runs it as `__main__`), for its helpers and errors."""
    boto_client, ensure_network, TAG = cli.boto_client, cli.ensure_network, cli.TAG
    claims = OctetClaims(cli, sd)
    creds = second_account_credentials(cli, port)
    env: dict[str, str] = {
        "WORLD_REGIONS": ",".join(regions),
        "WORLD_KMS_ALIAS": KMS_ALIAS,
        "WORLD_OPT_IN_REGION": OPT_IN_EXAMPLE,
        "WORLD_SECOND_ACCOUNT_ID": SECOND_ACCOUNT,
    }

    jobs = [(r, s) for s in (False, True) for r in regions if s or r != HOME_REGION]
    clients = {j: boto_client("ec2", port, region=j[0], credentials=creds if j[1] else None) for j in jobs}
    # Ranges in a fixed order (Regions as listed, then the second account's), so a world gets the
    # same addresses every time; the networks are then made side by side.
    octets: dict[tuple[str, bool], int] = {}
    for j in jobs:
        if not clients[j].describe_vpcs(Filters=[{"Name": f"tag:{TAG}", "Values": ["base"]}])["Vpcs"]:
            octets[j] = claims()

    def network(j: tuple[str, bool]) -> dict:
        return ensure_network(port, sd, region=j[0], ec2=clients[j], new_octet=lambda: octets.pop(j))

    def key(region: str) -> str:
        return _kms_key(boto_client("kms", port, region=region))

    with ThreadPoolExecutor(max_workers=8) as pool:
        role = pool.submit(_release_role, cli, port, creds)
        keys = {r: pool.submit(key, r) for r in regions}
        nets = {j: pool.submit(network, j) for j in jobs}
        env["WORLD_SECOND_ACCOUNT_ROLE"] = role.result()
        for region, f in keys.items():
            env[env_name("WORLD_KMS_KEY_ARN", region)] = f.result()
        for (region, second), f in nets.items():
            net = f.result()
            prefix = "WORLD_SECOND_ACCOUNT_" if second else "WORLD_"
            env[env_name(prefix + "VPC_ID", region)] = net["vpc"]
            env[env_name(prefix + "VPC_CIDR", region)] = net["cidr"]
            env[env_name(prefix + "PUBLIC_SUBNETS", region)] = ",".join(net["public"])
            env[env_name(prefix + "PRIVATE_SUBNETS", region)] = ",".join(net["private"])
            if not second:
                env[env_name("WORLD_BASE_AMI", region)] = net["base_ami"]
    return env


# ----------------------------------------------------------------------------- `up --stack`
def parse_groups(text: str | int | None) -> int | dict[str, int]:
    """`up --groups`: `N` (N groups in every Region of the stack) or `R1=N1,R2=N2` (that many in
    each Region named, which are then the stack's Regions). ValueError names what is wrong."""
    text = "1" if text is None else str(text).strip()
    if "=" not in text:
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"--groups must be a count or REGION=COUNT,... (got {text!r})") from None
        if n < 1:
            raise ValueError("--groups must be >= 1")
        return n
    out: dict[str, int] = {}
    for part in text.split(","):
        region, _, count = part.strip().partition("=")
        region = region.strip()
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"--groups: {part.strip()!r} is not REGION=COUNT") from None
        if not region or n < 1:
            raise ValueError(f"--groups: {part.strip()!r} needs a Region and a count >= 1")
        if region in out:
            raise ValueError(f"--groups names {region} twice")
        out[region] = n
    if HOME_REGION not in out:
        raise ValueError(f"--groups {text}: the stack needs the home Region {HOME_REGION} (e.g. {HOME_REGION}=1)")
    return out


def stack_groups(env: dict[str, str]) -> dict[str, int]:
    """Region -> groups of the stack an env file lists (`WORLD_STACK_GROUPS`, `region/group`)."""
    have: dict[str, int] = {}
    for g in env.get("WORLD_STACK_GROUPS", "").split(","):
        if "/" in g:
            region = g.split("/", 1)[0]
            have[region] = have.get(region, 0) + 1
    if not have and "WORLD_ASG" in env:
        have[HOME_REGION] = 1
    return have


def stack_plan(groups: int | dict[str, int], regions_given: list[str] | None, world_regions: list[str],
               env: dict[str, str]) -> tuple[bool, dict[str, int]]:
    """What `up --stack` must build: (whether anything is missing, Region -> groups). Requested:
    `groups` per Region of `--groups R=N,...`, else N in each Region of `--regions` when given,
    else N in the home Region. A warm stack keeps what it has (never fewer groups or Regions):
    each Region gets max(has, requested)."""
    if isinstance(groups, dict):
        wanted = dict(groups)
    else:
        wanted = {r: groups for r in (regions_given or [HOME_REGION])}
    unknown = [r for r in wanted if r not in world_regions]
    if unknown:
        raise ValueError(f"--stack in {', '.join(unknown)}: not a Region of the world "
                         f"({','.join(world_regions)}); add it to --regions")
    have = stack_groups(env)
    order = [HOME_REGION, *world_regions, *have, *wanted]
    counts = {r: max(have.get(r, 0), wanted.get(r, 0)) for r in dict.fromkeys(order)}
    counts = {r: n for r, n in counts.items() if n > 0}
    missing = "WORLD_ASG" not in env or any(have.get(r, 0) < n for r, n in wanted.items())
    return missing, counts
