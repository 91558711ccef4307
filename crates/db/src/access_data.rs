//! Loads the inputs of the Rust access rule ([`crate::access`]) from the
//! database, for live fan-out: what decides access in a set of guilds, and the
//! memberships of a set of viewers. Runs as `observer_fanout` (no viewer), so the
//! caller must apply the rule before anything reaches a subscriber.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::access::{
    perms_from_db, ChannelData, GuildAccessData, MemberData, Overwrite, OverwriteKind,
};
use crate::{FanoutTx, Result};

/// What decides access in each of `guild_ids`; unknown guilds are absent.
pub async fn load_guilds(
    tx: &mut FanoutTx,
    guild_ids: &[i64],
) -> Result<BTreeMap<i64, GuildAccessData>> {
    // "removed!": `is not null` is never null.
    let rows = sqlx::query!(
        r#"select guild_id, owner_id, observer_role_ids, removed_at is not null as "removed!"
         from guilds where guild_id = any($1)"#,
        guild_ids,
    )
    .fetch_all(&mut **tx)
    .await?;
    let mut out: BTreeMap<i64, GuildAccessData> = rows
        .into_iter()
        .map(|r| {
            (
                r.guild_id,
                GuildAccessData {
                    guild_id: r.guild_id,
                    owner_id: r.owner_id,
                    observer_role_ids: r.observer_role_ids,
                    removed: r.removed,
                    ..Default::default()
                },
            )
        })
        .collect();

    let roles = sqlx::query!(
        "select guild_id, role_id, permissions from roles where guild_id = any($1)",
        guild_ids,
    )
    .fetch_all(&mut **tx)
    .await?;
    for r in roles {
        if let Some(g) = out.get_mut(&r.guild_id) {
            g.roles.insert(r.role_id, perms_from_db(r.permissions));
        }
    }

    let channels = sqlx::query!(
        "select guild_id, channel_id, kind, parent_id from channels where guild_id = any($1)",
        guild_ids,
    )
    .fetch_all(&mut **tx)
    .await?;
    for c in channels {
        if let Some(g) = out.get_mut(&c.guild_id) {
            g.channels.insert(
                c.channel_id,
                ChannelData {
                    channel_id: c.channel_id,
                    kind: c.kind,
                    parent_id: c.parent_id,
                    overwrites: Vec::new(),
                },
            );
        }
    }

    let overwrites = sqlx::query!(
        "select guild_id, channel_id, target_id, kind, allow, deny
         from permission_overwrites where guild_id = any($1)",
        guild_ids,
    )
    .fetch_all(&mut **tx)
    .await?;
    for o in overwrites {
        let (guild_id, channel_id, target_id, kind, allow, deny) = (
            o.guild_id,
            o.channel_id,
            o.target_id,
            o.kind,
            o.allow,
            o.deny,
        );
        let Some(kind) = OverwriteKind::from_db(kind) else {
            // The schema only admits 0 and 1; anything else would grant nothing.
            tracing::warn!(
                guild_id,
                channel_id,
                kind,
                "skipping overwrite of unknown kind"
            );
            continue;
        };
        if let Some(c) = out
            .get_mut(&guild_id)
            .and_then(|g| g.channels.get_mut(&channel_id))
        {
            c.overwrites.push(Overwrite {
                target_id,
                kind,
                allow: perms_from_db(allow),
                deny: perms_from_db(deny),
            });
        }
    }
    Ok(out)
}

/// The memberships of `user_ids` in `guild_ids`, keyed by (guild id, user id),
/// with their thread memberships. A pair that is absent is not a member.
pub async fn load_members(
    tx: &mut FanoutTx,
    guild_ids: &[i64],
    user_ids: &[i64],
) -> Result<BTreeMap<(i64, i64), MemberData>> {
    let rows = sqlx::query!(
        r#"select guild_id, user_id, role_ids,
             communication_disabled_until as "communication_disabled_until: DateTime<Utc>"
         from members where guild_id = any($1) and user_id = any($2)"#,
        guild_ids,
        user_ids,
    )
    .fetch_all(&mut **tx)
    .await?;
    let mut out: BTreeMap<(i64, i64), MemberData> = rows
        .into_iter()
        .map(|r| {
            (
                (r.guild_id, r.user_id),
                MemberData {
                    user_id: r.user_id,
                    role_ids: r.role_ids,
                    communication_disabled_until: r.communication_disabled_until,
                    thread_ids: Default::default(),
                },
            )
        })
        .collect();
    let threads = sqlx::query!(
        "select guild_id, thread_id, user_id from thread_members
         where guild_id = any($1) and user_id = any($2)",
        guild_ids,
        user_ids,
    )
    .fetch_all(&mut **tx)
    .await?;
    for t in threads {
        if let Some(m) = out.get_mut(&(t.guild_id, t.user_id)) {
            m.thread_ids.insert(t.thread_id);
        }
    }
    Ok(out)
}
