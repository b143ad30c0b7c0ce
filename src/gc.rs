//! `bakery gc`: finds what bakery left behind in a region, by its tags, and removes it:
//! temporary instances, security groups and key pairs of bakes that died (SIGKILL, a lost
//! machine), images and snapshots of failed bakes, stale rollout locks, and health-daemon
//! takeovers whose owner is gone (at once: a group's `HealthCheck` must not wait). Anything else
//! younger than `--older-than` is left alone, so a bake running right now is never touched.
//!
//! The account changes under gc while it runs (another gc, a bake's own cleanup, a person, a
//! test tearing its fleet down): a removal that fails is followed by a second look, and a thing
//! that is gone by then is reported `already gone`, not as a failure.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::aws::{autoscaling, call, ec2, Aws, AwsError};
use crate::bake::undo::BUILD_ID_TAG;
use crate::bake::{COMPLETE_TAG, EXPIRES_TAG, TEMPORARY_TAG, TEMPORARY_TTL};
use crate::health::{takeover, TAKEOVER_TAG};
use crate::promote::{calls, plan};
use crate::rollout::state::{Lock, LOCK_TAG};
use bakery_core::marks;

/// One thing gc found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub kind: &'static str,
    pub id: String,
    pub age_s: u64,
    pub why: String,
    pub action: Action,
}

/// What gc did with a finding. Printed (and serialized) as a short phrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Removed,
    WouldRemove,
    KeptTooYoung,
    KeptInUse,
    /// Its bake may still be running: why.
    KeptRunning(String),
    /// Removed by someone else between gc's listing and its call.
    AlreadyGone,
    Failed(String),
}

impl Action {
    pub fn failed(&self) -> bool {
        matches!(self, Action::Failed(_))
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Removed => f.write_str("removed"),
            Action::WouldRemove => f.write_str("would remove"),
            Action::KeptTooYoung => f.write_str("kept (too young)"),
            Action::KeptInUse => f.write_str("kept (in use)"),
            Action::KeptRunning(why) => write!(f, "kept ({why})"),
            Action::AlreadyGone => f.write_str("already gone"),
            Action::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

impl Serialize for Action {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Whether the bake that made a resource may still run (see [`marks::bake_liveness`]); images
/// carry no expiry tag, so theirs is their creation plus the temporary lifetime.
fn liveness(tags: &BTreeMap<String, String>, created: Option<i64>) -> marks::BakeLiveness {
    let expires = tags
        .get(EXPIRES_TAG)
        .and_then(|e| OffsetDateTime::parse(e, &Rfc3339).ok())
        .map(|t| t.unix_timestamp())
        .or_else(|| {
            tags.get(marks::OWNER_TAG)
                .and(created)
                .map(|c| c + TEMPORARY_TTL.as_secs() as i64)
        })
        .map(|e| e.max(0) as u64);
    marks::bake_liveness(
        tags.get(marks::OWNER_TAG).map(String::as_str),
        expires,
        now().max(0) as u64,
        &crate::host::hostname(),
        crate::host::pid_alive,
    )
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// When a temporary resource was made, from its expiry tag.
fn created_from_tags(tags: &BTreeMap<String, String>) -> Option<i64> {
    let expires = OffsetDateTime::parse(tags.get(EXPIRES_TAG)?, &Rfc3339).ok()?;
    Some(expires.unix_timestamp() - TEMPORARY_TTL.as_secs() as i64)
}

fn tag_map(tags: &[aws_sdk_ec2::types::Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_string(),
                t.value().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

/// Runs `remove`; when it fails, looks again (`gone`): a thing that vanished since it was listed
/// is `AlreadyGone`, whatever error the removal met (EC2 answers `…NotFound`, or
/// `InvalidAMIID.Unavailable` for an image deregistered meanwhile; Auto Scaling a
/// `ValidationError` for a deleted group). A thing still there, or a second look that fails too,
/// leaves the removal's own error.
async fn remove_or_gone<R, G>(remove: R, gone: G) -> Action
where
    R: std::future::Future<Output = Result<(), AwsError>>,
    G: std::future::Future<Output = Result<bool, AwsError>>,
{
    match remove.await {
        Ok(()) => Action::Removed,
        Err(e) => match gone.await {
            Ok(true) => Action::AlreadyGone,
            Ok(false) | Err(_) => Action::Failed(e.to_string()),
        },
    }
}

/// Whether the instance is gone (or going: terminated, shutting down).
async fn instance_gone(ec2c: &aws_sdk_ec2::Client, id: &str) -> Result<bool, AwsError> {
    Ok(ec2::describe_instance(ec2c, id)
        .await?
        .is_none_or(|i| i.state == "terminated" || i.state == "shutting-down"))
}

async fn security_group_gone(ec2c: &aws_sdk_ec2::Client, id: &str) -> Result<bool, AwsError> {
    match call("ec2:DescribeSecurityGroups", id, || {
        ec2c.describe_security_groups().group_ids(id).send()
    })
    .await
    {
        Ok(o) => Ok(o.security_groups().is_empty()),
        Err(e) if e.is_not_found() => Ok(true),
        Err(e) => Err(e),
    }
}

async fn image_gone(ec2c: &aws_sdk_ec2::Client, id: &str) -> Result<bool, AwsError> {
    Ok(ec2::describe_image(ec2c, id)
        .await?
        .is_none_or(|i| i.state == "deregistered"))
}

async fn group_gone(asg: &aws_sdk_autoscaling::Client, name: &str) -> Result<bool, AwsError> {
    Ok(autoscaling::describe_many(asg, &[name.to_string()], &[])
        .await?
        .iter()
        .all(|g| g.name != name))
}

struct Gc<'a> {
    aws: &'a Aws,
    older_than: Duration,
    dry_run: bool,
    /// Only this bake's leftovers.
    build_id: Option<String>,
    in_use: std::collections::BTreeSet<String>,
    findings: Vec<Finding>,
}

impl Gc<'_> {
    /// The tag filter that selects bakery's resources (of one bake, with `--build-id`).
    fn ours(&self, key: &str, value: &str) -> Vec<Filter> {
        let mut f = vec![Filter::builder()
            .name(format!("tag:{key}"))
            .values(value)
            .build()];
        if let Some(b) = &self.build_id {
            f.push(
                Filter::builder()
                    .name(format!("tag:{BUILD_ID_TAG}"))
                    .values(b)
                    .build(),
            );
        }
        f
    }

    /// Records a finding and, when its bake is over, it is old enough and this is no dry run,
    /// removes it (`remove`: what became of it, see [`remove_or_gone`]). A resource whose bake
    /// may still run is never touched, whatever its age.
    async fn handle<F>(
        &mut self,
        kind: &'static str,
        id: String,
        (created, live): (Option<i64>, marks::BakeLiveness),
        why: String,
        remove: F,
    ) where
        F: std::future::Future<Output = Action>,
    {
        let age = created
            .map(|c| (now() - c).max(0) as u64)
            .unwrap_or(u64::MAX);
        let action = if let marks::BakeLiveness::Running(why) = live {
            Action::KeptRunning(why)
        } else if age < self.older_than.as_secs() {
            Action::KeptTooYoung
        } else if self.dry_run {
            Action::WouldRemove
        } else {
            remove.await
        };
        self.findings.push(Finding {
            kind,
            id,
            age_s: if age == u64::MAX { 0 } else { age },
            why,
            action,
        });
    }

    async fn instances(&mut self) -> Result<(), AwsError> {
        let ec2c = &self.aws.ec2;
        let out = call("ec2:DescribeInstances", "bakery temporaries", || {
            ec2c.describe_instances()
                .set_filters(Some(self.ours(TEMPORARY_TAG, "true")))
                .filters(ec2::in_states(&[
                    "pending", "running", "stopping", "stopped",
                ]))
                .into_paginator()
                .items()
                .send()
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        let found: Vec<(String, i64, BTreeMap<String, String>)> = out
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| {
                (
                    i.instance_id().unwrap_or_default().to_string(),
                    i.launch_time().map(|t| t.secs()).unwrap_or_else(now),
                    tag_map(i.tags()),
                )
            })
            .collect();
        let mut removed = Vec::new();
        for (id, launched, tags) in found {
            let ids = vec![id.clone()];
            let build = tags.get(BUILD_ID_TAG).cloned().unwrap_or_default();
            self.handle(
                "instance",
                id.clone(),
                (Some(launched), liveness(&tags, Some(launched))),
                format!("temporary instance of bake {build}"),
                remove_or_gone(
                    ec2::terminate_instances(ec2c, &ids),
                    instance_gone(ec2c, &id),
                ),
            )
            .await;
            if self
                .findings
                .last()
                .is_some_and(|f| f.action == Action::Removed)
            {
                removed.push(id);
            }
        }
        // Groups can only go once their instances are gone.
        for id in removed {
            let _ = crate::wait::until(
                format!("{id} to terminate"),
                Duration::from_secs(300),
                crate::wait::Poll::API,
                || async {
                    Ok::<_, AwsError>(match ec2::describe_instance(ec2c, &id).await? {
                        Some(i) if i.state != "terminated" => crate::wait::Probe::Pending(i.state),
                        _ => crate::wait::Probe::Ready(()),
                    })
                },
            )
            .await;
        }
        Ok(())
    }

    async fn security_groups(&mut self) -> Result<(), AwsError> {
        let ec2c = &self.aws.ec2;
        let out = call("ec2:DescribeSecurityGroups", "bakery temporaries", || {
            ec2c.describe_security_groups()
                .set_filters(Some(self.ours(TEMPORARY_TAG, "true")))
                .into_paginator()
                .items()
                .send()
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        let found: Vec<(String, BTreeMap<String, String>)> = out
            .iter()
            .map(|g| {
                (
                    g.group_id().unwrap_or_default().to_string(),
                    tag_map(g.tags()),
                )
            })
            .collect();
        for (id, tags) in found {
            let build = tags.get(BUILD_ID_TAG).cloned().unwrap_or_default();
            let created = created_from_tags(&tags);
            self.handle(
                "security group",
                id.clone(),
                (created, liveness(&tags, created)),
                format!("temporary group of bake {build}"),
                remove_or_gone(
                    ec2::delete_security_group(ec2c, &id),
                    security_group_gone(ec2c, &id),
                ),
            )
            .await;
        }
        Ok(())
    }

    async fn key_pairs(&mut self) -> Result<(), AwsError> {
        let ec2c = &self.aws.ec2;
        let out = call("ec2:DescribeKeyPairs", "bakery temporaries", || {
            ec2c.describe_key_pairs()
                .set_filters(Some(self.ours(TEMPORARY_TAG, "true")))
                .send()
        })
        .await?;
        let found: Vec<(String, Option<i64>, BTreeMap<String, String>)> = out
            .key_pairs()
            .iter()
            .map(|k| {
                (
                    k.key_name().unwrap_or_default().to_string(),
                    k.create_time().map(|t| t.secs()),
                    tag_map(k.tags()),
                )
            })
            .collect();
        for (name, created, tags) in found {
            let created = created.or_else(|| created_from_tags(&tags));
            let build = tags.get(BUILD_ID_TAG).cloned().unwrap_or_default();
            self.handle(
                "key pair",
                name.clone(),
                (created, liveness(&tags, created)),
                format!("temporary key of bake {build}"),
                // Deleting a key pair that is gone succeeds: nothing to look at again.
                remove_or_gone(ec2::delete_key_pair(ec2c, &name), async { Ok(false) }),
            )
            .await;
        }
        Ok(())
    }

    /// Images with a build id but no completion tag: their bake never finished.
    async fn images(&mut self) -> Result<(), AwsError> {
        let ec2c = &self.aws.ec2;
        let filters = match &self.build_id {
            Some(b) => vec![Filter::builder()
                .name(format!("tag:{BUILD_ID_TAG}"))
                .values(b)
                .build()],
            None => vec![Filter::builder()
                .name("tag-key")
                .values(BUILD_ID_TAG)
                .build()],
        };
        let out = call("ec2:DescribeImages", "bakery build images", || {
            ec2c.describe_images()
                .owners("self")
                .set_filters(Some(filters.clone()))
                .into_paginator()
                .items()
                .send()
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        let found: Vec<(ec2::ImageInfo, BTreeMap<String, String>)> = out
            .iter()
            .map(|i| (ec2::image_info(i), tag_map(i.tags())))
            .filter(|(_, tags)| !tags.contains_key(COMPLETE_TAG))
            // A promotion's copies carry the build id too; `copies` judges them.
            .filter(|(_, tags)| !tags.contains_key(plan::SOURCE_IMAGE_TAG))
            .collect();
        for (image, tags) in found {
            let created = image
                .creation_date
                .as_deref()
                .and_then(|d| OffsetDateTime::parse(d, &Rfc3339).ok())
                .map(|t| t.unix_timestamp());
            let build = tags.get(BUILD_ID_TAG).cloned().unwrap_or_default();
            let why = format!(
                "image {} ({}) of bake {build}, which never finished",
                image.name, image.state
            );
            if self.in_use.contains(&image.id) {
                self.findings.push(Finding {
                    kind: "image",
                    id: image.id.clone(),
                    age_s: created
                        .map(|c| (now() - c).max(0) as u64)
                        .unwrap_or_default(),
                    why,
                    action: Action::KeptInUse,
                });
                continue;
            }
            let live = liveness(&tags, created);
            self.handle(
                "image",
                image.id.clone(),
                (created, live),
                why,
                remove_or_gone(ec2::delete_image(ec2c, &image), image_gone(ec2c, &image.id)),
            )
            .await;
        }
        Ok(())
    }

    /// A daemon takeover whose owner is dead (a process of this host that no longer exists) or
    /// whose record expired is over at once, whatever `--older-than` says: a group whose
    /// `HealthCheck` nobody tends must not wait. `HealthCheck` is resumed only where the daemon
    /// suspended it ([`takeover::undo`]); a group a person suspended stays suspended.
    async fn takeover(&mut self, g: &autoscaling::Group) {
        let now = now().max(0) as u64;
        let tag = g.tags.get(TAKEOVER_TAG).map(String::as_str);
        let host = crate::host::hostname();
        let Some(undo) = takeover::undo(tag, now, &host, crate::host::pid_alive) else {
            return;
        };
        let since = tag
            .and_then(takeover::Takeover::decode)
            .map(|t| t.lock.since);
        let action = if self.dry_run {
            Action::WouldRemove
        } else {
            let asg = &self.aws.autoscaling;
            let ended = async {
                if undo.resume {
                    autoscaling::resume(asg, &g.name, &[takeover::HEALTH_CHECK]).await?;
                }
                autoscaling::delete_tags(asg, &g.name, &[TAKEOVER_TAG]).await
            };
            // A group deleted since the listing has no takeover left to end.
            remove_or_gone(ended, group_gone(asg, &g.name)).await
        };
        self.findings.push(Finding {
            kind: "daemon takeover",
            id: g.name.clone(),
            age_s: since.map_or(0, |s| now.saturating_sub(s)),
            why: undo.why,
            action,
        });
    }

    /// Rollout locks past their expiry, and daemon takeovers whose owner is gone.
    async fn group_tags(&mut self) -> Result<(), AwsError> {
        let asg = &self.aws.autoscaling;
        let groups = autoscaling::describe_many(
            asg,
            &[],
            &[
                (LOCK_TAG.to_string(), None),
                (TAKEOVER_TAG.to_string(), None),
            ],
        )
        .await?;
        let now = now() as u64;
        for g in groups {
            if let Some(l) = g.tags.get(LOCK_TAG).and_then(|t| Lock::decode(t)) {
                if l.expires <= now {
                    let why = format!(
                        "rollout lock of {} expired (the rollout stays resumable)",
                        l.owner
                    );
                    let name = g.name.clone();
                    self.handle(
                        "rollout lock",
                        g.name.clone(),
                        (Some(l.expires as i64), marks::BakeLiveness::Over),
                        why,
                        remove_or_gone(
                            autoscaling::delete_tags(asg, &name, &[LOCK_TAG]),
                            group_gone(asg, &name),
                        ),
                    )
                    .await;
                }
            }
            self.takeover(&g).await;
        }
        Ok(())
    }
}

/// Finds and (unless `dry_run`) removes what bakery left behind.
pub async fn run(
    aws: &Aws,
    older_than: Duration,
    dry_run: bool,
    build_id: Option<String>,
) -> Result<Vec<Finding>, AwsError> {
    let mut gc = Gc {
        aws,
        older_than,
        dry_run,
        in_use: crate::prune::images_in_use(aws).await?,
        build_id,
        findings: Vec::new(),
    };
    // Instances first: their groups cannot be deleted while they run.
    gc.instances().await?;
    gc.security_groups().await?;
    gc.key_pairs().await?;
    gc.images().await?;
    if gc.build_id.is_none() {
        gc.group_tags().await?;
    }
    Ok(gc.findings)
}

/// A finding and the region it is in (`bakery gc --regions`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RegionFinding {
    pub region: String,
    #[serde(flatten)]
    pub finding: Finding,
}

impl Gc<'_> {
    /// Copies of failed promotions in this region: a copy that ended `failed`, or whose source
    /// image is gone, or that its promotion's record on the source image does not name (rolled
    /// back, an earlier attempt). A copy a promotion records (done, or paused and resumable) is
    /// not touched; nor one in use or younger than `--older-than`.
    async fn copies(&mut self, sources: &mut Sources<'_>) -> Result<(), AwsError> {
        let key = plan::SOURCE_IMAGE_TAG;
        let found = calls::own_images_tagged_key(&self.aws.ec2, key).await?;
        let region = self.aws.region.clone();
        for copy in found {
            if self
                .build_id
                .as_ref()
                .is_some_and(|b| copy.tags.get(BUILD_ID_TAG) != Some(b))
            {
                continue;
            }
            let (Some(source_id), Some(source_region)) =
                (copy.tags.get(key), copy.tags.get(plan::SOURCE_REGION_TAG))
            else {
                continue;
            };
            let source_tags = match sources.image(source_region, source_id).await? {
                SourceSeen::Tags(t) => Some(t),
                SourceSeen::Gone => None,
                // Its source region is out of reach: nothing can be said about the copy.
                SourceSeen::Unknown => continue,
            };
            let Some(why) =
                plan::leftover_copy(&copy.id, &copy.state, &region, source_tags.as_ref())
            else {
                continue;
            };
            let created = copy
                .creation_date
                .as_deref()
                .and_then(|d| OffsetDateTime::parse(d, &Rfc3339).ok())
                .map(|t| t.unix_timestamp());
            let why = format!(
                "copy of {source_id} ({source_region}) by build {}: {why}",
                copy.tags.get(BUILD_ID_TAG).map_or("?", String::as_str)
            );
            if self.in_use.contains(&copy.id) {
                self.findings.push(Finding {
                    kind: "image copy",
                    id: copy.id.clone(),
                    age_s: created.map_or(0, |c| (now() - c).max(0) as u64),
                    why,
                    action: Action::KeptInUse,
                });
                continue;
            }
            let ec2c = &self.aws.ec2;
            self.handle(
                "image copy",
                copy.id.clone(),
                (created, marks::BakeLiveness::Over),
                why,
                remove_or_gone(
                    calls::remove_image(ec2c, &copy, false),
                    image_gone(ec2c, &copy.id),
                ),
            )
            .await;
        }
        Ok(())
    }
}

/// What gc learned of a copy's source image.
enum SourceSeen {
    Tags(BTreeMap<String, String>),
    Gone,
    Unknown,
}

/// The source images of copies, looked up once each, with a client per region.
struct Sources<'a> {
    target: &'a crate::aws::Target,
    clients: BTreeMap<String, Aws>,
    seen: BTreeMap<String, Option<BTreeMap<String, String>>>,
}

impl Sources<'_> {
    async fn image(&mut self, region: &str, id: &str) -> Result<SourceSeen, AwsError> {
        if let Some(seen) = self.seen.get(id) {
            return Ok(seen.clone().map_or(SourceSeen::Gone, SourceSeen::Tags));
        }
        if !self.clients.contains_key(region) {
            let t = crate::aws::Target {
                region: Some(region.to_string()),
                ..self.target.clone()
            };
            match Aws::connect(&t).await {
                Ok(a) => {
                    self.clients.insert(region.to_string(), a);
                }
                Err(e) => {
                    tracing::warn!(region, error = %e, "cannot reach a copy's source region");
                    return Ok(SourceSeen::Unknown);
                }
            }
        }
        let Some(aws) = self.clients.get(region) else {
            return Ok(SourceSeen::Unknown);
        };
        let image = calls::describe(&aws.ec2, id).await?;
        let tags = image.filter(|i| i.state != "deregistered").map(|i| i.tags);
        self.seen.insert(id.to_string(), tags.clone());
        Ok(tags.map_or(SourceSeen::Gone, SourceSeen::Tags))
    }
}

/// [`run`] in every region of `regions` (the home region first), plus the copies of failed
/// promotions in each.
pub async fn run_regions(
    target: &crate::aws::Target,
    regions: &[(String, Aws)],
    older_than: Duration,
    dry_run: bool,
    build_id: Option<String>,
) -> Result<Vec<RegionFinding>, AwsError> {
    let mut sources = Sources {
        target,
        clients: regions.iter().cloned().collect(),
        seen: BTreeMap::new(),
    };
    let mut out = Vec::new();
    for (region, aws) in regions {
        let mut findings = run(aws, older_than, dry_run, build_id.clone()).await?;
        let mut gc = Gc {
            aws,
            older_than,
            dry_run,
            in_use: crate::prune::images_in_use(aws).await?,
            build_id: build_id.clone(),
            findings: Vec::new(),
        };
        gc.copies(&mut sources).await?;
        findings.extend(gc.findings);
        out.extend(findings.into_iter().map(|finding| RegionFinding {
            region: region.clone(),
            finding,
        }));
    }
    Ok(out)
}

/// The human table of [`run_regions`]: a region column when more than one was searched.
pub fn render_regions(findings: &[RegionFinding], regions: usize) -> String {
    if regions <= 1 {
        let plain: Vec<Finding> = findings.iter().map(|f| f.finding.clone()).collect();
        return render(&plain);
    }
    if findings.is_empty() {
        return "nothing left behind\n".into();
    }
    let mut rows = vec![["REGION", "KIND", "ID", "AGE", "ACTION", "WHY"]
        .map(String::from)
        .to_vec()];
    rows.extend(findings.iter().map(|RegionFinding { region, finding: f }| {
        vec![
            region.clone(),
            f.kind.to_string(),
            f.id.clone(),
            humantime::format_duration(Duration::from_secs(f.age_s)).to_string(),
            f.action.to_string(),
            f.why.clone(),
        ]
    }));
    crate::output::table(&rows)
}

/// The human table.
pub fn render(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return "nothing left behind\n".into();
    }
    let mut rows = vec![["KIND", "ID", "AGE", "ACTION", "WHY"]
        .map(String::from)
        .to_vec()];
    rows.extend(findings.iter().map(|f| {
        vec![
            f.kind.to_string(),
            f.id.clone(),
            humantime::format_duration(Duration::from_secs(f.age_s)).to_string(),
            f.action.to_string(),
            f.why.clone(),
        ]
    }));
    crate::output::table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: &str) -> AwsError {
        AwsError {
            action: "ec2:DeregisterImage",
            resource: "ami-1".into(),
            code: Some(code.into()),
            message: format!("{code}: gone"),
            transient: false,
        }
    }

    #[tokio::test]
    async fn a_removal_that_fails_on_a_thing_gone_since_the_listing_is_no_failure() {
        let done = remove_or_gone(async { Ok(()) }, async { panic!("not asked") }).await;
        assert_eq!(done, Action::Removed);
        let gone = remove_or_gone(async { Err(err("InvalidAMIID.Unavailable")) }, async {
            Ok(true)
        })
        .await;
        assert_eq!(gone, Action::AlreadyGone);
        assert!(!gone.failed());
        assert_eq!(gone.to_string(), "already gone");
        // Still there: the removal's own error, not the second look's.
        let there = remove_or_gone(async { Err(err("DependencyViolation")) }, async {
            Ok(false)
        })
        .await;
        assert!(there.failed() && there.to_string().contains("DependencyViolation"));
        let unknown = remove_or_gone(async { Err(err("DependencyViolation")) }, async {
            Err(err("RequestLimitExceeded"))
        })
        .await;
        assert!(
            unknown.to_string().contains("DependencyViolation"),
            "{unknown}"
        );
    }
}
