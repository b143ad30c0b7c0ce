//! `bakery audit` against the world's reference stack: it passes as built, and each deliberately
//! broken rule is reported as a high finding with exit code 8.

// Tests unwrap: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

fn audit(world: &World, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let out = world
        .bakery()
        .args(["--output", "json", "audit"])
        .args(args)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), report)
}

fn finding<'a>(report: &'a serde_json::Value, check: &str) -> &'a serde_json::Value {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check:?} in {report}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reference_stack_passes() {
    let world = World::get();
    let (code, report) = audit(
        &world,
        &[
            "--asg",
            world.var("WORLD_ASG"),
            "--db-instance",
            world.var("WORLD_DB_INSTANCE"),
            "--secret",
            world.var("WORLD_DB_SECRET"),
        ],
    );
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["high_findings"], 0);
    for check in [
        "instances in private subnets",
        "load balancer in public subnets",
        "app port only from the load balancer",
        "database not publicly accessible",
        "database only from the instances",
        "IMDSv2 required",
        "EBS volumes encrypted",
        "instance role reads the secret",
        "network ACLs admit the app's traffic",
    ] {
        assert_eq!(
            finding(&report, check)["passed"],
            true,
            "{check}: {report:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_broken_rule_is_a_high_finding() {
    let world = World::get();
    let fleet = Fleet::create(&world, "audit", 0).await;
    let asg = world.asg();
    let ec2 = world.ec2();

    // IMDSv2 optional in the version the group uses.
    ec2.create_launch_template_version()
        .launch_template_id(&fleet.lt_id)
        .source_version("1")
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(world.var("WORLD_STACK_AMI"))
                .security_group_ids(world.var("WORLD_APP_SG"))
                .metadata_options(
                    aws_sdk_ec2::types::LaunchTemplateInstanceMetadataOptionsRequest::builder()
                        .http_tokens(aws_sdk_ec2::types::LaunchTemplateHttpTokensState::Optional)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    // And the group in a public subnet.
    let public = world
        .var("WORLD_PUBLIC_SUBNETS")
        .split(',')
        .next()
        .unwrap()
        .to_string();
    asg.update_auto_scaling_group()
        .auto_scaling_group_name(&fleet.asg)
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .launch_template_id(&fleet.lt_id)
                .version("2")
                .build(),
        )
        .vpc_zone_identifier(&public)
        .send()
        .await
        .unwrap();
    let (code, report) = audit(
        &world,
        &[
            "--asg",
            &fleet.asg,
            "--db-instance",
            world.var("WORLD_DB_INSTANCE"),
        ],
    );
    assert_eq!(code, Some(8), "{report:#}");
    let imds = finding(&report, "IMDSv2 required");
    assert_eq!(
        (imds["passed"].as_bool(), imds["severity"].as_str()),
        (Some(false), Some("high")),
        "{imds}"
    );
    assert!(imds["detail"]
        .as_str()
        .unwrap()
        .contains("HttpTokens optional"));
    let subnets = finding(&report, "instances in private subnets");
    assert_eq!(subnets["passed"], false);
    assert!(
        subnets["detail"].as_str().unwrap().contains(&public),
        "{subnets}"
    );

    // A database whose group is open to the world.
    let open_sg = ec2
        .create_security_group()
        .group_name(format!("{}-open-db", fleet.name))
        .description("audit test: open database")
        .vpc_id(world.var("WORLD_VPC_ID"))
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_string();
    ec2.authorize_security_group_ingress()
        .group_id(&open_sg)
        .ip_permissions(
            aws_sdk_ec2::types::IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(5432)
                .to_port(5432)
                .ip_ranges(
                    aws_sdk_ec2::types::IpRange::builder()
                        .cidr_ip("0.0.0.0/0")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let config = world.sdk_config();
    let rds = aws_sdk_rds::Client::new(&config);
    let db = format!("{}-db", fleet.name);
    rds.create_db_instance()
        .db_instance_identifier(&db)
        .db_instance_class("db.t3.micro")
        .engine("postgres")
        .master_username("app")
        .master_user_password("not-a-real-password")
        .allocated_storage(20)
        .db_subnet_group_name("world-db")
        .vpc_security_group_ids(&open_sg)
        .publicly_accessible(true)
        .send()
        .await
        .unwrap();
    let (code, report) = audit(
        &world,
        &["--asg", world.var("WORLD_ASG"), "--db-instance", &db],
    );
    let _ = rds
        .delete_db_instance()
        .db_instance_identifier(&db)
        .skip_final_snapshot(true)
        .send()
        .await;
    let _ = ec2.delete_security_group().group_id(&open_sg).send().await;
    assert_eq!(code, Some(8), "{report:#}");
    let only = finding(&report, "database only from the instances");
    assert_eq!(only["passed"], false);
    assert!(
        only["detail"]
            .as_str()
            .unwrap()
            .contains("admits 0.0.0.0/0"),
        "{only}"
    );
    assert_eq!(
        finding(&report, "database not publicly accessible")["passed"],
        false
    );
    fleet.delete(&world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_network_acl_that_blocks_the_app_port_is_a_high_finding() {
    // Issue #10 C: the group's subnets must admit the app port from the load balancer's
    // subnets, and return traffic on ephemeral ports.
    let world = World::get();
    let fleet = Fleet::create(&world, "nacl", 0).await;
    let ec2 = world.ec2();
    let vpc = world.var("WORLD_VPC_ID");
    let base = world
        .var("WORLD_VPC_CIDR")
        .split('.')
        .take(2)
        .collect::<Vec<_>>()
        .join(".");
    let third = 100 + (std::process::id() % 100);
    let subnet = ec2
        .create_subnet()
        .vpc_id(vpc)
        .cidr_block(format!("{base}.{third}.0/24"))
        .send()
        .await
        .unwrap()
        .subnet()
        .unwrap()
        .subnet_id()
        .unwrap()
        .to_string();
    let acl = ec2
        .create_network_acl()
        .vpc_id(vpc)
        .send()
        .await
        .unwrap()
        .network_acl()
        .unwrap()
        .network_acl_id()
        .unwrap()
        .to_string();
    let rule = |n: i32, egress: bool, allow: bool, ports: Option<(i32, i32)>| {
        let ec2 = ec2.clone();
        let acl = acl.clone();
        async move {
            let mut r = ec2
                .create_network_acl_entry()
                .network_acl_id(&acl)
                .rule_number(n)
                .egress(egress)
                .protocol(if ports.is_some() { "6" } else { "-1" })
                .rule_action(if allow {
                    aws_sdk_ec2::types::RuleAction::Allow
                } else {
                    aws_sdk_ec2::types::RuleAction::Deny
                })
                .cidr_block("0.0.0.0/0");
            if let Some((from, to)) = ports {
                r = r.port_range(
                    aws_sdk_ec2::types::PortRange::builder()
                        .from(from)
                        .to(to)
                        .build(),
                );
            }
            r.send().await.unwrap();
        }
    };
    rule(100, false, false, Some((1, 65535))).await;
    rule(200, false, true, None).await;
    rule(100, true, true, None).await;
    let assoc = ec2
        .describe_network_acls()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("association.subnet-id")
                .values(&subnet)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let association = assoc.network_acls()[0]
        .associations()
        .iter()
        .find(|a| a.subnet_id() == Some(subnet.as_str()))
        .and_then(|a| a.network_acl_association_id())
        .unwrap()
        .to_string();
    ec2.replace_network_acl_association()
        .association_id(association)
        .network_acl_id(&acl)
        .send()
        .await
        .unwrap();
    world
        .asg()
        .update_auto_scaling_group()
        .auto_scaling_group_name(&fleet.asg)
        .vpc_zone_identifier(&subnet)
        .send()
        .await
        .unwrap();

    let (code, report) = audit(&world, &["--asg", &fleet.asg]);
    fleet.delete(&world).await;
    let _ = ec2.delete_subnet().subnet_id(&subnet).send().await;
    let _ = ec2.delete_network_acl().network_acl_id(&acl).send().await;
    assert_eq!(code, Some(8), "{report:#}");
    let nacl = finding(&report, "network ACLs admit the app's traffic");
    assert_eq!(nacl["passed"], false, "{nacl}");
    assert_eq!(nacl["severity"], "high");
    let detail = nacl["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!(
            "subnet {subnet}: {acl} inbound rule 100 denies TCP"
        )),
        "{detail}"
    );
    assert!(nacl["fix"].as_str().unwrap().contains(&acl), "{nacl}");
}
