//! Communicators: how bakery runs commands and copies files on a build instance, over SSH
//! ([`ssh`]) or SSM Run Command ([`ssm`]). [`Session`] is the one interface the bake pipeline
//! sees, whichever transport carries it, with [`CommError`], [`ExecOutcome`] and [`LineSink`].

pub mod hostkey;
pub mod keys;
pub mod ssh;
pub mod ssm;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::output::Stream;

/// Receives each line of a command's output as it arrives and returns the line as shown (after
/// redaction), which is what gets kept for error messages.
pub type LineSink = Arc<dyn Fn(Stream, &str) -> String + Send + Sync>;

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// `None` when the command was killed by a signal.
    pub exit_status: Option<i32>,
    pub signal: Option<String>,
    /// The last lines of output, as shown.
    pub tail: Vec<String>,
}

impl ExecOutcome {
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("cannot reach {0}")]
    Unreachable(String),
    #[error(
        "host key verification failed for {host}: it presented SHA256:{presented}, but the \
         instance's console output lists {}; refusing to connect (a different machine answered, or \
         the console output is stale). Use --trust-host-key-on-first-use only if you accept that risk",
        .expected.iter().map(|e| format!("SHA256:{e}")).collect::<Vec<_>>().join(", ")
    )]
    HostKeyMismatch {
        host: String,
        presented: String,
        expected: Vec<String>,
    },
    #[error("SSH login as {user:?} failed: {detail}")]
    Auth { user: String, detail: String },
    #[error("SSH protocol error: {0}")]
    Protocol(String),
    #[error("the connection dropped: {0}")]
    Disconnected(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("file transfer failed: {0}")]
    Transfer(String),
    #[error("cancelled")]
    Cancelled,
    /// An AWS call of the SSM communicator failed.
    #[error(transparent)]
    Aws(#[from] crate::aws::AwsError),
}

impl crate::wait::Outage for CommError {
    fn is_outage(&self) -> bool {
        matches!(self, CommError::Aws(e) if e.transient)
    }
}

impl CommError {
    /// Worth another try while the instance boots.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CommError::Unreachable(_) | CommError::Auth { .. } | CommError::Disconnected(_)
        )
    }
}

/// A connected communicator.
pub enum Session {
    Ssh(ssh::SshSession),
    Ssm(ssm::SsmSession),
}

impl Session {
    /// Runs a script (honouring its `#!` line) with `env`, as root when `sudo` (SSM always runs
    /// as root), streaming its output to `sink`. `remote` is where the script is staged.
    #[allow(clippy::too_many_arguments)]
    pub async fn run_script(
        &self,
        script: &str,
        env: &BTreeMap<String, String>,
        sudo: bool,
        remote: &str,
        timeout: Duration,
        cancel: Arc<AtomicBool>,
        sink: LineSink,
    ) -> Result<ExecOutcome, CommError> {
        match self {
            Session::Ssh(s) => {
                s.upload_bytes(script.as_bytes().to_vec(), remote, 0o700)
                    .await?;
                s.exec(ssh::shell_command(remote, env, sudo), timeout, cancel, sink)
                    .await
            }
            Session::Ssm(s) => {
                // Stage the script as a file so its own interpreter line applies, as over SSH.
                let q = ssh::shell_quote(remote);
                let delimiter = format!("BAKERY_SCRIPT_{}", uuid::Uuid::new_v4().simple());
                let staged = format!(
                    "umask 077\ncat > {q} <<'{delimiter}'\n{}\n{delimiter}\nchmod 0700 {q}\n{q}\nrc=$?\nrm -f {q}\nexit $rc\n",
                    script.trim_end_matches('\n')
                );
                s.run(&staged, env, timeout, cancel, sink).await
            }
        }
    }

    /// Writes `data` (rendered in memory, e.g. a template holding secrets) to `remote` with `mode`.
    pub async fn upload_bytes(
        &self,
        data: Vec<u8>,
        remote: &str,
        mode: u32,
        cancel: Arc<AtomicBool>,
    ) -> Result<u64, CommError> {
        let len = data.len() as u64;
        match self {
            Session::Ssh(s) => s.upload_bytes(data, remote, mode).await.map(|_| len),
            Session::Ssm(s) => s.upload_data(&data, remote, mode, cancel).await,
        }
    }

    /// Uploads a file, or a folder recursively.
    pub async fn upload(
        &self,
        local: &Path,
        remote: &str,
        mode: Option<u32>,
        cancel: Arc<AtomicBool>,
    ) -> Result<u64, CommError> {
        match self {
            Session::Ssh(s) => s.upload(local, remote, mode, cancel).await,
            Session::Ssm(s) => s.upload(local, remote, mode, cancel).await,
        }
    }
}
