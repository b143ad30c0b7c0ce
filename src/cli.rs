//! The command line, as clap sees it. Only argument shapes live here; each command's module
//! turns these "low" arguments into a validated plan before any work starts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::bake::OnError;
use crate::output::Format;

#[derive(Debug, Parser)]
#[command(
    name = "bakery",
    version,
    about = "Bake AMIs, roll them into Auto Scaling Groups, keep fleets healthy",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// AWS region (default: AWS_REGION or the profile's region).
    #[arg(long, global = true, env = "AWS_REGION")]
    pub region: Option<String>,
    /// AWS profile from the shared config files.
    #[arg(long, global = true, env = "AWS_PROFILE")]
    pub profile: Option<String>,
    /// Send every AWS call to this endpoint (e.g. a local emulator).
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// `human` progress on stderr, or `json`: one event per line on stdout.
    #[arg(long, global = true, value_enum, default_value_t = Format::Human)]
    pub output: Format,
    /// More log detail on stderr (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only errors and the result.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// No progress lines (steps, waits, resources made and removed) on stderr; provisioner
    /// output, warnings, errors and the result still show.
    #[arg(long, global = true)]
    pub no_progress: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bake an AMI from a recipe (and, with `[distribute]`, promote it).
    Build(BuildArgs),
    /// Copy a baked AMI to other regions, share it, publish its id; resumable.
    Promote(PromoteArgs),
    /// Roll one image over many groups in waves (regions, accounts), gated on health, alarms and
    /// HTTP, reverted as the plan says on failure; resumable (--status, --abort, --dry-run).
    Release(ReleaseArgs),
    /// Check a recipe without calling AWS.
    Validate(RecipeArgs),
    /// Roll an AMI into an Auto Scaling group in health-gated batches.
    Rollout(RolloutArgs),
    /// Show a group: versions, instances, health, and any rollout in progress.
    Status(StatusArgs),
    /// Run the health daemon: watch groups and replace unhealthy instances, with a fleet breaker.
    Daemon(DaemonArgs),
    /// Remove what bakery left behind: temporaries of dead bakes, images of failed bakes, stale locks.
    Gc(GcArgs),
    /// Deregister a recipe's old AMIs (and their snapshots), never one in use.
    Prune(PruneArgs),
    /// Check the architecture around a group: subnets, security groups, database, IMDSv2, EBS, secrets.
    Audit(AuditArgs),
    /// Create what bakery needs in the account: the DynamoDB lease table (a no-op when it exists).
    Init(InitArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The DynamoDB lease table to create (partition key `pk` string, on demand, TTL on `ttl`).
    #[arg(long, env = "BAKERY_LEASE_TABLE", value_name = "NAME", value_parser = parse_table_name)]
    pub lease_table: String,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The Auto Scaling group.
    #[arg(long)]
    pub asg: String,
    /// The RDS instance the app uses (default: every RDS instance in the group's VPC).
    #[arg(long)]
    pub db_instance: Option<String>,
    /// The secret the instances read at run time (name or ARN): checks their role may read it.
    #[arg(long)]
    pub secret: Option<String>,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Leave alone anything younger than this (a bake may be running).
    #[arg(long, value_parser = parse_age, default_value = "1h", allow_hyphen_values = true)]
    pub older_than: std::time::Duration,
    /// List what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Only the leftovers of this bake (its `bakery:build-id`).
    #[arg(long)]
    pub build_id: Option<String>,
    /// Also look in these regions (comma-separated or repeated): where a recipe distributes to.
    #[arg(long = "regions", value_name = "REGION", value_delimiter = ',')]
    pub regions: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Only AMIs whose name starts with this (e.g. the recipe's name prefix "web-").
    #[arg(long)]
    pub name_prefix: String,
    /// How many of the newest to keep.
    #[arg(long)]
    pub keep: usize,
    /// List what would be deregistered, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Prune in these regions too (comma-separated or repeated): where a recipe distributes to.
    /// An image in use in any of them is kept in all of them.
    #[arg(long = "regions", value_name = "REGION", value_delimiter = ',')]
    pub regions: Vec<String>,
    /// Turn off an image's deregistration protection to prune it (else it is kept and reported).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The daemon's configuration (TOML).
    #[arg(long, default_value = "/etc/bakery/daemon.toml")]
    pub config: PathBuf,
    /// Only check the configuration and exit.
    #[arg(long)]
    pub check: bool,
    /// Log format on stderr: `json` (for journald) or `text`; default: json unless stderr is a terminal.
    #[arg(long, value_parser = ["json", "text"])]
    pub log_format: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("image").args(["ami", "manifest", "ami_param"])))]
pub struct RolloutArgs {
    /// The Auto Scaling group.
    #[arg(long)]
    pub asg: String,
    /// The AMI to roll out.
    #[arg(long)]
    pub ami: Option<String>,
    /// Take the AMI from a `bakery build` manifest.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Take the AMI id from an SSM parameter.
    #[arg(long, value_name = "SSM_PATH")]
    pub ami_param: Option<String>,
    /// Instances launched per batch: a count or a percentage of the desired capacity (at least 1).
    #[arg(long, default_value = "25%")]
    pub max_surge: crate::rollout::plan::Amount,
    /// Old instances that may be out of service at once (count or percentage).
    #[arg(long, default_value = "0")]
    pub max_unavailable: crate::rollout::plan::Amount,
    /// Size of the first batch.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub canary: u32,
    /// After the canary is healthy, watch it this long before going on (e.g. 5m).
    #[arg(long, value_parser = bounded(0, 24 * 3600), default_value = "0s")]
    pub canary_bake: std::time::Duration,
    /// How long a batch may take to become healthy before the rollout rolls back.
    #[arg(long, value_parser = bounded(1, 24 * 3600), default_value = "10m")]
    pub health_timeout: std::time::Duration,
    /// How long a new instance must have run before it counts as ready.
    #[arg(long, value_parser = bounded(0, 24 * 3600), default_value = "0s")]
    pub warmup: std::time::Duration,
    /// On failure, leave the group as it is instead of rolling back.
    #[arg(long)]
    pub no_rollback: bool,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Roll back the rollout in progress on this group.
    #[arg(long, conflicts_with = "force")]
    pub abort: bool,
    /// Replace a rollout in progress of another AMI with this one.
    #[arg(long)]
    pub force: bool,
    /// Launch-template versions to keep after a successful rollout (never one in use).
    #[arg(long, default_value_t = 10, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    pub keep_versions: usize,
    /// How long the group's lock outlives this run if it stops renewing it (paused, cut off,
    /// killed on another machine), 10s to 10m; another driver may take the group after that.
    #[arg(long, value_parser = parse_lock_ttl, default_value = "60s")]
    pub lock_ttl: std::time::Duration,
    /// Fence the group's rollouts with a lease in this DynamoDB table (made by `bakery init
    /// --lease-table`): then one driver per group is guaranteed, not best effort. Without it,
    /// the lock is the group's `bakery:rollout-lock` tag.
    #[arg(long, env = "BAKERY_LEASE_TABLE", value_name = "NAME", value_parser = parse_table_name)]
    pub lease_table: Option<String>,
    /// Replace every instance, even those already on the AMI and launch-template version
    /// (default: skip them, as Instance Refresh's SkipMatching).
    #[arg(long)]
    pub no_skip_matching: bool,
    /// Old instances protected from scale in: left as they are (ignore), waited for until
    /// unprotected, at most --health-timeout (wait), or replaced (replace).
    #[arg(long, value_name = "POLICY", default_value = "ignore")]
    pub protected_instances: crate::rollout::InstancePolicy,
    /// Old instances in Standby: left as they are (ignore), waited for until they leave
    /// Standby, at most --health-timeout (wait), or terminated (replace).
    #[arg(long, value_name = "POLICY", default_value = "ignore")]
    pub standby_instances: crate::rollout::InstancePolicy,
    /// Pause when this share of the instances is replaced: ascending percentages, the last 100
    /// (e.g. 25,50,100).
    #[arg(long, value_name = "PERCENTS")]
    pub checkpoints: Option<crate::rollout::Checkpoints>,
    /// How long each checkpoint pauses (default 1h, as Instance Refresh's CheckpointDelay).
    #[arg(long, value_parser = bounded(0, 24 * 3600), default_value = "1h", requires = "checkpoints")]
    pub checkpoint_pause: std::time::Duration,
    /// Batch sizes after the canary: `fixed` (--max-surge each) or `exponential` (1, 2, 4, …
    /// from the canary's size, up to --max-surge).
    #[arg(long, value_name = "RAMP", default_value = "fixed")]
    pub ramp: crate::rollout::Ramp,
}

#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The release plan (TOML): [source] and [[wave]]s; see the README.
    pub plan: PathBuf,
    /// Show the release's record (waves, groups, states) and change nothing.
    #[arg(long, conflicts_with_all = ["abort", "dry_run"])]
    pub status: bool,
    /// Revert everything the release changed, in every wave, and end it.
    #[arg(long, conflicts_with = "dry_run")]
    pub abort: bool,
    /// Resolve the plan (groups, images, alarms) and print every group's batches; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run the plan again as a new release when its last run ended (done, rolled back, stopped,
    /// aborted); without it, rerunning an ended release only reports how it ended.
    #[arg(long, conflicts_with_all = ["abort", "status"])]
    pub restart: bool,
    /// How long a group's lock (and the release's lease) outlives this run if it stops renewing it.
    #[arg(long, value_parser = parse_lock_ttl, default_value = "60s")]
    pub lock_ttl: std::time::Duration,
    /// Fence the release and its rollouts with leases in this DynamoDB table, and keep the
    /// release's record there too (so another machine can resume or abort it).
    #[arg(long, env = "BAKERY_LEASE_TABLE", value_name = "NAME", value_parser = parse_table_name)]
    pub lease_table: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The Auto Scaling group.
    #[arg(long)]
    pub asg: String,
}

#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// The recipe file (TOML).
    pub recipe: PathBuf,
    /// Set a recipe variable: --var name=value (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// Read variables from a TOML file of `name = "value"` lines (repeatable).
    #[arg(long = "var-file", value_name = "FILE")]
    pub var_files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// What to do with temporary resources when the bake fails.
    #[arg(long, value_enum, default_value_t = OnError::Cleanup)]
    pub on_error: OnError,
    /// Accept the instance's SSH host key without checking it against the console output.
    #[arg(long)]
    pub trust_host_key_on_first_use: bool,
    /// Where to write the manifest.
    #[arg(long, default_value = "bakery-manifest.json")]
    pub manifest: PathBuf,
    /// Continue the build with this id instead of baking again: its image is complete and its
    /// promotion (`[distribute]`) failed or was interrupted.
    #[arg(long, value_name = "BUILD_ID")]
    pub resume: Option<String>,
}

/// `bakery promote`: the same settings as a recipe's `[distribute]` table.
#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The manifest of the bake (`bakery build --manifest`); updated with every region's image.
    pub manifest: PathBuf,
    /// Copy to these regions (comma-separated or repeated); none: the manifest's region only.
    #[arg(long = "to", value_name = "REGION")]
    pub to: Vec<String>,
    /// Encrypt the copies (with --kms-key-id's key, else the region's default EBS key).
    #[arg(long)]
    pub encrypted: bool,
    /// A region's KMS key (id, alias or ARN of that region), repeatable.
    #[arg(long = "kms-key-id", value_name = "REGION=KEY")]
    pub kms_key_ids: Vec<String>,
    /// Share with this account (12 digits): launch permission and createVolumePermission.
    #[arg(long = "account", value_name = "ACCOUNT_ID")]
    pub accounts: Vec<String>,
    /// Share with an organization (its ARN).
    #[arg(long = "organization-arn", value_name = "ARN")]
    pub organization_arns: Vec<String>,
    /// Share with an organizational unit (its ARN).
    #[arg(long = "ou-arn", value_name = "ARN")]
    pub ou_arns: Vec<String>,
    /// Tag every copy and its snapshots at creation, repeatable.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Write each region's AMI id to this SSM parameter (data type aws:ec2:image).
    #[arg(long, value_name = "PATH")]
    pub ssm_parameter: Option<String>,
    /// Deprecate the images: a duration (e.g. 90d) or an RFC 3339 date.
    #[arg(long, value_name = "WHEN")]
    pub deprecate_at: Option<String>,
    /// Protect the images from deregistration.
    #[arg(long)]
    pub deregistration_protection: bool,
}

impl PromoteArgs {
    /// The settings as flags, for the core's validation.
    pub fn flags(&self) -> crate::recipe::distribute::Flags {
        crate::recipe::distribute::Flags {
            regions: self.to.clone(),
            encrypted: self.encrypted,
            kms_key_ids: self.kms_key_ids.clone(),
            accounts: self.accounts.clone(),
            organization_arns: self.organization_arns.clone(),
            ou_arns: self.ou_arns.clone(),
            tags: self.tags.clone(),
            ssm_parameter: self.ssm_parameter.clone(),
            deprecate_at: self.deprecate_at.clone(),
            deregistration_protection: self.deregistration_protection,
        }
    }

    /// True when no distribution setting was given (a rerun resumes with the journal's).
    pub fn no_settings(&self) -> bool {
        self.to.is_empty()
            && !self.encrypted
            && self.kms_key_ids.is_empty()
            && self.accounts.is_empty()
            && self.organization_arns.is_empty()
            && self.ou_arns.is_empty()
            && self.tags.is_empty()
            && self.ssm_parameter.is_none()
            && self.deprecate_at.is_none()
            && !self.deregistration_protection
    }
}

/// An age such as `30m`, `1h` or `0s` (humantime units); a clear word for the usual mistakes.
fn parse_age(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!(
            "{s:?} is negative: an age is how long ago, e.g. 30m or 2h (0s: everything whose bake is over)"
        ));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("{s:?} is not a duration ({e}); e.g. 30m, 2h, 1d"))
}

/// A duration flag with bounds (seconds), so that no flag can overflow the clock arithmetic
/// that waits on it; the error names the range.
fn bounded(
    lo: u64,
    hi: u64,
) -> impl Fn(&str) -> Result<std::time::Duration, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| format!("{s:?} is not a duration ({e}); e.g. 90s, 5m, 1h"))?;
        if d.as_secs() < lo || d > std::time::Duration::from_secs(hi) {
            return Err(format!(
                "{s:?} is out of range: {} to {}",
                humantime::format_duration(std::time::Duration::from_secs(lo)),
                humantime::format_duration(std::time::Duration::from_secs(hi))
            ));
        }
        Ok(d)
    }
}

fn parse_lock_ttl(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); e.g. 60s"))?;
    if d < std::time::Duration::from_secs(10) || d > std::time::Duration::from_secs(600) {
        return Err(format!("{s:?} is out of range: 10s to 10m"));
    }
    Ok(d)
}

/// A DynamoDB table name: 3 to 255 of `a-z A-Z 0-9 _ - .` (as DynamoDB requires).
fn parse_table_name(s: &str) -> Result<String, String> {
    let ok = (3..=255).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a DynamoDB table name: 3 to 255 letters, digits, '_', '-' or '.'"
        ))
    }
}
