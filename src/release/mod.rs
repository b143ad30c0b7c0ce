//! The release planner's driver, `bakery release PLAN.toml`: one image rolled over many groups
//! in waves, each group by the rollout engine (so every wave has its batches, health gating,
//! automatic rollback and in-group options), each wave gated on alarms and an HTTP check, and
//! a failure reverting what the plan's `on_failure` names.
//!
//! Every change is written to the release's record before it is made ([`store`]): a rerun
//! continues where the last run stopped (a group's rollout resumes from its tags), `--abort`
//! reverts everything, `--status` shows it. The plan and the record's decisions are
//! `bakery_core::release`; this loop observes, decides and acts.

pub mod observe;
pub mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bakery_core::diag::FileError;
use bakery_core::release::record::{
    self, begin_rollback, end_rollback, next, restore_set, Ended, GroupState, Next, Record,
    Resolved, Revert, WaveState,
};
use bakery_core::release::{OnFailure, Plan, Wave};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::aws::{Aws, Target};
use crate::output::{Event, Reporter};
use crate::rollout::{self, AmiSource, RolloutError};
use crate::signals::{halting, Signal, Signals};
use observe::Clients;
use store::Store;

/// `bakery release`'s options.
#[derive(Debug, Clone)]
pub struct Options {
    pub plan: PathBuf,
    pub status: bool,
    pub abort: bool,
    pub dry_run: bool,
    /// Start the plan again as a new release, replacing the record of one that ended.
    pub restart: bool,
    pub lock_ttl: Duration,
    pub lease_table: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Plan(#[from] FileError),
    #[error("{}", .0.join("\n"))]
    BadInput(Vec<String>),
    #[error("{0}")]
    Conflict(String),
    #[error("release {release} {ended}: {reason}; see `bakery release --status {plan}`")]
    Ended {
        release: String,
        ended: &'static str,
        reason: String,
        plan: String,
    },
    #[error("interrupted by {0}; the release is paused: rerun the same command to resume it, or add --abort to revert it")]
    Interrupted(Signal),
    #[error("{0}")]
    Failed(String),
}

impl ReleaseError {
    /// As `bakery rollout`'s: 2 bad input, 6 rolled back or stopped, 7 locked by another
    /// driver, 130/143 interrupted, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ReleaseError::Plan(_) | ReleaseError::BadInput(_) => 2,
            ReleaseError::Ended { .. } => 6,
            ReleaseError::Conflict(_) => 7,
            ReleaseError::Interrupted(sig) => sig.exit_code(),
            ReleaseError::Failed(_) => 1,
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Runs (or resumes, reverts, shows, plans) the release; `Ok` with how it ended.
pub async fn run(
    target: &Target,
    opts: &Options,
    reporter: &Reporter,
) -> Result<String, ReleaseError> {
    let started = Instant::now();
    let plan = bakery_core::release::load(&opts.plan)?;
    let home = Aws::connect(target)
        .await
        .map_err(|e| ReleaseError::BadInput(vec![e.to_string()]))?;
    let table = opts.lease_table.clone().map(|t| (home.clone(), t));
    if let Some((aws, t)) = &table {
        crate::lease::Store::open(aws, t)
            .await
            .map_err(|e| ReleaseError::BadInput(vec![e.to_string()]))?;
    }
    let store = Store::new(&opts.plan, &plan.name, table);
    if opts.status {
        let existing = store.read().await.map_err(ReleaseError::Failed)?;
        return status(&plan, existing, reporter);
    }
    // Held until this run ends; read the record only once it is this run's to write.
    let _driving = match opts.dry_run {
        true => None,
        false => Some(store.lock().map_err(ReleaseError::Conflict)?),
    };
    let existing = store.read().await.map_err(ReleaseError::Failed)?;
    let (clients, unreachable) = observe::connect(&home, &plan).await;
    let (rec, resumed) = match existing {
        Some(rec) if opts.restart && !rec.state.is_over() => {
            return Err(ReleaseError::Conflict(format!(
                "release {} is {}: --restart starts an ended release again; resume this one \
                 (rerun without --restart) or revert it with --abort",
                rec.release,
                rec.state.label()
            )))
        }
        // An ended release is rerun as such (it reports how it ended) unless asked to start
        // again, or its plan changed (a new release).
        Some(rec)
            if opts.abort
                || !rec.state.is_over()
                || (!opts.restart && rec.plan_sha256 == plan.sha256) =>
        {
            if !unreachable.is_empty() {
                return Err(ReleaseError::BadInput(unreachable));
            }
            if !opts.abort {
                record::continues(&rec, &plan).map_err(ReleaseError::Conflict)?;
            }
            (rec, true)
        }
        None if opts.abort => {
            return Err(ReleaseError::BadInput(vec![format!(
                "release {} has no record ({}): there is nothing to abort",
                plan.name,
                store.file().display()
            )]))
        }
        _ => (resolve(&plan, &clients, unreachable).await?, false),
    };
    if opts.dry_run {
        return dry_run(&plan, &rec, &clients, opts, reporter).await;
    }
    let lease = take_lease(&home, &plan, opts).await?;
    let mut driver = Driver {
        plan: &plan,
        opts,
        clients: &clients,
        store: &store,
        reporter,
        rec,
    };
    let result = driver.drive(resumed, started).await;
    if let Some(keeper) = lease {
        keeper.release().await;
    }
    result
}

/// With a lease table, the release itself is fenced: one driver per release name.
async fn take_lease(
    home: &Aws,
    plan: &Plan,
    opts: &Options,
) -> Result<Option<crate::lease::Keeper>, ReleaseError> {
    let Some(table) = &opts.lease_table else {
        return Ok(None);
    };
    let store = crate::lease::Store::open(home, table)
        .await
        .map_err(|e| ReleaseError::Failed(e.to_string()))?;
    let timing = bakery_core::lease::Timing::for_ttl(opts.lock_ttl);
    match store
        .acquire(&format!("release#{}", plan.name), &crate::host::owner(), timing)
        .await
    {
        Ok(k) => Ok(Some(k)),
        Err(crate::lease::LeaseError::Held { holder }) => Err(ReleaseError::Conflict(format!(
            "release {} is being driven by {} (lease table {table}, fencing token {}); wait for it, \
             or rerun once its lease has expired",
            plan.name, holder.owner, holder.token
        ))),
        Err(e) => Err(ReleaseError::Failed(e.to_string())),
    }
}

/// Resolves every target to its groups and every region to its image, and checks every alarm
/// exists: all problems at once, before any change.
async fn resolve(
    plan: &Plan,
    clients: &Clients,
    mut problems: Vec<String>,
) -> Result<Record, ReleaseError> {
    let at =
        |a: bakery_core::release::At| format!("{}:{}:{}", plan.file.display(), a.line, a.column);
    let mut images: BTreeMap<String, String> = BTreeMap::new();
    let mut waves = Vec::new();
    for wave in &plan.waves {
        let mut groups = Vec::new();
        for t in &wave.targets {
            // A target whose role could not be assumed has its problem listed already.
            let Some(aws) = clients.get(&(t.region.clone(), t.role_arn.clone())) else {
                continue;
            };
            if !images.contains_key(&t.region) {
                match observe::image_for(plan, aws, &t.region).await {
                    Ok(id) => {
                        images.insert(t.region.clone(), id);
                    }
                    Err(e) => problems.push(format!("{}: {e}", at(t.at))),
                }
            }
            match observe::groups_of(aws, t).await {
                Ok(names) => groups.extend(names.into_iter().map(|g| Resolved {
                    region: t.region.clone(),
                    group: g,
                    role_arn: t.role_arn.clone(),
                    ami: String::new(),
                })),
                Err(e) => problems.push(format!("{}: {e}", at(t.at))),
            }
        }
        for (name, a) in &wave.gates.alarms {
            let mut found = false;
            let mut regions = Vec::new();
            for aws in wave_clients(wave, clients) {
                regions.push(aws.region.clone());
                match observe::alarms(aws, std::slice::from_ref(name)).await {
                    Ok(r) if !r.is_empty() => found = true,
                    Ok(_) => {}
                    Err(e) => problems.push(format!("{}: {e}", at(*a))),
                }
            }
            if !found {
                problems.push(format!(
                    "{}: alarm {name} does not exist in {} (the regions of wave {:?}); create it, or fix its name",
                    at(*a),
                    regions.join(", "),
                    wave.name
                ));
            }
        }
        waves.push(groups);
    }
    if !problems.is_empty() {
        problems.insert(0, format!("{}: nothing was changed:", plan.file.display()));
        return Err(ReleaseError::BadInput(problems));
    }
    for g in waves.iter_mut().flatten() {
        g.ami = images.get(&g.region).cloned().unwrap_or_default();
    }
    Ok(record::new_record(plan, waves, now()))
}

/// The distinct clients of a wave's targets.
fn wave_clients<'a>(wave: &Wave, clients: &'a Clients) -> Vec<&'a Aws> {
    let mut keys: Vec<(String, Option<String>)> = wave
        .targets
        .iter()
        .map(|t| (t.region.clone(), t.role_arn.clone()))
        .collect();
    keys.dedup();
    keys.iter().filter_map(|k| clients.get(k)).collect()
}

fn client<'a>(clients: &'a Clients, g: &record::GroupRecord) -> &'a Aws {
    &clients[&(g.region.clone(), g.role_arn.clone())]
}

/// A rollout request for one group of a wave, with the wave's settings over the CLI defaults.
fn request(
    wave: &Wave,
    opts: &Options,
    group: &str,
    ami: Option<AmiSource>,
    abort: bool,
) -> rollout::Request {
    let r = &wave.rollout;
    rollout::Request {
        group: group.to_string(),
        ami,
        max_surge: r.max_surge.unwrap_or(rollout::plan::Amount::Percent(25)),
        max_unavailable: r.max_unavailable.unwrap_or(rollout::plan::Amount::Count(0)),
        canary: r.canary.unwrap_or(1),
        canary_bake: r.canary_bake.unwrap_or(Duration::ZERO),
        health_timeout: r.health_timeout.unwrap_or(Duration::from_secs(600)),
        warmup: r.warmup.unwrap_or(Duration::ZERO),
        rollback: true,
        dry_run: opts.dry_run,
        abort,
        force: false,
        keep_versions: 10,
        lock_ttl: opts.lock_ttl,
        lease_table: opts.lease_table.clone(),
        in_group: rollout::InGroup::default(),
    }
}

fn status(plan: &Plan, rec: Option<Record>, reporter: &Reporter) -> Result<String, ReleaseError> {
    let Some(rec) = rec else {
        return Err(ReleaseError::BadInput(vec![format!(
            "release {} has not started (no record beside {})",
            plan.name,
            plan.file.display()
        )]));
    };
    let label = rec.state.label().to_string();
    reporter.result(
        Event::ReleaseStatus {
            record: serde_json::to_value(&rec).unwrap_or_default(),
        },
        || render_status(&rec),
    );
    Ok(label)
}

fn render_status(rec: &Record) -> String {
    let mut out = format!(
        "release {}: {}{} (on failure {})\n",
        rec.release,
        rec.state.label(),
        rec.reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default(),
        rec.on_failure.as_str()
    );
    let mut rows = vec![[
        "WAVE",
        "WAVE STATE",
        "GROUP",
        "GROUP STATE",
        "IMAGE",
        "PREVIOUS",
    ]
    .map(String::from)
    .to_vec()];
    for w in &rec.waves {
        for g in &w.groups {
            rows.push(vec![
                w.name.clone(),
                format!("{:?}", w.state).to_lowercase(),
                g.label(),
                format!("{:?}", g.state).to_lowercase(),
                g.ami.clone(),
                g.previous_ami.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
    }
    out.push_str(&crate::output::table(&rows));
    out
}

/// `--dry-run`: the resolved waves, and each group's batches from the rollout's own planner.
async fn dry_run(
    plan: &Plan,
    rec: &Record,
    clients: &Clients,
    opts: &Options,
    reporter: &Reporter,
) -> Result<String, ReleaseError> {
    reporter.emit(release_started(plan, rec, false));
    for (wave, wr) in plan.waves.iter().zip(&rec.waves) {
        reporter.emit(Event::WaveStarted {
            wave: wave.name.clone(),
            groups: wr.groups.iter().map(|g| g.label()).collect(),
        });
        for g in &wr.groups {
            let scoped = scope(reporter, &wave.name, g);
            let req = request(
                wave,
                opts,
                &g.group,
                Some(AmiSource::Id(g.ami.clone())),
                false,
            );
            rollout::run(client(clients, g), &req, &scoped)
                .await
                .map_err(|e| ReleaseError::Failed(format!("{}: {e}", g.label())))?;
        }
    }
    reporter.emit(Event::ReleaseFinished {
        release: plan.name.clone(),
        result: "planned".into(),
        duration_s: 0.0,
    });
    Ok("planned".into())
}

fn release_started(plan: &Plan, rec: &Record, resumed: bool) -> Event {
    Event::ReleaseStarted {
        release: plan.name.clone(),
        resumed,
        on_failure: plan.on_failure.as_str().into(),
        waves: serde_json::Value::Array(
            rec.waves
                .iter()
                .map(|w| {
                    serde_json::json!({
                        "name": w.name,
                        "groups": w.groups.iter().map(|g| serde_json::json!({
                            "region": g.region, "group": g.group, "ami": g.ami,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        ),
    }
}

fn scope(reporter: &Reporter, wave: &str, g: &record::GroupRecord) -> Reporter {
    reporter.scoped(
        &[("wave", wave), ("region", &g.region), ("group", &g.group)],
        &g.label(),
    )
}

/// How a wave ended, when it did not pass.
enum Halt {
    /// A group or a gate failed: the release reverts per `on_failure`.
    Failed(String),
    /// SIGINT/SIGTERM: the release pauses.
    Interrupted(Signal),
}

/// What one group's rollout task returns.
type GroupResult = (usize, Result<rollout::Summary, RolloutError>);

struct Driver<'a> {
    plan: &'a Plan,
    opts: &'a Options,
    clients: &'a Clients,
    store: &'a Store,
    reporter: &'a Reporter,
    rec: Record,
}

impl Driver<'_> {
    async fn save(&mut self) -> Result<(), ReleaseError> {
        self.rec.updated = now();
        self.store
            .write(&self.rec)
            .await
            .map_err(ReleaseError::Failed)
    }

    /// Takes the release from its record to its end, one decision at a time.
    async fn drive(&mut self, resumed: bool, started: Instant) -> Result<String, ReleaseError> {
        if self.opts.abort && !matches!(next(&self.rec), Next::RollBack) {
            begin_rollback(&mut self.rec, None, "aborted (--abort)", now());
        }
        self.save().await?;
        self.reporter
            .emit(release_started(self.plan, &self.rec, resumed));
        loop {
            match next(&self.rec) {
                Next::Wave(i) => match self.wave(i).await {
                    Ok(()) => {
                        self.rec.waves[i].state = WaveState::Passed;
                        self.save().await?;
                        self.reporter.emit(Event::WaveFinished {
                            wave: self.rec.waves[i].name.clone(),
                            result: "passed".into(),
                        });
                    }
                    Err(Halt::Interrupted(sig)) => {
                        self.save().await?;
                        return Err(ReleaseError::Interrupted(sig));
                    }
                    Err(Halt::Failed(reason)) => {
                        self.reporter.emit(Event::WaveFinished {
                            wave: self.rec.waves[i].name.clone(),
                            result: "failed".into(),
                        });
                        begin_rollback(&mut self.rec, Some(i), &reason, now());
                        self.save().await?;
                    }
                },
                Next::Finish => {
                    self.rec.state = record::State::Done;
                    self.save().await?;
                    return Ok(self.finished("done", started));
                }
                Next::RollBack => self.roll_back().await?,
                Next::Over(record::State::Ended(ended)) => {
                    let reason = self.rec.reason.clone().unwrap_or_default();
                    let label = self.rec.state.label();
                    self.finished(label, started);
                    return match ended {
                        Ended::Aborted => Ok(label.to_string()),
                        _ => Err(ReleaseError::Ended {
                            release: self.rec.release.clone(),
                            ended: label,
                            reason,
                            plan: self.opts.plan.display().to_string(),
                        }),
                    };
                }
                Next::Over(s) => return Ok(self.finished(s.label(), started)),
            }
        }
    }

    fn finished(&self, result: &str, started: Instant) -> String {
        self.reporter.emit(Event::ReleaseFinished {
            release: self.rec.release.clone(),
            result: result.into(),
            duration_s: started.elapsed().as_secs_f64(),
        });
        result.to_string()
    }

    /// Rolls one wave: its groups (at most `max_parallel` at once) while its alarms are
    /// watched, then its HTTP gate, then its bake. The first failure halts the other groups'
    /// rollouts (they pause, as on SIGINT, and are reverted as `on_failure` says).
    async fn wave(&mut self, wi: usize) -> Result<(), Halt> {
        let wave = &self.plan.waves[wi];
        if self.rec.waves[wi].state == WaveState::Pending {
            self.rec.waves[wi].state = WaveState::Rolling;
        }
        self.save().await.map_err(|e| Halt::Failed(e.to_string()))?;
        self.reporter.emit(Event::WaveStarted {
            wave: wave.name.clone(),
            groups: self.rec.waves[wi]
                .groups
                .iter()
                .map(|g| g.label())
                .collect(),
        });
        let mut queue: Vec<usize> = (0..self.rec.waves[wi].groups.len())
            .filter(|&gi| {
                !matches!(
                    self.rec.waves[wi].groups[gi].state,
                    GroupState::Done | GroupState::Unchanged
                )
            })
            .rev()
            .collect();
        let halt = CancellationToken::new();
        let mut running: JoinSet<GroupResult> = JoinSet::new();
        let mut failure: Option<String> = None;
        let mut interrupted: Option<Signal> = None;
        let mut signals = Signals::new();
        let mut tick = tokio::time::interval(observe::ALARM_EVERY);
        loop {
            while running.len() < wave.max_parallel && failure.is_none() && interrupted.is_none() {
                let Some(gi) = queue.pop() else { break };
                if let Err(e) = self.start_group(wi, gi, &halt, &mut running).await {
                    failure = Some(e);
                    halt.cancel();
                }
            }
            if running.is_empty() {
                break;
            }
            tokio::select! {
                Some(joined) = running.join_next() => {
                    let outcome = match joined {
                        Ok((gi, r)) => self.group_done(wi, gi, r).await,
                        Err(e) => Err(format!("a rollout task ended abnormally: {e}")),
                    };
                    if let Err(reason) = outcome {
                        failure.get_or_insert(reason);
                        halt.cancel();
                    }
                }
                _ = tick.tick(), if failure.is_none() => {
                    if let Err(reason) = self.alarms(wi).await {
                        failure = Some(reason);
                        halt.cancel();
                    }
                }
                sig = signals.next(), if interrupted.is_none() => {
                    interrupted = Some(sig);
                    halt.cancel();
                }
            }
        }
        self.save().await.map_err(|e| Halt::Failed(e.to_string()))?;
        if let Some(sig) = interrupted {
            return Err(Halt::Interrupted(sig));
        }
        if let Some(reason) = failure {
            return Err(Halt::Failed(reason));
        }
        self.http_gate(wi).await.map_err(Halt::Failed)?;
        self.bake(wi).await
    }

    /// Records the group's previous image and that its rollout starts (before it does), then
    /// starts it.
    async fn start_group(
        &mut self,
        wi: usize,
        gi: usize,
        halt: &CancellationToken,
        running: &mut JoinSet<GroupResult>,
    ) -> Result<(), String> {
        let wave = &self.plan.waves[wi];
        let g = &self.rec.waves[wi].groups[gi];
        let aws = client(self.clients, g).clone();
        if g.previous_ami.is_none() {
            let now = observe::group_now(&aws, &g.group).await?;
            if now.in_progress {
                // A rollout this release did not start (the record has no previous image).
                return Err(format!(
                    "{} has a rollout in progress that this release did not start; finish or abort it \
                     (bakery rollout --asg {} --abort --region {}), then rerun",
                    g.label(),
                    g.group,
                    g.region
                ));
            }
            self.rec.waves[wi].groups[gi].previous_ami = now.launching;
        }
        self.rec.waves[wi].groups[gi].state = GroupState::Rolling;
        self.save().await.map_err(|e| e.to_string())?;
        let g = &self.rec.waves[wi].groups[gi];
        self.reporter.emit(Event::GroupStarted {
            wave: wave.name.clone(),
            group: g.label(),
            ami: g.ami.clone(),
            previous_ami: g.previous_ami.clone().unwrap_or_else(|| "-".into()),
        });
        let req = request(
            wave,
            self.opts,
            &g.group,
            Some(AmiSource::Id(g.ami.clone())),
            false,
        );
        let reporter = scope(self.reporter, &wave.name, g);
        let token = halt.clone();
        running.spawn(async move {
            let r = aws
                .scope(halting(
                    token,
                    Box::pin(rollout::run(&aws, &req, &reporter)),
                ))
                .await;
            (gi, r)
        });
        Ok(())
    }

    /// Records a group's rollout result; `Err` with the reason when it fails the wave.
    async fn group_done(
        &mut self,
        wi: usize,
        gi: usize,
        r: Result<rollout::Summary, RolloutError>,
    ) -> Result<(), String> {
        let label = self.rec.waves[wi].groups[gi].label();
        let (state, result, failure) = match &r {
            Ok(s) if s.changed => (GroupState::Done, "rolled_out", None),
            Ok(_) => (GroupState::Unchanged, "unchanged", None),
            Err(RolloutError::Interrupted(_)) => (GroupState::Rolling, "halted", None),
            Err(RolloutError::RolledBack { reason, .. }) => (
                GroupState::RolledBack,
                "rolled_back",
                Some(format!("{label} rolled back: {reason}")),
            ),
            Err(e @ (RolloutError::Locked { .. } | RolloutError::OtherRollout { .. })) => (
                GroupState::Pending,
                "refused",
                Some(format!("{label}: {e}")),
            ),
            Err(e) => (GroupState::Failed, "failed", Some(format!("{label}: {e}"))),
        };
        let g = &mut self.rec.waves[wi].groups[gi];
        g.state = state;
        g.detail = r.as_ref().err().map(|e| e.to_string());
        self.save().await.map_err(|e| e.to_string())?;
        self.reporter.emit(Event::GroupFinished {
            wave: self.rec.waves[wi].name.clone(),
            group: label,
            result: result.into(),
            detail: self.rec.waves[wi].groups[gi].detail.clone(),
        });
        match failure {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    /// The wave's alarms, in every region of its targets: `Err` naming the first in ALARM.
    async fn alarms(&self, wi: usize) -> Result<(), String> {
        let wave = &self.plan.waves[wi];
        if wave.gates.alarms.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = wave.gates.alarms.iter().map(|(n, _)| n.clone()).collect();
        let mut readings = Vec::new();
        for aws in wave_clients(wave, self.clients) {
            match observe::alarms(aws, &names).await {
                Ok(r) => readings.extend(r),
                // An unreadable alarm is not a failing one: the next look reads it again.
                Err(e) => tracing::warn!(error = %e, "could not read the wave's alarms"),
            }
        }
        let verdict = record::alarm_verdict(&readings);
        if let Err(reason) = &verdict {
            self.reporter.emit(Event::Gate {
                wave: wave.name.clone(),
                gate: "alarms".into(),
                result: "failed".into(),
                detail: reason.clone(),
            });
        }
        verdict
    }

    /// The HTTP gate: every instance of the wave's groups on the new image answers as the
    /// plan expects.
    async fn http_gate(&self, wi: usize) -> Result<(), String> {
        let wave = &self.plan.waves[wi];
        let Some(gate) = &wave.gates.http else {
            return Ok(());
        };
        let mut checked = 0;
        for g in &self.rec.waves[wi].groups {
            let aws = client(self.clients, g);
            let now = observe::group_now(aws, &g.group).await?;
            let port = match gate.port {
                Some(p) => p,
                None => observe::traffic_port(aws, &now.target_groups)
                    .await?
                    .ok_or_else(|| {
                        format!(
                            "{}: the http gate has no port and the group has no target group; set gates.http.port",
                            g.label()
                        )
                    })?,
            };
            for (id, ip) in observe::new_instances(aws, &now.instances, &g.ami).await? {
                let answer = observe::http_get(ip, port, gate).await;
                let verdict =
                    answer.and_then(|(status, body)| record::check_http(gate, status, &body));
                if let Err(e) = verdict {
                    let detail = format!("{} {id}: {e}", g.label());
                    self.reporter.emit(Event::Gate {
                        wave: wave.name.clone(),
                        gate: "http".into(),
                        result: "failed".into(),
                        detail: detail.clone(),
                    });
                    return Err(detail);
                }
                checked += 1;
            }
        }
        self.reporter.emit(Event::Gate {
            wave: wave.name.clone(),
            gate: "http".into(),
            result: "passed".into(),
            detail: format!(
                "{checked} new instance(s) answered GET {} as expected",
                gate.path
            ),
        });
        Ok(())
    }

    /// Watches the healthy wave for its bake time, reading its alarms.
    async fn bake(&mut self, wi: usize) -> Result<(), Halt> {
        let wave = &self.plan.waves[wi];
        self.alarms(wi).await.map_err(Halt::Failed)?;
        if wave.bake.is_zero() {
            return Ok(());
        }
        self.rec.waves[wi].state = WaveState::Baking;
        self.save().await.map_err(|e| Halt::Failed(e.to_string()))?;
        self.reporter.emit(Event::WaveBaking {
            wave: wave.name.clone(),
            seconds: wave.bake.as_secs(),
        });
        let until = tokio::time::Instant::now() + wave.bake;
        let mut signals = Signals::new();
        loop {
            let step = until
                .saturating_duration_since(tokio::time::Instant::now())
                .min(observe::ALARM_EVERY);
            if step.is_zero() {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(step) => self.alarms(wi).await.map_err(Halt::Failed)?,
                sig = signals.next() => return Err(Halt::Interrupted(sig)),
            }
        }
    }

    /// Reverts every group marked `reverting`, all at once, each by the rollout engine:
    /// a paused rollout is aborted, a finished one is followed by a rollout of the previous
    /// image. Then records how the release ended.
    async fn roll_back(&mut self) -> Result<(), ReleaseError> {
        let marked: Vec<(usize, usize)> = restore_set(&self.rec, None, OnFailure::RollbackAll)
            .into_iter()
            .filter(|&(wi, gi)| self.rec.waves[wi].groups[gi].state == GroupState::Reverting)
            .collect();
        self.reporter.emit(Event::ReleaseRollbackStarted {
            reason: self.rec.reason.clone().unwrap_or_default(),
            groups: marked
                .iter()
                .map(|&(wi, gi)| self.rec.waves[wi].groups[gi].label())
                .collect(),
        });
        let mut running: JoinSet<(usize, usize, Result<&'static str, String>)> = JoinSet::new();
        for &(wi, gi) in &marked {
            let g = self.rec.waves[wi].groups[gi].clone();
            let aws = client(self.clients, &g).clone();
            let wave = self.plan.waves[wi].clone();
            let opts = self.opts.clone();
            let reporter = scope(self.reporter, &wave.name, &g);
            running.spawn(async move {
                let r = aws
                    .scope(Box::pin(revert_group(&aws, &wave, &opts, &g, &reporter)))
                    .await;
                (wi, gi, r)
            });
        }
        let mut failed = Vec::new();
        while let Some(joined) = running.join_next().await {
            let (wi, gi, r) = joined.map_err(|e| ReleaseError::Failed(e.to_string()))?;
            let g = &mut self.rec.waves[wi].groups[gi];
            match r {
                Ok(how) => {
                    g.state = GroupState::Reverted;
                    self.reporter.emit(Event::GroupReverted {
                        group: g.label(),
                        result: how.into(),
                    });
                }
                Err(e) => {
                    g.detail = Some(e.clone());
                    failed.push(format!("{}: {e}", g.label()));
                }
            }
            self.save().await?;
        }
        if !failed.is_empty() {
            return Err(ReleaseError::Failed(format!(
                "could not revert {}; rerun the same command to try again",
                failed.join("; ")
            )));
        }
        end_rollback(&mut self.rec, now());
        self.save().await
    }
}

/// Puts one group back on its previous image; `Ok` says how.
async fn revert_group(
    aws: &Aws,
    wave: &Wave,
    opts: &Options,
    g: &record::GroupRecord,
    reporter: &Reporter,
) -> Result<&'static str, String> {
    let now = observe::group_now(aws, &g.group).await?;
    let opts = Options {
        dry_run: false,
        ..opts.clone()
    };
    match record::revert(g, now.in_progress, now.launching.as_deref()) {
        Revert::Nothing => Ok("on its previous image already"),
        Revert::Abort => {
            match rollout::run(aws, &request(wave, &opts, &g.group, None, true), reporter).await {
                Ok(_)
                | Err(RolloutError::RolledBack { .. })
                | Err(RolloutError::NothingToAbort(_)) => {
                    Ok("its rollout was aborted and rolled back")
                }
                Err(e) => Err(e.to_string()),
            }
        }
        Revert::RollTo(prev) => rollout::run(
            aws,
            &request(wave, &opts, &g.group, Some(AmiSource::Id(prev)), false),
            reporter,
        )
        .await
        .map(|_| "rolled back to its previous image")
        .map_err(|e| e.to_string()),
    }
}
