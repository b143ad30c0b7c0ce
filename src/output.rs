//! What the user sees: human progress lines on stderr, or one JSON event per line (NDJSON) on
//! stdout for pipelines (`--output json`). Commands describe what happened as [`Event`]s and this
//! module decides how to show them, so the two forms can never drift apart.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Human,
    Json,
}

/// Which stream a line of provisioner output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    BuildStarted {
        build_id: String,
        recipe: String,
        region: String,
    },
    StepStarted {
        step: String,
    },
    StepFinished {
        step: String,
        duration_s: f64,
    },
    Info {
        step: String,
        message: String,
    },
    ResourceCreated {
        kind: String,
        id: String,
    },
    ResourceReleased {
        kind: String,
        id: String,
    },
    ResourceKept {
        kind: String,
        id: String,
        remove_with: String,
    },
    CleanupFailed {
        kind: String,
        id: String,
        error: String,
    },
    Output {
        provisioner: String,
        stream: Stream,
        line: String,
    },
    BuildFinished {
        manifest: serde_json::Value,
    },
    BuildFailed {
        error: String,
        exit_code: i32,
    },
    RolloutStarted {
        rollout_id: String,
        group: String,
        ami: String,
        launch_template: String,
        from_version: String,
        to_version: String,
        capacity: u32,
        resumed: bool,
    },
    BatchStarted {
        batch: u32,
        size: u32,
        desired: u32,
        retiring: Vec<String>,
    },
    Waiting {
        why: String,
    },
    Retired {
        instances: Vec<String>,
        desired: u32,
    },
    CanaryBaking {
        seconds: u64,
    },
    /// `bakery rollout --checkpoints`: the share of instances replaced reached a checkpoint.
    CheckpointReached {
        percent: u32,
        pause_s: u64,
    },
    /// `bakery rollout`: old warm-pool instances terminated (the pool refills from the new version).
    WarmPoolRefreshed {
        instances: Vec<String>,
    },
    CanaryPassed,
    RollbackStarted {
        reason: String,
        instances: Vec<String>,
    },
    RolloutPlan {
        plan: serde_json::Value,
    },
    RolloutFinished {
        result: String,
        group: String,
        ami: String,
        version: String,
        duration_s: f64,
    },
    RolloutFailed {
        error: String,
        exit_code: i32,
    },
    /// `validate` (a recipe, or `daemon --check`): the file is valid.
    Valid {
        file: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
    Gc {
        dry_run: bool,
        findings: serde_json::Value,
    },
    Prune {
        dry_run: bool,
        images: serde_json::Value,
    },
    Audit {
        group: String,
        high_findings: usize,
        findings: serde_json::Value,
    },
    Status {
        #[serde(flatten)]
        status: serde_json::Value,
    },
    /// `promote` (or a `build` with `[distribute]`): the image and where it goes.
    PromoteStarted {
        build_id: String,
        source_ami: String,
        source_region: String,
        regions: Vec<String>,
    },
    /// A copy's progress in its region: state, and the snapshot's percent where EC2 gives it.
    CopyProgress {
        region: String,
        ami_id: String,
        state: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        percent: Option<u8>,
    },
    /// The promotion is complete: the manifest with every region's image, and the regions
    /// that were promoted already with these settings (nothing was done there).
    PromoteFinished {
        manifest: serde_json::Value,
        unchanged: Vec<String>,
    },
    /// `release`: the release starts (or resumes) with these waves and groups.
    ReleaseStarted {
        release: String,
        resumed: bool,
        on_failure: String,
        waves: serde_json::Value,
    },
    WaveStarted {
        wave: String,
        groups: Vec<String>,
    },
    /// A group's rollout starts (`previous_ami`: what it launched before, for the revert).
    GroupStarted {
        wave: String,
        group: String,
        ami: String,
        previous_ami: String,
    },
    /// A group's rollout ended: `rolled_out`, `unchanged`, `rolled_back`, `halted`, `failed`.
    GroupFinished {
        wave: String,
        group: String,
        result: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// A wave's gate: `alarms` or `http`, `passed` or `failed`.
    Gate {
        wave: String,
        gate: String,
        result: String,
        detail: String,
    },
    WaveBaking {
        wave: String,
        seconds: u64,
    },
    /// `passed` or `failed`.
    WaveFinished {
        wave: String,
        result: String,
    },
    /// A failure (or --abort) reverts these groups.
    ReleaseRollbackStarted {
        reason: String,
        groups: Vec<String>,
    },
    GroupReverted {
        group: String,
        result: String,
    },
    /// `done`, `rolled back`, `stopped`, `aborted` (or a --dry-run's `planned`).
    ReleaseFinished {
        release: String,
        result: String,
        duration_s: f64,
    },
    ReleaseFailed {
        error: String,
        exit_code: i32,
    },
    /// `release --status`: the record.
    ReleaseStatus {
        record: serde_json::Value,
    },
    /// A command other than `build` and `rollout` failed.
    CommandFailed {
        command: String,
        error: String,
        exit_code: i32,
    },
}

/// Sends events to the terminal or the NDJSON stream. Cheap to clone; safe to share with the
/// blocking threads that stream provisioner output.
#[derive(Clone)]
pub struct Reporter {
    inner: Arc<Inner>,
    /// Fields added to every event (JSON) and a prefix on every line (human): a release runs
    /// several groups' rollouts at once, and each one's events say which group they are about.
    scope: Option<Arc<Scope>>,
}

struct Scope {
    fields: serde_json::Map<String, serde_json::Value>,
    prefix: String,
}

struct Inner {
    format: Format,
    quiet: bool,
    /// `--no-progress`: no step, wait or resource lines; provisioner output, warnings, errors
    /// and results still show.
    no_progress: bool,
    lock: Mutex<()>,
}

impl Reporter {
    pub fn new(format: Format, quiet: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                format,
                quiet,
                no_progress: false,
                lock: Mutex::new(()),
            }),
            scope: None,
        }
    }

    /// The same reporter whose events also carry `fields` (e.g. wave, region, group), and whose
    /// human lines start with `[prefix] `.
    pub fn scoped(&self, fields: &[(&str, &str)], prefix: &str) -> Self {
        Self {
            inner: self.inner.clone(),
            scope: Some(Arc::new(Scope {
                fields: fields
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), serde_json::Value::from(*v)))
                    .collect(),
                prefix: format!("[{prefix}] "),
            })),
        }
    }

    /// The same reporter without progress lines (`--no-progress`).
    pub fn without_progress(format: Format, quiet: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                format,
                quiet,
                no_progress: true,
                lock: Mutex::new(()),
            }),
            scope: None,
        }
    }

    pub fn format(&self) -> Format {
        self.inner.format
    }

    pub fn emit(&self, event: Event) {
        let _guard = self.inner.lock.lock().unwrap_or_else(|p| p.into_inner());
        match self.inner.format {
            Format::Json => {
                let ts = OffsetDateTime::now_utc()
                    .format(&Rfc3339)
                    .unwrap_or_default();
                let mut value = serde_json::to_value(&event).unwrap_or_default();
                if let Some(map) = value.as_object_mut() {
                    for (k, v) in self.scope.iter().flat_map(|s| &s.fields) {
                        map.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                    map.insert("ts".into(), ts.into());
                }
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{value}");
                let _ = out.flush();
            }
            Format::Human => {
                if let Event::RolloutPlan { .. } = &event {
                    // A dry run's plan is its result: stdout, even under --quiet.
                    if let Some(line) = human_line(&event, false) {
                        let _ = writeln!(std::io::stdout().lock(), "{line}");
                    }
                } else if self.inner.no_progress && is_progress(&event) {
                } else if let Some(line) = human_line(&event, self.inner.quiet) {
                    let prefix = self.scope.as_ref().map(|s| s.prefix.as_str()).unwrap_or("");
                    let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
                }
            }
        }
    }
}

/// Lines that only show how far a command got.
fn is_progress(event: &Event) -> bool {
    matches!(
        event,
        Event::StepStarted { .. }
            | Event::StepFinished { .. }
            | Event::Info { .. }
            | Event::ResourceCreated { .. }
            | Event::ResourceReleased { .. }
            | Event::Waiting { .. }
            | Event::CopyProgress { .. }
    )
}

impl Reporter {
    /// A command's result: the event in JSON, else `human` on stdout (even under `--quiet`:
    /// it is what the user asked for).
    pub fn result(&self, event: Event, human: impl FnOnce() -> String) {
        match self.inner.format {
            Format::Json => self.emit(event),
            Format::Human => {
                let _guard = self.inner.lock.lock().unwrap_or_else(|p| p.into_inner());
                let text = human();
                let mut out = std::io::stdout().lock();
                let _ = write!(out, "{text}");
                if !text.ends_with('\n') {
                    let _ = writeln!(out);
                }
            }
        }
    }
}

/// The human form of an event, or nothing for events a person need not see.
///
/// One piece on purpose: one `match` arm per event kind, so that a new event kind fails to
/// compile until it has its human form, and every form can be read and compared in one place.
fn human_line(event: &Event, quiet: bool) -> Option<String> {
    let line = match event {
        Event::BuildStarted {
            build_id,
            recipe,
            region,
        } => format!("==> bake {build_id}: {recipe} in {region}"),
        Event::StepStarted { step } => format!("==> {step}"),
        Event::StepFinished { step, duration_s } => {
            format!("    {step} done in {duration_s:.1}s")
        }
        Event::Info { step, message } => format!("    {step}: {message}"),
        Event::ResourceCreated { kind, id } => format!("    created {kind} {id}"),
        Event::ResourceReleased { kind, id } => format!("    removed {kind} {id}"),
        Event::ResourceKept {
            kind,
            id,
            remove_with,
        } => format!("    kept {kind} {id} (remove with: {remove_with})"),
        Event::CleanupFailed { kind, id, error } => {
            return Some(format!("!!  could not remove {kind} {id}: {error}"))
        }
        Event::Output {
            provisioner,
            stream,
            line,
        } => match stream {
            Stream::Stdout => format!("    {provisioner} | {line}"),
            Stream::Stderr => format!("    {provisioner} ! {line}"),
        },
        Event::BuildFinished { .. } => return None,
        Event::RolloutStarted {
            rollout_id,
            group,
            ami,
            launch_template,
            from_version,
            to_version,
            capacity,
            resumed,
        } => format!(
            "==> {} rollout {rollout_id}: {ami} into {group} ({launch_template} version {from_version} -> {to_version}, capacity {capacity})",
            if *resumed { "resuming" } else { "starting" }
        ),
        Event::BatchStarted {
            batch,
            size,
            desired,
            retiring,
        } => {
            let mut line = format!("==> batch {batch}: launching {size} (desired {desired})");
            if !retiring.is_empty() {
                line.push_str(&format!(", retiring {} now", retiring.join(", ")));
            }
            line
        }
        Event::Waiting { why } => format!("    waiting: {why}"),
        Event::Retired { instances, desired } => {
            format!("    retired {} (desired {desired})", instances.join(", "))
        }
        Event::CanaryBaking { seconds } => format!("    canary healthy; baking for {seconds}s"),
        Event::CanaryPassed => "    canary bake passed".to_string(),
        Event::CheckpointReached { percent, pause_s } => {
            format!("==> checkpoint {percent}% reached; pausing {pause_s}s")
        }
        Event::WarmPoolRefreshed { instances } => format!(
            "    warm pool: terminated {} (old image or version; the pool refills from the new version)",
            instances.join(", ")
        ),
        Event::RollbackStarted { reason, .. } => {
            return Some(format!("!!  rolling back: {reason}"))
        }
        Event::RolloutPlan { plan } => render_plan(plan),
        Event::RolloutFinished {
            result,
            group,
            ami,
            version,
            duration_s,
        } => format!("==> {group}: {result} on {ami} (version {version}) in {duration_s:.1}s"),
        Event::RolloutFailed { error, .. } => return Some(format!("!!  rollout failed: {error}")),
        Event::BuildFailed { error, .. } => return Some(format!("!!  build failed: {error}")),
        Event::CommandFailed { error, .. } => return Some(format!("error: {error}")),
        Event::PromoteStarted {
            build_id,
            source_ami,
            source_region,
            regions,
        } => format!(
            "==> promote {build_id}: {source_ami} ({source_region}) to {}",
            if regions.is_empty() {
                "no other region".to_string()
            } else {
                regions.join(", ")
            }
        ),
        Event::CopyProgress {
            region,
            ami_id,
            state,
            percent,
        } => match percent {
            Some(p) => format!("    {region}: {ami_id} {state} {p}%"),
            None => format!("    {region}: {ami_id} {state}"),
        },
        Event::PromoteFinished { .. } => return None,
        Event::ReleaseStarted {
            release,
            resumed,
            on_failure,
            waves,
        } => format!(
            "==> release {release}{}: {} wave(s), on failure {on_failure}",
            if *resumed { " (resumed)" } else { "" },
            waves.as_array().map(Vec::len).unwrap_or(0)
        ),
        Event::WaveStarted { wave, groups } => {
            format!("==> wave {wave}: {}", groups.join(", "))
        }
        Event::GroupStarted {
            group,
            ami,
            previous_ami,
            ..
        } => format!("    {group}: {previous_ami} -> {ami}"),
        Event::GroupFinished {
            group,
            result,
            detail,
            ..
        } => format!(
            "    {group}: {result}{}",
            detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
        ),
        Event::Gate {
            wave,
            gate,
            result,
            detail,
        } => format!("    wave {wave}: {gate} gate {result}: {detail}"),
        Event::WaveBaking { wave, seconds } => {
            format!("    wave {wave}: healthy; watching for {seconds}s")
        }
        Event::WaveFinished { wave, result } => format!("==> wave {wave} {result}"),
        Event::ReleaseRollbackStarted { reason, groups } => format!(
            "!!  release halted: {reason}; reverting {}",
            if groups.is_empty() {
                "nothing".to_string()
            } else {
                groups.join(", ")
            }
        ),
        Event::GroupReverted { group, result } => format!("    {group}: {result}"),
        Event::ReleaseFinished {
            release,
            result,
            duration_s,
        } => format!("==> release {release} {result} in {duration_s:.0}s"),
        // main prints the error itself (as for rollout_failed).
        Event::ReleaseFailed { .. } => return None,
        Event::ReleaseStatus { .. } => return None,
        Event::Valid { .. }
        | Event::Gc { .. }
        | Event::Prune { .. }
        | Event::Audit { .. }
        | Event::Status { .. } => return None,
    };
    (!quiet).then_some(line)
}

/// A rollout's `--dry-run` plan for people: what changes, then one row per batch.
fn render_plan(plan: &serde_json::Value) -> String {
    let text = |k: &str| match &plan[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        v => v.to_string(),
    };
    let mut out = String::from("==> plan (dry run: nothing was changed)\n");
    if let Some(p) = plan.get("in_progress") {
        let f = |k: &str| p[k].to_string().trim_matches('"').to_string();
        out.push_str(&format!(
            "    {}: rollout {} of {} in progress ({} batch {}, version {} -> {}, since {})\n    a real run would {}\n",
            text("group"), f("rollout_id"), f("ami"), f("phase"), f("batch"),
            f("from_version"), f("to_version"), f("started"), text("would")
        ));
        return out.trim_end().to_string();
    }
    out.push_str(&format!(
        "    {}: {} version {} ({}) -> a new version with {}\n    capacity {}, {} instance(s) to replace; surge {}, max unavailable {}, canary {} (bake {}s); max size needed {}\n\n",
        text("group"), text("launch_template"), text("from_version"), text("from_ami"),
        text("to_ami"), text("capacity"), text("instances_to_replace"), text("max_surge"),
        text("max_unavailable"), text("canary"), text("canary_bake_s"), text("max_size_needed"),
    ));
    if plan.get("ramp").is_some() {
        // Trim the blank line above: the in-group line belongs to the header.
        out.truncate(out.trim_end().len());
        out.push_str(&format!(
            "\n    ramp {}, skip matching {}, protected instances: {}, Standby instances: {}, checkpoints {}, warm-pool instances to refresh {}\n\n",
            text("ramp"),
            if plan["skip_matching"] == true { "on" } else { "off" },
            text("protected_instances"),
            text("standby_instances"),
            match plan["checkpoints"].as_array() {
                Some(c) if !c.is_empty() => format!(
                    "{} (pause {}s)",
                    c.iter().map(|v| format!("{v}%")).collect::<Vec<_>>().join(", "),
                    text("checkpoint_pause_s")
                ),
                _ => "none".into(),
            },
            plan["warm_pool_to_refresh"].as_array().map_or(0, Vec::len),
        ));
    }
    let mut rows = vec![[
        "BATCH",
        "LAUNCHED",
        "RETIRED",
        "DESIRED",
        "LEAST IN SERVICE",
    ]
    .map(String::from)
    .to_vec()];
    for b in plan["batches"].as_array().into_iter().flatten() {
        rows.push(
            [
                "batch",
                "launched",
                "retired",
                "desired",
                "least_in_service",
            ]
            .iter()
            .map(|k| b[*k].to_string())
            .chain(
                b["checkpoint"]
                    .as_u64()
                    .map(|c| format!("(checkpoint {c}%: pause {}s)", text("checkpoint_pause_s"))),
            )
            .collect(),
        );
    }
    out.push_str(&table(&rows));
    out.trim_end().to_string()
}

/// An aligned text table: the first row is the header; the last column is not padded.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|v| v.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, v)| format!("{v:<w$}", w = widths[c]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn tables_align_columns() {
        let t = super::table(&[
            vec!["ID".into(), "STATE".into(), "NOTE".into()],
            vec!["i-1".into(), "running".into(), "".into()],
        ]);
        assert_eq!(
            t,
            "ID   STATE\ni-1  running\n".replace("STATE\n", "STATE    NOTE\n")
        );
    }
}
