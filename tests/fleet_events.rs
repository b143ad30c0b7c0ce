//! `bakery daemon` with `[events]` (issue #14 part 4) against the world: a Spot interruption
//! warning put on the queue by `scripts/world interrupt` (as EventBridge delivers it) is answered
//! by launching the replacement first; the doomed instance is retired only once the replacement
//! is in service, before EC2 would have ended it. Duplicate deliveries change nothing; a queue
//! that does not exist stops the daemon at start.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn world() -> &'static World {
    static W: std::sync::OnceLock<World> = std::sync::OnceLock::new();
    W.get_or_init(World::get)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

struct Daemon {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Daemon {
    fn spawn(world: &World, name: &str, group: &str, queue_url: &str) -> Daemon {
        let dir = scratch(&format!("events-{name}"));
        let port = free_port();
        let config = dir.join("daemon.toml");
        std::fs::write(
            &config,
            format!(
                r#"interval = "1s"
unhealthy_threshold = 2
listen = "127.0.0.1:{port}"
[events]
queue_url = "{queue_url}"
[[group]]
name = "{group}"
"#
            ),
        )
        .unwrap();
        let log = dir.join("daemon.log");
        let child = world
            .bakery()
            .env("AWS_ACCESS_KEY_ID", format!("events-{name}"))
            .args(["daemon", "--log-format", "json", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, port, log }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn events(&self, message: &str) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["message"] == message)
            .collect()
    }

    fn metric(&self, series: &str) -> Option<f64> {
        let (_, m) = http_get(
            "127.0.0.1",
            self.port,
            "/metrics",
            Duration::from_millis(500),
        )
        .ok()?;
        m.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn stop(mut self) -> (Option<i32>, String) {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        (status.code(), self.logs())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A queue of the test's own (the world's interruptions can be sent to it alone).
async fn make_queue(world: &World, name: &str) -> String {
    aws_sdk_sqs::Client::new(&world.sdk_config())
        .create_queue()
        .queue_name(format!("{name}-{}", std::process::id()))
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_string()
}

/// (instance id, lifecycle state) of the group's instances.
async fn members(world: &World, fleet: &Fleet) -> Vec<(String, String)> {
    fleet
        .group(world)
        .await
        .instances()
        .iter()
        .map(|i| {
            (
                i.instance_id().unwrap().to_string(),
                i.lifecycle_state().unwrap().as_str().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spot_interruption_is_replaced_in_service_before_the_instance_ends_and_duplicates_change_nothing(
) {
    let world = world();
    let fleet = Fleet::create(world, "spot", 2).await;
    let queue = make_queue(world, "spot-events").await;
    let d = Daemon::spawn(world, "spot", &fleet.asg, &queue);
    let before: Vec<String> = members(world, &fleet)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let doomed = before[0].clone();
    // Delivered three times (EventBridge delivers at least once), with a 20 s notice.
    let (status, body) = world_control(
        world,
        "POST",
        &format!("/_world/instances/{doomed}/interrupt"),
        &serde_json::json!({"kind": "spot", "notice": 20, "queue": queue, "repeat": 3}).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let sent: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ends_at = sent["ends_at"].as_f64().unwrap();
    // Watch the group until the doomed instance is gone: when did a new instance first show
    // InService, and when did the doomed one leave?
    let mut replacement_in_service: Option<(String, f64)> = None;
    let deadline = Instant::now() + Duration::from_secs(40);
    let gone_at = loop {
        let now = members(world, &fleet).await;
        let t = unix_now();
        if replacement_in_service.is_none() {
            if let Some((id, _)) = now
                .iter()
                .find(|(id, state)| !before.contains(id) && state == "InService")
            {
                replacement_in_service = Some((id.clone(), t));
            }
        }
        if !now
            .iter()
            .any(|(id, state)| *id == doomed && state == "InService")
        {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "{doomed} never left: {}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (replacement, in_service_at) = replacement_in_service
        .unwrap_or_else(|| panic!("no replacement before {doomed} left: {}", d.logs()));
    assert!(
        in_service_at < gone_at && gone_at < ends_at,
        "replacement {replacement} in service at {in_service_at:.1}, {doomed} left at {gone_at:.1}, EC2 would end it at {ends_at:.1}"
    );
    let retired = d.events("fleet event: replacement in service; the doomed instance is retired");
    assert_eq!(retired.len(), 1, "{}", d.logs());
    assert_eq!(retired[0]["instance"], doomed.as_str());
    // One raise for three deliveries; the group returns to its capacity.
    assert_eq!(
        d.events("fleet event: desired capacity raised to launch the replacement first")
            .len(),
        1
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let g = fleet.group(world).await;
        let in_service = g
            .instances()
            .iter()
            .filter(|i| i.lifecycle_state().map(|s| s.as_str()) == Some("InService"))
            .count();
        if g.desired_capacity() == Some(2) && in_service == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "desired {:?}, {in_service} in service",
            g.desired_capacity()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        d.metric("bakery_events_handled_total{kind=\"spot\"}"),
        Some(1.0)
    );
    // The world's record: the instance was already gone when the notice ran out.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = world_control(world, "GET", "/_world/events", "");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let outcome = v
            .as_array()
            .or_else(|| v["events"].as_array())
            .and_then(|a| a.iter().find(|e| e["event_id"] == sent["event_id"]))
            .map(|e| e["outcome"].clone());
        if let Some(o) = outcome.filter(|o| !o.is_null()) {
            assert!(
                o.as_str().unwrap_or_default().starts_with("skipped"),
                "EC2 ended it itself: {o}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no outcome: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (code, logs) = d.stop();
    assert_eq!(code, Some(0), "{logs}");
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_that_does_not_exist_stops_the_daemon_naming_it() {
    let world = world();
    let endpoint = world
        .var("AWS_ENDPOINT_URL")
        .trim_end_matches('/')
        .to_string();
    let url = format!(
        "{endpoint}/123456789012/no-such-queue-{}",
        std::process::id()
    );
    let mut d = Daemon::spawn(world, "noqueue", "world-web", &url);
    let status = d.child.wait().unwrap();
    let logs = d.logs();
    assert_eq!(status.code(), Some(2), "{logs}");
    assert!(
        logs.contains(&url) && logs.contains("the queue does not exist"),
        "{logs}"
    );
}
