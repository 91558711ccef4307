//! The two event logs (`message_events`, `access_events`) as live fan-out and
//! resume read them.
//!
//! Both logs are ordered by `(xid, seq)` and only the prefix below the
//! snapshot's xmin is read (migrations/0001_schema.sql, "commit order vs
//! sequence order"): every transaction with a smaller xid has finished and
//! every future one gets a larger xid, so a prefix once read never gains an
//! earlier member. A [`Cursor`] is a position in that order.
//!
//! - Fan-out ([`read_after`], [`access_after`], [`head`]) runs as
//!   `observer_fanout` and reads each event once for every subscriber; the
//!   caller filters with [`crate::access`].
//! - Resume ([`replay_for_viewer`]) runs as the viewer: RLS on `message_events`
//!   and `messages` decides, so replay needs READ_MESSAGE_HISTORY like history.

use chrono::{DateTime, Utc};

use crate::viewer::{MessageRow, RevisionRow};
use crate::{Error, FanoutRead, FanoutTx, Result, ViewerTx};

/// Notification channel announcing new `message_events` rows (policies/40_notify.sql).
pub const CHANNEL_EVENTS: &str = "observer_events";
/// Notification channel announcing new `access_events` rows.
pub const CHANNEL_ACCESS: &str = "observer_access";

/// Most rows one read returns; callers loop while a read comes back full.
pub const MAX_READ: i64 = 10_000;

/// A position in an event log: `(xid, seq)`, `xid` being the 64-bit `xid8`.
/// Events strictly after a cursor are those with a greater pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Cursor {
    pub xid: i64,
    pub seq: i64,
}

impl Cursor {
    pub const fn new(xid: i64, seq: i64) -> Self {
        Self { xid, seq }
    }
}

/// What happened to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Created,
    Updated,
    Deleted,
}

impl EventKind {
    /// From `message_events.kind` (1, 2, 3); the check constraint admits nothing else.
    pub fn from_db(kind: i16) -> Option<Self> {
        match kind {
            1 => Some(Self::Created),
            2 => Some(Self::Updated),
            3 => Some(Self::Deleted),
            _ => None,
        }
    }
}

/// One message event with the message's current row.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub cursor: Cursor,
    pub kind: EventKind,
    pub guild_id: i64,
    pub channel_id: i64,
    /// When the writing transaction started (`now()` at insert).
    pub at: DateTime<Utc>,
    pub message: MessageRow,
}

/// One access change: `user_id` None means anyone in the guild may be affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessEventRow {
    pub cursor: Cursor,
    pub guild_id: i64,
    pub user_id: Option<i64>,
}

/// Which events a subscription wants; `None` fields do not restrict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub guild_id: Option<i64>,
    pub channel_ids: Option<Vec<i64>>,
}

impl Scope {
    pub fn matches(&self, guild_id: i64, channel_id: i64) -> bool {
        self.guild_id.is_none_or(|g| g == guild_id)
            && self
                .channel_ids
                .as_ref()
                .is_none_or(|c| c.contains(&channel_id))
    }
}

fn check_limit(limit: i64) -> Result<()> {
    if (1..=MAX_READ).contains(&limit) {
        Ok(())
    } else {
        Err(Error::Invalid(format!("read limit {limit} out of range")))
    }
}

/// The cursor just before every event not yet readable: all events below the
/// snapshot's xmin are final, later ones may still appear. Starting here means
/// "from now on". `seq` 0 sorts before every event (identity starts at 1).
pub async fn head(tx: &mut FanoutTx) -> Result<Cursor> {
    snapshot_head(tx).await
}

/// [`head`] for a viewer's transaction: read before a history page in the
/// same transaction, it is a cursor from which a subscription continues that
/// page with no gap. Every transaction below it had finished before the page's
/// statement took its snapshot, so the page shows their messages; later ones
/// are replayed (some perhaps again, which clients absorb by upserting by id).
pub async fn head_for_viewer(tx: &mut ViewerTx) -> Result<Cursor> {
    snapshot_head(tx).await
}

/// Private: only the role-scoped wrappers above may hand it a connection.
async fn snapshot_head(conn: &mut sqlx::PgConnection) -> Result<Cursor> {
    // "xmin!": the xmin of the current snapshot always exists.
    let xmin: i64 = sqlx::query_scalar!(
        r#"select pg_snapshot_xmin(pg_current_snapshot())::text::bigint as "xmin!""#
    )
    .fetch_one(conn)
    .await?;
    Ok(Cursor::new(xmin, 0))
}

/// An event's columns, then every `MessageRow` column (flat: `query_as!`
/// cannot fill a nested struct). [`read_after`] and [`replay_for_viewer`]
/// select the same list; the macro checks each against this struct.
///
/// Overrides in their SQL: `ev_xid!` (a cast of a not-null `xid8`), `present!`
/// (`is not null`), and the message columns `coalesce`d with a non-null
/// fallback (`author_bot!`, `content!`, `created_at!`, `attachments!`). The
/// left join in [`read_after`] exists because a retention purge may remove a
/// message whose event is still in the log: the cursor must still move past it.
struct JoinedRow {
    ev_xid: i64,
    ev_seq: i64,
    ev_kind: i16,
    ev_at: DateTime<Utc>,
    present: bool,
    guild_id: i64,
    message_id: i64,
    channel_id: i64,
    author_id: Option<i64>,
    author_username: Option<String>,
    author_display_name: Option<String>,
    author_avatar: Option<String>,
    author_bot: bool,
    content: String,
    created_at: DateTime<Utc>,
    edited_at: Option<DateTime<Utc>>,
    deleted_at: Option<DateTime<Utc>>,
    deletion_detected_at: Option<DateTime<Utc>>,
    attachments: serde_json::Value,
    reply_to_id: Option<i64>,
}

impl JoinedRow {
    fn into_event(self) -> Option<EventRow> {
        let kind = EventKind::from_db(self.ev_kind)?;
        self.present.then(|| EventRow {
            cursor: Cursor::new(self.ev_xid, self.ev_seq),
            kind,
            guild_id: self.guild_id,
            channel_id: self.channel_id,
            at: self.ev_at,
            message: MessageRow {
                guild_id: self.guild_id,
                message_id: self.message_id,
                channel_id: self.channel_id,
                author_id: self.author_id,
                author_username: self.author_username,
                author_display_name: self.author_display_name,
                author_avatar: self.author_avatar,
                author_bot: self.author_bot,
                content: self.content,
                created_at: self.created_at,
                edited_at: self.edited_at,
                deleted_at: self.deleted_at,
                deletion_detected_at: self.deletion_detected_at,
                attachments: self.attachments,
                reply_to_id: self.reply_to_id,
            },
        })
    }
}

/// Readable message events after `after`, in log order, at most `limit`, with
/// each message's current row; returns them and the cursor to read from next
/// (`after` itself when nothing was readable). Events whose message was purged
/// are skipped but still advance the cursor.
pub async fn read_after(
    tx: &mut dyn FanoutRead,
    after: Cursor,
    limit: i64,
) -> Result<(Vec<EventRow>, Cursor)> {
    check_limit(limit)?;
    let rows = sqlx::query_as!(
        JoinedRow,
        r#"select e.xid::text::bigint as "ev_xid!", e.seq as ev_seq, e.kind as ev_kind,
             e.at as "ev_at: DateTime<Utc>", m.message_id is not null as "present!",
             e.guild_id, e.message_id, e.channel_id, m.author_id, m.author_username,
             m.author_display_name, m.author_avatar,
             coalesce(m.author_bot, false) as "author_bot!",
             coalesce(m.content, '') as "content!", coalesce(m.created_at, e.at) as "created_at!: DateTime<Utc>",
             m.edited_at as "edited_at: DateTime<Utc>", m.deleted_at as "deleted_at: DateTime<Utc>",
             m.deletion_detected_at as "deletion_detected_at: DateTime<Utc>",
             coalesce(m.attachments, '[]'::jsonb) as "attachments!", m.reply_to_id
         from message_events e
         left join messages m on m.guild_id = e.guild_id and m.message_id = e.message_id
         where e.xid < pg_snapshot_xmin(pg_current_snapshot())
           and (e.xid, e.seq) > ($1::text::xid8, $2::bigint)
         order by e.xid, e.seq limit $3"#,
        after.xid.to_string(),
        after.seq,
        limit,
    )
    .fetch_all(&mut **tx)
    .await?;
    let next = rows
        .last()
        .map(|r| Cursor::new(r.ev_xid, r.ev_seq))
        .unwrap_or(after);
    Ok((
        rows.into_iter().filter_map(JoinedRow::into_event).collect(),
        next,
    ))
}

/// Prior versions of the given messages (`(guild_id, message_id)`), oldest
/// first, excluding each message's current version — the fan-out twin of
/// [`crate::viewer::revisions`], so live events carry their revisions without
/// a read per subscriber.
pub async fn revisions(tx: &mut dyn FanoutRead, keys: &[(i64, i64)]) -> Result<Vec<RevisionRow>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let guild_ids: Vec<i64> = keys.iter().map(|k| k.0).collect();
    let message_ids: Vec<i64> = keys.iter().map(|k| k.1).collect();
    let rows = sqlx::query_as!(
        RevisionRow,
        r#"select r.guild_id, r.message_id, r.version_at as "version_at: DateTime<Utc>", r.content
         from message_revisions r
         join messages m on m.guild_id = r.guild_id and m.message_id = r.message_id
         where (r.guild_id, r.message_id) in (select * from unnest($1::bigint[], $2::bigint[]))
           and r.version_at <> coalesce(m.edited_at, m.created_at)
         order by r.guild_id, r.message_id, r.version_at"#,
        &guild_ids,
        &message_ids,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows)
}

/// Readable access changes after `after`, in log order; returns them and the
/// next cursor.
pub async fn access_after(
    tx: &mut FanoutTx,
    after: Cursor,
    limit: i64,
) -> Result<(Vec<AccessEventRow>, Cursor)> {
    check_limit(limit)?;
    // "xid!": a cast of the not-null `xid8` column.
    let rows = sqlx::query!(
        r#"select xid::text::bigint as "xid!", seq, guild_id, user_id from access_events
         where xid < pg_snapshot_xmin(pg_current_snapshot())
           and (xid, seq) > ($1::text::xid8, $2::bigint)
         order by xid, seq limit $3"#,
        after.xid.to_string(),
        after.seq,
        limit,
    )
    .fetch_all(&mut **tx)
    .await?;
    let out: Vec<AccessEventRow> = rows
        .into_iter()
        .map(|r| AccessEventRow {
            cursor: Cursor::new(r.xid, r.seq),
            guild_id: r.guild_id,
            user_id: r.user_id,
        })
        .collect();
    let next = out.last().map(|r| r.cursor).unwrap_or(after);
    Ok((out, next))
}

/// A LISTEN connection (sqlx's, re-exported so callers need no SQL crate).
pub type Listener = sqlx::postgres::PgListener;

/// Opens a LISTEN connection on [`CHANNEL_EVENTS`] and [`CHANNEL_ACCESS`] and
/// returns it with its backend pid. It does not reconnect by itself: after
/// `try_recv` reports a lost connection, open a new one and catch up from the
/// log (notifications sent meanwhile are gone).
pub async fn listen(db: &crate::Db) -> Result<(Listener, i32)> {
    let mut listener = Listener::connect_with(db.pool()).await?;
    listener.eager_reconnect(false);
    listener
        .listen_all([CHANNEL_EVENTS, CHANNEL_ACCESS])
        .await?;
    // "pid!": a connected backend always has a pid.
    let pid: i32 = sqlx::query_scalar!(r#"select pg_backend_pid() as "pid!""#)
        .fetch_one(&mut listener)
        .await?;
    Ok((listener, pid))
}

/// Guilds in which `user_id` is a member (whose access data fan-out needs).
pub async fn member_guild_ids(tx: &mut FanoutTx, user_id: i64) -> Result<Vec<i64>> {
    let ids = sqlx::query_scalar!("select guild_id from members where user_id = $1", user_id)
        .fetch_all(&mut **tx)
        .await?;
    Ok(ids)
}

/// One channel the viewer may see, as RLS's own rule computes it: whether its
/// messages are readable live (`read`) and as history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct VisibleChannel {
    pub guild_id: i64,
    pub channel_id: i64,
    pub read: bool,
    pub history: bool,
}

/// Every channel the viewer may see (`access.viewer_channels()`, the SQL twin
/// of [`crate::access::visible_channels`]), ordered by (guild, channel).
pub async fn viewer_channels(tx: &mut ViewerTx) -> Result<Vec<VisibleChannel>> {
    // PostgreSQL cannot see inside the function: its ids come from not-null
    // columns, and it only returns rows whose permissions are known (not
    // null), from which both flags are computed.
    let rows = sqlx::query!(
        r#"select guild_id as "guild_id!", channel_id as "channel_id!",
             can_read as "can_read!", can_read_history as "can_read_history!"
         from access.viewer_channels() where can_view order by guild_id, channel_id"#
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| VisibleChannel {
            guild_id: r.guild_id,
            channel_id: r.channel_id,
            read: r.can_read,
            history: r.can_read_history,
        })
        .collect())
}

/// Resume: the events in `(after, upto]` that the viewer may read (RLS:
/// VIEW_CHANNEL and READ_MESSAGE_HISTORY, guild visible), within `scope`, in
/// log order, at most `limit`. `upto` is a cursor the hub already read, so
/// every event up to it is below the watermark and the range is final.
pub async fn replay_for_viewer(
    tx: &mut ViewerTx,
    after: Cursor,
    upto: Cursor,
    scope: &Scope,
    limit: i64,
) -> Result<Vec<EventRow>> {
    check_limit(limit)?;
    if after >= upto {
        return Ok(Vec::new());
    }
    // The column list of `read_after` (overrides explained at `JoinedRow`);
    // the inner join makes the coalesces no-ops here.
    let rows = sqlx::query_as!(
        JoinedRow,
        r#"select e.xid::text::bigint as "ev_xid!", e.seq as ev_seq, e.kind as ev_kind,
             e.at as "ev_at: DateTime<Utc>", m.message_id is not null as "present!",
             e.guild_id, e.message_id, e.channel_id, m.author_id, m.author_username,
             m.author_display_name, m.author_avatar,
             coalesce(m.author_bot, false) as "author_bot!",
             coalesce(m.content, '') as "content!", coalesce(m.created_at, e.at) as "created_at!: DateTime<Utc>",
             m.edited_at as "edited_at: DateTime<Utc>", m.deleted_at as "deleted_at: DateTime<Utc>",
             m.deletion_detected_at as "deletion_detected_at: DateTime<Utc>",
             coalesce(m.attachments, '[]'::jsonb) as "attachments!", m.reply_to_id
         from message_events e
         join messages m on m.guild_id = e.guild_id and m.message_id = e.message_id
         where e.xid < pg_snapshot_xmin(pg_current_snapshot())
           and (e.xid, e.seq) > ($1::text::xid8, $2::bigint)
           and (e.xid, e.seq) <= ($3::text::xid8, $4::bigint)
           and ($5::bigint is null or e.guild_id = $5)
           and ($6::bigint[] is null or e.channel_id = any($6))
         order by e.xid, e.seq limit $7"#,
        after.xid.to_string(),
        after.seq,
        upto.xid.to_string(),
        upto.seq,
        scope.guild_id,
        scope.channel_ids.as_deref(),
        limit,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().filter_map(JoinedRow::into_event).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_order_by_xid_then_seq() {
        assert!(Cursor::new(1, 5) < Cursor::new(2, 1));
        assert!(Cursor::new(2, 0) < Cursor::new(2, 1));
    }

    #[test]
    fn scope_matches() {
        let all = Scope::default();
        assert!(all.matches(1, 2));
        let g = Scope {
            guild_id: Some(1),
            channel_ids: None,
        };
        assert!(g.matches(1, 5) && !g.matches(2, 5));
        let c = Scope {
            guild_id: None,
            channel_ids: Some(vec![5, 6]),
        };
        assert!(c.matches(9, 6) && !c.matches(9, 7));
    }
}
