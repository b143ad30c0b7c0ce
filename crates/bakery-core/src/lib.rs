//! bakery's core: everything that decides, and nothing that does I/O.
//!
//! The recipe and its located diagnostics, the rollout planner, the daemon's configuration, judge
//! and fleet breaker, the vocabulary of bakery's marks on AWS (tags), the audit's evaluation,
//! and the redaction of secrets. No AWS SDK, no tokio, no SSH: a decision is a pure function
//! over plain values, so it is unit-tested case by case in seconds, and the `bakery` crate's I/O
//! loops stay short (observe, call the decision, act).
#![forbid(unsafe_code)]

pub mod audit;
pub mod daemon_config;
pub mod diag;
pub mod fleet_events;
pub mod ingroup;
pub mod judge;
pub mod lease;
pub mod marks;
pub mod membership;
pub mod observe;
pub mod plan;
pub mod reads;
pub mod recipe;
pub mod release;
pub mod secret;
pub mod takeover;
