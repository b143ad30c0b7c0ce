//! `bakery release`: one image over several groups in waves, against the world. Each test has
//! its own fleets in the home Region; the two-Region test also uses the stack's group in the
//! second Region (`scripts/world up --stack --groups us-east-1=1,eu-west-1=1`).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// The world's SDK configuration in `region`.
fn config_in(world: &World, region: &str) -> aws_config::SdkConfig {
    world
        .sdk_config()
        .to_builder()
        .region(aws_config::Region::new(region.to_string()))
        .build()
}

/// A manifest naming `images` (region -> AMI id), as a promoted build's.
fn manifest(dir: &Path, home: &str, images: &[(&str, &str)]) -> PathBuf {
    let regions: serde_json::Map<String, serde_json::Value> = images
        .iter()
        .map(|(r, id)| {
            (
                r.to_string(),
                serde_json::json!({"ami_id": id, "snapshot_ids": []}),
            )
        })
        .collect();
    let home_ami = images.iter().find(|(r, _)| *r == home).unwrap().1;
    let m = serde_json::json!({
        "bakery_version": "test", "build_id": "b-release", "recipe": "r.toml", "recipe_sha256": "",
        "region": home, "source_ami": "ami-0", "ami_id": home_ami, "ami_name": "web",
        "snapshot_ids": [], "started_at": "", "finished_at": "", "duration_s": 0.0, "steps": [],
        "regions": regions,
    });
    write(dir, "bakery-manifest.json", &m.to_string())
}

/// A release running in the background: its process and its stdout's lines.
fn spawn_release(
    world: &World,
    plan: &Path,
    args: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    spawn_lines(
        world
            .bakery()
            .args(["--output", "json", "release"])
            .arg(plan)
            .args(args)
            .stderr(Stdio::null()),
    )
}

fn release(world: &World, plan: &Path, args: &[&str]) -> Run {
    Run::from_output(
        world
            .bakery()
            .args(["--output", "json", "release"])
            .arg(plan)
            .args(args)
            .output()
            .unwrap(),
    )
}

/// The error a failed release reported.
fn failure(run: &Run) -> String {
    run.event("release_failed")
        .and_then(|e| e["error"].as_str())
        .unwrap_or_else(|| panic!("no release_failed event: {}", run.describe()))
        .to_string()
}

fn record(plan: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(plan.with_extension("release.json")).unwrap())
        .unwrap()
}

fn events<'a>(run: &'a Run, name: &str) -> Vec<&'a serde_json::Value> {
    run.events.iter().filter(|e| e["event"] == name).collect()
}

/// The images a group's live instances run, in any Region.
async fn amis_in(world: &World, region: &str, group: &str) -> Vec<String> {
    let config = config_in(world, region);
    let asg = aws_sdk_autoscaling::Client::new(&config);
    let g = asg
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(group)
        .send()
        .await
        .unwrap();
    let ids: Vec<String> = g.auto_scaling_groups()[0]
        .instances()
        .iter()
        .filter(|i| i.lifecycle_state().map(|s| s.as_str()) == Some("InService"))
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let out = ec2
        .describe_instances()
        .set_instance_ids(Some(ids))
        .send()
        .await
        .unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.image_id().map(str::to_string))
        .collect()
}

/// A copy of `ami` in `region` (the same image's content, so as healthy), available.
async fn copy_to(world: &World, ami: &str, from: &str, region: &str) -> String {
    let ec2 = aws_sdk_ec2::Client::new(&config_in(world, region));
    let id = ec2
        .copy_image()
        .source_image_id(ami)
        .source_region(from)
        .name(format!(
            "release-test-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ))
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let out = ec2.describe_images().image_ids(&id).send().await.unwrap();
        if out.images()[0].state().map(|s| s.as_str()) == Some("available") {
            return id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "copy {id} never became available"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn home(world: &World) -> String {
    world.var("AWS_REGION").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_release_over_two_regions_rolls_every_group_wave_by_wave() {
    let world = World::get();
    let home = home(&world);
    let other = world
        .var("WORLD_STACK_GROUPS")
        .split(',')
        .find(|g| !g.starts_with(&format!("{home}/")))
        .expect("the stack has a group in a second Region (scripts/world up --stack --groups us-east-1=1,eu-west-1=1)")
        .to_string();
    let (region2, group2) = other.split_once('/').unwrap();
    let (good, _) = sample_amis(&world).clone();
    let good2 = copy_to(&world, &good, &home, region2).await;
    let canary = Fleet::create(&world, "rel-canary", 2).await;
    let rest = Fleet::create(&world, "rel-rest", 2).await;
    let dir = scratch("release-two-regions");
    manifest(&dir, &home, &[(&home, &good), (region2, &good2)]);
    let plan = write(
        &dir,
        "web.toml",
        &format!(
            r#"[source]
manifest = "bakery-manifest.json"

[[wave]]
name = "canary"
targets = [{{ region = "{home}", group = "{}" }}]
gates = {{ http = {{ path = "/healthz", expect_status = 200, expect_body = "ok" }} }}
rollout = {{ max_surge = "100%" }}

[[wave]]
name = "everywhere"
targets = [{{ region = "{home}", group = "{}" }}, {{ region = "{region2}", group = "{group2}" }}]
rollout = {{ max_surge = "100%" }}
"#,
            canary.asg, rest.asg
        ),
    );
    let run = release(&world, &plan, &[]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert!(canary.amis(&world).await.iter().all(|a| *a == good));
    assert!(rest.amis(&world).await.iter().all(|a| *a == good));
    let there = amis_in(&world, region2, group2).await;
    assert!(
        !there.is_empty() && there.iter().all(|a| *a == good2),
        "{region2}/{group2} runs {there:?}, not {good2}"
    );
    // The waves ran in order: every group of the canary wave finished before the next began.
    let order: Vec<String> = run
        .events
        .iter()
        .filter(|e| e["event"] == "wave_started" || e["event"] == "wave_finished")
        .map(|e| {
            format!(
                "{} {}",
                e["event"].as_str().unwrap(),
                e["wave"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            "wave_started canary",
            "wave_finished canary",
            "wave_started everywhere",
            "wave_finished everywhere"
        ]
    );
    let http = events(&run, "gate");
    assert!(
        http.iter()
            .any(|g| g["gate"] == "http" && g["result"] == "passed"),
        "{http:?}"
    );
    // Each rollout's own events say which group they are about.
    let batches = events(&run, "batch_started");
    assert!(
        batches
            .iter()
            .any(|b| b["group"] == group2 && b["region"] == region2),
        "{batches:?}"
    );
    let rec = record(&plan);
    assert_eq!(rec["state"], "done");
    let status = release(&world, &plan, &["--status"]);
    assert_eq!(status.code, Some(0), "{}", status.describe());
    assert_eq!(
        status.event("release_status").unwrap()["record"]["state"],
        "done"
    );
    canary.delete(&world).await;
    rest.delete(&world).await;
}

/// Forces `alarm` (created on the fleet's target group) into ALARM in the world.
async fn alarm_in_alarm(world: &World, fleet: &Fleet) -> String {
    let name = format!("{}-5xx", fleet.asg);
    let cw = aws_sdk_cloudwatch::Client::new(&world.sdk_config());
    let tg_dim = fleet.tg_arn.split(':').next_back().unwrap().to_string();
    cw.put_metric_alarm()
        .alarm_name(&name)
        .namespace("AWS/ApplicationELB")
        .metric_name("HTTPCode_Target_5XX_Count")
        .dimensions(
            aws_sdk_cloudwatch::types::Dimension::builder()
                .name("TargetGroup")
                .value(tg_dim)
                .build(),
        )
        .statistic(aws_sdk_cloudwatch::types::Statistic::Sum)
        .period(10)
        .evaluation_periods(1)
        .threshold(1.0)
        .comparison_operator(
            aws_sdk_cloudwatch::types::ComparisonOperator::GreaterThanOrEqualToThreshold,
        )
        .send()
        .await
        .unwrap();
    let (code, body) = world_control(
        world,
        "POST",
        &format!("/_world/alarms/{name}"),
        &serde_json::json!({"state": "ALARM", "region": world.var("AWS_REGION")}).to_string(),
    );
    assert_eq!(code, 200, "{body}");
    name
}

fn two_wave_plan(
    dir: &Path,
    policy: &str,
    ami: &str,
    first: &str,
    second: &str,
    gates: &str,
    home: &str,
) -> PathBuf {
    write(
        dir,
        "web.toml",
        &format!(
            r#"[source]
ami = "{ami}"
on_failure = "{policy}"

[[wave]]
name = "first"
targets = [{{ region = "{home}", group = "{first}" }}]
rollout = {{ max_surge = "100%" }}

[[wave]]
name = "second"
targets = [{{ region = "{home}", group = "{second}" }}]
gates = {gates}
rollout = {{ max_surge = "100%" }}
"#
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alarm_halts_the_release_and_on_failure_decides_what_is_reverted() {
    let world = World::get();
    let home = home(&world);
    let (good, _) = sample_amis(&world).clone();
    for policy in ["rollback_all", "rollback_wave"] {
        let first = Fleet::create(&world, "rel-first", 2).await;
        let second = Fleet::create(&world, "rel-second", 2).await;
        let before = first.amis(&world).await;
        let alarm = alarm_in_alarm(&world, &second).await;
        let dir = scratch(&format!("release-alarm-{policy}"));
        let gates = format!("{{ alarms = [\"{alarm}\"] }}");
        let plan = two_wave_plan(&dir, policy, &good, &first.asg, &second.asg, &gates, &home);
        let run = release(&world, &plan, &[]);
        assert_eq!(run.code, Some(6), "{policy}: {}", run.describe());
        assert!(
            failure(&run).contains(&format!("alarm {alarm} in {home} is in ALARM")),
            "{}",
            failure(&run)
        );
        let rec = record(&plan);
        assert_eq!(
            rec["state"],
            serde_json::json!({"ended": "rolled_back"}),
            "{rec}"
        );
        assert_eq!(rec["waves"][1]["state"], "failed");
        // The second wave never got the image.
        assert!(
            second.amis(&world).await.iter().all(|a| *a != good),
            "{policy}"
        );
        let first_now = first.amis(&world).await;
        match policy {
            "rollback_all" => {
                assert!(
                    !first_now.is_empty() && first_now.iter().all(|a| before.contains(a)),
                    "first wave reverted: {first_now:?} vs {before:?}"
                );
                let started = run.event("release_rollback_started").unwrap();
                assert_eq!(started["groups"][0], format!("{home}/{}", first.asg));
                assert_eq!(rec["waves"][0]["groups"][0]["state"], "reverted");
            }
            _ => {
                assert!(
                    first_now.iter().all(|a| *a == good),
                    "first wave kept: {first_now:?}"
                );
                assert_eq!(rec["waves"][0]["groups"][0]["state"], "done");
            }
        }
        first.delete(&world).await;
        second.delete(&world).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_release_killed_mid_rollout_resumes_where_it_stopped() {
    let world = World::get();
    let home = home(&world);
    let (good, _) = sample_amis(&world).clone();
    let fleet = Fleet::create(&world, "rel-kill", 3).await;
    let before = fleet.amis(&world).await;
    let dir = scratch("release-kill");
    let plan = write(
        &dir,
        "web.toml",
        &format!(
            "[source]\nami = \"{good}\"\n[[wave]]\nname = \"only\"\ntargets = [{{ region = \"{home}\", group = \"{}\" }}]\nrollout = {{ max_surge = 1 }}\n",
            fleet.asg
        ),
    );
    let (mut child, rx) = spawn_release(&world, &plan, &[]);
    let mut seen = Vec::new();
    // Killed once its rollout has replaced one instance: mid-rollout, the worst moment.
    events_until(
        &rx,
        &mut seen,
        Duration::from_secs(240),
        "a first batch retired",
        |e| e["event"] == "retired",
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let rec = record(&plan);
    assert_eq!(rec["waves"][0]["groups"][0]["state"], "rolling", "{rec}");
    let run = release(&world, &plan, &[]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(run.event("release_started").unwrap()["resumed"], true);
    let rollout = run.event("rollout_started").unwrap();
    assert_eq!(
        rollout["resumed"], true,
        "the group's rollout resumed from its tags: {rollout}"
    );
    assert!(fleet.amis(&world).await.iter().all(|a| *a == good));
    let rec = record(&plan);
    assert_eq!(rec["state"], "done");
    assert!(before.contains(
        &rec["waves"][0]["groups"][0]["previous_ami"]
            .as_str()
            .unwrap()
            .to_string()
    ));
    fleet.delete(&world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plan_naming_what_does_not_exist_is_refused_before_any_change() {
    let world = World::get();
    let home = home(&world);
    let fleet = Fleet::create(&world, "rel-bad", 1).await;
    let before = fleet.group(&world).await;
    let (good, _) = sample_amis(&world).clone();
    let dir = scratch("release-bad-input");
    manifest(&dir, &home, &[(&home, &good)]);
    let plan = write(
        &dir,
        "web.toml",
        &format!(
            r#"[source]
manifest = "bakery-manifest.json"

[[wave]]
name = "one"
targets = [{{ region = "{home}", group = "{}" }}, {{ region = "{home}", group = "no-such-group-a" }}]
gates = {{ alarms = ["no-such-alarm"] }}

[[wave]]
name = "two"
targets = [{{ region = "{home}", group = "no-such-group-b" }},
           {{ region = "ap-northeast-2", group = "web" }},
           {{ region = "{home}", group = "x", role_arn = "arn:aws:iam::111122223333:role/no-such-role" }}]
"#,
            fleet.asg
        ),
    );
    let run = release(&world, &plan, &[]);
    assert_eq!(run.code, Some(2), "{}", run.describe());
    let err = failure(&run);
    for want in [
        "web.toml:6:66: Auto Scaling group no-such-group-a not found in us-east-1",
        "web.toml:7:21: alarm no-such-alarm does not exist in us-east-1",
        "web.toml:11:12: Auto Scaling group no-such-group-b not found",
        "web.toml:12:12: ",
        "has no image for region ap-northeast-2 (it has: us-east-1); promote the build there first",
        "web.toml:13:12: role arn:aws:iam::111122223333:role/no-such-role cannot be assumed",
        "nothing was changed",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert!(
        !plan.with_extension("release.json").exists(),
        "no record for a release that never started"
    );
    let after = fleet.group(&world).await;
    assert_eq!(
        before.launch_template(),
        after.launch_template(),
        "the group was not touched"
    );
    // A plan with a mistake in it is located before AWS is asked anything.
    let bad = write(
        &dir,
        "bad.toml",
        "[source]\nami = \"ami-0123456789abcdef0\"\n[[wave]]\nname = \"w\"\ntargets = []\n",
    );
    let run = release(&world, &bad, &[]);
    assert_eq!(run.code, Some(2));
    assert!(
        failure(&run).contains("bad.toml:5:11: wave \"w\" has no targets"),
        "{}",
        failure(&run)
    );
    fleet.delete(&world).await;
}

/// An HTTP gate no instance passes: the app never answers this body.
const HTTP_GATE: &str =
    r#"{ http = { path = "/healthz", expect_body = "a body the app never answers" } }"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_http_gate_reverts_what_on_failure_names_and_abort_reverts_the_rest() {
    let world = World::get();
    let home = home(&world);
    let (good, _) = sample_amis(&world).clone();

    // rollback_all: both waves go back, the one that passed included.
    let first = Fleet::create(&world, "rel-gate-a", 2).await;
    let second = Fleet::create(&world, "rel-gate-b", 2).await;
    let before = first.amis(&world).await;
    let dir = scratch("release-gate-all");
    let plan = two_wave_plan(
        &dir,
        "rollback_all",
        &good,
        &first.asg,
        &second.asg,
        HTTP_GATE,
        &home,
    );
    let run = release(&world, &plan, &[]);
    assert_eq!(run.code, Some(6), "{}", run.describe());
    let err = failure(&run);
    assert!(
        err.contains("without \"a body the app never answers\" in its body"),
        "{err}"
    );
    let gate = events(&run, "gate");
    assert!(
        gate.iter()
            .any(|g| g["gate"] == "http" && g["result"] == "failed"),
        "{gate:?}"
    );
    for f in [&first, &second] {
        let now = f.amis(&world).await;
        assert!(
            !now.is_empty() && now.iter().all(|a| before.contains(a)),
            "{} reverted: {now:?}",
            f.asg
        );
    }
    let rec = record(&plan);
    assert_eq!(rec["state"], serde_json::json!({"ended": "rolled_back"}));
    assert_eq!(rec["waves"][0]["state"], "passed");
    assert_eq!(rec["waves"][1]["state"], "failed");
    first.delete(&world).await;
    second.delete(&world).await;

    // stop: nothing is reverted (no group was caught mid-rollout); --abort then reverts both.
    let first = Fleet::create(&world, "rel-stop-a", 2).await;
    let second = Fleet::create(&world, "rel-stop-b", 2).await;
    let dir = scratch("release-gate-stop");
    let plan = two_wave_plan(
        &dir,
        "stop",
        &good,
        &first.asg,
        &second.asg,
        HTTP_GATE,
        &home,
    );
    let run = release(&world, &plan, &[]);
    assert_eq!(run.code, Some(6), "{}", run.describe());
    assert_eq!(
        record(&plan)["state"],
        serde_json::json!({"ended": "stopped"})
    );
    for f in [&first, &second] {
        assert!(
            f.amis(&world).await.iter().all(|a| *a == good),
            "{} left for inspection",
            f.asg
        );
    }
    // A rerun of an ended release does nothing and says how it ended.
    let ended = record(&plan);
    let again = release(&world, &plan, &[]);
    assert_eq!(again.code, Some(6), "{}", again.describe());
    assert!(
        failure(&again).contains("release web stopped"),
        "{}",
        failure(&again)
    );
    assert!(
        events(&again, "group_started").is_empty(),
        "nothing was rolled again"
    );
    assert_eq!(record(&plan)["waves"], ended["waves"]);
    let abort = release(&world, &plan, &["--abort"]);
    assert_eq!(abort.code, Some(0), "{}", abort.describe());
    assert_eq!(
        abort.event("release_finished").unwrap()["result"],
        "aborted"
    );
    for f in [&first, &second] {
        let now = f.amis(&world).await;
        assert!(
            !now.is_empty() && now.iter().all(|a| before.contains(a)),
            "{} aborted: {now:?}",
            f.asg
        );
    }
    first.delete(&world).await;
    second.delete(&world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_prints_every_groups_batches_and_changes_nothing() {
    let world = World::get();
    let home = home(&world);
    let (good, _) = sample_amis(&world).clone();
    let a = Fleet::create(&world, "rel-dry-a", 2).await;
    let b = Fleet::create(&world, "rel-dry-b", 4).await;
    let before = (a.group(&world).await, b.group(&world).await);
    let dir = scratch("release-dry-run");
    let plan = write(
        &dir,
        "web.toml",
        &format!(
            "[source]\nami = \"{good}\"\n[[wave]]\nname = \"one\"\ntargets = [{{ region = \"{home}\", group = \"{}\" }}]\n\
             [[wave]]\nname = \"two\"\ntargets = [{{ region = \"{home}\", group = \"{}\" }}]\nrollout = {{ max_surge = 1 }}\n",
            a.asg, b.asg
        ),
    );
    let run = release(&world, &plan, &["--dry-run"]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let plans = events(&run, "rollout_plan");
    assert_eq!(plans.len(), 2, "{plans:?}");
    assert_eq!(plans[0]["wave"], "one");
    assert_eq!(plans[1]["group"], b.asg);
    // Four instances, one at a time after a canary of one: four batches.
    assert_eq!(
        plans[1]["plan"]["batches"].as_array().unwrap().len(),
        4,
        "{}",
        plans[1]
    );
    assert!(!plan.with_extension("release.json").exists());
    let after = (a.group(&world).await, b.group(&world).await);
    assert_eq!(before.0.launch_template(), after.0.launch_template());
    assert_eq!(before.1.launch_template(), after.1.launch_template());
    a.delete(&world).await;
    b.delete(&world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_driver_per_release_through_its_lock_or_its_lease() {
    let world = World::get();
    let home = home(&world);
    let (good, _) = sample_amis(&world).clone();
    let table = format!("release-leases-{}", std::process::id());
    let init = world
        .bakery()
        .args(["init", "--lease-table", &table])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    for lease in [None, Some(table.as_str())] {
        let fleet = Fleet::create(&world, "rel-one", 2).await;
        let dir = scratch(&format!("release-one-driver-{}", lease.is_some()));
        let plan = write(
            &dir,
            "web.toml",
            &format!(
                "[source]\nami = \"{good}\"\n[[wave]]\nname = \"w\"\ntargets = [{{ region = \"{home}\", group = \"{}\" }}]\nrollout = {{ max_surge = 1 }}\n",
                fleet.asg
            ),
        );
        let extra: Vec<&str> = lease.map(|t| vec!["--lease-table", t]).unwrap_or_default();
        let (mut first, rx) = spawn_release(&world, &plan, &extra);
        let mut seen = Vec::new();
        events_until(
            &rx,
            &mut seen,
            Duration::from_secs(120),
            "the first driver started its group",
            |e| e["event"] == "group_started",
        );
        // With a table, the second driver is as on another machine: the same plan elsewhere
        // (its own record file), the same release name, so the same lease.
        let second_plan = match lease {
            None => plan.clone(),
            Some(_) => {
                let elsewhere = dir.join("elsewhere");
                std::fs::create_dir_all(&elsewhere).unwrap();
                let copy = elsewhere.join("web.toml");
                std::fs::copy(&plan, &copy).unwrap();
                copy
            }
        };
        let second = release(&world, &second_plan, &extra);
        assert_eq!(second.code, Some(7), "{}", second.describe());
        let err = failure(&second);
        match lease {
            None => assert!(
                err.contains("another bakery process on this machine is driving this release"),
                "{err}"
            ),
            Some(t) => assert!(
                err.contains("release web is being driven by") && err.contains(t),
                "{err}"
            ),
        }
        assert!(first.wait().unwrap().success(), "the first driver finished");
        assert!(fleet.amis(&world).await.iter().all(|a| *a == good));
        if let Some(t) = lease {
            // With a table, the record lives there too: another machine can resume from it.
            let db = aws_sdk_dynamodb::Client::new(&world.sdk_config());
            let item = db
                .get_item()
                .table_name(t)
                .key(
                    "pk",
                    aws_sdk_dynamodb::types::AttributeValue::S("record#release#web".into()),
                )
                .send()
                .await
                .unwrap();
            let text = item.item().unwrap()["record"].as_s().unwrap().clone();
            let rec: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(rec["state"], "done", "{rec}");
        }
        fleet.delete(&world).await;
    }
}
