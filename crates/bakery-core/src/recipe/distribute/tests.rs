//! `[distribute]`: each mistake is a located error naming what to write instead; each field's
//! check on its own; the flags of `bakery promote` give the same settings.

use std::path::Path;

use super::*;
use crate::recipe::{parse, Diagnostic, RecipeError, VarSources};

const BASE: &str = r#"
[source]
ami = "ami-0123456789abcdef0"

[instance]
type = "t3.micro"

[communicator]
type = "ssh"
user = "ec2-user"

[image]
name = "web-{{timestamp}}"
"#;

fn with(table: &str) -> String {
    format!("{BASE}\n[distribute]\n{table}")
}

fn load(table: &str) -> Result<crate::recipe::Recipe, RecipeError> {
    parse(Path::new("r.toml"), &with(table), &VarSources::default())
}

fn errors(table: &str) -> Vec<Diagnostic> {
    match load(table) {
        Err(RecipeError::Invalid(d)) => d,
        other => panic!("expected diagnostics, got {other:?}"),
    }
}

/// The one error of `table`, and the text at its location.
fn one_error(table: &str) -> (Diagnostic, String) {
    let d = errors(table);
    assert_eq!(d.len(), 1, "{d:#?}");
    let text = with(table);
    let line = text.lines().nth(d[0].line - 1).unwrap();
    let at = line.chars().skip(d[0].column - 1).collect();
    (d[0].clone(), at)
}

#[test]
fn the_issue_example_is_valid_and_read_as_written() {
    let r = load(
        r#"
regions = ["eu-west-1", "ap-northeast-2"]
encrypted = true
kms_key_ids = { "eu-west-1" = "alias/ebs-eu" }
accounts = ["111122223333"]
organization_arns = []
ou_arns = []
tags = { Release = "2026.12" }
ssm_parameter = "/bakery/web/latest"
deprecate_at = "90d"
deregistration_protection = true
"#,
    )
    .unwrap();
    let d = r.distribute.unwrap();
    assert_eq!(d.regions, ["eu-west-1", "ap-northeast-2"]);
    assert!(d.encrypted && d.deregistration_protection);
    assert_eq!(d.kms_key_ids["eu-west-1"], "alias/ebs-eu");
    assert_eq!(d.accounts, ["111122223333"]);
    assert_eq!(d.tags["Release"], "2026.12");
    assert_eq!(d.ssm_parameter.as_deref(), Some("/bakery/web/latest"));
    assert_eq!(
        d.deprecate_at,
        Some(DeprecateAt::After {
            seconds: 90 * 86_400
        })
    );
    assert!(d.shares());
    assert_eq!(
        d.copy_regions("eu-west-1").collect::<Vec<_>>(),
        ["ap-northeast-2"],
        "the region baked in gets no copy"
    );
}

#[test]
fn a_recipe_without_the_table_distributes_nowhere() {
    let r = parse(Path::new("r.toml"), BASE, &VarSources::default()).unwrap();
    assert_eq!(r.distribute, None);
}

#[test]
fn an_unknown_region_is_located_with_the_closest_name() {
    let (d, at) = one_error(r#"regions = ["eu-west-1", "eu-wset-1"]"#);
    assert!(at.starts_with("\"eu-wset-1\""), "{at}");
    assert!(
        d.message.contains("\"eu-wset-1\" is not an AWS Region"),
        "{d}"
    );
    assert!(d.hint.unwrap().contains("did you mean \"eu-west-1\""));
    let (d, _) = one_error(r#"regions = ["mars-1"]"#);
    assert!(!d.hint.unwrap().contains("did you mean"), "nothing close");
}

#[test]
fn a_region_listed_twice_is_an_error() {
    let (d, at) = one_error(r#"regions = ["eu-west-1", "eu-west-1"]"#);
    assert!(d.message.contains("listed twice"), "{d}");
    assert_eq!(d.column, 25, "the second one: {at}");
}

#[test]
fn malformed_account_ids_are_located() {
    let (d, at) = one_error(r#"accounts = ["11112222333"]"#);
    assert!(at.starts_with("\"11112222333\""));
    assert!(d.message.contains("(11 digits)"), "{d}");
    assert!(d.hint.unwrap().contains("exactly 12 digits"));
    let (d, _) = one_error(r#"accounts = ["1111-2222-3333"]"#);
    assert!(d.message.contains("not only digits"), "{d}");
    assert!(
        load(r#"accounts = ["011122223333"]"#).is_ok(),
        "leading zeros"
    );
}

#[test]
fn organization_and_ou_arns_are_checked() {
    assert!(load(
        r#"
organization_arns = ["arn:aws:organizations::111122223333:organization/o-a1b2c3d4e5"]
ou_arns = ["arn:aws:organizations::111122223333:ou/o-a1b2c3d4e5/ou-ab12-cdef3456"]
"#
    )
    .is_ok());
    let (d, at) = one_error(r#"organization_arns = ["o-a1b2c3d4e5"]"#);
    assert!(at.starts_with("\"o-a1b2c3d4e5\""));
    assert!(d.message.contains("is not an organization ARN"), "{d}");
    let (d, _) =
        one_error(r#"ou_arns = ["arn:aws:organizations::111122223333:organization/o-a1b2c3d4e5"]"#);
    assert!(
        d.message.contains("is not an organizational unit ARN"),
        "{d}"
    );
    let (d, _) = one_error(
        r#"organization_arns = ["arn:aws:organizations::11112222333:organization/o-a1b2c3d4e5"]"#,
    );
    assert!(
        d.message.contains("organization ARN"),
        "an 11-digit account inside: {d}"
    );
}

#[test]
fn a_parameter_path_needs_a_leading_slash() {
    let (d, at) = one_error(r#"ssm_parameter = "bakery/web/latest""#);
    assert!(at.starts_with("\"bakery/web/latest\""));
    assert!(d.message.contains("does not start with a slash"), "{d}");
    let (d, _) = one_error(r#"ssm_parameter = "/aws/service/web""#);
    assert!(d.message.contains("reserves"), "{d}");
    let (d, _) = one_error(r#"ssm_parameter = "/web latest""#);
    assert!(d.message.contains("contains ' '"), "{d}");
    let (d, _) = one_error(r#"ssm_parameter = "/web//latest""#);
    assert!(d.message.contains("not a valid parameter path"), "{d}");
}

#[test]
fn deprecate_at_is_a_duration_or_an_rfc3339_date() {
    assert_eq!(
        parse_deprecate_at("2027-01-01T00:00:00Z"),
        Ok(DeprecateAt::At {
            unix: 1_798_761_600
        })
    );
    assert_eq!(
        parse_deprecate_at("2027-01-01"),
        Ok(DeprecateAt::At {
            unix: 1_798_761_600
        })
    );
    assert_eq!(
        parse_deprecate_at("2027-01-01T02:00:00+02:00"),
        Ok(DeprecateAt::At {
            unix: 1_798_761_600
        })
    );
    assert_eq!(
        parse_deprecate_at("12w"),
        Ok(DeprecateAt::After {
            seconds: 84 * 86_400
        })
    );
    let (d, at) = one_error(r#"deprecate_at = "soon""#);
    assert!(at.starts_with("\"soon\""));
    assert!(d.message.contains("neither a duration"), "{d}");
    let (d, _) = one_error(r#"deprecate_at = "2027-02-30T00:00:00Z""#);
    assert!(d.message.contains("is not an RFC 3339 date"), "{d}");
    let (d, _) = one_error(r#"deprecate_at = "11 years""#);
    assert!(d.message.contains("out of range"), "{d}");
}

#[test]
fn a_deprecation_time_must_lie_ahead_and_within_ten_years() {
    let now = 1_800_000_000;
    assert_eq!(DeprecateAt::After { seconds: 60 }.time(now), now + 60);
    assert!(DeprecateAt::After { seconds: 60 }.refused_at(now).is_none());
    let past = DeprecateAt::At { unix: now - 1 }.refused_at(now).unwrap();
    assert!(past.contains("is in the past"), "{past}");
    let far = DeprecateAt::At {
        unix: now + MAX_DEPRECATION.as_secs() + 1,
    }
    .refused_at(now)
    .unwrap();
    assert!(far.contains("more than 10 years"), "{far}");
}

#[test]
fn kms_keys_belong_to_regions_that_are_copied_to() {
    let (d, at) = one_error(
        r#"
regions = ["eu-west-1"]
encrypted = true
kms_key_ids = { "ap-northeast-2" = "alias/ebs" }
"#,
    );
    assert!(at.starts_with("\"ap-northeast-2\""), "{at}");
    assert!(d.message.contains("which is not in `regions`"), "{d}");
    let (d, _) = one_error(
        r#"
regions = ["eu-west-1"]
encrypted = true
kms_key_ids = { "eu-west-1" = "arn:aws:kms:us-east-1:111122223333:key/abcd" }
"#,
    );
    assert!(d.message.contains("is in us-east-1"), "{d}");
    let (d, _) = one_error(
        r#"
regions = ["eu-west-1"]
kms_key_ids = { "eu-west-1" = "alias/ebs" }
"#,
    );
    assert!(d.message.contains("`encrypted` is not true"), "{d}");
}

#[test]
fn tags_follow_the_image_tag_rules_and_unknown_keys_are_refused() {
    let (d, _) = one_error(r#"tags = { "bakery:x" = "1" }"#);
    assert!(d.message.contains("reserved for bakery"), "{d}");
    match load(r#"region = ["eu-west-1"]"#) {
        Err(RecipeError::Invalid(d)) => {
            assert!(d[0].message.contains("unknown field `region`"), "{d:#?}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_mistake_is_reported_at_once() {
    let d = errors(
        r#"
regions = ["eu-west-9"]
accounts = ["123"]
ssm_parameter = "x"
deprecate_at = "later"
"#,
    );
    assert_eq!(d.len(), 4, "{d:#?}");
}

#[test]
fn variables_are_rendered_in_the_table() {
    let text = format!(
        "[variables]\nteam = \"web\"\n{}",
        with(r#"ssm_parameter = "/bakery/{{var.team}}/latest""#)
    );
    let r = parse(Path::new("r.toml"), &text, &VarSources::default()).unwrap();
    assert_eq!(
        r.distribute.unwrap().ssm_parameter.as_deref(),
        Some("/bakery/web/latest")
    );
}

#[test]
fn the_flags_give_the_same_settings_and_name_the_flag_at_fault() {
    let flags = Flags {
        regions: vec!["eu-west-1,ap-northeast-2".into()],
        encrypted: true,
        kms_key_ids: vec!["eu-west-1=alias/ebs-eu".into()],
        accounts: vec!["111122223333".into()],
        tags: vec!["Release=2026.12".into()],
        ssm_parameter: Some("/bakery/web/latest".into()),
        deprecate_at: Some("90d".into()),
        deregistration_protection: true,
        ..Flags::default()
    };
    let from_flags = flags.validate().unwrap();
    let from_recipe = load(
        r#"
regions = ["eu-west-1", "ap-northeast-2"]
encrypted = true
kms_key_ids = { "eu-west-1" = "alias/ebs-eu" }
accounts = ["111122223333"]
tags = { Release = "2026.12" }
ssm_parameter = "/bakery/web/latest"
deprecate_at = "90d"
deregistration_protection = true
"#,
    )
    .unwrap()
    .distribute
    .unwrap();
    assert_eq!(from_flags, from_recipe);

    let bad = Flags {
        regions: vec!["eu-west-1".into()],
        accounts: vec!["11112222333".into()],
        kms_key_ids: vec!["us-west-2=alias/x".into()],
        ssm_parameter: Some("latest".into()),
        ..Flags::default()
    };
    let e = bad.validate().unwrap_err();
    assert_eq!(e.len(), 3, "{e:#?}");
    assert!(e[0].starts_with("--account: \"11112222333\""), "{e:#?}");
    assert!(e.iter().any(|m| m.starts_with("--kms-key-id")));
    assert!(e.iter().any(|m| m.starts_with("--ssm-parameter")));
}

#[test]
fn rfc3339_round_trips() {
    for t in [0, 951_782_400, 1_798_761_600, 4_102_444_799] {
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t), "{}", rfc3339(t));
    }
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(parse_rfc3339("2026-13-01"), None);
    assert_eq!(parse_rfc3339("2026-01-01T25:00:00Z"), None);
}

#[test]
fn every_known_region_passes_and_account_checks_are_exact() {
    for r in AWS_REGIONS {
        assert!(check_region(r).is_ok(), "{r}");
    }
    assert!(check_account("111122223333").is_ok());
    assert!(check_account("1111222233334").is_err());
    assert!(check_account("").is_err());
}
