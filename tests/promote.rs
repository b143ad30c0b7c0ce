//! `bakery promote` and `[distribute]` against the world's three regions and second account:
//! the sample recipe distributed to two more regions serves `/healthz` from an instance in each,
//! the second account sees the image, the SSM parameter holds each region's id; a SIGKILLed
//! promotion resumes with one copy per region; bad input is refused before anything is made,
//! or fails leaving nothing; prune and gc act in every region.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_config::Region;
use common::*;

const COPIES: [&str; 2] = ["eu-west-1", "ap-northeast-2"];
const HOME: &str = "us-east-1";

/// `WORLD_<NAME>` of a region: the home region's own name, else suffixed (`_EU_WEST_1`).
fn in_region(world: &World, name: &str, region: &str) -> String {
    if region == HOME {
        world.var(name).to_string()
    } else {
        world
            .var(&format!(
                "{name}_{}",
                region.to_uppercase().replace('-', "_")
            ))
            .to_string()
    }
}

fn config_in(world: &World, region: &str) -> aws_config::SdkConfig {
    world
        .sdk_config()
        .to_builder()
        .region(Region::new(region.to_string()))
        .build()
}

fn ec2_in(world: &World, region: &str) -> aws_sdk_ec2::Client {
    aws_sdk_ec2::Client::new(&config_in(world, region))
}

fn ssm_in(world: &World, region: &str) -> aws_sdk_ssm::Client {
    aws_sdk_ssm::Client::new(&config_in(world, region))
}

/// EC2 in `region` as the second account (sts:AssumeRole of its release role).
async fn second_account(world: &World, region: &str) -> aws_sdk_ec2::Client {
    // The full defaults (time source, sleep) that the credentials provider needs.
    let base = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .endpoint_url(world.var("AWS_ENDPOINT_URL"))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            world.var("AWS_ACCESS_KEY_ID"),
            world.var("AWS_SECRET_ACCESS_KEY"),
            None,
            None,
            "world",
        ))
        .load()
        .await;
    let creds =
        aws_config::sts::AssumeRoleProvider::builder(world.var("WORLD_SECOND_ACCOUNT_ROLE"))
            .session_name("bakery-promote-test")
            .configure(&base)
            .build()
            .await;
    let conf = aws_sdk_ec2::config::Builder::from(&base)
        .credentials_provider(creds)
        .build();
    aws_sdk_ec2::Client::from_conf(conf)
}

/// The sample recipe (examples/web) in `dir` with `distribute` appended.
fn sample_recipe(dir: &Path, distribute: &str) -> PathBuf {
    let web = repo().join("examples/web");
    std::fs::create_dir_all(dir.join("app")).unwrap();
    for f in std::fs::read_dir(web.join("app")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join("app").join(f.file_name())).unwrap();
    }
    let text = std::fs::read_to_string(web.join("recipe.toml")).unwrap();
    write(dir, "recipe.toml", &format!("{text}\n{distribute}\n"))
}

/// `bakery --output json build` of the sample recipe as version `version` (names its images
/// `web-VERSION-...`, so tests running side by side never share a name).
fn bake(world: &World, recipe: &Path, version: &str, extra: &[&str]) -> Run {
    let out = world
        .bakery()
        .args(["--output", "json", "build"])
        .arg(recipe)
        .arg("--manifest")
        .arg(manifest_of(recipe))
        .args(["--var", &format!("subnet={}", world.private_subnet())])
        .args([
            "--var",
            &format!("base_ami={}", world.var("WORLD_BASE_AMI")),
        ])
        .args(["--var", &format!("version={version}")])
        .args(extra)
        .output()
        .unwrap();
    Run::from_output(out)
}

fn manifest_of(recipe: &Path) -> PathBuf {
    recipe.with_file_name("manifest.json")
}

fn read_manifest(recipe: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(manifest_of(recipe)).unwrap()).unwrap()
}

/// `bakery --output json promote MANIFEST ARGS` (signed with access key `key`).
fn promote(world: &World, manifest: &Path, key: &str, args: &[&str]) -> Run {
    let out = world
        .bakery()
        .env("AWS_ACCESS_KEY_ID", key)
        .args(["--output", "json", "promote"])
        .arg(manifest)
        .args(args)
        .output()
        .unwrap();
    Run::from_output(out)
}

fn tags(t: &[aws_sdk_ec2::types::Tag]) -> BTreeMap<String, String> {
    t.iter()
        .map(|t| {
            (
                t.key().unwrap().to_string(),
                t.value().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Every image of this build in `region` (this account's), with its state and tags.
async fn images_of_build(
    world: &World,
    region: &str,
    build_id: &str,
) -> Vec<(String, String, BTreeMap<String, String>)> {
    let out = ec2_in(world, region)
        .describe_images()
        .owners("self")
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:bakery:build-id")
                .values(build_id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    out.images()
        .iter()
        .map(|i| {
            (
                i.image_id().unwrap().to_string(),
                i.state().unwrap().as_str().to_string(),
                tags(i.tags()),
            )
        })
        .collect()
}

/// Snapshots of this build in `region` (tagged at creation).
async fn snapshots_of_build(world: &World, region: &str, build_id: &str) -> Vec<String> {
    ec2_in(world, region)
        .describe_snapshots()
        .owner_ids("self")
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:bakery:build-id")
                .values(build_id)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .snapshots()
        .iter()
        .map(|s| s.snapshot_id().unwrap().to_string())
        .collect()
}

async fn parameter(world: &World, region: &str, name: &str) -> Option<String> {
    ssm_in(world, region)
        .get_parameter()
        .name(name)
        .send()
        .await
        .ok()
        .and_then(|o| o.parameter().and_then(|p| p.value()).map(str::to_string))
}

/// Launches an instance of `ami` in `region`'s private subnet; returns (id, private ip).
async fn launch_in(world: &World, region: &str, ami: &str) -> (String, String) {
    let subnet = in_region(world, "WORLD_PRIVATE_SUBNETS", region);
    let out = ec2_in(world, region)
        .run_instances()
        .image_id(ami)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .subnet_id(subnet.split(',').next().unwrap())
        .send()
        .await
        .expect("RunInstances");
    let i = &out.instances()[0];
    (
        i.instance_id().unwrap().to_string(),
        i.private_ip_address().unwrap().to_string(),
    )
}

async fn terminate_in(world: &World, region: &str, id: &str) {
    let _ = ec2_in(world, region)
        .terminate_instances()
        .instance_ids(id)
        .send()
        .await;
}

fn unique(name: &str) -> String {
    format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6])
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sample_recipe_distributed_to_two_more_regions_serves_healthz_in_each_region() {
    let world = World::get();
    let dir = scratch("promote-sample");
    let version = unique("sample");
    let param = format!("/bakery/test/{version}");
    let second = world.var("WORLD_SECOND_ACCOUNT_ID").to_string();
    let r = sample_recipe(
        &dir,
        &format!(
            r#"[distribute]
regions = ["eu-west-1", "ap-northeast-2"]
accounts = ["{second}"]
tags = {{ Release = "2026.12" }}
ssm_parameter = "{param}"
"#
        ),
    );
    let run = bake(&world, &r, &version, &[]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let build_id = run.build_id();
    let m = read_manifest(&r);
    assert_eq!(m["region"], HOME);
    assert_eq!(
        run.event("build_finished").unwrap()["manifest"]["regions"],
        m["regions"],
        "the build's result is the promoted manifest"
    );
    assert_eq!(m["shares"]["accounts"][0], second.as_str());

    // Every region's copy was reported as it progressed, with the snapshot's percent.
    for region in COPIES {
        let percents: Vec<u64> = run
            .events
            .iter()
            .filter(|e| e["event"] == "copy_progress" && e["region"] == region)
            .filter_map(|e| e["percent"].as_u64())
            .collect();
        assert_eq!(percents.last(), Some(&100), "{region}: {percents:?}");
        assert!(
            percents.len() >= 2,
            "{region}: progress along the way: {percents:?}"
        );
    }

    let mut launched = Vec::new();
    for region in [HOME, COPIES[0], COPIES[1]] {
        let entry = &m["regions"][region];
        let ami = entry["ami_id"].as_str().unwrap().to_string();
        assert!(ami.starts_with("ami-"), "{region}: {m}");
        assert_eq!(entry["ssm_parameter"], param.as_str());
        // The SSM parameter holds the region's own id.
        assert_eq!(
            parameter(&world, region, &param).await.as_deref(),
            Some(ami.as_str()),
            "{region}"
        );
        // The second account sees it (as a shared image, not by id only).
        let seen = second_account(&world, region)
            .await
            .describe_images()
            .executable_users("self")
            .send()
            .await
            .unwrap();
        assert!(
            seen.images()
                .iter()
                .any(|i| i.image_id() == Some(ami.as_str())),
            "{region}: the second account does not see {ami}"
        );
        // And may create volumes from its snapshots.
        for snap in entry["snapshot_ids"].as_array().unwrap() {
            let attr = ec2_in(&world, region)
                .describe_snapshot_attribute()
                .snapshot_id(snap.as_str().unwrap())
                .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
                .send()
                .await
                .unwrap();
            assert!(
                attr.create_volume_permissions()
                    .iter()
                    .any(|p| p.user_id() == Some(second.as_str())),
                "{region} {snap}: {attr:?}"
            );
        }
        if region != HOME {
            // Copies and their snapshots carry the tags from their creation.
            let images = images_of_build(&world, region, &build_id).await;
            assert_eq!(images.len(), 1, "{region}: {images:?}");
            let (id, state, t) = &images[0];
            assert_eq!((id.as_str(), state.as_str()), (ami.as_str(), "available"));
            assert_eq!(t.get("Release").map(String::as_str), Some("2026.12"));
            assert_eq!(
                t.get("bakery:source-image"),
                m["ami_id"].as_str().map(String::from).as_ref()
            );
            let snaps = snapshots_of_build(&world, region, &build_id).await;
            assert_eq!(
                serde_json::json!(snaps),
                entry["snapshot_ids"],
                "{region}: the copy's snapshots are tagged"
            );
        }
        launched.push((region, launch_in(&world, region, &ami).await));
    }
    // An instance in each region serves the baked service.
    let mut results = Vec::new();
    for (region, (_, ip)) in &launched {
        let ip = ip.clone();
        let health = tokio::task::spawn_blocking(move || {
            http_get(&ip, 8080, "/healthz", Duration::from_secs(30))
        })
        .await
        .unwrap();
        results.push((region.to_string(), health));
    }
    for (region, (id, _)) in &launched {
        terminate_in(&world, region, id).await;
    }
    for (region, health) in results {
        assert_eq!(health, Ok((200, "ok\n".to_string())), "{region}");
    }

    // A second promote of the same build to the same regions is a no-op that says so, and
    // changes nothing in AWS.
    let key = unique("AKIDNOOP");
    let again = promote(&world, &manifest_of(&r), &key, &[]);
    assert_eq!(again.code, Some(0), "{}", again.describe());
    let finished = again.event("promote_finished").unwrap();
    assert_eq!(
        finished["unchanged"],
        serde_json::json!(["ap-northeast-2", "eu-west-1", "us-east-1"]),
        "{}",
        again.describe()
    );
    let said: Vec<&str> = again
        .events
        .iter()
        .filter(|e| e["event"] == "info")
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert_eq!(said.len(), 3, "{said:?}");
    assert!(
        said.iter().all(|s| s.contains("already promoted")),
        "{said:?}"
    );
    let calls = world_calls(&world, &key);
    let mutating: Vec<&String> = calls["counts"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !k.contains(":Describe") && !k.contains(":Get") && !k.contains(":List"))
        .collect();
    assert!(mutating.is_empty(), "a no-op changed things: {mutating:?}");
}

/// Bakes the sample recipe without `[distribute]`; returns (recipe, build id, image id).
fn bake_plain(world: &World, name: &str) -> (PathBuf, String, String) {
    let dir = scratch(name);
    let r = sample_recipe(&dir, "");
    let run = bake(world, &r, &unique(name), &[]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let m = read_manifest(&r);
    (r, run.build_id(), m["ami_id"].as_str().unwrap().to_string())
}

/// Starts `bakery --output json promote MANIFEST ARGS` and returns it with its stdout lines.
fn spawn_promote(
    world: &World,
    manifest: &Path,
    args: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = world
        .bakery()
        .args(["--output", "json", "promote"])
        .arg(manifest)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn sigkill(child: &mut std::process::Child) {
    std::process::Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
}

/// Checks that `region` holds exactly one image of the build (available, tagged at creation)
/// with exactly one snapshot, tagged too; returns the image id.
async fn one_tagged_copy(world: &World, region: &str, build_id: &str, release: &str) -> String {
    let images = images_of_build(world, region, build_id).await;
    assert_eq!(images.len(), 1, "{region}: {images:?}");
    let (id, state, t) = &images[0];
    assert_eq!(state, "available", "{region}: {images:?}");
    assert_eq!(
        t.get("Release").map(String::as_str),
        Some(release),
        "{region}: {t:?}"
    );
    assert_eq!(t.get("bakery:build-id").map(String::as_str), Some(build_id));
    let snaps = snapshots_of_build(world, region, build_id).await;
    assert_eq!(snaps.len(), 1, "{region}: one snapshot, tagged: {snaps:?}");
    id.clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_promotion_resumes_with_exactly_one_tagged_copy_per_region() {
    let world = World::get();
    let (r, build_id, _) =
        tokio::task::spawn_blocking(|| bake_plain(&World::get(), "promote-kill"))
            .await
            .unwrap();
    let manifest = manifest_of(&r);
    let param = format!("/bakery/test/{}", unique("kill"));
    let flags = [
        "--to",
        "eu-west-1,ap-northeast-2",
        "--tag",
        "Release=r1",
        "--ssm-parameter",
        param.as_str(),
    ];
    // Killed once both copies are under way.
    let (mut child, lines) = spawn_promote(&world, &manifest, &flags);
    let mut events = Vec::new();
    let mut copying = std::collections::BTreeSet::new();
    while copying.len() < 2 {
        events_until(
            &lines,
            &mut events,
            Duration::from_secs(60),
            "both copies under way",
            |e| e["event"] == "copy_progress",
        );
        copying.insert(
            events.last().unwrap()["region"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    sigkill(&mut child);
    for region in COPIES {
        let images = images_of_build(&world, region, &build_id).await;
        assert_eq!(images.len(), 1, "{region}: {images:?}");
    }

    // Resumed on another machine: no local journal, only the source image's tags.
    std::fs::remove_file(manifest.with_extension("journal.json")).unwrap();
    let rerun = promote(&world, &manifest, world.var("AWS_ACCESS_KEY_ID"), &flags);
    assert_eq!(rerun.code, Some(0), "{}", rerun.describe());
    assert!(
        rerun
            .events
            .iter()
            .all(|e| e["event"] != "resource_created"),
        "no second copy: {}",
        rerun.describe()
    );
    let m = read_manifest(&r);
    for region in COPIES {
        let id = one_tagged_copy(&world, region, &build_id, "r1").await;
        assert_eq!(m["regions"][region]["ami_id"], id.as_str());
        assert_eq!(
            parameter(&world, region, &param).await.as_deref(),
            Some(id.as_str())
        );
    }

    // Once more on a third machine: done everywhere, and its manifest still names every
    // region's image and snapshots.
    std::fs::remove_file(manifest.with_extension("journal.json")).unwrap();
    let again = promote(&world, &manifest, world.var("AWS_ACCESS_KEY_ID"), &flags);
    assert_eq!(again.code, Some(0), "{}", again.describe());
    let finished = again.event("promote_finished").unwrap();
    assert_eq!(
        finished["unchanged"].as_array().unwrap().len(),
        3,
        "{finished}"
    );
    assert_eq!(finished["manifest"]["regions"], m["regions"]);
}

/// The launch permissions of an image (its owner's view).
async fn launch_permissions(world: &World, region: &str, ami: &str) -> Vec<String> {
    ec2_in(world, region)
        .describe_image_attribute()
        .image_id(ami)
        .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
        .send()
        .await
        .unwrap()
        .launch_permissions()
        .iter()
        .filter_map(|p| p.user_id().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_copy_rolls_back_every_region_and_build_resume_promotes_without_baking_again() {
    let world = World::get();
    let dir = scratch("promote-rollback");
    let version = unique("rollback");
    let param = format!("/bakery/test/{version}");
    let second = world.var("WORLD_SECOND_ACCOUNT_ID").to_string();
    let distribute = |key: &str| {
        format!(
            r#"[distribute]
regions = ["eu-west-1", "ap-northeast-2"]
encrypted = true
kms_key_ids = {{ "eu-west-1" = "{key}" }}
accounts = ["{second}"]
tags = {{ Release = "rb" }}
ssm_parameter = "{param}"
"#
        )
    };
    // A key that does not exist in eu-west-1: EC2 accepts the copy, which then fails.
    let r = sample_recipe(&dir, &distribute("alias/no-such-key"));
    let run = bake(&world, &r, &version, &[]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let error = run.error();
    assert!(
        error.contains("eu-west-1") && error.contains("InvalidKMSKey"),
        "{error}"
    );
    assert!(error.contains("--resume"), "says how to continue: {error}");
    let build_id = run.build_id();
    // Nothing is left in any region but the baked image, which stays complete and unshared.
    for region in COPIES {
        assert_eq!(
            images_of_build(&world, region, &build_id).await,
            vec![],
            "{region}"
        );
        assert_eq!(
            snapshots_of_build(&world, region, &build_id).await,
            Vec::<String>::new(),
            "{region}"
        );
        assert_eq!(parameter(&world, region, &param).await, None, "{region}");
    }
    let home = images_of_build(&world, HOME, &build_id).await;
    assert_eq!(home.len(), 1, "{home:?}");
    assert!(home[0].2.contains_key("bakery:complete"));
    assert_eq!(
        launch_permissions(&world, HOME, &home[0].0).await,
        Vec::<String>::new()
    );

    // With the key fixed, --resume promotes the same image; nothing is baked again.
    sample_recipe(&dir, &distribute(world.var("WORLD_KMS_ALIAS")));
    let resumed = bake(&world, &r, &version, &["--resume", &build_id]);
    assert_eq!(resumed.code, Some(0), "{}", resumed.describe());
    assert!(
        resumed.events.iter().all(|e| e["event"] != "step_started"),
        "no bake step ran: {}",
        resumed.describe()
    );
    let m = &resumed.event("build_finished").unwrap()["manifest"];
    assert_eq!(m["ami_id"], home[0].0.as_str(), "the same image");
    let copy = one_tagged_copy(&world, "eu-west-1", &build_id, "rb").await;
    assert_eq!(m["regions"]["eu-west-1"]["ami_id"], copy.as_str());
    let snap = ec2_in(&world, "eu-west-1")
        .describe_snapshots()
        .snapshot_ids(
            m["regions"]["eu-west-1"]["snapshot_ids"][0]
                .as_str()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let snap = &snap.snapshots()[0];
    assert_eq!(snap.encrypted(), Some(true));
    assert_eq!(
        snap.kms_key_id(),
        Some(world.var("WORLD_KMS_KEY_ARN_EU_WEST_1"))
    );
    one_tagged_copy(&world, "ap-northeast-2", &build_id, "rb").await;
    assert_eq!(
        launch_permissions(&world, HOME, &home[0].0).await,
        vec![second]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_before_anything_is_made() {
    let world = World::get();
    let (r, build_id, _) = tokio::task::spawn_blocking(|| bake_plain(&World::get(), "promote-bad"))
        .await
        .unwrap();
    let manifest = manifest_of(&r);
    let opt_in = world.var("WORLD_OPT_IN_REGION").to_string();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--to", &opt_in],
            "is not enabled for this account (not-opted-in): it is an opt-in Region",
        ),
        (
            &["--to", "eu-west-1", "--account", "11112222333"],
            "--account: \"11112222333\" is not an AWS account id (11 digits)",
        ),
        (
            &[
                "--to",
                "eu-west-1",
                "--encrypted",
                "--kms-key-id",
                &format!("eu-west-1={}", world.var("WORLD_KMS_KEY_ARN")),
            ],
            "the KMS key for eu-west-1 is in us-east-1",
        ),
        (&["--to", "eu-wset-1"], "did you mean \"eu-west-1\""),
    ];
    for (args, expected) in cases {
        let key = unique("AKIDBAD");
        let run = promote(&world, &manifest, &key, args);
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.describe());
        let failed = run.event("command_failed").unwrap();
        assert!(
            failed["error"].as_str().unwrap().contains(expected),
            "{args:?}: {failed}"
        );
        let counts = world_calls(&world, &key)["counts"].clone();
        let mutating: Vec<&String> = counts
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| !k.contains(":Describe") && !k.contains(":Get"))
            .collect();
        assert!(mutating.is_empty(), "{args:?} changed things: {mutating:?}");
    }
    for region in COPIES {
        assert_eq!(
            images_of_build(&world, region, &build_id).await,
            vec![],
            "{region}"
        );
    }

    // In a recipe: `validate` locates it; `build` refuses an opt-in region before baking.
    let dir = r.parent().unwrap();
    let bad = sample_recipe(
        &dir.join("bad"),
        "[distribute]\nregions = [\"eu-west-1\"]\naccounts = [\"11112222333\"]\n",
    );
    let out = world
        .bakery()
        .args(["--output", "json", "validate"])
        .arg(&bad)
        .output()
        .unwrap();
    let run = Run::from_output(out);
    assert_eq!(run.code, Some(2), "{}", run.describe());
    let error = run.event("command_failed").unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("recipe.toml:") && error.contains("(11 digits)"),
        "{error}"
    );
    let opt = sample_recipe(
        &dir.join("opt-in"),
        &format!("[distribute]\nregions = [\"eu-west-1\", \"{opt_in}\"]\n"),
    );
    let key = unique("AKIDOPT");
    let out = world
        .bakery()
        .env("AWS_ACCESS_KEY_ID", &key)
        .args(["--output", "json", "build"])
        .arg(&opt)
        .arg("--manifest")
        .arg(manifest_of(&opt))
        .args(["--var", &format!("subnet={}", world.private_subnet())])
        .args([
            "--var",
            &format!("base_ami={}", world.var("WORLD_BASE_AMI")),
        ])
        .output()
        .unwrap();
    let run = Run::from_output(out);
    assert_eq!(run.code, Some(2), "{}", run.describe());
    assert!(run.error().contains("opt-in Region"), "{}", run.error());
    let counts = world_calls(&world, &key)["counts"].clone();
    assert!(
        counts.get("ec2:RunInstances").is_none() && counts.get("ec2:ImportKeyPair").is_none(),
        "nothing was made: {counts}"
    );
}

/// `bakery --output json prune ARGS` (or gc): its result event.
fn cleanup_cmd(world: &World, args: &[&str]) -> serde_json::Value {
    let out = world
        .bakery()
        .args(["--output", "json"])
        .args(args)
        .output()
        .unwrap();
    let run = Run::from_output(out);
    assert_eq!(run.code, Some(0), "{args:?}: {}", run.describe());
    run.events.last().unwrap().clone()
}

/// (region, ami) -> action of a prune report.
fn actions(report: &serde_json::Value) -> BTreeMap<(String, String), String> {
    report["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                (
                    i["region"].as_str().unwrap().to_string(),
                    i["ami_id"].as_str().unwrap().to_string(),
                ),
                i["action"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_across_regions_keeps_a_release_used_in_any_region_and_honours_protection() {
    let world = World::get();
    let dir = scratch("promote-prune");
    let version = unique("prune");
    let r = sample_recipe(
        &dir,
        "[distribute]\nregions = [\"eu-west-1\", \"ap-northeast-2\"]\nderegistration_protection = true\n",
    );
    let mut releases = Vec::new();
    for _ in 0..2 {
        let run = bake(&world, &r, &version, &[]);
        assert_eq!(run.code, Some(0), "{}", run.describe());
        let m = read_manifest(&r);
        let images: BTreeMap<String, String> = [HOME, COPIES[0], COPIES[1]]
            .iter()
            .map(|region| {
                (
                    region.to_string(),
                    m["regions"][region]["ami_id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        releases.push((run.build_id(), images));
    }
    let (old_build, old) = &releases[0];
    let (_, new) = &releases[1];
    let prefix = format!("web-{version}-");
    let prune = |extra: &[&str]| {
        let mut args = vec![
            "prune",
            "--name-prefix",
            prefix.as_str(),
            "--keep",
            "1",
            "--regions",
            "eu-west-1,ap-northeast-2",
        ];
        args.extend_from_slice(extra);
        cleanup_cmd(&world, &args)
    };

    // The old release runs in eu-west-1: kept everywhere.
    let (instance, _) = launch_in(&world, "eu-west-1", &old["eu-west-1"]).await;
    let report = prune(&["--force"]);
    let a = actions(&report);
    for region in [HOME, COPIES[0], COPIES[1]] {
        assert_eq!(
            a[&(region.to_string(), new[region].clone())],
            "kept (newest 1)",
            "{report}"
        );
        let expected = if region == "eu-west-1" {
            "kept (in use)"
        } else {
            "kept (its release is in use in eu-west-1)"
        };
        assert_eq!(
            a[&(region.to_string(), old[region].clone())],
            expected,
            "{report}"
        );
    }
    terminate_in(&world, "eu-west-1", &instance).await;
    let ec2 = ec2_in(&world, "eu-west-1");
    for _ in 0..100 {
        let state = ec2
            .describe_instances()
            .instance_ids(&instance)
            .send()
            .await
            .unwrap()
            .reservations()[0]
            .instances()[0]
            .state()
            .unwrap()
            .name()
            .unwrap()
            .clone();
        if state == aws_sdk_ec2::types::InstanceStateName::Terminated {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Unused now, but protected: kept and reported, unless --force.
    let a = actions(&prune(&[]));
    for region in [HOME, COPIES[0], COPIES[1]] {
        let action = &a[&(region.to_string(), old[region].clone())];
        assert!(
            action.starts_with("kept (deregistration protection enabled"),
            "{region}: {action}"
        );
    }
    let a = actions(&prune(&["--force"]));
    for region in [HOME, COPIES[0], COPIES[1]] {
        let action = &a[&(region.to_string(), old[region].clone())];
        assert_eq!(action, "deregistered (and 1 snapshot(s))", "{region}");
        assert_eq!(
            images_of_build(&world, region, old_build).await,
            vec![],
            "{region}"
        );
        assert_eq!(
            snapshots_of_build(&world, region, old_build).await,
            Vec::<String>::new(),
            "{region}: the copy's snapshots went with it"
        );
        assert_eq!(
            a[&(region.to_string(), new[region].clone())],
            "kept (newest 1)"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_keeps_a_paused_promotions_copies_and_removes_them_once_their_source_is_gone() {
    let world = World::get();
    let (r, build_id, source) =
        tokio::task::spawn_blocking(|| bake_plain(&World::get(), "promote-gc"))
            .await
            .unwrap();
    let (mut child, lines) = spawn_promote(
        &world,
        &manifest_of(&r),
        &["--to", "eu-west-1,ap-northeast-2"],
    );
    let mut events = Vec::new();
    let mut copying = std::collections::BTreeSet::new();
    while copying.len() < 2 {
        events_until(
            &lines,
            &mut events,
            Duration::from_secs(60),
            "both copies under way",
            |e| e["event"] == "copy_progress",
        );
        copying.insert(
            events.last().unwrap()["region"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    sigkill(&mut child);
    let gc = |dry: bool| {
        let mut args = vec![
            "gc",
            "--regions",
            "eu-west-1,ap-northeast-2",
            "--build-id",
            build_id.as_str(),
            "--older-than",
            "0s",
        ];
        if dry {
            args.push("--dry-run");
        }
        cleanup_cmd(&world, &args)
    };
    let copies = |report: &serde_json::Value| -> Vec<(String, String, String)> {
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["kind"] == "image copy")
            .map(|f| {
                (
                    f["region"].as_str().unwrap().to_string(),
                    f["action"].as_str().unwrap().to_string(),
                    f["why"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let report = gc(false);
    assert_eq!(
        copies(&report),
        vec![],
        "a paused promotion is resumable: {report}"
    );
    for region in COPIES {
        assert_eq!(
            images_of_build(&world, region, &build_id).await.len(),
            1,
            "{region}"
        );
    }

    // The source goes (a person deregisters it): its copies are leftovers now.
    world
        .ec2()
        .deregister_image()
        .image_id(&source)
        .send()
        .await
        .unwrap();
    let found = copies(&gc(true));
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found
            .iter()
            .all(|(_, a, why)| a == "would remove"
                && why.contains("its source image no longer exists")),
        "{found:?}"
    );
    let removed = copies(&gc(false));
    assert_eq!(
        removed
            .iter()
            .map(|(r, a, _)| (r.as_str(), a.as_str()))
            .collect::<Vec<_>>(),
        vec![("eu-west-1", "removed"), ("ap-northeast-2", "removed")]
    );
    for region in COPIES {
        assert_eq!(
            images_of_build(&world, region, &build_id).await,
            vec![],
            "{region}"
        );
        assert_eq!(
            snapshots_of_build(&world, region, &build_id).await,
            Vec::<String>::new(),
            "{region}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rollout_with_a_promoted_manifest_takes_the_image_of_the_groups_region() {
    let world = World::get();
    let (r, _, home_ami) =
        tokio::task::spawn_blocking(|| bake_plain(&World::get(), "promote-rollout"))
            .await
            .unwrap();
    let manifest = manifest_of(&r);
    let rollout = |region: &str, asg: &str| {
        let out = world
            .bakery()
            .args([
                "--output",
                "json",
                "--region",
                region,
                "rollout",
                "--asg",
                asg,
                "--dry-run",
            ])
            .arg("--manifest")
            .arg(&manifest)
            .output()
            .unwrap();
        Run::from_output(out)
    };
    let run = rollout("eu-west-1", "no-such-group");
    assert_eq!(run.code, Some(2), "{}", run.describe());
    assert!(
        run.error().contains("has no image for region eu-west-1")
            && run.error().contains("(it has: us-east-1)"),
        "{}",
        run.error()
    );
    let promoted = promote(
        &world,
        &manifest,
        world.var("AWS_ACCESS_KEY_ID"),
        &["--to", "eu-west-1"],
    );
    assert_eq!(promoted.code, Some(0), "{}", promoted.describe());
    // In eu-west-1 the copy resolves (the group is what is missing there) ...
    let run = rollout("eu-west-1", "no-such-group");
    assert!(
        run.error()
            .contains("Auto Scaling group \"no-such-group\" not found"),
        "{}",
        run.error()
    );
    // ... and in the home region the plan rolls out the baked image itself.
    let run = rollout(HOME, world.var("WORLD_ASG"));
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(
        run.event("rollout_plan").unwrap()["plan"]["to_ami"],
        home_ami.as_str()
    );
}
