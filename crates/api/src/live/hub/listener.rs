//! The LISTEN task: notifications become flags and a kick for the reader;
//! reconnects with jittered backoff.

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use observer_db::events::{self};
use observer_db::Db;
use tokio_util::sync::CancellationToken;

use super::reader::read_loop;
use super::state::Inner;

/// The hub's tasks on `caller`'s runtime, when the hub has no thread of its
/// own; they still end with `stop`.
pub(super) fn run_on(
    caller: Option<&tokio::runtime::Handle>,
    weak: Weak<Inner>,
    db: Db,
    stop: CancellationToken,
) {
    match caller {
        Some(handle) => {
            tracing::warn!("running the fan-out hub on the caller's runtime");
            let _entered = handle.enter();
            let _ = spawn_loops(weak, db, stop);
        }
        None => tracing::error!("no runtime to run the fan-out hub on"),
    }
}

/// The hub's two tasks, on the current runtime.
pub(super) fn spawn_loops(
    weak: Weak<Inner>,
    db: Db,
    stop: CancellationToken,
) -> [tokio::task::JoinHandle<()>; 2] {
    [
        tokio::spawn(listen_loop(weak.clone(), db.clone(), stop.clone())),
        tokio::spawn(read_loop(weak, db, stop)),
    ]
}

/// Keeps one LISTEN connection. Notifications only set flags and kick the
/// reader, so a burst of them costs one read.
pub(super) async fn listen_loop(weak: Weak<Inner>, db: Db, stop: CancellationToken) {
    tokio::select! {
        () = listen(weak, db) => {}
        () = stop.cancelled() => {}
    }
}

/// First wait before reconnecting; doubles per failed attempt up to
/// [`super::HubConfig::max_backoff`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);

/// Waits between LISTEN attempts: exponential, with jitter (each wait is
/// stretched by a random part of itself, up to double), so API replicas that
/// lost PostgreSQL at the same moment do not reconnect in lockstep and hit
/// the restarted server all at once. Never gives up: the hub has no other
/// way to hear about new events.
pub(super) fn reconnect_policy(max_backoff: Duration) -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(MIN_BACKOFF)
        .with_max_delay(max_backoff.max(MIN_BACKOFF))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

pub(super) async fn listen(weak: Weak<Inner>, db: Db) {
    let Some(max_backoff) = weak.upgrade().map(|inner| inner.cfg.max_backoff) else {
        return;
    };
    let mut backoff = reconnect_policy(max_backoff);
    let mut first = true;
    loop {
        if weak.strong_count() == 0 {
            return;
        }
        match events::listen(&db).await {
            Ok((mut listener, pid)) => {
                backoff = reconnect_policy(max_backoff);
                {
                    let Some(inner) = weak.upgrade() else { return };
                    inner.listener_pid.store(pid, Ordering::SeqCst);
                    if !first {
                        inner.metrics.listener_reconnects.inc();
                    }
                    first = false;
                    // Notifications sent while we were not listening are lost:
                    // catch up from the log.
                    inner.pending.events.store(true, Ordering::SeqCst);
                    inner.pending.access.store(true, Ordering::SeqCst);
                    inner.kick.notify_one();
                }
                loop {
                    let n = listener.try_recv().await;
                    let Some(inner) = weak.upgrade() else { return };
                    match n {
                        Ok(Some(n)) => {
                            mark(&inner, n.channel());
                            while let Some(n) = listener.next_buffered() {
                                mark(&inner, n.channel());
                            }
                            inner.kick.notify_one();
                        }
                        Ok(None) => {
                            tracing::warn!("LISTEN connection lost; reconnecting");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                            break;
                        }
                    }
                }
                if let Some(inner) = weak.upgrade() {
                    inner.listener_pid.store(0, Ordering::SeqCst);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not LISTEN; retrying");
            }
        }
        tokio::time::sleep(backoff.next().unwrap_or(max_backoff)).await;
    }
}

pub(super) fn mark(inner: &Inner, channel: &str) {
    match channel {
        observer_db::events::CHANNEL_ACCESS => inner.pending.access.store(true, Ordering::SeqCst),
        _ => inner.pending.events.store(true, Ordering::SeqCst),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_waits_grow_are_capped_and_jittered() {
        let max = Duration::from_secs(5);
        let a: Vec<Duration> = reconnect_policy(max).take(12).collect();
        let b: Vec<Duration> = reconnect_policy(max).take(12).collect();
        let mut base = MIN_BACKOFF;
        for d in &a {
            // Each wait is its step stretched by up to itself.
            assert!(*d >= base && *d <= base * 2, "{d:?} outside [{base:?}, 2×]");
            base = (base * 2).min(max);
        }
        // Two replicas that lose the server together wait differently.
        assert_ne!(a, b);
    }
}
