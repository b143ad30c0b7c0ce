"""`scripts/world up --stack`: the seed's reference architecture, built through the AWS API.

Everything here goes through boto3 against the world's endpoint, exactly as a user's tooling
would on AWS, so the stack also exercises the world itself:

    security groups   world-alb (80 from anywhere) -> world-app (8080 from world-alb only)
                      -> world-db (5432 from world-app only)
    IAM               role + instance profile `world-ssm` (the SSM agent needs one)
    image             WORLD_STACK_AMI: WORLD_BASE_AMI plus /opt/world-health/server.py and an
                      enabled unit `world-health.service` (GET /healthz on $BAKERY_WORLD_IP:8080
                      answers 200 "ok"), written into a builder instance with SSM Run Command,
                      then CreateImage
    load balancer     internet-facing ALB `world-alb` in the public subnets, target group
                      `world-web` (HTTP 8080, /healthz, interval 1 s, timeout 1 s, thresholds 2/2,
                      deregistration delay 1 s) and an HTTP:80 listener
    fleet             launch template `world-web` (HttpTokens=required, the instance profile) and
                      ASG `world-web` (min 2, max 8, desired 4) in the private subnets, attached
                      to the target group, HealthCheckType=ELB with a short grace period
    database          RDS postgres `world-db` in DB subnet group `world-db` (private subnets, not
                      publicly accessible) and a Secrets Manager secret `world/db` with its
                      connection details as JSON

Every step looks its resource up by name first, so a second `up --stack` reuses the stack.
`create` returns once all 4 instances are healthy in the target group.

`up --stack --groups N` adds groups `world-web-2` ... `world-web-N` behind the same load balancer,
each like `world-web` (its own launch template and target group, reached by a listener rule on
the host header `world-web-<i>.world.internal`), listed in `WORLD_STACK_GROUPS` as
`region/group`, with `WORLD_STACK_TARGET_GROUPS` and `WORLD_STACK_LAUNCH_TEMPLATES` in the same
order. The stack is built in the env's region (the home Region).

Several Regions (`create(..., regions=[home, R2, ...])`, `up --stack --regions ...`): every other
Region R gets its own stack, built through that Region's endpoint in its world VPC
(`WORLD_VPC_ID_<R>`, ..., regions.py) side by side with the home Region's: the security groups
`world-alb` and `world-app`, the ALB `world-alb` with its listener, and per group a target group,
a launch template and an ASG of the same names as at home (ELB, EC2 and Auto Scaling names are
regional on AWS). Its image is a CopyImage of the home Region's stack image (`world-stack-health-v1`
in R, `SourceRegion` the home Region), made the moment the home image is available; the IAM
instance profile is global. No database or secret outside the home Region. `WORLD_STACK_GROUPS`,
`WORLD_STACK_TARGET_GROUPS`, `WORLD_STACK_LAUNCH_TEMPLATES` list the home Region's groups first,
then each Region's in the order given; `WORLD_STACK_REGIONS` names the Regions, `WORLD_STACK_AMIS`
(JSON, Region -> image id) their images, and every Region R but the home Region has
`WORLD_STACK_AMI_<R>`, `WORLD_ASG_<R>`, `WORLD_TARGET_GROUP_ARN_<R>`, `WORLD_LAUNCH_TEMPLATE_ID_<R>`,
`WORLD_ALB_ARN_<R>`, `WORLD_LISTENER_ARN_<R>`, `WORLD_ALB_SG_<R>`, `WORLD_APP_SG_<R>` (<R> as in
regions.py: `EU_WEST_1`). `groups` is a count for every Region or a dict Region -> count.

The interval of 1 s is below AWS's minimum (5 s, and the timeout must be below the interval): the
world allows it, the API call is made with boto3's client-side validation turned off for ELBv2.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from .regions import env_name

NAME = "world-web"
ALB_NAME = "world-alb"
ALB_SG = "world-alb"
APP_SG = "world-app"
DB_SG = "world-db"
PROFILE = "world-ssm"
STACK_IMAGE = "world-stack-health-v1"
DB_ID = "world-db"
DB_SUBNET_GROUP = "world-db"
DB_NAME = "app"
DB_USER = "app"
SECRET = "world/db"
INSTANCE_TYPE = "t3.micro"
APP_PORT = 8080
DESIRED, MIN, MAX = 4, 2, 8
STACK_TAG = {"Key": "world:stack", "Value": "reference"}

HEALTH_SERVER = '''#!/usr/bin/env python3
"""Minimal health service of the local world's reference stack: GET /healthz -> 200 ok."""
import http.server
import os

IP = os.environ.get("BAKERY_WORLD_IP", "127.0.0.1")
PORT = int(os.environ.get("WORLD_HEALTH_PORT", "8080"))


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.split("?", 1)[0] == "/healthz":
            code, body = 200, b"ok\\n"
        else:
            code, body = 404, b"not found\\n"
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer((IP, PORT), Handler).serve_forever()
'''

HEALTH_UNIT = """[Unit]
Description=world reference stack health service (/healthz on :8080)
After=network.target

[Service]
ExecStart=/usr/bin/python3 /opt/world-health/server.py
Restart=always

[Install]
WantedBy=multi-user.target
"""

PROVISION = f"""set -e
mkdir -p /opt/world-health /etc/systemd/system/multi-user.target.wants
cat > /opt/world-health/server.py <<'WORLD_EOF'
{HEALTH_SERVER}WORLD_EOF
chmod 755 /opt/world-health/server.py
cat > /etc/systemd/system/world-health.service <<'WORLD_EOF'
{HEALTH_UNIT}WORLD_EOF
ln -sf /etc/systemd/system/world-health.service /etc/systemd/system/multi-user.target.wants/world-health.service
/usr/bin/python3 -c "import ast; ast.parse(open('/opt/world-health/server.py').read())"
echo provisioned
"""


class StackError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"world stack: {msg}", file=sys.stderr, flush=True)


def _wait(what: str, deadline_s: float, probe: Callable[[], Any], every: float = 0.5) -> Any:
    """Poll `probe` until it returns something truthy; StackError naming `what` on deadline."""
    end = time.monotonic() + deadline_s
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= end:
            raise StackError(f"timed out after {deadline_s:.0f}s waiting for {what}")
        time.sleep(every)


def _code(e: ClientError) -> str:
    return e.response.get("Error", {}).get("Code", "")


def home_region(env: dict[str, str]) -> str:
    return env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"


class Stack:
    def __init__(self, env: dict[str, str], region: str | None = None) -> None:
        """The stack of `region` (default: the env's, the home Region); another Region's ids are
        read from the env's `..._<R>` names (regions.py)."""
        self.env = env
        self.home = home_region(env)
        self.region = region or self.home
        # Called with the home image's id as soon as it is available (the other Regions copy it).
        self.on_image: Callable[[str], None] | None = None
        self.session = boto3.session.Session(
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID", "testing"),
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY", "testing"),
            aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
            region_name=self.region,
        )
        self.endpoint = env["AWS_ENDPOINT_URL"]
        cfg = Config(retries={"mode": "standard", "max_attempts": 8})
        self.ec2 = self._client("ec2", cfg)
        # The world's 1 s health-check interval is below boto3's client-side minimum (5 s).
        self.elbv2 = self._client("elbv2", cfg.merge(Config(parameter_validation=False)))
        self.asg = self._client("autoscaling", cfg)
        self.iam = self._client("iam", cfg)
        self.ssm = self._client("ssm", cfg)
        self.rds = self._client("rds", cfg)
        self.secrets = self._client("secretsmanager", cfg)
        def var(base: str) -> str:
            return env_name(base, self.region, self.home)

        if var("WORLD_VPC_ID") not in env:
            raise StackError(f"{var('WORLD_VPC_ID')} is not in the env file: {self.region} has no world VPC "
                             f"(scripts/world up --regions must name it)")
        self.vpc = env[var("WORLD_VPC_ID")]
        self.public = [s for s in env.get(var("WORLD_PUBLIC_SUBNETS"), "").split(",") if s]
        self.private = [s for s in env.get(var("WORLD_PRIVATE_SUBNETS"), "").split(",") if s]
        self.base_ami = env.get(var("WORLD_BASE_AMI"), "")
        self.boot_delay = float(env.get("WORLD_BOOT_DELAY") or 2)
        self.snapshot_delay = float(env.get("WORLD_SNAPSHOT_DELAY") or 3)
        self.copy_delay = float(env.get("WORLD_COPY_DELAY") or 0.2)
        if not self.public or not self.private:
            raise StackError(f"{var('WORLD_PUBLIC_SUBNETS')} and {var('WORLD_PRIVATE_SUBNETS')} must name subnets")

    def _client(self, service: str, cfg: Config) -> Any:
        return self.session.client(service, endpoint_url=self.endpoint, config=cfg)

    # ---------------------------------------------------------------- security groups
    def security_group(self, name: str, description: str) -> str:
        found = self.ec2.describe_security_groups(
            Filters=[{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [self.vpc]}]
        )["SecurityGroups"]
        if found:
            return found[0]["GroupId"]
        return self.ec2.create_security_group(
            GroupName=name,
            Description=description,
            VpcId=self.vpc,
            TagSpecifications=[
                {"ResourceType": "security-group", "Tags": [{"Key": "Name", "Value": name}, STACK_TAG]}
            ],
        )["GroupId"]

    def allow(self, group_id: str, port: int, *, cidr: str | None = None, source_group: str | None = None) -> None:
        perm: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": port, "ToPort": port}
        if cidr:
            perm["IpRanges"] = [{"CidrIp": cidr}]
        if source_group:
            perm["UserIdGroupPairs"] = [{"GroupId": source_group}]
        try:
            self.ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[perm])
        except ClientError as e:
            if _code(e) != "InvalidPermission.Duplicate":
                raise

    # ---------------------------------------------------------------- IAM
    def instance_profile(self) -> str:
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
            ],
        }
        try:
            self.iam.get_role(RoleName=PROFILE)
        except ClientError as e:
            if _code(e) != "NoSuchEntity":
                raise
            self.iam.create_role(RoleName=PROFILE, AssumeRolePolicyDocument=json.dumps(trust), Tags=[STACK_TAG])
            try:
                self.iam.attach_role_policy(
                    RoleName=PROFILE, PolicyArn="arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
                )
            except ClientError:
                # moto loads AWS managed policies only on request: grant the agent's actions inline.
                self.iam.put_role_policy(
                    RoleName=PROFILE,
                    PolicyName="ssm-managed-instance-core",
                    PolicyDocument=json.dumps(
                        {
                            "Version": "2012-10-17",
                            "Statement": [
                                {
                                    "Effect": "Allow",
                                    "Action": ["ssm:*", "ssmmessages:*", "ec2messages:*"],
                                    "Resource": "*",
                                }
                            ],
                        }
                    ),
                )
        try:
            prof = self.iam.get_instance_profile(InstanceProfileName=PROFILE)["InstanceProfile"]
        except ClientError as e:
            if _code(e) != "NoSuchEntity":
                raise
            prof = self.iam.create_instance_profile(InstanceProfileName=PROFILE)["InstanceProfile"]
        if not any(r["RoleName"] == PROFILE for r in prof.get("Roles", [])):
            self.iam.add_role_to_instance_profile(InstanceProfileName=PROFILE, RoleName=PROFILE)
        return PROFILE

    def allow_secret(self, secret_arn: str) -> None:
        """The instances read the database secret at run time with their own role."""
        self.iam.put_role_policy(
            RoleName=PROFILE,
            PolicyName="read-db-secret",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {"Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"], "Resource": secret_arn}
                    ],
                }
            ),
        )

    # ---------------------------------------------------------------- the stack image
    def stack_image(self, app_sg: str) -> str:
        images = self.ec2.describe_images(
            Owners=["self"], Filters=[{"Name": "name", "Values": [STACK_IMAGE]}]
        )["Images"]
        usable = [i for i in images if i["State"] in ("available", "pending")]
        if usable:
            image_id = usable[0]["ImageId"]
        else:
            image_id = self._bake_image(app_sg)
        self._wait_image(image_id)
        return image_id

    def _bake_image(self, app_sg: str) -> str:
        _log(f"baking {STACK_IMAGE} from {self.base_ami}")
        inst = self.ec2.run_instances(
            ImageId=self.base_ami,
            InstanceType=INSTANCE_TYPE,
            MinCount=1,
            MaxCount=1,
            SubnetId=self.private[0],
            SecurityGroupIds=[app_sg],
            IamInstanceProfile={"Name": PROFILE},
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "world-stack-builder"}, STACK_TAG]}
            ],
        )["Instances"][0]
        iid = inst["InstanceId"]
        try:
            try:
                _wait(
                    f"SSM agent of builder {iid} to come online",
                    30 + 3 * self.boot_delay,
                    lambda: self.ssm.describe_instance_information(
                        Filters=[{"Key": "InstanceIds", "Values": [iid]}, {"Key": "PingStatus", "Values": ["Online"]}]
                    )["InstanceInformationList"],
                )
            except StackError as e:
                raise StackError(f"{e} ({self._diagnose(iid)}; see the world's server.log)") from None
            cmd = self.ssm.send_command(
                InstanceIds=[iid],
                DocumentName="AWS-RunShellScript",
                Comment="world stack: install the health service",
                Parameters={"commands": [PROVISION], "executionTimeout": ["60"]},
            )["Command"]["CommandId"]

            def done() -> dict[str, Any] | None:
                inv = self.ssm.get_command_invocation(CommandId=cmd, InstanceId=iid)
                return inv if inv["Status"] not in ("Pending", "InProgress", "Delayed") else None

            inv = _wait(f"provisioning command {cmd} on {iid}", 90, done)
            if inv["Status"] != "Success":
                raise StackError(
                    f"provisioning {iid} failed: {inv['Status']} rc={inv['ResponseCode']}: "
                    f"{inv['StandardErrorContent'][-2000:]}"
                )
            image_id = self.ec2.create_image(
                InstanceId=iid,
                Name=STACK_IMAGE,
                Description="local world: base image plus a /healthz service on :8080",
                TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": "Name", "Value": STACK_IMAGE}, STACK_TAG]}],
            )["ImageId"]
            self._wait_image(image_id)
            return image_id
        finally:
            try:
                self.ec2.terminate_instances(InstanceIds=[iid])
            except ClientError as e:
                _log(f"warning: builder {iid} not terminated: {e}")

    def _diagnose(self, iid: str) -> str:
        try:
            inst = self.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
            assoc = self.ec2.describe_iam_instance_profile_associations(
                Filters=[{"Name": "instance-id", "Values": [iid]}]
            )["IamInstanceProfileAssociations"]
            return (
                f"instance {inst['State']['Name']} at {inst.get('PrivateIpAddress')}, "
                f"instance profile associations: {[a['IamInstanceProfile']['Arn'] for a in assoc]}"
            )
        except ClientError as e:
            return f"could not describe {iid}: {e}"

    def _wait_image(self, image_id: str) -> None:
        def state() -> bool:
            imgs = self.ec2.describe_images(ImageIds=[image_id])["Images"]
            if imgs and imgs[0]["State"] == "failed":
                raise StackError(f"image {image_id} failed: {imgs[0].get('StateReason')}")
            return bool(imgs) and imgs[0]["State"] == "available"

        # A copy is pending copy_delay s per GiB of its snapshots (amis.py; moto's are <= 15 GiB).
        _wait(f"image {image_id} in {self.region} to become available",
              60 + 3 * self.snapshot_delay + 30 * self.copy_delay, state)

    def copied_image(self, source: Callable[[], str]) -> str:
        """Another Region's stack image: a copy of the home Region's (`source()` waits for its
        id), found by name first. ClientToken makes a retried copy answer with the same image."""
        images = self.ec2.describe_images(
            Owners=["self"], Filters=[{"Name": "name", "Values": [STACK_IMAGE]}]
        )["Images"]
        usable = [i for i in images if i["State"] in ("available", "pending")]
        if usable:
            image_id = usable[0]["ImageId"]
        else:
            src = source()
            _log(f"copying {STACK_IMAGE} ({src}) from {self.home} to {self.region}")
            image_id = self.ec2.copy_image(
                Name=STACK_IMAGE,
                SourceImageId=src,
                SourceRegion=self.home,
                Description="local world: base image plus a /healthz service on :8080",
                ClientToken=f"world-stack-{src}",
                TagSpecifications=[
                    {"ResourceType": "image", "Tags": [{"Key": "Name", "Value": STACK_IMAGE}, STACK_TAG]}
                ],
            )["ImageId"]
        self._wait_image(image_id)
        return image_id

    # ---------------------------------------------------------------- load balancer
    def load_balancer(self, alb_sg: str) -> str:
        try:
            return self.elbv2.describe_load_balancers(Names=[ALB_NAME])["LoadBalancers"][0]["LoadBalancerArn"]
        except ClientError as e:
            if _code(e) not in ("LoadBalancerNotFound", "LoadBalancerNotFoundException"):
                raise
        return self.elbv2.create_load_balancer(
            Name=ALB_NAME,
            Subnets=self.public,
            SecurityGroups=[alb_sg],
            Scheme="internet-facing",
            Type="application",
            IpAddressType="ipv4",
            Tags=[STACK_TAG],
        )["LoadBalancers"][0]["LoadBalancerArn"]

    def target_group(self, name: str = NAME) -> str:
        try:
            tg = self.elbv2.describe_target_groups(Names=[name])["TargetGroups"][0]["TargetGroupArn"]
        except ClientError as e:
            if _code(e) not in ("TargetGroupNotFound", "TargetGroupNotFoundException"):
                raise
            tg = self.elbv2.create_target_group(
                Name=name,
                Protocol="HTTP",
                Port=APP_PORT,
                VpcId=self.vpc,
                TargetType="instance",
                HealthCheckProtocol="HTTP",
                HealthCheckPort="traffic-port",
                HealthCheckPath="/healthz",
                HealthCheckIntervalSeconds=1,
                HealthCheckTimeoutSeconds=1,
                HealthyThresholdCount=2,
                UnhealthyThresholdCount=2,
                Matcher={"HttpCode": "200"},
                Tags=[STACK_TAG],
            )["TargetGroups"][0]["TargetGroupArn"]
        self.elbv2.modify_target_group_attributes(
            TargetGroupArn=tg,
            Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": "1"}],
        )
        return tg

    def listener(self, alb: str, tg: str) -> str:
        for lst in self.elbv2.describe_listeners(LoadBalancerArn=alb)["Listeners"]:
            if lst["Port"] == 80:
                return lst["ListenerArn"]
        return self.elbv2.create_listener(
            LoadBalancerArn=alb,
            Protocol="HTTP",
            Port=80,
            DefaultActions=[{"Type": "forward", "TargetGroupArn": tg}],
        )["Listeners"][0]["ListenerArn"]

    def listener_rule(self, listener: str, tg: str, name: str, priority: int) -> None:
        """Another group behind the same load balancer: host-based routing to its target group."""
        for rule in self.elbv2.describe_rules(ListenerArn=listener)["Rules"]:
            for action in rule.get("Actions", []):
                if action.get("TargetGroupArn") == tg:
                    return
        self.elbv2.create_rule(
            ListenerArn=listener,
            Priority=priority,
            Conditions=[{"Field": "host-header", "HostHeaderConfig": {"Values": [f"{name}.world.internal"]}}],
            Actions=[{"Type": "forward", "TargetGroupArn": tg}],
        )

    # ---------------------------------------------------------------- fleet
    def fleet(self, index: int, image_id: str, app_sg: str, listener: str) -> tuple[str, str, str]:
        """Group `index` of the stack (0: `world-web`, the listener's default action; 1..: `world-web-2`,
        ... each with its own target group, reached by a host-header rule, and launch template).
        Returns (group name, target group ARN, launch template id)."""
        name = NAME if index == 0 else f"{NAME}-{index + 1}"
        tg = self.target_group(name)
        if index:
            self.listener_rule(listener, tg, name, priority=index)
        lt = self.launch_template(image_id, app_sg, name)
        return self.auto_scaling_group(lt, tg, name), tg, lt

    def launch_template(self, image_id: str, app_sg: str, name: str = NAME) -> str:
        try:
            lts = self.ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"]
        except ClientError as e:
            if _code(e) not in ("InvalidLaunchTemplateName.NotFoundException", "InvalidLaunchTemplateName.NotFound"):
                raise
            lts = []
        if lts:
            return lts[0]["LaunchTemplateId"]
        return self.ec2.create_launch_template(
            LaunchTemplateName=name,
            VersionDescription="world reference stack",
            LaunchTemplateData={
                "ImageId": image_id,
                "InstanceType": INSTANCE_TYPE,
                "SecurityGroupIds": [app_sg],
                "IamInstanceProfile": {"Name": PROFILE},
                "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 2},
                "BlockDeviceMappings": [
                    {"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8, "VolumeType": "gp3", "Encrypted": True}}
                ],
                "TagSpecifications": [
                    {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}, STACK_TAG]}
                ],
            },
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": [STACK_TAG]}],
        )["LaunchTemplate"]["LaunchTemplateId"]

    def auto_scaling_group(self, lt_id: str, tg: str, name: str = NAME) -> str:
        found = self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
        if found:
            return name
        self.asg.create_auto_scaling_group(
            AutoScalingGroupName=name,
            LaunchTemplate={"LaunchTemplateId": lt_id, "Version": "$Latest"},
            MinSize=MIN,
            MaxSize=MAX,
            DesiredCapacity=DESIRED,
            VPCZoneIdentifier=",".join(self.private),
            TargetGroupARNs=[tg],
            HealthCheckType="ELB",
            # Boot delay + service start + 2 passing checks, with room to spare.
            HealthCheckGracePeriod=int(5 + 2 * self.boot_delay),
            Tags=[{**STACK_TAG, "PropagateAtLaunch": True, "ResourceId": name, "ResourceType": "auto-scaling-group"}],
        )
        return name

    def wait_fleet_healthy(self, tg: str, name: str = NAME) -> None:
        def healthy() -> bool:
            group = self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
            ids = {i["InstanceId"] for i in group["Instances"] if i["LifecycleState"] == "InService"}
            th = self.elbv2.describe_target_health(TargetGroupArn=tg)["TargetHealthDescriptions"]
            ok = {d["Target"]["Id"] for d in th if d["TargetHealth"]["State"] == "healthy"}
            return len(ids & ok) >= group["DesiredCapacity"]

        _wait(f"{DESIRED} healthy targets in {self.region}/{name}", 90 + 4 * self.boot_delay, healthy)

    # ---------------------------------------------------------------- database
    def database(self, db_sg: str) -> tuple[str, str]:
        try:
            self.rds.describe_db_subnet_groups(DBSubnetGroupName=DB_SUBNET_GROUP)
        except ClientError as e:
            if _code(e) != "DBSubnetGroupNotFoundFault":
                raise
            self.rds.create_db_subnet_group(
                DBSubnetGroupName=DB_SUBNET_GROUP,
                DBSubnetGroupDescription="world reference stack: private subnets",
                SubnetIds=self.private,
                Tags=[STACK_TAG],
            )
        secret = self._secret_value()
        try:
            db = self.rds.describe_db_instances(DBInstanceIdentifier=DB_ID)["DBInstances"][0]
        except ClientError as e:
            if _code(e) != "DBInstanceNotFound":
                raise
            db = None
        password = (secret or {}).get("password") or secrets.token_urlsafe(18)
        if db is None:
            db = self.rds.create_db_instance(
                DBInstanceIdentifier=DB_ID,
                Engine="postgres",
                DBInstanceClass="db.t3.micro",
                AllocatedStorage=20,
                DBName=DB_NAME,
                MasterUsername=DB_USER,
                MasterUserPassword=password,
                VpcSecurityGroupIds=[db_sg],
                DBSubnetGroupName=DB_SUBNET_GROUP,
                PubliclyAccessible=False,
                Port=5432,
                Tags=[STACK_TAG],
            )["DBInstance"]
        elif secret is None:
            # The database outlived its secret: give it a password we know again.
            self.rds.modify_db_instance(DBInstanceIdentifier=DB_ID, MasterUserPassword=password, ApplyImmediately=True)
        endpoint = db.get("Endpoint") or {}
        details = {
            "engine": "postgres",
            "host": endpoint.get("Address", ""),
            "port": int(endpoint.get("Port") or 5432),
            "username": DB_USER,
            "password": password,
            "dbname": DB_NAME,
            "dbInstanceIdentifier": DB_ID,
        }
        if secret != details:
            if secret is None:
                try:
                    arn = self.secrets.create_secret(
                        Name=SECRET,
                        Description="world reference stack: database connection details",
                        SecretString=json.dumps(details),
                        Tags=[STACK_TAG],
                    )["ARN"]
                    return DB_ID, arn
                except ClientError as e:
                    if _code(e) != "ResourceExistsException":
                        raise
            self.secrets.put_secret_value(SecretId=SECRET, SecretString=json.dumps(details))
        return DB_ID, self.secrets.describe_secret(SecretId=SECRET)["ARN"]

    def _secret_value(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.secrets.get_secret_value(SecretId=SECRET)["SecretString"])
        except ClientError as e:
            if _code(e) != "ResourceNotFoundException":
                raise
            return None

    # ---------------------------------------------------------------- all of it
    def create(self, groups: int = 1) -> dict[str, str]:
        alb_sg = self.security_group(ALB_SG, "world reference stack: load balancer")
        app_sg = self.security_group(APP_SG, "world reference stack: instances")
        db_sg = self.security_group(DB_SG, "world reference stack: database")
        self.allow(alb_sg, 80, cidr="0.0.0.0/0")  # an API object only: nothing connects to it
        self.allow(app_sg, APP_PORT, source_group=alb_sg)
        self.allow(db_sg, 5432, source_group=app_sg)
        profile = self.instance_profile()
        db_id, secret_arn = self.database(db_sg)
        self.allow_secret(secret_arn)
        image_id = self.stack_image(app_sg)
        if self.on_image is not None:
            self.on_image(image_id)
        alb = self.load_balancer(alb_sg)
        tg = self.target_group()
        listener = self.listener(alb, tg)
        # `groups` fleets behind the load balancer, in this (the env's) region. `create` below
        # runs a Stack per other Region (`create_region`) and joins their WORLD_STACK_* lists.
        fleets = [self.fleet(i, image_id, app_sg, listener) for i in range(max(1, groups))]
        asg, tg, lt = fleets[0]
        for name, group_tg, _ in fleets:
            _log(f"waiting for {DESIRED} healthy targets in {name}")
            self.wait_fleet_healthy(group_tg, name)
        region = self.session.region_name
        return {
            "WORLD_STACK_GROUPS": ",".join(f"{region}/{name}" for name, _, _ in fleets),
            "WORLD_STACK_TARGET_GROUPS": ",".join(group_tg for _, group_tg, _ in fleets),
            "WORLD_STACK_LAUNCH_TEMPLATES": ",".join(group_lt for _, _, group_lt in fleets),
            "WORLD_ASG": asg,
            "WORLD_TARGET_GROUP_ARN": tg,
            "WORLD_ALB_ARN": alb,
            "WORLD_LISTENER_ARN": listener,
            "WORLD_LAUNCH_TEMPLATE_ID": lt,
            "WORLD_STACK_AMI": image_id,
            "WORLD_DB_INSTANCE": db_id,
            "WORLD_DB_SECRET": secret_arn,
            "WORLD_ALB_SG": alb_sg,
            "WORLD_APP_SG": app_sg,
            "WORLD_DB_SG": db_sg,
            "WORLD_INSTANCE_PROFILE": profile,
        }


    def create_region(self, groups: int, source_image: Callable[[], str]) -> dict[str, str]:
        """The stack of a Region other than the home Region: security groups, load balancer,
        listener and first target group at once; the image (a copy of the home Region's, whose
        id `source_image()` waits for), then `groups` fleets. Returns its env entries."""
        alb_sg = self.security_group(ALB_SG, "world reference stack: load balancer")
        app_sg = self.security_group(APP_SG, "world reference stack: instances")
        self.allow(alb_sg, 80, cidr="0.0.0.0/0")
        self.allow(app_sg, APP_PORT, source_group=alb_sg)
        alb = self.load_balancer(alb_sg)
        tg = self.target_group()
        listener = self.listener(alb, tg)
        image_id = self.copied_image(source_image)
        fleets = [self.fleet(i, image_id, app_sg, listener) for i in range(max(1, groups))]
        for name, group_tg, _ in fleets:
            _log(f"waiting for {DESIRED} healthy targets in {self.region}/{name}")
            self.wait_fleet_healthy(group_tg, name)
        asg, tg, lt = fleets[0]

        def var(base: str) -> str:
            return env_name(base, self.region, self.home)

        return {
            "WORLD_STACK_GROUPS": ",".join(f"{self.region}/{name}" for name, _, _ in fleets),
            "WORLD_STACK_TARGET_GROUPS": ",".join(group_tg for _, group_tg, _ in fleets),
            "WORLD_STACK_LAUNCH_TEMPLATES": ",".join(group_lt for _, _, group_lt in fleets),
            var("WORLD_ASG"): asg,
            var("WORLD_TARGET_GROUP_ARN"): tg,
            var("WORLD_ALB_ARN"): alb,
            var("WORLD_LISTENER_ARN"): listener,
            var("WORLD_LAUNCH_TEMPLATE_ID"): lt,
            var("WORLD_STACK_AMI"): image_id,
            var("WORLD_ALB_SG"): alb_sg,
            var("WORLD_APP_SG"): app_sg,
        }


def group_counts(groups: int | dict[str, int], regions: list[str] | None, home: str) -> dict[str, int]:
    """Region -> number of groups, the home Region first (it is always part of the stack)."""
    if isinstance(groups, dict):
        order = [home] + [r for r in (regions or []) if r != home] + [r for r in groups if r != home]
        counts = {r: int(groups.get(r, 0)) for r in dict.fromkeys(order)}
        counts = {r: n for r, n in counts.items() if n > 0 or r == home}
    else:
        counts = {r: int(groups) for r in dict.fromkeys([home, *(regions or [])])}
    if counts.get(home, 0) < 1:
        raise StackError(f"the stack needs at least one group in the home Region {home}")
    return counts


def create(
    env: dict[str, str],
    world_dir: Path | None = None,
    groups: int | dict[str, int] = 1,
    regions: list[str] | None = None,
) -> dict[str, str]:
    """Create (or find) the reference stack with `groups` Auto Scaling groups behind its load
    balancer in each of `regions` (default: the env's Region alone; `groups` a count for every
    Region or a dict Region -> count); returns the env vars naming its resources."""
    home = home_region(env)
    counts = group_counts(groups, regions, home)
    home_stack = Stack(env)
    others = [Stack(env, r) for r in counts if r != home]  # fails early on a Region without VPC
    if not others:
        out = home_stack.create(counts[home])  # the single-Region path, as it always was
    else:
        image: Future[str] = Future()
        home_stack.on_image = image.set_result

        def build_home() -> dict[str, str]:
            try:
                return home_stack.create(counts[home])
            finally:
                if not image.done():  # failed before its image: the other Regions stop waiting
                    image.set_exception(StackError(f"the home Region's stack ({home}) failed before its image"))

        def source() -> str:
            return image.result(timeout=300 + 4 * home_stack.boot_delay)

        with ThreadPoolExecutor(max_workers=len(counts), thread_name_prefix="world-stack") as pool:
            futures = [pool.submit(build_home)] + [pool.submit(s.create_region, counts[s.region], source) for s in others]
            results = [f.result() for f in futures]
        out = dict(results[0])
        for part in results[1:]:
            for key in ("WORLD_STACK_GROUPS", "WORLD_STACK_TARGET_GROUPS", "WORLD_STACK_LAUNCH_TEMPLATES"):
                out[key] = f"{out[key]},{part[key]}"
            out.update({k: v for k, v in part.items() if not k.startswith("WORLD_STACK_") or k.startswith("WORLD_STACK_AMI_")})
    out["WORLD_STACK_REGIONS"] = ",".join(counts)
    out["WORLD_STACK_AMIS"] = json.dumps(
        {r: out[env_name("WORLD_STACK_AMI", r, home)] for r in counts}, separators=(",", ":")
    )
    return out
