//! Thin typed wrappers over the EC2 calls bakery makes. Each returns plain data or an
//! [`AwsError`] that names the resource; the decisions stay with the callers.

use std::collections::BTreeMap;

use aws_sdk_ec2::primitives::Blob;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceNetworkInterfaceSpecification, InstanceStateName, InstanceType, IpPermission, IpRange,
    ResourceType, Tag, TagSpecification, VolumeType,
};
use aws_sdk_ec2::Client;

use super::{call, AwsError};

pub type Tags = BTreeMap<String, String>;

pub fn tag_spec(resource: ResourceType, tags: &Tags) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(resource)
        .set_tags(Some(to_tags(tags)))
        .build()
}

pub fn to_tags(tags: &Tags) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// Whether a resource carrying `found` has every tag of `asked` (which must not be empty).
///
/// A create call whose first answer was lost (the request was served, the connection broke)
/// is retried and then meets its own resource: `…Duplicate` for a name-unique resource. The
/// tags it asked for, build id and expiry included, tell that resource from anyone else's.
fn carries(found: &[Tag], asked: &Tags) -> bool {
    !asked.is_empty()
        && asked.iter().all(|(k, v)| {
            found
                .iter()
                .any(|t| t.key() == Some(k.as_str()) && t.value() == Some(v.as_str()))
        })
}

/// A create call's result, `made`, unless it failed with `duplicate`: then the call was a
/// retry after a lost answer meeting its own resource (see [`carries`]), and the result is
/// what `look` finds, looked for at once and then a few times over about 1.5 s, since a
/// describe right after a create may not show it yet. Found nothing, the error stands.
async fn or_own<T, F, Fut>(
    made: Result<T, AwsError>,
    duplicate: &str,
    mut look: F,
) -> Result<T, AwsError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, AwsError>>,
{
    let error = match made {
        Err(e) if e.code() == Some(duplicate) => e,
        other => return other,
    };
    for delay_ms in [0u64, 100, 200, 400, 800] {
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        if let Some(found) = look().await? {
            return Ok(found);
        }
    }
    Err(error)
}

/// Instances in any of these states (`instance-state-name`).
pub fn in_states(states: &[&str]) -> Filter {
    Filter::builder()
        .name("instance-state-name")
        .set_values(Some(states.iter().map(|s| s.to_string()).collect()))
        .build()
}

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

/// What bakery needs to know about an AMI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub id: String,
    pub name: String,
    pub state: String,
    pub root_device_name: Option<String>,
    pub creation_date: Option<String>,
    pub snapshot_ids: Vec<String>,
}

pub(crate) fn image_info(i: &aws_sdk_ec2::types::Image) -> ImageInfo {
    ImageInfo {
        id: i.image_id().unwrap_or_default().to_string(),
        name: i.name().unwrap_or_default().to_string(),
        state: i
            .state()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        root_device_name: i.root_device_name().map(str::to_string),
        creation_date: i.creation_date().map(str::to_string),
        snapshot_ids: i
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_string))
            .collect(),
    }
}

pub async fn describe_image(ec2: &Client, id: &str) -> Result<Option<ImageInfo>, AwsError> {
    let out = call("ec2:DescribeImages", id, || {
        ec2.describe_images().image_ids(id).send()
    })
    .await;
    match out {
        Ok(o) => Ok(o.images().first().map(image_info)),
        Err(e) if e.is_not_found() || e.code() == Some("InvalidAMIID.Malformed") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Images matching owners and a name pattern, newest first.
pub async fn find_images(
    ec2: &Client,
    owners: &[String],
    name_pattern: &str,
) -> Result<Vec<ImageInfo>, AwsError> {
    let out = call("ec2:DescribeImages", name_pattern, || {
        ec2.describe_images()
            .set_owners(Some(owners.to_vec()))
            .filters(Filter::builder().name("name").values(name_pattern).build())
            .send()
    })
    .await?;
    let mut images: Vec<ImageInfo> = out.images().iter().map(image_info).collect();
    images.sort_by(|a, b| b.creation_date.cmp(&a.creation_date));
    Ok(images)
}

/// Images with `key=value` among their tags, in any state.
pub async fn images_tagged(
    ec2: &Client,
    key: &str,
    value: &str,
) -> Result<Vec<ImageInfo>, AwsError> {
    let out = call("ec2:DescribeImages", format!("tag {key}={value}"), || {
        ec2.describe_images()
            .owners("self")
            .filters(tag_filter(key, value))
            .send()
    })
    .await?;
    Ok(out.images().iter().map(image_info).collect())
}

/// The AMI this account owns with exactly this name, if any.
pub async fn image_named(ec2: &Client, name: &str) -> Result<Option<ImageInfo>, AwsError> {
    let images = own_images_named(ec2, name).await?;
    Ok(images.iter().map(image_info).find(|i| i.name == name))
}

/// The images this account owns that the `name` filter matches, as EC2 describes them.
async fn own_images_named(
    ec2: &Client,
    name: &str,
) -> Result<Vec<aws_sdk_ec2::types::Image>, AwsError> {
    let out = call("ec2:DescribeImages", name, || {
        ec2.describe_images()
            .owners("self")
            .filters(Filter::builder().name("name").values(name).build())
            .send()
    })
    .await?;
    Ok(out.images.unwrap_or_default())
}

pub async fn import_key_pair(
    ec2: &Client,
    name: &str,
    public_key_openssh: &str,
    tags: &Tags,
) -> Result<(), AwsError> {
    let made = call("ec2:ImportKeyPair", name, || {
        ec2.import_key_pair()
            .key_name(name)
            .public_key_material(Blob::new(public_key_openssh.as_bytes()))
            .tag_specifications(tag_spec(ResourceType::KeyPair, tags))
            .send()
    })
    .await;
    or_own(made.map(|_| ()), "InvalidKeyPair.Duplicate", || async {
        match call("ec2:DescribeKeyPairs", name, || {
            ec2.describe_key_pairs().key_names(name).send()
        })
        .await
        {
            Ok(out) => Ok(out
                .key_pairs()
                .iter()
                .any(|k| k.key_name() == Some(name) && carries(k.tags(), tags))
                .then_some(())),
            Err(d) if d.is_not_found() => Ok(None),
            Err(d) => Err(d),
        }
    })
    .await
}

/// Deletes a key pair; one that is already gone is not an error.
pub async fn delete_key_pair(ec2: &Client, name: &str) -> Result<(), AwsError> {
    match call("ec2:DeleteKeyPair", name, || {
        ec2.delete_key_pair().key_name(name).send()
    })
    .await
    {
        Err(e) if !e.is_not_found() => Err(e),
        _ => Ok(()),
    }
}

#[derive(Debug, Clone)]
pub struct SubnetInfo {
    pub id: String,
    pub vpc_id: String,
    pub cidr: String,
    pub availability_zone: String,
}

pub async fn subnet(ec2: &Client, id: &str) -> Result<Option<SubnetInfo>, AwsError> {
    let out = call("ec2:DescribeSubnets", id, || {
        ec2.describe_subnets().subnet_ids(id).send()
    })
    .await;
    let out = match out {
        Ok(o) => o,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(out.subnets().first().map(|s| SubnetInfo {
        id: s.subnet_id().unwrap_or_default().to_string(),
        vpc_id: s.vpc_id().unwrap_or_default().to_string(),
        cidr: s.cidr_block().unwrap_or_default().to_string(),
        availability_zone: s.availability_zone().unwrap_or_default().to_string(),
    }))
}

/// The region's default subnet in its default VPC, for recipes that name no subnet.
pub async fn default_subnet(ec2: &Client) -> Result<Option<SubnetInfo>, AwsError> {
    let out = call("ec2:DescribeSubnets", "default-for-az", || {
        ec2.describe_subnets()
            .filters(
                Filter::builder()
                    .name("default-for-az")
                    .values("true")
                    .build(),
            )
            .send()
    })
    .await?;
    Ok(out.subnets().first().map(|s| SubnetInfo {
        id: s.subnet_id().unwrap_or_default().to_string(),
        vpc_id: s.vpc_id().unwrap_or_default().to_string(),
        cidr: s.cidr_block().unwrap_or_default().to_string(),
        availability_zone: s.availability_zone().unwrap_or_default().to_string(),
    }))
}

pub async fn create_security_group(
    ec2: &Client,
    name: &str,
    vpc_id: &str,
    description: &str,
    tags: &Tags,
) -> Result<String, AwsError> {
    let made = call("ec2:CreateSecurityGroup", name, || {
        ec2.create_security_group()
            .group_name(name)
            .vpc_id(vpc_id)
            .description(description)
            .tag_specifications(tag_spec(ResourceType::SecurityGroup, tags))
            .send()
    })
    .await;
    let made = made.map(|out| out.group_id().unwrap_or_default().to_string());
    or_own(made, "InvalidGroup.Duplicate", || async {
        Ok(groups_named(ec2, name, vpc_id)
            .await?
            .iter()
            .find(|g| g.group_name() == Some(name) && carries(g.tags(), tags))
            .and_then(|g| g.group_id())
            .map(str::to_string))
    })
    .await
}

/// The id of the security group named `name` in `vpc_id`, if any.
pub async fn security_group_named(
    ec2: &Client,
    name: &str,
    vpc_id: &str,
) -> Result<Option<String>, AwsError> {
    Ok(groups_named(ec2, name, vpc_id)
        .await?
        .first()
        .and_then(|g| g.group_id())
        .map(str::to_string))
}

/// Security groups named `name` in `vpc_id` (at most one; names are unique per VPC), as EC2
/// describes them.
async fn groups_named(
    ec2: &Client,
    name: &str,
    vpc_id: &str,
) -> Result<Vec<aws_sdk_ec2::types::SecurityGroup>, AwsError> {
    let out = call("ec2:DescribeSecurityGroups", name, || {
        ec2.describe_security_groups()
            .filters(Filter::builder().name("group-name").values(name).build())
            .filters(Filter::builder().name("vpc-id").values(vpc_id).build())
            .send()
    })
    .await?;
    Ok(out.security_groups.unwrap_or_default())
}

/// Inbound rules of a security group, as `(protocol, from, to, cidrs)`.
pub async fn ingress_rules(
    ec2: &Client,
    group_id: &str,
) -> Result<Vec<(String, i32, i32, Vec<String>)>, AwsError> {
    let out = call("ec2:DescribeSecurityGroups", group_id, || {
        ec2.describe_security_groups().group_ids(group_id).send()
    })
    .await?;
    Ok(out
        .security_groups()
        .iter()
        .flat_map(|g| g.ip_permissions())
        .map(|p| {
            (
                p.ip_protocol().unwrap_or_default().to_string(),
                p.from_port().unwrap_or_default(),
                p.to_port().unwrap_or_default(),
                p.ip_ranges()
                    .iter()
                    .filter_map(|r| r.cidr_ip().map(str::to_string))
                    .collect(),
            )
        })
        .collect())
}

pub async fn authorize_tcp_ingress(
    ec2: &Client,
    group_id: &str,
    port: u16,
    cidr: &str,
    description: &str,
) -> Result<(), AwsError> {
    let permission = IpPermission::builder()
        .ip_protocol("tcp")
        .from_port(port.into())
        .to_port(port.into())
        .ip_ranges(
            IpRange::builder()
                .cidr_ip(cidr)
                .description(description)
                .build(),
        )
        .build();
    match call("ec2:AuthorizeSecurityGroupIngress", group_id, || {
        ec2.authorize_security_group_ingress()
            .group_id(group_id)
            .ip_permissions(permission.clone())
            .send()
    })
    .await
    {
        // A retried call whose first attempt landed.
        Err(e) if e.code() == Some("InvalidPermission.Duplicate") => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Deletes a security group; one already gone is not an error.
pub async fn delete_security_group(ec2: &Client, group_id: &str) -> Result<(), AwsError> {
    match call("ec2:DeleteSecurityGroup", group_id, || {
        ec2.delete_security_group().group_id(group_id).send()
    })
    .await
    {
        Err(e) if !e.is_not_found() => Err(e),
        _ => Ok(()),
    }
}

/// Everything `RunInstances` needs for a temporary build instance.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub image_id: String,
    pub instance_type: String,
    pub subnet_id: String,
    pub security_group_ids: Vec<String>,
    pub key_name: Option<String>,
    pub instance_profile: Option<String>,
    pub associate_public_ip: Option<bool>,
    pub root_device_name: Option<String>,
    pub root_volume: Option<crate::recipe::RootVolume>,
    pub client_token: String,
    pub tags: Tags,
}

/// Launches one instance with IMDSv2 required. `client_token` makes a retried call idempotent:
/// AWS returns the instance of the first call instead of launching a second one.
pub async fn run_instance(ec2: &Client, spec: &LaunchSpec) -> Result<String, AwsError> {
    let metadata = InstanceMetadataOptionsRequest::builder()
        .http_tokens(HttpTokensState::Required)
        .http_endpoint(InstanceMetadataEndpointState::Enabled)
        .http_put_response_hop_limit(1)
        .build();
    let mut block_devices = Vec::new();
    if let Some(v) = &spec.root_volume {
        let device = v
            .device_name
            .clone()
            .or_else(|| spec.root_device_name.clone())
            .unwrap_or_else(|| "/dev/xvda".into());
        block_devices.push(
            BlockDeviceMapping::builder()
                .device_name(device)
                .ebs(
                    EbsBlockDevice::builder()
                        .set_volume_size(v.size_gib)
                        .set_volume_type(v.volume_type.as_deref().map(VolumeType::from))
                        .set_encrypted(v.encrypted)
                        .set_kms_key_id(v.kms_key_id.clone())
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        );
    }
    let out = call("ec2:RunInstances", &spec.image_id, || {
        let mut req = ec2
            .run_instances()
            .image_id(&spec.image_id)
            .instance_type(InstanceType::from(spec.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .set_key_name(spec.key_name.clone())
            .metadata_options(metadata.clone())
            .client_token(&spec.client_token)
            .tag_specifications(tag_spec(ResourceType::Instance, &spec.tags))
            .tag_specifications(tag_spec(ResourceType::Volume, &spec.tags))
            .set_block_device_mappings((!block_devices.is_empty()).then(|| block_devices.clone()));
        req = match spec.associate_public_ip {
            // A public-IP choice must be made on the network interface.
            Some(public) => req.network_interfaces(
                InstanceNetworkInterfaceSpecification::builder()
                    .device_index(0)
                    .subnet_id(&spec.subnet_id)
                    .set_groups(Some(spec.security_group_ids.clone()))
                    .associate_public_ip_address(public)
                    .delete_on_termination(true)
                    .build(),
            ),
            None => req
                .subnet_id(&spec.subnet_id)
                .set_security_group_ids(Some(spec.security_group_ids.clone())),
        };
        if let Some(profile) = &spec.instance_profile {
            let p = IamInstanceProfileSpecification::builder();
            let p = if profile.starts_with("arn:") {
                p.arn(profile)
            } else {
                p.name(profile)
            };
            req = req.iam_instance_profile(p.build());
        }
        req.send()
    })
    .await?;
    out.instances()
        .first()
        .and_then(|i| i.instance_id())
        .map(str::to_string)
        .ok_or_else(|| AwsError {
            action: "ec2:RunInstances",
            resource: spec.image_id.clone(),
            code: None,
            message: "the response named no instance".into(),
            transient: false,
        })
}

/// What bakery watches of an instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    pub state: String,
    pub private_ip: Option<String>,
    pub public_ip: Option<String>,
    pub private_dns: Option<String>,
    pub public_dns: Option<String>,
    /// Its `bakery:build-id` tag, if any.
    pub build_id: Option<String>,
    /// Launch time, seconds since the epoch (0 if unknown).
    pub launched: i64,
}

fn nonempty(s: Option<&str>) -> Option<String> {
    s.filter(|v| !v.is_empty()).map(str::to_string)
}

fn instance_info(i: &aws_sdk_ec2::types::Instance) -> InstanceInfo {
    InstanceInfo {
        launched: i.launch_time().map(|t| t.secs()).unwrap_or_default(),
        build_id: i
            .tags()
            .iter()
            .find(|t| t.key() == Some(bakery_core::marks::BUILD_ID_TAG))
            .and_then(|t| t.value())
            .map(str::to_string),
        id: i.instance_id().unwrap_or_default().to_string(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default(),
        private_ip: nonempty(i.private_ip_address()),
        public_ip: nonempty(i.public_ip_address()),
        private_dns: nonempty(i.private_dns_name()),
        public_dns: nonempty(i.public_dns_name()),
    }
}

/// The instance, or `None` while EC2 does not (yet, or any more) know it.
pub async fn describe_instance(ec2: &Client, id: &str) -> Result<Option<InstanceInfo>, AwsError> {
    match call("ec2:DescribeInstances", id, || {
        ec2.describe_instances().instance_ids(id).send()
    })
    .await
    {
        Ok(out) => Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(instance_info)
            .next()),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Instances carrying `key=value`, except terminated ones.
pub async fn instances_tagged(
    ec2: &Client,
    key: &str,
    value: &str,
) -> Result<Vec<InstanceInfo>, AwsError> {
    let out = call(
        "ec2:DescribeInstances",
        format!("tag {key}={value}"),
        || {
            ec2.describe_instances()
                .filters(tag_filter(key, value))
                .send()
        },
    )
    .await?;
    Ok(out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(instance_info)
        .filter(|i| i.state != InstanceStateName::Terminated.as_str())
        .collect())
}

/// The instance's console output, decoded; `None` while there is none yet.
pub async fn console_output(ec2: &Client, id: &str) -> Result<Option<String>, AwsError> {
    use base64::Engine;
    let out = call("ec2:GetConsoleOutput", id, || {
        ec2.get_console_output().instance_id(id).latest(true).send()
    })
    .await;
    let out = match out {
        Ok(o) => o,
        // Some instance types only support the non-latest form.
        Err(e) if e.code() == Some("UnsupportedOperation") => {
            call("ec2:GetConsoleOutput", id, || {
                ec2.get_console_output().instance_id(id).send()
            })
            .await?
        }
        Err(e) => return Err(e),
    };
    Ok(out.output().filter(|o| !o.is_empty()).map(|b64| {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .unwrap_or_else(|_| b64.as_bytes().to_vec());
        String::from_utf8_lossy(&bytes).into_owned()
    }))
}

pub async fn stop_instance(ec2: &Client, id: &str) -> Result<(), AwsError> {
    call("ec2:StopInstances", id, || {
        ec2.stop_instances().instance_ids(id).send()
    })
    .await
    .map(|_| ())
}

pub async fn terminate_instances(ec2: &Client, ids: &[String]) -> Result<(), AwsError> {
    if ids.is_empty() {
        return Ok(());
    }
    match call("ec2:TerminateInstances", ids.join(","), || {
        ec2.terminate_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
    })
    .await
    {
        Err(e) if !e.is_not_found() => Err(e),
        _ => Ok(()),
    }
}

pub async fn create_image(
    ec2: &Client,
    instance_id: &str,
    name: &str,
    description: Option<&str>,
    no_reboot: bool,
    tags: &Tags,
) -> Result<String, AwsError> {
    let made = call("ec2:CreateImage", instance_id, || {
        ec2.create_image()
            .instance_id(instance_id)
            .name(name)
            .set_description(description.map(str::to_string))
            .no_reboot(no_reboot)
            .tag_specifications(tag_spec(ResourceType::Image, tags))
            .send()
    })
    .await;
    let made = made.map(|out| out.image_id().unwrap_or_default().to_string());
    or_own(made, "InvalidAMIName.Duplicate", || async {
        Ok(own_images_named(ec2, name)
            .await?
            .iter()
            .find(|i| i.name() == Some(name) && carries(i.tags(), tags))
            .and_then(|i| i.image_id())
            .map(str::to_string))
    })
    .await
}

pub async fn create_tags(ec2: &Client, resources: &[String], tags: &Tags) -> Result<(), AwsError> {
    if resources.is_empty() || tags.is_empty() {
        return Ok(());
    }
    call("ec2:CreateTags", resources.join(","), || {
        ec2.create_tags()
            .set_resources(Some(resources.to_vec()))
            .set_tags(Some(to_tags(tags)))
            .send()
    })
    .await
    .map(|_| ())
}

/// Deregisters an AMI and deletes its snapshots (each step tolerating "already gone").
pub async fn delete_image(ec2: &Client, image: &ImageInfo) -> Result<(), AwsError> {
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

/// Every instance in the region whose EC2 status checks (instance or system) are `impaired`,
/// with the evidence: two filtered, paginated calls however many instances there are.
pub async fn impaired(ec2: &Client) -> Result<BTreeMap<String, String>, AwsError> {
    let mut out = BTreeMap::new();
    for filter in ["instance-status.status", "system-status.status"] {
        let mut token: Option<String> = None;
        loop {
            let r = call("ec2:DescribeInstanceStatus", filter, || {
                ec2.describe_instance_status()
                    .filters(Filter::builder().name(filter).values("impaired").build())
                    .set_next_token(token.clone())
                    .max_results(1000)
                    .send()
            })
            .await?;
            for s in r.instance_statuses() {
                let instance = s
                    .instance_status()
                    .and_then(|x| x.status())
                    .map(|x| x.as_str())
                    .unwrap_or("-");
                let system = s
                    .system_status()
                    .and_then(|x| x.status())
                    .map(|x| x.as_str())
                    .unwrap_or("-");
                // Check the answer too: not every implementation honours these filters.
                if instance != "impaired" && system != "impaired" {
                    continue;
                }
                out.insert(
                    s.instance_id().unwrap_or_default().to_string(),
                    format!("EC2 status checks: instance {instance}, system {system}"),
                );
            }
            token = r.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
    }
    Ok(out)
}

/// Instance ids asked for in one DescribeInstances call. An answer is parsed whole before it is
/// used (a few KB of XML an instance), so fewer ids a call bound what one answer holds in memory:
/// a daemon taking over a large fleet asks for the addresses of hundreds of instances at once.
const IDS_PER_CALL: usize = 200;

/// `pick` of each instance with one of these ids, however many: ids in chunks of
/// [`IDS_PER_CALL`], every page of each answer (an implementation may page even when ids are
/// given), and an id that vanished meanwhile skipped rather than failing the whole call. Only
/// what `pick` returns outlives each answer.
pub async fn instances_by_id<T>(
    ec2: &Client,
    ids: &[String],
    pick: &impl Fn(&aws_sdk_ec2::types::Instance) -> Option<T>,
) -> Result<Vec<T>, AwsError> {
    let mut found = Vec::new();
    for chunk in ids.chunks(IDS_PER_CALL) {
        let mut token: Option<String> = None;
        loop {
            let out = call(
                "ec2:DescribeInstances",
                format!("{} instances", chunk.len()),
                || {
                    ec2.describe_instances()
                        .set_instance_ids(Some(chunk.to_vec()))
                        .set_next_token(token.clone())
                        .send()
                },
            )
            .await;
            let out = match out {
                Ok(o) => o,
                // One unknown id fails the call: ask one by one instead.
                Err(e) if e.is_not_found() && chunk.len() > 1 => {
                    for id in chunk {
                        found.extend(
                            Box::pin(instances_by_id(ec2, std::slice::from_ref(id), pick)).await?,
                        );
                    }
                    break;
                }
                Err(e) if e.is_not_found() => break,
                Err(e) => return Err(e),
            };
            found.extend(
                out.reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .filter_map(pick),
            );
            token = out.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
    }
    Ok(found)
}

fn launched(i: &aws_sdk_ec2::types::Instance) -> u64 {
    i.launch_time()
        .map(|t| t.secs().max(0) as u64)
        .unwrap_or_default()
}

/// The image and launch time (seconds since the epoch) of each instance, by id.
pub async fn images_of(
    ec2: &Client,
    ids: &[String],
) -> Result<BTreeMap<String, (String, u64)>, AwsError> {
    let pick = |i: &aws_sdk_ec2::types::Instance| {
        Some((
            i.instance_id()?.to_string(),
            (i.image_id().unwrap_or_default().to_string(), launched(i)),
        ))
    };
    Ok(instances_by_id(ec2, ids, &pick)
        .await?
        .into_iter()
        .collect())
}

/// Private IP and launch time of each instance, by id.
pub async fn addresses(
    ec2: &Client,
    ids: &[String],
) -> Result<BTreeMap<String, (Option<String>, u64)>, AwsError> {
    let pick = |i: &aws_sdk_ec2::types::Instance| {
        Some((
            i.instance_id()?.to_string(),
            (nonempty(i.private_ip_address()), launched(i)),
        ))
    };
    Ok(instances_by_id(ec2, ids, &pick)
        .await?
        .into_iter()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(k: &str, v: &str) -> Tag {
        Tag::builder().key(k).value(v).build()
    }

    #[test]
    fn a_resource_is_ours_only_with_every_tag_we_asked_for() {
        let asked = Tags::from([
            ("bakery:build-id".to_string(), "b1".to_string()),
            ("Name".to_string(), "bakery-b1".to_string()),
        ]);
        let found = [
            tag("Name", "bakery-b1"),
            tag("bakery:build-id", "b1"),
            tag("other", "x"),
        ];
        assert!(carries(&found, &asked));
        // another build's resource of the same name
        assert!(!carries(
            &[tag("Name", "bakery-b1"), tag("bakery:build-id", "b2")],
            &asked
        ));
        assert!(!carries(&[tag("Name", "bakery-b1")], &asked));
        // asking with no tags proves nothing
        assert!(!carries(&found, &Tags::new()));
    }
}
