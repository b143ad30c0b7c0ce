//! What a release reads from AWS and the instances: clients per region and role, the plan's
//! groups and images, the gates' alarms, each new instance's HTTP answer. Reads only.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use aws_config::sts::AssumeRoleProvider;
use aws_config::Region;
use aws_sdk_sts::config::SharedCredentialsProvider;
use bakery_core::release::record::AlarmReading;
use bakery_core::release::{HttpGate, Plan, Selector, Source, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::aws::{autoscaling, ec2, launch_template as lt, Aws, AwsError};

/// Clients per (region, role): one connection per distinct pair in the plan.
pub type Clients = BTreeMap<(String, Option<String>), Aws>;

/// Connects to every region and role the plan names. A role is assumed at once
/// (GetCallerIdentity through it), so a role that cannot be assumed is found before any change;
/// the targets that could be reached are returned with the problems of the others.
pub async fn connect(home: &Aws, plan: &Plan) -> (Clients, Vec<String>) {
    let mut clients = Clients::new();
    let mut errors = Vec::new();
    for t in plan.waves.iter().flat_map(|w| &w.targets) {
        let key = (t.region.clone(), t.role_arn.clone());
        if clients.contains_key(&key) {
            continue;
        }
        match client_for(home, t).await {
            Ok(aws) => {
                clients.insert(key, aws);
            }
            Err(e) => errors.push(format!(
                "{}:{}:{}: {e}",
                plan.file.display(),
                t.at.line,
                t.at.column
            )),
        }
    }
    (clients, errors)
}

async fn client_for(home: &Aws, t: &Target) -> Result<Aws, String> {
    let mut config = home
        .config
        .to_builder()
        .region(Region::new(t.region.clone()))
        .build();
    if let Some(role) = &t.role_arn {
        let provider = AssumeRoleProvider::builder(role.clone())
            .session_name("bakery-release")
            .region(Region::new(t.region.clone()))
            .configure(&home.config)
            .build()
            .await;
        config = config
            .to_builder()
            .credentials_provider(SharedCredentialsProvider::new(provider))
            .build();
    }
    let aws = Aws::from_config(config)
        .map_err(|e| e.to_string())?
        .with_policy(home.policy.clone());
    if let Some(role) = &t.role_arn {
        // One attempt, not the retry policy's: a refused AssumeRole reaches the SDK as a
        // dispatch failure (it happens while loading credentials), which looks transient, and
        // asking ten times over half a minute does not change a trust policy.
        aws.sts.get_caller_identity().send().await.map_err(|e| {
            format!(
                "role {role} cannot be assumed ({}); check that it exists, that its trust \
                 policy lets this identity assume it, and that it may act in {}",
                denial(&aws_sdk_sts::error::DisplayErrorContext(&e).to_string()),
                t.region
            )
        })?;
    }
    Ok(aws)
}

/// The gist of a refused AssumeRole: AWS's own sentence ("User: … is not authorized to perform:
/// sts:AssumeRole on resource: …"), not the credential chain's nested debug output.
fn denial(m: &str) -> String {
    match m.find("User: ") {
        Some(i) => {
            let rest = &m[i..];
            let end = rest.find(['"', '\\']).unwrap_or(rest.len());
            format!("AccessDenied: {}", &rest[..end])
        }
        None => m.to_string(),
    }
}

/// The groups a target names, in its region: one by name, or every group carrying the tag.
pub async fn groups_of(aws: &Aws, t: &Target) -> Result<Vec<String>, String> {
    let fail = |e: AwsError| format!("reading groups in {}: {e}", t.region);
    match &t.selector {
        Selector::Group(name) => match autoscaling::describe(&aws.autoscaling, name)
            .await
            .map_err(fail)?
        {
            Some(g) => Ok(vec![g.name]),
            None => Err(format!(
                "Auto Scaling group {name} not found in {}{}",
                t.region,
                account_note(t)
            )),
        },
        Selector::Tag { key, value } => {
            let mut names: Vec<String> = autoscaling::all(&aws.autoscaling)
                .await
                .map_err(fail)?
                .into_iter()
                .filter(|g| g.tags.get(key) == Some(value))
                .map(|g| g.name)
                .collect();
            names.sort();
            if names.is_empty() {
                Err(format!(
                    "no Auto Scaling group in {} carries the tag {key}={value}{}",
                    t.region,
                    account_note(t)
                ))
            } else {
                Ok(names)
            }
        }
    }
}

fn account_note(t: &Target) -> String {
    t.role_arn
        .as_deref()
        .and_then(bakery_core::release::role_account)
        .map(|a| format!(" (account {a})"))
        .unwrap_or_default()
}

/// The image the plan's source names for `region` (checked to exist there and be available).
pub async fn image_for(plan: &Plan, aws: &Aws, region: &str) -> Result<String, String> {
    let id = match &plan.source {
        Source::Ami(id) => id.clone(),
        Source::Manifest(path) => {
            let m = crate::bake::manifest::Manifest::read(path)?;
            match m.ami_for(region) {
                Some(id) => id.to_string(),
                None => {
                    return Err(format!(
                        "{} has no image for region {region} (it has: {}); promote the build there first: \
                         bakery promote {} --to {region}",
                        path.display(),
                        m.image_regions().join(", "),
                        path.display()
                    ))
                }
            }
        }
        Source::Param(name) => {
            let ssm = aws.ssm.clone();
            let out = crate::aws::call("ssm:GetParameter", name, || {
                ssm.get_parameter().name(name).send()
            })
            .await
            .map_err(|e| {
                if e.code() == Some("ParameterNotFound") {
                    format!("SSM parameter {name} does not exist in {region}")
                } else {
                    format!("reading SSM parameter {name} in {region}: {e}")
                }
            })?;
            out.parameter()
                .and_then(|p| p.value())
                .map(str::to_string)
                .ok_or_else(|| format!("SSM parameter {name} in {region} is empty"))?
        }
    };
    match ec2::describe_image(&aws.ec2, &id)
        .await
        .map_err(|e| format!("reading image {id} in {region}: {e}"))?
    {
        None => Err(format!("image {id} does not exist in {region}")),
        Some(i) if i.state != "available" => Err(format!(
            "image {id} in {region} is {}, not available",
            i.state
        )),
        Some(_) => Ok(id),
    }
}

/// What the group is about now: whether a rollout is in progress on it (its state tag), and
/// the image its launch template version launches.
pub struct GroupNow {
    pub in_progress: bool,
    pub launching: Option<String>,
    pub instances: Vec<String>,
    pub target_groups: Vec<String>,
}

pub async fn group_now(aws: &Aws, name: &str) -> Result<GroupNow, String> {
    let g = autoscaling::describe(&aws.autoscaling, name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "Auto Scaling group {name} no longer exists in {}",
                aws.region
            )
        })?;
    let launching = match &g.launch_template {
        Some(r) => {
            let id = match (&r.id, &r.name) {
                (Some(id), _) => Some(id.clone()),
                (None, Some(n)) => lt::id_for_name(&aws.ec2, n)
                    .await
                    .map_err(|e| e.to_string())?,
                _ => None,
            };
            match id {
                Some(id) => lt::describe(&aws.ec2, &id, r.version.as_deref().unwrap_or("$Default"))
                    .await
                    .map_err(|e| e.to_string())?
                    .and_then(|v| v.image_id),
                None => None,
            }
        }
        None => None,
    };
    Ok(GroupNow {
        in_progress: g.tags.contains_key(crate::rollout::state::STATE_TAG),
        launching,
        instances: g
            .instances
            .iter()
            .filter(|i| i.lifecycle == "InService")
            .map(|i| i.id.clone())
            .collect(),
        target_groups: g.target_group_arns,
    })
}

/// The states of the named alarms in one region (those that exist).
pub async fn alarms(aws: &Aws, names: &[String]) -> Result<Vec<AlarmReading>, String> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let cw = aws.cloudwatch.clone();
    let out = crate::aws::call("cloudwatch:DescribeAlarms", &aws.region, || {
        cw.describe_alarms()
            .set_alarm_names(Some(names.to_vec()))
            .send()
    })
    .await
    .map_err(|e| format!("reading alarms in {}: {e}", aws.region))?;
    use aws_sdk_cloudwatch::types::StateValue;
    let reading =
        |name: Option<&str>, state: Option<&StateValue>, reason: Option<&str>| AlarmReading {
            region: aws.region.clone(),
            name: name.unwrap_or_default().to_string(),
            state: state.map(|s| s.as_str().to_string()).unwrap_or_default(),
            reason: reason.map(str::to_string),
        };
    let metric = out
        .metric_alarms()
        .iter()
        .map(|a| reading(a.alarm_name(), a.state_value(), a.state_reason()));
    let composite = out
        .composite_alarms()
        .iter()
        .map(|a| reading(a.alarm_name(), a.state_value(), a.state_reason()));
    Ok(metric.chain(composite).collect())
}

/// The private addresses of instances that run `ami`, among `ids`.
pub async fn new_instances(
    aws: &Aws,
    ids: &[String],
    ami: &str,
) -> Result<Vec<(String, IpAddr)>, String> {
    let pick = |i: &aws_sdk_ec2::types::Instance| {
        if i.image_id() != Some(ami) {
            return None;
        }
        let ip = i.private_ip_address()?.parse().ok()?;
        Some((i.instance_id()?.to_string(), ip))
    };
    ec2::instances_by_id(&aws.ec2, ids, &pick)
        .await
        .map_err(|e| e.to_string())
}

/// The port of the first target group (the HTTP gate's default).
pub async fn traffic_port(aws: &Aws, target_groups: &[String]) -> Result<Option<u16>, String> {
    let Some(arn) = target_groups.first() else {
        return Ok(None);
    };
    let elb = aws.elb.clone();
    let out = crate::aws::call("elbv2:DescribeTargetGroups", arn, || {
        elb.describe_target_groups().target_group_arns(arn).send()
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok(out
        .target_groups()
        .first()
        .and_then(|t| t.port())
        .and_then(|p| u16::try_from(p).ok()))
}

/// One GET of `gate.path` on `ip:port`: the status and (up to 64 KiB of) the body.
pub async fn http_get(ip: IpAddr, port: u16, gate: &HttpGate) -> Result<(u16, String), String> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect((ip, port))
            .await
            .map_err(|e| format!("connect {ip}:{port}: {e}"))?;
        let req = format!(
            "GET {} HTTP/1.0\r\nHost: {ip}\r\nUser-Agent: bakery-release\r\nConnection: close\r\n\r\n",
            gate.path
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send to {ip}:{port}: {e}"))?;
        let mut buf = Vec::new();
        s.take(64 * 1024)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read from {ip}:{port}: {e}"))?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("GET {} on {ip}:{port}: not an HTTP response", gate.path))?;
        Ok((status, body.to_string()))
    };
    match tokio::time::timeout(gate.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "GET {} on {ip}:{port}: no answer within {:?}",
            gate.path, gate.timeout
        )),
    }
}

/// How often alarms are read while a wave rolls or bakes.
pub const ALARM_EVERY: Duration = Duration::from_secs(5);
