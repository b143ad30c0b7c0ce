//! The provisioner scripts that ship with bakery (`provisioners/`): valid shell, and doing what
//! their header says when run against a scratch root.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

#[test]
fn every_shipped_script_is_valid_sh() {
    for entry in std::fs::read_dir(repo().join("provisioners")).unwrap() {
        let path = entry.unwrap().path();
        let out = Command::new("sh").arg("-n").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn install_secret_fetch_installs_a_boot_unit_that_keeps_the_secret_in_run() {
    let root = scratch("secret-fetch");
    let out = Command::new(repo().join("provisioners/install-secret-fetch.sh"))
        .env("ROOT", &root)
        .env("SECRET_ID", "world/db")
        .env("OUTPUT", "/run/web/db.json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = std::fs::read_to_string(root.join("usr/local/bin/fetch-secret")).unwrap();
    assert!(script.contains("--secret-id 'world/db'"), "{script}");
    assert!(
        script.contains("umask 077") && script.contains("'/run/web/db.json'"),
        "{script}"
    );
    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/fetch-secret.service")).unwrap();
    assert!(
        unit.contains("Before=web.service") && unit.contains("Type=oneshot"),
        "{unit}"
    );
    let link = std::fs::read_link(
        root.join("etc/systemd/system/multi-user.target.wants/fetch-secret.service"),
    )
    .unwrap();
    assert_eq!(
        link.to_str(),
        Some("/etc/systemd/system/fetch-secret.service")
    );

    let out = Command::new(repo().join("provisioners/install-secret-fetch.sh"))
        .env("ROOT", &root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "SECRET_ID is required");
    assert!(String::from_utf8_lossy(&out.stderr).contains("SECRET_ID"));
}

/// Issue #10, item 11: an SSH provisioner's `timeout` fired about 59 s late every time (closing
/// the channel waited, twice, for a server that does not close while the command runs).
#[test]
fn an_ssh_provisioner_times_out_when_its_timeout_says() {
    let world = World::get();
    let dir = scratch("ssh-timeout");
    let r = write(
        &dir,
        "recipe.toml",
        &recipe(
            &world,
            "[[provisioner]]\ntype = \"shell\"\ntimeout = \"3s\"\ninline = [\"echo started\", \"sleep 600\"]\n",
            "",
        ),
    );
    let (mut child, lines) = spawn_build(&world, &r);
    let mut events = Vec::new();
    events_until(
        &lines,
        &mut events,
        std::time::Duration::from_secs(120),
        "the provisioner never started",
        |e| e["event"] == "output" && e["line"] == "started",
    );
    let started = std::time::Instant::now();
    events_until(
        &lines,
        &mut events,
        std::time::Duration::from_secs(120),
        "the bake never failed",
        |e| e["event"] == "build_failed",
    );
    // The property is the deadline itself: 3 s, with room for a loaded machine (it was 62 s).
    let took = started.elapsed();
    let error = events.last().unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(error.contains("timed out after 3s"), "{error}");
    assert!(
        took < std::time::Duration::from_secs(20),
        "the timeout fired after {took:?}"
    );
    assert_eq!(child.wait().unwrap().code(), Some(3));
}
