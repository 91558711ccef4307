//! Waiting for asynchronous effects (a mirror converging, a server noticing)
//! by polling, with a deadline and a message that says what never happened.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every 100 ms until it returns `Ok(Ok(()))`; fails with the
/// last reason after `timeout`. An `Err` from `check` itself ends at once.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Result<(), String>>>,
{
    eventually_every(timeout, Duration::from_millis(100), what, check).await
}

/// [`eventually`] with its own polling interval, for checks that are expensive.
pub async fn eventually_every<F, Fut>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Result<(), String>>>,
{
    let start = Instant::now();
    loop {
        match check().await? {
            Ok(()) => return Ok(()),
            Err(why) if start.elapsed() > timeout => {
                anyhow::bail!("{what}: not reached within {timeout:?}: {why}")
            }
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// Polls a synchronous `cond` every 20 ms; whether it held within `timeout`.
pub async fn holds_within(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Polls `cond` every 5 ms and panics after `limit`; returns how long it
/// took (tests that bound a latency assert on it).
pub async fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}
