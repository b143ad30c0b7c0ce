//! Launch-template versions: read one, write a copy with a new image, prune old ones.
//!
//! A new version is the source version's data written whole with only the image changed (and
//! IMDSv2 required). The copy is made client-side, field by field, *and* `SourceVersion` is
//! passed: on AWS, any field this copy does not carry is still inherited from the source; on an
//! emulator that ignores `SourceVersion`, the fields copied here are what carries over.

use aws_sdk_ec2::types::{
    CreditSpecificationRequest, LaunchTemplateBlockDeviceMappingRequest,
    LaunchTemplateEbsBlockDeviceRequest, LaunchTemplateHttpTokensState,
    LaunchTemplateIamInstanceProfileSpecificationRequest,
    LaunchTemplateInstanceMetadataOptionsRequest,
    LaunchTemplateInstanceNetworkInterfaceSpecificationRequest, LaunchTemplatePlacementRequest,
    LaunchTemplateTagSpecificationRequest, LaunchTemplatesMonitoringRequest,
    RequestLaunchTemplateData, ResponseLaunchTemplateData,
};
use aws_sdk_ec2::Client;

use super::{call, AwsError};

/// One version of a launch template, as bakery needs it.
#[derive(Debug, Clone)]
pub struct Version {
    pub template_id: String,
    pub template_name: Option<String>,
    pub number: i64,
    pub is_default: bool,
    pub image_id: Option<String>,
    pub imdsv2_required: bool,
    pub data: Option<ResponseLaunchTemplateData>,
}

fn version_of(v: &aws_sdk_ec2::types::LaunchTemplateVersion) -> Version {
    let data = v.launch_template_data().cloned();
    Version {
        template_id: v.launch_template_id().unwrap_or_default().to_string(),
        template_name: v.launch_template_name().map(str::to_string),
        number: v.version_number().unwrap_or_default(),
        is_default: v.default_version().unwrap_or(false),
        image_id: data.as_ref().and_then(|d| d.image_id()).map(str::to_string),
        imdsv2_required: data
            .as_ref()
            .and_then(|d| d.metadata_options())
            .and_then(|m| m.http_tokens())
            .is_some_and(|t| t.as_str() == "required"),
        data,
    }
}

/// One version by number or by `$Latest` / `$Default`; `None` if it does not exist.
pub async fn describe(
    ec2: &Client,
    template_id: &str,
    version: &str,
) -> Result<Option<Version>, AwsError> {
    match call(
        "ec2:DescribeLaunchTemplateVersions",
        format!("{template_id} version {version}"),
        || {
            ec2.describe_launch_template_versions()
                .launch_template_id(template_id)
                .versions(version)
                .send()
        },
    )
    .await
    {
        Ok(out) => Ok(out.launch_template_versions().first().map(version_of)),
        Err(e)
            if e.is_not_found() || e.code() == Some("InvalidLaunchTemplateId.VersionNotFound") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The id of the launch template with this name; `None` if there is none.
pub async fn id_for_name(ec2: &Client, name: &str) -> Result<Option<String>, AwsError> {
    match call("ec2:DescribeLaunchTemplates", name, || {
        ec2.describe_launch_templates()
            .launch_template_names(name)
            .send()
    })
    .await
    {
        Ok(out) => Ok(out
            .launch_templates()
            .first()
            .and_then(|t| t.launch_template_id())
            .map(str::to_string)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every version of a template, newest first.
pub async fn all_versions(ec2: &Client, template_id: &str) -> Result<Vec<Version>, AwsError> {
    let out = call("ec2:DescribeLaunchTemplateVersions", template_id, || {
        ec2.describe_launch_template_versions()
            .launch_template_id(template_id)
            .max_results(200)
            .into_paginator()
            .items()
            .send()
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let mut v: Vec<Version> = out.iter().map(version_of).collect();
    v.sort_by_key(|v| std::cmp::Reverse(v.number));
    Ok(v)
}

/// The request form of a version's data, with `image_id` and IMDSv2 required.
///
/// One piece on purpose: a field-by-field copy between the SDK's response and request types,
/// which share no conversion; the whole list of fields stays in one place to check against the
/// API reference when a field is added.
pub fn copy_with_image(
    src: &ResponseLaunchTemplateData,
    image_id: &str,
) -> RequestLaunchTemplateData {
    let metadata = src.metadata_options();
    let metadata = LaunchTemplateInstanceMetadataOptionsRequest::builder()
        .http_tokens(LaunchTemplateHttpTokensState::Required)
        .set_http_put_response_hop_limit(metadata.and_then(|m| m.http_put_response_hop_limit()))
        .set_http_endpoint(metadata.and_then(|m| m.http_endpoint()).cloned())
        .set_http_protocol_ipv6(metadata.and_then(|m| m.http_protocol_ipv6()).cloned())
        .set_instance_metadata_tags(metadata.and_then(|m| m.instance_metadata_tags()).cloned())
        .build();
    let block_devices = src
        .block_device_mappings()
        .iter()
        .map(|b| {
            LaunchTemplateBlockDeviceMappingRequest::builder()
                .set_device_name(b.device_name().map(str::to_string))
                .set_virtual_name(b.virtual_name().map(str::to_string))
                .set_no_device(b.no_device().map(str::to_string))
                .set_ebs(b.ebs().map(|e| {
                    LaunchTemplateEbsBlockDeviceRequest::builder()
                        .set_encrypted(e.encrypted())
                        .set_delete_on_termination(e.delete_on_termination())
                        .set_iops(e.iops())
                        .set_kms_key_id(e.kms_key_id().map(str::to_string))
                        .set_snapshot_id(e.snapshot_id().map(str::to_string))
                        .set_volume_size(e.volume_size())
                        .set_volume_type(e.volume_type().cloned())
                        .set_throughput(e.throughput())
                        .build()
                }))
                .build()
        })
        .collect::<Vec<_>>();
    let interfaces = src
        .network_interfaces()
        .iter()
        .map(|n| {
            LaunchTemplateInstanceNetworkInterfaceSpecificationRequest::builder()
                .set_associate_public_ip_address(n.associate_public_ip_address())
                .set_delete_on_termination(n.delete_on_termination())
                .set_description(n.description().map(str::to_string))
                .set_device_index(n.device_index())
                .set_groups(Some(n.groups().to_vec()).filter(|g| !g.is_empty()))
                .set_network_interface_id(n.network_interface_id().map(str::to_string))
                .set_subnet_id(n.subnet_id().map(str::to_string))
                .set_interface_type(n.interface_type().map(str::to_string))
                .build()
        })
        .collect::<Vec<_>>();
    let tags = src
        .tag_specifications()
        .iter()
        .map(|t| {
            LaunchTemplateTagSpecificationRequest::builder()
                .set_resource_type(t.resource_type().cloned())
                .set_tags(Some(t.tags().to_vec()))
                .build()
        })
        .collect::<Vec<_>>();
    RequestLaunchTemplateData::builder()
        .image_id(image_id)
        .set_instance_type(src.instance_type().cloned())
        .set_key_name(src.key_name().map(str::to_string))
        .set_security_group_ids(Some(src.security_group_ids().to_vec()).filter(|v| !v.is_empty()))
        .set_security_groups(Some(src.security_groups().to_vec()).filter(|v| !v.is_empty()))
        .set_user_data(src.user_data().map(str::to_string))
        .set_ebs_optimized(src.ebs_optimized())
        .set_disable_api_termination(src.disable_api_termination())
        .set_disable_api_stop(src.disable_api_stop())
        .set_instance_initiated_shutdown_behavior(
            src.instance_initiated_shutdown_behavior().cloned(),
        )
        .set_kernel_id(src.kernel_id().map(str::to_string))
        .set_ram_disk_id(src.ram_disk_id().map(str::to_string))
        .set_iam_instance_profile(src.iam_instance_profile().map(|p| {
            LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                .set_arn(p.arn().map(str::to_string))
                .set_name(p.name().map(str::to_string))
                .build()
        }))
        .set_monitoring(src.monitoring().map(|m| {
            LaunchTemplatesMonitoringRequest::builder()
                .set_enabled(m.enabled())
                .build()
        }))
        .set_placement(src.placement().map(|p| {
            LaunchTemplatePlacementRequest::builder()
                .set_availability_zone(p.availability_zone().map(str::to_string))
                .set_group_name(p.group_name().map(str::to_string))
                .set_tenancy(p.tenancy().cloned())
                .set_affinity(p.affinity().map(str::to_string))
                .set_host_id(p.host_id().map(str::to_string))
                .set_partition_number(p.partition_number())
                .build()
        }))
        .set_credit_specification(src.credit_specification().map(|c| {
            CreditSpecificationRequest::builder()
                .set_cpu_credits(c.cpu_credits().map(str::to_string))
                .build()
        }))
        .metadata_options(metadata)
        .set_block_device_mappings(Some(block_devices).filter(|v| !v.is_empty()))
        .set_network_interfaces(Some(interfaces).filter(|v| !v.is_empty()))
        .set_tag_specifications(Some(tags).filter(|v| !v.is_empty()))
        .build()
}

/// Writes a new version: `source` with `image_id`. Returns its number.
pub async fn create_with_image(
    ec2: &Client,
    source: &Version,
    image_id: &str,
    description: &str,
) -> Result<i64, AwsError> {
    let data = source
        .data
        .as_ref()
        .map(|d| copy_with_image(d, image_id))
        .unwrap_or_else(|| {
            RequestLaunchTemplateData::builder()
                .image_id(image_id)
                .metadata_options(
                    LaunchTemplateInstanceMetadataOptionsRequest::builder()
                        .http_tokens(LaunchTemplateHttpTokensState::Required)
                        .build(),
                )
                .build()
        });
    // One token for every attempt of this call: a retry after a lost answer gets the version
    // the first attempt made instead of making another.
    let token = uuid::Uuid::new_v4().simple().to_string();
    let out = call(
        "ec2:CreateLaunchTemplateVersion",
        &source.template_id,
        || {
            ec2.create_launch_template_version()
                .client_token(&token)
                .launch_template_id(&source.template_id)
                .source_version(source.number.to_string())
                .version_description(description)
                .launch_template_data(data.clone())
                .send()
        },
    )
    .await?;
    Ok(out
        .launch_template_version()
        .and_then(|v| v.version_number())
        .unwrap_or_default())
}

/// Deletes versions (at most 200 a call, as the API takes); returns those EC2 refused, with
/// its reason (a version that does not exist any more counts as deleted).
pub async fn delete_versions(
    ec2: &Client,
    template_id: &str,
    versions: &[i64],
) -> Result<Vec<(i64, String)>, AwsError> {
    let mut refused = Vec::new();
    for chunk in versions.chunks(200) {
        let out = call("ec2:DeleteLaunchTemplateVersions", template_id, || {
            ec2.delete_launch_template_versions()
                .launch_template_id(template_id)
                .set_versions(Some(chunk.iter().map(|v| v.to_string()).collect()))
                .send()
        })
        .await?;
        refused.extend(
            out.unsuccessfully_deleted_launch_template_versions()
                .iter()
                // Gone already (a retry after a lost answer meets its own deletion): deleted.
                .filter(|f| {
                    f.response_error()
                        .and_then(|e| e.code())
                        .map(|c| c.as_str())
                        != Some("launchTemplateVersionDoesNotExist")
                })
                .map(|f| {
                    let why = f.response_error().map(|e| {
                        format!(
                            "{}: {}",
                            e.code().map(|c| c.as_str()).unwrap_or("error"),
                            e.message().unwrap_or_default()
                        )
                    });
                    (
                        f.version_number().unwrap_or_default(),
                        why.unwrap_or_default(),
                    )
                }),
        );
    }
    Ok(refused)
}

/// Versions to delete so that at most `keep` remain: never the default, never one in `in_use`.
pub fn versions_to_prune(versions: &[Version], keep: usize, in_use: &[i64]) -> Vec<i64> {
    let mut sorted: Vec<&Version> = versions.iter().collect();
    sorted.sort_by_key(|v| std::cmp::Reverse(v.number));
    sorted
        .iter()
        .skip(keep)
        .filter(|v| !v.is_default && !in_use.contains(&v.number))
        .map(|v| v.number)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(n: i64, default: bool) -> Version {
        Version {
            template_id: "lt-1".into(),
            template_name: None,
            number: n,
            is_default: default,
            image_id: None,
            imdsv2_required: true,
            data: None,
        }
    }

    #[test]
    fn pruning_keeps_the_newest_the_default_and_those_in_use() {
        let versions: Vec<Version> = (1..=14).map(|n| v(n, n == 1)).collect();
        assert_eq!(versions_to_prune(&versions, 10, &[3]), vec![4, 2]);
        assert_eq!(versions_to_prune(&versions, 20, &[]), Vec::<i64>::new());
    }

    #[test]
    fn the_copy_changes_the_image_and_requires_imdsv2_only() {
        let src = ResponseLaunchTemplateData::builder()
            .image_id("ami-old")
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
            .security_group_ids("sg-1")
            .user_data("IyEvYmluL3NoCg==")
            .iam_instance_profile(
                aws_sdk_ec2::types::LaunchTemplateIamInstanceProfileSpecification::builder()
                    .name("web")
                    .build(),
            )
            .build();
        let copy = copy_with_image(&src, "ami-new");
        assert_eq!(copy.image_id(), Some("ami-new"));
        assert_eq!(copy.instance_type().map(|t| t.as_str()), Some("t3.micro"));
        assert_eq!(copy.security_group_ids(), ["sg-1".to_string()]);
        assert_eq!(copy.user_data(), Some("IyEvYmluL3NoCg=="));
        assert_eq!(
            copy.iam_instance_profile().and_then(|p| p.name()),
            Some("web")
        );
        assert_eq!(
            copy.metadata_options()
                .and_then(|m| m.http_tokens())
                .map(|t| t.as_str()),
            Some("required")
        );
    }
}
