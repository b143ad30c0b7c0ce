//! `bakery audit --asg NAME`: checks the classic web architecture around a group and prints a
//! table of findings with severity: instances in private subnets, the load balancer in public
//! ones, the app port open only to the load balancer's group, the database open only to the
//! instances' group and not public, IMDSv2 required, EBS encrypted, and the instance role able
//! to read the secret it needs. Any high finding fails the command (exit 8), for pipelines.
//!
//! This module gathers [`Facts`] from AWS; the checks themselves are pure functions in
//! `bakery_core::audit`, unit-tested check by check.

use std::collections::BTreeSet;

use aws_sdk_ec2::types::Filter;

use crate::aws::{autoscaling, call, ec2, launch_template as lt, Aws, AwsError};
pub use bakery_core::audit::{
    evaluate, policies_allow, wildcard, DatabaseFact, Facts, Finding, LoadBalancerFact, Nacl,
    NaclEntry, Rule, SecretFact, Severity, SubnetFact, TemplateFact,
};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("Auto Scaling group {0:?} not found in this region")]
    GroupNotFound(String),
    #[error(transparent)]
    Aws(#[from] AwsError),
}

/// Reads the facts and evaluates every check.
pub async fn run(
    aws: &Aws,
    group_name: &str,
    db_instance: Option<&str>,
    secret: Option<&str>,
) -> Result<Vec<Finding>, AuditError> {
    Ok(evaluate(
        &gather(aws, group_name, db_instance, secret).await?,
    ))
}

/// What the checks need to know, read from AWS.
pub async fn gather(
    aws: &Aws,
    group_name: &str,
    db_instance: Option<&str>,
    secret: Option<&str>,
) -> Result<Facts, AuditError> {
    let g = autoscaling::describe(&aws.autoscaling, group_name)
        .await?
        .ok_or_else(|| AuditError::GroupNotFound(group_name.to_string()))?;
    let mut vpc = String::new();
    let mut subnets = Vec::new();
    for s in &g.subnets {
        if let Some(info) = ec2::subnet(&aws.ec2, s).await? {
            subnets.push(subnet_fact(aws, &info.id, &info.vpc_id).await?);
            if vpc.is_empty() {
                vpc = info.vpc_id;
            }
        }
    }
    let instances: Vec<String> = g.instances.iter().map(|i| i.id.clone()).collect();
    let mut instances_with_public_ip = Vec::new();
    for id in &instances {
        if let Some(i) = ec2::describe_instance(&aws.ec2, id).await? {
            if i.public_ip.is_some() {
                instances_with_public_ip.push(id.clone());
            }
        }
    }
    let template = template_fact(aws, &g).await?;
    let app_groups = template
        .as_ref()
        .map(|t| t.security_groups.clone())
        .unwrap_or_default();
    let (load_balancers, app_port) = load_balancers(aws, &g, &vpc).await?;
    let secret = match secret {
        None => None,
        Some(s) => Some(secret_fact(aws, s, template.as_ref()).await?),
    };
    Ok(Facts {
        group: g.name.clone(),
        subnets,
        instances_with_public_ip,
        app_rules: rules_of(aws, &app_groups).await?,
        databases: databases(aws, db_instance, &vpc).await?,
        unencrypted_volumes: unencrypted_volumes(aws, group_name, &instances).await?,
        instances,
        template,
        load_balancers,
        app_port,
        secret,
    })
}

/// The launch-template version the group launches, if it uses one.
async fn template_fact(
    aws: &Aws,
    g: &autoscaling::Group,
) -> Result<Option<TemplateFact>, AwsError> {
    let Some(l) = &g.launch_template else {
        return Ok(None);
    };
    let id = match (&l.id, &l.name) {
        (Some(id), _) => Some(id.clone()),
        (None, Some(name)) => lt::id_for_name(&aws.ec2, name).await?,
        _ => None,
    };
    let Some(id) = id else { return Ok(None) };
    let Some(v) = lt::describe(&aws.ec2, &id, l.version.as_deref().unwrap_or("$Default")).await?
    else {
        return Ok(None);
    };
    let data = v.data.as_ref();
    let mut security_groups: Vec<String> = data
        .map(|d| d.security_group_ids().to_vec())
        .unwrap_or_default();
    if let Some(d) = data {
        security_groups.extend(
            d.network_interfaces()
                .iter()
                .flat_map(|n| n.groups().iter().cloned()),
        );
    }
    Ok(Some(TemplateFact {
        id: v.template_id.clone(),
        version: v.number,
        imdsv2_required: v.imdsv2_required,
        security_groups,
        encrypts_all_volumes: data.is_some_and(|d| {
            !d.block_device_mappings().is_empty()
                && d.block_device_mappings()
                    .iter()
                    .all(|b| b.ebs().and_then(|e| e.encrypted()).unwrap_or(false))
        }),
        instance_profile: data.and_then(|d| d.iam_instance_profile()).and_then(|p| {
            p.name().map(str::to_string).or_else(|| {
                p.arn()
                    .and_then(|a| a.rsplit('/').next())
                    .map(str::to_string)
            })
        }),
    }))
}

/// The group's load balancers (`None`: behind none) and the app's port (the first target
/// group's, else 80).
async fn load_balancers(
    aws: &Aws,
    g: &autoscaling::Group,
    vpc: &str,
) -> Result<(Option<Vec<LoadBalancerFact>>, i32), AwsError> {
    if g.target_group_arns.is_empty() {
        return Ok((None, 80));
    }
    let elb = &aws.elb;
    let tgs = call("elasticloadbalancing:DescribeTargetGroups", &g.name, || {
        elb.describe_target_groups()
            .set_target_group_arns(Some(g.target_group_arns.clone()))
            .send()
    })
    .await?;
    let lb_arns: BTreeSet<String> = tgs
        .target_groups()
        .iter()
        .flat_map(|t| t.load_balancer_arns().iter().cloned())
        .collect();
    let app_port = tgs
        .target_groups()
        .iter()
        .find_map(|t| t.port())
        .unwrap_or(80);
    if lb_arns.is_empty() {
        return Ok((None, app_port));
    }
    let lbs = call(
        "elasticloadbalancing:DescribeLoadBalancers",
        &g.name,
        || {
            elb.describe_load_balancers()
                .set_load_balancer_arns(Some(lb_arns.iter().cloned().collect()))
                .send()
        },
    )
    .await?;
    let mut out = Vec::new();
    for lb in lbs.load_balancers() {
        let mut subnets = Vec::new();
        for s in lb
            .availability_zones()
            .iter()
            .filter_map(|az| az.subnet_id())
        {
            subnets.push(subnet_fact(aws, s, lb.vpc_id().unwrap_or(vpc)).await?);
        }
        out.push(LoadBalancerFact {
            name: lb.load_balancer_name().unwrap_or_default().to_string(),
            internet_facing: lb.scheme().map(|s| s.as_str()) == Some("internet-facing"),
            subnets,
            security_groups: lb.security_groups().to_vec(),
        });
    }
    Ok((Some(out), app_port))
}

/// The database named, or every one in the group's VPC.
async fn databases(
    aws: &Aws,
    db_instance: Option<&str>,
    vpc: &str,
) -> Result<Vec<DatabaseFact>, AwsError> {
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
    let mut out = Vec::new();
    for db in &dbs {
        let in_vpc = db.db_subnet_group().and_then(|s| s.vpc_id()) == Some(vpc);
        if db_instance.is_none() && !in_vpc {
            continue;
        }
        let sgs: Vec<String> = db
            .vpc_security_groups()
            .iter()
            .filter_map(|s| s.vpc_security_group_id().map(str::to_string))
            .collect();
        out.push(DatabaseFact {
            name: db.db_instance_identifier().unwrap_or_default().to_string(),
            publicly_accessible: db.publicly_accessible().unwrap_or(false),
            port: db
                .endpoint()
                .and_then(|e| e.port())
                .or(db.db_instance_port())
                .unwrap_or(5432),
            rules: rules_of(aws, &sgs).await?,
        });
    }
    Ok(out)
}

/// The instances' volumes that are not encrypted.
async fn unencrypted_volumes(
    aws: &Aws,
    group_name: &str,
    ids: &[String],
) -> Result<Vec<String>, AwsError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let ec2c = &aws.ec2;
    let vols = call("ec2:DescribeVolumes", group_name, || {
        ec2c.describe_volumes()
            .filters(
                Filter::builder()
                    .name("attachment.instance-id")
                    .set_values(Some(ids.to_vec()))
                    .build(),
            )
            .send()
    })
    .await?;
    Ok(vols
        .volumes()
        .iter()
        .filter(|v| !v.encrypted().unwrap_or(false))
        .map(|v| v.volume_id().unwrap_or_default().to_string())
        .collect())
}

async fn secret_fact(
    aws: &Aws,
    secret: &str,
    template: Option<&TemplateFact>,
) -> Result<SecretFact, AwsError> {
    let arn = secret_arn(aws, secret)
        .await
        .unwrap_or_else(|| secret.to_string());
    let profile = template.and_then(|t| t.instance_profile.clone());
    let policies = match &profile {
        Some(p) => role_policies(aws, p).await?,
        None => Vec::new(),
    };
    Ok(SecretFact {
        arn,
        profile,
        policies,
    })
}

/// The ingress rules of security groups, flattened.
async fn rules_of(aws: &Aws, ids: &[String]) -> Result<Vec<Rule>, AwsError> {
    if ids.is_empty() {
        return Ok(Vec::new());
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
        .flat_map(|g| {
            let group = g.group_id().unwrap_or_default().to_string();
            g.ip_permissions().iter().map(move |p| Rule {
                group: group.clone(),
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
        })
        .collect())
}

/// The network ACL associated with a subnet (every subnet has exactly one).
async fn nacl_of(aws: &Aws, subnet: &str) -> Result<Option<Nacl>, AwsError> {
    let ec2c = &aws.ec2;
    let out = call("ec2:DescribeNetworkAcls", subnet, || {
        ec2c.describe_network_acls()
            .filters(
                Filter::builder()
                    .name("association.subnet-id")
                    .values(subnet)
                    .build(),
            )
            .send()
    })
    .await?;
    Ok(out.network_acls().first().map(|a| Nacl {
        id: a.network_acl_id().unwrap_or_default().to_string(),
        entries: a
            .entries()
            .iter()
            .map(|e| NaclEntry {
                rule: e.rule_number().unwrap_or_default(),
                egress: e.egress().unwrap_or(false),
                protocol: e.protocol().unwrap_or("-1").to_string(),
                allow: e.rule_action().map(|a| a.as_str()) == Some("allow"),
                cidr: e
                    .cidr_block()
                    .or(e.ipv6_cidr_block())
                    .unwrap_or_default()
                    .to_string(),
                ports: e.port_range().and_then(|p| Some((p.from()?, p.to()?))),
            })
            .collect(),
    }))
}

/// Public = its route table (its own, else the VPC's main one) sends 0.0.0.0/0 to an internet
/// gateway.
async fn subnet_fact(aws: &Aws, subnet: &str, vpc: &str) -> Result<SubnetFact, AwsError> {
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
    let public = tables.iter().flat_map(|t| t.routes()).any(|r| {
        r.destination_cidr_block() == Some("0.0.0.0/0")
            && r.gateway_id().is_some_and(|g| g.starts_with("igw-"))
    });
    Ok(SubnetFact {
        id: subnet.to_string(),
        public,
        route_table: tables
            .first()
            .and_then(|t| t.route_table_id())
            .map(str::to_string),
        cidr: ec2::subnet(ec2c, subnet)
            .await?
            .map(|s| s.cidr)
            .unwrap_or_default(),
        nacl: nacl_of(aws, subnet).await?,
    })
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
    // IAM returns policy documents URL-encoded.
    let decode = |d: &str| -> Option<serde_json::Value> {
        let text = percent_encoding::percent_decode_str(d).decode_utf8_lossy();
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
            match &f.fix {
                Some(fix) => format!("{}; fix: {fix}", f.detail),
                None => f.detail.clone(),
            },
        ]
    }));
    crate::output::table(&rows)
}
