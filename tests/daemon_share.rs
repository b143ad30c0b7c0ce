//! Several `bakery daemon`s sharing the stack's groups through a `[lease]` table (issue #14
//! parts 2, 5, 8), end to end against the world started with `scripts/world up --stack --groups
//! N`: exactly one owner per group (in `/metrics`), a kill -9 and a cut-off survived, the fence
//! before every mutating call checked by the world's call log per access key. Each daemon signs
//! with its own access key.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use common::*;

/// The daemon's log message for a replacement.
const MARKED: &str = "marked unhealthy: the group replaces it";
/// The lease TTL of these tests, and the interval.
const TTL: Duration = Duration::from_secs(6);
const INTERVAL: Duration = Duration::from_secs(1);

/// The stack's groups are one set for the whole world: the tests that share them take turns.
static STACK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn world() -> &'static World {
    static W: std::sync::OnceLock<World> = std::sync::OnceLock::new();
    W.get_or_init(World::get)
}

/// The stack's groups (`scripts/world up --stack --groups N`).
/// The home Region's only: the daemons watch one Region, and the suite's stack also has a
/// group in a second Region (for tests/release.rs).
fn stack_groups(world: &World) -> Vec<String> {
    let home = format!("{}/", world.var("AWS_REGION"));
    world
        .var("WORLD_STACK_GROUPS")
        .split(',')
        .filter_map(|g| g.strip_prefix(&home))
        .map(str::to_string)
        .collect()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn parse_ts(ts: &str) -> f64 {
    let t =
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).unwrap();
    t.unix_timestamp_nanos() as f64 / 1e9
}

/// A lease table made by `bakery init --lease-table`, unique to the test.
fn init_table(world: &World, what: &str) -> String {
    let table = format!("share-{what}-{}", std::process::id());
    let out = world
        .bakery()
        .env("AWS_ACCESS_KEY_ID", format!("init-{table}"))
        .args(["init", "--lease-table", &table])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    table
}

struct Daemon {
    name: String,
    key: String,
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Daemon {
    /// A daemon watching `groups`, sharing them through `table`, signing with its own access key.
    fn spawn(world: &World, name: &str, table: &str, groups: &[String], threshold: u32) -> Daemon {
        let dir = scratch(&format!("share-{name}"));
        let port = free_port();
        let config = dir.join("daemon.toml");
        let mut text = format!(
            r#"interval = "{}s"
unhealthy_threshold = {threshold}
listen = "127.0.0.1:{port}"
[lease]
table = "{table}"
ttl = "{}s"
"#,
            INTERVAL.as_secs(),
            TTL.as_secs()
        );
        for g in groups {
            text.push_str(&format!(
                "[[group]]\nname = \"{g}\"\nprobe = {{ type = \"http\", port = 8080, path = \"/healthz\", timeout = \"500ms\", unhealthy_threshold = 1, healthy_threshold = 1 }}\n"
            ));
        }
        std::fs::write(&config, text).unwrap();
        let log = dir.join("daemon.log");
        let key = format!("share-{name}-{}", std::process::id());
        let child = world
            .bakery()
            .env("AWS_ACCESS_KEY_ID", &key)
            .args(["daemon", "--log-format", "json", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon {
            name: name.to_string(),
            key,
            child,
            port,
            log,
        }
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get("127.0.0.1", self.port, path, Duration::from_millis(500)).ok()
    }

    fn metrics(&self) -> Option<String> {
        self.get("/metrics").map(|(_, b)| b)
    }

    fn metric(&self, series: &str) -> Option<f64> {
        self.metrics()?
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// The groups this daemon says it owns (`bakery_group_owned`); `None`: no answer.
    fn owned(&self) -> Option<BTreeSet<String>> {
        let m = self.metrics()?;
        Some(
            m.lines()
                .filter_map(|l| l.strip_prefix("bakery_group_owned{group=\""))
                .filter_map(|l| l.split_once('"').map(|(g, _)| g.to_string()))
                .collect(),
        )
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

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
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

/// Who owns each group, by the daemons' `/metrics` (daemons that do not answer own nothing).
fn owners(daemons: &[&Daemon]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in daemons {
        for g in d.owned().unwrap_or_default() {
            out.entry(g).or_default().push(d.name.clone());
        }
    }
    out
}

/// The owner rendezvous hashing gives each group among `daemons` (their members are
/// `host:pid`), computed here independently of the daemons.
fn assignment(groups: &[String], daemons: &[&Daemon]) -> BTreeMap<String, String> {
    let host = bakery::host::hostname();
    let members: Vec<String> = daemons
        .iter()
        .map(|d| format!("{host}:{}", d.child.id()))
        .collect();
    groups
        .iter()
        .map(|g| {
            let m = bakery_core::membership::owner_of(g, &members).unwrap();
            let i = members.iter().position(|x| x == m).unwrap();
            (g.clone(), daemons[i].name.clone())
        })
        .collect()
}

/// Waits until each group is owned by exactly the daemon `expected` names, by every daemon's
/// `/metrics`; returns when that was first seen.
async fn wait_owners(
    daemons: &[&Daemon],
    expected: &BTreeMap<String, String>,
    within: Duration,
) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        let o = owners(daemons);
        let want: BTreeMap<String, Vec<String>> = expected
            .iter()
            .map(|(g, d)| (g.clone(), vec![d.clone()]))
            .collect();
        if o == want {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "owners {o:?}, expected {want:?}\n{}",
            daemons
                .iter()
                .map(|d| format!("--- {}:\n{}", d.name, d.logs()))
                .collect::<String>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `bakery:daemon` record's owner on each group.
async fn tag_owners(world: &World, groups: &[String]) -> BTreeMap<String, String> {
    let out = world
        .asg()
        .describe_auto_scaling_groups()
        .set_auto_scaling_group_names(Some(groups.to_vec()))
        .send()
        .await
        .unwrap();
    out.auto_scaling_groups()
        .iter()
        .filter_map(|g| {
            let tag = g.tags().iter().find(|t| t.key() == Some("bakery:daemon"))?;
            let owner = tag
                .value()?
                .split(';')
                .find_map(|p| p.strip_prefix("owner="))?
                .to_string();
            Some((g.auto_scaling_group_name()?.to_string(), owner))
        })
        .collect()
}

async fn in_service(world: &World, group: &str) -> Vec<String> {
    let out = world
        .asg()
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(group)
        .send()
        .await
        .unwrap();
    let mut ids: Vec<String> = out.auto_scaling_groups()[0]
        .instances()
        .iter()
        .filter(|i| i.lifecycle_state().map(|s| s.as_str()) == Some("InService"))
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

/// Heals a partitioned access key when dropped (a failed test must not leave its partition in
/// the world for the tests after it).
struct Healed(&'static World, String);

impl Drop for Healed {
    fn drop(&mut self) {
        world_control(
            self.0,
            "DELETE",
            &format!("/_world/partitions/{}", self.1),
            "",
        );
    }
}

/// Whether every group in `groups` has `HealthCheck` suspended.
async fn health_check_suspended_everywhere(world: &World, groups: &[String]) -> bool {
    let out = world
        .asg()
        .describe_auto_scaling_groups()
        .set_auto_scaling_group_names(Some(groups.to_vec()))
        .send()
        .await
        .unwrap();
    out.auto_scaling_groups().len() == groups.len()
        && out.auto_scaling_groups().iter().all(|g| {
            g.suspended_processes()
                .iter()
                .any(|p| p.process_name() == Some("HealthCheck"))
        })
}

/// Waits until every stack group has 4 healthy targets again (a test leaves the stack as it
/// found it for the next).
async fn wait_stack_healthy(world: &World, groups: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    for g in groups {
        loop {
            let ids = in_service(world, g).await;
            if ids.len() >= 4 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{g} never had 4 in service again"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Instances marked unhealthy by any of `daemons`, each with how many times.
fn marked(daemons: &[&Daemon]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for d in daemons {
        for e in d.events(MARKED) {
            *out.entry(e["instance"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    out
}

/// The calls of access key `key` the world served (or not) since `since`, mutating only.
fn mutating_calls_since(
    world: &World,
    key: &str,
    since: f64,
    served: bool,
) -> Vec<serde_json::Value> {
    let (status, body) = world_control(
        world,
        "GET",
        &format!(
            "/_world/calls?access_key={key}&since={since}&mutating=true&served={served}&limit=100000"
        ),
        "",
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["calls"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_then_three_daemons_share_the_stacks_groups_with_exactly_one_owner_each() {
    let _turn = STACK.lock().await;
    let world = world();
    let groups = stack_groups(world);
    assert!(groups.len() >= 3, "start the world with --stack --groups 4");
    let table = init_table(world, "spread");
    let a = Daemon::spawn(world, "spread-a", &table, &groups, 2);
    let b = Daemon::spawn(world, "spread-b", &table, &groups, 2);
    let two = assignment(&groups, &[&a, &b]);
    wait_owners(&[&a, &b], &two, Duration::from_secs(30)).await;
    for d in [&a, &b] {
        assert_eq!(d.metric("bakery_members_live"), Some(2.0), "{}", d.logs());
        assert_eq!(d.metric("bakery_member"), Some(1.0));
    }
    let owned_total: f64 = [&a, &b]
        .iter()
        .map(|d| d.metric("bakery_groups_owned").unwrap())
        .sum();
    assert_eq!(owned_total, groups.len() as f64, "{two:?}");

    // A third joins: the groups rendezvous hashing gives it move to it, and only those.
    let c = Daemon::spawn(world, "spread-c", &table, &groups, 2);
    let three = assignment(&groups, &[&a, &b, &c]);
    wait_owners(&[&a, &b, &c], &three, Duration::from_secs(30)).await;
    for (g, o) in &three {
        assert!(
            *o == "spread-c" || *o == two[g],
            "{g} moved between a and b"
        );
    }
    // The takeover records follow the leases: each group's `bakery:daemon` names its owner.
    let pid_of = |name: &str| match name {
        "spread-a" => a.child.id(),
        "spread-b" => b.child.id(),
        _ => c.child.id(),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let tags = tag_owners(world, &groups).await;
        let agree = groups.iter().all(|g| {
            tags.get(g)
                .is_some_and(|o| o.ends_with(&format!(":{}", pid_of(&three[g]))))
        });
        if agree {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the takeover records do not follow the leases: {tags:?} vs {three:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Only the owner exports a group's health figures (from its next round on).
    let deadline = Instant::now() + Duration::from_secs(10);
    for g in &groups {
        let series = format!("bakery_group_instances{{group=\"{g}\"}}");
        loop {
            let exporting: Vec<&str> = [&a, &b, &c]
                .iter()
                .filter(|d| d.metric(&series).is_some())
                .map(|d| d.name.as_str())
                .collect();
            if exporting == vec![three[g].as_str()] {
                break;
            }
            assert!(Instant::now() < deadline, "{g}: exported by {exporting:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for d in [a, b, c] {
        let (code, logs) = d.stop();
        assert_eq!(code, Some(0), "{logs}");
    }
    // Stopped cleanly: every group handed back (HealthCheck resumed, records deleted).
    assert!(tag_owners(world, &groups).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_daemons_groups_are_owned_again_within_ttl_and_an_interval_and_nothing_is_replaced_twice(
) {
    let _turn = STACK.lock().await;
    let world = world();
    let groups = stack_groups(world);
    let table = init_table(world, "kill");
    let mut ds = vec![
        Daemon::spawn(world, "kill-a", &table, &groups, 2),
        Daemon::spawn(world, "kill-b", &table, &groups, 2),
        Daemon::spawn(world, "kill-c", &table, &groups, 2),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    while ds
        .iter()
        .any(|d| d.metric("bakery_members_live") != Some(3.0))
    {
        assert!(Instant::now() < deadline, "the three never saw each other");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refs: Vec<&Daemon> = ds.iter().collect();
    let before = assignment(&groups, &refs);
    wait_owners(&refs, &before, Duration::from_secs(30)).await;
    // The victim: the daemon owning the most groups.
    let victim_name = ds
        .iter()
        .max_by_key(|d| before.values().filter(|o| **o == d.name).count())
        .unwrap()
        .name
        .clone();
    let victim_groups: Vec<String> = before
        .iter()
        .filter(|(_, o)| **o == victim_name)
        .map(|(g, _)| g.clone())
        .collect();
    // An app dies in one of its groups, and the daemon is killed before it can act on it.
    let doomed_group = victim_groups[0].clone();
    let app = in_service(world, &doomed_group).await[0].clone();
    world_kill(world, &app);
    let i = ds.iter().position(|d| d.name == victim_name).unwrap();
    let mut victim = ds.remove(i);
    victim.kill9();
    let killed = Instant::now();
    let survivors: Vec<&Daemon> = ds.iter().collect();
    let after = assignment(&groups, &survivors);
    let at = wait_owners(&survivors, &after, Duration::from_secs(30)).await;
    let took = at - killed;
    eprintln!("groups of the killed daemon owned again after {took:?}");
    // TTL + one interval, plus the round that notices (its reads) and this poll.
    assert!(
        took <= TTL + INTERVAL + Duration::from_secs(1),
        "owned again only after {took:?}: {after:?}"
    );
    for (g, o) in &after {
        if !victim_groups.contains(g) {
            assert_eq!(*o, before[g], "{g} moved though its owner lived");
        }
    }
    let took_over: f64 = survivors
        .iter()
        .map(|d| d.metric("bakery_takeovers_total").unwrap_or(0.0))
        .sum();
    assert_eq!(took_over, victim_groups.len() as f64);
    // The dead app is replaced once, by the group's new owner.
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_service(world, &doomed_group).await.contains(&app) {
        assert!(Instant::now() < deadline, "{app} was never replaced");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_stack_healthy(world, &groups).await;
    let mut all: Vec<&Daemon> = ds.iter().collect();
    all.push(&victim);
    let m = marked(&all);
    assert_eq!(m.get(&app), Some(&1), "{m:?}");
    assert!(
        m.values().all(|n| *n == 1),
        "an instance replaced twice: {m:?}"
    );
    for d in ds {
        let (code, logs) = d.stop();
        assert_eq!(code, Some(0), "{logs}");
    }
    assert!(tag_owners(world, &groups).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_cut_off_for_twice_the_ttl_makes_no_mutating_call_once_its_lease_ran_out() {
    let _turn = STACK.lock().await;
    let world = world();
    let groups = stack_groups(world);
    let table = init_table(world, "cut");
    let a = Daemon::spawn(world, "cut-a", &table, &groups, 2);
    let b = Daemon::spawn(world, "cut-b", &table, &groups, 2);
    let before = assignment(&groups, &[&a, &b]);
    wait_owners(&[&a, &b], &before, Duration::from_secs(30)).await;
    // Both have completed a round, so every group's takeover is whole (record written and
    // HealthCheck suspended) before one is cut off: a cut between a daemon's record and its
    // suspension leaves the group's own health check on, which replaces the dead app itself
    // (as AWS would), and the test would prove nothing.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = [&a, &b]
            .iter()
            .all(|d| d.get("/healthz").is_some_and(|(c, _)| c == 200));
        if ok && health_check_suspended_everywhere(world, &groups).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemons never completed a round with every group taken over:\n{}\n{}",
            a.logs(),
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a_count = before.values().filter(|o| *o == "cut-a").count();
    let (cut, other) = if a_count > 0 { (&a, &b) } else { (&b, &a) };
    let cut_groups: Vec<String> = before
        .iter()
        .filter(|(_, o)| **o == cut.name)
        .map(|(g, _)| g.clone())
        .collect();
    // An app dies in one of the cut-off daemon's groups: it wants to act, and must not.
    let app = in_service(world, &cut_groups[0]).await[0].clone();
    let (status, body) = world_control(
        world,
        "POST",
        "/_world/partitions",
        &serde_json::json!({ "access_key": cut.key }).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let _heal = Healed(world, cut.key.clone());
    let cut_at = unix_now();
    let cut_instant = Instant::now();
    world_kill(world, &app);
    // The other daemon owns every group within TTL + an interval.
    let deadline = cut_instant + TTL + INTERVAL + Duration::from_secs(1);
    loop {
        let mine = other.owned().unwrap_or_default();
        if groups.iter().all(|g| mine.contains(g)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} never took every group: {mine:?}\n{}",
            other.name,
            other.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The cut-off daemon says it is no member (its membership ran out on its own clock).
    let deadline = cut_instant + TTL + Duration::from_secs(2);
    loop {
        let (code, body) = cut.get("/healthz").unwrap();
        if code == 503 && body.contains("no valid membership") {
            break;
        }
        assert!(Instant::now() < deadline, "/healthz still {code} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep_until((cut_instant + TTL * 2).into()).await;
    let (status, body) = world_control(
        world,
        "DELETE",
        &format!("/_world/partitions/{}", cut.key),
        "",
    );
    assert_eq!(status, 200, "{body}");
    let healed_at = unix_now();
    // It kept trying while cut off, and nothing it sent was served.
    assert!(!mutating_calls_since(world, &cut.key, cut_at, false).is_empty());
    let served: Vec<serde_json::Value> = mutating_calls_since(world, &cut.key, cut_at, true)
        .into_iter()
        .filter(|c| c["t"].as_f64().unwrap() < healed_at)
        .collect();
    assert!(served.is_empty(), "served while cut off: {served:?}");
    // Healed: it joins again, and every mutating call it makes on a group comes after it took
    // that group's lease anew: nothing rests on the lease it lost.
    wait_owners(&[&a, &b], &before, Duration::from_secs(20)).await;
    let retaken: Vec<f64> = cut
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| {
            e["message"] == "group lease taken"
                || e["message"] == "group taken over from a daemon whose lease ran out"
        })
        .map(|e| parse_ts(e["timestamp"].as_str().unwrap()))
        .filter(|t| *t >= healed_at)
        .collect();
    let first_lease = retaken.iter().cloned().fold(f64::INFINITY, f64::min);
    let group_calls: Vec<serde_json::Value> =
        mutating_calls_since(world, &cut.key, healed_at, true)
            .into_iter()
            .filter(|c| c["service"] != "dynamodb")
            .collect();
    for c in &group_calls {
        assert!(
            c["t"].as_f64().unwrap() >= first_lease,
            "{c} was served before the cut-off daemon took a lease again ({first_lease})"
        );
    }
    // The dead app was replaced by the daemon that owned its group then, once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_service(world, &cut_groups[0]).await.contains(&app) {
        assert!(Instant::now() < deadline, "{app} was never replaced");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_stack_healthy(world, &groups).await;
    let m = marked(&[&a, &b]);
    assert_eq!(
        m.get(&app),
        Some(&1),
        "{m:?}\n{}:\n{}\n{}:\n{}",
        a.name,
        a.logs(),
        b.name,
        b.logs()
    );
    assert!(cut.events(MARKED).is_empty() || other.events(MARKED).is_empty());
    let mut stopped = Vec::new();
    for d in [a, b] {
        let name = d.name.clone();
        let (code, logs) = d.stop();
        assert_eq!(code, Some(0), "{logs}");
        stopped.push(format!("{name}:\n{logs}"));
    }
    let left = tag_owners(world, &groups).await;
    assert!(left.is_empty(), "{left:?}\n{}", stopped.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_configured_differently_for_a_group_warn_and_the_owners_configuration_is_named()
{
    let _turn = STACK.lock().await;
    let world = world();
    let groups = stack_groups(world);
    let table = init_table(world, "differ");
    let a = Daemon::spawn(world, "differ-a", &table, &groups, 2);
    let b = Daemon::spawn(world, "differ-b", &table, &groups, 5);
    let owners = assignment(&groups, &[&a, &b]);
    wait_owners(&[&a, &b], &owners, Duration::from_secs(30)).await;
    const DIFFERS: &str = "another daemon owns this group with a different configuration of it; the owner's configuration acts";
    // Each daemon warns, once, for every group the other owns (once its record is written). A
    // daemon that starts while the other still holds every group warns for those too, before
    // half of them are handed to it: true when said, so more warnings than the final split.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let complete = [&a, &b].iter().all(|d| {
            let warned: BTreeSet<String> = d
                .events(DIFFERS)
                .iter()
                .map(|e| e["group"].as_str().unwrap().to_string())
                .collect();
            let others: BTreeSet<String> = owners
                .iter()
                .filter(|(_, o)| **o != d.name)
                .map(|(g, _)| g.clone())
                .collect();
            others.is_subset(&warned)
        });
        if complete {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no warning for each other's groups:\n{}\n{}",
            a.logs(),
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for d in [&a, &b] {
        let warnings = d.events(DIFFERS);
        let mut seen = BTreeSet::new();
        for w in &warnings {
            assert!(seen.insert(w["group"].to_string()), "warned twice: {w}");
            assert_ne!(w["owners_config"], w["this_config"]);
            assert!(w["owner"].as_str().unwrap().contains(':'));
        }
    }
    for d in [a, b] {
        let (code, logs) = d.stop();
        assert_eq!(code, Some(0), "{logs}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_table_with_the_wrong_key_schema_or_none_stops_the_daemon_naming_the_fix() {
    let world = world();
    let groups = stack_groups(world);
    let table = format!("share-wrong-{}", std::process::id());
    aws_sdk_dynamodb::Client::new(&world.sdk_config())
        .create_table()
        .table_name(&table)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .unwrap();
    let mut d = Daemon::spawn(world, "wrong", &table, &groups[..1], 2);
    let status = d.child.wait().unwrap();
    let logs = d.logs();
    assert_eq!(status.code(), Some(2), "{logs}");
    assert!(
        logs.contains("partition key `pk` of type String (S)")
            && logs.contains("partition key `id`"),
        "the error names the schema found and the one needed: {logs}"
    );
    let missing = format!("share-missing-{}", std::process::id());
    let mut d = Daemon::spawn(world, "missing", &missing, &groups[..1], 2);
    let status = d.child.wait().unwrap();
    let logs = d.logs();
    assert_eq!(status.code(), Some(2), "{logs}");
    assert!(
        logs.contains(&format!("bakery init --lease-table {missing}")),
        "{logs}"
    );
    // Nothing was touched: no takeover record.
    assert!(tag_owners(world, &groups[..1]).await.is_empty());
}
