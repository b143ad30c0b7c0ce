//! `bakery validate` and `bakery build` on broken recipes: each mistake a user can make gets a
//! message naming the file, line and column and what to write instead, exit code 2, and no AWS
//! call (these run with an endpoint where nothing listens).

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

const BASE: &str = r#"[source]
ami = "ami-0123456789abcdef0"

[instance]
type = "t3.micro"
subnet = "subnet-0abc"

[communicator]
type = "ssh"
user = "ec2-user"

[[provisioner]]
type = "shell"
inline = ["echo hi"]

[image]
name = "web-{{timestamp}}"
"#;

fn bakery() -> Command {
    let mut c = Command::new(BIN);
    // Nothing listens here: a test that reached AWS would fail with a connection error.
    c.env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "x")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    c
}

/// Validates `text` (and builds it), expecting exit 2 and every `expected` fragment in stderr.
fn rejects(name: &str, text: &str, expected: &[&str]) {
    let dir = scratch(&format!("recipe-{name}"));
    let path = write(&dir, "recipe.toml", text);
    for cmd in ["validate", "build"] {
        let out = bakery().arg(cmd).arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd} {name}: {stderr}");
        for e in expected {
            assert!(
                stderr.contains(e),
                "{cmd} {name}: expected {e:?} in:\n{stderr}"
            );
        }
        assert!(
            !stderr.contains("127.0.0.1:9"),
            "{cmd} {name} must not call AWS: {stderr}"
        );
    }
}

#[test]
fn the_base_recipe_is_valid() {
    let dir = scratch("recipe-valid");
    let path = write(&dir, "recipe.toml", BASE);
    let out = bakery().arg("validate").arg(&path).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("recipe.toml: valid\n"));
}

#[test]
fn the_sample_recipe_is_valid_with_its_variables() {
    let out = bakery()
        .current_dir(repo())
        .args([
            "validate",
            "examples/web/recipe.toml",
            "--var",
            "base_ami=ami-0123456789abcdef0",
        ])
        .env("BAKERY_VAR_subnet", "subnet-0abc")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_misspelt_key_is_named_with_its_line() {
    rejects(
        "misspelt",
        &BASE.replace("subnet = \"subnet-0abc\"", "subnet_id = \"subnet-0abc\""),
        &[
            "recipe.toml:6:1: unknown field `subnet_id`",
            "expected one of",
            "hint:",
        ],
    );
}

#[test]
fn a_missing_section_is_named() {
    rejects(
        "no-image",
        &BASE.replace("[image]\nname = \"web-{{timestamp}}\"\n", ""),
        &["missing field `image`"],
    );
}

#[test]
fn a_bad_ami_id_says_what_an_id_looks_like() {
    rejects(
        "bad-ami",
        &BASE.replace("ami-0123456789abcdef0", "amazon-linux"),
        &[
            "recipe.toml:2:7:",
            "\"amazon-linux\" is not an AMI id",
            "ami-0abcdef1234567890",
        ],
    );
}

#[test]
fn a_missing_script_file_is_an_error() {
    rejects(
        "no-script",
        &BASE.replace("inline = [\"echo hi\"]", "script = \"setup.sh\""),
        &["recipe.toml:14:10:", "script \"setup.sh\" not found"],
    );
}

#[test]
fn a_missing_upload_source_is_an_error() {
    rejects(
        "no-source",
        &BASE.replace("[image]", "[[provisioner]]\ntype = \"file\"\nsource = \"app.tar\"\ndestination = \"/opt/app.tar\"\n\n[image]"),
        &["`source` \"app.tar\" does not exist"],
    );
}

#[test]
fn a_bad_duration_and_an_unknown_interface_are_both_reported() {
    rejects(
        "two-errors",
        &BASE.replace(
            "user = \"ec2-user\"",
            "user = \"ec2-user\"\ninterface = \"vpn\"\nconnect_timeout = \"soon\"",
        ),
        &[
            "recipe.toml has 2 errors",
            "`interface` = \"vpn\" is not an interface",
            "`connect_timeout` = \"soon\" is not a duration",
        ],
    );
}

#[test]
fn an_open_world_cidr_must_be_a_cidr() {
    rejects(
        "cidr",
        &BASE.replace(
            "user = \"ec2-user\"",
            "user = \"ec2-user\"\nallowed_cidr = \"everyone\"",
        ),
        &["`allowed_cidr` = \"everyone\" is not an IPv4 CIDR"],
    );
}

#[test]
fn an_undeclared_variable_in_a_template_is_an_error() {
    rejects(
        "undeclared",
        &BASE.replace("web-{{timestamp}}", "web-{{var.env}}-{{timestamp}}"),
        &[
            "recipe.toml:17:13:",
            "variable `env` is not declared",
            "[variables]",
        ],
    );
}

#[test]
fn a_required_variable_without_a_value_names_every_way_to_set_it() {
    let text = format!(
        "[variables]\nsubnet = {{ required = true }}\n\n{}",
        BASE.replace("\"subnet-0abc\"", "\"{{var.subnet}}\"")
    );
    rejects(
        "required",
        &text,
        &[
            "recipe.toml:2:1: variable `subnet` is required",
            "--var subnet=VALUE",
            "BAKERY_VAR_subnet",
        ],
    );
}

#[test]
fn an_unknown_provisioner_type_lists_the_known_ones() {
    rejects(
        "ansible",
        &BASE.replace("type = \"shell\"", "type = \"ansible\""),
        &[
            "provisioner `type` = \"ansible\" is not supported",
            "\"shell\" or \"file\"",
        ],
    );
}

#[test]
fn an_invalid_ami_name_is_caught_before_baking() {
    rejects(
        "ami-name",
        &BASE.replace("web-{{timestamp}}", "web:{{timestamp}}"),
        &["is not a valid AMI name"],
    );
}

#[test]
fn a_var_for_an_undeclared_variable_is_refused() {
    let dir = scratch("recipe-var");
    let path = write(&dir, "recipe.toml", BASE);
    let out = bakery()
        .arg("validate")
        .arg(&path)
        .args(["--var", "colour=red"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("variable `colour` is not declared"),
        "{stderr}"
    );
}

#[test]
fn a_recipe_that_does_not_exist_is_named() {
    let out = bakery()
        .args(["validate", "/nonexistent/recipe.toml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("cannot read /nonexistent/recipe.toml"),
        "{stderr}"
    );
}
