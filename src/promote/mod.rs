//! `bakery promote MANIFEST` (and the end of a `bakery build` whose recipe has `[distribute]`):
//! one baked image to every region and account a release needs.
//!
//! Copies run in parallel, one CopyImage per region, tagged at creation (the settings' tags,
//! `bakery:build-id`, `bakery:source-image`, `bakery:source-region` on the image and its
//! snapshots), encrypted with the region's key, with a client token derived from the build, the
//! region and the attempt. Each wait is sized to its copy: it ends when the copy is available,
//! fails, or shows no progress for [`plan::stall_limit`], never at a fixed time while the copy
//! proceeds. Once every copy is available, each region (the source's too) gets its launch
//! permissions, `createVolumePermission` on its snapshots, deprecation, deregistration protection
//! and SSM parameter, in parallel.
//!
//! Every step is journaled before it is taken, in `<manifest>.journal.json` and on the source
//! image's tags (`bakery:promote-<region>`), so a rerun, here or on another machine, continues
//! from the first unfinished step: a copy already made is never made again (the token), one
//! pending is waited for. What a failure leaves:
//!
//! - interrupted (SIGINT/SIGTERM, SIGKILL, a lost machine) or AWS unreachable past the waits'
//!   patience: the copies stay, recorded; rerun to resume.
//! - anything else (a copy that ended `failed`, a refused call, a copy that stopped moving): the
//!   promotion is rolled back: every copy this run could not finish is deregistered with its
//!   snapshots in every region, parameters it wrote get their previous value back, shares it
//!   added to the source image are removed. The source image (the bake's product) stays.

pub mod calls;
pub mod plan;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::aws::{Aws, AwsError, Target};
use crate::bake::manifest::{Manifest, RegionImage, Shares};
use crate::output::{Event, Reporter};
use crate::recipe::distribute::{self, Distribute};
use crate::signals::{Signal, Signals};
use crate::wait::{self, Outage};
use bakery_core::marks::BUILD_ID_TAG;
use plan::{Journal, Next, Record, RegionEntry, Stage};

/// How long an interrupted promotion's steps may take to stop before it reports.
const CANCEL_GRACE: Duration = Duration::from_secs(10);
/// How long a copy just asked for may stay invisible to DescribeImages (eventual consistency).
const VISIBLE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// Bad input, found before anything was made.
    #[error("{0}")]
    BadInput(String),
    #[error("{region}: {source}")]
    Aws {
        region: String,
        #[source]
        source: AwsError,
    },
    #[error("the copy of {source_ami} to {region} ({ami}) failed: {reason}")]
    CopyFailed {
        region: String,
        ami: String,
        source_ami: String,
        reason: String,
    },
    #[error("the copy to {region} ({ami}) made no progress for {waited:?} (last seen: {last}); it was given up")]
    Stalled {
        region: String,
        ami: String,
        waited: Duration,
        last: String,
    },
    #[error("the copy to {region} ({ami}) disappeared while it was waited for")]
    Vanished { region: String, ami: String },
    #[error("writing {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another region failed, or a signal came: this region stopped where it was.
    #[error("cancelled")]
    Cancelled,
    #[error("interrupted by {0}: the promotion is paused; rerun the same command to resume")]
    Interrupted(Signal),
}

impl PromoteError {
    /// The process exit code (the README's table).
    pub fn exit_code(&self) -> i32 {
        match self {
            PromoteError::BadInput(_) => 2,
            PromoteError::Interrupted(s) => s.exit_code(),
            _ => 1,
        }
    }

    /// Whether the promotion stays resumable (its copies kept) rather than rolled back.
    pub fn resumable(&self) -> bool {
        match self {
            PromoteError::Interrupted(_) | PromoteError::Cancelled => true,
            PromoteError::Aws { source, .. } => source.transient,
            _ => false,
        }
    }
}

fn aws_in(region: &str) -> impl Fn(AwsError) -> PromoteError + '_ {
    move |source| PromoteError::Aws {
        region: region.to_string(),
        source,
    }
}

/// A client in every region a promotion touches.
pub struct Clients {
    pub source_region: String,
    /// Region -> client, the source region's included.
    pub by_region: BTreeMap<String, Aws>,
}

impl Clients {
    fn get(&self, region: &str) -> &Aws {
        // Every region of a promotion has a client: `connect` made them all.
        &self.by_region[region]
    }

    fn source(&self) -> &Aws {
        self.get(&self.source_region)
    }
}

/// Connects to the source region and every region the settings copy to, after checking, before
/// anything is made, that each is a Region this account may use (an opt-in Region must be
/// enabled: AWS refuses every call there otherwise).
pub async fn connect(
    target: &Target,
    source_region: &str,
    settings: &Distribute,
) -> Result<Clients, PromoteError> {
    let connect = |region: &str| {
        let t = Target {
            region: Some(region.to_string()),
            ..target.clone()
        };
        async move {
            Aws::connect(&t)
                .await
                .map_err(|e| PromoteError::BadInput(e.to_string()))
        }
    };
    let source = connect(source_region).await?;
    let mut by_region = BTreeMap::new();
    let copies: Vec<&str> = settings.copy_regions(source_region).collect();
    if !copies.is_empty() {
        let known = calls::regions(&source.ec2)
            .await
            .map_err(aws_in(source_region))?;
        for region in &copies {
            match known.get(*region).map(String::as_str) {
                Some("opt-in-not-required" | "opted-in") => {}
                Some(status) => {
                    return Err(PromoteError::BadInput(format!(
                        "region {region} is not enabled for this account ({status}): it is an opt-in Region; \
                         enable it (AWS console: Account > AWS Regions) or remove it from the regions to copy to"
                    )))
                }
                None => {
                    return Err(PromoteError::BadInput(format!(
                        "region {region} is not available to this account (DescribeRegions in {source_region} does not list it)"
                    )))
                }
            }
            by_region.insert(region.to_string(), connect(region).await?);
        }
    }
    by_region.insert(source_region.to_string(), source);
    Ok(Clients {
        source_region: source_region.to_string(),
        by_region,
    })
}

/// The manifest of a complete bake, for `bakery build --resume BUILD_ID`: the one at `path`
/// when it is that build's, else rebuilt from the build's image in this region (tagged with the
/// build id and complete), so that another machine can resume too.
pub async fn resume_manifest(
    aws: &Aws,
    path: &Path,
    build_id: &str,
) -> Result<Manifest, PromoteError> {
    if let Ok(m) = Manifest::read(path) {
        if m.build_id == build_id {
            return Ok(m);
        }
    }
    let images = calls::own_images_tagged(&aws.ec2, BUILD_ID_TAG, build_id)
        .await
        .map_err(aws_in(&aws.region))?;
    let Some(image) = images
        .into_iter()
        .find(|i| !i.tags.contains_key(plan::SOURCE_IMAGE_TAG))
    else {
        return Err(PromoteError::BadInput(format!(
            "build {build_id} has no image in {} (a bake that failed leaves none): run the build again without --resume",
            aws.region
        )));
    };
    if !image.tags.contains_key(bakery_core::marks::COMPLETE_TAG) {
        return Err(PromoteError::BadInput(format!(
            "the image {} of build {build_id} never completed its bake: run the build again without --resume",
            image.id
        )));
    }
    let tag = |k: &str| image.tags.get(k).cloned().unwrap_or_default();
    let created = image.creation_date.clone().unwrap_or_default();
    Ok(Manifest {
        bakery_version: env!("CARGO_PKG_VERSION").into(),
        build_id: build_id.into(),
        recipe: String::new(),
        recipe_sha256: tag(bakery_core::marks::RECIPE_SHA_TAG),
        region: aws.region.clone(),
        source_ami: tag(bakery_core::marks::SOURCE_AMI_TAG),
        ami_id: image.id.clone(),
        ami_name: image.name.clone(),
        snapshot_ids: image.snapshot_ids.clone(),
        started_at: created.clone(),
        finished_at: created,
        duration_s: 0.0,
        steps: Vec::new(),
        promotion: Default::default(),
    })
}

/// Where the journal of the promotion of `manifest` lives.
pub fn journal_path(manifest: &Path) -> PathBuf {
    manifest.with_extension("journal.json")
}

/// Reads the journal of a promotion, if this machine has one for this build.
pub fn read_journal(manifest: &Path, build_id: &str) -> Option<Journal> {
    let text = std::fs::read_to_string(journal_path(manifest)).ok()?;
    let j: Journal = serde_json::from_str(&text).ok()?;
    (j.build_id == build_id).then_some(j)
}

fn write_journal(path: &Path, j: &Journal) -> Result<(), PromoteError> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(j).unwrap_or_default();
    std::fs::write(&tmp, text + "\n")
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| PromoteError::File {
            path: path.to_path_buf(),
            source,
        })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Promotes the image of `manifest` (written at `manifest_path`, which is updated with every
/// region's image) as `settings` say. SIGINT/SIGTERM pause it (resumable).
pub async fn run(
    clients: &Clients,
    manifest: &Manifest,
    manifest_path: &Path,
    settings: &Distribute,
    reporter: &Reporter,
) -> Result<Manifest, PromoteError> {
    let p = Promotion::prepare(
        clients,
        &manifest.build_id,
        &manifest.ami_id,
        Some(&manifest.ami_name),
        manifest_path,
        settings,
        reporter,
    )
    .await?;
    let result = interruptible(&p, async {
        p.copy().await?;
        p.publish(manifest, true).await
    })
    .await;
    match result {
        Ok(m) => Ok(m),
        Err(e) => Err(p.failed(e).await),
    }
}

/// A bake whose image is promoted (`bakery build` with `[distribute]`): the copies start as soon
/// as the image is available, while the bake releases its temporaries and writes its manifest;
/// the publication follows the bake's success. A bake that fails takes the copies with it. The
/// outcome is the bake's, its manifest the promoted one; the error, the promotion's (the image
/// stays complete: `bakery build --resume` continues).
pub async fn with_bake(
    aws: &Aws,
    recipe: &crate::recipe::Recipe,
    mut opts: crate::bake::Options,
    clients: &Clients,
    settings: &Distribute,
    reporter: &Reporter,
) -> (crate::bake::Outcome, Option<PromoteError>) {
    let manifest_path = opts
        .manifest_path
        .clone()
        .unwrap_or_else(|| PathBuf::from("bakery-manifest.json"));
    let (tx, mut ready) = tokio::sync::mpsc::unbounded_channel();
    opts.image_ready = Some(tx);
    let baking = crate::bake::run(aws, recipe, &opts, reporter);
    tokio::pin!(baking);
    let image = tokio::select! {
        biased;
        Some(image) = ready.recv() => image,
        mut outcome = &mut baking => {
            // Over before the image was seen (failed, or a race): promote what it made, if any.
            let Ok(m) = &outcome.result else { return (outcome, None) };
            return match run(clients, m, &manifest_path, settings, reporter).await {
                Ok(promoted) => {
                    outcome.result = Ok(promoted);
                    (outcome, None)
                }
                Err(e) => (outcome, Some(e)),
            };
        }
    };
    let copying = async {
        let (build_id, ami, name) = &image;
        let p = Promotion::prepare(
            clients,
            build_id,
            ami,
            Some(name),
            &manifest_path,
            settings,
            reporter,
        )
        .await?;
        let copied = interruptible(&p, p.copy()).await;
        Ok::<_, PromoteError>((p, copied))
    };
    let (mut outcome, copied) = tokio::join!(&mut baking, copying);
    let error = match (&outcome.result, copied) {
        // A failed bake leaves no image, so no copy either.
        (Err(e), Ok((p, _))) => {
            p.roll_back(&format!("the bake failed: {e}")).await;
            None
        }
        (Err(_), Err(_)) => None,
        (Ok(_), Err(e)) => Some(e),
        (Ok(_), Ok((p, Err(e)))) => Some(p.failed(e).await),
        (Ok(m), Ok((p, Ok(())))) => {
            let m = m.clone();
            match interruptible(&p, p.publish(&m, false)).await {
                Ok(promoted) => {
                    outcome.result = Ok(promoted);
                    None
                }
                Err(e) => Some(p.failed(e).await),
            }
        }
    };
    (outcome, error)
}

/// Runs a phase of `p`; SIGINT/SIGTERM stop it where it is.
async fn interruptible<T>(
    p: &Promotion<'_>,
    phase: impl Future<Output = Result<T, PromoteError>>,
) -> Result<T, PromoteError> {
    let mut signals = Signals::new();
    tokio::pin!(phase);
    tokio::select! {
        r = &mut phase => r,
        sig = signals.next() => {
            p.interrupt();
            let _ = tokio::time::timeout(CANCEL_GRACE, &mut phase).await;
            Err(PromoteError::Interrupted(sig))
        }
    }
}

/// One promotion: what each region needs (decided before anything is made), its journal, and
/// the two phases, which a bake runs apart ([`Promotion::copy`] while it finishes,
/// [`Promotion::publish`] once its manifest is written).
pub struct Promotion<'a> {
    clients: &'a Clients,
    source: calls::Image,
    build_id: String,
    settings: &'a Distribute,
    publish: String,
    deprecate_unix: Option<u64>,
    journal: std::sync::Mutex<Journal>,
    journal_path: PathBuf,
    manifest_path: PathBuf,
    reporter: &'a Reporter,
    cancel: CancellationToken,
    /// Each region's record when this run began and its first step.
    starts: BTreeMap<String, (Option<Record>, Next)>,
    /// Regions done already with these settings.
    unchanged: Vec<String>,
}

impl<'a> Promotion<'a> {
    /// Reads the source image, the journal and the records on the image's tags, and decides
    /// each region's first step; refuses what cannot work before anything is made (a
    /// deprecation time in the past, an image name taken in a region, a copy made with other
    /// settings). `name`: the image's name if known, to look for it in the regions while the
    /// image is described.
    pub async fn prepare(
        clients: &'a Clients,
        build_id: &str,
        source_ami: &str,
        name: Option<&str>,
        manifest_path: &Path,
        settings: &'a Distribute,
        reporter: &'a Reporter,
    ) -> Result<Promotion<'a>, PromoteError> {
        let now = unix_now();
        if let Some(why) = settings.deprecate_at.and_then(|d| d.refused_at(now)) {
            return Err(PromoteError::BadInput(why));
        }
        let source_region = clients.source_region.as_str();
        // Who holds the name in each region to copy to, asked while the image is described.
        let (source, holders) = tokio::join!(
            calls::describe(&clients.source().ec2, source_ami),
            name_holders(clients, settings, name)
        );
        let holders = holders?;
        let source = source.map_err(aws_in(source_region))?.ok_or_else(|| {
            PromoteError::BadInput(format!(
                "the image {source_ami} of {} does not exist in {source_region} (any more)",
                manifest_path.display()
            ))
        })?;
        if source.state != "available" {
            return Err(PromoteError::BadInput(format!(
                "the image {} is {}, not available; only a finished bake can be promoted",
                source.id, source.state
            )));
        }
        let local = read_journal(manifest_path, build_id)
            .filter(|j| j.source_ami == source.id)
            .unwrap_or_default();
        let publish = plan::publish_hash(settings);
        let (starts, unchanged) = first_steps(
            clients, settings, &source, &local, build_id, name, &holders, &publish,
        )
        .await?;
        let journal = running_journal(local, build_id, source_region, &source, settings, &starts);
        announce(
            reporter,
            build_id,
            &source,
            source_region,
            settings,
            &unchanged,
        );
        let p = Promotion {
            clients,
            source,
            build_id: build_id.to_string(),
            settings,
            publish,
            deprecate_unix: settings.deprecate_at.map(|d| d.time(now)),
            journal: std::sync::Mutex::new(journal),
            journal_path: journal_path(manifest_path),
            manifest_path: manifest_path.to_path_buf(),
            reporter,
            cancel: CancellationToken::new(),
            starts,
            unchanged,
        };
        p.save()?;
        Ok(p)
    }

    /// Stops every step where it is (a signal): they end with [`PromoteError::Cancelled`].
    pub fn interrupt(&self) {
        self.cancel.cancel();
    }

    /// The first phase: every region gets an available copy, in parallel. The first failure
    /// stops the others.
    pub async fn copy(&self) -> Result<(), PromoteError> {
        let copies: Vec<Boxed<'_, Result<(), PromoteError>>> = self
            .starts
            .iter()
            .filter(|(r, _)| r.as_str() != self.source_region())
            .map(|(r, (_, next))| {
                Box::pin(self.stopping_others(self.copy_region(r, next.clone()))) as Boxed<'_, _>
            })
            .collect();
        first_error(join_all(copies).await)
    }

    /// The second phase, once every copy is available: each region's shares, deprecation,
    /// protection and parameter, in parallel; then `manifest` (the bake's) with every region's
    /// image is written and returned. `as_result`: report it as the command's result (`bakery
    /// promote`), else only as an event (a build reports its manifest itself).
    pub async fn publish(
        &self,
        manifest: &Manifest,
        as_result: bool,
    ) -> Result<Manifest, PromoteError> {
        let published: Vec<Boxed<'_, Result<(), PromoteError>>> = self
            .starts
            .keys()
            .map(|r| Box::pin(self.stopping_others(self.publish_region(r))) as Boxed<'_, _>)
            .collect();
        first_error(join_all(published).await)?;
        let mut out = manifest.clone();
        out.promotion.regions = self.images();
        let s = self.settings;
        out.promotion.shares = s.shares().then(|| Shares {
            accounts: s.accounts.clone(),
            organization_arns: s.organization_arns.clone(),
            ou_arns: s.ou_arns.clone(),
        });
        out.promotion.deprecation_time = self.deprecate_unix.map(distribute::rfc3339);
        out.promotion.deregistration_protection = s.deregistration_protection;
        out.write(&self.manifest_path)
            .map_err(|source| PromoteError::File {
                path: self.manifest_path.clone(),
                source,
            })?;
        self.finish("done");
        let event = Event::PromoteFinished {
            manifest: serde_json::to_value(&out).unwrap_or_default(),
            unchanged: self.unchanged.clone(),
        };
        if as_result {
            self.reporter
                .result(event, || render(&out, &self.unchanged));
        } else if self.reporter.format() == crate::output::Format::Json {
            self.reporter.emit(event);
        }
        Ok(out)
    }

    /// After a failure: an interruption or an outage leaves the promotion paused (its copies
    /// recorded, resumable); anything else rolls it back. Returns the error.
    pub async fn failed(&self, e: PromoteError) -> PromoteError {
        if e.resumable() {
            self.finish("paused");
        } else {
            self.roll_back(&e).await;
        }
        e
    }

    /// Removes what this run could not finish (see [`Promotion::undo_region`]), whatever the
    /// error: also when the bake whose image it copies failed.
    pub async fn roll_back(&self, why: &dyn std::fmt::Display) {
        let undo: Vec<Boxed<'_, ()>> = self
            .starts
            .iter()
            .filter(|(_, (before, _))| before.as_ref().is_none_or(|r| r.stage != Stage::Done))
            .map(|(region, _)| Box::pin(self.undo_region(region)) as Boxed<'_, ()>)
            .collect();
        join_all(undo).await;
        self.finish(&format!("rolled back: {why}"));
    }

    /// Every region's image, from the journal.
    fn images(&self) -> BTreeMap<String, RegionImage> {
        let j = self.journal();
        j.regions
            .iter()
            .filter(|(r, _)| self.starts.contains_key(*r))
            .map(|(region, e)| {
                (
                    region.clone(),
                    RegionImage {
                        ami_id: e.record.ami.clone().unwrap_or_default(),
                        snapshot_ids: e.snapshot_ids.clone(),
                        ssm_parameter: self.settings.ssm_parameter.clone(),
                        encrypted: if *region == self.source_region() {
                            self.source.encrypted
                        } else {
                            self.settings.encrypted || self.source.encrypted
                        },
                        kms_key_id: self.settings.kms_key_ids.get(region).cloned(),
                    },
                )
            })
            .collect()
    }
}

/// The human result: one line per region.
pub fn render(m: &Manifest, unchanged: &[String]) -> String {
    let mut rows = vec![["REGION", "AMI", "SSM PARAMETER", ""]
        .map(String::from)
        .to_vec()];
    for (region, img) in &m.promotion.regions {
        rows.push(vec![
            region.clone(),
            img.ami_id.clone(),
            img.ssm_parameter.clone().unwrap_or_else(|| "-".into()),
            if unchanged.contains(region) {
                "already promoted".into()
            } else if *region == m.region {
                "source".into()
            } else {
                "copied".into()
            },
        ]);
    }
    crate::output::table(&rows)
}

/// Before copying to `region`: the name must be free there (AMI names are unique per account
/// and region). An image of that name from this very build is this promotion's earlier copy
/// (whose record was lost): it is adopted by the token, not refused.
async fn check_name_free(
    aws: &Aws,
    region: &str,
    source: &calls::Image,
    build_id: &str,
    known: Option<Option<calls::Image>>,
) -> Result<(), PromoteError> {
    let holder = match known {
        Some(h) => h,
        None => calls::own_image_named(&aws.ec2, &source.name)
            .await
            .map_err(aws_in(region))?,
    };
    match holder {
        Some(i) if i.tags.get(BUILD_ID_TAG).map(String::as_str) != Some(build_id) => {
            Err(PromoteError::BadInput(format!(
                "an AMI named {:?} already exists in {region} ({}), and AMI names are unique per region; \
                 deregister it or promote another build",
                source.name, i.id
            )))
        }
        _ => Ok(()),
    }
}

/// Who holds `name` (if given) in each region the promotion copies to, asked at once.
async fn name_holders(
    clients: &Clients,
    settings: &Distribute,
    name: Option<&str>,
) -> Result<BTreeMap<String, Option<calls::Image>>, PromoteError> {
    let Some(name) = name else {
        return Ok(BTreeMap::new());
    };
    let looks: Vec<Boxed<'_, Result<NameHolder, PromoteError>>> = settings
        .copy_regions(clients.source_region.as_str())
        .map(|r| {
            Box::pin(async move {
                let found = calls::own_image_named(&clients.get(r).ec2, name)
                    .await
                    .map_err(aws_in(r))?;
                Ok((r.to_string(), found))
            }) as Boxed<'_, _>
        })
        .collect();
    join_all(looks).await.into_iter().collect()
}

/// Each region's record and first step (the source region's too), refusing what cannot work
/// before anything is made: a copy made with other settings, an image name taken in a region
/// about to get a copy. Also the regions done already with these settings.
#[allow(clippy::too_many_arguments)]
async fn first_steps(
    clients: &Clients,
    settings: &Distribute,
    source: &calls::Image,
    local: &Journal,
    build_id: &str,
    name: Option<&str>,
    holders: &BTreeMap<String, Option<calls::Image>>,
    publish: &str,
) -> Result<(BTreeMap<String, (Option<Record>, Next)>, Vec<String>), PromoteError> {
    let source_region = clients.source_region.as_str();
    let record_of = |region: &str| {
        let tag = source
            .tags
            .get(&plan::tag_key(region))
            .and_then(|t| Record::decode(t));
        plan::merge(local.regions.get(region).map(|e| e.record.clone()), tag)
    };
    let mut starts = BTreeMap::new();
    let mut to_check = Vec::new();
    for region in settings.copy_regions(source_region) {
        let record = record_of(region);
        let copy = plan::copy_hash(settings, region);
        let next = plan::next(region, record.as_ref(), &copy, publish);
        match &next {
            Next::Refuse(why) => return Err(PromoteError::BadInput(why.clone())),
            Next::Copy { .. } => to_check.push(region),
            _ => {}
        }
        starts.insert(region.to_string(), (record, next));
    }
    // The name must be free in every region about to get a copy (asked at once, unless
    // asked already with the name given).
    let checks: Vec<Boxed<'_, Result<(), PromoteError>>> = to_check
        .iter()
        .map(|r| {
            let known = (name == Some(source.name.as_str()))
                .then(|| holders.get(*r).cloned())
                .flatten();
            Box::pin(check_name_free(clients.get(r), r, source, build_id, known))
                as Boxed<'_, Result<(), PromoteError>>
        })
        .collect();
    first_error(join_all(checks).await)?;
    let source_record = record_of(source_region);
    let source_next = plan::next_source(source_record.as_ref(), &source.id, publish);
    starts.insert(source_region.to_string(), (source_record, source_next));
    let unchanged: Vec<String> = starts
        .iter()
        .filter(|(_, (_, n))| matches!(n, Next::Nothing { .. }))
        .map(|(r, _)| r.clone())
        .collect();
    Ok((starts, unchanged))
}

/// The journal of a promotion that starts now: the local one, with what the tags say where
/// they got further (another machine's run).
fn running_journal(
    local: Journal,
    build_id: &str,
    source_region: &str,
    source: &calls::Image,
    settings: &Distribute,
    starts: &BTreeMap<String, (Option<Record>, Next)>,
) -> Journal {
    let mut journal = local;
    journal.build_id = build_id.to_string();
    journal.source_region = source_region.to_string();
    journal.source_ami = source.id.clone();
    journal.settings = settings.clone();
    journal.outcome = "running".into();
    for (region, (record, _)) in starts {
        if let Some(r) = record {
            let e = journal
                .regions
                .entry(region.clone())
                .or_insert_with(|| RegionEntry {
                    record: r.clone(),
                    snapshot_ids: Vec::new(),
                    parameter_before: None,
                });
            e.record = r.clone();
        }
    }
    if let Some(e) = journal.regions.get_mut(source_region) {
        e.snapshot_ids = source.snapshot_ids.clone();
    }
    journal
}

/// Says the promotion started, and which regions are done already with these settings.
fn announce(
    reporter: &Reporter,
    build_id: &str,
    source: &calls::Image,
    source_region: &str,
    settings: &Distribute,
    unchanged: &[String],
) {
    reporter.emit(Event::PromoteStarted {
        build_id: build_id.to_string(),
        source_ami: source.id.clone(),
        source_region: source_region.to_string(),
        regions: settings
            .copy_regions(source_region)
            .map(str::to_string)
            .collect(),
    });
    for r in unchanged {
        reporter.emit(Event::Info {
            step: "promote".into(),
            message: format!("{r}: already promoted with these settings; nothing to do"),
        });
    }
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// A region and the image of this account that has the name there, if any.
type NameHolder = (String, Option<calls::Image>);

/// Runs futures concurrently and returns their outputs in order.
async fn join_all<T>(futures: Vec<Boxed<'_, T>>) -> Vec<T> {
    let mut futures: Vec<Option<Boxed<'_, T>>> = futures.into_iter().map(Some).collect();
    let mut out: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, slot) in futures.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        out[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// The first error that is not a cancellation (the cause), else the first error.
fn first_error(results: Vec<Result<(), PromoteError>>) -> Result<(), PromoteError> {
    let mut cancelled = None;
    for r in results {
        match r {
            Ok(()) => {}
            Err(PromoteError::Cancelled) => cancelled = Some(PromoteError::Cancelled),
            Err(e) => return Err(e),
        }
    }
    cancelled.map_or(Ok(()), Err)
}

impl Promotion<'_> {
    fn source_region(&self) -> &str {
        &self.clients.source_region
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self) -> Result<(), PromoteError> {
        write_journal(&self.journal_path, &self.journal())
    }

    fn finish(&self, outcome: &str) {
        self.journal().outcome = outcome.to_string();
        if let Err(e) = self.save() {
            tracing::warn!(error = %e, "could not write the promotion's journal");
        }
    }

    /// Writes `region`'s record: the journal first, then the source image's tag. Before a step,
    /// this is the write-ahead that lets a rerun (or another machine) continue.
    async fn record(&self, region: &str, record: Record) -> Result<(), PromoteError> {
        self.record_local(region, &record)?;
        self.record_tag(region, &record).await
    }

    /// The journal's half of [`Promotion::record`].
    fn record_local(&self, region: &str, record: &Record) -> Result<(), PromoteError> {
        let mut j = self.journal();
        match j.regions.get_mut(region) {
            Some(e) => e.record = record.clone(),
            None => {
                j.regions.insert(
                    region.to_string(),
                    RegionEntry {
                        record: record.clone(),
                        snapshot_ids: Vec::new(),
                        parameter_before: None,
                    },
                );
            }
        }
        write_journal(&self.journal_path, &j)
    }

    /// The source image's half of [`Promotion::record`].
    async fn record_tag(&self, region: &str, record: &Record) -> Result<(), PromoteError> {
        let (ec2, id, key, value) = (
            &self.clients.source().ec2,
            &self.source.id,
            plan::tag_key(region),
            record.encode(),
        );
        wait::persist(|| calls::set_tag(ec2, id, &key, &value))
            .await
            .map_err(aws_in(self.source_region()))
    }

    fn copy_record(&self, region: &str, stage: Stage, attempt: u32, ami: Option<&str>) -> Record {
        Record {
            stage,
            attempt,
            ami: ami.map(str::to_string),
            copy: plan::copy_hash(self.settings, region),
            publish: matches!(stage, Stage::Publishing | Stage::Done).then(|| self.publish.clone()),
        }
    }

    /// Runs one region's step; its failure cancels the others (they stop where they are), and
    /// a cancellation ends it.
    async fn stopping_others<F>(&self, f: F) -> Result<(), PromoteError>
    where
        F: Future<Output = Result<(), PromoteError>>,
    {
        let r = tokio::select! {
            r = f => r,
            () = self.cancel.cancelled() => Err(PromoteError::Cancelled),
        };
        if matches!(&r, Err(e) if !matches!(e, PromoteError::Cancelled)) {
            self.cancel.cancel();
        }
        r
    }

    fn progress(&self, region: &str, ami: &str, state: &str, percent: Option<u8>) {
        self.reporter.emit(Event::CopyProgress {
            region: region.into(),
            ami_id: ami.into(),
            state: state.into(),
            percent,
        });
    }

    /// Makes sure `region` has an available copy.
    async fn copy_region(&self, region: &str, next: Next) -> Result<(), PromoteError> {
        let (mut attempt, mut ami) = match next {
            Next::Copy { attempt } => (attempt, None),
            Next::Wait { attempt, ami } => (attempt, Some(ami)),
            // Copied already (it is published next), or done.
            Next::Publish { .. } | Next::Nothing { .. } | Next::Refuse(_) => return Ok(()),
        };
        if let Some(id) = &ami {
            if self.copy_gone(region, id).await? {
                attempt += 1;
                ami = None;
            }
        }
        let (ami, known) = match ami {
            Some(id) => (id, None),
            None => {
                let (id, known) = self.start_copy(region, attempt).await?;
                (id, Some(known))
            }
        };
        // The copy's id goes on the tag while the copy is waited for.
        let tagged = async {
            match &known {
                Some(r) => self.record_tag(region, r).await,
                None => Ok(()),
            }
        };
        let (image, ()) = tokio::try_join!(self.wait_copy(region, &ami), tagged)?;
        {
            let mut j = self.journal();
            if let Some(e) = j.regions.get_mut(region) {
                e.snapshot_ids = image.snapshot_ids.clone();
            }
        }
        // In the journal only: on the tag, `copying` with the copy's id leads a resume to the
        // same step (a look at the copy, available), and publishing follows at once.
        self.record_local(
            region,
            &self.copy_record(region, Stage::Copied, attempt, Some(&ami)),
        )
    }

    /// Resumed: whether the copy `id` is gone from `region` (a person or gc may have removed
    /// it), which says so; it is then copied again.
    async fn copy_gone(&self, region: &str, id: &str) -> Result<bool, PromoteError> {
        let seen = calls::describe(&self.clients.get(region).ec2, id)
            .await
            .map_err(aws_in(region))?;
        let gone = seen.is_none_or(|i| i.state == "deregistered");
        if gone {
            self.reporter.emit(Event::Info {
                step: "promote".into(),
                message: format!("{region}: the copy {id} is gone; copying again"),
            });
        }
        Ok(gone)
    }

    /// Asks for the copy of `attempt` in `region`, written ahead in the journal; gives its id
    /// and the record that names it (for the tag).
    async fn start_copy(
        &self,
        region: &str,
        attempt: u32,
    ) -> Result<(String, Record), PromoteError> {
        // Ahead in the journal. On the tag, alongside the call: the token is the build's, the
        // region's and the attempt's, so a resume from a tag that missed this write (no
        // record, or the attempt before rolled back) asks with the same token and gets this
        // copy.
        let ahead = self.copy_record(region, Stage::Copying, attempt, None);
        self.record_local(region, &ahead)?;
        let request = self.copy_request(region, attempt);
        let ec2 = &self.clients.get(region).ec2;
        let copied = async {
            wait::persist(|| calls::copy_image(ec2, &request))
                .await
                .map_err(|e| match e.code() {
                    Some("IdempotentParameterMismatch") => PromoteError::BadInput(format!(
                        "{region}: the copy of this attempt was asked with other settings; \
                         rerun with the settings the promotion started with"
                    )),
                    _ => aws_in(region)(e),
                })
        };
        let (id, ()) = tokio::try_join!(copied, self.record_tag(region, &ahead))?;
        self.reporter.emit(Event::ResourceCreated {
            kind: format!("image copy in {region}"),
            id: id.clone(),
        });
        let known = self.copy_record(region, Stage::Copying, attempt, Some(&id));
        self.record_local(region, &known)?;
        Ok((id, known))
    }

    /// The CopyImage request of `attempt` in `region`: tagged at creation, its client token
    /// the build's, the region's and the attempt's.
    fn copy_request(&self, region: &str, attempt: u32) -> calls::CopyRequest {
        calls::CopyRequest {
            source_ami: self.source.id.clone(),
            source_region: self.source_region().to_string(),
            name: self.source.name.clone(),
            description: format!(
                "{} (copied from {} in {} by bakery build {})",
                self.source
                    .description
                    .as_deref()
                    .unwrap_or(&self.source.name),
                self.source.id,
                self.source_region(),
                self.build_id
            ),
            encrypted: self.settings.encrypted,
            kms_key_id: self.settings.kms_key_ids.get(region).cloned(),
            tags: plan::copy_tags(
                self.settings,
                &self.build_id,
                &self.source.id,
                self.source_region(),
            ),
            client_token: plan::client_token(&self.build_id, region, attempt),
        }
    }

    /// Waits until the copy is available: no fixed deadline, only a limit on how long it may
    /// show no progress; outages ridden out as every wait does.
    async fn wait_copy(&self, region: &str, ami: &str) -> Result<calls::Image, PromoteError> {
        let ec2 = &self.clients.get(region).ec2;
        let mut progress = plan::Progress::new(plan::stall_limit(self.source.size_gib));
        let mut outage = wait::Tolerance::new(wait::OUTAGE_LIMIT);
        let start = Instant::now();
        let mut snapshots: Vec<String> = Vec::new();
        let mut last = String::from("not yet seen");
        loop {
            let (image, percent) = tokio::join!(
                calls::describe(ec2, ami),
                calls::snapshot_progress(ec2, &snapshots)
            );
            let elapsed = start.elapsed();
            let mut shown = None;
            match (image, percent) {
                (Ok(Some(i)), Ok(p)) => {
                    outage.clear();
                    match i.state.as_str() {
                        "available" => {
                            self.progress(region, ami, "available", Some(100));
                            return Ok(i);
                        }
                        "failed" | "error" | "invalid" | "deregistered" => {
                            return Err(PromoteError::CopyFailed {
                                region: region.into(),
                                ami: ami.into(),
                                source_ami: self.source.id.clone(),
                                reason: i.reason.unwrap_or_else(|| format!("it ended {}", i.state)),
                            })
                        }
                        _ => {}
                    }
                    snapshots = i.snapshot_ids.clone();
                    if progress.observe(&i.state, p, elapsed) {
                        self.progress(region, ami, &i.state, p);
                    }
                    last = format!(
                        "{} {}",
                        i.state,
                        p.map(|p| format!("{p}%")).unwrap_or_default()
                    );
                    shown = p;
                }
                (Ok(None), _) if elapsed < VISIBLE_TIMEOUT => last = "not yet visible".into(),
                (Ok(None), _) => {
                    return Err(PromoteError::Vanished {
                        region: region.into(),
                        ami: ami.into(),
                    })
                }
                (Err(e), _) | (_, Err(e)) => {
                    if outage.ride_out(&e) {
                        tracing::warn!(region, ami, error = %e, "AWS did not answer; still waiting");
                    } else {
                        return Err(aws_in(region)(e));
                    }
                }
            }
            if progress.stalled(elapsed) {
                return Err(PromoteError::Stalled {
                    region: region.into(),
                    ami: ami.into(),
                    waited: elapsed,
                    last,
                });
            }
            tokio::time::sleep(plan::next_poll(elapsed, shown)).await;
        }
    }

    /// Applies the shares, deprecation, protection and parameter in `region` (idempotent:
    /// a rerun applies them again).
    async fn publish_region(&self, region: &str) -> Result<(), PromoteError> {
        let Some((attempt, ami, snapshots)) = self.to_publish(region).await? else {
            return Ok(());
        };
        // Written ahead in the journal; on the tag, alongside the calls (a resume from the tag
        // alone publishes again either way: every call here is idempotent).
        let publishing = self.copy_record(region, Stage::Publishing, attempt, Some(&ami));
        self.record_local(region, &publishing)?;
        let calls = async {
            self.apply_publication(region, &ami, &snapshots)
                .await
                .map_err(aws_in(region))
        };
        tokio::try_join!(calls, self.record_tag(region, &publishing))?;
        self.record(
            region,
            self.copy_record(region, Stage::Done, attempt, Some(&ami)),
        )
        .await
    }

    /// What `region` publishes: its attempt, image and snapshots; `None` when there is nothing
    /// to publish there (published already with these settings, or never copied).
    async fn to_publish(
        &self,
        region: &str,
    ) -> Result<Option<(u32, String, Vec<String>)>, PromoteError> {
        let (record, snapshots) = {
            let j = self.journal();
            match j.regions.get(region) {
                Some(e) => (Some(e.record.clone()), e.snapshot_ids.clone()),
                None => (None, Vec::new()),
            }
        };
        let is_source = region == self.source_region();
        let (attempt, ami, snapshots) = match (&record, is_source) {
            (Some(r), _)
                if r.stage == Stage::Done && r.publish.as_deref() == Some(&self.publish) =>
            {
                // Nothing to do; the manifest still needs its snapshots (a journal from
                // another machine's run has none).
                if let (Some(ami), true, false) = (&r.ami, snapshots.is_empty(), is_source) {
                    let found = self.snapshots_of(region, ami).await?;
                    if let Some(e) = self.journal().regions.get_mut(region) {
                        e.snapshot_ids = found;
                    }
                }
                return Ok(None);
            }
            (_, true) => (0, self.source.id.clone(), self.source.snapshot_ids.clone()),
            (Some(r), false) => match &r.ami {
                Some(a) => (r.attempt, a.clone(), snapshots),
                None => {
                    return Err(PromoteError::Vanished {
                        region: region.into(),
                        ami: "-".into(),
                    })
                }
            },
            (None, false) => return Ok(None),
        };
        let snapshots = if snapshots.is_empty() && !is_source {
            // Resumed on another machine: the journal there has no snapshot ids.
            self.snapshots_of(region, &ami).await?
        } else {
            snapshots
        };
        if is_source {
            let mut j = self.journal();
            j.regions
                .entry(region.to_string())
                .or_insert_with(|| RegionEntry {
                    record: self.copy_record(region, Stage::Copied, 0, Some(&self.source.id)),
                    snapshot_ids: self.source.snapshot_ids.clone(),
                    parameter_before: None,
                });
        }
        Ok(Some((attempt, ami, snapshots)))
    }

    /// The snapshots of `ami` in `region` (none if it is gone).
    async fn snapshots_of(&self, region: &str, ami: &str) -> Result<Vec<String>, PromoteError> {
        Ok(calls::describe(&self.clients.get(region).ec2, ami)
            .await
            .map_err(aws_in(region))?
            .map(|i| i.snapshot_ids)
            .unwrap_or_default())
    }

    /// The shares of `ami` and its `snapshots`, its deprecation, protection and parameter in
    /// `region`, all at once.
    async fn apply_publication(
        &self,
        region: &str,
        ami: &str,
        snapshots: &[String],
    ) -> Result<(), AwsError> {
        let aws = self.clients.get(region);
        let s = self.settings;
        let shares = async {
            calls::set_launch_permissions(
                &aws.ec2,
                ami,
                true,
                &s.accounts,
                &s.organization_arns,
                &s.ou_arns,
            )
            .await
        };
        let volumes = calls::set_volume_permissions(&aws.ec2, snapshots, true, &s.accounts);
        let deprecation = async {
            match self.deprecate_unix {
                Some(t) => calls::set_deprecation(&aws.ec2, ami, Some(t)).await,
                None => Ok(()),
            }
        };
        let protection = async {
            if s.deregistration_protection {
                calls::set_protection(&aws.ec2, ami, true).await
            } else {
                Ok(())
            }
        };
        let parameter = async {
            let Some(name) = &s.ssm_parameter else {
                return Ok(());
            };
            self.remember_parameter(region, name, ami).await?;
            calls::put_parameter(&aws.ssm, name, Some(ami)).await
        };
        tokio::try_join!(shares, volumes, deprecation, protection, parameter).map(|_| ())
    }

    /// Keeps the parameter's value before this promotion wrote it, in the journal (once), so a
    /// rollback can restore it.
    async fn remember_parameter(
        &self,
        region: &str,
        name: &str,
        ami: &str,
    ) -> Result<(), AwsError> {
        let known = self
            .journal()
            .regions
            .get(region)
            .and_then(|e| e.parameter_before.clone());
        if known.is_some() {
            return Ok(());
        }
        let before = calls::get_parameter(&self.clients.get(region).ssm, name).await?;
        // A rerun finds its own earlier write: that is not the value to restore.
        if before.as_deref() == Some(ami) {
            return Ok(());
        }
        let mut j = self.journal();
        if let Some(e) = j.regions.get_mut(region) {
            e.parameter_before = Some(before);
        }
        write_journal(&self.journal_path, &j).map_err(|e| AwsError {
            action: "bakery",
            resource: self.journal_path.display().to_string(),
            code: None,
            message: e.to_string(),
            transient: false,
        })
    }

    /// Undoes what this run could not finish in `region` (one whose copy was not done before
    /// it): the build's copies there are deregistered with their snapshots, a parameter it
    /// wrote gets its previous value back, and the source image loses the shares it was given.
    /// Problems are reported; the original error is what the user sees.
    async fn undo_region(&self, region: &str) {
        let aws = self.clients.get(region);
        let entry = self.journal().regions.get(region).cloned();
        let published = entry
            .as_ref()
            .is_some_and(|e| e.record.stage >= Stage::Publishing);
        if let (true, Some(name)) = (published, &self.settings.ssm_parameter) {
            if let Some(before) = entry.as_ref().and_then(|e| e.parameter_before.clone()) {
                if let Err(e) = calls::put_parameter(&aws.ssm, name, before.as_deref()).await {
                    self.cleanup_failed(region, "SSM parameter", &e);
                }
            }
        }
        if region == self.source_region() {
            if !published {
                return;
            }
            if let Err(e) = self.unshare_source(aws).await {
                self.cleanup_failed(region, "shares of the source image", &e);
            }
        } else {
            self.remove_copies(region).await;
        }
        let attempt = entry.as_ref().map_or(0, |e| e.record.attempt);
        let ami = entry.as_ref().and_then(|e| e.record.ami.clone());
        if let Err(e) = self
            .record(
                region,
                self.copy_record(region, Stage::RolledBack, attempt, ami.as_deref()),
            )
            .await
        {
            self.cleanup_failed(region, "promotion record", &e);
        }
    }

    /// Reports what could not be undone in `region`.
    fn cleanup_failed(&self, region: &str, what: &str, e: &dyn std::fmt::Display) {
        self.reporter.emit(Event::CleanupFailed {
            kind: what.into(),
            id: region.into(),
            error: e.to_string(),
        });
    }

    /// Takes back what publishing gave the source image: its shares and its snapshots',
    /// deprecation and protection.
    async fn unshare_source(&self, aws: &Aws) -> Result<(), AwsError> {
        let s = self.settings;
        let id = &self.source.id;
        calls::set_launch_permissions(
            &aws.ec2,
            id,
            false,
            &s.accounts,
            &s.organization_arns,
            &s.ou_arns,
        )
        .await?;
        calls::set_volume_permissions(&aws.ec2, &self.source.snapshot_ids, false, &s.accounts)
            .await?;
        if self.deprecate_unix.is_some() {
            calls::set_deprecation(&aws.ec2, id, None).await?;
        }
        if s.deregistration_protection {
            calls::set_protection(&aws.ec2, id, false).await?;
        }
        Ok(())
    }

    /// Deregisters the build's copies of the source in `region`, with their snapshots.
    async fn remove_copies(&self, region: &str) {
        let ec2 = &self.clients.get(region).ec2;
        let images = match calls::own_images_tagged(ec2, BUILD_ID_TAG, &self.build_id).await {
            Ok(images) => images,
            Err(e) => return self.cleanup_failed(region, "image copies", &e),
        };
        let source_region = Some(self.source_region());
        for i in images
            .iter()
            .filter(|i| i.tags.get(plan::SOURCE_REGION_TAG).map(String::as_str) == source_region)
        {
            match calls::remove_image(ec2, i, true).await {
                Ok(()) => self.reporter.emit(Event::ResourceReleased {
                    kind: format!("image copy in {region}"),
                    id: i.id.clone(),
                }),
                Err(e) => self.cleanup_failed(region, "image copy", &e),
            }
        }
    }
}

impl Outage for PromoteError {
    fn is_outage(&self) -> bool {
        matches!(self, PromoteError::Aws { source, .. } if source.transient)
    }
}
