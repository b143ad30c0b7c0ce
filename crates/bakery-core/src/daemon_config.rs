//! The daemon's configuration file (`/etc/bakery/daemon.toml`), validated at start and on every
//! SIGHUP with the same quality of errors as recipes: each names the file, line and column and
//! what to write instead. A reload that fails keeps the running configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use std::net::{IpAddr, Ipv4Addr};

/// Where `/metrics` and `/healthz` listen by default: loopback only.
const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);

use crate::diag::{locate, toml_message_in, Diagnostic, FileError};
use crate::plan::Amount;

/// Which groups to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Name(String),
    Tag { key: String, value: Option<String> },
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
    pub groups: Vec<GroupConfig>,
}

impl Config {
    /// How long a takeover tag stays valid without renewal.
    pub fn takeover_ttl(&self) -> Duration {
        (self.interval * 6).max(Duration::from_secs(60))
    }
}

type S = Spanned<String>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    interval: Option<S>,
    unhealthy_threshold: Option<Spanned<i64>>,
    listen: Option<S>,
    probe_concurrency: Option<Spanned<i64>>,
    breaker: Option<RawBreaker>,
    api: Option<RawApi>,
    #[serde(default)]
    group: Vec<Spanned<RawGroup>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    max_replace: Option<S>,
    window: Option<S>,
    freeze_above: Option<Spanned<i64>>,
    freeze_above_all: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    rate: Option<Spanned<f64>>,
    burst: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Option<S>,
    tag: Option<Spanned<RawTag>>,
    unhealthy_threshold: Option<Spanned<i64>>,
    probe: Option<Spanned<RawProbe>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTag {
    key: S,
    value: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    #[serde(rename = "type")]
    kind: S,
    port: Spanned<i64>,
    path: Option<S>,
    timeout: Option<S>,
    healthy_threshold: Option<Spanned<i64>>,
    unhealthy_threshold: Option<Spanned<i64>>,
}

/// Defaults well below AWS's published limits (EC2 describe calls: a bucket of 100 refilled at
/// 20 a second per account); the daemon shares the account with everything else.
const DEFAULT_API_RATE: f64 = 5.0;
const DEFAULT_API_BURST: i64 = 20;

struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
    diags: Vec<Diagnostic>,
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

    fn duration(&mut self, v: &Option<S>, field: &str, default: Duration) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.get_ref().trim()) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                self.error(
                    v.span().start,
                    format!("`{field}` = {:?} is not a positive duration", v.get_ref()),
                    "e.g. \"5s\" or \"10m\"",
                );
                default
            }
        }
    }

    fn count(
        &mut self,
        v: &Option<Spanned<i64>>,
        field: &str,
        range: std::ops::RangeInclusive<i64>,
        default: u32,
    ) -> u32 {
        let Some(v) = v else { return default };
        if range.contains(v.get_ref()) {
            *v.get_ref() as u32
        } else {
            self.error(
                v.span().start,
                format!("`{field}` = {} is out of range", v.get_ref()),
                &format!("use {} to {}", range.start(), range.end()),
            );
            default
        }
    }
}

pub fn load(path: &Path) -> Result<Config, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Config, FileError> {
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| locate(text, s.start)).unwrap_or((1, 1));
        FileError::Invalid(vec![Diagnostic {
            file: path.to_path_buf(),
            line,
            column,
            message: toml_message_in(&e, Some(text)),
            hint: Some("see the daemon configuration example in the README".into()),
        }])
    })?;
    let mut c = Checker {
        file: path,
        text,
        diags: Vec::new(),
    };
    let interval = c.duration(&raw.interval, "interval", Duration::from_secs(10));
    let unhealthy_threshold = c.count(&raw.unhealthy_threshold, "unhealthy_threshold", 1..=100, 3);
    let listen = match &raw.listen {
        None => DEFAULT_LISTEN,
        Some(l) => match l.get_ref().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                c.error(
                    l.span().start,
                    format!("`listen` = {:?} is not an address:port", l.get_ref()),
                    "e.g. \"127.0.0.1:9464\"",
                );
                DEFAULT_LISTEN
            }
        },
    };
    let probe_concurrency =
        c.count(&raw.probe_concurrency, "probe_concurrency", 1..=1024, 64) as usize;
    let (mut max_replace, mut window, mut freeze_above, mut freeze_above_all) =
        (Amount::Percent(25), Duration::from_secs(600), 50, 50);
    if let Some(b) = &raw.breaker {
        if let Some(m) = &b.max_replace {
            match m.get_ref().parse::<Amount>() {
                Ok(a) => max_replace = a,
                Err(e) => c.error(
                    m.span().start,
                    format!("`max_replace`: {e}"),
                    "a count (\"2\") or a percentage of the group (\"25%\")",
                ),
            }
        }
        window = c.duration(&b.window, "window", window);
        freeze_above = c.count(&b.freeze_above, "freeze_above", 1..=100, freeze_above);
        freeze_above_all = c.count(
            &b.freeze_above_all,
            "freeze_above_all",
            1..=100,
            freeze_above_all,
        );
    }
    let (mut api_rate, mut api_burst) = (DEFAULT_API_RATE, DEFAULT_API_BURST as f64);
    if let Some(a) = &raw.api {
        if let Some(r) = &a.rate {
            if *r.get_ref() > 0.0 && *r.get_ref() <= 1000.0 {
                api_rate = *r.get_ref();
            } else {
                c.error(
                    r.span().start,
                    format!("`rate` = {} is out of range", r.get_ref()),
                    "calls per second, more than 0 and at most 1000",
                );
            }
        }
        api_burst = c.count(&a.burst, "burst", 1..=1000, DEFAULT_API_BURST as u32) as f64;
    }
    let mut groups = Vec::new();
    for g in &raw.group {
        let r = g.get_ref();
        let selector = match (&r.name, &r.tag) {
            (Some(n), None) if !n.get_ref().trim().is_empty() => {
                Selector::Name(n.get_ref().clone())
            }
            (None, Some(t)) => Selector::Tag {
                key: t.get_ref().key.get_ref().clone(),
                value: t.get_ref().value.as_ref().map(|v| v.get_ref().clone()),
            },
            _ => {
                c.error(
                    g.span().start,
                    "a [[group]] needs exactly one of `name` and `tag`",
                    "name = \"web\", or tag = { key = \"bakery:watch\", value = \"true\" }",
                );
                continue;
            }
        };
        let probe = r.probe.as_ref().and_then(|p| {
            let pr = p.get_ref();
            let kind = match pr.kind.get_ref().as_str() {
                "http" => ProbeKind::Http {
                    path: pr
                        .path
                        .as_ref()
                        .map(|p| p.get_ref().clone())
                        .unwrap_or_else(|| "/".into()),
                },
                "tcp" => {
                    if let Some(path) = &pr.path {
                        c.error(
                            path.span().start,
                            "`path` is only for http probes",
                            "remove it, or set type = \"http\"",
                        );
                    }
                    ProbeKind::Tcp
                }
                other => {
                    c.error(
                        pr.kind.span().start,
                        format!("probe `type` = {other:?} is not supported"),
                        "use \"http\" or \"tcp\"",
                    );
                    return None;
                }
            };
            if let ProbeKind::Http { path } = &kind {
                if !path.starts_with('/') {
                    c.error(
                        pr.path
                            .as_ref()
                            .map(|p| p.span().start)
                            .unwrap_or(p.span().start),
                        format!("probe `path` = {path:?} must start with /"),
                        "e.g. \"/healthz\"",
                    );
                }
            }
            let port = c.count(&Some(pr.port.clone()), "port", 1..=65535, 80) as u16;
            Some(Probe {
                kind,
                port,
                timeout: c.duration(&pr.timeout, "timeout", Duration::from_secs(2)),
                healthy_threshold: c.count(&pr.healthy_threshold, "healthy_threshold", 1..=10, 2),
                // A failed probe is a failing signal at once by default: the group's
                // `unhealthy_threshold` then counts the rounds (the two do not stack).
                unhealthy_threshold: c.count(
                    &pr.unhealthy_threshold,
                    "unhealthy_threshold",
                    1..=10,
                    1,
                ),
            })
        });
        let threshold = r
            .unhealthy_threshold
            .as_ref()
            .map(|t| c.count(&Some(t.clone()), "unhealthy_threshold", 1..=100, 3));
        groups.push(GroupConfig {
            selector,
            probe,
            unhealthy_threshold: threshold,
        });
    }
    if raw.group.is_empty() {
        c.error(
            0,
            "no [[group]] to watch",
            "add [[group]] name = \"web\" (or tag = { key = ..., value = ... })",
        );
    }
    if !c.diags.is_empty() {
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
        groups,
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
}
