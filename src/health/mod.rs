//! The health daemon (`bakery daemon`): keeps fleets healthy between releases.
//!
//! Every interval it reads each watched group's instances, the target health of every target
//! group they are attached to (one call per target group), the EC2 status checks (two filtered
//! calls) and its own optional probes, counts consecutive failures per instance, and asks
//! [`decide::decide`] what to replace. Replacement goes through the group
//! (`SetInstanceHealth Unhealthy`), so the group's own machinery launches the successor.
//!
//! A round starts on the interval's beat with the probes, judges them together with the API's
//! answers read at the end of the previous round, acts, and then reads the API for the next
//! round. So API latency (a loaded or throttling endpoint) does not shift the probes, and a
//! killed app is marked within interval x threshold plus the probe's own time.
//!
//! While it runs it owns the health decisions of its groups: it suspends their `HealthCheck`
//! process (ELB health alone no longer kills instances, so the fleet breaker means something) and
//! records the takeover in a tag with owner and expiry; it resumes `HealthCheck` when it stops.

pub use bakery_core::daemon_config as config;
pub use bakery_core::judge as decide;
pub mod metrics;
pub mod probe;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

use crate::aws::{autoscaling, budget, ec2, elbv2, Aws, AwsError};
use crate::rollout::state::{Lock, LOCK_TAG};
use bakery_core::diag::FileError;
use config::{Config, Selector};
use decide::{Breaker, GroupView, InstanceView};
use probe::ProbeState;

/// The tag recording which daemon owns a group's health decisions.
pub use bakery_core::marks::TAKEOVER_TAG;
const HEALTH_CHECK: &str = "HealthCheck";

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
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[derive(Debug, Default)]
struct InstanceState {
    consecutive: u32,
    probe: ProbeState,
    ip: Option<String>,
    launched: u64,
}

struct Daemon {
    aws: Aws,
    config: Config,
    me: Lock,
    metrics: metrics::Shared,
    instances: BTreeMap<String, InstanceState>,
    /// Replacement times per group, for the window.
    replaced: BTreeMap<String, Vec<u64>>,
    replaced_total: BTreeMap<String, u64>,
    /// Groups whose health decisions this daemon owns, with the takeover's expiry.
    taken: BTreeMap<String, u64>,
    /// Groups whose state was last reported (frozen or owned elsewhere), to log transitions once.
    frozen: BTreeSet<String>,
    foreign: BTreeSet<String>,
}

/// What the API said about the watched groups: read at the end of a round, judged at the start
/// of the next one together with fresh probes.
struct Facts {
    groups: Vec<autoscaling::Group>,
    impaired: BTreeMap<String, String>,
    health: BTreeMap<String, BTreeMap<String, elbv2::TargetState>>,
}

/// What one round saw, before deciding.
struct Observation {
    views: Vec<GroupView>,
    evidence: BTreeMap<String, Vec<String>>,
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(aws: Aws, config: Config) -> Result<(), DaemonError> {
    let config_path = config.path.clone();
    budget::set_global(config.api_rate, config.api_burst);
    crate::aws::set_retry_budget(retry_budget(config.interval));
    let watchdog = watchdog_period();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;
    let metrics: metrics::Shared = Arc::new(Mutex::new(metrics::Snapshot {
        interval: config.interval,
        ..Default::default()
    }));
    let server = tokio::spawn(metrics::serve(listener, metrics.clone()));
    tracing::info!(config = %config_path.display(), listen = %config.listen, interval_s = config.interval.as_secs_f64(), groups = config.groups.len(), "daemon starting");
    let mut d = Daemon {
        aws,
        me: Lock {
            owner: crate::host::owner(),
            token: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
            since: now(),
            expires: 0,
        },
        config,
        metrics,
        instances: BTreeMap::new(),
        replaced: BTreeMap::new(),
        replaced_total: BTreeMap::new(),
        taken: BTreeMap::new(),
        frozen: BTreeSet::new(),
        foreign: BTreeSet::new(),
    };
    if let Err(e) = d.undo_stale_takeovers().await {
        tracing::warn!(error = %e, "could not look for stale takeovers; continuing");
    }
    let mut stop = crate::signals::Signals::new();
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut ready = false;
    // The API's answers for the next round, read at the end of this one. A round starts with its
    // probes, on the interval's own beat whatever the API's latency (a slow or throttled
    // DescribeInstanceStatus no longer delays the probes, so detection stays within interval x
    // threshold), and judges them with facts at most one interval old.
    let mut facts: Option<Facts> = None;
    let reason = 'outer: loop {
        let started = Instant::now();
        // A slow round (an API in trouble, every call timing out) is not a stuck one: the
        // watchdog hears from us through it, up to the stuck limit. Past that, systemd restarts
        // the daemon.
        let stuck_at = started + stuck_limit(d.config.interval);
        let end = {
            let round = d.round(&mut facts, &mut stop);
            tokio::pin!(round);
            loop {
                tokio::select! {
                    e = &mut round => break e,
                    _ = watchdog_tick(watchdog) => {
                        if Instant::now() < stuck_at {
                            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                        }
                    }
                }
            }
        };
        let ok = match end {
            RoundEnd::Stop(sig) => break 'outer sig,
            RoundEnd::Done(ok) => ok,
        };
        let took = started.elapsed();
        if took > d.config.interval {
            tracing::warn!(
                round_s = took.as_secs_f64(),
                interval_s = d.config.interval.as_secs_f64(),
                api_rate = d.config.api_rate,
                "a round took longer than the interval: detection is slower than configured; raise [api] rate or the interval"
            );
        }
        d.record_round(took, ok);
        release_freed_memory();
        if !ready {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            ready = true;
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        // The pause until the next round; the watchdog hears from us through it too (an
        // interval may be longer than WatchdogSec).
        let wake =
            tokio::time::Instant::now() + d.config.interval.saturating_sub(started.elapsed());
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                _ = watchdog_tick(watchdog) => {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
                sig = stop.next() => break 'outer sig,
                _ = recv_hup(&mut hup) => {
                    d.reload();
                    // Facts read for the old configuration's groups are not judged by the new.
                    facts = None;
                    break;
                }
            }
        }
    };
    tracing::info!(
        signal = %reason,
        "stopping: handing health decisions back to the groups"
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    d.release_all().await;
    server.abort();
    Ok(())
}

/// Why a replacement decided on older facts must not happen now, if it must not: the group
/// (read again just before acting) is gone, a rollout holds it, or the instance is no longer an
/// in-service, healthy member.
fn still_replaceable(
    fresh: Option<&BTreeMap<String, autoscaling::Group>>,
    group: &str,
    id: &str,
) -> Option<String> {
    let Some(fresh) = fresh else {
        return Some("the group could not be read again".into());
    };
    let Some(g) = fresh.get(group) else {
        return Some("the group is gone".into());
    };
    if let Some(l) = g.tags.get(LOCK_TAG).and_then(|l| Lock::decode(l)) {
        if l.expires > now() {
            return Some(format!("a rollout by {} holds the group", l.owner));
        }
    }
    match g.instances.iter().find(|i| i.id == id) {
        None => Some("no longer in the group".into()),
        Some(i) if i.lifecycle != "InService" => Some(format!("now {}", i.lifecycle)),
        Some(i) if i.health == "Unhealthy" => Some("already marked Unhealthy".into()),
        Some(_) => None,
    }
}

/// Gives the memory a round allocated and freed back to the system. glibc keeps freed heap in
/// its arenas (one per thread that allocated), so a long-running daemon would otherwise hold its
/// busiest round's peak for ever; trimming costs well under a millisecond once a round.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // The project's one unsafe block: glibc has no safe binding for malloc_trim.
    // SAFETY: malloc_trim only returns free memory of glibc's own arenas to the kernel.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How a round ended.
enum RoundEnd {
    /// The round ran; whether its API reads succeeded.
    Done(bool),
    /// A stop signal arrived (reading and probing may be cut short; acting never is).
    Stop(crate::signals::Signal),
}

/// How long a round may take before the daemon counts as stuck (and stops feeding the
/// watchdog): its reads are bounded by [`read_budget`], its probes by their timeouts and its
/// replacements by the calls' attempt timeout and retry budget; this is well past all of them.
fn stuck_limit(interval: Duration) -> Duration {
    Duration::from_secs(120) + interval
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

/// How long one call's retries may sleep: within the interval (the next round asks again
/// anyway).
fn retry_budget(interval: Duration) -> Duration {
    interval.clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// How long a round's API reads (both of them, in the first round) may take before the round
/// counts as failed: an endpoint that hangs or a region that is down must not stall the loop.
fn read_budget(interval: Duration) -> Duration {
    (interval * 2).clamp(Duration::from_secs(5), Duration::from_secs(20))
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
    fn reload(&mut self) {
        match config::load(&self.config.path) {
            Ok(c) => {
                if c.listen != self.config.listen {
                    tracing::warn!(old = %self.config.listen, new = %c.listen, "`listen` changes take effect at the next start");
                }
                budget::set_global(c.api_rate, c.api_burst);
                crate::aws::set_retry_budget(retry_budget(c.interval));
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
            }
            Err(e) => {
                tracing::error!(error = %e, "reload failed; keeping the running configuration");
            }
        }
    }

    /// Takeovers whose owner is gone (expired, or a dead process on this host) are undone.
    async fn undo_stale_takeovers(&mut self) -> Result<(), AwsError> {
        let groups = autoscaling::describe_many(
            &self.aws.autoscaling,
            &[],
            &[(TAKEOVER_TAG.to_string(), None)],
        )
        .await?;
        for g in groups {
            let Some(l) = g.tags.get(TAKEOVER_TAG).and_then(|t| Lock::decode(t)) else {
                continue;
            };
            if l.is_stale(now(), &crate::host::hostname(), crate::host::pid_alive) {
                tracing::warn!(group = %g.name, owner = %l.owner, "undoing a stale takeover: resuming HealthCheck");
                autoscaling::resume(&self.aws.autoscaling, &g.name, &[HEALTH_CHECK]).await?;
                autoscaling::delete_tags(&self.aws.autoscaling, &g.name, &[TAKEOVER_TAG]).await?;
            }
        }
        Ok(())
    }

    fn threshold_for(&self, g: &autoscaling::Group) -> (u32, Option<&config::Probe>) {
        let cfg = self.config.groups.iter().find(|c| match &c.selector {
            Selector::Name(n) => *n == g.name,
            Selector::Tag { key, value } => match value {
                Some(v) => g.tags.get(key) == Some(v),
                None => g.tags.contains_key(key),
            },
        });
        (
            cfg.and_then(|c| c.unhealthy_threshold)
                .unwrap_or(self.config.unhealthy_threshold),
            cfg.and_then(|c| c.probe.as_ref()),
        )
    }

    /// Takes over the group's health decisions (suspending `HealthCheck`); false if another
    /// daemon owns them. Returns whether the takeover tag is due for renewal in `due`.
    async fn take_over(
        &mut self,
        g: &autoscaling::Group,
        due: &mut Vec<String>,
    ) -> Result<bool, AwsError> {
        if let Some(l) = g.tags.get(TAKEOVER_TAG).and_then(|t| Lock::decode(t)) {
            if l.token != self.me.token
                && !l.is_stale(now(), &crate::host::hostname(), crate::host::pid_alive)
            {
                if self.foreign.insert(g.name.clone()) {
                    tracing::warn!(group = %g.name, owner = %l.owner, "another daemon owns this group's health decisions; watching only");
                }
                return Ok(false);
            }
        }
        self.foreign.remove(&g.name);
        let ttl = self.config.takeover_ttl().as_secs();
        let mut renew = match self.taken.get(&g.name) {
            // Renew once a third of the lifetime is used.
            Some(expires) => expires.saturating_sub(now()) < ttl * 2 / 3,
            None => true,
        };
        if !g.suspended.iter().any(|p| p == HEALTH_CHECK) {
            // The takeover is recorded (tag, and `taken` for the stop) before it is made, so a
            // stop or a crash at any point leaves a record the stop, the next start and
            // `bakery gc` undo: never a suspended HealthCheck nobody knows about.
            if renew {
                self.renew(std::slice::from_ref(&g.name)).await?;
                renew = false;
            }
            autoscaling::suspend(&self.aws.autoscaling, &g.name, &[HEALTH_CHECK]).await?;
            tracing::info!(group = %g.name, "took over health decisions: HealthCheck suspended, ReplaceUnhealthy left on");
        }
        if renew {
            due.push(g.name.clone());
        }
        Ok(true)
    }

    /// Writes the takeover tags of `groups` in one call (one call carries many groups' tags).
    async fn renew(&mut self, groups: &[String]) -> Result<(), AwsError> {
        if groups.is_empty() {
            return Ok(());
        }
        let lock = Lock {
            expires: now() + self.config.takeover_ttl().as_secs(),
            ..self.me.clone()
        };
        let value = lock.encode();
        let tags: Vec<(&str, &str, &str)> = groups
            .iter()
            .map(|g| (g.as_str(), TAKEOVER_TAG, value.as_str()))
            .collect();
        autoscaling::set_tags_many(&self.aws.autoscaling, &tags).await?;
        for g in groups {
            self.taken.insert(g.clone(), lock.expires);
        }
        Ok(())
    }

    async fn release_all(&mut self) {
        budget::bypass();
        let mut set = tokio::task::JoinSet::new();
        for group in self.taken.keys().cloned() {
            let asg = self.aws.autoscaling.clone();
            set.spawn(async move {
                let r = tokio::time::timeout(Duration::from_millis(900), async {
                    autoscaling::resume(&asg, &group, &[HEALTH_CHECK]).await?;
                    autoscaling::delete_tags(&asg, &group, &[TAKEOVER_TAG]).await
                })
                .await;
                (group, r)
            });
        }
        while let Some(Ok((group, r))) = set.join_next().await {
            match r {
                Ok(Ok(())) => tracing::info!(group = %group, "HealthCheck resumed"),
                Ok(Err(e)) => {
                    tracing::error!(group = %group, error = %e, "could not resume HealthCheck; the next daemon start or `bakery gc` will")
                }
                Err(_) => {
                    tracing::error!(group = %group, "resuming HealthCheck timed out; the next daemon start or `bakery gc` will")
                }
            }
        }
    }

    /// One round: probes judged with the facts read at the end of the last round (read now if
    /// there are none), the replacements, and the reads for the next round; all reads within
    /// the round's [`read_budget`].
    async fn round(
        &mut self,
        facts: &mut Option<Facts>,
        stop: &mut crate::signals::Signals,
    ) -> RoundEnd {
        let budget = read_budget(self.config.interval);
        let deadline = tokio::time::Instant::now() + budget;
        let failed = |e: String| {
            tracing::warn!(error = %e, "round failed; the daemon keeps going");
            RoundEnd::Done(false)
        };
        let current = match facts.take() {
            Some(f) => f,
            None => match tokio::select! {
                f = self.fetch_until(deadline, budget) => f,
                sig = stop.next() => return RoundEnd::Stop(sig),
            } {
                Ok(f) => f,
                Err(e) => return failed(e),
            },
        };
        let obs = tokio::select! {
            o = self.judge(current) => o,
            sig = stop.next() => return RoundEnd::Stop(sig),
        };
        // Acting is short and never cut in half.
        self.act(obs).await;
        match tokio::select! {
            f = self.fetch_until(deadline, budget) => f,
            sig = stop.next() => return RoundEnd::Stop(sig),
        } {
            Ok(f) => {
                *facts = Some(f);
                RoundEnd::Done(true)
            }
            Err(e) => failed(e),
        }
    }

    /// [`Daemon::fetch`], given up at `deadline`.
    async fn fetch_until(
        &mut self,
        deadline: tokio::time::Instant,
        budget: Duration,
    ) -> Result<Facts, String> {
        match tokio::time::timeout_at(deadline, self.fetch()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "the API did not answer within {}s; the next round asks again",
                budget.as_secs()
            )),
        }
    }

    /// The API reads of a round: the groups (taking over new ones, renewing takeovers), the
    /// facts of instances not seen before, EC2 status checks and every target group's health.
    async fn fetch(&mut self) -> Result<Facts, AwsError> {
        let names: Vec<String> = self
            .config
            .groups
            .iter()
            .filter_map(|g| match &g.selector {
                Selector::Name(n) => Some(n.clone()),
                _ => None,
            })
            .collect();
        let tags: Vec<(String, Option<String>)> = self
            .config
            .groups
            .iter()
            .filter_map(|g| match &g.selector {
                Selector::Tag { key, value } => Some((key.clone(), value.clone())),
                _ => None,
            })
            .collect();
        let all = autoscaling::describe_many(&self.aws.autoscaling, &names, &tags).await?;
        for n in &names {
            if !all.iter().any(|g| &g.name == n) {
                tracing::warn!(group = %n, "watched group not found");
            }
        }
        let mut groups = Vec::new();
        let mut due = Vec::new();
        for g in all {
            if self.take_over(&g, &mut due).await? {
                groups.push(g);
            }
        }
        if !due.is_empty() {
            // One call renews every group held, not only those due: their expiries then stay
            // aligned (a group taken over later would otherwise cost a call of its own forever).
            due = groups
                .iter()
                .filter(|g| self.taken.contains_key(&g.name))
                .map(|g| g.name.clone())
                .collect();
        }
        self.renew(&due).await?;
        // Instance facts that never change, fetched once per instance.
        let ids: BTreeSet<String> = groups
            .iter()
            .flat_map(|g| g.instances.iter().map(|i| i.id.clone()))
            .collect();
        self.instances.retain(|id, _| ids.contains(id));
        // Addresses and launch times never change: fetched once, and asked again next round
        // for any instance EC2 did not describe yet (eventual consistency).
        let unknown: Vec<String> = ids
            .iter()
            .filter(|id| self.instances.get(*id).is_none_or(|st| st.launched == 0))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            for (id, (ip, launched)) in ec2::addresses(&self.aws.ec2, &unknown).await? {
                let st = self.instances.entry(id).or_default();
                st.ip = ip;
                st.launched = launched;
            }
        }

        let impaired = ec2::impaired(&self.aws.ec2).await?;
        // One DescribeTargetHealth per target group, all at once (each still waits on the budget).
        let target_groups: BTreeSet<String> = groups
            .iter()
            .flat_map(|g| g.target_group_arns.iter().cloned())
            .collect();
        let mut calls = tokio::task::JoinSet::new();
        for tg in target_groups {
            let elb = self.aws.elb.clone();
            calls.spawn(async move {
                let h = elbv2::target_health(&elb, &tg).await;
                (tg, h)
            });
        }
        let mut health = BTreeMap::new();
        while let Some(joined) = calls.join_next().await {
            if let Ok((tg, h)) = joined {
                health.insert(tg, h?);
            }
        }
        Ok(Facts {
            groups,
            impaired,
            health,
        })
    }

    /// Probes the in-service instances and puts every signal together, per group.
    async fn judge(&mut self, facts: Facts) -> Observation {
        let Facts {
            groups,
            impaired,
            health,
        } = facts;
        let now = now();

        // Own probes, all at once within the concurrency bound.
        let semaphore = Arc::new(tokio::sync::Semaphore::new(self.config.probe_concurrency));
        let mut probes = tokio::task::JoinSet::new();
        for g in &groups {
            let (_, probe) = self.threshold_for(g);
            let Some(probe) = probe.cloned() else {
                continue;
            };
            for i in g.instances.iter().filter(|i| i.lifecycle == "InService") {
                let Some(ip) = self.instances.get(&i.id).and_then(|s| s.ip.clone()) else {
                    continue;
                };
                let Ok(ip) = ip.parse::<IpAddr>() else {
                    continue;
                };
                let (id, probe, sem) = (i.id.clone(), probe.clone(), semaphore.clone());
                probes.spawn(async move {
                    let _permit = sem.acquire().await;
                    (id, probe::probe(ip, &probe).await, probe)
                });
            }
        }
        let mut probe_errors = BTreeMap::new();
        while let Some(r) = probes.join_next().await {
            if let Ok((id, result, p)) = r {
                if let Some(st) = self.instances.get_mut(&id) {
                    st.probe.record(result.is_ok(), &p);
                    if st.probe.unhealthy {
                        let why = result.err().unwrap_or_else(|| "recovering".into());
                        probe_errors.insert(
                            id,
                            format!(
                                "probe :{}: {why} ({} failed in a row)",
                                p.port, st.probe.failures
                            ),
                        );
                    }
                }
            }
        }

        let mut views = Vec::new();
        let mut evidence = BTreeMap::new();
        for g in &groups {
            let (threshold, probe_cfg) = self.threshold_for(g);
            let has_probe = probe_cfg.is_some();
            let mut instances = Vec::new();
            for i in &g.instances {
                let st = self.instances.entry(i.id.clone()).or_default();
                // An instance already marked Unhealthy is the group's to replace: judging it
                // again would count it twice (against the breaker and the window).
                let judged = i.lifecycle == "InService"
                    && i.health != "Unhealthy"
                    && st.launched > 0
                    && now.saturating_sub(st.launched) >= g.health_check_grace_period.max(0) as u64;
                let mut failing = Vec::new();
                let mut all = Vec::new();
                for tg in &g.target_group_arns {
                    let short = tg.rsplit(':').next().unwrap_or(tg);
                    match health.get(tg).and_then(|h| h.get(&i.id)) {
                        Some(t) if t.state == "unhealthy" => {
                            let s = format!(
                                "{short}: unhealthy ({})",
                                t.reason.clone().unwrap_or_default()
                            );
                            failing.push(s.clone());
                            all.push(s);
                        }
                        Some(t) => all.push(format!("{short}: {}", t.state)),
                        None => all.push(format!("{short}: not registered")),
                    }
                }
                match impaired.get(&i.id) {
                    Some(e) => {
                        failing.push(e.clone());
                        all.push(e.clone());
                    }
                    None => all.push("EC2 status checks: not impaired".into()),
                }
                match probe_errors.get(&i.id) {
                    Some(e) => {
                        failing.push(e.clone());
                        all.push(e.clone());
                    }
                    None if has_probe && st.ip.is_none() => {
                        all.push("probe: no address yet".into())
                    }
                    None if has_probe => all.push("probe: ok".into()),
                    None => {}
                }
                if judged {
                    st.consecutive = if failing.is_empty() {
                        0
                    } else {
                        st.consecutive + 1
                    };
                } else {
                    st.consecutive = 0;
                }
                evidence.insert(i.id.clone(), all);
                instances.push(InstanceView {
                    id: i.id.clone(),
                    judged,
                    failing,
                    consecutive: st.consecutive,
                });
            }
            let rollout_in_progress = g
                .tags
                .get(LOCK_TAG)
                .and_then(|l| Lock::decode(l))
                .is_some_and(|l| l.expires > now);
            let max_replace = self.config.max_replace.resolve(g.desired.max(1)).max(1);
            let times = self.replaced.entry(g.name.clone()).or_default();
            times.retain(|t| now.saturating_sub(*t) < self.config.window.as_secs());
            views.push(GroupView {
                name: g.name.clone(),
                instances,
                rollout_in_progress,
                replaced_in_window: decide::in_window(times, now, self.config.window),
                max_replace,
                threshold,
            });
        }
        Observation { views, evidence }
    }

    async fn act(&mut self, obs: Observation) {
        let breaker = Breaker {
            freeze_above: self.config.freeze_above,
            freeze_above_all: self.config.freeze_above_all,
        };
        let verdicts = decide::decide(&obs.views, &breaker);
        // The facts are up to an interval old: before marking anything, the groups concerned are
        // read again (one call), so that a rollout that took its lock since, or an instance
        // already leaving, is left alone.
        let pending: Vec<String> = verdicts
            .iter()
            .filter(|v| !v.replace.is_empty())
            .map(|v| v.group.clone())
            .collect();
        let fresh: Option<BTreeMap<String, autoscaling::Group>> = if pending.is_empty() {
            Some(BTreeMap::new())
        } else {
            match autoscaling::describe_many(&self.aws.autoscaling, &pending, &[]).await {
                Ok(gs) => Some(gs.into_iter().map(|g| (g.name.clone(), g)).collect()),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the groups again before replacing; nothing replaced this round");
                    None
                }
            }
        };
        let mut snapshot_groups = BTreeMap::new();
        for v in &verdicts {
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
            for (id, reason) in &v.replace {
                let evidence = obs.evidence.get(id).cloned().unwrap_or_default().join("; ");
                if let Some(why) = still_replaceable(fresh.as_ref(), &v.group, id) {
                    tracing::info!(group = %v.group, instance = %id, reason = %why, "replacement held back");
                    continue;
                }
                match autoscaling::set_unhealthy(&self.aws.autoscaling, id).await {
                    Ok(()) => {
                        tracing::warn!(group = %v.group, instance = %id, reason = %reason, evidence = %evidence, "marked unhealthy: the group replaces it");
                        self.replaced
                            .entry(v.group.clone())
                            .or_default()
                            .push(now());
                        *self.replaced_total.entry(v.group.clone()).or_default() += 1;
                        if let Some(st) = self.instances.get_mut(id) {
                            st.consecutive = 0;
                        }
                    }
                    Err(e) => {
                        tracing::error!(group = %v.group, instance = %id, error = %e, "could not mark unhealthy")
                    }
                }
            }
            snapshot_groups.insert(
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
            );
        }
        let all_total: u32 = verdicts.iter().map(|v| v.total).sum();
        let all_bad: u32 = verdicts.iter().map(|v| v.unhealthy).sum();
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.groups = snapshot_groups;
        m.fleet_frozen = all_total > 0
            && f64::from(all_bad) * 100.0 / f64::from(all_total)
                > f64::from(self.config.freeze_above_all);
    }

    fn record_round(&mut self, took: Duration, ok: bool) {
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.loops += 1;
        m.last_loop = took;
        if ok {
            m.last_round_at = now();
        } else {
            m.loop_errors += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(tags: &[(&str, String)], instances: &[(&str, &str, &str)]) -> autoscaling::Group {
        autoscaling::Group {
            name: "web".into(),
            desired: 2,
            min: 2,
            max: 4,
            launch_template: None,
            uses_mixed_instances_policy: false,
            mixed_launch_templates: Vec::new(),
            uses_launch_configuration: None,
            target_group_arns: Vec::new(),
            subnets: Vec::new(),
            health_check_type: "ELB".into(),
            health_check_grace_period: 0,
            instances: instances
                .iter()
                .map(|(id, lifecycle, health)| autoscaling::GroupInstance {
                    id: id.to_string(),
                    lifecycle: lifecycle.to_string(),
                    health: health.to_string(),
                    launch_template_version: None,
                    availability_zone: "a".into(),
                })
                .collect(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            suspended: Vec::new(),
        }
    }

    fn fresh(g: autoscaling::Group) -> BTreeMap<String, autoscaling::Group> {
        BTreeMap::from([(g.name.clone(), g)])
    }

    #[test]
    fn a_replacement_decided_on_older_facts_is_held_when_things_changed() {
        let members = [
            ("i-1", "InService", "Healthy"),
            ("i-2", "Terminating", "Healthy"),
            ("i-3", "InService", "Unhealthy"),
        ];
        let plain = fresh(group(&[], &members));
        assert_eq!(still_replaceable(Some(&plain), "web", "i-1"), None);
        assert!(still_replaceable(Some(&plain), "web", "i-2")
            .unwrap()
            .contains("Terminating"));
        assert!(still_replaceable(Some(&plain), "web", "i-3")
            .unwrap()
            .contains("already marked"));
        assert!(still_replaceable(Some(&plain), "web", "i-9")
            .unwrap()
            .contains("no longer"));
        assert!(still_replaceable(Some(&plain), "api", "i-1")
            .unwrap()
            .contains("gone"));
        assert!(still_replaceable(None, "web", "i-1").is_some());

        let lock = |expires: u64| Lock {
            owner: "ci:42".into(),
            token: "t".into(),
            since: now(),
            expires,
        };
        let locked = fresh(group(&[(LOCK_TAG, lock(now() + 60).encode())], &members));
        assert!(still_replaceable(Some(&locked), "web", "i-1")
            .unwrap()
            .contains("rollout by ci:42"));
        let expired = fresh(group(&[(LOCK_TAG, lock(now() - 1).encode())], &members));
        assert_eq!(still_replaceable(Some(&expired), "web", "i-1"), None);
    }
}
