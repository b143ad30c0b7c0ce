//! SIGINT and SIGTERM as one awaitable stream, for the commands that must clean up or pause
//! safely when interrupted (a bake releases its temporaries, a rollout records where it stopped).
//!
//! A release halts the rollouts it runs the same way: each runs inside [`halting`], and its
//! [`Signals`] also answer [`Signal::Halt`] once the release's token is cancelled (an alarm went
//! off, another group failed), so a rollout stops exactly as on SIGINT: paused, its state on
//! the group's tags, its lock freed, ready to be resumed or aborted.

use std::future::Future;

use tokio_util::sync::CancellationToken;

tokio::task_local! {
    static HALT: CancellationToken;
}

/// Runs `f` (a rollout) so that its signal waits also end when `halt` is cancelled.
pub async fn halting<F: Future>(halt: CancellationToken, f: F) -> F::Output {
    HALT.scope(halt, f).await
}

/// The signal that interrupted a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Int,
    Term,
    /// The release that runs this rollout halted it ([`halting`]).
    Halt,
}

impl Signal {
    /// The shell's convention: 128 + the signal number.
    pub fn exit_code(self) -> i32 {
        match self {
            Signal::Int => 130,
            Signal::Term => 143,
            // Only a release halts; it reports its own outcome.
            Signal::Halt => 1,
        }
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signal::Int => "SIGINT",
            Signal::Term => "SIGTERM",
            Signal::Halt => "the release's halt",
        })
    }
}

/// Listens for SIGINT and SIGTERM from creation on.
pub struct Signals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
    halt: Option<CancellationToken>,
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}

impl Signals {
    pub fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
            halt: HALT.try_with(CancellationToken::clone).ok(),
        }
    }

    /// The next signal.
    pub async fn next(&mut self) -> Signal {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        async fn halted(t: &Option<CancellationToken>) {
            match t {
                Some(t) => t.cancelled().await,
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.int) => Signal::Int,
            _ = recv(&mut self.term) => Signal::Term,
            _ = halted(&self.halt) => Signal::Halt,
        }
    }
}
