//! The bake pipeline: from a validated recipe to an AMI, leaving nothing behind.
//!
//! resolve source -> key pair + security group (in parallel) -> launch -> wait for SSH and
//! verify the host key -> provisioners -> stop -> create image -> wait available -> release the
//! temporaries -> manifest. Each temporary resource is pushed on the [`undo::UndoStack`] before
//! it is created; [`run`] releases the stack whatever happens, Ctrl-C included.

pub mod manifest;
pub mod undo;
mod unwind;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::Mutex;

use crate::aws::{ec2, Aws, AwsError};
use crate::comm::ssh::{HostKeyPolicy, SshSession, SshTarget};
use crate::comm::ssm::SsmSession;
use crate::comm::{hostkey, keys, CommError, LineSink, Session};
use crate::output::{Event, Reporter, Stream};
use crate::recipe::template;
use crate::recipe::{
    Communicator, Interface, Provisioner, Recipe, ShellBody, ShellProvisioner, SourceAmi,
};
use crate::secret::{OutputRedactor, Redactor, SharedRedactor};
use crate::signals::Signals;
use crate::wait::{self, Poll, Probe};
use manifest::{Manifest, Step};
use tokio_util::sync::CancellationToken;
use undo::{Temp, UndoStack, BUILD_ID_TAG};

pub use bakery_core::marks::{COMPLETE_TAG, EXPIRES_TAG, OWNER_TAG, TEMPORARY_TAG};
/// Lifetime written in the expiry tag: longer than any sane bake.
pub const TEMPORARY_TTL: Duration = Duration::from_secs(6 * 3600);
/// Two bakes of one image name that launched within this many seconds of each other race for
/// the name; the later yields (see `marks::yield_name_to`).
const NAME_RACE_WINDOW_S: i64 = 600;
/// How long to wait for a launched instance to be `running` with an address.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long to wait for a stopped instance.
const STOP_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How long to wait for a communicator to come back after an expected disconnect, over SSM.
const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Per-attempt TCP connect timeout while waiting for SSH.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    /// Remove every temporary resource (the default).
    Cleanup,
    /// Keep them for debugging and print how to remove them.
    Abort,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub on_error: OnError,
    pub trust_host_key_on_first_use: bool,
    pub manifest_path: Option<std::path::PathBuf>,
    /// Told (build id, image id, image name) as soon as the image is available, before the bake
    /// finishes: a promotion starts its copies while the bake tags the snapshots and releases
    /// the temporaries.
    pub image_ready: Option<tokio::sync::mpsc::UnboundedSender<(String, String, String)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    #[error(
        "source AMI {0}: not found (check the id and the region, or that your account may use it)"
    )]
    SourceNotFound(String),
    #[error("source AMI {id} is {state}, not available; pick an available image")]
    SourceNotAvailable { id: String, state: String },
    #[error("no AMI matches owners {owners:?} and name {name:?}; check the pattern with `aws ec2 describe-images --owners ... --filters Name=name,Values=...`")]
    NoSourceMatch { owners: Vec<String>, name: String },
    #[error("{count} AMIs match the name {name:?}; set most_recent = true in [source.filter] or narrow the pattern")]
    AmbiguousSource { count: usize, name: String },
    #[error("SSM parameter {0} holds no AMI id")]
    BadSsmParameter(String),
    #[error("an AMI named {name:?} already exists ({id}); change [image] name (add {{{{timestamp}}}}) or deregister it")]
    ImageNameTaken { name: String, id: String },
    #[error("bake {other} is making an image named {name:?} at the same time, and AMI names are unique; add {{{{build_id}}}} to [image] name, or run the bakes one after the other")]
    ImageNameContended { name: String, other: String },
    #[error("subnet {0} not found in this region; check [instance] subnet")]
    SubnetNotFound(String),
    #[error(
        "the recipe names no subnet and the region has no default subnet; set [instance] subnet"
    )]
    NoSubnet,
    #[error("instance {id} has no {interface} to connect to; set [communicator] interface (e.g. \"private_ip\") or host")]
    NoAddress { id: String, interface: &'static str },
    #[error("instance {id} went {state} while waiting for it to run")]
    InstanceDied { id: String, state: String },
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("{0}")]
    Wait(String),
    #[error("SSH to {host} never came up: {detail}")]
    SshUnavailable { host: String, detail: String },
    #[error("instance {id}: its console output shows no host key fingerprints after {waited:?}; \
             bakery cannot verify the SSH server. If the image does not print them (no cloud-init), \
             pass --trust-host-key-on-first-use")]
    NoFingerprints { id: String, waited: Duration },
    #[error(transparent)]
    HostKey(CommError),
    #[error("SSM agent of {id}: {detail}")]
    SsmAgent { id: String, detail: String },
    #[error("provisioner {label} failed with {status}; last output:\n{}", .tail.join("\n"))]
    ProvisionerFailed {
        label: String,
        status: String,
        tail: Vec<String>,
    },
    #[error("provisioner {label}: {source}")]
    ProvisionerError { label: String, source: CommError },
    #[error("image {id} ended {state}{}", .reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    ImageFailed {
        id: String,
        state: String,
        reason: Option<String>,
    },
    #[error("{0}")]
    Key(#[from] keys::KeyError),
    #[error("writing the manifest {path}: {source}")]
    Manifest {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The bake's cancellation token fired (a signal; [`BakeError::Interrupted`] is reported).
    #[error("cancelled")]
    Cancelled,
    #[error("interrupted by {0}")]
    Interrupted(crate::signals::Signal),
    #[error("bakery panicked ({0}); this is a bug: please report it. The bake's temporary resources are removed all the same")]
    Panicked(String),
    #[error(transparent)]
    Reference(#[from] crate::aws::references::ReferenceError),
    #[error("template: {0}")]
    Template(String),
}

impl wait::Outage for BakeError {
    fn is_outage(&self) -> bool {
        matches!(self, BakeError::Aws(e) if e.transient)
    }
}

impl BakeError {
    /// The process exit code for this failure (see the README's table).
    pub fn exit_code(&self) -> i32 {
        match self {
            BakeError::ProvisionerFailed { .. } | BakeError::ProvisionerError { .. } => 3,
            BakeError::HostKey(_) | BakeError::NoFingerprints { .. } => 4,
            BakeError::Interrupted(sig) => sig.exit_code(),
            BakeError::Panicked(_) => 1,
            BakeError::SourceNotFound(_)
            | BakeError::SourceNotAvailable { .. }
            | BakeError::NoSourceMatch { .. }
            | BakeError::AmbiguousSource { .. }
            | BakeError::BadSsmParameter(_)
            | BakeError::ImageNameTaken { .. }
            | BakeError::ImageNameContended { .. }
            | BakeError::SubnetNotFound(_)
            | BakeError::NoSubnet
            | BakeError::Reference(_)
            | BakeError::Template(_) => 2,
            _ => 1,
        }
    }
}

/// What a finished bake produced, and whether its cleanup was complete.
pub struct Outcome {
    pub result: Result<Manifest, BakeError>,
    pub cleanup_failures: Vec<undo::CleanupFailure>,
    /// Resources deliberately kept (`--on-error=abort`) or left by an aborted cleanup.
    pub left_behind: Vec<Temp>,
    /// Hides the bake's secrets in anything printed about it.
    pub redactor: Redactor,
}

/// Bakes `recipe`, then releases every temporary resource (unless `--on-error=abort` and the
/// bake failed). SIGINT/SIGTERM interrupt the bake and run the cleanup; a second signal aborts
/// the cleanup and reports what is left.
pub async fn run(aws: &Aws, recipe: &Recipe, opts: &Options, reporter: &Reporter) -> Outcome {
    let build_id = new_build_id();
    let redactor = SharedRedactor::default();
    let undo = Arc::new(Mutex::new(UndoStack::default()));
    let inflight: Inflight = Arc::default();
    let cancel = CancellationToken::new();
    let mut signals = Signals::new();
    reporter.emit(Event::BuildStarted {
        build_id: build_id.clone(),
        recipe: recipe.path.display().to_string(),
        region: aws.region.clone(),
    });
    let bake = Bake {
        aws,
        recipe,
        opts,
        reporter,
        build_id: build_id.clone(),
        undo: undo.clone(),
        cancel: cancel.clone(),
        steps: std::sync::Mutex::new(Vec::new()),
        started: OffsetDateTime::now_utc(),
        clock: Instant::now(),
        resolved: std::sync::OnceLock::new(),
        redactor: redactor.clone(),
        tail: Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new())),
        inflight: inflight.clone(),
    };
    let result = bake_until_signal(&bake, &cancel, &mut signals).await;
    let redactor = redactor.get();
    if let Err(e) = &result {
        reporter.emit(Event::BuildFailed {
            error: redactor.redact(&format!("{e}")),
            exit_code: e.exit_code(),
        });
    }
    // A create call already sent when the bake was interrupted still creates its resource:
    // wait for it, so the cleanup below finds what it made.
    await_inflight(&inflight, &mut signals).await;
    let mut stack = std::mem::take(&mut *undo.lock().await);
    if result.is_ok() {
        stack.keep_images();
    }
    if result.is_err() && opts.on_error == OnError::Abort {
        report_kept(aws, stack.items(), reporter);
        return Outcome {
            result,
            cleanup_failures: Vec::new(),
            left_behind: stack.items().to_vec(),
            redactor,
        };
    }
    let (cleanup_failures, left_behind) = cleanup(aws, stack, reporter, &mut signals).await;
    Outcome {
        result,
        cleanup_failures,
        left_behind,
        redactor,
    }
}

/// Runs the bake until it ends, a panic included, or until a signal: then the bake is
/// cancelled and given [`CANCEL_GRACE`] to end what it started.
async fn bake_until_signal(
    bake: &Bake<'_>,
    cancel: &CancellationToken,
    signals: &mut Signals,
) -> Result<Manifest, BakeError> {
    let mut running = unwind::CatchUnwind::new(bake.run());
    let result = tokio::select! {
        r = &mut running => r.unwrap_or_else(|panic| Err(BakeError::Panicked(panic))),
        sig = signals.next() => {
            // The running step sees the token and ends what it started (over SSM, the command:
            // CancelCommand); the others end at once (`Bake::step`).
            cancel.cancel();
            let _ = tokio::time::timeout(CANCEL_GRACE, &mut running).await;
            Err(BakeError::Interrupted(sig))
        }
    };
    drop(running);
    result
}

/// Waits (up to [`INFLIGHT_TIMEOUT`], or until another signal) for the create calls still on
/// the wire.
async fn await_inflight(inflight: &Inflight, signals: &mut Signals) {
    let pending: Vec<_> = std::mem::take(&mut *inflight.lock().unwrap_or_else(|p| p.into_inner()));
    if !pending.is_empty() {
        let all = async {
            for h in pending {
                let _ = h.await;
            }
        };
        tokio::select! {
            _ = tokio::time::timeout(INFLIGHT_TIMEOUT, all) => {}
            _ = signals.next() => {}
        }
    }
}

/// Reports each of `items` as kept, with how to remove it.
fn report_kept(aws: &Aws, items: &[Temp], reporter: &Reporter) {
    for t in items {
        reporter.emit(Event::ResourceKept {
            kind: t.kind().into(),
            id: t.label(),
            remove_with: t.removal_hint(&aws.region),
        });
    }
}

async fn cleanup(
    aws: &Aws,
    mut stack: UndoStack,
    reporter: &Reporter,
    signals: &mut Signals,
) -> (Vec<undo::CleanupFailure>, Vec<Temp>) {
    if stack.is_empty() {
        return (Vec::new(), Vec::new());
    }
    reporter.emit(Event::StepStarted {
        step: "cleanup".into(),
    });
    let mut failures = Vec::new();
    while let Some(t) = stack.pop() {
        let released = tokio::select! {
            r = undo::release(&aws.ec2, &t, reporter) => r,
            _ = signals.next() => {
                // Second signal: stop cleaning, say exactly what is left and how to remove it.
                let mut left = stack.items().to_vec();
                left.push(t);
                for l in &left {
                    reporter.emit(Event::ResourceKept {
                        kind: l.kind().into(),
                        id: l.label(),
                        remove_with: l.removal_hint(&aws.region),
                    });
                }
                return (failures, left);
            }
        };
        if let Err(e) = released {
            reporter.emit(Event::CleanupFailed {
                kind: t.kind().into(),
                id: t.label(),
                error: e.to_string(),
            });
            failures.push(undo::CleanupFailure {
                kind: t.kind(),
                id: t.label(),
                error: e.to_string(),
            });
        }
    }
    (failures, Vec::new())
}

fn new_build_id() -> String {
    let now = OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}-{}",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// The state of one bake in progress.
struct Bake<'a> {
    aws: &'a Aws,
    recipe: &'a Recipe,
    opts: &'a Options,
    reporter: &'a Reporter,
    build_id: String,
    undo: Arc<Mutex<UndoStack>>,
    cancel: CancellationToken,
    steps: std::sync::Mutex<Vec<Step>>,
    started: OffsetDateTime,
    clock: Instant,
    /// Resolved `secret:` / `rds:` references and the redactor for their secret values.
    resolved: std::sync::OnceLock<BTreeMap<String, String>>,
    redactor: SharedRedactor,
    /// The last output lines of the running provisioner, redacted, for its error message.
    tail: Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
    /// Create calls on the wire; see [`Bake::shielded`].
    inflight: Inflight,
}

/// Create calls that run to completion even when the bake is interrupted.
type Inflight = Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>;

/// How long cleanup waits for create calls already sent before it looks for what they made.
const INFLIGHT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an interrupted bake's running provisioner may take to end what it started (over SSM
/// the CancelCommand call) before cleanup begins.
const CANCEL_GRACE: Duration = Duration::from_secs(20);

impl Bake<'_> {
    /// Times `f` as the named step, for progress and the manifest; a cancelled bake ends it at
    /// once.
    async fn step<T, F>(&self, name: &str, f: F) -> Result<T, BakeError>
    where
        F: std::future::Future<Output = Result<T, BakeError>>,
    {
        self.step_watching_cancel(name, async {
            tokio::select! {
                r = f => r,
                () = self.cancel.cancelled() => Err(BakeError::Cancelled),
            }
        })
        .await
    }

    /// [`Bake::step`] for a step that watches the cancellation token itself, to end what it
    /// started (a provisioner's command).
    async fn step_watching_cancel<T, F>(&self, name: &str, f: F) -> Result<T, BakeError>
    where
        F: std::future::Future<Output = Result<T, BakeError>>,
    {
        self.reporter.emit(Event::StepStarted { step: name.into() });
        // Test builds only: a panic at a named step, to prove the undo stack still runs.
        #[cfg(debug_assertions)]
        if std::env::var("BAKERY_TEST_PANIC_AT").is_ok_and(|at| at == name) {
            panic!("injected at step {name} (BAKERY_TEST_PANIC_AT)");
        }
        let started_at = rfc3339(OffsetDateTime::now_utc());
        let t = Instant::now();
        let r = f.await;
        let duration_s = t.elapsed().as_secs_f64();
        if r.is_ok() {
            self.reporter.emit(Event::StepFinished {
                step: name.into(),
                duration_s,
            });
        }
        self.steps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Step {
                name: name.into(),
                started_at,
                duration_s,
            });
        r
    }

    /// Runs a create call as a task of its own that finishes even if the bake is interrupted
    /// while it is on the wire (dropping the request would not stop AWS from creating the
    /// resource, and cleanup could look for it too early). Cleanup waits for these first.
    async fn shielded<T, F>(&self, call: F) -> Result<T, AwsError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, AwsError>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(async move {
            let _ = tx.send(call.await);
        });
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
        rx.await.unwrap_or_else(|_| {
            Err(AwsError {
                action: "bakery",
                resource: "create call".into(),
                code: None,
                message: "the create task ended without an answer".into(),
                transient: false,
            })
        })
    }

    fn info(&self, step: &str, message: String) {
        self.reporter.emit(Event::Info {
            step: step.into(),
            message,
        });
    }

    fn created(&self, kind: &str, id: &str) {
        self.reporter.emit(Event::ResourceCreated {
            kind: kind.into(),
            id: id.into(),
        });
    }

    fn temporary_tags(&self, name: &str) -> ec2::Tags {
        let expires = OffsetDateTime::now_utc() + TEMPORARY_TTL;
        BTreeMap::from([
            ("Name".to_string(), name.to_string()),
            (BUILD_ID_TAG.to_string(), self.build_id.clone()),
            (TEMPORARY_TAG.to_string(), "true".to_string()),
            (EXPIRES_TAG.to_string(), rfc3339(expires)),
            (OWNER_TAG.to_string(), crate::host::owner()),
        ])
    }

    /// The bake, as its sequence of steps: check, prepare, launch, connect, provision, stop,
    /// make the image, release the temporaries, complete.
    async fn run(&self) -> Result<Manifest, BakeError> {
        let recipe = self.recipe;
        let ssh = match &recipe.communicator {
            Communicator::Ssh(ssh) => Some(ssh),
            Communicator::Ssm(_) => None,
        };
        let image_name = recipe.image_name(&self.timestamp(), &self.build_id);

        // Everything to check before creating anything, asked at once.
        let (source, subnet) = self
            .step("resolve_source", self.preflight(&image_name))
            .await?;
        if !recipe.references.is_empty() {
            self.step("resolve_references", self.resolve_references())
                .await?;
        }

        let name = format!("bakery-{}", self.build_id);
        let (key, group) = self
            .step("prepare", self.prepare(&name, &subnet, ssh))
            .await?;

        let instance_id = self
            .step(
                "launch",
                self.launch(&name, &image_name, &source, &subnet, key.as_ref(), group),
            )
            .await?;

        let instance = self
            .step("wait_running", self.wait_running(&instance_id))
            .await?;
        // Another bake of the same image name, launched about now, yields to the earliest one
        // here, before either provisions. It looks once its launch second is over, so two bakes
        // launched in one second see each other (`marks::name_check_wait_ms`), and it looks
        // while the bake connects, which takes longer: the wait costs a bake nothing.
        let name_check = self.check_name(&instance, &instance_id, &image_name);
        let connect = self.open_session(&instance, &instance_id, ssh, key.as_ref());
        let (session, ()) = tokio::try_join!(connect, name_check)?;
        let connect_timeout = ssh
            .map(|s| s.connect_timeout)
            .unwrap_or(DEFAULT_RECONNECT_TIMEOUT);
        self.provision_all(session, connect_timeout).await?;

        if !recipe.image.no_reboot {
            self.step("stop", self.stop(&instance_id)).await?;
        }

        let image = self
            .step(
                "create_image",
                self.make_image(&instance_id, &image_name, &source),
            )
            .await?;

        // Release the temporaries now, as a timed step; `run` releases whatever is left. The
        // image stays on the undo stack until the bake is complete.
        self.step("cleanup_temporaries", self.release_temporaries())
            .await?;

        self.complete(&source, &image).await
    }

    /// The `{{timestamp}}` of the image name: when the bake started, in UTC.
    fn timestamp(&self) -> String {
        let n = self.started;
        format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            n.year(),
            n.month() as u8,
            n.day(),
            n.hour(),
            n.minute(),
            n.second()
        )
    }

    /// The `resolve_source` step: the source image, the subnet, and that the image name is
    /// free, asked at once.
    async fn preflight(
        &self,
        image_name: &str,
    ) -> Result<(ec2::ImageInfo, ec2::SubnetInfo), BakeError> {
        let ec2c = &self.aws.ec2;
        let recipe = self.recipe;
        let subnet = async {
            match &recipe.instance.subnet {
                Some(id) => ec2::subnet(ec2c, id)
                    .await?
                    .ok_or_else(|| BakeError::SubnetNotFound(id.clone())),
                None => ec2::default_subnet(ec2c).await?.ok_or(BakeError::NoSubnet),
            }
        };
        let name_free = async {
            match ec2::image_named(ec2c, image_name).await? {
                Some(existing) => Err(BakeError::ImageNameTaken {
                    name: image_name.to_string(),
                    id: existing.id,
                }),
                None => Ok(()),
            }
        };
        let (source, subnet, ()) = tokio::try_join!(self.resolve_source(), subnet, name_free)?;
        self.info("resolve_source", format!("{} ({})", source.id, source.name));
        Ok((source, subnet))
    }

    /// The `resolve_references` step: the recipe's `secret:` / `rds:` references, and the
    /// redactor for their secret values.
    async fn resolve_references(&self) -> Result<(), BakeError> {
        let (values, redactor) =
            crate::aws::references::resolve(self.aws, &self.recipe.references).await?;
        self.redactor.set(redactor);
        let n = values.len();
        let _ = self.resolved.set(values);
        self.info(
            "resolve_references",
            format!("{n} reference(s) resolved; secret values are redacted from all output"),
        );
        Ok(())
    }

    /// The `prepare` step: the key pair (SSH only) and the security group, made at once.
    async fn prepare(
        &self,
        name: &str,
        subnet: &ec2::SubnetInfo,
        ssh: Option<&crate::recipe::SshSpec>,
    ) -> Result<(Option<keys::KeyPair>, Option<String>), BakeError> {
        let key = async {
            match ssh {
                Some(_) => self.make_key_pair(name).await.map(Some),
                None => Ok(None),
            }
        };
        tokio::try_join!(key, self.make_security_group(name, subnet, ssh))
    }

    /// The `launch` step: the build instance, recorded on the undo stack first.
    async fn launch(
        &self,
        name: &str,
        image_name: &str,
        source: &ec2::ImageInfo,
        subnet: &ec2::SubnetInfo,
        key: Option<&keys::KeyPair>,
        group: Option<String>,
    ) -> Result<String, BakeError> {
        let recipe = self.recipe;
        self.undo.lock().await.push(Temp::Instances {
            build_id: self.build_id.clone(),
        });
        let mut groups = recipe.instance.security_groups.clone();
        groups.extend(group);
        let spec = ec2::LaunchSpec {
            image_id: source.id.clone(),
            instance_type: recipe.instance.instance_type.clone(),
            subnet_id: subnet.id.clone(),
            security_group_ids: groups,
            key_name: key.map(|_| name.to_string()),
            instance_profile: recipe.instance.instance_profile.clone(),
            associate_public_ip: recipe.instance.associate_public_ip,
            root_device_name: source.root_device_name.clone(),
            root_volume: recipe.instance.root_volume.clone(),
            client_token: self.build_id.clone(),
            tags: {
                let mut t = self.temporary_tags(name);
                t.insert(
                    bakery_core::marks::IMAGE_NAME_TAG.into(),
                    image_name.to_string(),
                );
                t
            },
        };
        let client = self.aws.ec2.clone();
        let id = self
            .shielded(async move { ec2::run_instance(&client, &spec).await })
            .await?;
        self.created("instance", &id);
        Ok(id)
    }

    /// Yields the image name to an earlier bake of the same name that launched about now
    /// ([`BakeError::ImageNameContended`]).
    async fn check_name(
        &self,
        instance: &ec2::InstanceInfo,
        instance_id: &str,
        image_name: &str,
    ) -> Result<(), BakeError> {
        let now_ms = i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
            .unwrap_or(i64::MAX);
        let wait = bakery_core::marks::name_check_wait_ms(instance.launched, now_ms);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(wait)) => {}
            () = self.cancel.cancelled() => return Err(BakeError::Cancelled),
        }
        let others = ec2::instances_tagged(
            &self.aws.ec2,
            bakery_core::marks::IMAGE_NAME_TAG,
            image_name,
        )
        .await?;
        // Only bakes that started about now: an older instance of the name is a bake that
        // would already have made its image, or a leftover for `gc`.
        let recent = OffsetDateTime::now_utc().unix_timestamp() - NAME_RACE_WINDOW_S;
        let mine = others
            .iter()
            .find(|i| i.id == instance_id)
            .map(|i| i.launched)
            .unwrap_or(i64::MAX);
        let ids = others
            .iter()
            .filter(|i| i.launched >= recent && i.state != "stopped")
            .filter_map(|i| Some((i.launched, i.build_id.as_deref()?)));
        match bakery_core::marks::yield_name_to((mine, &self.build_id), ids) {
            Some(other) => Err(BakeError::ImageNameContended {
                name: image_name.to_string(),
                other: other.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// The `connect` step: an SSH session with a verified host key, or the SSM agent online.
    async fn open_session(
        &self,
        instance: &ec2::InstanceInfo,
        instance_id: &str,
        ssh: Option<&crate::recipe::SshSpec>,
        key: Option<&keys::KeyPair>,
    ) -> Result<Session, BakeError> {
        Ok(match (ssh, key) {
            (Some(ssh), Some(key)) => {
                let host = match &ssh.host {
                    Some(h) => h.clone(),
                    None => address(instance, ssh.interface)?,
                };
                self.info("wait_running", format!("{instance_id} at {host}"));
                let target = SshTarget {
                    host,
                    port: ssh.port,
                    user: ssh.user.clone(),
                    public_key: key.public_openssh.clone(),
                    private_key: key.private_openssh.clone(),
                };
                Session::Ssh(
                    self.step(
                        "connect",
                        self.connect(instance_id, target, ssh.connect_timeout),
                    )
                    .await?,
                )
            }
            _ => {
                let Communicator::Ssm(spec) = &self.recipe.communicator else {
                    unreachable!("an SSH recipe always has a key")
                };
                let s = SsmSession::new(
                    self.aws.ssm.clone(),
                    instance_id.to_string(),
                    self.resolved.get(),
                );
                self.step("connect", self.wait_agent(&s, spec.agent_timeout))
                    .await?;
                Session::Ssm(s)
            }
        })
    }

    /// Runs the recipe's provisioners in order, each a step; the session ends with them.
    async fn provision_all(
        &self,
        mut session: Session,
        connect_timeout: Duration,
    ) -> Result<(), BakeError> {
        for (i, p) in self.recipe.provisioners.iter().enumerate() {
            let label = p.label(i);
            session = self
                .step_watching_cancel(
                    &format!("provision: {label}"),
                    self.provision(session, p, &label, connect_timeout),
                )
                .await?;
        }
        drop(session);
        Ok(())
    }

    /// The `stop` step: stops the build instance and waits until it is stopped.
    async fn stop(&self, instance_id: &str) -> Result<(), BakeError> {
        wait::persist(|| ec2::stop_instance(&self.aws.ec2, instance_id)).await?;
        self.wait_state(instance_id, "stopped", STOP_TIMEOUT).await
    }

    /// The `create_image` step: the image (recorded on the undo stack first), waited for until
    /// available, announced to `image_ready`, and its snapshots tagged.
    async fn make_image(
        &self,
        instance_id: &str,
        image_name: &str,
        source: &ec2::ImageInfo,
    ) -> Result<ec2::ImageInfo, BakeError> {
        let ec2c = &self.aws.ec2;
        let recipe = self.recipe;
        self.undo.lock().await.push(Temp::Images {
            build_id: self.build_id.clone(),
        });
        let mut tags = recipe.image.tags.clone();
        tags.insert(BUILD_ID_TAG.into(), self.build_id.clone());
        tags.insert(bakery_core::marks::SOURCE_AMI_TAG.into(), source.id.clone());
        // Until the bake completes, gc knows the image's bake by its process.
        tags.insert(OWNER_TAG.into(), crate::host::owner());
        tags.insert(
            bakery_core::marks::RECIPE_SHA_TAG.into(),
            recipe.sha256.clone(),
        );
        // Asked again after an outage: a repeat meets its own image (`or_own`).
        let id = wait::persist(|| {
            let (client, instance, name) = (
                ec2c.clone(),
                instance_id.to_string(),
                image_name.to_string(),
            );
            let (description, tags) = (recipe.image.description.clone(), tags.clone());
            self.shielded(async move {
                // Already stopped unless the recipe asked not to reboot.
                ec2::create_image(
                    &client,
                    &instance,
                    &name,
                    description.as_deref(),
                    true,
                    &tags,
                )
                .await
            })
        })
        .await?;
        self.created("image", &id);
        let image = self.wait_image(&id, recipe.image.timeout).await?;
        if let Some(ready) = &self.opts.image_ready {
            let _ = ready.send((self.build_id.clone(), image.id.clone(), image.name.clone()));
        }
        let mut snap_tags = recipe.image.snapshot_tags.clone();
        snap_tags.insert(BUILD_ID_TAG.into(), self.build_id.clone());
        snap_tags.insert(bakery_core::marks::IMAGE_TAG.into(), id.clone());
        wait::persist(|| ec2::create_tags(ec2c, &image.snapshot_ids, &snap_tags)).await?;
        Ok(image)
    }

    /// The `cleanup_temporaries` step: releases every temporary but the image, newest first.
    async fn release_temporaries(&self) -> Result<(), BakeError> {
        loop {
            // Look, release, then forget: interrupted mid-release, the record is still on
            // the stack for the final cleanup.
            let next = self.undo.lock().await.last_temporary().cloned();
            let Some(t) = next else { break };
            undo::release(&self.aws.ec2, &t, self.reporter).await?;
            self.undo.lock().await.forget(&t);
        }
        Ok(())
    }

    /// Writes the manifest, then marks the image complete: only now is it a product.
    async fn complete(
        &self,
        source: &ec2::ImageInfo,
        image: &ec2::ImageInfo,
    ) -> Result<Manifest, BakeError> {
        let recipe = self.recipe;
        let finished = OffsetDateTime::now_utc();
        let manifest = Manifest {
            bakery_version: env!("CARGO_PKG_VERSION").into(),
            build_id: self.build_id.clone(),
            recipe: recipe.path.display().to_string(),
            recipe_sha256: recipe.sha256.clone(),
            region: self.aws.region.clone(),
            source_ami: source.id.clone(),
            ami_id: image.id.clone(),
            ami_name: image.name.clone(),
            snapshot_ids: image.snapshot_ids.clone(),
            started_at: rfc3339(self.started),
            finished_at: rfc3339(finished),
            duration_s: self.clock.elapsed().as_secs_f64(),
            steps: self.steps.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            promotion: Default::default(),
        };
        // The manifest first, then the mark that makes the image a product: a bake that cannot
        // write its manifest fails and its image is deregistered with the other temporaries.
        if let Some(path) = &self.opts.manifest_path {
            manifest.write(path).map_err(|source| BakeError::Manifest {
                path: path.clone(),
                source,
            })?;
        }
        // Only now is the image a product: `bakery gc` collects build images without this tag.
        let complete = BTreeMap::from([(COMPLETE_TAG.to_string(), "true".to_string())]);
        if let Err(e) = wait::persist(|| {
            ec2::create_tags(&self.aws.ec2, std::slice::from_ref(&image.id), &complete)
        })
        .await
        {
            if let Some(path) = &self.opts.manifest_path {
                let _ = std::fs::remove_file(path);
            }
            return Err(e.into());
        }
        Ok(manifest)
    }

    async fn resolve_source(&self) -> Result<ec2::ImageInfo, BakeError> {
        let ec2c = &self.aws.ec2;
        let image = match &self.recipe.source {
            SourceAmi::Id(id) => ec2::describe_image(ec2c, id)
                .await?
                .ok_or_else(|| BakeError::SourceNotFound(id.clone()))?,
            SourceAmi::Filter {
                owners,
                name,
                most_recent,
            } => {
                let found = ec2::find_images(ec2c, owners, name).await?;
                if found.len() > 1 && !*most_recent {
                    return Err(BakeError::AmbiguousSource {
                        count: found.len(),
                        name: name.clone(),
                    });
                }
                found
                    .into_iter()
                    .next()
                    .ok_or_else(|| BakeError::NoSourceMatch {
                        owners: owners.clone(),
                        name: name.clone(),
                    })?
            }
            SourceAmi::SsmParameter(path) => {
                let id = self.ssm_parameter(path).await?;
                ec2::describe_image(ec2c, &id)
                    .await?
                    .ok_or(BakeError::SourceNotFound(id))?
            }
        };
        if image.state != "available" {
            return Err(BakeError::SourceNotAvailable {
                id: image.id,
                state: image.state,
            });
        }
        Ok(image)
    }

    async fn ssm_parameter(&self, path: &str) -> Result<String, BakeError> {
        let ssm = &self.aws.ssm;
        let out = crate::aws::call("ssm:GetParameter", path, || {
            ssm.get_parameter().name(path).send()
        })
        .await?;
        out.parameter()
            .and_then(|p| p.value())
            .filter(|v| v.starts_with("ami-"))
            .map(str::to_string)
            .ok_or_else(|| BakeError::BadSsmParameter(path.to_string()))
    }

    async fn make_key_pair(&self, name: &str) -> Result<keys::KeyPair, BakeError> {
        let key = keys::generate(name)?;
        self.undo
            .lock()
            .await
            .push(Temp::KeyPair { name: name.into() });
        let (client, key_name, public, tags) = (
            self.aws.ec2.clone(),
            name.to_string(),
            key.public_openssh.clone(),
            self.temporary_tags(name),
        );
        self.shielded(
            async move { ec2::import_key_pair(&client, &key_name, &public, &tags).await },
        )
        .await?;
        self.created("key pair", name);
        Ok(key)
    }

    /// A group admitting SSH only from `allowed_cidr`, or else from this machine's own address
    /// toward the subnet. `None` when the recipe brings its own groups.
    /// A group admitting SSH only from `allowed_cidr`, or else from this machine's own address
    /// toward the subnet; for SSM, a group with no inbound rule at all (egress only). `None`
    /// when the recipe brings its own groups.
    async fn make_security_group(
        &self,
        name: &str,
        subnet: &ec2::SubnetInfo,
        ssh: Option<&crate::recipe::SshSpec>,
    ) -> Result<Option<String>, BakeError> {
        if !self.recipe.instance.security_groups.is_empty() {
            return Ok(None);
        }
        let cidr = ssh.map(|ssh| match ssh.allowed_cidr {
            Some(c) => c.to_string(),
            None => format!("{}/32", caller_address_toward(&subnet.cidr)),
        });
        self.undo.lock().await.push(Temp::SecurityGroup {
            name: name.into(),
            vpc_id: subnet.vpc_id.clone(),
            id: None,
        });
        let description = match &cidr {
            Some(cidr) => format!("bakery build {}: SSH from {cidr} only", self.build_id),
            None => format!("bakery build {}: no inbound access (SSM)", self.build_id),
        };
        let (client, group_name, vpc, tags) = (
            self.aws.ec2.clone(),
            name.to_string(),
            subnet.vpc_id.clone(),
            self.temporary_tags(name),
        );
        let id = self
            .shielded(async move {
                ec2::create_security_group(&client, &group_name, &vpc, &description, &tags).await
            })
            .await?;
        self.undo.lock().await.set_group_id(name, &id);
        self.created("security group", &id);
        match (ssh, cidr) {
            (Some(ssh), Some(cidr)) => {
                ec2::authorize_tcp_ingress(&self.aws.ec2, &id, ssh.port, &cidr, "bakery build SSH")
                    .await?;
                self.info(
                    "prepare",
                    format!("{id} admits tcp/{} from {cidr} only", ssh.port),
                );
            }
            _ => self.info("prepare", format!("{id} admits nothing inbound (SSM)")),
        }
        Ok(Some(id))
    }

    /// Waits until the instance's SSM agent is online.
    async fn wait_agent(&self, s: &SsmSession, timeout: Duration) -> Result<(), BakeError> {
        wait::until(
            format!("the SSM agent of {}", s.instance_id),
            timeout,
            Poll::API,
            || async {
                Ok::<_, CommError>(if s.agent_online().await? {
                    Probe::Ready(())
                } else {
                    Probe::Pending("agent not online".into())
                })
            },
        )
        .await
        .map_err(|e| match e {
            wait::WaitError::Failed(e) => BakeError::SsmAgent {
                id: s.instance_id.clone(),
                detail: e.to_string(),
            },
            wait::WaitError::Timeout { waited, .. } => BakeError::SsmAgent {
                id: s.instance_id.clone(),
                detail: format!(
                    "not online after {waited:.0?}: the instance profile's role must allow SSM \
                     (AmazonSSMManagedInstanceCore) and the instance must reach the SSM endpoints"
                ),
            },
        })?;
        self.info(
            "connect",
            format!("the SSM agent of {} is online", s.instance_id),
        );
        Ok(())
    }

    async fn wait_running(&self, id: &str) -> Result<ec2::InstanceInfo, BakeError> {
        let ec2c = &self.aws.ec2;
        wait::until(
            format!("instance {id} to run"),
            RUNNING_TIMEOUT,
            Poll::API,
            || async {
                match ec2::describe_instance(ec2c, id).await? {
                    None => Ok(Probe::Pending("not yet visible".into())),
                    Some(i) if i.state == "running" => Ok(Probe::Ready(i)),
                    Some(i) if matches!(i.state.as_str(), "pending") => Ok(Probe::Pending(i.state)),
                    Some(i) => Err(BakeError::InstanceDied {
                        id: id.into(),
                        state: i.state,
                    }),
                }
            },
        )
        .await
        .map_err(wait_error)
    }

    async fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Result<(), BakeError> {
        let ec2c = &self.aws.ec2;
        wait::until(
            format!("instance {id} to be {state}"),
            timeout,
            Poll::API,
            || async {
                Ok::<_, BakeError>(match ec2::describe_instance(ec2c, id).await? {
                    Some(i) if i.state == state => Probe::Ready(()),
                    Some(i) => Probe::Pending(i.state),
                    None => Probe::Pending("not visible".into()),
                })
            },
        )
        .await
        .map_err(wait_error)
    }

    async fn wait_image(&self, id: &str, timeout: Duration) -> Result<ec2::ImageInfo, BakeError> {
        let ec2c = &self.aws.ec2;
        wait::until(
            format!("image {id} to be available"),
            timeout,
            Poll::API,
            || async {
                match ec2::describe_image(ec2c, id).await? {
                    Some(i) if i.state == "available" => Ok(Probe::Ready(i)),
                    Some(i)
                        if matches!(
                            i.state.as_str(),
                            "failed" | "error" | "invalid" | "deregistered"
                        ) =>
                    {
                        Err(BakeError::ImageFailed {
                            id: id.into(),
                            state: i.state,
                            reason: None,
                        })
                    }
                    Some(i) => Ok(Probe::Pending(i.state)),
                    None => Ok(Probe::Pending("not yet visible".into())),
                }
            },
        )
        .await
        .map_err(wait_error)
    }

    /// Waits for the console's host-key fingerprints and an SSH login that matches them.
    async fn connect(
        &self,
        instance_id: &str,
        target: SshTarget,
        timeout: Duration,
    ) -> Result<SshSession, BakeError> {
        let start = Instant::now();
        let policy = if self.opts.trust_host_key_on_first_use {
            self.info(
                "connect",
                "trusting the host key on first use (--trust-host-key-on-first-use)".into(),
            );
            HostKeyPolicy::TrustOnFirstUse
        } else {
            let ec2c = &self.aws.ec2;
            let fingerprints = wait::until(
                format!("host key fingerprints in the console output of {instance_id}"),
                timeout,
                Poll::API,
                || async {
                    Ok::<_, AwsError>(match ec2::console_output(ec2c, instance_id).await? {
                        Some(text) => match hostkey::fingerprints_from_console(&text) {
                            Some(f) => Probe::Ready(f),
                            None => Probe::Pending("console output without fingerprints".into()),
                        },
                        None => Probe::Pending("no console output yet".into()),
                    })
                },
            )
            .await
            .map_err(|e| match e {
                wait::WaitError::Failed(e) => BakeError::Aws(e),
                wait::WaitError::Timeout { .. } => BakeError::NoFingerprints {
                    id: instance_id.into(),
                    waited: start.elapsed(),
                },
            })?;
            HostKeyPolicy::Fingerprints(fingerprints)
        };
        let remaining = timeout.saturating_sub(start.elapsed());
        let host = format!("{}:{}", target.host, target.port);
        let session = wait::until(format!("SSH on {host}"), remaining, Poll::CONNECT, || {
            let target = target.clone();
            let policy = policy.clone();
            async move {
                match SshSession::connect(target, policy, TCP_CONNECT_TIMEOUT).await {
                    Ok(s) => Ok(Probe::Ready(s)),
                    Err(e) if e.is_transient() => Ok(Probe::Pending(e.to_string())),
                    Err(e) => Err(e),
                }
            }
        })
        .await
        .map_err(|e| match e {
            wait::WaitError::Failed(e @ CommError::HostKeyMismatch { .. }) => BakeError::HostKey(e),
            wait::WaitError::Failed(e) => BakeError::SshUnavailable {
                host: host.clone(),
                detail: e.to_string(),
            },
            wait::WaitError::Timeout { waited, last, .. } => BakeError::SshUnavailable {
                host: host.clone(),
                detail: format!("gave up after {waited:.1?}; last error: {last}"),
            },
        })?;
        self.info(
            "connect",
            format!("{host} verified host key SHA256:{}", session.fingerprint()),
        );
        Ok(session)
    }

    /// The output sink of one command: output passes through a redactor per stream, its lines
    /// are shown as events, and the shown lines are kept as the tail for an error message. Call
    /// [`Bake::flush`] with the returned state when the command ends.
    fn sink(&self, label: &str) -> (LineSink, Arc<OutputRedactor>) {
        let state = Arc::new(OutputRedactor::new(self.redactor.get()));
        if let Ok(mut t) = self.tail.lock() {
            t.clear();
        }
        let (reporter, label, st, tail) = (
            self.reporter.clone(),
            label.to_string(),
            state.clone(),
            self.tail.clone(),
        );
        let sink: LineSink = Arc::new(move |stream, output| {
            for l in st.push(stream as usize, output) {
                emit_line(&reporter, &label, stream, &l, &tail);
            }
        });
        (sink, state)
    }

    /// Shows what the redactors held back at the end of a command.
    fn flush(&self, label: &str, state: &OutputRedactor) {
        for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
            for l in state.finish(i) {
                emit_line(self.reporter, label, stream, &l, &self.tail);
            }
        }
    }

    fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Renders a value with the bake's resolved references.
    fn render(&self, text: &str) -> Result<String, BakeError> {
        let empty = BTreeMap::new();
        let ctx = template::Context {
            vars: &self.recipe.variables,
            timestamp: None,
            build_id: Some(&self.build_id),
            refs: template::Refs::Resolved(self.resolved.get().unwrap_or(&empty)),
        };
        template::render(text, &ctx).map_err(|e| BakeError::Template(e.message))
    }

    /// Runs one provisioner; returns the session to use next (a new one after a reboot).
    async fn provision(
        &self,
        session: Session,
        p: &Provisioner,
        label: &str,
        connect_timeout: Duration,
    ) -> Result<Session, BakeError> {
        let cancel = &self.cancel;
        match p {
            Provisioner::File(f) => {
                if !f.pause_before.is_zero() {
                    tokio::time::sleep(f.pause_before).await;
                }
                let perr = |source| BakeError::ProvisionerError {
                    label: label.into(),
                    source,
                };
                let bytes = if f.template {
                    let text = std::fs::read_to_string(&f.source).map_err(|e| {
                        perr(CommError::Transfer(format!("{}: {e}", f.source.display())))
                    })?;
                    let rendered = self.render(&text)?;
                    // A rendered template may hold secrets: private unless the recipe says otherwise.
                    session
                        .upload_bytes(
                            rendered.into_bytes(),
                            &f.destination,
                            f.mode.unwrap_or(0o600),
                            cancel,
                        )
                        .await
                        .map_err(perr)?
                } else {
                    session
                        .upload(&f.source, &f.destination, f.mode, cancel)
                        .await
                        .map_err(perr)?
                };
                self.info(
                    label,
                    format!(
                        "uploaded {} ({bytes} bytes) to {}",
                        f.source.display(),
                        f.destination
                    ),
                );
                Ok(session)
            }
            Provisioner::Shell(s) => self.shell(session, s, label, connect_timeout).await,
        }
    }

    async fn shell(
        &self,
        mut session: Session,
        s: &ShellProvisioner,
        label: &str,
        connect_timeout: Duration,
    ) -> Result<Session, BakeError> {
        if !s.pause_before.is_zero() {
            tokio::time::sleep(s.pause_before).await;
        }
        let script = script_of(s, label)?;
        let remote = format!(
            "/tmp/bakery-{}-{}.sh",
            self.build_id,
            label.replace(' ', "-")
        );
        let perr = |source| BakeError::ProvisionerError {
            label: label.into(),
            source,
        };
        let env = self.render_env(s)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .run_once(&session, s, &script, &env, &remote, label)
                .await
            {
                Ok(o) if o.success() => return Ok(session),
                Err(CommError::Disconnected(why)) if s.expect_disconnect => {
                    self.info(
                        label,
                        format!("disconnected as expected ({why}); reconnecting"),
                    );
                    return self.reconnect(&session, connect_timeout).await;
                }
                Ok(o) if s.expect_disconnect && o.signal.is_some() => {
                    self.info(
                        label,
                        format!(
                            "session ended as expected ({}); reconnecting",
                            status_text(&o)
                        ),
                    );
                    return self.reconnect(&session, connect_timeout).await;
                }
                Ok(o) if attempt <= s.retries as usize => {
                    self.info(
                        label,
                        format!(
                            "failed with {}; retry {attempt} of {}",
                            status_text(&o),
                            s.retries
                        ),
                    );
                }
                Ok(o) => {
                    return Err(BakeError::ProvisionerFailed {
                        label: label.into(),
                        status: status_text(&o),
                        tail: self.tail(),
                    })
                }
                Err(e @ CommError::Disconnected(_)) if attempt <= s.retries as usize => {
                    self.info(label, format!("{e}; retry {attempt} of {}", s.retries));
                    session = self.reconnect(&session, connect_timeout).await?;
                }
                Err(e) => return Err(perr(e)),
            }
        }
    }

    /// One run of a shell provisioner's script, its output shown as it comes.
    async fn run_once(
        &self,
        session: &Session,
        s: &ShellProvisioner,
        script: &str,
        env: &BTreeMap<String, String>,
        remote: &str,
        label: &str,
    ) -> Result<crate::comm::ExecOutcome, CommError> {
        let (sink, state) = self.sink(label);
        let outcome = session
            .run_script(script, env, s.sudo, remote, s.timeout, &self.cancel, sink)
            .await;
        self.flush(label, &state);
        outcome
    }

    /// The provisioner's environment, its values rendered with the bake's references.
    fn render_env(&self, s: &ShellProvisioner) -> Result<BTreeMap<String, String>, BakeError> {
        let mut env = BTreeMap::new();
        for (k, v) in &s.env {
            env.insert(k.clone(), self.render(v)?);
        }
        Ok(env)
    }

    async fn reconnect(&self, old: &Session, timeout: Duration) -> Result<Session, BakeError> {
        match old {
            Session::Ssm(s) => {
                self.wait_agent(s, timeout).await?;
                Ok(Session::Ssm(s.clone()))
            }
            Session::Ssh(old) => wait::until(
                "SSH after the disconnect",
                timeout,
                Poll::CONNECT,
                || async {
                    match old.reconnect(TCP_CONNECT_TIMEOUT).await {
                        Ok(s) => Ok(Probe::Ready(Session::Ssh(s))),
                        Err(e) if e.is_transient() => Ok(Probe::Pending(e.to_string())),
                        Err(e) => Err(e),
                    }
                },
            )
            .await
            .map_err(|e| match e {
                wait::WaitError::Failed(e @ CommError::HostKeyMismatch { .. }) => {
                    BakeError::HostKey(e)
                }
                other => BakeError::SshUnavailable {
                    host: "the build instance".into(),
                    detail: other.to_string(),
                },
            }),
        }
    }
}

fn emit_line(
    reporter: &Reporter,
    label: &str,
    stream: Stream,
    line: &str,
    tail: &std::sync::Mutex<std::collections::VecDeque<String>>,
) {
    reporter.emit(Event::Output {
        provisioner: label.to_string(),
        stream,
        line: line.to_string(),
    });
    if let Ok(mut t) = tail.lock() {
        if t.len() == crate::comm::ssh::TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line.to_string());
    }
}

/// The script a shell provisioner runs: its inline lines under `#!/bin/sh -e`, or its file.
fn script_of(s: &ShellProvisioner, label: &str) -> Result<String, BakeError> {
    Ok(match &s.body {
        ShellBody::Inline(lines) => format!("#!/bin/sh -e\n{}\n", lines.join("\n")),
        ShellBody::Script(path) => {
            std::fs::read_to_string(path).map_err(|e| BakeError::ProvisionerError {
                label: label.into(),
                source: CommError::Transfer(format!("{}: {e}", path.display())),
            })?
        }
    })
}

fn status_text(o: &crate::comm::ExecOutcome) -> String {
    match (&o.exit_status, &o.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        (None, None) => "no exit status".into(),
    }
}

fn wait_error<E: Into<BakeError>>(e: wait::WaitError<E>) -> BakeError {
    match e {
        wait::WaitError::Failed(e) => e.into(),
        wait::WaitError::Timeout { what, waited, last } => BakeError::Wait(format!(
            "timed out after {waited:.1?} waiting for {what} (last seen: {last})"
        )),
    }
}

/// The address to connect to, per the recipe's interface.
fn address(i: &ec2::InstanceInfo, interface: Interface) -> Result<String, BakeError> {
    let (value, name) = match interface {
        Interface::Auto => (i.public_ip.clone().or(i.private_ip.clone()), "IP address"),
        Interface::PublicIp => (i.public_ip.clone(), "public IP"),
        Interface::PrivateIp => (i.private_ip.clone(), "private IP"),
        Interface::PublicDns => (i.public_dns.clone(), "public DNS name"),
        Interface::PrivateDns => (i.private_dns.clone(), "private DNS name"),
    };
    value.ok_or_else(|| BakeError::NoAddress {
        id: i.id.clone(),
        interface: name,
    })
}

/// This machine's source address toward a subnet: what the instance will see us connect from
/// when no NAT sits between. A UDP `connect` only asks the routing table; no packet is sent.
fn caller_address_toward(cidr: &str) -> IpAddr {
    let probe = cidr
        .parse::<ipnet::Ipv4Net>()
        .ok()
        .and_then(|n| n.hosts().nth(3))
        .unwrap_or(Ipv4Addr::LOCALHOST);
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|s| {
            s.connect((probe, 22))?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_follows_the_interface() {
        let i = ec2::InstanceInfo {
            id: "i-1".into(),
            private_ip: Some("127.10.1.4".into()),
            ..Default::default()
        };
        assert_eq!(address(&i, Interface::Auto).unwrap(), "127.10.1.4");
        assert!(matches!(
            address(&i, Interface::PublicIp),
            Err(BakeError::NoAddress { .. })
        ));
    }

    #[test]
    fn the_caller_address_toward_a_loopback_subnet_is_loopback() {
        let ip = caller_address_toward("127.10.1.0/24");
        assert!(ip.is_loopback(), "{ip}");
    }

    #[test]
    fn build_ids_are_unique_and_fit_a_client_token() {
        let a = new_build_id();
        assert_ne!(a, new_build_id());
        assert!(a.len() <= 64);
    }
}
