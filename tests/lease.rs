//! The DynamoDB lease table and fenced rollouts, end to end against the world: `bakery init
//! --lease-table`, the table's bad inputs, and `bakery rollout --lease-table` keeping one driver
//! per group when two start together (issue #10 finding 7) and when one is cut off.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use common::*;

fn world() -> &'static World {
    static W: std::sync::OnceLock<World> = std::sync::OnceLock::new();
    W.get_or_init(World::get)
}

fn dynamodb(world: &World) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&world.sdk_config())
}

/// A table name of this test's own.
fn table_name(what: &str) -> String {
    format!(
        "t-{what}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    )
}

/// Runs `bakery --output json ARGS` signing with access key `key`.
fn bakery(world: &World, key: &str, args: &[&str]) -> Run {
    let out = world
        .bakery()
        .env("AWS_ACCESS_KEY_ID", key)
        .env_remove("BAKERY_LEASE_TABLE")
        .args(["--output", "json"])
        .args(args)
        .output()
        .unwrap();
    Run::from_output(out)
}

/// Starts `bakery --output json rollout ARGS` signing with `key`; its stdout lines arrive on
/// the receiver.
fn spawn_rollout(
    world: &World,
    key: &str,
    args: &[String],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    spawn_lines(
        world
            .bakery()
            .env("AWS_ACCESS_KEY_ID", key)
            .env_remove("BAKERY_LEASE_TABLE")
            .args(["--output", "json", "rollout"])
            .args(args)
            .stderr(Stdio::piped()),
    )
}

/// A spawned run's exit code and events, once it ended.
fn finish(
    child: std::process::Child,
    rx: std::sync::mpsc::Receiver<String>,
    mut events: Vec<serde_json::Value>,
) -> (Option<i32>, Vec<serde_json::Value>, String) {
    let out = child.wait_with_output().unwrap();
    events.extend(rx.iter().filter_map(|l| serde_json::from_str(&l).ok()));
    (
        out.status.code(),
        events,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn failure(events: &[serde_json::Value]) -> String {
    events
        .iter()
        .find(|e| e["event"] == "rollout_failed" || e["event"] == "command_failed")
        .and_then(|e| e["error"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The good web AMI, baked once per test binary (off the async runtime).
async fn good_ami(world: &'static World) -> String {
    tokio::task::spawn_blocking(move || sample_amis(world).0.clone())
        .await
        .unwrap()
}

/// The lease record of `key`, as the table holds it.
async fn record(world: &World, table: &str, key: &str) -> Option<serde_json::Value> {
    let out = dynamodb(world)
        .get_item()
        .table_name(table)
        .key("pk", AttributeValue::S(key.to_string()))
        .consistent_read(true)
        .send()
        .await
        .unwrap();
    out.item().map(|item| {
        let mut m = serde_json::Map::new();
        for (k, v) in item {
            let v = match v {
                AttributeValue::S(s) => serde_json::Value::from(s.clone()),
                AttributeValue::N(n) => serde_json::Value::from(n.parse::<u64>().unwrap()),
                other => serde_json::Value::from(format!("{other:?}")),
            };
            m.insert(k.clone(), v);
        }
        serde_json::Value::Object(m)
    })
}

fn rollout_key(world: &World, group: &str) -> String {
    format!("rollout#{}#{group}", world.var("AWS_REGION"))
}

async fn lt_versions(world: &World, lt_id: &str) -> usize {
    world
        .ec2()
        .describe_launch_template_versions()
        .launch_template_id(lt_id)
        .send()
        .await
        .unwrap()
        .launch_template_versions()
        .len()
}

/// Makes a lease table through the SDK (no waiting: it is `CREATING` for the world's table
/// delay), keyed as given.
async fn create_table(world: &World, name: &str, key: &str, key_type: ScalarAttributeType) {
    dynamodb(world)
        .create_table()
        .table_name(name)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(key)
                .attribute_type(key_type)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name(key)
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .unwrap();
}

/// `bakery init` once, through `bakery` itself, for the rollout tests.
async fn init_table(world: &'static World, what: &str) -> String {
    let table = table_name(what);
    let t = table.clone();
    let run = tokio::task::spawn_blocking(move || {
        bakery(world, "lease-init", &["init", "--lease-table", &t])
    })
    .await
    .unwrap();
    assert_eq!(run.code, Some(0), "{}", run.describe());
    table
}

#[tokio::test(flavor = "multi_thread")]
async fn init_creates_the_lease_table_and_a_second_init_changes_nothing() {
    let world = world();
    let table = table_name("init");
    let key = format!("init-{table}");
    let first = bakery(world, &key, &["init", "--lease-table", &table]);
    assert_eq!(first.code, Some(0), "{}", first.describe());
    let made = first.event("status").unwrap()["lease_table"].clone();
    assert_eq!(made["created"], true, "{made}");
    assert_eq!(made["ttl_enabled"], true, "{made}");

    // What AWS now holds: ACTIVE (init waited), pk string, on demand, TTL on `ttl`.
    let db = dynamodb(world);
    let t = db.describe_table().table_name(&table).send().await.unwrap();
    let t = t.table().unwrap();
    assert_eq!(t.table_status().unwrap().as_str(), "ACTIVE");
    let keys: Vec<(String, String)> = t
        .key_schema()
        .iter()
        .map(|k| {
            (
                k.attribute_name().to_string(),
                k.key_type().as_str().to_string(),
            )
        })
        .collect();
    assert_eq!(keys, vec![("pk".to_string(), "HASH".to_string())]);
    assert_eq!(t.attribute_definitions()[0].attribute_type().as_str(), "S");
    assert_eq!(
        t.billing_mode_summary()
            .and_then(|b| b.billing_mode())
            .map(|b| b.as_str()),
        Some("PAY_PER_REQUEST")
    );
    let ttl = db
        .describe_time_to_live()
        .table_name(&table)
        .send()
        .await
        .unwrap();
    let ttl = ttl.time_to_live_description().unwrap();
    assert_eq!(ttl.time_to_live_status().unwrap().as_str(), "ENABLED");
    assert_eq!(ttl.attribute_name(), Some("ttl"));

    // Again, with another key: a no-op, not one mutating call (the world refuses a second
    // UpdateTimeToLive within the hour, as AWS does, so that would fail too).
    let key2 = format!("init2-{table}");
    let second = bakery(world, &key2, &["init", "--lease-table", &table]);
    assert_eq!(second.code, Some(0), "{}", second.describe());
    let again = second.event("status").unwrap()["lease_table"].clone();
    assert_eq!(again["created"], false, "{again}");
    assert_eq!(again["ttl_enabled"], false, "{again}");
    let calls = world_calls(world, &key2);
    assert_eq!(calls["mutating_total"], 0, "{}", calls["mutating_counts"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_with_the_wrong_key_schema_is_refused_naming_the_expected_one() {
    let world = world();
    let table = table_name("schema");
    create_table(world, &table, "id", ScalarAttributeType::S).await;
    let numeric = table_name("numeric");
    create_table(world, &numeric, "pk", ScalarAttributeType::N).await;
    for (t, found) in [
        (&table, "partition key `id` of type S"),
        (&numeric, "partition key `pk` of type N"),
    ] {
        let key = format!("schema-{t}");
        let init = bakery(world, &key, &["init", "--lease-table", t]);
        assert_eq!(init.code, Some(2), "{}", init.describe());
        let error = failure(&init.events);
        assert!(
            error.contains(found)
                && error.contains("partition key `pk` of type String (S), no sort key"),
            "{error}"
        );
        let rollout = bakery(
            world,
            &key,
            &[
                "rollout",
                "--asg",
                "t-no-such-group",
                "--ami",
                "ami-12345678",
                "--lease-table",
                t,
            ],
        );
        assert_eq!(rollout.code, Some(2), "{}", rollout.describe());
        let error = failure(&rollout.events);
        assert!(
            error.contains(found) && error.contains("partition key `pk` of type String (S)"),
            "{error}"
        );
        let calls = world_calls(world, &key);
        assert_eq!(calls["mutating_total"], 0, "{}", calls["mutating_counts"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_table_that_does_not_exist_is_an_error_naming_bakery_init() {
    let world = world();
    let table = table_name("missing");
    let key = format!("missing-{table}");
    let run = bakery(
        world,
        &key,
        &[
            "rollout",
            "--asg",
            "t-no-such-group",
            "--ami",
            "ami-12345678",
            "--lease-table",
            &table,
        ],
    );
    assert_eq!(run.code, Some(2), "{}", run.describe());
    let error = failure(&run.events);
    assert!(
        error.contains(&format!("lease table {table} does not exist"))
            && error.contains(&format!("bakery init --lease-table {table}")),
        "{error}"
    );
    // A dry run takes no lease, but says the same of the table.
    let dry = bakery(
        world,
        &key,
        &[
            "rollout",
            "--asg",
            "t-no-such-group",
            "--ami",
            "ami-12345678",
            "--dry-run",
            "--lease-table",
            &table,
        ],
    );
    assert_eq!(dry.code, Some(2), "{}", dry.describe());
    assert!(
        failure(&dry.events).contains(&format!("bakery init --lease-table {table}")),
        "{}",
        dry.describe()
    );
    let calls = world_calls(world, &key);
    assert_eq!(calls["mutating_total"], 0, "{}", calls["mutating_counts"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_table_still_creating_is_waited_for_then_used_and_released() {
    let world = world();
    let table = table_name("creating");
    create_table(world, &table, "pk", ScalarAttributeType::S).await;
    let status = dynamodb(world)
        .describe_table()
        .table_name(&table)
        .send()
        .await
        .unwrap();
    assert_eq!(
        status.table().unwrap().table_status().unwrap().as_str(),
        "CREATING",
        "the world keeps a new table CREATING for its table delay"
    );
    // The group does not exist: the run takes the lease (after waiting for the table), finds
    // nothing to abort, and releases the lease on its way out.
    let group = format!("t-creating-{}", &table[table.len() - 6..]);
    let run = bakery(
        world,
        &format!("creating-{table}"),
        &[
            "rollout",
            "--asg",
            &group,
            "--abort",
            "--lease-table",
            &table,
        ],
    );
    assert_eq!(run.code, Some(2), "{}", run.describe());
    assert!(
        failure(&run.events).contains("not found"),
        "{}",
        run.describe()
    );
    let r = record(world, &table, &rollout_key(world, &group))
        .await
        .expect("the lease record");
    assert_eq!(r["token"], 1, "{r}");
    assert_eq!(r["expires_at"], 0, "released on a clean stop: {r}");
    assert!(r["ttl"].as_u64().unwrap() > 0, "{r}");
}

/// Issue #10 finding 7: two rollouts of one group started 20 ms apart, the first slowed by a
/// 400 ms latency on `ec2:DescribeLaunchTemplateVersions`. With a lease table exactly one
/// drives: the other exits 7 naming the holder, and one launch-template version is made.
#[tokio::test(flavor = "multi_thread")]
async fn two_rollouts_started_together_with_a_lease_table_have_exactly_one_driver() {
    let world = world();
    let good = good_ami(world).await;
    let table = init_table(world, "race").await;
    let fleet = Fleet::create(world, "lease-race", 2).await;
    let versions_before = lt_versions(world, &fleet.lt_id).await;
    let key_a = format!("race-a-{}", fleet.name);
    let key_b = format!("race-b-{}", fleet.name);
    world_fault(
        world,
        7,
        &key_a,
        "ec2:DescribeLaunchTemplateVersions",
        "latency_ms",
        400.0,
    );
    let args: Vec<String> = [
        "--asg",
        &fleet.asg,
        "--ami",
        &good,
        "--health-timeout",
        "60s",
        "--lease-table",
        &table,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (a, rx_a) = spawn_rollout(world, &key_a, &args);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (b, rx_b) = spawn_rollout(world, &key_b, &args);
    let (ra, rb) = tokio::task::spawn_blocking(move || {
        (finish(a, rx_a, Vec::new()), finish(b, rx_b, Vec::new()))
    })
    .await
    .unwrap();
    clear_world_faults(world);
    let mut codes = vec![ra.0, rb.0];
    codes.sort();
    assert_eq!(
        codes,
        vec![Some(0), Some(7)],
        "one drives, one is refused:\nA: {:?}\n{}\nB: {:?}\n{}",
        ra.1,
        ra.2,
        rb.1,
        rb.2
    );
    let refused = if ra.0 == Some(7) { &ra } else { &rb };
    let error = failure(&refused.1);
    assert!(
        error.contains("locked by another rollout driver")
            && error.contains(&format!("fencing token 1 in lease table {table}")),
        "{error}"
    );
    assert!(
        !refused.1.iter().any(|e| e["event"] == "rollout_started"),
        "the refused run did not start: {:?}",
        refused.1
    );
    assert_eq!(
        lt_versions(world, &fleet.lt_id).await,
        versions_before + 1,
        "exactly one launch-template version made"
    );
    assert_eq!(fleet.amis(world).await, vec![good.clone(); 2]);
    let r = record(world, &table, &rollout_key(world, &fleet.asg))
        .await
        .unwrap();
    assert_eq!(r["token"], 1, "{r}");
    assert_eq!(r["expires_at"], 0, "the driver released its lease: {r}");
    fleet.delete(world).await;
}

/// Issue #14 §3 and #10 C: a driver cut off from AWS (every call its access key signs dropped)
/// past its lease's TTL makes no mutating call served after its lease ran out, even once the
/// partition heals; a second driver takes the group over meanwhile and finishes the rollout.
#[tokio::test(flavor = "multi_thread")]
async fn a_driver_cut_off_past_its_lease_makes_no_mutating_call_after_it_and_another_takes_over() {
    let world = world();
    let good = good_ami(world).await;
    let table = init_table(world, "cutoff").await;
    let fleet = Fleet::create(world, "lease-cut", 2).await;
    let lease_key = rollout_key(world, &fleet.asg);
    let key_a = format!("cut-a-{}", fleet.name);
    let key_b = format!("cut-b-{}", fleet.name);
    let common: Vec<String> = [
        "--asg",
        &fleet.asg,
        "--ami",
        &good,
        "--lock-ttl",
        "10s",
        "--health-timeout",
        "60s",
        "--lease-table",
        &table,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut a_args = common.clone();
    a_args.extend(["--canary-bake".to_string(), "10m".to_string()]);
    let (a, rx_a) = spawn_rollout(world, &key_a, &a_args);
    let mut a_events = Vec::new();
    let rx_a = tokio::task::spawn_blocking(move || {
        events_until(
            &rx_a,
            &mut a_events,
            Duration::from_secs(120),
            "A's canary is baking",
            |e| e["event"] == "canary_baking",
        );
        (rx_a, a_events)
    })
    .await
    .unwrap();
    let held = record(world, &table, &lease_key).await.unwrap();
    assert_eq!(held["token"], 1, "{held}");

    let (status, body) = world_control(
        world,
        "POST",
        "/_world/partitions",
        &serde_json::json!({ "access_key": key_a }).to_string(),
    );
    assert_eq!(status, 200, "{body}");

    // B asks until A's lease has run out (refused with exit 7 meanwhile), then takes over.
    // The last record of A's seen before is A's final lease: when it ran out.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut a_expired_ms = 0u64;
    let b = loop {
        if let Some(r) = record(world, &table, &lease_key).await {
            if r["token"] == 1 {
                a_expired_ms = r["expires_at"].as_u64().unwrap();
            }
        }
        let args = common.clone();
        let key = key_b.clone();
        let run = tokio::task::spawn_blocking(move || {
            let mut all = vec!["rollout".to_string()];
            all.extend(args);
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            bakery(world, &key, &refs)
        })
        .await
        .unwrap();
        if run.code != Some(7) {
            break run;
        }
        assert!(
            run.error().contains("locked by another rollout driver"),
            "{}",
            run.describe()
        );
        assert!(Instant::now() < deadline, "A's lease never ran out");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(b.code, Some(0), "{}", b.describe());
    assert_eq!(b.event("rollout_started").unwrap()["resumed"], true);
    assert!(a_expired_ms > 0, "A's lease was seen");

    // Heal A's partition; A stops on its own, without acting.
    let (status, body) = world_control(world, "DELETE", &format!("/_world/partitions/{key_a}"), "");
    assert_eq!(status, 200, "{body}");
    let (code, events, stderr) = tokio::task::spawn_blocking(move || {
        let (rx, events) = rx_a;
        finish(a, rx, events)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(7), "A stops as locked out: {events:?}\n{stderr}");
    assert!(failure(&events).contains("lost the lock"), "{events:?}");

    let since = a_expired_ms as f64 / 1000.0;
    let endpoint = world
        .var("AWS_ENDPOINT_URL")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let (ip, port) = endpoint.split_once(':').unwrap();
    let (status, body) = http_get(
        ip,
        port.parse().unwrap(),
        &format!(
            "/_world/calls?access_key={key_a}&since={since}&mutating=true&served=true&limit=100000"
        ),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let calls: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        calls["calls"],
        serde_json::json!([]),
        "A's mutating calls served after its lease ran out"
    );
    assert!(
        calls["faults_injected"]["partition"].as_u64().unwrap_or(0) > 0,
        "A kept trying while cut off: {}",
        calls["faults_injected"]
    );

    let g = fleet.group(world).await;
    assert!(
        !g.tags().iter().any(|t| t.key() == Some("bakery:rollout")),
        "B finished the rollout"
    );
    assert_eq!(fleet.amis(world).await, vec![good.clone(); 2]);
    let r = record(world, &table, &lease_key).await.unwrap();
    assert_eq!(r["token"], 2, "B's fencing token is the next one: {r}");
    assert_eq!(r["expires_at"], 0, "B released its lease: {r}");
    fleet.delete(world).await;
}

/// Issue #10 C with a lease: a driver SIGSTOPped past its lease's expiry, whose group another
/// driver took over meanwhile, neither renews (its heartbeat wakes too) nor acts after SIGCONT.
#[tokio::test(flavor = "multi_thread")]
async fn a_driver_paused_past_its_lease_stops_without_another_mutating_call() {
    let world = world();
    let good = good_ami(world).await;
    let table = init_table(world, "paused").await;
    let fleet = Fleet::create(world, "lease-pause", 2).await;
    let lease_key = rollout_key(world, &fleet.asg);
    let key_a = format!("pause-a-{}", fleet.name);
    let common: Vec<String> = [
        "--asg",
        &fleet.asg,
        "--ami",
        &good,
        "--lock-ttl",
        "10s",
        "--health-timeout",
        "60s",
        "--lease-table",
        &table,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut a_args = common.clone();
    a_args.extend(["--canary-bake".to_string(), "10m".to_string()]);
    let (a, rx_a) = spawn_rollout(world, &key_a, &a_args);
    let pid = a.id().to_string();
    let rx_a = tokio::task::spawn_blocking(move || {
        let mut events = Vec::new();
        events_until(
            &rx_a,
            &mut events,
            Duration::from_secs(120),
            "A's canary is baking",
            |e| e["event"] == "canary_baking",
        );
        (rx_a, events)
    })
    .await
    .unwrap();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let b = loop {
        let args = common.clone();
        let key = format!("pause-b-{}", fleet.name);
        let run = tokio::task::spawn_blocking(move || {
            let mut all = vec!["rollout".to_string()];
            all.extend(args);
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            bakery(world, &key, &refs)
        })
        .await
        .unwrap();
        if run.code != Some(7) {
            break run;
        }
        assert!(Instant::now() < deadline, "A's lease never ran out");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(b.code, Some(0), "{}", b.describe());
    assert_eq!(b.event("rollout_started").unwrap()["resumed"], true);

    let resumed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    let (code, events, stderr) = tokio::task::spawn_blocking(move || {
        let (rx, events) = rx_a;
        finish(a, rx, events)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(7), "A stops as locked out: {events:?}\n{stderr}");
    assert!(failure(&events).contains("lost the lock"), "{events:?}");
    let calls = world_calls(world, &key_a);
    let after: Vec<&serde_json::Value> = calls["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["t"].as_f64().unwrap() >= resumed_at && c["mutating"] == true)
        .collect();
    assert!(
        after.is_empty(),
        "A made mutating calls after SIGCONT: {after:?}"
    );
    let r = record(world, &table, &lease_key).await.unwrap();
    assert_eq!(r["token"], 2, "{r}");
    assert_eq!(r["expires_at"], 0, "B released its lease: {r}");
    assert_eq!(fleet.amis(world).await, vec![good.clone(); 2]);
    fleet.delete(world).await;
}

/// A driver killed with SIGKILL leaves its lease; a rerun on the same host sees that its holder
/// is dead and takes the group at once (no wait for the TTL), with the next fencing token.
#[tokio::test(flavor = "multi_thread")]
async fn a_driver_killed_on_this_host_is_taken_over_at_once() {
    let world = world();
    let good = good_ami(world).await;
    let table = init_table(world, "killed").await;
    let fleet = Fleet::create(world, "lease-kill", 2).await;
    let lease_key = rollout_key(world, &fleet.asg);
    let args: Vec<String> = [
        "--asg",
        &fleet.asg,
        "--ami",
        &good,
        "--lock-ttl",
        "10m",
        "--health-timeout",
        "60s",
        "--lease-table",
        &table,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut a_args = args.clone();
    a_args.extend(["--canary-bake".to_string(), "10m".to_string()]);
    let (mut a, rx_a) = spawn_rollout(world, &format!("kill-a-{}", fleet.name), &a_args);
    tokio::task::spawn_blocking(move || {
        let mut events = Vec::new();
        events_until(
            &rx_a,
            &mut events,
            Duration::from_secs(120),
            "A's canary is baking",
            |e| e["event"] == "canary_baking",
        );
    })
    .await
    .unwrap();
    a.kill().unwrap();
    a.wait().unwrap();
    let held = record(world, &table, &lease_key).await.unwrap();
    assert!(
        held["expires_at"].as_u64().unwrap() > 0,
        "A's lease is left: {held}"
    );

    let b = tokio::task::spawn_blocking(move || {
        let mut all = vec!["rollout".to_string()];
        all.extend(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        bakery(world, "kill-b", &refs)
    })
    .await
    .unwrap();
    assert_eq!(b.code, Some(0), "{}", b.describe());
    assert_eq!(b.event("rollout_started").unwrap()["resumed"], true);
    let r = record(world, &table, &lease_key).await.unwrap();
    assert_eq!(r["token"], 2, "{r}");
    assert_eq!(fleet.amis(world).await, vec![good.clone(); 2]);
    fleet.delete(world).await;
}
