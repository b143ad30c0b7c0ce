//! `bakery gc` and `bakery prune` against the world: what a SIGKILLed bake leaves is found by its
//! tags and removed; old AMIs are pruned, never one in use.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Starts a bake and SIGKILLs it once `step` has started (and, for `create_image`, once the image
/// exists). Returns the build id.
fn kill_bake_during(world: &World, name: &str, step: &str) -> String {
    let dir = scratch(name);
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            world,
            "[[provisioner]]\ntype = \"shell\"\ninline = [\"true\"]\n",
            "",
        ),
    );
    let (mut child, lines) = spawn_build(world, &r);
    let mut build_id = String::new();
    let mut armed = false;
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(90))
            .expect("the bake reached the step");
        let e: serde_json::Value = serde_json::from_str(&line).unwrap();
        if e["event"] == "build_started" {
            build_id = e["build_id"].as_str().unwrap().to_string();
        }
        if e["event"] == "step_started" && e["step"] == step {
            armed = true;
            if step != "create_image" {
                break;
            }
        }
        if armed && e["event"] == "resource_created" && e["kind"] == "image" {
            break;
        }
    }
    Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    build_id
}

fn gc(world: &World, args: &[&str]) -> serde_json::Value {
    let out = world
        .bakery()
        .args(["--output", "json", "gc"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_what_a_sigkilled_bake_left_behind() {
    let world = World::get();
    let build_id =
        tokio::task::spawn_blocking(|| kill_bake_during(&World::get(), "gc-connect", "connect"))
            .await
            .unwrap();
    let left = leftovers(&world, &build_id, true).await;
    assert_eq!(
        left.len(),
        3,
        "SIGKILL leaves the instance, group and key: {left:?}"
    );

    // Too young by default: a bake might still be running.
    let report = gc(&world, &["--build-id", &build_id]);
    let actions: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, vec!["kept (too young)"; 3], "{report}");

    let report = gc(
        &world,
        &["--build-id", &build_id, "--older-than", "0s", "--dry-run"],
    );
    let found = report["findings"].as_array().unwrap();
    let kinds: Vec<&str> = found.iter().map(|f| f["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        vec!["instance", "security group", "key pair"],
        "{report}"
    );
    assert!(found.iter().all(|f| f["action"] == "would remove"));
    assert_eq!(
        leftovers(&world, &build_id, true).await.len(),
        3,
        "a dry run removes nothing"
    );

    let report = gc(&world, &["--build-id", &build_id, "--older-than", "0s"]);
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["action"] == "removed"),
        "{report}"
    );
    let left = leftovers(&world, &build_id, true).await;
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_the_unfinished_image_of_a_killed_bake() {
    let world = World::get();
    let build_id =
        tokio::task::spawn_blocking(|| kill_bake_during(&World::get(), "gc-image", "create_image"))
            .await
            .unwrap();
    let left = leftovers(&world, &build_id, true).await;
    assert!(left.iter().any(|l| l.starts_with("image ")), "{left:?}");
    let report = gc(&world, &["--build-id", &build_id, "--older-than", "0s"]);
    let kinds: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"image"), "{report}");
    let left = leftovers(&world, &build_id, true).await;
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_never_touches_a_bake_that_is_still_running() {
    // Issue #10 A16: `gc --older-than 0s` destroyed a bake in progress.
    let world = World::get();
    let dir = scratch("gc-running");
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            "[[provisioner]]\ntype = \"shell\"\ninline = [\"sleep 8\"]\n",
            "",
        ),
    );
    let (mut child, lines) = spawn_build(&world, &r);
    let mut events = Vec::new();
    events_until(
        &lines,
        &mut events,
        Duration::from_secs(90),
        "the bake reached its provisioner",
        |e| e["event"] == "step_started" && e["step"] == "provision: shell 1",
    );
    let build_id = events
        .iter()
        .find(|e| e["event"] == "build_started")
        .and_then(|e| e["build_id"].as_str())
        .unwrap()
        .to_string();
    let report = gc(&world, &["--build-id", &build_id, "--older-than", "0s"]);
    let findings = report["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 3, "instance, group and key: {report}");
    for f in findings {
        let action = f["action"].as_str().unwrap();
        assert!(
            action.starts_with("kept (its bake (pid") && action.contains("still running"),
            "{report}"
        );
    }
    let status = child.wait().unwrap();
    let rest: Vec<String> = lines.iter().collect();
    assert_eq!(status.code(), Some(0), "the bake finished: {rest:?}");
    let left = leftovers(&world, &build_id, false).await;
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_reports_a_takeover_whose_group_was_deleted_under_it_as_already_gone() {
    // Issue #10: gc over the whole account failed (exit 1) when another process deleted a group
    // between gc's listing and its call to end the group's stale daemon takeover.
    let world = World::get();
    let name = format!(
        "t-gc-gone-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let lt = world
        .ec2()
        .create_launch_template()
        .launch_template_name(&name)
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(world.var("WORLD_BASE_AMI"))
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let lt_id = lt
        .launch_template()
        .and_then(|t| t.launch_template_id())
        .unwrap()
        .to_string();
    let expired = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 1;
    world
        .asg()
        .create_auto_scaling_group()
        .auto_scaling_group_name(&name)
        .min_size(0)
        .max_size(0)
        .desired_capacity(0)
        .vpc_zone_identifier(world.var("WORLD_PRIVATE_SUBNETS"))
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .launch_template_id(&lt_id)
                .version("$Latest")
                .build(),
        )
        // Another host's daemon whose record expired: gc resumes HealthCheck and drops the tag.
        .tags(
            aws_sdk_autoscaling::types::Tag::builder()
                .resource_id(&name)
                .resource_type("auto-scaling-group")
                .key("bakery:daemon")
                .value(format!(
                    "owner=elsewhere:42;token=abc;since={};expires={expired}",
                    expired - 60
                ))
                .propagate_at_launch(false)
                .build(),
        )
        .send()
        .await
        .unwrap();
    // gc's ResumeProcesses calls wait 2 s before the world serves them; the group is deleted
    // once gc has listed the groups (both listings served), so it is gone when gc acts on it.
    let key = format!("gc-gone-{}", std::process::id());
    world_fault(
        &world,
        1,
        &key,
        "autoscaling:ResumeProcesses",
        "latency_ms",
        2000.0,
    );
    let gc = world
        .bakery()
        .env("AWS_ACCESS_KEY_ID", &key)
        .args(["--output", "json", "gc"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let listed = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let calls = world_calls(&world, &key);
        if calls["counts"]["autoscaling:DescribeAutoScalingGroups"]
            .as_u64()
            .unwrap_or(0)
            >= 2
        {
            break;
        }
        assert!(
            std::time::Instant::now() < listed,
            "gc never listed the groups: {calls}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    delete_group(&world, &name).await;
    let _ = world
        .ec2()
        .delete_launch_template()
        .launch_template_id(&lt_id)
        .send()
        .await;
    let out = gc.wait_with_output().unwrap();
    clear_world_faults(&world);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The report, then (when something could not be removed) the failure.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = parse_events(&stdout)
        .into_iter()
        .find(|e| e.get("findings").is_some())
        .unwrap_or_else(|| panic!("gc printed no report: {stdout}\n{stderr}"));
    let finding = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "daemon takeover" && f["id"] == name.as_str())
        .unwrap_or_else(|| panic!("gc listed the takeover: {report}"));
    assert_eq!(finding["action"], "already gone", "{report}");
    // gc fails only for what it could not remove (other tests' leftovers share the world).
    let failed = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["action"].as_str().unwrap().starts_with("failed"))
        .count();
    assert_eq!(out.status.success(), failed == 0, "{report}\n{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_keeps_the_newest_and_any_ami_in_use() {
    let world = World::get();
    let prefix = format!("prune{}-", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let dir = scratch("prune");
    let mut amis = Vec::new();
    for i in 0..3 {
        let text = recipe(&world, "", "").replace("test-{{build_id}}", &format!("{prefix}{i}"));
        let r = write(&dir, &format!("r{i}.toml"), &text);
        let run = build(&world, &r, &[]);
        assert_eq!(run.code, Some(0), "{}", run.describe());
        amis.push(
            run.event("build_finished").unwrap()["manifest"]["ami_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        // AMI creation dates have one-second resolution.
        std::thread::sleep(Duration::from_millis(1100));
    }
    // The oldest one is in use by an instance.
    let (instance, _) = launch(&world, &amis[0], None).await;
    let out = world
        .bakery()
        .args([
            "--output",
            "json",
            "prune",
            "--name-prefix",
            &prefix,
            "--keep",
            "1",
        ])
        .output()
        .unwrap();
    terminate(&world, &instance).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let actions: Vec<(String, String)> = report["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["ami_id"].as_str().unwrap().to_string(),
                i["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        actions[0],
        (amis[2].clone(), "kept (newest 1)".to_string()),
        "{report}"
    );
    assert_eq!(actions[1].0, amis[1]);
    assert!(actions[1].1.starts_with("deregistered"), "{report}");
    assert_eq!(actions[2], (amis[0].clone(), "kept (in use)".to_string()));
    let left = world
        .ec2()
        .describe_images()
        .image_ids(&amis[1])
        .send()
        .await;
    assert!(
        left.map(|o| o.images().is_empty()).unwrap_or(true),
        "{} was deregistered",
        amis[1]
    );

    let out = world
        .bakery()
        .args(["prune", "--name-prefix", "w", "--keep", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a one-letter prefix is refused");
}
