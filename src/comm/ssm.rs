//! The SSM communicator: commands run through SSM Run Command (`AWS-RunShellScript`), for fleets
//! that forbid inbound SSH. No key pair, no inbound rule: the instance's agent calls out.
//!
//! Output is polled with `GetCommandInvocation` (adaptively) and streamed as it grows. SSM keeps
//! at most 24,000 characters of each stream inline; beyond that bakery says the output was cut.
//! Files travel in base64 chunks through commands, which suits configuration and small artifacts,
//! not large payloads (see [`MAX_UPLOAD`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ssm::types::InstanceInformationStringFilter;
use aws_sdk_ssm::Client;

use super::{CommError, ExecOutcome, LineSink};
use crate::aws::call;
use crate::output::Stream;
use crate::wait::{Poll, Tolerance, OUTAGE_LIMIT};

/// SSM keeps this many characters of each output stream inline.
pub const INLINE_OUTPUT_LIMIT: usize = 24_000;
/// Raw bytes per upload command: 24 KiB become 32 KiB of base64, kept small to stay well inside
/// Run Command's limit on the size of a command's parameters.
const UPLOAD_CHUNK: usize = 24 * 1024;
/// Uploads over SSM larger than this are refused: use S3 (or the SSH communicator) for payloads.
pub const MAX_UPLOAD: u64 = 16 * 1024 * 1024;
/// Polls of a running command: from 100 ms, at most 2 s apart.
const COMMAND_POLL: Poll = Poll {
    min: Duration::from_millis(100),
    max: Duration::from_secs(2),
    ratio: 0.05,
};

#[derive(Clone, Debug)]
pub struct SsmSession {
    ssm: Client,
    pub instance_id: String,
}

impl SsmSession {
    pub fn new(ssm: Client, instance_id: String) -> Self {
        Self { ssm, instance_id }
    }

    /// True once the instance's agent reports `Online`.
    pub async fn agent_online(&self) -> Result<bool, CommError> {
        let out = call("ssm:DescribeInstanceInformation", &self.instance_id, || {
            self.ssm
                .describe_instance_information()
                .filters(
                    InstanceInformationStringFilter::builder()
                        .key("InstanceIds")
                        .values(&self.instance_id)
                        .build()
                        .expect("key and values are set"),
                )
                .send()
        })
        .await?;
        Ok(out.instance_information_list().iter().any(|i| {
            i.instance_id() == Some(self.instance_id.as_str())
                && i.ping_status().map(|p| p.as_str()) == Some("Online")
        }))
    }

    /// Runs `script` with `env` as root, streaming new output on every poll.
    pub async fn run(
        &self,
        script: &str,
        env: &BTreeMap<String, String>,
        timeout: Duration,
        cancel: Arc<AtomicBool>,
        sink: LineSink,
    ) -> Result<ExecOutcome, CommError> {
        let mut lines = Vec::new();
        for (k, v) in env {
            lines.push(format!("export {k}={}", super::ssh::shell_quote(v)));
        }
        lines.extend(script.lines().map(str::to_string));
        let command_id = self.send(lines, timeout).await?;
        let started = Instant::now();
        let mut shown = [0usize; 2];
        let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        let mut pending = [String::new(), String::new()];
        // The script runs on the instance whether or not SSM answers us: a throttling storm
        // longer than one call's retries is ridden out, a longer outage ends the run.
        let mut outage = Tolerance::new(OUTAGE_LIMIT);
        loop {
            if cancel.load(Ordering::Relaxed) {
                let _ = self
                    .ssm
                    .cancel_command()
                    .command_id(&command_id)
                    .instance_ids(&self.instance_id)
                    .send()
                    .await;
                return Err(CommError::Cancelled);
            }
            tokio::time::sleep(COMMAND_POLL.next_interval(started.elapsed())).await;
            let inv = match call("ssm:GetCommandInvocation", &command_id, || {
                self.ssm
                    .get_command_invocation()
                    .command_id(&command_id)
                    .instance_id(&self.instance_id)
                    .send()
            })
            .await
            {
                Ok(inv) => {
                    outage.clear();
                    inv
                }
                // Just sent: the invocation may not be visible yet.
                Err(e) if e.code() == Some("InvocationDoesNotExist") => continue,
                Err(e) if outage.ride_out(&e) => continue,
                Err(e) => return Err(e.into()),
            };
            let status = inv
                .status()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default();
            let done = !matches!(status.as_str(), "Pending" | "InProgress" | "Delayed" | "");
            for (i, (stream, text)) in [
                (
                    Stream::Stdout,
                    inv.standard_output_content().unwrap_or_default(),
                ),
                (
                    Stream::Stderr,
                    inv.standard_error_content().unwrap_or_default(),
                ),
            ]
            .into_iter()
            .enumerate()
            {
                if text.len() > shown[i] && text.is_char_boundary(shown[i]) {
                    pending[i].push_str(&text[shown[i]..]);
                    shown[i] = text.len();
                }
                // Whole lines now; the last partial line once the command is done.
                while let Some(pos) = pending[i].find('\n') {
                    let line: String = pending[i].drain(..=pos).collect();
                    push_tail(&mut tail, sink(stream, line.trim_end_matches(['\n', '\r'])));
                }
                if done && !pending[i].is_empty() {
                    let line = std::mem::take(&mut pending[i]);
                    push_tail(&mut tail, sink(stream, &line));
                }
                if done && text.chars().count() >= INLINE_OUTPUT_LIMIT {
                    push_tail(
                        &mut tail,
                        sink(stream, &format!("[bakery: SSM keeps only the first {INLINE_OUTPUT_LIMIT} characters of this stream; the rest is not shown]")),
                    );
                }
            }
            if !done {
                continue;
            }
            let code = inv.response_code();
            let tail: Vec<String> = tail.into_iter().collect();
            return match status.as_str() {
                "Success" => Ok(ExecOutcome {
                    exit_status: Some(0),
                    signal: None,
                    tail,
                }),
                "Failed" => Ok(ExecOutcome {
                    exit_status: Some(code),
                    signal: None,
                    tail,
                }),
                "TimedOut" | "ExecutionTimedOut" => Err(CommError::Timeout(timeout)),
                "Cancelled" | "Cancelling" => Err(CommError::Cancelled),
                other => Err(CommError::Disconnected(format!(
                    "SSM command {command_id} on {} ended {other}{}",
                    self.instance_id,
                    inv.status_details()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                ))),
            };
        }
    }

    /// Sends one command. SendCommand has no idempotency token, and a retried send whose first
    /// answer was lost would run the script twice (an upload chunk appended twice): each send
    /// carries a unique comment, and a retry first looks for a command with that comment.
    async fn send(&self, commands: Vec<String>, timeout: Duration) -> Result<String, CommError> {
        let timeout_s = timeout.as_secs().max(1).to_string();
        let comment = format!("bakery provisioner {}", uuid::Uuid::new_v4().simple());
        let attempts = AtomicU32::new(0);
        let out = call("ssm:SendCommand", &self.instance_id, || async {
            if attempts.fetch_add(1, Ordering::Relaxed) > 0 {
                if let Some(id) = self.command_commented(&comment).await {
                    tracing::debug!(command = %id, "an earlier SendCommand attempt had reached SSM");
                    let found = aws_sdk_ssm::types::Command::builder().command_id(id).build();
                    return Ok(aws_sdk_ssm::operation::send_command::SendCommandOutput::builder()
                        .command(found)
                        .build());
                }
            }
            self.ssm
                .send_command()
                .document_name("AWS-RunShellScript")
                .instance_ids(&self.instance_id)
                .parameters("commands", commands.clone())
                .parameters("executionTimeout", vec![timeout_s.clone()])
                .comment(&comment)
                .timeout_seconds(600)
                .send()
                .await
        })
        .await?;
        out.command()
            .and_then(|c| c.command_id())
            .map(str::to_string)
            .ok_or_else(|| CommError::Protocol("SendCommand returned no command id".into()))
    }

    /// The id of this instance's command with `comment`, if SSM lists one.
    async fn command_commented(&self, comment: &str) -> Option<String> {
        let listed = self
            .ssm
            .list_commands()
            .instance_id(&self.instance_id)
            .into_paginator()
            .items()
            .send()
            .collect::<Result<Vec<_>, _>>()
            .await
            .ok()?;
        listed
            .iter()
            .find(|c| c.comment() == Some(comment))
            .and_then(|c| c.command_id())
            .map(str::to_string)
    }

    /// Uploads a file, or a folder recursively, in base64 chunks through commands.
    pub async fn upload(
        &self,
        local: &Path,
        remote: &str,
        mode: Option<u32>,
        cancel: Arc<AtomicBool>,
    ) -> Result<u64, CommError> {
        let mut files = Vec::new();
        collect(local, Path::new(remote), &mut files)?;
        let total: u64 = files
            .iter()
            .map(|(l, _)| std::fs::metadata(l).map(|m| m.len()).unwrap_or(0))
            .sum();
        if total > MAX_UPLOAD {
            return Err(CommError::Transfer(format!(
                "{} is {total} bytes; over SSM bakery uploads at most {MAX_UPLOAD} bytes: put large payloads in S3 and fetch them in a shell provisioner",
                local.display()
            )));
        }
        let mut sent = 0;
        for (path, dest) in files {
            let data = std::fs::read(&path)
                .map_err(|e| CommError::Transfer(format!("{}: {e}", path.display())))?;
            let file_mode = mode.unwrap_or_else(|| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::metadata(&path)
                    .map(|m| m.permissions().mode() & 0o7777)
                    .unwrap_or(0o644)
            });
            sent += self
                .upload_data(&data, &dest.to_string_lossy(), file_mode, cancel.clone())
                .await?;
        }
        Ok(sent)
    }

    /// Writes `data` to `dest` with `mode`, in base64 chunks; the file appears whole (renamed
    /// into place) or not at all.
    pub async fn upload_data(
        &self,
        data: &[u8],
        dest: &str,
        mode: u32,
        cancel: Arc<AtomicBool>,
    ) -> Result<u64, CommError> {
        use base64::Engine;
        let quiet: LineSink = Arc::new(|_, l| l.to_string());
        let part = format!("{dest}.bakery-part");
        let q = super::ssh::shell_quote;
        let mut chunks = data.chunks(UPLOAD_CHUNK).peekable();
        let mut first = true;
        let mut sent = 0;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(CommError::Cancelled);
            }
            let chunk = chunks.next().unwrap_or(&[]);
            let b64 = base64::engine::general_purpose::STANDARD.encode(chunk);
            let mut script = String::from("set -e\n");
            if first {
                script.push_str(&format!(
                    "umask 077\nmkdir -p \"$(dirname {})\"\n: > {}\n",
                    q(dest),
                    q(&part)
                ));
            }
            if !chunk.is_empty() {
                script.push_str(&format!(
                    "printf '%s' '{b64}' | base64 -d >> {}\n",
                    q(&part)
                ));
            }
            let last = chunks.peek().is_none();
            if last {
                script.push_str(&format!(
                    "chmod {mode:o} {0}\nmv -f {0} {1}\n",
                    q(&part),
                    q(dest)
                ));
            }
            let o = self
                .run(
                    &script,
                    &BTreeMap::new(),
                    Duration::from_secs(120),
                    cancel.clone(),
                    quiet.clone(),
                )
                .await?;
            if !o.success() {
                return Err(CommError::Transfer(format!(
                    "writing {dest} over SSM failed: {}",
                    o.tail.join(" / ")
                )));
            }
            sent += chunk.len() as u64;
            first = false;
            if last {
                return Ok(sent);
            }
        }
    }
}

fn push_tail(tail: &mut std::collections::VecDeque<String>, line: String) {
    if tail.len() == super::ssh::TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(line);
}

fn collect(
    local: &Path,
    remote: &Path,
    out: &mut Vec<(std::path::PathBuf, std::path::PathBuf)>,
) -> Result<(), CommError> {
    let meta = std::fs::metadata(local)
        .map_err(|e| CommError::Transfer(format!("{}: {e}", local.display())))?;
    if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(local)
            .map_err(|e| CommError::Transfer(format!("{}: {e}", local.display())))?
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            collect(&e.path(), &remote.join(e.file_name()), out)?;
        }
    } else {
        out.push((local.to_path_buf(), remote.to_path_buf()));
    }
    Ok(())
}
