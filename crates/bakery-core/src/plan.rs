//! The rollout's decisions, as pure functions over plain data: given what the group looks like
//! now and what the rollout has recorded, what is the next step? No I/O here, so every rule is
//! unit-tested, and the loop in [`super`] only observes, asks, acts and repeats.
//!
//! The strategy is surge-first: raise the desired capacity by one batch, wait until the new
//! instances are in service, warmed up and healthy in every target group, then retire as many
//! old instances (old = running another AMI) while lowering the desired capacity again. So the
//! capacity in service never drops below the original desired capacity minus `max_unavailable`.

use std::time::Duration;

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
    /// Instances launched per batch (at least 1).
    pub surge: u32,
    /// Old instances that may be retired before their replacements are healthy.
    pub max_unavailable: u32,
    /// Size of the first batch.
    pub canary: u32,
    pub canary_bake: Duration,
    pub warmup: Duration,
    pub health_timeout: Duration,
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

/// One instance of the group, as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub ami: String,
    /// The ASG lifecycle state: `Pending`, `InService`, `Terminating`, ...
    pub lifecycle: String,
    /// The ASG health status is `Healthy`.
    pub asg_healthy: bool,
    pub target: TargetHealth,
    /// Launch time, seconds since the epoch.
    pub launched: u64,
}

impl Instance {
    fn live(&self) -> bool {
        !self.lifecycle.starts_with("Terminat") && !self.lifecycle.starts_with("Detach")
    }

    fn ready(&self, now: u64, warmup: Duration) -> bool {
        self.lifecycle == "InService"
            && self.asg_healthy
            && self.target == TargetHealth::Healthy
            && now.saturating_sub(self.launched) >= warmup.as_secs()
    }

    /// Why it is not ready, for progress lines and the rollback reason.
    pub fn why_not_ready(&self, now: u64, warmup: Duration) -> String {
        if self.lifecycle != "InService" {
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
    /// The canary is healthy; its bake starts now.
    StartCanaryBake,
    /// The canary bake passed.
    CanaryBaked,
    /// Nothing to do until the group changes.
    Wait { why: String },
    /// The new instances failed; roll back.
    Fail {
        reason: String,
        instances: Vec<String>,
    },
    /// Every instance runs the target AMI, healthy, at the original capacity.
    Done,
}

/// Decides the next step towards running `target_ami` everywhere.
pub fn decide(s: &Settings, p: &Progress, target_ami: &str, o: &Observed) -> Decision {
    let live: Vec<&Instance> = o.instances.iter().filter(|i| i.live()).collect();
    let (new, mut old): (Vec<&Instance>, Vec<&Instance>) =
        live.iter().partition(|i| i.ami == target_ami);
    let not_ready: Vec<&&Instance> = new.iter().filter(|i| !i.ready(o.now, s.warmup)).collect();
    let in_batch = p.batch_started.is_some();

    // A batch in progress: wait for its instances, or give up on them.
    let batch_launched = live.len() as u32 >= o.desired;
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
                    live.len(),
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
                live.len(),
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

    if old.is_empty() {
        if new.len() as u32 >= s.capacity && not_ready.is_empty() {
            return Decision::Done;
        }
        // Fewer new instances than capacity and no batch: the group is still filling up.
        return Decision::Wait {
            why: format!(
                "{} of {} instances ready",
                new.len() - not_ready.len(),
                s.capacity
            ),
        };
    }

    let canary_batch = p.batch == 0;
    let size = if canary_batch { s.canary } else { s.surge }.max(1);
    let size = size.min(old.len() as u32);
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
}

/// The plan of a rollout (`--dry-run`): runs [`decide`] itself on a simulated group in which
/// every instance it launches is healthy at once, so the plan is what the rollout will do when
/// nothing fails. `instances` are the group's live instances as observed.
pub fn simulate(
    s: &Settings,
    target_ami: &str,
    instances: &[Instance],
    now: u64,
) -> Vec<PlannedBatch> {
    let ready = |mut i: Instance, now: u64| {
        i.lifecycle = "InService".into();
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
        now,
    };
    let mut p = Progress::START;
    let mut out: Vec<PlannedBatch> = Vec::new();
    let mut launched_so_far = 0u32;
    // Each step changes the group; the bound only guards against a planner bug looping forever.
    for _ in 0..100_000 {
        match decide(s, &p, target_ami, &o) {
            Decision::StartBatch {
                batch,
                desired,
                retire,
            } => {
                o.instances.retain(|i| !retire.contains(&i.id));
                let live = o.instances.len() as u32;
                let launched = desired.saturating_sub(live);
                for _ in 0..launched {
                    launched_so_far += 1;
                    o.instances.push(ready(
                        Instance {
                            id: format!("new-{launched_so_far}"),
                            ami: target_ami.to_string(),
                            lifecycle: String::new(),
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
            Decision::StartCanaryBake => {
                p.canary_healthy_at = Some(o.now);
                o.now += s.canary_bake.as_secs();
            }
            Decision::CanaryBaked => p.canary_done = true,
            Decision::Wait { .. } => o.now += s.canary_bake.as_secs().max(1),
            Decision::Done | Decision::Fail { .. } => break,
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
    /// The launch-template version the group launches already names the AMI asked for, and
    /// every live instance (at least desired capacity of them) runs it.
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
        }
    }

    fn inst(id: &str, ami: &str, target: TargetHealth, launched: u64) -> Instance {
        Instance {
            id: id.into(),
            ami: ami.into(),
            lifecycle: "InService".into(),
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
            now: 1000,
        };
        let s = Settings {
            surge: 2,
            ..settings()
        };
        assert_eq!(
            decide(&s, &idle(0), "ami-new", &o),
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
            now: 1000,
        };
        assert_eq!(
            decide(&s, &idle(1), "ami-new", &o),
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
            now: 1000,
        };
        assert!(
            matches!(decide(&settings(), &p, "ami-new", &o), Decision::Wait { why } if why.contains("i-new0 has not passed"))
        );

        instances[4].target = TargetHealth::Healthy;
        let o = Observed {
            desired: 5,
            instances,
            now: 1000,
        };
        assert_eq!(
            decide(&settings(), &p, "ami-new", &o),
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
            now: 1000,
        };
        assert!(
            matches!(decide(&settings(), &p, "ami-new", &o), Decision::Wait { why } if why.contains("4 of 5"))
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
            now: 1000,
        };
        assert!(
            matches!(decide(&s, &p, "ami-new", &o), Decision::Wait { why } if why.contains("warming up"))
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
            now: 961,
        };
        let Decision::Fail { reason, instances } = decide(&settings(), &p, "ami-new", &o) else {
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
            now: 1000,
        };
        assert_eq!(
            decide(&s, &idle(1), "ami-new", &o),
            Decision::StartCanaryBake
        );
        let baking = Progress {
            canary_healthy_at: Some(990),
            ..idle(1)
        };
        assert!(matches!(
            decide(&s, &baking, "ami-new", &o),
            Decision::Wait { .. }
        ));
        let o_late = Observed {
            now: 1020,
            ..o.clone()
        };
        assert_eq!(
            decide(&s, &baking, "ami-new", &o_late),
            Decision::CanaryBaked
        );
        let mut sick = o.clone();
        sick.instances[3].target = TargetHealth::Unhealthy("Target.Timeout".into());
        assert!(
            matches!(decide(&s, &baking, "ami-new", &sick), Decision::Fail { reason, .. } if reason.contains("canary turned unhealthy"))
        );
        let done = Progress {
            canary_done: true,
            ..baking
        };
        assert!(matches!(
            decide(&s, &done, "ami-new", &o),
            Decision::StartBatch { batch: 2, .. }
        ));
    }

    #[test]
    fn done_when_every_instance_runs_the_target_at_capacity() {
        let o = Observed {
            desired: 4,
            instances: fleet(0, 4),
            now: 1000,
        };
        assert_eq!(decide(&settings(), &idle(4), "ami-new", &o), Decision::Done);
        // Terminating old instances do not count.
        let mut instances = fleet(1, 4);
        instances[0].lifecycle = "Terminating".into();
        let o = Observed {
            desired: 4,
            instances,
            now: 1000,
        };
        assert_eq!(decide(&settings(), &idle(4), "ami-new", &o), Decision::Done);
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
            now: 1000,
        };
        assert_eq!(
            decide(
                &s,
                &Progress {
                    canary_done: true,
                    ..idle(1)
                },
                "ami-new",
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
            now: 1000,
        };
        assert_eq!(
            decide(&settings(), &idle(0), "ami-old", &o),
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
            now: 1000,
        };
        assert_eq!(
            decide(&s, &idle(0), "ami-new", &o),
            Decision::StartBatch {
                batch: 1,
                desired: 5,
                retire: vec![]
            }
        );
    }

    fn plan(s: &Settings, old: usize) -> Vec<PlannedBatch> {
        simulate(s, "ami-new", &fleet(old, 0), 1000)
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
                ..settings()
            };
            let old = next(capacity as u64 + 1) as usize;
            let fleet = fleet(old, capacity as usize - old);
            let p = simulate(&s, "ami-new", &fleet, 1000);
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
