//! Shared helpers of the integration tests: they run the real `bakery` binary against the local
//! world (see `tests/world/README.md`), exactly as a user's pipeline would, and read the world
//! back through the AWS API to check what was left behind.
//!
//! The world must be running: `scripts/test` starts it. A test never skips when it is missing;
//! it fails and says how to start it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_ec2::config::{Credentials, Region};

pub const BIN: &str = env!("CARGO_BIN_EXE_bakery");

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The world's env file, as written by `scripts/world up`.
pub struct World {
    pub env: BTreeMap<String, String>,
}

impl World {
    pub fn get() -> World {
        let path = std::env::var("WORLD_ENV_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo().join(".world/env"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "the local world is not running ({}: {e}); start it with `scripts/world up --stack` \
                 or run the whole suite with `scripts/test`",
                path.display()
            )
        });
        let env = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), unquote(v)))
            .collect();
        World { env }
    }

    pub fn var(&self, k: &str) -> &str {
        self.env
            .get(k)
            .unwrap_or_else(|| panic!("{k} is missing from the world's env file"))
    }

    pub fn private_subnet(&self) -> &str {
        self.var("WORLD_PRIVATE_SUBNETS").split(',').next().unwrap()
    }

    pub fn ec2(&self) -> aws_sdk_ec2::Client {
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(Region::new(self.var("AWS_REGION").to_string()))
            .endpoint_url(self.var("AWS_ENDPOINT_URL"))
            .credentials_provider(Credentials::new(
                self.var("AWS_ACCESS_KEY_ID"),
                self.var("AWS_SECRET_ACCESS_KEY"),
                None,
                None,
                "world",
            ))
            .build();
        aws_sdk_ec2::Client::from_conf(config)
    }

    /// A `bakery` command with the world's environment and nothing of the caller's AWS setup.
    pub fn bakery(&self) -> Command {
        let mut c = Command::new(BIN);
        for k in [
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE",
        ] {
            c.env_remove(k);
        }
        c.envs(&self.env);
        c.env("AWS_EC2_METADATA_DISABLED", "true");
        c.stdin(Stdio::null());
        c
    }
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    if v.len() >= 2
        && (v.starts_with('\'') && v.ends_with('\'') || v.starts_with('"') && v.ends_with('"'))
    {
        v[1..v.len() - 1].to_string()
    } else {
        v.to_string()
    }
}

/// A scratch folder for one test's recipes and manifests.
pub fn scratch(name: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A recipe for the world's base image with the given provisioner tables.
pub fn recipe(world: &World, provisioners: &str, extra_comm: &str) -> String {
    format!(
        r#"
[source]
ami = "{ami}"

[instance]
type = "t3.micro"
subnet = "{subnet}"

[communicator]
type = "ssh"
user = "root"
interface = "private_ip"
connect_timeout = "60s"
{extra_comm}

{provisioners}

[image]
name = "test-{{{{build_id}}}}"
"#,
        ami = world.var("WORLD_BASE_AMI"),
        subnet = world.private_subnet(),
    )
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A finished `bakery --output json` run: exit code, events, stderr.
pub struct Run {
    pub code: Option<i32>,
    pub events: Vec<serde_json::Value>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(o: Output) -> Run {
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        Run {
            code: o.status.code(),
            events: parse_events(&stdout),
            stdout,
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn build_id(&self) -> String {
        self.events
            .iter()
            .find(|e| e["event"] == "build_started")
            .and_then(|e| e["build_id"].as_str())
            .unwrap_or_else(|| {
                panic!(
                    "no build_started event in:\n{}\n{}",
                    self.stdout, self.stderr
                )
            })
            .to_string()
    }

    pub fn event(&self, name: &str) -> Option<&serde_json::Value> {
        self.events.iter().find(|e| e["event"] == name)
    }

    /// The error of the run's `build_failed` or `rollout_failed` event.
    pub fn error(&self) -> String {
        self.events
            .iter()
            .find(|e| e["event"] == "build_failed" || e["event"] == "rollout_failed")
            .and_then(|e| e["error"].as_str())
            .unwrap_or_else(|| panic!("no failure event in:\n{}", self.describe()))
            .to_string()
    }

    pub fn output_lines(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["event"] == "output")
            .filter_map(|e| e["line"].as_str().map(str::to_string))
            .collect()
    }

    pub fn describe(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

pub fn parse_events(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Runs `bakery --output json build RECIPE ARGS...` to completion.
pub fn build(world: &World, recipe: &Path, args: &[&str]) -> Run {
    let manifest = recipe.with_extension("manifest.json");
    let out = world
        .bakery()
        .args(["--output", "json", "build"])
        .arg(recipe)
        .arg("--manifest")
        .arg(&manifest)
        .args(args)
        .output()
        .expect("run bakery");
    Run::from_output(out)
}

/// Starts a JSON build and returns the child with its stdout lines, for interrupt tests.
pub fn spawn_build(world: &World, recipe: &Path) -> (Child, std::sync::mpsc::Receiver<String>) {
    spawn_build_as(world, recipe, world.var("AWS_ACCESS_KEY_ID"))
}

/// [`spawn_build`] signing its calls with access key `key`, for a test's own world faults.
pub fn spawn_build_as(
    world: &World,
    recipe: &Path,
    key: &str,
) -> (Child, std::sync::mpsc::Receiver<String>) {
    spawn_lines(
        world
            .bakery()
            .env("AWS_ACCESS_KEY_ID", key)
            .args(["--output", "json", "build"])
            .arg(recipe)
            .arg("--manifest")
            .arg(recipe.with_extension("manifest.json"))
            .stderr(Stdio::piped()),
    )
}

/// Starts `command` with its stdout piped; its lines arrive on the receiver as they are written
/// (until the receiver is dropped). Its stderr is as `command` says.
pub fn spawn_lines(command: &mut Command) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn bakery");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Reads JSON events from a spawned run's `lines` into `events` until one satisfies `done`;
/// panics with `what` and the events so far when none does within `timeout`.
pub fn events_until(
    lines: &std::sync::mpsc::Receiver<String>,
    events: &mut Vec<serde_json::Value>,
    timeout: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("{what}; events so far: {events:?}"));
        let e: serde_json::Value = serde_json::from_str(&line).unwrap();
        let hit = done(&e);
        events.push(e);
        if hit {
            return;
        }
    }
}

/// Everything a bake with this id left behind: instances not terminated, key pairs, security
/// groups and AMIs tagged with its build id. Empty means clean.
pub async fn leftovers(world: &World, build_id: &str, include_images: bool) -> Vec<String> {
    let ec2 = world.ec2();
    let tag = aws_sdk_ec2::types::Filter::builder()
        .name("tag:bakery:build-id")
        .values(build_id)
        .build();
    let mut left = Vec::new();
    let instances = ec2
        .describe_instances()
        .filters(tag.clone())
        .send()
        .await
        .unwrap();
    for i in instances.reservations().iter().flat_map(|r| r.instances()) {
        let state = i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default();
        if state != "terminated" {
            left.push(format!(
                "instance {} ({state})",
                i.instance_id().unwrap_or_default()
            ));
        }
    }
    let keys = ec2.describe_key_pairs().send().await.unwrap();
    for k in keys.key_pairs() {
        if k.key_name().unwrap_or_default() == format!("bakery-{build_id}") {
            left.push(format!("key pair {}", k.key_name().unwrap_or_default()));
        }
    }
    let groups = ec2
        .describe_security_groups()
        .filters(tag.clone())
        .send()
        .await
        .unwrap();
    for g in groups.security_groups() {
        left.push(format!(
            "security group {}",
            g.group_id().unwrap_or_default()
        ));
    }
    let named = ec2
        .describe_security_groups()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("group-name")
                .values(format!("bakery-{build_id}"))
                .build(),
        )
        .send()
        .await
        .unwrap();
    for g in named.security_groups() {
        let id = format!("security group {}", g.group_id().unwrap_or_default());
        if !left.contains(&id) {
            left.push(id);
        }
    }
    if include_images {
        let images = ec2
            .describe_images()
            .owners("self")
            .filters(tag)
            .send()
            .await
            .unwrap();
        for i in images.images() {
            left.push(format!("image {}", i.image_id().unwrap_or_default()));
        }
    }
    left
}

/// Launches a plain instance (no bakery) and returns (id, private ip).
pub async fn launch(world: &World, ami: &str, key_name: Option<&str>) -> (String, String) {
    let ec2 = world.ec2();
    let out = ec2
        .run_instances()
        .image_id(ami)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .subnet_id(world.private_subnet())
        .set_key_name(key_name.map(str::to_string))
        .send()
        .await
        .expect("RunInstances");
    let i = &out.instances()[0];
    (
        i.instance_id().unwrap().to_string(),
        i.private_ip_address().unwrap().to_string(),
    )
}

pub async fn terminate(world: &World, id: &str) {
    let _ = world
        .ec2()
        .terminate_instances()
        .instance_ids(id)
        .send()
        .await;
}

/// `GET path` on ip:port with plain HTTP/1.0, retried until `timeout`; returns (status, body).
pub fn http_get(
    ip: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        match try_get(ip, port, path) {
            Ok(r) => return Ok(r),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("GET http://{ip}:{port}{path}: {last}"))
}

fn try_get(ip: &str, port: u16, path: &str) -> Result<(u16, String), String> {
    assert!(
        ip.starts_with("127."),
        "tests only talk to loopback, not {ip}"
    );
    let addr = format!("{ip}:{port}").parse().map_err(|e| format!("{e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad response {buf:?}"))?;
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    Ok((status, body))
}

/// Clients for the fleet tests.
impl World {
    /// A shared SDK configuration for the world, for clients of any service.
    pub fn sdk_config(&self) -> aws_config::SdkConfig {
        aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(self.var("AWS_REGION").to_string()))
            .endpoint_url(self.var("AWS_ENDPOINT_URL"))
            .credentials_provider(aws_sdk_ec2::config::SharedCredentialsProvider::new(
                Credentials::new(
                    self.var("AWS_ACCESS_KEY_ID"),
                    self.var("AWS_SECRET_ACCESS_KEY"),
                    None,
                    None,
                    "world",
                ),
            ))
            .build()
    }

    pub fn asg(&self) -> aws_sdk_autoscaling::Client {
        aws_sdk_autoscaling::Client::new(&self.sdk_config())
    }

    pub fn elb(&self) -> aws_sdk_elasticloadbalancingv2::Client {
        aws_sdk_elasticloadbalancingv2::Client::new(&self.sdk_config())
    }

    pub fn ssm(&self) -> aws_sdk_ssm::Client {
        aws_sdk_ssm::Client::new(&self.sdk_config())
    }
}

/// A group of its own for one test: a target group behind the stack's load balancer (on a
/// listener port of its own), a launch template on the stack's image, and an ASG attached to
/// both, so tests can run side by side without touching the stack's group.
pub struct Fleet {
    pub name: String,
    pub asg: String,
    pub tg_arn: String,
    pub listener_arn: String,
    pub lt_id: String,
    pub capacity: i32,
}

impl Fleet {
    pub async fn create(world: &World, name: &str, capacity: i32) -> Fleet {
        Self::create_with_grace(world, name, capacity, 5).await
    }

    pub async fn create_with_grace(world: &World, name: &str, capacity: i32, grace: i32) -> Fleet {
        use aws_sdk_elasticloadbalancingv2::types as elbt;
        let name = format!(
            "t-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let elb = world.elb();
        let tg = elb
            .create_target_group()
            .name(&name)
            .protocol(elbt::ProtocolEnum::Http)
            .port(8080)
            .vpc_id(world.var("WORLD_VPC_ID"))
            .health_check_path("/healthz")
            .health_check_interval_seconds(1)
            .health_check_timeout_seconds(1)
            .healthy_threshold_count(2)
            .unhealthy_threshold_count(2)
            .send()
            .await
            .expect("CreateTargetGroup");
        let tg_arn = tg.target_groups()[0]
            .target_group_arn()
            .unwrap()
            .to_string();
        elb.modify_target_group_attributes()
            .target_group_arn(&tg_arn)
            .attributes(
                elbt::TargetGroupAttribute::builder()
                    .key("deregistration_delay.timeout_seconds")
                    .value("1")
                    .build(),
            )
            .send()
            .await
            .expect("ModifyTargetGroupAttributes");
        let port =
            20000 + (u32::from_str_radix(&name[name.len() - 4..], 16).unwrap() % 20000) as i32;
        let listener = elb
            .create_listener()
            .load_balancer_arn(world.var("WORLD_ALB_ARN"))
            .protocol(elbt::ProtocolEnum::Http)
            .port(port)
            .default_actions(
                elbt::Action::builder()
                    .r#type(elbt::ActionTypeEnum::Forward)
                    .target_group_arn(&tg_arn)
                    .build(),
            )
            .send()
            .await
            .expect("CreateListener");
        let listener_arn = listener.listeners()[0].listener_arn().unwrap().to_string();
        let lt = world
            .ec2()
            .create_launch_template()
            .launch_template_name(&name)
            .launch_template_data(
                aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                    .image_id(world.var("WORLD_STACK_AMI"))
                    .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                    .security_group_ids(world.var("WORLD_APP_SG"))
                    .metadata_options(
                        aws_sdk_ec2::types::LaunchTemplateInstanceMetadataOptionsRequest::builder()
                            .http_tokens(
                                aws_sdk_ec2::types::LaunchTemplateHttpTokensState::Required,
                            )
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .expect("CreateLaunchTemplate");
        let lt_id = lt
            .launch_template()
            .unwrap()
            .launch_template_id()
            .unwrap()
            .to_string();
        world
            .asg()
            .create_auto_scaling_group()
            .auto_scaling_group_name(&name)
            .launch_template(
                aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                    .launch_template_id(&lt_id)
                    .version("1")
                    .build(),
            )
            .min_size(capacity)
            .max_size(capacity * 2)
            .desired_capacity(capacity)
            .vpc_zone_identifier(world.var("WORLD_PRIVATE_SUBNETS"))
            .target_group_arns(&tg_arn)
            .health_check_type("ELB")
            .health_check_grace_period(grace)
            .send()
            .await
            .expect("CreateAutoScalingGroup");
        let fleet = Fleet {
            asg: name.clone(),
            name,
            tg_arn,
            listener_arn,
            lt_id,
            capacity,
        };
        fleet
            .wait_healthy(world, capacity as usize, Duration::from_secs(60))
            .await;
        fleet
    }

    /// Healthy targets in the fleet's target group.
    pub async fn healthy(&self, world: &World) -> usize {
        match world
            .elb()
            .describe_target_health()
            .target_group_arn(&self.tg_arn)
            .send()
            .await
        {
            Ok(out) => out
                .target_health_descriptions()
                .iter()
                .filter(|d| {
                    d.target_health()
                        .and_then(|h| h.state())
                        .map(|s| s.as_str())
                        == Some("healthy")
                })
                .count(),
            Err(_) => 0,
        }
    }

    pub async fn wait_healthy(&self, world: &World, n: usize, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let h = self.healthy(world).await;
            if h >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}: only {h} of {n} targets healthy after {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn group(&self, world: &World) -> aws_sdk_autoscaling::types::AutoScalingGroup {
        world
            .asg()
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&self.asg)
            .send()
            .await
            .unwrap()
            .auto_scaling_groups()[0]
            .clone()
    }

    /// Every live (not terminating) instance of the group, with its AMI.
    pub async fn live_instances(&self, world: &World) -> Vec<(String, String)> {
        let g = self.group(world).await;
        let ids: Vec<String> = g
            .instances()
            .iter()
            .filter(|i| {
                !i.lifecycle_state()
                    .map(|l| l.as_str())
                    .unwrap_or_default()
                    .starts_with("Terminat")
            })
            .filter_map(|i| i.instance_id().map(str::to_string))
            .collect();
        if ids.is_empty() {
            return Vec::new();
        }
        let out = world
            .ec2()
            .describe_instances()
            .set_instance_ids(Some(ids))
            .send()
            .await
            .unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| {
                (
                    i.instance_id().unwrap_or_default().to_string(),
                    i.image_id().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// The AMI of every live (not terminating) instance of the group.
    pub async fn amis(&self, world: &World) -> Vec<String> {
        self.live_instances(world)
            .await
            .into_iter()
            .map(|(_, ami)| ami)
            .collect()
    }

    /// An empty group (capacity 0) named `<fleet>-<suffix>` on the fleet's launch template at
    /// `version`, named directly or, with `mixed`, through a mixed instances policy: another
    /// user of the same template. Delete it with [`delete_group`].
    pub async fn empty_sibling(
        &self,
        world: &World,
        suffix: &str,
        version: &str,
        mixed: bool,
    ) -> String {
        use aws_sdk_autoscaling::types as asgt;
        let name = format!("{}-{suffix}", self.asg);
        let spec = asgt::LaunchTemplateSpecification::builder()
            .launch_template_id(&self.lt_id)
            .version(version)
            .build();
        let create = world
            .asg()
            .create_auto_scaling_group()
            .auto_scaling_group_name(&name)
            .min_size(0)
            .max_size(0)
            .desired_capacity(0)
            .vpc_zone_identifier(world.var("WORLD_PRIVATE_SUBNETS"));
        let create = if mixed {
            create.mixed_instances_policy(
                asgt::MixedInstancesPolicy::builder()
                    .launch_template(
                        asgt::LaunchTemplate::builder()
                            .launch_template_specification(spec)
                            .build(),
                    )
                    .build(),
            )
        } else {
            create.launch_template(spec)
        };
        create.send().await.expect("CreateAutoScalingGroup");
        name
    }

    /// A new version of the fleet's launch template from `source` with `image`; its number.
    pub async fn add_version(&self, world: &World, source: &str, image: &str) -> i64 {
        world
            .ec2()
            .create_launch_template_version()
            .launch_template_id(&self.lt_id)
            .source_version(source)
            .launch_template_data(
                aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                    .image_id(image)
                    .build(),
            )
            .send()
            .await
            .expect("CreateLaunchTemplateVersion")
            .launch_template_version()
            .and_then(|v| v.version_number())
            .expect("a version number")
    }

    pub async fn delete(self, world: &World) {
        delete_group(world, &self.asg).await;
        let _ = world
            .elb()
            .delete_listener()
            .listener_arn(&self.listener_arn)
            .send()
            .await;
        let _ = world
            .elb()
            .delete_target_group()
            .target_group_arn(&self.tg_arn)
            .send()
            .await;
        let _ = world
            .ec2()
            .delete_launch_template()
            .launch_template_id(&self.lt_id)
            .send()
            .await;
    }
}

/// Deletes an Auto Scaling group and its instances (ForceDelete); best effort.
pub async fn delete_group(world: &World, name: &str) {
    let _ = world
        .asg()
        .delete_auto_scaling_group()
        .auto_scaling_group_name(name)
        .force_delete(true)
        .send()
        .await;
}

/// The two images the rollout tests roll out, baked once per test process from the sample
/// recipe: one healthy, one whose /healthz answers 503.
pub fn sample_amis(world: &World) -> &'static (String, String) {
    static AMIS: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    AMIS.get_or_init(|| {
        let dir = scratch("sample-amis");
        let bake = |name: &str, healthz: &str| {
            let manifest = dir.join(format!("{name}.json"));
            let child = world
                .bakery()
                .current_dir(repo())
                .args(["-q", "build", "examples/web/recipe.toml", "--manifest"])
                .arg(&manifest)
                .args([
                    "--var",
                    &format!("base_ami={}", world.var("WORLD_BASE_AMI")),
                ])
                .args(["--var", &format!("subnet={}", world.private_subnet())])
                .args(["--var", &format!("version=rollout-{name}")])
                .args(["--var", &format!("healthz={healthz}")])
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            (child, manifest)
        };
        let runs = [bake("good", "ok"), bake("bad", "fail")];
        let ids: Vec<String> = runs
            .into_iter()
            .map(|(mut child, manifest)| {
                assert!(
                    child.wait().unwrap().success(),
                    "baking {}",
                    manifest.display()
                );
                let m: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
                m["ami_id"].as_str().unwrap().to_string()
            })
            .collect();
        (ids[0].clone(), ids[1].clone())
    })
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The private IP of an instance.
pub async fn private_ip(world: &World, id: &str) -> String {
    let out = world
        .ec2()
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap();
    out.reservations()[0].instances()[0]
        .private_ip_address()
        .unwrap()
        .to_string()
}

/// `scripts/world kill ID`: the instance's services die, the instance stays running.
pub fn world_kill(world: &World, id: &str) {
    let out = Command::new(repo().join("scripts/world"))
        .args(["kill", id])
        .env("WORLD_DIR", world.var("WORLD_DIR"))
        .env("WORLD_PORT", world.var("WORLD_PORT"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "world kill {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The world's call log, only the calls made with access key `key`.
pub fn world_calls(world: &World, key: &str) -> serde_json::Value {
    let endpoint = world
        .var("AWS_ENDPOINT_URL")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let (ip, port) = endpoint.split_once(':').unwrap();
    let (status, body) = http_get(
        ip,
        port.parse().unwrap(),
        &format!("/_world/calls?access_key={key}"),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Replaces the world's fault spec with one rule: `field` (`throttle`, `drop`, `lose`,
/// `latency_ms`, ...) set to `value` for `action` (`service:Action` or `*`), on calls signed
/// with access key `key` only. Panics if the world refuses the spec.
pub fn world_fault(world: &World, seed: u64, key: &str, action: &str, field: &str, value: f64) {
    let spec = serde_json::json!({
        "seed": seed,
        "rules": [{"action": action, field: value, "access_key": key}],
    });
    let (status, body) = world_control(world, "POST", "/_world/faults", &spec.to_string());
    assert_eq!(status, 200, "{body}");
}

/// Removes every fault rule from the world.
pub fn clear_world_faults(world: &World) {
    world_control(world, "DELETE", "/_world/faults", "");
}

/// Sends a request with a JSON body to the world's control API; returns (status, body).
pub fn world_control(world: &World, method: &str, path: &str, body: &str) -> (u16, String) {
    let endpoint = world
        .var("AWS_ENDPOINT_URL")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    assert!(endpoint.starts_with("127."), "the world is on loopback");
    let mut s = std::net::TcpStream::connect(&endpoint).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {endpoint}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_string(),
    )
}
