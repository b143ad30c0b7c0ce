//! Secrets from Secrets Manager reach provisioners and never anything a user or a log sees:
//! stdout, stderr (with debug logging on), the NDJSON events, the manifest, error messages.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use base64::Engine;
use common::*;

async fn db_password(world: &World) -> String {
    let config = world.sdk_config();
    let sm = aws_sdk_secretsmanager::Client::new(&config);
    let v = sm
        .get_secret_value()
        .secret_id(world.var("WORLD_DB_SECRET"))
        .send()
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(v.secret_string().unwrap()).unwrap();
    json["password"].as_str().unwrap().to_string()
}

/// Every trace of `secret` that output could carry.
fn traces(secret: &str) -> Vec<String> {
    let mut t = vec![secret.to_string()];
    // Fragments as `fold -w 5` prints them.
    t.extend(
        secret
            .as_bytes()
            .chunks(5)
            .filter(|c| c.len() == 5)
            .map(|c| String::from_utf8_lossy(c).into_owned()),
    );
    for prefix in ["", "x", "xy"] {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{prefix}{secret}"));
        t.push(b64[4..b64.len() - 4].to_string());
    }
    t
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provisioner_echoing_a_secret_leaves_no_trace_of_it() {
    let world = World::get();
    let password = db_password(&world).await;
    assert!(
        password.len() >= 10,
        "the world's password is long enough to test fragments"
    );
    let secret_id = world.var("WORLD_DB_SECRET");
    let dir = scratch("secrets");
    write(
        &dir,
        "db.conf.tmpl",
        &format!(
            "host={{{{rds:{db}.address}}}}\npassword={{{{secret:{secret_id}#password}}}}\n",
            db = world.var("WORLD_DB_INSTANCE")
        ),
    );
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            &format!(
                r#"
[[provisioner]]
type = "file"
source = "db.conf.tmpl"
destination = "/etc/app/db.conf"
template = true

[[provisioner]]
type = "shell"
env = {{ DB_PASSWORD = "{{{{secret:{secret_id}#password}}}}", DB_PORT = "{{{{rds:{db}.port}}}}" }}
inline = [
  "echo plain: $DB_PASSWORD",
  "printf '%s' \"$DB_PASSWORD\" | fold -w 5",
  "echo",
  "echo b64: $(printf '%s' \"$DB_PASSWORD\" | base64)",
  "echo b64x: $(printf 'x%s' \"$DB_PASSWORD\" | base64)",
  "echo stderr: $DB_PASSWORD >&2",
  "echo port $DB_PORT",
  "test \"$(sed -n 's/^password=//p' /etc/app/db.conf)\" = \"$DB_PASSWORD\" && echo template-ok",
  "stat -c '%a' /etc/app/db.conf",
  "echo failing with $DB_PASSWORD; exit 9",
]
"#,
                db = world.var("WORLD_DB_INSTANCE")
            ),
            "",
        ),
    );
    let manifest = dir.join("m.json");
    let out = world
        .bakery()
        .env("RUST_LOG", "debug")
        .args(["--output", "json", "build"])
        .arg(&r)
        .arg("--manifest")
        .arg(&manifest)
        .output()
        .unwrap();
    let run = Run::from_output(out);
    assert_eq!(
        run.code,
        Some(3),
        "the last command fails on purpose: {}",
        run.describe()
    );
    let lines = run.output_lines();
    assert!(
        lines.contains(&"template-ok".to_string()),
        "the secret reached the provisioner and the template: {lines:?}"
    );
    assert!(
        lines.contains(&"600".to_string()),
        "a rendered template is private by default: {lines:?}"
    );
    assert!(
        lines.contains(&"port 5432".to_string()),
        "RDS values are not secrets: {lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("[REDACTED]")));
    let error = run.error();
    assert!(
        error.contains("exit code 9") && error.contains("failing with [REDACTED]"),
        "{error}"
    );
    let manifest_text = std::fs::read_to_string(&manifest).unwrap_or_default();
    for t in traces(&password) {
        assert!(!run.stdout.contains(&t), "stdout holds {t:?}");
        assert!(!run.stderr.contains(&t), "stderr (debug log) holds {t:?}");
        assert!(!manifest_text.contains(&t), "the manifest holds {t:?}");
    }
    assert!(leftovers(&world, &run.build_id(), true).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_secret_or_key_is_named_and_nothing_is_created() {
    let world = World::get();
    let dir = scratch("secrets-missing");
    for (reference, expected) in [
        (
            "secret:no/such/secret",
            "secret no/such/secret: not found".to_string(),
        ),
        (
            &*format!("secret:{}#nokey", world.var("WORLD_DB_SECRET")),
            "has no key `nokey` (it has: ".to_string(),
        ),
        (
            "rds:no-such-db.address",
            "RDS instance no-such-db: not found".to_string(),
        ),
    ] {
        let r = write(
            &dir,
            "recipe.toml",
            &recipe(&world, &format!("[[provisioner]]\ntype = \"shell\"\nenv = {{ X = \"{{{{{reference}}}}}\" }}\ninline = [\"true\"]\n"), ""),
        );
        let run = build(&world, &r, &[]);
        assert_eq!(run.code, Some(2), "{}", run.describe());
        let error = run.error();
        assert!(error.contains(&expected), "{reference}: {error}");
        assert!(
            run.event("resource_created").is_none(),
            "nothing is created before references resolve"
        );
    }
}

#[test]
fn a_secret_outside_env_and_templates_is_a_recipe_error() {
    let world = World::get();
    let dir = scratch("secrets-place");
    let text = recipe(&world, "", "").replace("test-{{build_id}}", "img-{{secret:world/db}}");
    let r = write(&dir, "recipe.toml", &text);
    let out = world.bakery().arg("validate").arg(&r).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("may only appear in a provisioner's `env` values or a file template"),
        "{stderr}"
    );
}

#[path = "support/secret_traces.rs"]
mod secret_traces;

/// A secret of the world for one test, hard to mask: URL-unsafe and non-ASCII characters, and a
/// PEM key over several lines. Returns its name, the password and the key.
async fn nasty_secret(world: &World, name: &str) -> (String, String, String) {
    use sha2::Digest;
    let sm = aws_sdk_secretsmanager::Client::new(&world.sdk_config());
    let seed = format!("{}-{:?}", std::process::id(), std::time::SystemTime::now());
    let tag: String = sha2::Sha256::digest(seed.as_bytes())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
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

async fn delete_secret(world: &World, name: &str) {
    aws_sdk_secretsmanager::Client::new(&world.sdk_config())
        .delete_secret()
        .secret_id(name)
        .force_delete_without_recovery(true)
        .send()
        .await
        .unwrap();
}

/// Issue #10, items 4 and 5, and no secret on a command line: a PEM key was not redacted at
/// all (held lines were joined without their newlines), URL-encoding was caught only as
/// `quote(s, safe="")` in uppercase, and the SSH communicator put `env K='…'` on the remote
/// command line, which `ps` shows to every user of the instance.
#[tokio::test(flavor = "multi_thread")]
async fn every_form_of_a_secret_is_masked_and_none_is_on_a_command_line() {
    let world = World::get();
    let dir = scratch("secrets-forms");
    let (name, password, key) = nasty_secret(&world, "forms").await;
    write(
        &dir,
        "show.sh",
        r#"#!/bin/sh
printf '%s\n' "$KEY"
printf '%s' "$KEY" | base64
printf '%s' "$PW" | base64
printf 'xy%s' "$PW" | base64
printf '%s' "$PW" | od -An -tx1 | tr -d ' \n'; echo
python3 -c 'import os, urllib.parse as u; s = os.environ["PW"]; print(u.quote(s, safe="")); print(u.quote(s)); print(u.quote_plus(s)); print(u.quote(s, safe="").lower())'
printf '%s' "$PW" | fold -w 5; echo
echo "url: https://db/?pw=$(python3 -c 'import os, urllib.parse as u; print(u.quote_plus(os.environ["PW"]))')&x=1"
# Any process whose command line holds the password (bodies share the machine's processes).
printf '%s' "$PW" > /tmp/pattern.$$
if grep -l -a -F -f /tmp/pattern.$$ /proc/[0-9]*/cmdline 2>/dev/null; then echo ps-leak; else echo ps-clean; fi
rm -f /tmp/pattern.$$
"#,
    );
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            &format!(
                r#"
[[provisioner]]
type = "shell"
env = {{ PW = "{{{{secret:{name}#password}}}}", KEY = "{{{{secret:{name}#key}}}}" }}
script = "show.sh"
"#
            ),
            "",
        ),
    );
    let run = build(&world, &r, &[]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let lines = run.output_lines();
    assert!(
        lines.contains(&"ps-clean".to_string()),
        "a secret was on a command line: {lines:?}"
    );
    assert!(
        lines.contains(&"url: https://db/?pw=[REDACTED]&x=1".to_string()),
        "{lines:?}"
    );
    let secrets = [password.as_str(), key.as_str()];
    for (what, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        assert_eq!(
            secret_traces::trace_in(text, &secrets, 8),
            None,
            "{what}: {lines:?}"
        );
    }
    delete_secret(&world, &name).await;
    assert!(leftovers(&world, &run.build_id(), false).await.is_empty());
}

/// Issue #10, item 13: a line without a newline was kept whole and rescanned (2 MiB: 0.7 s,
/// 50 MiB: 254 s and 300 MB), and with a secret in `env` blank lines were held back to the end.
/// Now a long line is shown cut, with a note, and blank lines come through as they are.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_line_is_shown_cut_and_blank_lines_pass_with_secrets_in_env() {
    let world = World::get();
    let secret_id = world.var("WORLD_DB_SECRET");
    let dir = scratch("secrets-long");
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            &format!(
                r#"
[[provisioner]]
type = "shell"
env = {{ DB_PASSWORD = "{{{{secret:{secret_id}#password}}}}" }}
inline = [
  "head -c 3000000 /dev/zero | tr '\\0' A",
  "echo \"$DB_PASSWORD\"",
  "yes '' | head -n 3000",
  "echo end",
]
"#
            ),
            "",
        ),
    );
    let run = build(&world, &r, &[]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let lines = run.output_lines();
    assert_eq!(lines.len(), 3002, "one cut line, 3000 blank ones, end");
    let expected_len = 3_000_000 + db_password(&world).await.len();
    assert_eq!(
        lines[0],
        format!(
            "{} [bakery: line cut: 16384 of its {expected_len} bytes shown]",
            "A".repeat(16384)
        )
    );
    assert!(lines[1..3001].iter().all(String::is_empty));
    assert_eq!(lines[3001], "end");
    assert!(leftovers(&world, &run.build_id(), false).await.is_empty());
}
