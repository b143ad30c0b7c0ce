//! Communicators: how bakery runs commands and copies files on a build instance, over SSH
//! ([`ssh`]) or SSM Run Command ([`ssm`]). [`Session`] is the one interface the bake pipeline
//! sees, whichever transport carries it, with [`CommError`], [`ExecOutcome`] and [`LineSink`].

pub mod hostkey;
pub mod keys;
pub mod ssh;
pub mod ssm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::output::Stream;

/// Receives a command's output as it arrives, in pieces as the transport delivers them (part of
/// a line, several lines: the receiver splits lines, after redaction, see
/// `bakery_core::secret::LineRedactor`). Nothing is split or kept before it, so output of any
/// shape costs the communicator no memory.
pub type LineSink = Arc<dyn Fn(Stream, &[u8]) + Send + Sync>;

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// `None` when the command was killed by a signal.
    pub exit_status: Option<i32>,
    pub signal: Option<String>,
}

impl ExecOutcome {
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }
}

/// "exit code 3", "signal KILL".
pub fn status_text(o: &ExecOutcome) -> String {
    match (&o.exit_status, &o.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        (None, None) => "no exit status".into(),
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
    #[error(
        "bakery refused to send a command to {instance} through SSM: it holds a secret's value \
         (or an encoding of it), and SSM keeps commands for anyone allowed ssm:ListCommands to \
         read. Secret values reach the instance only as placeholders it fills in itself: reference \
         the secret as {{{{secret:…}}}} in a shell provisioner's env or a template, not in another \
         encoding inside a script or file"
    )]
    SecretInCommand { instance: String },
    #[error(
        "SSM's answer to SendCommand for {instance} was lost, and listing the instance's commands \
         to see whether it arrived failed too ({listing}); bakery does not send it again blindly \
         (it could run twice). Retry the bake when SSM answers again"
    )]
    SendUnknown {
        instance: String,
        listing: Box<crate::aws::AwsError>,
    },
    #[error(
        "SSM never showed command {command_id} on {instance} within the provisioner's timeout \
         ({waited:?}): the instance's agent did not take it"
    )]
    NeverDelivered {
        command_id: String,
        instance: String,
        waited: Duration,
    },
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
    /// as root), streaming its output to `sink`. `remote` is where the script is staged. The
    /// environment never appears on a command line (`ps` on the instance shows no value).
    /// Cancelled through `cancel`, the command is ended (over SSM: `CancelCommand`).
    #[allow(clippy::too_many_arguments)]
    pub async fn run_script(
        &self,
        script: &str,
        env: &BTreeMap<String, String>,
        sudo: bool,
        remote: &str,
        timeout: Duration,
        cancel: &CancellationToken,
        sink: LineSink,
    ) -> Result<ExecOutcome, CommError> {
        match self {
            Session::Ssh(s) => {
                s.exec(
                    ssh::script_command(remote, script.len(), sudo, timeout),
                    format!("{script}{}", ssh::env_assignments(env)),
                    timeout,
                    cancel.clone(),
                    sink,
                )
                .await
            }
            Session::Ssm(s) => {
                s.run_script(script, env, remote, timeout, cancel, sink)
                    .await
            }
        }
    }

    /// Writes `data` (rendered in memory, e.g. a template holding secrets) to `remote` with `mode`.
    pub async fn upload_bytes(
        &self,
        data: Vec<u8>,
        remote: &str,
        mode: u32,
        cancel: &CancellationToken,
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
        cancel: &CancellationToken,
    ) -> Result<u64, CommError> {
        match self {
            Session::Ssh(s) => s.upload(local, remote, mode, cancel.clone()).await,
            Session::Ssm(s) => s.upload(local, remote, mode, cancel).await,
        }
    }
}

/// The uploads of a file provisioner's source, walked again at upload time
/// ([`bakery_core::recipe::upload_files`]): a link made after `validate` that leaves the
/// source folder is refused here too.
pub fn uploads_of(local: &Path) -> Result<Vec<bakery_core::recipe::Upload>, CommError> {
    bakery_core::recipe::upload_files(local).map_err(CommError::Transfer)
}

/// Where an upload goes: `relative` under `remote` (`remote` itself for a one-file source).
pub fn remote_path(remote: &Path, relative: &Path) -> PathBuf {
    if relative.as_os_str().is_empty() {
        remote.to_path_buf()
    } else {
        remote.join(relative)
    }
}

/// Opens a file to upload without following a link: a file swapped for a link since the walk
/// is refused, not read.
pub fn open_upload(local: &Path) -> Result<std::fs::File, CommError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(local)
        .map_err(|e| CommError::Transfer(format!("{}: {e}", local.display())))
}
