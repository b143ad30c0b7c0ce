//! The call policy of an [`Aws`](super::Aws) client: how long one call's retries may sleep, an
//! optional client-side token bucket every attempt waits on, and per-action counters of calls,
//! throttles and errors for metrics. A long-running process (the health daemon) sets a rate well
//! below AWS's published limits so it never starves the account's other tools of API capacity.
//!
//! Each client holds its own policy, so the daemon, a bake and a test never share a budget. The
//! service wrappers (`ec2.rs`, `autoscaling.rs`, ...) take the service clients, not the `Aws`
//! bundle, so [`super::call`] finds the policy of the work it runs for through a task-local set
//! by [`Aws::scope`](super::Aws::scope); outside any scope a call follows [`CallPolicy::default`]
//! (no bucket, 30 s of retries, nothing counted).
//!
//! The bucket is bakery's own, not `governor`'s: the daemon changes its rate on SIGHUP without
//! losing what was spent, and plans each round from the rate it is allowed (the effective
//! interval); `governor`'s quota is fixed at construction and its limiter says neither.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

/// The slowest rate a bucket runs at, so that waits stay finite.
const MIN_RATE: f64 = 0.001;

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        let burst = burst.max(1.0);
        Self {
            state: Mutex::new(Bucket {
                rate: rate.max(MIN_RATE),
                burst,
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// Changes the rate and burst (a reloaded configuration); what was spent stays spent.
    pub fn set(&self, rate: f64, burst: f64) {
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        b.rate = rate.max(MIN_RATE);
        b.burst = burst.max(1.0);
        b.tokens = b.tokens.min(b.burst);
    }

    pub fn rate(&self) -> f64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).rate
    }

    /// Takes a token, or says how long until one is there.
    fn try_take(&self) -> Result<(), Duration> {
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * b.rate).min(b.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::try_from_secs_f64((1.0 - b.tokens) / b.rate)
                .unwrap_or(Duration::from_secs(1)))
        }
    }

    /// Waits for a token.
    pub async fn acquire(&self) {
        while let Err(wait) = self.try_take() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Calls and throttles per action since the policy was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActionStats {
    pub calls: u64,
    pub throttles: u64,
    pub errors: u64,
}

/// How long one call's retries may sleep by default: long enough to ride out a throttling
/// burst, short enough that a real outage surfaces while the user is still watching.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(30);

/// See the module documentation.
#[derive(Debug)]
pub struct CallPolicy {
    bucket: Option<TokenBucket>,
    retry_budget_ms: AtomicU64,
    stats: Mutex<BTreeMap<&'static str, ActionStats>>,
}

impl Default for CallPolicy {
    fn default() -> Self {
        Self {
            bucket: None,
            retry_budget_ms: AtomicU64::new(DEFAULT_RETRY_BUDGET.as_millis() as u64),
            stats: Mutex::new(BTreeMap::new()),
        }
    }
}

impl CallPolicy {
    /// A policy whose attempts wait on a bucket of `rate` calls a second and `burst`, whose
    /// retries sleep at most `retry_budget` per call.
    pub fn metered(rate: f64, burst: f64, retry_budget: Duration) -> Self {
        let p = Self {
            bucket: Some(TokenBucket::new(rate, burst)),
            ..Self::default()
        };
        p.set_retry_budget(retry_budget);
        p
    }

    /// A policy for the few calls of an orderly shutdown: no bucket (they must finish within a
    /// second), retries within `retry_budget`.
    pub fn unmetered(retry_budget: Duration) -> Self {
        let p = Self::default();
        p.set_retry_budget(retry_budget);
        p
    }

    /// Changes the bucket's rate (a reloaded configuration); a policy without a bucket has none
    /// to change.
    pub fn set_rate(&self, rate: f64, burst: f64) {
        if let Some(b) = &self.bucket {
            b.set(rate, burst);
        }
    }

    /// The bucket's rate, if there is a bucket.
    pub fn rate(&self) -> Option<f64> {
        self.bucket.as_ref().map(TokenBucket::rate)
    }

    pub fn set_retry_budget(&self, budget: Duration) {
        self.retry_budget_ms.store(
            u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub fn retry_budget(&self) -> Duration {
        Duration::from_millis(self.retry_budget_ms.load(Ordering::Relaxed))
    }

    /// Waits for the bucket, if there is one.
    pub async fn acquire(&self) {
        if let Some(b) = &self.bucket {
            b.acquire().await;
        }
    }

    /// Records one attempt: `None` for success, `Some(throttled)` for a failure.
    pub fn record(&self, action: &'static str, failed: Option<bool>) {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let s = stats.entry(action).or_default();
        s.calls += 1;
        match failed {
            Some(true) => s.throttles += 1,
            Some(false) => s.errors += 1,
            None => {}
        }
    }

    pub fn stats(&self) -> BTreeMap<&'static str, ActionStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

tokio::task_local! {
    /// The policy of the work a task runs for (see [`super::Aws::scope`]).
    static POLICY: Arc<CallPolicy>;
    /// The first attempt of the first call in this scope already has its token.
    static PREPAID: Cell<bool>;
}

/// Runs `f` with `policy` as the policy of every call it makes.
pub async fn scope<F: Future>(policy: Arc<CallPolicy>, f: F) -> F::Output {
    POLICY.scope(policy, f).await
}

/// The policy of the work this task runs for, if any.
pub fn current() -> Option<Arc<CallPolicy>> {
    POLICY.try_with(Arc::clone).ok()
}

/// Runs `f`, whose first attempt's token the caller already took (with
/// [`CallPolicy::acquire`]): so a caller can send reads out one by one in its own order of
/// priority, each as soon as the bucket allows, and run them concurrently.
pub async fn prepaid<F: Future>(f: F) -> F::Output {
    PREPAID.scope(Cell::new(true), f).await
}

/// Whether this attempt was paid for already (true once per [`prepaid`] scope).
pub(super) fn take_prepaid() -> bool {
    PREPAID.try_with(|c| c.replace(false)).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_bucket_allows_a_burst_then_paces_at_the_rate() {
        let b = TokenBucket::new(20.0, 3.0);
        let start = Instant::now();
        for _ in 0..3 {
            b.acquire().await;
        }
        assert!(
            start.elapsed() < Duration::from_millis(20),
            "the burst is immediate"
        );
        for _ in 0..4 {
            b.acquire().await;
        }
        let paced = start.elapsed();
        assert!(
            paced >= Duration::from_millis(190),
            "4 more at 20/s take ~200 ms, took {paced:?}"
        );
    }

    #[test]
    fn counters_separate_throttles_from_other_errors() {
        let p = CallPolicy::default();
        p.record("test:Action", None);
        p.record("test:Action", Some(true));
        p.record("test:Action", Some(false));
        assert_eq!(
            p.stats()["test:Action"],
            ActionStats {
                calls: 3,
                throttles: 1,
                errors: 1
            }
        );
    }

    #[tokio::test]
    async fn each_scope_sees_its_own_policy_and_no_scope_sees_none() {
        assert!(current().is_none());
        let daemon = Arc::new(CallPolicy::metered(5.0, 20.0, Duration::from_secs(2)));
        let bake = Arc::new(CallPolicy::default());
        let seen = scope(daemon.clone(), async { current().unwrap().retry_budget() }).await;
        assert_eq!(seen, Duration::from_secs(2));
        let seen = scope(bake, async { current().unwrap().rate() }).await;
        assert_eq!(seen, None);
        daemon.set_rate(2.0, 4.0);
        assert_eq!(daemon.rate(), Some(2.0));
    }

    #[tokio::test]
    async fn a_prepaid_scope_pays_once() {
        assert!(!take_prepaid());
        prepaid(async {
            assert!(take_prepaid());
            assert!(!take_prepaid(), "only the first attempt");
        })
        .await;
    }
}
