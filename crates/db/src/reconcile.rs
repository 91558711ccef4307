//! Reconciliation of a channel's recent history after a gap: which stored
//! messages a window of Discord's history should contain, and the tombstones
//! for those Discord no longer has (`messages.deletion_detected_at`, see
//! migrations/0032_deletion_detected.sql).
//!
//! The worker decides what is missing (it holds the page of history it
//! fetched); this module only reads and writes.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::{Result, WorkerTx};

/// Stored messages of `channel_id` with ids in `low..=high` that are not
/// tombstones already: what a contiguous range of Discord's history fetched
/// between those ids must contain.
pub async fn live_message_ids(
    tx: &mut WorkerTx,
    guild_id: i64,
    channel_id: i64,
    low: i64,
    high: i64,
) -> Result<Vec<i64>> {
    let ids = sqlx::query_scalar!(
        "select message_id from messages
         where channel_id = $2 and guild_id = $1 and message_id between $3 and $4
           and deleted_at is null and deletion_detected_at is null
         order by message_id",
        guild_id,
        channel_id,
        low,
        high,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(ids)
}

/// Marks `message_ids` as deleted-as-detected at `detected_at` and logs a
/// `deleted` event for each message that was not a tombstone yet (a deletion
/// reported live in the meantime keeps its own time). Returns how many
/// messages changed.
pub(crate) async fn mark_gone(
    conn: &mut PgConnection,
    guild_id: i64,
    channel_id: i64,
    message_ids: &[i64],
    detected_at: DateTime<Utc>,
) -> Result<u64> {
    if message_ids.is_empty() {
        return Ok(0);
    }
    // "count!": count(*) is never null.
    let n: i64 = sqlx::query_scalar!(
        r#"with gone as (
             update messages set deletion_detected_at = $4
             where guild_id = $1 and channel_id = $2 and message_id = any($3)
               and deleted_at is null and deletion_detected_at is null
             returning guild_id, channel_id, message_id),
         logged as (
             insert into message_events (guild_id, kind, channel_id, message_id)
             select guild_id, 3, channel_id, message_id from gone
             returning 1)
         select count(*) as "count!" from logged"#,
        guild_id,
        channel_id,
        message_ids,
        detected_at as DateTime<Utc>,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}
