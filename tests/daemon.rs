//! `bakery daemon` end to end against the world: a fleet of live instances behind a load
//! balancer; app crashes made with `scripts/world kill`. Each test runs its own daemon on its
//! own fleet and port.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The daemon's log message for a replacement.
const MARKED: &str = "marked unhealthy: the group replaces it";

/// The world's fault spec is one for the whole world: the tests that set it take turns.
static FAULTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn world() -> &'static World {
    static W: std::sync::OnceLock<World> = std::sync::OnceLock::new();
    W.get_or_init(World::get)
}

struct Daemon {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
    config: std::path::PathBuf,
}

impl Daemon {
    /// Starts a daemon watching `group` with the world's interval of 1 s and a threshold of 2.
    fn start(world: &World, name: &str, group: &str, extra: &str, key: &str) -> Daemon {
        let dir = scratch(&format!("daemon-{name}"));
        let port = free_port();
        let config = dir.join("daemon.toml");
        std::fs::write(
            &config,
            format!(
                r#"interval = "1s"
unhealthy_threshold = 2
listen = "127.0.0.1:{port}"
{extra}
[[group]]
name = "{group}"
probe = {{ type = "http", port = 8080, path = "/healthz", timeout = "500ms", unhealthy_threshold = 1, healthy_threshold = 1 }}
"#
            ),
        )
        .unwrap();
        let log = dir.join("daemon.log");
        let child = world
            .bakery()
            .env("AWS_ACCESS_KEY_ID", key)
            .args(["daemon", "--log-format", "json", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            port,
            log,
            config,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while d.metrics().is_none_or(|m| {
            !m.contains("bakery_loops_total ") || m.contains("bakery_loops_total 0\n")
        }) {
            assert!(
                Instant::now() < deadline,
                "the daemon never completed a round: {}",
                d.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }

    fn metrics(&self) -> Option<String> {
        http_get(
            "127.0.0.1",
            self.port,
            "/metrics",
            Duration::from_millis(500),
        )
        .ok()
        .map(|(_, b)| b)
    }

    fn metric(&self, series: &str) -> Option<f64> {
        self.metrics()?
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first log line with `message` that `pred` accepts, waiting up to `within` for it;
    /// fails the test with `what` and the log otherwise.
    async fn wait_event(
        &self,
        message: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
        within: Duration,
        what: &str,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(e) = self.events(message).into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(Instant::now() < deadline, "{what}: {}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits up to `within` until `pred` accepts the metric `series` (`None`: not exported);
    /// fails the test with `what`, the metrics and the log otherwise.
    async fn wait_metric(
        &self,
        series: &str,
        pred: impl Fn(Option<f64>) -> bool,
        within: Duration,
        what: &str,
    ) {
        let deadline = Instant::now() + within;
        while !pred(self.metric(series)) {
            assert!(
                Instant::now() < deadline,
                "{what}:\n{}\n{}",
                self.metrics().unwrap_or_default(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Log lines (JSON) whose message is `message`.
    fn events(&self, message: &str) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["message"] == message)
            .collect()
    }

    fn stop(mut self) -> (Option<i32>, Duration, String) {
        let started = Instant::now();
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        (status.code(), started.elapsed(), self.logs())
    }
}

/// A test that fails must not leave its daemon running.
impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn parse_ts(ts: &str) -> f64 {
    let t =
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).unwrap();
    t.unix_timestamp_nanos() as f64 / 1e9
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

async fn instance_ids(world: &World, fleet: &Fleet) -> Vec<String> {
    let mut ids: Vec<String> = fleet
        .group(world)
        .await
        .instances()
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

fn suspended(g: &aws_sdk_autoscaling::types::AutoScalingGroup) -> Vec<String> {
    g.suspended_processes()
        .iter()
        .filter_map(|p| p.process_name().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_app_is_replaced_within_interval_times_threshold_and_the_group_heals() {
    let world = world();
    let fleet = Fleet::create(world, "heal", 4).await;
    let d = Daemon::start(world, "heal", &fleet.asg, "", "daemon-heal");
    let g = fleet.group(world).await;
    assert!(
        suspended(&g).contains(&"HealthCheck".to_string()),
        "the daemon took over HealthCheck"
    );
    assert!(!suspended(&g).contains(&"ReplaceUnhealthy".to_string()));
    assert!(
        g.tags().iter().any(|t| t.key() == Some("bakery:daemon")),
        "the takeover is recorded"
    );

    let victim = instance_ids(world, &fleet).await[0].clone();
    let killed_at = unix_now();
    world_kill(world, &victim);
    let marked = d
        .wait_event(
            MARKED,
            |e| e["instance"] == victim.as_str(),
            Duration::from_secs(10),
            "not marked",
        )
        .await;
    let latency = parse_ts(marked["timestamp"].as_str().unwrap()) - killed_at;
    assert!(
        latency <= 1.0 * 2.0 + 2.0,
        "marked {latency:.2}s after the kill"
    );
    assert!(
        marked["evidence"].as_str().unwrap().contains("probe :8080"),
        "{marked}"
    );

    // The group replaces it and returns to 4 healthy.
    let deadline = Instant::now() + Duration::from_secs(30);
    while instance_ids(world, &fleet).await.contains(&victim) {
        assert!(Instant::now() < deadline, "{victim} was never replaced");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fleet.wait_healthy(world, 4, Duration::from_secs(30)).await;
    assert_eq!(
        d.metric(&format!(
            "bakery_group_replaced_total{{group=\"{}\"}}",
            fleet.asg
        )),
        Some(1.0)
    );

    let (code, took, logs) = d.stop();
    assert_eq!(code, Some(0), "{logs}");
    assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
    let g = fleet.group(world).await;
    assert!(
        !suspended(&g).contains(&"HealthCheck".to_string()),
        "HealthCheck resumed at stop"
    );
    assert!(
        !g.tags().iter().any(|t| t.key() == Some("bakery:daemon")),
        "takeover tag removed"
    );
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_outage_freezes_the_group_and_the_freeze_lifts_when_apps_return() {
    let world = world();
    let fleet = Fleet::create(world, "freeze", 4).await;
    let d = Daemon::start(world, "freeze", &fleet.asg, "", "daemon-freeze");
    let before = instance_ids(world, &fleet).await;
    for id in &before[..3] {
        world_kill(world, id);
    }
    let frozen = format!("bakery_group_frozen{{group=\"{}\"}}", fleet.asg);
    d.wait_metric(
        &frozen,
        |v| v == Some(1.0),
        Duration::from_secs(10),
        "never froze",
    )
    .await;
    // Well past interval x threshold: still nothing replaced.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        instance_ids(world, &fleet).await,
        before,
        "nothing was terminated"
    );
    assert!(d.events(MARKED).is_empty(), "{}", d.logs());
    let unhealthy = format!("bakery_group_unhealthy{{group=\"{}\"}}", fleet.asg);
    assert_eq!(d.metric(&unhealthy), Some(3.0));
    assert_eq!(d.metric("bakery_fleet_frozen"), Some(1.0));

    // The shared dependency recovers: the apps come back (a reboot restarts their services).
    world
        .ec2()
        .reboot_instances()
        .set_instance_ids(Some(before[..3].to_vec()))
        .send()
        .await
        .unwrap();
    d.wait_metric(
        &frozen,
        |v| v == Some(0.0),
        Duration::from_secs(20),
        "the freeze never lifted",
    )
    .await;
    assert_eq!(
        instance_ids(world, &fleet).await,
        before,
        "the same four instances serve again"
    );
    assert!(!d.events("fleet breaker: freeze lifted").is_empty());
    d.stop();
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_inside_its_grace_period_is_not_replaced() {
    let world = world();
    let fleet = Fleet::create_with_grace(world, "grace", 2, 120).await;
    let d = Daemon::start(world, "grace", &fleet.asg, "", "daemon-grace");
    let ids = instance_ids(world, &fleet).await;
    world_kill(world, &ids[0]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        instance_ids(world, &fleet).await,
        ids,
        "nothing replaced inside the grace period"
    );
    assert!(d.events(MARKED).is_empty());
    d.stop();
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn under_30_percent_throttling_the_daemon_keeps_looping_and_still_heals() {
    let world = world();
    let fleet = Fleet::create(world, "throttle", 4).await;
    let key = format!("daemon-throttle-{}", std::process::id());
    // Only this daemon's calls are throttled: other tests keep running untouched.
    let faults = FAULTS.lock().await;
    world_fault(world, 11, &key, "*", "throttle", 0.3);
    let d = Daemon::start(world, "throttle", &fleet.asg, "", &key);
    let loops_before = d.metric("bakery_loops_total").unwrap();
    let victim = instance_ids(world, &fleet).await[1].clone();
    world_kill(world, &victim);
    d.wait_event(
        MARKED,
        |e| e["instance"] == victim.as_str(),
        Duration::from_secs(20),
        "not replaced under throttling",
    )
    .await;
    let throttles: f64 = d
        .metrics()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("bakery_api_throttles_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let loops_after = d.metric("bakery_loops_total").unwrap();
    clear_world_faults(world);
    drop(faults);
    assert!(
        throttles > 0.0,
        "the world throttled the daemon: {}",
        d.metrics().unwrap()
    );
    assert!(loops_after > loops_before, "the loop kept going");
    let (code, _, logs) = d.stop();
    assert_eq!(code, Some(0), "{logs}");
    fleet.wait_healthy(world, 4, Duration::from_secs(30)).await;
    fleet.delete(world).await;
}

#[test]
fn config_errors_are_clear_and_fatal() {
    let dir = scratch("daemon-config");
    let cases: &[(&str, &[&str])] = &[
        (
            "interval = \"fast\"\n[[group]]\nname = \"web\"\n",
            &[
                "daemon.toml:1:12:",
                "`interval` = \"fast\" is not a positive duration",
            ],
        ),
        (
            "[[group]]\nname = \"web\"\nprobe = { type = \"http\", port = 99999 }\n",
            &["`port` = 99999 is out of range"],
        ),
        (
            "listen = \"everywhere\"\n[[group]]\nname = \"web\"\n",
            &["`listen` = \"everywhere\" is not an address:port"],
        ),
        (
            "[breaker]\nmax_replace = \"lots\"\n[[group]]\nname = \"web\"\n",
            &["`max_replace`", "25%"],
        ),
        ("interval = \"5s\"\n", &["no [[group]] to watch"]),
        (
            "[[group]]\nname = \"web\"\nprobe_port = 80\n",
            &["daemon.toml:3:1:", "unknown field `probe_port`"],
        ),
    ];
    for (text, expected) in cases {
        let path = dir.join("daemon.toml");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        for args in [
            vec!["daemon", "--check", "--config"],
            vec!["daemon", "--config"],
        ] {
            let out = Command::new(BIN)
                .args(&args)
                .arg(&path)
                .env("AWS_REGION", "us-east-1")
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} {text:?}: {stderr}");
            for e in *expected {
                assert!(stderr.contains(e), "{args:?}: expected {e:?} in {stderr}");
            }
        }
    }
    let out = Command::new(BIN)
        .args(["daemon", "--config", "/nonexistent/daemon.toml"])
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/daemon.toml"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_config_and_a_bad_reload_keeps_the_running_one() {
    let world = world();
    let fleet = Fleet::create(world, "reload", 2).await;
    // A second group, empty: watched only after the reload.
    let other = fleet.empty_sibling(world, "other", "1", false).await;
    let d = Daemon::start(world, "reload", &fleet.asg, "", "daemon-reload");
    let running = std::fs::read_to_string(&d.config).unwrap();
    let hup = |d: &Daemon| {
        Command::new("kill")
            .args(["-HUP", &d.child.id().to_string()])
            .status()
            .unwrap();
    };

    // A bad reload: the error names the file and line, the daemon keeps its config and loops.
    std::fs::write(&d.config, format!("{running}\nintervall = \"5s\"\n")).unwrap();
    hup(&d);
    let failed = d
        .wait_event(
            "reload failed; keeping the running configuration",
            |_| true,
            Duration::from_secs(10),
            "no failed reload",
        )
        .await;
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("daemon.toml") && error.contains("intervall"),
        "{error}"
    );
    let loops = d.metric("bakery_loops_total").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        d.metric("bakery_loops_total").unwrap() > loops,
        "still looping"
    );

    // A good reload: the second group is watched from the next round.
    std::fs::write(
        &d.config,
        format!("{running}\n[[group]]\nname = \"{other}\"\n"),
    )
    .unwrap();
    hup(&d);
    let reloaded = d
        .wait_event(
            "configuration reloaded",
            |_| true,
            Duration::from_secs(10),
            "no reload",
        )
        .await;
    assert_eq!(reloaded["groups"], 2, "{reloaded}");
    let series = format!("bakery_group_instances{{group=\"{other}\"}}");
    d.wait_metric(
        &series,
        |v| v.is_some(),
        Duration::from_secs(10),
        &format!("{other} never watched"),
    )
    .await;
    let (code, _, logs) = d.stop();
    assert_eq!(code, Some(0), "{logs}");
    delete_group(world, &other).await;
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn through_an_api_outage_the_daemon_keeps_looping_and_heals_once_it_is_back() {
    let world = world();
    let fleet = Fleet::create(world, "outage", 2).await;
    let key = format!("daemon-outage-{}", std::process::id());
    let d = Daemon::start(world, "outage", &fleet.asg, "", &key);
    // Every call of this daemon's is dropped, as when the endpoint is unreachable.
    let faults = FAULTS.lock().await;
    world_fault(world, 12, &key, "*", "drop", 1.0);
    d.wait_metric(
        "bakery_loop_errors_total",
        |v| v.unwrap_or(0.0) >= 2.0,
        Duration::from_secs(30),
        "rounds did not fail under the outage",
    )
    .await;
    let (code, _) = http_get("127.0.0.1", d.port, "/healthz", Duration::from_secs(1)).unwrap();
    assert_eq!(code, 200, "a short outage is not a dead daemon");
    assert!(!d.events("round failed; the daemon keeps going").is_empty());
    // An endpoint that accepts and never answers in time: the round gives up within its budget.
    world_fault(world, 13, &key, "*", "latency_ms", 8000.0);
    d.wait_event(
        "round failed; the daemon keeps going",
        |e| {
            e["error"]
                .as_str()
                .unwrap_or("")
                .contains("did not answer within 5s")
        },
        Duration::from_secs(30),
        "a hanging API stalled the loop",
    )
    .await;
    clear_world_faults(world);
    drop(faults);

    // Back: the next rounds succeed and a crashed app is replaced as usual.
    let victim = instance_ids(world, &fleet).await[0].clone();
    world_kill(world, &victim);
    d.wait_event(
        MARKED,
        |e| e["instance"] == victim.as_str(),
        Duration::from_secs(20),
        "not replaced after the outage",
    )
    .await;
    let (code, _, logs) = d.stop();
    assert_eq!(code, Some(0), "{logs}");
    fleet.wait_healthy(world, 2, Duration::from_secs(30)).await;
    fleet.delete(world).await;
}

#[test]
fn under_systemd_it_notifies_ready_and_feeds_the_watchdog_between_long_rounds() {
    use std::os::unix::net::UnixDatagram;
    let world = world();
    let dir = scratch("daemon-watchdog");
    let socket = dir.join("notify.sock");
    let listener = UnixDatagram::bind(&socket).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let config = dir.join("daemon.toml");
    // An interval (6 s) longer than the watchdog's (2 s, as WatchdogSec=2s would ask).
    std::fs::write(
        &config,
        format!(
            "interval = \"6s\"\nlisten = \"127.0.0.1:{}\"\n[[group]]\nname = \"no-such-group\"\n",
            free_port()
        ),
    )
    .unwrap();
    // systemd names the main process in WATCHDOG_PID: the shell execs into bakery, same pid.
    let cmd = world.bakery();
    let mut child = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" daemon --config \"$1\""])
        .arg(cmd.get_program())
        .arg(&config)
        .envs(
            cmd.get_envs()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
        )
        .env("NOTIFY_SOCKET", &socket)
        .env("WATCHDOG_USEC", "2000000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut got: Vec<(f64, String)> = Vec::new();
    let mut buf = [0u8; 512];
    while started.elapsed() < Duration::from_secs(8) {
        if let Ok(n) = listener.recv(&mut buf) {
            got.push((
                started.elapsed().as_secs_f64(),
                String::from_utf8_lossy(&buf[..n]).trim().to_string(),
            ));
        }
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(got.iter().any(|(_, m)| m == "READY=1"), "{got:?}");
    let pings: Vec<f64> = got
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    // Between the first round (t ~ 0) and the second (t ~ 6 s), at least every second.
    assert!(
        pings.len() >= 6 && pings.windows(2).all(|w| w[1] - w[0] < 1.5),
        "{got:?}"
    );
    assert_eq!(status.code(), Some(0));
}
