//! Baking over SSM Run Command against the world, which executes commands for real in the
//! instance's body: no key pair, no inbound rule, output streamed, failures mapped.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

fn ssm_recipe(world: &World, provisioners: &str) -> String {
    format!(
        r#"
[source]
ami = "{ami}"

[instance]
type = "t3.micro"
subnet = "{subnet}"
instance_profile = "{profile}"

[communicator]
type = "ssm"
agent_timeout = "60s"

{provisioners}

[image]
name = "ssm-{{{{build_id}}}}"
"#,
        ami = world.var("WORLD_BASE_AMI"),
        subnet = world.private_subnet(),
        profile = world.var("WORLD_INSTANCE_PROFILE"),
    )
}

/// Writes `len` bytes of a fixed pattern (byte i is i * step mod modulus) to `path`; their
/// SHA-256 as `sha256sum` prints it.
fn write_payload(path: &std::path::Path, len: u32, step: u32, modulus: u32) -> String {
    use sha2::Digest;
    let payload: Vec<u8> = (0..len).map(|i| (i * step % modulus) as u8).collect();
    std::fs::write(path, &payload).unwrap();
    sha2::Sha256::digest(&payload)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bake_over_ssm_runs_in_the_instance_with_no_inbound_rule_and_no_key() {
    let world = World::get();
    let dir = scratch("ssm-bake");
    std::fs::create_dir_all(dir.join("files")).unwrap();
    let digest = write_payload(&dir.join("files/payload.bin"), 100_000, 7, 251);
    let r = write(
        &dir,
        "recipe.toml",
        &ssm_recipe(
            &world,
            r#"
[[provisioner]]
type = "file"
source = "files"
destination = "/opt/ssm/files"

[[provisioner]]
type = "shell"
env = { GREETING = "it's ssm" }
inline = [
  "echo \"$GREETING as $(id -un)\"",
  "sha256sum /opt/ssm/files/payload.bin",
  "echo warn >&2",
  "echo baked > /opt/ssm/marker",
]
"#,
        ),
    );
    let key = format!("ssm-{}", std::process::id());
    let out = world
        .bakery()
        .env("AWS_ACCESS_KEY_ID", &key)
        .args(["--output", "json", "build"])
        .arg(&r)
        .arg("--manifest")
        .arg(dir.join("m.json"))
        .output()
        .unwrap();
    let run = Run::from_output(out);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(
        run.output_lines(),
        vec![
            "it's ssm as root".to_string(),
            format!("{digest}  /opt/ssm/files/payload.bin"),
            "warn".to_string()
        ]
    );
    let stderr_line = run
        .events
        .iter()
        .find(|e| e["event"] == "output" && e["line"] == "warn")
        .unwrap();
    assert_eq!(stderr_line["stream"], "stderr");
    assert!(
        !run.events
            .iter()
            .any(|e| e["event"] == "resource_created" && e["kind"] == "key pair"),
        "no key pair over SSM"
    );

    // No inbound rule ever existed: the call log of this run has no ingress authorisation.
    let calls = world_calls(&world, &key);
    let list = calls["calls"].as_array().expect("call list");
    assert!(
        list.iter().any(|c| c["action"]
            .as_str()
            .unwrap_or_default()
            .ends_with("SendCommand")),
        "{calls}"
    );
    assert!(
        !list.iter().any(|c| c["action"]
            .as_str()
            .unwrap_or_default()
            .ends_with("AuthorizeSecurityGroupIngress")),
        "an inbound rule was added: {calls}"
    );
    assert!(leftovers(&world, &run.build_id(), false).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_command_over_ssm_fails_the_bake_with_its_exit_code() {
    let world = World::get();
    let dir = scratch("ssm-fail");
    let r = write(
        &dir,
        "recipe.toml",
        &ssm_recipe(
            &world,
            "[[provisioner]]\ntype = \"shell\"\ninline = [\"echo going down\", \"exit 42\"]\n",
        ),
    );
    let run = build(&world, &r, &[]);
    assert_eq!(run.code, Some(3), "{}", run.describe());
    let error = run.error();
    assert!(
        error.contains("exit code 42") && error.contains("going down"),
        "{error}"
    );
    assert!(leftovers(&world, &run.build_id(), true).await.is_empty());
}

#[test]
fn ssm_without_an_instance_profile_is_a_recipe_error() {
    let world = World::get();
    let dir = scratch("ssm-noprofile");
    let text = ssm_recipe(&world, "").replace(
        &format!(
            "instance_profile = \"{}\"\n",
            world.var("WORLD_INSTANCE_PROFILE")
        ),
        "",
    );
    let r = write(&dir, "recipe.toml", &text);
    let out = world.bakery().arg("validate").arg(&r).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the ssm communicator needs [instance] instance_profile"),
        "{stderr}"
    );
    assert!(stderr.contains("AmazonSSMManagedInstanceCore"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_send_command_whose_answer_is_lost_is_not_run_twice() {
    let world = World::get();
    let dir = scratch("ssm-lost");
    std::fs::create_dir_all(dir.join("files")).unwrap();
    // Five upload chunks, each appended by one command: a command run twice corrupts the file.
    let digest = write_payload(&dir.join("files/payload.bin"), 110_000, 13, 253);
    let r = write(
        &dir,
        "recipe.toml",
        &ssm_recipe(
            &world,
            r#"
[[provisioner]]
type = "file"
source = "files"
destination = "/opt/lost"

[[provisioner]]
type = "shell"
inline = ["echo once >> /opt/lost/runs", "sha256sum /opt/lost/payload.bin", "wc -l < /opt/lost/runs"]
"#,
        ),
    );
    let key = format!("ssm-lost-{}", std::process::id());
    // Half of this run's SendCommand answers are lost after SSM took the command.
    world_fault(&world, 7, &key, "ssm:SendCommand", "lose", 0.5);
    let out = world
        .bakery()
        .env("AWS_ACCESS_KEY_ID", &key)
        .args(["--output", "json", "build"])
        .arg(&r)
        .arg("--manifest")
        .arg(dir.join("m.json"))
        .output()
        .unwrap();
    clear_world_faults(&world);
    let run = Run::from_output(out);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let lost = world_calls(&world, &key)["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["action"] == "SendCommand" && c["fault"] == "lose")
        .count();
    assert!(lost >= 2, "answers were lost: {lost}");
    assert_eq!(
        run.output_lines(),
        vec![format!("{digest}  /opt/lost/payload.bin"), "1".to_string()],
        "every command ran once"
    );
    assert!(leftovers(&world, &run.build_id(), false).await.is_empty());
}
