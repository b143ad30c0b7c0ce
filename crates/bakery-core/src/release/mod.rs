//! A release plan (`bakery release PLAN.toml`): one image rolled over many Auto Scaling groups, in
//! waves, across regions and accounts, each wave gated on health, alarms and an HTTP check.
//!
//! This module reads and checks the plan (every mistake located, all at once, as recipes are);
//! [`record`] holds the release's durable record and the decisions taken on it (where a rerun
//! resumes, what a failure rolls back, whether a wave's gates passed).

pub mod record;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::diag::{locate, toml_message_in, Diagnostic, FileError};
use crate::plan::Amount;
use crate::recipe::distribute::check_region;

type S = Spanned<String>;

/// Longest bake (watching time after a wave is healthy).
pub const MAX_BAKE: Duration = Duration::from_secs(24 * 3600);
/// The HTTP gate's default and bounds for one request.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
const HTTP_TIMEOUT_BOUNDS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

/// The validated plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `[release] name`, else the plan file's stem: names the release's record and lease.
    pub name: String,
    pub file: PathBuf,
    pub sha256: String,
    pub source: Source,
    pub on_failure: OnFailure,
    pub waves: Vec<Wave>,
}

/// Where each region's image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A bake's manifest (relative paths are relative to the plan): each region's image from
    /// its `regions` (a promoted build), or its one `ami_id` in its own region.
    Manifest(PathBuf),
    /// One image id: every target must be in one region.
    Ami(String),
    /// An SSM parameter, read in each target's region (`bakery promote --ssm-parameter`).
    Param(String),
}

/// What a failed wave does to the rest of the release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Every group the release changed, in every wave, goes back to its previous image.
    RollbackAll,
    /// The failed wave's groups go back; the waves before it keep the new image.
    RollbackWave,
    /// Nothing is reverted: groups caught mid-rollout roll back their unfinished batch (so no
    /// group is left half-replaced), everything else stays for inspection; `--abort` reverts.
    Stop,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::RollbackAll => "rollback_all",
            OnFailure::RollbackWave => "rollback_wave",
            OnFailure::Stop => "stop",
        }
    }
}

/// A line and column in the plan, for errors found later (a group that does not exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct At {
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wave {
    pub name: String,
    pub targets: Vec<Target>,
    /// Watching time once every group of the wave is healthy; alarms are read throughout.
    pub bake: Duration,
    pub gates: Gates,
    pub rollout: RolloutSettings,
    /// Groups rolled at once; default: all of the wave's.
    pub max_parallel: usize,
    pub at: At,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub region: String,
    pub selector: Selector,
    /// A role in another account (or this one) to act through.
    pub role_arn: Option<String>,
    pub at: At,
}

/// Which groups a target names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Group(String),
    /// Every group in the region carrying this tag (resolved once, when the release starts).
    Tag {
        key: String,
        value: String,
    },
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Group(g) => write!(f, "group {g}"),
            Selector::Tag { key, value } => write!(f, "groups tagged {key}={value}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Gates {
    /// CloudWatch alarm names, looked up in the regions of the wave's targets: any of them in
    /// `ALARM` while the wave rolls or bakes halts the release.
    pub alarms: Vec<(String, At)>,
    pub http: Option<HttpGate>,
}

/// A GET of each new instance, on its private address, once its group is healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpGate {
    pub path: String,
    /// Default: the port of the group's target group.
    pub port: Option<u16>,
    pub expect_status: u16,
    /// A text the body must contain.
    pub expect_body: Option<String>,
    pub timeout: Duration,
}

/// A wave's rollout settings; unset ones take `bakery rollout`'s defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RolloutSettings {
    pub max_surge: Option<Amount>,
    pub max_unavailable: Option<Amount>,
    pub canary: Option<u32>,
    pub canary_bake: Option<Duration>,
    pub health_timeout: Option<Duration>,
    pub warmup: Option<Duration>,
}

impl Plan {
    /// Every region the plan's targets are in, in plan order.
    pub fn regions(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        self.waves
            .iter()
            .flat_map(|w| &w.targets)
            .filter(|t| seen.insert(t.region.clone()))
            .map(|t| t.region.clone())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The raw shape, as serde reads it.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    release: Option<RawRelease>,
    source: Option<Spanned<RawSource>>,
    #[serde(default)]
    wave: Vec<Spanned<RawWave>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelease {
    name: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    manifest: Option<S>,
    ami: Option<S>,
    ssm_parameter: Option<S>,
    on_failure: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWave {
    name: Option<S>,
    targets: Option<Spanned<Vec<Spanned<RawTarget>>>>,
    bake: Option<S>,
    gates: Option<RawGates>,
    rollout: Option<RawRollout>,
    max_parallel: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    region: Option<S>,
    group: Option<S>,
    tag: Option<Spanned<RawTag>>,
    role_arn: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTag {
    key: S,
    value: S,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGates {
    #[serde(default)]
    alarms: Vec<S>,
    http: Option<Spanned<RawHttp>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    path: Option<S>,
    port: Option<Spanned<i64>>,
    expect_status: Option<Spanned<i64>>,
    expect_body: Option<S>,
    timeout: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    max_surge: Option<Spanned<toml::Value>>,
    max_unavailable: Option<Spanned<toml::Value>>,
    canary: Option<Spanned<i64>>,
    canary_bake: Option<S>,
    health_timeout: Option<S>,
    warmup: Option<S>,
}

/// Reads and checks a plan file.
pub fn load(path: &Path) -> Result<Plan, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Checks a plan's text; every mistake is reported at once, located.
pub fn parse(path: &Path, text: &str) -> Result<Plan, FileError> {
    let mut c = Checker {
        file: path.to_path_buf(),
        text,
        diags: Vec::new(),
    };
    let raw: Raw = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            c.error(
                e.span().map(|s| s.start).unwrap_or(0),
                toml_message_in(&e, Some(text)),
                "check the plan against the example in the README (`bakery release`)",
            );
            return Err(FileError::Invalid(c.diags));
        }
    };
    let name = match raw.release.and_then(|r| r.name) {
        Some(n) => {
            if !valid_name(n.get_ref()) {
                c.error(
                    n.span().start,
                    format!("release name {:?} is not allowed", n.get_ref()),
                    "use 1 to 64 letters, digits, `-`, `_` or `.`",
                );
            }
            n.into_inner()
        }
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| valid_name(s))
            .unwrap_or_else(|| "release".into()),
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (source, on_failure) = c.source(raw.source, dir);
    if raw.wave.is_empty() {
        c.error(
            text.len(),
            "the plan has no waves",
            "add at least one [[wave]] with a name and targets",
        );
    }
    let mut names = BTreeMap::new();
    let mut seen_groups: BTreeMap<(String, String, Option<String>), String> = BTreeMap::new();
    let mut waves = Vec::new();
    for (i, w) in raw.wave.into_iter().enumerate() {
        let wave = c.wave(i, w, &mut names);
        for t in &wave.targets {
            if let Selector::Group(g) = &t.selector {
                if g.is_empty() {
                    continue;
                }
                let key = (t.region.clone(), g.clone(), t.role_arn.clone());
                if let Some(first) = seen_groups.insert(key, wave.name.clone()) {
                    c.error_at(
                        t.at,
                        format!(
                            "group {g} in {} is listed twice (first in wave {first:?})",
                            t.region
                        ),
                        "a release rolls each group once: keep it in one wave",
                    );
                }
            }
        }
        waves.push(wave);
    }
    if let Some(Source::Ami(ami)) = &source {
        let regions: BTreeSet<&str> = waves
            .iter()
            .flat_map(|w| &w.targets)
            .map(|t| t.region.as_str())
            .collect();
        if regions.len() > 1 {
            let at = waves
                .iter()
                .flat_map(|w| &w.targets)
                .nth(1)
                .map(|t| t.at)
                .unwrap_or_default();
            c.error_at(
                at,
                format!(
                    "`ami = {ami:?}` names one image, but the targets are in {} regions ({})",
                    regions.len(),
                    regions.into_iter().collect::<Vec<_>>().join(", ")
                ),
                "an image id belongs to one region: use `manifest` (a promoted build, `bakery promote`) or `ssm_parameter`",
            );
        }
    }
    match source {
        Some(source) if c.diags.is_empty() => Ok(Plan {
            name,
            file: path.to_path_buf(),
            sha256: crate::recipe::hex_sha256(text.as_bytes()),
            source,
            on_failure,
            waves,
        }),
        _ => {
            c.diags.sort_by_key(|d| (d.line, d.column));
            Err(FileError::Invalid(c.diags))
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// An IAM role ARN: `arn:PARTITION:iam::ACCOUNT:role/NAME`.
pub fn check_role_arn(arn: &str) -> Result<(), String> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let ok = parts.len() == 6
        && parts[0] == "arn"
        && matches!(parts[1], "aws" | "aws-cn" | "aws-us-gov")
        && parts[2] == "iam"
        && parts[3].is_empty()
        && parts[4].len() == 12
        && parts[4].chars().all(|c| c.is_ascii_digit())
        && parts[5]
            .strip_prefix("role/")
            .is_some_and(|n| !n.is_empty());
    if ok {
        Ok(())
    } else {
        Err(format!("{arn:?} is not an IAM role ARN"))
    }
}

/// The account id in a role ARN.
pub fn role_account(arn: &str) -> Option<&str> {
    arn.split(':').nth(4)
}

struct Checker<'a> {
    file: PathBuf,
    text: &'a str,
    diags: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn error(&mut self, offset: usize, message: impl Into<String>, hint: impl Into<String>) {
        let (line, column) = locate(self.text, offset);
        self.error_at(At { line, column }, message, hint);
    }

    fn error_at(&mut self, at: At, message: impl Into<String>, hint: impl Into<String>) {
        let hint = hint.into();
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            line: at.line,
            column: at.column,
            message: message.into(),
            hint: (!hint.is_empty()).then_some(hint),
        });
    }

    fn at(&self, offset: usize) -> At {
        let (line, column) = locate(self.text, offset);
        At { line, column }
    }

    fn source(
        &mut self,
        raw: Option<Spanned<RawSource>>,
        dir: &Path,
    ) -> (Option<Source>, OnFailure) {
        let Some(raw) = raw else {
            self.error(
                0,
                "the plan has no [source] table",
                "add [source] with `manifest = \"bakery-manifest.json\"`, `ami = \"ami-…\"` or `ssm_parameter = \"/path\"`",
            );
            return (None, OnFailure::RollbackAll);
        };
        let start = raw.span().start;
        let raw = raw.into_inner();
        let on_failure = match raw.on_failure.as_ref().map(|s| (s.get_ref().as_str(), s)) {
            None | Some(("rollback_all", _)) => OnFailure::RollbackAll,
            Some(("rollback_wave", _)) => OnFailure::RollbackWave,
            Some(("stop", _)) => OnFailure::Stop,
            Some((other, s)) => {
                self.error(
                    s.span().start,
                    format!("on_failure = {other:?} is not a policy"),
                    "write \"rollback_all\" (default), \"rollback_wave\" or \"stop\"",
                );
                OnFailure::RollbackAll
            }
        };
        let given: Vec<(&str, &S)> = [
            ("manifest", raw.manifest.as_ref()),
            ("ami", raw.ami.as_ref()),
            ("ssm_parameter", raw.ssm_parameter.as_ref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
        let source = match given.as_slice() {
            [] => {
                self.error(
                    start,
                    "[source] names no image",
                    "add one of `manifest = \"bakery-manifest.json\"`, `ami = \"ami-…\"`, `ssm_parameter = \"/path\"`",
                );
                None
            }
            [(kind, v)] => {
                let value = v.get_ref().trim().to_string();
                match *kind {
                    "manifest" if value.is_empty() => {
                        self.error(
                            v.span().start,
                            "`manifest` is empty",
                            "give the manifest's path",
                        );
                        None
                    }
                    "manifest" => Some(Source::Manifest(dir.join(value))),
                    "ami" if !is_ami_id(&value) => {
                        self.error(
                            v.span().start,
                            format!("{value:?} is not an AMI id"),
                            "an AMI id looks like \"ami-0123456789abcdef0\"",
                        );
                        None
                    }
                    "ami" => Some(Source::Ami(value)),
                    _ if !value.starts_with('/') => {
                        self.error(
                            v.span().start,
                            format!("ssm_parameter {value:?} does not start with `/`"),
                            "give the parameter's full path, e.g. \"/bakery/web/latest\"",
                        );
                        None
                    }
                    _ => Some(Source::Param(value)),
                }
            }
            [_, (k2, v2), ..] => {
                self.error(
                    v2.span().start,
                    format!(
                        "[source] names the image twice ({})",
                        given
                            .iter()
                            .map(|(k, _)| *k)
                            .collect::<Vec<_>>()
                            .join(" and ")
                    ),
                    format!("keep one of them; remove `{k2}`"),
                );
                None
            }
        };
        (source, on_failure)
    }

    fn wave(
        &mut self,
        index: usize,
        raw: Spanned<RawWave>,
        names: &mut BTreeMap<String, usize>,
    ) -> Wave {
        let start = raw.span().start;
        let at = self.at(start);
        let raw = raw.into_inner();
        let name = match &raw.name {
            Some(n) if valid_name(n.get_ref()) => n.get_ref().clone(),
            Some(n) => {
                self.error(
                    n.span().start,
                    format!("wave name {:?} is not allowed", n.get_ref()),
                    "use 1 to 64 letters, digits, `-`, `_` or `.`",
                );
                n.get_ref().clone()
            }
            None => {
                self.error(
                    start,
                    format!("wave {} has no name", index + 1),
                    "add `name = \"canary\"` (names appear in events, the record and --status)",
                );
                format!("wave-{}", index + 1)
            }
        };
        if let (Some(n), Some(first)) = (&raw.name, names.insert(name.clone(), index)) {
            self.error(
                n.span().start,
                format!(
                    "wave name {name:?} is used twice (waves {} and {})",
                    first + 1,
                    index + 1
                ),
                "give each wave its own name",
            );
        }
        let targets = match raw.targets {
            Some(t) if !t.get_ref().is_empty() => {
                let list = t.into_inner();
                list.into_iter().map(|t| self.target(&name, t)).collect()
            }
            Some(t) => {
                self.error(
                    t.span().start,
                    format!("wave {name:?} has no targets"),
                    "add targets = [{ region = \"us-east-1\", group = \"web\" }] (or a tag = { key, value })",
                );
                Vec::new()
            }
            None => {
                self.error(
                    start,
                    format!("wave {name:?} has no targets"),
                    "add targets = [{ region = \"us-east-1\", group = \"web\" }] (or a tag = { key, value })",
                );
                Vec::new()
            }
        };
        let bake = self
            .duration(raw.bake.as_ref(), "bake", (Duration::ZERO, MAX_BAKE))
            .unwrap_or(Duration::ZERO);
        let gates = raw.gates.map(|g| self.gates(g)).unwrap_or_default();
        let rollout = raw.rollout.map(|r| self.rollout(r)).unwrap_or_default();
        let max_parallel = match raw.max_parallel {
            None => targets.len().max(1),
            Some(n) if *n.get_ref() >= 1 => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
            Some(n) => {
                self.error(
                    n.span().start,
                    format!("max_parallel = {} must be at least 1", n.get_ref()),
                    "the number of groups of this wave rolled at once (default: all)",
                );
                1
            }
        };
        Wave {
            name,
            targets,
            bake,
            gates,
            rollout,
            max_parallel,
            at,
        }
    }

    fn target(&mut self, wave: &str, raw: Spanned<RawTarget>) -> Target {
        let start = raw.span().start;
        let at = self.at(start);
        let raw = raw.into_inner();
        let region = match &raw.region {
            Some(r) => {
                if let Err(p) = check_region(r.get_ref()) {
                    self.error(r.span().start, p.message, p.hint);
                }
                r.get_ref().clone()
            }
            None => {
                self.error(
                    start,
                    format!("a target of wave {wave:?} has no region"),
                    "add region = \"us-east-1\"",
                );
                String::new()
            }
        };
        let selector = match (&raw.group, &raw.tag) {
            (Some(g), None) if !g.get_ref().trim().is_empty() => {
                Selector::Group(g.get_ref().trim().to_string())
            }
            (None, Some(t)) => {
                let tag = t.get_ref();
                if tag.key.get_ref().is_empty() {
                    self.error(
                        tag.key.span().start,
                        "the tag's key is empty",
                        "name the tag key, e.g. \"app\"",
                    );
                }
                Selector::Tag {
                    key: tag.key.get_ref().clone(),
                    value: tag.value.get_ref().clone(),
                }
            }
            (Some(_), Some(t)) => {
                self.error(
                    t.span().start,
                    "a target names both a group and a tag",
                    "keep one: group = \"web\" names one group, tag = { key, value } every group carrying it",
                );
                Selector::Group(String::new())
            }
            _ => {
                self.error(
                    start,
                    format!("a target of wave {wave:?} names no group"),
                    "add group = \"web\" or tag = { key = \"app\", value = \"web\" }",
                );
                Selector::Group(String::new())
            }
        };
        let role_arn = raw.role_arn.map(|r| {
            if let Err(m) = check_role_arn(r.get_ref()) {
                self.error(
                    r.span().start,
                    m,
                    "write arn:aws:iam::ACCOUNT_ID:role/NAME, e.g. \"arn:aws:iam::111122223333:role/release\"",
                );
            }
            r.into_inner()
        });
        Target {
            region,
            selector,
            role_arn,
            at,
        }
    }

    fn gates(&mut self, raw: RawGates) -> Gates {
        let mut alarms = Vec::new();
        for a in raw.alarms {
            let at = self.at(a.span().start);
            if a.get_ref().trim().is_empty() || a.get_ref().len() > 255 {
                self.error(
                    a.span().start,
                    "an alarm name must be 1 to 255 characters",
                    "name a CloudWatch alarm as it appears in the console",
                );
            }
            alarms.push((a.into_inner(), at));
        }
        let http = raw.http.map(|h| {
            let start = h.span().start;
            let h = h.into_inner();
            let path = match h.path {
                Some(p) if p.get_ref().starts_with('/') => p.into_inner(),
                Some(p) => {
                    self.error(
                        p.span().start,
                        format!("path {:?} does not start with `/`", p.get_ref()),
                        "write the request path, e.g. \"/healthz\"",
                    );
                    p.into_inner()
                }
                None => {
                    self.error(
                        start,
                        "the http gate has no path",
                        "add path = \"/healthz\"",
                    );
                    "/".into()
                }
            };
            let port = h.port.and_then(|p| match u16::try_from(*p.get_ref()) {
                Ok(v) if v > 0 => Some(v),
                _ => {
                    self.error(
                        p.span().start,
                        format!("port {} is not a TCP port", p.get_ref()),
                        "1 to 65535; leave it out for the target group's port",
                    );
                    None
                }
            });
            let expect_status = match h.expect_status {
                None => 200,
                Some(s) if (100..=599).contains(s.get_ref()) => {
                    u16::try_from(*s.get_ref()).unwrap_or(200)
                }
                Some(s) => {
                    self.error(
                        s.span().start,
                        format!("expect_status = {} is not an HTTP status", s.get_ref()),
                        "an HTTP status is 100 to 599, e.g. 200",
                    );
                    200
                }
            };
            let timeout = self
                .duration(h.timeout.as_ref(), "timeout", HTTP_TIMEOUT_BOUNDS)
                .unwrap_or(HTTP_TIMEOUT);
            HttpGate {
                path,
                port,
                expect_status,
                expect_body: h.expect_body.map(Spanned::into_inner),
                timeout,
            }
        });
        Gates { alarms, http }
    }

    fn rollout(&mut self, raw: RawRollout) -> RolloutSettings {
        let amount = |c: &mut Self, v: Option<Spanned<toml::Value>>, field: &str, least: u32| {
            // A count may be written bare (`max_surge = 1`) or quoted, a percentage quoted.
            let s = v.map(|v| {
                let span = v.span();
                let text = match v.into_inner() {
                    toml::Value::String(s) => s,
                    other => other.to_string(),
                };
                Spanned::new(span, text)
            });
            s.and_then(|s| match s.get_ref().parse::<Amount>() {
                Ok(a) if a.resolve(100) >= least => Some(a),
                Ok(_) => {
                    c.error(
                        s.span().start,
                        format!(
                            "`{field}` = {:?} must be at least {least} instance",
                            s.get_ref()
                        ),
                        "a count (2) or a percentage of the group's desired capacity (\"25%\")",
                    );
                    None
                }
                Err(e) => {
                    c.error(
                        s.span().start,
                        format!("`{field}`: {e}"),
                        "a count (2) or a percentage of the group's desired capacity (\"25%\")",
                    );
                    None
                }
            })
        };
        let max_surge = amount(self, raw.max_surge, "max_surge", 1);
        let max_unavailable = amount(self, raw.max_unavailable, "max_unavailable", 0);
        let canary = raw.canary.and_then(|c| match u32::try_from(*c.get_ref()) {
            Ok(v) if v >= 1 => Some(v),
            _ => {
                self.error(
                    c.span().start,
                    format!("canary = {} must be at least 1", c.get_ref()),
                    "the size of the first batch, as `bakery rollout --canary` (default 1)",
                );
                None
            }
        });
        let hour = Duration::from_secs(3600);
        RolloutSettings {
            max_surge,
            max_unavailable,
            canary,
            canary_bake: self.duration(
                raw.canary_bake.as_ref(),
                "canary_bake",
                (Duration::ZERO, 24 * hour),
            ),
            health_timeout: self.duration(
                raw.health_timeout.as_ref(),
                "health_timeout",
                (Duration::from_secs(10), 24 * hour),
            ),
            warmup: self.duration(raw.warmup.as_ref(), "warmup", (Duration::ZERO, hour)),
        }
    }

    fn duration(
        &mut self,
        s: Option<&S>,
        field: &str,
        (lo, hi): (Duration, Duration),
    ) -> Option<Duration> {
        let s = s?;
        match humantime::parse_duration(s.get_ref().trim()) {
            Ok(d) if d >= lo && d <= hi => Some(d),
            Ok(_) => {
                self.error(
                    s.span().start,
                    format!(
                        "`{field}` = {:?} is out of range: {} to {}",
                        s.get_ref(),
                        humantime::format_duration(lo),
                        humantime::format_duration(hi)
                    ),
                    "write a duration within the range, e.g. \"5m\"",
                );
                None
            }
            Err(e) => {
                self.error(
                    s.span().start,
                    format!("`{field}` = {:?} is not a duration ({e})", s.get_ref()),
                    "write a duration such as \"90s\", \"5m\" or \"1h 30m\"",
                );
                None
            }
        }
    }
}

fn is_ami_id(s: &str) -> bool {
    s.strip_prefix("ami-")
        .is_some_and(|h| (8..=17).contains(&h.len()) && h.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests;
