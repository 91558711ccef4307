//! The reader task: one read of access changes and message events per
//! wake-up, whatever the number of subscribers.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use observer_db::events::{self, AccessEventRow, Cursor};
use observer_db::{Db, FanoutConn};
use tokio_util::sync::CancellationToken;

use super::access::{expire_timeouts, refresh_access};
use super::delivery::deliver;
use super::state::Inner;
use super::subscription::attach;

pub(super) async fn read_loop(weak: Weak<Inner>, db: Db, stop: CancellationToken) {
    tokio::select! {
        () = read(weak, db) => {}
        () = stop.cancelled() => {}
    }
}

pub(super) async fn read(weak: Weak<Inner>, db: Db) {
    let (tick_every, kick) = match weak.upgrade() {
        Some(inner) => (inner.cfg.tick, inner.kick.clone()),
        None => return,
    };
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures: u32 = 0;
    // The reader's own session (see `Db::fanout_conn`), opened on first use
    // and after any failed read.
    let mut conn: Option<FanoutConn> = None;
    loop {
        let ticked = tokio::select! {
            _ = kick.notified() => false,
            _ = tick.tick() => true,
        };
        let Some(inner) = weak.upgrade() else { return };
        if ticked {
            inner.pending.events.store(true, Ordering::SeqCst);
            inner.pending.access.store(true, Ordering::SeqCst);
        }
        let reads_before = inner.metrics.reads.get();
        let result = poll(&inner, &db, &mut conn, ticked).await;
        if ticked {
            inner
                .metrics
                .tick_reads
                .inc_by(inner.metrics.reads.get() - reads_before);
        }
        match result {
            Ok(()) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                inner.metrics.read_errors.inc();
                // Nothing was consumed: read again at the next tick.
                inner.pending.events.store(true, Ordering::SeqCst);
                inner.pending.access.store(true, Ordering::SeqCst);
                if failures % 20 == 1 {
                    tracing::warn!(error = %e, failures, "fan-out read failed");
                }
            }
        }
    }
}

/// One round: initialise cursors, apply access changes, expire timeouts,
/// deliver new message events.
/// `db`: the reader's own pool (see [`Hub::run`]); `conn`: its session for
/// message events, dropped (and reopened next round) when a read fails.
pub(super) async fn poll(
    inner: &Arc<Inner>,
    db: &Db,
    conn: &mut Option<FanoutConn>,
    ticked: bool,
) -> observer_db::Result<()> {
    let (cursor, access_cursor) = {
        let st = inner.state();
        (st.cursor, st.access_cursor)
    };
    let (Some(cursor), Some(mut access_cursor)) = (cursor, access_cursor) else {
        let mut tx = db.fanout().await?;
        let head = events::head(&mut tx).await?;
        tx.commit().await?;
        inner.metrics.reads.inc();
        {
            let mut st = inner.state();
            st.cursor.get_or_insert(head);
            st.access_cursor.get_or_insert(head);
        }
        inner.ready.send_replace(true);
        return Ok(());
    };

    let want_access = inner.pending.access.swap(false, Ordering::SeqCst);
    let want_events = inner.pending.events.swap(false, Ordering::SeqCst);

    if want_access {
        // Access first, so a revocation read in this round applies to the
        // message events read after it.
        let mut changes: Vec<AccessEventRow> = Vec::new();
        let mut tx = db.fanout().await?;
        loop {
            let (rows, next) =
                events::access_after(&mut tx, access_cursor, inner.cfg.read_batch).await?;
            let full = rows.len() as i64 >= inner.cfg.read_batch;
            changes.extend(rows);
            access_cursor = next;
            if !full {
                break;
            }
        }
        // The dirty set leaves the shared state only for the refresh: on any
        // failure it goes back, or a revocation for those viewers would
        // never apply (the cursor does not move, so the changes are re-read).
        let dirty: BTreeSet<i64> = std::mem::take(&mut inner.state().dirty);
        let applied = async {
            if !changes.is_empty() || !dirty.is_empty() {
                refresh_access(inner, &mut tx, &changes, &dirty).await?;
            }
            tx.commit().await
        }
        .await;
        if let Err(e) = applied {
            restore_dirty(inner, dirty);
            return Err(e);
        }
        inner.metrics.reads.inc();
        inner.state().access_cursor = Some(access_cursor);
    }
    expire_timeouts(inner);

    if want_events {
        let mut session = match conn.take() {
            Some(c) => c,
            None => db.fanout_conn().await?,
        };
        // Kept only after a good read: a failure may mean a broken
        // connection, so the next round opens a fresh one.
        read_events(inner, &mut session, cursor).await?;
        *conn = Some(session);
        inner.metrics.reads.inc();
        if !ticked {
            inner.metrics.notified_event_reads.inc();
        }
    }
    Ok(())
}

/// Reads the message events after `cursor` (a statement per batch of
/// `read_batch`, each its own snapshot, which the cursor's xmin rule makes
/// safe) and delivers them.
pub(super) async fn read_events(
    inner: &Inner,
    conn: &mut FanoutConn,
    mut cursor: Cursor,
) -> observer_db::Result<()> {
    loop {
        let (rows, next) = events::read_after(conn, cursor, inner.cfg.read_batch).await?;
        let full = rows.len() as i64 >= inner.cfg.read_batch;
        let keys: Vec<(i64, i64)> = rows
            .iter()
            .filter(|r| r.message.edited_at.is_some())
            .map(|r| (r.guild_id, r.message.message_id))
            .collect();
        let revisions = events::revisions(conn, &keys).await?;
        deliver(inner, attach(rows, revisions), next);
        cursor = next;
        if !full {
            return Ok(());
        }
    }
}

/// Puts back viewers taken out of `dirty` for a refresh that failed (those
/// still subscribed; a viewer that left since has nothing to refresh).
pub(super) fn restore_dirty(inner: &Inner, dirty: BTreeSet<i64>) {
    let mut st = inner.state();
    let st = &mut *st;
    st.dirty
        .extend(dirty.into_iter().filter(|v| st.viewers.contains_key(v)));
}
