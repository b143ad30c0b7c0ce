//! Fleet events, decided without I/O: EC2 Spot interruption warnings, rebalance
//! recommendations and scheduled maintenance (AWS Health) as EventBridge delivers them to an SQS
//! queue (the queue mode of aws-node-termination-handler), and what the group's owner does about
//! each doomed instance.
//!
//! The replacement comes first: the owner raises the group's desired capacity by one (within its
//! max), waits until an instance that was not in the group at the raise is `InService`, `Healthy`
//! and healthy in every target group of the group, then retires the doomed instance with
//! `TerminateInstanceInAutoScalingGroup` decrementing the desired capacity, which returns to what
//! it was. Events are keyed by instance: a duplicate (EventBridge delivers at least once) or a
//! later event of another kind for an instance already being replaced changes nothing, and an
//! event for an instance no longer in service (it ended, or an old event arrives late) is done at
//! once.

use std::collections::BTreeSet;

use crate::observe::GroupFacts;

/// What kind of event dooms an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `EC2 Spot Instance Interruption Warning`: two minutes before EC2 reclaims it.
    Spot,
    /// `EC2 Instance Rebalance Recommendation`: at elevated risk of interruption.
    Rebalance,
    /// `AWS Health Event`, category `scheduledChange`, service EC2: retirement, stop or reboot
    /// maintenance.
    Scheduled,
}

impl Kind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Spot => "spot",
            Kind::Rebalance => "rebalance",
            Kind::Scheduled => "scheduled",
        }
    }
}

/// One event as delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// EventBridge's event id (the same for every delivery of one event).
    pub id: String,
    pub kind: Kind,
    pub instances: Vec<String>,
}

/// A message of the queue, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Event(Event),
    /// Not an event the daemon acts on (another source or detail type, a Health event that is not
    /// a scheduled EC2 change, a body that is not JSON): deleted, with why.
    Ignored(String),
}

fn instance_of_arn(arn: &str) -> Option<String> {
    arn.rsplit_once("instance/")
        .map(|(_, id)| id.to_string())
        .filter(|id| id.starts_with("i-"))
}

/// Reads one message body (the event JSON, as EventBridge sends it to SQS without an input
/// transformer).
pub fn parse(body: &str) -> Parsed {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return Parsed::Ignored("the message is not JSON".into());
    };
    let id = v["id"].as_str().unwrap_or_default().to_string();
    let source = v["source"].as_str().unwrap_or_default();
    let detail_type = v["detail-type"].as_str().unwrap_or_default();
    let detail = &v["detail"];
    let from_detail = || {
        detail["instance-id"]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                v["resources"]
                    .as_array()?
                    .iter()
                    .find_map(|r| r.as_str().and_then(instance_of_arn))
            })
    };
    let (kind, instances) = match (source, detail_type) {
        ("aws.ec2", "EC2 Spot Instance Interruption Warning") => {
            (Kind::Spot, from_detail().into_iter().collect())
        }
        ("aws.ec2", "EC2 Instance Rebalance Recommendation") => {
            (Kind::Rebalance, from_detail().into_iter().collect())
        }
        ("aws.health", "AWS Health Event") => {
            if detail["service"] != "EC2" || detail["eventTypeCategory"] != "scheduledChange" {
                return Parsed::Ignored(format!(
                    "a Health event of service {} and category {}, not an EC2 scheduled change",
                    detail["service"], detail["eventTypeCategory"]
                ));
            }
            let mut ids: Vec<String> = detail["affectedEntities"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|e| e["entityValue"].as_str())
                        .filter(|s| s.starts_with("i-"))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            if ids.is_empty() {
                ids = v["resources"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|r| r.as_str())
                            .filter(|s| s.starts_with("i-"))
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
            }
            (Kind::Scheduled, ids)
        }
        _ => {
            return Parsed::Ignored(format!(
                "source {source:?}, detail-type {detail_type:?}: not an interruption, rebalance or scheduled change"
            ))
        }
    };
    if instances.is_empty() {
        return Parsed::Ignored(format!("a {} event naming no instance", kind.as_str()));
    }
    Parsed::Event(Event {
        id,
        kind,
        instances,
    })
}

/// The group as it was when the replacement was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raised {
    /// The desired capacity before the raise (what the retirement returns it to).
    pub desired: u32,
    /// The instances in the group then: a replacement is any other.
    pub members: BTreeSet<String>,
}

/// An instance to replace before it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doom {
    pub instance: String,
    pub group: String,
    pub kind: Kind,
    pub event_id: String,
    /// Set once the desired capacity was raised for its replacement.
    pub raised: Option<Raised>,
}

/// The next step for a doomed instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Launch the replacement first: set the desired capacity to `to` (one more).
    Raise { to: u32 },
    /// The replacement is not ready yet.
    Wait(String),
    /// The replacement is in service and healthy: terminate the doomed instance, decrementing
    /// the desired capacity.
    Retire { replacement: String },
    /// The doomed instance ended before it was retired: give the extra capacity back.
    Lower { to: u32 },
    /// Nothing (more) to do.
    Done(String),
    /// Not now (at max size, the breaker): asked again next round.
    Hold(String),
}

fn in_service(lifecycle: &str) -> bool {
    lifecycle == "InService"
}

fn leaving(lifecycle: &str) -> bool {
    lifecycle.starts_with("Terminat") || lifecycle.starts_with("Detach") || lifecycle == "Standby"
}

/// What to do next for `doom`, given its group as just read, its max size, the instances healthy
/// in every target group of the group (`None`: the group has no target group), and whether the
/// breaker allows one more replacement in the group (its window's count and its freeze).
pub fn step(
    doom: &Doom,
    group: &GroupFacts,
    max: u32,
    healthy_targets: Option<&BTreeSet<String>>,
    breaker_allows: bool,
) -> Step {
    let present = group
        .members
        .iter()
        .any(|m| m.id == doom.instance && !leaving(&m.lifecycle));
    match &doom.raised {
        None => {
            if !present {
                return Step::Done(format!(
                    "{} is no longer in service in {}",
                    doom.instance, group.name
                ));
            }
            if !breaker_allows {
                return Step::Hold(
                    "the fleet breaker allows no more replacements in the group now".into(),
                );
            }
            if group.desired >= max {
                return Step::Hold(format!(
                    "the group is at its max size ({max}): the replacement cannot launch first"
                ));
            }
            Step::Raise {
                to: group.desired + 1,
            }
        }
        Some(r) => {
            if !present {
                return if group.desired > r.desired {
                    Step::Lower { to: r.desired }
                } else {
                    Step::Done(format!(
                        "{} ended; the group is back at its capacity",
                        doom.instance
                    ))
                };
            }
            let ready = group.members.iter().find(|m| {
                !r.members.contains(&m.id)
                    && in_service(&m.lifecycle)
                    && m.health == "Healthy"
                    && healthy_targets.is_none_or(|h| h.contains(&m.id))
            });
            match ready {
                Some(m) => Step::Retire {
                    replacement: m.id.clone(),
                },
                None => Step::Wait("the replacement is not in service and healthy yet".into()),
            }
        }
    }
}

/// What the daemon does with a new event for `instance`, given the dooms in progress: `true` to
/// start one, `false` for a duplicate (the same event again, or another event for an instance
/// already being replaced).
pub fn is_new(instance: &str, in_progress: &[&Doom]) -> bool {
    !in_progress.iter().any(|d| d.instance == instance)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::Member;

    const SPOT: &str = r#"{"version":"0","id":"7f1c2a9e-0000-4000-8000-000000000001","detail-type":"EC2 Spot Instance Interruption Warning","source":"aws.ec2","account":"123456789012","time":"2026-12-05T03:16:06Z","region":"us-east-1","resources":["arn:aws:ec2:us-east-1:123456789012:instance/i-0abc"],"detail":{"instance-id":"i-0abc","instance-action":"terminate"}}"#;
    const REBALANCE: &str = r#"{"version":"0","id":"e2","detail-type":"EC2 Instance Rebalance Recommendation","source":"aws.ec2","resources":["arn:aws:ec2:us-east-1:123456789012:instance/i-0def"],"detail":{"instance-id":"i-0def"}}"#;
    const SCHEDULED: &str = r#"{"version":"0","id":"e3","detail-type":"AWS Health Event","source":"aws.health","resources":["i-0aaa"],"detail":{"eventArn":"arn:aws:health:us-east-1::event/EC2/AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED/x","service":"EC2","eventTypeCode":"AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED","eventTypeCategory":"scheduledChange","affectedEntities":[{"entityValue":"i-0aaa"},{"entityValue":"i-0bbb"}]}}"#;

    #[test]
    fn the_three_kinds_parse_as_eventbridge_delivers_them() {
        assert_eq!(
            parse(SPOT),
            Parsed::Event(Event {
                id: "7f1c2a9e-0000-4000-8000-000000000001".into(),
                kind: Kind::Spot,
                instances: vec!["i-0abc".into()]
            })
        );
        assert_eq!(
            parse(REBALANCE),
            Parsed::Event(Event {
                id: "e2".into(),
                kind: Kind::Rebalance,
                instances: vec!["i-0def".into()]
            })
        );
        assert_eq!(
            parse(SCHEDULED),
            Parsed::Event(Event {
                id: "e3".into(),
                kind: Kind::Scheduled,
                instances: vec!["i-0aaa".into(), "i-0bbb".into()]
            })
        );
    }

    #[test]
    fn other_messages_are_ignored_with_a_reason() {
        assert!(matches!(parse("not json"), Parsed::Ignored(_)));
        assert!(matches!(
            parse(
                r#"{"source":"aws.ec2","detail-type":"EC2 Instance State-change Notification","detail":{"instance-id":"i-1"}}"#
            ),
            Parsed::Ignored(_)
        ));
        let issue = SCHEDULED.replace("scheduledChange", "issue");
        assert!(matches!(parse(&issue), Parsed::Ignored(_)));
        assert!(matches!(
            parse(
                r#"{"source":"aws.ec2","detail-type":"EC2 Spot Instance Interruption Warning","detail":{}}"#
            ),
            Parsed::Ignored(_)
        ));
    }

    fn member(id: &str, lifecycle: &str, health: &str) -> Member {
        Member {
            id: id.into(),
            lifecycle: lifecycle.into(),
            health: health.into(),
        }
    }

    fn group(desired: u32, members: Vec<Member>) -> GroupFacts {
        GroupFacts {
            name: "web".into(),
            desired,
            max: 8,
            members,
            ..Default::default()
        }
    }

    fn doom(raised: Option<Raised>) -> Doom {
        Doom {
            instance: "i-1".into(),
            group: "web".into(),
            kind: Kind::Spot,
            event_id: "e".into(),
            raised,
        }
    }

    fn raised(desired: u32, ids: &[&str]) -> Option<Raised> {
        Some(Raised {
            desired,
            members: ids.iter().map(|s| s.to_string()).collect(),
        })
    }

    #[test]
    fn the_replacement_launches_first_within_max() {
        let g = group(
            2,
            vec![
                member("i-1", "InService", "Healthy"),
                member("i-2", "InService", "Healthy"),
            ],
        );
        assert_eq!(step(&doom(None), &g, 8, None, true), Step::Raise { to: 3 });
        assert!(matches!(
            step(&doom(None), &g, 2, None, true),
            Step::Hold(_)
        ));
        assert!(matches!(
            step(&doom(None), &g, 8, None, false),
            Step::Hold(_)
        ));
    }

    #[test]
    fn the_doomed_instance_retires_only_once_a_new_one_is_in_service_and_healthy_everywhere() {
        let r = raised(2, &["i-1", "i-2"]);
        let mut g = group(
            3,
            vec![
                member("i-1", "InService", "Healthy"),
                member("i-2", "InService", "Healthy"),
                member("i-3", "Pending", "Healthy"),
            ],
        );
        assert!(matches!(
            step(&doom(r.clone()), &g, 8, None, true),
            Step::Wait(_)
        ));
        g.members[2].lifecycle = "InService".into();
        let mut targets: BTreeSet<String> = ["i-1".to_string(), "i-2".to_string()].into();
        assert!(
            matches!(
                step(&doom(r.clone()), &g, 8, Some(&targets), true),
                Step::Wait(_)
            ),
            "not healthy in the target group yet"
        );
        targets.insert("i-3".into());
        assert_eq!(
            step(&doom(r.clone()), &g, 8, Some(&targets), true),
            Step::Retire {
                replacement: "i-3".into()
            }
        );
        // The breaker does not hold back a retirement whose replacement is up.
        assert!(matches!(
            step(&doom(r), &g, 8, None, false),
            Step::Retire { .. }
        ));
    }

    #[test]
    fn an_instance_that_ended_first_gives_the_extra_capacity_back_once() {
        let r = raised(2, &["i-1", "i-2"]);
        let g = group(
            3,
            vec![
                member("i-1", "Terminating", "Unhealthy"),
                member("i-2", "InService", "Healthy"),
            ],
        );
        assert_eq!(
            step(&doom(r.clone()), &g, 8, None, true),
            Step::Lower { to: 2 }
        );
        let back = group(2, vec![member("i-2", "InService", "Healthy")]);
        assert!(matches!(
            step(&doom(r), &back, 8, None, true),
            Step::Done(_)
        ));
    }

    #[test]
    fn late_duplicate_and_out_of_order_events_change_nothing() {
        // Late: the instance is gone already.
        let g = group(2, vec![member("i-2", "InService", "Healthy")]);
        assert!(matches!(
            step(&doom(None), &g, 8, None, true),
            Step::Done(_)
        ));
        // A duplicate, or a rebalance after the spot warning, for an instance in progress.
        let d = doom(raised(2, &["i-1"]));
        assert!(!is_new("i-1", &[&d]));
        assert!(is_new("i-9", &[&d]));
    }
}
