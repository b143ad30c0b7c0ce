//! `/metrics` (Prometheus text format) and `/healthz` for the daemon, served on a loopback
//! address by default. Two read-only GET endpoints need no web framework: a small accept loop
//! over tokio's TcpListener does it without adding a server stack to the binary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::aws::budget;

/// One group's figures after the last round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupFigures {
    pub instances: u32,
    pub healthy: u32,
    pub unhealthy: u32,
    pub replaced_total: u64,
    pub frozen: bool,
}

/// What the endpoints serve; the loop updates it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub groups: BTreeMap<String, GroupFigures>,
    pub fleet_frozen: bool,
    pub loops: u64,
    pub loop_errors: u64,
    pub last_loop: Duration,
    /// Seconds since the epoch of the last completed round.
    pub last_round_at: u64,
    pub interval: Duration,
}

pub type Shared = Arc<Mutex<Snapshot>>;

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let gauge = |out: &mut String, name: &str, help: &str, kind: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    type Pick = fn(&GroupFigures) -> String;
    let per_group: [(&str, &str, &str, Pick); 5] = [
        (
            "bakery_group_instances",
            "In-service instances judged this round.",
            "gauge",
            |g| g.instances.to_string(),
        ),
        (
            "bakery_group_healthy",
            "Instances with no failing signal.",
            "gauge",
            |g| g.healthy.to_string(),
        ),
        (
            "bakery_group_unhealthy",
            "Instances with a failing signal.",
            "gauge",
            |g| g.unhealthy.to_string(),
        ),
        (
            "bakery_group_replaced_total",
            "Instances marked unhealthy for replacement.",
            "counter",
            |g| g.replaced_total.to_string(),
        ),
        (
            "bakery_group_frozen",
            "1 while the fleet breaker holds replacements back.",
            "gauge",
            |g| u8::from(g.frozen).to_string(),
        ),
    ];
    for (name, help, kind, pick) in per_group {
        gauge(&mut out, name, help, kind);
        for (group, g) in &s.groups {
            let _ = writeln!(out, "{name}{{group=\"{}\"}} {}", esc(group), pick(g));
        }
    }
    gauge(
        &mut out,
        "bakery_fleet_frozen",
        "1 while too much of all watched groups is unhealthy.",
        "gauge",
    );
    let _ = writeln!(out, "bakery_fleet_frozen {}", u8::from(s.fleet_frozen));
    let stats = budget::stats();
    gauge(
        &mut out,
        "bakery_api_calls_total",
        "AWS API calls (attempts) by action.",
        "counter",
    );
    for (action, st) in &stats {
        let _ = writeln!(
            out,
            "bakery_api_calls_total{{action=\"{}\"}} {}",
            esc(action),
            st.calls
        );
    }
    gauge(
        &mut out,
        "bakery_api_throttles_total",
        "AWS API calls answered with throttling, by action.",
        "counter",
    );
    for (action, st) in &stats {
        let _ = writeln!(
            out,
            "bakery_api_throttles_total{{action=\"{}\"}} {}",
            esc(action),
            st.throttles
        );
    }
    gauge(
        &mut out,
        "bakery_api_errors_total",
        "AWS API calls failed otherwise, by action.",
        "counter",
    );
    for (action, st) in &stats {
        let _ = writeln!(
            out,
            "bakery_api_errors_total{{action=\"{}\"}} {}",
            esc(action),
            st.errors
        );
    }
    gauge(
        &mut out,
        "bakery_loop_duration_seconds",
        "Duration of the last round.",
        "gauge",
    );
    let _ = writeln!(
        out,
        "bakery_loop_duration_seconds {:.6}",
        s.last_loop.as_secs_f64()
    );
    gauge(
        &mut out,
        "bakery_loops_total",
        "Rounds completed.",
        "counter",
    );
    let _ = writeln!(out, "bakery_loops_total {}", s.loops);
    gauge(
        &mut out,
        "bakery_loop_errors_total",
        "Rounds that failed (API errors); the daemon keeps going.",
        "counter",
    );
    let _ = writeln!(out, "bakery_loop_errors_total {}", s.loop_errors);
    out
}

/// Healthy while rounds complete: the last one ended within three intervals.
fn healthz(s: &Snapshot, now: u64) -> (u16, String) {
    let stale = (s.interval * 3).as_secs().max(30);
    if s.loops > 0 && now.saturating_sub(s.last_round_at) <= stale {
        (200, "ok\n".into())
    } else if s.loops == 0 {
        (503, "starting\n".into())
    } else {
        (
            503,
            format!(
                "no round completed for {}s\n",
                now.saturating_sub(s.last_round_at)
            ),
        )
    }
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Shared) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let snapshot = shared.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            let (status, ctype, body) = match path {
                "/metrics" => (200, "text/plain; version=0.0.4", render(&snapshot)),
                "/healthz" => {
                    let (s, b) = healthz(&snapshot, now);
                    (s, "text/plain", b)
                }
                _ => (
                    404,
                    "text/plain",
                    "not found: try /metrics or /healthz\n".into(),
                ),
            };
            let reason = match status {
                200 => "OK",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            let response = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_group_series_and_health() {
        let mut s = Snapshot {
            interval: Duration::from_secs(5),
            ..Default::default()
        };
        s.groups.insert(
            "web".into(),
            GroupFigures {
                instances: 4,
                healthy: 1,
                unhealthy: 3,
                replaced_total: 2,
                frozen: true,
            },
        );
        let text = render(&s);
        assert!(text.contains("bakery_group_unhealthy{group=\"web\"} 3\n"));
        assert!(text.contains("bakery_group_frozen{group=\"web\"} 1\n"));
        assert!(text.contains("# TYPE bakery_group_replaced_total counter\n"));
        assert_eq!(healthz(&s, 100).0, 503, "no round yet");
        s.loops = 1;
        s.last_round_at = 100;
        assert_eq!(healthz(&s, 110).0, 200);
        assert_eq!(healthz(&s, 200).0, 503);
    }
}
