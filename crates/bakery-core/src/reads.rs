//! The health daemon's API reads under its budget, as plain arithmetic: how many calls a round
//! costs, how often rounds can come at the configured rate (the effective interval), what to say
//! when `interval` x `rate` cannot cover a round, and in which order a round's reads go out.
//!
//! A round reads its groups (one DescribeAutoScalingGroups per 100 names and one per tag
//! selector), the EC2 status checks (two filtered DescribeInstanceStatus calls, however many
//! instances) and one DescribeTargetHealth per target group; takeover renewals add one call per
//! third of the takeover's lifetime, and a round that replaces an instance reads its group again
//! and marks it (two calls, kept in reserve). When the calls do not fit in one interval at the
//! configured rate, rounds stretch to what the budget allows rather than fail: a read cut short
//! is carried over, never thrown away, and reads of suspect instances go first.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::daemon_config::Config;
use crate::observe::GroupFacts;

/// DescribeAutoScalingGroups takes at most this many names per call.
pub const NAMES_PER_CALL: usize = 100;
/// DescribeInstanceStatus calls per round: one filtered on instance status, one on system status.
pub const STATUS_CALLS: u32 = 2;
/// Calls kept for a round that replaces: the group read again, and SetInstanceHealth.
pub const ACT_RESERVE: u32 = 2;

/// The calls of one round, by kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub group_calls: u32,
    pub status_calls: u32,
    pub target_groups: u32,
    /// Takeover renewals per round (one call renews every group held, once a third of the
    /// lifetime is used).
    pub renewals: f64,
    pub reserve: u32,
}

impl Estimate {
    /// The reads of a round (what `bakery_api_calls_total` grows by in a quiet round, renewals
    /// aside).
    pub fn reads(&self) -> u32 {
        self.group_calls + self.status_calls + self.target_groups
    }

    /// Everything the budget must cover per round.
    pub fn per_round(&self) -> f64 {
        f64::from(self.reads() + self.reserve) + self.renewals
    }
}

fn group_calls(config: &Config) -> u32 {
    let names = config.named_groups().len();
    (names.div_ceil(NAMES_PER_CALL) + config.tag_selectors().len()) as u32
}

fn renewals(config: &Config) -> f64 {
    let every = config.takeover_ttl.as_secs_f64() / 3.0;
    if every > 0.0 {
        (config.interval.as_secs_f64() / every).min(1.0)
    } else {
        1.0
    }
}

/// From the configuration alone (`daemon --check`): each selector is assumed to bring one group
/// with one target group.
pub fn from_config(config: &Config) -> Estimate {
    Estimate {
        group_calls: group_calls(config),
        status_calls: STATUS_CALLS,
        target_groups: config.groups.len() as u32,
        renewals: renewals(config),
        reserve: ACT_RESERVE,
    }
}

/// From the groups as read: their target groups, counted once each.
pub fn from_groups(config: &Config, groups: &[GroupFacts]) -> Estimate {
    let tgs: BTreeSet<&String> = groups.iter().flat_map(|g| &g.target_groups).collect();
    Estimate {
        target_groups: tgs.len() as u32,
        ..from_config(config)
    }
}

/// The time `calls` take at `rate` calls a second.
fn time_for(calls: f64, rate: f64) -> Duration {
    Duration::try_from_secs_f64(calls / rate).unwrap_or(Duration::MAX)
}

/// How often rounds can come: the configured interval, or longer when the budget cannot cover a
/// round within it.
pub fn effective_interval(e: &Estimate, rate: f64, interval: Duration) -> Duration {
    interval.max(time_for(e.per_round(), rate))
}

/// What to tell a user whose budget cannot cover a round within the interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Advice {
    pub calls: f64,
    pub interval: Duration,
    pub rate: f64,
    /// The interval rounds will actually take.
    pub effective: Duration,
    /// The smallest interval the rate covers, and the smallest rate that covers the interval.
    pub min_interval: Duration,
    pub min_rate: f64,
}

impl std::fmt::Display for Advice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "about {:.1} API calls per round do not fit in interval {:.1}s x [api] rate {}/s = {:.1} calls: rounds will come every {:.1}s instead (detection slows accordingly); set interval to at least \"{}s\" or [api] rate to at least {}",
            self.calls,
            self.interval.as_secs_f64(),
            self.rate,
            self.interval.as_secs_f64() * self.rate,
            self.effective.as_secs_f64(),
            self.min_interval.as_secs_f64().ceil() as u64,
            (self.min_rate * 10.0).ceil() / 10.0,
        )
    }
}

/// `None` when `interval` x `rate` covers a round.
pub fn advice(e: &Estimate, rate: f64, interval: Duration) -> Option<Advice> {
    let calls = e.per_round();
    let effective = effective_interval(e, rate, interval);
    (effective > interval).then(|| Advice {
        calls,
        interval,
        rate,
        effective,
        min_interval: effective,
        min_rate: calls / interval.as_secs_f64().max(f64::MIN_POSITIVE),
    })
}

/// How long a round's reads may take before the rest is carried over to the next round: twice
/// the (effective) interval, at least 5 s (a loaded endpoint) and at most 20 s, or the
/// interval plus 10 s for intervals longer than that. An endpoint that hangs must not stall
/// the loop.
pub fn read_budget(effective: Duration) -> Duration {
    let cap = Duration::from_secs(20).max(effective.saturating_add(Duration::from_secs(10)));
    effective
        .saturating_mul(2)
        .clamp(Duration::from_secs(5), cap)
}

/// One read of a round, after the groups themselves (always first: they say what else to read
/// and carry the takeovers).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Read {
    /// EC2 status checks of every instance.
    StatusChecks,
    /// Address and launch time of instances not described yet.
    Addresses,
    /// One target group's health.
    TargetHealth(String),
}

/// The order of a round's reads: first those that concern a suspect instance (a failing signal
/// lately), then those read longest ago (never read first), status checks before addresses
/// before target groups. When the round's budget runs out, what is left is what matters least.
pub fn order(
    groups: &[GroupFacts],
    suspects: &BTreeSet<String>,
    undescribed: bool,
    last_read: &BTreeMap<Read, u64>,
) -> Vec<Read> {
    let mut reads: Vec<(bool, Option<u64>, Read)> = Vec::new();
    let suspect_tgs: BTreeSet<&String> = groups
        .iter()
        .filter(|g| g.members.iter().any(|m| suspects.contains(&m.id)))
        .flat_map(|g| &g.target_groups)
        .collect();
    let mut push = |suspect: bool, r: Read| {
        reads.push((suspect, last_read.get(&r).copied(), r));
    };
    push(!suspects.is_empty(), Read::StatusChecks);
    if undescribed {
        push(false, Read::Addresses);
    }
    let tgs: BTreeSet<&String> = groups.iter().flat_map(|g| &g.target_groups).collect();
    for tg in tgs {
        push(suspect_tgs.contains(tg), Read::TargetHealth(tg.clone()));
    }
    // Suspects first; then never read, then oldest; then the kind's own order.
    reads.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then(a.1.is_some().cmp(&b.1.is_some()))
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
    });
    reads.into_iter().map(|(_, _, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon_config::parse;
    use crate::observe::Member;
    use std::path::Path;

    fn config(text: &str) -> Config {
        parse(Path::new("d.toml"), text).unwrap()
    }

    fn group(name: &str, tgs: &[&str], ids: &[&str]) -> GroupFacts {
        GroupFacts {
            name: name.into(),
            desired: 1,
            max: 1,
            grace_period: 0,
            target_groups: tgs.iter().map(|t| t.to_string()).collect(),
            members: ids
                .iter()
                .map(|i| Member {
                    id: i.to_string(),
                    lifecycle: "InService".into(),
                    health: "Healthy".into(),
                })
                .collect(),
            tags: BTreeMap::new(),
            suspended: Vec::new(),
        }
    }

    fn ten_groups(rate: &str) -> Config {
        let mut text = format!("interval = \"2s\"\n[api]\nrate = {rate}\n");
        for n in 0..10 {
            text.push_str(&format!("[[group]]\nname = \"g{n}\"\n"));
        }
        config(&text)
    }

    #[test]
    fn calls_grow_with_groups_and_target_groups_not_instances() {
        let c = ten_groups("5.0");
        let e = from_config(&c);
        assert_eq!(
            e.reads(),
            1 + 2 + 10,
            "one call for 10 names, 2 status, 10 target groups"
        );
        let groups: Vec<GroupFacts> = (0..10)
            .map(|n| {
                group(
                    &format!("g{n}"),
                    &[&format!("tg{}", n % 4)],
                    &["a", "b", "c"],
                )
            })
            .collect();
        assert_eq!(
            from_groups(&c, &groups).target_groups,
            4,
            "shared target groups count once"
        );
        let tags =
            config("[[group]]\ntag = { key = \"team\" }\n[[group]]\ntag = { key = \"app\" }\n");
        assert_eq!(
            from_config(&tags).group_calls,
            2,
            "one call per tag selector"
        );
    }

    #[test]
    fn a_budget_that_covers_the_interval_keeps_it() {
        let c = ten_groups("50.0");
        let e = from_config(&c);
        assert_eq!(effective_interval(&e, c.api_rate, c.interval), c.interval);
        assert_eq!(advice(&e, c.api_rate, c.interval), None);
    }

    #[test]
    fn a_budget_too_small_stretches_the_rounds_and_says_what_would_cover_them() {
        // 10 groups, 10 target groups, interval 2 s, 5 calls/s: 13 reads + 2 kept for
        // replacing + a third of a renewal (takeover 60 s, renewed every 20 s) = 15.1 calls.
        let c = ten_groups("5.0");
        let e = from_config(&c);
        assert!((e.per_round() - 15.1).abs() < 0.01, "{e:?}");
        let eff = effective_interval(&e, c.api_rate, c.interval);
        assert!((eff.as_secs_f64() - 3.02).abs() < 0.01, "{eff:?}");
        let a = advice(&e, c.api_rate, c.interval).unwrap();
        assert!((a.min_rate - 7.55).abs() < 0.01, "{a:?}");
        let text = a.to_string();
        assert!(text.contains("about 15.1 API calls per round"), "{text}");
        assert!(text.contains("rounds will come every 3.0s"), "{text}");
        assert!(
            text.contains("interval to at least \"4s\" or [api] rate to at least 7.6"),
            "{text}"
        );
    }

    #[test]
    fn the_read_budget_follows_the_effective_interval() {
        assert_eq!(read_budget(Duration::from_secs(1)), Duration::from_secs(5));
        assert_eq!(read_budget(Duration::from_secs(4)), Duration::from_secs(8));
        assert_eq!(
            read_budget(Duration::from_secs(30)),
            Duration::from_secs(40)
        );
        assert_eq!(
            read_budget(Duration::from_secs(3600)),
            Duration::from_secs(3610)
        );
    }

    #[test]
    fn reads_of_suspects_come_first_then_the_oldest() {
        let groups = vec![
            group("web", &["tg-web"], &["i-1", "i-2"]),
            group("api", &["tg-api"], &["i-3"]),
            group("jobs", &["tg-jobs"], &["i-4"]),
        ];
        let none = BTreeSet::new();
        let fresh = BTreeMap::new();
        assert_eq!(
            order(&groups, &none, true, &fresh),
            vec![
                Read::StatusChecks,
                Read::Addresses,
                Read::TargetHealth("tg-api".into()),
                Read::TargetHealth("tg-jobs".into()),
                Read::TargetHealth("tg-web".into()),
            ]
        );
        let suspects = BTreeSet::from(["i-4".to_string()]);
        let last = BTreeMap::from([
            (Read::StatusChecks, 7),
            (Read::TargetHealth("tg-api".into()), 7),
            (Read::TargetHealth("tg-web".into()), 6),
            (Read::TargetHealth("tg-jobs".into()), 7),
        ]);
        assert_eq!(
            order(&groups, &suspects, false, &last),
            vec![
                Read::StatusChecks,
                Read::TargetHealth("tg-jobs".into()),
                Read::TargetHealth("tg-web".into()),
                Read::TargetHealth("tg-api".into()),
            ],
            "the suspect's target group and the status checks first, then the read carried over"
        );
    }
}
