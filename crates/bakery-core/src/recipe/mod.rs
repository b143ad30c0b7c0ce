//! The recipe: the TOML file that says what to bake. This module owns its format and turns it
//! into a validated [`Recipe`] before any AWS call is made, so every mistake a user can make in
//! the file is reported at once, with the file, line and column and what to write instead.
//!
//! Parsing is two-pass: serde reads a permissive "raw" shape that keeps every value's span, and
//! [`Loader`] checks it field by field and renders the templates (see [`template`]).

pub mod distribute;
pub mod template;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

pub use crate::diag::Diagnostic;
use crate::diag::{locate, render_diagnostics, toml_message, toml_message_in};

type S = Spanned<String>;

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_diagnostics(.0))]
    Invalid(Vec<Diagnostic>),
    #[error("--var {arg:?}: {message}")]
    BadVarArg { arg: String, message: String },
}

// ---------------------------------------------------------------------------------------------
// The validated recipe.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAmi {
    Id(String),
    Filter {
        owners: Vec<String>,
        name: String,
        most_recent: bool,
    },
    SsmParameter(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootVolume {
    pub size_gib: Option<i32>,
    pub volume_type: Option<String>,
    pub encrypted: Option<bool>,
    pub kms_key_id: Option<String>,
    pub device_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    pub instance_type: String,
    pub subnet: Option<String>,
    pub security_groups: Vec<String>,
    pub instance_profile: Option<String>,
    pub associate_public_ip: Option<bool>,
    pub root_volume: Option<RootVolume>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    /// The public IP when the instance has one, else the private IP (Packer's default).
    Auto,
    PublicIp,
    PrivateIp,
    PublicDns,
    PrivateDns,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSpec {
    pub user: String,
    pub port: u16,
    pub interface: Interface,
    pub host: Option<String>,
    pub connect_timeout: Duration,
    /// Who may reach port 22 of the temporary security group. `None`: the caller's address.
    pub allowed_cidr: Option<ipnet::Ipv4Net>,
}

/// Provisioning through SSM Run Command: no key pair, no inbound rule at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsmSpec {
    /// How long to wait for the instance's SSM agent to come online.
    pub agent_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Communicator {
    Ssh(SshSpec),
    Ssm(SsmSpec),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellBody {
    Inline(Vec<String>),
    Script(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellProvisioner {
    pub body: ShellBody,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    pub expect_disconnect: bool,
    pub pause_before: Duration,
    pub retries: u32,
    pub sudo: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProvisioner {
    /// Render the file's text (variables and references) before uploading it.
    pub template: bool,
    pub source: PathBuf,
    pub destination: String,
    pub mode: Option<u32>,
    pub pause_before: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provisioner {
    Shell(ShellProvisioner),
    File(FileProvisioner),
}

impl Provisioner {
    /// A short label for progress lines and events: `shell 1`, `file 2`.
    pub fn label(&self, index: usize) -> String {
        match self {
            Provisioner::Shell(_) => format!("shell {}", index + 1),
            Provisioner::File(_) => format!("file {}", index + 1),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Rendered except for `{{timestamp}}` and `{{build_id}}`, which [`Recipe::image_name`] fills.
    pub name: String,
    pub description: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub snapshot_tags: BTreeMap<String, String>,
    pub no_reboot: bool,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    pub path: PathBuf,
    pub sha256: String,
    /// Every `secret:` / `rds:` reference, resolved once when a bake starts.
    pub references: std::collections::BTreeSet<String>,
    pub variables: BTreeMap<String, String>,
    pub source: SourceAmi,
    pub instance: InstanceSpec,
    pub communicator: Communicator,
    pub provisioners: Vec<Provisioner>,
    pub image: ImageSpec,
    /// `[distribute]`: where the image goes after the bake (`bakery promote`).
    pub distribute: Option<distribute::Distribute>,
}

impl Recipe {
    /// The AMI name for one bake.
    pub fn image_name(&self, timestamp: &str, build_id: &str) -> String {
        let ctx = template::Context {
            vars: &self.variables,
            timestamp: Some(timestamp),
            build_id: Some(build_id),
            refs: template::Refs::Forbidden,
        };
        // The name was checked at load time; only the two bake-time placeholders remain.
        template::render(&self.image.name, &ctx).unwrap_or_else(|_| self.image.name.clone())
    }
}

/// Where variable values come from, lowest precedence first: the recipe's defaults, then
/// `BAKERY_VAR_<name>` environment variables, then `--var-file`s in order, then `--var`s.
#[derive(Debug, Clone, Default)]
pub struct VarSources {
    pub env: BTreeMap<String, String>,
    pub files: Vec<PathBuf>,
    pub args: Vec<String>,
}

impl VarSources {
    /// Collects `BAKERY_VAR_*` from the process environment.
    pub fn from_env(files: Vec<PathBuf>, args: Vec<String>) -> Self {
        let env = std::env::vars()
            .filter_map(|(k, v)| k.strip_prefix("BAKERY_VAR_").map(|n| (n.to_string(), v)))
            .collect();
        Self { env, files, args }
    }
}

/// Search path for shell scripts named by a recipe: the recipe's own folder first, then
/// `BAKERY_PROVISIONER_PATH` (colon-separated), then the scripts that ship with bakery.
pub fn script_search_path(recipe_dir: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![recipe_dir.to_path_buf()];
    if let Ok(extra) = std::env::var("BAKERY_PROVISIONER_PATH") {
        dirs.extend(std::env::split_paths(&extra));
    }
    dirs.push(PathBuf::from("/usr/share/bakery/provisioners"));
    // The repository's own provisioners/, for a bakery run from its source checkout (this
    // crate lives two folders below the repository's root).
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../provisioners"));
    dirs
}

/// Reads, parses and validates a recipe.
pub fn load(path: &Path, vars: &VarSources) -> Result<Recipe, RecipeError> {
    let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text, vars)
}

/// Parses and validates recipe text; `path` names it in errors and anchors relative paths.
pub fn parse(path: &Path, text: &str, vars: &VarSources) -> Result<Recipe, RecipeError> {
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| locate(text, s.start)).unwrap_or((1, 1));
        RecipeError::Invalid(vec![Diagnostic {
            file: path.to_path_buf(),
            line,
            column,
            message: toml_message_in(&e, Some(text)),
            hint: hint_for_parse_error(&toml_message(&e)),
        }])
    })?;
    let mut loader = Loader {
        file: path.to_path_buf(),
        text,
        dir: path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf(),
        diags: Vec::new(),
        vars: BTreeMap::new(),
        references: Default::default(),
        ssm: false,
    };
    loader.resolve_variables(&raw.variables, vars)?;
    let recipe = loader.build(raw);
    if loader.diags.is_empty() {
        Ok(Recipe {
            sha256: hex_sha256(text.as_bytes()),
            ..recipe
        })
    } else {
        Err(RecipeError::Invalid(loader.diags))
    }
}

fn hint_for_parse_error(message: &str) -> Option<String> {
    if message.contains("unknown field") {
        Some(
            "remove the key or fix its spelling; the keys this table accepts are listed above"
                .into(),
        )
    } else if message.contains("missing field") {
        Some("add the field; see the example recipe in the README".into())
    } else if message.contains("invalid type") {
        Some("check the value's type (strings are quoted, lists use [ ... ])".into())
    } else if message.contains("duplicate key") {
        Some("each key may appear once per table; remove or rename one of them".into())
    } else {
        Some(
            "this is a TOML syntax error: check quotes, brackets and `=` around this position"
                .into(),
        )
    }
}

pub(crate) fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The raw shape, as serde reads it.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    variables: BTreeMap<S, Spanned<toml::Value>>,
    source: Spanned<RawSource>,
    instance: Spanned<RawInstance>,
    communicator: Spanned<RawCommunicator>,
    #[serde(default)]
    provisioner: Vec<Spanned<RawProvisioner>>,
    image: Spanned<RawImage>,
    distribute: Option<Spanned<distribute::RawDistribute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    ami: Option<S>,
    filter: Option<Spanned<RawFilter>>,
    ssm_parameter: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    owners: Vec<S>,
    name: S,
    most_recent: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    #[serde(rename = "type")]
    instance_type: S,
    subnet: Option<S>,
    security_groups: Option<Vec<S>>,
    instance_profile: Option<S>,
    associate_public_ip: Option<bool>,
    root_volume: Option<RawRootVolume>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRootVolume {
    size_gib: Option<Spanned<i64>>,
    #[serde(rename = "type")]
    volume_type: Option<S>,
    encrypted: Option<bool>,
    kms_key_id: Option<S>,
    device_name: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommunicator {
    #[serde(rename = "type")]
    kind: S,
    user: Option<S>,
    port: Option<Spanned<i64>>,
    interface: Option<S>,
    host: Option<S>,
    connect_timeout: Option<S>,
    allowed_cidr: Option<S>,
    agent_timeout: Option<S>,
}

/// Every provisioner type's fields in one flat table, so a field that belongs to another type
/// gets a precise error ("`inline` is not a field of a `file` provisioner") with its location.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvisioner {
    #[serde(rename = "type")]
    kind: S,
    inline: Option<Spanned<Vec<S>>>,
    script: Option<S>,
    env: Option<Spanned<BTreeMap<String, S>>>,
    timeout: Option<S>,
    expect_disconnect: Option<Spanned<bool>>,
    pause_before: Option<S>,
    retries: Option<Spanned<i64>>,
    sudo: Option<Spanned<bool>>,
    source: Option<S>,
    destination: Option<S>,
    mode: Option<S>,
    template: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    name: S,
    description: Option<S>,
    tags: Option<BTreeMap<String, S>>,
    snapshot_tags: Option<BTreeMap<String, S>>,
    no_reboot: Option<bool>,
    timeout: Option<S>,
}

// ---------------------------------------------------------------------------------------------
// Validation.

struct Loader<'a> {
    file: PathBuf,
    text: &'a str,
    dir: PathBuf,
    diags: Vec<Diagnostic>,
    vars: BTreeMap<String, String>,
    references: std::collections::BTreeSet<String>,
    /// The communicator is SSM (uploads are limited in size).
    ssm: bool,
}

/// Adds the text of every well-formed `secret:` / `rds:` placeholder in `s` to `into`.
fn collect_references(s: &str, into: &mut std::collections::BTreeSet<String>) {
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        let name = after[..end].trim();
        if template::parse_reference(name).is_ok() {
            into.insert(name.to_string());
        }
        rest = &after[end + 2..];
    }
}

/// Uploads over SSM larger than this are refused (Run Command carries them in chunks).
pub const SSM_MAX_UPLOAD: u64 = 16 * 1024 * 1024;

/// What a file provisioner uploads from its source, in upload order: folders to make and
/// files to send, each with its path relative to the destination (empty: the destination
/// itself, for a source that is one file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upload {
    Folder {
        relative: PathBuf,
    },
    File {
        /// Where to read it: the file itself, or what a link inside the folder points to.
        local: PathBuf,
        relative: PathBuf,
        len: u64,
        /// Its permission bits (`mode` of the provisioner, if any, wins).
        mode: u32,
    },
}

/// The uploads of a file provisioner's source `path` (a file, or a folder walked without
/// following links, entries by name). A symbolic link is refused when it resolves outside the
/// folder named (`/etc/shadow`, or `/` itself): bakery never reads outside what the user
/// named. A link inside the folder is uploaded as the file it points to; a link to a folder
/// inside is not walked (the folder is, where it lies). `validate` and the uploaders both walk
/// with this, so a link made after `validate` is refused at upload as well.
pub fn upload_files(path: &Path) -> Result<Vec<Upload>, String> {
    use std::os::unix::fs::PermissionsExt;
    let root = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let base = if root.is_dir() {
        root.clone()
    } else {
        root.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let mut out = Vec::new();
    // (path on this machine, path under the destination); the source itself follows its link.
    let mut stack = vec![(root, PathBuf::new())];
    while let Some((p, relative)) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        if meta.file_type().is_symlink() {
            let target = p
                .canonicalize()
                .map_err(|e| format!("{} is a broken link: {e}", p.display()))?;
            if !target.starts_with(&base) {
                return Err(format!(
                    "{} is a symbolic link to {}, outside the source folder",
                    p.display(),
                    target.display()
                ));
            }
            let meta =
                std::fs::metadata(&target).map_err(|e| format!("{}: {e}", target.display()))?;
            if meta.is_file() {
                out.push(Upload::File {
                    local: target,
                    relative,
                    len: meta.len(),
                    mode: meta.permissions().mode() & 0o7777,
                });
            }
            continue;
        }
        if meta.is_dir() {
            out.push(Upload::Folder {
                relative: relative.clone(),
            });
            let mut entries: Vec<std::fs::DirEntry> = std::fs::read_dir(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: {e}", p.display()))?;
            // Popped from the end: pushed in reverse for name order.
            entries.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
            for e in entries {
                stack.push((e.path(), relative.join(e.file_name())));
            }
        } else if meta.is_file() {
            out.push(Upload::File {
                local: p,
                relative,
                len: meta.len(),
                mode: meta.permissions().mode() & 0o7777,
            });
        }
    }
    Ok(out)
}

/// The bytes a file provisioner would upload from `path` ([`upload_files`]).
pub fn upload_size(path: &Path) -> Result<u64, String> {
    Ok(upload_files(path)?
        .iter()
        .map(|u| match u {
            Upload::File { len, .. } => *len,
            Upload::Folder { .. } => 0,
        })
        .sum())
}

const DEFAULT_PROVISIONER_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const DEFAULT_IMAGE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);

/// The bounds of every duration a recipe sets, (least, most), documented in the README:
/// `agent_timeout` and `connect_timeout` 1s to 2h, `pause_before` 0s to 1h, a provisioner's
/// `timeout` 1s to 24h, `[image] timeout` 1s to 24h. A bake is bounded by them, and no
/// duration can overflow the clock arithmetic that waits on it.
pub const DURATION_BOUNDS: [(&str, Duration, Duration); 5] = [
    ("agent_timeout", SECOND, Duration::from_secs(2 * 3600)),
    ("connect_timeout", SECOND, Duration::from_secs(2 * 3600)),
    ("pause_before", Duration::ZERO, HOUR),
    ("timeout", SECOND, Duration::from_secs(24 * 3600)),
    ("image timeout", SECOND, Duration::from_secs(24 * 3600)),
];

fn bounds(field: &str) -> (Duration, Duration) {
    DURATION_BOUNDS
        .iter()
        .find(|(f, ..)| *f == field)
        .map(|(_, lo, hi)| (*lo, *hi))
        .unwrap_or((Duration::ZERO, Duration::from_secs(24 * 3600)))
}

impl Loader<'_> {
    fn error(&mut self, at: usize, message: impl Into<String>, hint: impl Into<String>) {
        let (line, column) = locate(self.text, at);
        let hint = hint.into();
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            line,
            column,
            message: message.into(),
            hint: (!hint.is_empty()).then_some(hint),
        });
    }

    fn resolve_variables(
        &mut self,
        decls: &BTreeMap<S, Spanned<toml::Value>>,
        sources: &VarSources,
    ) -> Result<(), RecipeError> {
        let mut required: Vec<(String, usize)> = Vec::new();
        for (name, decl) in decls {
            let at = name.span().start;
            if !is_identifier(name.get_ref()) {
                self.error(
                    at,
                    format!("variable name `{}` is not valid", name.get_ref()),
                    "use letters, digits and `_`, starting with a letter or `_`",
                );
                continue;
            }
            match decl.get_ref() {
                toml::Value::String(s) => {
                    self.vars.insert(name.get_ref().clone(), s.clone());
                }
                toml::Value::Table(t) => {
                    for key in t.keys() {
                        if !matches!(key.as_str(), "default" | "required" | "description") {
                            self.error(
                                decl.span().start,
                                format!("unknown key `{key}` in variable `{}`", name.get_ref()),
                                "a variable table accepts `default`, `required` and `description`",
                            );
                        }
                    }
                    match t.get("default") {
                        Some(toml::Value::String(s)) => {
                            self.vars.insert(name.get_ref().clone(), s.clone());
                        }
                        Some(_) => self.error(
                            decl.span().start,
                            format!(
                                "the default of variable `{}` must be a string",
                                name.get_ref()
                            ),
                            "quote it, e.g. `default = \"8\"`",
                        ),
                        None => {
                            if t.get("required").and_then(|v| v.as_bool()) == Some(true) {
                                required.push((name.get_ref().clone(), at));
                            } else {
                                self.vars.insert(name.get_ref().clone(), String::new());
                            }
                        }
                    }
                }
                other => self.error(
                    decl.span().start,
                    format!(
                        "variable `{}` must be a string default or a table, not a {}",
                        name.get_ref(),
                        other.type_str()
                    ),
                    "write `name = \"default\"` or `name = { required = true }`",
                ),
            }
        }
        let declared: Vec<String> = decls.keys().map(|k| k.get_ref().clone()).collect();
        for (k, v) in &sources.env {
            if declared.contains(k) {
                self.vars.insert(k.clone(), v.clone());
            }
        }
        for file in &sources.files {
            self.read_var_file(file, &declared)?;
        }
        for arg in &sources.args {
            let Some((k, v)) = arg.split_once('=') else {
                return Err(RecipeError::BadVarArg {
                    arg: arg.clone(),
                    message: "expected NAME=VALUE".into(),
                });
            };
            if !declared.iter().any(|d| d == k) {
                return Err(RecipeError::BadVarArg {
                    arg: arg.clone(),
                    message: format!(
                        "variable `{k}` is not declared in {}; declared: {}",
                        self.file.display(),
                        list_or_none(&declared)
                    ),
                });
            }
            self.vars.insert(k.to_string(), v.to_string());
        }
        for (name, at) in required {
            if !self.vars.contains_key(&name) {
                // Keep the placeholder so later checks see an unresolved value, not a new error.
                self.vars
                    .insert(name.clone(), format!("{{{{var.{name}}}}}"));
                self.error(
                    at,
                    format!("variable `{name}` is required and has no value"),
                    format!("pass --var {name}=VALUE, a --var-file, or set BAKERY_VAR_{name}"),
                );
            }
        }
        Ok(())
    }

    fn read_var_file(&mut self, file: &Path, declared: &[String]) -> Result<(), RecipeError> {
        let text = std::fs::read_to_string(file).map_err(|source| RecipeError::Read {
            path: file.to_path_buf(),
            source,
        })?;
        let table: BTreeMap<S, Spanned<toml::Value>> = match toml::from_str(&text) {
            Ok(t) => t,
            Err(e) => {
                let (line, column) = e.span().map(|s| locate(&text, s.start)).unwrap_or((1, 1));
                self.diags.push(Diagnostic {
                    file: file.to_path_buf(),
                    line,
                    column,
                    message: toml_message_in(&e, Some(&text)),
                    hint: Some("a variable file holds `name = \"value\"` lines".into()),
                });
                return Ok(());
            }
        };
        for (k, v) in table {
            let (line, column) = locate(&text, k.span().start);
            let mut diag = |message: String, hint: String| {
                self.diags.push(Diagnostic {
                    file: file.to_path_buf(),
                    line,
                    column,
                    message,
                    hint: Some(hint),
                })
            };
            if !declared.contains(k.get_ref()) {
                diag(
                    format!("variable `{}` is not declared in the recipe", k.get_ref()),
                    format!("declared: {}", list_or_none(declared)),
                );
                continue;
            }
            let value = match v.into_inner() {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    diag(
                        format!(
                            "variable `{}` must be a string, not a {}",
                            k.get_ref(),
                            other.type_str()
                        ),
                        "quote the value".into(),
                    );
                    continue;
                }
            };
            self.vars.insert(k.into_inner(), value);
        }
        Ok(())
    }

    /// Renders a templated string; on error records a diagnostic and returns the raw text.
    fn render(&mut self, s: &S) -> String {
        self.render_with(s, false)
    }

    /// Checks a string where `secret:` / `rds:` references are allowed (provisioner env values),
    /// collecting them for resolution at bake time, and keeps it as written: the bake renders it
    /// once, variables and references together, so a variable's value is data and is never
    /// rendered again (a `--var` value `{{secret:…}}` stays that text).
    fn render_env(&mut self, s: &S) -> String {
        self.render_with(s, true);
        s.get_ref().clone()
    }

    fn render_with(&mut self, s: &S, refs: bool) -> String {
        if refs {
            collect_references(s.get_ref(), &mut self.references);
        }
        let ctx = template::Context {
            vars: &self.vars,
            timestamp: None,
            build_id: None,
            refs: if refs {
                template::Refs::Unresolved
            } else {
                template::Refs::Forbidden
            },
        };
        match template::render(s.get_ref(), &ctx) {
            Ok(v) => v,
            Err(e) => {
                // +1 for the opening quote of a basic string.
                self.error(s.span().start + 1 + e.offset, e.message, e.hint);
                s.get_ref().clone()
            }
        }
    }

    fn duration(&mut self, s: &Option<S>, field: &str, default: Duration) -> Duration {
        let Some(s) = s else { return default };
        let text = self.render(s);
        let (lo, hi) = bounds(field);
        let name = field.rsplit(' ').next().unwrap_or(field);
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d >= lo && d <= hi => d,
            Ok(_) => {
                self.error(
                    s.span().start,
                    format!(
                        "`{name}` = {text:?} is out of range: {} to {}",
                        humantime::format_duration(lo),
                        humantime::format_duration(hi)
                    ),
                    "write a duration within the range, e.g. \"5m\"",
                );
                default
            }
            Err(e) => {
                self.error(
                    s.span().start,
                    format!("`{name}` = {text:?} is not a duration ({e})"),
                    "write a duration such as \"90s\", \"5m\" or \"1h 30m\"",
                );
                default
            }
        }
    }

    fn tags(&mut self, tags: &Option<BTreeMap<String, S>>, at: usize) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (k, v) in tags.iter().flatten() {
            if k.is_empty() || k.len() > 128 || k.starts_with("aws:") {
                self.error(
                    v.span().start,
                    format!("tag key `{k}` is not allowed"),
                    "tag keys are 1 to 128 characters and may not start with `aws:`",
                );
            }
            if k.starts_with("bakery:") {
                self.error(
                    v.span().start,
                    format!("tag key `{k}` is reserved for bakery's own tags"),
                    "choose a key without the `bakery:` prefix",
                );
            }
            let value = self.render(v);
            out.insert(k.clone(), value);
        }
        let _ = at;
        out
    }

    fn build(&mut self, raw: Raw) -> Recipe {
        let source = self.source(&raw.source);
        let instance = self.instance(raw.instance.get_ref());
        let communicator =
            self.communicator(&raw.communicator, instance.instance_profile.is_some());
        self.ssm = matches!(communicator, Communicator::Ssm(_));
        let provisioners = raw
            .provisioner
            .iter()
            .filter_map(|p| self.provisioner(p))
            .collect();
        let image = self.image(raw.image.get_ref());
        let distribute = raw.distribute.as_ref().map(|d| self.distribute(d));
        Recipe {
            path: self.file.clone(),
            sha256: String::new(),
            references: self.references.clone(),
            variables: self.vars.clone(),
            source,
            instance,
            communicator,
            provisioners,
            image,
            distribute,
        }
    }

    fn source(&mut self, raw: &Spanned<RawSource>) -> SourceAmi {
        let r = raw.get_ref();
        let given = [
            r.ami.is_some(),
            r.filter.is_some(),
            r.ssm_parameter.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            self.error(
                raw.span().start,
                format!("[source] names {given} ways to find the base AMI; it needs exactly one"),
                "set one of `ami = \"ami-...\"`, `[source.filter]` (owners, name) or \
                 `ssm_parameter = \"/aws/service/...\"`",
            );
        }
        if let Some(ami) = &r.ami {
            let id = self.render(ami);
            if !is_resource_id(&id, "ami") {
                self.error(
                    ami.span().start,
                    format!("`ami` = {id:?} is not an AMI id"),
                    "an AMI id looks like \"ami-0abcdef1234567890\"",
                );
            }
            return SourceAmi::Id(id);
        }
        if let Some(f) = &r.filter {
            let fr = f.get_ref();
            if fr.owners.is_empty() {
                self.error(
                    f.span().start,
                    "[source.filter] needs at least one owner",
                    "e.g. owners = [\"amazon\"] or an account id; without owners anyone's AMI could match",
                );
            }
            let owners = fr.owners.iter().map(|o| self.render(o)).collect();
            let name = self.render(&fr.name);
            if name.trim().is_empty() {
                self.error(
                    fr.name.span().start,
                    "`name` pattern is empty",
                    "e.g. name = \"al2023-ami-2023.*-x86_64\"",
                );
            }
            return SourceAmi::Filter {
                owners,
                name,
                most_recent: fr.most_recent.unwrap_or(true),
            };
        }
        if let Some(p) = &r.ssm_parameter {
            let path = self.render(p);
            if path.trim().is_empty() {
                self.error(
                    p.span().start,
                    "`ssm_parameter` is empty",
                    "name the parameter that holds the AMI id",
                );
            }
            return SourceAmi::SsmParameter(path);
        }
        SourceAmi::Id(String::new())
    }

    fn instance(&mut self, r: &RawInstance) -> InstanceSpec {
        let instance_type = self.render(&r.instance_type);
        if !unresolved(&instance_type)
            && (!instance_type.contains('.') || instance_type.contains(char::is_whitespace))
        {
            self.error(
                r.instance_type.span().start,
                format!("`type` = {instance_type:?} is not an instance type"),
                "e.g. \"t3.micro\"",
            );
        }
        let subnet = r.subnet.as_ref().map(|s| {
            let v = self.render(s);
            if !is_resource_id(&v, "subnet") {
                self.error(
                    s.span().start,
                    format!("`subnet` = {v:?} is not a subnet id"),
                    "a subnet id looks like \"subnet-0abc1234\"; pass it with --var if it varies",
                );
            }
            v
        });
        let mut security_groups = Vec::new();
        for sg in r.security_groups.iter().flatten() {
            let v = self.render(sg);
            if !is_resource_id(&v, "sg") {
                self.error(
                    sg.span().start,
                    format!("{v:?} is not a security group id"),
                    "a security group id looks like \"sg-0abc1234\"",
                );
            }
            security_groups.push(v);
        }
        let instance_profile = r.instance_profile.as_ref().map(|p| self.render(p));
        let root_volume = r.root_volume.as_ref().map(|v| {
            let size_gib = v.size_gib.as_ref().and_then(|s| {
                let n = *s.get_ref();
                if !(1..=16384).contains(&n) {
                    self.error(
                        s.span().start,
                        format!("`size_gib` = {n} is out of range"),
                        "use 1 to 16384",
                    );
                    None
                } else {
                    Some(n as i32)
                }
            });
            let volume_type = v.volume_type.as_ref().map(|t| {
                let value = self.render(t);
                const TYPES: [&str; 7] = ["gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"];
                if !TYPES.contains(&value.as_str()) {
                    self.error(
                        t.span().start,
                        format!("volume `type` = {value:?} is not an EBS volume type"),
                        format!("use one of {}", TYPES.join(", ")),
                    );
                }
                value
            });
            RootVolume {
                size_gib,
                volume_type,
                encrypted: v.encrypted,
                kms_key_id: v.kms_key_id.as_ref().map(|k| self.render(k)),
                device_name: v.device_name.as_ref().map(|d| self.render(d)),
            }
        });
        InstanceSpec {
            instance_type,
            subnet,
            security_groups,
            instance_profile,
            associate_public_ip: r.associate_public_ip,
            root_volume,
        }
    }

    fn communicator(&mut self, raw: &Spanned<RawCommunicator>, has_profile: bool) -> Communicator {
        let r = raw.get_ref();
        let kind = self.render(&r.kind);
        if kind == "ssm" {
            for (name, at) in [
                ("user", r.user.as_ref().map(|v| v.span().start)),
                ("port", r.port.as_ref().map(|v| v.span().start)),
                ("interface", r.interface.as_ref().map(|v| v.span().start)),
                ("host", r.host.as_ref().map(|v| v.span().start)),
                (
                    "connect_timeout",
                    r.connect_timeout.as_ref().map(|v| v.span().start),
                ),
                (
                    "allowed_cidr",
                    r.allowed_cidr.as_ref().map(|v| v.span().start),
                ),
            ] {
                if let Some(at) = at {
                    self.error(
                        at,
                        format!("`{name}` is an SSH setting; the ssm communicator does not use it"),
                        "remove it (SSM needs no login, address or inbound rule)",
                    );
                }
            }
            if !has_profile {
                self.error(
                    r.kind.span().start,
                    "the ssm communicator needs [instance] instance_profile",
                    "name an instance profile whose role allows SSM (e.g. the AmazonSSMManagedInstanceCore policy): the agent cannot register without it",
                );
            }
            let agent_timeout =
                self.duration(&r.agent_timeout, "agent_timeout", DEFAULT_CONNECT_TIMEOUT);
            return Communicator::Ssm(SsmSpec { agent_timeout });
        }
        if let Some(a) = &r.agent_timeout {
            self.error(
                a.span().start,
                "`agent_timeout` is an SSM setting",
                "use connect_timeout for SSH, or set type = \"ssm\"",
            );
        }
        if kind != "ssh" {
            self.error(
                r.kind.span().start,
                format!("communicator `type` = {kind:?} is not supported"),
                "use \"ssh\" or \"ssm\"",
            );
        }
        let user = match &r.user {
            Some(u) => self.render(u),
            None => {
                self.error(
                    raw.span().start,
                    "[communicator] needs `user`",
                    "the login user of the base image, e.g. user = \"ec2-user\" (Amazon Linux) or \"ubuntu\"",
                );
                String::new()
            }
        };
        let port = match &r.port {
            Some(p) => match u16::try_from(*p.get_ref()) {
                Ok(v) if v > 0 => v,
                _ => {
                    self.error(
                        p.span().start,
                        format!("`port` = {} is not a TCP port", p.get_ref()),
                        "use 1 to 65535",
                    );
                    22
                }
            },
            None => 22,
        };
        let interface = match &r.interface {
            None => Interface::Auto,
            Some(i) => match self.render(i).as_str() {
                "public_ip" => Interface::PublicIp,
                "private_ip" => Interface::PrivateIp,
                "public_dns" => Interface::PublicDns,
                "private_dns" => Interface::PrivateDns,
                other => {
                    self.error(
                        i.span().start,
                        format!("`interface` = {other:?} is not an interface"),
                        "use \"public_ip\", \"private_ip\", \"public_dns\" or \"private_dns\"",
                    );
                    Interface::Auto
                }
            },
        };
        let host = r.host.as_ref().map(|h| self.render(h));
        let connect_timeout = self.duration(
            &r.connect_timeout,
            "connect_timeout",
            DEFAULT_CONNECT_TIMEOUT,
        );
        let allowed_cidr = r.allowed_cidr.as_ref().and_then(|c| {
            let text = self.render(c);
            let parsed = text
                .parse::<ipnet::Ipv4Net>()
                .or_else(|_| text.parse::<std::net::Ipv4Addr>().map(ipnet::Ipv4Net::from));
            match parsed {
                Ok(net) => Some(net.trunc()),
                Err(_) => {
                    self.error(
                        c.span().start,
                        format!("`allowed_cidr` = {text:?} is not an IPv4 CIDR"),
                        "e.g. \"203.0.113.7/32\"; leave it out to admit only your own address",
                    );
                    None
                }
            }
        });
        Communicator::Ssh(SshSpec {
            user,
            port,
            interface,
            host,
            connect_timeout,
            allowed_cidr,
        })
    }

    fn provisioner(&mut self, raw: &Spanned<RawProvisioner>) -> Option<Provisioner> {
        let r = raw.get_ref();
        let kind = self.render(&r.kind);
        let pause_before = self.duration(&r.pause_before, "pause_before", Duration::ZERO);
        match kind.as_str() {
            "shell" => {
                self.reject_fields(
                    &kind,
                    &[
                        ("source", r.source.as_ref().map(|s| s.span().start)),
                        (
                            "destination",
                            r.destination.as_ref().map(|s| s.span().start),
                        ),
                        ("mode", r.mode.as_ref().map(|s| s.span().start)),
                        ("template", r.template.as_ref().map(|s| s.span().start)),
                    ],
                );
                let body = match (&r.inline, &r.script) {
                    (Some(lines), None) => {
                        let lines: Vec<String> =
                            lines.get_ref().iter().map(|l| self.render(l)).collect();
                        if lines.is_empty() {
                            self.error(
                                raw.span().start,
                                "`inline` is empty",
                                "give at least one command, or remove the provisioner",
                            );
                        }
                        ShellBody::Inline(lines)
                    }
                    (None, Some(script)) => {
                        let name = self.render(script);
                        ShellBody::Script(self.find_script(&name, script.span().start))
                    }
                    _ => {
                        self.error(
                            raw.span().start,
                            "a shell provisioner needs exactly one of `inline` and `script`",
                            "inline = [\"command\", ...] or script = \"path/to/script.sh\"",
                        );
                        ShellBody::Inline(Vec::new())
                    }
                };
                let mut env = BTreeMap::new();
                if let Some(e) = &r.env {
                    for (k, v) in e.get_ref() {
                        if !is_identifier(k) {
                            self.error(
                                v.span().start,
                                format!("environment variable name `{k}` is not valid"),
                                "use letters, digits and `_`, starting with a letter or `_`",
                            );
                        }
                        let value = self.render_env(v);
                        env.insert(k.clone(), value);
                    }
                }
                let timeout = self.duration(&r.timeout, "timeout", DEFAULT_PROVISIONER_TIMEOUT);
                let retries = match &r.retries {
                    Some(n) if !(0..=100).contains(n.get_ref()) => {
                        self.error(
                            n.span().start,
                            format!("`retries` = {} is out of range", n.get_ref()),
                            "use 0 to 100",
                        );
                        0
                    }
                    Some(n) => *n.get_ref() as u32,
                    None => 0,
                };
                Some(Provisioner::Shell(ShellProvisioner {
                    body,
                    env,
                    timeout,
                    expect_disconnect: r
                        .expect_disconnect
                        .as_ref()
                        .map(|b| *b.get_ref())
                        .unwrap_or(false),
                    pause_before,
                    retries,
                    sudo: r.sudo.as_ref().map(|b| *b.get_ref()).unwrap_or(false),
                }))
            }
            "file" => {
                self.reject_fields(
                    &kind,
                    &[
                        ("inline", r.inline.as_ref().map(|s| s.span().start)),
                        ("script", r.script.as_ref().map(|s| s.span().start)),
                        ("env", r.env.as_ref().map(|s| s.span().start)),
                        ("timeout", r.timeout.as_ref().map(|s| s.span().start)),
                        (
                            "expect_disconnect",
                            r.expect_disconnect.as_ref().map(|s| s.span().start),
                        ),
                        ("retries", r.retries.as_ref().map(|s| s.span().start)),
                        ("sudo", r.sudo.as_ref().map(|s| s.span().start)),
                    ],
                );
                let source = match &r.source {
                    Some(s) => {
                        let rel = self.render(s);
                        let path = self.dir.join(&rel);
                        if !path.exists() {
                            self.error(
                                s.span().start,
                                format!(
                                    "`source` {rel:?} does not exist (looked for {})",
                                    path.display()
                                ),
                                "paths are relative to the recipe's folder",
                            );
                        } else {
                            match upload_size(&path) {
                                Err(why) => self.error(
                                    s.span().start,
                                    format!("`source` {rel:?}: {why}"),
                                    "bakery uploads only what you name: replace the link by the file, or name the target itself",
                                ),
                                Ok(size) if self.ssm && size > SSM_MAX_UPLOAD => self.error(
                                    s.span().start,
                                    format!("`source` {rel:?} is {size} bytes; over SSM bakery uploads at most {SSM_MAX_UPLOAD} bytes"),
                                    "put large payloads in S3 and fetch them in a shell provisioner, or use the ssh communicator",
                                ),
                                Ok(_) => {}
                            }
                        }
                        path
                    }
                    None => {
                        self.error(
                            raw.span().start,
                            "a file provisioner needs `source`",
                            "source = \"files/app.conf\"",
                        );
                        PathBuf::new()
                    }
                };
                let destination = match &r.destination {
                    Some(d) => {
                        let v = self.render(d);
                        if !v.starts_with('/') {
                            self.error(
                                d.span().start,
                                format!("`destination` {v:?} is not an absolute path"),
                                "e.g. destination = \"/opt/app/app.conf\"",
                            );
                        }
                        v
                    }
                    None => {
                        self.error(
                            raw.span().start,
                            "a file provisioner needs `destination`",
                            "destination = \"/opt/app/app.conf\"",
                        );
                        String::new()
                    }
                };
                let mode = r.mode.as_ref().and_then(|m| {
                    let text = self.render(m);
                    match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
                        Ok(v) if v <= 0o7777 => Some(v),
                        _ => {
                            self.error(
                                m.span().start,
                                format!("`mode` = {text:?} is not an octal file mode"),
                                "e.g. mode = \"0644\"",
                            );
                            None
                        }
                    }
                });
                let template = r.template.as_ref().map(|t| *t.get_ref()).unwrap_or(false);
                if template {
                    match std::fs::read_to_string(&source) {
                        Ok(text) => {
                            // Check the placeholders now; they are filled in when the bake runs.
                            let at = r.source.as_ref().map(|s| s.span().start).unwrap_or(raw.span().start);
                            collect_references(&text, &mut self.references);
                            let ctx = template::Context {
                                vars: &self.vars,
                                timestamp: None,
                                build_id: None,
                                refs: template::Refs::Unresolved,
                            };
                            if let Err(e) = template::render(&text, &ctx) {
                                self.error(at, format!("template {}: {}", source.display(), e.message), e.hint);
                            }
                        }
                        Err(e) if source.exists() => self.error(
                            raw.span().start,
                            format!("template {} is not readable text: {e}", source.display()),
                            "a template must be a UTF-8 text file (set template = false to upload it as it is)",
                        ),
                        Err(_) => {}
                    }
                }
                Some(Provisioner::File(FileProvisioner {
                    template,
                    source,
                    destination,
                    mode,
                    pause_before,
                }))
            }
            other => {
                self.error(
                    r.kind.span().start,
                    format!("provisioner `type` = {other:?} is not supported"),
                    "use \"shell\" or \"file\"",
                );
                None
            }
        }
    }

    fn reject_fields(&mut self, kind: &str, fields: &[(&str, Option<usize>)]) {
        for (name, at) in fields {
            if let Some(at) = at {
                self.error(
                    *at,
                    format!("`{name}` is not a field of a `{kind}` provisioner"),
                    "remove it, or change the provisioner's `type`",
                );
            }
        }
    }

    fn find_script(&mut self, name: &str, at: usize) -> PathBuf {
        let candidate = Path::new(name);
        if candidate.is_absolute() {
            if candidate.is_file() {
                return candidate.to_path_buf();
            }
        } else {
            for dir in script_search_path(&self.dir) {
                let p = dir.join(candidate);
                if p.is_file() {
                    return p;
                }
            }
        }
        let searched: Vec<String> = if candidate.is_absolute() {
            vec![name.to_string()]
        } else {
            script_search_path(&self.dir)
                .iter()
                .map(|d| d.display().to_string())
                .collect()
        };
        self.error(
            at,
            format!("script {name:?} not found (searched {})", searched.join(", ")),
            "give a path relative to the recipe's folder, or the name of a script in bakery's provisioners/",
        );
        candidate.to_path_buf()
    }

    fn image(&mut self, r: &RawImage) -> ImageSpec {
        let name = self.render(&r.name);
        // Check the AMI naming rule with sample values for the bake-time placeholders.
        let sample = name
            .replace("{{timestamp}}", "20260101T000000Z")
            .replace("{{build_id}}", "b0123456789a");
        if !unresolved(&sample) && !valid_ami_name(&sample) {
            self.error(
                r.name.span().start,
                format!("image `name` {name:?} is not a valid AMI name"),
                "AMI names are 3 to 128 characters of letters, digits, spaces and ( ) [ ] . / - ' @ _",
            );
        }
        let description = r.description.as_ref().map(|d| self.render(d));
        let tags = self.tags(&r.tags, r.name.span().start);
        let snapshot_tags = self.tags(&r.snapshot_tags, r.name.span().start);
        let timeout = self.duration(&r.timeout, "image timeout", DEFAULT_IMAGE_TIMEOUT);
        ImageSpec {
            name,
            description,
            tags,
            snapshot_tags,
            no_reboot: r.no_reboot.unwrap_or(false),
            timeout,
        }
    }
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// True for a value that still holds a placeholder of a variable without a value (already
/// reported), so its format is not checked twice.
fn unresolved(s: &str) -> bool {
    s.contains("{{var.")
}

fn is_resource_id(s: &str, prefix: &str) -> bool {
    unresolved(s)
        || s.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_alphanumeric()))
}

fn valid_ami_name(s: &str) -> bool {
    (3..=128).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || " ()[]./-'@_".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[variables]
subnet = { required = true }
env = "dev"

[source]
ami = "ami-0123456789abcdef0"

[instance]
type = "t3.micro"
subnet = "{{var.subnet}}"

[communicator]
type = "ssh"
user = "ec2-user"
interface = "private_ip"

[[provisioner]]
type = "shell"
inline = ["echo {{var.env}}"]
timeout = "2m"

[image]
name = "web-{{var.env}}-{{timestamp}}"
tags = { Role = "web" }
"#;

    fn parse_str(text: &str, args: &[&str]) -> Result<Recipe, RecipeError> {
        let vars = VarSources {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        parse(Path::new("r.toml"), text, &vars)
    }

    fn diags(text: &str) -> Vec<Diagnostic> {
        match parse_str(text, &["subnet=subnet-1"]) {
            Err(RecipeError::Invalid(d)) => d,
            other => panic!("expected diagnostics, got {other:?}"),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bakery-core-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_file_source_may_not_link_outside_itself() {
        // Issue #10 A6: `lnk/shadow -> /etc/shadow` baked the controller's own file.
        let d = scratch("links");
        std::fs::create_dir_all(d.join("lnk")).unwrap();
        std::fs::write(d.join("lnk/ok.txt"), "hello").unwrap();
        std::os::unix::fs::symlink("ok.txt", d.join("lnk/inside")).unwrap();
        assert_eq!(
            upload_size(&d.join("lnk")).unwrap(),
            10,
            "a link inside counts as its file"
        );
        std::os::unix::fs::symlink("/etc/shadow", d.join("lnk/shadow")).unwrap();
        let e = upload_size(&d.join("lnk")).unwrap_err();
        assert!(
            e.contains("is a symbolic link to /etc/shadow, outside the source folder"),
            "{e}"
        );
        std::fs::remove_file(d.join("lnk/shadow")).unwrap();
        std::os::unix::fs::symlink("/", d.join("lnk/root")).unwrap();
        assert!(
            upload_size(&d.join("lnk")).is_err(),
            "a link to / is refused, not walked"
        );

        let text = GOOD.replace(
            "[image]",
            "[[provisioner]]\ntype = \"file\"\nsource = \"lnk\"\ndestination = \"/opt/x\"\n\n[image]",
        );
        let path = d.join("r.toml");
        let vars = VarSources {
            args: vec!["subnet=subnet-1".into()],
            ..Default::default()
        };
        match parse(&path, &text, &vars) {
            Err(RecipeError::Invalid(diags)) => {
                assert!(
                    diags[0].message.contains("outside the source folder"),
                    "{diags:#?}"
                );
                assert!(diags[0].line > 1);
            }
            other => panic!("expected a located error, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_uploads_of_a_folder_come_in_name_order_with_links_inside_as_their_files() {
        let d = scratch("uploads");
        std::fs::create_dir_all(d.join("src/b/empty")).unwrap();
        std::fs::write(d.join("src/a.txt"), "aa").unwrap();
        std::fs::write(d.join("src/b/c.txt"), "ccc").unwrap();
        std::os::unix::fs::symlink("b/c.txt", d.join("src/link")).unwrap();
        std::os::unix::fs::symlink("b", d.join("src/to-folder")).unwrap();
        let src = d.join("src").canonicalize().unwrap();
        let got: Vec<(String, String)> = upload_files(&d.join("src"))
            .unwrap()
            .into_iter()
            .map(|u| match u {
                Upload::Folder { relative } => ("dir".into(), relative.display().to_string()),
                Upload::File {
                    local, relative, ..
                } => (
                    local.strip_prefix(&src).unwrap().display().to_string(),
                    relative.display().to_string(),
                ),
            })
            .collect();
        let want = [
            ("dir", ""),
            ("a.txt", "a.txt"),
            ("dir", "b"),
            ("b/c.txt", "b/c.txt"),
            ("dir", "b/empty"),
            ("b/c.txt", "link"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(l, r)| (l.to_string(), r.to_string()))
            .collect();
        assert_eq!(got, want, "the link to a folder is not walked");
        // A source that is one file: its one upload is the destination itself.
        assert_eq!(
            upload_files(&d.join("src/a.txt")).unwrap(),
            vec![Upload::File {
                local: src.join("a.txt"),
                relative: PathBuf::new(),
                len: 2,
                mode: {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::metadata(src.join("a.txt"))
                        .unwrap()
                        .permissions()
                        .mode()
                        & 0o7777
                },
            }]
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_upload_too_large_for_ssm_is_a_validation_error() {
        // Issue #10 A19: it passed validate and failed after launch.
        let d = scratch("ssm-size");
        let f = std::fs::File::create(d.join("big.bin")).unwrap();
        f.set_len(SSM_MAX_UPLOAD + 1).unwrap();
        let text = GOOD
            .replace(
                "type = \"ssh\"\nuser = \"ec2-user\"\ninterface = \"private_ip\"",
                "type = \"ssm\"",
            )
            .replace("type = \"t3.micro\"", "type = \"t3.micro\"\ninstance_profile = \"p\"")
            .replace(
                "[image]",
                "[[provisioner]]\ntype = \"file\"\nsource = \"big.bin\"\ndestination = \"/opt/x\"\n\n[image]",
            );
        let vars = VarSources {
            args: vec!["subnet=subnet-1".into()],
            ..Default::default()
        };
        match parse(&d.join("r.toml"), &text, &vars) {
            Err(RecipeError::Invalid(diags)) => {
                assert_eq!(diags.len(), 1, "{diags:#?}");
                assert!(
                    diags[0].message.contains("over SSM bakery uploads at most"),
                    "{diags:#?}"
                );
            }
            other => panic!("expected a located error, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_variable_value_is_data_and_is_rendered_once() {
        // Issue #10 A12: a --var value `{{secret:…}}` became the secret inside `env`.
        let text = GOOD
            .replace("env = \"dev\"", "env = \"dev\"\nv = \"\"")
            .replace(
                "inline = [\"echo {{var.env}}\"]",
                "inline = [\"echo {{var.env}}\"]\nenv = { E = \"x{{var.v}}y\" }",
            );
        let r = parse_str(&text, &["subnet=subnet-1", "v={{secret:adv/s}}"]).unwrap();
        assert!(r.references.is_empty(), "{:?}", r.references);
        let Provisioner::Shell(p) = &r.provisioners[0] else {
            panic!("a shell provisioner")
        };
        let resolved = BTreeMap::from([("secret:adv/s".to_string(), "SECRET".to_string())]);
        let ctx = template::Context {
            vars: &r.variables,
            timestamp: None,
            build_id: Some("b-1"),
            refs: template::Refs::Resolved(&resolved),
        };
        assert_eq!(
            template::render(&p.env["E"], &ctx).unwrap(),
            "x{{secret:adv/s}}y"
        );
    }

    #[test]
    fn durations_beyond_their_bounds_are_located_errors() {
        // Issue #10 A1: "300000000000y" passed validate, then a bake panicked and leaked.
        let text = GOOD
            .replace(
                "interface = \"private_ip\"",
                "interface = \"private_ip\"\nconnect_timeout = \"300000000000y\"",
            )
            .replace(
                "tags = { Role = \"web\" }",
                "tags = { Role = \"web\" }\ntimeout = \"300000000000y\"",
            )
            .replace("timeout = \"2m\"", "timeout = \"25h\"");
        let d = diags(&text);
        let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(d.len(), 3, "{msgs:#?}");
        assert!(
            msgs.iter()
                .any(|m| m
                    .contains("`connect_timeout` = \"300000000000y\" is out of range: 1s to 2h")),
            "{msgs:#?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("`timeout` = \"25h\" is out of range: 1s to 1day")),
            "{msgs:#?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("`timeout` = \"300000000000y\"")),
            "{msgs:#?}"
        );
        // Zero is no timeout at all.
        let d = diags(&GOOD.replace("timeout = \"2m\"", "timeout = \"0s\""));
        assert!(d[0].message.contains("out of range"), "{d:#?}");
    }

    #[test]
    fn a_good_recipe_loads_with_variables_rendered() {
        let r = parse_str(GOOD, &["subnet=subnet-0abc"]).unwrap();
        assert_eq!(r.instance.subnet.as_deref(), Some("subnet-0abc"));
        assert_eq!(r.source, SourceAmi::Id("ami-0123456789abcdef0".into()));
        let Provisioner::Shell(s) = &r.provisioners[0] else {
            panic!()
        };
        assert_eq!(s.body, ShellBody::Inline(vec!["echo dev".into()]));
        assert_eq!(s.timeout, Duration::from_secs(120));
        assert_eq!(r.image_name("T1", "b1"), "web-dev-T1");
        assert_eq!(r.sha256.len(), 64);
    }

    #[test]
    fn var_precedence_is_default_env_file_arg() {
        let dir = std::env::temp_dir().join(format!("bakery-vars-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vars.toml");
        std::fs::write(&file, "env = \"from-file\"\n").unwrap();
        let mut sources = VarSources {
            env: BTreeMap::from([
                ("env".into(), "from-env".into()),
                ("subnet".into(), "subnet-9".into()),
            ]),
            ..Default::default()
        };
        let r = parse(Path::new("r.toml"), GOOD, &sources).unwrap();
        assert_eq!(r.variables["env"], "from-env");
        sources.files.push(file.clone());
        let r = parse(Path::new("r.toml"), GOOD, &sources).unwrap();
        assert_eq!(r.variables["env"], "from-file");
        sources.args.push("env=from-arg".into());
        let r = parse(Path::new("r.toml"), GOOD, &sources).unwrap();
        assert_eq!(r.variables["env"], "from-arg");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_required_variable_names_the_ways_to_set_it() {
        let Err(RecipeError::Invalid(d)) = parse_str(GOOD, &[]) else {
            panic!()
        };
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!((d[0].line, d[0].column), (3, 1));
        assert!(d[0].message.contains("`subnet` is required"));
        assert!(d[0].hint.as_ref().unwrap().contains("BAKERY_VAR_subnet"));
    }

    #[test]
    fn an_undeclared_var_arg_is_refused() {
        let err = parse_str(GOOD, &["subnet=subnet-1", "colour=red"]).unwrap_err();
        assert!(
            err.to_string().contains("`colour` is not declared"),
            "{err}"
        );
        let err = parse_str(GOOD, &["subnet"]).unwrap_err();
        assert!(err.to_string().contains("NAME=VALUE"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors_with_line_and_column() {
        let text = GOOD.replace(
            "type = \"t3.micro\"",
            "type = \"t3.micro\"\nsubnet_id = \"x\"",
        );
        let d = diags(&text);
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].line, d[0].column), (11, 1));
        assert!(
            d[0].message.contains("unknown field `subnet_id`"),
            "{}",
            d[0].message
        );
        assert!(d[0].to_string().starts_with("r.toml:11:1: "));
    }

    #[test]
    fn a_field_of_another_provisioner_type_is_named() {
        let text = GOOD.replace("timeout = \"2m\"", "timeout = \"2m\"\ndestination = \"/x\"");
        let d = diags(&text);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0]
            .message
            .contains("`destination` is not a field of a `shell` provisioner"));
        assert_eq!(d[0].line, 22);
    }

    #[test]
    fn several_errors_are_reported_together() {
        let text = GOOD
            .replace("ami-0123456789abcdef0", "my-ami")
            .replace("timeout = \"2m\"", "timeout = \"two minutes\"")
            .replace("interface = \"private_ip\"", "interface = \"vpn\"");
        let d = diags(&text);
        let messages: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(d.len(), 3, "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("is not an AMI id")));
        assert!(messages.iter().any(|m| m.contains("is not a duration")));
        assert!(messages.iter().any(|m| m.contains("is not an interface")));
    }

    #[test]
    fn a_missing_script_lists_where_it_looked() {
        let text = GOOD.replace("inline = [\"echo {{var.env}}\"]", "script = \"nope.sh\"");
        let d = diags(&text);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].message.contains("script \"nope.sh\" not found"));
        assert!(d[0].message.contains("provisioners"));
    }

    #[test]
    fn two_sources_and_a_bad_ami_name_are_errors() {
        let text = GOOD
            .replace("[source]\n", "[source]\nssm_parameter = \"/x\"\n")
            .replace("web-{{var.env}}-{{timestamp}}", "web#{{timestamp}}");
        let d = diags(&text);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].message.contains("exactly one"));
        assert!(d[1].message.contains("not a valid AMI name"));
    }

    #[test]
    fn an_undeclared_template_variable_points_into_the_string() {
        let text = GOOD.replace("echo {{var.env}}", "echo {{var.nope}}");
        let d = diags(&text);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!((d[0].line, d[0].column), (20, 17));
    }

    #[test]
    fn reserved_tag_keys_are_refused() {
        let text = GOOD.replace(
            "tags = { Role = \"web\" }",
            "tags = { \"bakery:build-id\" = \"x\" }",
        );
        let d = diags(&text);
        assert!(d[0].message.contains("reserved"), "{d:?}");
    }
}

#[cfg(test)]
mod ssm_tests {
    use super::*;

    const SSM: &str = r#"
[source]
ami = "ami-0123456789abcdef0"
[instance]
type = "t3.micro"
instance_profile = "bake-ssm"
[communicator]
type = "ssm"
agent_timeout = "2m"
[image]
name = "x-{{timestamp}}"
"#;

    #[test]
    fn an_ssm_recipe_loads() {
        let r = parse(Path::new("r.toml"), SSM, &VarSources::default()).unwrap();
        assert_eq!(
            r.communicator,
            Communicator::Ssm(SsmSpec {
                agent_timeout: Duration::from_secs(120)
            })
        );
    }

    #[test]
    fn ssm_without_a_profile_or_with_ssh_settings_is_refused() {
        let text = SSM
            .replace("instance_profile = \"bake-ssm\"\n", "")
            .replace("agent_timeout", "user = \"ec2-user\"\nagent_timeout");
        let Err(RecipeError::Invalid(d)) =
            parse(Path::new("r.toml"), &text, &VarSources::default())
        else {
            panic!()
        };
        let m: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(d.len(), 2, "{m:?}");
        assert!(m.iter().any(|m| m.contains("`user` is an SSH setting")));
        assert!(m
            .iter()
            .any(|m| m.contains("needs [instance] instance_profile")));
    }
}
