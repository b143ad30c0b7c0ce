//! The daemon's configuration file (`/etc/bakery/daemon.toml`), validated at start, by
//! `bakery daemon --check` and on every SIGHUP with the same quality of errors as recipes: each
//! names the file, line and column and what to write instead, and every mistake of a file is
//! reported at once (an unknown key, a value of the wrong type and a value out of range alike). A
//! reload that fails keeps the running configuration.
//!
//! Every duration and count has a bound ([`bounds`]), so nothing the daemon computes from them
//! (deadlines, the takeover's expiry, the effective interval) can overflow.
//!
//! The file is walked as a TOML document with its spans (`toml_edit`), not deserialized with
//! serde: serde stops at the first unknown key or wrong type, and a user fixing a file one error
//! per run is what this module exists to spare.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{Item, TableLike, Value};

use crate::diag::{locate, toml_message_in, Diagnostic, FileError};
use crate::plan::Amount;

/// Where `/metrics` and `/healthz` listen by default: loopback only.
const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);

/// The documented bounds of every duration and count (README, "The health daemon").
pub mod bounds {
    use std::ops::RangeInclusive;
    use std::time::Duration;

    /// `interval`: at least a second (AWS answers in tens to hundreds of milliseconds, and the
    /// API budget is counted in calls per second), at most an hour.
    pub const INTERVAL: RangeInclusive<Duration> =
        Duration::from_secs(1)..=Duration::from_secs(3600);
    /// `takeover_ttl`: how long a takeover record stays valid without renewal.
    pub const TAKEOVER_TTL: RangeInclusive<Duration> =
        Duration::from_secs(5)..=Duration::from_secs(24 * 3600);
    /// `[breaker] window`.
    pub const WINDOW: RangeInclusive<Duration> =
        Duration::from_secs(1)..=Duration::from_secs(24 * 3600);
    /// A probe's `timeout`.
    pub const PROBE_TIMEOUT: RangeInclusive<Duration> =
        Duration::from_millis(10)..=Duration::from_secs(60);
    /// `unhealthy_threshold` (top level and per group): rounds in a row.
    pub const THRESHOLD: RangeInclusive<i64> = 1..=100;
    /// A probe's `healthy_threshold` and `unhealthy_threshold`.
    pub const PROBE_THRESHOLD: RangeInclusive<i64> = 1..=10;
    pub const PROBE_CONCURRENCY: RangeInclusive<i64> = 1..=1024;
    pub const PORT: RangeInclusive<i64> = 1..=65535;
    /// `freeze_above` and `freeze_above_all`: percentages.
    pub const PERCENT: RangeInclusive<i64> = 1..=100;
    /// `[breaker] max_replace` as a count (a percentage is 1% to 100%).
    pub const MAX_REPLACE: RangeInclusive<u32> = 1..=10_000;
    /// `[api] rate`: calls per second.
    pub const API_RATE: RangeInclusive<f64> = 0.1..=1000.0;
    /// `[api] burst`: calls.
    pub const API_BURST: RangeInclusive<i64> = 1..=1000;
    /// The takeover must be renewable: it lasts at least this many intervals.
    pub const TAKEOVER_TTL_INTERVALS: u32 = 3;
    /// `[lease] ttl`: how long a silent daemon keeps its groups (and its membership).
    pub const LEASE_TTL: RangeInclusive<Duration> =
        Duration::from_secs(3)..=Duration::from_secs(3600);
}

/// `[lease]`: groups shared among daemons through a DynamoDB lease table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    pub table: String,
    /// How long a daemon that stopped renewing keeps its membership and its groups.
    pub ttl: Duration,
}

/// `[events]`: the SQS queue EventBridge delivers EC2 interruption and maintenance events to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSettings {
    pub queue_url: String,
}

/// `[lease] ttl` by default.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);

/// Which groups to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Name(String),
    Tag { key: String, value: Option<String> },
}

impl Selector {
    /// Whether a group with this name and these tags is selected.
    pub fn selects(&self, name: &str, tags: &std::collections::BTreeMap<String, String>) -> bool {
        match self {
            Selector::Name(n) => n == name,
            Selector::Tag { key, value } => match value {
                Some(v) => tags.get(key) == Some(v),
                None => tags.contains_key(key),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    Http { path: String },
    Tcp,
}

/// The daemon's own probe of each instance's private address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    pub port: u16,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    pub selector: Selector,
    pub probe: Option<Probe>,
    /// Consecutive failing checks before an instance is replaced (overrides the global one).
    pub unhealthy_threshold: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub interval: Duration,
    pub unhealthy_threshold: u32,
    pub listen: SocketAddr,
    pub probe_concurrency: usize,
    pub max_replace: Amount,
    pub window: Duration,
    /// Freeze a group when more than this percentage of it is unhealthy.
    pub freeze_above: u32,
    /// Freeze every group when more than this percentage of all watched instances is unhealthy.
    pub freeze_above_all: u32,
    pub api_rate: f64,
    pub api_burst: f64,
    /// How long a takeover record stays valid without renewal (`takeover_ttl`; by default six
    /// intervals, at least a minute).
    pub takeover_ttl: Duration,
    pub groups: Vec<GroupConfig>,
    /// `[lease]`: share the groups with other daemons through this lease table.
    pub lease: Option<LeaseSettings>,
    /// `[events]`: replace instances before EC2 interrupts or retires them.
    pub events: Option<EventSettings>,
}

impl Config {
    /// How long a takeover tag stays valid without renewal.
    pub fn takeover_ttl(&self) -> Duration {
        self.takeover_ttl
    }

    /// The threshold and probe that apply to a group: those of the first `[[group]]` that
    /// selects it, else the global threshold and no probe.
    pub fn settings_for(
        &self,
        name: &str,
        tags: &std::collections::BTreeMap<String, String>,
    ) -> (u32, Option<&Probe>) {
        let cfg = self.groups.iter().find(|c| c.selector.selects(name, tags));
        (
            cfg.and_then(|c| c.unhealthy_threshold)
                .unwrap_or(self.unhealthy_threshold),
            cfg.and_then(|c| c.probe.as_ref()),
        )
    }

    /// A short fingerprint of what acts on a group (its threshold and probe, the interval and
    /// the breaker): two daemons sharing a lease table compare it to warn when their
    /// configurations of one group differ.
    pub fn fingerprint(
        &self,
        name: &str,
        tags: &std::collections::BTreeMap<String, String>,
    ) -> String {
        use sha2::Digest;
        let (threshold, probe) = self.settings_for(name, tags);
        let text = format!(
            "{threshold}|{probe:?}|{:?}|{:?}|{:?}|{}|{}",
            self.interval, self.max_replace, self.window, self.freeze_above, self.freeze_above_all
        );
        let digest = sha2::Sha256::digest(text.as_bytes());
        digest[..4].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The groups named in the configuration (a tag selector names none).
    pub fn named_groups(&self) -> Vec<String> {
        self.groups
            .iter()
            .filter_map(|g| match &g.selector {
                Selector::Name(n) => Some(n.clone()),
                Selector::Tag { .. } => None,
            })
            .collect()
    }

    /// The tag selectors, as (key, value) filters.
    pub fn tag_selectors(&self) -> Vec<(String, Option<String>)> {
        self.groups
            .iter()
            .filter_map(|g| match &g.selector {
                Selector::Tag { key, value } => Some((key.clone(), value.clone())),
                Selector::Name(_) => None,
            })
            .collect()
    }
}

/// The takeover's default lifetime: six intervals, at least a minute.
fn default_takeover_ttl(interval: Duration) -> Duration {
    interval.saturating_mul(6).max(Duration::from_secs(60))
}

/// Defaults well below AWS's published limits (EC2 describe calls: a bucket of 100 refilled at
/// 20 a second per account); the daemon shares the account with everything else.
pub const DEFAULT_API_RATE: f64 = 5.0;
pub const DEFAULT_API_BURST: i64 = 20;

const TOP_KEYS: &[&str] = &[
    "interval",
    "unhealthy_threshold",
    "listen",
    "probe_concurrency",
    "takeover_ttl",
    "breaker",
    "api",
    "group",
    "lease",
    "events",
];
const LEASE_KEYS: &[&str] = &["table", "ttl"];
const EVENTS_KEYS: &[&str] = &["queue_url"];
const BREAKER_KEYS: &[&str] = &["max_replace", "window", "freeze_above", "freeze_above_all"];
const API_KEYS: &[&str] = &["rate", "burst"];
const GROUP_KEYS: &[&str] = &["name", "tag", "unhealthy_threshold", "probe"];
const TAG_KEYS: &[&str] = &["key", "value"];
const PROBE_KEYS: &[&str] = &[
    "type",
    "port",
    "path",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
];

/// Collects every mistake of one file, each located.
struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
    diags: Vec<Diagnostic>,
}

/// Where an item starts in the file (the start of the file when the parser kept no span).
fn at(item: &Item) -> usize {
    item.span().map(|s| s.start).unwrap_or(0)
}

/// What TOML calls an item's type, for "must be a string, not an integer".
fn kind_of(item: &Item) -> &'static str {
    match item {
        Item::Value(Value::String(_)) => "a string",
        Item::Value(Value::Integer(_)) => "an integer",
        Item::Value(Value::Float(_)) => "a float",
        Item::Value(Value::Boolean(_)) => "a boolean",
        Item::Value(Value::Datetime(_)) => "a date-time",
        Item::Value(Value::Array(_)) => "an array",
        Item::Value(Value::InlineTable(_)) | Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
        Item::None => "nothing",
    }
}

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Checker<'_> {
    fn error(&mut self, at: usize, message: impl Into<String>, hint: &str) {
        let (line, column) = locate(self.text, at);
        self.diags.push(Diagnostic {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
            hint: (!hint.is_empty()).then(|| hint.to_string()),
        });
    }

    /// Reports every key of `t` that is not one of `known`.
    fn known(&mut self, t: &dyn TableLike, known: &[&str], place: &str) {
        for (k, _) in t.iter() {
            if !known.contains(&k) {
                let offset = t
                    .key(k)
                    .and_then(|k| k.span())
                    .map(|s| s.start)
                    .unwrap_or(0);
                let expected: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
                self.error(
                    offset,
                    format!("unknown field `{k}` {place}"),
                    &format!("expected one of {}", expected.join(", ")),
                );
            }
        }
    }

    fn wrong_type(&mut self, item: &Item, field: &str, wanted: &str, example: &str) {
        self.error(
            at(item),
            format!("`{field}` must be {wanted}, not {}", kind_of(item)),
            example,
        );
    }

    /// A string value, with its offset; `None` (and an error) when it is of another type.
    fn string<'d>(
        &mut self,
        t: &'d dyn TableLike,
        field: &str,
        example: &str,
    ) -> Option<(&'d str, usize)> {
        let item = t.get(field)?;
        match item.as_str() {
            Some(s) => Some((s, at(item))),
            None => {
                self.wrong_type(item, field, "a string", example);
                None
            }
        }
    }

    fn table<'d>(&mut self, t: &'d dyn TableLike, field: &str) -> Option<&'d dyn TableLike> {
        let item = t.get(field)?;
        match item.as_table_like() {
            Some(tt) => Some(tt),
            None => {
                self.wrong_type(item, field, "a table", "");
                None
            }
        }
    }

    fn duration(
        &mut self,
        t: &dyn TableLike,
        field: &str,
        bounds: std::ops::RangeInclusive<Duration>,
        default: Duration,
    ) -> Duration {
        let hint = format!(
            "a duration from {} to {}, e.g. \"5s\" or \"10m\"",
            fmt_duration(*bounds.start()),
            fmt_duration(*bounds.end())
        );
        let Some((text, offset)) = self.string(t, field, &hint) else {
            return default;
        };
        match humantime::parse_duration(text.trim()) {
            Ok(d) if bounds.contains(&d) => d,
            Ok(d) if !d.is_zero() => {
                self.error(
                    offset,
                    format!("`{field}` = {text:?} is out of range"),
                    &hint,
                );
                default
            }
            _ => {
                self.error(
                    offset,
                    format!("`{field}` = {text:?} is not a positive duration"),
                    &hint,
                );
                default
            }
        }
    }

    fn count(
        &mut self,
        t: &dyn TableLike,
        field: &str,
        range: std::ops::RangeInclusive<i64>,
        default: u32,
    ) -> u32 {
        let hint = format!("use {} to {}", range.start(), range.end());
        let Some(item) = t.get(field) else {
            return default;
        };
        let Some(v) = item.as_integer() else {
            self.wrong_type(item, field, "a whole number", &hint);
            return default;
        };
        match u32::try_from(v) {
            Ok(n) if range.contains(&v) => n,
            _ => {
                self.error(at(item), format!("`{field}` = {v} is out of range"), &hint);
                default
            }
        }
    }

    fn rate(&mut self, t: &dyn TableLike, default: f64) -> f64 {
        let bounds = bounds::API_RATE;
        let hint = format!(
            "calls per second, from {} to {}",
            bounds.start(),
            bounds.end()
        );
        let Some(item) = t.get("rate") else {
            return default;
        };
        let v = match (item.as_float(), item.as_integer()) {
            (Some(f), _) => f,
            (None, Some(i)) => i as f64,
            _ => {
                self.wrong_type(item, "rate", "a number", &hint);
                return default;
            }
        };
        if bounds.contains(&v) {
            v
        } else {
            self.error(at(item), format!("`rate` = {v:?} is out of range"), &hint);
            default
        }
    }

    fn listen(&mut self, t: &dyn TableLike) -> SocketAddr {
        let Some((text, offset)) = self.string(t, "listen", "e.g. \"127.0.0.1:9464\"") else {
            return DEFAULT_LISTEN;
        };
        match text.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.error(
                    offset,
                    format!("`listen` = {text:?} is not an address:port"),
                    "e.g. \"127.0.0.1:9464\"",
                );
                DEFAULT_LISTEN
            }
        }
    }

    fn max_replace(&mut self, t: &dyn TableLike, default: Amount) -> Amount {
        let hint = "a count (\"2\", at most 10000) or a percentage of the group (\"25%\", from 1%)";
        let Some((text, offset)) = self.string(t, "max_replace", hint) else {
            return default;
        };
        match text.parse::<Amount>() {
            Ok(Amount::Count(n)) if bounds::MAX_REPLACE.contains(&n) => Amount::Count(n),
            Ok(Amount::Percent(p)) if p >= 1 => Amount::Percent(p),
            Ok(_) => {
                self.error(
                    offset,
                    format!("`max_replace` = {text:?} is out of range"),
                    hint,
                );
                default
            }
            Err(e) => {
                self.error(offset, format!("`max_replace`: {e}"), hint);
                default
            }
        }
    }

    fn breaker(&mut self, root: &dyn TableLike) -> (Amount, Duration, u32, u32) {
        let defaults = (Amount::Percent(25), Duration::from_secs(600), 50, 50);
        let Some(b) = self.table(root, "breaker") else {
            return defaults;
        };
        self.known(b, BREAKER_KEYS, "in [breaker]");
        (
            self.max_replace(b, defaults.0),
            self.duration(b, "window", bounds::WINDOW, defaults.1),
            self.count(b, "freeze_above", bounds::PERCENT, defaults.2),
            self.count(b, "freeze_above_all", bounds::PERCENT, defaults.3),
        )
    }

    fn api(&mut self, root: &dyn TableLike) -> (f64, f64) {
        let Some(a) = self.table(root, "api") else {
            return (DEFAULT_API_RATE, DEFAULT_API_BURST as f64);
        };
        self.known(a, API_KEYS, "in [api]");
        (
            self.rate(a, DEFAULT_API_RATE),
            f64::from(self.count(a, "burst", bounds::API_BURST, DEFAULT_API_BURST as u32)),
        )
    }

    fn lease(&mut self, root: &dyn TableLike) -> Option<LeaseSettings> {
        let l = self.table(root, "lease")?;
        let offset = at(root.get("lease")?);
        self.known(l, LEASE_KEYS, "in [lease]");
        let hint = "table = \"bakery-leases\" (made by `bakery init --lease-table bakery-leases`)";
        let table = match self.string(l, "table", hint) {
            Some((t, _)) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Some((_, at)) => {
                self.error(at, "[lease] `table` is empty", hint);
                None
            }
            None => {
                if !l.contains_key("table") {
                    self.error(offset, "[lease] needs a `table`", hint);
                }
                None
            }
        };
        let ttl = self.duration(l, "ttl", bounds::LEASE_TTL, DEFAULT_LEASE_TTL);
        Some(LeaseSettings { table: table?, ttl })
    }

    fn events(&mut self, root: &dyn TableLike) -> Option<EventSettings> {
        let e = self.table(root, "events")?;
        let offset = at(root.get("events")?);
        self.known(e, EVENTS_KEYS, "in [events]");
        let hint = "queue_url = \"https://sqs.us-east-1.amazonaws.com/123456789012/bakery-events\"";
        match self.string(e, "queue_url", hint) {
            Some((u, _)) if u.starts_with("https://") || u.starts_with("http://") => {
                Some(EventSettings {
                    queue_url: u.to_string(),
                })
            }
            Some((u, at)) => {
                self.error(
                    at,
                    format!("[events] `queue_url` = {u:?} is not a queue URL"),
                    hint,
                );
                None
            }
            None => {
                if !e.contains_key("queue_url") {
                    self.error(offset, "[events] needs a `queue_url`", hint);
                }
                None
            }
        }
    }

    fn selector(&mut self, g: &dyn TableLike, offset: usize) -> Option<Selector> {
        let name = self.string(g, "name", "name = \"web\"");
        let tag = self.table(g, "tag");
        match (g.contains_key("name"), g.contains_key("tag")) {
            (true, false) => {
                let (n, at) = name?;
                if n.trim().is_empty() {
                    self.error(at, "`name` is empty", "name = \"web\"");
                    return None;
                }
                Some(Selector::Name(n.to_string()))
            }
            (false, true) => {
                let t = tag?;
                self.known(t, TAG_KEYS, "in a group's `tag`");
                let key = self.string(t, "key", "key = \"team\"");
                let value = self.string(t, "value", "value = \"payments\"");
                match key {
                    Some((k, _)) if !k.trim().is_empty() => Some(Selector::Tag {
                        key: k.to_string(),
                        value: value.map(|(v, _)| v.to_string()),
                    }),
                    Some((_, at)) => {
                        self.error(at, "the tag's `key` is empty", "key = \"team\"");
                        None
                    }
                    None => {
                        if !t.contains_key("key") {
                            self.error(
                                offset,
                                "a group's `tag` needs a `key`",
                                "tag = { key = \"team\", value = \"payments\" }",
                            );
                        }
                        None
                    }
                }
            }
            _ => {
                self.error(
                    offset,
                    "a [[group]] needs exactly one of `name` and `tag`",
                    "name = \"web\", or tag = { key = \"bakery:watch\", value = \"true\" }",
                );
                None
            }
        }
    }

    fn probe(&mut self, g: &dyn TableLike) -> Option<Probe> {
        let p = self.table(g, "probe")?;
        let offset = at(g.get("probe")?);
        self.known(p, PROBE_KEYS, "in a probe");
        let kind = match self.string(p, "type", "type = \"http\" or \"tcp\"") {
            Some(("http", _)) => {
                let path = self.string(p, "path", "e.g. \"/healthz\"");
                match path {
                    Some((path, at)) if !path.starts_with('/') => {
                        self.error(
                            at,
                            format!("probe `path` = {path:?} must start with /"),
                            "e.g. \"/healthz\"",
                        );
                        None
                    }
                    Some((path, _)) => Some(ProbeKind::Http { path: path.into() }),
                    None => Some(ProbeKind::Http { path: "/".into() }),
                }
            }
            Some(("tcp", _)) => {
                if let Some(path) = p.get("path") {
                    self.error(
                        at(path),
                        "`path` is only for http probes",
                        "remove it, or set type = \"http\"",
                    );
                }
                Some(ProbeKind::Tcp)
            }
            Some((other, at)) => {
                self.error(
                    at,
                    format!("probe `type` = {other:?} is not supported"),
                    "use \"http\" or \"tcp\"",
                );
                None
            }
            None => {
                if !p.contains_key("type") {
                    self.error(
                        offset,
                        "a probe needs a `type`",
                        "type = \"http\" or \"tcp\"",
                    );
                }
                None
            }
        };
        if !p.contains_key("port") {
            self.error(offset, "a probe needs a `port`", "e.g. port = 8080");
        }
        let port = self.count(p, "port", bounds::PORT, 80) as u16;
        let timeout = self.duration(p, "timeout", bounds::PROBE_TIMEOUT, Duration::from_secs(2));
        let healthy_threshold = self.count(p, "healthy_threshold", bounds::PROBE_THRESHOLD, 2);
        // A failed probe is a failing signal at once by default: the group's
        // `unhealthy_threshold` then counts the rounds (the two do not stack).
        let unhealthy_threshold = self.count(p, "unhealthy_threshold", bounds::PROBE_THRESHOLD, 1);
        Some(Probe {
            kind: kind?,
            port,
            timeout,
            healthy_threshold,
            unhealthy_threshold,
        })
    }

    fn group(&mut self, g: &dyn TableLike, offset: usize) -> Option<GroupConfig> {
        self.known(g, GROUP_KEYS, "in a [[group]]");
        let selector = self.selector(g, offset);
        let probe = self.probe(g);
        let threshold = g
            .contains_key("unhealthy_threshold")
            .then(|| self.count(g, "unhealthy_threshold", bounds::THRESHOLD, 3));
        Some(GroupConfig {
            selector: selector?,
            probe,
            unhealthy_threshold: threshold,
        })
    }

    /// Every `[[group]]` (or `group = [{ ... }]`), each checked.
    fn groups(&mut self, root: &dyn TableLike) -> Vec<GroupConfig> {
        let mut tables: Vec<(&dyn TableLike, usize)> = Vec::new();
        match root.get("group") {
            None => {}
            Some(Item::ArrayOfTables(a)) => {
                tables.extend(
                    a.iter()
                        .map(|t| (t as &dyn TableLike, t.span().map(|s| s.start).unwrap_or(0))),
                );
            }
            Some(Item::Value(Value::Array(a))) => {
                for v in a.iter() {
                    match v.as_inline_table() {
                        Some(t) => tables.push((t, v.span().map(|s| s.start).unwrap_or(0))),
                        None => self.error(
                            v.span().map(|s| s.start).unwrap_or(0),
                            "each group must be a table",
                            "[[group]]\nname = \"web\"",
                        ),
                    }
                }
            }
            Some(other) => self.wrong_type(
                other,
                "group",
                "an array of tables",
                "[[group]]\nname = \"web\"",
            ),
        }
        if tables.is_empty() {
            self.error(
                0,
                "no [[group]] to watch",
                "add [[group]] name = \"web\" (or tag = { key = ..., value = ... })",
            );
        }
        tables
            .into_iter()
            .filter_map(|(t, offset)| self.group(t, offset))
            .collect()
    }
}

pub fn load(path: &Path) -> Result<Config, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// A TOML syntax error (the only kind that stops the check early: nothing after it can be read).
fn syntax_error(path: &Path, text: &str) -> Option<FileError> {
    let e = toml::from_str::<toml::Table>(text).err()?;
    let (line, column) = e.span().map(|s| locate(text, s.start)).unwrap_or((1, 1));
    Some(FileError::Invalid(vec![Diagnostic {
        file: path.to_path_buf(),
        line,
        column,
        message: toml_message_in(&e, Some(text)),
        hint: Some("see the daemon configuration example in the README".into()),
    }]))
}

pub fn parse(path: &Path, text: &str) -> Result<Config, FileError> {
    if let Some(e) = syntax_error(path, text) {
        return Err(e);
    }
    let doc = toml_edit::ImDocument::parse(text).map_err(|e| {
        let (line, column) = e.span().map(|s| locate(text, s.start)).unwrap_or((1, 1));
        FileError::Invalid(vec![Diagnostic {
            file: path.to_path_buf(),
            line,
            column,
            message: e.message().to_string(),
            hint: Some("see the daemon configuration example in the README".into()),
        }])
    })?;
    let root: &dyn TableLike = doc.as_table();
    let mut c = Checker {
        file: path,
        text,
        diags: Vec::new(),
    };
    c.known(root, TOP_KEYS, "at the top level");
    let interval = c.duration(root, "interval", bounds::INTERVAL, Duration::from_secs(10));
    let unhealthy_threshold = c.count(root, "unhealthy_threshold", bounds::THRESHOLD, 3);
    let listen = c.listen(root);
    let probe_concurrency =
        c.count(root, "probe_concurrency", bounds::PROBE_CONCURRENCY, 64) as usize;
    let takeover_ttl = match root.get("takeover_ttl") {
        None => default_takeover_ttl(interval),
        Some(item) => {
            let ttl = c.duration(
                root,
                "takeover_ttl",
                bounds::TAKEOVER_TTL,
                default_takeover_ttl(interval),
            );
            let least = interval.saturating_mul(bounds::TAKEOVER_TTL_INTERVALS);
            if ttl < least {
                c.error(
                    at(item),
                    format!(
                        "`takeover_ttl` = {} is shorter than {} intervals ({}): the daemon could not renew it in time",
                        fmt_duration(ttl),
                        bounds::TAKEOVER_TTL_INTERVALS,
                        fmt_duration(least)
                    ),
                    &format!("at least {}", fmt_duration(least)),
                );
            }
            ttl
        }
    };
    let (max_replace, window, freeze_above, freeze_above_all) = c.breaker(root);
    let (api_rate, api_burst) = c.api(root);
    let groups = c.groups(root);
    let lease = c.lease(root);
    let events = c.events(root);
    if !c.diags.is_empty() {
        c.diags.sort_by_key(|d| (d.line, d.column));
        return Err(FileError::Invalid(c.diags));
    }
    Ok(Config {
        path: path.to_path_buf(),
        interval,
        unhealthy_threshold,
        listen,
        probe_concurrency,
        max_replace,
        window,
        freeze_above,
        freeze_above_all,
        api_rate,
        api_burst,
        takeover_ttl,
        groups,
        lease,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<Diagnostic> {
        match parse(Path::new("d.toml"), text) {
            Err(FileError::Invalid(d)) => d,
            other => panic!("expected errors, got {other:?}"),
        }
    }

    fn messages(text: &str) -> Vec<String> {
        errors(text).into_iter().map(|d| d.message).collect()
    }

    #[test]
    fn lease_and_events_tables_load_and_their_mistakes_are_named() {
        let c = parse(
            Path::new("d.toml"),
            "[lease]\ntable = \"bakery-leases\"\nttl = \"6s\"\n[events]\nqueue_url = \"http://127.0.0.1:5643/123456789012/q\"\n[[group]]\nname = \"web\"\n",
        )
        .unwrap();
        assert_eq!(
            c.lease,
            Some(LeaseSettings {
                table: "bakery-leases".into(),
                ttl: Duration::from_secs(6)
            })
        );
        assert_eq!(
            c.events.map(|e| e.queue_url),
            Some("http://127.0.0.1:5643/123456789012/q".into())
        );
        let d = parse(
            Path::new("d.toml"),
            "[lease]\ntable = \"t\"\n[[group]]\nname = \"web\"\n",
        )
        .unwrap();
        assert_eq!(d.lease.unwrap().ttl, DEFAULT_LEASE_TTL);
        let none = parse(Path::new("d.toml"), "[[group]]\nname = \"web\"\n").unwrap();
        assert_eq!((none.lease, none.events), (None, None));
        assert_eq!(
            messages("[lease]\nttl = \"1s\"\nowner = 1\n[events]\nqueue_url = \"bakery-events\"\n[[group]]\nname = \"web\"\n"),
            vec![
                "[lease] needs a `table`".to_string(),
                "`ttl` = \"1s\" is out of range".to_string(),
                "unknown field `owner` in [lease]".to_string(),
                "[events] `queue_url` = \"bakery-events\" is not a queue URL".to_string(),
            ]
        );
    }

    #[test]
    fn the_fingerprint_changes_with_what_acts_on_the_group_only() {
        let a = parse(Path::new("a.toml"), "[[group]]\nname = \"web\"\n").unwrap();
        let b = parse(
            Path::new("b.toml"),
            "listen = \"127.0.0.1:1\"\n[[group]]\nname = \"web\"\n",
        )
        .unwrap();
        let c = parse(
            Path::new("c.toml"),
            "[[group]]\nname = \"web\"\nunhealthy_threshold = 7\n",
        )
        .unwrap();
        let tags = std::collections::BTreeMap::new();
        assert_eq!(a.fingerprint("web", &tags), b.fingerprint("web", &tags));
        assert_ne!(a.fingerprint("web", &tags), c.fingerprint("web", &tags));
        assert_eq!(a.fingerprint("web", &tags).len(), 8);
    }

    #[test]
    fn a_full_config_loads() {
        let c = parse(
            Path::new("d.toml"),
            r#"
interval = "2s"
unhealthy_threshold = 2
listen = "127.0.0.1:9000"
[breaker]
max_replace = "2"
window = "5m"
freeze_above = 40
[api]
rate = 2.5
burst = 5
[[group]]
name = "web"
probe = { type = "http", port = 8080, path = "/healthz", timeout = "1s" }
[[group]]
tag = { key = "team", value = "payments" }
"#,
        )
        .unwrap();
        assert_eq!(c.interval, Duration::from_secs(2));
        assert_eq!(c.max_replace, Amount::Count(2));
        assert_eq!(c.freeze_above, 40);
        assert_eq!(c.freeze_above_all, 50);
        assert_eq!(c.api_rate, 2.5);
        assert_eq!(c.groups.len(), 2);
        assert_eq!(
            c.groups[0].probe.as_ref().unwrap().kind,
            ProbeKind::Http {
                path: "/healthz".into()
            }
        );
        assert_eq!(
            c.groups[1].selector,
            Selector::Tag {
                key: "team".into(),
                value: Some("payments".into())
            }
        );
        assert_eq!(c.takeover_ttl(), Duration::from_secs(60));
        assert_eq!(c.named_groups(), vec!["web".to_string()]);
    }

    #[test]
    fn an_integer_rate_and_inline_groups_load() {
        let c = parse(
            Path::new("d.toml"),
            "takeover_ttl = \"30s\"\n[api]\nrate = 5\ngroup = 1\n",
        );
        assert!(c.is_err(), "`group` inside [api] is unknown");
        let c = parse(
            Path::new("d.toml"),
            "takeover_ttl = \"30s\"\ngroup = [{ name = \"a\" }, { name = \"b\" }]\n[api]\nrate = 5\n",
        )
        .unwrap();
        assert_eq!(c.api_rate, 5.0);
        assert_eq!(c.groups.len(), 2);
        assert_eq!(c.takeover_ttl, Duration::from_secs(30));
    }

    #[test]
    fn mistakes_are_located_and_explained() {
        let d = errors("intervall = \"5s\"\n[[group]]\nname = \"web\"\n");
        assert_eq!((d[0].line, d[0].column), (1, 1));
        assert!(d[0].message.contains("unknown field `intervall`"));

        let d = errors("interval = \"soon\"\n[breaker]\nfreeze_above = 150\n[[group]]\nname = \"web\"\nprobe = { type = \"icmp\", port = 1 }\n");
        let m: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(d.len(), 3, "{m:?}");
        assert!(m[0].contains("`interval` = \"soon\" is not a positive duration"));
        assert!(m[1].contains("`freeze_above` = 150 is out of range"));
        assert!(m[2].contains("probe `type` = \"icmp\""));

        let d = errors("interval = \"5s\"\n");
        assert!(d[0].message.contains("no [[group]]"));
        let d = errors("[[group]]\nname = \"a\"\ntag = { key = \"k\" }\n");
        assert!(d[0].message.contains("exactly one of `name` and `tag`"));
        assert_eq!(d[0].line, 1);
    }

    #[test]
    fn every_mistake_of_a_file_is_reported_at_once() {
        // An unknown key, two wrong types and three values out of range: serde would have
        // stopped at the first.
        let d = errors(
            "intervall = \"5s\"\nunhealthy_threshold = \"3\"\nprobe_concurrency = 0\n[api]\nrate = \"fast\"\nburst = 5000\n[[group]]\nname = \"web\"\nprobe_port = 80\nprobe = { type = \"http\", port = 99999 }\n",
        );
        let m: Vec<String> = d
            .iter()
            .map(|d| format!("{}:{} {}", d.line, d.column, d.message))
            .collect();
        assert_eq!(m.len(), 7, "{m:#?}");
        assert!(m[0].starts_with("1:1 unknown field `intervall`"), "{m:#?}");
        assert!(m[1].contains("`unhealthy_threshold` must be a whole number, not a string"));
        assert!(m[2].contains("`probe_concurrency` = 0 is out of range"));
        assert!(m[3].contains("`rate` must be a number, not a string"));
        assert!(m[4].contains("`burst` = 5000 is out of range"));
        assert!(m[5].starts_with("9:1 unknown field `probe_port`"), "{m:#?}");
        assert!(m[6].contains("`port` = 99999 is out of range"));
    }

    #[test]
    fn durations_and_counts_out_of_their_bounds_are_refused() {
        let huge = messages("interval = \"300000000000y\"\n[[group]]\nname = \"web\"\n");
        assert_eq!(
            huge,
            vec!["`interval` = \"300000000000y\" is out of range".to_string()]
        );
        let d = errors("interval = \"300000000000y\"\n[[group]]\nname = \"web\"\n");
        assert_eq!(
            d[0].hint.as_deref(),
            Some("a duration from 1s to 1h, e.g. \"5s\" or \"10m\"")
        );
        for (text, expected) in [
            (
                "interval = \"500ms\"",
                "`interval` = \"500ms\" is out of range",
            ),
            (
                "interval = \"0s\"",
                "`interval` = \"0s\" is not a positive duration",
            ),
            (
                "[breaker]\nwindow = \"400d\"",
                "`window` = \"400d\" is out of range",
            ),
            (
                "[breaker]\nmax_replace = \"0\"",
                "`max_replace` = \"0\" is out of range",
            ),
            (
                "[breaker]\nmax_replace = \"99999999\"",
                "`max_replace` = \"99999999\" is out of range",
            ),
            ("[api]\nrate = 1e300", "`rate` = 1e300 is out of range"),
            ("[api]\nrate = nan", "`rate` = NaN is out of range"),
            ("[api]\nrate = 0.01", "`rate` = 0.01 is out of range"),
            (
                "takeover_ttl = \"2s\"",
                "`takeover_ttl` = \"2s\" is out of range",
            ),
            (
                "interval = \"10s\"\ntakeover_ttl = \"20s\"",
                "`takeover_ttl` = 20s is shorter than 3 intervals (30s)",
            ),
            (
                "unhealthy_threshold = 4294967297",
                "`unhealthy_threshold` = 4294967297 is out of range",
            ),
        ] {
            let m = messages(&format!("{text}\n[[group]]\nname = \"web\"\n"));
            assert_eq!(m.len(), 1, "{text}: {m:?}");
            assert!(m[0].starts_with(expected), "{text}: {m:?}");
        }
        let m = messages(
            "[[group]]\nname = \"web\"\nprobe = { type = \"tcp\", port = 80, timeout = \"2h\", healthy_threshold = 11 }\n",
        );
        assert_eq!(
            m,
            vec![
                "`timeout` = \"2h\" is out of range".to_string(),
                "`healthy_threshold` = 11 is out of range".to_string()
            ]
        );
    }

    #[test]
    fn settings_follow_the_first_group_that_selects() {
        let c = parse(
            Path::new("d.toml"),
            "unhealthy_threshold = 4\n[[group]]\nname = \"web\"\nunhealthy_threshold = 2\nprobe = { type = \"tcp\", port = 80 }\n[[group]]\ntag = { key = \"team\" }\n",
        )
        .unwrap();
        let none = std::collections::BTreeMap::new();
        let team = std::collections::BTreeMap::from([("team".to_string(), "x".to_string())]);
        assert_eq!(c.settings_for("web", &none).0, 2);
        assert!(c.settings_for("web", &none).1.is_some());
        assert_eq!(c.settings_for("api", &team), (4, None));
        assert_eq!(c.tag_selectors(), vec![("team".to_string(), None)]);
    }
}
