//! The SSH communicator, on `ssh2` (libssh2). libssh2 is blocking, so every session operation
//! runs in `spawn_blocking` with `Session::set_timeout` set, output is read in a non-blocking
//! loop over stdout and stderr together (reading one alone can stall the channel) and passed on
//! as it comes, and the bake's cancellation token lets Ctrl-C end a running command.
//!
//! A provisioner's environment travels on the command's stdin, never on its command line (which
//! `ps` shows to every user of the instance). A timeout or a cancel returns at once, without
//! waiting for the server to close the channel (it would not while the command runs); the
//! command itself runs under `timeout` on the instance, so it ends there too.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bakery_core::recipe::Upload;
use ssh2::{HashType, OpenFlags, OpenType, Session};
use tokio_util::sync::CancellationToken;

use super::{hostkey, CommError, ExecOutcome, LineSink};
use crate::output::Stream;

/// How long one blocking libssh2 call (handshake, auth, SFTP write) may take.
const BLOCKING_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// SFTP writes of 1 MiB: measured at ~230 MiB/s against ~49 MiB/s for 8 KiB writes.
const SFTP_CHUNK: usize = 1 << 20;
/// Keepalives notice a dead connection during a long, silent command.
const KEEPALIVE_INTERVAL_S: u32 = 15;
/// Lines of output kept to show when a command fails.
pub const TAIL_LINES: usize = 20;
/// Longer timeouts are left to bakery alone: `timeout` implementations differ on huge values.
const REMOTE_TIMEOUT_MAX_S: u64 = 30 * 24 * 3600;

/// How the server's host key is checked.
#[derive(Debug, Clone)]
pub enum HostKeyPolicy {
    /// Accept only a key whose SHA-256 fingerprint is one of these (OpenSSH form, no prefix).
    Fingerprints(Vec<String>),
    /// Accept the first key seen, then pin it for reconnects (`--trust-host-key-on-first-use`).
    TrustOnFirstUse,
}

/// Where and as whom to log in.
#[derive(Clone)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub public_key: String,
    /// OpenSSH-format private key; only ever in memory.
    pub private_key: Arc<zeroize::Zeroizing<String>>,
}

impl std::fmt::Debug for SshTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

/// A logged-in, host-key-verified SSH session.
pub struct SshSession {
    target: SshTarget,
    session: Arc<Mutex<Session>>,
    /// The fingerprint verified at first connect; reconnects must present the same key.
    pinned: String,
}

/// One attempt to connect, verify and authenticate. Blocking.
fn connect_once(
    target: &SshTarget,
    policy: &HostKeyPolicy,
    connect_timeout: Duration,
) -> Result<(Session, String), CommError> {
    let addr: SocketAddr = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| CommError::Unreachable(format!("{}: {e}", target.host)))?
        .next()
        .ok_or_else(|| CommError::Unreachable(format!("{} has no address", target.host)))?;
    let tcp = TcpStream::connect_timeout(&addr, connect_timeout)
        .map_err(|e| CommError::Unreachable(format!("{addr}: {e}")))?;
    // SSH sends small messages back to back; without this each waits for a delayed ACK (~40 ms).
    let _ = tcp.set_nodelay(true);
    let mut session = Session::new().map_err(|e| CommError::Protocol(e.to_string()))?;
    session.set_tcp_stream(tcp);
    session.set_timeout(BLOCKING_CALL_TIMEOUT.as_millis() as u32);
    session
        .handshake()
        .map_err(|e| CommError::Unreachable(format!("{addr}: SSH handshake: {e}")))?;
    let fingerprint = session
        .host_key_hash(HashType::Sha256)
        .map(hostkey::sha256_fingerprint)
        .ok_or_else(|| CommError::Protocol("the server sent no host key".into()))?;
    if let HostKeyPolicy::Fingerprints(expected) = policy {
        if !expected.contains(&fingerprint) {
            return Err(CommError::HostKeyMismatch {
                host: addr.to_string(),
                presented: fingerprint,
                expected: expected.clone(),
            });
        }
    }
    session
        .userauth_pubkey_memory(
            &target.user,
            Some(&target.public_key),
            target.private_key.as_str(),
            None,
        )
        .map_err(|e| CommError::Auth {
            user: target.user.clone(),
            detail: e.to_string(),
        })?;
    if !session.authenticated() {
        return Err(CommError::Auth {
            user: target.user.clone(),
            detail: "the server did not accept the key".into(),
        });
    }
    session.set_keepalive(false, KEEPALIVE_INTERVAL_S);
    Ok((session, fingerprint))
}

impl SshSession {
    /// Connects once (no retry; the caller's wait loop retries [`CommError::is_transient`]).
    pub async fn connect(
        target: SshTarget,
        policy: HostKeyPolicy,
        connect_timeout: Duration,
    ) -> Result<Self, CommError> {
        let t = target.clone();
        let (session, pinned) =
            tokio::task::spawn_blocking(move || connect_once(&t, &policy, connect_timeout))
                .await
                .map_err(|e| CommError::Protocol(format!("SSH worker failed: {e}")))??;
        Ok(Self {
            target,
            session: Arc::new(Mutex::new(session)),
            pinned,
        })
    }

    /// The verified host-key fingerprint (`SHA256:` form without the prefix).
    pub fn fingerprint(&self) -> &str {
        &self.pinned
    }

    /// A new session to the same host, which must present the same host key.
    pub async fn reconnect(&self, connect_timeout: Duration) -> Result<Self, CommError> {
        Self::connect(
            self.target.clone(),
            HostKeyPolicy::Fingerprints(vec![self.pinned.clone()]),
            connect_timeout,
        )
        .await
    }

    /// Runs `command` with `stdin` as its input, streaming its output to `sink`.
    pub async fn exec(
        &self,
        command: String,
        stdin: String,
        timeout: Duration,
        cancel: CancellationToken,
        sink: LineSink,
    ) -> Result<ExecOutcome, CommError> {
        let session = self.session.clone();
        tokio::task::spawn_blocking(move || {
            let session = session.lock().unwrap_or_else(|p| p.into_inner());
            exec_blocking(&session, &command, &stdin, timeout, &cancel, &sink)
        })
        .await
        .map_err(|e| CommError::Protocol(format!("SSH worker failed: {e}")))?
    }

    /// Writes `data` to `remote` over SFTP with `mode`.
    pub async fn upload_bytes(
        &self,
        data: Vec<u8>,
        remote: &str,
        mode: u32,
    ) -> Result<(), CommError> {
        let session = self.session.clone();
        let remote = remote.to_string();
        tokio::task::spawn_blocking(move || {
            let session = session.lock().unwrap_or_else(|p| p.into_inner());
            let sftp = session
                .sftp()
                .map_err(|e| CommError::Disconnected(format!("cannot start SFTP: {e}")))?;
            mkdir_parents(&sftp, Path::new(&remote));
            let mut f = sftp
                .open_mode(
                    Path::new(&remote),
                    OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE,
                    mode as i32,
                    OpenType::File,
                )
                .map_err(|e| CommError::Transfer(format!("cannot create {remote}: {e}")))?;
            f.write_all(&data)
                .map_err(|e| CommError::Transfer(format!("writing {remote}: {e}")))?;
            drop(f);
            set_mode(&sftp, Path::new(&remote), mode)
        })
        .await
        .map_err(|e| CommError::Protocol(format!("SSH worker failed: {e}")))?
    }

    /// Uploads a file, or a directory recursively, over SFTP.
    pub async fn upload(
        &self,
        local: &Path,
        remote: &str,
        mode: Option<u32>,
        cancel: CancellationToken,
    ) -> Result<u64, CommError> {
        let session = self.session.clone();
        let local = local.to_path_buf();
        let remote = remote.to_string();
        tokio::task::spawn_blocking(move || {
            let session = session.lock().unwrap_or_else(|p| p.into_inner());
            let sftp = session
                .sftp()
                .map_err(|e| CommError::Transfer(format!("cannot start SFTP: {e}")))?;
            upload_path(&sftp, &local, Path::new(&remote), mode, &cancel)
        })
        .await
        .map_err(|e| CommError::Protocol(format!("SSH worker failed: {e}")))?
    }
}

fn upload_path(
    sftp: &ssh2::Sftp,
    local: &Path,
    remote: &Path,
    mode: Option<u32>,
    cancel: &CancellationToken,
) -> Result<u64, CommError> {
    let mut total = 0;
    for upload in super::uploads_of(local)? {
        match upload {
            Upload::Folder { relative } => {
                let dir = super::remote_path(remote, &relative);
                mkdir_parents(sftp, &dir);
                // An existing directory is fine: mkdir fails, the uploads below succeed.
                let _ = sftp.mkdir(&dir, 0o755);
            }
            Upload::File {
                local,
                relative,
                mode: own,
                ..
            } => {
                let dest = super::remote_path(remote, &relative);
                total += upload_file(sftp, &local, &dest, mode.unwrap_or(own), cancel)?;
            }
        }
    }
    Ok(total)
}

fn upload_file(
    sftp: &ssh2::Sftp,
    local: &Path,
    remote: &Path,
    mode: u32,
    cancel: &CancellationToken,
) -> Result<u64, CommError> {
    mkdir_parents(sftp, remote);
    let mut src = super::open_upload(local)?;
    let mut dst = sftp
        .open_mode(
            remote,
            OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE,
            mode as i32,
            OpenType::File,
        )
        .map_err(|e| CommError::Transfer(format!("cannot create {}: {e}", remote.display())))?;
    let mut buf = vec![0u8; SFTP_CHUNK];
    let mut total = 0u64;
    loop {
        if cancel.is_cancelled() {
            return Err(CommError::Cancelled);
        }
        let n = src
            .read(&mut buf)
            .map_err(|e| CommError::Transfer(format!("{}: {e}", local.display())))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])
            .map_err(|e| CommError::Transfer(format!("writing {}: {e}", remote.display())))?;
        total += n as u64;
    }
    drop(dst);
    set_mode(sftp, remote, mode)?;
    Ok(total)
}

/// Creates the missing parent folders of `remote` (like `mkdir -p`); failures surface when the
/// file itself cannot be created, with a clearer message.
fn mkdir_parents(sftp: &ssh2::Sftp, remote: &Path) {
    let mut missing = Vec::new();
    let mut dir = remote.parent();
    while let Some(d) = dir {
        if d.as_os_str().is_empty() || d == Path::new("/") || sftp.stat(d).is_ok() {
            break;
        }
        missing.push(d.to_path_buf());
        dir = d.parent();
    }
    for d in missing.iter().rev() {
        let _ = sftp.mkdir(d, 0o755);
    }
}

/// Runs `command` on a channel of its own, `stdin` sent first, its output streamed to `sink`
/// until it ends, is cancelled or runs out of `timeout`.
fn exec_blocking(
    session: &Session,
    command: &str,
    stdin: &str,
    timeout: Duration,
    cancel: &CancellationToken,
    sink: &LineSink,
) -> Result<ExecOutcome, CommError> {
    if cancel.is_cancelled() {
        return Err(CommError::Cancelled);
    }
    let mut channel = start_command(session, command, stdin)?;
    session.set_blocking(false);
    let result = pump_output(session, &mut channel, timeout, cancel, sink);
    if let Err(e) = result {
        // Still non-blocking: ask the server to close and return now. A blocking close waits
        // for the server's own close, which does not come while the command runs (twice the
        // 30 s call timeout, with the channel's drop). The command ends under its `timeout`.
        let _ = channel.close();
        drop(channel);
        session.set_blocking(true);
        return Err(e);
    }
    session.set_blocking(true);
    // The exit status is valid only after the channel is closed.
    channel
        .wait_close()
        .map_err(|e| CommError::Disconnected(format!("closing the channel: {e}")))?;
    let status = channel
        .exit_status()
        .map_err(|e| CommError::Disconnected(e.to_string()))?;
    let signal = channel.exit_signal().ok().and_then(|s| s.exit_signal);
    Ok(ExecOutcome {
        exit_status: if signal.is_some() { None } else { Some(status) },
        signal,
    })
}

/// Opens a channel, starts `command` on it and sends it `stdin` and the end of input.
fn start_command(
    session: &Session,
    command: &str,
    stdin: &str,
) -> Result<ssh2::Channel, CommError> {
    session.set_blocking(true);
    let mut channel = session
        .channel_session()
        .map_err(|e| CommError::Disconnected(format!("cannot open a channel: {e}")))?;
    channel
        .exec(command)
        .map_err(|e| CommError::Disconnected(format!("cannot start the command: {e}")))?;
    channel
        .write_all(stdin.as_bytes())
        .and_then(|()| channel.send_eof().map_err(std::io::Error::from))
        .map_err(|e| CommError::Disconnected(format!("cannot send the environment: {e}")))?;
    Ok(channel)
}

/// Reads stdout and stderr alongside (non-blocking) into `sink` until the command's output
/// ends, sending keepalives on the way; stops early when cancelled or out of `timeout`.
fn pump_output(
    session: &Session,
    channel: &mut ssh2::Channel,
    timeout: Duration,
    cancel: &CancellationToken,
    sink: &LineSink,
) -> Result<(), CommError> {
    let started = Instant::now();
    let mut buf = [0u8; 16 * 1024];
    let mut next_keepalive = Instant::now() + Duration::from_secs(KEEPALIVE_INTERVAL_S.into());
    loop {
        if cancel.is_cancelled() {
            return Err(CommError::Cancelled);
        }
        if started.elapsed() > timeout {
            return Err(CommError::Timeout(timeout));
        }
        let mut progressed = read_some(channel, Stream::Stdout, &mut buf, sink)?;
        progressed |= read_some(&mut channel.stderr(), Stream::Stderr, &mut buf, sink)?;
        if channel.eof() && !progressed {
            return Ok(());
        }
        if Instant::now() >= next_keepalive {
            match session.keepalive_send() {
                Ok(secs) => {
                    next_keepalive = Instant::now() + Duration::from_secs(secs.max(1).into())
                }
                Err(e) if e.code() == ssh2::ErrorCode::Session(-37) => {} // EAGAIN
                Err(e) => return Err(CommError::Disconnected(format!("keepalive: {e}"))),
            }
        }
        if !progressed {
            // A blocking thread of its own: a short OS sleep here does not stall the runtime.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Passes what `from` has ready to `sink` as `stream`; true if there was anything.
fn read_some(
    from: &mut impl Read,
    stream: Stream,
    buf: &mut [u8],
    sink: &LineSink,
) -> Result<bool, CommError> {
    match from.read(buf) {
        Ok(0) => Ok(false),
        Ok(n) => {
            sink(stream, &buf[..n]);
            Ok(true)
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(CommError::Disconnected(e.to_string())),
    }
}

/// The command that receives a script ahead of its environment on stdin and runs it: the first
/// `len` bytes become `remote` (a new file, 0700; an existing file or link at that path is
/// refused, and a script that did not arrive whole is not run: exit 125), the rest is the
/// environment, as [`shell_command`] reads it. One channel instead of two: an SFTP session
/// (sshd starts its SFTP server, then open, write, chmod and close, each a round trip) before
/// the exec cost a shell provisioner 20 to 80 ms in the world.
pub fn script_command(remote: &str, len: usize, sudo: bool, timeout: Duration) -> String {
    let q = shell_quote(remote);
    format!(
        "umask 077; rm -f {q}; if (set -C; head -c {len} > {q}) && [ \"$(wc -c < {q})\" -eq {len} ]; \
         then chmod 700 {q}; else rm -f {q}; echo 'bakery: the script did not arrive whole' >&2; \
         exit 125; fi; {}",
        shell_command(remote, sudo, timeout)
    )
}

/// The command that runs the staged script `remote` (with `sudo`, through `sudo -n` unless the
/// login user already is root, so one recipe works for `ec2-user` and `root` alike) with the
/// environment read from stdin ([`env_assignments`]), under `timeout` where the instance has it,
/// then removes the script. No environment value is on this command line.
pub fn shell_command(remote: &str, sudo: bool, timeout: Duration) -> String {
    let mut cmd = String::new();
    if sudo {
        cmd.push_str("if [ \"$(id -u)\" -eq 0 ]; then S=; else S='sudo -n -E'; fi; $S ");
    }
    let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    let run = if secs <= REMOTE_TIMEOUT_MAX_S {
        format!("if command -v timeout >/dev/null 2>&1; then exec timeout {secs} \"$0\"; else exec \"$0\"; fi")
    } else {
        "exec \"$0\"".to_string()
    };
    cmd.push_str(&format!(
        "sh -c 'set -a; eval \"$(cat)\"; set +a; {run}' {}",
        shell_quote(remote)
    ));
    format!("{cmd}; rc=$?; rm -f {}; exit $rc", shell_quote(remote))
}

/// `K='v'` lines, POSIX single-quoted, for [`shell_command`]'s stdin: values reach the script
/// verbatim.
pub fn env_assignments(env: &BTreeMap<String, String>) -> String {
    env.iter()
        .map(|(k, v)| format!("{k}={}\n", shell_quote(v)))
        .collect()
}

pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Sets a remote file's mode: SFTP's open applies the server's umask, so the mode asked for is
/// set explicitly afterwards.
fn set_mode(sftp: &ssh2::Sftp, remote: &Path, mode: u32) -> Result<(), CommError> {
    let stat = ssh2::FileStat {
        size: None,
        uid: None,
        gid: None,
        perm: Some(mode),
        atime: None,
        mtime: None,
    };
    sftp.setstat(remote, stat)
        .map_err(|e| CommError::Transfer(format!("chmod {}: {e}", remote.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_goes_to_stdin_not_onto_the_command_line() {
        let env = BTreeMap::from([("MSG".to_string(), "it's $HOME".to_string())]);
        assert_eq!(env_assignments(&env), "MSG='it'\\''s $HOME'\n");
        let cmd = shell_command("/tmp/s.sh", false, Duration::from_secs(3));
        assert_eq!(
            cmd,
            "sh -c 'set -a; eval \"$(cat)\"; set +a; if command -v timeout >/dev/null 2>&1; then exec timeout 3 \"$0\"; else exec \"$0\"; fi' '/tmp/s.sh'; rc=$?; rm -f '/tmp/s.sh'; exit $rc"
        );
        assert!(!cmd.contains("HOME"));
        assert!(shell_command("/tmp/s.sh", true, Duration::from_millis(1500)).starts_with(
            "if [ \"$(id -u)\" -eq 0 ]; then S=; else S='sudo -n -E'; fi; $S sh -c 'set -a; eval \"$(cat)\"; set +a; if command -v timeout >/dev/null 2>&1; then exec timeout 2 "
        ));
        assert!(
            !shell_command("/tmp/s.sh", false, Duration::from_secs(365 * 86400))
                .contains("timeout")
        );
    }

    /// Runs `command` with `sh -c`, `stdin` as its input.
    fn sh(command: &str, stdin: &str) -> std::process::Output {
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// The script arrives on stdin ahead of the environment; a short one is not run.
    #[test]
    fn the_script_and_its_environment_arrive_on_stdin_and_a_short_script_is_not_run() {
        let dir = std::env::temp_dir().join(format!("bakery-ssh-script-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let remote = dir.join("s.sh");
        let remote = remote.to_str().unwrap();
        let script = "#!/bin/sh\nprintf '%s|%s' \"$MSG\" \"$(stat -c %a \"$0\")\"\n";
        let env = BTreeMap::from([("MSG".to_string(), "it's $HOME\nline 2".to_string())]);
        let run = |len: usize, stdin: String| {
            sh(
                &script_command(remote, len, false, Duration::from_secs(10)),
                &stdin,
            )
        };
        let out = run(script.len(), format!("{script}{}", env_assignments(&env)));
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "it's $HOME\nline 2|700"
        );
        assert!(
            !std::path::Path::new(remote).exists(),
            "the script is removed"
        );
        // The connection dropped halfway through the script: nothing of it runs.
        let half = &script[..script.len() / 2];
        let out = run(script.len(), half.to_string());
        assert_eq!(out.status.code(), Some(125));
        assert!(String::from_utf8_lossy(&out.stderr).contains("did not arrive whole"));
        assert!(out.stdout.is_empty());
        assert!(!std::path::Path::new(remote).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The command line really runs the script with the environment from stdin.
    #[test]
    fn the_command_runs_the_script_with_the_environment_it_reads() {
        let dir = std::env::temp_dir().join(format!("bakery-ssh-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("s.sh");
        std::fs::write(&script, "#!/bin/sh\nprintf '%s|%s' \"$MSG\" \"$OTHER\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
        let env = BTreeMap::from([
            ("MSG".to_string(), "it's $HOME\nline 2".to_string()),
            ("OTHER".to_string(), "x".to_string()),
        ]);
        let command = shell_command(script.to_str().unwrap(), false, Duration::from_secs(10));
        let out = sh(&command, &env_assignments(&env));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's $HOME\nline 2|x");
        assert!(!script.exists(), "the script is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
