//! `bakery rollout`'s parity with ASG Instance Refresh inside one group (issue #13 §4), end to
//! end against the world: skip matching, scale-in-protected and Standby instances, lifecycle
//! hooks, warm pools, checkpoints and the exponential ramp. Each test gets a fleet of its own.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use aws_sdk_autoscaling::types::LifecycleState;
use common::*;

fn world() -> &'static World {
    static W: std::sync::OnceLock<World> = std::sync::OnceLock::new();
    W.get_or_init(World::get)
}

/// The healthy sample image (baked once per test binary, off the async runtime).
async fn good_ami(world: &'static World) -> String {
    tokio::task::spawn_blocking(move || sample_amis(world).0.clone())
        .await
        .unwrap()
}

/// Runs `bakery --output json rollout --asg GROUP ARGS` off the runtime, with its own access key.
async fn rollout(world: &'static World, group: &str, key: &str, args: &[&str]) -> Run {
    let mut all = vec![
        "--output".to_string(),
        "json".into(),
        "rollout".into(),
        "--asg".into(),
        group.to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let key = key.to_string();
    tokio::task::spawn_blocking(move || {
        let out = world
            .bakery()
            .env("AWS_ACCESS_KEY_ID", key)
            .args(&all)
            .output()
            .unwrap();
        Run::from_output(out)
    })
    .await
    .unwrap()
}

/// Every instance of the group: id -> (lifecycle state, launch-template version).
async fn members(world: &World, fleet: &Fleet) -> Vec<(String, String, String)> {
    fleet
        .group(world)
        .await
        .instances()
        .iter()
        .map(|i| {
            (
                i.instance_id().unwrap_or_default().to_string(),
                i.lifecycle_state()
                    .map(|l| l.as_str().to_string())
                    .unwrap_or_default(),
                i.launch_template()
                    .and_then(|l| l.version())
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

async fn image_of(world: &World, id: &str) -> String {
    world
        .ec2()
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap()
        .reservations()[0]
        .instances()[0]
        .image_id()
        .unwrap_or_default()
        .to_string()
}

fn ids(v: &[(String, String)]) -> BTreeSet<String> {
    v.iter().map(|(id, _)| id.clone()).collect()
}

fn events<'a>(run: &'a Run, name: &str) -> Vec<&'a serde_json::Value> {
    run.events.iter().filter(|e| e["event"] == name).collect()
}

fn said(run: &Run, needle: &str) -> bool {
    run.events.iter().any(|e| e.to_string().contains(needle))
}

async fn lt_version(world: &World, fleet: &Fleet) -> String {
    fleet
        .group(world)
        .await
        .launch_template()
        .and_then(|l| l.version())
        .unwrap_or_default()
        .to_string()
}

/// Polls `cond` every 200 ms until it holds, or panics after `timeout` naming `what`.
async fn until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn skip_matching_leaves_instances_on_the_image_and_version_and_no_skip_matching_replaces_them(
) {
    let world = world();
    let stack = world.var("WORLD_STACK_AMI").to_string();
    let good = good_ami(world).await;
    let fleet = Fleet::create(world, "skip", 4).await;
    let first = fleet.live_instances(world).await;

    // Every instance already runs the stack image from version 1: nothing changes, and it says so.
    let run = rollout(world, &fleet.asg, "parity-skip-1", &["--ami", &stack]).await;
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(
        run.event("rollout_finished").unwrap()["result"],
        "already running",
        "{}",
        run.describe()
    );
    assert!(said(&run, "nothing to replace"), "{}", run.describe());
    assert!(events(&run, "batch_started").is_empty());
    assert_eq!(ids(&fleet.live_instances(world).await), ids(&first));
    assert_eq!(lt_version(world, &fleet).await, "1", "no new version");

    // Half the group on the good image from the group's version, half on the stack image from
    // version 1: only the stack half is replaced.
    let v2 = fleet.add_version(world, "1", &good).await.to_string();
    world
        .asg()
        .update_auto_scaling_group()
        .auto_scaling_group_name(&fleet.asg)
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .launch_template_id(&fleet.lt_id)
                .version(&v2)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut old: Vec<String> = first.iter().map(|(id, _)| id.clone()).collect();
    old.sort();
    for id in &old[..2] {
        world
            .asg()
            .terminate_instance_in_auto_scaling_group()
            .instance_id(id)
            .should_decrement_desired_capacity(false)
            .send()
            .await
            .unwrap();
    }
    until(
        Duration::from_secs(90),
        "2 good + 2 stack instances",
        || async {
            let live = fleet.live_instances(world).await;
            live.len() == 4 && live.iter().filter(|(_, a)| *a == good).count() == 2
        },
    )
    .await;
    fleet.wait_healthy(world, 4, Duration::from_secs(60)).await;
    let mixed = fleet.live_instances(world).await;
    let kept: BTreeSet<String> = mixed
        .iter()
        .filter(|(_, a)| *a == good)
        .map(|(id, _)| id.clone())
        .collect();
    let run = rollout(world, &fleet.asg, "parity-skip-2", &["--ami", &good]).await;
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let after = fleet.live_instances(world).await;
    assert_eq!(after.len(), 4);
    assert!(after.iter().all(|(_, a)| *a == good), "{after:?}");
    assert!(
        kept.is_subset(&ids(&after)),
        "the instances already on the image and version stay: {kept:?} in {after:?}"
    );
    let launched: u64 = events(&run, "batch_started")
        .iter()
        .map(|e| e["size"].as_u64().unwrap())
        .sum();
    assert_eq!(
        launched,
        2,
        "only the two others replaced: {}",
        run.describe()
    );

    // --no-skip-matching: every instance is replaced, though all run the image already.
    let before = ids(&fleet.live_instances(world).await);
    let run = rollout(
        world,
        &fleet.asg,
        "parity-skip-3",
        &["--ami", &good, "--no-skip-matching", "--max-surge", "100%"],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let after = fleet.live_instances(world).await;
    assert_eq!(after.len(), 4);
    assert!(after.iter().all(|(_, a)| *a == good));
    assert!(
        ids(&after).is_disjoint(&before),
        "every instance replaced: {before:?} -> {after:?}"
    );
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn protected_and_standby_instances_follow_their_policies() {
    let world = world();
    let stack = world.var("WORLD_STACK_AMI").to_string();
    let good = good_ami(world).await;
    let fleet = Fleet::create(world, "guard", 3).await;
    let asg = world.asg();
    // Standby needs room below the group's minimum.
    asg.update_auto_scaling_group()
        .auto_scaling_group_name(&fleet.asg)
        .min_size(0)
        .send()
        .await
        .unwrap();
    let mut first: Vec<String> = ids(&fleet.live_instances(world).await)
        .into_iter()
        .collect();
    first.sort();
    let (protected, standby) = (first[0].clone(), first[1].clone());
    asg.set_instance_protection()
        .auto_scaling_group_name(&fleet.asg)
        .instance_ids(&protected)
        .protected_from_scale_in(true)
        .send()
        .await
        .unwrap();
    asg.enter_standby()
        .auto_scaling_group_name(&fleet.asg)
        .instance_ids(&standby)
        .should_decrement_desired_capacity(false)
        .send()
        .await
        .unwrap();
    // Its replacement keeps 3 in service.
    until(
        Duration::from_secs(60),
        "3 healthy besides the Standby one",
        || async { fleet.healthy(world).await >= 3 },
    )
    .await;

    // ignore (the defaults): both stay as they are, and the rollout says so.
    let run = rollout(world, &fleet.asg, "parity-guard-1", &["--ami", &good]).await;
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let m = members(world, &fleet).await;
    let state = |id: &str| m.iter().find(|(i, ..)| i == id).map(|(_, s, _)| s.clone());
    assert_eq!(state(&protected).as_deref(), Some("InService"), "{m:?}");
    assert_eq!(state(&standby).as_deref(), Some("Standby"), "{m:?}");
    assert_eq!(image_of(world, &protected).await, stack);
    assert_eq!(image_of(world, &standby).await, stack);
    for (id, s, _) in &m {
        if s == "InService" && *id != protected {
            assert_eq!(image_of(world, id).await, good, "{id} replaced");
        }
    }
    assert!(
        said(&run, "left as they are")
            && said(&run, &format!("{protected} (protected from scale in"))
            && said(&run, &format!("{standby} (in Standby")),
        "{}",
        run.describe()
    );

    // replace: the protected instance is replaced, the Standby one terminated.
    let run = rollout(
        world,
        &fleet.asg,
        "parity-guard-2",
        &[
            "--ami",
            &stack,
            "--protected-instances",
            "replace",
            "--standby-instances",
            "replace",
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let m = members(world, &fleet).await;
    assert!(
        !m.iter().any(|(id, ..)| *id == protected || *id == standby),
        "{m:?}"
    );
    let live = fleet.live_instances(world).await;
    assert_eq!(live.len(), 3, "{live:?}");
    assert!(live.iter().all(|(_, a)| *a == stack), "{live:?}");

    // wait: the rollout holds until the protection is removed, then replaces the instance.
    let mut now: Vec<String> = ids(&live).into_iter().collect();
    now.sort();
    let guarded = now[0].clone();
    asg.set_instance_protection()
        .auto_scaling_group_name(&fleet.asg)
        .instance_ids(&guarded)
        .protected_from_scale_in(true)
        .send()
        .await
        .unwrap();
    let mut child = world
        .bakery()
        .env("AWS_ACCESS_KEY_ID", "parity-guard-3")
        .args([
            "--output", "json", "rollout", "--asg", &fleet.asg, "--ami", &good,
        ])
        .args(["--protected-instances", "wait", "--health-timeout", "120s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let needle = format!("{guarded} is protected from scale in");
    let mut seen = Vec::new();
    let lines = tokio::task::spawn_blocking(move || {
        events_until(
            &lines,
            &mut seen,
            Duration::from_secs(120),
            "the rollout waits for the protected instance",
            |e| e["event"] == "waiting" && e["why"].as_str().unwrap_or_default().contains(&needle),
        );
        (lines, seen)
    })
    .await
    .unwrap();
    // Waiting: every other instance runs the new image; the protected one is untouched.
    let live = fleet.live_instances(world).await;
    assert!(
        live.iter().all(|(id, a)| (*id == guarded) == (*a == stack))
            && ids(&live).contains(&guarded),
        "{live:?}"
    );
    assert!(child.try_wait().unwrap().is_none(), "still running");
    asg.set_instance_protection()
        .auto_scaling_group_name(&fleet.asg)
        .instance_ids(&guarded)
        .protected_from_scale_in(false)
        .send()
        .await
        .unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        drop(lines);
        status
    })
    .await
    .unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "the rollout finished once unprotected"
    );
    let live = fleet.live_instances(world).await;
    assert!(
        !ids(&live).contains(&guarded) && live.len() == 3 && live.iter().all(|(_, a)| *a == good),
        "{guarded} replaced once unprotected: {live:?}"
    );
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_protected_instance_waited_for_past_the_health_timeout_fails_the_rollout_clearly() {
    let world = world();
    let good = good_ami(world).await;
    let fleet = Fleet::create(world, "guardfail", 2).await;
    let mut first: Vec<String> = ids(&fleet.live_instances(world).await)
        .into_iter()
        .collect();
    first.sort();
    world
        .asg()
        .set_instance_protection()
        .auto_scaling_group_name(&fleet.asg)
        .instance_ids(&first[0])
        .protected_from_scale_in(true)
        .send()
        .await
        .unwrap();
    let run = rollout(
        world,
        &fleet.asg,
        "parity-guardfail",
        &[
            "--ami",
            &good,
            "--protected-instances",
            "wait",
            "--health-timeout",
            "5s",
        ],
    )
    .await;
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let error = run.error();
    assert!(
        error.contains(&first[0])
            && error.contains("protected from scale in")
            && error.contains("rerun"),
        "{error}"
    );
    // No rollback: the other instance runs the new image; the protected one is untouched.
    assert_eq!(
        image_of(world, &first[0]).await,
        world.var("WORLD_STACK_AMI")
    );
    let live = fleet.live_instances(world).await;
    assert_eq!(
        live.iter().filter(|(_, a)| *a == good).count(),
        1,
        "{live:?}"
    );
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_hooks_are_waited_for_and_never_completed_by_bakery() {
    let world = world();
    let good = good_ami(world).await;
    let fleet = Fleet::create(world, "hooks", 2).await;
    let asg = world.asg();
    for (name, transition) in [
        ("user-launch", "autoscaling:EC2_INSTANCE_LAUNCHING"),
        ("user-drain", "autoscaling:EC2_INSTANCE_TERMINATING"),
    ] {
        asg.put_lifecycle_hook()
            .auto_scaling_group_name(&fleet.asg)
            .lifecycle_hook_name(name)
            .lifecycle_transition(transition)
            .heartbeat_timeout(300)
            .default_result("ABANDON")
            .send()
            .await
            .unwrap();
    }
    let old = ids(&fleet.live_instances(world).await);
    let group = fleet.asg.clone();
    let rolling =
        tokio::spawn(
            async move { rollout(world, &group, "parity-hooks", &["--ami", &good]).await },
        );
    // The hooks' owner: completes each action a while after it began (so bakery has to wait).
    let mut seen: std::collections::BTreeMap<String, std::time::Instant> = Default::default();
    let mut completed = BTreeSet::new();
    while !rolling.is_finished() {
        for (id, state, _) in members(world, &fleet).await {
            let hook = match state.as_str() {
                "Pending:Wait" => "user-launch",
                "Terminating:Wait" => "user-drain",
                _ => continue,
            };
            let since = *seen
                .entry(format!("{id}/{hook}"))
                .or_insert_with(std::time::Instant::now);
            if since.elapsed() >= Duration::from_secs(2) && completed.insert(format!("{id}/{hook}"))
            {
                asg.complete_lifecycle_action()
                    .auto_scaling_group_name(&fleet.asg)
                    .lifecycle_hook_name(hook)
                    .instance_id(&id)
                    .lifecycle_action_result("CONTINUE")
                    .send()
                    .await
                    .unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let run = rolling.await.unwrap();
    // Read at once: the rollout ended only after its retired instances left the group.
    let m = members(world, &fleet).await;
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert!(
        m.iter()
            .all(|(id, s, _)| !old.contains(id) && s == "InService"),
        "the old instances left the group before the rollout ended: {m:?}"
    );
    assert!(
        completed.iter().any(|k| k.ends_with("/user-launch"))
            && completed.iter().any(|k| k.ends_with("/user-drain")),
        "both hooks held instances: {completed:?}"
    );
    assert!(said(&run, "Pending:Wait"), "{}", run.describe());
    assert!(said(&run, "Terminating:Wait"), "{}", run.describe());
    let calls = world_calls(world, "parity-hooks");
    let hook_calls: Vec<&serde_json::Value> = calls["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["action"] == "CompleteLifecycleAction"
                || c["action"] == "RecordLifecycleActionHeartbeat"
        })
        .collect();
    assert!(
        hook_calls.is_empty(),
        "bakery touched a hook: {hook_calls:?}"
    );
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn old_warm_pool_instances_are_refreshed_from_the_new_version() {
    let world = world();
    let good = good_ami(world).await;
    let fleet = Fleet::create(world, "warm", 2).await;
    let asg = world.asg();
    asg.put_warm_pool()
        .auto_scaling_group_name(&fleet.asg)
        .min_size(1)
        .max_group_prepared_capacity(3)
        .pool_state(aws_sdk_autoscaling::types::WarmPoolState::Stopped)
        .send()
        .await
        .unwrap();
    let pool = |asg: aws_sdk_autoscaling::Client, name: String| async move {
        asg.describe_warm_pool()
            .auto_scaling_group_name(name)
            .send()
            .await
            .unwrap()
            .instances()
            .iter()
            .map(|i| {
                (
                    i.instance_id().unwrap_or_default().to_string(),
                    i.lifecycle_state().cloned(),
                    i.launch_template()
                        .and_then(|l| l.version())
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    until(
        Duration::from_secs(120),
        "a warmed, stopped pool instance",
        || {
            let (a, n) = (asg.clone(), fleet.asg.clone());
            async move {
                pool(a, n)
                    .await
                    .iter()
                    .any(|(_, s, _)| s.as_ref() == Some(&LifecycleState::WarmedStopped))
            }
        },
    )
    .await;
    let warmed: BTreeSet<String> = pool(asg.clone(), fleet.asg.clone())
        .await
        .into_iter()
        .map(|(id, ..)| id)
        .collect();
    let run = rollout(world, &fleet.asg, "parity-warm", &["--ami", &good]).await;
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let refreshed: BTreeSet<String> = events(&run, "warm_pool_refreshed")
        .iter()
        .flat_map(|e| e["instances"].as_array().unwrap().clone())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(
        warmed.is_subset(&refreshed),
        "the old pool {warmed:?} was refreshed: {}",
        run.describe()
    );
    let live = fleet.live_instances(world).await;
    assert!(
        live.iter().all(|(_, a)| *a == good) && ids(&live).is_disjoint(&warmed),
        "no old pool instance joined the group: {live:?}"
    );
    let version = lt_version(world, &fleet).await;
    until(
        Duration::from_secs(120),
        "the pool refilled from the new version",
        || {
            let (a, n, v) = (asg.clone(), fleet.asg.clone(), version.clone());
            async move {
                let p = pool(a, n).await;
                !p.is_empty() && p.iter().all(|(_, _, ver)| *ver == v)
            }
        },
    )
    .await;
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exponential_ramp_and_checkpoints_shape_the_batches() {
    let world = world();
    let stack = world.var("WORLD_STACK_AMI").to_string();
    let good = good_ami(world).await;
    let fleet = Fleet::create(world, "ramp", 4).await;
    let ramp = ["--ramp", "exponential", "--max-surge", "100%"];

    // The plan shows the ramp: 1, 2, then the last 1 (fixed would be 1, 3).
    let mut args = vec!["--ami", good.as_str(), "--dry-run"];
    args.extend(ramp);
    let run = rollout(world, &fleet.asg, "parity-ramp-plan", &args).await;
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let plan = &run.event("rollout_plan").unwrap()["plan"];
    assert_eq!(plan["ramp"], "exponential");
    let launched: Vec<u64> = plan["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["launched"].as_u64().unwrap())
        .collect();
    assert_eq!(launched, vec![1, 2, 1], "{plan:#}");

    // The rollout does what the plan said, never below capacity.
    let mut args = vec!["--ami", good.as_str()];
    args.extend(ramp);
    let run = rollout(world, &fleet.asg, "parity-ramp", &args).await;
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let sizes: Vec<u64> = events(&run, "batch_started")
        .iter()
        .map(|e| e["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, vec![1, 2, 1], "{}", run.describe());

    // Checkpoints: at 50% the rollout pauses, and no batch runs past it.
    let run = rollout(
        world,
        &fleet.asg,
        "parity-checkpoints",
        &[
            "--ami",
            &stack,
            "--max-surge",
            "2",
            "--checkpoints",
            "50,100",
            "--checkpoint-pause",
            "2s",
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let shape: Vec<String> = run
        .events
        .iter()
        .filter_map(|e| match e["event"].as_str() {
            Some("batch_started") => Some(format!("batch {}", e["size"])),
            Some("checkpoint_reached") => {
                Some(format!("checkpoint {} {}s", e["percent"], e["pause_s"]))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        shape,
        vec!["batch 1", "batch 1", "checkpoint 50 2s", "batch 2"],
        "{}",
        run.describe()
    );
    assert!(said(&run, "checkpoint 50%: paused"), "{}", run.describe());
    assert!(fleet.amis(world).await.iter().all(|a| *a == stack));
    fleet.delete(world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_in_group_flags_are_refused_naming_the_flag_and_the_fix() {
    let world = world();
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["--checkpoints", "50,25,100"],
            &["--checkpoints", "50,25,100", "ascending"],
        ),
        (
            &["--checkpoints", "25,50"],
            &["--checkpoints", "end the list with 100"],
        ),
        (
            &["--checkpoints", "0,100"],
            &["--checkpoints", "from 1 to 100"],
        ),
        (
            &["--protected-instances", "skip"],
            &["--protected-instances", "skip", "ignore, wait or replace"],
        ),
        (
            &["--ramp", "linear"],
            &["--ramp", "linear", "fixed or exponential"],
        ),
    ];
    for (args, needles) in cases {
        let run = rollout(
            world,
            "no-such-group",
            "parity-bad",
            &[&["--ami", "ami-12345678"], args].concat(),
        )
        .await;
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.describe());
        for n in needles {
            assert!(run.stderr.contains(n), "{args:?}: {n:?} in {}", run.stderr);
        }
    }
    let run = rollout(
        world,
        "no-such-group",
        "parity-bad",
        &["--ami", "ami-12345678", "--checkpoint-pause", "2m"],
    )
    .await;
    assert_eq!(run.code, Some(2), "{}", run.describe());
    assert!(run.stderr.contains("--checkpoints"), "{}", run.stderr);
    assert!(
        world_calls(world, "parity-bad")["calls"]
            .as_array()
            .unwrap()
            .is_empty(),
        "refused before any call"
    );
}
