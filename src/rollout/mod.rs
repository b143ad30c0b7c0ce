//! The rollout engine: puts an AMI into a new launch-template version and rolls it into an Auto
//! Scaling group in health-gated batches, rolling back by itself when the new instances are
//! unhealthy, and resuming from the group's tags after a crash.
//!
//! The loop observes the group, asks [`plan::decide`] for the next step, acts, records its
//! progress on the group ([`state`]) and repeats. Every action is safe to repeat, so a driver
//! that dies between acting and recording is resumed correctly by the next one.

pub use bakery_core::ingroup::{Checkpoints, InGroup, InstancePolicy, Ramp};
pub use bakery_core::marks as state;
pub use bakery_core::plan;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::aws::{autoscaling, ec2, elbv2, launch_template as lt, Aws, AwsError};
use crate::lease::{Fence, Fenced, Keeper, LeaseError};
use crate::output::{Event, Reporter};
use crate::signals::Signals;
use crate::wait::{Tolerance, OUTAGE_LIMIT};
use plan::{Amount, Decision, Held, Observed, Progress, Settings, Start, Target, TargetHealth};
use state::{Lock, Phase, ProgressTag, RolloutState, LOCK_TAG, PROGRESS_TAG, STATE_TAG};

/// The rollout's failure reason, kept for a driver that resumes a rollback.
pub use bakery_core::marks::REASON_TAG;
/// A driver whose lock expires within this margin checks it is still its own before acting.
const LOCK_MARGIN: Duration = Duration::from_secs(5);
/// The lock tag's token of a driver fenced by a lease (`lease<fencing token>`): the lease
/// decides between such drivers; the tag is their record.
const LEASE_TOKEN_PREFIX: &str = "lease";
/// The ASG process a rollout suspends: it would move instances between zones mid-rollout.
const AZ_REBALANCE: &str = "AZRebalance";

/// Where the AMI to roll out comes from.
#[derive(Debug, Clone)]
pub enum AmiSource {
    Id(String),
    Manifest(std::path::PathBuf),
    Param(String),
}

#[derive(Debug, Clone)]
pub struct Request {
    pub group: String,
    /// `None` with `abort`.
    pub ami: Option<AmiSource>,
    pub max_surge: Amount,
    pub max_unavailable: Amount,
    pub canary: u32,
    pub canary_bake: Duration,
    pub health_timeout: Duration,
    pub warmup: Duration,
    pub rollback: bool,
    pub dry_run: bool,
    pub abort: bool,
    pub force: bool,
    pub keep_versions: usize,
    /// How long the group's lock outlives a driver that stops renewing it (`--lock-ttl`).
    pub lock_ttl: Duration,
    /// The DynamoDB lease table that fences the group's drivers (`--lease-table`); without
    /// one, the lock is the group's tag (best effort).
    pub lease_table: Option<String>,
    /// Instance Refresh's in-group behaviours (skip matching, protected and Standby instances,
    /// checkpoints, ramp); `Default` is the CLI's defaults.
    pub in_group: InGroup,
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("Auto Scaling group {0:?} not found in this region; check --asg and --region")]
    GroupNotFound(String),
    #[error("group {group}: {detail}")]
    Unsupported { group: String, detail: String },
    #[error("AMI {0} not found in this region; check the id (bake it with `bakery build` first, or copy it to this region)")]
    AmiNotFound(String),
    #[error("AMI {id} is {state}, not available; wait for it or pick another")]
    AmiNotAvailable { id: String, state: String },
    #[error("{0}")]
    BadInput(String),
    #[error(
        "group {group} is locked by another rollout driver ({owner}, since {since}, lock expires {expires}); \
         wait for it to finish, or rerun after the lock expires"
    )]
    Locked {
        group: String,
        owner: String,
        since: String,
        expires: String,
    },
    #[error(
        "this run lost the lock of group {group} to {owner} (it was paused or cut off past its \
         lock's expiry), and stopped without changing anything more; the rollout's state is on \
         the group's tags: see `bakery status --asg {group}`"
    )]
    LockLost { group: String, owner: String },
    #[error(
        "group {group} has a rollout of {ami} in progress (started {since}, batch {batch}). Rerun with \
         --ami {ami} to resume it, add --abort to roll it back, or --force to replace it with {requested}"
    )]
    OtherRollout {
        group: String,
        ami: String,
        since: String,
        batch: u32,
        requested: String,
    },
    #[error("group {0} has no rollout in progress; nothing to abort")]
    NothingToAbort(String),
    #[error("rolled back: {reason}")]
    RolledBack {
        reason: String,
        instances: Vec<String>,
    },
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("interrupted by {0}; the rollout is paused: rerun the same command to resume it, or add --abort to roll back")]
    Interrupted(crate::signals::Signal),
    #[error(transparent)]
    Lease(LeaseError),
}

impl crate::wait::Outage for RolloutError {
    fn is_outage(&self) -> bool {
        matches!(self, RolloutError::Aws(e) if e.transient)
    }
}

impl RolloutError {
    pub fn exit_code(&self) -> i32 {
        match self {
            RolloutError::GroupNotFound(_)
            | RolloutError::Unsupported { .. }
            | RolloutError::AmiNotFound(_)
            | RolloutError::AmiNotAvailable { .. }
            | RolloutError::BadInput(_)
            | RolloutError::NothingToAbort(_) => 2,
            RolloutError::RolledBack { .. } => 6,
            RolloutError::Locked { .. }
            | RolloutError::LockLost { .. }
            | RolloutError::OtherRollout { .. } => 7,
            RolloutError::Interrupted(sig) => sig.exit_code(),
            RolloutError::Lease(e) if e.is_usage() => 2,
            RolloutError::Failed(_) | RolloutError::Aws(_) | RolloutError::Lease(_) => 1,
        }
    }
}

/// What a successful rollout did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub group: String,
    pub ami: String,
    pub version: String,
    pub changed: bool,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn rfc3339(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// Runs a rollout to its end (success, rollback or failure), or prints its plan (`dry_run`).
/// With a lease table, the group's lease is taken first (so everything after is read and done
/// by its one driver) and released at the end.
pub async fn run(aws: &Aws, req: &Request, reporter: &Reporter) -> Result<Summary, RolloutError> {
    let lease = match &req.lease_table {
        Some(table) if !req.dry_run => Some(take_lease(aws, table, req).await?),
        Some(table) => {
            // A dry run changes nothing, but says now what the real run would say of the table.
            crate::lease::Store::open(aws, table)
                .await
                .map_err(RolloutError::Lease)?;
            None
        }
        None => None,
    };
    let result = run_as(aws, req, reporter, lease.as_ref()).await;
    if let Some(keeper) = lease {
        keeper.release().await;
    }
    result
}

/// Takes the lease `rollout#<region>#<group>`: refused, naming the holder, while another live
/// driver holds it.
async fn take_lease(aws: &Aws, table: &str, req: &Request) -> Result<Keeper, RolloutError> {
    let store = crate::lease::Store::open(aws, table)
        .await
        .map_err(RolloutError::Lease)?;
    let key = crate::lease::rollout_key(&aws.region, &req.group);
    let timing = bakery_core::lease::Timing::for_ttl(req.lock_ttl);
    match store.acquire(&key, &crate::host::owner(), timing).await {
        Ok(keeper) => Ok(keeper),
        Err(LeaseError::Held { holder }) => Err(RolloutError::Locked {
            group: req.group.clone(),
            owner: format!(
                "{}, fencing token {} in lease table {table}",
                holder.owner, holder.token
            ),
            since: rfc3339(holder.since_ms / 1000),
            expires: rfc3339(holder.expires_at_ms / 1000),
        }),
        Err(e) => Err(RolloutError::Lease(e)),
    }
}

async fn run_as(
    aws: &Aws,
    req: &Request,
    reporter: &Reporter,
    lease: Option<&Keeper>,
) -> Result<Summary, RolloutError> {
    let started = Instant::now();
    let ami = requested_ami(aws, req).await?;
    // Observe what the start decision needs, then decide, then act.
    let found = find(aws, req).await?;
    let start = start_decision(aws, req, &found, ami.as_deref()).await?;
    let (group, progress) = (&found.group, &found.progress);
    let me = my_lock(req, lease);
    let driver = |st, progress| {
        Driver::new(
            aws,
            req,
            reporter,
            group.name.clone(),
            st,
            progress,
            me,
            lease,
        )
    };
    let mut driver = match (start, found.existing, found.source) {
        (Start::NothingToAbort, ..) => {
            return Err(RolloutError::NothingToAbort(group.name.clone()))
        }
        (Start::Refuse, Some(st), _) => return Err(other_rollout(group, &st, progress, ami)),
        (Start::PlanInProgress { would }, Some(st), _) => {
            return Ok(plan_in_progress(reporter, group, st, progress, would))
        }
        (Start::PlanNew, None, Some(source)) => {
            let ami = ami.unwrap_or_default();
            let plan = initial_plan(req, group, &source, &ami, aws).await?;
            reporter.emit(Event::RolloutPlan { plan });
            return Ok(unchanged(group, ami, source.number.to_string()));
        }
        (Start::AlreadyRunning, None, Some(source)) => {
            let ami = ami.unwrap_or_default();
            return Ok(already_running(reporter, group, &source, ami, started));
        }
        (Start::New, None, Some(source)) => {
            let st = new_state(group, &found.template_id, &source, ami.unwrap_or_default());
            let mut d = driver(st, ProgressTag::new(Phase::Rolling, &Progress::START));
            d.lock(group).await?;
            d.point_at_new_version(&source).await?;
            d
        }
        (start @ (Start::Resume | Start::Abort | Start::Replace), Some(st), _) => {
            let mut d = driver(st, found.progress);
            d.lock(group).await?;
            d.resume(start, group, &found.template_id, ami.unwrap_or_default())
                .await?;
            d
        }
        (start, ..) => {
            return Err(RolloutError::Failed(format!(
                "internal: start decision {start:?} does not fit what was observed of {}",
                group.name
            )))
        }
    };
    driver.suspend_rebalance(&group.suspended).await?;
    let result = driver.drive().await;
    driver.finish(result, started).await
}

/// What a run finds of the group before it decides how to start.
struct Found {
    group: autoscaling::Group,
    template_id: String,
    /// The rollout in progress, if any.
    existing: Option<RolloutState>,
    progress: ProgressTag,
    /// The version the group launches now, unless a rollout is in progress (or `--abort`).
    source: Option<lt::Version>,
}

/// Reads the group, its launch template, the rollout recorded on it and its current version.
async fn find(aws: &Aws, req: &Request) -> Result<Found, RolloutError> {
    let group = autoscaling::describe(&aws.autoscaling, &req.group)
        .await?
        .ok_or_else(|| RolloutError::GroupNotFound(req.group.clone()))?;
    let template_id = template_of(aws, &group).await?;
    let existing: Option<RolloutState> = group.tags.get(STATE_TAG).and_then(|s| state::decode(s));
    let progress: ProgressTag = group
        .tags
        .get(PROGRESS_TAG)
        .and_then(|s| state::decode(s))
        .unwrap_or(ProgressTag::new(Phase::Rolling, &Progress::START));
    let source = match &existing {
        Some(_) => None,
        None if req.abort => None,
        None => Some(source_version(aws, &group, &template_id).await?),
    };
    Ok(Found {
        group,
        template_id,
        existing,
        progress,
        source,
    })
}

/// How the run starts ([`plan::decide_start`]), from the request and what was found.
async fn start_decision(
    aws: &Aws,
    req: &Request,
    found: &Found,
    ami: Option<&str>,
) -> Result<Start, RolloutError> {
    let already_everywhere =
        already_everywhere(aws, req, &found.group, found.source.as_ref(), ami).await?;
    Ok(plan::decide_start(
        plan::Asked {
            ami,
            abort: req.abort,
            force: req.force,
            dry_run: req.dry_run,
        },
        plan::Found {
            in_progress: found.existing.as_ref().map(|st| st.ami.as_str()),
            already_everywhere,
        },
    ))
}

/// The AMI the request names, resolved and checked available; `None` only with `--abort`.
async fn requested_ami(aws: &Aws, req: &Request) -> Result<Option<String>, RolloutError> {
    match (&req.ami, req.abort) {
        (Some(src), _) => Ok(Some(resolve_ami(aws, src).await?)),
        (None, true) => Ok(None),
        (None, false) => Err(RolloutError::BadInput(
            "name the AMI: --ami, --manifest or --ami-param".into(),
        )),
    }
}

/// Skip matching: the group needs nothing when its version already names the AMI and every
/// instance (and warm-pool instance) runs it from that version. Without, every run replaces.
async fn already_everywhere(
    aws: &Aws,
    req: &Request,
    group: &autoscaling::Group,
    source: Option<&lt::Version>,
    ami: Option<&str>,
) -> Result<bool, RolloutError> {
    Ok(match (source, ami) {
        (Some(src), Some(ami))
            if req.in_group.skip_matching && src.image_id.as_deref() == Some(ami) =>
        {
            let version = src.number.to_string();
            let o = observe_group(aws, group, &mut BTreeMap::new(), false).await?;
            let t = Target::rolling(ami, &version, &version, true);
            plan::all_match(&settings(req, group.desired), &t, &o)
        }
        _ => false,
    })
}

/// This driver's lock: its token is its lease's fencing token, with a lease table.
fn my_lock(req: &Request, lease: Option<&Keeper>) -> Lock {
    Lock {
        owner: crate::host::owner(),
        token: match lease {
            Some(keeper) => format!("{LEASE_TOKEN_PREFIX}{}", keeper.lease().token),
            None => uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
        },
        since: now(),
        expires: now() + req.lock_ttl.as_secs(),
    }
}

/// The refusal of a run while another rollout (of another AMI) is in progress.
fn other_rollout(
    group: &autoscaling::Group,
    st: &RolloutState,
    progress: &ProgressTag,
    ami: Option<String>,
) -> RolloutError {
    RolloutError::OtherRollout {
        group: group.name.clone(),
        ami: st.ami.clone(),
        since: rfc3339(st.t),
        batch: progress.b,
        requested: ami.unwrap_or_default(),
    }
}

/// The summary of a run that changed nothing.
fn unchanged(group: &autoscaling::Group, ami: String, version: String) -> Summary {
    Summary {
        group: group.name.clone(),
        ami,
        version,
        changed: false,
    }
}

/// `--dry-run` on a group with a rollout in progress: what it is, and what the run would do.
fn plan_in_progress(
    reporter: &Reporter,
    group: &autoscaling::Group,
    st: RolloutState,
    progress: &ProgressTag,
    would: &'static str,
) -> Summary {
    let plan = serde_json::json!({
        "group": group.name,
        "in_progress": {
            "rollout_id": st.id, "ami": st.ami, "phase": progress.ph,
            "batch": progress.b, "from_version": st.from, "to_version": st.to,
            "started": rfc3339(st.t),
        },
        "would": would,
    });
    reporter.emit(Event::RolloutPlan { plan });
    unchanged(group, st.ami, st.to)
}

/// Every instance already runs the AMI from the group's version (skip matching): says so and
/// finishes at once.
fn already_running(
    reporter: &Reporter,
    group: &autoscaling::Group,
    source: &lt::Version,
    ami: String,
    started: Instant,
) -> Summary {
    reporter.emit(Event::Info {
        step: "rollout".into(),
        message: format!(
            "every instance of {} already runs {ami} from launch template version {} (skip matching): nothing to replace, nothing changed; --no-skip-matching replaces them all",
            group.name, source.number
        ),
    });
    reporter.emit(Event::RolloutFinished {
        result: "already running".into(),
        group: group.name.clone(),
        ami: ami.clone(),
        version: source.number.to_string(),
        duration_s: started.elapsed().as_secs_f64(),
    });
    unchanged(group, ami, source.number.to_string())
}

/// The state of a new rollout from the group's version `source`.
fn new_state(
    group: &autoscaling::Group,
    template_id: &str,
    source: &lt::Version,
    ami: String,
) -> RolloutState {
    RolloutState {
        id: format!("r-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        ami,
        lt: template_id.to_string(),
        from: source.number.to_string(),
        to: String::new(),
        d: group.desired,
        mn: group.min,
        mx: group.max,
        az: false,
        t: now(),
    }
}

/// The launch-template version the group launches now.
async fn source_version(
    aws: &Aws,
    group: &autoscaling::Group,
    template_id: &str,
) -> Result<lt::Version, RolloutError> {
    let version_name = group
        .launch_template
        .as_ref()
        .and_then(|l| l.version.clone())
        .unwrap_or_else(|| "$Default".into());
    lt::describe(&aws.ec2, template_id, &version_name)
        .await?
        .ok_or_else(|| RolloutError::Unsupported {
            group: group.name.clone(),
            detail: format!("its launch template {template_id} has no version {version_name}"),
        })
}

/// The group as the decisions see it: its instances (image, launch time, version, protection,
/// target health when `health`) and its warm pool's. `images` caches image and launch time by
/// instance id (neither ever changes).
async fn observe_group(
    aws: &Aws,
    g: &autoscaling::Group,
    images: &mut BTreeMap<String, (String, u64)>,
    health: bool,
) -> Result<Observed, RolloutError> {
    let pool = if g.warm_pool {
        autoscaling::warm_pool(&aws.autoscaling, &g.name).await?
    } else {
        Vec::new()
    };
    let unknown: Vec<String> = g
        .instances
        .iter()
        .chain(pool.iter())
        .filter(|i| !images.contains_key(&i.id))
        .map(|i| i.id.clone())
        .collect();
    if !unknown.is_empty() {
        let found = ec2::images_of(&aws.ec2, &unknown).await?;
        images.extend(found);
    }
    let mut target_health = Vec::new();
    if health {
        for tg in &g.target_group_arns {
            target_health.push(elbv2::target_health(&aws.elb, tg).await?);
        }
    }
    let view = |i: &autoscaling::GroupInstance, target: TargetHealth| {
        let (ami, launched) = images.get(&i.id).cloned().unwrap_or_default();
        plan::Instance {
            id: i.id.clone(),
            ami,
            version: i.launch_template_version.clone(),
            lifecycle: i.lifecycle.clone(),
            protected: i.protected,
            asg_healthy: i.health.eq_ignore_ascii_case("healthy"),
            target,
            launched,
        }
    };
    let instances = g
        .instances
        .iter()
        .map(|i| {
            let target = if health {
                combined_health(&target_health, &i.id)
            } else {
                TargetHealth::Healthy
            };
            view(i, target)
        })
        .collect();
    let pool = pool
        .iter()
        .map(|i| view(i, TargetHealth::Initial))
        .collect();
    Ok(Observed {
        desired: g.desired,
        instances,
        pool,
        now: now(),
    })
}

async fn resolve_ami(aws: &Aws, src: &AmiSource) -> Result<String, RolloutError> {
    let id = match src {
        AmiSource::Id(id) => id.clone(),
        AmiSource::Manifest(path) => {
            let m = crate::bake::manifest::Manifest::read(path).map_err(RolloutError::BadInput)?;
            // A promoted manifest names an image per region: the group's region's.
            match m.ami_for(&aws.region) {
                Some(id) => id.to_string(),
                None => {
                    return Err(RolloutError::BadInput(format!(
                        "{} has no image for region {}, where this rollout runs (it has: {}); pass --region, or promote the build there (bakery promote {} --to {})",
                        path.display(),
                        aws.region,
                        m.image_regions().join(", "),
                        path.display(),
                        aws.region
                    )))
                }
            }
        }
        AmiSource::Param(name) => {
            let ssm = &aws.ssm;
            let out = crate::aws::call("ssm:GetParameter", name, || {
                ssm.get_parameter().name(name).send()
            })
            .await
            .map_err(|e| {
                if e.code() == Some("ParameterNotFound") {
                    RolloutError::BadInput(format!("SSM parameter {name} does not exist"))
                } else {
                    e.into()
                }
            })?;
            out.parameter()
                .and_then(|p| p.value())
                .map(str::to_string)
                .ok_or_else(|| RolloutError::BadInput(format!("SSM parameter {name} is empty")))?
        }
    };
    match ec2::describe_image(&aws.ec2, &id).await? {
        None => Err(RolloutError::AmiNotFound(id)),
        Some(i) if i.state != "available" => {
            Err(RolloutError::AmiNotAvailable { id, state: i.state })
        }
        Some(_) => Ok(id),
    }
}

async fn template_of(aws: &Aws, group: &autoscaling::Group) -> Result<String, RolloutError> {
    let unsupported = |detail: String| RolloutError::Unsupported {
        group: group.name.clone(),
        detail,
    };
    if group.uses_mixed_instances_policy {
        return Err(unsupported(
            "it uses a mixed instances policy; bakery rolls groups with a single launch template"
                .into(),
        ));
    }
    let Some(lt_ref) = &group.launch_template else {
        return Err(unsupported(match &group.uses_launch_configuration {
            Some(lc) => format!(
                "it uses launch configuration {lc}; bakery rolls launch templates (migrate the group to a launch template first)"
            ),
            None => "it has no launch template".into(),
        }));
    };
    match (&lt_ref.id, &lt_ref.name) {
        (Some(id), _) => Ok(id.clone()),
        (None, Some(name)) => lt::id_for_name(&aws.ec2, name)
            .await?
            .ok_or_else(|| unsupported(format!("its launch template {name} does not exist"))),
        (None, None) => Err(unsupported("it names no launch template".into())),
    }
}

fn settings(req: &Request, capacity: u32) -> Settings {
    Settings {
        capacity,
        surge: req.max_surge.resolve(capacity).max(1),
        max_unavailable: req.max_unavailable.resolve(capacity),
        canary: req.canary.max(1),
        canary_bake: req.canary_bake,
        warmup: req.warmup,
        health_timeout: req.health_timeout,
        ramp: req.in_group.ramp,
        checkpoints: req.in_group.checkpoints.percents().to_vec(),
        checkpoint_pause: req.in_group.checkpoint_pause,
        protected: req.in_group.protected_instances,
        standby: req.in_group.standby_instances,
    }
}

/// The `--dry-run` plan: versions, batches and the capacity in service at each step.
async fn initial_plan(
    req: &Request,
    group: &autoscaling::Group,
    source: &lt::Version,
    ami: &str,
    aws: &Aws,
) -> Result<serde_json::Value, RolloutError> {
    let s = settings(req, group.desired);
    let o = observe_group(aws, group, &mut BTreeMap::new(), false).await?;
    let from = source.number.to_string();
    let t = Target::rolling(ami, "new", &from, req.in_group.skip_matching);
    let old = o
        .instances
        .iter()
        .filter(|i| !i.lifecycle.starts_with("Terminat") && !t.matches(i))
        .count() as u32;
    let stale_pool: Vec<&str> = o
        .pool
        .iter()
        .filter(|i| !t.matches(i))
        .map(|i| i.id.as_str())
        .collect();
    let left: Vec<serde_json::Value> = plan::left_alone(&s, &t, &o)
        .into_iter()
        .map(|(id, why)| serde_json::json!({"instance": id, "why": why}))
        .collect();
    // The same `decide` the rollout runs, on a simulated group where every launch is healthy.
    let steps = plan::simulate(&s, &t, &o.instances, &o.pool, now());
    let max_needed = steps.iter().map(|b| b.desired).max().unwrap_or(s.capacity);
    Ok(serde_json::json!({
        "group": group.name,
        "launch_template": source.template_id,
        "from_version": source.number,
        "from_ami": source.image_id,
        "to_version": "new (next number)",
        "to_ami": ami,
        "capacity": s.capacity,
        "instances_to_replace": old,
        "skip_matching": req.in_group.skip_matching,
        "left_alone": left,
        "warm_pool_to_refresh": stale_pool,
        "protected_instances": s.protected,
        "standby_instances": s.standby,
        "ramp": s.ramp,
        "checkpoints": s.checkpoints,
        "checkpoint_pause_s": s.checkpoint_pause.as_secs(),
        "max_surge": s.surge,
        "max_unavailable": s.max_unavailable,
        "canary": s.canary,
        "canary_bake_s": s.canary_bake.as_secs(),
        "health_timeout_s": s.health_timeout.as_secs(),
        "batches": steps,
        "max_size_needed": max_needed.max(group.max),
        "changes": "none (dry run)",
    }))
}

/// What acting on one decision came to.
enum Acted {
    /// The rollout is complete.
    Done,
    /// The group changed: poll quickly.
    Changed,
    Unchanged,
}

/// The pause before the next observation: quick right after a change, then less often (at
/// most every 2 s).
fn poll_pause(acted: bool, changed_at: Instant) -> Duration {
    if acted {
        // A floor, so an action that changed nothing visible cannot spin the loop.
        Duration::from_millis(20)
    } else {
        Duration::from_millis(200)
            .max(changed_at.elapsed().mul_f64(0.05))
            .min(Duration::from_secs(2))
    }
}

struct Driver<'a> {
    aws: &'a Aws,
    req: &'a Request,
    reporter: &'a Reporter,
    group: String,
    st: RolloutState,
    progress: ProgressTag,
    lock: Lock,
    /// The lease that fences this driver, with a lease table.
    lease: Option<&'a Keeper>,
    last_renew: Instant,
    resumed: bool,
    /// Instance id -> (AMI, launch time); instances never change either.
    images: BTreeMap<String, (String, u64)>,
    rollback_reason: Option<(String, Vec<String>)>,
    last_wait: String,
    /// This driver's memory of checkpoints and waits (`None` until the first observation).
    held: Option<Held>,
}

impl<'a> Driver<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        aws: &'a Aws,
        req: &'a Request,
        reporter: &'a Reporter,
        group: String,
        st: RolloutState,
        progress: ProgressTag,
        lock: Lock,
        lease: Option<&'a Keeper>,
    ) -> Self {
        Self {
            aws,
            req,
            reporter,
            group,
            st,
            progress,
            lock,
            lease,
            last_renew: Instant::now(),
            resumed: false,
            images: BTreeMap::new(),
            rollback_reason: None,
            last_wait: String::new(),
            held: None,
        }
    }

    /// Picks up the rollout in progress: `--abort` rolls it back, `--force` (another AMI)
    /// restarts it from the same starting point, otherwise it continues where it stopped.
    async fn resume(
        &mut self,
        start: Start,
        group: &autoscaling::Group,
        template_id: &str,
        ami: String,
    ) -> Result<(), RolloutError> {
        match start {
            Start::Abort if self.progress.ph == Phase::Rolling => {
                self.start_rollback("aborted by the user (--abort)".into(), Vec::new())
                    .await?;
            }
            Start::Replace => {
                let source = lt::describe(&self.aws.ec2, template_id, &self.st.from)
                    .await?
                    .ok_or_else(|| {
                        RolloutError::Failed(format!(
                            "launch template {template_id} version {} is gone",
                            self.st.from
                        ))
                    })?;
                self.st.ami = ami;
                self.st.t = now();
                self.progress = ProgressTag::new(Phase::Rolling, &Progress::START);
                self.point_at_new_version(&source).await?;
            }
            _ if self.progress.bt.is_some() => {
                // A batch was in flight when the last driver died: give it a fresh health timeout.
                self.progress.bt = Some(now());
                self.save_progress().await?;
            }
            _ => {}
        }
        if self.progress.ph == Phase::RollingBack && self.rollback_reason.is_none() {
            let reason = group
                .tags
                .get(REASON_TAG)
                .cloned()
                .unwrap_or_else(|| "the rollout was rolled back".into());
            self.rollback_reason = Some((reason, Vec::new()));
        }
        self.resumed = true;
        Ok(())
    }

    /// Takes the group's lock: refused while another live driver holds it. With a lease, the
    /// lease (taken already) decides, and the tag is its human-readable record; a live tag lock
    /// of a driver without the table is still respected.
    async fn lock(&mut self, group: &autoscaling::Group) -> Result<(), RolloutError> {
        if let Some(held) = group.tags.get(LOCK_TAG).and_then(|s| Lock::decode(s)) {
            let fenced_driver = self.lease.is_some() && held.token.starts_with(LEASE_TOKEN_PREFIX);
            if held.token != self.lock.token
                && !fenced_driver
                && !held.is_stale(now(), &crate::host::hostname(), crate::host::pid_alive)
            {
                return Err(RolloutError::Locked {
                    group: self.group.clone(),
                    owner: held.owner,
                    since: rfc3339(held.since),
                    expires: rfc3339(held.expires),
                });
            }
        }
        self.write_lock().await?;
        if self.lease.is_some() {
            return Ok(());
        }
        // Tags have no compare-and-swap: read back after a moment to see who won a race.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let g = autoscaling::describe(&self.aws.autoscaling, &self.group)
            .await?
            .ok_or_else(|| RolloutError::GroupNotFound(self.group.clone()))?;
        match g.tags.get(LOCK_TAG).and_then(|s| Lock::decode(s)) {
            Some(l) if l.token == self.lock.token => Ok(()),
            Some(l) => Err(RolloutError::Locked {
                group: self.group.clone(),
                owner: l.owner,
                since: rfc3339(l.since),
                expires: rfc3339(l.expires),
            }),
            None => Err(RolloutError::Failed(format!(
                "the lock tag on {} vanished while taking it",
                self.group
            ))),
        }
    }

    /// Writes the launch-template version for the rollout's AMI (a copy of `source`), records
    /// it in the state and points the group at it; in that order, so a driver that dies in
    /// between leaves state that names the version.
    async fn point_at_new_version(&mut self, source: &lt::Version) -> Result<(), RolloutError> {
        let description = format!("bakery rollout of {}", self.st.ami);
        let fence = self.guard().await?;
        let to = self
            .fenced(
                fence,
                lt::create_with_image(&self.aws.ec2, source, &self.st.ami, &description),
            )
            .await?;
        self.st.to = to.to_string();
        self.save_state().await?;
        let fence = self.guard().await?;
        self.fenced(
            fence,
            autoscaling::update(
                &self.aws.autoscaling,
                &self.group,
                Some((&self.st.lt, &self.st.to)),
                None,
                None,
                None,
            ),
        )
        .await?;
        Ok(())
    }

    /// Whether the group (as just read) is still this run's: with a lease, whether the lease
    /// is (on this process's clock; no call); without, whether the lock tag is.
    fn check_owner(&self, g: &autoscaling::Group) -> Result<(), RolloutError> {
        if let Some(keeper) = self.lease {
            return keeper.check().map_err(|lost| self.lost(&lost));
        }
        match g.tags.get(LOCK_TAG).and_then(|s| Lock::decode(s)) {
            Some(l) if l.token == self.lock.token => Ok(()),
            other => Err(RolloutError::LockLost {
                group: self.group.clone(),
                owner: other
                    .map(|l| l.owner)
                    .unwrap_or_else(|| "nobody (the lock tag was removed)".into()),
            }),
        }
    }

    /// The lock lost, as the error that stops this run.
    fn lost(&self, lost: &bakery_core::lease::Lost) -> RolloutError {
        RolloutError::LockLost {
            group: self.group.clone(),
            owner: match self.lease {
                Some(keeper) => crate::lease::describe_loss(lost, keeper.table()),
                None => "nobody yet: this run's lock tag ran out while a call was under way".into(),
            },
        }
    }

    /// Before every mutating call; the call then runs inside the fence this returns.
    ///
    /// With a lease: a conditional write renews it, carrying its fencing token; it fails once
    /// another driver took the group, and none is sent once the lease ran out on this process's
    /// clock (paused, cut off). The fence abandons the call, retries included, the moment the
    /// lease is lost or runs out.
    ///
    /// Without: while this run's lock tag is unexpired nobody else may take it, so it goes on.
    /// Once it is about to expire (the process was paused, or AWS unreachable past the lock's
    /// lifetime), it reads the group again and goes on only if the lock is still its own,
    /// renewing it; otherwise it stops without acting. The fence ends at the tag's expiry. Tags
    /// have no compare-and-swap, so this is best effort (see the README).
    async fn guard(&mut self) -> Result<Fence, RolloutError> {
        if let Some(keeper) = self.lease {
            return keeper.verify().await.map_err(|lost| self.lost(&lost));
        }
        if now() + LOCK_MARGIN.as_secs() >= self.lock.expires {
            let g = autoscaling::describe(&self.aws.autoscaling, &self.group)
                .await?
                .ok_or_else(|| RolloutError::GroupNotFound(self.group.clone()))?;
            self.check_owner(&g)?;
            self.write_lock().await?;
        }
        let left = Duration::from_secs(self.lock.expires.saturating_sub(now()));
        Ok(Fence::until(tokio::time::Instant::now() + left))
    }

    /// Runs one mutating call inside `fence`: a lost lock ends it with [`RolloutError::LockLost`].
    async fn fenced<T>(
        &self,
        fence: Fence,
        call: impl std::future::Future<Output = Result<T, AwsError>>,
    ) -> Result<T, RolloutError> {
        match fence.run(call).await {
            Ok(v) => Ok(v),
            Err(Fenced::Call(e)) => Err(e.into()),
            Err(Fenced::Lost(lost)) => Err(self.lost(&lost)),
        }
    }

    /// Writes (renews) the lock tag; with a lease, only after the lease is verified.
    async fn write_lock(&mut self) -> Result<(), RolloutError> {
        let fence = match self.lease {
            Some(keeper) => Some(keeper.verify().await.map_err(|lost| self.lost(&lost))?),
            None => None,
        };
        self.lock.expires = now() + self.req.lock_ttl.as_secs();
        let tags = [(LOCK_TAG, self.lock.encode())];
        let write = autoscaling::set_tags(&self.aws.autoscaling, &self.group, &tags);
        match fence {
            Some(fence) => self.fenced(fence, write).await?,
            None => write.await?,
        }
        self.last_renew = Instant::now();
        Ok(())
    }

    async fn save_state(&mut self) -> Result<(), RolloutError> {
        let fence = self.guard().await?;
        self.fenced(
            fence,
            autoscaling::set_tags(
                &self.aws.autoscaling,
                &self.group,
                &[
                    (STATE_TAG, state::encode(&self.st)),
                    (PROGRESS_TAG, state::encode(&self.progress)),
                ],
            ),
        )
        .await
    }

    async fn save_progress(&mut self) -> Result<(), RolloutError> {
        let fence = self.guard().await?;
        self.fenced(
            fence,
            autoscaling::set_tags(
                &self.aws.autoscaling,
                &self.group,
                &[(PROGRESS_TAG, state::encode(&self.progress))],
            ),
        )
        .await
    }

    async fn suspend_rebalance(&mut self, suspended: &[String]) -> Result<(), RolloutError> {
        if !suspended.iter().any(|p| p == AZ_REBALANCE) {
            let fence = self.guard().await?;
            self.fenced(
                fence,
                autoscaling::suspend(&self.aws.autoscaling, &self.group, &[AZ_REBALANCE]),
            )
            .await?;
            self.st.az = true;
            self.save_state().await?;
        }
        Ok(())
    }

    fn settings(&self) -> Settings {
        let mut s = settings(self.req, self.st.d);
        if self.progress.ph == Phase::RollingBack {
            // A rollback has no canary: restore the old fleet at the normal pace.
            s.canary = s.surge;
            s.canary_bake = Duration::ZERO;
            s.ramp = plan::Ramp::Fixed;
            s.checkpoints.clear();
            // Protected instances this rollout launched go too (they run the new image).
            s.protected = plan::InstancePolicy::Replace;
        }
        s
    }

    /// What the current phase rolls towards: the new image as this rollout's version, or,
    /// rolling back, the old image.
    fn target(&self, rollback_ami: &str) -> Target {
        match self.progress.ph {
            Phase::Rolling => Target::rolling(
                &self.st.ami,
                &self.st.to,
                &self.st.from,
                self.req.in_group.skip_matching,
            ),
            Phase::RollingBack => Target::rollback(rollback_ami),
        }
    }

    async fn observe(&mut self) -> Result<(autoscaling::Group, Observed), RolloutError> {
        let g = autoscaling::describe(&self.aws.autoscaling, &self.group)
            .await?
            .ok_or_else(|| RolloutError::GroupNotFound(self.group.clone()))?;
        let o = observe_group(self.aws, &g, &mut self.images, true).await?;
        Ok((g, o))
    }

    /// The loop: observe, decide, act, until done or failed.
    async fn drive(&mut self) -> Result<(), RolloutError> {
        let mut signals = Signals::new();
        self.report_started();
        let rollback_ami = lt::describe(&self.aws.ec2, &self.st.lt, &self.st.from)
            .await?
            .and_then(|v| v.image_id)
            .unwrap_or_default();
        let mut changed_at = Instant::now();
        // Reads that AWS does not answer (throttled, 5xx) for longer than one call's retries
        // are asked again, for up to OUTAGE_LIMIT in a row: the group keeps serving meanwhile.
        let mut outage = Tolerance::new(OUTAGE_LIMIT);
        loop {
            // A lease that ran out (cut off, paused) ends the run before anything else.
            if let Some(keeper) = self.lease {
                keeper.check().map_err(|lost| self.lost(&lost))?;
            }
            let Some((group, observed)) =
                self.observe_riding_out(&mut outage, &mut signals).await?
            else {
                continue;
            };
            // Every observation re-checks who holds the group; the lock is renewed only by
            // its owner.
            self.check_owner(&group)?;
            if self.last_renew.elapsed() >= self.req.lock_ttl / 3 {
                self.write_lock().await?;
            }
            let target = self.target(&rollback_ami);
            let s = self.settings();
            let held = self
                .held
                .get_or_insert_with(|| Held::resumed(&s, &target, &observed));
            let decision = plan::decide(&s, &self.progress.progress(), held, &target, &observed);
            held.after(&decision, observed.now);
            // After acting, look again at once: the next step may already be possible.
            let acted = !matches!(decision, Decision::Wait { .. } | Decision::Hold { .. });
            match self.act(decision, &group, &s, &target, &observed).await? {
                Acted::Done => return Ok(()),
                Acted::Changed => changed_at = Instant::now(),
                Acted::Unchanged => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(poll_pause(acted, changed_at)) => {}
                sig = signals.next() => return Err(RolloutError::Interrupted(sig)),
            }
        }
    }

    /// Announces the rollout (started or resumed).
    fn report_started(&self) {
        self.reporter.emit(Event::RolloutStarted {
            rollout_id: self.st.id.clone(),
            group: self.group.clone(),
            ami: self.st.ami.clone(),
            launch_template: self.st.lt.clone(),
            from_version: self.st.from.clone(),
            to_version: self.st.to.clone(),
            capacity: self.st.d,
            resumed: self.resumed,
        });
    }

    /// Observes the group; `None` when AWS did not answer and `outage` rides it out (after a
    /// second's pause, which a signal interrupts).
    async fn observe_riding_out(
        &mut self,
        outage: &mut Tolerance,
        signals: &mut Signals,
    ) -> Result<Option<(autoscaling::Group, Observed)>, RolloutError> {
        match self.observe().await {
            Ok(o) => {
                outage.clear();
                Ok(Some(o))
            }
            Err(e) if outage.ride_out(&e) => {
                self.reporter.emit(Event::Waiting {
                    why: format!("AWS did not answer ({e}); asking again"),
                });
                self.last_wait.clear();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    sig = signals.next() => return Err(RolloutError::Interrupted(sig)),
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Carries out one decision of [`plan::decide`]; says whether the rollout is done, or
    /// whether the group changed.
    async fn act(
        &mut self,
        decision: Decision,
        group: &autoscaling::Group,
        s: &Settings,
        target: &Target,
        observed: &Observed,
    ) -> Result<Acted, RolloutError> {
        match decision {
            Decision::Done => {
                self.report_left_alone(s, target, observed);
                return Ok(Acted::Done);
            }
            Decision::DropStandby { ids } => self.drop_standby(&ids).await?,
            Decision::RefreshPool { ids } => {
                let fence = self.guard().await?;
                self.fenced(fence, ec2::terminate_instances(&self.aws.ec2, &ids))
                    .await?;
                self.reporter
                    .emit(Event::WarmPoolRefreshed { instances: ids });
            }
            Decision::Checkpoint { percent, pause } => {
                self.reporter.emit(Event::CheckpointReached {
                    percent,
                    pause_s: pause.as_secs(),
                });
                return Ok(Acted::Unchanged);
            }
            Decision::Hold { why, .. } | Decision::Wait { why } => {
                self.report_wait(why);
                return Ok(Acted::Unchanged);
            }
            Decision::Halt { reason } => {
                return Err(RolloutError::Failed(format!(
                    "{reason}. The new instances stay; rerun the same command to finish once that is resolved, or add --abort to roll back"
                )));
            }
            Decision::StartBatch {
                batch,
                desired,
                retire,
            } => {
                self.start_batch(batch, desired, retire, group.max, s.capacity)
                    .await?
            }
            Decision::Retire { ids } => self.retire(ids, s.capacity).await?,
            Decision::StartCanaryBake => {
                self.progress.ch = Some(now());
                self.save_progress().await?;
                self.reporter.emit(Event::CanaryBaking {
                    seconds: s.canary_bake.as_secs(),
                });
                return Ok(Acted::Unchanged);
            }
            Decision::CanaryBaked => {
                self.progress.cd = true;
                self.save_progress().await?;
                self.reporter.emit(Event::CanaryPassed);
                return Ok(Acted::Unchanged);
            }
            Decision::Fail { reason, instances } => self.fail(reason, instances).await?,
        }
        Ok(Acted::Changed)
    }

    /// Says, once per reason, why the rollout waits.
    fn report_wait(&mut self, why: String) {
        if why != self.last_wait {
            self.reporter.emit(Event::Waiting { why: why.clone() });
            self.last_wait = why;
        }
    }

    /// At the end, names the instances left on the old image, and why.
    fn report_left_alone(&self, s: &Settings, target: &Target, observed: &Observed) {
        let left = plan::left_alone(s, target, observed);
        if !left.is_empty() {
            let list: Vec<String> = left
                .iter()
                .map(|(id, why)| format!("{id} ({why})"))
                .collect();
            self.reporter.emit(Event::Info {
                step: "rollout".into(),
                message: format!(
                    "left as they are, still on the old image: {}",
                    list.join(", ")
                ),
            });
        }
    }

    /// Terminates `ids` one by one, each call fenced; `decrement`: the desired capacity
    /// goes down with each.
    async fn terminate_each(
        &mut self,
        ids: &[String],
        decrement: bool,
    ) -> Result<(), RolloutError> {
        for id in ids {
            let fence = self.guard().await?;
            self.fenced(
                fence,
                autoscaling::terminate_instance(&self.aws.autoscaling, id, decrement),
            )
            .await?;
        }
        Ok(())
    }

    /// Sets the group's desired capacity, fenced.
    async fn set_desired(&mut self, desired: u32) -> Result<(), RolloutError> {
        let fence = self.guard().await?;
        self.fenced(
            fence,
            autoscaling::set_desired(&self.aws.autoscaling, &self.group, desired),
        )
        .await
    }

    /// Terminates the Standby instances on the old image (`--standby-instances replace`).
    async fn drop_standby(&mut self, ids: &[String]) -> Result<(), RolloutError> {
        self.terminate_each(ids, false).await?;
        self.reporter.emit(Event::Info {
            step: "rollout".into(),
            message: format!(
                "terminated {} in Standby on the old image (--standby-instances replace; Standby instances are not counted, so the capacity is unchanged)",
                ids.join(", ")
            ),
        });
        Ok(())
    }

    /// Starts a batch: records it first (write-ahead), raises the group's maximum if it must,
    /// sets the desired capacity and terminates the instances the batch retires at once.
    async fn start_batch(
        &mut self,
        batch: u32,
        desired: u32,
        retire: Vec<String>,
        max: u32,
        capacity: u32,
    ) -> Result<(), RolloutError> {
        // Write-ahead: record the batch before acting, so a resumed driver waits
        // for it instead of retiring old instances early.
        self.progress.b = batch;
        self.progress.bt = Some(now());
        self.save_progress().await?;
        if desired > max {
            let fence = self.guard().await?;
            self.fenced(
                fence,
                autoscaling::update(
                    &self.aws.autoscaling,
                    &self.group,
                    None,
                    None,
                    Some(desired),
                    None,
                ),
            )
            .await?;
        }
        self.set_desired(desired).await?;
        self.terminate_each(&retire, false).await?;
        self.reporter.emit(Event::BatchStarted {
            batch,
            size: desired - capacity,
            desired,
            retiring: retire,
        });
        Ok(())
    }

    /// Retires old instances, decrementing the desired capacity (or, with none to retire,
    /// sets it back to `capacity`), and records that the batch is over.
    async fn retire(&mut self, ids: Vec<String>, capacity: u32) -> Result<(), RolloutError> {
        if ids.is_empty() {
            self.set_desired(capacity).await?;
        }
        self.terminate_each(&ids, true).await?;
        self.progress.bt = None;
        self.save_progress().await?;
        self.reporter.emit(Event::Retired {
            instances: ids,
            desired: capacity,
        });
        Ok(())
    }

    /// The new instances failed: rolls back when allowed, else ends the run with why.
    async fn fail(&mut self, reason: String, instances: Vec<String>) -> Result<(), RolloutError> {
        if self.progress.ph == Phase::Rolling && self.req.rollback {
            self.start_rollback(reason, instances).await
        } else if self.progress.ph == Phase::Rolling {
            Err(RolloutError::Failed(format!(
                "{reason} (--no-rollback: the group stays as it is; rerun to retry, or add --abort to roll back)"
            )))
        } else {
            Err(RolloutError::Failed(format!(
                "the rollback itself failed: {reason}; the group runs launch template version {}; inspect it with `bakery status --asg {}`",
                self.st.from, self.group
            )))
        }
    }

    async fn start_rollback(
        &mut self,
        reason: String,
        instances: Vec<String>,
    ) -> Result<(), RolloutError> {
        self.reporter.emit(Event::RollbackStarted {
            reason: reason.clone(),
            instances: instances.clone(),
        });
        let fence = self.guard().await?;
        self.fenced(
            fence,
            autoscaling::update(
                &self.aws.autoscaling,
                &self.group,
                Some((&self.st.lt, &self.st.from)),
                None,
                None,
                None,
            ),
        )
        .await?;
        self.progress = ProgressTag::new(
            Phase::RollingBack,
            &Progress {
                canary_done: true,
                ..Progress::START
            },
        );
        let short: String = reason.chars().take(250).collect();
        let fence = self.guard().await?;
        self.fenced(
            fence,
            autoscaling::set_tags(
                &self.aws.autoscaling,
                &self.group,
                &[
                    (PROGRESS_TAG, state::encode(&self.progress)),
                    (REASON_TAG, short),
                ],
            ),
        )
        .await?;
        self.rollback_reason = Some((reason, instances));
        Ok(())
    }

    /// Restores the group's sizes and processes, clears the rollout's tags (unless it must be
    /// resumable) and prunes old launch-template versions after a success.
    async fn finish(
        mut self,
        result: Result<(), RolloutError>,
        started: Instant,
    ) -> Result<Summary, RolloutError> {
        // The group is another driver's now: nothing more may change here.
        if let Err(e @ RolloutError::LockLost { .. }) = result {
            return Err(e);
        }
        let resumable = matches!(
            result,
            Err(RolloutError::Interrupted(_))
                | Err(RolloutError::Failed(_))
                | Err(RolloutError::Aws(_))
        );
        if self.st.az {
            self.resume_rebalance().await;
        }
        if resumable {
            return Err(self.keep_resumable(result).await);
        }
        result?;
        self.restore_sizes().await?;
        let reason = self.rollback_reason.clone().or_else(|| {
            (self.progress.ph == Phase::RollingBack)
                .then(|| ("the rollout was rolled back".to_string(), Vec::new()))
        });
        let version = if reason.is_some() {
            self.st.from.clone()
        } else {
            self.st.to.clone()
        };
        if reason.is_none() {
            self.prune_unless_signalled().await?;
        }
        self.clear_tags().await?;
        let ami = if reason.is_some() {
            lt::describe(&self.aws.ec2, &self.st.lt, &self.st.from)
                .await?
                .and_then(|v| v.image_id)
                .unwrap_or_default()
        } else {
            self.st.ami.clone()
        };
        self.reporter.emit(Event::RolloutFinished {
            result: if reason.is_some() {
                "rolled back".into()
            } else {
                "succeeded".into()
            },
            group: self.group.clone(),
            ami: ami.clone(),
            version: version.clone(),
            duration_s: started.elapsed().as_secs_f64(),
        });
        match reason {
            Some((reason, instances)) => Err(RolloutError::RolledBack { reason, instances }),
            None => Ok(Summary {
                group: self.group.clone(),
                ami,
                version,
                changed: true,
            }),
        }
    }

    /// Resumes the `AZRebalance` this rollout suspended; a failure is logged.
    async fn resume_rebalance(&mut self) {
        let asg = &self.aws.autoscaling;
        let resumed = match self.guard().await {
            Ok(fence) => {
                self.fenced(
                    fence,
                    autoscaling::resume(asg, &self.group, &[AZ_REBALANCE]),
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = resumed {
            tracing::warn!(group = %self.group, error = %e, "could not resume AZRebalance");
        } else {
            self.st.az = false;
        }
    }

    /// Keeps the state for the next driver and frees the lock now rather than at expiry;
    /// returns the run's error.
    async fn keep_resumable(&mut self, result: Result<(), RolloutError>) -> RolloutError {
        let asg = &self.aws.autoscaling;
        let _ = self.save_state().await;
        if let Ok(fence) = self.guard().await {
            let _ = self
                .fenced(
                    fence,
                    autoscaling::delete_tags(asg, &self.group, &[LOCK_TAG]),
                )
                .await;
        }
        result
            .err()
            .unwrap_or_else(|| RolloutError::Failed("unknown".into()))
    }

    /// Gives the group back its minimum, maximum and desired capacity from before the rollout.
    async fn restore_sizes(&mut self) -> Result<(), RolloutError> {
        let fence = self.guard().await?;
        self.fenced(
            fence,
            autoscaling::update(
                &self.aws.autoscaling,
                &self.group,
                None,
                Some(self.st.mn),
                Some(self.st.mx),
                Some(self.st.d),
            ),
        )
        .await
    }

    /// Prunes old launch-template versions. Pruning is housekeeping: SIGINT/SIGTERM skips it
    /// (the rollout is done; the next rollout prunes), and the group's tags are still cleared.
    async fn prune_unless_signalled(&mut self) -> Result<(), RolloutError> {
        let mut signals = Signals::new();
        let fence = self.guard().await?;
        tokio::select! {
            r = self.fenced(fence, self.prune()) => if let Err(e) = r {
                tracing::warn!(error = %e, "could not prune old launch template versions");
            },
            sig = signals.next() => self.reporter.emit(Event::Waiting {
                why: format!("{sig}: pruning of old launch template versions skipped; the next rollout prunes them"),
            }),
        }
        Ok(())
    }

    /// Removes the rollout's tags (state, progress, reason, lock) from the group.
    async fn clear_tags(&mut self) -> Result<(), RolloutError> {
        let fence = self.guard().await?;
        self.fenced(
            fence,
            autoscaling::delete_tags(
                &self.aws.autoscaling,
                &self.group,
                &[STATE_TAG, PROGRESS_TAG, REASON_TAG, LOCK_TAG],
            ),
        )
        .await
    }

    async fn prune(&self) -> Result<(), AwsError> {
        let versions = lt::all_versions(&self.aws.ec2, &self.st.lt).await?;
        // Never a version something still uses: this rollout's, the newest (`$Latest` of any
        // group that names it so), and every version another group on the same template, or
        // one of its instances, runs (one template often serves staging and production).
        let mut in_use: BTreeSet<i64> = self.st.to.parse().ok().into_iter().collect();
        in_use.extend(versions.iter().map(|v| v.number).max());
        let template_name = versions.first().and_then(|v| v.template_name.clone());
        for g in autoscaling::all(&self.aws.autoscaling).await? {
            // A group names the template by id or by name, directly or in a mixed instances
            // policy (its own and its overrides').
            let refs: Vec<&autoscaling::LaunchTemplateRef> = g
                .launch_template
                .iter()
                .chain(g.mixed_launch_templates.iter())
                .filter(|t| {
                    t.id.as_deref() == Some(self.st.lt.as_str())
                        || (t.name.is_some() && t.name == template_name)
                })
                .collect();
            if refs.is_empty() {
                continue;
            }
            in_use.extend(
                refs.iter()
                    .filter_map(|t| t.version.as_deref().and_then(|v| v.parse::<i64>().ok())),
            );
            in_use.extend(g.instances.iter().filter_map(|i| {
                i.launch_template_version
                    .as_deref()
                    .and_then(|v| v.parse::<i64>().ok())
            }));
        }
        let in_use: Vec<i64> = in_use.into_iter().collect();
        let doomed = lt::versions_to_prune(&versions, self.req.keep_versions, &in_use);
        let refused = lt::delete_versions(&self.aws.ec2, &self.st.lt, &doomed).await?;
        for (version, why) in &refused {
            tracing::warn!(template = %self.st.lt, version, reason = %why, "launch template version not deleted");
        }
        if !doomed.is_empty() {
            tracing::info!(template = %self.st.lt, deleted = doomed.len() - refused.len(), kept = self.req.keep_versions, "pruned old launch template versions");
        }
        Ok(())
    }
}

/// An instance's health across every target group of the group.
fn combined_health(groups: &[BTreeMap<String, elbv2::TargetState>], id: &str) -> TargetHealth {
    let mut result = TargetHealth::Healthy;
    for g in groups {
        match g.get(id) {
            None => return TargetHealth::Initial,
            Some(t) => match t.state.as_str() {
                "healthy" => {}
                "initial" => result = TargetHealth::Initial,
                other => {
                    let why = t.reason.clone().unwrap_or_else(|| other.to_string());
                    return TargetHealth::Unhealthy(why);
                }
            },
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(state: &str, reason: Option<&str>) -> elbv2::TargetState {
        elbv2::TargetState {
            state: state.into(),
            reason: reason.map(str::to_string),
            description: None,
        }
    }

    #[test]
    fn health_combines_every_target_group() {
        let a = BTreeMap::from([("i-1".to_string(), ts("healthy", None))]);
        let b = BTreeMap::from([("i-1".to_string(), ts("unhealthy", Some("Target.Timeout")))]);
        let c = BTreeMap::from([(
            "i-1".to_string(),
            ts("initial", Some("Elb.RegistrationInProgress")),
        )]);
        assert_eq!(
            combined_health(std::slice::from_ref(&a), "i-1"),
            TargetHealth::Healthy
        );
        assert_eq!(
            combined_health(&[a.clone(), b], "i-1"),
            TargetHealth::Unhealthy("Target.Timeout".into())
        );
        assert_eq!(
            combined_health(&[a.clone(), c], "i-1"),
            TargetHealth::Initial
        );
        assert_eq!(
            combined_health(&[a], "i-2"),
            TargetHealth::Initial,
            "not registered yet"
        );
        assert_eq!(
            combined_health(&[], "i-2"),
            TargetHealth::Healthy,
            "no target groups: ASG health only"
        );
    }
}
