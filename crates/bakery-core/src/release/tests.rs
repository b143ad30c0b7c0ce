use super::record::*;
use super::*;

const EXAMPLE: &str = r#"
[source]
manifest = "bakery-manifest.json"
on_failure = "rollback_all"

[[wave]]
name = "canary"
targets = [{ region = "us-east-1", group = "web-canary" }]
bake = "5m"
gates = { alarms = ["web-5xx"], http = { path = "/healthz", expect_status = 200 } }
rollout = { max_surge = "25%", canary = 1 }

[[wave]]
name = "everywhere"
targets = [{ region = "us-east-1", tag = { key = "app", value = "web" } },
           { region = "eu-west-1", group = "web", role_arn = "arn:aws:iam::111122223333:role/release" }]
max_parallel = 2
"#;

fn plan(text: &str) -> Plan {
    parse(Path::new("plans/web.toml"), text).unwrap()
}

fn errors(text: &str) -> Vec<Diagnostic> {
    match parse(Path::new("web.toml"), text) {
        Err(FileError::Invalid(d)) => d,
        other => panic!("expected located errors, got {other:?}"),
    }
}

fn one_error(text: &str) -> Diagnostic {
    let d = errors(text);
    assert_eq!(d.len(), 1, "{d:#?}");
    d.into_iter().next().unwrap()
}

#[test]
fn the_issues_example_plan_is_valid() {
    let p = plan(EXAMPLE);
    assert_eq!(p.name, "web");
    assert_eq!(
        p.source,
        Source::Manifest("plans/bakery-manifest.json".into())
    );
    assert_eq!(p.on_failure, OnFailure::RollbackAll);
    assert_eq!(p.waves.len(), 2);
    let canary = &p.waves[0];
    assert_eq!(canary.bake, Duration::from_secs(300));
    assert_eq!(canary.gates.alarms[0].0, "web-5xx");
    assert_eq!(canary.gates.alarms[0].1.line, 10);
    let http = canary.gates.http.as_ref().unwrap();
    assert_eq!(
        (http.path.as_str(), http.expect_status, http.port),
        ("/healthz", 200, None)
    );
    assert_eq!(canary.rollout.max_surge, Some(Amount::Percent(25)));
    assert_eq!(canary.rollout.canary, Some(1));
    assert_eq!(canary.max_parallel, 1, "default: all of the wave's targets");
    let all = &p.waves[1];
    assert_eq!(all.max_parallel, 2);
    assert_eq!(
        all.targets[0].selector,
        Selector::Tag {
            key: "app".into(),
            value: "web".into()
        }
    );
    assert_eq!(
        all.targets[1].role_arn.as_deref(),
        Some("arn:aws:iam::111122223333:role/release")
    );
    assert_eq!(all.targets[1].at.line, 16);
    assert_eq!(p.regions(), vec!["us-east-1", "eu-west-1"]);
}

#[test]
fn a_release_name_is_taken_from_the_table_else_the_file() {
    let p = plan(&format!("[release]\nname = \"web-2026.12\"\n{EXAMPLE}"));
    assert_eq!(p.name, "web-2026.12");
    let d = one_error(&format!("[release]\nname = \"web 2026\"\n{EXAMPLE}"));
    assert!(d.message.contains("release name \"web 2026\""), "{d}");
    assert_eq!(d.line, 2);
}

#[test]
fn the_source_names_exactly_one_image() {
    let waves = "[[wave]]\nname = \"a\"\ntargets = [{ region = \"us-east-1\", group = \"g\" }]\n";
    let d = one_error(&format!("[source]\non_failure = \"stop\"\n{waves}"));
    assert!(d.message.contains("names no image"), "{d}");
    let d = one_error(&format!(
        "[source]\nami = \"ami-0123456789abcdef0\"\nmanifest = \"m.json\"\n{waves}"
    ));
    assert!(d.message.contains("twice"), "{d}");
    let d = one_error(&format!("[source]\nami = \"ami-xyz\"\n{waves}"));
    assert!(d.message.contains("not an AMI id"), "{d}");
    assert_eq!(d.line, 2);
    let d = one_error(&format!(
        "[source]\nssm_parameter = \"bakery/web\"\n{waves}"
    ));
    assert!(d.message.contains("does not start with `/`"), "{d}");
    let d = one_error(&format!(
        "[source]\nmanifest = \"m.json\"\non_failure = \"rollback\"\n{waves}"
    ));
    assert!(d.message.contains("on_failure = \"rollback\""), "{d}");
    assert_eq!(d.line, 3);
    let d = one_error(waves);
    assert!(d.message.contains("no [source]"), "{d}");
    let p = plan(&format!(
        "[source]\nssm_parameter = \"/bakery/web\"\non_failure = \"rollback_wave\"\n{waves}"
    ));
    assert_eq!(p.source, Source::Param("/bakery/web".into()));
    assert_eq!(p.on_failure, OnFailure::RollbackWave);
}

#[test]
fn one_ami_id_cannot_serve_two_regions() {
    let d = one_error(
        "[source]\nami = \"ami-0123456789abcdef0\"\n[[wave]]\nname = \"a\"\n\
         targets = [{ region = \"us-east-1\", group = \"g\" },\n  { region = \"eu-west-1\", group = \"g\" }]\n",
    );
    assert!(
        d.message.contains("2 regions (eu-west-1, us-east-1)"),
        "{d}"
    );
    assert_eq!(d.line, 6, "located at the second region's target");
}

#[test]
fn waves_and_targets_are_checked_each_and_all_at_once() {
    let d = errors(
        "[source]\nmanifest = \"m.json\"\n\
         [[wave]]\nname = \"a\"\ntargets = []\n\
         [[wave]]\nname = \"a\"\ntargets = [{ region = \"eu-wset-1\", group = \"g\" },\n\
         { region = \"us-east-1\" },\n\
         { region = \"us-east-1\", group = \"g\", tag = { key = \"k\", value = \"v\" } },\n\
         { region = \"us-east-1\", group = \"h\", role_arn = \"arn:aws:iam::1111:role/x\" }]\n\
         bake = \"2 days\"\nmax_parallel = 0\n\
         gates = { http = { path = \"healthz\", expect_status = 700, port = 70000 }, alarms = [\"\"] }\n\
         rollout = { max_surge = \"0\", max_unavailable = \"120%\", canary = -1, health_timeout = \"1s\" }\n",
    );
    let messages: Vec<String> = d
        .iter()
        .map(|d| format!("{}: {}", d.line, d.message))
        .collect();
    let want = [
        "5: wave \"a\" has no targets",
        "7: wave name \"a\" is used twice (waves 1 and 2)",
        "8: \"eu-wset-1\" is not an AWS Region",
        "9: a target of wave \"a\" names no group",
        "10: a target names both a group and a tag",
        "11: \"arn:aws:iam::1111:role/x\" is not an IAM role ARN",
        "12: `bake` = \"2 days\" is out of range",
        "13: max_parallel = 0 must be at least 1",
        "14: path \"healthz\" does not start with `/`",
        "14: port 70000 is not a TCP port",
        "14: expect_status = 700 is not an HTTP status",
        "14: an alarm name must be 1 to 255 characters",
        "15: `max_surge` = \"0\" must be at least 1 instance",
        "15: `max_unavailable`: 120% is more than 100%",
        "15: canary = -1 must be at least 1",
        "15: `health_timeout` = \"1s\" is out of range",
    ];
    for w in want {
        assert!(
            messages.iter().any(|m| m.starts_with(w)),
            "missing {w:?} in {messages:#?}"
        );
    }
    assert_eq!(messages.len(), want.len(), "{messages:#?}");
    let region = d.iter().find(|d| d.message.contains("eu-wset-1")).unwrap();
    assert!(region.hint.as_deref().unwrap().contains("eu-west-1"));
}

#[test]
fn a_group_listed_twice_is_refused() {
    let d = one_error(
        "[source]\nmanifest = \"m.json\"\n\
         [[wave]]\nname = \"a\"\ntargets = [{ region = \"us-east-1\", group = \"web\" }]\n\
         [[wave]]\nname = \"b\"\ntargets = [{ region = \"us-east-1\", group = \"web\" }]\n",
    );
    assert!(
        d.message
            .contains("group web in us-east-1 is listed twice (first in wave \"a\")"),
        "{d}"
    );
    assert_eq!(d.line, 8);
}

#[test]
fn unknown_keys_and_syntax_errors_are_located() {
    let d = one_error("[source]\nmanifest = \"m.json\"\n[[wave]]\nname = \"a\"\ntarget = []\n");
    assert!(d.message.contains("unknown field `target`"), "{d}");
    assert_eq!(d.line, 5);
    let d = one_error("[source]\nmanifest = \"m.json\n");
    assert_eq!(d.line, 2);
    let d = one_error("[source]\nmanifest = \"m.json\"\n");
    assert!(d.message.contains("no waves"), "{d}");
}

// ------------------------------------------------------------------------ the record

fn resolved(region: &str, group: &str) -> Resolved {
    Resolved {
        region: region.into(),
        group: group.into(),
        role_arn: None,
        ami: "ami-new".into(),
    }
}

fn record(policy: &str) -> Record {
    let p = plan(&EXAMPLE.replace("rollback_all", policy));
    new_record(
        &p,
        vec![
            vec![resolved("us-east-1", "web-canary")],
            vec![resolved("us-east-1", "web-a"), resolved("eu-west-1", "web")],
        ],
        100,
    )
}

fn set(rec: &mut Record, wave: usize, states: &[GroupState]) {
    for (g, s) in rec.waves[wave].groups.iter_mut().zip(states) {
        g.state = *s;
        g.previous_ami = Some("ami-old".into());
    }
}

#[test]
fn a_rerun_resumes_at_the_first_wave_not_passed() {
    let mut rec = record("rollback_all");
    assert_eq!(next(&rec), Next::Wave(0));
    rec.waves[0].state = WaveState::Passed;
    rec.waves[1].state = WaveState::Rolling;
    assert_eq!(next(&rec), Next::Wave(1));
    rec.waves[1].state = WaveState::Passed;
    assert_eq!(next(&rec), Next::Finish);
    begin_rollback(&mut rec, None, "aborted", 5);
    assert_eq!(next(&rec), Next::RollBack);
    rec.state = State::Done;
    assert_eq!(next(&rec), Next::Over(State::Done));
}

#[test]
fn rollback_all_reverts_every_group_the_release_touched() {
    let mut rec = record("rollback_all");
    set(&mut rec, 0, &[GroupState::Done]);
    rec.waves[0].state = WaveState::Passed;
    set(&mut rec, 1, &[GroupState::Rolling, GroupState::Pending]);
    assert_eq!(
        restore_set(&rec, Some(1), OnFailure::RollbackAll),
        vec![(0, 0), (1, 0)]
    );
    begin_rollback(&mut rec, Some(1), "alarm web-5xx", 7);
    assert_eq!(
        rec.state,
        State::RollingBack {
            then: Ended::RolledBack
        }
    );
    assert_eq!(rec.waves[1].state, WaveState::Failed);
    assert_eq!(rec.waves[0].groups[0].state, GroupState::Reverting);
    assert_eq!(
        rec.waves[1].groups[1].state,
        GroupState::Pending,
        "never touched"
    );
    assert_eq!(
        end_rollback(&mut rec, 8),
        None,
        "two groups still reverting"
    );
    rec.waves[0].groups[0].state = GroupState::Reverted;
    rec.waves[1].groups[0].state = GroupState::Reverted;
    assert_eq!(end_rollback(&mut rec, 9), Some(Ended::RolledBack));
    assert_eq!(rec.state, State::Ended(Ended::RolledBack));
}

#[test]
fn rollback_wave_keeps_the_waves_before_it() {
    let mut rec = record("rollback_wave");
    set(&mut rec, 0, &[GroupState::Done]);
    set(&mut rec, 1, &[GroupState::Done, GroupState::RolledBack]);
    assert_eq!(
        restore_set(&rec, Some(1), OnFailure::RollbackWave),
        vec![(1, 0)]
    );
}

#[test]
fn stop_only_finishes_the_rollback_of_groups_caught_mid_rollout() {
    let mut rec = record("stop");
    set(&mut rec, 0, &[GroupState::Done]);
    set(&mut rec, 1, &[GroupState::Done, GroupState::Rolling]);
    assert_eq!(restore_set(&rec, Some(1), OnFailure::Stop), vec![(1, 1)]);
    begin_rollback(&mut rec, Some(1), "gate", 1);
    assert_eq!(
        rec.state,
        State::RollingBack {
            then: Ended::Stopped
        }
    );
    assert_eq!(
        rec.waves[1].groups[0].state,
        GroupState::Done,
        "left for inspection"
    );
}

#[test]
fn abort_reverts_everything_whatever_the_policy() {
    let mut rec = record("stop");
    set(&mut rec, 0, &[GroupState::Done]);
    set(&mut rec, 1, &[GroupState::Unchanged, GroupState::Failed]);
    assert_eq!(
        restore_set(&rec, None, OnFailure::Stop),
        vec![(0, 0), (1, 1)]
    );
    begin_rollback(&mut rec, None, "--abort", 1);
    assert_eq!(
        rec.state,
        State::RollingBack {
            then: Ended::Aborted
        }
    );
}

#[test]
fn a_changed_plan_cannot_continue_a_release_in_progress() {
    let mut rec = record("rollback_all");
    let other = plan(&EXAMPLE.replace("5m", "6m"));
    let err = continues(&rec, &other).unwrap_err();
    assert!(err.contains("another version of the plan"), "{err}");
    assert!(continues(&rec, &plan(EXAMPLE)).is_ok());
    rec.state = State::Done;
    assert!(
        continues(&rec, &other).is_ok(),
        "a finished release may be rerun with a new plan"
    );
}

#[test]
fn a_revert_aborts_a_paused_rollout_else_rolls_the_previous_image_in() {
    let mut g = record("stop").waves[0].groups[0].clone();
    assert_eq!(
        revert(&g, false, Some("ami-new")),
        Revert::Nothing,
        "no previous image recorded"
    );
    g.previous_ami = Some("ami-old".into());
    assert_eq!(revert(&g, true, Some("ami-new")), Revert::Abort);
    assert_eq!(
        revert(&g, false, Some("ami-new")),
        Revert::RollTo("ami-old".into())
    );
    assert_eq!(revert(&g, false, Some("ami-old")), Revert::Nothing);
}

#[test]
fn the_first_alarm_in_alarm_halts_and_insufficient_data_does_not() {
    let a = |name: &str, state: &str| AlarmReading {
        region: "us-east-1".into(),
        name: name.into(),
        state: state.into(),
        reason: Some("Threshold Crossed".into()),
    };
    assert_eq!(
        alarm_verdict(&[a("x", "OK"), a("y", "INSUFFICIENT_DATA")]),
        Ok(())
    );
    assert_eq!(
        alarm_verdict(&[a("x", "OK"), a("web-5xx", "ALARM")]),
        Err("alarm web-5xx in us-east-1 is in ALARM: Threshold Crossed".into())
    );
}

#[test]
fn the_http_gate_checks_status_and_body() {
    let gate = HttpGate {
        path: "/healthz".into(),
        port: None,
        expect_status: 200,
        expect_body: Some("ok".into()),
        timeout: HTTP_TIMEOUT,
    };
    assert_eq!(check_http(&gate, 200, "ok\n"), Ok(()));
    assert_eq!(
        check_http(&gate, 503, "ok"),
        Err("GET /healthz answered 503, expected 200".into())
    );
    assert!(check_http(&gate, 200, "degraded")
        .unwrap_err()
        .contains("without \"ok\""));
}

#[test]
fn the_record_reads_back_what_it_wrote() {
    let mut rec = record("rollback_all");
    begin_rollback(&mut rec, Some(0), "x", 3);
    let text = serde_json::to_string(&rec).unwrap();
    assert!(
        text.contains("\"state\":{\"rolling_back\":{\"then\":\"rolled_back\"}}"),
        "{text}"
    );
    assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), rec);
}
