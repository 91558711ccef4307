//! Guild members: the observed-at ordered upsert and removal shared by the
//! worker and the login path.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::{last_by_key, sanitize_opt, MemberInfo, MAX_NAME_BYTES};
use crate::Result;

/// Keeps the newest observation per member (the later one on a tie): one
/// statement may not touch a row twice.
pub(crate) fn newest_members(mut members: Vec<MemberInfo>) -> Vec<MemberInfo> {
    // Stable: equal times keep their order, so the later op stays last.
    members.sort_by_key(|m| m.observed_at);
    last_by_key(members, |m| (m.guild_id, m.user_id))
}

/// The one member write, shared by the worker and the login path
/// ([`crate::auth::replace_memberships`]). A row is written only if it was
/// observed later than the stored row and than the member's last recorded
/// removal (or the last complete listing of the guild's members, a tombstone
/// for user 0: see `super::threads`); `observed_at` advances even when nothing else changed, so an older
/// observation arriving afterwards cannot undo a newer one.
///
/// Left open: a removal and an older add committed by two transactions at
/// the very same moment can still re-add the member (the add read no
/// tombstone yet). The worker's re-read of the member (scheduled on every
/// member event) corrects that within its delay.
pub(crate) async fn upsert_members(conn: &mut PgConnection, members: &[MemberInfo]) -> Result<()> {
    if members.is_empty() {
        return Ok(());
    }
    let g: Vec<i64> = members.iter().map(|m| m.guild_id).collect();
    let u: Vec<i64> = members.iter().map(|m| m.user_id).collect();
    // A 2-D array must be rectangular; ship role lists as text and split in SQL.
    let roles: Vec<String> = members
        .iter()
        .map(|m| {
            let mut ids = m.role_ids.clone();
            ids.sort_unstable();
            ids.dedup();
            ids.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let nick: Vec<Option<String>> = members
        .iter()
        .map(|m| sanitize_opt(m.nick.as_deref(), MAX_NAME_BYTES))
        .collect();
    let joined: Vec<Option<DateTime<Utc>>> = members.iter().map(|m| m.joined_at).collect();
    let timeout: Vec<Option<DateTime<Utc>>> = members
        .iter()
        .map(|m| m.communication_disabled_until)
        .collect();
    let observed: Vec<DateTime<Utc>> = members.iter().map(|m| m.observed_at).collect();
    sqlx::query!(
        "insert into members (guild_id, user_id, role_ids, nick, joined_at,
                              communication_disabled_until, observed_at)
         select g, u, coalesce(string_to_array(nullif(r, ''), ',')::int8[], '{}'), n, j, t, o
         from unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::timestamptz[],
                     $6::timestamptz[], $7::timestamptz[])
              as x(g, u, r, n, j, t, o)
         where not exists (select 1 from member_removals d
                           where d.guild_id = x.g
                             and ((d.user_id = x.u and d.observed_at >= x.o)
                                  or (d.user_id = 0 and d.observed_at > x.o)))
         on conflict (guild_id, user_id) do update
           set role_ids = excluded.role_ids, nick = excluded.nick,
               joined_at = coalesce(excluded.joined_at, members.joined_at),
               communication_disabled_until = excluded.communication_disabled_until,
               observed_at = excluded.observed_at,
               updated_at = case
                 when (members.role_ids, members.nick, members.joined_at,
                       members.communication_disabled_until)
                      is distinct from (excluded.role_ids, excluded.nick,
                                        coalesce(excluded.joined_at, members.joined_at),
                                        excluded.communication_disabled_until)
                 then now() else members.updated_at end
           where members.observed_at < excluded.observed_at",
        &g,
        &u,
        &roles,
        // `as`: the macros would type these arrays without NULL elements, which they hold.
        &nick as &[Option<String>],
        &joined as &[Option<DateTime<Utc>>],
        &timeout as &[Option<DateTime<Utc>>],
        &observed as &[DateTime<Utc>],
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records the removal of `user_ids` from a guild observed at `observed_at`
/// and deletes their member rows unless those were observed later (a re-join
/// handled first). With `threads`, their thread memberships go too (the login
/// path has no access to `thread_members` and leaves them to the worker).
/// Returns the users whose rows were deleted.
pub(crate) async fn remove_members(
    conn: &mut PgConnection,
    guild_id: i64,
    user_ids: &[i64],
    observed_at: DateTime<Utc>,
    threads: bool,
) -> Result<Vec<i64>> {
    if user_ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query!(
        "insert into member_removals (guild_id, user_id, observed_at)
         select $1, u, $3 from unnest($2::int8[]) as u
         on conflict (guild_id, user_id) do update
           set observed_at = excluded.observed_at
           where member_removals.observed_at < excluded.observed_at",
        guild_id,
        user_ids,
        observed_at as DateTime<Utc>,
    )
    .execute(&mut *conn)
    .await?;
    let gone: Vec<i64> = sqlx::query_scalar!(
        "delete from members
         where guild_id = $1 and user_id = any($2) and observed_at < $3
         returning user_id",
        guild_id,
        user_ids,
        observed_at as DateTime<Utc>,
    )
    .fetch_all(&mut *conn)
    .await?;
    if !threads {
        return Ok(gone);
    }
    // Thread memberships go with the guild membership, unless the member row
    // is newer than this removal (re-joined; those threads are current).
    sqlx::query!(
        "delete from thread_members t
         where t.guild_id = $1 and t.user_id = any($2)
           and not exists (select 1 from members m
                           where m.guild_id = t.guild_id and m.user_id = t.user_id)",
        guild_id,
        user_ids,
    )
    .execute(&mut *conn)
    .await?;
    Ok(gone)
}
