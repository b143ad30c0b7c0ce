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
