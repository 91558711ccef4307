//! Hand-off of a batch of events to every subscriber whose viewer may see
//! them: `try_send` into bounded buffers, never waiting on anyone.

use std::sync::Arc;

use super::state::{EndReason, Inner};
use super::LiveEvent;
use chrono::Utc;
use observer_db::events::Cursor;
use tokio::sync::mpsc;

/// Hands each event to every subscriber whose scope and viewer allow it, and
/// moves the hub's cursor — both under the lock, so a registration sees
/// either none or all of a batch.
pub(super) fn deliver(inner: &Inner, batch: Vec<Arc<LiveEvent>>, next: Cursor) {
    let now = Utc::now();
    let mut st = inner.state();
    let st = &mut *st;
    let mut ended: Vec<u64> = Vec::new();
    let mut deliveries: u64 = 0;
    let index = st.take_index();
    let mut ended_any = false;
    for ev in &batch {
        let (g, c) = (ev.row.guild_id, ev.row.channel_id);
        // Prior versions are history: a viewer with VIEW_CHANNEL but not
        // READ_MESSAGE_HISTORY gets the event without them (built once per
        // event, shared by all such subscribers).
        let mut without_history: Option<Arc<LiveEvent>> = None;
        for id in index.get(&c).into_iter().flatten() {
            let Some(sub) = st.subs.get(id) else {
                continue;
            };
            if !sub.wants(g, c) {
                continue;
            }
            let Some(access) = st.viewers.get(&sub.viewer).and_then(|v| v.access(g, c)) else {
                continue;
            };
            let item = if access.history || ev.revisions.is_empty() {
                ev.clone()
            } else {
                without_history
                    .get_or_insert_with(|| Arc::new(LiveEvent::new(ev.row.clone(), Vec::new())))
                    .clone()
            };
            match sub.tx.try_send(item) {
                Ok(()) => deliveries += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let _ = sub.end.set(EndReason::SlowConsumer);
                    ended.push(*id);
                }
                // The stream is gone; its guard unregisters it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        // The end of those subscriptions must not see later events: remove
        // them before the next event of the batch.
        for id in ended.drain(..) {
            ended_any = true;
            if let Some(s) = st.subs.remove(&id) {
                inner.metrics.slow_consumers.inc();
                st.release_viewer(s.viewer);
            }
        }
        let lag = (now - ev.row.at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
        inner.metrics.fanout_latency.observe(lag);
    }
    // Still exact unless subscriptions ended above; then rebuilt next time.
    if !ended_any {
        st.index = Some(index);
    }
    inner.metrics.deliveries.inc_by(deliveries);
    inner.metrics.events.inc_by(batch.len() as u64);
    inner.metrics.subscribers.set(st.subs.len() as i64);
    st.cursor = Some(next);
}
