//! Waiting for AWS to reach a state, without the fixed 15-second polls that stretch every wait.
//!
//! The interval adapts to how long we have already waited: the next probe comes after a fixed
//! share of the time spent so far (clamped between a floor and a ceiling), so a wait overshoots
//! its condition by at most that share, while a long wait on AWS still makes few calls.
//!
//! A probe whose AWS call ran out of retries for want of an answer (throttled, 5xx, no
//! connection) does not end the wait: the thing waited for may be fine, and a throttling storm
//! that outlasts one call's retries is not a reason to throw a bake away. Such failures are ridden
//! out for up to [`OUTAGE_LIMIT`] in a row, within the wait's own deadline.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How one kind of wait polls.
#[derive(Debug, Clone, Copy)]
pub struct Poll {
    pub min: Duration,
    pub max: Duration,
    /// Share of the elapsed time to wait before the next probe.
    pub ratio: f64,
}

impl Poll {
    /// For API state changes (instance running, image available): 3% of the time waited, so a
    /// 3 s wait overshoots by at most 0.1 s, while a 10-minute AMI costs about 200 describe calls
    /// (one every 15 s at most once it has waited 8 minutes).
    pub const API: Poll = Poll {
        min: Duration::from_millis(80),
        max: Duration::from_secs(15),
        ratio: 0.03,
    };
    /// For a port to accept connections (cheap probes, no API budget spent).
    pub const CONNECT: Poll = Poll {
        min: Duration::from_millis(50),
        max: Duration::from_secs(2),
        ratio: 0.05,
    };

    /// The pause before the next probe, after `elapsed` of waiting.
    pub fn next_interval(&self, elapsed: Duration) -> Duration {
        elapsed.mul_f64(self.ratio).clamp(self.min, self.max)
    }
}

/// How long a wait keeps going while every probe fails transiently: long enough for a throttling
/// storm, short enough that a real outage surfaces while the user is still watching.
pub const OUTAGE_LIMIT: Duration = Duration::from_secs(120);

/// Errors that may mean only that the API did not answer usefully (see [`crate::aws::AwsError`]).
pub trait Outage {
    fn is_outage(&self) -> bool;
}

/// Tracks a run of transient failures for a polling loop: [`Tolerance::ride_out`] says whether
/// to keep polling after one, [`Tolerance::clear`] ends the run after an answer.
#[derive(Debug)]
pub struct Tolerance {
    limit: Duration,
    since: Option<Instant>,
}

impl Tolerance {
    pub fn new(limit: Duration) -> Self {
        Self { limit, since: None }
    }

    /// True while `e` is an outage and the run of them has lasted less than the limit.
    pub fn ride_out(&mut self, e: &impl Outage) -> bool {
        if !e.is_outage() {
            return false;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        since.elapsed() < self.limit
    }

    pub fn clear(&mut self) {
        self.since = None;
    }
}

/// Runs an idempotent call again while it fails for want of an answer, for up to
/// [`OUTAGE_LIMIT`] in a row (a second apart, on top of the call's own retries). For the calls
/// that would otherwise throw finished work away, such as creating the image after provisioning.
pub async fn persist<T, E, F, Fut>(mut call: F) -> Result<T, E>
where
    E: Outage + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut outage = Tolerance::new(OUTAGE_LIMIT);
    loop {
        match call().await {
            Err(e) if outage.ride_out(&e) => {
                tracing::warn!(error = %e, "AWS did not answer; asking again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            r => return r,
        }
    }
}

/// What a probe saw.
pub enum Probe<T> {
    Ready(T),
    /// Not yet; the text says what was seen, for the timeout error.
    Pending(String),
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError<E> {
    #[error("timed out after {waited:?} waiting for {what} (last seen: {last})")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },
    #[error(transparent)]
    Failed(E),
}

/// Probes until ready, failed, or `timeout`; every `.await` inside is a cancellation point.
/// Outages are ridden out for up to [`OUTAGE_LIMIT`] in a row.
pub async fn until<T, E, F, Fut>(
    what: impl Into<String>,
    timeout: Duration,
    poll: Poll,
    probe: F,
) -> Result<T, WaitError<E>>
where
    E: Outage + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Probe<T>, E>>,
{
    until_tolerating(what, timeout, poll, OUTAGE_LIMIT, probe).await
}

/// [`until`] with the outage limit given.
pub async fn until_tolerating<T, E, F, Fut>(
    what: impl Into<String>,
    timeout: Duration,
    poll: Poll,
    outage_limit: Duration,
    mut probe: F,
) -> Result<T, WaitError<E>>
where
    E: Outage + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Probe<T>, E>>,
{
    let what = what.into();
    let start = Instant::now();
    // A timeout too long for the clock waits "for ever" (a century) instead of panicking.
    let deadline = start
        .checked_add(timeout)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 3600));
    let mut outage = Tolerance::new(outage_limit);
    loop {
        let last = match probe().await {
            Ok(Probe::Ready(v)) => return Ok(v),
            Ok(Probe::Pending(seen)) => {
                outage.clear();
                seen
            }
            Err(e) if outage.ride_out(&e) => {
                tracing::warn!(waiting_for = %what, error = %e, "AWS did not answer; still waiting");
                format!("the API failed: {e}")
            }
            Err(e) => return Err(WaitError::Failed(e)),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitError::Timeout {
                what,
                waited: now - start,
                last,
            });
        }
        let pause = poll.next_interval(now - start).min(deadline - now);
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_follows_elapsed_time_within_bounds() {
        let p = Poll::API;
        assert_eq!(p.next_interval(Duration::ZERO), Duration::from_millis(80));
        assert_eq!(
            p.next_interval(Duration::from_secs(5)),
            Duration::from_millis(150)
        );
        assert_eq!(
            p.next_interval(Duration::from_secs(3600)),
            Duration::from_secs(15)
        );
    }

    #[tokio::test]
    async fn until_returns_when_ready_and_times_out_with_the_last_state() {
        let mut n = 0;
        let v: Result<u32, WaitError<std::io::Error>> =
            until("thing", Duration::from_secs(10), Poll::API, || {
                n += 1;
                let k = n;
                async move {
                    Ok(if k >= 3 {
                        Probe::Ready(k)
                    } else {
                        Probe::Pending("pending".into())
                    })
                }
            })
            .await;
        assert_eq!(v.unwrap(), 3);

        let start = Instant::now();
        let err = until::<(), std::io::Error, _, _>(
            "image ami-1",
            Duration::from_millis(300),
            Poll::API,
            || async { Ok(Probe::Pending("state pending".into())) },
        )
        .await
        .unwrap_err();
        assert!(Instant::now() - start >= Duration::from_millis(300));
        let text = err.to_string();
        assert!(
            text.contains("image ami-1") && text.contains("state pending"),
            "{text}"
        );
    }

    impl Outage for std::io::Error {
        fn is_outage(&self) -> bool {
            false
        }
    }

    #[derive(Debug)]
    struct ApiError {
        outage: bool,
    }

    impl std::fmt::Display for ApiError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(if self.outage {
                "throttled"
            } else {
                "access denied"
            })
        }
    }

    impl Outage for ApiError {
        fn is_outage(&self) -> bool {
            self.outage
        }
    }

    #[tokio::test]
    async fn outages_are_ridden_out_and_other_errors_end_the_wait() {
        // Three probes fail for want of an answer, the fourth sees the thing ready.
        let mut n = 0;
        let v = until("image ami-1", Duration::from_secs(10), Poll::API, || {
            n += 1;
            let k = n;
            async move {
                if k <= 3 {
                    Err(ApiError { outage: true })
                } else {
                    Ok(Probe::Ready(k))
                }
            }
        })
        .await;
        assert_eq!(v.unwrap(), 4);

        // A refusal is not an outage: the first one ends the wait.
        let mut n = 0;
        let err = until::<(), _, _, _>("image ami-1", Duration::from_secs(10), Poll::API, || {
            n += 1;
            async { Err(ApiError { outage: false }) }
        })
        .await
        .unwrap_err();
        assert!(matches!(err, WaitError::Failed(ApiError { outage: false })));
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn an_outage_longer_than_the_limit_ends_the_wait_but_answers_reset_it() {
        let start = Instant::now();
        let err = until_tolerating::<(), _, _, _>(
            "image ami-1",
            Duration::from_secs(10),
            Poll::API,
            Duration::from_millis(300),
            || async { Err(ApiError { outage: true }) },
        )
        .await
        .unwrap_err();
        let waited = Instant::now() - start;
        assert!(matches!(err, WaitError::Failed(ApiError { outage: true })));
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
            "{waited:?}"
        );

        // Failing runs of 400 ms, each ended by an answer, never reach a 700 ms limit; the wait
        // ends at its deadline.
        let start = Instant::now();
        let err = until_tolerating::<(), _, _, _>(
            "image ami-1",
            Duration::from_millis(2500),
            Poll::API,
            Duration::from_millis(700),
            || async move {
                if (Instant::now() - start).as_millis() % 1000 < 400 {
                    Err(ApiError { outage: true })
                } else {
                    Ok(Probe::Pending("pending".into()))
                }
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(err, WaitError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn persist_asks_again_through_an_outage_but_not_after_a_refusal() {
        let mut n = 0;
        let v = persist(|| {
            n += 1;
            let k = n;
            async move {
                if k <= 2 {
                    Err(ApiError { outage: true })
                } else {
                    Ok(k)
                }
            }
        })
        .await;
        assert_eq!(v.unwrap(), 3);

        let mut n = 0;
        let err = persist::<(), _, _, _>(|| {
            n += 1;
            async { Err(ApiError { outage: false }) }
        })
        .await
        .unwrap_err();
        assert!(!err.outage);
        assert_eq!(n, 1);
    }
}
