//! Baking over SSM Run Command against the world, which executes commands for real in the
//! instance's body: no key pair, no inbound rule, output streamed, failures mapped.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

/// The world has one fault spec: the tests of this file that set one take turns.
static FAULTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _turn = FAULTS.lock().await;
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

#[path = "support/secret_traces.rs"]
mod secret_traces;

/// One call to the world's SSM API (JSON protocol; the world reads the credential scope, not the
/// signature), returning its answer decoded.
fn ssm_api(world: &World, action: &str, body: serde_json::Value) -> serde_json::Value {
    use std::io::{Read, Write};
    let endpoint = world
        .var("AWS_ENDPOINT_URL")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    assert!(endpoint.starts_with("127."), "the world is on loopback");
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(&endpoint).unwrap();
    write!(
        s,
        "POST / HTTP/1.0\r\nHost: {endpoint}\r\nContent-Type: application/x-amz-json-1.1\r\nX-Amz-Target: AmazonSSM.{action}\r\nAuthorization: AWS4-HMAC-SHA256 Credential=ssm-reader/20260101/{region}/ssm/aws4_request, SignedHeaders=host, Signature=0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len(),
        region = world.var("AWS_REGION"),
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf);
    let (head, answer) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.contains(" 200 "), "{action}: {text}");
    serde_json::from_str(answer).unwrap()
}

/// Every string in a JSON value, decoded.
fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        serde_json::Value::Object(m) => m.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// Everything SSM keeps about `instance`'s commands, as anyone allowed to list them reads it:
/// ListCommands (with each command's parameters), ListCommandInvocations with details, and
/// GetCommandInvocation of each.
fn what_ssm_keeps(world: &World, instance: &str) -> (usize, Vec<String>) {
    let mut texts = Vec::new();
    let listed = ssm_api(
        world,
        "ListCommands",
        serde_json::json!({"InstanceId": instance}),
    );
    strings(&listed, &mut texts);
    let invocations = ssm_api(
        world,
        "ListCommandInvocations",
        serde_json::json!({"InstanceId": instance, "Details": true}),
    );
    strings(&invocations, &mut texts);
    let commands = listed["Commands"].as_array().unwrap();
    for c in commands {
        let id = c["CommandId"].as_str().unwrap();
        let inv = ssm_api(
            world,
            "GetCommandInvocation",
            serde_json::json!({"CommandId": id, "InstanceId": instance}),
        );
        strings(&inv, &mut texts);
    }
    (commands.len(), texts)
}

/// A secret of the world for one test: a JSON object whose values are hard to mask (URL-unsafe
/// and non-ASCII characters, a PEM key over several lines). Returns its name and the values.
async fn nasty_secret(world: &World, name: &str) -> (String, String, String) {
    let config = world.sdk_config();
    let sm = aws_sdk_secretsmanager::Client::new(&config);
    let tag = uuid_like();
    let password = format!("p@ss w/rd+Ünï!ç\"\\x-{tag}");
    let key = format!(
        "-----BEGIN BAKERY TEST KEY-----\nMIIEvQ{tag}BADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7VJTUt9{tag}Us8\n-----END BAKERY TEST KEY-----\n"
    );
    // Named apart from its values, whose fragments must appear nowhere.
    let name = format!("{name}-{}", std::process::id());
    sm.create_secret()
        .name(&name)
        .secret_string(serde_json::json!({"password": password, "key": key}).to_string())
        .send()
        .await
        .unwrap();
    (name, password, key)
}

fn uuid_like() -> String {
    use sha2::Digest;
    let seed = format!("{}-{:?}", std::process::id(), std::time::SystemTime::now());
    sha2::Sha256::digest(seed.as_bytes())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Prints the secrets of `PW` and `KEY` every way a careless script might, and checks the
/// template arrived.
const SHOW_SECRETS: &str = r#"#!/bin/sh
set -e
echo "plain: $PW"
printf '%s\n' "$KEY"
printf '%s' "$PW" | base64
printf 'x%s' "$PW" | base64
printf '%s' "$KEY" | base64
printf '%s' "$PW" | od -An -tx1 | tr -d ' \n'; echo
python3 -c 'import os, urllib.parse as u; s = os.environ["PW"]; print(u.quote(s, safe="")); print(u.quote(s)); print(u.quote_plus(s)); print(u.quote(s, safe="").lower())'
printf '%s' "$PW" | fold -w 5; echo
test "$(sed -n 's/^password=//p' /etc/app/app.conf)" = "$PW" && echo template-ok
stat -c '%a' /etc/app/app.conf
cat /etc/app/app.conf
echo "stderr: $PW" >&2
"#;

/// Issue #10, item 3: over SSM, `export S='…'` sat in SendCommand's parameters, a rendered
/// template in base64 beside it, and the output unredacted in GetCommandInvocation and
/// ListCommandInvocations, for anyone allowed `ssm:ListCommands` to read.
#[tokio::test(flavor = "multi_thread")]
async fn a_bake_over_ssm_with_secrets_leaves_no_trace_of_them_in_ssm() {
    let world = World::get();
    let dir = scratch("ssm-secrets");
    let (name, password, key) = nasty_secret(&world, "ssm-test").await;
    write(
        &dir,
        "app.conf.tmpl",
        &format!("password={{{{secret:{name}#password}}}}\n{{{{secret:{name}#key}}}}"),
    );
    write(&dir, "show.sh", SHOW_SECRETS);
    let r = write(
        &dir,
        "recipe.toml",
        &ssm_recipe(
            &world,
            &format!(
                r#"
[[provisioner]]
type = "file"
source = "app.conf.tmpl"
destination = "/etc/app/app.conf"
template = true

[[provisioner]]
type = "shell"
env = {{ PW = "{{{{secret:{name}#password}}}}", KEY = "{{{{secret:{name}#key}}}}" }}
script = "show.sh"
"#
            ),
        ),
    );
    let key_id = format!("ssm-secrets-{}", std::process::id());
    let out = world
        .bakery()
        .env("AWS_ACCESS_KEY_ID", &key_id)
        .env("RUST_LOG", "debug")
        .args(["--output", "json", "build"])
        .arg(&r)
        .arg("--manifest")
        .arg(dir.join("m.json"))
        .output()
        .unwrap();
    let run = Run::from_output(out);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let lines = run.output_lines();
    assert!(
        lines.contains(&"template-ok".to_string()),
        "the instance filled the template in: {lines:?}"
    );
    assert!(lines.contains(&"600".to_string()), "{lines:?}");
    assert!(lines.iter().any(|l| l == "plain: [REDACTED]"), "{lines:?}");
    let secrets = [password.as_str(), key.as_str()];
    let manifest = std::fs::read_to_string(dir.join("m.json")).unwrap();
    for (what, text) in [
        ("stdout", &run.stdout),
        ("stderr", &run.stderr),
        ("manifest", &manifest),
    ] {
        assert_eq!(secret_traces::trace_in(text, &secrets, 8), None, "{what}");
    }

    // What SSM keeps: every field of every listing and invocation of the instance.
    let instance = run
        .events
        .iter()
        .find(|e| e["event"] == "resource_created" && e["kind"] == "instance")
        .and_then(|e| e["id"].as_str())
        .unwrap()
        .to_string();
    let (commands, texts) = what_ssm_keeps(&world, &instance);
    assert!(commands >= 2, "the upload and the script: {commands}");
    assert!(
        texts.iter().any(|t| t.contains("plain: [REDACTED]")),
        "the output was redacted on the instance, before SSM stored it: {texts:?}"
    );
    for t in &texts {
        assert_eq!(
            secret_traces::trace_in(t, &secrets, 8),
            None,
            "SSM keeps a trace of a secret in: {t}"
        );
    }
    // The instance read the secret itself, with its own role.
    let (status, calls) = world_control(&world, "GET", "/_world/calls?limit=5000", "");
    assert_eq!(status, 200);
    let calls: serde_json::Value = serde_json::from_str(&calls).unwrap();
    assert!(
        calls["calls"].as_array().unwrap().iter().any(|c| {
            c["action"] == "GetSecretValue"
                && c["access_key"].as_str() == Some(&format!("role-{instance}"))
        }),
        "no GetSecretValue by the instance's role"
    );

    let sm = aws_sdk_secretsmanager::Client::new(&world.sdk_config());
    sm.delete_secret()
        .secret_id(&name)
        .force_delete_without_recovery(true)
        .send()
        .await
        .unwrap();
    assert!(leftovers(&world, &run.build_id(), false).await.is_empty());
}

/// Issue #10, item 14: SSM uploads made missing parent folders 0700, SSH 0755.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_over_ssm_makes_missing_parent_folders_0755() {
    let world = World::get();
    let dir = scratch("ssm-parents");
    write(&dir, "f", "content\n");
    let top = format!("/opt/deep-{}", std::process::id());
    let r = write(
        &dir,
        "recipe.toml",
        &ssm_recipe(
            &world,
            &format!(
                r#"
[[provisioner]]
type = "file"
source = "f"
destination = "{top}/nested/f"

[[provisioner]]
type = "shell"
inline = ["stat -c '%a %n' {top} {top}/nested"]
"#
            ),
        ),
    );
    let run = build(&world, &r, &[]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(
        run.output_lines(),
        vec![format!("755 {top}"), format!("755 {top}/nested")]
    );
    assert!(leftovers(&world, &run.build_id(), false).await.is_empty());
}

/// Issue #10, B: a lost SendCommand answer followed by a throttled ListCommands meant a second
/// send. Now the listing is retried, and when it cannot prove the first send absent the command
/// is not sent again: the bake fails and says why.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_send_command_is_sent_again_only_when_listing_proves_it_absent() {
    let world = World::get();
    let dir = scratch("ssm-lost-listing");
    let r = write(
        &dir,
        "recipe.toml",
        &ssm_recipe(
            &world,
            "[[provisioner]]\ntype = \"shell\"\ninline = [\"echo ran >> /opt/ran\"]\n",
        ),
    );
    let key = format!("ssm-lost-listing-{}", std::process::id());
    let spec = serde_json::json!({
        "seed": 3,
        "rules": [
            {"action": "ssm:SendCommand", "lose": 1.0, "access_key": key},
            {"action": "ssm:ListCommands", "throttle": 1.0, "access_key": key},
        ],
    });
    let _turn = FAULTS.lock().await;
    let (status, body) = world_control(&world, "POST", "/_world/faults", &spec.to_string());
    assert_eq!(status, 200, "{body}");
    let out = world
        .bakery()
        .env("AWS_ACCESS_KEY_ID", &key)
        .args(["--output", "json", "build"])
        .arg(&r)
        .output()
        .unwrap();
    clear_world_faults(&world);
    let run = Run::from_output(out);
    let sends = world_calls(&world, &key)["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["action"] == "SendCommand")
        .count();
    assert_eq!(sends, 1, "the command was sent once: {}", run.describe());
    assert_eq!(run.code, Some(3), "{}", run.describe());
    let error = run.error();
    assert!(
        error.contains("was lost") && error.contains("does not send it again"),
        "{error}"
    );
    assert!(leftovers(&world, &run.build_id(), true).await.is_empty());
}

/// Issue #10, B: the cancel flag was set after the bake's future was dropped, so SIGINT never
/// sent CancelCommand and the command ran on in the instance.
#[tokio::test(flavor = "multi_thread")]
async fn sigint_during_an_ssm_command_cancels_it_on_the_instance() {
    use std::io::BufRead;
    let world = World::get();
    let dir = scratch("ssm-cancel");
    // A sleep no other test runs, to find its process.
    let seconds = 7000 + std::process::id() % 1000;
    let r = write(
        &dir,
        "recipe.toml",
        &ssm_recipe(
            &world,
            &format!("[[provisioner]]\ntype = \"shell\"\ninline = [\"sleep {seconds}\"]\n"),
        ),
    );
    let key = format!("ssm-cancel-{}", std::process::id());
    let mut child = world
        .bakery()
        .env("AWS_ACCESS_KEY_ID", &key)
        .args(["--output", "json", "build", "--on-error", "abort"])
        .arg(&r)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut events = Vec::new();
    events_until(
        &lines,
        &mut events,
        std::time::Duration::from_secs(120),
        "the provisioner never started",
        |e| e["event"] == "step_started" && e["step"] == "provision: shell 1",
    );
    // Bodies share the machine's processes: the command's `sleep` shows in /proc.
    let sleeping = |s: u32| {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .any(|c| c == format!("sleep\0{s}\0").as_bytes())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !sleeping(seconds) {
        assert!(
            std::time::Instant::now() < deadline,
            "the command never ran in the instance's body"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::process::Command::new("kill")
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
    let instance = events
        .iter()
        .find(|e| e["event"] == "resource_created" && e["kind"] == "instance")
        .and_then(|e| e["id"].as_str())
        .unwrap()
        .to_string();

    // The instance was kept (--on-error abort): its command was cancelled, its process ended.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let statuses = loop {
        let listed = ssm_api(
            &world,
            "ListCommandInvocations",
            serde_json::json!({"InstanceId": instance}),
        );
        let statuses: Vec<String> = listed["CommandInvocations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["Status"].as_str().unwrap().to_string())
            .collect();
        let settled = statuses.iter().all(|s| s != "InProgress" && s != "Pending");
        if (settled && !sleeping(seconds)) || std::time::Instant::now() > deadline {
            break statuses;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(
        statuses.contains(&"Cancelled".to_string()),
        "the command was cancelled: {statuses:?}"
    );
    assert!(!sleeping(seconds), "the command's process ended");
    assert!(
        world_calls(&world, &key)["calls"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["action"] == "CancelCommand"),
        "CancelCommand was sent"
    );

    // Remove what --on-error abort kept.
    let ec2 = world.ec2();
    let build_id = events[0]["build_id"].as_str().unwrap().to_string();
    terminate(&world, &instance).await;
    let filter = aws_sdk_ec2::types::Filter::builder()
        .name("tag:bakery:build-id")
        .values(&build_id)
        .build();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for g in ec2
        .describe_security_groups()
        .filters(filter)
        .send()
        .await
        .unwrap()
        .security_groups()
    {
        // The group is free once the instance is terminated.
        while ec2
            .delete_security_group()
            .group_id(g.group_id().unwrap())
            .send()
            .await
            .is_err()
        {
            assert!(std::time::Instant::now() < deadline, "cannot delete {g:?}");
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
    assert!(leftovers(&world, &build_id, true).await.is_empty());
}
