//! The rollout's decisions, as pure functions over plain data: given what the group looks like
//! now and what the rollout has recorded, what is the next step? No I/O here, so every rule is
//! unit-tested, and the loop in [`super`] only observes, asks, acts and repeats.
//!
//! The strategy is surge-first: raise the desired capacity by one batch, wait until the new
//! instances are in service, warmed up and healthy in every target group, then retire as many
//! old instances (old = not on the target image and version) while lowering the desired
//! capacity again. So the capacity in service never drops below the original desired capacity
//! minus `max_unavailable`.
//!
//! Inside the group it behaves as ASG Instance Refresh does ([`crate::ingroup`]): instances that
//! match the [`Target`] (image and launch-template version) are not replaced; scale-in-protected
//! and Standby instances follow their [`InstancePolicy`]; instances held by lifecycle hooks are
//! waited for, never released; old warm-pool instances are refreshed before any batch;
//! checkpoints pause the rollout; the [`Ramp`] sizes the batches.

use std::time::Duration;

pub use crate::ingroup::{InstancePolicy, Ramp};

/// A count, or a percentage of the group's desired capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    Count(u32),
    Percent(u32),
}

impl Amount {
    /// Resolves against `of`; percentages round up, as Instance Refresh does.
    pub fn resolve(self, of: u32) -> u32 {
        match self {
            Amount::Count(n) => n,
            Amount::Percent(p) => (of * p).div_ceil(100),
        }
    }
}

impl std::str::FromStr for Amount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let v: u32 = p
                .parse()
                .map_err(|_| format!("{s:?} is not a percentage (e.g. 25%)"))?;
            if v > 100 {
                return Err(format!("{s} is more than 100%"));
            }
            Ok(Amount::Percent(v))
        } else {
            s.parse()
                .map(Amount::Count)
                .map_err(|_| format!("{s:?} is not a count or a percentage (e.g. 2 or 25%)"))
        }
    }
}

/// The rollout's settings, resolved against the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The capacity to keep: the group's desired capacity when the rollout began.
    pub capacity: u32,
    /// Instances launched per batch (at least 1); with [`Ramp::Exponential`], the largest batch.
    pub surge: u32,
    /// Old instances that may be retired before their replacements are healthy.
    pub max_unavailable: u32,
    /// Size of the first batch.
    pub canary: u32,
    pub canary_bake: Duration,
    pub warmup: Duration,
    pub health_timeout: Duration,
    /// How batch sizes grow after the canary.
    pub ramp: Ramp,
    /// Percentages of the capacity replaced at which the rollout pauses (validated:
    /// ascending, 1..=100, the last 100); empty: none.
    pub checkpoints: Vec<u32>,
    pub checkpoint_pause: Duration,
    /// Old instances protected from scale in.
    pub protected: InstancePolicy,
    /// Old instances in Standby.
    pub standby: InstancePolicy,
}

/// Where the rollout stands, as recorded on the group's tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Batches started so far.
    pub batch: u32,
    /// When the current batch started (seconds since the epoch), while one is in progress.
    pub batch_started: Option<u64>,
    /// When the canary batch was first seen healthy and its bake began.
    pub canary_healthy_at: Option<u64>,
    /// The canary bake passed.
    pub canary_done: bool,
}

impl Progress {
    /// Nothing done yet.
    pub const START: Progress = Progress {
        batch: 0,
        batch_started: None,
        canary_healthy_at: None,
        canary_done: false,
    };
}

/// What this driver has seen and acted on but not recorded on the group: a resumed driver
/// starts from [`Held::resumed`] (the checkpoints already reached count as passed; a wait for
/// protected, Standby or terminating instances starts again).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Held {
    /// Since when the rollout waits only for instances it cannot move itself (protected or
    /// Standby instances under `wait`, instances held by a termination lifecycle hook).
    pub waiting_since: Option<u64>,
    /// The highest checkpoint reached, and when its pause began.
    pub checkpoint: u32,
    pub checkpoint_since: Option<u64>,
    /// Warm-pool instances this driver terminated (the pool lists them until they are gone).
    pub pool_retired: Vec<String>,
}

impl Held {
    /// A driver's starting point: checkpoints the group has already reached count as passed.
    pub fn resumed(s: &Settings, t: &Target, o: &Observed) -> Held {
        let done = percent_done(s, t, o);
        Held {
            checkpoint: s
                .checkpoints
                .iter()
                .copied()
                .filter(|&c| c <= done)
                .max()
                .unwrap_or(0),
            ..Held::default()
        }
    }

    /// Records what a decision means for the driver's own memory (before it acts on it).
    pub fn after(&mut self, d: &Decision, now: u64) {
        match d {
            Decision::Checkpoint { percent, .. } => {
                self.checkpoint = *percent;
                self.checkpoint_since = Some(now);
                self.waiting_since = None;
            }
            Decision::Hold { .. } => {
                self.waiting_since.get_or_insert(now);
            }
            Decision::RefreshPool { ids } => {
                self.pool_retired.extend(ids.iter().cloned());
                self.waiting_since = None;
            }
            Decision::Wait { .. } => {}
            _ => self.waiting_since = None,
        }
    }
}

/// What the rollout rolls out: instances that match it are not replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub ami: String,
    /// An instance matches when it runs `ami` and its launch-template version is one of these;
    /// `None`: any version (a rollback restores the image).
    pub versions: Option<Vec<String>>,
}

impl Target {
    /// Rolling out `ami` as launch-template version `to` (a copy of `from` with the image
    /// changed). With skip matching, an instance already on `ami` from `from` (identical but
    /// for nothing) matches too; without, only the instances this rollout launched do.
    pub fn rolling(ami: &str, to: &str, from: &str, skip_matching: bool) -> Target {
        let mut versions = vec![to.to_string()];
        if skip_matching && from != to {
            versions.push(from.to_string());
        }
        Target {
            ami: ami.to_string(),
            versions: Some(versions),
        }
    }

    /// Rolling back to `ami`: every instance on it matches, whatever its version.
    pub fn rollback(ami: &str) -> Target {
        Target {
            ami: ami.to_string(),
            versions: None,
        }
    }

    pub fn matches(&self, i: &Instance) -> bool {
        i.ami == self.ami
            && match &self.versions {
                None => true,
                Some(vs) => i.version.as_ref().is_some_and(|v| vs.contains(v)),
            }
    }
}

/// How an instance's target health looks across all the group's target groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetHealth {
    /// Healthy in every target group (or the group has none).
    Healthy,
    /// Not yet checked enough times (`initial`), or not registered yet.
    Initial,
    /// Unhealthy somewhere, with the load balancer's reason.
    Unhealthy(String),
}

/// One instance of the group (or of its warm pool), as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub ami: String,
    /// Its launch-template version (a number), when the group reports one.
    pub version: Option<String>,
    /// The ASG lifecycle state: `Pending`, `Pending:Wait`, `InService`, `Standby`,
    /// `Terminating:Wait`, `Warmed:Stopped`, ...
    pub lifecycle: String,
    /// Protected from scale in.
    pub protected: bool,
    /// The ASG health status is `Healthy`.
    pub asg_healthy: bool,
    pub target: TargetHealth,
    /// Launch time, seconds since the epoch.
    pub launched: u64,
}

impl Instance {
    fn live(&self) -> bool {
        !self.terminating() && !self.lifecycle.starts_with("Detach")
    }

    fn terminating(&self) -> bool {
        self.lifecycle.starts_with("Terminat") || self.lifecycle.starts_with("Warmed:Terminat")
    }

    fn standby(&self) -> bool {
        self.lifecycle == "Standby" || self.lifecycle.starts_with("EnteringStandby")
    }

    /// Counted against the desired capacity: `Pending*` and `InService` (not Standby).
    fn counted(&self) -> bool {
        self.live() && !self.standby()
    }

    fn ready(&self, now: u64, warmup: Duration) -> bool {
        self.lifecycle == "InService"
            && self.asg_healthy
            && self.target == TargetHealth::Healthy
            && now.saturating_sub(self.launched) >= warmup.as_secs()
    }

    /// Why it is not ready, for progress lines and the rollback reason.
    pub fn why_not_ready(&self, now: u64, warmup: Duration) -> String {
        if self.lifecycle.starts_with("Pending:") {
            format!(
                "{} is {} (a launching lifecycle hook holds it; it counts once InService)",
                self.id, self.lifecycle
            )
        } else if self.lifecycle != "InService" {
            format!("{} is {}", self.id, self.lifecycle)
        } else if !self.asg_healthy {
            format!("{} is Unhealthy in the group", self.id)
        } else {
            match &self.target {
                TargetHealth::Unhealthy(reason) => {
                    format!("{} is unhealthy in the target group ({reason})", self.id)
                }
                TargetHealth::Initial => {
                    format!("{} has not passed its health checks yet", self.id)
                }
                TargetHealth::Healthy => format!(
                    "{} is warming up ({}s of {}s)",
                    self.id,
                    now.saturating_sub(self.launched),
                    warmup.as_secs()
                ),
            }
        }
    }
}

/// The group as observed now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub desired: u32,
    pub instances: Vec<Instance>,
    /// The group's warm pool (empty without one).
    pub pool: Vec<Instance>,
    pub now: u64,
}

/// The next thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start batch `batch`: raise the desired capacity, and retire `retire` old instances now
    /// (without lowering the desired capacity: the group replaces them) when `max_unavailable`
    /// allows it.
    StartBatch {
        batch: u32,
        desired: u32,
        retire: Vec<String>,
    },
    /// The batch is healthy: retire these old instances and lower the desired capacity by as many.
    Retire { ids: Vec<String> },
    /// Terminate these Standby instances (`--standby-instances replace`): they are not counted
    /// in the desired capacity, so nothing replaces them and the capacity is unchanged.
    DropStandby { ids: Vec<String> },
    /// Terminate these warm-pool instances (old image or version): the pool refills from the
    /// group's launch template, which is the rollout's version now.
    RefreshPool { ids: Vec<String> },
    /// A checkpoint is reached: pause this long before the next batch.
    Checkpoint { percent: u32, pause: Duration },
    /// The canary is healthy; its bake starts now.
    StartCanaryBake,
    /// The canary bake passed.
    CanaryBaked,
    /// Nothing to do until the group changes.
    Wait { why: String },
    /// Nothing to do until someone else moves these instances (protection removed, Standby
    /// left, a termination hook completed); [`Held::waiting_since`] times it.
    Hold { why: String, ids: Vec<String> },
    /// The new instances failed; roll back.
    Fail {
        reason: String,
        instances: Vec<String>,
    },
    /// Stop without rolling back: the new instances are healthy, but the rollout cannot finish
    /// until someone else acts (it is resumable).
    Halt { reason: String },
    /// Every instance runs the target, healthy, at the original capacity (except the ones the
    /// policies leave alone: [`left_alone`]).
    Done,
}

/// How the policies classify an instance that does not match the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Replaced in a batch.
    Replace,
    /// Terminated without replacement (Standby, `replace`).
    Drop,
    /// Waited for (`wait`).
    Wait,
    /// Left as it is (`ignore`).
    Ignore,
}

fn fate(s: &Settings, i: &Instance) -> Fate {
    let policy = if i.standby() {
        s.standby
    } else if i.protected {
        s.protected
    } else {
        return Fate::Replace;
    };
    match (policy, i.standby()) {
        (InstancePolicy::Ignore, _) => Fate::Ignore,
        (InstancePolicy::Wait, _) => Fate::Wait,
        (InstancePolicy::Replace, true) => Fate::Drop,
        (InstancePolicy::Replace, false) => Fate::Replace,
    }
}

/// The old instances the policies leave as they are, with why (for the rollout's last word).
pub fn left_alone(s: &Settings, t: &Target, o: &Observed) -> Vec<(String, &'static str)> {
    o.instances
        .iter()
        .filter(|i| i.live() && !t.matches(i) && fate(s, i) == Fate::Ignore)
        .map(|i| {
            let why = if i.standby() {
                "in Standby (--standby-instances ignore)"
            } else {
                "protected from scale in (--protected-instances ignore)"
            };
            (i.id.clone(), why)
        })
        .collect()
}

/// Whether the group needs no change at all: every instance it counts, and every warm-pool
/// instance, matches the target (or is left alone by a policy), with at least the capacity.
pub fn all_match(s: &Settings, t: &Target, o: &Observed) -> bool {
    let counted: Vec<&Instance> = o.instances.iter().filter(|i| i.counted()).collect();
    counted.len() as u32 >= s.capacity
        && o.instances
            .iter()
            .filter(|i| i.live())
            .all(|i| t.matches(i) || fate(s, i) == Fate::Ignore)
        && o.pool.iter().filter(|i| i.live()).all(|i| t.matches(i))
}

/// The percentage of the capacity that runs the target (what checkpoints are measured in).
pub fn percent_done(s: &Settings, t: &Target, o: &Observed) -> u32 {
    let matching = o
        .instances
        .iter()
        .filter(|i| i.counted() && t.matches(i))
        .count() as u32;
    if s.capacity == 0 {
        return 100;
    }
    (matching * 100 / s.capacity).min(100)
}

/// The size of batch `batch` (1 is the canary) before it is capped by what is left.
pub fn batch_size(s: &Settings, batch: u32) -> u32 {
    let canary = s.canary.max(1);
    if batch <= 1 {
        return canary;
    }
    let surge = s.surge.max(1);
    match s.ramp {
        Ramp::Fixed => surge,
        // 1, 2, 4, … (from the canary's size), never above the surge.
        Ramp::Exponential => {
            let shift = (batch - 1).min(31);
            canary.saturating_mul(1u32 << shift).min(surge)
        }
    }
}

/// Decides the next step towards running `target` everywhere.
pub fn decide(s: &Settings, p: &Progress, h: &Held, t: &Target, o: &Observed) -> Decision {
    let live: Vec<&Instance> = o.instances.iter().filter(|i| i.live()).collect();
    let counted: Vec<&Instance> = live.iter().copied().filter(|i| i.counted()).collect();
    let (new, others): (Vec<&Instance>, Vec<&Instance>) =
        counted.iter().partition(|i| t.matches(i));
    let mut old: Vec<&Instance> = others
        .iter()
        .copied()
        .filter(|i| fate(s, i) == Fate::Replace)
        .collect();
    let waited: Vec<&Instance> = live
        .iter()
        .copied()
        .filter(|i| !t.matches(i) && fate(s, i) == Fate::Wait)
        .collect();
    let dropped: Vec<String> = live
        .iter()
        .filter(|i| !t.matches(i) && fate(s, i) == Fate::Drop)
        .map(|i| i.id.clone())
        .collect();
    let ignored = others
        .iter()
        .filter(|i| fate(s, i) != Fate::Replace)
        .count() as u32;
    let not_ready: Vec<&&Instance> = new.iter().filter(|i| !i.ready(o.now, s.warmup)).collect();
    let in_batch = p.batch_started.is_some();

    // A batch in progress: wait for its instances, or give up on them.
    let batch_launched = counted.len() as u32 >= o.desired;
    if in_batch && (!not_ready.is_empty() || !batch_launched) {
        let started = p.batch_started.unwrap_or(o.now);
        if o.now.saturating_sub(started) >= s.health_timeout.as_secs() {
            let mut instances: Vec<String> = not_ready.iter().map(|i| i.id.clone()).collect();
            let mut reasons: Vec<String> = not_ready
                .iter()
                .map(|i| i.why_not_ready(o.now, s.warmup))
                .collect();
            if !batch_launched {
                reasons.push(format!(
                    "the group has {} of {} instances",
                    counted.len(),
                    o.desired
                ));
            }
            instances.sort();
            return Decision::Fail {
                reason: format!(
                    "batch {} was not healthy within {}s: {}",
                    p.batch,
                    s.health_timeout.as_secs(),
                    reasons.join("; ")
                ),
                instances,
            };
        }
        let why = match not_ready.first() {
            Some(i) => i.why_not_ready(o.now, s.warmup),
            None => format!(
                "waiting for the group to launch ({} of {})",
                counted.len(),
                o.desired
            ),
        };
        return Decision::Wait { why };
    }

    // The canary: once healthy, it must stay healthy for the bake.
    if p.batch == 1 && !p.canary_done && !s.canary_bake.is_zero() {
        if let Some(since) = p.canary_healthy_at {
            if let Some(bad) = not_ready.first() {
                return Decision::Fail {
                    reason: format!(
                        "the canary turned unhealthy during its bake: {}",
                        bad.why_not_ready(o.now, s.warmup)
                    ),
                    instances: not_ready.iter().map(|i| i.id.clone()).collect(),
                };
            }
            if o.now.saturating_sub(since) >= s.canary_bake.as_secs() {
                return Decision::CanaryBaked;
            }
        }
    }

    // Oldest first: they have served longest, and AWS retires in launch order too.
    old.sort_by(|a, b| a.launched.cmp(&b.launched).then(a.id.cmp(&b.id)));

    // The batch is healthy and surged above capacity: retire as many old instances.
    if o.desired > s.capacity {
        let excess = (o.desired - s.capacity) as usize;
        let ids: Vec<String> = old.iter().take(excess).map(|i| i.id.clone()).collect();
        if !ids.is_empty() {
            return Decision::Retire { ids };
        }
        // No old instance left to retire: the surge itself is the excess.
        return Decision::Retire { ids: Vec::new() };
    }

    if p.batch == 1 && !p.canary_done && !s.canary_bake.is_zero() && p.canary_healthy_at.is_none() {
        return Decision::StartCanaryBake;
    }
    if p.batch == 1 && !p.canary_done && !s.canary_bake.is_zero() {
        return Decision::Wait {
            why: "the canary is baking".into(),
        };
    }

    // Standby instances to replace are not serving: they go first, with nothing in their place.
    if !dropped.is_empty() {
        return Decision::DropStandby { ids: dropped };
    }
    // The warm pool: the group takes its instances first on scale out, so old ones go before
    // any batch (the pool refills from the rollout's version).
    let stale: Vec<String> = o
        .pool
        .iter()
        .filter(|i| i.live() && !t.matches(i) && !h.pool_retired.contains(&i.id))
        .map(|i| i.id.clone())
        .collect();
    if !stale.is_empty() {
        return Decision::RefreshPool { ids: stale };
    }

    if old.is_empty() {
        if !not_ready.is_empty() || (new.len() as u32) + ignored < s.capacity {
            // Fewer new instances than capacity and no batch: the group is still filling up.
            return Decision::Wait {
                why: format!(
                    "{} of {} instances ready",
                    new.len() - not_ready.len(),
                    s.capacity
                ),
            };
        }
        // What is left is in someone else's hands: waited-for instances and retired instances
        // a termination lifecycle hook holds. Wait for them, for at most the health timeout.
        let terminating: Vec<&Instance> = o
            .instances
            .iter()
            .filter(|i| i.terminating() && !t.matches(i))
            .collect();
        let mut why: Vec<String> = waited
            .iter()
            .map(|i| {
                if i.standby() {
                    format!("{} is in Standby (--standby-instances wait: waiting for it to leave Standby)", i.id)
                } else {
                    format!("{} is protected from scale in (--protected-instances wait: waiting for its protection to be removed)", i.id)
                }
            })
            .collect();
        why.extend(terminating.iter().map(|i| {
            format!(
                "{} is {} (waiting for it to leave the group; a termination lifecycle hook's owner completes it, bakery never does)",
                i.id, i.lifecycle
            )
        }));
        if why.is_empty() {
            return Decision::Done;
        }
        let since = h.waiting_since.unwrap_or(o.now);
        if o.now.saturating_sub(since) >= s.health_timeout.as_secs() {
            return Decision::Halt {
                reason: format!(
                    "every other instance runs the new image, but after {}s (--health-timeout): {}",
                    s.health_timeout.as_secs(),
                    why.join("; ")
                ),
            };
        }
        let mut ids: Vec<String> = waited
            .iter()
            .chain(terminating.iter())
            .map(|i| i.id.clone())
            .collect();
        ids.sort();
        return Decision::Hold {
            why: why.join("; "),
            ids,
        };
    }

    // Checkpoints: pause once the share replaced reaches one, before the next batch.
    let done = percent_done(s, t, o);
    if let Some(&reached) = s
        .checkpoints
        .iter()
        .filter(|&&c| c > h.checkpoint && c <= done && c < 100)
        .max()
    {
        return Decision::Checkpoint {
            percent: reached,
            pause: s.checkpoint_pause,
        };
    }
    if let Some(since) = h.checkpoint_since {
        let paused = o.now.saturating_sub(since);
        if paused < s.checkpoint_pause.as_secs() {
            return Decision::Wait {
                why: format!(
                    "checkpoint {}%: paused, {}s of {}s",
                    h.checkpoint,
                    paused,
                    s.checkpoint_pause.as_secs()
                ),
            };
        }
    }

    let canary_batch = p.batch == 0;
    let mut size = batch_size(s, p.batch + 1).min(old.len() as u32);
    // Never past the next checkpoint: it pauses when its share is replaced, not after.
    if let Some(&next) = s.checkpoints.iter().find(|&&c| c > done && c < 100) {
        let needed = (s.capacity * next)
            .div_ceil(100)
            .saturating_sub(new.len() as u32);
        size = size.min(needed.max(1));
    }
    // The canary proves the new image before anything else changes: no old instance is retired
    // early while it runs. Later batches may retire up to `max_unavailable` at their start.
    let unavailable = if canary_batch {
        0
    } else {
        s.max_unavailable.min(old.len() as u32 - size)
    };
    let retire = old
        .iter()
        .skip(size as usize)
        .take(unavailable as usize)
        .map(|i| i.id.clone())
        .collect();
    Decision::StartBatch {
        batch: p.batch + 1,
        desired: s.capacity + size,
        retire,
    }
}

/// One batch of a planned rollout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlannedBatch {
    pub batch: u32,
    /// New instances the group launches for it.
    pub launched: u32,
    /// Old instances retired in it (at its start and once it is healthy).
    pub retired: u32,
    /// The desired capacity while it runs.
    pub desired: u32,
    /// The fewest instances in service while it runs (before its new ones are healthy).
    pub least_in_service: u32,
    /// The checkpoint reached once it is done (the rollout pauses there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<u32>,
}

/// The plan of a rollout (`--dry-run`): runs [`decide`] itself on a simulated group in which
/// every instance it launches is healthy at once, so the plan is what the rollout will do when
/// nothing fails. `instances` are the group's instances as observed, `pool` its warm pool's.
pub fn simulate(
    s: &Settings,
    t: &Target,
    instances: &[Instance],
    pool: &[Instance],
    now: u64,
) -> Vec<PlannedBatch> {
    let ready = |mut i: Instance, now: u64| {
        if !i.standby() {
            i.lifecycle = "InService".into();
        }
        i.asg_healthy = true;
        i.target = TargetHealth::Healthy;
        i.launched = i.launched.min(now.saturating_sub(s.warmup.as_secs()));
        i
    };
    let mut o = Observed {
        desired: s.capacity,
        instances: instances
            .iter()
            .filter(|i| i.live())
            .map(|i| ready(i.clone(), now))
            .collect(),
        pool: pool.iter().filter(|i| i.live()).cloned().collect(),
        now,
    };
    let mut p = Progress::START;
    let mut h = Held::resumed(s, t, &o);
    let version = t
        .versions
        .as_ref()
        .and_then(|v| v.first().cloned())
        .unwrap_or_default();
    let mut out: Vec<PlannedBatch> = Vec::new();
    let mut launched_so_far = 0u32;
    // Each step changes the group; the bound only guards against a planner bug looping forever.
    for _ in 0..100_000 {
        let d = decide(s, &p, &h, t, &o);
        h.after(&d, o.now);
        match d {
            Decision::StartBatch {
                batch,
                desired,
                retire,
            } => {
                o.instances.retain(|i| !retire.contains(&i.id));
                let live = o.instances.iter().filter(|i| i.counted()).count() as u32;
                let launched = desired.saturating_sub(live);
                for _ in 0..launched {
                    launched_so_far += 1;
                    o.instances.push(ready(
                        Instance {
                            id: format!("new-{launched_so_far}"),
                            ami: t.ami.clone(),
                            version: Some(version.clone()),
                            lifecycle: String::new(),
                            protected: false,
                            asg_healthy: true,
                            target: TargetHealth::Healthy,
                            launched: o.now,
                        },
                        o.now,
                    ));
                }
                o.desired = desired;
                p.batch = batch;
                p.batch_started = Some(o.now);
                out.push(PlannedBatch {
                    batch,
                    launched,
                    retired: retire.len() as u32,
                    desired,
                    least_in_service: live,
                    checkpoint: None,
                });
            }
            Decision::Retire { ids } => {
                o.instances.retain(|i| !ids.contains(&i.id));
                o.desired = if ids.is_empty() {
                    s.capacity
                } else {
                    o.desired.saturating_sub(ids.len() as u32)
                };
                if let Some(b) = out.last_mut() {
                    b.retired += ids.len() as u32;
                }
                p.batch_started = None;
            }
            Decision::DropStandby { ids } => o.instances.retain(|i| !ids.contains(&i.id)),
            Decision::RefreshPool { ids } => o.pool.retain(|i| !ids.contains(&i.id)),
            Decision::Checkpoint { percent, pause } => {
                if let Some(b) = out.last_mut() {
                    b.checkpoint = Some(percent);
                }
                o.now += pause.as_secs();
            }
            Decision::StartCanaryBake => {
                p.canary_healthy_at = Some(o.now);
                o.now += s.canary_bake.as_secs();
            }
            Decision::CanaryBaked => p.canary_done = true,
            Decision::Wait { .. } => o.now += s.canary_bake.as_secs().max(1),
            // Protected or Standby instances under `wait`: the plan ends where they block it.
            Decision::Hold { .. }
            | Decision::Done
            | Decision::Fail { .. }
            | Decision::Halt { .. } => break,
        }
    }
    out
}

/// What a rollout run should do first, given what the group's tags say and what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// No rollout in progress: start one.
    New,
    /// No rollout in progress, and the group already runs the AMI everywhere.
    AlreadyRunning,
    /// `--dry-run` with no rollout in progress: print the plan.
    PlanNew,
    /// `--dry-run` with a rollout in progress: say what a real run would do.
    PlanInProgress { would: &'static str },
    /// Continue the rollout in progress (same AMI), or its rollback.
    Resume,
    /// `--abort`: roll back the rollout in progress (or continue its rollback).
    Abort,
    /// `--force` with another AMI: a new rollout from the same starting point.
    Replace,
    /// Another AMI is being rolled out: refuse (without `--force`).
    Refuse,
    /// `--abort` with nothing in progress.
    NothingToAbort,
}

/// What was asked of a rollout run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Asked<'a> {
    /// The AMI to roll out (`None` only with `--abort`).
    pub ami: Option<&'a str>,
    pub abort: bool,
    pub force: bool,
    pub dry_run: bool,
}

/// What was observed of the group before the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Found<'a> {
    /// The AMI of the rollout in progress, from its state tag.
    pub in_progress: Option<&'a str>,
    /// Skip matching is on, the launch-template version the group launches already names the
    /// AMI asked for, and every instance (at least desired capacity of them) and warm-pool
    /// instance matches it ([`all_match`]).
    pub already_everywhere: bool,
}

/// The start decision of `bakery rollout`.
pub fn decide_start(asked: Asked, found: Found) -> Start {
    match found.in_progress {
        Some(current) => {
            let same = asked.ami == Some(current);
            let would = if asked.abort {
                Start::Abort
            } else if same {
                Start::Resume
            } else if asked.force {
                Start::Replace
            } else {
                Start::Refuse
            };
            if asked.dry_run {
                Start::PlanInProgress {
                    would: match would {
                        Start::Abort => "roll back",
                        Start::Resume => "resume",
                        Start::Replace => "replace it",
                        _ => "refuse",
                    },
                }
            } else {
                would
            }
        }
        None if asked.abort => Start::NothingToAbort,
        None if asked.dry_run => Start::PlanNew,
        None if found.already_everywhere => Start::AlreadyRunning,
        None => Start::New,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            capacity: 4,
            surge: 1,
            max_unavailable: 0,
            canary: 1,
            canary_bake: Duration::ZERO,
            warmup: Duration::ZERO,
            health_timeout: Duration::from_secs(60),
            ramp: Ramp::Fixed,
            checkpoints: vec![],
            checkpoint_pause: Duration::ZERO,
            protected: InstancePolicy::Ignore,
            standby: InstancePolicy::Ignore,
        }
    }

    /// AMI-only matching (the rules that do not depend on versions).
    fn t(ami: &str) -> Target {
        Target::rollback(ami)
    }

    fn inst(id: &str, ami: &str, target: TargetHealth, launched: u64) -> Instance {
        Instance {
            id: id.into(),
            ami: ami.into(),
            version: Some(if ami == "ami-new" { "2" } else { "1" }.into()),
            lifecycle: "InService".into(),
            protected: false,
            asg_healthy: true,
            target,
            launched,
        }
    }

    fn fleet(old: usize, new: usize) -> Vec<Instance> {
        let mut v: Vec<Instance> = (0..old)
            .map(|i| {
                inst(
                    &format!("i-old{i}"),
                    "ami-old",
                    TargetHealth::Healthy,
                    i as u64,
                )
            })
            .collect();
        v.extend((0..new).map(|i| {
            inst(
                &format!("i-new{i}"),
                "ami-new",
                TargetHealth::Healthy,
                100 + i as u64,
            )
        }));
        v
    }

    fn idle(batch: u32) -> Progress {
        Progress {
            batch,
            batch_started: None,
            canary_healthy_at: None,
            canary_done: false,
        }
    }

    #[test]
    fn amounts_parse_and_round_up() {
        assert_eq!("25%".parse::<Amount>().unwrap().resolve(4), 1);
        assert_eq!("25%".parse::<Amount>().unwrap().resolve(5), 2);
        assert_eq!("3".parse::<Amount>().unwrap().resolve(100), 3);
        assert!("150%".parse::<Amount>().is_err());
        assert!("lots".parse::<Amount>().is_err());
    }

    #[test]
    fn the_first_batch_is_the_canary_and_surges_above_capacity() {
        let o = Observed {
            desired: 4,
            instances: fleet(4, 0),
            pool: vec![],
            now: 1000,
        };
        let s = Settings {
            surge: 2,
            ..settings()
        };
        assert_eq!(
            decide(&s, &idle(0), &Held::default(), &t("ami-new"), &o),
            Decision::StartBatch {
                batch: 1,
                desired: 5,
                retire: vec![]
            }
        );
        // Later batches use the surge.
        let o = Observed {
            desired: 4,
            instances: fleet(3, 1),
            pool: vec![],
            now: 1000,
        };
        assert_eq!(
            decide(&s, &idle(1), &Held::default(), &t("ami-new"), &o),
            Decision::StartBatch {
                batch: 2,
                desired: 6,
                retire: vec![]
            }
        );
    }

    #[test]
    fn a_batch_waits_for_its_instances_and_then_retires_the_oldest() {
        let mut instances = fleet(4, 0);
        instances.push(inst("i-new0", "ami-new", TargetHealth::Initial, 900));
        let p = Progress {
            batch_started: Some(990),
            ..idle(1)
        };
        let o = Observed {
            desired: 5,
            instances: instances.clone(),
            pool: vec![],
            now: 1000,
        };
        assert!(
            matches!(decide(&settings(), &p, &Held::default(), &t("ami-new"), &o), Decision::Wait { why } if why.contains("i-new0 has not passed"))
        );

        instances[4].target = TargetHealth::Healthy;
        let o = Observed {
            desired: 5,
            instances,
            pool: vec![],
            now: 1000,
        };
        assert_eq!(
            decide(&settings(), &p, &Held::default(), &t("ami-new"), &o),
            Decision::Retire {
                ids: vec!["i-old0".into()]
            }
        );
    }

    #[test]
    fn a_batch_still_launching_is_waited_for() {
        let p = Progress {
            batch_started: Some(999),
            ..idle(1)
        };
        let o = Observed {
            desired: 5,
            instances: fleet(4, 0),
            pool: vec![],
            now: 1000,
        };
        assert!(
            matches!(decide(&settings(), &p, &Held::default(), &t("ami-new"), &o), Decision::Wait { why } if why.contains("4 of 5"))
        );
    }

    #[test]
    fn warmup_holds_a_healthy_instance_back() {
        let s = Settings {
            warmup: Duration::from_secs(30),
            ..settings()
        };
        let mut instances = fleet(4, 0);
        instances.push(inst("i-new0", "ami-new", TargetHealth::Healthy, 990));
        let p = Progress {
            batch_started: Some(985),
            ..idle(1)
        };
        let o = Observed {
            desired: 5,
            instances,
            pool: vec![],
            now: 1000,
        };
        assert!(
            matches!(decide(&s, &p, &Held::default(), &t("ami-new"), &o), Decision::Wait { why } if why.contains("warming up"))
        );
    }

    #[test]
    fn an_unhealthy_batch_past_the_timeout_fails_with_the_reason() {
        let mut instances = fleet(4, 0);
        instances.push(inst(
            "i-new0",
            "ami-new",
            TargetHealth::Unhealthy("Target.ResponseCodeMismatch".into()),
            900,
        ));
        let p = Progress {
            batch_started: Some(900),
            ..idle(1)
        };
        let o = Observed {
            desired: 5,
            instances,
            pool: vec![],
            now: 961,
        };
        let Decision::Fail { reason, instances } =
            decide(&settings(), &p, &Held::default(), &t("ami-new"), &o)
        else {
            panic!()
        };
        assert_eq!(instances, vec!["i-new0".to_string()]);
        assert!(
            reason.contains("batch 1 was not healthy within 60s"),
            "{reason}"
        );
        assert!(reason.contains("Target.ResponseCodeMismatch"), "{reason}");
    }

    #[test]
    fn the_canary_bakes_and_fails_if_it_turns_unhealthy() {
        let s = Settings {
            canary_bake: Duration::from_secs(30),
            ..settings()
        };
        let o = Observed {
            desired: 4,
            instances: fleet(3, 1),
            pool: vec![],
            now: 1000,
        };
        assert_eq!(
            decide(&s, &idle(1), &Held::default(), &t("ami-new"), &o),
            Decision::StartCanaryBake
        );
        let baking = Progress {
            canary_healthy_at: Some(990),
            ..idle(1)
        };
        assert!(matches!(
            decide(&s, &baking, &Held::default(), &t("ami-new"), &o),
            Decision::Wait { .. }
        ));
        let o_late = Observed {
            now: 1020,
            ..o.clone()
        };
        assert_eq!(
            decide(&s, &baking, &Held::default(), &t("ami-new"), &o_late),
            Decision::CanaryBaked
        );
        let mut sick = o.clone();
        sick.instances[3].target = TargetHealth::Unhealthy("Target.Timeout".into());
        assert!(
            matches!(decide(&s, &baking, &Held::default(), &t("ami-new"), &sick), Decision::Fail { reason, .. } if reason.contains("canary turned unhealthy"))
        );
        let done = Progress {
            canary_done: true,
            ..baking
        };
        assert!(matches!(
            decide(&s, &done, &Held::default(), &t("ami-new"), &o),
            Decision::StartBatch { batch: 2, .. }
        ));
    }

    #[test]
    fn done_when_every_instance_runs_the_target_at_capacity() {
        let o = Observed {
            desired: 4,
            instances: fleet(0, 4),
            pool: vec![],
            now: 1000,
        };
        assert_eq!(
            decide(&settings(), &idle(4), &Held::default(), &t("ami-new"), &o),
            Decision::Done
        );
        // A retired instance still terminating (a termination hook holds it) is waited for:
        // it does not count, and the rollout ends only once it left the group.
        let mut instances = fleet(1, 4);
        instances[0].lifecycle = "Terminating:Wait".into();
        let o = Observed {
            desired: 4,
            instances,
            pool: vec![],
            now: 1000,
        };
        let d = decide(&settings(), &idle(4), &Held::default(), &t("ami-new"), &o);
        let Decision::Hold { why, ids } = d else {
            panic!("{d:?}")
        };
        assert_eq!(ids, vec!["i-old0".to_string()]);
        assert!(
            why.contains("Terminating:Wait") && why.contains("never"),
            "{why}"
        );
    }

    // ---------------------------------------------------------------- in-group parity

    fn o(instances: Vec<Instance>, pool: Vec<Instance>) -> Observed {
        Observed {
            desired: instances.iter().filter(|i| i.counted()).count() as u32,
            instances,
            pool,
            now: 1000,
        }
    }

    fn go(s: &Settings, p: &Progress, h: &Held, t: &Target, o: &Observed) -> Decision {
        decide(s, p, h, t, o)
    }

    #[test]
    fn skip_matching_needs_the_image_and_the_version() {
        // Rolling ami-new as version 3, copied from version 2.
        let skip = Target::rolling("ami-new", "3", "2", true);
        let force = Target::rolling("ami-new", "3", "2", false);
        let mut i = inst("i-a", "ami-new", TargetHealth::Healthy, 1);
        for (version, ami, with_skip, without) in [
            ("3", "ami-new", true, true),   // launched by this rollout
            ("2", "ami-new", true, false),  // same image, the version it was copied from
            ("1", "ami-new", false, false), // same image, another version
            ("2", "ami-old", false, false), // the version, another image
        ] {
            i.version = Some(version.into());
            i.ami = ami.into();
            assert_eq!(skip.matches(&i), with_skip, "{version} {ami}");
            assert_eq!(force.matches(&i), without, "{version} {ami}");
        }
        i.version = None;
        i.ami = "ami-new".into();
        assert!(!skip.matches(&i), "no version reported: not a match");
        assert!(
            Target::rollback("ami-new").matches(&i),
            "a rollback is image-only"
        );
    }

    #[test]
    fn a_group_that_matches_everywhere_needs_nothing_and_no_skip_matching_replaces_it_all() {
        let mut fleet = fleet(0, 4);
        for i in &mut fleet {
            i.version = Some("2".into());
        }
        let s = settings();
        let skip = Target::rolling("ami-new", "2", "2", true);
        assert!(all_match(&s, &skip, &o(fleet.clone(), vec![])));
        assert_eq!(
            go(
                &s,
                &idle(0),
                &Held::default(),
                &skip,
                &o(fleet.clone(), vec![])
            ),
            Decision::Done
        );
        // --no-skip-matching: the rollout's own version 3 is the only match.
        let force = Target::rolling("ami-new", "3", "2", false);
        assert!(!all_match(&s, &force, &o(fleet.clone(), vec![])));
        let plan = simulate(&s, &force, &fleet, &[], 1000);
        assert_eq!(plan.iter().map(|b| b.retired).sum::<u32>(), 4, "{plan:#?}");
        // Half of it matching: only the other half is replaced.
        let mut half = fleet.clone();
        half[0].version = Some("1".into());
        half[1].version = Some("1".into());
        let plan = simulate(&s, &skip, &half, &[], 1000);
        assert_eq!(plan.iter().map(|b| b.retired).sum::<u32>(), 2, "{plan:#?}");
    }

    fn with(mut i: Instance, lifecycle: &str, protected: bool) -> Instance {
        i.lifecycle = lifecycle.into();
        i.protected = protected;
        i
    }

    #[test]
    fn protected_instances_by_policy() {
        let mut fleet = fleet(3, 1);
        fleet[0] = with(fleet[0].clone(), "InService", true);
        let after_canary = Progress {
            canary_done: true,
            ..idle(1)
        };
        let t = t("ami-new");
        // ignore: the others are replaced; the protected one is left, and done says so.
        let s = Settings {
            surge: 4,
            ..settings()
        };
        assert_eq!(
            go(
                &s,
                &after_canary,
                &Held::default(),
                &t,
                &o(fleet.clone(), vec![])
            ),
            Decision::StartBatch {
                batch: 2,
                desired: 6,
                retire: vec![]
            }
        );
        let mut rest = vec![fleet[0].clone()];
        rest.extend(fleet_new(3));
        assert_eq!(
            go(&s, &idle(2), &Held::default(), &t, &o(rest.clone(), vec![])),
            Decision::Done
        );
        assert_eq!(
            left_alone(&s, &t, &o(rest.clone(), vec![])),
            vec![(
                "i-old0".to_string(),
                "protected from scale in (--protected-instances ignore)"
            )]
        );
        // replace: it is an old instance like any other (retired oldest first).
        let s = Settings {
            protected: InstancePolicy::Replace,
            ..settings()
        };
        let mut surged = fleet.clone();
        surged.push(inst("i-new9", "ami-new", TargetHealth::Healthy, 500));
        let mut so = o(surged, vec![]);
        so.desired = 5;
        assert_eq!(
            go(&s, &idle(2), &Held::default(), &t, &so),
            Decision::Retire {
                ids: vec!["i-old0".into()]
            }
        );
        // wait: held until unprotected, then past the health timeout the rollout halts.
        let s = Settings {
            protected: InstancePolicy::Wait,
            ..settings()
        };
        let d = go(&s, &idle(2), &Held::default(), &t, &o(rest.clone(), vec![]));
        assert!(
            matches!(&d, Decision::Hold { ids, why } if ids == &["i-old0".to_string()] && why.contains("protected from scale in")),
            "{d:?}"
        );
        let mut h = Held::default();
        h.after(&d, 1000);
        assert_eq!(h.waiting_since, Some(1000));
        let mut late = o(rest.clone(), vec![]);
        late.now = 1060;
        let d = go(&s, &idle(2), &h, &t, &late);
        assert!(
            matches!(&d, Decision::Halt { reason } if reason.contains("after 60s") && reason.contains("i-old0")),
            "{d:?}"
        );
        // Unprotected meanwhile: an ordinary old instance again, replaced in a batch.
        let mut freed = rest;
        freed[0].protected = false;
        assert!(matches!(
            go(&s, &idle(2), &h, &t, &o(freed, vec![])),
            Decision::StartBatch { .. }
        ));
    }

    fn fleet_new(n: usize) -> Vec<Instance> {
        fleet(0, n)
    }

    #[test]
    fn standby_instances_by_policy() {
        // Capacity 4 in service, and one old instance in Standby (not counted).
        let mut instances = fleet_new(4);
        instances.push(with(
            inst("i-sb", "ami-old", TargetHealth::Healthy, 1),
            "Standby",
            false,
        ));
        let t = t("ami-new");
        let ob = o(instances.clone(), vec![]);
        assert_eq!(ob.desired, 4, "Standby is not counted");
        // ignore (the default): done, and said.
        assert_eq!(
            go(&settings(), &idle(0), &Held::default(), &t, &ob),
            Decision::Done
        );
        assert_eq!(left_alone(&settings(), &t, &ob).len(), 1);
        // replace: terminated without replacement (it serves nothing).
        let s = Settings {
            standby: InstancePolicy::Replace,
            ..settings()
        };
        assert_eq!(
            go(&s, &idle(0), &Held::default(), &t, &ob),
            Decision::DropStandby {
                ids: vec!["i-sb".into()]
            }
        );
        // wait: held, with what to do in the reason.
        let s = Settings {
            standby: InstancePolicy::Wait,
            ..settings()
        };
        assert!(matches!(
            go(&s, &idle(0), &Held::default(), &t, &ob),
            Decision::Hold { why, .. } if why.contains("i-sb is in Standby")
        ));
        // A protected Standby instance follows the Standby policy.
        let mut both = instances;
        both[4].protected = true;
        let s = Settings {
            standby: InstancePolicy::Replace,
            protected: InstancePolicy::Ignore,
            ..settings()
        };
        assert!(matches!(
            go(&s, &idle(0), &Held::default(), &t, &o(both, vec![])),
            Decision::DropStandby { .. }
        ));
    }

    #[test]
    fn a_launching_hook_holds_an_instance_out_of_the_count_until_in_service() {
        let mut instances = fleet(4, 0);
        instances.push(with(
            inst("i-new0", "ami-new", TargetHealth::Healthy, 990),
            "Pending:Wait",
            false,
        ));
        let p = Progress {
            batch_started: Some(990),
            ..idle(1)
        };
        let mut ob = o(instances, vec![]);
        let d = go(&settings(), &p, &Held::default(), &t("ami-new"), &ob);
        assert!(
            matches!(&d, Decision::Wait { why } if why.contains("Pending:Wait") && why.contains("lifecycle hook")),
            "{d:?}"
        );
        ob.instances[4].lifecycle = "Pending:Proceed".into();
        assert!(matches!(
            go(&settings(), &p, &Held::default(), &t("ami-new"), &ob),
            Decision::Wait { .. }
        ));
        // Held past the health timeout: the batch failed, naming the hook's state.
        ob.now = 990 + 60;
        assert!(matches!(
            go(&settings(), &p, &Held::default(), &t("ami-new"), &ob),
            Decision::Fail { reason, .. } if reason.contains("Pending:Proceed")
        ));
        ob.instances[4].lifecycle = "InService".into();
        assert!(matches!(
            go(&settings(), &p, &Held::default(), &t("ami-new"), &ob),
            Decision::Retire { .. }
        ));
    }

    #[test]
    fn old_warm_pool_instances_are_refreshed_before_any_batch_and_once() {
        let mut pool = vec![
            with(
                inst("i-w1", "ami-old", TargetHealth::Initial, 1),
                "Warmed:Stopped",
                false,
            ),
            with(
                inst("i-w2", "ami-new", TargetHealth::Initial, 1),
                "Warmed:Running",
                false,
            ),
            with(
                inst("i-w3", "ami-old", TargetHealth::Initial, 1),
                "Warmed:Terminating",
                false,
            ),
        ];
        let t = t("ami-new");
        let ob = o(fleet(4, 0), pool.clone());
        let d = go(&settings(), &idle(0), &Held::default(), &t, &ob);
        assert_eq!(
            d,
            Decision::RefreshPool {
                ids: vec!["i-w1".into()]
            }
        );
        let mut h = Held::default();
        h.after(&d, 1000);
        // Still listed (terminating): not asked again; the batch goes on.
        assert!(matches!(
            go(&settings(), &idle(0), &h, &t, &ob),
            Decision::StartBatch { batch: 1, .. }
        ));
        // A group already on the target with an old pool is not "already everywhere".
        assert!(!all_match(&settings(), &t, &o(fleet_new(4), pool.clone())));
        pool.remove(0);
        assert!(all_match(&settings(), &t, &o(fleet_new(4), pool)));
    }

    #[test]
    fn checkpoints_pause_once_each_and_batches_stop_at_them() {
        // Capacity 4, surge 4: 25,50,100.
        let s = Settings {
            capacity: 4,
            surge: 4,
            checkpoints: vec![25, 50, 100],
            checkpoint_pause: Duration::from_secs(120),
            ..settings()
        };
        let t = t("ami-new");
        let after_canary = Progress {
            canary_done: true,
            ..idle(1)
        };
        // The canary made 25%: checkpoint.
        let ob = o(fleet(3, 1), vec![]);
        let d = go(&s, &after_canary, &Held::default(), &t, &ob);
        assert_eq!(
            d,
            Decision::Checkpoint {
                percent: 25,
                pause: Duration::from_secs(120)
            }
        );
        let mut h = Held::default();
        h.after(&d, 1000);
        assert!(
            matches!(go(&s, &after_canary, &h, &t, &ob), Decision::Wait { why } if why.contains("checkpoint 25%"))
        );
        // After the pause: the next batch stops at 50% (one instance, not the surge of 4).
        let mut later = ob.clone();
        later.now = 1120;
        assert_eq!(
            go(&s, &after_canary, &h, &t, &later),
            Decision::StartBatch {
                batch: 2,
                desired: 5,
                retire: vec![]
            }
        );
        // A resumed driver counts the checkpoints already reached as passed.
        let resumed = Held::resumed(&s, &t, &o(fleet(2, 2), vec![]));
        assert_eq!(resumed.checkpoint, 50);
        // The plan shows the pauses.
        let plan = simulate(&s, &t, &fleet(4, 0), &[], 1000);
        let shape: Vec<(u32, Option<u32>)> =
            plan.iter().map(|b| (b.launched, b.checkpoint)).collect();
        assert_eq!(
            shape,
            vec![(1, Some(25)), (1, Some(50)), (2, None)],
            "{plan:#?}"
        );
    }

    #[test]
    fn the_exponential_ramp_doubles_up_to_the_surge_and_keeps_the_floor() {
        let s = Settings {
            capacity: 12,
            surge: 6,
            max_unavailable: 0,
            ramp: Ramp::Exponential,
            ..settings()
        };
        assert_eq!(
            (1..=6).map(|b| batch_size(&s, b)).collect::<Vec<_>>(),
            vec![1, 2, 4, 6, 6, 6]
        );
        let plan = simulate(&s, &t("ami-new"), &fleet(12, 0), &[], 1000);
        let launched: Vec<u32> = plan.iter().map(|b| b.launched).collect();
        assert_eq!(launched, vec![1, 2, 4, 5], "{plan:#?}");
        assert!(plan.iter().all(|b| b.least_in_service >= 12));
        let fixed = simulate(
            &Settings {
                ramp: Ramp::Fixed,
                ..s.clone()
            },
            &t("ami-new"),
            &fleet(12, 0),
            &[],
            1000,
        );
        assert_eq!(
            fixed.iter().map(|b| b.launched).collect::<Vec<_>>(),
            vec![1, 6, 5]
        );
        // A canary of 2 ramps 2, 4, 8, …
        let s2 = Settings {
            canary: 2,
            surge: 100,
            ..s
        };
        assert_eq!(
            (1..=4).map(|b| batch_size(&s2, b)).collect::<Vec<_>>(),
            vec![2, 4, 8, 16]
        );
    }

    #[test]
    fn max_unavailable_retires_old_instances_at_batch_start() {
        let s = Settings {
            surge: 1,
            max_unavailable: 1,
            ..settings()
        };
        let o = Observed {
            desired: 4,
            instances: fleet(3, 1),
            pool: vec![],
            now: 1000,
        };
        assert_eq!(
            decide(
                &s,
                &Progress {
                    canary_done: true,
                    ..idle(1)
                },
                &Held::default(),
                &t("ami-new"),
                &o
            ),
            Decision::StartBatch {
                batch: 2,
                desired: 5,
                retire: vec!["i-old1".into()]
            }
        );
    }

    #[test]
    fn a_rollback_is_the_same_rollout_towards_the_old_ami() {
        // Two new instances already in; rolling back replaces them with old ones.
        let o = Observed {
            desired: 4,
            instances: fleet(2, 2),
            pool: vec![],
            now: 1000,
        };
        assert_eq!(
            decide(&settings(), &idle(0), &Held::default(), &t("ami-old"), &o),
            Decision::StartBatch {
                batch: 1,
                desired: 5,
                retire: vec![]
            }
        );
    }

    #[test]
    fn the_canary_batch_retires_nothing_early_even_at_full_unavailability() {
        let s = Settings {
            surge: 4,
            max_unavailable: 4,
            ..settings()
        };
        let o = Observed {
            desired: 4,
            instances: fleet(4, 0),
            pool: vec![],
            now: 1000,
        };
        assert_eq!(
            decide(&s, &idle(0), &Held::default(), &t("ami-new"), &o),
            Decision::StartBatch {
                batch: 1,
                desired: 5,
                retire: vec![]
            }
        );
    }

    fn plan(s: &Settings, old: usize) -> Vec<PlannedBatch> {
        simulate(s, &t("ami-new"), &fleet(old, 0), &[], 1000)
    }

    #[test]
    fn the_plan_of_issue_finding_15_is_what_decide_does() {
        // capacity 4, --max-surge 2 --max-unavailable 1 --canary 1
        let s = Settings {
            surge: 2,
            max_unavailable: 1,
            ..settings()
        };
        let p = plan(&s, 4);
        let shape: Vec<(u32, u32, u32, u32)> = p
            .iter()
            .map(|b| (b.launched, b.retired, b.desired, b.least_in_service))
            .collect();
        assert_eq!(shape, vec![(1, 1, 5, 4), (3, 3, 6, 3)], "{p:#?}");
        // --max-surge 100% --max-unavailable 100%: a canary of 1, then the rest at once.
        let s = Settings {
            surge: 4,
            max_unavailable: 4,
            ..settings()
        };
        let shape: Vec<(u32, u32, u32)> = plan(&s, 4)
            .iter()
            .map(|b| (b.launched, b.retired, b.desired))
            .collect();
        assert_eq!(shape, vec![(1, 1, 5), (3, 3, 7)]);
    }

    #[test]
    fn plans_cover_every_old_instance_and_keep_the_floor_for_thousands_of_settings() {
        // A small deterministic generator: thousands of cases, replayable.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n) as u32
        };
        for case in 0..5000 {
            let capacity = 1 + next(30);
            let s = Settings {
                capacity,
                surge: 1 + next(capacity as u64 + 2),
                max_unavailable: next(capacity as u64 + 1),
                canary: 1 + next(3),
                canary_bake: Duration::from_secs(next(3) as u64 * 60),
                ramp: if next(2) == 0 {
                    Ramp::Fixed
                } else {
                    Ramp::Exponential
                },
                checkpoints: match next(3) {
                    0 => vec![],
                    1 => vec![100],
                    _ => vec![1 + next(40), 41 + next(50), 100],
                },
                checkpoint_pause: Duration::from_secs(next(3) as u64 * 30),
                ..settings()
            };
            let old = next(capacity as u64 + 1) as usize;
            let fleet = fleet(old, capacity as usize - old);
            let p = simulate(&s, &t("ami-new"), &fleet, &[], 1000);
            let ctx = || format!("case {case}: {s:?}, {old} old: {p:#?}");
            assert_eq!(
                p.iter().map(|b| b.retired).sum::<u32>(),
                old as u32,
                "{}",
                ctx()
            );
            assert_eq!(p.is_empty(), old == 0, "{}", ctx());
            for (i, b) in p.iter().enumerate() {
                assert_eq!(b.batch, i as u32 + 1, "{}", ctx());
                let floor = if i == 0 {
                    capacity
                } else {
                    capacity - s.max_unavailable.min(capacity)
                };
                assert!(b.least_in_service >= floor, "{}", ctx());
                let size = if i == 0 { s.canary } else { s.surge };
                assert!(b.desired <= capacity + size, "{}", ctx());
                assert!(b.launched >= 1, "{}", ctx());
            }
        }
    }

    #[test]
    fn the_start_decision_case_by_case() {
        let asked = |ami: Option<&'static str>, abort, force, dry_run| Asked {
            ami,
            abort,
            force,
            dry_run,
        };
        let busy = |ami| Found {
            in_progress: Some(ami),
            already_everywhere: false,
        };
        let idle = Found::default();
        let a = Some("ami-a");
        let cases = [
            (asked(a, false, false, false), idle, Start::New),
            (
                asked(a, false, false, false),
                Found {
                    already_everywhere: true,
                    ..idle
                },
                Start::AlreadyRunning,
            ),
            (asked(a, false, false, true), idle, Start::PlanNew),
            (asked(None, true, false, false), idle, Start::NothingToAbort),
            (asked(a, false, false, false), busy("ami-a"), Start::Resume),
            (asked(a, false, false, false), busy("ami-b"), Start::Refuse),
            (asked(a, false, true, false), busy("ami-b"), Start::Replace),
            (asked(a, false, true, false), busy("ami-a"), Start::Resume),
            (asked(None, true, false, false), busy("ami-b"), Start::Abort),
            (asked(a, true, true, false), busy("ami-b"), Start::Abort),
            (
                asked(a, false, false, true),
                busy("ami-b"),
                Start::PlanInProgress { would: "refuse" },
            ),
            (
                asked(a, false, false, true),
                busy("ami-a"),
                Start::PlanInProgress { would: "resume" },
            ),
            (
                asked(None, true, false, true),
                busy("ami-a"),
                Start::PlanInProgress { would: "roll back" },
            ),
        ];
        for (asked, found, want) in cases {
            assert_eq!(decide_start(asked, found), want, "{asked:?} {found:?}");
        }
    }
}
