//! The SSM communicator: commands run through SSM Run Command (`AWS-RunShellScript`), for fleets
//! that forbid inbound SSH. No key pair, no inbound rule: the instance's agent calls out.
//!
//! Output is polled with `GetCommandInvocation` (adaptively) and streamed as it grows. SSM keeps
//! at most 24,000 characters of each stream inline; beyond that bakery says the output was cut.
//! Files travel in base64 chunks through commands, which suits configuration and small artifacts,
//! not large payloads (see [`MAX_UPLOAD`]).
//!
//! SSM keeps what a command carries and what it printed: `ListCommands` returns its parameters
//! and `GetCommandInvocation` / `ListCommandInvocations` its output, to anyone allowed to list
//! commands. So when a bake has secrets, no secret value goes through SSM in any form: the
//! communicator seals everything it sends (each secret value becomes a placeholder, see
//! [`Sealer`]) and refuses to send a command that still holds any encoding of one; the command
//! runs bakery's helper (`ssm_agent.py`, with `python3`), which reads the secrets with the
//! instance's own role, fills the placeholders in (environment, templates, the staged script)
//! and redacts the provisioner's output on the instance, before the SSM agent reads it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ssm::operation::get_command_invocation::GetCommandInvocationOutput;
use aws_sdk_ssm::types::InstanceInformationStringFilter;
use aws_sdk_ssm::Client;
use bakery_core::recipe::Upload;
use bakery_core::secret::Sealer;
use base64::Engine;
use tokio_util::sync::CancellationToken;

use super::ssh::shell_quote;
use super::{CommError, ExecOutcome, LineSink};
use crate::aws::{call, AwsError};
use crate::output::Stream;
use crate::wait::{Poll, Tolerance, OUTAGE_LIMIT};

/// bakery's helper on the instance (see the module documentation).
const AGENT: &str = include_str!("ssm_agent.py");
/// Its exit status when it, not the provisioner, failed.
pub const AGENT_FAILED: i32 = 97;
/// The helper needs `python3`: say so instead of `python3: not found`.
const PYTHON_CHECK: &str = "command -v python3 >/dev/null 2>&1 || { echo 'bakery: over SSM a bake with secrets needs python3 on the instance (bakery'\\''s helper reads the secrets with the instance role and redacts output there): use an image with python3, or the ssh communicator' >&2; exit 97; }\n";

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

/// How much of each output stream of a command was passed on.
struct Shown {
    /// Bytes passed on, per stream (stdout, stderr).
    bytes: [usize; 2],
    /// Whether each stream's last byte passed on was a newline (for the note on a cut).
    at_line_start: [bool; 2],
}

impl Shown {
    fn new() -> Self {
        Shown {
            bytes: [0; 2],
            at_line_start: [true; 2],
        }
    }

    /// Passes on to `sink` what each stream printed since the last poll; once `done`, notes
    /// a stream that SSM cut at [`INLINE_OUTPUT_LIMIT`].
    fn pass_on(&mut self, inv: &GetCommandInvocationOutput, done: bool, sink: &LineSink) {
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
            if text.len() > self.bytes[i] && text.is_char_boundary(self.bytes[i]) {
                let new = &text.as_bytes()[self.bytes[i]..];
                sink(stream, new);
                self.at_line_start[i] = new.ends_with(b"\n");
                self.bytes[i] = text.len();
            }
            if done && text.chars().count() >= INLINE_OUTPUT_LIMIT {
                let note = format!(
                    "{}[bakery: SSM keeps only the first {INLINE_OUTPUT_LIMIT} characters of this stream; the rest is not shown]\n",
                    if self.at_line_start[i] { "" } else { "\n" }
                );
                sink(stream, note.as_bytes());
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct SsmSession {
    ssm: Client,
    pub instance_id: String,
    /// The bake's secrets: sealed out of everything sent, read by the instance itself.
    sealer: Arc<Sealer>,
}

impl SsmSession {
    /// `resolved`: the bake's resolved references (reference text -> value), if it has any.
    pub fn new(
        ssm: Client,
        instance_id: String,
        resolved: Option<&BTreeMap<String, String>>,
    ) -> Self {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let sealer = Sealer::new(resolved.unwrap_or(&BTreeMap::new()), &nonce);
        Self {
            ssm,
            instance_id,
            sealer: Arc::new(sealer),
        }
    }

    /// The helper's command: `spec` (no secret value in it) for `python3 -`, with the secrets
    /// it reads (placeholder -> where).
    fn agent_command(
        &self,
        spec: serde_json::Value,
        secrets: &BTreeMap<String, bakery_core::secret::SecretSource>,
    ) -> String {
        let mut spec = spec;
        spec["secrets"] = serde_json::to_value(secrets).unwrap_or_default();
        spec["region"] = self
            .ssm
            .config()
            .region()
            .map(|r| serde_json::Value::String(r.to_string()))
            .unwrap_or_default();
        let encoded = base64::engine::general_purpose::STANDARD.encode(spec.to_string());
        let eof = format!("BAKERY_AGENT_{}", uuid::Uuid::new_v4().simple());
        format!("python3 - <<'{eof}'\n{AGENT}\nmain(\"{encoded}\")\n{eof}\n")
    }

    /// Runs a script staged at `remote` (its own `#!` line applies, as over SSH) with `env`, as
    /// root, streaming its output to `sink`.
    pub async fn run_script(
        &self,
        script: &str,
        env: &BTreeMap<String, String>,
        remote: &str,
        timeout: Duration,
        cancel: &CancellationToken,
        sink: LineSink,
    ) -> Result<ExecOutcome, CommError> {
        let q = shell_quote(remote);
        let delimiter = format!("BAKERY_SCRIPT_{}", uuid::Uuid::new_v4().simple());
        let stage = |script: &str| {
            format!(
                "umask 077\ncat > {q} <<'{delimiter}'\n{}\n{delimiter}\nchmod 0700 {q}\n",
                script.trim_end_matches('\n')
            )
        };
        let command = if self.sealer.is_empty() {
            let mut c = String::new();
            for (k, v) in env {
                c.push_str(&format!("export {k}={}\n", shell_quote(v)));
            }
            c.push_str(&stage(script));
            c.push_str(&format!("{q}\nrc=$?\nrm -f {q}\nexit $rc\n"));
            c
        } else {
            let seal =
                |v: &str| String::from_utf8_lossy(&self.sealer.seal(v.as_bytes())).into_owned();
            let env: BTreeMap<&String, String> = env.iter().map(|(k, v)| (k, seal(v))).collect();
            let mut c = PYTHON_CHECK.to_string();
            c.push_str(&stage(&seal(script)));
            c.push_str(&self.agent_command(
                serde_json::json!({
                    "action": "run",
                    "script": remote,
                    "env": env,
                }),
                &self.sealer.sources(),
            ));
            c.push_str(&format!("rc=$?\nrm -f {q}\nexit $rc\n"));
            c
        };
        self.run(&command, timeout, cancel, sink).await
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

    /// Sends `command` (a shell script) and streams its output to `sink` on every poll, until it
    /// ends. Cancelled, it cancels the command (`CancelCommand`) before returning.
    async fn run(
        &self,
        command: &str,
        timeout: Duration,
        cancel: &CancellationToken,
        sink: LineSink,
    ) -> Result<ExecOutcome, CommError> {
        if cancel.is_cancelled() {
            return Err(CommError::Cancelled);
        }
        let lines: Vec<String> = command.lines().map(str::to_string).collect();
        let command_id = self.send(lines, timeout).await?;
        let started = Instant::now();
        let mut shown = Shown::new();
        // The script runs on the instance whether or not SSM answers us: a throttling storm
        // longer than one call's retries is ridden out, a longer outage ends the run.
        let mut outage = Tolerance::new(OUTAGE_LIMIT);
        loop {
            let got = tokio::select! {
                r = self.poll_invocation(&command_id, started) => r,
                () = cancel.cancelled() => {
                    self.cancel_command(&command_id).await;
                    return Err(CommError::Cancelled);
                }
            };
            let inv = match got {
                Ok(inv) => {
                    outage.clear();
                    inv
                }
                // Just sent: the invocation may not be visible yet. One that never appears ends
                // at the command's timeout.
                Err(e) if e.code() == Some("InvocationDoesNotExist") => {
                    if started.elapsed() > timeout {
                        return Err(CommError::NeverDelivered {
                            command_id,
                            instance: self.instance_id.clone(),
                            waited: timeout,
                        });
                    }
                    continue;
                }
                Err(e) if outage.ride_out(&e) => continue,
                Err(e) => return Err(e.into()),
            };
            let status = inv
                .status()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default();
            let done = !matches!(status.as_str(), "Pending" | "InProgress" | "Delayed" | "");
            shown.pass_on(&inv, done, &sink);
            if !done {
                continue;
            }
            return self.outcome(&inv, &status, timeout, &command_id);
        }
    }

    /// Asks for the command's invocation, after the poll interval.
    async fn poll_invocation(
        &self,
        command_id: &str,
        started: Instant,
    ) -> Result<GetCommandInvocationOutput, AwsError> {
        tokio::time::sleep(COMMAND_POLL.next_interval(started.elapsed())).await;
        call("ssm:GetCommandInvocation", command_id, || {
            self.ssm
                .get_command_invocation()
                .command_id(command_id)
                .instance_id(&self.instance_id)
                .send()
        })
        .await
    }

    /// What a command that ended with `status` came to.
    fn outcome(
        &self,
        inv: &GetCommandInvocationOutput,
        status: &str,
        timeout: Duration,
        command_id: &str,
    ) -> Result<ExecOutcome, CommError> {
        let code = inv.response_code();
        match status {
            "Success" => Ok(ExecOutcome {
                exit_status: Some(0),
                signal: None,
            }),
            "Failed" => Ok(ExecOutcome {
                exit_status: Some(code),
                signal: None,
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
        }
    }

    /// Asks SSM to cancel a command (the agent ends its processes). Best effort: a failure is
    /// logged, and the bake's cleanup terminates the instance anyway.
    async fn cancel_command(&self, command_id: &str) {
        let r = call("ssm:CancelCommand", command_id, || {
            self.ssm
                .cancel_command()
                .command_id(command_id)
                .instance_ids(&self.instance_id)
                .send()
        })
        .await;
        match r {
            Ok(_) => tracing::info!(command = %command_id, "cancelled the SSM command"),
            Err(e) => {
                tracing::warn!(command = %command_id, error = %e, "could not cancel the SSM command")
            }
        }
    }

    /// Sends one command. SendCommand has no idempotency token, and a retried send whose first
    /// answer was lost would run the script twice (an upload chunk appended twice): each send
    /// carries a unique comment, and a retry first lists this instance's commands. It sends
    /// again only when the listing proves the first attempt absent; when the listing fails too,
    /// nobody can tell, and the send fails instead of risking a second run.
    ///
    /// Nothing sent may hold a secret: a command with any form of one is refused.
    async fn send(&self, commands: Vec<String>, timeout: Duration) -> Result<String, CommError> {
        if self.sealer.leaks(commands.join("\n").as_bytes()) {
            return Err(CommError::SecretInCommand {
                instance: self.instance_id.clone(),
            });
        }
        let timeout_s = timeout.as_secs().max(1).to_string();
        let comment = format!("bakery provisioner {}", uuid::Uuid::new_v4().simple());
        let attempts = AtomicU32::new(0);
        let unknown: Mutex<Option<AwsError>> = Mutex::new(None);
        let out = call("ssm:SendCommand", &self.instance_id, || async {
            if attempts.fetch_add(1, Ordering::Relaxed) > 0 {
                match self.command_commented(&comment).await {
                    Ok(Some(id)) => {
                        tracing::debug!(command = %id, "an earlier SendCommand attempt had reached SSM");
                        let found = aws_sdk_ssm::types::Command::builder().command_id(id).build();
                        return Ok(aws_sdk_ssm::operation::send_command::SendCommandOutput::builder()
                            .command(found)
                            .build());
                    }
                    Ok(None) => {}
                    Err(e) => {
                        // Not retryable: `call` stops here and the error below says why.
                        *unknown.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        return Err(aws_sdk_ssm::error::SdkError::construction_failure(
                            "whether an earlier attempt reached SSM is unknown",
                        ));
                    }
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
        .await;
        if let Some(listing) = unknown.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(CommError::SendUnknown {
                instance: self.instance_id.clone(),
                listing: Box::new(listing),
            });
        }
        out?.command()
            .and_then(|c| c.command_id())
            .map(str::to_string)
            .ok_or_else(|| CommError::Protocol("SendCommand returned no command id".into()))
    }

    /// The id of this instance's command with `comment`, if SSM lists one; an error when SSM
    /// could not be asked (after retries).
    async fn command_commented(&self, comment: &str) -> Result<Option<String>, AwsError> {
        let mut token: Option<String> = None;
        loop {
            let page = call("ssm:ListCommands", &self.instance_id, || {
                self.ssm
                    .list_commands()
                    .instance_id(&self.instance_id)
                    .set_next_token(token.clone())
                    .send()
            })
            .await?;
            if let Some(c) = page
                .commands()
                .iter()
                .find(|c| c.comment() == Some(comment))
            {
                return Ok(c.command_id().map(str::to_string));
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => return Ok(None),
            }
        }
    }

    /// Uploads a file, or a folder recursively, in base64 chunks through commands.
    pub async fn upload(
        &self,
        local: &Path,
        remote: &str,
        mode: Option<u32>,
        cancel: &CancellationToken,
    ) -> Result<u64, CommError> {
        let files: Vec<(std::path::PathBuf, std::path::PathBuf, u64, u32)> =
            super::uploads_of(local)?
                .into_iter()
                .filter_map(|u| match u {
                    // Folders come with their files (missing parents are made).
                    Upload::Folder { .. } => None,
                    Upload::File {
                        local,
                        relative,
                        len,
                        mode: own,
                    } => Some((
                        local,
                        super::remote_path(Path::new(remote), &relative),
                        len,
                        own,
                    )),
                })
                .collect();
        let total: u64 = files.iter().map(|f| f.2).sum();
        if total > MAX_UPLOAD {
            return Err(CommError::Transfer(format!(
                "{} is {total} bytes; over SSM bakery uploads at most {MAX_UPLOAD} bytes: put large payloads in S3 and fetch them in a shell provisioner",
                local.display()
            )));
        }
        let mut sent = 0;
        for (path, dest, _, own) in files {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut super::open_upload(&path)?, &mut data)
                .map_err(|e| CommError::Transfer(format!("{}: {e}", path.display())))?;
            sent += self
                .upload_data(&data, &dest.to_string_lossy(), mode.unwrap_or(own), cancel)
                .await?;
        }
        Ok(sent)
    }

    /// Writes `data` to `dest` with `mode`, in base64 chunks; the file appears whole (renamed
    /// into place) or not at all. Missing parent folders are made 0755, as over SSH. Secret
    /// values in `data` (a rendered template) travel as placeholders the instance fills in.
    pub async fn upload_data(
        &self,
        data: &[u8],
        dest: &str,
        mode: u32,
        cancel: &CancellationToken,
    ) -> Result<u64, CommError> {
        let sealed = self.sealer.seal(data);
        let secrets = self.sealer.used(&sealed);
        let output: Arc<Mutex<Vec<u8>>> = Arc::default();
        let kept = output.clone();
        let quiet: LineSink = Arc::new(move |_, bytes| {
            let mut o = kept.lock().unwrap_or_else(|p| p.into_inner());
            if o.len() < 4096 {
                o.extend_from_slice(bytes);
            }
        });
        let part = format!("{dest}.bakery-part");
        let q = shell_quote;
        let mut chunks = sealed.chunks(UPLOAD_CHUNK).peekable();
        let mut first = true;
        loop {
            if cancel.is_cancelled() {
                return Err(CommError::Cancelled);
            }
            let chunk = chunks.next().unwrap_or(&[]);
            let b64 = base64::engine::general_purpose::STANDARD.encode(chunk);
            let mut script = String::from("set -e\n");
            if first {
                script.push_str(&format!(
                    "(umask 022 && mkdir -p \"$(dirname {})\")\numask 077\n: > {}\n",
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
            if last && secrets.is_empty() {
                script.push_str(&format!(
                    "chmod {mode:o} {0}\nmv -f {0} {1}\n",
                    q(&part),
                    q(dest)
                ));
            } else if last {
                script.push_str(PYTHON_CHECK);
                script.push_str(&self.agent_command(
                    serde_json::json!({
                        "action": "render",
                        "source": part,
                        "dest": dest,
                        "mode": mode,
                    }),
                    &secrets,
                ));
            }
            output.lock().unwrap_or_else(|p| p.into_inner()).clear();
            let o = self
                .run(&script, Duration::from_secs(120), cancel, quiet.clone())
                .await?;
            if !o.success() {
                let said =
                    String::from_utf8_lossy(&output.lock().unwrap_or_else(|p| p.into_inner()))
                        .trim()
                        .replace('\n', " / ");
                return Err(CommError::Transfer(format!(
                    "writing {dest} over SSM failed ({}): {said}",
                    super::status_text(&o)
                )));
            }
            first = false;
            if last {
                return Ok(data.len() as u64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bakery_core::secret::{LineRedactor, Redactor, MASK};
    use std::io::Write;

    /// What the instance-side helper's filter makes of `output`, fed in pieces of `piece` bytes.
    fn filtered_on_the_instance(secrets: &[&str], output: &[u8], piece: usize) -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!("bakery-agent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let program = dir.join(format!("filter-{piece}.py"));
        std::fs::write(
            &program,
            format!(
                "{AGENT}\nimport sys\npats, span = patterns(json.loads(sys.argv[1]))\nf = Filter(pats, span, sys.stdout.buffer)\ndata = sys.stdin.buffer.read()\nfor i in range(0, len(data), {piece}):\n    f.feed(data[i:i + {piece}])\nf.feed(b'', final=True)\n"
            ),
        )
        .unwrap();
        let mut child = std::process::Command::new("python3")
            .arg(&program)
            .arg(serde_json::to_string(secrets).unwrap())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(output).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        out.stdout
    }

    fn shown(secrets: &[&str], output: &[u8]) -> Vec<String> {
        let mut r = Redactor::default();
        for s in secrets {
            r.add(s);
        }
        let mut l = LineRedactor::new(r);
        let mut lines = l.push(output);
        lines.extend(l.finish());
        lines
    }

    /// The helper masks on the instance what bakery masks at home: what SSM stores holds no
    /// secret, and the lines shown are the same as over SSH.
    #[test]
    fn the_instance_filter_masks_what_bakery_masks() {
        use base64::Engine;
        let pw = "p@ss w/rd+Ünï!ç\"\\x";
        let pem = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n-----END KEY-----\n";
        let json = serde_json::json!({"password": pw, "key": pem}).to_string();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let wrapped: Vec<String> = b64(pem)
            .as_bytes()
            .chunks(76)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let output = format!(
            "plain: {pw}\n{pem}{}\nb64 {}\nxb64 {}\nurl p%40ss+w%2Frd%2B%C3%9Cn%C3%AF%21%C3%A7%22%5Cx&y\nlower p%40ss%20w%2frd%2b%c3%9cn%c3%af%21%c3%a7%22%5cx\nhex 7040737320772f72642bc39c6ec3af21c3a7225c78\n\n\nfold p@ss \nw/rd+\nÜnï!ç\"\\x\n{}\njson {}\nend",
            wrapped.join("\n"),
            b64(pw),
            b64(&format!("x{pw}")),
            "A".repeat(70_000),
            serde_json::to_string(pem).unwrap(),
        );
        let secrets = [pw, pem, json.as_str()];
        let expected = shown(&secrets, output.as_bytes());
        assert!(expected.iter().filter(|l| l.contains(MASK)).count() >= 12);
        for piece in [1, 5, 4096] {
            let stored = filtered_on_the_instance(&secrets, output.as_bytes(), piece);
            let text = String::from_utf8_lossy(&stored);
            assert!(!Redactor::default().finds_in(&stored));
            let mut check = Redactor::default();
            for s in secrets {
                check.add(s);
            }
            assert!(!check.finds_in(&stored), "pieces of {piece}: {text}");
            assert_eq!(shown(&secrets, &stored), expected, "pieces of {piece}");
        }
    }
}
