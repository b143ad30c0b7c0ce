//! `bakery rollout` and `bakery status` end to end against the world: a group of live instances
//! behind a load balancer whose health checks really run. Each test gets a fleet of its own.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// The world's fault spec is one for the whole world: the tests that set it take turns.
static FAULTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `bakery --output json rollout ARGS` with its own access key, for call-log attribution.
fn rollout(world: &World, key: &str, args: &[&str]) -> Run {
    let out = world
        .bakery()
        .env("AWS_ACCESS_KEY_ID", key)
        .args(["--output", "json", "rollout"])
        .args(args)
        .output()
        .unwrap();
    Run::from_output(out)
}

/// A running `bakery --output json rollout ARGS` signed with `key`: its stdout lines are kept
/// (`lines` hands them over once it exits), and `seen` receives one `()` each time `watch`,
/// fed every event in turn, says so.
struct Watched {
    child: std::process::Child,
    seen: std::sync::mpsc::Receiver<()>,
    lines: std::thread::JoinHandle<Vec<String>>,
}

fn spawn_rollout(
    world: &World,
    key: &str,
    args: &[&str],
    mut watch: impl FnMut(&serde_json::Value) -> bool + Send + 'static,
) -> Watched {
    let (child, rx) = spawn_lines(
        world
            .bakery()
            .env("AWS_ACCESS_KEY_ID", key)
            .args(["--output", "json", "rollout"])
            .args(args)
            .stderr(Stdio::piped()),
    );
    let (tx, seen) = std::sync::mpsc::channel::<()>();
    let lines = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in rx {
            if serde_json::from_str::<serde_json::Value>(&line).is_ok_and(|e| watch(&e)) {
                let _ = tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    Watched { child, seen, lines }
}

/// Samples the number of healthy targets every 200 ms until stopped.
fn sample_health(
    world: &'static World,
    fleet: &Fleet,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Vec<usize>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let tg = fleet.tg_arn.clone();
    let s = stop.clone();
    let handle = tokio::spawn(async move {
        let elb = world.elb();
        let mut samples = Vec::new();
        while !s.load(Ordering::Relaxed) {
            let out = elb
                .describe_target_health()
                .target_group_arn(&tg)
                .send()
                .await
                .unwrap();
            samples.push(
                out.target_health_descriptions()
                    .iter()
                    .filter(|d| {
                        d.target_health()
                            .and_then(|h| h.state())
                            .map(|s| s.as_str())
                            == Some("healthy")
                    })
                    .count(),
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        samples
    });
    (stop, handle)
}

/// Runs a rollout of `fleet` while sampling its healthy targets; returns the run and the samples.
async fn rollout_sampled(
    world: &'static World,
    fleet: &Fleet,
    key: &str,
    args: &[&str],
) -> (Run, Vec<usize>) {
    let (stop, sampler) = sample_health(world, fleet);
    let mut all = vec!["--asg".to_string(), fleet.asg.clone()];
    all.extend(args.iter().map(|a| a.to_string()));
    let key = key.to_string();
    let run = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        rollout(world, &key, &refs)
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    (run, sampler.await.unwrap())
}

/// The good and the bad web AMI, baked once per test binary (off the async runtime).
async fn web_amis(world: &'static World) -> (String, String) {
    tokio::task::spawn_blocking(move || sample_amis(world).clone())
        .await
        .unwrap()
}

fn world() -> &'static World {
    static W: std::sync::OnceLock<World> = std::sync::OnceLock::new();
    W.get_or_init(World::get)
}

fn lt_version(g: &aws_sdk_autoscaling::types::AutoScalingGroup) -> String {
    g.launch_template()
        .and_then(|l| l.version())
        .unwrap_or_default()
        .to_string()
}

fn sizes(g: &aws_sdk_autoscaling::types::AutoScalingGroup) -> (i32, i32, i32) {
    (
        g.desired_capacity().unwrap(),
        g.min_size().unwrap(),
        g.max_size().unwrap(),
    )
}

fn tag(g: &aws_sdk_autoscaling::types::AutoScalingGroup, key: &str) -> Option<String> {
    g.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_good_ami_rolls_the_whole_group_without_dropping_below_capacity() {
    let world = world();
    let (good, _) = web_amis(world).await;
    let fleet = Fleet::create(world, "good", 4).await;
    let before = sizes(&fleet.group(world).await);
    let (run, samples) = rollout_sampled(
        world,
        &fleet,
        "rollout-good",
        &["--ami", &good, "--health-timeout", "60s"],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.describe());

    let g = fleet.group(world).await;
    assert_eq!(
        lt_version(&g),
        "2",
        "the group points at the new numbered version"
    );
    assert_eq!(sizes(&g), before, "desired/min/max restored");
    assert_eq!(fleet.amis(world).await, vec![good.clone(); 4]);
    assert!(
        tag(&g, "bakery:rollout").is_none() && tag(&g, "bakery:rollout-lock").is_none(),
        "state and lock removed"
    );
    assert!(
        !g.suspended_processes()
            .iter()
            .any(|p| p.process_name() == Some("AZRebalance")),
        "AZRebalance resumed"
    );
    let min = samples.iter().copied().min().unwrap();
    assert!(
        samples.len() > 10 && min >= 4,
        "healthy targets fell to {min} (samples {samples:?})"
    );
    let batches = run
        .events
        .iter()
        .filter(|e| e["event"] == "batch_started")
        .count();
    assert_eq!(batches, 4, "25% of 4 = 1 per batch: {}", run.describe());

    // The new version carries the old one's settings with only the image changed, IMDSv2 on.
    let v = world
        .ec2()
        .describe_launch_template_versions()
        .launch_template_id(&fleet.lt_id)
        .versions("2")
        .send()
        .await
        .unwrap();
    let data = v.launch_template_versions()[0]
        .launch_template_data()
        .unwrap();
    assert_eq!(data.image_id(), Some(good.as_str()));
    assert_eq!(
        data.security_group_ids(),
        [world.var("WORLD_APP_SG").to_string()]
    );
    assert_eq!(
        data.metadata_options()
            .and_then(|m| m.http_tokens())
            .map(|t| t.as_str()),
        Some("required")
    );

    // `bakery status` shows the same.
    let out = world
        .bakery()
        .args(["--output", "json", "status", "--asg", &fleet.asg])
        .output()
        .unwrap();
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["version_number"], 2);
    assert_eq!(status["version_ami"], good);
    assert_eq!(status["instances"].as_array().unwrap().len(), 4);
    assert!(status["rollout"].is_null());
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_ami_is_rolled_back_by_itself() {
    let world = world();
    let (_, bad) = web_amis(world).await;
    let fleet = Fleet::create(world, "bad", 4).await;
    let before = sizes(&fleet.group(world).await);
    let (run, samples) = rollout_sampled(
        world,
        &fleet,
        "rollout-bad",
        &["--ami", &bad, "--health-timeout", "8s"],
    )
    .await;
    assert_eq!(
        run.code,
        Some(6),
        "exit 6 means rolled back: {}",
        run.describe()
    );
    let rb = run
        .event("rollback_started")
        .expect("rollback_started event");
    let reason = rb["reason"].as_str().unwrap();
    let culprit = rb["instances"][0]
        .as_str()
        .expect("the failing instance is named");
    // The load balancer's reason depends on how far the instance got (503 from the app, or not
    // answering yet); either way it is named with the instance.
    assert!(
        reason.contains(culprit)
            && (reason.contains("Target.ResponseCodeMismatch")
                || reason.contains("Target.FailedHealthChecks")),
        "{reason}"
    );
    let failed = run.event("rollout_failed").unwrap();
    assert!(failed["error"]
        .as_str()
        .unwrap()
        .starts_with("rolled back: batch 1 was not healthy within 8s"));

    let g = fleet.group(world).await;
    assert_eq!(lt_version(&g), "1", "back on the old version");
    assert_eq!(sizes(&g), before);
    let amis = fleet.amis(world).await;
    assert_eq!(
        amis,
        vec![world.var("WORLD_STACK_AMI").to_string(); 4],
        "no instance of the bad AMI"
    );
    fleet.wait_healthy(world, 4, Duration::from_secs(10)).await;
    assert!(
        samples.iter().all(|n| *n >= 4),
        "capacity held during the rollback: {samples:?}"
    );
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_killed_midway_resumes_and_converges() {
    let world = world();
    let (good, _) = web_amis(world).await;
    let fleet = Fleet::create(world, "kill", 4).await;
    let before = sizes(&fleet.group(world).await);
    let args = [
        "--asg",
        fleet.asg.as_str(),
        "--ami",
        good.as_str(),
        "--health-timeout",
        "60s",
    ];
    let mut child = world
        .bakery()
        .args(["--output", "json", "rollout"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it hard while the second batch is in flight.
    let stdout = child.stdout.take().unwrap();
    let pid = child.id();
    tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let e: serde_json::Value = serde_json::from_str(&line).unwrap();
            if e["event"] == "batch_started" && e["batch"] == 2 {
                Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status()
                    .unwrap();
                break;
            }
        }
    })
    .await
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), None, "killed by a signal");
    let g = fleet.group(world).await;
    assert!(
        tag(&g, "bakery:rollout").is_some(),
        "the state survives on the group"
    );

    let run = rollout(world, "rollout-kill", &args);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(run.event("rollout_started").unwrap()["resumed"], true);
    let g = fleet.group(world).await;
    assert_eq!(sizes(&g), before, "no extra capacity left behind");
    assert_eq!(lt_version(&g), "2");
    assert_eq!(fleet.amis(world).await, vec![good.clone(); 4]);
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_prints_the_plan_and_changes_nothing() {
    let world = world();
    let (good, _) = web_amis(world).await;
    let fleet = Fleet::create(world, "dry", 4).await;
    let before = fleet.group(world).await;
    let key = format!("dryrun-{}", &fleet.name);
    let run = rollout(
        world,
        &key,
        &[
            "--asg",
            &fleet.asg,
            "--ami",
            &good,
            "--dry-run",
            "--max-surge",
            "2",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let plan = &run.event("rollout_plan").expect("plan event")["plan"];
    assert_eq!(plan["capacity"], 4);
    assert_eq!(plan["instances_to_replace"], 4);
    assert_eq!(plan["from_version"], 1);
    assert_eq!(plan["to_ami"], good);
    let batches: Vec<(u64, u64)> = plan["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["retired"].as_u64().unwrap(),
                b["desired"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        batches,
        vec![(1, 5), (2, 6), (1, 5)],
        "canary of 1, then 2 at a time"
    );

    let after = fleet.group(world).await;
    assert_eq!(lt_version(&after), lt_version(&before));
    assert_eq!(sizes(&after), sizes(&before));
    assert_eq!(after.tags().len(), before.tags().len());
    let versions = world
        .ec2()
        .describe_launch_template_versions()
        .launch_template_id(&fleet.lt_id)
        .send()
        .await
        .unwrap();
    assert_eq!(
        versions.launch_template_versions().len(),
        1,
        "no version was created"
    );
    let calls = world_calls(world, &key);
    let list = calls["calls"].as_array().expect("a list of calls");
    assert!(
        list.iter()
            .all(|c| c["access_key"] == key.as_str() && c["mutating"].is_boolean()),
        "the call log attributes each call to its key and says whether it mutates: {calls}"
    );
    assert!(
        list.iter()
            .any(|c| c["action"] == "autoscaling:DescribeAutoScalingGroups"
                || c["action"] == "DescribeAutoScalingGroups"),
        "{calls}"
    );
    let mutating: Vec<&serde_json::Value> = list.iter().filter(|c| c["mutating"] == true).collect();
    assert!(
        calls["total"].as_u64().unwrap() > 0,
        "the call log saw the dry run: {calls}"
    );
    assert!(
        mutating.is_empty(),
        "a dry run made mutating calls: {mutating:?}"
    );
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_clearly_without_changing_the_group() {
    let world = world();
    let (good, _) = web_amis(world).await;

    let run = rollout(
        world,
        "bad-input",
        &["--asg", "no-such-group", "--ami", &good],
    );
    assert_eq!(run.code, Some(2), "{}", run.describe());
    assert!(run.error().contains("group \"no-such-group\" not found"));

    let fleet = Fleet::create(world, "input", 0).await;
    let before = fleet.group(world).await;

    let run = rollout(
        world,
        "bad-input",
        &["--asg", &fleet.asg, "--ami", "ami-00000000deadbeef0"],
    );
    assert_eq!(run.code, Some(2), "{}", run.describe());
    assert!(run.error().contains("AMI ami-00000000deadbeef0 not found"));

    // Another driver holds the group (on another machine, lock not expired).
    let asg = world.asg();
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 120;
    let lock = format!("owner=ci-runner-7:4242;token=abc;since=1764230000;expires={expires}");
    asg.create_or_update_tags()
        .tags(
            aws_sdk_autoscaling::types::Tag::builder()
                .resource_id(&fleet.asg)
                .resource_type("auto-scaling-group")
                .key("bakery:rollout-lock")
                .value(lock)
                .propagate_at_launch(false)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let run = rollout(world, "bad-input", &["--asg", &fleet.asg, "--ami", &good]);
    assert_eq!(run.code, Some(7), "{}", run.describe());
    let error = run.error();
    assert!(
        error.contains("locked by another rollout driver (ci-runner-7:4242"),
        "{error}"
    );

    // A rollout of another AMI is in progress: refused, with the ways forward.
    let state = format!(
        r#"{{"id":"r-other","ami":"{}","lt":"{}","from":"1","to":"1","d":0,"mn":0,"mx":0,"t":1764230000}}"#,
        world.var("WORLD_BASE_AMI"),
        fleet.lt_id
    );
    asg.delete_tags()
        .tags(
            aws_sdk_autoscaling::types::Tag::builder()
                .resource_id(&fleet.asg)
                .resource_type("auto-scaling-group")
                .key("bakery:rollout-lock")
                .build(),
        )
        .send()
        .await
        .unwrap();
    asg.create_or_update_tags()
        .tags(
            aws_sdk_autoscaling::types::Tag::builder()
                .resource_id(&fleet.asg)
                .resource_type("auto-scaling-group")
                .key("bakery:rollout")
                .value(state)
                .propagate_at_launch(false)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let run = rollout(world, "bad-input", &["--asg", &fleet.asg, "--ami", &good]);
    assert_eq!(run.code, Some(7), "{}", run.describe());
    let error = run.error();
    assert!(
        error.contains("has a rollout of")
            && error.contains("--abort")
            && error.contains("--force"),
        "{error}"
    );

    let after = fleet.group(world).await;
    assert_eq!(lt_version(&after), lt_version(&before), "no change");
    assert_eq!(sizes(&after), sizes(&before));
    let name = fleet.name.clone();
    fleet.delete(world).await;

    // A group on a launch configuration.
    asg.create_launch_configuration()
        .launch_configuration_name(format!("{name}-lc"))
        .image_id(world.var("WORLD_BASE_AMI"))
        .instance_type("t3.micro")
        .send()
        .await
        .unwrap();
    let lc_group = format!("{name}-lc");
    asg.create_auto_scaling_group()
        .auto_scaling_group_name(&lc_group)
        .launch_configuration_name(format!("{name}-lc"))
        .min_size(0)
        .max_size(1)
        .desired_capacity(0)
        .vpc_zone_identifier(world.private_subnet())
        .send()
        .await
        .unwrap();
    let run = rollout(world, "bad-input", &["--asg", &lc_group, "--ami", &good]);
    delete_group(world, &lc_group).await;
    assert_eq!(run.code, Some(2), "{}", run.describe());
    let error = run.error();
    assert!(
        error.contains("launch configuration") && error.contains("migrate"),
        "{error}"
    );
}

/// The template's version numbers, oldest first.
async fn versions(world: &World, lt_id: &str) -> Vec<i64> {
    let out = world
        .ec2()
        .describe_launch_template_versions()
        .launch_template_id(lt_id)
        .send()
        .await
        .unwrap();
    let mut v: Vec<i64> = out
        .launch_template_versions()
        .iter()
        .filter_map(|v| v.version_number())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_prunes_old_versions_but_never_one_another_group_uses() {
    let world = world();
    let (good, _) = web_amis(world).await;
    let fleet = Fleet::create(world, "prune", 2).await;
    // Versions 2..=5 of the same template; a second group (staging, say) runs version 2, and a
    // third, with a mixed instances policy, version 3.
    for _ in 0..4 {
        fleet
            .add_version(world, "1", world.var("WORLD_STACK_AMI"))
            .await;
    }
    let other = fleet.empty_sibling(world, "other", "2", false).await;
    let mixed = fleet.empty_sibling(world, "mixed", "3", true).await;
    assert_eq!(versions(world, &fleet.lt_id).await, vec![1, 2, 3, 4, 5]);

    let run = rollout(
        world,
        "rollout-prune",
        &[
            "--asg",
            &fleet.asg,
            "--ami",
            &good,
            "--health-timeout",
            "60s",
            "--keep-versions",
            "1",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let g = fleet.group(world).await;
    assert_eq!(lt_version(&g), "6", "the rollout's own version");
    assert_eq!(
        versions(world, &fleet.lt_id).await,
        vec![1, 2, 3, 6],
        "4 and 5 pruned; the default (1), the other groups' (2, 3) and the new one (6) kept"
    );
    // Numbers are never reused: the next version is 7.
    assert_eq!(fleet.add_version(world, "6", &good).await, 7);
    delete_group(world, &other).await;
    delete_group(world, &mixed).await;
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigint_while_old_versions_are_pruned_skips_the_pruning_and_the_rollout_still_succeeds() {
    // Issue #10 B: "a SIGINT during a rollout's finish/prune phase is ignored". Pruning is
    // housekeeping after a rollout that is done: a SIGINT skips it at once, says so, and the
    // rollout ends as it would have, its tags cleared; the next rollout prunes.
    let world = world();
    let (good, _) = web_amis(world).await;
    let fleet = Fleet::create(world, "prune-sigint", 2).await;
    for _ in 0..2 {
        fleet
            .add_version(world, "1", world.var("WORLD_STACK_AMI"))
            .await;
    }
    let before = sizes(&fleet.group(world).await);
    let key = format!("rollout-prune-sigint-{}", std::process::id());
    // Every DescribeLaunchTemplateVersions of this rollout takes 2 s: pruning begins with one
    // (the rollout's only other is at its start).
    let faults = FAULTS.lock().await;
    world_fault(
        world,
        6,
        &key,
        "ec2:DescribeLaunchTemplateVersions",
        "latency_ms",
        2000.0,
    );
    let mut retired = 0;
    let args = [
        "--asg",
        &fleet.asg,
        "--ami",
        &good,
        "--health-timeout",
        "60s",
        "--keep-versions",
        "1",
    ];
    let Watched { child, seen, lines } = spawn_rollout(world, &key, &args, move |e| {
        if e["event"] != "retired" {
            return false;
        }
        retired += e["instances"].as_array().map_or(0, Vec::len);
        retired >= 2
    });
    // Every old instance retired: the next DescribeLaunchTemplateVersions is the pruning's.
    tokio::task::spawn_blocking(move || seen.recv_timeout(Duration::from_secs(120)))
        .await
        .unwrap()
        .expect("both old instances were retired");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !world_calls(world, &key)["in_flight"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["action"] == "DescribeLaunchTemplateVersions")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the rollout never began to prune"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let interrupted = std::time::Instant::now();
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let took = interrupted.elapsed();
    clear_world_faults(world);
    drop(faults);
    let events = parse_events(&lines.join().unwrap().join("\n"));
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(0), "{events:?}\n{stderr}");
    // At once: not after the pruning's slow read (2 s) and deletions.
    assert!(took < Duration::from_millis(1500), "SIGINT took {took:?}");
    assert!(
        events.iter().any(|e| e["event"] == "waiting"
            && e["why"].as_str().is_some_and(
                |w| w.contains("SIGINT: pruning of old launch template versions skipped")
            )),
        "{events:?}"
    );
    let finished = events
        .iter()
        .find(|e| e["event"] == "rollout_finished")
        .expect("rollout_finished");
    assert_eq!(finished["result"], "succeeded", "{finished}");
    let g = fleet.group(world).await;
    assert_eq!(lt_version(&g), "4", "the rollout's own version");
    assert_eq!(sizes(&g), before, "desired/min/max restored");
    for t in ["bakery:rollout", "bakery:rollout-lock"] {
        assert_eq!(tag(&g, t), None, "{t} cleared");
    }
    assert_eq!(
        versions(world, &fleet.lt_id).await,
        vec![1, 2, 3, 4],
        "nothing pruned: the next rollout prunes"
    );
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_canary_that_turns_unhealthy_during_its_bake_rolls_back() {
    let world = world();
    let (good, _) = web_amis(world).await;
    let fleet = Fleet::create(world, "canary", 4).await;
    let before = sizes(&fleet.group(world).await);
    let args = [
        "--asg",
        &fleet.asg,
        "--ami",
        &good,
        "--canary",
        "1",
        "--canary-bake",
        "30s",
        "--health-timeout",
        "60s",
    ];
    // When the canary is healthy and its bake begins, its app dies (the instance stays up).
    let Watched {
        mut child,
        seen,
        lines,
    } = spawn_rollout(world, "rollout-canary", &args, |e| {
        e["event"] == "canary_baking"
    });
    tokio::task::spawn_blocking(move || seen.recv_timeout(Duration::from_secs(90)))
        .await
        .unwrap()
        .expect("the canary's bake began");
    let canary: Vec<String> = fleet
        .live_instances(world)
        .await
        .into_iter()
        .filter(|(_, ami)| *ami == good)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(canary.len(), 1, "one canary: {canary:?}");
    world_kill(world, &canary[0]);

    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let events = parse_events(&lines.join().unwrap().join("\n"));
    assert_eq!(
        status.code(),
        Some(6),
        "exit 6 means rolled back: {events:?}"
    );
    let rb = events
        .iter()
        .find(|e| e["event"] == "rollback_started")
        .expect("rollback_started");
    let reason = rb["reason"].as_str().unwrap();
    // The instance named is the killed canary or, when the group's own health check replaced
    // it first (a loaded machine), its replacement that has not passed its checks yet.
    assert!(
        reason.starts_with("the canary turned unhealthy during its bake: i-"),
        "{reason}"
    );
    let g = fleet.group(world).await;
    assert_eq!(lt_version(&g), "1", "back on the old version");
    assert_eq!(sizes(&g), before);
    assert_eq!(
        fleet.amis(world).await,
        vec![world.var("WORLD_STACK_AMI").to_string(); 4],
        "the canary is gone"
    );
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_rollback_a_bad_batch_stops_the_rollout_and_abort_rolls_it_back_later() {
    let world = world();
    let (_, bad) = web_amis(world).await;
    let fleet = Fleet::create(world, "abort", 4).await;
    let before = sizes(&fleet.group(world).await);
    // The AMI comes from an SSM parameter, as a pipeline's bake step would publish it.
    let param = format!("/bakery-test/{}/ami", fleet.name);
    world
        .ssm()
        .put_parameter()
        .name(&param)
        .value(&bad)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();

    let run = rollout(
        world,
        "rollout-abort",
        &[
            "--asg",
            &fleet.asg,
            "--ami-param",
            &param,
            "--health-timeout",
            "8s",
            "--no-rollback",
        ],
    );
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(
        run.error()
            .contains("--no-rollback: the group stays as it is"),
        "{}",
        run.describe()
    );
    assert!(run.event("rollback_started").is_none(), "no rollback");
    let g = fleet.group(world).await;
    assert_eq!(lt_version(&g), "2", "still on the new version");
    assert!(
        tag(&g, "bakery:rollout").is_some(),
        "the state stays for a rerun or --abort"
    );
    assert!(
        fleet.amis(world).await.contains(&bad),
        "the bad batch is still there"
    );

    let run = rollout(world, "rollout-abort", &["--asg", &fleet.asg, "--abort"]);
    assert_eq!(run.code, Some(6), "rolled back: {}", run.describe());
    assert_eq!(
        run.event("rollback_started").unwrap()["reason"],
        "aborted by the user (--abort)"
    );
    let g = fleet.group(world).await;
    assert_eq!(lt_version(&g), "1", "back on the old version");
    assert_eq!(sizes(&g), before, "desired/min/max restored");
    assert_eq!(
        fleet.amis(world).await,
        vec![world.var("WORLD_STACK_AMI").to_string(); 4]
    );
    assert!(
        tag(&g, "bakery:rollout").is_none() && tag(&g, "bakery:rollout-lock").is_none(),
        "state and lock removed"
    );

    let run = rollout(world, "rollout-abort", &["--asg", &fleet.asg, "--abort"]);
    assert_eq!(run.code, Some(2), "{}", run.describe());
    assert!(
        run.error().contains("has no rollout in progress"),
        "{}",
        run.describe()
    );
    let _ = world.ssm().delete_parameter().name(&param).send().await;
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_rollout_is_replaced_by_another_ami_only_with_force() {
    let world = world();
    let (good, bad) = web_amis(world).await;
    let fleet = Fleet::create(world, "force", 4).await;
    let before = sizes(&fleet.group(world).await);
    let run = rollout(
        world,
        "rollout-force",
        &[
            "--asg",
            &fleet.asg,
            "--ami",
            &bad,
            "--health-timeout",
            "8s",
            "--no-rollback",
        ],
    );
    assert_eq!(run.code, Some(1), "{}", run.describe());

    // Another AMI while that rollout is in progress: refused, saying what to do.
    let args = ["--asg", fleet.asg.as_str(), "--ami", good.as_str()];
    let run = rollout(world, "rollout-force", &args);
    assert_eq!(run.code, Some(7), "{}", run.describe());
    let error = run.error();
    assert!(
        error.contains(&bad) && error.contains("--abort") && error.contains("--force"),
        "{error}"
    );
    assert_eq!(
        lt_version(&fleet.group(world).await),
        "2",
        "nothing changed"
    );

    // --force: a new rollout from the same starting point, to the good AMI.
    let run = rollout(
        world,
        "rollout-force",
        &[&args[..], &["--force", "--health-timeout", "60s"]].concat(),
    );
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let g = fleet.group(world).await;
    assert_eq!(sizes(&g), before, "desired/min/max restored");
    assert_eq!(fleet.amis(world).await, vec![good.clone(); 4]);
    assert!(
        tag(&g, "bakery:rollout").is_none(),
        "state removed: {:?}",
        g.tags()
    );
    fleet.delete(world).await;
}

/// Throttling of the group's reads that outlasts one call's retries, in the middle of a batch:
/// the rollout keeps asking, says why it waits, and finishes with the group at full strength.
#[tokio::test(flavor = "multi_thread")]
async fn a_throttling_storm_longer_than_one_calls_retries_does_not_end_the_rollout() {
    let world = world();
    let (good, _) = web_amis(world).await;
    let fleet = Fleet::create(world, "storm", 2).await;
    let before = sizes(&fleet.group(world).await);
    let key = format!("rollout-storm-{}", std::process::id());
    let faults = FAULTS.lock().await;
    let (stop, sampler) = sample_health(world, &fleet);
    let mut child = world
        .bakery()
        .env("AWS_ACCESS_KEY_ID", &key)
        .args([
            "--output", "json", "rollout", "--asg", &fleet.asg, "--ami", &good,
        ])
        .args(["--health-timeout", "120s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Once the canary batch starts, every DescribeAutoScalingGroups of this rollout is
    // throttled for 40 s.
    let key2 = key.clone();
    let (events, calm) = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut events = Vec::new();
        let mut calm = None;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let e: serde_json::Value = serde_json::from_str(&line).unwrap();
            if calm.is_none() && e["event"] == "batch_started" {
                world_fault(
                    world,
                    5,
                    &key2,
                    "autoscaling:DescribeAutoScalingGroups",
                    "throttle",
                    1.0,
                );
                let world_ref = world;
                calm = Some(std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(40));
                    clear_world_faults(world_ref);
                }));
            }
            events.push(e);
        }
        (events, calm)
    })
    .await
    .unwrap();
    let status = child.wait().unwrap();
    if let Some(calm) = calm {
        calm.join().unwrap();
    }
    drop(faults);
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap();
    assert_eq!(status.code(), Some(0), "{events:?}");
    let waited = events.iter().any(|e| {
        e["event"] == "waiting"
            && e["why"]
                .as_str()
                .is_some_and(|w| w.contains("AWS did not answer") && w.contains("Throttling"))
    });
    assert!(waited, "the rollout said why it waited: {events:?}");
    let throttled = world_calls(world, &key)["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["action"] == "DescribeAutoScalingGroups" && c["fault"] == "throttle")
        .count();
    assert!(
        throttled > 9,
        "DescribeAutoScalingGroups throttled {throttled} times"
    );
    let g = fleet.group(world).await;
    assert_eq!(sizes(&g), before, "desired/min/max restored");
    assert_eq!(fleet.amis(world).await, vec![good.clone(); 2]);
    let min = samples.iter().copied().min().unwrap();
    assert!(
        min >= 2,
        "healthy targets fell to {min} (samples {samples:?})"
    );
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_driver_paused_past_its_lock_stops_without_another_mutating_call() {
    // Issue #10 C: one driver per group. A run SIGSTOPped past its lock's expiry, whose group
    // another run took over meanwhile, must not act again after SIGCONT.
    let world = world();
    let (good, _) = web_amis(world).await;
    let fleet = Fleet::create(world, "paused", 2).await;
    let key_a = format!("paused-a-{}", &fleet.name);
    let common = [
        "--asg",
        fleet.asg.as_str(),
        "--ami",
        good.as_str(),
        "--lock-ttl",
        "10s",
        "--health-timeout",
        "60s",
    ];
    let (a, rx) = spawn_lines(
        world
            .bakery()
            .env("AWS_ACCESS_KEY_ID", &key_a)
            .args(["--output", "json", "rollout"])
            .args(common)
            .args(["--canary-bake", "20s"])
            .stderr(Stdio::piped()),
    );
    let pid = a.id().to_string();
    let mut events = Vec::new();
    events_until(
        &rx,
        &mut events,
        Duration::from_secs(120),
        "the canary is baking",
        |e| e["event"] == "canary_baking",
    );
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    // Wait until A's lock has expired (the condition B needs), read from the group's tag.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let g = fleet.group(world).await;
        let expires = tag(&g, "bakery:rollout-lock")
            .and_then(|l| {
                l.split(';')
                    .find_map(|p| p.strip_prefix("expires=").map(str::to_string))
            })
            .and_then(|e| e.parse::<u64>().ok())
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        if now > expires {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "A's lock never expired"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // B takes the group over and finishes the rollout.
    let b = rollout(world, &format!("paused-b-{}", &fleet.name), &common);
    assert_eq!(b.code, Some(0), "{}", b.describe());
    assert_eq!(b.event("rollout_started").unwrap()["resumed"], true);

    let resumed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    let out = a.wait_with_output().unwrap();
    let rest: Vec<serde_json::Value> = rx
        .iter()
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    assert_eq!(
        out.status.code(),
        Some(7),
        "A stops as locked out: {rest:?}"
    );
    let failed = rest
        .iter()
        .find(|e| e["event"] == "rollout_failed")
        .expect("a rollout_failed event");
    assert!(
        failed["error"].as_str().unwrap().contains("lost the lock"),
        "{failed}"
    );
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
    let g = fleet.group(world).await;
    assert_eq!(fleet.amis(world).await, vec![good.clone(); 2]);
    assert!(tag(&g, "bakery:rollout").is_none(), "B finished cleanly");
    fleet.delete(world).await;
}

/// The dry run's plan is the rollout's: the same batches, sizes and desired capacities as the
/// real run's `batch_started` events, in order (issue #10: a plan that lies is worse than none).
#[tokio::test(flavor = "multi_thread")]
async fn the_dry_run_plan_is_what_the_rollout_then_does() {
    let world = world();
    let (good, _) = web_amis(world).await;
    let fleet = Fleet::create(world, "plan-real", 5).await;
    let key = format!("planreal-{}", &fleet.name);
    let args = ["--asg", &fleet.asg, "--ami", &good, "--max-surge", "2"];
    let dry = rollout(world, &key, &[&args[..], &["--dry-run"]].concat());
    assert_eq!(dry.code, Some(0), "{}", dry.describe());
    let planned: Vec<(u64, u64, u64)> = dry.event("rollout_plan").unwrap()["plan"]["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["batch"].as_u64().unwrap(),
                b["launched"].as_u64().unwrap(),
                b["desired"].as_u64().unwrap(),
            )
        })
        .collect();
    let run = rollout(world, &key, &args);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let done: Vec<(u64, u64, u64)> = run
        .events
        .iter()
        .filter(|e| e["event"] == "batch_started")
        .map(|e| {
            (
                e["batch"].as_u64().unwrap(),
                e["size"].as_u64().unwrap(),
                e["desired"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(planned.len(), 3, "canary of 1, then 2 and 2: {planned:?}");
    assert_eq!(
        done, planned,
        "the real batches differ from the dry run's plan"
    );
    fleet.delete(world).await;
}
