//! The health daemon's decisions, as pure functions: which instances to replace this round, and
//! whether the fleet breaker holds a group back. A shared outage (the database is down and every
//! instance fails its health check) must never empty a fleet, so replacement is bounded per window
//! and frozen outright when too much of a group, or of all groups, fails at once.

use std::time::Duration;

/// One instance as the daemon sees it this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceView {
    pub id: String,
    /// In service and outside the group's grace period: the only instances judged.
    pub judged: bool,
    /// Failing signals this round, with their evidence (empty = healthy).
    pub failing: Vec<String>,
    /// Consecutive rounds with at least one failing signal.
    pub consecutive: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    pub name: String,
    pub instances: Vec<InstanceView>,
    /// A bakery rollout holds the group: observe only.
    pub rollout_in_progress: bool,
    /// Replacements already made in the current window.
    pub replaced_in_window: u32,
    /// At most this many per window.
    pub max_replace: u32,
    pub threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub group: String,
    pub total: u32,
    pub unhealthy: u32,
    /// Why nothing may be replaced in this group now.
    pub frozen: Option<String>,
    /// Instances to mark unhealthy, with the reason.
    pub replace: Vec<(String, String)>,
    /// Due for replacement but held back (breaker, budget or rollout), with the reason.
    pub held: Vec<(String, String)>,
}

pub struct Breaker {
    pub freeze_above: u32,
    pub freeze_above_all: u32,
}

fn percent(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        0.0
    } else {
        f64::from(part) * 100.0 / f64::from(whole)
    }
}

pub fn decide(groups: &[GroupView], breaker: &Breaker) -> Vec<Verdict> {
    let judged = |g: &GroupView| g.instances.iter().filter(|i| i.judged).count() as u32;
    let failing = |g: &GroupView| {
        g.instances
            .iter()
            .filter(|i| i.judged && !i.failing.is_empty())
            .count() as u32
    };
    let all_total: u32 = groups.iter().map(judged).sum();
    let all_failing: u32 = groups.iter().map(failing).sum();
    let fleet_frozen = percent(all_failing, all_total) > f64::from(breaker.freeze_above_all);

    groups
        .iter()
        .map(|g| {
            let total = judged(g);
            let unhealthy = failing(g);
            let share = percent(unhealthy, total);
            let frozen = if g.rollout_in_progress {
                Some("a bakery rollout holds the group".to_string())
            } else if share > f64::from(breaker.freeze_above) {
                Some(format!(
                    "{unhealthy} of {total} instances ({share:.0}%) are unhealthy, more than {}%: a shared failure, not a reason to replace",
                    breaker.freeze_above
                ))
            } else if fleet_frozen {
                Some(format!(
                    "{all_failing} of {all_total} watched instances are unhealthy, more than {}% of the fleet",
                    breaker.freeze_above_all
                ))
            } else {
                None
            };
            let mut due: Vec<&InstanceView> = g
                .instances
                .iter()
                .filter(|i| i.judged && !i.failing.is_empty() && i.consecutive >= g.threshold)
                .collect();
            // The longest-failing first.
            due.sort_by(|a, b| b.consecutive.cmp(&a.consecutive).then(a.id.cmp(&b.id)));
            let reason = |i: &InstanceView| {
                format!("failed {} checks in a row: {}", i.consecutive, i.failing.join("; "))
            };
            let mut replace = Vec::new();
            let mut held = Vec::new();
            let budget = g.max_replace.saturating_sub(g.replaced_in_window);
            for i in due {
                if let Some(f) = &frozen {
                    held.push((i.id.clone(), format!("frozen: {f}")));
                } else if (replace.len() as u32) < budget {
                    replace.push((i.id.clone(), reason(i)));
                } else {
                    held.push((
                        i.id.clone(),
                        format!("replacement budget of {} per window used up", g.max_replace),
                    ));
                }
            }
            Verdict {
                group: g.name.clone(),
                total,
                unhealthy,
                frozen,
                replace,
                held,
            }
        })
        .collect()
}

/// Replacements within the window ending at `now` (timestamps in seconds).
pub fn in_window(times: &[u64], now: u64, window: Duration) -> u32 {
    times
        .iter()
        .filter(|t| now.saturating_sub(**t) < window.as_secs())
        .count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, failing: bool, consecutive: u32) -> InstanceView {
        InstanceView {
            id: id.into(),
            judged: true,
            failing: if failing {
                vec!["target group: unhealthy (Target.Timeout)".into()]
            } else {
                vec![]
            },
            consecutive,
        }
    }

    fn group(instances: Vec<InstanceView>) -> GroupView {
        GroupView {
            name: "web".into(),
            instances,
            rollout_in_progress: false,
            replaced_in_window: 0,
            max_replace: 2,
            threshold: 2,
        }
    }

    const BREAKER: Breaker = Breaker {
        freeze_above: 50,
        freeze_above_all: 50,
    };

    #[test]
    fn one_failing_instance_past_the_threshold_is_replaced_with_its_evidence() {
        let v = decide(
            &[group(vec![
                inst("a", true, 2),
                inst("b", false, 0),
                inst("c", false, 0),
                inst("d", false, 0),
            ])],
            &BREAKER,
        );
        assert_eq!(v[0].replace.len(), 1);
        assert_eq!(v[0].replace[0].0, "a");
        assert!(v[0].replace[0]
            .1
            .contains("failed 2 checks in a row: target group: unhealthy (Target.Timeout)"));
        assert_eq!(v[0].frozen, None);
    }

    #[test]
    fn below_the_threshold_nothing_happens() {
        let v = decide(
            &[group(vec![inst("a", true, 1), inst("b", false, 0)])],
            &BREAKER,
        );
        assert!(v[0].replace.is_empty() && v[0].held.is_empty());
    }

    #[test]
    fn most_of_a_group_failing_freezes_it() {
        let v = decide(
            &[group(vec![
                inst("a", true, 5),
                inst("b", true, 5),
                inst("c", true, 5),
                inst("d", false, 0),
            ])],
            &BREAKER,
        );
        assert!(v[0].replace.is_empty(), "{v:?}");
        assert_eq!(v[0].held.len(), 3);
        assert!(v[0]
            .frozen
            .as_ref()
            .unwrap()
            .contains("3 of 4 instances (75%)"));
    }

    #[test]
    fn exactly_the_limit_is_not_frozen_but_the_budget_bounds_it() {
        let mut g = group(vec![
            inst("a", true, 3),
            inst("b", true, 2),
            inst("c", false, 0),
            inst("d", false, 0),
        ]);
        g.max_replace = 1;
        let v = decide(&[g], &BREAKER);
        assert_eq!(v[0].frozen, None, "50% is not more than 50%");
        assert_eq!(
            v[0].replace
                .iter()
                .map(|r| r.0.as_str())
                .collect::<Vec<_>>(),
            vec!["a"]
        );
        assert!(v[0].held[0].1.contains("budget"));
    }

    #[test]
    fn a_fleet_wide_failure_freezes_every_group() {
        let sick = GroupView {
            name: "api".into(),
            ..group(vec![inst("x", true, 3), inst("y", true, 3)])
        };
        let mostly_fine = group(vec![
            inst("a", true, 3),
            inst("b", false, 0),
            inst("c", false, 0),
        ]);
        let v = decide(
            &[sick, mostly_fine],
            &Breaker {
                freeze_above: 100,
                freeze_above_all: 50,
            },
        );
        assert!(v.iter().all(|g| g.replace.is_empty()), "{v:?}");
        assert!(v[1]
            .frozen
            .as_ref()
            .unwrap()
            .contains("3 of 5 watched instances"));
    }

    #[test]
    fn instances_in_grace_or_out_of_service_are_not_judged() {
        let mut young = inst("a", true, 9);
        young.judged = false;
        let v = decide(&[group(vec![young, inst("b", false, 0)])], &BREAKER);
        assert!(v[0].replace.is_empty() && v[0].held.is_empty());
        assert_eq!((v[0].total, v[0].unhealthy), (1, 0));
    }

    #[test]
    fn a_rollout_in_progress_holds_replacements() {
        let mut g = group(vec![
            inst("a", true, 3),
            inst("b", false, 0),
            inst("c", false, 0),
        ]);
        g.rollout_in_progress = true;
        let v = decide(&[g], &BREAKER);
        assert!(v[0].replace.is_empty());
        assert!(v[0].held[0].1.contains("rollout"));
    }

    #[test]
    fn the_window_counts_recent_replacements_only() {
        assert_eq!(
            in_window(&[100, 500, 590], 600, Duration::from_secs(120)),
            2
        );
    }
}
