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
use std::time::Duration;

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
        for k in ["AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"] {
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
    if v.len() >= 2 && (v.starts_with('\'') && v.ends_with('\'') || v.starts_with('"') && v.ends_with('"')) {
        v[1..v.len() - 1].to_string()
    } else {
        v.to_string()
    }
}

/// A scratch folder for one test's recipes and manifests.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
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
            .unwrap_or_else(|| panic!("no build_started event in:\n{}\n{}", self.stdout, self.stderr))
            .to_string()
    }

    pub fn event(&self, name: &str) -> Option<&serde_json::Value> {
        self.events.iter().find(|e| e["event"] == name)
    }

    pub fn output_lines(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["event"] == "output")
            .filter_map(|e| e["line"].as_str().map(str::to_string))
            .collect()
    }

    pub fn describe(&self) -> String {
        format!("exit {:?}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
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
    let mut child = world
        .bakery()
        .args(["--output", "json", "build"])
        .arg(recipe)
        .arg("--manifest")
        .arg(recipe.with_extension("manifest.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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

/// Everything a bake with this id left behind: instances not terminated, key pairs, security
/// groups and AMIs tagged with its build id. Empty means clean.
pub async fn leftovers(world: &World, build_id: &str, include_images: bool) -> Vec<String> {
    let ec2 = world.ec2();
    let tag = aws_sdk_ec2::types::Filter::builder()
        .name("tag:bakery:build-id")
        .values(build_id)
        .build();
    let mut left = Vec::new();
    let instances = ec2.describe_instances().filters(tag.clone()).send().await.unwrap();
    for i in instances.reservations().iter().flat_map(|r| r.instances()) {
        let state = i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default();
        if state != "terminated" {
            left.push(format!("instance {} ({state})", i.instance_id().unwrap_or_default()));
        }
    }
    let keys = ec2.describe_key_pairs().send().await.unwrap();
    for k in keys.key_pairs() {
        if k.key_name().unwrap_or_default() == format!("bakery-{build_id}") {
            left.push(format!("key pair {}", k.key_name().unwrap_or_default()));
        }
    }
    let groups = ec2.describe_security_groups().filters(tag.clone()).send().await.unwrap();
    for g in groups.security_groups() {
        left.push(format!("security group {}", g.group_id().unwrap_or_default()));
    }
    let named = ec2
        .describe_security_groups()
        .filters(aws_sdk_ec2::types::Filter::builder().name("group-name").values(format!("bakery-{build_id}")).build())
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
        let images = ec2.describe_images().owners("self").filters(tag).send().await.unwrap();
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
    let _ = world.ec2().terminate_instances().instance_ids(id).send().await;
}

/// `GET path` on ip:port with plain HTTP/1.0, retried until `timeout`; returns (status, body).
pub fn http_get(ip: &str, port: u16, path: &str, timeout: Duration) -> Result<(u16, String), String> {
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
    assert!(ip.starts_with("127."), "tests only talk to loopback, not {ip}");
    let addr = format!("{ip}:{port}").parse().map_err(|e| format!("{e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
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
