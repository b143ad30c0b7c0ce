//! The EC2 and SSM calls a promotion makes, as thin typed wrappers: each returns plain data or
//! an [`AwsError`] naming the resource, and tolerates "already so" where a retry may meet its
//! own earlier success.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{
    Filter, LaunchPermission, LaunchPermissionModifications, OperationType, ResourceType,
    SnapshotAttributeName,
};
use aws_sdk_ec2::Client;

use crate::aws::ec2::{tag_spec, to_tags, Tags};
use crate::aws::{call, AwsError};

/// What a promotion needs to know of an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub state: String,
    /// Why a failed image failed (`StateReason`), as `code: message`.
    pub reason: Option<String>,
    pub owner: Option<String>,
    pub snapshot_ids: Vec<String>,
    /// The sum of its snapshots' sizes.
    pub size_gib: u64,
    pub encrypted: bool,
    pub tags: BTreeMap<String, String>,
    /// `DeregistrationProtection` as EC2 reports it (`disabled`, `enabled-without-cooldown`, ...).
    pub protection: Option<String>,
    pub deprecation_time: Option<String>,
    pub creation_date: Option<String>,
}

impl Image {
    /// Whether DeregisterImage would be refused.
    pub fn protected(&self) -> bool {
        self.protection.as_deref().is_some_and(|p| p != "disabled")
    }
}

pub(crate) fn image(i: &aws_sdk_ec2::types::Image) -> Image {
    let ebs: Vec<_> = i
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs())
        .collect();
    Image {
        id: i.image_id().unwrap_or_default().to_string(),
        name: i.name().unwrap_or_default().to_string(),
        description: i.description().map(str::to_string),
        state: i
            .state()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        reason: i.state_reason().map(|r| {
            format!(
                "{}: {}",
                r.code().unwrap_or("-"),
                r.message().unwrap_or("no reason given")
            )
        }),
        owner: i.owner_id().map(str::to_string),
        snapshot_ids: ebs
            .iter()
            .filter_map(|e| e.snapshot_id().map(str::to_string))
            .collect(),
        size_gib: ebs
            .iter()
            .map(|e| e.volume_size().unwrap_or(0).max(0) as u64)
            .sum(),
        encrypted: ebs.iter().any(|e| e.encrypted() == Some(true)),
        tags: i
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
            .collect(),
        protection: i.deregistration_protection().map(str::to_string),
        deprecation_time: i.deprecation_time().map(str::to_string),
        creation_date: i.creation_date().map(str::to_string),
    }
}

/// The image, or `None` when EC2 does not know it (any more).
pub async fn describe(ec2: &Client, id: &str) -> Result<Option<Image>, AwsError> {
    match call("ec2:DescribeImages", id, || {
        ec2.describe_images().image_ids(id).send()
    })
    .await
    {
        Ok(o) => Ok(o.images().first().map(image)),
        Err(e) if e.is_not_found() || e.code() == Some("InvalidAMIID.Malformed") => Ok(None),
        Err(e) => Err(e),
    }
}

/// This account's images carrying `key=value`, in any state.
pub async fn own_images_tagged(
    ec2: &Client,
    key: &str,
    value: &str,
) -> Result<Vec<Image>, AwsError> {
    let out = call("ec2:DescribeImages", format!("tag {key}={value}"), || {
        ec2.describe_images()
            .owners("self")
            .filters(
                Filter::builder()
                    .name(format!("tag:{key}"))
                    .values(value)
                    .build(),
            )
            .send()
    })
    .await?;
    Ok(out.images().iter().map(image).collect())
}

/// This account's images that carry the tag `key` (any value), in any state.
pub async fn own_images_tagged_key(ec2: &Client, key: &str) -> Result<Vec<Image>, AwsError> {
    let out = call("ec2:DescribeImages", format!("tag-key {key}"), || {
        ec2.describe_images()
            .owners("self")
            .filters(Filter::builder().name("tag-key").values(key).build())
            .into_paginator()
            .items()
            .send()
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    Ok(out.iter().map(image).collect())
}

/// This account's image named exactly `name`, if any.
pub async fn own_image_named(ec2: &Client, name: &str) -> Result<Option<Image>, AwsError> {
    let out = call("ec2:DescribeImages", name, || {
        ec2.describe_images()
            .owners("self")
            .filters(Filter::builder().name("name").values(name).build())
            .send()
    })
    .await?;
    Ok(out.images().iter().map(image).find(|i| i.name == name))
}

/// Every image this account owns whose name starts with `prefix`.
pub async fn own_images_prefixed(ec2: &Client, prefix: &str) -> Result<Vec<Image>, AwsError> {
    let pattern = format!("{prefix}*");
    let out = call("ec2:DescribeImages", &pattern, || {
        ec2.describe_images()
            .owners("self")
            .filters(Filter::builder().name("name").values(&pattern).build())
            .into_paginator()
            .items()
            .send()
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let mut images: Vec<Image> = out
        .iter()
        .map(image)
        .filter(|i| i.name.starts_with(prefix))
        .collect();
    images.sort_by(|a, b| b.creation_date.cmp(&a.creation_date));
    Ok(images)
}

/// A CopyImage request, in the destination region.
#[derive(Debug, Clone)]
pub struct CopyRequest {
    pub source_ami: String,
    pub source_region: String,
    pub name: String,
    pub description: String,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    pub tags: Tags,
    pub client_token: String,
}

/// Copies an image into the client's region, tagging the copy and its snapshots at creation.
/// The client token makes a repeat (a retry, a resumed run) answer with the first copy.
pub async fn copy_image(ec2: &Client, r: &CopyRequest) -> Result<String, AwsError> {
    let out = call("ec2:CopyImage", &r.source_ami, || {
        ec2.copy_image()
            .source_image_id(&r.source_ami)
            .source_region(&r.source_region)
            .name(&r.name)
            .description(&r.description)
            .encrypted(r.encrypted)
            .set_kms_key_id(r.kms_key_id.clone())
            .client_token(&r.client_token)
            .tag_specifications(tag_spec(ResourceType::Image, &r.tags))
            .tag_specifications(tag_spec(ResourceType::Snapshot, &r.tags))
            .send()
    })
    .await?;
    out.image_id().map(str::to_string).ok_or_else(|| AwsError {
        action: "ec2:CopyImage",
        resource: r.source_ami.clone(),
        code: None,
        message: "the response named no image".into(),
        transient: false,
    })
}

/// The least progress of the snapshots, in percent (`None` if EC2 gives none).
pub async fn snapshot_progress(ec2: &Client, ids: &[String]) -> Result<Option<u8>, AwsError> {
    if ids.is_empty() {
        return Ok(None);
    }
    let out = call("ec2:DescribeSnapshots", ids.join(","), || {
        ec2.describe_snapshots()
            .set_snapshot_ids(Some(ids.to_vec()))
            .send()
    })
    .await;
    let out = match out {
        Ok(o) => o,
        // A copy's snapshot may not be visible yet.
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(out
        .snapshots()
        .iter()
        .filter_map(|s| s.progress())
        .filter_map(|p| p.trim_end_matches('%').trim().parse::<u8>().ok())
        .min())
}

fn launch_permissions(
    accounts: &[String],
    orgs: &[String],
    ous: &[String],
) -> Vec<LaunchPermission> {
    accounts
        .iter()
        .map(|a| LaunchPermission::builder().user_id(a).build())
        .chain(
            orgs.iter()
                .map(|o| LaunchPermission::builder().organization_arn(o).build()),
        )
        .chain(ous.iter().map(|o| {
            LaunchPermission::builder()
                .organizational_unit_arn(o)
                .build()
        }))
        .collect()
}

/// Adds (or, `add` false, removes) launch permissions on an image.
pub async fn set_launch_permissions(
    ec2: &Client,
    image_id: &str,
    add: bool,
    accounts: &[String],
    orgs: &[String],
    ous: &[String],
) -> Result<(), AwsError> {
    let perms = launch_permissions(accounts, orgs, ous);
    if perms.is_empty() {
        return Ok(());
    }
    let m = if add {
        LaunchPermissionModifications::builder().set_add(Some(perms))
    } else {
        LaunchPermissionModifications::builder().set_remove(Some(perms))
    }
    .build();
    call("ec2:ModifyImageAttribute", image_id, || {
        ec2.modify_image_attribute()
            .image_id(image_id)
            .launch_permission(m.clone())
            .send()
    })
    .await
    .map(|_| ())
}

/// Adds (or removes) `createVolumePermission` for accounts on snapshots. EC2 has no
/// organization or OU form of it: organizations launch from the image's launch permission.
///
/// Sent in the request's `OperationType` + `UserIds` form, which EC2 documents beside the
/// `CreateVolumePermission.Add` structure: moto 5.2.5 (the local world) reads only this form.
pub async fn set_volume_permissions(
    ec2: &Client,
    snapshot_ids: &[String],
    add: bool,
    accounts: &[String],
) -> Result<(), AwsError> {
    if accounts.is_empty() {
        return Ok(());
    }
    let op = if add {
        OperationType::Add
    } else {
        OperationType::Remove
    };
    for snap in snapshot_ids {
        call("ec2:ModifySnapshotAttribute", snap, || {
            ec2.modify_snapshot_attribute()
                .snapshot_id(snap)
                .attribute(SnapshotAttributeName::CreateVolumePermission)
                .operation_type(op.clone())
                .set_user_ids(Some(accounts.to_vec()))
                .send()
        })
        .await?;
    }
    Ok(())
}

/// Deprecates the image at `unix` (seconds since the epoch), or (`None`) cancels it.
pub async fn set_deprecation(
    ec2: &Client,
    image_id: &str,
    unix: Option<u64>,
) -> Result<(), AwsError> {
    match unix {
        Some(t) => call("ec2:EnableImageDeprecation", image_id, || {
            ec2.enable_image_deprecation()
                .image_id(image_id)
                .deprecate_at(aws_smithy_types::DateTime::from_secs(t as i64))
                .send()
        })
        .await
        .map(|_| ()),
        None => call("ec2:DisableImageDeprecation", image_id, || {
            ec2.disable_image_deprecation().image_id(image_id).send()
        })
        .await
        .map(|_| ()),
    }
}

/// Turns deregistration protection on (without cooldown) or off.
pub async fn set_protection(ec2: &Client, image_id: &str, on: bool) -> Result<(), AwsError> {
    if on {
        call("ec2:EnableImageDeregistrationProtection", image_id, || {
            ec2.enable_image_deregistration_protection()
                .image_id(image_id)
                .with_cooldown(false)
                .send()
        })
        .await
        .map(|_| ())
    } else {
        call("ec2:DisableImageDeregistrationProtection", image_id, || {
            ec2.disable_image_deregistration_protection()
                .image_id(image_id)
                .send()
        })
        .await
        .map(|_| ())
    }
}

/// Sets one tag on a resource.
pub async fn set_tag(ec2: &Client, id: &str, key: &str, value: &str) -> Result<(), AwsError> {
    let tags = Tags::from([(key.to_string(), value.to_string())]);
    call("ec2:CreateTags", id, || {
        ec2.create_tags()
            .resources(id)
            .set_tags(Some(to_tags(&tags)))
            .send()
    })
    .await
    .map(|_| ())
}

/// Deregisters an image (turning its deregistration protection off first when `force`) and
/// deletes its snapshots; "already gone" is not an error.
pub async fn remove_image(ec2: &Client, image: &Image, force: bool) -> Result<(), AwsError> {
    if force && image.protected() {
        set_protection(ec2, &image.id, false).await?;
    }
    match call("ec2:DeregisterImage", &image.id, || {
        ec2.deregister_image().image_id(&image.id).send()
    })
    .await
    {
        Err(e) if !e.is_not_found() => return Err(e),
        _ => {}
    }
    for snap in &image.snapshot_ids {
        match call("ec2:DeleteSnapshot", snap, || {
            ec2.delete_snapshot().snapshot_id(snap).send()
        })
        .await
        {
            Err(e) if !e.is_not_found() => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Region -> opt-in status (`opt-in-not-required`, `opted-in`, `not-opted-in`) of every Region
/// the account's partition has.
pub async fn regions(ec2: &Client) -> Result<BTreeMap<String, String>, AwsError> {
    let out = call("ec2:DescribeRegions", "all", || {
        ec2.describe_regions().all_regions(true).send()
    })
    .await?;
    Ok(out
        .regions()
        .iter()
        .filter_map(|r| {
            Some((
                r.region_name()?.to_string(),
                r.opt_in_status()
                    .unwrap_or("opt-in-not-required")
                    .to_string(),
            ))
        })
        .collect())
}

/// The parameter's value, or `None` when it does not exist.
pub async fn get_parameter(
    ssm: &aws_sdk_ssm::Client,
    name: &str,
) -> Result<Option<String>, AwsError> {
    match call("ssm:GetParameter", name, || {
        ssm.get_parameter().name(name).send()
    })
    .await
    {
        Ok(o) => Ok(o.parameter().and_then(|p| p.value()).map(str::to_string)),
        Err(e) if e.code() == Some("ParameterNotFound") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes an AMI id to a parameter of data type `aws:ec2:image` (or, `None`, deletes it).
pub async fn put_parameter(
    ssm: &aws_sdk_ssm::Client,
    name: &str,
    value: Option<&str>,
) -> Result<(), AwsError> {
    match value {
        Some(v) => call("ssm:PutParameter", name, || {
            ssm.put_parameter()
                .name(name)
                .value(v)
                .r#type(aws_sdk_ssm::types::ParameterType::String)
                .data_type("aws:ec2:image")
                .overwrite(true)
                .send()
        })
        .await
        .map(|_| ()),
        None => match call("ssm:DeleteParameter", name, || {
            ssm.delete_parameter().name(name).send()
        })
        .await
        {
            Err(e) if e.code() != Some("ParameterNotFound") => Err(e),
            _ => Ok(()),
        },
    }
}
