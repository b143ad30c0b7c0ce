//! What the health daemon saw in a round, put together without I/O: the failure counters, the
//! probes' hysteresis, the evidence of every signal and the views [`judge::decide`] works on.
//!
//! The daemon's async loop gathers plain facts (the groups as read, each instance's address and
//! launch time, every target group's health, the EC2 status checks, its own probes' results)
//! and calls [`observe`]; everything that decides lives here and is unit-tested case by case.
//!
//! The API's answers are [`Reading`]s that say whether they were read since the last judgement.
//! Reads a round could not finish (an API too slow for the round's budget) are carried over: the
//! round judges with what it last read, but only a fresh reading moves a failure counter. A
//! stale "unhealthy" holds an instance's count where it is, instead of counting one answer twice;
//! a stale "healthy" does not reset it.
//!
//! [`judge::decide`]: crate::judge::decide

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::daemon_config::{Config, Probe};
use crate::judge::{in_window, GroupView, InstanceView};
use crate::marks::{Lock, LOCK_TAG};

/// One member of a group as DescribeAutoScalingGroups lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    /// `InService`, `Pending`, `Terminating`, ...
    pub lifecycle: String,
    /// `Healthy` or `Unhealthy`.
    pub health: String,
}

/// A watched group as last read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupFacts {
    pub name: String,
    pub desired: u32,
    /// The group's max size (fleet events raise the desired capacity within it).
    pub max: u32,
    /// The group's health check grace period, in seconds.
    pub grace_period: u64,
    pub target_groups: Vec<String>,
    pub members: Vec<Member>,
    pub tags: BTreeMap<String, String>,
    /// Suspended Auto Scaling processes.
    pub suspended: Vec<String>,
}

/// What never changes about an instance, read once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceFacts {
    pub ip: Option<String>,
    /// Launch time, seconds since the epoch (0: not described yet).
    pub launched: u64,
}

/// A target's state in one target group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetState {
    /// `initial`, `healthy`, `unhealthy`, `draining`, `unavailable`, ...
    pub state: String,
    pub reason: Option<String>,
}

/// An answer of the API, and whether it was read since the last judgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading<T> {
    pub value: T,
    pub fresh: bool,
}

impl<T> Reading<T> {
    pub fn fresh(value: T) -> Self {
        Reading { value, fresh: true }
    }
}

/// Consecutive-result tracking for one instance's probe, as a load balancer does it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeState {
    pub successes: u32,
    pub failures: u32,
    /// Once failed past the unhealthy threshold, unhealthy until the healthy threshold passes.
    pub unhealthy: bool,
}

impl ProbeState {
    pub fn record(&mut self, ok: bool, p: &Probe) {
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            if self.successes >= p.healthy_threshold {
                self.unhealthy = false;
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
            if self.failures >= p.unhealthy_threshold {
                self.unhealthy = true;
            }
        }
    }
}

/// What the judge remembers of an instance from round to round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Remembered {
    /// Rounds in a row with a fresh failing signal.
    pub consecutive: u32,
    pub probe: ProbeState,
}

/// What the judge remembers, per instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    pub instances: BTreeMap<String, Remembered>,
}

impl Memory {
    /// Forgets instances that left every watched group.
    pub fn keep_only(&mut self, ids: &BTreeSet<String>) {
        self.instances.retain(|id, _| ids.contains(id));
    }

    /// An instance was marked unhealthy: its count starts over.
    pub fn replaced(&mut self, id: &str) {
        if let Some(r) = self.instances.get_mut(id) {
            r.consecutive = 0;
        }
    }

    /// Instances with a failing signal lately: their reads come first.
    pub fn suspects(&self) -> BTreeSet<String> {
        self.instances
            .iter()
            .filter(|(_, r)| r.consecutive > 0 || r.probe.failures > 0 || r.probe.unhealthy)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// Everything a round judges.
pub struct Facts<'a> {
    /// Seconds since the epoch.
    pub now: u64,
    pub groups: &'a [GroupFacts],
    pub instances: &'a BTreeMap<String, InstanceFacts>,
    /// Impaired instances (EC2 status checks), with the evidence; `None`: never read.
    pub impaired: Option<&'a Reading<BTreeMap<String, String>>>,
    /// Per target group ARN: its targets' health.
    pub health: &'a BTreeMap<String, Reading<BTreeMap<String, TargetState>>>,
    /// This round's probe of each probed instance: `Err` says what went wrong.
    pub probes: &'a BTreeMap<String, Result<(), String>>,
    /// Replacement times per group (seconds since the epoch), for the breaker's window.
    pub replaced: &'a BTreeMap<String, Vec<u64>>,
}

/// What one round saw, before deciding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub views: Vec<GroupView>,
    /// Every signal of every instance, failing or not, for the log.
    pub evidence: BTreeMap<String, Vec<String>>,
}

/// The signals of one instance this round.
#[derive(Default)]
struct Signals {
    /// Failing, read (or probed) this round.
    fresh: Vec<String>,
    /// Failing as last read, not read again this round.
    stale: Vec<String>,
    all: Vec<String>,
}

impl Signals {
    fn failing(&mut self, text: String, fresh: bool) {
        if fresh {
            self.fresh.push(text.clone());
            self.all.push(text);
        } else {
            let text = format!("{text} (as last read)");
            self.stale.push(text.clone());
            self.all.push(text);
        }
    }
}

/// The short name of a target group ARN (its last part).
fn short(arn: &str) -> &str {
    arn.rsplit(':').next().unwrap_or(arn)
}

fn target_signals(s: &mut Signals, id: &str, g: &GroupFacts, facts: &Facts) {
    for tg in &g.target_groups {
        let name = short(tg);
        match facts.health.get(tg) {
            None => s.all.push(format!("{name}: not read yet")),
            Some(r) => match r.value.get(id) {
                Some(t) if t.state == "unhealthy" => s.failing(
                    format!(
                        "{name}: unhealthy ({})",
                        t.reason.clone().unwrap_or_default()
                    ),
                    r.fresh,
                ),
                Some(t) => s.all.push(format!("{name}: {}", t.state)),
                None => s.all.push(format!("{name}: not registered")),
            },
        }
    }
}

fn status_signals(s: &mut Signals, id: &str, facts: &Facts) {
    match facts.impaired {
        None => s.all.push("EC2 status checks: not read yet".into()),
        Some(r) => match r.value.get(id) {
            Some(e) => s.failing(e.clone(), r.fresh),
            None => s.all.push("EC2 status checks: not impaired".into()),
        },
    }
}

/// Records this round's probe result in the instance's hysteresis and adds its signal.
fn probe_signals(
    s: &mut Signals,
    id: &str,
    probe: Option<&Probe>,
    facts: &Facts,
    memory: &mut Remembered,
) {
    let Some(p) = probe else {
        return;
    };
    match facts.probes.get(id) {
        Some(result) => {
            memory.probe.record(result.is_ok(), p);
            if memory.probe.unhealthy {
                let why = result.clone().err().unwrap_or_else(|| "recovering".into());
                s.failing(
                    format!(
                        "probe :{}: {why} ({} failed in a row)",
                        p.port, memory.probe.failures
                    ),
                    true,
                );
            } else {
                s.all.push("probe: ok".into());
            }
        }
        None if facts.instances.get(id).is_none_or(|i| i.ip.is_none()) => {
            s.all.push("probe: no address yet".into())
        }
        None => s.all.push("probe: ok".into()),
    }
}

/// Whether an instance is judged this round: in service, not already marked, described, and past
/// its group's grace period. An instance already marked Unhealthy is the group's to replace:
/// judging it again would count it twice (against the breaker and the window).
fn judged(m: &Member, g: &GroupFacts, facts: &Facts) -> bool {
    let launched = facts.instances.get(&m.id).map_or(0, |i| i.launched);
    m.lifecycle == "InService"
        && m.health != "Unhealthy"
        && launched > 0
        && facts.now.saturating_sub(launched) >= g.grace_period
}

/// Whether a bakery rollout holds the group now.
pub fn rollout_in_progress(tags: &BTreeMap<String, String>, now: u64) -> bool {
    tags.get(LOCK_TAG)
        .and_then(|l| Lock::decode(l))
        .is_some_and(|l| l.expires > now)
}

/// Puts every signal together, per group, moves the failure counters and the probes'
/// hysteresis in `memory`, and returns the views to decide on with their evidence.
pub fn observe(facts: &Facts, config: &Config, memory: &mut Memory) -> Observation {
    let mut views = Vec::new();
    let mut evidence = BTreeMap::new();
    for g in facts.groups {
        let (threshold, probe) = config.settings_for(&g.name, &g.tags);
        let mut instances = Vec::new();
        for m in &g.members {
            let remembered = memory.instances.entry(m.id.clone()).or_default();
            let mut s = Signals::default();
            target_signals(&mut s, &m.id, g, facts);
            status_signals(&mut s, &m.id, facts);
            probe_signals(&mut s, &m.id, probe, facts, remembered);
            let judged = judged(m, g, facts);
            remembered.consecutive = if !judged {
                0
            } else if !s.fresh.is_empty() {
                remembered.consecutive.saturating_add(1)
            } else if !s.stale.is_empty() {
                remembered.consecutive
            } else {
                0
            };
            evidence.insert(m.id.clone(), s.all);
            let mut failing = s.fresh;
            failing.extend(s.stale);
            instances.push(InstanceView {
                id: m.id.clone(),
                judged,
                failing,
                consecutive: remembered.consecutive,
            });
        }
        let times = facts
            .replaced
            .get(&g.name)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        views.push(GroupView {
            name: g.name.clone(),
            instances,
            rollout_in_progress: rollout_in_progress(&g.tags, facts.now),
            replaced_in_window: in_window(times, facts.now, config.window),
            max_replace: config.max_replace.resolve(g.desired.max(1)).max(1),
            threshold,
        });
    }
    Observation { views, evidence }
}

/// The instances to probe this round, with their address and their group's probe: the
/// in-service members with a known address of groups that have a probe.
pub fn probe_targets(
    groups: &[GroupFacts],
    instances: &BTreeMap<String, InstanceFacts>,
    config: &Config,
) -> Vec<(String, IpAddr, Probe)> {
    let mut out = Vec::new();
    for g in groups {
        let Some(probe) = config.settings_for(&g.name, &g.tags).1 else {
            continue;
        };
        for m in g.members.iter().filter(|m| m.lifecycle == "InService") {
            let ip = instances
                .get(&m.id)
                .and_then(|i| i.ip.as_deref())
                .and_then(|ip| ip.parse::<IpAddr>().ok());
            if let Some(ip) = ip {
                out.push((m.id.clone(), ip, probe.clone()));
            }
        }
    }
    out
}

/// Why a replacement decided on older facts must not happen now, if it must not: the group
/// (read again just before acting) is gone, a rollout holds it, or the instance is no longer an
/// in-service, healthy member.
pub fn still_replaceable(
    fresh: Option<&BTreeMap<String, GroupFacts>>,
    group: &str,
    id: &str,
    now: u64,
) -> Option<String> {
    let Some(fresh) = fresh else {
        return Some("the group could not be read again".into());
    };
    let Some(g) = fresh.get(group) else {
        return Some("the group is gone".into());
    };
    if let Some(l) = g.tags.get(LOCK_TAG).and_then(|l| Lock::decode(l)) {
        if l.expires > now {
            return Some(format!("a rollout by {} holds the group", l.owner));
        }
    }
    match g.members.iter().find(|m| m.id == id) {
        None => Some("no longer in the group".into()),
        Some(m) if m.lifecycle != "InService" => Some(format!("now {}", m.lifecycle)),
        Some(m) if m.health == "Unhealthy" => Some("already marked Unhealthy".into()),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon_config::{parse, ProbeKind};
    use std::path::Path;
    use std::time::Duration;

    const NOW: u64 = 10_000;
    const TG: &str = "arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/web/abc";

    fn config() -> Config {
        parse(
            Path::new("d.toml"),
            "unhealthy_threshold = 2\n[[group]]\nname = \"web\"\nprobe = { type = \"http\", port = 8080, path = \"/healthz\", healthy_threshold = 2 }\n[[group]]\nname = \"api\"\n",
        )
        .unwrap()
    }

    fn member(id: &str) -> Member {
        Member {
            id: id.into(),
            lifecycle: "InService".into(),
            health: "Healthy".into(),
        }
    }

    fn group(name: &str, ids: &[&str]) -> GroupFacts {
        GroupFacts {
            name: name.into(),
            desired: ids.len() as u32,
            max: 10,
            grace_period: 60,
            target_groups: vec![TG.into()],
            members: ids.iter().map(|i| member(i)).collect(),
            tags: BTreeMap::new(),
            suspended: vec!["HealthCheck".into()],
        }
    }

    fn described(ids: &[&str], launched: u64) -> BTreeMap<String, InstanceFacts> {
        ids.iter()
            .enumerate()
            .map(|(n, id)| {
                (
                    id.to_string(),
                    InstanceFacts {
                        ip: Some(format!("10.0.0.{}", n + 1)),
                        launched,
                    },
                )
            })
            .collect()
    }

    fn health(
        states: &[(&str, &str)],
        fresh: bool,
    ) -> BTreeMap<String, Reading<BTreeMap<String, TargetState>>> {
        BTreeMap::from([(
            TG.to_string(),
            Reading {
                value: states
                    .iter()
                    .map(|(id, s)| {
                        (
                            id.to_string(),
                            TargetState {
                                state: s.to_string(),
                                reason: (*s == "unhealthy").then(|| "Target.Timeout".into()),
                            },
                        )
                    })
                    .collect(),
                fresh,
            },
        )])
    }

    struct World {
        groups: Vec<GroupFacts>,
        instances: BTreeMap<String, InstanceFacts>,
        impaired: Option<Reading<BTreeMap<String, String>>>,
        health: BTreeMap<String, Reading<BTreeMap<String, TargetState>>>,
        probes: BTreeMap<String, Result<(), String>>,
        replaced: BTreeMap<String, Vec<u64>>,
    }

    impl World {
        fn new(g: GroupFacts) -> World {
            let ids: Vec<&str> = g.members.iter().map(|m| m.id.as_str()).collect();
            World {
                instances: described(&ids, NOW - 600),
                health: health(
                    &ids.iter().map(|i| (*i, "healthy")).collect::<Vec<_>>(),
                    true,
                ),
                impaired: Some(Reading::fresh(BTreeMap::new())),
                probes: ids.iter().map(|i| (i.to_string(), Ok(()))).collect(),
                replaced: BTreeMap::new(),
                groups: vec![g],
            }
        }

        fn observe(&self, memory: &mut Memory) -> Observation {
            observe(
                &Facts {
                    now: NOW,
                    groups: &self.groups,
                    instances: &self.instances,
                    impaired: self.impaired.as_ref(),
                    health: &self.health,
                    probes: &self.probes,
                    replaced: &self.replaced,
                },
                &config(),
                memory,
            )
        }
    }

    fn view<'a>(o: &'a Observation, id: &str) -> &'a InstanceView {
        o.views
            .iter()
            .flat_map(|v| &v.instances)
            .find(|i| i.id == id)
            .unwrap()
    }

    #[test]
    fn a_healthy_instance_carries_every_signal_as_evidence() {
        let w = World::new(group("web", &["i-1"]));
        let mut m = Memory::default();
        let o = w.observe(&mut m);
        assert_eq!(
            o.evidence["i-1"],
            vec![
                "targetgroup/web/abc: healthy",
                "EC2 status checks: not impaired",
                "probe: ok"
            ]
        );
        let v = view(&o, "i-1");
        assert!(v.judged && v.failing.is_empty() && v.consecutive == 0);
        assert_eq!(o.views[0].threshold, 2);
        assert_eq!(o.views[0].max_replace, 1, "25% of 1, at least 1");
    }

    #[test]
    fn fresh_failures_count_up_and_a_clean_round_resets() {
        let mut w = World::new(group("web", &["i-1", "i-2"]));
        let mut m = Memory::default();
        w.health = health(&[("i-1", "unhealthy"), ("i-2", "healthy")], true);
        assert_eq!(view(&w.observe(&mut m), "i-1").consecutive, 1);
        let o = w.observe(&mut m);
        assert_eq!(view(&o, "i-1").consecutive, 2);
        assert_eq!(
            view(&o, "i-1").failing,
            vec!["targetgroup/web/abc: unhealthy (Target.Timeout)"]
        );
        assert_eq!(view(&o, "i-2").consecutive, 0);
        w.health = health(&[("i-1", "healthy"), ("i-2", "healthy")], true);
        assert_eq!(view(&w.observe(&mut m), "i-1").consecutive, 0);
    }

    #[test]
    fn a_stale_reading_neither_counts_twice_nor_resets() {
        let mut w = World::new(group("api", &["i-1"]));
        let mut m = Memory::default();
        w.health = health(&[("i-1", "unhealthy")], true);
        assert_eq!(view(&w.observe(&mut m), "i-1").consecutive, 1);
        // The next round could not read the target group again: the same answer is not a
        // second failure...
        w.health = health(&[("i-1", "unhealthy")], false);
        let o = w.observe(&mut m);
        assert_eq!(view(&o, "i-1").consecutive, 1);
        assert_eq!(
            view(&o, "i-1").failing,
            vec!["targetgroup/web/abc: unhealthy (Target.Timeout) (as last read)"]
        );
        // ...and a stale healthy one does not wipe a count either.
        w.health = health(&[("i-1", "healthy")], false);
        m.instances.get_mut("i-1").unwrap().consecutive = 1;
        assert_eq!(
            view(&w.observe(&mut m), "i-1").consecutive,
            0,
            "nothing failing: reset"
        );
        w.health = health(&[("i-1", "unhealthy")], true);
        assert_eq!(view(&w.observe(&mut m), "i-1").consecutive, 1);
    }

    #[test]
    fn the_probe_has_hysteresis_in_both_directions() {
        let mut w = World::new(group("web", &["i-1"]));
        let mut m = Memory::default();
        w.probes
            .insert("i-1".into(), Err("connect 10.0.0.1:8080: refused".into()));
        let o = w.observe(&mut m);
        assert_eq!(
            view(&o, "i-1").failing,
            vec!["probe :8080: connect 10.0.0.1:8080: refused (1 failed in a row)"],
            "unhealthy_threshold 1: failing at once"
        );
        w.probes.insert("i-1".into(), Ok(()));
        let o = w.observe(&mut m);
        assert_eq!(
            view(&o, "i-1").failing,
            vec!["probe :8080: recovering (0 failed in a row)"],
            "one success is not enough (healthy_threshold 2)"
        );
        assert_eq!(view(&o, "i-1").consecutive, 2);
        let o = w.observe(&mut m);
        assert!(view(&o, "i-1").failing.is_empty());
        assert_eq!(view(&o, "i-1").consecutive, 0);
    }

    #[test]
    fn probe_state_thresholds_apply_in_both_directions() {
        let p = Probe {
            kind: ProbeKind::Tcp,
            port: 80,
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        };
        let mut s = ProbeState::default();
        s.record(false, &p);
        assert!(!s.unhealthy);
        s.record(false, &p);
        assert!(s.unhealthy);
        s.record(true, &p);
        assert!(s.unhealthy, "one success is not enough");
        s.record(true, &p);
        assert!(!s.unhealthy);
    }

    #[test]
    fn impaired_status_checks_fail_and_unread_signals_say_so() {
        let mut w = World::new(group("api", &["i-1"]));
        w.impaired = Some(Reading::fresh(BTreeMap::from([(
            "i-1".to_string(),
            "EC2 status checks: instance impaired, system ok".to_string(),
        )])));
        let mut m = Memory::default();
        let o = w.observe(&mut m);
        assert_eq!(view(&o, "i-1").consecutive, 1);
        w.impaired = None;
        w.health.clear();
        let o = w.observe(&mut m);
        assert_eq!(
            o.evidence["i-1"],
            vec![
                "targetgroup/web/abc: not read yet",
                "EC2 status checks: not read yet"
            ]
        );
        assert_eq!(view(&o, "i-1").consecutive, 0);
    }

    #[test]
    fn young_undescribed_marked_or_leaving_instances_are_not_judged() {
        let mut g = group("api", &["young", "unknown", "marked", "leaving"]);
        g.members[2].health = "Unhealthy".into();
        g.members[3].lifecycle = "Terminating".into();
        let mut w = World::new(g);
        w.instances.get_mut("young").unwrap().launched = NOW - 30;
        w.instances.get_mut("unknown").unwrap().launched = 0;
        w.health = health(
            &[
                ("young", "unhealthy"),
                ("unknown", "unhealthy"),
                ("marked", "unhealthy"),
                ("leaving", "unhealthy"),
            ],
            true,
        );
        let mut m = Memory::default();
        let o = w.observe(&mut m);
        for v in &o.views[0].instances {
            assert!(!v.judged && v.consecutive == 0, "{v:?}");
        }
    }

    #[test]
    fn the_group_view_carries_the_rollout_lock_and_the_window() {
        let mut g = group("api", &["i-1", "i-2", "i-3", "i-4", "i-5"]);
        let lock = Lock {
            owner: "ci:1".into(),
            token: "t".into(),
            since: NOW - 10,
            expires: NOW + 60,
        };
        g.tags.insert(LOCK_TAG.into(), lock.encode());
        let mut w = World::new(g);
        w.replaced
            .insert("api".into(), vec![NOW - 700, NOW - 100, NOW - 5]);
        let o = w.observe(&mut Memory::default());
        assert!(o.views[0].rollout_in_progress);
        assert_eq!(
            o.views[0].replaced_in_window, 2,
            "the default window is 10 minutes"
        );
        assert_eq!(o.views[0].max_replace, 2, "25% of 5, rounded up");
    }

    #[test]
    fn memory_names_suspects_and_forgets_departed_instances() {
        let mut w = World::new(group("api", &["i-1", "i-2"]));
        w.health = health(&[("i-1", "unhealthy"), ("i-2", "healthy")], true);
        let mut m = Memory::default();
        w.observe(&mut m);
        assert_eq!(m.suspects(), BTreeSet::from(["i-1".to_string()]));
        m.replaced("i-1");
        assert!(m.suspects().is_empty());
        m.keep_only(&BTreeSet::from(["i-2".to_string()]));
        assert_eq!(m.instances.len(), 1);
    }

    #[test]
    fn only_in_service_members_with_an_address_of_probed_groups_are_probed() {
        let mut web = group("web", &["i-1", "i-2", "i-3"]);
        web.members[1].lifecycle = "Pending".into();
        let api = group("api", &["i-9"]);
        let mut instances = described(&["i-1", "i-2", "i-9"], NOW);
        instances.insert("i-3".into(), InstanceFacts::default());
        let t = probe_targets(&[web, api], &instances, &config());
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].0, "i-1");
        assert_eq!(t[0].1.to_string(), "10.0.0.1");
        assert_eq!(t[0].2.port, 8080);
    }

    #[test]
    fn a_replacement_decided_on_older_facts_is_held_when_things_changed() {
        let mut g = group("web", &["i-1", "i-2", "i-3"]);
        g.members[1].lifecycle = "Terminating".into();
        g.members[2].health = "Unhealthy".into();
        let fresh = BTreeMap::from([("web".to_string(), g.clone())]);
        assert_eq!(still_replaceable(Some(&fresh), "web", "i-1", NOW), None);
        assert!(still_replaceable(Some(&fresh), "web", "i-2", NOW)
            .unwrap()
            .contains("Terminating"));
        assert!(still_replaceable(Some(&fresh), "web", "i-3", NOW)
            .unwrap()
            .contains("already marked"));
        assert!(still_replaceable(Some(&fresh), "web", "i-9", NOW)
            .unwrap()
            .contains("no longer"));
        assert!(still_replaceable(Some(&fresh), "api", "i-1", NOW)
            .unwrap()
            .contains("gone"));
        assert!(still_replaceable(None, "web", "i-1", NOW).is_some());
        let lock = |expires: u64| Lock {
            owner: "ci:42".into(),
            token: "t".into(),
            since: NOW,
            expires,
        };
        g.tags.insert(LOCK_TAG.into(), lock(NOW + 60).encode());
        let locked = BTreeMap::from([("web".to_string(), g.clone())]);
        assert!(still_replaceable(Some(&locked), "web", "i-1", NOW)
            .unwrap()
            .contains("rollout by ci:42"));
        g.tags.insert(LOCK_TAG.into(), lock(NOW - 1).encode());
        let expired = BTreeMap::from([("web".to_string(), g)]);
        assert_eq!(still_replaceable(Some(&expired), "web", "i-1", NOW), None);
    }
}
