//! `bakery build` end to end against the local world: the real binary, the real SDK, real SSH
//! into instance bodies. Each test proves one behaviour a user relies on, and checks that the
//! bake left nothing behind.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

async fn assert_clean(world: &World, build_id: &str, include_images: bool) {
    let left = leftovers(world, build_id, include_images).await;
    assert!(left.is_empty(), "build {build_id} left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sample_recipe_bakes_an_image_whose_instances_serve_the_app() {
    let world = World::get();
    let dir = scratch("sample");
    let manifest = dir.join("manifest.json");
    let out = world
        .bakery()
        .current_dir(repo())
        .args([
            "--output",
            "json",
            "build",
            "examples/web/recipe.toml",
            "--manifest",
        ])
        .arg(&manifest)
        .args([
            "--var",
            &format!("base_ami={}", world.var("WORLD_BASE_AMI")),
        ])
        .args(["--var", &format!("subnet={}", world.private_subnet())])
        .args(["--var", "version=2.3.4"])
        .output()
        .unwrap();
    let run = Run::from_output(out);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert!(
        run.output_lines()
            .iter()
            .any(|l| l == "enabled web.service"),
        "the shipped enable-service.sh ran and its output streamed: {}",
        run.describe()
    );

    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let finished = run.event("build_finished").expect("build_finished event");
    assert_eq!(
        finished["manifest"], m,
        "the event carries the manifest that was written"
    );
    let ami = m["ami_id"].as_str().unwrap();
    assert!(ami.starts_with("ami-"));
    assert!(m["ami_name"].as_str().unwrap().starts_with("web-2.3.4-"));
    assert_eq!(m["source_ami"], world.var("WORLD_BASE_AMI"));
    assert_eq!(m["build_id"], run.build_id());
    assert_eq!(m["recipe_sha256"].as_str().unwrap().len(), 64);
    let steps: Vec<&str> = m["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for step in [
        "resolve_source",
        "prepare",
        "launch",
        "connect",
        "provision: shell 2",
        "stop",
        "create_image",
    ] {
        assert!(
            steps.contains(&step),
            "manifest steps {steps:?} lack {step}"
        );
    }
    assert_clean(&world, &run.build_id(), false).await;

    // The image carries the recipe's tags and bakery's provenance.
    let ec2 = world.ec2();
    let image = ec2.describe_images().image_ids(ami).send().await.unwrap();
    let tags: std::collections::BTreeMap<_, _> = image.images()[0]
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
        .collect();
    assert_eq!(tags.get("Version").map(String::as_str), Some("2.3.4"));
    assert_eq!(tags.get("bakery:build-id"), Some(&run.build_id()));
    assert!(
        !tags.contains_key("bakery:temporary"),
        "the product is not temporary"
    );

    // An instance launched from the new AMI runs the baked, enabled service.
    let (id, ip) = launch(&world, ami, None).await;
    let health = http_get(&ip, 8080, "/healthz", Duration::from_secs(30));
    let root = http_get(&ip, 8080, "/", Duration::from_secs(5));
    terminate(&world, &id).await;
    assert_eq!(health.unwrap(), (200, "ok\n".to_string()));
    assert_eq!(root.unwrap(), (200, "web 2.3.4\n".to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_provisioner_fails_the_bake_with_its_exit_code_and_output_and_leaves_nothing() {
    let world = World::get();
    let dir = scratch("failing");
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            r#"
[[provisioner]]
type = "shell"
inline = ["echo about to fail", "echo 'no such package' >&2", "exit 7"]
"#,
            "",
        ),
    );
    let run = build(&world, &r, &[]);
    assert_eq!(run.code, Some(3), "{}", run.describe());
    let failed = run.event("build_failed").expect("build_failed event");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("provisioner shell 1 failed with exit code 7"),
        "{error}"
    );
    assert!(
        error.contains("about to fail") && error.contains("no such package"),
        "the last lines are shown: {error}"
    );
    assert!(
        !r.with_extension("manifest.json").exists(),
        "no manifest for a failed bake"
    );
    assert_clean(&world, &run.build_id(), true).await;

    // The human form says the same on stderr, and the exit code is the same.
    let out = world
        .bakery()
        .args(["build"])
        .arg(&r)
        .arg("--manifest")
        .arg(dir.join("m.json"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr.contains("error: provisioner shell 1 failed with exit code 7"),
        "{stderr}"
    );
    assert!(
        stderr.contains("shell 1 | about to fail"),
        "output is streamed with a prefix: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn on_error_abort_keeps_the_resources_and_says_how_to_remove_them() {
    let world = World::get();
    let dir = scratch("abort");
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            "[[provisioner]]\ntype = \"shell\"\ninline = [\"exit 1\"]\n",
            "",
        ),
    );
    let run = build(&world, &r, &["--on-error", "abort"]);
    assert_eq!(run.code, Some(3), "{}", run.describe());
    let kept: Vec<&serde_json::Value> = run
        .events
        .iter()
        .filter(|e| e["event"] == "resource_kept")
        .collect();
    let kinds: Vec<&str> = kept.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(
        kinds.contains(&"instance")
            && kinds.contains(&"security group")
            && kinds.contains(&"key pair"),
        "{kinds:?}"
    );
    assert!(kept
        .iter()
        .all(|e| e["remove_with"].as_str().unwrap().starts_with("aws ec2 ")));
    let build_id = run.build_id();
    let left = leftovers(&world, &build_id, false).await;
    assert_eq!(
        left.len(),
        3,
        "instance, group and key pair are kept: {left:?}"
    );

    // Clean up what the test asked bakery to keep.
    let ec2 = world.ec2();
    let filter = aws_sdk_ec2::types::Filter::builder()
        .name("tag:bakery:build-id")
        .values(&build_id)
        .build();
    let ids: Vec<String> = ec2
        .describe_instances()
        .filters(filter.clone())
        .send()
        .await
        .unwrap()
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    ec2.terminate_instances()
        .set_instance_ids(Some(ids))
        .send()
        .await
        .unwrap();
    for g in ec2
        .describe_security_groups()
        .filters(filter)
        .send()
        .await
        .unwrap()
        .security_groups()
    {
        ec2.delete_security_group()
            .group_id(g.group_id().unwrap())
            .send()
            .await
            .unwrap();
    }
    ec2.delete_key_pair()
        .key_name(format!("bakery-{build_id}"))
        .send()
        .await
        .unwrap();
    assert_clean(&world, &build_id, true).await;
}

/// SIGINT (or SIGTERM) while `step` runs: the bake stops, removes everything, exits 130 (143).
async fn interrupt_during(step: &str, signal: &str) {
    let world = World::get();
    let dir = scratch(&format!(
        "interrupt-{}-{signal}",
        step.replace([' ', ':'], "_")
    ));
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            "[[provisioner]]\ntype = \"shell\"\ninline = [\"echo started\", \"sleep 60\"]\n",
            "",
        ),
    );
    let (mut child, lines) = spawn_build(&world, &r);
    let mut events = Vec::new();
    // For the provisioner, wait until it has really started (its first output line).
    events_until(
        &lines,
        &mut events,
        Duration::from_secs(90),
        &format!("step {step} never started"),
        |e| {
            if step == "provision: shell 1" {
                e["event"] == "output" && e["line"] == "started"
            } else {
                e["event"] == "step_started" && e["step"] == step
            }
        },
    );
    Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    let started = Instant::now();
    let status = child.wait().unwrap();
    let waited = started.elapsed();
    let rest: Vec<String> = lines.try_iter().collect();
    events.extend(rest.iter().filter_map(|l| serde_json::from_str(l).ok()));
    let expected = if signal == "-INT" { 130 } else { 143 };
    assert_eq!(status.code(), Some(expected), "after {step}: {events:?}");
    let failed = events
        .iter()
        .find(|e| e["event"] == "build_failed")
        .expect("build_failed event");
    assert!(
        failed["error"].as_str().unwrap().contains("interrupted"),
        "{failed}"
    );
    assert!(waited < Duration::from_secs(60), "cleanup took {waited:?}");
    let build_id = events[0]["build_id"].as_str().unwrap().to_string();
    assert_clean(&world, &build_id, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_while_preparing_cleans_up() {
    interrupt_during("prepare", "-INT").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_while_launching_cleans_up() {
    interrupt_during("launch", "-INT").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_while_waiting_for_running_cleans_up() {
    interrupt_during("wait_running", "-INT").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_while_connecting_cleans_up() {
    interrupt_during("connect", "-INT").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_while_a_provisioner_runs_cleans_up() {
    interrupt_during("provision: shell 1", "-INT").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_a_provisioner_runs_cleans_up() {
    interrupt_during("provision: shell 1", "-TERM").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_while_stopping_cleans_up() {
    interrupt_during_after_provisioning("stop").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_while_creating_the_image_removes_the_unfinished_image_too() {
    interrupt_during_after_provisioning("create_image").await;
}

/// The late steps need a provisioner that finishes.
async fn interrupt_during_after_provisioning(step: &str) {
    let world = World::get();
    let dir = scratch(&format!("interrupt-late-{step}"));
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            "[[provisioner]]\ntype = \"shell\"\ninline = [\"true\"]\n",
            "",
        ),
    );
    let (mut child, lines) = spawn_build(&world, &r);
    let mut events = Vec::new();
    events_until(
        &lines,
        &mut events,
        Duration::from_secs(90),
        &format!("step {step} never started"),
        |e| e["event"] == "step_started" && e["step"] == step,
    );
    if step == "create_image" {
        // Let CreateImage land, so there is an unfinished image to remove.
        events_until(
            &lines,
            &mut events,
            Duration::from_secs(30),
            "no image was created",
            |e| e["event"] == "resource_created" && e["kind"] == "image",
        );
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    events.extend(
        lines
            .try_iter()
            .filter_map(|l| serde_json::from_str(&l).ok()),
    );
    assert_eq!(status.code(), Some(130), "{events:?}");
    let build_id = events[0]["build_id"].as_str().unwrap().to_string();
    if step == "create_image" {
        assert!(
            events
                .iter()
                .any(|e| e["event"] == "resource_released" && e["kind"] == "image"),
            "the unfinished image was deregistered: {events:?}"
        );
    }
    assert_clean(&world, &build_id, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_key_that_does_not_match_the_console_output_is_refused() {
    let world = World::get();
    // A decoy machine answers SSH at the address bakery is told to use: a different host key
    // from the one the build instance's console output lists.
    let (decoy, decoy_ip) = launch(&world, world.var("WORLD_BASE_AMI"), None).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect_timeout(
        &format!("{decoy_ip}:22").parse().unwrap(),
        Duration::from_millis(200),
    )
    .is_err()
    {
        assert!(Instant::now() < deadline, "decoy {decoy} never booted");
        std::thread::sleep(Duration::from_millis(100));
    }
    let dir = scratch("hostkey");
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            "[[provisioner]]\ntype = \"shell\"\ninline = [\"touch /tmp/should-not-run\"]\n",
            &format!("host = \"{decoy_ip}\""),
        ),
    );
    let run = build(&world, &r, &[]);
    terminate(&world, &decoy).await;
    assert_eq!(run.code, Some(4), "{}", run.describe());
    let error = run.error();
    assert!(error.contains("host key verification failed"), "{error}");
    assert!(
        error.contains("--trust-host-key-on-first-use"),
        "the error names the opt-out: {error}"
    );
    assert!(run.output_lines().is_empty(), "no provisioner ran");
    assert_clean(&world, &run.build_id(), true).await;

    // Trust on first use is the explicit opt-out: the same bake then goes through to the decoy.
    let (decoy, decoy_ip) = launch(&world, world.var("WORLD_BASE_AMI"), None).await;
    let r = write(
        &dir,
        "tofu.toml",
        &recipe(
            &world,
            "[[provisioner]]\ntype = \"shell\"\ninline = [\"echo hi\"]\n",
            &format!("host = \"{decoy_ip}\""),
        )
        .replace("connect_timeout = \"60s\"", "connect_timeout = \"5s\""),
    );
    let run = build(&world, &r, &["--trust-host-key-on-first-use"]);
    terminate(&world, &decoy).await;
    // The decoy does not accept the bake's key, so login fails; what matters is that the host
    // key check was skipped (no exit 4).
    assert_ne!(run.code, Some(4), "{}", run.describe());
    assert_clean(&world, &run.build_id(), true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_ami_that_does_not_exist_fails_before_creating_anything() {
    let world = World::get();
    let dir = scratch("noami");
    let text = recipe(&world, "", "").replace(world.var("WORLD_BASE_AMI"), "ami-0000000000000dead");
    let r = write(&dir, "recipe.toml", &text);
    let run = build(&world, &r, &[]);
    assert_eq!(run.code, Some(2), "{}", run.describe());
    let error = run.error();
    assert!(
        error.contains("ami-0000000000000dead") && error.contains("not found"),
        "{error}"
    );
    assert!(run.event("resource_created").is_none());
    assert_clean(&world, &run.build_id(), true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subnet_that_does_not_exist_is_named() {
    let world = World::get();
    let dir = scratch("nosubnet");
    let text = recipe(&world, "", "").replace(world.private_subnet(), "subnet-0000dead");
    let run = build(&world, &write(&dir, "recipe.toml", &text), &[]);
    assert_eq!(run.code, Some(2), "{}", run.describe());
    let error = run.error();
    assert!(
        error.contains("subnet subnet-0000dead not found"),
        "{error}"
    );
    assert_clean(&world, &run.build_id(), true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_temporary_group_admits_ssh_only_from_the_caller_and_files_upload_with_their_mode() {
    let world = World::get();
    let dir = scratch("sg");
    std::fs::create_dir_all(dir.join("files/sub")).unwrap();
    write(&dir, "files/a.conf", "alpha\n");
    write(&dir, "files/sub/b.txt", "beta\n");
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            r#"
[[provisioner]]
type = "file"
source = "files"
destination = "/opt/deep/conf"
mode = "0640"

[[provisioner]]
type = "shell"
env = { GREETING = "it's a 'quoted' $value" }
inline = [
  "stat -c '%a %n' /opt/deep/conf/a.conf /opt/deep/conf/sub/b.txt",
  "cat /opt/deep/conf/sub/b.txt",
  "printf '%s\n' \"$GREETING\"",
]
"#,
            "",
        ),
    );
    let (mut child, lines) = spawn_build(&world, &r);
    // While the bake runs, read its temporary group's rules.
    let mut group = None;
    let mut events = Vec::new();
    for line in lines.iter() {
        let e: serde_json::Value = serde_json::from_str(&line).unwrap();
        if e["event"] == "resource_created" && e["kind"] == "security group" {
            group = e["id"].as_str().map(str::to_string);
        }
        let provisioning = e["event"] == "step_started" && e["step"] == "provision: file 1";
        events.push(e);
        if provisioning {
            break;
        }
    }
    let group = group.expect("a temporary security group was created");
    let sg = world
        .ec2()
        .describe_security_groups()
        .group_ids(&group)
        .send()
        .await
        .unwrap();
    let perms = sg.security_groups()[0].ip_permissions();
    assert_eq!(perms.len(), 1, "{perms:?}");
    assert_eq!(perms[0].from_port(), Some(22));
    let cidrs: Vec<&str> = perms[0]
        .ip_ranges()
        .iter()
        .filter_map(|r| r.cidr_ip())
        .collect();
    assert_eq!(
        cidrs,
        vec!["127.0.0.1/32"],
        "only the caller's own address, never 0.0.0.0/0"
    );

    let status = child.wait().unwrap();
    events.extend(lines.iter().filter_map(|l| serde_json::from_str(&l).ok()));
    assert_eq!(status.code(), Some(0), "{events:?}");
    let out: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "output")
        .filter_map(|e| e["line"].as_str())
        .collect();
    assert_eq!(
        out,
        vec![
            "640 /opt/deep/conf/a.conf",
            "640 /opt/deep/conf/sub/b.txt",
            "beta",
            "it's a 'quoted' $value"
        ]
    );
    let build_id = events[0]["build_id"].as_str().unwrap().to_string();
    assert_clean(&world, &build_id, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_link_out_of_the_source_folder_made_after_validate_is_refused_at_upload() {
    // Issue #10 A6 at upload time: the recipe's links are checked when the bake starts; a link
    // made while it runs (here, during the provisioner before the upload) is refused too, and
    // never followed.
    let world = World::get();
    let dir = scratch("late-link");
    std::fs::create_dir_all(dir.join("files")).unwrap();
    write(&dir, "files/a.conf", "alpha\n");
    write(&dir, "outside.txt", "not for the image\n");
    // The first provisioner waits on the instance until the test opens this port.
    let port = free_port();
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            &format!(
                r#"
[[provisioner]]
type = "shell"
inline = ["until python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 1)\" 2>/dev/null; do sleep 0.1; done"]

[[provisioner]]
type = "file"
source = "files"
destination = "/opt/late"
"#
            ),
            "",
        ),
    );
    let (mut child, lines) = spawn_build(&world, &r);
    let mut events = Vec::new();
    events_until(
        &lines,
        &mut events,
        Duration::from_secs(120),
        "the first provisioner never started",
        |e| e["event"] == "step_started" && e["step"] == "provision: shell 1",
    );
    std::os::unix::fs::symlink(dir.join("outside.txt"), dir.join("files/lnk")).unwrap();
    let go = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    drop(go);
    events.extend(lines.iter().filter_map(|l| serde_json::from_str(&l).ok()));
    assert_eq!(status.code(), Some(3), "{events:?}");
    let failed = events
        .iter()
        .find(|e| e["event"] == "build_failed")
        .expect("build_failed");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("files/lnk is a symbolic link to")
            && error.contains("outside.txt, outside the source folder"),
        "{error}"
    );
    let build_id = events[0]["build_id"].as_str().unwrap().to_string();
    assert_clean(&world, &build_id, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provisioner_that_drops_the_connection_as_expected_is_followed_after_a_reconnect() {
    let world = World::get();
    let dir = scratch("disconnect");
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            r#"
[variables]
greeting = "default"
tier = "default"

# As a reboot would: the SSH session ends under the provisioner (its sshd is killed).
[[provisioner]]
type = "shell"
expect_disconnect = true
inline = ["echo before", "kill -KILL $(awk '{print $4}' /proc/$PPID/stat)", "sleep 5"]

[[provisioner]]
type = "shell"
env = { GREETING = "{{var.greeting}}", TIER = "{{var.tier}}" }
inline = ["echo \"after: $GREETING $TIER\""]
"#,
            "",
        ),
    );
    let vars = write(
        &dir,
        "vars.toml",
        "greeting = \"from-file\"\ntier = \"from-file\"\n",
    );
    let run = build(
        &world,
        &r,
        &[
            "--var-file",
            vars.to_str().unwrap(),
            "--var",
            "tier=from-flag",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert!(
        run.stdout.contains("as expected") && run.stdout.contains("reconnecting"),
        "{}",
        run.describe()
    );
    // The later --var wins over the file, the file over the recipe's default.
    assert!(
        run.output_lines()
            .iter()
            .any(|l| l.contains("after: from-file from-flag")),
        "{}",
        run.describe()
    );
    let build_id = run.build_id();
    assert!(leftovers(&world, &build_id, false).await.is_empty());
}

/// Throttling that outlasts one call's retries (about 30 s of backoff) after provisioning: first
/// every CreateImage for 35 s, then every DescribeImages of the wait for the image for 45 s. The
/// bake asks again instead of throwing its work away, and makes one image.
#[tokio::test(flavor = "multi_thread")]
async fn throttling_storms_longer_than_one_calls_retries_after_provisioning_are_ridden_out() {
    let world = World::get();
    let dir = scratch("throttle-storm");
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            "[[provisioner]]\ntype = \"shell\"\ninline = [\"echo storm\"]\n",
            "",
        ),
    );
    let key = format!("build-storm-{}", std::process::id());
    let (mut child, lines) = spawn_build_as(&world, &r, &key);
    let mut events = Vec::new();
    events_until(
        &lines,
        &mut events,
        Duration::from_secs(90),
        "the bake never stopped its instance",
        |e| e["event"] == "step_started" && e["step"] == "stop",
    );
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    // Each storm outlasts a whole call's retries (about 30 s of backoff): the second one by a
    // margin, as the wait's first call may start up to a few seconds into it.
    for (action, secs) in [("ec2:CreateImage", 35), ("ec2:DescribeImages", 45)] {
        world_fault(&world, 3, &key, action, "throttle", 1.0);
        std::thread::sleep(Duration::from_secs(secs));
    }
    clear_world_faults(&world);
    let status = child.wait().unwrap();
    let log = log.join().unwrap();
    events.extend(
        lines
            .try_iter()
            .filter_map(|l| serde_json::from_str(&l).ok()),
    );
    assert_eq!(status.code(), Some(0), "{events:?}");
    let calls = world_calls(&world, &key);
    for action in ["CreateImage", "DescribeImages"] {
        let throttled = calls["calls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["action"] == action && c["fault"] == "throttle")
            .count();
        assert!(throttled > 0, "the storm hit {action}");
    }
    // A call gave up, and the bake asked again rather than failing: CreateImage was sent again,
    // and the wait for the image went on.
    let gave_up = |what: &str, call: &str| {
        log.lines()
            .any(|l| l.contains(what) && l.contains(&format!("{call} (")))
    };
    assert!(
        gave_up("AWS did not answer; asking again", "ec2:CreateImage"),
        "CreateImage was asked again: {log}"
    );
    assert!(
        gave_up("AWS did not answer; still waiting", "ec2:DescribeImages"),
        "the wait for the image went on: {log}"
    );
    let finished = events
        .iter()
        .find(|e| e["event"] == "build_finished")
        .expect("build_finished event");
    let ami = finished["manifest"]["ami_id"].as_str().unwrap();
    let build_id = events[0]["build_id"].as_str().unwrap().to_string();
    let images = world
        .ec2()
        .describe_images()
        .owners("self")
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:bakery:build-id")
                .values(&build_id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let found: Vec<(&str, &str)> = images
        .images()
        .iter()
        .map(|i| {
            (
                i.image_id().unwrap_or_default(),
                i.state().map(|s| s.as_str()).unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(found, vec![(ami, "available")], "one image, available");
    assert_clean(&world, &build_id, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_that_cannot_be_written_fails_before_anything_is_made() {
    // Issue #10 A17: the bake failed at the end and left its AMI, tagged complete.
    let world = World::get();
    let dir = scratch("manifest-nowhere");
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            "[[provisioner]]\ntype = \"shell\"\ninline = [\"true\"]\n",
            "",
        ),
    );
    let key = format!("nomanifest-{}", std::process::id());
    let out = world
        .bakery()
        .env("AWS_ACCESS_KEY_ID", &key)
        .args(["--output", "json", "build"])
        .arg(&r)
        .args(["--manifest", "/nonexistent/dir/m.json"])
        .output()
        .unwrap();
    let run = Run::from_output(out);
    assert_eq!(run.code, Some(2), "{}", run.describe());
    let error = run.error();
    assert!(
        error.contains("cannot write the manifest /nonexistent/dir/m.json")
            && error.contains("--manifest"),
        "{error}"
    );
    let calls = world_calls(&world, &key);
    assert_eq!(calls["total"], 0, "nothing was asked of AWS: {calls}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_bakes_of_one_image_name_at_once_end_with_one_image_and_a_clear_error() {
    // Issue #10 A18: one failed at CreateImage (InvalidAMIName.Duplicate) after provisioning.
    let world = World::get();
    let dir = scratch("same-name");
    let name = format!("same-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let text = recipe(
        &world,
        "[[provisioner]]\ntype = \"shell\"\ninline = [\"sleep 2\"]\n",
        "",
    )
    .replace(
        "name = \"test-{{build_id}}\"",
        &format!("name = \"{name}\""),
    );
    let a = write(&dir, "a.toml", &text);
    let b = write(&dir, "b.toml", &text);
    // B starts once A's instance runs and A connects. Both launched within one second half
    // the time (EC2's launch times are whole seconds): then the smaller build id keeps the name,
    // and the one that yields may be A, which looks for contenders while it connects.
    let (mut child_a, lines_a) = spawn_build(&world, &a);
    let mut events_a = Vec::new();
    events_until(
        &lines_a,
        &mut events_a,
        Duration::from_secs(90),
        "A connects",
        |e| e["event"] == "step_started" && e["step"] == "connect",
    );
    let run_b = build(&world, &b, &[]);
    let status_a = child_a.wait().unwrap();
    events_a.extend(lines_a.iter().filter_map(|l| serde_json::from_str(&l).ok()));
    let run_a = Run {
        code: status_a.code(),
        events: events_a,
        stdout: String::new(),
        stderr: String::new(),
    };
    let runs = [run_a, run_b];
    let (ok, failed): (Vec<&Run>, Vec<&Run>) = runs.iter().partition(|r| r.code == Some(0));
    assert_eq!(
        ok.len(),
        1,
        "one bake keeps the name: {}",
        runs.iter()
            .map(Run::describe)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let loser = failed[0];
    assert_eq!(loser.code, Some(2), "{}", loser.describe());
    let error = loser.error();
    assert!(
        error.contains(&format!(
            "making an image named \"{name}\" at the same time"
        )) && error.contains("{{build_id}}"),
        "{error}"
    );
    // It yielded before provisioning, and left nothing.
    assert!(
        !loser.events.iter().any(|e| e["event"] == "step_started"
            && e["step"].as_str().unwrap().starts_with("provision")),
        "{}",
        loser.describe()
    );
    assert_clean(&world, &loser.build_id(), true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_inside_a_bake_still_removes_everything_it_made() {
    // Issue #10 C: a panic anywhere still runs the undo stack (debug builds can inject one).
    let world = World::get();
    let dir = scratch("panic");
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            "[[provisioner]]\ntype = \"shell\"\ninline = [\"true\"]\n",
            "",
        ),
    );
    let out = world
        .bakery()
        .env("BAKERY_TEST_PANIC_AT", "provision: shell 1")
        .args(["--output", "json", "build"])
        .arg(&r)
        .arg("--manifest")
        .arg(dir.join("m.json"))
        .output()
        .unwrap();
    let run = Run::from_output(out);
    assert_eq!(
        run.code,
        Some(1),
        "not 101, the code of a panic: {}",
        run.describe()
    );
    assert!(
        run.error()
            .contains("bakery panicked (injected at step provision: shell 1"),
        "{}",
        run.describe()
    );
    let released: Vec<&str> = run
        .events
        .iter()
        .filter(|e| e["event"] == "resource_released")
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        released.len() >= 3,
        "the instance, group and key were removed: {}",
        run.describe()
    );
    assert_clean(&world, &run.build_id(), true).await;
}
