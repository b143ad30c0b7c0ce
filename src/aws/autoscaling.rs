//! Thin typed wrappers over the Auto Scaling calls bakery makes, and the plain-data view of a
//! group that the rollout and the status command work from.

use std::collections::BTreeMap;

use aws_sdk_autoscaling::types::{LaunchTemplateSpecification, Tag};
use aws_sdk_autoscaling::Client;

use super::{call, AwsError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInstance {
    pub id: String,
    pub lifecycle: String,
    pub health: String,
    pub launch_template_version: Option<String>,
    pub availability_zone: String,
    /// Protected from scale in.
    pub protected: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchTemplateRef {
    pub id: Option<String>,
    pub name: Option<String>,
    /// As the group names it: a number, `$Latest` or `$Default`.
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub desired: u32,
    pub min: u32,
    pub max: u32,
    pub launch_template: Option<LaunchTemplateRef>,
    pub uses_mixed_instances_policy: bool,
    /// The templates a mixed instances policy launches from (its own and its overrides').
    pub mixed_launch_templates: Vec<LaunchTemplateRef>,
    pub uses_launch_configuration: Option<String>,
    pub target_group_arns: Vec<String>,
    /// The subnets the group launches into.
    pub subnets: Vec<String>,
    pub health_check_type: String,
    pub health_check_grace_period: i32,
    pub instances: Vec<GroupInstance>,
    pub tags: BTreeMap<String, String>,
    pub suspended: Vec<String>,
    /// The group has a warm pool (`WarmPoolConfiguration`).
    pub warm_pool: bool,
}

pub async fn describe(asg: &Client, name: &str) -> Result<Option<Group>, AwsError> {
    let out = call("autoscaling:DescribeAutoScalingGroups", name, || {
        asg.describe_auto_scaling_groups()
            .auto_scaling_group_names(name)
            .send()
    })
    .await?;
    Ok(out.auto_scaling_groups().first().map(group_of))
}

/// Groups by name (batched, paginated) and by tag filters, in one pass each.
pub async fn describe_many(
    asg: &Client,
    names: &[String],
    tags: &[(String, Option<String>)],
) -> Result<Vec<Group>, AwsError> {
    use aws_sdk_autoscaling::types::Filter;
    let mut found: BTreeMap<String, Group> = BTreeMap::new();
    // DescribeAutoScalingGroups takes at most 100 names.
    for chunk in names.chunks(100) {
        let label = format!("{} groups", chunk.len());
        for g in all_pages(asg, &label, Some(chunk.to_vec()), None).await? {
            found.insert(g.name.clone(), g);
        }
    }
    for (key, value) in tags {
        let filter = match value {
            Some(v) => Filter::builder()
                .name(format!("tag:{key}"))
                .values(v)
                .build(),
            None => Filter::builder().name("tag-key").values(key).build(),
        };
        for g in all_pages(asg, &format!("tag {key}"), None, Some(filter)).await? {
            found.insert(g.name.clone(), g);
        }
    }
    Ok(found.into_values().collect())
}

/// Every group in the region.
pub async fn all(asg: &Client) -> Result<Vec<Group>, AwsError> {
    all_pages(asg, "all groups", None, None).await
}

/// Every page of one DescribeAutoScalingGroups query.
async fn all_pages(
    asg: &Client,
    label: &str,
    names: Option<Vec<String>>,
    filter: Option<aws_sdk_autoscaling::types::Filter>,
) -> Result<Vec<Group>, AwsError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = call("autoscaling:DescribeAutoScalingGroups", label, || {
            asg.describe_auto_scaling_groups()
                .set_auto_scaling_group_names(names.clone())
                .set_filters(filter.clone().map(|f| vec![f]))
                .set_next_token(token.clone())
                .max_records(100)
                .send()
        })
        .await?;
        out.extend(page.auto_scaling_groups().iter().map(group_of));
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            return Ok(out);
        }
    }
}

/// Marks an instance unhealthy: the group's `ReplaceUnhealthy` process replaces it.
pub async fn set_unhealthy(asg: &Client, id: &str) -> Result<(), AwsError> {
    call("autoscaling:SetInstanceHealth", id, || {
        asg.set_instance_health()
            .instance_id(id)
            .health_status("Unhealthy")
            .should_respect_grace_period(false)
            .send()
    })
    .await
    .map(|_| ())
}

fn group_of(g: &aws_sdk_autoscaling::types::AutoScalingGroup) -> Group {
    Group {
        name: g.auto_scaling_group_name().unwrap_or_default().to_string(),
        desired: g.desired_capacity().unwrap_or_default().max(0) as u32,
        min: g.min_size().unwrap_or_default().max(0) as u32,
        max: g.max_size().unwrap_or_default().max(0) as u32,
        launch_template: g.launch_template().map(|lt| LaunchTemplateRef {
            id: lt.launch_template_id().map(str::to_string),
            name: lt.launch_template_name().map(str::to_string),
            version: lt.version().map(str::to_string),
        }),
        uses_mixed_instances_policy: g.mixed_instances_policy().is_some(),
        mixed_launch_templates: g
            .mixed_instances_policy()
            .and_then(|p| p.launch_template())
            .map(|t| {
                t.launch_template_specification()
                    .into_iter()
                    .chain(
                        t.overrides()
                            .iter()
                            .filter_map(|o| o.launch_template_specification()),
                    )
                    .map(|s| LaunchTemplateRef {
                        id: s.launch_template_id().map(str::to_string),
                        name: s.launch_template_name().map(str::to_string),
                        version: s.version().map(str::to_string),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        uses_launch_configuration: g.launch_configuration_name().map(str::to_string),
        target_group_arns: g.target_group_arns().to_vec(),
        subnets: g
            .vpc_zone_identifier()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        health_check_type: g.health_check_type().unwrap_or_default().to_string(),
        health_check_grace_period: g.health_check_grace_period().unwrap_or_default(),
        instances: g.instances().iter().map(instance_of).collect(),
        tags: g
            .tags()
            .iter()
            .filter_map(|t| {
                Some((
                    t.key()?.to_string(),
                    t.value().unwrap_or_default().to_string(),
                ))
            })
            .collect(),
        suspended: g
            .suspended_processes()
            .iter()
            .filter_map(|p| p.process_name().map(str::to_string))
            .collect(),
        warm_pool: g.warm_pool_configuration().is_some(),
    }
}

/// Sets tags on the group (not propagated to instances).
pub async fn set_tags(asg: &Client, group: &str, tags: &[(&str, String)]) -> Result<(), AwsError> {
    let tags: Vec<Tag> = tags
        .iter()
        .map(|(k, v)| {
            Tag::builder()
                .resource_id(group)
                .resource_type("auto-scaling-group")
                .key(*k)
                .value(v)
                .propagate_at_launch(false)
                .build()
        })
        .collect();
    call("autoscaling:CreateOrUpdateTags", group, || {
        asg.create_or_update_tags()
            .set_tags(Some(tags.clone()))
            .send()
    })
    .await
    .map(|_| ())
}

/// Sets tags on several groups in one call: `(group, key, value)`.
pub async fn set_tags_many(asg: &Client, tags: &[(&str, &str, &str)]) -> Result<(), AwsError> {
    // CreateOrUpdateTags takes at most 50 tags a call.
    for chunk in tags.chunks(50) {
        let tags: Vec<Tag> = chunk
            .iter()
            .map(|(group, k, v)| {
                Tag::builder()
                    .resource_id(*group)
                    .resource_type("auto-scaling-group")
                    .key(*k)
                    .value(*v)
                    .propagate_at_launch(false)
                    .build()
            })
            .collect();
        call(
            "autoscaling:CreateOrUpdateTags",
            format!("{} groups", chunk.len()),
            || {
                asg.create_or_update_tags()
                    .set_tags(Some(tags.clone()))
                    .send()
            },
        )
        .await?;
    }
    Ok(())
}

pub async fn delete_tags(asg: &Client, group: &str, keys: &[&str]) -> Result<(), AwsError> {
    let tags: Vec<Tag> = keys
        .iter()
        .map(|k| {
            Tag::builder()
                .resource_id(group)
                .resource_type("auto-scaling-group")
                .key(*k)
                .build()
        })
        .collect();
    call("autoscaling:DeleteTags", group, || {
        asg.delete_tags().set_tags(Some(tags.clone())).send()
    })
    .await
    .map(|_| ())
}

pub async fn set_desired(asg: &Client, group: &str, desired: u32) -> Result<(), AwsError> {
    call("autoscaling:SetDesiredCapacity", group, || {
        asg.set_desired_capacity()
            .auto_scaling_group_name(group)
            .desired_capacity(desired as i32)
            .honor_cooldown(false)
            .send()
    })
    .await
    .map(|_| ())
}

/// Changes sizes and/or the launch-template version; `None` leaves a field as it is.
pub async fn update(
    asg: &Client,
    group: &str,
    template: Option<(&str, &str)>,
    min: Option<u32>,
    max: Option<u32>,
    desired: Option<u32>,
) -> Result<(), AwsError> {
    call("autoscaling:UpdateAutoScalingGroup", group, || {
        asg.update_auto_scaling_group()
            .auto_scaling_group_name(group)
            .set_launch_template(template.map(|(id, version)| {
                LaunchTemplateSpecification::builder()
                    .launch_template_id(id)
                    .version(version)
                    .build()
            }))
            .set_min_size(min.map(|v| v as i32))
            .set_max_size(max.map(|v| v as i32))
            .set_desired_capacity(desired.map(|v| v as i32))
            .send()
    })
    .await
    .map(|_| ())
}

/// An instance as DescribeAutoScalingGroups and DescribeWarmPool both give it (one SDK type).
fn instance_of(i: &aws_sdk_autoscaling::types::Instance) -> GroupInstance {
    GroupInstance {
        id: i.instance_id().unwrap_or_default().to_string(),
        lifecycle: i
            .lifecycle_state()
            .map(|l| l.as_str().to_string())
            .unwrap_or_default(),
        health: i.health_status().unwrap_or_default().to_string(),
        launch_template_version: i
            .launch_template()
            .and_then(|lt| lt.version())
            .map(str::to_string),
        availability_zone: i.availability_zone().unwrap_or_default().to_string(),
        protected: i.protected_from_scale_in().unwrap_or_default(),
    }
}

/// The instances of the group's warm pool (none without a pool), with their pool lifecycle
/// state (`Warmed:Stopped`, ...) and launch-template version.
pub async fn warm_pool(asg: &Client, group: &str) -> Result<Vec<GroupInstance>, AwsError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = call("autoscaling:DescribeWarmPool", group, || {
            asg.describe_warm_pool()
                .auto_scaling_group_name(group)
                .set_next_token(token.clone())
                .send()
        })
        .await?;
        out.extend(page.instances().iter().map(instance_of));
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            return Ok(out);
        }
    }
}

/// Terminates a group member; with `decrement`, the group does not replace it.
pub async fn terminate_instance(asg: &Client, id: &str, decrement: bool) -> Result<(), AwsError> {
    match call(
        "autoscaling:TerminateInstanceInAutoScalingGroup",
        id,
        || {
            asg.terminate_instance_in_auto_scaling_group()
                .instance_id(id)
                .should_decrement_desired_capacity(decrement)
                .send()
        },
    )
    .await
    {
        // Already gone (or leaving): that is what we wanted.
        Err(e) if e.code() == Some("ValidationError") && e.message.contains("not found") => Ok(()),
        other => other.map(|_| ()),
    }
}

pub async fn suspend(asg: &Client, group: &str, processes: &[&str]) -> Result<(), AwsError> {
    call("autoscaling:SuspendProcesses", group, || {
        asg.suspend_processes()
            .auto_scaling_group_name(group)
            .set_scaling_processes(Some(processes.iter().map(|p| p.to_string()).collect()))
            .send()
    })
    .await
    .map(|_| ())
}

pub async fn resume(asg: &Client, group: &str, processes: &[&str]) -> Result<(), AwsError> {
    call("autoscaling:ResumeProcesses", group, || {
        asg.resume_processes()
            .auto_scaling_group_name(group)
            .set_scaling_processes(Some(processes.iter().map(|p| p.to_string()).collect()))
            .send()
    })
    .await
    .map(|_| ())
}
