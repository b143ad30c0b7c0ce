//! The health daemon (`bakery daemon`): keeps fleets healthy between releases.
//!
//! Every round it probes the in-service instances of its groups (its own optional probes),
//! judges them together with what the API said about them (each group's instances, the target
//! health of every target group they are attached to, one call per target group, and the EC2
//! status checks, two filtered calls), acts on the verdicts, and reads the API for the next
//! round. Replacement goes through the group (`SetInstanceHealth Unhealthy`), so the group's own
//! machinery launches the successor.
//!
//! What decides is pure and lives in the core crate: [`observe`] (failure counters, the probes'
//! hysteresis, evidence), [`decide`] (which instances to replace, the fleet breaker),
//! [`takeover`] (who owns a group's health decisions and what ending a takeover undoes) and
//! [`reads`] (the calls a round costs under the API budget, the order of its reads). This module
//! gathers the facts, calls those, and acts.
//!
//! A round starts on the interval's beat with the probes, so API latency (a loaded or
//! throttling endpoint) does not shift them: a killed app is marked within interval x threshold
//! plus the probe's own time. When the API budget (`[api] rate`) cannot cover a round's reads
//! within the interval, rounds stretch to what it allows (the effective interval) instead of
//! failing; a round's reads that do not fit its read budget are carried over, never thrown away,
//! and reads of suspect instances go first.
//!
//! While it runs it owns the health decisions of its groups: it suspends their `HealthCheck`
//! process (ELB health alone no longer kills instances, so the fleet breaker means something),
//! recorded in a tag with owner, expiry and whether it suspended `HealthCheck` itself; when it
//! stops it ends its own takeovers and resumes only what it suspended.

pub use bakery_core::daemon_config as config;
pub use bakery_core::judge as decide;
pub use bakery_core::{observe, reads, takeover};
mod events;
pub mod malloc;
pub mod metrics;
pub mod probe;
pub mod share;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::aws::{autoscaling, budget, ec2, elbv2, Aws, AwsError, CallPolicy};
use crate::rollout::state::Lock;
use crate::signals::{Signal, Signals};
use bakery_core::diag::FileError;
use config::Config;
use decide::{Breaker, Verdict};
use observe::{GroupFacts, InstanceFacts, Member, Memory, Observation, Reading, TargetState};
use reads::Read;
use takeover::{Claim, Me, Seen, Takeover, HEALTH_CHECK};

/// The tag recording which daemon owns a group's health decisions.
pub use bakery_core::marks::TAKEOVER_TAG;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] FileError),
    #[error(
        "cannot listen on {addr}: {source} (is another daemon running? set `listen` in the config)"
    )]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("[lease] in the daemon's configuration: {0}")]
    Lease(#[from] crate::lease::LeaseError),
    #[error("[events] queue_url = {queue:?}: {reason}")]
    Events { queue: String, reason: String },
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// `d` from now: never an `Instant + Duration` that overflows (a far future instead).
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

/// The daemon's view of a group, from the API's.
fn facts_of(g: autoscaling::Group) -> GroupFacts {
    GroupFacts {
        name: g.name,
        desired: g.desired,
        max: g.max,
        grace_period: u64::try_from(g.health_check_grace_period).unwrap_or(0),
        target_groups: g.target_group_arns,
        members: g
            .instances
            .into_iter()
            .map(|i| Member {
                id: i.id,
                lifecycle: i.lifecycle,
                health: i.health,
            })
            .collect(),
        tags: g.tags,
        suspended: g.suspended,
    }
}

/// What the API said, kept from round to round: a round judges with the latest answer of every
/// read, and a read cut short leaves the answer before it in place.
#[derive(Default)]
struct Known {
    /// The groups this daemon holds, as last read.
    groups: Vec<GroupFacts>,
    /// Addresses and launch times: they never change, so each instance is described once.
    instances: BTreeMap<String, InstanceFacts>,
    impaired: Option<Reading<BTreeMap<String, String>>>,
    health: BTreeMap<String, Reading<BTreeMap<String, TargetState>>>,
    /// The read phase each read last completed in, for the order of the next.
    last_read: BTreeMap<Read, u64>,
    phase: u64,
}

impl Known {
    /// After a judgement: every answer has been counted once.
    fn judged(&mut self) {
        if let Some(r) = &mut self.impaired {
            r.fresh = false;
        }
        for r in self.health.values_mut() {
            r.fresh = false;
        }
    }

    /// Instances of held groups that EC2 has not described yet (asked again every round: EC2
    /// is eventually consistent).
    fn undescribed(&self) -> Vec<String> {
        self.groups
            .iter()
            .flat_map(|g| &g.members)
            .filter(|m| self.instances.get(&m.id).is_none_or(|i| i.launched == 0))
            .map(|m| m.id.clone())
            .collect()
    }
}

struct Daemon {
    aws: Aws,
    config: Config,
    /// Owner and token of this daemon's takeover records.
    me: Lock,
    metrics: metrics::Shared,
    /// The judge's memory: failure counters and probe hysteresis per instance.
    memory: Memory,
    known: Known,
    /// Replacement times per group, for the window.
    replaced: BTreeMap<String, Vec<u64>>,
    replaced_total: BTreeMap<String, u64>,
    /// This daemon's takeover records, by group, as last written.
    taken: BTreeMap<String, Takeover>,
    /// Groups whose last read showed this daemon's own record (a record just written may have
    /// lost a race until it is read back).
    confirmed: BTreeSet<String>,
    /// Groups whose state was last reported (frozen, owned elsewhere, missing), to log
    /// transitions once.
    frozen: BTreeSet<String>,
    foreign: BTreeSet<String>,
    missing: BTreeSet<String>,
    /// The effective interval: the configured one, or what the API budget allows.
    pace: Duration,
    /// With a `[lease]` table: the groups shared with other daemons, and the guard before
    /// every mutating call.
    share: Option<Arc<share::Sharing>>,
    /// Groups owned by another daemon whose configuration of them differs (warned once).
    differs: BTreeSet<String>,
    /// With `[events]`: the queue's messages and the replacements in progress.
    events: Option<events::Events>,
    /// Mutating calls of a round cut short (by a stop or its read deadline) while they were
    /// under way: awaited, never abandoned ([`Daemon::run_to_the_end`]).
    unsettled: Vec<Unsettled>,
    /// Every instance of every watched group, owned here or not (a fleet event for one owned
    /// elsewhere is left on the queue for its owner).
    watched_instances: BTreeSet<String>,
}

/// The API reads of one round, as they ended.
#[derive(Debug, Default)]
struct ReadOutcome {
    answered: usize,
    errors: Vec<String>,
    /// Reads the round's budget could not fit: carried over to the next round.
    carried: usize,
}

/// The groups of one read, sorted by [`takeover::claim`].
#[derive(Default)]
struct Claims {
    held: Vec<GroupFacts>,
    /// Per group held: whether ending its takeover resumes `HealthCheck`.
    resumes: BTreeMap<String, bool>,
    to_suspend: Vec<String>,
    /// Records to write (a takeover, or a renewal due).
    write: bool,
}

/// One read's answer.
enum Answer {
    Status(BTreeMap<String, String>),
    Addresses(BTreeMap<String, (Option<String>, u64)>),
    Health(String, BTreeMap<String, TargetState>),
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(aws: Aws, config: Config) -> Result<(), DaemonError> {
    let policy = Arc::new(CallPolicy::metered(
        config.api_rate,
        config.api_burst,
        retry_budget(config.interval),
    ));
    let aws = aws.with_policy(policy.clone());
    let (metrics, pace, server) = serve_metrics(&config, policy).await?;
    let me = Lock {
        owner: crate::host::owner(),
        token: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
        since: now(),
        expires: 0,
    };
    let share = match &config.lease {
        Some(settings) => {
            let s = aws.scope(share::Sharing::open(&aws, settings)).await?;
            tracing::info!(table = %s.table(), member = %s.me(), ttl_s = settings.ttl.as_secs_f64(), "sharing the groups with the other daemons of the lease table");
            Some(Arc::new(s))
        }
        None => None,
    };
    let events = match &config.events {
        Some(e) => Some(aws.scope(events::start(&aws, &e.queue_url)).await?),
        None => None,
    };
    let d = Daemon {
        events,
        watched_instances: BTreeSet::new(),
        share: share.clone(),
        differs: BTreeSet::new(),
        aws: aws.clone(),
        me: me.clone(),
        config,
        metrics,
        memory: Memory::default(),
        known: Known::default(),
        replaced: BTreeMap::new(),
        replaced_total: BTreeMap::new(),
        taken: BTreeMap::new(),
        unsettled: Vec::new(),
        confirmed: BTreeSet::new(),
        frozen: BTreeSet::new(),
        foreign: BTreeSet::new(),
        missing: BTreeSet::new(),
        pace,
    };
    // The loop runs in a task of its own so that however it ends, a panic (a bug) included,
    // the takeovers recorded under this daemon's token are handed back.
    let scoped = aws.clone();
    let outcome = tokio::spawn(async move { scoped.scope(d.run()).await }).await;
    hand_back(&aws, &me, &outcome, share).await;
    server.abort();
    if let Err(e) = outcome {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    Ok(())
}

/// Binds the metrics listener and serves it; returns the shared metrics, the effective
/// interval (the configured one, or what the API budget allows) and the server's task.
async fn serve_metrics(
    config: &Config,
    policy: Arc<CallPolicy>,
) -> Result<(metrics::Shared, Duration, tokio::task::JoinHandle<()>), DaemonError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;
    let estimate = reads::from_config(config);
    let pace = reads::effective_interval(&estimate, config.api_rate, config.interval);
    let metrics: metrics::Shared = Arc::new(Mutex::new(metrics::Snapshot {
        interval: config.interval,
        effective_interval: pace,
        ..Default::default()
    }));
    let server = tokio::spawn(metrics::serve(listener, metrics.clone(), policy));
    tracing::info!(config = %config.path.display(), listen = %config.listen, interval_s = config.interval.as_secs_f64(), groups = config.groups.len(), "daemon starting");
    if let Some(a) = reads::advice(&estimate, config.api_rate, config.interval) {
        tracing::warn!(advice = %a, "the API budget cannot cover a round within the interval (estimated from the configuration, one target group per group)");
    }
    Ok((metrics, pace, server))
}

/// The orderly stop, however the loop ended: hands the health decisions back to the groups
/// (this daemon's takeovers) and leaves the lease table.
async fn hand_back(
    aws: &Aws,
    me: &Lock,
    outcome: &Result<(Signal, Handback), tokio::task::JoinError>,
    share: Option<Arc<share::Sharing>>,
) {
    let (reason, handback) = match outcome {
        Ok((sig, handback)) => (sig.to_string(), handback.clone()),
        Err(e) => {
            tracing::error!(error = %e, "the daemon's loop failed; handing health decisions back");
            ("a failure".to_string(), Handback::default())
        }
    };
    tracing::info!(
        signal = %reason,
        "stopping: handing health decisions back to the groups"
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // The few calls of an orderly stop: no bucket, short retries; within a second on a
    // responsive endpoint, STOP_LIMIT on a loaded one (systemd allows 10 s).
    let stopping = aws.with_policy(Arc::new(CallPolicy::unmetered(Duration::from_millis(300))));
    end_own_takeovers(&stopping, &me.token, handback, STOP_LIMIT, share.clone()).await;
    if let Some(s) = &share {
        stopping.scope(s.stop(STOP_LIMIT)).await;
    }
}

/// The takeovers a stopping daemon ends.
#[derive(Debug, Clone, Default)]
struct Handback {
    /// Read back as this daemon's own by its last round, and not expired: ended without reading
    /// the groups again ([`takeover::release_from_memory`]), so that a loaded endpoint cannot
    /// keep a stop from handing them back.
    known: Vec<(String, takeover::Undo)>,
    /// Groups to read again first, whose takeovers end only if still this daemon's: records
    /// written but not read back yet (they may have lost a race) or expired. `None`: every group
    /// with a takeover record (after a panic, when the daemon's memory is gone).
    recheck: Option<Vec<String>>,
}

/// Ends this daemon's takeovers in `handback`: `HealthCheck` is resumed where a daemon
/// suspended it, then the record is deleted. Another daemon's record is never touched. All
/// within about `limit` (a third of it for reading groups again, when some must be). With a
/// lease table, each end is guarded by the group's lease: a group whose lease is not this
/// daemon's any more is left to its new owner, which inherits the record.
async fn end_own_takeovers(
    aws: &Aws,
    token: &str,
    handback: Handback,
    limit: Duration,
    share: Option<Arc<share::Sharing>>,
) {
    let started = Instant::now();
    let mut ends = handback.known;
    let read = match handback.recheck {
        Some(names) if names.is_empty() => None,
        Some(names) => Some((names, Vec::new())),
        None => Some((Vec::new(), vec![(TAKEOVER_TAG.to_string(), None)])),
    };
    if let Some((names, tagged)) = read {
        let described = aws.scope(autoscaling::describe_many(
            &aws.autoscaling,
            &names,
            &tagged,
        ));
        match tokio::time::timeout(limit / 3, described).await {
            Ok(Ok(groups)) => {
                for g in groups {
                    let tag = g.tags.get(TAKEOVER_TAG).map(String::as_str);
                    let known = ends.iter().any(|(n, _)| *n == g.name);
                    if let Some(u) = takeover::release(tag, token).filter(|_| !known) {
                        ends.push((g.name, u));
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, groups = ?names, "could not read the groups again to end their takeovers; the next daemon start or `bakery gc` will")
            }
            Err(_) => {
                tracing::error!(groups = ?names, "reading the groups again to end their takeovers timed out; the next daemon start or `bakery gc` will")
            }
        }
    }
    let deadline = after(limit.saturating_sub(started.elapsed()));
    let mut set = tokio::task::JoinSet::new();
    for (group, undo) in ends {
        let aws = aws.clone();
        let share = share.clone();
        set.spawn(async move {
            let end = async {
                let Some(s) = share else {
                    return end_takeover(&aws, &group, undo.resume)
                        .await
                        .map_err(|e| e.to_string());
                };
                let g = s.guard(std::slice::from_ref(&group)).await;
                if let Some((_, why)) = g.refused.first() {
                    return Err(format!(
                        "not ended: {why}; its new owner inherits the record"
                    ));
                }
                g.fence
                    .run(end_takeover(&aws, &group, undo.resume))
                    .await
                    .map_err(|e| e.to_string())
            };
            let r = tokio::time::timeout_at(deadline, aws.scope(end)).await;
            (group, undo, r)
        });
    }
    while let Some(Ok((group, undo, r))) = set.join_next().await {
        match r {
            Ok(Ok(())) if undo.resume => tracing::info!(group = %group, "HealthCheck resumed"),
            Ok(Ok(())) => {
                tracing::info!(group = %group, "takeover ended; HealthCheck stays suspended (it was suspended before the daemon took over)")
            }
            Ok(Err(e)) => {
                tracing::error!(group = %group, error = %e, "could not end the takeover; the next daemon start or `bakery gc` will")
            }
            Err(_) => {
                tracing::error!(group = %group, "ending the takeover timed out; the next daemon start or `bakery gc` will")
            }
        }
    }
}

/// Ends one takeover: `HealthCheck` resumed first (when the daemon suspended it), then the
/// record deleted, so that no crash in between leaves a suspension without a record.
async fn end_takeover(aws: &Aws, group: &str, resume: bool) -> Result<(), AwsError> {
    if resume {
        autoscaling::resume(&aws.autoscaling, group, &[HEALTH_CHECK]).await?;
    }
    autoscaling::delete_tags(&aws.autoscaling, group, &[TAKEOVER_TAG]).await
}

/// A round's reads in flight at once. An SDK call's task is some 30 KB until its answer is
/// parsed (heaptrack): the reads of bench-daemon's fleet (40 target groups), spawned at once, held
/// 2.6 MB at the daemon's peak. Sixteen keep up with the bucket (a call takes tens of milliseconds; tokens
/// come 20 a second at most by default) and bound that to half a MB.
const READS_IN_FLIGHT: usize = 16;

/// How long a stop may take to hand the takeovers back, at most (a loaded endpoint: the calls of
/// the round the stop cut short are still being served).
const STOP_LIMIT: Duration = Duration::from_secs(3);

/// A mutating call run to its end in a task of its own, and the takeover records it writes.
struct Unsettled {
    records: Vec<(String, Takeover)>,
    call: tokio::task::JoinHandle<Landed>,
}

/// How a mutating call ended.
enum Landed {
    Done,
    /// Abandoned by its fence: the group's lease ran out meanwhile.
    Lost,
    Failed(AwsError),
}

async fn joined(call: &mut tokio::task::JoinHandle<Landed>) -> Landed {
    call.await.unwrap_or_else(|e| {
        Landed::Failed(AwsError {
            action: "autoscaling",
            resource: "takeover".to_string(),
            code: None,
            message: format!("the call's task ended: {e}"),
            transient: true,
        })
    })
}

/// How a round ended.
enum RoundEnd {
    /// The round ran; whether the API answered its reads.
    Done(bool),
    /// A stop signal arrived (reading and probing may be cut short; acting never is).
    Stop(Signal),
}

/// How long a round may take before the daemon counts as stuck (and stops feeding the
/// watchdog): its reads are bounded by their read budget, its probes by their timeouts and its
/// replacements by the calls' attempt timeout and retry budget; this is well past all of them.
fn stuck_limit(pace: Duration) -> Duration {
    Duration::from_secs(120).saturating_add(pace)
}

/// Half the watchdog interval systemd asked for (`WATCHDOG_USEC`), if it asked.
fn watchdog_period() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}

async fn watchdog_tick(period: Option<Duration>) {
    match period {
        Some(p) => tokio::time::sleep(p).await,
        None => std::future::pending().await,
    }
}

fn feed_watchdog() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
}

/// How long one call's retries may sleep: within the interval (the next round asks again
/// anyway).
fn retry_budget(interval: Duration) -> Duration {
    interval.clamp(Duration::from_secs(1), Duration::from_secs(10))
}

async fn recv_hup(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

impl Daemon {
    /// Rounds on the effective interval's beat until SIGTERM or SIGINT; SIGHUP reloads the
    /// configuration between rounds. Returns the signal, and the takeovers to end should the stop
    /// not manage to read the groups again.
    async fn run(mut self) -> (Signal, Handback) {
        if let Err(e) = self.undo_stale_takeovers().await {
            tracing::warn!(error = %e, "could not look for stale takeovers; continuing");
        }
        let mut stop = Signals::new();
        let mut hup = signal(SignalKind::hangup()).ok();
        let watchdog = watchdog_period();
        let mut ready = false;
        loop {
            let started = Instant::now();
            let ok = match self.supervised_round(&mut stop, watchdog, started).await {
                RoundEnd::Stop(sig) => return (sig, self.stop_handback().await),
                RoundEnd::Done(ok) => ok,
            };
            self.after_round(started.elapsed(), ok);
            if !ready {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                ready = true;
            }
            feed_watchdog();
            if let Some(sig) = self.pause(started, watchdog, &mut stop, &mut hup).await {
                return (sig, self.stop_handback().await);
            }
        }
    }

    /// What a stop hands back, once the mutating calls a cut-short round left under way have
    /// ended (a record still being written when the stop came would otherwise land after the
    /// stop read the group, and stay: the CI failure of daemon_share at fb7998c). Calls still
    /// under way after [`STOP_LIMIT`] leave their groups to be read again. (With the hand-back's
    /// own limits, a stop stays within systemd's `TimeoutStopSec=10s`.)
    async fn stop_handback(&mut self) -> Handback {
        let unknown = self.settle_calls(STOP_LIMIT).await;
        let mut h = self.handback();
        if let Some(r) = &mut h.recheck {
            r.extend(unknown);
        }
        h
    }

    /// Awaits the mutating calls left under way (within `limit`) and keeps the records of those
    /// that landed. Returns the groups of calls still under way at `limit`. Cancel-safe: a call
    /// stays listed until it has ended.
    async fn settle_calls(&mut self, limit: Duration) -> Vec<String> {
        let deadline = after(limit);
        while let Some(u) = self.unsettled.last_mut() {
            let Ok(landed) = tokio::time::timeout_at(deadline, joined(&mut u.call)).await else {
                break;
            };
            if let Some(u) = self.unsettled.pop() {
                if matches!(landed, Landed::Done) {
                    self.taken.extend(u.records);
                }
            }
        }
        std::mem::take(&mut self.unsettled)
            .into_iter()
            .flat_map(|u| u.records.into_iter().map(|(n, _)| n))
            .collect()
    }

    /// Runs a mutating call (inside `fence`, if any) in a task of its own, so that it runs to
    /// its end even when the round awaiting it is cut short: a request dropped half-way may
    /// still be acted on by AWS, and a stop must hand back what the daemon made. A stop, and
    /// the next round, await what is still under way first ([`Daemon::settle_calls`]). `records` are
    /// the takeover records the call writes.
    async fn run_to_the_end(
        &mut self,
        records: Vec<(String, Takeover)>,
        call: impl std::future::Future<Output = Result<(), AwsError>> + Send + 'static,
        fence: Option<crate::lease::Fence>,
    ) -> Landed {
        let fenced = async move {
            let Some(f) = fence else {
                return call.await.map_or_else(Landed::Failed, |()| Landed::Done);
            };
            match f.run(call).await {
                Ok(()) => Landed::Done,
                Err(crate::lease::Fenced::Call(e)) => Landed::Failed(e),
                Err(crate::lease::Fenced::Lost(_)) => Landed::Lost,
            }
        };
        let aws = self.aws.clone();
        let call = tokio::spawn(async move { aws.scope(fenced).await });
        self.unsettled.push(Unsettled { records, call });
        let Some(u) = self.unsettled.last_mut() else {
            unreachable!("pushed just above")
        };
        let landed = joined(&mut u.call).await;
        self.unsettled.pop();
        landed
    }

    /// The takeovers a stop ends: those its last round read back as its own and unexpired
    /// directly, the others after reading them again.
    fn handback(&self) -> Handback {
        let now = now();
        let mut h = Handback {
            known: Vec::new(),
            recheck: Some(Vec::new()),
        };
        for (group, mine) in &self.taken {
            let confirmed = self.confirmed.contains(group);
            match takeover::release_from_memory(mine, confirmed, now) {
                Some(u) => h.known.push((group.clone(), u)),
                None => h.recheck.get_or_insert_with(Vec::new).push(group.clone()),
            }
        }
        h
    }

    /// A round, with the watchdog fed through it: a slow round (an API in trouble, every call
    /// timing out) is not a stuck one, up to the stuck limit. Past that, systemd restarts the
    /// daemon.
    async fn supervised_round(
        &mut self,
        stop: &mut Signals,
        watchdog: Option<Duration>,
        started: Instant,
    ) -> RoundEnd {
        let stuck_at = started.checked_add(stuck_limit(self.pace));
        let round = self.round(stop);
        tokio::pin!(round);
        loop {
            tokio::select! {
                e = &mut round => return e,
                _ = watchdog_tick(watchdog) => {
                    if stuck_at.is_none_or(|s| Instant::now() < s) {
                        feed_watchdog();
                    }
                }
            }
        }
    }

    /// The pause until the next round; the watchdog hears from us through it too (an interval
    /// may be longer than WatchdogSec). A stop signal ends it, SIGHUP reloads and starts the next
    /// round at once.
    async fn pause(
        &mut self,
        started: Instant,
        watchdog: Option<Duration>,
        stop: &mut Signals,
        hup: &mut Option<tokio::signal::unix::Signal>,
    ) -> Option<Signal> {
        let wake = after(self.pace.saturating_sub(started.elapsed()));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => return None,
                _ = watchdog_tick(watchdog) => feed_watchdog(),
                sig = stop.next() => return Some(sig),
                _ = recv_hup(hup) => {
                    self.reload();
                    return None;
                }
            }
        }
    }

    fn after_round(&mut self, took: Duration, ok: bool) {
        if took > self.pace {
            tracing::warn!(
                round_s = took.as_secs_f64(),
                interval_s = self.pace.as_secs_f64(),
                api_rate = self.config.api_rate,
                "a round took longer than the interval: detection is slower than configured; raise [api] rate or the interval"
            );
        }
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.loops += 1;
        m.last_loop = took;
        if ok {
            m.last_round_at = now();
        } else {
            m.loop_errors += 1;
        }
        drop(m);
        malloc::release_freed_memory();
    }

    fn reload(&mut self) {
        match config::load(&self.config.path) {
            Ok(c) => {
                if c.listen != self.config.listen {
                    tracing::warn!(old = %self.config.listen, new = %c.listen, "`listen` changes take effect at the next start");
                }
                self.aws.policy.set_rate(c.api_rate, c.api_burst);
                self.aws.policy.set_retry_budget(retry_budget(c.interval));
                self.metrics
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .interval = c.interval;
                tracing::info!(
                    groups = c.groups.len(),
                    interval_s = c.interval.as_secs_f64(),
                    "configuration reloaded"
                );
                self.config = Config {
                    listen: self.config.listen,
                    ..c
                };
                // Groups the new configuration does not select are not judged by it; the next
                // read ends their takeovers.
                let config = &self.config;
                self.known.groups.retain(|g| {
                    config
                        .groups
                        .iter()
                        .any(|s| s.selector.selects(&g.name, &g.tags))
                });
                self.update_pace();
            }
            Err(e) => {
                tracing::error!(error = %e, "reload failed; keeping the running configuration");
            }
        }
    }

    /// Takeovers whose owner is gone (expired, or a dead process on this host) are undone:
    /// `HealthCheck` resumed where their daemon suspended it, the record deleted.
    async fn undo_stale_takeovers(&mut self) -> Result<(), AwsError> {
        if self.share.is_some() {
            // Shared groups: a stale takeover is inherited by the group's owner (its lease
            // guards the calls); ending it here would be a mutating call without one.
            return Ok(());
        }
        let groups = autoscaling::describe_many(
            &self.aws.autoscaling,
            &[],
            &[(TAKEOVER_TAG.to_string(), None)],
        )
        .await?;
        let host = crate::host::hostname();
        for g in groups {
            let tag = g.tags.get(TAKEOVER_TAG).map(String::as_str);
            let Some(undo) = takeover::undo(tag, now(), &host, crate::host::pid_alive) else {
                continue;
            };
            tracing::warn!(group = %g.name, owner = %undo.owner, reason = %undo.why, "undoing a stale takeover");
            end_takeover(&self.aws, &g.name, undo.resume).await?;
        }
        Ok(())
    }

    /// One round: the probes, judged with the API's latest answers; the replacements; and the
    /// reads for the next round, within the round's read budget (what does not fit is carried
    /// over to the next round).
    async fn round(&mut self, stop: &mut Signals) -> RoundEnd {
        let probes = tokio::select! {
            p = self.probe_all() => p,
            sig = stop.next() => return RoundEnd::Stop(sig),
        };
        let obs = self.judge(&probes);
        // Acting is short and never cut in half.
        self.act(obs).await;
        let budget = reads::read_budget(self.pace);
        let deadline = after(budget);
        let outcome = tokio::select! {
            o = self.read_all(deadline) => o,
            sig = stop.next() => return RoundEnd::Stop(sig),
        };
        let done = self.report_reads(outcome, budget);
        // Fleet events act on what the round just read.
        self.handle_events().await;
        RoundEnd::Done(done)
    }

    /// A mutating call on `group`: with a lease table, preceded by the guard of the group's lease
    /// and run inside its fence; refused (with why) when the lease is not this daemon's.
    async fn fenced<T>(
        &self,
        group: &str,
        call: impl std::future::Future<Output = Result<T, AwsError>>,
    ) -> Result<T, String> {
        let Some(s) = &self.share else {
            return call.await.map_err(|e| e.to_string());
        };
        let g = s.guard(&[group.to_string()]).await;
        if let Some((_, why)) = g.refused.first() {
            return Err(format!("refused: {why}"));
        }
        match g.fence.run(call).await {
            Ok(t) => Ok(t),
            Err(crate::lease::Fenced::Call(e)) => Err(e.to_string()),
            Err(crate::lease::Fenced::Lost(_)) => {
                Err("abandoned: the group's lease ran out meanwhile".to_string())
            }
        }
    }

    /// Probes the in-service instances of held groups, `probe_concurrency` at a time. A probe
    /// is spawned only when one ends: a task waiting its turn would hold its memory for nothing
    /// (1,000 of them spawned at once were 2.7 MB of the daemon's peak, heaptrack).
    async fn probe_all(&self) -> BTreeMap<String, Result<(), String>> {
        let targets =
            observe::probe_targets(&self.known.groups, &self.known.instances, &self.config);
        let mut probes = tokio::task::JoinSet::new();
        let mut out = BTreeMap::new();
        let mut collect = |r: Option<Result<(String, Result<(), String>), _>>| {
            if let Some(Ok((id, result))) = r {
                out.insert(id, result);
            }
        };
        for (id, ip, p) in targets {
            if probes.len() >= self.config.probe_concurrency {
                collect(probes.join_next().await);
            }
            probes.spawn(async move { (id, probe::probe(ip, &p).await) });
        }
        while let Some(r) = probes.join_next().await {
            collect(Some(r));
        }
        out
    }

    /// Puts the probes and the API's latest answers together ([`observe::observe`]).
    fn judge(&mut self, probes: &BTreeMap<String, Result<(), String>>) -> Observation {
        let now = now();
        let window = self.config.window.as_secs();
        for times in self.replaced.values_mut() {
            times.retain(|t| now.saturating_sub(*t) < window);
        }
        let facts = observe::Facts {
            now,
            groups: &self.known.groups,
            instances: &self.known.instances,
            impaired: self.known.impaired.as_ref(),
            health: &self.known.health,
            probes,
            replaced: &self.replaced,
        };
        let obs = observe::observe(&facts, &self.config, &mut self.memory);
        self.known.judged();
        obs
    }

    async fn act(&mut self, obs: Observation) {
        let breaker = Breaker {
            freeze_above: self.config.freeze_above,
            freeze_above_all: self.config.freeze_above_all,
        };
        let verdicts = decide::decide(&obs.views, &breaker);
        self.log_breaker(&verdicts, &obs);
        // The facts are up to an interval old: before marking anything, the groups concerned are
        // read again (one call), so that a rollout that took its lock since, an instance already
        // leaving, or another daemon now owning the group, is left alone.
        let pending: Vec<String> = verdicts
            .iter()
            .filter(|v| !v.replace.is_empty())
            .map(|v| v.group.clone())
            .collect();
        let fresh = self.read_again(&pending).await;
        for v in &verdicts {
            for (id, reason) in &v.replace {
                let evidence = obs.evidence.get(id).cloned().unwrap_or_default().join("; ");
                self.replace(&v.group, id, reason, &evidence, fresh.as_ref())
                    .await;
            }
        }
        self.publish(&verdicts);
    }

    fn log_breaker(&mut self, verdicts: &[Verdict], obs: &Observation) {
        for v in verdicts {
            match (&v.frozen, self.frozen.contains(&v.group)) {
                (Some(why), false) => {
                    tracing::warn!(group = %v.group, unhealthy = v.unhealthy, total = v.total, reason = %why, "fleet breaker: replacements frozen");
                    self.frozen.insert(v.group.clone());
                }
                (None, true) => {
                    tracing::info!(group = %v.group, unhealthy = v.unhealthy, total = v.total, "fleet breaker: freeze lifted");
                    self.frozen.remove(&v.group);
                }
                _ => {}
            }
            for (id, why) in &v.held {
                let evidence = obs.evidence.get(id).cloned().unwrap_or_default().join("; ");
                tracing::debug!(group = %v.group, instance = %id, reason = %why, evidence = %evidence, "replacement held back");
            }
        }
    }

    /// The groups in `names`, read again just now, with when the read ended.
    async fn read_again(
        &self,
        names: &[String],
    ) -> Option<(BTreeMap<String, GroupFacts>, Instant)> {
        if names.is_empty() {
            return None;
        }
        match autoscaling::describe_many(&self.aws.autoscaling, names, &[]).await {
            Ok(gs) => Some((
                gs.into_iter()
                    .map(|g| (g.name.clone(), facts_of(g)))
                    .collect(),
                Instant::now(),
            )),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the groups again before replacing; nothing replaced this round");
                None
            }
        }
    }

    /// Marks `id` unhealthy unless the group, read again just before, says it must not be: the
    /// instance changed, a rollout holds the group, or the group's takeover is no longer this
    /// daemon's (or that read is too old: the daemon was paused).
    async fn replace(
        &mut self,
        group: &str,
        id: &str,
        reason: &str,
        evidence: &str,
        fresh: Option<&(BTreeMap<String, GroupFacts>, Instant)>,
    ) {
        let now = now();
        let why_not =
            observe::still_replaceable(fresh.map(|f| &f.0), group, id, now).or_else(|| {
                let (groups, read_at) = fresh?;
                let tag = groups
                    .get(group)
                    .and_then(|g| g.tags.get(TAKEOVER_TAG))
                    .map(String::as_str);
                takeover::may_act(tag, &self.me.token, read_at.elapsed(), now)
                    .err()
                    .map(|r| r.to_string())
            });
        if let Some(why) = why_not {
            tracing::info!(group = %group, instance = %id, reason = %why, "replacement held back");
            return;
        }
        let marked = match &self.share {
            Some(s) => {
                let g = s.guard(&[group.to_string()]).await;
                if let Some((_, why)) = g.refused.first() {
                    tracing::info!(group = %group, instance = %id, reason = %why, "replacement held back");
                    return;
                }
                match g
                    .fence
                    .run(autoscaling::set_unhealthy(&self.aws.autoscaling, id))
                    .await
                {
                    Ok(()) => Ok(()),
                    Err(crate::lease::Fenced::Call(e)) => Err(e.to_string()),
                    Err(crate::lease::Fenced::Lost(_)) => {
                        Err("abandoned: the group's lease ran out meanwhile".to_string())
                    }
                }
            }
            None => autoscaling::set_unhealthy(&self.aws.autoscaling, id)
                .await
                .map_err(|e| e.to_string()),
        };
        match marked {
            Ok(()) => {
                tracing::warn!(group = %group, instance = %id, reason = %reason, evidence = %evidence, "marked unhealthy: the group replaces it");
                self.replaced
                    .entry(group.to_string())
                    .or_default()
                    .push(now);
                *self.replaced_total.entry(group.to_string()).or_default() += 1;
                self.memory.replaced(id);
            }
            Err(e) => {
                tracing::error!(group = %group, instance = %id, error = %e, "could not mark unhealthy")
            }
        }
    }

    /// The round's figures for `/metrics` and `/healthz`.
    fn publish(&self, verdicts: &[Verdict]) {
        let groups = verdicts
            .iter()
            .map(|v| {
                (
                    v.group.clone(),
                    metrics::GroupFigures {
                        instances: v.total,
                        healthy: v.total - v.unhealthy,
                        unhealthy: v.unhealthy,
                        replaced_total: self
                            .replaced_total
                            .get(&v.group)
                            .copied()
                            .unwrap_or_default(),
                        frozen: v.frozen.is_some(),
                    },
                )
            })
            .collect();
        let all_total: u32 = verdicts.iter().map(|v| v.total).sum();
        let all_bad: u32 = verdicts.iter().map(|v| v.unhealthy).sum();
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.groups = groups;
        m.fleet_frozen = all_total > 0
            && f64::from(all_bad) * 100.0 / f64::from(all_total)
                > f64::from(self.config.freeze_above_all);
    }

    /// The API reads of a round, each kept as it is answered: the groups first (taking over
    /// new ones, renewing takeovers), then the other reads in the order of [`reads::order`],
    /// each sent as soon as the budget allows, until `deadline`. What is left is read next round.
    async fn read_all(&mut self, deadline: Instant) -> ReadOutcome {
        self.known.phase += 1;
        let mut out = ReadOutcome::default();
        match tokio::time::timeout_at(deadline, self.read_groups()).await {
            Ok(Ok(())) => out.answered += 1,
            Ok(Err(e)) => out.errors.push(e.to_string()),
            Err(_) => {
                out.carried += 1;
                return out;
            }
        }
        let order = reads::order(
            &self.known.groups,
            &self.memory.suspects(),
            !self.known.undescribed().is_empty(),
            &self.known.last_read,
        );
        self.read_rest(order, deadline, &mut out).await;
        out
    }

    /// Sends `order`'s reads one after the other as the bucket gives tokens, up to
    /// [`READS_IN_FLIGHT`] at once, keeping each answer as it comes; at `deadline` the rest is
    /// carried over.
    async fn read_rest(&mut self, order: Vec<Read>, deadline: Instant, out: &mut ReadOutcome) {
        let mut queue: VecDeque<Read> = order.into();
        let mut calls = tokio::task::JoinSet::new();
        let policy = self.aws.policy.clone();
        let undescribed = self.known.undescribed();
        while !queue.is_empty() || !calls.is_empty() {
            tokio::select! {
                biased;
                Some(joined) = calls.join_next(), if !calls.is_empty() => {
                    if let Ok((read, answer)) = joined {
                        self.keep(read, answer, out);
                    }
                }
                _ = policy.acquire(), if !queue.is_empty() && calls.len() < READS_IN_FLIGHT => {
                    if let Some(read) = queue.pop_front() {
                        let (aws, undescribed) = (self.aws.clone(), undescribed.clone());
                        calls.spawn(async move {
                            let answer = aws.scope(budget::prepaid(read_one(&aws, &read, &undescribed))).await;
                            (read, answer)
                        });
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    out.carried += queue.len() + calls.len();
                    calls.abort_all();
                    return;
                }
            }
        }
    }

    /// Keeps an answer (fresh until the next judgement) or notes the error.
    fn keep(&mut self, read: Read, answer: Result<Answer, AwsError>, out: &mut ReadOutcome) {
        match answer {
            Ok(a) => {
                out.answered += 1;
                self.known.last_read.insert(read, self.known.phase);
                match a {
                    Answer::Status(m) => self.known.impaired = Some(Reading::fresh(m)),
                    Answer::Addresses(m) => {
                        for (id, (ip, launched)) in m {
                            self.known
                                .instances
                                .insert(id, InstanceFacts { ip, launched });
                        }
                    }
                    Answer::Health(tg, m) => {
                        self.known.health.insert(tg, Reading::fresh(m));
                    }
                }
            }
            Err(e) => out.errors.push(e.to_string()),
        }
    }

    /// Whether the round counts as done: the API answered at least one of its reads. Reads it
    /// could not fit are carried over, logged, and do not fail it.
    fn report_reads(&mut self, outcome: ReadOutcome, budget: Duration) -> bool {
        let timed_out = || {
            format!(
                "the API did not answer within {}s; the next round asks again",
                budget.as_secs()
            )
        };
        self.metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reads_carried += outcome.carried as u64;
        if outcome.answered == 0 && (!outcome.errors.is_empty() || outcome.carried > 0) {
            let error = outcome.errors.first().cloned().unwrap_or_else(timed_out);
            tracing::warn!(error = %error, "round failed; the daemon keeps going");
            return false;
        }
        if !outcome.errors.is_empty() || outcome.carried > 0 {
            tracing::info!(
                answered = outcome.answered,
                failed = outcome.errors.len(),
                carried_over = outcome.carried,
                error = outcome.errors.first().map(String::as_str).unwrap_or(""),
                "some reads did not complete this round; the next round reads them first, and judges with the last answers meanwhile"
            );
        }
        true
    }

    /// Reads the watched groups and takes over, renews or leaves each; the groups held become the
    /// ones judged. Held groups no longer selected (a reload, a tag removed) or gone have their
    /// takeovers ended.
    async fn read_groups(&mut self) -> Result<(), AwsError> {
        // What the last round left under way ends before the groups are read again.
        self.settle_calls(Duration::MAX).await;
        let names = self.config.named_groups();
        let all =
            autoscaling::describe_many(&self.aws.autoscaling, &names, &self.config.tag_selectors())
                .await?;
        let read_at = Instant::now();
        let mut all: Vec<GroupFacts> = all.into_iter().map(facts_of).collect();
        self.note_missing(&names, &all);
        self.watched_instances = all
            .iter()
            .flat_map(|g| g.members.iter().map(|m| m.id.clone()))
            .collect();
        let seen: BTreeSet<String> = all.iter().map(|g| g.name.clone()).collect();
        let dropped: Vec<String> = self
            .taken
            .keys()
            .filter(|n| !seen.contains(*n))
            .cloned()
            .collect();
        if !dropped.is_empty() {
            tracing::info!(groups = ?dropped, "no longer watched: ending their takeovers");
            let recheck = Handback {
                known: Vec::new(),
                recheck: Some(dropped.clone()),
            };
            let share = self.share.clone();
            end_own_takeovers(
                &self.aws,
                &self.me.token,
                recheck,
                Duration::from_secs(10),
                share,
            )
            .await;
            for n in &dropped {
                self.taken.remove(n);
                self.confirmed.remove(n);
            }
        }
        if let Some(share) = self.share.clone() {
            all = self.share_out(&share, all).await;
        }
        let held = self.claim_all(all, read_at).await?;
        let ids: BTreeSet<String> = held
            .iter()
            .flat_map(|g| g.members.iter().map(|m| m.id.clone()))
            .collect();
        self.memory.keep_only(&ids);
        self.known.instances.retain(|id, _| ids.contains(id));
        let tgs: BTreeSet<&String> = held.iter().flat_map(|g| &g.target_groups).collect();
        self.known.health.retain(|tg, _| tgs.contains(tg));
        self.known.last_read.retain(|r, _| match r {
            Read::TargetHealth(tg) => tgs.contains(tg),
            _ => true,
        });
        self.known.groups = held;
        self.update_pace();
        Ok(())
    }

    /// With a lease table: the groups of `all` whose leases this daemon holds this round (the
    /// others are another daemon's: forgotten here, their takeovers inherited by their owners).
    /// Warns once per group when its owner's configuration of it differs from this daemon's.
    async fn share_out(&mut self, share: &share::Sharing, all: Vec<GroupFacts>) -> Vec<GroupFacts> {
        let names: Vec<String> = all.iter().map(|g| g.name.clone()).collect();
        let own = share.refresh(&names).await;
        let figures = share.figures().await;
        let member_until = share.member_until().await;
        for g in all.iter().filter(|g| !own.owned.contains(&g.name)) {
            let tag = g.tags.get(TAKEOVER_TAG).map(String::as_str);
            let mine = self.config.fingerprint(&g.name, &g.tags);
            match takeover::config_differs(tag, &self.me.token, &mine) {
                Some((owner, theirs)) => {
                    if self.differs.insert(g.name.clone()) {
                        tracing::warn!(group = %g.name, owner = %owner, owners_config = %theirs, this_config = %mine, "another daemon owns this group with a different configuration of it; the owner's configuration acts");
                    }
                }
                None => {
                    self.differs.remove(&g.name);
                }
            }
            if self.taken.remove(&g.name).is_some() {
                self.confirmed.remove(&g.name);
                tracing::info!(group = %g.name, "the group is another daemon's now; its takeover record is the new owner's to inherit");
            }
        }
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        // A group handed over stops being reported here at once (its owner reports it).
        m.groups.retain(|g, _| own.owned.contains(g));
        m.sharing = Some(metrics::SharingFigures {
            table: share.table().to_string(),
            member_until_ms: member_until,
            live: own.live,
            owned: own.owned.clone(),
            renewals: figures.renewals,
            failures: figures.failures,
            takeovers: figures.takeovers,
        });
        drop(m);
        all.into_iter()
            .filter(|g| own.owned.contains(&g.name))
            .collect()
    }

    /// Logs named groups that went missing or came back, once each, and tells `/healthz`.
    fn note_missing(&mut self, names: &[String], found: &[GroupFacts]) {
        let missing: BTreeSet<String> = names
            .iter()
            .filter(|n| !found.iter().any(|g| &&g.name == n))
            .cloned()
            .collect();
        for n in missing.difference(&self.missing) {
            tracing::warn!(group = %n, "watched group not found: /healthz reports it until it exists");
        }
        for n in self.missing.difference(&missing) {
            tracing::info!(group = %n, "watched group found again");
        }
        self.missing = missing.clone();
        self.metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .missing = missing;
    }

    /// What [`takeover::claim`] says of each group read: the groups held (watched by this
    /// daemon; another daemon's are left out and forgotten), who resumes `HealthCheck` at the end
    /// of each takeover, which to suspend, and whether records must be written.
    fn sort_claims(&mut self, all: Vec<GroupFacts>) -> Claims {
        let host = crate::host::hostname();
        let mut c = Claims::default();
        for g in all {
            let tag = g.tags.get(TAKEOVER_TAG).map(String::as_str);
            let seen = Seen {
                tag,
                suspended: g.suspended.iter().any(|p| p == HEALTH_CHECK),
                now: now(),
            };
            let me = Me {
                token: &self.me.token,
                mine: self.taken.get(&g.name),
                ttl: self.config.takeover_ttl,
                host: &host,
                pid_alive: crate::host::pid_alive,
            };
            let claim = if self.share.is_some() {
                takeover::claim_leased(&seen, &me)
            } else {
                takeover::claim(&seen, &me)
            };
            match claim {
                Claim::Foreign { owner } => {
                    self.taken.remove(&g.name);
                    self.confirmed.remove(&g.name);
                    if self.foreign.insert(g.name.clone()) {
                        tracing::warn!(group = %g.name, owner = %owner, "another daemon owns this group's health decisions; watching only");
                    }
                    continue;
                }
                Claim::Held { renew } => {
                    self.confirmed.insert(g.name.clone());
                    c.write |= renew;
                    let r = tag.and_then(Takeover::decode).is_none_or(|t| t.resumes);
                    c.resumes.insert(g.name.clone(), r);
                }
                Claim::Take {
                    resumes,
                    suspend,
                    from,
                } => {
                    // Ours once a later read shows the record this write makes.
                    self.confirmed.remove(&g.name);
                    c.write = true;
                    c.resumes.insert(g.name.clone(), resumes);
                    if suspend {
                        c.to_suspend.push(g.name.clone());
                    } else if !resumes {
                        tracing::info!(group = %g.name, "took over health decisions; HealthCheck was already suspended and stays so when the daemon stops");
                    }
                    if let Some(from) = from {
                        tracing::warn!(group = %g.name, previous = %from, "taking over from a daemon that is gone");
                    }
                }
            }
            self.foreign.remove(&g.name);
            c.held.push(g);
        }
        c
    }

    /// Takes over, renews or leaves each group as [`takeover::claim`] says, and returns the
    /// groups this daemon holds now. The records are written (one call for all) before any
    /// `HealthCheck` is suspended, and only on a read younger than [`takeover::FRESH_READ`].
    async fn claim_all(
        &mut self,
        all: Vec<GroupFacts>,
        read_at: Instant,
    ) -> Result<Vec<GroupFacts>, AwsError> {
        let Claims {
            mut held,
            resumes,
            to_suspend,
            write,
        } = self.sort_claims(all);
        if write {
            if let Err(refusal) = takeover::may_mutate(read_at.elapsed(), None, now()) {
                tracing::warn!(reason = %refusal, "takeover records not written; the groups are read again next round");
                let live = |n: &String| self.taken.get(n).is_some_and(|t| t.lock.expires > now());
                held.retain(|g| live(&g.name) && !to_suspend.contains(&g.name));
                return Ok(held);
            }
            // One call renews every group held, not only those due: their expiries then stay
            // aligned (a group taken over later would otherwise cost a call of its own forever).
            let fence = match &self.share {
                Some(s) => {
                    let names: Vec<String> = held.iter().map(|g| g.name.clone()).collect();
                    let g = s.guard(&names).await;
                    for (name, why) in &g.refused {
                        tracing::warn!(group = %name, reason = %why, "takeover record not written");
                    }
                    held.retain(|h| g.ok.contains(&h.name));
                    Some(g.fence)
                }
                None => None,
            };
            self.write_records(&held, &resumes, fence).await?;
        }
        for name in to_suspend {
            let expires = self.taken.get(&name).map(|t| t.lock.expires);
            if let Err(refusal) = takeover::may_mutate(read_at.elapsed(), expires, now()) {
                tracing::warn!(group = %name, reason = %refusal, "HealthCheck not suspended; the group is read again next round");
                held.retain(|g| g.name != name);
                continue;
            }
            let fence = match &self.share {
                Some(s) => {
                    let g = s.guard(std::slice::from_ref(&name)).await;
                    if let Some((_, why)) = g.refused.first() {
                        tracing::warn!(group = %name, reason = %why, "HealthCheck not suspended");
                        held.retain(|h| h.name != name);
                        continue;
                    }
                    Some(g.fence)
                }
                None => None,
            };
            let (client, group) = (self.aws.autoscaling.clone(), name.clone());
            let suspend =
                async move { autoscaling::suspend(&client, &group, &[HEALTH_CHECK]).await };
            match self.run_to_the_end(Vec::new(), suspend, fence).await {
                Landed::Done => {}
                Landed::Failed(e) => return Err(e),
                Landed::Lost => {
                    tracing::warn!(group = %name, "HealthCheck suspension abandoned: the group's lease ran out meanwhile");
                    held.retain(|h| h.name != name);
                    continue;
                }
            }
            tracing::info!(group = %name, "took over health decisions: HealthCheck suspended, ReplaceUnhealthy left on");
        }
        Ok(held)
    }

    /// Writes the takeover records of `held` in one call (one call carries many groups' tags).
    async fn write_records(
        &mut self,
        held: &[GroupFacts],
        resumes: &BTreeMap<String, bool>,
        fence: Option<crate::lease::Fence>,
    ) -> Result<(), AwsError> {
        if held.is_empty() {
            return Ok(());
        }
        let lock = Lock {
            expires: now().saturating_add(self.config.takeover_ttl.as_secs()),
            ..self.me.clone()
        };
        let records: Vec<(String, Takeover)> = held
            .iter()
            .map(|g| {
                let t = Takeover {
                    lock: lock.clone(),
                    resumes: resumes.get(&g.name).copied().unwrap_or(true),
                };
                (g.name.clone(), t)
            })
            .collect();
        let shared = self.share.is_some();
        let values: Vec<(String, String)> = records
            .iter()
            .zip(held)
            .map(|((n, t), g)| {
                let v = if shared {
                    takeover::with_config(&t.encode(), &self.config.fingerprint(&g.name, &g.tags))
                } else {
                    t.encode()
                };
                (n.clone(), v)
            })
            .collect();
        let client = self.aws.autoscaling.clone();
        let write = async move {
            let tags: Vec<(&str, &str, &str)> = values
                .iter()
                .map(|(n, v)| (n.as_str(), TAKEOVER_TAG, v.as_str()))
                .collect();
            autoscaling::set_tags_many(&client, &tags).await
        };
        match self.run_to_the_end(records.clone(), write, fence).await {
            Landed::Done => {}
            Landed::Failed(e) => return Err(e),
            Landed::Lost => {
                tracing::warn!("takeover records abandoned: a group's lease ran out meanwhile");
                return Ok(());
            }
        }
        self.taken.extend(records);
        Ok(())
    }

    /// The effective interval from the groups held, logged when it changes.
    fn update_pace(&mut self) {
        let estimate = reads::from_groups(&self.config, &self.known.groups);
        let (rate, interval) = (self.config.api_rate, self.config.interval);
        let pace = reads::effective_interval(&estimate, rate, interval);
        if pace.as_millis() == self.pace.as_millis() {
            return;
        }
        match reads::advice(&estimate, rate, interval) {
            Some(a) => {
                tracing::warn!(effective_interval_s = pace.as_secs_f64(), interval_s = interval.as_secs_f64(), calls_per_round = estimate.per_round(), api_rate = rate, advice = %a, "the API budget cannot cover a round within the interval: rounds stretch to what it allows");
            }
            None => {
                tracing::info!(
                    interval_s = interval.as_secs_f64(),
                    calls_per_round = estimate.per_round(),
                    api_rate = rate,
                    "rounds come at the configured interval"
                );
            }
        }
        self.pace = pace;
        self.metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .effective_interval = pace;
    }
}

/// One read, under the caller's scope (its call policy).
async fn read_one(aws: &Aws, read: &Read, undescribed: &[String]) -> Result<Answer, AwsError> {
    match read {
        Read::StatusChecks => ec2::impaired(&aws.ec2).await.map(Answer::Status),
        Read::Addresses => ec2::addresses(&aws.ec2, undescribed)
            .await
            .map(Answer::Addresses),
        Read::TargetHealth(tg) => {
            let h = elbv2::target_health(&aws.elb, tg).await?;
            let states = h
                .into_iter()
                .map(|(id, t)| {
                    (
                        id,
                        TargetState {
                            state: t.state,
                            reason: t.reason,
                        },
                    )
                })
                .collect();
            Ok(Answer::Health(tg.clone(), states))
        }
    }
}

/// What `bakery daemon --check` says beyond "valid": whether the API budget covers a round
/// within the interval, estimated from the configuration alone (one target group per group).
pub fn check_notes(config: &Config) -> Vec<String> {
    let estimate = reads::from_config(config);
    match reads::advice(&estimate, config.api_rate, config.interval) {
        Some(a) => vec![format!("warning: {a} (estimated from the configuration: one target group per [[group]])")],
        None => vec![format!(
            "about {:.1} API calls per round (estimated: one target group per [[group]]), within interval {}s x [api] rate {}/s",
            estimate.per_round(),
            config.interval.as_secs_f64(),
            config.api_rate
        )],
    }
}
