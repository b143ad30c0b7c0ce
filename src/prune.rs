//! `bakery prune --name-prefix P --keep N [--regions R,...]`: deregisters a recipe's old AMIs and
//! deletes their snapshots, keeping the newest N and never one that is in use: named by any
//! launch-template version or launch configuration, or run by any instance that is not
//! terminated.
//!
//! With `--regions`, it acts in every region a recipe distributes to, on *releases*: an image
//! and its copies share their name, so a release is a name, and the newest N names are kept
//! everywhere. A release in use in any of the regions is kept in all of them (a rollback may
//! need it anywhere). An image with deregistration protection is kept and reported; `--force`
//! turns the protection off and prunes it. Each image's snapshots go with it.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::aws::{call, ec2, launch_template as lt, Aws, AwsError};
use crate::promote::calls::{self, Image};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Pruned {
    pub region: String,
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
    /// Another image of the release is in use, in that region.
    KeptInUseIn(String),
    /// Deregistration protection is on (and `--force` was not given).
    KeptProtected(String),
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
            PruneAction::KeptInUseIn(r) => write!(f, "kept (its release is in use in {r})"),
            PruneAction::KeptProtected(p) => {
                write!(
                    f,
                    "kept (deregistration protection {p}; --force turns it off)"
                )
            }
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

/// What to do with one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    KeepNewest,
    /// In use in this region (its own, or another where its release is).
    KeepInUse(String),
    KeepProtected,
    Delete,
}

/// For each of `images` (region, image), what prune does: releases (images of one name) beyond
/// the newest `keep`, not in use in any region, are deleted; a protected image only with
/// `force`. `in_use`: region -> the image ids used there.
pub fn choose(
    images: &[(String, Image)],
    keep: usize,
    in_use: &BTreeMap<String, BTreeSet<String>>,
    force: bool,
) -> Vec<Choice> {
    // Releases, newest first (by their newest image).
    let mut newest: BTreeMap<&str, &str> = BTreeMap::new();
    for (_, i) in images {
        let d = i.creation_date.as_deref().unwrap_or("");
        let e = newest.entry(i.name.as_str()).or_insert(d);
        if d > *e {
            *e = d;
        }
    }
    let mut releases: Vec<(&str, &str)> = newest.into_iter().collect();
    releases.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let kept: BTreeSet<&str> = releases.iter().take(keep).map(|(n, _)| *n).collect();
    let used_in = |name: &str| -> Option<String> {
        images
            .iter()
            .filter(|(_, i)| i.name == name)
            .find(|(r, i)| in_use.get(r).is_some_and(|u| u.contains(&i.id)))
            .map(|(r, _)| r.clone())
    };
    images
        .iter()
        .map(|(region, i)| {
            if kept.contains(i.name.as_str()) {
                Choice::KeepNewest
            } else if in_use.get(region).is_some_and(|u| u.contains(&i.id)) {
                Choice::KeepInUse(region.clone())
            } else if let Some(r) = used_in(&i.name) {
                Choice::KeepInUse(r)
            } else if i.protected() && !force {
                Choice::KeepProtected
            } else {
                Choice::Delete
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
        let versions = match lt::all_versions(ec2c, id).await {
            Ok(v) => v,
            // Deleted since it was listed (another tool, a test tearing down): nothing of it is
            // in use any more. Before, gc and prune failed whole on such a race.
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(e),
        };
        for v in versions {
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

/// Prunes in every region of `regions` (region, client): images named `prefix*` beyond the
/// newest `keep` releases, never one in use in any of them.
pub async fn run(
    regions: &[(String, Aws)],
    prefix: &str,
    keep: usize,
    dry_run: bool,
    force: bool,
) -> Result<Vec<Pruned>, AwsError> {
    let mut images = Vec::new();
    let mut in_use = BTreeMap::new();
    for (region, aws) in regions {
        for i in calls::own_images_prefixed(&aws.ec2, prefix).await? {
            images.push((region.clone(), i));
        }
        in_use.insert(region.clone(), images_in_use(aws).await?);
    }
    // Newest first, for the list.
    images.sort_by(|a, b| b.1.creation_date.cmp(&a.1.creation_date));
    let choices = choose(&images, keep, &in_use, force);
    let mut out = Vec::new();
    for ((region, img), choice) in images.iter().zip(choices) {
        let action = match choice {
            Choice::KeepNewest => PruneAction::KeptNewest(keep),
            Choice::KeepInUse(r) if r == *region => PruneAction::KeptInUse,
            Choice::KeepInUse(r) => PruneAction::KeptInUseIn(r),
            Choice::KeepProtected => {
                PruneAction::KeptProtected(img.protection.clone().unwrap_or_default())
            }
            Choice::Delete if dry_run => PruneAction::WouldDeregister,
            Choice::Delete => {
                let ec2c = &regions
                    .iter()
                    .find(|(r, _)| r == region)
                    .map(|(_, a)| a)
                    .unwrap_or(&regions[0].1)
                    .ec2;
                match calls::remove_image(ec2c, img, force).await {
                    Ok(()) => PruneAction::Deregistered(img.snapshot_ids.len()),
                    Err(e) => PruneAction::Failed(e.to_string()),
                }
            }
        };
        out.push(Pruned {
            region: region.clone(),
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
    let mut table = vec![["REGION", "AMI", "NAME", "CREATED", "ACTION"]
        .map(String::from)
        .to_vec()];
    table.extend(rows.iter().map(|r| {
        vec![
            r.region.clone(),
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

    fn img(name: &str, id: &str, created: &str) -> Image {
        Image {
            id: id.into(),
            name: name.into(),
            state: "available".into(),
            creation_date: Some(created.into()),
            ..Image::default()
        }
    }

    fn at(region: &str, i: Image) -> (String, Image) {
        (region.to_string(), i)
    }

    #[test]
    fn keeps_the_newest_and_those_in_use() {
        let images = [
            at("r", img("web-4", "a", "4")),
            at("r", img("web-3", "b", "3")),
            at("r", img("web-2", "c", "2")),
            at("r", img("web-1", "d", "1")),
        ];
        let in_use = BTreeMap::from([("r".to_string(), BTreeSet::from(["d".to_string()]))]);
        assert_eq!(
            choose(&images, 2, &in_use, false),
            vec![
                Choice::KeepNewest,
                Choice::KeepNewest,
                Choice::Delete,
                Choice::KeepInUse("r".into())
            ]
        );
    }

    #[test]
    fn a_release_in_use_in_one_region_is_kept_in_every_region() {
        let images = [
            at("us-east-1", img("web-2", "a2", "2")),
            at("eu-west-1", img("web-2", "b2", "2")),
            at("us-east-1", img("web-1", "a1", "1")),
            at("eu-west-1", img("web-1", "b1", "1")),
            at("ap-northeast-2", img("web-1", "c1", "1")),
        ];
        let used = BTreeMap::from([("eu-west-1".to_string(), BTreeSet::from(["b1".to_string()]))]);
        assert_eq!(
            choose(&images, 1, &used, false),
            vec![
                Choice::KeepNewest,
                Choice::KeepNewest,
                Choice::KeepInUse("eu-west-1".into()),
                Choice::KeepInUse("eu-west-1".into()),
                Choice::KeepInUse("eu-west-1".into()),
            ]
        );
        // Unused: the old release goes everywhere, copies and all.
        assert_eq!(
            choose(&images, 1, &BTreeMap::new(), false)[2..],
            [Choice::Delete, Choice::Delete, Choice::Delete]
        );
    }

    #[test]
    fn a_protected_image_is_kept_unless_forced() {
        let mut old = img("web-1", "a1", "1");
        old.protection = Some("enabled-without-cooldown".into());
        let images = [at("r", img("web-2", "a2", "2")), at("r", old)];
        let none = BTreeMap::new();
        assert_eq!(choose(&images, 1, &none, false)[1], Choice::KeepProtected);
        assert_eq!(choose(&images, 1, &none, true)[1], Choice::Delete);
        let mut off = images[1].1.clone();
        off.protection = Some("disabled".into());
        assert!(!off.protected());
    }

    #[test]
    fn releases_are_ranked_by_their_newest_image() {
        // web-1's copy in another region is newer than web-2: web-1 is the newer release.
        let images = [
            at("r1", img("web-2", "a2", "2")),
            at("r1", img("web-1", "a1", "1")),
            at("r2", img("web-1", "b1", "3")),
        ];
        assert_eq!(
            choose(&images, 1, &BTreeMap::new(), false),
            vec![Choice::Delete, Choice::KeepNewest, Choice::KeepNewest]
        );
    }
}
