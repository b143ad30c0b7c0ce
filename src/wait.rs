//! Waiting for AWS to reach a state, without the fixed 15-second polls that stretch every wait.
//!
//! The interval adapts to how long we have already waited: the next probe comes after a fixed
//! share of the time spent so far (clamped between a floor and a ceiling), so a wait overshoots
//! its condition by at most that share, while a long wait on AWS still makes few calls.

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
pub async fn until<T, E, F, Fut>(
    what: impl Into<String>,
    timeout: Duration,
    poll: Poll,
    mut probe: F,
) -> Result<T, WaitError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Probe<T>, E>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        let last = match probe().await.map_err(WaitError::Failed)? {
            Probe::Ready(v) => return Ok(v),
            Probe::Pending(seen) => seen,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitError::Timeout {
                what: what.into(),
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
}
