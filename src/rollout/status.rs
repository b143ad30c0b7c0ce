//! `bakery status --asg NAME`: the group as an operator needs it during a release: the launch
//! template version in use, each instance with its AMI, lifecycle, group health and target
//! health, and any rollout in progress with who drives it.

use serde::Serialize;

use super::state::{self, Lock, ProgressTag, RolloutState, LOCK_TAG, PROGRESS_TAG, STATE_TAG};
use super::RolloutError;
use crate::aws::{autoscaling, ec2, elbv2, launch_template as lt, Aws};

#[derive(Debug, Serialize)]
pub struct InstanceRow {
    pub id: String,
    pub ami: String,
    pub launch_template_version: Option<String>,
    pub availability_zone: String,
    pub lifecycle: String,
    pub health: String,
    /// Target health per target group, e.g. `healthy`, `unhealthy (Target.Timeout)`.
    pub target_health: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct RolloutRow {
    pub rollout_id: String,
    pub ami: String,
    pub phase: String,
    pub batch: u32,
    pub from_version: String,
    pub to_version: String,
    pub started: String,
    pub lock_owner: Option<String>,
    pub lock_expires: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub group: String,
    pub launch_template: Option<String>,
    pub version: Option<String>,
    pub version_number: Option<i64>,
    pub version_ami: Option<String>,
    pub desired: u32,
    pub min: u32,
    pub max: u32,
    pub health_check_type: String,
    pub suspended_processes: Vec<String>,
    pub target_groups: Vec<String>,
    pub instances: Vec<InstanceRow>,
    pub rollout: Option<RolloutRow>,
}

pub async fn status(aws: &Aws, group_name: &str) -> Result<Status, RolloutError> {
    let g = autoscaling::describe(&aws.autoscaling, group_name)
        .await?
        .ok_or_else(|| RolloutError::GroupNotFound(group_name.to_string()))?;
    let template_id = match &g.launch_template {
        Some(_) => super::template_of(aws, &g).await.ok(),
        None => None,
    };
    let version_name = g.launch_template.as_ref().and_then(|l| l.version.clone());
    let version = match (&template_id, &version_name) {
        (Some(id), Some(v)) => lt::describe(&aws.ec2, id, v).await?,
        (Some(id), None) => lt::describe(&aws.ec2, id, "$Default").await?,
        _ => None,
    };
    let ids: Vec<String> = g.instances.iter().map(|i| i.id.clone()).collect();
    let images = ec2::images_of(&aws.ec2, &ids).await?;
    let mut health = Vec::new();
    for tg in &g.target_group_arns {
        health.push(elbv2::target_health(&aws.elb, tg).await?);
    }
    let instances = g
        .instances
        .iter()
        .map(|i| InstanceRow {
            id: i.id.clone(),
            ami: images
                .get(&i.id)
                .map(|(a, _)| a.clone())
                .unwrap_or_default(),
            launch_template_version: i.launch_template_version.clone(),
            availability_zone: i.availability_zone.clone(),
            lifecycle: i.lifecycle.clone(),
            health: i.health.clone(),
            target_health: health
                .iter()
                .map(|tg| match tg.get(&i.id) {
                    None => "not registered".to_string(),
                    Some(t) => match &t.reason {
                        Some(r) => format!("{} ({r})", t.state),
                        None => t.state.clone(),
                    },
                })
                .collect(),
        })
        .collect();
    let rollout = rollout_row(&g.tags);
    Ok(Status {
        group: g.name.clone(),
        launch_template: template_id,
        version: version_name,
        version_number: version.as_ref().map(|v| v.number),
        version_ami: version.and_then(|v| v.image_id),
        desired: g.desired,
        min: g.min,
        max: g.max,
        health_check_type: g.health_check_type.clone(),
        suspended_processes: g.suspended.clone(),
        target_groups: g.target_group_arns.clone(),
        instances,
        rollout,
    })
}

/// The rollout in progress, from the group's tags.
fn rollout_row(tags: &std::collections::BTreeMap<String, String>) -> Option<RolloutRow> {
    let st = tags
        .get(STATE_TAG)
        .and_then(|s| state::decode::<RolloutState>(s))?;
    let progress: Option<ProgressTag> = tags.get(PROGRESS_TAG).and_then(|s| state::decode(s));
    let lock = tags.get(LOCK_TAG).and_then(|s| Lock::decode(s));
    Some(RolloutRow {
        rollout_id: st.id,
        ami: st.ami,
        phase: match progress.as_ref().map(|p| p.ph) {
            Some(state::Phase::RollingBack) => "rolling back".into(),
            _ => "rolling".into(),
        },
        batch: progress.map(|p| p.b).unwrap_or_default(),
        from_version: st.from,
        to_version: st.to,
        started: super::rfc3339(st.t),
        lock_owner: lock.as_ref().map(|l| l.owner.clone()),
        lock_expires: lock.map(|l| super::rfc3339(l.expires)),
    })
}

/// The human form: a header and an aligned table.
pub fn render(s: &Status) -> String {
    let mut out = format!(
        "group {}  desired {} (min {}, max {})  health check {}\n",
        s.group, s.desired, s.min, s.max, s.health_check_type
    );
    out.push_str(&format!(
        "launch template {} version {} (#{}) -> {}\n",
        s.launch_template.as_deref().unwrap_or("-"),
        s.version.as_deref().unwrap_or("$Default"),
        s.version_number
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into()),
        s.version_ami.as_deref().unwrap_or("-"),
    ));
    if !s.suspended_processes.is_empty() {
        out.push_str(&format!(
            "suspended processes: {}\n",
            s.suspended_processes.join(", ")
        ));
    }
    match &s.rollout {
        Some(r) => out.push_str(&format!(
            "rollout {} of {} in progress: {}, batch {}, version {} -> {}, started {}, driven by {} (lock expires {})\n",
            r.rollout_id,
            r.ami,
            r.phase,
            r.batch,
            r.from_version,
            r.to_version,
            r.started,
            r.lock_owner.as_deref().unwrap_or("nobody (paused)"),
            r.lock_expires.as_deref().unwrap_or("-"),
        )),
        None => out.push_str("no rollout in progress\n"),
    }
    let mut rows = vec![[
        "INSTANCE",
        "AMI",
        "VERSION",
        "LIFECYCLE",
        "HEALTH",
        "TARGET HEALTH",
    ]
    .map(String::from)
    .to_vec()];
    rows.extend(s.instances.iter().map(|i| {
        vec![
            i.id.clone(),
            i.ami.clone(),
            i.launch_template_version
                .clone()
                .unwrap_or_else(|| "-".into()),
            i.lifecycle.clone(),
            i.health.clone(),
            if i.target_health.is_empty() {
                "-".into()
            } else {
                i.target_health.join(", ")
            },
        ]
    }));
    out.push_str(&crate::output::table(&rows));
    out
}
