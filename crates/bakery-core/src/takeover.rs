//! The health daemon's takeover of a group's health decisions, as a record and as decisions.
//!
//! While a daemon owns a group's health decisions, `HealthCheck` is suspended (load-balancer
//! health alone no longer kills instances) and the group carries the record
//! [`TAKEOVER_TAG`](crate::marks::TAKEOVER_TAG): who owns it, until when, and whether the daemon
//! suspended `HealthCheck` itself. That last bit is what makes a takeover safe to end: a daemon
//! (or `gc`, or the next daemon) resumes `HealthCheck` only when a daemon suspended it; a group a
//! person suspended stays suspended through daemon stops, crashes, `gc` and restarts.
//!
//! The rules, each a pure function below:
//! - the record is written before `HealthCheck` is suspended and `HealthCheck` is resumed before
//!   the record is deleted, so a group that is suspended without a record was suspended by
//!   someone else ([`claim`]);
//! - a record whose owner lives is never touched by another daemon; a record whose owner is dead
//!   (a process of this host that no longer exists) or whose expiry passed is stale at once, and
//!   whoever takes it over inherits its duty to resume ([`claim`], [`undo`]);
//! - a daemon ends only its own takeovers ([`release`]);
//! - every mutating call is made on a read younger than [`FRESH_READ`] and within the daemon's
//!   own takeover ([`may_mutate`], [`may_act`]): a daemon paused past its expiry (SIGSTOP,
//!   a stalled VM) reads again before it changes anything.
//!
//! Tags are records, not locks: two daemons that read a group at the same moment can both write
//! their record, and the last write wins; the loser sees the winner's record at its next read
//! and watches only. A lease with a fencing token (DynamoDB) is what would make that impossible.

use std::time::Duration;

use crate::marks::Lock;

/// The Auto Scaling process a daemon suspends while it owns a group's health decisions.
pub const HEALTH_CHECK: &str = "HealthCheck";

/// How old a read may be when a mutating call is made on it. A daemon's reads and the calls
/// they lead to are milliseconds apart; a read this old means the process was paused (or the API
/// stalled), and another daemon may have taken the group over since.
pub const FRESH_READ: Duration = Duration::from_secs(5);

/// The record on a group whose health decisions a daemon owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    pub lock: Lock,
    /// The daemon suspended `HealthCheck` itself, so the takeover's end resumes it. False when
    /// `HealthCheck` was already suspended (by a person) when the daemon took the group over.
    pub resumes: bool,
}

impl Takeover {
    pub fn encode(&self) -> String {
        format!("{};hc={}", self.lock.encode(), u8::from(self.resumes))
    }

    /// A record without `hc` was written by a daemon that wrote records only when it suspended
    /// `HealthCheck` itself: it resumes.
    pub fn decode(s: &str) -> Option<Takeover> {
        let lock = Lock::decode(s)?;
        let resumes = s
            .split(';')
            .find_map(|p| p.strip_prefix("hc="))
            .map(|v| v != "0")
            .unwrap_or(true);
        Some(Takeover { lock, resumes })
    }

    /// Why this record no longer holds at `now`, if it does not: its owner (a process of this
    /// host) is gone, or it expired.
    pub fn stale_because(
        &self,
        now: u64,
        this_host: &str,
        pid_alive: impl Fn(u32) -> bool,
    ) -> Option<String> {
        if !self.lock.is_stale(now, this_host, pid_alive) {
            return None;
        }
        Some(if now >= self.lock.expires {
            format!("it expired {}s ago", now.saturating_sub(self.lock.expires))
        } else {
            "its process on this host is gone".to_string()
        })
    }
}

/// What a daemon does with a group it watches, given the group as just read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Another daemon, alive, owns the group's health decisions: watch only, change nothing.
    Foreign { owner: String },
    /// Ours, recorded, `HealthCheck` suspended; `renew` when a third of the lifetime is used.
    Held { renew: bool },
    /// Take it (or take it again): write the record (with `resumes`) first, then suspend
    /// `HealthCheck` if `suspend`. `from` names the owner of the stale record it replaces.
    Take {
        resumes: bool,
        suspend: bool,
        from: Option<String>,
    },
}

/// The group's takeover record as read (`tag`), whether `HealthCheck` is suspended, this
/// daemon's token and its own last record for the group (`mine`), and the time.
pub struct Seen<'a> {
    pub tag: Option<&'a str>,
    pub suspended: bool,
    pub now: u64,
}

/// Who is asking: this daemon's token, its last record of the group, the takeover lifetime, and
/// how to tell a dead process of this host.
pub struct Me<'a, F: Fn(u32) -> bool> {
    pub token: &'a str,
    pub mine: Option<&'a Takeover>,
    pub ttl: Duration,
    pub host: &'a str,
    pub pid_alive: F,
}

pub fn claim<F: Fn(u32) -> bool>(seen: &Seen, me: &Me<F>) -> Claim {
    let record = seen.tag.and_then(Takeover::decode);
    let ttl = me.ttl.as_secs();
    match &record {
        Some(r)
            if r.lock.token != me.token && !r.lock.is_stale(seen.now, me.host, &me.pid_alive) =>
        {
            return Claim::Foreign {
                owner: r.lock.owner.clone(),
            }
        }
        Some(r) if r.lock.token == me.token && seen.now < r.lock.expires && seen.suspended => {
            return Claim::Held {
                renew: r.lock.expires.saturating_sub(seen.now) < ttl.saturating_mul(2) / 3,
            }
        }
        _ => {}
    }
    // Not held by anyone alive: ours but `HealthCheck` was resumed behind our back, ours but
    // expired (we were paused), a stale record of another daemon, no record (or one that cannot
    // be read). Who resumes `HealthCheck` at the end: whoever suspended it. A suspension with no
    // record and no memory of ours was made by someone else.
    let inherited = match &record {
        Some(r) => Some(r.resumes),
        None => me.mine.map(|m| m.resumes),
    };
    Claim::Take {
        resumes: if seen.suspended {
            inherited.unwrap_or(false)
        } else {
            true
        },
        suspend: !seen.suspended,
        from: record
            .filter(|r| r.lock.token != me.token)
            .map(|r| r.lock.owner),
    }
}

/// [`claim`] for a daemon that holds the group's fenced lease (a `[lease]` table shares the
/// groups among daemons): the lease, not the tag, says who owns the group, so another daemon's
/// record, alive or not, is inherited (with its duty to resume `HealthCheck`) instead of respected.
/// The tag stays the record of the `HealthCheck` suspension.
pub fn claim_leased<F: Fn(u32) -> bool>(seen: &Seen, me: &Me<F>) -> Claim {
    match claim(seen, me) {
        Claim::Foreign { owner } => {
            let resumes = seen
                .tag
                .and_then(Takeover::decode)
                .is_none_or(|r| r.resumes);
            Claim::Take {
                resumes: if seen.suspended { resumes } else { true },
                suspend: !seen.suspended,
                from: Some(owner),
            }
        }
        c => c,
    }
}

/// A takeover record with the fingerprint of the owner's configuration for the group
/// (`;cfg=<fingerprint>`, ignored by readers that do not know it).
pub fn with_config(record: &str, fingerprint: &str) -> String {
    format!("{record};cfg={fingerprint}")
}

/// When the group's record (`tag`) belongs to another daemon whose configuration for the group
/// differs from this daemon's (`mine`, a fingerprint): that owner and its fingerprint. The owner's
/// configuration is the one that acts; this daemon only warns.
pub fn config_differs(tag: Option<&str>, token: &str, mine: &str) -> Option<(String, String)> {
    let tag = tag?;
    let r = Takeover::decode(tag)?;
    let theirs = tag.split(';').find_map(|p| p.strip_prefix("cfg="))?;
    (r.lock.token != token && theirs != mine).then(|| (r.lock.owner, theirs.to_string()))
}

/// Why a mutating call must not be made now, if it must not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The read the call would rest on is too old: read again.
    StaleRead { age: Duration },
    /// This daemon's own takeover of the group expired (it was paused?): read again.
    Expired { ago: u64 },
    /// The group's record (read again just now) is not this daemon's.
    NotOwner { owner: Option<String> },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::StaleRead { age } => write!(
                f,
                "the group was read {:.1}s ago, too long to act on (was the daemon paused?)",
                age.as_secs_f64()
            ),
            Refusal::Expired { ago } => write!(
                f,
                "this daemon's takeover of the group expired {ago}s ago (was it paused?)"
            ),
            Refusal::NotOwner { owner: Some(o) } => {
                write!(
                    f,
                    "another daemon ({o}) owns the group's health decisions now"
                )
            }
            Refusal::NotOwner { owner: None } => {
                write!(
                    f,
                    "the group no longer carries this daemon's takeover record"
                )
            }
        }
    }
}

/// Whether a mutating call may rest on a read `read_age` old, within this daemon's takeover
/// lasting until `expires` (`None`: no takeover yet, as before the first record is written).
pub fn may_mutate(read_age: Duration, expires: Option<u64>, now: u64) -> Result<(), Refusal> {
    if read_age > FRESH_READ {
        return Err(Refusal::StaleRead { age: read_age });
    }
    match expires {
        Some(e) if now >= e => Err(Refusal::Expired {
            ago: now.saturating_sub(e),
        }),
        _ => Ok(()),
    }
}

/// Whether this daemon may mark an instance of a group whose record reads `tag` (read again
/// `read_age` ago, just before acting): the record must be its own and unexpired.
pub fn may_act(
    tag: Option<&str>,
    token: &str,
    read_age: Duration,
    now: u64,
) -> Result<(), Refusal> {
    let record = tag.and_then(Takeover::decode);
    match record {
        Some(r) if r.lock.token == token => may_mutate(read_age, Some(r.lock.expires), now),
        Some(r) => Err(Refusal::NotOwner {
            owner: Some(r.lock.owner),
        }),
        None => Err(Refusal::NotOwner { owner: None }),
    }
}

/// How a takeover ends: resume `HealthCheck` (only when a daemon suspended it), then delete the
/// record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undo {
    pub resume: bool,
    pub owner: String,
    /// For people: why it ends, and what becomes of `HealthCheck`.
    pub why: String,
}

fn undo_of(r: &Takeover, why: String) -> Undo {
    Undo {
        resume: r.resumes,
        owner: r.lock.owner.clone(),
        why: if r.resumes {
            format!(
                "health takeover by {} is over ({why}): HealthCheck is resumed",
                r.lock.owner
            )
        } else {
            format!(
                "health takeover by {} is over ({why}): HealthCheck stays suspended (it was suspended before the daemon took over)",
                r.lock.owner
            )
        },
    }
}

/// At a daemon's stop: its own takeovers end, nobody else's.
pub fn release(tag: Option<&str>, token: &str) -> Option<Undo> {
    let r = tag.and_then(Takeover::decode)?;
    (r.lock.token == token).then(|| undo_of(&r, "its daemon stopped".into()))
}

/// At a daemon's stop when the groups could not be read again in time (a loaded API): a
/// takeover ends on what the daemon last knew, but only one its last read showed as its own
/// (`confirmed`: a record it just wrote may have lost a race to another daemon's) and that has
/// not expired (until then no other daemon may take the group).
pub fn release_from_memory(mine: &Takeover, confirmed: bool, now: u64) -> Option<Undo> {
    (confirmed && now < mine.lock.expires).then(|| undo_of(mine, "its daemon stopped".into()))
}

/// At a daemon's start and in `gc`: a takeover whose owner is dead or whose record expired ends
/// at once (no waiting period: a stale record is a group whose `HealthCheck` nobody tends).
pub fn undo(
    tag: Option<&str>,
    now: u64,
    this_host: &str,
    pid_alive: impl Fn(u32) -> bool,
) -> Option<Undo> {
    let r = tag.and_then(Takeover::decode)?;
    let why = r.stale_because(now, this_host, pid_alive)?;
    Some(undo_of(&r, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn record(owner: &str, token: &str, expires: u64, resumes: bool) -> String {
        Takeover {
            lock: Lock {
                owner: owner.into(),
                token: token.into(),
                since: 100,
                expires,
            },
            resumes,
        }
        .encode()
    }

    fn me<'a>(mine: Option<&'a Takeover>, alive: bool) -> Me<'a, impl Fn(u32) -> bool> {
        Me {
            token: "mine",
            mine,
            ttl: TTL,
            host: "h1",
            pid_alive: move |_| alive,
        }
    }

    fn seen(tag: Option<&str>, suspended: bool) -> Seen<'_> {
        Seen {
            tag,
            suspended,
            now: 1000,
        }
    }

    #[test]
    fn with_the_lease_another_live_daemons_record_is_inherited_not_respected() {
        let theirs = record("h2:7", "other", 1060, false);
        assert!(matches!(
            claim(&seen(Some(&theirs), true), &me(None, true)),
            Claim::Foreign { .. }
        ));
        assert_eq!(
            claim_leased(&seen(Some(&theirs), true), &me(None, true)),
            Claim::Take {
                resumes: false,
                suspend: false,
                from: Some("h2:7".into())
            },
            "a person's suspension stays a person's"
        );
        let resumed = record("h2:7", "other", 1060, true);
        assert_eq!(
            claim_leased(&seen(Some(&resumed), false), &me(None, true)),
            Claim::Take {
                resumes: true,
                suspend: true,
                from: Some("h2:7".into())
            }
        );
        let mine = record("h1:1", "mine", 1060, true);
        assert_eq!(
            claim_leased(&seen(Some(&mine), true), &me(None, true)),
            claim(&seen(Some(&mine), true), &me(None, true))
        );
    }

    #[test]
    fn a_different_configuration_of_the_owner_is_named_and_old_readers_ignore_it() {
        let tag = with_config(&record("h2:7", "other", 1060, true), "ab12cd34");
        assert_eq!(Takeover::decode(&tag).unwrap().lock.owner, "h2:7");
        assert!(Takeover::decode(&tag).unwrap().resumes);
        assert_eq!(
            config_differs(Some(&tag), "mine", "ffff0000"),
            Some(("h2:7".into(), "ab12cd34".into()))
        );
        assert_eq!(config_differs(Some(&tag), "mine", "ab12cd34"), None);
        assert_eq!(
            config_differs(Some(&tag), "other", "ffff0000"),
            None,
            "its own record"
        );
        let plain = record("h2:7", "other", 1060, true);
        assert_eq!(config_differs(Some(&plain), "mine", "ffff0000"), None);
        assert_eq!(config_differs(None, "mine", "ffff0000"), None);
    }

    #[test]
    fn a_record_says_whether_its_daemon_suspended_health_check() {
        let t = Takeover::decode(&record("h1:7", "abc", 1060, false)).unwrap();
        assert!(!t.resumes);
        assert_eq!(t.lock.owner, "h1:7");
        assert!(t.encode().len() < 256);
        // Records of daemons before the flag existed: they suspended it themselves.
        let old = "owner=h1:7;token=abc;since=100;expires=1060";
        assert!(Takeover::decode(old).unwrap().resumes);
        assert_eq!(Takeover::decode("garbage"), None);
    }

    #[test]
    fn a_group_nobody_holds_is_taken_and_suspended_after_the_record() {
        assert_eq!(
            claim(&seen(None, false), &me(None, true)),
            Claim::Take {
                resumes: true,
                suspend: true,
                from: None
            }
        );
    }

    #[test]
    fn a_group_a_person_suspended_is_adopted_without_the_duty_to_resume() {
        assert_eq!(
            claim(&seen(None, true), &me(None, true)),
            Claim::Take {
                resumes: false,
                suspend: false,
                from: None
            }
        );
    }

    #[test]
    fn a_live_daemons_record_is_left_alone() {
        let tag = record("h2:9", "theirs", 1060, true);
        assert_eq!(
            claim(&seen(Some(&tag), true), &me(None, false)),
            Claim::Foreign {
                owner: "h2:9".into()
            },
            "another host's daemon is trusted until its record expires"
        );
        let local = record("h1:9", "theirs", 1060, true);
        assert_eq!(
            claim(&seen(Some(&local), true), &me(None, true)),
            Claim::Foreign {
                owner: "h1:9".into()
            }
        );
    }

    #[test]
    fn a_dead_or_expired_daemons_record_is_taken_over_with_its_duty() {
        // Its process on this host is gone: at once.
        let dead = record("h1:9", "theirs", 1060, true);
        assert_eq!(
            claim(&seen(Some(&dead), true), &me(None, false)),
            Claim::Take {
                resumes: true,
                suspend: false,
                from: Some("h1:9".into())
            }
        );
        // Expired, and HealthCheck had been suspended by a person before that daemon came.
        let expired = record("h2:9", "theirs", 999, false);
        assert_eq!(
            claim(&seen(Some(&expired), true), &me(None, true)),
            Claim::Take {
                resumes: false,
                suspend: false,
                from: Some("h2:9".into())
            }
        );
        // Expired and HealthCheck resumed since: suspended again, by us.
        assert_eq!(
            claim(&seen(Some(&expired), false), &me(None, true)),
            Claim::Take {
                resumes: true,
                suspend: true,
                from: Some("h2:9".into())
            }
        );
    }

    #[test]
    fn our_own_record_is_renewed_once_a_third_of_it_is_used() {
        let fresh = record("h1:1", "mine", 1055, true);
        assert_eq!(
            claim(&seen(Some(&fresh), true), &me(None, true)),
            Claim::Held { renew: false }
        );
        let old = record("h1:1", "mine", 1039, true);
        assert_eq!(
            claim(&seen(Some(&old), true), &me(None, true)),
            Claim::Held { renew: true }
        );
    }

    #[test]
    fn our_record_expired_or_deleted_is_taken_again_with_what_we_knew() {
        // Paused past our expiry, nobody took it: taken again, still resuming at the end.
        let expired = record("h1:1", "mine", 990, true);
        assert_eq!(
            claim(&seen(Some(&expired), true), &me(None, true)),
            Claim::Take {
                resumes: true,
                suspend: false,
                from: None
            }
        );
        // Someone deleted our record while HealthCheck stays suspended by us.
        let mine = Takeover::decode(&record("h1:1", "mine", 1050, true)).unwrap();
        assert_eq!(
            claim(&seen(None, true), &me(Some(&mine), true)),
            Claim::Take {
                resumes: true,
                suspend: false,
                from: None
            }
        );
        // Someone resumed HealthCheck behind our back: suspended again (record first).
        let held = record("h1:1", "mine", 1050, false);
        assert_eq!(
            claim(&seen(Some(&held), false), &me(None, true)),
            Claim::Take {
                resumes: true,
                suspend: true,
                from: None
            }
        );
    }

    #[test]
    fn a_mutating_call_rests_on_a_fresh_read_within_the_takeover() {
        assert_eq!(
            may_mutate(Duration::from_millis(30), Some(1060), 1000),
            Ok(())
        );
        assert_eq!(may_mutate(Duration::from_millis(30), None, 1000), Ok(()));
        assert_eq!(
            may_mutate(Duration::from_secs(40), Some(1060), 1000),
            Err(Refusal::StaleRead {
                age: Duration::from_secs(40)
            })
        );
        assert_eq!(
            may_mutate(Duration::from_millis(30), Some(990), 1000),
            Err(Refusal::Expired { ago: 10 })
        );
    }

    #[test]
    fn an_instance_is_marked_only_under_our_own_live_record() {
        let ours = record("h1:1", "mine", 1060, true);
        let short = Duration::from_millis(20);
        assert_eq!(may_act(Some(&ours), "mine", short, 1000), Ok(()));
        assert_eq!(
            may_act(Some(&ours), "mine", short, 1070),
            Err(Refusal::Expired { ago: 10 }),
            "paused past the expiry: SIGCONT does not act"
        );
        let theirs = record("h2:2", "theirs", 1060, true);
        assert!(may_act(Some(&theirs), "mine", short, 1000)
            .unwrap_err()
            .to_string()
            .contains("another daemon (h2:2)"));
        assert_eq!(
            may_act(None, "mine", short, 1000),
            Err(Refusal::NotOwner { owner: None })
        );
    }

    #[test]
    fn a_stopping_daemon_ends_only_its_own_takeovers() {
        let ours = record("h1:1", "mine", 1060, true);
        assert!(release(Some(&ours), "mine").unwrap().resume);
        let adopted = record("h1:1", "mine", 1060, false);
        let u = release(Some(&adopted), "mine").unwrap();
        assert!(!u.resume);
        assert!(u.why.contains("HealthCheck stays suspended"), "{}", u.why);
        let theirs = record("h1:2", "theirs", 1060, true);
        assert_eq!(
            release(Some(&theirs), "mine"),
            None,
            "the winner's record is not the loser's to end"
        );
        assert_eq!(release(None, "mine"), None);
    }

    #[test]
    fn without_a_fresh_read_a_stop_ends_only_confirmed_live_takeovers() {
        let mine = Takeover::decode(&record("h1:1", "mine", 1060, true)).unwrap();
        assert!(release_from_memory(&mine, true, 1000).unwrap().resume);
        assert_eq!(
            release_from_memory(&mine, false, 1000),
            None,
            "written, never read back: it may have lost a race"
        );
        assert_eq!(
            release_from_memory(&mine, true, 1060),
            None,
            "expired: another daemon may own it now"
        );
        let adopted = Takeover::decode(&record("h1:1", "mine", 1060, false)).unwrap();
        assert!(!release_from_memory(&adopted, true, 1000).unwrap().resume);
    }

    #[test]
    fn a_takeover_whose_owner_is_dead_or_expired_is_undone_at_once() {
        let live = record("h1:9", "t", 1060, true);
        assert_eq!(undo(Some(&live), 1000, "h1", |_| true), None);
        let u = undo(Some(&live), 1000, "h1", |_| false).unwrap();
        assert!(u.resume);
        assert!(
            u.why.contains("its process on this host is gone"),
            "{}",
            u.why
        );
        assert!(u.why.contains("HealthCheck is resumed"), "{}", u.why);
        // Another host's daemon: trusted until the expiry, stale from the very second after.
        assert_eq!(undo(Some(&live), 1059, "h2", |_| false), None);
        let u = undo(Some(&live), 1060, "h2", |_| true).unwrap();
        assert!(u.why.contains("expired 0s ago"), "{}", u.why);
        let adopted = record("h1:9", "t", 1060, false);
        assert!(!undo(Some(&adopted), 2000, "h1", |_| true).unwrap().resume);
    }
}
