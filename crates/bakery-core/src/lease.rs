//! Leases: which one process may act on a shared thing (a group's rollout; later a daemon's
//! group), decided without I/O. The design is the DynamoDB Lock Client's: one record per key with
//! an owner, a lease duration, a record version number that changes at every write, and
//! heartbeats; plus a fencing token that grows by one at every new holder of the key.
//!
//! Every write is conditional on the record being what its writer read (compare-and-swap on the
//! record version number, or "absent"), so of two racing writers exactly one wins. Expiry is
//! judged by each reader on its own clock, with a [`Timing::margin`] on both sides: a holder stops
//! acting `margin` before its lease runs out, and a taker waits until `margin` after it ran out,
//! so clocks may disagree by up to twice the margin before two processes could both act.
//!
//! The I/O (the table, the heartbeat, the fence around each mutating call) lives in the `bakery`
//! crate (`src/lease.rs`); this module decides.

use std::time::Duration;

/// The table's partition key (a string): the lease's key.
pub const PARTITION_KEY: &str = "pk";
/// The table's TTL attribute (seconds since the epoch): when DynamoDB may delete the record.
pub const TTL_ATTRIBUTE: &str = "ttl";
/// The key schema a lease table must have, as error messages name it.
pub const EXPECTED_SCHEMA: &str =
    "partition key `pk` of type String (S), no sort key (and TTL on attribute `ttl`)";
/// How long a record outlives its lease before DynamoDB may delete it: while it lives, the key's
/// fencing tokens keep growing.
pub const RECORD_KEPT: Duration = Duration::from_secs(24 * 3600);

/// The key of the lease that fences the rollouts of one group.
pub fn rollout_key(region: &str, group: &str) -> String {
    format!("rollout#{region}#{group}")
}

/// One lease record, as stored (one item per key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    /// Who holds it, or held it last (`host:pid`).
    pub owner: String,
    /// The fencing token: one more than the previous holder's, never reused while the record
    /// lives.
    pub token: u64,
    /// The record version number: new at every write, the value the next write is conditional on.
    pub rvn: String,
    /// When the lease runs out (milliseconds since the epoch, on the holder's clock); 0 once
    /// released.
    pub expires_at_ms: u64,
    /// When this holder took it (milliseconds since the epoch).
    pub since_ms: u64,
}

impl Lease {
    pub fn released(&self) -> bool {
        self.expires_at_ms == 0
    }

    /// When DynamoDB may delete the record (the TTL attribute, seconds since the epoch): a day
    /// after the lease ran out, so a key nobody uses any more does not stay forever.
    pub fn record_ttl(&self, now_ms: u64) -> u64 {
        self.expires_at_ms.max(now_ms) / 1000 + RECORD_KEPT.as_secs()
    }
}

/// The timing every holder and taker of a key agrees on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease lasts from its last write.
    pub ttl: Duration,
    /// The allowance for clock disagreement and delay: a holder stops acting this long before
    /// its lease runs out; a taker waits this long after.
    pub margin: Duration,
}

impl Timing {
    /// The timing for a lease of `ttl`: a margin of a fifth of it, at most 5 s (10 s leases: 2 s).
    pub fn for_ttl(ttl: Duration) -> Timing {
        Timing {
            ttl,
            margin: (ttl / 5).min(Duration::from_secs(5)),
        }
    }

    /// How often a holder renews: every third of the TTL, so two renewals may fail before the
    /// lease runs out.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    fn ttl_ms(&self) -> u64 {
        ms(self.ttl)
    }

    fn margin_ms(&self) -> u64 {
        ms(self.margin)
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The condition a write carries, so that it lands only on the record its writer read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// No record for the key.
    Absent,
    /// The record read, whoever held it (taking an expired or released lease).
    Version { rvn: String },
    /// This holder's own record (renewing, releasing): owner, fencing token and version.
    Held {
        owner: String,
        token: u64,
        rvn: String,
    },
}

/// What a would-be holder does about a key, from the record it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// Write `write` under `expect`; if that write's condition fails, another writer won.
    Take { write: Lease, expect: Expect },
    /// Another live process holds it.
    Held { holder: Lease },
}

/// Whether a record read at `now_ms` (the reader's clock) is free to take: released, run out
/// more than the margin ago, or held by this very `me` (a predecessor with this `host:pid`,
/// which is necessarily dead since this process is alive), or by a process on this host that
/// no longer exists (`pid_alive`, as the tag lock does for a SIGKILLed run).
pub fn is_free(
    record: &Lease,
    me: &str,
    now_ms: u64,
    timing: Timing,
    pid_alive: impl Fn(u32) -> bool,
) -> bool {
    if record.released()
        || record.owner == me
        || now_ms > record.expires_at_ms.saturating_add(timing.margin_ms())
    {
        return true;
    }
    let host = |o: &str| o.rsplit_once(':').map(|(h, _)| h.to_string());
    match (host(me), record.owner.rsplit_once(':')) {
        (Some(my_host), Some((host, pid))) if host == my_host => {
            pid.parse::<u32>().map(|p| !pid_alive(p)).unwrap_or(false)
        }
        _ => false,
    }
}

/// Taking a lease: the record read (`None`: no record), who asks (`me`, `host:pid`), the
/// reader's clock, and the new record's version number (random, made by the caller).
pub fn acquire(
    key: &str,
    read: Option<&Lease>,
    me: &str,
    now_ms: u64,
    timing: Timing,
    rvn: String,
    pid_alive: impl Fn(u32) -> bool,
) -> Acquire {
    let write = |token: u64| Lease {
        key: key.to_string(),
        owner: me.to_string(),
        token,
        rvn: rvn.clone(),
        expires_at_ms: now_ms.saturating_add(timing.ttl_ms()),
        since_ms: now_ms,
    };
    match read {
        None => Acquire::Take {
            write: write(1),
            expect: Expect::Absent,
        },
        Some(r) if is_free(r, me, now_ms, timing, pid_alive) => Acquire::Take {
            write: write(r.token.saturating_add(1)),
            expect: Expect::Version { rvn: r.rvn.clone() },
        },
        Some(r) => Acquire::Held { holder: r.clone() },
    }
}

/// The write that renews `held` at `now_ms`, and its condition: still this holder's record.
pub fn renewal(held: &Lease, now_ms: u64, timing: Timing, rvn: String) -> (Lease, Expect) {
    (
        Lease {
            rvn,
            expires_at_ms: now_ms.saturating_add(timing.ttl_ms()),
            ..held.clone()
        },
        expect_held(held),
    )
}

/// The write that releases `held` (a clean stop): the record stays, run out, with its owner as
/// the last holder and its fencing token, so the next holder's token is still greater.
pub fn release(held: &Lease, rvn: String) -> (Lease, Expect) {
    (
        Lease {
            rvn,
            expires_at_ms: 0,
            ..held.clone()
        },
        expect_held(held),
    )
}

fn expect_held(held: &Lease) -> Expect {
    Expect::Held {
        owner: held.owner.clone(),
        token: held.token,
        rvn: held.rvn.clone(),
    }
}

/// Where a holder stands, on its own monotonic clock: `written_ms` is when it *sent* the last
/// write that succeeded (so a slow answer only shortens the lease), `now_ms` is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// It may act for `left` more; its next renewal is due in `renew_in` (zero: now).
    Valid { left: Duration, renew_in: Duration },
    /// Its lease runs out within the margin, or ran out: it must not act, nor write again.
    Expired,
}

pub fn standing(written_ms: u64, now_ms: u64, timing: Timing) -> Standing {
    let valid_until = written_ms
        .saturating_add(timing.ttl_ms())
        .saturating_sub(timing.margin_ms());
    if now_ms >= valid_until {
        return Standing::Expired;
    }
    let renew_at = written_ms.saturating_add(ms(timing.renew_every()));
    Standing::Valid {
        left: Duration::from_millis(valid_until - now_ms),
        renew_in: Duration::from_millis(renew_at.saturating_sub(now_ms)),
    }
}

/// Why a holder no longer holds its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// Another process took it (a greater fencing token), or wrote over it.
    To(Lease),
    /// The record is gone (deleted by hand, or by TTL long after it ran out).
    Deleted,
    /// It ran out on the holder's own clock before a renewal got through (paused, cut off).
    Expired,
}

/// The outcome of a conditional write whose condition failed, from the record the store
/// returned with the failure (`found`, the record as it is now).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// The record is the one this write wrote: an earlier attempt of the same write succeeded
    /// and its answer was lost, so the retry found its own work.
    OwnWrite,
    /// Someone else's record stands.
    Lost(Lost),
}

pub fn conflict(wrote: &Lease, found: Option<&Lease>) -> Conflict {
    match found {
        Some(f) if f.rvn == wrote.rvn => Conflict::OwnWrite,
        Some(f) => Conflict::Lost(Lost::To(f.clone())),
        None => Conflict::Lost(Lost::Deleted),
    }
}

/// Whether a table's key schema is a lease table's: `keys` are (attribute, `HASH` | `RANGE`),
/// `types` are (attribute, `S` | `N` | `B`). `Err` describes what was found instead.
pub fn check_schema(keys: &[(String, String)], types: &[(String, String)]) -> Result<(), String> {
    let type_of = |name: &str| {
        types
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
            .unwrap_or("?")
    };
    let ok = matches!(keys, [(name, kind)] if name == PARTITION_KEY && kind == "HASH")
        && type_of(PARTITION_KEY) == "S";
    if ok {
        return Ok(());
    }
    let found: Vec<String> = keys
        .iter()
        .map(|(name, kind)| {
            let role = if kind == "HASH" {
                "partition key"
            } else {
                "sort key"
            };
            format!("{role} `{name}` of type {}", type_of(name))
        })
        .collect();
    Err(if found.is_empty() {
        "no key schema".to_string()
    } else {
        found.join(", ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        ttl: Duration::from_secs(10),
        margin: Duration::from_secs(2),
    };
    const NOW: u64 = 1_800_000_000_000;

    fn record(owner: &str, token: u64, expires_at_ms: u64) -> Lease {
        Lease {
            key: "rollout#us-east-1#web".into(),
            owner: owner.into(),
            token,
            rvn: format!("v-{owner}-{token}"),
            expires_at_ms,
            since_ms: expires_at_ms.saturating_sub(10_000),
        }
    }

    fn take(read: Option<&Lease>, now: u64) -> Acquire {
        acquire(
            "rollout#us-east-1#web",
            read,
            "ci-1:200",
            now,
            T,
            "v-new".into(),
            |_| true,
        )
    }

    #[test]
    fn a_free_key_is_taken_with_token_one_on_condition_that_it_is_still_absent() {
        let Acquire::Take { write, expect } = take(None, NOW) else {
            panic!("a free key is taken")
        };
        assert_eq!(expect, Expect::Absent);
        assert_eq!(write.token, 1);
        assert_eq!(write.owner, "ci-1:200");
        assert_eq!(write.expires_at_ms, NOW + 10_000);
        assert_eq!(write.since_ms, NOW);
        assert_eq!(write.rvn, "v-new");
    }

    #[test]
    fn a_lease_another_live_process_holds_is_refused_naming_it() {
        let held = record("ci-2:300", 4, NOW + 5_000);
        assert_eq!(take(Some(&held), NOW), Acquire::Held { holder: held });
    }

    #[test]
    fn an_expired_lease_is_taken_with_the_next_token_on_condition_of_the_version_read() {
        let old = record("ci-2:300", 4, NOW - 2_001);
        let Acquire::Take { write, expect } = take(Some(&old), NOW) else {
            panic!("expired past the margin: free")
        };
        assert_eq!(write.token, 5, "the fencing token grows");
        assert_eq!(
            expect,
            Expect::Version {
                rvn: "v-ci-2:300-4".into()
            }
        );
    }

    #[test]
    fn a_lease_that_ran_out_less_than_the_margin_ago_is_still_held() {
        // The holder's clock may be behind ours: it may still be acting.
        let old = record("ci-2:300", 4, NOW - 2_000);
        assert!(matches!(take(Some(&old), NOW), Acquire::Held { .. }));
        assert!(matches!(take(Some(&old), NOW + 1), Acquire::Take { .. }));
    }

    #[test]
    fn a_released_lease_is_free_at_once_and_keeps_its_token_growing() {
        let held = record("ci-2:300", 7, NOW + 9_000);
        let (released, expect) = release(&held, "v-rel".into());
        assert_eq!(
            expect,
            Expect::Held {
                owner: "ci-2:300".into(),
                token: 7,
                rvn: "v-ci-2:300-7".into()
            }
        );
        assert!(released.released());
        assert_eq!(
            released.owner, "ci-2:300",
            "the last holder stays on record"
        );
        let Acquire::Take { write, .. } = take(Some(&released), NOW) else {
            panic!("released: free")
        };
        assert_eq!(write.token, 8);
    }

    #[test]
    fn a_lease_of_a_dead_process_on_this_host_is_free_and_of_another_host_is_not() {
        let here = record("ci-1:4242", 2, NOW + 9_000);
        let pick = |alive: bool| {
            acquire(
                "k",
                Some(&here),
                "ci-1:200",
                NOW,
                T,
                "v".into(),
                move |_| alive,
            )
        };
        assert!(matches!(pick(false), Acquire::Take { .. }), "dead here");
        assert!(matches!(pick(true), Acquire::Held { .. }), "alive here");
        let elsewhere = record("ci-9:4242", 2, NOW + 9_000);
        assert!(matches!(
            acquire(
                "k",
                Some(&elsewhere),
                "ci-1:200",
                NOW,
                T,
                "v".into(),
                |_| false
            ),
            Acquire::Held { .. }
        ));
        let same_pid = record("ci-1:200", 2, NOW + 9_000);
        assert!(
            matches!(take(Some(&same_pid), NOW), Acquire::Take { .. }),
            "a predecessor with this very host:pid is dead"
        );
    }

    #[test]
    fn renewing_keeps_owner_and_token_and_is_conditional_on_all_three() {
        let held = record("ci-1:200", 3, NOW + 4_000);
        let (next, expect) = renewal(&held, NOW, T, "v-2".into());
        assert_eq!(next.token, 3);
        assert_eq!(next.owner, "ci-1:200");
        assert_eq!(next.since_ms, held.since_ms);
        assert_eq!(next.expires_at_ms, NOW + 10_000);
        assert_eq!(next.rvn, "v-2");
        assert_eq!(
            expect,
            Expect::Held {
                owner: "ci-1:200".into(),
                token: 3,
                rvn: held.rvn.clone()
            }
        );
    }

    #[test]
    fn a_failed_renewal_is_lost_to_the_newer_token_or_to_nobody() {
        let mine = record("ci-1:200", 3, NOW + 10_000);
        let newer = record("ci-2:300", 4, NOW + 10_000);
        assert_eq!(
            conflict(&mine, Some(&newer)),
            Conflict::Lost(Lost::To(newer))
        );
        assert_eq!(conflict(&mine, None), Conflict::Lost(Lost::Deleted));
        assert_eq!(
            conflict(&mine, Some(&mine)),
            Conflict::OwnWrite,
            "a retried write that finds its own record succeeded the first time"
        );
    }

    #[test]
    fn a_holder_acts_until_the_margin_before_expiry_and_renews_every_third() {
        let written = 1_000;
        assert_eq!(
            standing(written, written, T),
            Standing::Valid {
                left: Duration::from_millis(8_000),
                renew_in: Duration::from_millis(3_333),
            }
        );
        assert_eq!(
            standing(written, written + 4_000, T),
            Standing::Valid {
                left: Duration::from_millis(4_000),
                renew_in: Duration::ZERO,
            }
        );
        assert_eq!(standing(written, written + 8_000, T), Standing::Expired);
        assert_eq!(standing(written, written + 60_000, T), Standing::Expired);
    }

    #[test]
    fn with_clocks_apart_by_less_than_twice_the_margin_holder_and_taker_never_overlap() {
        // The holder writes at its clock's H; the taker's clock runs `skew` ms ahead. Real time
        // is the holder's clock. The holder stops at H + ttl - margin; the taker takes once its
        // clock passes H + ttl + margin, i.e. at real time H + ttl + margin - skew.
        let h = NOW;
        let held = record("ci-2:300", 1, h + 10_000);
        for skew in [0u64, 1_000, 3_999] {
            let holder_stops = (0..20_000u64)
                .find(|t| standing(h, h + t, T) == Standing::Expired)
                .unwrap();
            let taker_starts = (0..20_000u64)
                .find(|t| matches!(take(Some(&held), h + t + skew), Acquire::Take { .. }))
                .unwrap();
            assert!(
                holder_stops < taker_starts,
                "skew {skew}: holder stops at +{holder_stops}, taker starts at +{taker_starts}"
            );
        }
        // Beyond twice the margin the guarantee ends: the README says so.
        let taker_starts = (0..20_000u64)
            .find(|t| matches!(take(Some(&held), h + t + 5_000), Acquire::Take { .. }))
            .unwrap();
        assert!(taker_starts < 8_000);
    }

    #[test]
    fn timing_margin_is_a_fifth_of_the_ttl_at_most_five_seconds() {
        assert_eq!(
            Timing::for_ttl(Duration::from_secs(10)).margin,
            Duration::from_secs(2)
        );
        assert_eq!(
            Timing::for_ttl(Duration::from_secs(60)).margin,
            Duration::from_secs(5)
        );
        assert_eq!(
            Timing::for_ttl(Duration::from_secs(15)).renew_every(),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn the_record_lives_a_day_past_its_lease() {
        let held = record("ci-2:300", 1, NOW + 10_000);
        assert_eq!(held.record_ttl(NOW), (NOW + 10_000) / 1000 + 86_400);
        let (released, _) = release(&held, "v".into());
        assert_eq!(released.record_ttl(NOW), NOW / 1000 + 86_400);
    }

    #[test]
    fn only_a_string_partition_key_named_pk_is_a_lease_table() {
        let s = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            check_schema(&s(&[("pk", "HASH")]), &s(&[("pk", "S")])),
            Ok(())
        );
        assert_eq!(
            check_schema(&s(&[("id", "HASH")]), &s(&[("id", "S")])),
            Err("partition key `id` of type S".into())
        );
        assert_eq!(
            check_schema(&s(&[("pk", "HASH")]), &s(&[("pk", "N")])),
            Err("partition key `pk` of type N".into())
        );
        assert_eq!(
            check_schema(
                &s(&[("pk", "HASH"), ("sk", "RANGE")]),
                &s(&[("pk", "S"), ("sk", "S")])
            ),
            Err("partition key `pk` of type S, sort key `sk` of type S".into())
        );
        assert_eq!(check_schema(&[], &[]), Err("no key schema".into()));
    }

    #[test]
    fn rollout_keys_name_region_and_group() {
        assert_eq!(rollout_key("eu-west-1", "web"), "rollout#eu-west-1#web");
    }
}
