//! Interim live events (part 1, until the hub of `crate::live` is wired in): one LISTEN connection per process turns
//! notifications into wake-ups; each subscription then reads the event log
//! after its cursor **through RLS** (its own `observer_api` transaction), so a
//! revoked permission stops delivery at the next read. Correct (replay + live,
//! no gap, no duplicate) but the database work grows with subscribers; part 2
//! replaces the per-subscriber read with one shared read and in-memory access
//! sets (DESIGN.md §6).

use std::collections::VecDeque;
use std::time::Duration;

use observer_db::viewer::{self as db, EventCursor};
use observer_db::Db;
use tokio::sync::watch;

use crate::error::{from_db, GqlResult};
use crate::graphql::types::{attach_revisions, cursor, Message, MessageEvent, MessageEventKind};

/// Events read per transaction.
const BATCH: i64 = 100;
/// Fallback poll: a notification can be lost (reconnect) and the xmin
/// watermark can advance without one.
const POLL: Duration = Duration::from_millis(500);

/// Keeps one LISTEN connection and bumps `wake` on every notification (and
/// after every reconnect, since notifications sent meanwhile are lost).
pub async fn listen_loop(db: Db, wake: std::sync::Arc<watch::Sender<u64>>) {
    loop {
        match db::listen(&db).await {
            Ok(mut listener) => {
                wake.send_modify(|v| *v = v.wrapping_add(1));
                loop {
                    match listener.recv().await {
                        Ok(_) => wake.send_modify(|v| *v = v.wrapping_add(1)),
                        Err(e) => {
                            tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not LISTEN; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What one subscription reads.
pub struct Scope {
    pub viewer_id: i64,
    pub guild_id: Option<i64>,
    pub channel_ids: Option<Vec<i64>>,
}

/// The starting cursor: the client's, or "from now on".
pub async fn start_cursor(db: &Db, viewer_id: i64, after: Option<&str>) -> GqlResult<EventCursor> {
    if let Some(a) = after {
        return parse_cursor(a).ok_or_else(|| crate::error::bad_request("invalid cursor"));
    }
    let mut tx = db.viewer(viewer_id).await.map_err(from_db)?;
    let c = db::event_watermark(&mut tx).await.map_err(from_db)?;
    tx.commit().await.map_err(from_db)?;
    Ok(c)
}

pub fn format_cursor(c: EventCursor) -> String {
    cursor::opaque(&format!("e1:{}:{}", c.xid, c.seq))
}

pub fn parse_cursor(s: &str) -> Option<EventCursor> {
    let text = cursor::unopaque(s)?;
    let (xid, seq) = text.strip_prefix("e1:")?.split_once(':')?;
    Some(EventCursor {
        xid: xid.parse().ok().filter(|x: &i64| *x >= 0)?,
        seq: seq.parse().ok()?,
    })
}

async fn read_batch(db: &Db, scope: &Scope, after: EventCursor) -> GqlResult<Vec<MessageEvent>> {
    let mut tx = db.viewer(scope.viewer_id).await.map_err(from_db)?;
    let rows = db::events_after(
        &mut tx,
        after,
        scope.guild_id,
        scope.channel_ids.as_deref(),
        BATCH,
    )
    .await
    .map_err(from_db)?;
    let keys: Vec<(i64, i64)> = rows
        .iter()
        .map(|r| (r.message.guild_id, r.message.message_id))
        .collect();
    let revisions = db::revisions(&mut tx, &keys).await.map_err(from_db)?;
    tx.commit().await.map_err(from_db)?;
    let cursors: Vec<(EventCursor, i16)> = rows.iter().map(|r| (r.cursor, r.kind)).collect();
    let mut messages: Vec<Message> = rows.into_iter().map(|r| Message::from(r.message)).collect();
    attach_revisions(&mut messages, revisions);
    Ok(messages
        .into_iter()
        .zip(cursors)
        .map(|(message, (c, kind))| MessageEvent {
            kind: match kind {
                1 => MessageEventKind::Created,
                3 => MessageEventKind::Deleted,
                _ => MessageEventKind::Updated,
            },
            cursor: format_cursor(c),
            message,
        })
        .collect())
}

struct StreamState {
    db: Db,
    scope: Scope,
    cursor: EventCursor,
    buf: VecDeque<(EventCursor, MessageEvent)>,
    wake: Option<watch::Receiver<u64>>,
    failed: bool,
}

/// The event stream of one subscription.
pub fn events(
    db: Db,
    scope: Scope,
    start: EventCursor,
    wake: Option<watch::Receiver<u64>>,
) -> impl futures::Stream<Item = GqlResult<MessageEvent>> {
    let st = StreamState {
        db,
        scope,
        cursor: start,
        buf: VecDeque::new(),
        wake,
        failed: false,
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some((c, ev)) = st.buf.pop_front() {
                st.cursor = c;
                return Some((Ok(ev), st));
            }
            if st.failed {
                return None;
            }
            match read_batch(&st.db, &st.scope, st.cursor).await {
                Ok(evs) if !evs.is_empty() => {
                    for ev in evs {
                        let c = parse_cursor(&ev.cursor).unwrap_or(st.cursor);
                        st.buf.push_back((c, ev));
                    }
                }
                Ok(_) => match st.wake.as_mut() {
                    Some(rx) => {
                        let _ = tokio::time::timeout(POLL, rx.changed()).await;
                    }
                    None => tokio::time::sleep(POLL).await,
                },
                Err(e) => {
                    // Tell the client to resume from its last cursor.
                    st.failed = true;
                    return Some((Err(e), st));
                }
            }
        }
    })
}
