//! Fleet events (`[events] queue_url`): EC2 Spot interruption warnings, rebalance
//! recommendations and scheduled maintenance, as EventBridge delivers them to an SQS queue. A
//! task long-polls the queue and hands the messages to the loop; each round, after its reads,
//! the loop starts a replacement for each doomed instance of a group it holds and moves every
//! replacement one step ([`fleet_events::step`]): raise the desired capacity (within max), wait
//! until the new instance is in service and healthy, retire the doomed one decrementing the
//! desired capacity. Every one of those calls is a mutating call of the group, guarded by its
//! lease when the groups are shared.

use std::collections::{BTreeMap, BTreeSet};

use bakery_core::fleet_events::{self, Doom, Parsed, Raised, Step};
use bakery_core::observe::GroupFacts;
use tokio::sync::mpsc;

use crate::aws::{autoscaling, sqs, Aws};

/// How long one receive waits for a message (SQS allows up to 20 s).
const LONG_POLL_S: i32 = 10;
/// Messages one receive asks for (SQS allows up to 10).
const BATCH: i32 = 10;

/// The queue's side of the loop: messages received, and the replacements in progress.
pub(super) struct Events {
    pub url: String,
    rx: mpsc::UnboundedReceiver<sqs::Message>,
    poller: tokio::task::JoinHandle<()>,
    /// Replacements in progress, by doomed instance.
    dooms: BTreeMap<String, Doom>,
    /// Dooms held back (at max size, breaker), logged once each.
    held: BTreeSet<String>,
}

impl Drop for Events {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// Checks the queue (a queue that does not exist stops the daemon at start) and starts polling it.
pub(super) async fn start(aws: &Aws, url: &str) -> Result<Events, super::DaemonError> {
    if let Err(e) = sqs::check(&aws.sqs, url).await {
        return Err(super::DaemonError::Events {
            queue: url.to_string(),
            reason: if sqs::is_missing_queue(e.code()) {
                "the queue does not exist: create it (and the EventBridge rule that feeds it), or fix [events] queue_url".to_string()
            } else {
                e.to_string()
            },
        });
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let (client, queue) = (aws.sqs.clone(), url.to_string());
    let poller = tokio::spawn(async move {
        loop {
            match sqs::receive(&client, &queue, LONG_POLL_S, BATCH).await {
                Ok(messages) => {
                    for m in messages {
                        if tx.send(m).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, "could not receive fleet events; trying again");
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            }
        }
    });
    tracing::info!(queue = %url, "listening for fleet events (spot interruption, rebalance, scheduled maintenance)");
    Ok(Events {
        url: url.to_string(),
        rx,
        poller,
        dooms: BTreeMap::new(),
        held: BTreeSet::new(),
    })
}

impl super::Daemon {
    /// Takes the messages received since the last round, then moves every replacement a step.
    pub(super) async fn handle_events(&mut self) {
        let Some(mut ev) = self.events.take() else {
            return;
        };
        self.take_messages(&mut ev).await;
        self.step_dooms(&mut ev).await;
        self.events = Some(ev);
    }

    async fn take_messages(&mut self, ev: &mut Events) {
        let mut messages = Vec::new();
        while let Ok(m) = ev.rx.try_recv() {
            messages.push(m);
        }
        for m in messages {
            let event = match fleet_events::parse(&m.body) {
                Parsed::Ignored(why) => {
                    tracing::debug!(reason = %why, "fleet event ignored");
                    self.settle(&ev.url, &m.receipt, false).await;
                    continue;
                }
                Parsed::Event(e) => e,
            };
            let mut elsewhere = false;
            for id in &event.instances {
                let group = self
                    .known
                    .groups
                    .iter()
                    .find(|g| g.members.iter().any(|m| &m.id == id));
                let Some(group) = group else {
                    elsewhere |= self.watched_instances.contains(id);
                    if !self.watched_instances.contains(id) {
                        tracing::info!(instance = %id, kind = event.kind.as_str(), event = %event.id, "fleet event for an instance of no watched group; ignored");
                    }
                    continue;
                };
                let in_progress: Vec<&Doom> = ev.dooms.values().collect();
                if !fleet_events::is_new(id, &in_progress) {
                    tracing::info!(instance = %id, kind = event.kind.as_str(), event = %event.id, "fleet event for an instance already being replaced; nothing more to do");
                    continue;
                }
                tracing::warn!(group = %group.name, instance = %id, kind = event.kind.as_str(), event = %event.id, "fleet event: replacing the instance before it ends");
                *self
                    .metrics
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .events_handled
                    .entry(event.kind.as_str().to_string())
                    .or_default() += 1;
                ev.dooms.insert(
                    id.clone(),
                    Doom {
                        instance: id.clone(),
                        group: group.name.clone(),
                        kind: event.kind,
                        event_id: event.id.clone(),
                        raised: None,
                    },
                );
            }
            self.settle(&ev.url, &m.receipt, elsewhere).await;
        }
    }

    /// Deletes a message handled here, or makes it visible again at once when another daemon
    /// owns one of its instances' groups.
    async fn settle(&self, url: &str, receipt: &str, release: bool) {
        let r = if release {
            sqs::release(&self.aws.sqs, url, receipt).await
        } else {
            sqs::delete(&self.aws.sqs, url, receipt).await
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not settle a fleet event message; it comes back after its visibility timeout (handled again harmlessly)");
        }
    }

    /// Instances healthy in every target group of `group` (`None`: it has none).
    fn healthy_targets(&self, target_groups: &[String]) -> Option<BTreeSet<String>> {
        if target_groups.is_empty() {
            return None;
        }
        let mut out: Option<BTreeSet<String>> = None;
        for tg in target_groups {
            let healthy: BTreeSet<String> = self
                .known
                .health
                .get(tg)
                .map(|r| {
                    r.value
                        .iter()
                        .filter(|(_, t)| t.state == "healthy")
                        .map(|(id, _)| id.clone())
                        .collect()
                })
                .unwrap_or_default();
            out = Some(match out {
                None => healthy,
                Some(o) => o.intersection(&healthy).cloned().collect(),
            });
        }
        out
    }

    /// Takes each replacement in progress one step further ([`fleet_events::step`]).
    async fn step_dooms(&mut self, ev: &mut Events) {
        let now = super::now();
        let ids: Vec<String> = ev.dooms.keys().cloned().collect();
        for id in ids {
            let Some(doom) = ev.dooms.get(&id).cloned() else {
                continue;
            };
            let Some(group) = self
                .known
                .groups
                .iter()
                .find(|g| g.name == doom.group)
                .cloned()
            else {
                tracing::warn!(group = %doom.group, instance = %id, "the group of a doomed instance is no longer this daemon's; its replacement is left to its owner");
                ev.dooms.remove(&id);
                continue;
            };
            let allows = self.may_replace(&group);
            let targets = self.healthy_targets(&group.target_groups);
            match fleet_events::step(&doom, &group, group.max, targets.as_ref(), allows) {
                Step::Wait(_) => {}
                Step::Hold(why) => {
                    if ev.held.insert(id.clone()) {
                        tracing::warn!(group = %group.name, instance = %id, reason = %why, "fleet event: replacement held back");
                    }
                }
                Step::Done(why) => {
                    tracing::info!(group = %group.name, instance = %id, reason = %why, "fleet event: nothing more to do");
                    ev.dooms.remove(&id);
                    ev.held.remove(&id);
                }
                Step::Raise { to } => self.raise_for(ev, &id, &group, to).await,
                Step::Retire { replacement } => {
                    self.retire_doomed(ev, &id, &group, &doom, &replacement, now)
                        .await
                }
                Step::Lower { to } => self.lower_after(ev, &id, &group, to).await,
            }
        }
    }

    /// Whether the group's breaker and replacement window allow one more replacement.
    fn may_replace(&self, group: &GroupFacts) -> bool {
        let total = u32::try_from(group.members.len()).unwrap_or(u32::MAX);
        let window = self.replaced.get(&group.name).map_or(0, Vec::len);
        !self.frozen.contains(&group.name)
            && u32::try_from(window).unwrap_or(u32::MAX)
                < self.config.max_replace.resolve(total).max(1)
    }

    /// Raises the desired capacity to `to`, so the replacement of `id` launches first.
    async fn raise_for(&self, ev: &mut Events, id: &str, group: &GroupFacts, to: u32) {
        let call = autoscaling::set_desired(&self.aws.autoscaling, &group.name, to);
        match self.fenced(&group.name, call).await {
            Ok(()) => {
                tracing::info!(group = %group.name, instance = %id, desired = to, "fleet event: desired capacity raised to launch the replacement first");
                if let Some(d) = ev.dooms.get_mut(id) {
                    d.raised = Some(Raised {
                        desired: group.desired,
                        members: group.members.iter().map(|m| m.id.clone()).collect(),
                    });
                }
                ev.held.remove(id);
            }
            Err(e) => {
                tracing::warn!(group = %group.name, instance = %id, error = %e, "fleet event: could not raise the desired capacity; trying again next round")
            }
        }
    }

    /// Retires the doomed instance `id` now that its replacement is in service, counting the
    /// replacement in the group's window.
    async fn retire_doomed(
        &mut self,
        ev: &mut Events,
        id: &str,
        group: &GroupFacts,
        doom: &Doom,
        replacement: &str,
        now: u64,
    ) {
        let call = autoscaling::terminate_instance(&self.aws.autoscaling, id, true);
        match self.fenced(&group.name, call).await {
            Ok(()) => {
                tracing::warn!(group = %group.name, instance = %id, replacement = %replacement, kind = doom.kind.as_str(), "fleet event: replacement in service; the doomed instance is retired");
                self.replaced
                    .entry(group.name.clone())
                    .or_default()
                    .push(now);
                *self.replaced_total.entry(group.name.clone()).or_default() += 1;
                ev.dooms.remove(id);
            }
            Err(e) => {
                tracing::warn!(group = %group.name, instance = %id, error = %e, "fleet event: could not retire the instance; trying again next round")
            }
        }
    }

    /// Gives back the extra capacity (desired to `to`): the doomed instance ended first.
    async fn lower_after(&self, ev: &mut Events, id: &str, group: &GroupFacts, to: u32) {
        let call = autoscaling::set_desired(&self.aws.autoscaling, &group.name, to);
        match self.fenced(&group.name, call).await {
            Ok(()) => {
                tracing::info!(group = %group.name, instance = %id, desired = to, "fleet event: the instance ended first; the extra capacity is given back");
                ev.dooms.remove(id);
            }
            Err(e) => {
                tracing::warn!(group = %group.name, instance = %id, error = %e, "fleet event: could not lower the desired capacity; trying again next round")
            }
        }
    }
}
