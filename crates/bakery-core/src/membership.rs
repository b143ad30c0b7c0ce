//! Groups shared among several daemons, decided without I/O.
//!
//! With a `[lease]` table in the daemon's configuration, each daemon holds a *member lease*
//! (`daemon-member#<region>#<host:pid>`) that its heartbeat renews, and the watched groups are
//! spread over the live members by **rendezvous hashing** (highest random weight): each group goes
//! to the member with the greatest `sha256(member, group)`. Every daemon computes the same
//! assignment from the same member list, without talking to the others; a member joining or
//! leaving moves only the groups it gains or loses (about 1/N of them), and the spread is even in
//! expectation.
//!
//! The assignment only says who *should* act on a group. Who *may* is decided by the group's
//! fenced lease (`daemon-group#<region>#<group>`, [`crate::lease`]): a daemon takes it when the
//! assignment gives it the group, hands it back (released) when the assignment moves the group
//! elsewhere, and checks it before every mutating call. Two daemons that momentarily disagree on
//! the member list (one read it before a member joined) therefore never act on one group together:
//! the second taker is refused until the first releases or its lease runs out.
//!
//! Timing: the configured `ttl` is how long a silent daemon keeps its groups. The lease written
//! is `ttl` less the margin, so a taker, which waits the margin past expiry, takes a dead daemon's
//! group `ttl` after its last renewal; the holder stops acting a margin before expiry, i.e. two
//! margins before others may take over.

use std::collections::BTreeSet;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::lease::{Lease, Timing};

/// The member lease of a daemon (`host:pid`) in `region`.
pub fn member_key(region: &str, member: &str) -> String {
    format!("{}{member}", member_prefix(region))
}

/// Every member key of `region` starts with this.
pub fn member_prefix(region: &str) -> String {
    format!("daemon-member#{region}#")
}

/// The lease that fences one group's health decisions.
pub fn group_key(region: &str, group: &str) -> String {
    format!("daemon-group#{region}#{group}")
}

/// The lease timing for a configured `ttl`: the margin is a fifth of it (at most 5 s), and the
/// lease itself lasts `ttl` less the margin, so others may take over exactly `ttl` after the
/// holder's last renewal (on their clocks) while the holder stops `2 x margin` before that.
pub fn timing(ttl: Duration) -> Timing {
    let margin = (ttl / 5).min(Duration::from_secs(5));
    Timing {
        ttl: ttl.saturating_sub(margin),
        margin,
    }
}

/// Whether a member's record, read at `now_ms` on the reader's clock, shows it alive: not
/// released, and not run out more than the margin ago (the same rule a taker applies to a lease).
pub fn alive(record: &Lease, now_ms: u64, timing: Timing) -> bool {
    let margin = u64::try_from(timing.margin.as_millis()).unwrap_or(u64::MAX);
    !record.released() && now_ms <= record.expires_at_ms.saturating_add(margin)
}

/// The live members, sorted: the owners of the live member records, and `me` exactly when this
/// daemon's own membership is valid (its own record as read may be older than what it knows).
pub fn live_members(
    records: &[Lease],
    me: &str,
    me_valid: bool,
    now_ms: u64,
    timing: Timing,
) -> Vec<String> {
    let mut live: BTreeSet<String> = records
        .iter()
        .filter(|r| r.owner != me && !r.owner.is_empty() && alive(r, now_ms, timing))
        .map(|r| r.owner.clone())
        .collect();
    if me_valid {
        live.insert(me.to_string());
    }
    live.into_iter().collect()
}

fn weight(member: &str, group: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(member.as_bytes());
    h.update([0u8]);
    h.update(group.as_bytes());
    h.finalize().into()
}

/// The member that should own `group`: the one with the greatest weight (ties, which need a
/// SHA-256 collision, go to the smaller name). `None` when nobody is alive.
pub fn owner_of<'a>(group: &str, members: &'a [String]) -> Option<&'a str> {
    members
        .iter()
        .map(|m| (weight(m, group), std::cmp::Reverse(m)))
        .max()
        .map(|(_, std::cmp::Reverse(m))| m.as_str())
}

/// What a daemon does with the group leases this round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Assigned to this daemon and not held: take their leases.
    pub take: Vec<String>,
    /// Held and still assigned to this daemon: keep them (the heartbeat renews them).
    pub keep: Vec<String>,
    /// Held but assigned elsewhere now (a member joined), or no longer watched, or this daemon's
    /// membership is not valid: release their leases so the new owner can take them at once.
    pub release: Vec<String>,
}

/// The plan of `me` for the `watched` groups, given the `live` members and the groups whose
/// leases it holds (`held`). A daemon whose own membership is not valid (not in `live`) owns
/// nothing: it releases what it holds, and the others, which no longer see it, take over.
pub fn plan(watched: &[String], live: &[String], me: &str, held: &BTreeSet<String>) -> Plan {
    let mut p = Plan::default();
    let mine: BTreeSet<&str> = watched
        .iter()
        .filter(|g| owner_of(g, live) == Some(me))
        .map(String::as_str)
        .collect();
    for g in &mine {
        if held.contains(*g) {
            p.keep.push(g.to_string());
        } else {
            p.take.push(g.to_string());
        }
    }
    p.release = held
        .iter()
        .filter(|g| !mine.contains(g.as_str()))
        .cloned()
        .collect();
    p
}

/// Whether taking a group's lease whose record is `previous` takes it over from another daemon
/// (it was neither released nor this daemon's): what `bakery_takeovers_total` counts.
pub fn is_takeover(previous: Option<&Lease>, me: &str) -> bool {
    previous.is_some_and(|r| !r.released() && r.owner != me)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn member(owner: &str, expires_at_ms: u64) -> Lease {
        Lease {
            key: member_key("us-east-1", owner),
            owner: owner.into(),
            token: 1,
            rvn: "v".into(),
            expires_at_ms,
            since_ms: 0,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn groups(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("web-{i}")).collect()
    }

    #[test]
    fn keys_name_region_and_member_or_group() {
        assert_eq!(
            member_key("us-east-1", "h1:42"),
            "daemon-member#us-east-1#h1:42"
        );
        assert!(member_key("us-east-1", "h1:42").starts_with(&member_prefix("us-east-1")));
        assert_eq!(group_key("eu-west-1", "web"), "daemon-group#eu-west-1#web");
    }

    #[test]
    fn others_take_over_exactly_ttl_after_the_last_renewal_and_the_holder_stops_before() {
        let t = timing(Duration::from_secs(15));
        assert_eq!(t.margin, Duration::from_secs(3));
        assert_eq!(t.ttl, Duration::from_secs(12));
        // Written at NOW: lease runs to NOW + 12 s; takers wait the margin past it: NOW + 15 s.
        let m = member("h2:1", NOW + 12_000);
        assert!(alive(&m, NOW + 15_000, t));
        assert!(!alive(&m, NOW + 15_001, t));
        // The holder stops acting a margin before expiry: NOW + 9 s, 6 s before any taker.
        assert_eq!(
            crate::lease::standing(0, 9_000, t),
            crate::lease::Standing::Expired
        );
        let long = timing(Duration::from_secs(60));
        assert_eq!(long.margin, Duration::from_secs(5));
        assert_eq!(long.ttl, Duration::from_secs(55));
    }

    #[test]
    fn a_released_member_is_gone_at_once() {
        let t = timing(Duration::from_secs(15));
        let mut m = member("h2:1", NOW + 12_000);
        m.expires_at_ms = 0;
        assert!(!alive(&m, NOW, t));
    }

    #[test]
    fn live_members_are_the_unexpired_others_and_me_only_while_my_membership_is_valid() {
        let t = timing(Duration::from_secs(15));
        let records = vec![
            member("h1:1", NOW + 10_000),
            member("h2:2", NOW - 4_000), // ran out 4 s ago, margin 3 s: dead
            member("h3:3", NOW - 2_000), // ran out 2 s ago: still counted
            member("me:9", NOW - 60_000), // my own record as read: what I know decides
        ];
        assert_eq!(
            live_members(&records, "me:9", true, NOW, t),
            names(&["h1:1", "h3:3", "me:9"])
        );
        assert_eq!(
            live_members(&records, "me:9", false, NOW, t),
            names(&["h1:1", "h3:3"])
        );
    }

    #[test]
    fn every_group_has_exactly_one_owner_and_all_members_agree() {
        let live = names(&["a:1", "b:2", "c:3"]);
        for g in groups(40) {
            let owner = owner_of(&g, &live).unwrap();
            // Another daemon with the members in another order computes the same owner.
            let mut shuffled = live.clone();
            shuffled.reverse();
            assert_eq!(owner_of(&g, &shuffled), Some(owner));
            let owners: Vec<&str> = live
                .iter()
                .filter(|m| {
                    plan(std::slice::from_ref(&g), &live, m, &BTreeSet::new()).take
                        == vec![g.clone()]
                })
                .map(String::as_str)
                .collect();
            assert_eq!(owners, vec![owner], "{g}");
        }
        assert_eq!(owner_of("web", &[]), None);
    }

    #[test]
    fn groups_spread_evenly_over_the_members() {
        let live = names(&["ip-10-0-1-5:811", "ip-10-0-2-9:812", "ip-10-0-3-7:813"]);
        let all = groups(300);
        for m in &live {
            let n = all
                .iter()
                .filter(|g| owner_of(g, &live) == Some(m.as_str()))
                .count();
            assert!((70..=130).contains(&n), "{m} owns {n} of 300");
        }
    }

    #[test]
    fn a_member_leaving_moves_only_its_own_groups_and_one_joining_takes_about_a_share() {
        let three = names(&["a:1", "b:2", "c:3"]);
        let two = names(&["a:1", "b:2"]);
        let all = groups(200);
        for g in &all {
            let with_c = owner_of(g, &three).unwrap();
            let without_c = owner_of(g, &two).unwrap();
            // c leaving moves only c's groups; c joining takes groups only for itself.
            assert!(
                with_c == without_c || with_c == "c:3",
                "{g} moved between a and b"
            );
        }
        let to_c = all
            .iter()
            .filter(|g| owner_of(g, &three) == Some("c:3"))
            .count();
        assert!((40..=95).contains(&to_c), "c:3 took {to_c} of 200");
    }

    #[test]
    fn the_plan_takes_what_is_assigned_keeps_what_is_held_and_releases_the_rest() {
        let live = names(&["a:1", "b:2"]);
        let all = groups(20);
        let mut mine: Vec<String> = all
            .iter()
            .filter(|g| owner_of(g, &live) == Some("a:1"))
            .cloned()
            .collect();
        mine.sort();
        let theirs: Vec<String> = all
            .iter()
            .filter(|g| owner_of(g, &live) == Some("b:2"))
            .cloned()
            .collect();
        assert!(!mine.is_empty() && !theirs.is_empty());
        let held: BTreeSet<String> = [mine[0].clone(), theirs[0].clone(), "gone".to_string()]
            .into_iter()
            .collect();
        let p = plan(&all, &live, "a:1", &held);
        assert_eq!(p.keep, vec![mine[0].clone()]);
        assert_eq!(p.take, mine[1..].to_vec());
        let mut release = vec![theirs[0].clone(), "gone".to_string()];
        release.sort();
        assert_eq!(
            p.release, release,
            "assigned elsewhere, or no longer watched"
        );
    }

    #[test]
    fn without_a_valid_membership_a_daemon_owns_nothing_and_releases_all() {
        let live = names(&["b:2"]); // a:1 is not in it: its membership lapsed
        let held: BTreeSet<String> = groups(3).into_iter().collect();
        let p = plan(&groups(3), &live, "a:1", &held);
        assert!(p.take.is_empty() && p.keep.is_empty());
        assert_eq!(p.release, groups(3));
    }

    #[test]
    fn a_takeover_is_a_lease_taken_from_another_daemon_that_did_not_release_it() {
        let mut r = member("b:2", NOW);
        assert!(is_takeover(Some(&r), "a:1"));
        assert!(!is_takeover(Some(&r), "b:2"));
        r.expires_at_ms = 0;
        assert!(!is_takeover(Some(&r), "a:1"), "released: handed over");
        assert!(!is_takeover(None, "a:1"));
    }
}
