//! One test per check, passing and failing, on fixture facts; and IAM's matching rules.

use super::*;
use serde_json::json;

fn rule(group: &str, port: i32, cidrs: &[&str], groups: &[&str]) -> Rule {
    Rule {
        group: group.into(),
        from: port,
        to: port,
        cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        groups: groups.iter().map(|s| s.to_string()).collect(),
    }
}

fn subnet(id: &str, public: bool) -> SubnetFact {
    let n = id.len() % 200 + if public { 0 } else { 50 };
    SubnetFact {
        id: id.into(),
        public,
        route_table: Some(format!("rtb-{id}")),
        cidr: format!("10.0.{n}.0/24"),
        nacl: Some(allow_all(&format!("acl-{id}"))),
    }
}

/// A VPC's default network ACL: rule 100 allows everything, both ways.
fn allow_all(id: &str) -> Nacl {
    let e = |egress| NaclEntry {
        rule: 100,
        egress,
        protocol: "-1".into(),
        allow: true,
        cidr: "0.0.0.0/0".into(),
        ports: None,
    };
    Nacl {
        id: id.into(),
        entries: vec![e(false), e(true)],
    }
}

fn entry(rule: i32, egress: bool, allow: bool, cidr: &str, ports: Option<(i32, i32)>) -> NaclEntry {
    NaclEntry {
        rule,
        egress,
        protocol: "6".into(),
        allow,
        cidr: cidr.into(),
        ports,
    }
}

const SECRET: &str = "arn:aws:secretsmanager:us-east-1:123:secret:world/db-AbC";

/// The seed architecture, every check passing.
fn good() -> Facts {
    Facts {
        group: "web".into(),
        subnets: vec![
            subnet("subnet-priv-a", false),
            subnet("subnet-priv-b", false),
        ],
        instances: vec!["i-1".into(), "i-2".into()],
        instances_with_public_ip: vec![],
        template: Some(TemplateFact {
            id: "lt-1".into(),
            version: 3,
            imdsv2_required: true,
            security_groups: vec!["sg-app".into()],
            encrypts_all_volumes: true,
            instance_profile: Some("web-profile".into()),
        }),
        load_balancers: Some(vec![LoadBalancerFact {
            name: "web-alb".into(),
            internet_facing: true,
            subnets: vec![subnet("subnet-pub-a", true), subnet("subnet-pub-b", true)],
            security_groups: vec!["sg-alb".into()],
        }]),
        app_port: 8080,
        app_rules: vec![rule("sg-app", 8080, &[], &["sg-alb"])],
        databases: vec![DatabaseFact {
            name: "db".into(),
            publicly_accessible: false,
            port: 5432,
            rules: vec![rule("sg-db", 5432, &[], &["sg-app"])],
        }],
        unencrypted_volumes: vec![],
        secret: Some(SecretFact {
            arn: SECRET.into(),
            profile: Some("web-profile".into()),
            policies: vec![json!({"Statement": [{"Effect": "Allow",
                "Action": "secretsmanager:GetSecretValue", "Resource": SECRET}]})],
        }),
    }
}

fn check<'a>(findings: &'a [Finding], name: &str) -> &'a Finding {
    findings
        .iter()
        .find(|f| f.check == name)
        .unwrap_or_else(|| panic!("no finding {name:?} in {findings:#?}"))
}

fn failed(facts: &Facts, name: &str) -> Finding {
    let out = evaluate(facts);
    let f = check(&out, name).clone();
    assert!(!f.passed, "{name} should fail: {f:#?}");
    assert!(
        f.fix.is_some(),
        "a failed check says what to change: {f:#?}"
    );
    f
}

#[test]
fn the_seed_architecture_passes_every_check() {
    let out = evaluate(&good());
    for f in &out {
        assert!(f.passed, "{f:#?}");
        assert_eq!(f.fix, None);
    }
    assert_eq!(out.len(), 9, "{out:#?}");
}

#[test]
fn instances_in_a_public_subnet_fail_naming_the_subnet_and_route_table() {
    let mut f = good();
    f.subnets[1].public = true;
    let x = failed(&f, "instances in private subnets");
    assert_eq!(x.severity, Severity::High);
    assert!(x.detail.contains("subnet-priv-b"), "{x:?}");
    assert!(x.fix.unwrap().contains("rtb-subnet-priv-b"));
}

#[test]
fn an_instance_with_a_public_ip_fails() {
    let mut f = good();
    f.instances_with_public_ip = vec!["i-2".into()];
    let x = failed(&f, "instances in private subnets");
    assert!(x.detail.contains("i-2"));
}

#[test]
fn an_internet_facing_load_balancer_in_a_private_subnet_fails() {
    let mut f = good();
    if let Some(lbs) = f.load_balancers.as_mut() {
        lbs[0].subnets[0].public = false;
    }
    let x = failed(&f, "load balancer in public subnets");
    assert_eq!(x.severity, Severity::Medium);
    assert!(x.detail.contains("web-alb in subnet-pub-a"), "{x:?}");
}

#[test]
fn no_load_balancer_is_information_only() {
    let mut f = good();
    f.load_balancers = None;
    let out = evaluate(&f);
    let x = check(&out, "load balancer in public subnets");
    assert!(x.passed);
    assert_eq!(x.severity, Severity::Info);
    // The app port then has no load balancer group to be open to.
    assert!(!check(&out, "app port only from the load balancer").passed);
}

#[test]
fn an_app_port_open_to_the_world_fails_naming_group_and_rule() {
    let mut f = good();
    f.app_rules.push(rule("sg-app", 8080, &["0.0.0.0/0"], &[]));
    let x = failed(&f, "app port only from the load balancer");
    assert!(
        x.detail
            .contains("sg-app: the rule for port 8080 admits 0.0.0.0/0"),
        "{x:?}"
    );
    assert!(x.fix.unwrap().contains("sg-alb"));
}

#[test]
fn an_app_port_not_open_to_the_load_balancer_fails() {
    let mut f = good();
    f.app_rules = vec![rule("sg-app", 22, &["10.0.0.0/8"], &[])];
    let x = failed(&f, "app port only from the load balancer");
    assert!(x.detail.contains("not open to sg-alb at all"), "{x:?}");
}

#[test]
fn an_all_ports_rule_counts_for_every_port() {
    let mut f = good();
    f.app_rules.push(Rule {
        group: "sg-app".into(),
        from: -1,
        to: -1,
        cidrs: vec!["10.0.0.0/8".into()],
        groups: vec![],
    });
    let x = failed(&f, "app port only from the load balancer");
    assert!(x.detail.contains("all ports admits 10.0.0.0/8"), "{x:?}");
}

#[test]
fn a_public_database_fails() {
    let mut f = good();
    f.databases[0].publicly_accessible = true;
    let x = failed(&f, "database not publicly accessible");
    assert!(x.fix.unwrap().contains("--no-publicly-accessible"));
}

#[test]
fn a_database_open_to_another_group_fails() {
    let mut f = good();
    f.databases[0]
        .rules
        .push(rule("sg-db", 5432, &[], &["sg-bastion"]));
    let x = failed(&f, "database only from the instances");
    assert!(x.detail.contains("admits group sg-bastion"), "{x:?}");
}

#[test]
fn no_database_is_information_only() {
    let mut f = good();
    f.databases.clear();
    let out = evaluate(&f);
    let x = check(&out, "database only from the instances");
    assert!(x.passed && x.severity == Severity::Info);
}

#[test]
fn imdsv1_fails_naming_the_template_version() {
    let mut f = good();
    if let Some(t) = f.template.as_mut() {
        t.imdsv2_required = false;
    }
    let x = failed(&f, "IMDSv2 required");
    assert!(x.detail.contains("lt-1 version 3"), "{x:?}");
    assert!(x.fix.unwrap().contains("HttpTokens = required"));
}

#[test]
fn no_template_fails_imdsv2() {
    let mut f = good();
    f.template = None;
    failed(&f, "IMDSv2 required");
}

#[test]
fn unencrypted_volumes_fail_unless_the_template_encrypts() {
    let mut f = good();
    if let Some(t) = f.template.as_mut() {
        t.encrypts_all_volumes = false;
    }
    let out = evaluate(&f);
    assert!(
        check(&out, "EBS volumes encrypted").passed,
        "actual volumes encrypted"
    );
    f.unencrypted_volumes = vec!["vol-1".into()];
    let x = failed(&f, "EBS volumes encrypted");
    assert!(x.detail.contains("vol-1"));
}

#[test]
fn a_role_without_the_secret_fails_and_none_named_is_info() {
    let mut f = good();
    if let Some(s) = f.secret.as_mut() {
        s.policies =
            vec![json!({"Statement": {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}})];
    }
    let x = failed(&f, "instance role reads the secret");
    assert!(x.detail.contains("web-profile"));
    if let Some(s) = f.secret.as_mut() {
        s.profile = None;
    }
    failed(&f, "instance role reads the secret");
    f.secret = None;
    let out = evaluate(&f);
    let x = check(&out, "instance role reads the secret");
    assert!(x.passed && x.severity == Severity::Info);
}

#[test]
fn policies_are_matched_with_wildcards_and_denies_win() {
    let allow = json!({"Statement": [{"Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"], "Resource": "arn:aws:secretsmanager:*:*:secret:world/db-*"}]});
    let star =
        json!({"Statement": {"Effect": "Allow", "Action": "secretsmanager:*", "Resource": "*"}});
    let deny = json!({"Statement": [{"Effect": "Deny", "Action": "secretsmanager:Get*", "Resource": "*"}]});
    let other =
        json!({"Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]});
    assert!(policies_allow(
        std::slice::from_ref(&allow),
        GET_SECRET,
        SECRET
    ));
    assert!(policies_allow(
        std::slice::from_ref(&star),
        GET_SECRET,
        SECRET
    ));
    assert!(!policies_allow(&[star, deny], GET_SECRET, SECRET));
    assert!(!policies_allow(&[other], GET_SECRET, SECRET));
    assert!(!policies_allow(
        &[allow],
        GET_SECRET,
        "arn:aws:secretsmanager:us-east-1:123:secret:prod/db-x"
    ));
}

#[test]
fn not_action_and_not_resource_are_evaluated_as_iam_does() {
    let allow_all = json!({"Statement": {"Effect": "Allow", "Action": "*", "Resource": "*"}});
    // Denied everything but S3: the secret is not readable.
    let deny_but_s3 =
        json!({"Statement": {"Effect": "Deny", "NotAction": "s3:*", "Resource": "*"}});
    assert!(!policies_allow(
        &[allow_all.clone(), deny_but_s3],
        GET_SECRET,
        SECRET
    ));
    // Allowed everything but S3: the secret is readable.
    let allow_but_s3 =
        json!({"Statement": {"Effect": "Allow", "NotAction": "s3:*", "Resource": "*"}});
    assert!(policies_allow(&[allow_but_s3], GET_SECRET, SECRET));
    // Allowed everything but secretsmanager: not readable.
    let allow_but_sm = json!({"Statement": {"Effect": "Allow", "NotAction": ["secretsmanager:*"], "Resource": "*"}});
    assert!(!policies_allow(&[allow_but_sm], GET_SECRET, SECRET));
    // NotResource: allowed on everything but prod secrets.
    let not_prod = json!({"Statement": {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "NotResource": "arn:aws:secretsmanager:*:*:secret:prod/*"}});
    assert!(policies_allow(
        std::slice::from_ref(&not_prod),
        GET_SECRET,
        SECRET
    ));
    assert!(!policies_allow(
        &[not_prod],
        GET_SECRET,
        "arn:aws:secretsmanager:us-east-1:123:secret:prod/db-x"
    ));
    // A Deny with NotResource that excludes the secret does not deny it.
    let deny_others =
        json!({"Statement": {"Effect": "Deny", "Action": "*", "NotResource": SECRET}});
    assert!(policies_allow(
        &[allow_all, deny_others],
        GET_SECRET,
        SECRET
    ));
}

#[test]
fn wildcards_match_as_iam_does_and_in_linear_time() {
    assert!(wildcard("*", ""));
    assert!(wildcard("a*c", "abbbc"));
    assert!(wildcard("a?c", "abc"));
    assert!(!wildcard("a?c", "ac"));
    assert!(wildcard("*db-*", "secret:world/db-AbC"));
    assert!(!wildcard("abc", "abcd"));
    assert!(wildcard("ü*ç", "ünïç"));
    // Found by fuzzing (scripts/fuzz iam): a literal `*` in the value took the pattern's `*`
    // as a plain character.
    assert!(wildcard("*", "*\"St"));
    assert!(wildcard("a*", "a*b"));
    assert!(wildcard("*b", "*ab"));
    // The worst case of a backtracking matcher: 2^30 steps. Linear here.
    let p = "a*".repeat(30) + "b";
    let v = "a".repeat(60);
    let t = std::time::Instant::now();
    assert!(!wildcard(&p, &v));
    assert!(
        t.elapsed() < std::time::Duration::from_secs(1),
        "exponential matching"
    );
}

#[test]
fn a_network_acl_denying_the_app_port_from_the_load_balancer_fails() {
    let mut f = good();
    let lb_cidr = f.load_balancers.as_ref().unwrap()[0].subnets[0]
        .cidr
        .clone();
    let nacl = f.subnets[0].nacl.as_mut().unwrap();
    nacl.entries
        .insert(0, entry(50, false, false, &lb_cidr, Some((8080, 8080))));
    let x = failed(&f, "network ACLs admit the app's traffic");
    assert_eq!(x.severity, Severity::High);
    assert!(
        x.detail.contains(
            "subnet subnet-priv-a: acl-subnet-priv-a inbound rule 50 denies TCP 8080-8080"
        ),
        "{x:?}"
    );
    assert!(x
        .fix
        .unwrap()
        .contains("inbound rule allowing TCP 8080-8080"));
}

#[test]
fn a_network_acl_without_ephemeral_return_ports_fails() {
    let mut f = good();
    // The load balancer's subnet allows only 80 and 443 in: the app's answers cannot return.
    let lb = &mut f.load_balancers.as_mut().unwrap()[0].subnets[1];
    lb.nacl = Some(Nacl {
        id: "acl-lb".into(),
        entries: vec![
            entry(100, false, true, "0.0.0.0/0", Some((80, 80))),
            entry(110, false, true, "0.0.0.0/0", Some((443, 443))),
            entry(100, true, true, "0.0.0.0/0", None),
        ],
    });
    let x = failed(&f, "network ACLs admit the app's traffic");
    assert!(
        x.detail
            .contains("acl-lb has no inbound rule allowing TCP 1024-65535"),
        "{x:?}"
    );
}

#[test]
fn nacl_rules_are_evaluated_in_order_first_match_wins() {
    let n = Nacl {
        id: "acl-1".into(),
        entries: vec![
            entry(200, false, false, "0.0.0.0/0", None),
            entry(100, false, true, "10.0.0.0/16", Some((8000, 9000))),
        ],
    };
    assert!(nacl_admits(&n, false, (8080, 8080), "10.0.1.0/24").is_ok());
    assert!(nacl_admits(&n, false, (22, 22), "10.0.1.0/24").is_err());
    // A partial allow (part of the peer's range) does not suffice before the deny.
    assert!(nacl_admits(&n, false, (8080, 8080), "10.0.0.0/8").is_err());
    // Egress has no rule at all: the implicit deny.
    let e = nacl_admits(&n, true, (1024, 65535), "10.0.1.0/24").unwrap_err();
    assert!(e.contains("has no outbound rule"), "{e}");
}
