//! `/metrics` (Prometheus text format) and `/healthz` for the daemon, served on a loopback
//! address by default. Two read-only GET endpoints need no web framework: a small accept loop
//! over tokio's TcpListener does it without adding a server stack to the binary. The loop backs
//! off when accepting fails (out of file descriptors: EMFILE) instead of spinning, and serves at
//! most [`MAX_CONNECTIONS`] at once; a connection gets [`CONNECTION_TIMEOUT`] in all.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::aws::budget::{ActionStats, CallPolicy};

/// Connections served at once: Prometheus and a health checker need a handful; more waits in
/// the listen backlog.
pub const MAX_CONNECTIONS: usize = 32;
/// How long one connection may take, request and answer.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a request's head read; the rest is not looked at.
const MAX_HEAD: usize = 8192;
/// The pause after a failed accept doubles from this to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// One group's figures after the last round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupFigures {
    pub instances: u32,
    pub healthy: u32,
    pub unhealthy: u32,
    pub replaced_total: u64,
    pub frozen: bool,
}

/// With a `[lease]` table: this daemon's part in sharing the groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharingFigures {
    pub table: String,
    /// Until when the membership is valid (milliseconds since the epoch; 0: not a member).
    pub member_until_ms: u64,
    /// Live members, this daemon included.
    pub live: usize,
    /// The groups whose leases this daemon holds.
    pub owned: BTreeSet<String>,
    pub renewals: u64,
    pub failures: u64,
    pub takeovers: u64,
}

/// What the endpoints serve; the loop updates it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub groups: BTreeMap<String, GroupFigures>,
    /// Groups named in the configuration that the last read did not find.
    pub missing: BTreeSet<String>,
    pub fleet_frozen: bool,
    pub loops: u64,
    pub loop_errors: u64,
    /// Reads a round's budget could not fit, carried over to the next round.
    pub reads_carried: u64,
    pub last_loop: Duration,
    /// Seconds since the epoch of the last completed round.
    pub last_round_at: u64,
    pub interval: Duration,
    /// The interval rounds actually come at: longer than `interval` when the API budget cannot
    /// cover a round within it.
    pub effective_interval: Duration,
    /// With a `[lease]` table.
    pub sharing: Option<SharingFigures>,
    /// Fleet events handled (`[events]`), by kind.
    pub events_handled: BTreeMap<String, u64>,
}

pub type Shared = Arc<Mutex<Snapshot>>;

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One series without labels.
fn single(out: &mut String, name: &str, help: &str, kind: &str, value: impl std::fmt::Display) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

fn per_group(out: &mut String, s: &Snapshot) {
    type Pick = fn(&GroupFigures) -> String;
    let series: [(&str, &str, &str, Pick); 5] = [
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
    for (name, help, kind, pick) in series {
        header(out, name, help, kind);
        for (group, g) in &s.groups {
            let _ = writeln!(out, "{name}{{group=\"{}\"}} {}", esc(group), pick(g));
        }
    }
    header(
        out,
        "bakery_group_missing",
        "1 for a group named in the configuration that does not exist.",
        "gauge",
    );
    for group in &s.missing {
        let _ = writeln!(out, "bakery_group_missing{{group=\"{}\"}} 1", esc(group));
    }
}

fn api(out: &mut String, stats: &BTreeMap<&'static str, ActionStats>) {
    type Pick = fn(&ActionStats) -> u64;
    let series: [(&str, &str, Pick); 3] = [
        (
            "bakery_api_calls_total",
            "AWS API calls (attempts) by action.",
            |s| s.calls,
        ),
        (
            "bakery_api_throttles_total",
            "AWS API calls answered with throttling, by action.",
            |s| s.throttles,
        ),
        (
            "bakery_api_errors_total",
            "AWS API calls failed otherwise, by action.",
            |s| s.errors,
        ),
    ];
    for (name, help, pick) in series {
        header(out, name, help, "counter");
        for (action, st) in stats {
            let _ = writeln!(out, "{name}{{action=\"{}\"}} {}", esc(action), pick(st));
        }
    }
}

fn rounds(out: &mut String, s: &Snapshot) {
    single(
        out,
        "bakery_loop_duration_seconds",
        "Duration of the last round.",
        "gauge",
        format!("{:.6}", s.last_loop.as_secs_f64()),
    );
    single(
        out,
        "bakery_loops_total",
        "Rounds completed.",
        "counter",
        s.loops,
    );
    single(
        out,
        "bakery_loop_errors_total",
        "Rounds that failed (the API answered none of their reads); the daemon keeps going.",
        "counter",
        s.loop_errors,
    );
    single(
        out,
        "bakery_reads_carried_total",
        "Reads a round's budget could not fit, carried over to the next round.",
        "counter",
        s.reads_carried,
    );
    single(
        out,
        "bakery_effective_interval_seconds",
        "The interval rounds come at: the configured one, or longer when the API budget cannot cover a round within it.",
        "gauge",
        format!("{:.3}", s.effective_interval.as_secs_f64()),
    );
}

pub fn render(s: &Snapshot, stats: &BTreeMap<&'static str, ActionStats>) -> String {
    let mut out = String::new();
    per_group(&mut out, s);
    single(
        &mut out,
        "bakery_fleet_frozen",
        "1 while too much of all watched groups is unhealthy.",
        "gauge",
        u8::from(s.fleet_frozen),
    );
    api(&mut out, stats);
    rounds(&mut out, s);
    sharing(&mut out, s);
    out
}

fn sharing(out: &mut String, s: &Snapshot) {
    if !s.events_handled.is_empty() {
        header(
            out,
            "bakery_events_handled_total",
            "Fleet events (interruption, rebalance, scheduled maintenance) handled, by kind.",
            "counter",
        );
        for (kind, n) in &s.events_handled {
            let _ = writeln!(
                out,
                "bakery_events_handled_total{{kind=\"{}\"}} {n}",
                esc(kind)
            );
        }
    }
    let Some(f) = &s.sharing else {
        return;
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default();
    single(
        out,
        "bakery_member",
        "1 while this daemon's membership in the lease table is valid.",
        "gauge",
        u8::from(f.member_until_ms > now_ms),
    );
    single(
        out,
        "bakery_members_live",
        "Live daemons sharing the groups, this one included.",
        "gauge",
        f.live,
    );
    single(
        out,
        "bakery_groups_owned",
        "Groups whose lease this daemon holds (it acts on them alone).",
        "gauge",
        f.owned.len(),
    );
    header(
        out,
        "bakery_group_owned",
        "1 for each group whose lease this daemon holds.",
        "gauge",
    );
    for g in &f.owned {
        let _ = writeln!(out, "bakery_group_owned{{group=\"{}\"}} 1", esc(g));
    }
    single(
        out,
        "bakery_lease_renewals_total",
        "Lease renewals written (membership and groups).",
        "counter",
        f.renewals,
    );
    single(
        out,
        "bakery_lease_failures_total",
        "Lease renewals that failed (not answered, or the lease was lost).",
        "counter",
        f.failures,
    );
    single(
        out,
        "bakery_takeovers_total",
        "Groups taken over from a daemon whose lease ran out.",
        "counter",
        f.takeovers,
    );
}

/// Healthy while rounds complete (the last one ended within three effective intervals), the
/// daemon holds a valid membership (with a lease table), and every group named in the
/// configuration exists. Otherwise a 503 listing every reason, one a line (a daemon cut off
/// from the API both misses rounds and loses its membership: the on-call engineer reads both).
/// A missing group is a 503 naming it: the daemon runs, but a group someone meant to protect is
/// not watched (a typo in the config, a group deleted or renamed). Restarting the daemon does
/// not fix it: the unit's restart logic listens to the watchdog, not to `/healthz`.
fn healthz(s: &Snapshot, now: u64) -> (u16, String) {
    if s.loops == 0 {
        return (503, "starting\n".into());
    }
    let pace = s.interval.max(s.effective_interval);
    let stale = pace.saturating_mul(3).as_secs().max(30);
    let mut reasons = Vec::new();
    if s.last_round_at == 0 {
        reasons.push(format!(
            "no round has completed since the start ({} failed)",
            s.loop_errors
        ));
    } else if now.saturating_sub(s.last_round_at) > stale {
        reasons.push(format!(
            "no round completed for {}s",
            now.saturating_sub(s.last_round_at)
        ));
    }
    if let Some(f) = s
        .sharing
        .as_ref()
        .filter(|f| f.member_until_ms <= now.saturating_mul(1000))
    {
        reasons.push(format!(
            "no valid membership in lease table {}: this daemon acts on no group",
            f.table
        ));
    }
    if !s.missing.is_empty() {
        let names: Vec<&str> = s.missing.iter().map(String::as_str).collect();
        reasons.push(format!(
            "degraded: watched group(s) not found: {} (the others are watched)",
            names.join(", ")
        ));
    }
    if reasons.is_empty() {
        (200, "ok\n".into())
    } else {
        (503, reasons.join("\n") + "\n")
    }
}

/// The answer to one request.
fn respond(path: &str, shared: &Shared, policy: &CallPolicy) -> String {
    let snapshot = shared.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let (status, ctype, body) = match path {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4",
            render(&snapshot, &policy.stats()),
        ),
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
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The request's head: read until the blank line that ends it (a client may send it in
/// several pieces, and a request line cut after `GET ` would otherwise be answered as `/`), until
/// [`MAX_HEAD`] bytes, or until the client stops sending. Reading it all also keeps the close
/// from resetting the connection before the client reads the answer.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while head.len() < MAX_HEAD
        && !head.windows(4).any(|w| w == b"\r\n\r\n")
        && !head.windows(2).any(|w| w == b"\n\n")
    {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Some(head)
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    shared: Shared,
    policy: Arc<CallPolicy>,
) {
    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, async {
        let head = read_head(&mut stream).await?;
        let head = String::from_utf8_lossy(&head);
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        let response = respond(path, &shared, &policy);
        stream.write_all(response.as_bytes()).await.ok()
    })
    .await;
}

/// Where connections come from: a TCP listener, or a test's stand-in.
pub trait Accept {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Stream> {
        TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

/// Serves until the task is dropped.
pub async fn serve<L: Accept>(listener: L, shared: Shared, policy: Arc<CallPolicy>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut failing = false;
    loop {
        // A free slot first: past the cap, connections wait in the listen backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok(stream) => {
                if failing {
                    tracing::info!("the metrics endpoint accepts connections again");
                    failing = false;
                }
                backoff = ACCEPT_BACKOFF_MIN;
                let (shared, policy) = (shared.clone(), policy.clone());
                tokio::spawn(async move {
                    handle(stream, shared, policy).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // Out of file descriptors (EMFILE), or the like: accepting again at once would
                // spin a core until it clears.
                if !failing {
                    tracing::warn!(error = %e, "the metrics endpoint cannot accept connections; retrying with backoff");
                    failing = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn shared() -> Shared {
        Arc::new(Mutex::new(Snapshot {
            interval: Duration::from_secs(5),
            ..Default::default()
        }))
    }

    #[test]
    fn renders_per_group_series_and_health() {
        let mut s = Snapshot {
            interval: Duration::from_secs(5),
            effective_interval: Duration::from_millis(6500),
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
        let stats = BTreeMap::from([(
            "ec2:DescribeInstanceStatus",
            ActionStats {
                calls: 7,
                throttles: 2,
                errors: 1,
            },
        )]);
        let text = render(&s, &stats);
        assert!(text.contains("bakery_group_unhealthy{group=\"web\"} 3\n"));
        assert!(text.contains("bakery_group_frozen{group=\"web\"} 1\n"));
        assert!(text.contains("# TYPE bakery_group_replaced_total counter\n"));
        assert!(
            text.contains("bakery_api_throttles_total{action=\"ec2:DescribeInstanceStatus\"} 2\n")
        );
        assert!(text.contains("bakery_effective_interval_seconds 6.500\n"));
        assert_eq!(healthz(&s, 100).0, 503, "no round yet");
        s.loops = 1;
        s.last_round_at = 100;
        assert_eq!(healthz(&s, 110).0, 200);
        assert_eq!(healthz(&s, 200).0, 503);
    }

    #[test]
    fn healthz_names_every_reason_and_a_daemon_that_never_completed_a_round_says_so() {
        let mut s = Snapshot {
            interval: Duration::from_secs(1),
            loops: 4,
            loop_errors: 4,
            last_round_at: 0,
            ..Default::default()
        };
        s.sharing = Some(SharingFigures {
            table: "leases".into(),
            member_until_ms: 99_000,
            ..Default::default()
        });
        s.missing.insert("web-typo".into());
        let (code, body) = healthz(&s, 100);
        assert_eq!(code, 503);
        assert_eq!(
            body,
            "no round has completed since the start (4 failed)\n\
             no valid membership in lease table leases: this daemon acts on no group\n\
             degraded: watched group(s) not found: web-typo (the others are watched)\n"
        );
        // Rounds complete and the membership is valid: only the missing group is left.
        s.last_round_at = 99;
        s.sharing = Some(SharingFigures {
            table: "leases".into(),
            member_until_ms: 101_000,
            ..Default::default()
        });
        let (code, body) = healthz(&s, 100);
        assert_eq!((code, body.lines().count()), (503, 1), "{body}");
    }

    #[test]
    fn a_missing_group_makes_healthz_say_which() {
        let mut s = Snapshot {
            interval: Duration::from_secs(5),
            loops: 3,
            last_round_at: 100,
            ..Default::default()
        };
        s.missing.insert("web-typo".into());
        let (code, body) = healthz(&s, 101);
        assert_eq!(code, 503);
        assert!(body.contains("not found: web-typo"), "{body}");
        assert!(
            render(&s, &BTreeMap::new()).contains("bakery_group_missing{group=\"web-typo\"} 1\n")
        );
    }

    /// Accepts fail with EMFILE, as when the process is out of file descriptors; after
    /// `limit` attempts the stand-in hangs, so that a loop that spins shows as `limit` attempts
    /// at once instead of hanging the test.
    struct Exhausted {
        attempts: Arc<AtomicUsize>,
        limit: usize,
    }

    impl Accept for Exhausted {
        type Stream = tokio::io::DuplexStream;
        async fn accept(&self) -> std::io::Result<Self::Stream> {
            if self.attempts.fetch_add(1, Ordering::SeqCst) >= self.limit {
                std::future::pending::<()>().await;
            }
            tokio::task::yield_now().await;
            Err(std::io::Error::from_raw_os_error(24))
        }
    }

    #[tokio::test]
    async fn failing_accepts_back_off_instead_of_spinning() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let server = tokio::spawn(serve(
            Exhausted {
                attempts: attempts.clone(),
                limit: 1000,
            },
            shared(),
            Arc::new(CallPolicy::default()),
        ));
        // Pauses of 10 ms doubling: about 5 attempts in 300 ms, however slow the machine (a
        // loop that spins makes its 1000 at once).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = attempts.load(Ordering::SeqCst);
        server.abort();
        assert!(n <= 20, "{n} accept attempts in 300 ms");
        assert!(n >= 2, "it keeps trying: {n}");
    }

    /// Hands out in-memory connections, counting them.
    struct Clients {
        rx: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<tokio::io::DuplexStream>>,
        accepted: Arc<AtomicUsize>,
    }

    impl Accept for Clients {
        type Stream = tokio::io::DuplexStream;
        async fn accept(&self) -> std::io::Result<Self::Stream> {
            match self.rx.lock().await.recv().await {
                Some(s) => {
                    self.accepted.fetch_add(1, Ordering::SeqCst);
                    Ok(s)
                }
                None => std::future::pending().await,
            }
        }
    }

    #[tokio::test]
    async fn a_request_that_arrives_in_pieces_is_answered_for_its_whole_path() {
        let (mut client, server_end) = tokio::io::duplex(4096);
        // The first piece is there before the server reads; the rest comes after its first read.
        client.write_all(b"GET ").await.unwrap();
        let (_, answer) = tokio::join!(
            handle(server_end, shared(), Arc::new(CallPolicy::default())),
            async {
                tokio::task::yield_now().await;
                client.write_all(b"/metrics HTTP/1.0\r\n").await.unwrap();
                tokio::task::yield_now().await;
                client.write_all(b"Host: 127.0.0.1\r\n\r\n").await.unwrap();
                let mut answer = String::new();
                client.read_to_string(&mut answer).await.unwrap();
                answer
            }
        );
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.contains("bakery_loops_total "), "{answer}");
    }

    #[tokio::test]
    async fn connections_are_capped_and_served_again_as_they_finish() {
        let (tx, rx) = tokio::sync::mpsc::channel(1000);
        let accepted = Arc::new(AtomicUsize::new(0));
        let server = tokio::spawn(serve(
            Clients {
                rx: tokio::sync::Mutex::new(rx),
                accepted: accepted.clone(),
            },
            shared(),
            Arc::new(CallPolicy::default()),
        ));
        // Many clients that connect and say nothing.
        let mut idle = Vec::new();
        for _ in 0..(MAX_CONNECTIONS + 40) {
            let (client, server_end) = tokio::io::duplex(4096);
            tx.send(server_end).await.unwrap();
            idle.push(client);
        }
        while accepted.load(Ordering::SeqCst) < MAX_CONNECTIONS {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            MAX_CONNECTIONS,
            "no more at once"
        );
        // The idle ones leave; the rest, and a real request, are served.
        let (mut client, server_end) = tokio::io::duplex(4096);
        tx.send(server_end).await.unwrap();
        drop(idle);
        client
            .write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.ends_with("starting\n"), "{answer}");
        server.abort();
    }
}
