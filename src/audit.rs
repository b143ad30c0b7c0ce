//! `bakery audit --asg NAME`: checks the classic web architecture around a group and prints a
//! table of findings with severity: instances in private subnets, the load balancer in public
//! ones, the app port open only to the load balancer's group, the database open only to the
//! instances' group and not public, IMDSv2 required, EBS encrypted, and the instance role able
//! to read the secret it needs. Any high finding fails the command (exit 8), for pipelines.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::Filter;
use serde::Serialize;

use crate::aws::{autoscaling, call, ec2, launch_template as lt, Aws, AwsError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub check: &'static str,
    pub severity: Severity,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("Auto Scaling group {0:?} not found in this region")]
    GroupNotFound(String),
    #[error(transparent)]
    Aws(#[from] AwsError),
}

/// One ingress rule, flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub from: i32,
    pub to: i32,
    pub cidrs: Vec<String>,
    pub groups: Vec<String>,
}

impl Rule {
    fn covers(&self, port: i32) -> bool {
        (self.from == -1 && self.to == -1) || (self.from <= port && port <= self.to)
    }
}

/// Whether the rules admit `port` only from `allowed` groups (and from no CIDR at all).
pub fn only_from_groups(
    rules: &[Rule],
    port: i32,
    allowed: &BTreeSet<String>,
) -> Result<(), String> {
    let mut problems = Vec::new();
    for r in rules.iter().filter(|r| r.covers(port)) {
        for c in &r.cidrs {
            problems.push(format!("port {port} is open to {c}"));
        }
        for g in &r.groups {
            if !allowed.contains(g) {
                problems.push(format!("port {port} is open to group {g}"));
            }
        }
    }
    if !rules
        .iter()
        .any(|r| r.covers(port) && r.groups.iter().any(|g| allowed.contains(g)))
    {
        problems.push(format!(
            "port {port} is not open to {} at all",
            allowed.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// IAM's wildcard match (`*` and `?`), case-sensitive as for resources.
pub fn wildcard(pattern: &str, value: &str) -> bool {
    fn go(p: &[u8], v: &[u8]) -> bool {
        match (p.first(), v.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], v) || (!v.is_empty() && go(p, &v[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &v[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &v[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), value.as_bytes())
}

fn strings(v: Option<&serde_json::Value>) -> Vec<String> {
    match v {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether policy documents allow `action` on `resource` (Allow without a matching Deny;
/// conditions are not evaluated).
pub fn policies_allow(documents: &[serde_json::Value], action: &str, resource: &str) -> bool {
    let mut allowed = false;
    for doc in documents {
        let statements = match doc.get("Statement") {
            Some(serde_json::Value::Array(a)) => a.clone(),
            Some(s @ serde_json::Value::Object(_)) => vec![s.clone()],
            _ => Vec::new(),
        };
        for st in statements {
            let acts = strings(st.get("Action"));
            let res = strings(st.get("Resource"));
            let matches = acts
                .iter()
                .any(|a| wildcard(&a.to_ascii_lowercase(), &action.to_ascii_lowercase()))
                && res.iter().any(|r| wildcard(r, resource));
            if matches {
                match st.get("Effect").and_then(|e| e.as_str()) {
                    Some("Deny") => return false,
                    Some("Allow") => allowed = true,
                    _ => {}
                }
            }
        }
    }
    allowed
}

async fn rules_of(aws: &Aws, ids: &[String]) -> Result<BTreeMap<String, Vec<Rule>>, AwsError> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let ec2c = &aws.ec2;
    let out = call("ec2:DescribeSecurityGroups", ids.join(","), || {
        ec2c.describe_security_groups()
            .set_group_ids(Some(ids.to_vec()))
            .send()
    })
    .await?;
    Ok(out
        .security_groups()
        .iter()
        .map(|g| {
            (
                g.group_id().unwrap_or_default().to_string(),
                g.ip_permissions()
                    .iter()
                    .map(|p| Rule {
                        from: p.from_port().unwrap_or(-1),
                        to: p.to_port().unwrap_or(-1),
                        cidrs: p
                            .ip_ranges()
                            .iter()
                            .filter_map(|r| r.cidr_ip().map(str::to_string))
                            .chain(
                                p.ipv6_ranges()
                                    .iter()
                                    .filter_map(|r| r.cidr_ipv6().map(str::to_string)),
                            )
                            .collect(),
                        groups: p
                            .user_id_group_pairs()
                            .iter()
                            .filter_map(|u| u.group_id().map(str::to_string))
                            .collect(),
                    })
                    .collect(),
            )
        })
        .collect())
}

/// Public = its route table sends 0.0.0.0/0 to an internet gateway.
async fn subnet_is_public(aws: &Aws, subnet: &str, vpc: &str) -> Result<bool, AwsError> {
    let ec2c = &aws.ec2;
    let out = call("ec2:DescribeRouteTables", subnet, || {
        ec2c.describe_route_tables()
            .filters(
                Filter::builder()
                    .name("association.subnet-id")
                    .values(subnet)
                    .build(),
            )
            .send()
    })
    .await?;
    let mut tables = out.route_tables().to_vec();
    if tables.is_empty() {
        let main = call("ec2:DescribeRouteTables", vpc, || {
            ec2c.describe_route_tables()
                .filters(Filter::builder().name("vpc-id").values(vpc).build())
                .filters(
                    Filter::builder()
                        .name("association.main")
                        .values("true")
                        .build(),
                )
                .send()
        })
        .await?;
        tables = main.route_tables().to_vec();
    }
    Ok(tables.iter().flat_map(|t| t.routes()).any(|r| {
        r.destination_cidr_block() == Some("0.0.0.0/0")
            && r.gateway_id().is_some_and(|g| g.starts_with("igw-"))
    }))
}

pub async fn run(
    aws: &Aws,
    group_name: &str,
    db_instance: Option<&str>,
    secret: Option<&str>,
) -> Result<Vec<Finding>, AuditError> {
    let mut f = Vec::new();
    let mut add = |check, severity, passed, detail: String| {
        f.push(Finding {
            check,
            severity,
            passed,
            detail,
        })
    };
    let g = autoscaling::describe(&aws.autoscaling, group_name)
        .await?
        .ok_or_else(|| AuditError::GroupNotFound(group_name.to_string()))?;
    let subnets: Vec<ec2::SubnetInfo> = {
        let mut v = Vec::new();
        for s in &g.subnets {
            v.extend(ec2::subnet(&aws.ec2, s).await?);
        }
        v
    };
    let vpc = subnets
        .first()
        .map(|s| s.vpc_id.clone())
        .unwrap_or_default();

    // 1. Instances in private subnets, without public addresses.
    let mut public = Vec::new();
    for s in &subnets {
        if subnet_is_public(aws, &s.id, &s.vpc_id).await? {
            public.push(s.id.clone());
        }
    }
    let ids: Vec<String> = g.instances.iter().map(|i| i.id.clone()).collect();
    let mut with_public_ip = Vec::new();
    for id in &ids {
        if let Some(i) = ec2::describe_instance(&aws.ec2, id).await? {
            if i.public_ip.is_some() {
                with_public_ip.push(id.clone());
            }
        }
    }
    add(
        "instances in private subnets",
        Severity::High,
        public.is_empty() && with_public_ip.is_empty(),
        match (public.is_empty(), with_public_ip.is_empty()) {
            (true, true) => format!(
                "{} subnet(s), none routed to an internet gateway; no instance has a public IP",
                subnets.len()
            ),
            _ => format!(
                "public subnets in the group: {}; instances with a public IP: {}",
                if public.is_empty() {
                    "none".into()
                } else {
                    public.join(", ")
                },
                if with_public_ip.is_empty() {
                    "none".into()
                } else {
                    with_public_ip.join(", ")
                }
            ),
        },
    );

    // The launch template version the group uses.
    let template = match &g.launch_template {
        Some(l) => match (&l.id, &l.name) {
            (Some(id), _) => Some(id.clone()),
            (None, Some(name)) => lt::id_for_name(&aws.ec2, name).await?,
            _ => None,
        },
        None => None,
    };
    let version = match &template {
        Some(id) => {
            lt::describe(
                &aws.ec2,
                id,
                g.launch_template
                    .as_ref()
                    .and_then(|l| l.version.as_deref())
                    .unwrap_or("$Default"),
            )
            .await?
        }
        None => None,
    };
    let data = version.as_ref().and_then(|v| v.data.clone());
    let mut app_groups: Vec<String> = data
        .as_ref()
        .map(|d| d.security_group_ids().to_vec())
        .unwrap_or_default();
    if let Some(d) = &data {
        app_groups.extend(
            d.network_interfaces()
                .iter()
                .flat_map(|n| n.groups().iter().cloned()),
        );
    }

    // 2. The load balancer in public subnets; 3. the app port only from its group.
    let elb = &aws.elb;
    let tgs = if g.target_group_arns.is_empty() {
        None
    } else {
        Some(
            call(
                "elasticloadbalancing:DescribeTargetGroups",
                group_name,
                || {
                    elb.describe_target_groups()
                        .set_target_group_arns(Some(g.target_group_arns.clone()))
                        .send()
                },
            )
            .await?,
        )
    };
    let lb_arns: BTreeSet<String> = tgs
        .iter()
        .flat_map(|o| o.target_groups())
        .flat_map(|t| t.load_balancer_arns().iter().cloned())
        .collect();
    let app_port = tgs
        .iter()
        .flat_map(|o| o.target_groups())
        .find_map(|t| t.port())
        .unwrap_or(80);
    let mut lb_groups = BTreeSet::new();
    if lb_arns.is_empty() {
        add(
            "load balancer in public subnets",
            Severity::Info,
            true,
            "the group is behind no load balancer".into(),
        );
    } else {
        let lbs = call(
            "elasticloadbalancing:DescribeLoadBalancers",
            group_name,
            || {
                elb.describe_load_balancers()
                    .set_load_balancer_arns(Some(lb_arns.iter().cloned().collect()))
                    .send()
            },
        )
        .await?;
        let mut private = Vec::new();
        for lb in lbs.load_balancers() {
            lb_groups.extend(lb.security_groups().iter().cloned());
            let internet = lb.scheme().map(|s| s.as_str()) == Some("internet-facing");
            for az in lb.availability_zones() {
                if let Some(s) = az.subnet_id() {
                    if internet && !subnet_is_public(aws, s, lb.vpc_id().unwrap_or(&vpc)).await? {
                        private.push(format!(
                            "{} in {s}",
                            lb.load_balancer_name().unwrap_or_default()
                        ));
                    }
                }
            }
        }
        add(
            "load balancer in public subnets",
            Severity::Medium,
            private.is_empty(),
            if private.is_empty() {
                format!(
                    "{} internet-facing load balancer(s), all in public subnets",
                    lbs.load_balancers().len()
                )
            } else {
                format!(
                    "internet-facing but in a private subnet: {}",
                    private.join(", ")
                )
            },
        );
    }
    let app_rules = rules_of(aws, &app_groups).await?;
    let all_rules: Vec<Rule> = app_rules.values().flatten().cloned().collect();
    match only_from_groups(&all_rules, app_port, &lb_groups) {
        Ok(()) => add(
            "app port only from the load balancer",
            Severity::High,
            true,
            format!(
                "port {app_port} of {} admits only {}",
                app_groups.join(", "),
                lb_groups.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        ),
        Err(why) => add(
            "app port only from the load balancer",
            Severity::High,
            false,
            why,
        ),
    }

    // 4. The database: only from the instances' groups, not publicly accessible.
    let rds = &aws.rds;
    let dbs = call(
        "rds:DescribeDBInstances",
        db_instance.unwrap_or("all"),
        || {
            rds.describe_db_instances()
                .set_db_instance_identifier(db_instance.map(str::to_string))
                .into_paginator()
                .items()
                .send()
                .collect::<Result<Vec<_>, _>>()
        },
    )
    .await?;
    let app_set: BTreeSet<String> = app_groups.iter().cloned().collect();
    let mut checked_db = false;
    for db in &dbs {
        let in_vpc = db.db_subnet_group().and_then(|s| s.vpc_id()) == Some(vpc.as_str());
        if db_instance.is_none() && !in_vpc {
            continue;
        }
        checked_db = true;
        let name = db.db_instance_identifier().unwrap_or_default();
        add(
            "database not publicly accessible",
            Severity::High,
            !db.publicly_accessible().unwrap_or(false),
            format!(
                "{name}: PubliclyAccessible = {}",
                db.publicly_accessible().unwrap_or(false)
            ),
        );
        let port = db
            .endpoint()
            .and_then(|e| e.port())
            .or(db.db_instance_port())
            .unwrap_or(5432);
        let sgs: Vec<String> = db
            .vpc_security_groups()
            .iter()
            .filter_map(|s| s.vpc_security_group_id().map(str::to_string))
            .collect();
        let rules: Vec<Rule> = rules_of(aws, &sgs).await?.into_values().flatten().collect();
        match only_from_groups(&rules, port, &app_set) {
            Ok(()) => add(
                "database only from the instances",
                Severity::High,
                true,
                format!("{name}: port {port} admits only the instances' group"),
            ),
            Err(why) => add(
                "database only from the instances",
                Severity::High,
                false,
                format!("{name}: {why}"),
            ),
        }
    }
    if !checked_db {
        add(
            "database only from the instances",
            Severity::Info,
            true,
            "no RDS instance in the group's VPC".into(),
        );
    }

    // 5. IMDSv2 required.
    let imds = version.as_ref().map(|v| v.imdsv2_required).unwrap_or(false);
    add(
        "IMDSv2 required",
        Severity::High,
        imds,
        match &version {
            Some(v) => format!(
                "launch template {} version {}: HttpTokens {}",
                v.template_id,
                v.number,
                if imds { "required" } else { "optional" }
            ),
            None => "the group has no launch template to check".into(),
        },
    );

    // 6. EBS volumes encrypted (the instances' actual volumes).
    let ec2c = &aws.ec2;
    let mut unencrypted = Vec::new();
    if !ids.is_empty() {
        let vols = call("ec2:DescribeVolumes", group_name, || {
            ec2c.describe_volumes()
                .filters(
                    Filter::builder()
                        .name("attachment.instance-id")
                        .set_values(Some(ids.clone()))
                        .build(),
                )
                .send()
        })
        .await?;
        for v in vols.volumes() {
            if !v.encrypted().unwrap_or(false) {
                unencrypted.push(v.volume_id().unwrap_or_default().to_string());
            }
        }
    }
    let template_encrypts = data.as_ref().is_some_and(|d| {
        !d.block_device_mappings().is_empty()
            && d.block_device_mappings()
                .iter()
                .all(|b| b.ebs().and_then(|e| e.encrypted()).unwrap_or(false))
    });
    add(
        "EBS volumes encrypted",
        Severity::Medium,
        template_encrypts || (!ids.is_empty() && unencrypted.is_empty()),
        if template_encrypts {
            "the launch template encrypts every volume".into()
        } else if !unencrypted.is_empty() {
            format!(
                "unencrypted volumes: {} (and the launch template does not ask for encryption)",
                unencrypted.join(", ")
            )
        } else if ids.is_empty() {
            "no instances, and the launch template does not ask for encryption".into()
        } else {
            format!("every volume of the {} instance(s) is encrypted", ids.len())
        },
    );

    // 7. The instance role can read the secret.
    match (secret, data.as_ref().and_then(|d| d.iam_instance_profile())) {
        (None, _) => add(
            "instance role reads the secret",
            Severity::Info,
            true,
            "not checked: pass --secret NAME_OR_ARN".into(),
        ),
        (Some(s), None) => add(
            "instance role reads the secret",
            Severity::High,
            false,
            format!("the launch template has no instance profile, so instances cannot read {s}"),
        ),
        (Some(s), Some(profile)) => {
            let name = profile
                .name()
                .map(str::to_string)
                .or_else(|| {
                    profile
                        .arn()
                        .and_then(|a| a.rsplit('/').next())
                        .map(str::to_string)
                })
                .unwrap_or_default();
            let arn = secret_arn(aws, s).await.unwrap_or_else(|| s.to_string());
            let docs = role_policies(aws, &name).await?;
            let ok = policies_allow(&docs, "secretsmanager:GetSecretValue", &arn);
            add(
                "instance role reads the secret",
                Severity::High,
                ok,
                if ok {
                    format!("instance profile {name} allows secretsmanager:GetSecretValue on {arn}")
                } else {
                    format!("instance profile {name} has no policy allowing secretsmanager:GetSecretValue on {arn}")
                },
            );
        }
    }
    Ok(f)
}

async fn secret_arn(aws: &Aws, id: &str) -> Option<String> {
    let sm = &aws.secrets;
    call("secretsmanager:DescribeSecret", id, || {
        sm.describe_secret().secret_id(id).send()
    })
    .await
    .ok()
    .and_then(|o| o.arn().map(str::to_string))
}

/// Every policy document of the roles in an instance profile (inline and attached).
async fn role_policies(aws: &Aws, profile: &str) -> Result<Vec<serde_json::Value>, AwsError> {
    let iam = &aws.iam;
    let p = call("iam:GetInstanceProfile", profile, || {
        iam.get_instance_profile()
            .instance_profile_name(profile)
            .send()
    })
    .await?;
    let mut docs = Vec::new();
    let decode = |d: &str| -> Option<serde_json::Value> {
        let text = percent_decode(d);
        serde_json::from_str(&text).ok()
    };
    for role in p.instance_profile().map(|i| i.roles()).unwrap_or_default() {
        let role_name = role.role_name();
        let inline = call("iam:ListRolePolicies", role_name, || {
            iam.list_role_policies().role_name(role_name).send()
        })
        .await?;
        for pn in inline.policy_names() {
            let doc = call("iam:GetRolePolicy", pn, || {
                iam.get_role_policy()
                    .role_name(role_name)
                    .policy_name(pn)
                    .send()
            })
            .await?;
            docs.extend(decode(doc.policy_document()));
        }
        let attached = call("iam:ListAttachedRolePolicies", role_name, || {
            iam.list_attached_role_policies()
                .role_name(role_name)
                .send()
        })
        .await?;
        for ap in attached.attached_policies() {
            let Some(arn) = ap.policy_arn() else { continue };
            let pol = call("iam:GetPolicy", arn, || {
                iam.get_policy().policy_arn(arn).send()
            })
            .await?;
            let Some(v) = pol.policy().and_then(|p| p.default_version_id()) else {
                continue;
            };
            let ver = call("iam:GetPolicyVersion", arn, || {
                iam.get_policy_version()
                    .policy_arn(arn)
                    .version_id(v)
                    .send()
            })
            .await?;
            if let Some(d) = ver.policy_version().and_then(|p| p.document()) {
                docs.extend(decode(d));
            }
        }
    }
    Ok(docs)
}

/// IAM returns policy documents URL-encoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn render(findings: &[Finding]) -> String {
    let mut rows = vec![["CHECK", "SEVERITY", "RESULT", "DETAIL"]
        .map(String::from)
        .to_vec()];
    rows.extend(findings.iter().map(|f| {
        vec![
            f.check.to_string(),
            format!("{:?}", f.severity).to_lowercase(),
            if f.passed {
                "pass".into()
            } else {
                "FAIL".into()
            },
            f.detail.clone(),
        ]
    }));
    crate::output::table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(port: i32, cidrs: &[&str], groups: &[&str]) -> Rule {
        Rule {
            from: port,
            to: port,
            cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_port_must_be_open_to_the_allowed_group_and_nothing_else() {
        let allowed = BTreeSet::from(["sg-alb".to_string()]);
        assert!(only_from_groups(&[rule(8080, &[], &["sg-alb"])], 8080, &allowed).is_ok());
        let err = only_from_groups(
            &[
                rule(8080, &[], &["sg-alb"]),
                rule(8080, &["0.0.0.0/0"], &[]),
            ],
            8080,
            &allowed,
        )
        .unwrap_err();
        assert!(err.contains("open to 0.0.0.0/0"));
        assert!(
            only_from_groups(&[rule(22, &["0.0.0.0/0"], &[])], 8080, &allowed)
                .unwrap_err()
                .contains("not open to sg-alb at all")
        );
        let all_ports = Rule {
            from: -1,
            to: -1,
            cidrs: vec!["10.0.0.0/8".into()],
            groups: vec![],
        };
        assert!(
            only_from_groups(&[rule(8080, &[], &["sg-alb"]), all_ports], 8080, &allowed).is_err()
        );
    }

    #[test]
    fn policies_are_matched_with_wildcards_and_denies_win() {
        let arn = "arn:aws:secretsmanager:us-east-1:123:secret:world/db-AbC";
        let allow = serde_json::json!({"Statement": [{"Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"], "Resource": "arn:aws:secretsmanager:*:*:secret:world/db-*"}]});
        let star = serde_json::json!({"Statement": {"Effect": "Allow", "Action": "secretsmanager:*", "Resource": "*"}});
        let deny = serde_json::json!({"Statement": [{"Effect": "Deny", "Action": "secretsmanager:Get*", "Resource": "*"}]});
        let other = serde_json::json!({"Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]});
        assert!(policies_allow(
            std::slice::from_ref(&allow),
            "secretsmanager:GetSecretValue",
            arn
        ));
        assert!(policies_allow(
            std::slice::from_ref(&star),
            "secretsmanager:GetSecretValue",
            arn
        ));
        assert!(!policies_allow(
            &[star, deny],
            "secretsmanager:GetSecretValue",
            arn
        ));
        assert!(!policies_allow(
            &[other],
            "secretsmanager:GetSecretValue",
            arn
        ));
        assert!(!policies_allow(
            &[allow],
            "secretsmanager:GetSecretValue",
            "arn:aws:secretsmanager:us-east-1:123:secret:prod/db-x"
        ));
    }

    #[test]
    fn percent_decoding_of_policy_documents() {
        assert_eq!(percent_decode("%7B%22a%22%3A1%7D"), "{\"a\":1}");
    }
}
