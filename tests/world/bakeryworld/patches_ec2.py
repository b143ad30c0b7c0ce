"""Fidelity patches to moto 5.2.5's EC2, each filling a gap with documented AWS behaviour.

- DescribeInstanceStatus: `initializing` until the body has booted, `impaired` when the
  body is dead (AWS: instance status checks fail when the OS is unreachable).
- GetConsoleOutput: the cloud-init SSH host key block, base64-encoded as AWS returns it;
  no `Output` before the instance has booted (AWS omits it until output is available).
- CreateImage: captures the body's upper layer; the image is `pending` for the snapshot
  delay, then `available`; without NoReboot the instance is shut down around the capture
  and boots again (AWS: "Amazon EC2 reboots the instance" unless NoReboot).
- CopyImage: the copy gets copies of the source's layers and is `pending` for a time
  proportional to its size (amis.py: tags, encryption, idempotency, sharing, deprecation,
  deregistration protection; regions.py: opt-in regions).
- CreateImage/CopyImage: a name already used by an AMI of the account is refused with
  `InvalidAMIName.Duplicate` (moto makes a second image of the same name).
- Public IPs: instances in world VPCs (CIDR in 127.0.0.0/8) get no public IP; elsewhere an
  auto-assigned public IP comes from 127.254.0.0/16 rather than moto's 54.214.x.x, so no
  client is ever pointed at a non-loopback address.
- RebootInstances: the body reboots (processes end, boot runs again after the boot delay).
- RunInstances `ClientToken`: moto stores it and launches again; AWS answers a repeated
  request with the same token with the original reservation (`IdempotentParameterMismatch`
  when the image, type or subnet differ), which is what makes a retry after a lost answer safe.
- DeleteSecurityGroup: refused with `DependencyViolation` while an instance that is not
  `terminated` uses the group (moto deletes it); AWS keeps a group while a network interface
  uses it, which is why a bake's cleanup waits for its instance to terminate.
- Launch-template versions: DeleteLaunchTemplateVersions (moto has none: a 500) deletes
  versions other than the default, reporting the others as AWS does; numbers are never reused;
  CreateLaunchTemplateVersion honours `ClientToken` (the original version on a repeat).
- IAM instance profiles at launch: moto associates a RunInstances `IamInstanceProfile` with the
  first instance only and ignores a launch template's; AWS gives every instance the profile
  (the SSM agent needs it to register).

`install` also installs the world's moto lock (`World.install_moto_lock`) before anything else.
"""

from __future__ import annotations

import time

import logging
import random
import threading

log = logging.getLogger("bakeryworld.ec2")

_W = None
_tls = threading.local()
_installed = False



# Instance id -> time.time() of its RunInstances (see run_instances below).
LAUNCHED_AT: dict[str, float] = {}

def _status_block(instance, system: bool) -> dict:
    if instance.state_code != 16:
        return {"Status": "not-applicable"}
    body = _W.bodies.get(instance.id) if _W is not None else None
    if body is not None:
        check = body.status_check()
    else:
        from .world import is_loopback

        # a world instance whose body the reconciler has not picked up yet is still booting
        check = "initializing" if is_loopback(instance.private_ip) else "ok"
    if system and check == "impaired":
        check = "ok"  # a dead OS fails the instance check; the host (system) is fine
    detail = {"ok": "passed", "initializing": "initializing", "impaired": "failed"}[check]
    d = {"Name": "reachability", "Status": detail}
    if check == "impaired" and body is not None:
        from moto.core.utils import utcnow

        d["ImpairedSince"] = utcnow()
    return {"Details": [d], "Status": check}


def install(world) -> None:
    global _W, _installed
    _W = world
    if hasattr(world, "install_moto_lock"):
        world.install_moto_lock()
    if _installed:
        return
    _installed = True

    from moto.core.responses import ActionResult
    from moto.core.types import Base64EncodedString
    from moto.core.utils import utcnow
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models import EC2Backend
    from moto.ec2.models import amis as amis_models
    from moto.ec2.models import elastic_network_interfaces as eni_mod
    from moto.ec2.models import instances as inst_models
    from moto.ec2.responses import amis as amis_resp
    from moto.ec2.responses import general as general_resp

    Instance = inst_models.Instance

    # --- instances by id -------------------------------------------------------------
    # moto finds one instance by copying every reservation the account ever had
    # (`all_reservations`) and scanning them, once per lookup. The health checker and
    # DescribeTargetHealth look up every target, so at 1,000 instances (with every terminated
    # one still kept) a health tick held the moto lock for seconds and every call waited. An
    # index answers the same objects: rebuilt when the number of reservations changes (moto
    # never removes one), and once more on a miss (a reservation is stored before its
    # instances are added to it).
    InstanceBackend = inst_models.InstanceBackend
    orig_get_instance_by_id = InstanceBackend.get_instance_by_id

    def instance_index(backend, fresh: bool = False) -> dict:
        n = len(backend.reservations)
        cached = backend.__dict__.get("_bakeryworld_instances")
        if fresh or cached is None or cached[0] != n:
            index = {i.id: i for r in list(backend.reservations.values()) for i in r.instances}
            cached = (n, index)
            backend.__dict__["_bakeryworld_instances"] = cached
        return cached[1]

    def get_instance_by_id(self, instance_id: str):
        found = instance_index(self).get(instance_id)
        if found is None:
            found = instance_index(self, fresh=True).get(instance_id)
        return found

    def get_instance(self, instance_id: str):
        found = get_instance_by_id(self, instance_id)
        if found is None:
            from moto.ec2.exceptions import InvalidInstanceIdError

            raise InvalidInstanceIdError(instance_id)
        return found

    InstanceBackend.get_instance_by_id = get_instance_by_id
    InstanceBackend.get_instance = get_instance
    InstanceBackend._bakeryworld_orig_get_instance_by_id = orig_get_instance_by_id

    # --- status checks -------------------------------------------------------------
    Instance.instance_status = property(lambda self: _status_block(self, system=False))
    Instance.system_status = property(lambda self: _status_block(self, system=True))

    # --- DescribeInstanceStatus filters on the statuses ------------------------------------
    # moto ignores `instance-status.status`, `system-status.status` and their `.reachability`
    # filters and answers every instance. AWS answers only the matching ones, which is why a
    # fleet's health check asks for `impaired` alone: at 1,000 instances moto serialized every
    # status, 0.23 s a call with the moto lock held.
    status_filters = {
        "instance-status.status": lambda i: i.instance_status["Status"],
        "system-status.status": lambda i: i.system_status["Status"],
        "instance-status.reachability": lambda i: i.instance_status["Details"][0]["Status"],
        "system-status.reachability": lambda i: i.system_status["Details"][0]["Status"],
    }
    orig_describe_instance_status = InstanceBackend.describe_instance_status

    def describe_instance_status(self, instance_ids, include_all_instances, filters):
        ours = [f for f in filters or [] if f.get("name") in status_filters]
        rest = [f for f in filters or [] if f.get("name") not in status_filters]
        found = orig_describe_instance_status(self, instance_ids, include_all_instances, rest)
        for f in ours:
            value_of, wanted = status_filters[f["name"]], set(f.get("values") or [])
            found = [i for i in found if value_of(i) in wanted]
        return found

    InstanceBackend.describe_instance_status = describe_instance_status

    # --- console output --------------------------------------------------------------
    def get_console_output(self):
        instance_id = self._get_param("InstanceId")
        instance = self.ec2_backend.get_instance(instance_id)
        result = {"InstanceId": instance.id, "Timestamp": utcnow()}
        body = _W.bodies.get(instance.id) if _W is not None else None
        from .world import is_loopback

        if body is not None or is_loopback(instance.private_ip):
            text = body.console_output() if body is not None else None
            if text:
                result["Output"] = Base64EncodedString.from_raw_string(text)
        else:
            result["Output"] = Base64EncodedString.from_raw_string(general_resp.SAMPLE_CONSOLE_OUTPUT)
        return ActionResult(result)

    general_resp.General.get_console_output = get_console_output

    # --- CreateImage / CopyImage -------------------------------------------------------
    orig_resp_create_image = amis_resp.AmisResponse.create_image

    def resp_create_image(self):
        _tls.no_reboot = self._get_bool_param("NoReboot", False)
        try:
            return orig_resp_create_image(self)
        finally:
            _tls.no_reboot = False

    amis_resp.AmisResponse.create_image = resp_create_image

    orig_create_image = amis_models.AmiBackend.create_image

    def refuse_duplicate_name(backend, name):
        for other in list(backend.amis.values()):
            if other.name == name and other.owner_id == backend.account_id:
                raise EC2ClientError(
                    "InvalidAMIName.Duplicate",
                    f"AMI name {name} is already in use by AMI {other.id}",
                )

    def create_image(self, instance_id, name, description, tag_specifications):
        refuse_duplicate_name(self, name)
        ami = orig_create_image(self, instance_id, name, description, tag_specifications)
        instance = self.get_instance(instance_id)
        if _W is not None:
            try:
                _W.images.on_create_image(ami, instance, bool(getattr(_tls, "no_reboot", False)))
            except Exception as e:
                ami.state = "failed"
                _W.log(f"{ami.id}: capture failed: {e!r}")
        return ami

    amis_models.AmiBackend.create_image = create_image

    orig_copy_image = amis_models.AmiBackend.copy_image

    def copy_image(self, source_image_id, source_region, name=None, description=None, **copy):
        # copy: delay / fail / on_done from amis.py's CopyImage (size, KMS key); none: the defaults
        if name:
            refuse_duplicate_name(self, name)
        ami = orig_copy_image(self, source_image_id, source_region, name, description)
        if _W is not None:
            _W.images.on_copy_image(ami, source_image_id, **copy)
        return ami

    amis_models.AmiBackend.copy_image = copy_image

    # --- public IPs ----------------------------------------------------------------------
    def loopback_public_ip() -> str:
        return f"127.254.{random.randint(0, 255)}.{random.randint(1, 254)}"

    eni_mod.random_public_ip = loopback_public_ip
    orig_check = eni_mod.NetworkInterface.check_auto_public_ip

    def check_auto_public_ip(self):
        subnet = getattr(self, "subnet", None)
        vpc_id = getattr(subnet, "vpc_id", None)
        if _W is not None and _W.is_world_vpc(vpc_id):
            self.public_ip = None
            return
        orig_check(self)

    eni_mod.NetworkInterface.check_auto_public_ip = check_auto_public_ip

    # --- reboot --------------------------------------------------------------------------
    orig_reboot = Instance.reboot

    def reboot(self):
        orig_reboot(self)
        body = _W.bodies.get(self.id) if _W is not None else None
        if body is not None:
            body.request_reboot()

    Instance.reboot = reboot

    # --- launch times and the IAM instance profile of every instance launched ---------------
    orig_run_instances = EC2Backend.run_instances

    def run_instances(self, image_id, count, user_data, security_group_names, **kwargs):
        # moto associates a RunInstances' IamInstanceProfile with the first instance only (in
        # the response layer, after this returns) and ignores a launch template's. AWS gives
        # every instance the profile; the SSM agent needs it to register.
        reservation = orig_run_instances(self, image_id, count, user_data, security_group_names, **kwargs)
        # The moment each instance was launched, to the millisecond (moto's launch_time has
        # whole seconds): a body's boot delay counts from here, as an EC2 boot does, not from
        # when the reconciler happens to notice the instance.
        now = time.time()
        for inst in reservation.instances:
            LAUNCHED_AT[inst.id] = now
        name, arn = kwargs.get("iam_instance_profile_name"), kwargs.get("iam_instance_profile_arn")
        instances = list(reservation.instances)
        if name or arn:
            instances = instances[1:]  # the response layer associates the first one itself
        elif kwargs.get("launch_template"):
            try:
                data = self._get_template_from_args(kwargs["launch_template"]).data
            except Exception:
                data = {}
            prof = data.get("IamInstanceProfile") or {}
            name, arn = prof.get("Name"), prof.get("Arn")
        if name or arn:
            for inst in instances:
                if inst.id in self.iam_instance_profile_associations:
                    continue
                try:
                    self.associate_iam_instance_profile(
                        instance_id=inst.id, iam_instance_profile_name=name, iam_instance_profile_arn=arn
                    )
                except Exception:
                    log.warning("instance profile %s not associated with %s", name or arn, inst.id, exc_info=True)
        return reservation

    EC2Backend.run_instances = run_instances  # type: ignore[method-assign]

    # --- a security group in use cannot be deleted -------------------------------------------
    from moto.ec2.models.security_groups import SecurityGroupBackend

    orig_delete_security_group = SecurityGroupBackend.delete_security_group

    def delete_security_group(self, name=None, group_id=None):
        group = self.get_security_group_from_id(group_id) if group_id else None
        if group is None and name:
            group = self.get_security_group_by_name_or_id(name)
        if group is not None:
            for inst in self.all_instances():
                if inst.state == "terminated":
                    continue
                used = {g.id for g in inst.security_groups}
                for nic in (inst.nics or {}).values():
                    used |= {g.id for g in nic.group_set}
                if group.id in used:
                    raise EC2ClientError(
                        "DependencyViolation", f"resource {group.id} has a dependent object"
                    )
        return orig_delete_security_group(self, name=name, group_id=group_id)

    SecurityGroupBackend.delete_security_group = delete_security_group  # type: ignore[method-assign]

    # --- launch-template versions: deletion, numbers never reused, ClientToken ----------------
    from moto.ec2.exceptions import InvalidLaunchTemplateVersionNotFound
    from moto.ec2.models import launch_templates as lt_models
    from moto.ec2.responses.launch_templates import LaunchTemplates as LtResponse

    LaunchTemplate = lt_models.LaunchTemplate
    # Deleted versions stay in moto's list (it finds version N at index N-1) as tombstones.
    orig_get_version = LaunchTemplate.get_version

    def live(template):
        return [v for v in template.versions if not getattr(v, "deleted", False)]

    def get_version(self, num):
        if str(num).lower() == "$latest":
            return live(self)[-1]
        v = orig_get_version(self, num)
        if getattr(v, "deleted", False):
            raise InvalidLaunchTemplateVersionNotFound(template_id=self.id, version=num)
        return v

    LaunchTemplate.get_version = get_version  # type: ignore[method-assign]
    LaunchTemplate.latest_version = lambda self: live(self)[-1]  # type: ignore[method-assign]

    orig_describe_versions = lt_models.LaunchTemplateBackend.describe_launch_template_versions

    def describe_launch_template_versions(self, template_name=None, template_id=None, versions=None,
                                          min_version=None, max_version=None, max_results=15):
        # moto slices to max_results before the tombstones come out: ask for all, then slice.
        found = orig_describe_versions(
            self, template_name=template_name, template_id=template_id, versions=versions,
            min_version=min_version, max_version=max_version, max_results=10**9,
        )
        return [(t, v) for t, v in found if not getattr(v, "deleted", False)][:max_results]

    lt_models.LaunchTemplateBackend.describe_launch_template_versions = describe_launch_template_versions  # type: ignore[method-assign]

    def resp_delete_launch_template_versions(self):
        name = self._get_param("LaunchTemplateName")
        tmpl_id = self._get_param("LaunchTemplateId")
        template = self.ec2_backend.get_launch_template(tmpl_id) if tmpl_id else \
            self.ec2_backend.get_launch_template_by_name(name)
        self.error_on_dryrun()
        done, failed = [], []
        for asked in self._get_param("Versions", []):
            entry = {"LaunchTemplateId": template.id, "LaunchTemplateName": template.name}
            try:
                number = int(asked)
                version = template.versions[number - 1] if 0 < number <= len(template.versions) else None
            except ValueError:
                version = None
            if version is None or getattr(version, "deleted", False):
                failed.append({**entry, "VersionNumber": int(asked) if str(asked).isdigit() else 0,
                               "ResponseError": {"Code": "launchTemplateVersionDoesNotExist",
                                                 "Message": "The specified launch template version does not exist."}})
            elif template.is_default(version):
                failed.append({**entry, "VersionNumber": version.number,
                               "ResponseError": {"Code": "launchTemplateVersionIsDefaultVersion",
                                                 "Message": "The default version of a launch template cannot be deleted."}})
            else:
                version.deleted = True
                done.append({**entry, "VersionNumber": version.number})
        return ActionResult({"SuccessfullyDeletedLaunchTemplateVersions": done,
                             "UnsuccessfullyDeletedLaunchTemplateVersions": failed})

    LtResponse.delete_launch_template_versions = resp_delete_launch_template_versions

    orig_resp_create_lt_version = LtResponse.create_launch_template_version

    def resp_create_launch_template_version(self):
        token = self._get_param("ClientToken")
        if token:
            tmpl_id = self._get_param("LaunchTemplateId")
            template = self.ec2_backend.get_launch_template(tmpl_id) if tmpl_id else \
                self.ec2_backend.get_launch_template_by_name(self._get_param("LaunchTemplateName"))
            known = getattr(template, "client_tokens", {})
            version = known.get(token)
            if version is not None and not getattr(version, "deleted", False):
                self.error_on_dryrun()
                return ActionResult({"LaunchTemplateVersion": {
                    "CreateTime": version.create_time,
                    "CreatedBy": f"arn:{self.partition}:iam::{self.current_account}:root",
                    "DefaultVersion": template.is_default(version),
                    "LaunchTemplateData": version.data,
                    "LaunchTemplateId": template.id,
                    "LaunchTemplateName": template.name,
                    "VersionDescription": version.description,
                    "VersionNumber": version.number,
                }})
            result = orig_resp_create_lt_version(self)
            template.client_tokens = {**known, token: template.versions[-1]}
            return result
        return orig_resp_create_lt_version(self)

    LtResponse.create_launch_template_version = resp_create_launch_template_version

    # --- RunInstances is idempotent by ClientToken --------------------------------------------
    from moto.ec2.responses.instances import InstanceResponse

    orig_resp_run_instances = InstanceResponse.run_instances

    def resp_run_instances(self):
        token = self._get_param("ClientToken")
        if token:
            for reservation in list(self.ec2_backend.reservations.values()):
                if not reservation.instances or reservation.instances[0].client_token != token:
                    continue
                first = reservation.instances[0]
                asked = {
                    "image": self._get_param("ImageId"),
                    "type": self._get_param("InstanceType"),
                    "subnet": self._get_param("SubnetId"),
                }
                had = {"image": first.image_id, "type": first.instance_type, "subnet": first.subnet_id}
                if any(asked[k] is not None and asked[k] != had[k] for k in asked):
                    raise EC2ClientError(
                        "IdempotentParameterMismatch",
                        f"Arguments on this idempotent request are inconsistent with arguments used in "
                        f"previous request(s) with client token {token}.",
                    )
                self.error_on_dryrun()
                return ActionResult(reservation)
        return orig_resp_run_instances(self)

    InstanceResponse.run_instances = resp_run_instances  # type: ignore[method-assign]

    # --- regions, accounts, CopyImage, deprecation, protection, sharing (amis.py, regions.py) ---
    from . import amis, regions

    amis.install(world)
    regions.install(world)
