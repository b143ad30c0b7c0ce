//! Communicators: how bakery runs commands and copies files on a build instance. Today over
//! SSH ([`ssh`]); the shapes here ([`CommError`], [`ExecOutcome`], [`LineSink`]) are what the
//! bake pipeline sees, whichever transport carries them.

pub mod hostkey;
pub mod keys;
pub mod ssh;

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
