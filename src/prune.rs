//! `bakery prune --name-prefix P --keep N`: deregisters a recipe's old AMIs and deletes their
//! snapshots, keeping the newest N and never one that is in use: named by any launch-template
//! version or launch configuration, or run by any instance that is not terminated.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::aws::{call, ec2, launch_template as lt, Aws, AwsError};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Pruned {
    pub ami_id: String,
    pub name: String,
    pub created: String,
    pub action: PruneAction,
}

/// What prune did with an image. Printed (and serialized) as a short phrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PruneAction {
    KeptNewest(usize),
    KeptInUse,
    WouldDeregister,
    /// Deregistered, with this many snapshots deleted.
    Deregistered(usize),
    Failed(String),
}

impl PruneAction {
    pub fn failed(&self) -> bool {
        matches!(self, PruneAction::Failed(_))
    }
}

impl std::fmt::Display for PruneAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PruneAction::KeptNewest(n) => write!(f, "kept (newest {n})"),
            PruneAction::KeptInUse => f.write_str("kept (in use)"),
            PruneAction::WouldDeregister => f.write_str("would deregister"),
            PruneAction::Deregistered(n) => write!(f, "deregistered (and {n} snapshot(s))"),
            PruneAction::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

impl Serialize for PruneAction {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Which of `images` (newest first) to delete: beyond the newest `keep`, not in use.
pub fn choose(
    images: &[ec2::ImageInfo],
    keep: usize,
    in_use: &BTreeSet<String>,
) -> Vec<(usize, &'static str)> {
    images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            if i < keep {
                (i, "keep-newest")
            } else if in_use.contains(&img.id) {
                (i, "keep-in-use")
            } else {
                (i, "delete")
            }
        })
        .collect()
}

/// AMIs in use anywhere in the region: launch-template versions, launch configurations, and
/// instances that are not terminated.
pub(crate) async fn images_in_use(aws: &Aws) -> Result<BTreeSet<String>, AwsError> {
    let mut used = BTreeSet::new();
    let ec2c = &aws.ec2;
    // Every page of every list: an AMI missed here would be deregistered while in use.
    let templates = call("ec2:DescribeLaunchTemplates", "all", || {
        ec2c.describe_launch_templates()
            .into_paginator()
            .items()
            .send()
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    for t in &templates {
        let Some(id) = t.launch_template_id() else {
            continue;
        };
        for v in lt::all_versions(ec2c, id).await? {
            used.extend(v.image_id);
        }
    }
    let asg = &aws.autoscaling;
    let configs = call("autoscaling:DescribeLaunchConfigurations", "all", || {
        asg.describe_launch_configurations()
            .into_paginator()
            .items()
            .send()
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    used.extend(
        configs
            .iter()
            .filter_map(|c| c.image_id().map(str::to_string)),
    );
    let instances = call("ec2:DescribeInstances", "not terminated", || {
        ec2c.describe_instances()
            .filters(ec2::in_states(&[
                "pending",
                "running",
                "stopping",
                "stopped",
                "shutting-down",
            ]))
            .into_paginator()
            .items()
            .send()
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    used.extend(
        instances
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| i.image_id().map(str::to_string)),
    );
    Ok(used)
}

pub async fn run(
    aws: &Aws,
    prefix: &str,
    keep: usize,
    dry_run: bool,
) -> Result<Vec<Pruned>, AwsError> {
    let ec2c = &aws.ec2;
    let mut images = ec2::find_images(ec2c, &["self".to_string()], &format!("{prefix}*")).await?;
    images.retain(|i| i.name.starts_with(prefix));
    let in_use = images_in_use(aws).await?;
    let mut out = Vec::new();
    for (i, what) in choose(&images, keep, &in_use) {
        let img = &images[i];
        let action = match what {
            "keep-newest" => PruneAction::KeptNewest(keep),
            "keep-in-use" => PruneAction::KeptInUse,
            _ if dry_run => PruneAction::WouldDeregister,
            _ => match ec2::delete_image(ec2c, img).await {
                Ok(()) => PruneAction::Deregistered(img.snapshot_ids.len()),
                Err(e) => PruneAction::Failed(e.to_string()),
            },
        };
        out.push(Pruned {
            ami_id: img.id.clone(),
            name: img.name.clone(),
            created: img.creation_date.clone().unwrap_or_default(),
            action,
        });
    }
    Ok(out)
}

/// The human list.
pub fn render(rows: &[Pruned], prefix: &str) -> String {
    if rows.is_empty() {
        return format!("no AMI named {prefix}*\n");
    }
    let mut table = vec![["AMI", "NAME", "CREATED", "ACTION"]
        .map(String::from)
        .to_vec()];
    table.extend(rows.iter().map(|r| {
        vec![
            r.ami_id.clone(),
            r.name.clone(),
            r.created.clone(),
            r.action.to_string(),
        ]
    }));
    crate::output::table(&table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(id: &str) -> ec2::ImageInfo {
        ec2::ImageInfo {
            id: id.into(),
            name: format!("web-{id}"),
            state: "available".into(),
            root_device_name: None,
            creation_date: None,
            snapshot_ids: vec![],
        }
    }

    #[test]
    fn keeps_the_newest_and_those_in_use() {
        let images = [img("a"), img("b"), img("c"), img("d")];
        let in_use = BTreeSet::from(["d".to_string()]);
        let plan: Vec<&str> = choose(&images, 2, &in_use)
            .into_iter()
            .map(|(_, w)| w)
            .collect();
        assert_eq!(
            plan,
            vec!["keep-newest", "keep-newest", "delete", "keep-in-use"]
        );
    }
}
