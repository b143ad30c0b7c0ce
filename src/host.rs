//! Who this process is, for the owner fields of locks and takeovers (`host:pid`), and whether a
//! process on this host still lives: a lock held by a dead process here may be taken over at
//! once, while one held elsewhere is trusted until it expires.

/// This machine's host name, from gethostname(2) (so it works where /proc is restricted, as
/// under systemd's `ProcSubset=pid`).
pub fn hostname() -> String {
    let name = gethostname::gethostname()
        .to_string_lossy()
        .trim()
        .to_string();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// `host:pid` of this process.
pub fn owner() -> String {
    format!("{}:{}", hostname(), std::process::id())
}

/// Whether process `pid` exists on this host: signal 0, where "not permitted" still means it
/// exists (another user's process), unlike a look in /proc, which hidepid or systemd's
/// ProtectProc= can blind.
pub fn pid_alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_is_alive_and_named() {
        assert!(super::pid_alive(std::process::id()));
        assert!(!super::pid_alive(u32::MAX - 1));
        assert!(super::owner().ends_with(&format!(":{}", std::process::id())));
        assert!(!super::hostname().is_empty());
    }
}
