//! Backfill bounds and retention: the newest stored message per channel,
//! purges of expired messages and old member-removal tombstones.

use std::collections::HashMap;

use super::THREAD_KINDS;
use crate::{Result, WorkerTx};

/// For each of `channel_ids`, the newest message id (with its create seen)
/// older than `before` (a snowflake; `i64::MAX` for no bound), raised to the
/// guild's retention horizon when it has one. Channels with neither are
/// absent. One index probe per channel.
pub async fn newest_message_ids(
    tx: &mut WorkerTx,
    guild_id: i64,
    channel_ids: &[i64],
    before: i64,
) -> Result<HashMap<i64, i64>> {
    // With a retention period, history older than it is never fetched again
    // (the purge would only delete it): the retention horizon, as a snowflake,
    // is a floor under the newest stored id. `greatest` ignores NULLs.
    // "c!": an element of `$2`, which holds no nulls; `newest` stays nullable.
    let rows = sqlx::query!(
        r#"select c as "c!", greatest(
                   (select m.message_id from messages m
                    where m.channel_id = c and m.guild_id = $1 and m.message_id < $3
                      and m.seen_create
                    order by m.message_id desc limit 1),
                   (select ((extract(epoch from now() - g.retention) * 1000)::bigint
                            - 1420070400000) << 22
                    from guilds g where g.guild_id = $1 and g.retention is not null)) as newest
         from unnest($2::int8[]) as c"#,
        guild_id,
        channel_ids,
        before,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| r.newest.map(|m| (r.c, m)))
        .collect())
}

/// How long a member-removal tombstone is kept. It only has to outlive any
/// member observation that was taken before the removal and is still in
/// flight (a REST snapshot, a delayed dispatch): minutes in practice.
pub const MEMBER_REMOVAL_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Forgets member-removal tombstones older than `keep`; returns how many.
/// Without this the table grows with every member who ever left.
pub async fn purge_member_removals(tx: &mut WorkerTx, keep: std::time::Duration) -> Result<u64> {
    let done = sqlx::query!(
        "delete from member_removals where observed_at < now() - make_interval(secs => $1)",
        keep.as_secs_f64(),
    )
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}

/// Deletes up to `limit` messages that are older than their guild's retention
/// period (`guilds.retention`; NULL keeps forever), with their revisions and
/// events, and returns how many messages went. Callers repeat until it
/// returns less than `limit`, so no transaction holds many locks for long.
/// Subscribers resuming from an older cursor simply find those events gone.
pub async fn purge_expired(tx: &mut WorkerTx, limit: i64) -> Result<u64> {
    // "count!": count(*) is never null.
    let purged: i64 = sqlx::query_scalar!(
        r#"with expired as (
             select m.guild_id, m.message_id
             from guilds g
             join messages m on m.guild_id = g.guild_id
                            and m.created_at < now() - g.retention
             where g.retention is not null
             limit $1),
         revisions as (
             delete from message_revisions r using expired e
             where r.guild_id = e.guild_id and r.message_id = e.message_id),
         events as (
             delete from message_events v using expired e
             where v.guild_id = e.guild_id and v.message_id = e.message_id),
         gone as (
             delete from messages m using expired e
             where m.guild_id = e.guild_id and m.message_id = e.message_id
             returning 1)
         select count(*) as "count!" from gone"#,
        limit,
    )
    .fetch_one(&mut **tx)
    .await?;
    Ok(u64::try_from(purged).unwrap_or(0))
}

/// Channels of a guild that hold messages the worker should backfill: text and
/// announcement channels, and threads that are not archived.
pub async fn backfill_channels(tx: &mut WorkerTx, guild_id: i64) -> Result<Vec<i64>> {
    let ids = sqlx::query_scalar!(
        "select channel_id from channels
         where guild_id = $1 and (kind in (0, 5) or (kind = any($2) and not archived))
         order by channel_id",
        guild_id,
        &THREAD_KINDS[..],
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(ids)
}
