//! Access data: guilds, roles, channels and their overwrites, thread and
//! guild membership, bot access. Applied in the order the worker observed
//! them; runs of one kind go in one statement.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::members::{newest_members, remove_members, upsert_members};
use super::{last_by_key, sanitize, sanitize_opt, MAX_NAME_BYTES, MAX_TOPIC_BYTES, THREAD_KINDS};
use super::{threads, ChannelInfo, GuildInfo, GuildSnapshot, IngestOp, MemberInfo, RoleInfo};
use crate::Result;

pub(super) async fn apply_access_run(conn: &mut PgConnection, run: &[&IngestOp]) -> Result<()> {
    let Some(first) = run.first() else {
        return Ok(());
    };
    match first {
        IngestOp::ChannelUpsert(_) => {
            let chans: Vec<ChannelInfo> = run
                .iter()
                .filter_map(|op| match op {
                    IngestOp::ChannelUpsert(c) => Some(c.clone()),
                    _ => None,
                })
                .collect();
            upsert_channels(conn, &last_by_key(chans, |c| (c.guild_id, c.channel_id))).await
        }
        IngestOp::RoleUpsert(_) => {
            let roles: Vec<RoleInfo> = run
                .iter()
                .filter_map(|op| match op {
                    IngestOp::RoleUpsert(r) => Some(r.clone()),
                    _ => None,
                })
                .collect();
            upsert_roles(conn, &last_by_key(roles, |r| (r.guild_id, r.role_id))).await
        }
        IngestOp::ChannelBotAccess(_) => {
            let obs: Vec<&crate::bot_access::BotAccessObservation> = run
                .iter()
                .filter_map(|op| match op {
                    IngestOp::ChannelBotAccess(o) => Some(o),
                    _ => None,
                })
                .collect();
            crate::bot_access::apply(conn, &obs).await
        }
        IngestOp::MemberUpsert(_) => {
            let members: Vec<MemberInfo> = run
                .iter()
                .filter_map(|op| match op {
                    IngestOp::MemberUpsert(m) => Some(m.clone()),
                    _ => None,
                })
                .collect();
            upsert_members(conn, &newest_members(members)).await
        }
        _ => {
            for op in run {
                apply_access(conn, op).await?;
            }
            Ok(())
        }
    }
}

async fn apply_access(conn: &mut PgConnection, op: &IngestOp) -> Result<()> {
    match op {
        IngestOp::GuildCreate(snap) => guild_snapshot(conn, snap).await,
        IngestOp::GuildUpdate(g) => upsert_guild(conn, g, None).await,
        IngestOp::GuildRemoved {
            guild_id,
            observed_at,
        } => threads::guild_removed(conn, *guild_id, *observed_at).await,
        IngestOp::GuildUnavailable { guild_id } => {
            sqlx::query!(
                "update guilds set unavailable = true, updated_at = now()
                 where guild_id = $1 and not unavailable",
                guild_id,
            )
            .execute(&mut *conn)
            .await?;
            Ok(())
        }
        IngestOp::ChannelUpsert(c) => upsert_channels(conn, std::slice::from_ref(c)).await,
        IngestOp::ChannelDelete {
            guild_id,
            channel_id,
        } => delete_channel(conn, *guild_id, *channel_id).await,
        IngestOp::ThreadListSync {
            guild_id,
            threads,
            members,
            observed_at,
        } => {
            upsert_channels(conn, threads).await?;
            let (t, u): (Vec<i64>, Vec<i64>) = members.iter().copied().unzip();
            threads::add_thread_members(conn, *guild_id, &t, &u, *observed_at).await
        }
        IngestOp::ThreadMembers {
            guild_id,
            thread_id,
            added,
            removed,
            observed_at,
        } => {
            threads::remove_thread_members(conn, *guild_id, *thread_id, removed, *observed_at)
                .await?;
            let t = vec![*thread_id; added.len()];
            threads::add_thread_members(conn, *guild_id, &t, added, *observed_at).await
        }
        IngestOp::ThreadMembersSync {
            guild_id,
            thread_id,
            user_ids,
            observed_at,
        } => {
            threads::sync_thread_members(conn, *guild_id, *thread_id, user_ids, *observed_at).await
        }
        IngestOp::MembersSync {
            guild_id,
            members,
            observed_at,
        } => threads::sync_members(conn, *guild_id, members, *observed_at).await,
        IngestOp::RoleUpsert(r) => upsert_roles(conn, std::slice::from_ref(r)).await,
        IngestOp::RolesSync { guild_id, roles } => sync_roles(conn, *guild_id, roles).await,
        IngestOp::RoleDelete { guild_id, role_id } => {
            sqlx::query!(
                "delete from roles where guild_id = $1 and role_id = $2",
                guild_id,
                role_id,
            )
            .execute(&mut *conn)
            .await?;
            // Discord strips the role from its members without sending member
            // updates. (Its overwrites stay until a CHANNEL_UPDATE says
            // otherwise; a role nobody holds grants nothing anyway.)
            sqlx::query!(
                "update members set role_ids = array_remove(role_ids, $2), updated_at = now()
                 where guild_id = $1 and $2 = any(role_ids)",
                guild_id,
                role_id,
            )
            .execute(&mut *conn)
            .await?;
            Ok(())
        }
        IngestOp::MemberUpsert(m) => upsert_members(conn, std::slice::from_ref(m)).await,
        IngestOp::ChannelBotAccess(o) => crate::bot_access::apply(conn, &[o]).await,
        IngestOp::MemberRemove {
            guild_id,
            user_id,
            observed_at,
        } => remove_members(conn, *guild_id, &[*user_id], *observed_at, true)
            .await
            .map(|_| ()),
        IngestOp::MessageCreate(_)
        | IngestOp::MessageUpdate(_)
        | IngestOp::MessageDelete { .. }
        | IngestOp::MessageBulkDelete { .. }
        | IngestOp::MessagesGone { .. } => Ok(()),
    }
}

/// Writes a guild's own fields. Only `rejoined` (GUILD_CREATE: the bot is in
/// the guild and it is available, observed at that time) clears `removed_at`
/// and `unavailable`, and only if no later presence observation (a
/// GUILD_DELETE received after it) is stored: handlers run concurrently, so a
/// GUILD_UPDATE or an older GUILD_CREATE may be written after a GUILD_DELETE
/// that Discord sent later, and must not resurrect the guild.
async fn upsert_guild(
    conn: &mut PgConnection,
    g: &GuildInfo,
    rejoined: Option<DateTime<Utc>>,
) -> Result<()> {
    // observer_role_ids and retention are tenant settings: never touched here.
    sqlx::query!(
        "insert into guilds (guild_id, name, icon, owner_id, presence_observed_at)
         values ($1, $2, $3, $4, coalesce($5::timestamptz, '-infinity'))
         on conflict (guild_id) do update
           set name = excluded.name, icon = excluded.icon, owner_id = excluded.owner_id,
               removed_at = case when $5 > guilds.presence_observed_at then null
                                 else guilds.removed_at end,
               unavailable = case when $5 > guilds.presence_observed_at then false
                                  else guilds.unavailable end,
               presence_observed_at = greatest(guilds.presence_observed_at,
                                               coalesce($5, '-infinity')),
               updated_at = now()
           where (guilds.name, guilds.icon, guilds.owner_id) is distinct from
                 (excluded.name, excluded.icon, excluded.owner_id)
              or $5 > guilds.presence_observed_at",
        g.guild_id,
        sanitize(&g.name, MAX_NAME_BYTES),
        sanitize_opt(g.icon.as_deref(), MAX_NAME_BYTES),
        g.owner_id,
        rejoined as Option<DateTime<Utc>>,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn guild_snapshot(conn: &mut PgConnection, s: &GuildSnapshot) -> Result<()> {
    let gid = s.guild.guild_id;
    upsert_guild(conn, &s.guild, Some(s.observed_at)).await?;

    sync_roles(conn, gid, &s.roles).await?;

    let channel_ids: Vec<i64> = s.channels.iter().map(|c| c.channel_id).collect();
    let gone: Vec<i64> = sqlx::query_scalar!(
        "delete from channels where guild_id = $1 and channel_id <> all($2)
           and not (kind = any($3))
         returning channel_id",
        gid,
        &channel_ids,
        &THREAD_KINDS[..],
    )
    .fetch_all(&mut *conn)
    .await?;
    if !gone.is_empty() {
        delete_channel_children(conn, gid, &gone).await?;
    }
    let mut all = s.channels.clone();
    all.extend(s.threads.iter().cloned());
    upsert_channels(conn, &last_by_key(all, |c| c.channel_id)).await?;
    upsert_members(conn, &newest_members(s.members.clone())).await?;
    Ok(())
}

async fn sync_roles(conn: &mut PgConnection, guild_id: i64, roles: &[RoleInfo]) -> Result<()> {
    let roles = last_by_key(roles.to_vec(), |r| r.role_id);
    let role_ids: Vec<i64> = roles.iter().map(|r| r.role_id).collect();
    sqlx::query!(
        "delete from roles where guild_id = $1 and role_id <> all($2)",
        guild_id,
        &role_ids,
    )
    .execute(&mut *conn)
    .await?;
    upsert_roles(conn, &roles).await
}

async fn upsert_roles(conn: &mut PgConnection, roles: &[RoleInfo]) -> Result<()> {
    if roles.is_empty() {
        return Ok(());
    }
    let g: Vec<i64> = roles.iter().map(|r| r.guild_id).collect();
    let id: Vec<i64> = roles.iter().map(|r| r.role_id).collect();
    let name: Vec<String> = roles
        .iter()
        .map(|r| sanitize(&r.name, MAX_NAME_BYTES))
        .collect();
    let perm: Vec<i64> = roles.iter().map(|r| r.permissions).collect();
    let pos: Vec<i32> = roles.iter().map(|r| r.position).collect();
    sqlx::query!(
        "insert into roles (guild_id, role_id, name, permissions, position)
         select * from unnest($1::int8[], $2::int8[], $3::text[], $4::int8[], $5::int4[])
         on conflict (guild_id, role_id) do update
           set name = excluded.name, permissions = excluded.permissions, position = excluded.position
           where (roles.name, roles.permissions, roles.position)
                 is distinct from (excluded.name, excluded.permissions, excluded.position)",
        &g,
        &id,
        &name,
        &perm,
        &pos,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A channel's tags as stored (`channels.available_tags`): ids as strings, as
/// Discord sends them.
fn tags_json(c: &ChannelInfo) -> serde_json::Value {
    c.available_tags
        .iter()
        .map(|t| {
            let name = sanitize(&t.name, MAX_NAME_BYTES);
            serde_json::json!({"id": t.id.to_string(), "name": name, "moderated": t.moderated})
        })
        .collect()
}

async fn upsert_channels(conn: &mut PgConnection, chans: &[ChannelInfo]) -> Result<()> {
    if chans.is_empty() {
        return Ok(());
    }
    let g: Vec<i64> = chans.iter().map(|c| c.guild_id).collect();
    let id: Vec<i64> = chans.iter().map(|c| c.channel_id).collect();
    let kind: Vec<i16> = chans.iter().map(|c| c.kind).collect();
    let name: Vec<String> = chans
        .iter()
        .map(|c| sanitize(&c.name, MAX_NAME_BYTES))
        .collect();
    let parent: Vec<Option<i64>> = chans.iter().map(|c| c.parent_id).collect();
    let pos: Vec<i32> = chans.iter().map(|c| c.position).collect();
    let topic: Vec<Option<String>> = chans
        .iter()
        .map(|c| sanitize_opt(c.topic.as_deref(), MAX_TOPIC_BYTES))
        .collect();
    let archived: Vec<bool> = chans.iter().map(|c| c.archived).collect();
    let owner: Vec<Option<i64>> = chans.iter().map(|c| c.owner_id).collect();
    let available: Vec<serde_json::Value> = chans.iter().map(tags_json).collect();
    // One text per row ("1,2,3"): unnest would flatten a two-dimensional array.
    let applied: Vec<String> = chans
        .iter()
        .map(|c| {
            c.applied_tags
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let locked: Vec<bool> = chans.iter().map(|c| c.locked).collect();
    let created: Vec<Option<DateTime<Utc>>> = chans.iter().map(|c| c.thread_created_at).collect();
    sqlx::query!(
        "insert into channels (guild_id, channel_id, kind, name, parent_id, position, topic, archived,
                               owner_id, available_tags, applied_tags, locked, thread_created_at)
         select g, id, kind, name, parent, pos, topic, archived, owner, available,
                coalesce(string_to_array(nullif(applied, ''), ',')::int8[], '{}'), locked, created
         from unnest($1::int8[], $2::int8[], $3::int2[], $4::text[], $5::int8[],
                     $6::int4[], $7::text[], $8::bool[], $9::int8[], $10::jsonb[],
                     $11::text[], $12::bool[], $13::timestamptz[])
              as u(g, id, kind, name, parent, pos, topic, archived, owner, available,
                   applied, locked, created)
         on conflict (guild_id, channel_id) do update
           set kind = excluded.kind, name = excluded.name, parent_id = excluded.parent_id,
               position = excluded.position, topic = excluded.topic, archived = excluded.archived,
               owner_id = excluded.owner_id, available_tags = excluded.available_tags,
               applied_tags = excluded.applied_tags, locked = excluded.locked,
               thread_created_at = coalesce(excluded.thread_created_at, channels.thread_created_at),
               updated_at = now()
           where (channels.kind, channels.name, channels.parent_id, channels.position,
                  channels.topic, channels.archived, channels.owner_id, channels.available_tags,
                  channels.applied_tags, channels.locked, channels.thread_created_at)
                 is distinct from (excluded.kind, excluded.name, excluded.parent_id, excluded.position,
                                   excluded.topic, excluded.archived, excluded.owner_id,
                                   excluded.available_tags, excluded.applied_tags, excluded.locked,
                                   coalesce(excluded.thread_created_at, channels.thread_created_at))",
        &g,
        &id,
        &kind,
        &name,
        // `as`: the macros would type these arrays without NULL elements, which they hold.
        &parent as &[Option<i64>],
        &pos,
        &topic as &[Option<String>],
        &archived,
        &owner as &[Option<i64>],
        &available,
        &applied,
        &locked,
        &created as &[Option<DateTime<Utc>>],
    )
    .execute(&mut *conn)
    .await?;

    // Overwrites are replaced as a set per channel. Threads have none of their
    // own that matter, but whatever Discord sends is mirrored the same way.
    let mut og = Vec::new();
    let mut oc = Vec::new();
    let mut ot = Vec::new();
    let mut ok = Vec::new();
    let mut oa = Vec::new();
    let mut od = Vec::new();
    for c in chans {
        let ows = last_by_key(c.overwrites.clone(), |o| (o.target_id, o.kind));
        for o in ows.iter().filter(|o| o.kind == 0 || o.kind == 1) {
            og.push(c.guild_id);
            oc.push(c.channel_id);
            ot.push(o.target_id);
            ok.push(o.kind);
            oa.push(o.allow);
            od.push(o.deny);
        }
    }
    sqlx::query!(
        "delete from permission_overwrites p
         using unnest($1::int8[], $2::int8[]) as c(g, id)
         where p.guild_id = c.g and p.channel_id = c.id
           and (p.target_id, p.kind) not in (
               select n.t, n.k from unnest($3::int8[], $4::int8[], $5::int8[], $6::int2[]) as n(g, c, t, k)
               where n.g = p.guild_id and n.c = p.channel_id)",
        &g,
        &id,
        &og,
        &oc,
        &ot,
        &ok,
    )
    .execute(&mut *conn)
    .await?;
    if !og.is_empty() {
        sqlx::query!(
            "insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow, deny)
             select * from unnest($1::int8[], $2::int8[], $3::int8[], $4::int2[], $5::int8[], $6::int8[])
             on conflict (guild_id, channel_id, target_id, kind) do update
               set allow = excluded.allow, deny = excluded.deny
               where (permission_overwrites.allow, permission_overwrites.deny)
                     is distinct from (excluded.allow, excluded.deny)",
            &og,
            &oc,
            &ot,
            &ok,
            &oa,
            &od,
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn delete_channel(conn: &mut PgConnection, guild_id: i64, channel_id: i64) -> Result<()> {
    // Deleting a channel deletes its threads too (Discord does not always send
    // THREAD_DELETE for them).
    let gone: Vec<i64> = sqlx::query_scalar!(
        "delete from channels
         where guild_id = $1
           and (channel_id = $2 or (parent_id = $2 and kind = any($3)))
         returning channel_id",
        guild_id,
        channel_id,
        &THREAD_KINDS[..],
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut ids = gone;
    if !ids.contains(&channel_id) {
        ids.push(channel_id);
    }
    delete_channel_children(conn, guild_id, &ids).await
}

async fn delete_channel_children(
    conn: &mut PgConnection,
    guild_id: i64,
    ids: &[i64],
) -> Result<()> {
    sqlx::query!(
        "delete from permission_overwrites where guild_id = $1 and channel_id = any($2)",
        guild_id,
        ids,
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "delete from thread_members where guild_id = $1 and thread_id = any($2)",
        guild_id,
        ids,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}
