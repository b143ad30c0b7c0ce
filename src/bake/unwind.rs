//! A panic inside a bake must still run its undo stack: the bake's future is polled under
//! `catch_unwind`, and a panic becomes an error like any other, after which the cleanup runs
//! and removes every temporary resource (a bug in bakery never leaks an instance).

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Polls the inner future, turning a panic into `Err(message)`.
pub struct CatchUnwind<F>(Pin<Box<F>>);

impl<F> CatchUnwind<F> {
    pub fn new(f: F) -> Self {
        Self(Box::pin(f))
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The future is not polled again after a panic (it is dropped with this wrapper), so
        // whatever state it left half-changed is never observed.
        match catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(payload) => Poll::Ready(Err(message(payload))),
        }
    }
}

fn message(payload: Box<dyn Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_an_error_and_a_value_passes_through() {
        assert_eq!(CatchUnwind::new(async { 7 }).await, Ok(7));
        let r = CatchUnwind::new(async {
            tokio::task::yield_now().await;
            if std::hint::black_box(true) {
                panic!("boom at step 3");
            }
            1
        })
        .await;
        assert_eq!(r, Err("boom at step 3".to_string()));
    }
}
