//! Observed-at ordering for thread membership, complete listings (a guild's
//! members, a thread's members) and the bot's presence in a guild.
//!
//! The rule is the one `members` already follows ([`super::members`]'s
//! `upsert_members`/`remove_members`): every write carries the time it was
//! observed (gateway event received, REST listing started); a row is written
//! only if that time is later than the stored row's and than the latest
//! recorded removal (a tombstone); a removal deletes only rows observed
//! before it. A complete listing is "these users, and nobody else, at time T":
//! stored rows it does not hold and that were observed before T are removed
//! with tombstones at T, so a stale listing never removes a newer add and a
//! stale add never undoes a newer listing.
//!
//! A listing also says something about users it never names and that are not
//! stored: they were not members at T either. It records that as a tombstone
//! for user id 0 ([`EVERYONE_ELSE`], never a real user): "everyone not
//! listed was absent at T". An add observed before T inserts nothing (the
//! listing's own adds, at T itself, pass); users the listing held have rows
//! observed at T, which an older add leaves as they are.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::members::{newest_members, remove_members, upsert_members};
use super::MemberInfo;
use crate::{Result, WorkerTx};

/// The user id of a listing's tombstone: "every user not listed" (Discord
/// snowflakes are never 0).
pub const EVERYONE_ELSE: i64 = 0;

/// Adds `users[i]` to `threads[i]` as observed at `observed_at`, unless a
/// removal was observed at or after that time; refreshes the observation time
/// of memberships already stored.
pub(crate) async fn add_thread_members(
    conn: &mut PgConnection,
    guild_id: i64,
    threads: &[i64],
    users: &[i64],
    observed_at: DateTime<Utc>,
) -> Result<()> {
    if threads.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "insert into thread_members (guild_id, thread_id, user_id, observed_at)
         select distinct $1::int8, t, u, $4::timestamptz
         from unnest($2::int8[], $3::int8[]) as x(t, u)
         where not exists (select 1 from thread_member_removals d
                           where d.guild_id = $1 and d.thread_id = x.t
                             and ((d.user_id = x.u and d.observed_at >= $4)
                                  or (d.user_id = 0 and d.observed_at > $4)))
         on conflict (guild_id, thread_id, user_id) do update
           set observed_at = excluded.observed_at
           where thread_members.observed_at < excluded.observed_at",
        guild_id,
        threads,
        users,
        observed_at as DateTime<Utc>,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records the removal of `users` from `thread_id` observed at `observed_at`
/// and deletes their memberships unless those were observed later.
pub(crate) async fn remove_thread_members(
    conn: &mut PgConnection,
    guild_id: i64,
    thread_id: i64,
    users: &[i64],
    observed_at: DateTime<Utc>,
) -> Result<()> {
    if users.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "insert into thread_member_removals (guild_id, thread_id, user_id, observed_at)
         select distinct $1::int8, $2::int8, u, $4::timestamptz from unnest($3::int8[]) as u
         on conflict (guild_id, thread_id, user_id) do update
           set observed_at = excluded.observed_at
           where thread_member_removals.observed_at < excluded.observed_at",
        guild_id,
        thread_id,
        users,
        observed_at as DateTime<Utc>,
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "delete from thread_members
         where guild_id = $1 and thread_id = $2 and user_id = any($3) and observed_at < $4",
        guild_id,
        thread_id,
        users,
        observed_at as DateTime<Utc>,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A complete listing of `thread_id`'s members taken at `observed_at`.
pub(crate) async fn sync_thread_members(
    conn: &mut PgConnection,
    guild_id: i64,
    thread_id: i64,
    user_ids: &[i64],
    observed_at: DateTime<Utc>,
) -> Result<()> {
    let gone: Vec<i64> = sqlx::query_scalar!(
        "select user_id from thread_members
         where guild_id = $1 and thread_id = $2 and user_id <> all($3) and observed_at < $4",
        guild_id,
        thread_id,
        user_ids,
        observed_at as DateTime<Utc>,
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut tombstones = gone;
    tombstones.push(EVERYONE_ELSE);
    remove_thread_members(conn, guild_id, thread_id, &tombstones, observed_at).await?;
    let threads = vec![thread_id; user_ids.len()];
    add_thread_members(conn, guild_id, &threads, user_ids, observed_at).await
}

/// A complete listing of a guild's members taken at `observed_at` (each
/// member's own `observed_at` is normally the same time).
pub(crate) async fn sync_members(
    conn: &mut PgConnection,
    guild_id: i64,
    members: &[MemberInfo],
    observed_at: DateTime<Utc>,
) -> Result<()> {
    let listed: Vec<i64> = members.iter().map(|m| m.user_id).collect();
    let gone: Vec<i64> = sqlx::query_scalar!(
        "select user_id from members
         where guild_id = $1 and user_id <> all($2) and observed_at < $3",
        guild_id,
        &listed,
        observed_at as DateTime<Utc>,
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut tombstones = gone;
    tombstones.push(EVERYONE_ELSE);
    remove_members(conn, guild_id, &tombstones, observed_at, true).await?;
    let own: Vec<MemberInfo> = members
        .iter()
        .filter(|m| m.guild_id == guild_id)
        .cloned()
        .collect();
    upsert_members(conn, &newest_members(own)).await
}

/// GUILD_DELETE without `unavailable`, observed at `observed_at`: the guild is
/// marked removed unless its presence was observed later (a GUILD_CREATE that
/// Discord sent after this delete, written first).
pub(crate) async fn guild_removed(
    conn: &mut PgConnection,
    guild_id: i64,
    observed_at: DateTime<Utc>,
) -> Result<()> {
    sqlx::query!(
        "insert into guilds (guild_id, removed_at, presence_observed_at) values ($1, $2, $2)
         on conflict (guild_id) do update
           set removed_at = coalesce(guilds.removed_at, excluded.removed_at),
               presence_observed_at = excluded.presence_observed_at,
               updated_at = now()
           where guilds.presence_observed_at < excluded.presence_observed_at",
        guild_id,
        observed_at as DateTime<Utc>,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// How long a thread-member removal tombstone is kept (see
/// [`super::MEMBER_REMOVAL_TTL`]: it only has to outlive observations
/// still in flight).
pub const THREAD_MEMBER_REMOVAL_TTL: std::time::Duration = super::MEMBER_REMOVAL_TTL;

/// Forgets thread-member removal tombstones older than `keep`; returns how many.
pub async fn purge_thread_member_removals(
    tx: &mut WorkerTx,
    keep: std::time::Duration,
) -> Result<u64> {
    let done = sqlx::query!(
        "delete from thread_member_removals where observed_at < now() - make_interval(secs => $1)",
        keep.as_secs_f64(),
    )
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}
