//! The corpus of malformed recipes (`tests/recipes/malformed/`), kept as regression tests: each
//! `NAME.toml` must be refused with every line of `NAME.expected` in the error, by the library
//! and by `bakery validate` (exit 2). New crashes or bad messages found by fuzzing
//! (`scripts/fuzz-recipe`) are added here.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn corpus() -> Vec<(PathBuf, Vec<String>)> {
    let dir = repo().join("tests/recipes/malformed");
    let mut cases: Vec<(PathBuf, Vec<String>)> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| {
            let expected = std::fs::read_to_string(p.with_extension("expected"))
                .unwrap_or_else(|_| panic!("{} has no .expected file", p.display()));
            (
                p,
                expected
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect(),
            )
        })
        .collect();
    cases.sort();
    cases
}

#[test]
fn every_malformed_recipe_is_refused_with_its_expected_error() {
    let cases = corpus();
    assert!(cases.len() >= 20, "the corpus has {} recipes", cases.len());
    let mut failures = Vec::new();
    for (path, expected) in &cases {
        let lib = match bakery::recipe::load(path, &bakery::recipe::VarSources::default()) {
            Ok(_) => {
                failures.push(format!("{}: accepted", path.display()));
                continue;
            }
            Err(e) => e.to_string(),
        };
        let out = Command::new(BIN)
            .arg("validate")
            .arg(path)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap();
        let cli = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.code() != Some(2) {
            failures.push(format!("{}: exit {:?}", path.display(), out.status.code()));
        }
        for e in expected {
            if !lib.contains(e.as_str()) || !cli.contains(e.as_str()) {
                failures.push(format!("{}: {e:?} not in:\n{lib}", path.display()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn flags_out_of_range_are_refused_before_anything_runs() {
    // Issue #10 C: every duration and count a flag takes has a documented bound.
    for (args, expected) in [
        (
            &[
                "rollout",
                "--asg",
                "g",
                "--ami",
                "ami-1",
                "--health-timeout",
                "300000000000y",
            ][..],
            "out of range: 1s to 1day",
        ),
        (
            &[
                "rollout",
                "--asg",
                "g",
                "--ami",
                "ami-1",
                "--canary-bake",
                "25h",
            ][..],
            "out of range: 0s to 1day",
        ),
        (
            &[
                "rollout",
                "--asg",
                "g",
                "--ami",
                "ami-1",
                "--lock-ttl",
                "1s",
            ][..],
            "out of range: 10s to 10m",
        ),
        (
            &["rollout", "--asg", "g", "--ami", "ami-1", "--canary", "0"][..],
            "0 is not in 1..=10000",
        ),
        (
            &["gc", "--older-than", "-5m"][..],
            "is negative: an age is how long ago",
        ),
    ] {
        let out = Command::new(BIN)
            .args(args)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
