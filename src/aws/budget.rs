//! The API budget: a client-side token bucket every AWS call waits on (when one is set), and
//! per-action counters of calls and throttles for metrics. A long-running process (the health
//! daemon) sets a rate well below AWS's published limits so it never starves the account's other
//! tools of API capacity.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
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

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        let burst = burst.max(1.0);
        Self {
            state: Mutex::new(Bucket {
                rate: rate.max(0.001),
                burst,
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// Changes the rate and burst (a reloaded configuration).
    pub fn set(&self, rate: f64, burst: f64) {
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        b.rate = rate.max(0.001);
        b.burst = burst.max(1.0);
        b.tokens = b.tokens.min(b.burst);
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
            Err(Duration::from_secs_f64((1.0 - b.tokens) / b.rate))
        }
    }

    /// Waits for a token.
    pub async fn acquire(&self) {
        while let Err(wait) = self.try_take() {
            tokio::time::sleep(wait).await;
        }
    }
}

static BUDGET: OnceLock<TokenBucket> = OnceLock::new();

static BYPASS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets (or changes) the process-wide budget.
pub fn set_global(rate: f64, burst: f64) {
    if BUDGET.set(TokenBucket::new(rate, burst)).is_err() {
        if let Some(b) = BUDGET.get() {
            b.set(rate, burst);
        }
    }
}

/// Lets calls past the budget: for the few calls of an orderly shutdown, which must finish
/// within a second.
pub fn bypass() {
    BYPASS.store(true, std::sync::atomic::Ordering::Relaxed);
}

pub fn global() -> Option<&'static TokenBucket> {
    if BYPASS.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    BUDGET.get()
}

/// Calls and throttles per action since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActionStats {
    pub calls: u64,
    pub throttles: u64,
    pub errors: u64,
}

static STATS: Mutex<BTreeMap<&'static str, ActionStats>> = Mutex::new(BTreeMap::new());

/// Records one attempt: `None` for success, `Some(throttled)` for a failure.
pub fn record(action: &'static str, failed: Option<bool>) {
    let mut stats = STATS.lock().unwrap_or_else(|p| p.into_inner());
    let s = stats.entry(action).or_default();
    s.calls += 1;
    match failed {
        Some(true) => s.throttles += 1,
        Some(false) => s.errors += 1,
        None => {}
    }
}

pub fn stats() -> BTreeMap<&'static str, ActionStats> {
    STATS.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
        record("test:Action", None);
        record("test:Action", Some(true));
        record("test:Action", Some(false));
        assert_eq!(
            stats()["test:Action"],
            ActionStats {
                calls: 3,
                throttles: 1,
                errors: 1
            }
        );
    }
}
