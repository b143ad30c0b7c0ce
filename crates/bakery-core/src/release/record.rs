//! The release's record: what it changed and where it stands, written before each action (to a
//! file beside the plan, and to the lease table when one is configured), so a rerun after a
//! crash continues where the last run stopped and `--abort` knows everything to undo. And the
//! decisions taken on it: where a rerun resumes ([`next`]), which groups a failure reverts
//! ([`restore_set`]), whether a wave's gates hold ([`alarm_verdict`], [`check_http`]).

use serde::{Deserialize, Serialize};

use super::{HttpGate, OnFailure, Plan};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub release: String,
    pub plan_sha256: String,
    pub on_failure: OnFailure,
    pub state: State,
    /// Why the release is rolling back or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds since the epoch.
    pub started: u64,
    pub updated: u64,
    pub waves: Vec<WaveRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Rolling,
    /// Reverting the groups marked `reverting`; then the release ends as `then`.
    RollingBack {
        then: Ended,
    },
    Done,
    Ended(Ended),
}

/// How a release that did not succeed ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ended {
    /// A wave failed and what `on_failure` names was reverted.
    RolledBack,
    /// A wave failed under `on_failure = "stop"`: groups mid-rollout finished their own
    /// rollback, the rest was left as it was.
    Stopped,
    /// `--abort`: everything the release changed was reverted.
    Aborted,
}

impl State {
    pub fn label(&self) -> &'static str {
        match self {
            State::Rolling => "rolling",
            State::RollingBack { .. } => "rolling back",
            State::Done => "done",
            State::Ended(Ended::RolledBack) => "rolled back",
            State::Ended(Ended::Stopped) => "stopped",
            State::Ended(Ended::Aborted) => "aborted",
        }
    }

    pub fn is_over(&self) -> bool {
        matches!(self, State::Done | State::Ended(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveRecord {
    pub name: String,
    pub state: WaveState,
    pub groups: Vec<GroupRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveState {
    Pending,
    Rolling,
    Baking,
    Passed,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub region: String,
    pub group: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    /// The image the release rolls into this group.
    pub ami: String,
    /// The image the group launched before the release touched it (read before its rollout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_ami: Option<String>,
    pub state: GroupState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl GroupRecord {
    /// `region/group`, as events and tables name it.
    pub fn label(&self) -> String {
        format!("{}/{}", self.region, self.group)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupState {
    Pending,
    /// Its rollout was started (and may be paused mid-way: a rerun resumes it).
    Rolling,
    /// On the new image.
    Done,
    /// Was on the new image already; the release changed nothing in it.
    Unchanged,
    /// Its rollout failed and rolled itself back: on its previous image.
    RolledBack,
    /// Its rollout failed in a way that may have left it changed.
    Failed,
    /// Being put back on its previous image.
    Reverting,
    /// Back on its previous image.
    Reverted,
}

impl GroupState {
    /// Whether the release may have changed the group (so a revert must look at it).
    pub fn touched(self) -> bool {
        matches!(
            self,
            GroupState::Rolling | GroupState::Done | GroupState::Failed | GroupState::Reverting
        )
    }
}

/// A group of the plan, resolved: its region, name, role and the image it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub region: String,
    pub group: String,
    pub role_arn: Option<String>,
    pub ami: String,
}

/// A fresh record for a plan whose waves resolved to these groups (one list per wave).
pub fn new_record(plan: &Plan, waves: Vec<Vec<Resolved>>, now: u64) -> Record {
    Record {
        release: plan.name.clone(),
        plan_sha256: plan.sha256.clone(),
        on_failure: plan.on_failure,
        state: State::Rolling,
        reason: None,
        started: now,
        updated: now,
        waves: plan
            .waves
            .iter()
            .zip(waves)
            .map(|(w, groups)| WaveRecord {
                name: w.name.clone(),
                state: WaveState::Pending,
                groups: groups
                    .into_iter()
                    .map(|r| GroupRecord {
                        region: r.region,
                        group: r.group,
                        role_arn: r.role_arn,
                        ami: r.ami,
                        previous_ami: None,
                        state: GroupState::Pending,
                        detail: None,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// What a run does with an existing record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Roll this wave (its groups not yet `done` or `unchanged`), then the ones after it.
    Wave(usize),
    /// Every wave passed: the release is done once recorded so.
    Finish,
    /// Go on reverting the groups marked `reverting`.
    RollBack,
    /// The release is over (`done`, rolled back, stopped or aborted).
    Over(State),
}

/// Where a run picks the release up.
pub fn next(rec: &Record) -> Next {
    match rec.state {
        State::Rolling => rec
            .waves
            .iter()
            .position(|w| w.state != WaveState::Passed)
            .map(Next::Wave)
            .unwrap_or(Next::Finish),
        State::RollingBack { .. } => Next::RollBack,
        s => Next::Over(s),
    }
}

/// Whether a rerun with this plan may continue the record.
pub fn continues(rec: &Record, plan: &Plan) -> Result<(), String> {
    if rec.plan_sha256 == plan.sha256 || rec.state.is_over() {
        return Ok(());
    }
    Err(format!(
        "release {} is {} with another version of the plan (sha256 {}…, this one {}…): a plan \
         cannot change mid-release. Rerun it with the plan it started with, or add --abort to \
         revert what it changed",
        rec.release,
        rec.state.label(),
        &rec.plan_sha256[..rec.plan_sha256.len().min(12)],
        &plan.sha256[..plan.sha256.len().min(12)],
    ))
}

/// The groups to put back on their previous image when wave `failed` fails under `policy`
/// (`None`: `--abort`, everything), as (wave, group) indices.
pub fn restore_set(rec: &Record, failed: Option<usize>, policy: OnFailure) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (wi, w) in rec.waves.iter().enumerate() {
        let take_wave = match (failed, policy) {
            (None, _) => true,
            (Some(f), OnFailure::RollbackAll) => wi <= f,
            (Some(f), OnFailure::RollbackWave | OnFailure::Stop) => wi == f,
        };
        if !take_wave {
            continue;
        }
        for (gi, g) in w.groups.iter().enumerate() {
            let take = match (failed, policy) {
                // Under `stop`, only a group left mid-rollout (or unknown) finishes its rollback.
                (Some(_), OnFailure::Stop) => {
                    matches!(
                        g.state,
                        GroupState::Rolling | GroupState::Failed | GroupState::Reverting
                    )
                }
                _ => g.state.touched(),
            };
            if take {
                out.push((wi, gi));
            }
        }
    }
    out
}

/// Marks a failure in the record, written before any revert: the failed wave, the reason, the
/// groups to revert (`reverting`), and how the release will have ended.
pub fn begin_rollback(rec: &mut Record, failed: Option<usize>, reason: &str, now: u64) {
    let then = match (failed, rec.on_failure) {
        (None, _) => Ended::Aborted,
        (Some(_), OnFailure::Stop) => Ended::Stopped,
        (Some(_), _) => Ended::RolledBack,
    };
    if let Some(f) = failed {
        if let Some(w) = rec.waves.get_mut(f) {
            w.state = WaveState::Failed;
        }
    }
    for (wi, gi) in restore_set(rec, failed, rec.on_failure) {
        rec.waves[wi].groups[gi].state = GroupState::Reverting;
    }
    rec.state = State::RollingBack { then };
    rec.reason = Some(reason.to_string());
    rec.updated = now;
}

/// Once no group is `reverting`: how the release ended.
pub fn end_rollback(rec: &mut Record, now: u64) -> Option<Ended> {
    let State::RollingBack { then } = rec.state else {
        return None;
    };
    let pending = rec
        .waves
        .iter()
        .flat_map(|w| &w.groups)
        .any(|g| g.state == GroupState::Reverting);
    if pending {
        return None;
    }
    rec.state = State::Ended(then);
    rec.updated = now;
    Some(then)
}

/// How a group's revert is done, from what is observed of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revert {
    /// A rollout is in progress on it (the release's, paused): abort it, which rolls back its
    /// batches and puts the group on its previous version.
    Abort,
    /// Its rollout finished on the new image: roll the previous image in.
    RollTo(String),
    /// It launches its previous image already (or never left it).
    Nothing,
}

/// Decides a group's revert: `in_progress` is whether its tags hold a rollout's state,
/// `launching` the image its launch template version launches now.
pub fn revert(g: &GroupRecord, in_progress: bool, launching: Option<&str>) -> Revert {
    if in_progress {
        return Revert::Abort;
    }
    match (&g.previous_ami, launching) {
        (Some(prev), Some(now)) if prev != now => Revert::RollTo(prev.clone()),
        // Never recorded: the release never got as far as changing the group.
        _ => Revert::Nothing,
    }
}

/// An alarm's state as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmReading {
    pub region: String,
    pub name: String,
    /// `OK`, `ALARM` or `INSUFFICIENT_DATA`.
    pub state: String,
    pub reason: Option<String>,
}

/// Whether the alarms hold: the first in `ALARM` halts the wave. `INSUFFICIENT_DATA` (an alarm
/// with no data yet, e.g. just created) does not.
pub fn alarm_verdict(readings: &[AlarmReading]) -> Result<(), String> {
    match readings.iter().find(|a| a.state == "ALARM") {
        None => Ok(()),
        Some(a) => Err(format!(
            "alarm {} in {} is in ALARM{}",
            a.name,
            a.region,
            a.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )),
    }
}

/// Whether one instance's answer passes the HTTP gate.
pub fn check_http(gate: &HttpGate, status: u16, body: &str) -> Result<(), String> {
    if status != gate.expect_status {
        return Err(format!(
            "GET {} answered {status}, expected {}",
            gate.path, gate.expect_status
        ));
    }
    match &gate.expect_body {
        Some(want) if !body.contains(want.as_str()) => {
            let shown: String = body.chars().take(80).collect();
            Err(format!(
                "GET {} answered {status} without {want:?} in its body (it began {shown:?})",
                gate.path
            ))
        }
        _ => Ok(()),
    }
}
