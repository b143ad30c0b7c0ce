"""AMI fidelity for promotion across regions and accounts (moto 5.2.5 measured), each to
documented AWS behaviour (EC2 API Reference, EC2 User Guide):

- CopyImage (the API reference's CopyImage page): the copy is `pending` for
  `copy_delay` seconds per GiB of the source's snapshots, its snapshot `pending` with a
  `Progress` percentage, then `available` / `completed` (moto: `available` at once). The
  image's layers are copied (hard links, on the image tmpfs) so an instance launched from the
  copy, in its own region, boots the baked content. `TagSpecifications` of type `image` and
  `snapshot` land on the copy and its snapshot (any other type: `InvalidParameterValue`),
  `CopyImageTags` copies the source's user-defined tags (not `aws:` ones; from another
  account's AMI only `ec2:SharedTag/` ones). `Encrypted` / `KmsKeyId`: the copy's snapshot is
  encrypted with the key's ARN (default: the destination Region's `alias/aws/ebs`; a copy of
  an encrypted snapshot stays encrypted), the image's block device mapping says
  `Encrypted: true`. "AWS authenticates the KMS key asynchronously ... the action can appear to
  complete, but eventually fails" and "the specified KMS key must exist in the destination
  Region": a key that does not exist there (or is not enabled / not symmetric) leaves the copy
  `failed` with a `StateReason`, its snapshot `error`. `ClientToken` makes the call idempotent
  (the original ImageId; `IdempotentParameterMismatch` for other parameters). The copy reports
  `SourceImageId` / `SourceImageRegion`. Copying an AMI another account shared needs read
  access to its snapshot (`createVolumePermission`), else `InvalidRequest`.
- EnableImageDeprecation / DisableImageDeprecation (moto: not implemented): `DeprecationTime`
  in DescribeImages, rounded to the nearest minute; a time in the past, or more than 10 years
  ahead, is refused. Past that time the AMI drops out of other accounts' DescribeImages
  listings unless `IncludeDeprecated` (the owner, and a lookup by id, still see it).
- EnableImageDeregistrationProtection / DisableImageDeregistrationProtection (moto: not
  implemented): `DeregistrationProtection` in DescribeImages; DeregisterImage is refused with
  `OperationNotPermitted` while protected, including the 24 hours after disabling protection
  that was enabled `WithCooldown`.
- Sharing across accounts (moto keeps each account's images apart): an image another account
  shared with the caller (`LaunchPermission` `UserId`, or public) is listed by DescribeImages
  (by id, plain, `Owners=[<owner>]`, `ExecutableUsers=["self"]`) and launchable. moto's
  `ExecutableUsers` also returned every public image; AWS returns public ones only for `all`.
  RunInstances of an AMI the caller cannot see in that Region (another account's unshared AMI,
  or an AMI of another Region) fails with `InvalidAMIID.NotFound`, as on AWS: AMIs are
  regional, and private to their owner unless shared.

Installed by `patches_ec2.install` (after its own CreateImage/CopyImage patches).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

_W = None
_installed = False

PROTECTION_COOLDOWN = timedelta(hours=24)  # "enforces deregistration protection for 24 hours"
DEPRECATION_MAX = timedelta(days=3650)  # "The upper limit for DeprecateAt is 10 years from now"
KMS_FAILED = "Client.InvalidKMSKey.NotFound"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso_minute(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:00.000Z")


def _parse_time(value) -> datetime:
    if isinstance(value, datetime):
        dt = value
    else:
        text = str(value).strip()
        if text.replace(".", "", 1).isdigit():
            dt = datetime.fromtimestamp(float(text), timezone.utc)
        else:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def protection_state(ami) -> str:
    """DeregistrationProtection as DescribeImages reports it."""
    p = getattr(ami, "_world_protection", None)
    if p is None:
        return "disabled"
    if p["until"] is None:
        return "enabled-with-cooldown" if p["cooldown"] else "enabled-without-cooldown"
    if _now() < p["until"]:
        return "disabled-after: " + p["until"].strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return "disabled"


def is_protected(ami) -> bool:
    return protection_state(ami) != "disabled"


def is_deprecated(ami) -> bool:
    at = getattr(ami, "_world_deprecate_at", None)
    return at is not None and at <= _now()


def visible_to(ami, account_id: str) -> bool:
    """Whether another account's AMI is available to `account_id`: public, or shared with it
    explicitly (organization / OU shares are stored but not matched: the world has no
    organization membership)."""
    if ami.owner_id == account_id:
        return True
    for lp in ami.launch_permissions:
        if lp.get("UserId") == account_id or lp.get("Group") == "all":
            return True
    return False


def _foreign_backends(backend):
    """EC2 backends of the other accounts in the same Region (only those moto has made)."""
    from moto.ec2.models import ec2_backends

    for account_id, by_region in list(dict.items(ec2_backends)):
        if account_id == backend.account_id:
            continue
        other = dict.get(by_region, backend.region_name)
        if other is not None:
            yield other


def shared_with(backend) -> list:
    """Images of other accounts in this Region available to the backend's account, except ids
    the account already has (moto loads the same public Amazon images into every account)."""
    me = backend.account_id
    out = []
    for other in _foreign_backends(backend):
        for ami in list(other.amis.values()):
            if ami.id not in backend.amis and visible_to(ami, me):
                out.append(ami)
    return out


def known_elsewhere(backend, image_id: str) -> bool:
    """Whether an AMI of that id exists in any other account or Region of the world."""
    from moto.ec2.models import ec2_backends

    for _account, by_region in list(dict.items(ec2_backends)):
        for _region, other in list(dict.items(by_region)):
            if other is not backend and image_id in other.amis:
                return True
    return False


def resolve_kms_key(backend, key_id: str | None) -> tuple[str | None, dict | None]:
    """(key ARN, None), or (None, StateReason) when the key cannot encrypt in the destination
    Region (the backend's): it must exist there, be enabled and symmetric."""
    from moto.kms import kms_backends

    region, account = backend.region_name, backend.account_id
    if not key_id:
        # "If this parameter is not specified, your AWS managed KMS key for Amazon EBS is used."
        return backend._create_default_encryption_key(), None
    reason = {
        "Code": KMS_FAILED,
        "Message": f"The KMS key {key_id} does not exist in {region} or cannot be used: "
                   "the key must exist in the destination Region",
    }
    if key_id.startswith("arn:"):
        parts = key_id.split(":")
        if len(parts) < 6 or parts[3] != region:
            return None, reason
        account = parts[4]
    try:
        key = kms_backends[account][region].describe_key(key_id)
    except Exception:
        return None, reason
    usage = key.key_usage or "ENCRYPT_DECRYPT"  # CreateKey's default KeyUsage
    if key.key_state != "Enabled" or usage != "ENCRYPT_DECRYPT" or key.key_spec != "SYMMETRIC_DEFAULT":
        return None, {"Code": "Client.InvalidKMSKey.InvalidState",
                      "Message": f"The KMS key {key.arn} is {key.key_state}, not an enabled symmetric key"}
    return key.arn, None


def install(world) -> None:
    global _W, _installed
    _W = world
    if _installed:
        return
    _installed = True

    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import EC2ClientError, InvalidAMIIdError, InvalidTaggableResourceType
    from moto.ec2.models import EC2Backend, ec2_backends
    from moto.ec2.models import amis as amis_models
    from moto.ec2.models.elastic_block_store import Snapshot
    from moto.ec2.responses import amis as amis_resp
    from moto.ec2.utils import generic_filter

    Ami = amis_models.Ami
    AmiBackend = amis_models.AmiBackend
    AmisResponse = amis_resp.AmisResponse

    # --- fields DescribeImages / DescribeSnapshots report ----------------------------------
    Ami.deprecation_time = None  # set by EnableImageDeprecation
    Ami.state_reason = None  # a failed copy's reason
    Ami.source_image_id = None  # copies only
    Ami.source_image_region = None
    Ami.deregistration_protection = property(protection_state)

    def block_device_mappings(self):
        snap = self.ebs_snapshot
        return [{
            "DeviceName": self.root_device_name,
            "Ebs": {
                "SnapshotId": snap.id,
                "VolumeSize": 15,
                "DeleteOnTermination": False,
                "VolumeType": "standard",
                "Encrypted": bool(snap.encrypted),
            },
        }]

    Ami.block_device_mappings = property(block_device_mappings)

    def snapshot_progress(self):
        copy = getattr(self, "_world_copy", None)
        if copy is None or self.status != "pending":
            return "100%" if self.status != "error" else "0%"
        started, seconds = copy
        if seconds <= 0:
            return "99%"
        return f"{min(99, int(100 * (time.time() - started) / seconds))}%"

    Snapshot.progress = property(snapshot_progress)

    # --- sharing across accounts: DescribeImages --------------------------------------------
    orig_describe_images = AmiBackend.describe_images

    def describe_images(self, ami_ids=None, filters=None, exec_users=None, owners=None,
                        include_deprecated=False):
        me = self.account_id
        shared = shared_with(self)
        if ami_ids:
            try:
                found = orig_describe_images(self, ami_ids=ami_ids)
            except InvalidAMIIdError:
                found = None
            # a lookup by id returns a deprecated AMI too ("describe the deprecated AMI using its ID")
            extra = [a for a in shared if a.id in ami_ids]
            if found is None and not extra:
                raise InvalidAMIIdError(ami_ids)
            return (found or []) + extra
        images = list(self.amis.values()) + [
            a for a in shared if include_deprecated or not is_deprecated(a)
        ]
        if exec_users:
            users = {me if u == "self" else u for u in exec_users}
            images = [
                a for a in images
                if ("all" in users and a.is_public)
                or any(lp.get("UserId") in users for lp in a.launch_permissions)
            ]
        if owners:
            wanted = {me if o == "self" else o for o in owners}
            images = [a for a in images if a.owner_id in wanted or a.owner_alias in wanted]
        if filters:
            return generic_filter(filters, images)
        return images

    AmiBackend.describe_images = describe_images  # type: ignore[method-assign]

    def resp_describe_images(self):
        self.error_on_dryrun()
        images = self.ec2_backend.describe_images(
            ami_ids=self._get_param("ImageIds", []),
            filters=self._filters_from_querystring(),
            exec_users=self._get_param("ExecutableUsers", []),
            owners=self._get_param("Owners", []),
            include_deprecated=self._get_bool_param("IncludeDeprecated", False),
        )
        return ActionResult({"Images": images})

    AmisResponse.describe_images = resp_describe_images

    def own_image(backend, ami_id):
        """The caller's own AMI (changes are the owner's to make), else InvalidAMIID.NotFound as
        moto answered before shared images became visible."""
        ami = backend.amis.get(ami_id)
        if ami is None:
            raise InvalidAMIIdError(ami_id)
        return ami

    orig_modify_image_attribute = AmiBackend.modify_image_attribute

    def modify_image_attribute(self, ami_id, launch_permissions_to_add, launch_permissions_to_remove):
        own_image(self, ami_id)
        return orig_modify_image_attribute(self, ami_id, launch_permissions_to_add, launch_permissions_to_remove)

    AmiBackend.modify_image_attribute = modify_image_attribute  # type: ignore[method-assign]

    # --- RunInstances: an AMI the caller cannot see in this Region ----------------------------
    orig_run_instances = EC2Backend.run_instances

    def run_instances(self, image_id, count, user_data, security_group_names, **kwargs):
        if image_id and image_id not in self.amis and known_elsewhere(self, image_id):
            if not any(a.id == image_id for a in shared_with(self)):
                raise InvalidAMIIdError(image_id)
        return orig_run_instances(self, image_id, count, user_data, security_group_names, **kwargs)

    EC2Backend.run_instances = run_instances  # type: ignore[method-assign]

    # --- DeregisterImage while protected ----------------------------------------------------
    orig_deregister_image = AmiBackend.deregister_image

    def deregister_image(self, ami_id):
        ami = self.amis.get(ami_id)
        if ami is not None and is_protected(ami):
            raise EC2ClientError(
                "OperationNotPermitted",
                f"The AMI {ami_id} has deregistration protection enabled "
                f"({protection_state(ami)}); disable it before deregistering the AMI.",
            )
        return orig_deregister_image(self, ami_id)

    AmiBackend.deregister_image = deregister_image  # type: ignore[method-assign]

    # --- deprecation --------------------------------------------------------------------------
    def resp_enable_image_deprecation(self):
        ami_id = self._get_param("ImageId")
        raw = self._get_param("DeprecateAt")
        self.error_on_dryrun()
        ami = own_image(self.ec2_backend, ami_id)
        try:
            at = _parse_time(raw)
        except (TypeError, ValueError):
            raise EC2ClientError("InvalidParameterValue", f"Value ({raw}) for parameter DeprecateAt is invalid.")
        now = _now()
        if at < now:
            raise EC2ClientError("InvalidParameterValue",
                                 f"The deprecation time {raw} is in the past. Specify a future date and time.")
        if at > now + DEPRECATION_MAX:
            raise EC2ClientError("InvalidParameterValue",
                                 f"The deprecation time {raw} is more than 10 years from now.")
        # "If you specify a value for seconds, Amazon EC2 rounds the seconds to the nearest minute."
        rounded = (at + timedelta(seconds=30)).replace(second=0, microsecond=0)
        ami._world_deprecate_at = rounded
        ami.deprecation_time = _iso_minute(rounded)
        return ActionResult({"Return": True})

    def resp_disable_image_deprecation(self):
        ami_id = self._get_param("ImageId")
        self.error_on_dryrun()
        ami = own_image(self.ec2_backend, ami_id)
        ami._world_deprecate_at = None
        ami.deprecation_time = None
        return ActionResult({"Return": True})

    AmisResponse.enable_image_deprecation = resp_enable_image_deprecation
    AmisResponse.disable_image_deprecation = resp_disable_image_deprecation

    # --- deregistration protection ------------------------------------------------------------
    def resp_enable_image_deregistration_protection(self):
        ami_id = self._get_param("ImageId")
        cooldown = self._get_bool_param("WithCooldown", False)
        self.error_on_dryrun()
        ami = own_image(self.ec2_backend, ami_id)
        ami._world_protection = {"cooldown": cooldown, "until": None}
        return ActionResult({"Return": "true"})

    def resp_disable_image_deregistration_protection(self):
        ami_id = self._get_param("ImageId")
        self.error_on_dryrun()
        ami = own_image(self.ec2_backend, ami_id)
        p = getattr(ami, "_world_protection", None)
        if p is not None and p["cooldown"] and p["until"] is None:
            # "you won't immediately be able to deregister the AMI": 24 hours more
            ami._world_protection = {"cooldown": True, "until": _now() + PROTECTION_COOLDOWN}
        elif p is not None and p["until"] is None:
            ami._world_protection = None
        return ActionResult({"Return": "true"})

    AmisResponse.enable_image_deregistration_protection = resp_enable_image_deregistration_protection
    AmisResponse.disable_image_deregistration_protection = resp_disable_image_deregistration_protection

    # --- CopyImage ----------------------------------------------------------------------------
    def resp_copy_image(self):
        source_id = self._get_param("SourceImageId")
        source_region = self._get_param("SourceRegion")
        name = self._get_param("Name")
        description = self._get_param("Description")
        encrypted = self._get_bool_param("Encrypted", False)
        kms_key_id = self._get_param("KmsKeyId")
        copy_tags = self._get_bool_param("CopyImageTags", False)
        specs = self._get_param("TagSpecifications", []) or []
        token = self._get_param("ClientToken")
        self.error_on_dryrun()
        backend = self.ec2_backend
        me = backend.account_id

        tags: dict[str, dict[str, str]] = {"image": {}, "snapshot": {}}
        for spec in specs:
            kind = spec.get("ResourceType")
            if kind not in tags:  # "If you specify other values for ResourceType, the request fails."
                raise InvalidTaggableResourceType(kind)
            for t in spec.get("Tags", []) or []:
                tags[kind][t["Key"]] = t.get("Value", "")

        asked = repr((source_id, source_region, name, description, encrypted, kms_key_id, copy_tags,
                      sorted((k, sorted(v.items())) for k, v in tags.items())))
        tokens = backend.__dict__.setdefault("_world_copy_tokens", {})
        if token and token in tokens:
            was, image_id = tokens[token]
            if was != asked:
                raise EC2ClientError(
                    "IdempotentParameterMismatch",
                    f"Arguments on this idempotent request are inconsistent with arguments used in "
                    f"previous request(s) with client token {token}.",
                )
            return ActionResult({"ImageId": image_id})

        source_backend = ec2_backends[me][source_region]
        source = source_backend.describe_images(ami_ids=[source_id])[0]
        src_snap = source.ebs_snapshot
        if source.owner_id != me:
            readers = src_snap.create_volume_permission_userids
            if me not in readers and "all" not in src_snap.create_volume_permission_groups:
                # "the owner of the source AMI must grant you read permissions for the storage"
                raise EC2ClientError("InvalidRequest", "You do not have permission to access the storage of this ami")

        # "you cannot create an unencrypted copy of an encrypted snapshot"
        encrypt = encrypted or bool(src_snap.encrypted)
        key_arn, failure = resolve_kms_key(backend, kms_key_id) if encrypt else (None, None)
        size_gib = float(getattr(src_snap, "volume_size", 0) or 0)
        delay = _W.settings.copy_delay * size_gib
        if failure is not None:
            delay = min(delay, 1.0)  # the key is checked early in the copy

        def done(ami, state: str) -> None:  # under the moto lock, from the image store's timer
            ami.ebs_snapshot.status = "completed" if state == "available" else "error"
            if state == "failed":
                ami.state_reason = failure or {"Code": "Server.InternalError", "Message": "The copy failed"}

        ami = backend.copy_image(source_id, source_region, name, description,
                                 delay=delay, fail=failure is not None, on_done=done)
        ami.source_image_id = source.id
        ami.source_image_region = source_region
        snap = ami.ebs_snapshot
        snap.status = "pending"
        snap._world_copy = (time.time(), delay)
        snap.description = (
            f"Copied for DestinationAmi {ami.id} from SourceAmi {source.id} for SourceSnapshot "
            f"{src_snap.id}. Task created on {int(time.time() * 1000)}."
        )
        if encrypt:
            snap.encrypted = True
            snap.kms_key_id = key_arn or kms_key_id
        image_tags: dict[str, str] = {}
        if copy_tags:
            for t in source.get_tags():
                key = t["key"]
                if key.startswith("aws:"):
                    continue
                if source.owner_id != me and not key.startswith("ec2:SharedTag/"):
                    continue
                image_tags[key] = t["value"]
        image_tags.update(tags["image"])
        if image_tags:
            ami.add_tags(image_tags)
        if tags["snapshot"]:
            snap.add_tags(tags["snapshot"])
        if token:
            tokens[token] = (asked, ami.id)
        _W.log(f"{ami.id}: copy of {source.id} ({source_region} -> {backend.region_name}, "
               f"{size_gib:g} GiB, {delay:.1f}s{', encrypted' if encrypt else ''}"
               f"{', will fail: ' + failure['Code'] if failure else ''})")
        return ActionResult({"ImageId": ami.id})

    AmisResponse.copy_image = resp_copy_image
