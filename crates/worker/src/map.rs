//! serenity's typed events and REST messages → plain [`IngestOp`]s.

use chrono::{DateTime, Utc};
use observer_db::ingest::{
    Author, ChannelInfo, ForumTag, GuildInfo, GuildSnapshot, IngestOp, MemberInfo, MessagePatch,
    NewMessage, Overwrite, RoleInfo,
};
use serde_json::{json, Value};
use serenity::all::{
    Event, GuildChannel, Member, Message, PermissionOverwriteType, Role, Timestamp, User,
};

/// Text channels whose history the worker backfills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackfillChannel {
    pub channel_id: i64,
}

/// Channels of one guild whose history to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillAsk {
    pub guild_id: i64,
    pub channels: Vec<BackfillChannel>,
    /// Only those the bot was refused before (CHANNEL_UPDATE: access may have
    /// been granted).
    pub only_unreadable: bool,
}

/// What one gateway event means for the worker.
#[derive(Debug, Default)]
pub struct Mapped {
    pub ops: Vec<IngestOp>,
    /// GUILD_CREATE (all channels), THREAD_LIST_SYNC (channels the bot gained),
    /// CHANNEL_UPDATE (a channel it may have gained).
    pub backfill: Option<BackfillAsk>,
    /// GUILD_CREATE, THREAD_LIST_SYNC: what to list over REST (members,
    /// archived private threads, private threads' members).
    pub snapshot: Option<crate::requests::SnapshotRequest>,
}

fn backfill_of(
    guild_id: i64,
    chans: &[&ChannelInfo],
    only_unreadable: bool,
) -> Option<BackfillAsk> {
    let channels: Vec<BackfillChannel> = chans
        .iter()
        .filter(|c| is_backfill_kind(c.kind, c.archived))
        .map(|c| BackfillChannel {
            channel_id: c.channel_id,
        })
        .collect();
    (!channels.is_empty()).then_some(BackfillAsk {
        guild_id,
        channels,
        only_unreadable,
    })
}

fn id(v: u64) -> i64 {
    // Snowflakes use 63 bits at most. Ids only: never use this for bitsets.
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A permission bitset as stored (`bigint`): the same 64 bits, reinterpreted.
/// A saturating conversion would turn any value above `i64::MAX` into "every
/// bit set" (ADMINISTRATOR included), failing open.
pub(crate) fn perms(v: u64) -> i64 {
    v as i64
}

pub fn ts(t: &Timestamp) -> Option<DateTime<Utc>> {
    // Through RFC 3339 so this works whichever time backend serenity is built with.
    let s = t.to_rfc3339()?;
    DateTime::parse_from_rfc3339(&s)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

pub(crate) fn channel(c: &GuildChannel) -> ChannelInfo {
    ChannelInfo {
        guild_id: id(c.guild_id.get()),
        channel_id: id(c.id.get()),
        kind: i16::from(u8::from(c.kind)),
        name: c.name.clone(),
        parent_id: c.parent_id.map(|p| id(p.get())),
        position: i32::from(c.position),
        topic: c.topic.clone(),
        archived: c.thread_metadata.as_ref().is_some_and(|m| m.archived),
        owner_id: c.owner_id.map(|o| id(o.get())),
        available_tags: c
            .available_tags
            .iter()
            .map(|t| ForumTag {
                id: id(t.id.get()),
                name: t.name.clone(),
                moderated: t.moderated,
            })
            .collect(),
        applied_tags: c.applied_tags.iter().map(|t| id(t.get())).collect(),
        locked: c.thread_metadata.as_ref().is_some_and(|m| m.locked),
        thread_created_at: c
            .thread_metadata
            .as_ref()
            .and_then(|m| m.create_timestamp)
            .and_then(|t| ts(&t)),
        overwrites: c
            .permission_overwrites
            .iter()
            .filter_map(|o| {
                let (target, kind) = match o.kind {
                    PermissionOverwriteType::Role(r) => (r.get(), 0),
                    PermissionOverwriteType::Member(u) => (u.get(), 1),
                    _ => return None,
                };
                Some(Overwrite {
                    target_id: id(target),
                    kind,
                    allow: perms(o.allow.bits()),
                    deny: perms(o.deny.bits()),
                })
            })
            .collect(),
    }
}

fn role(r: &Role) -> RoleInfo {
    RoleInfo {
        guild_id: id(r.guild_id.get()),
        role_id: id(r.id.get()),
        name: r.name.clone(),
        permissions: perms(r.permissions.bits()),
        position: i32::from(r.position),
    }
}

fn member(m: &Member, observed_at: DateTime<Utc>) -> MemberInfo {
    MemberInfo {
        guild_id: id(m.guild_id.get()),
        user_id: id(m.user.id.get()),
        role_ids: m.roles.iter().map(|r| id(r.get())).collect(),
        nick: m.nick.clone(),
        joined_at: m.joined_at.as_ref().and_then(ts),
        communication_disabled_until: m.communication_disabled_until.as_ref().and_then(ts),
        observed_at,
    }
}

fn author(u: &User, nick: Option<&str>) -> Author {
    Author {
        id: id(u.id.get()),
        username: u.name.clone(),
        display_name: nick.map(str::to_owned).or_else(|| u.global_name.clone()),
        avatar: u.avatar.map(|a| a.to_string()),
        bot: u.bot,
    }
}

fn attachments(list: &[serenity::all::Attachment]) -> Value {
    Value::Array(
        list.iter()
            .map(|a| {
                json!({
                    "id": a.id.get().to_string(),
                    "filename": observer_db::ingest::sanitize(&a.filename, 1024),
                    "url": observer_db::ingest::sanitize(&a.url, 4096),
                    "size": a.size,
                    "content_type": a.content_type.as_deref().map(|c| observer_db::ingest::sanitize(c, 256)),
                })
            })
            .collect(),
    )
}

/// Channels that hold messages: text, announcement, voice and stage (their
/// text chat), and active threads.
fn is_backfill_kind(kind: i16, archived: bool) -> bool {
    matches!(kind, 0 | 2 | 5 | 13) || (matches!(kind, 10..=12) && !archived)
}

/// A full message (MESSAGE_CREATE or a history page). REST messages carry no
/// guild id, so the caller supplies it.
pub fn message(m: &Message, guild_id: Option<i64>) -> Option<NewMessage> {
    let guild_id = m.guild_id.map(|g| id(g.get())).or(guild_id)?;
    let nick = m.member.as_ref().and_then(|p| p.nick.as_deref());
    Some(NewMessage {
        guild_id,
        channel_id: id(m.channel_id.get()),
        message_id: id(m.id.get()),
        author: author(&m.author, nick),
        content: m.content.clone(),
        created_at: ts(&m.timestamp)
            .unwrap_or_else(|| observer_db::ingest::snowflake_time(id(m.id.get()))),
        edited_at: m.edited_timestamp.as_ref().and_then(ts),
        attachments: attachments(&m.attachments),
        reply_to_id: m
            .message_reference
            .as_ref()
            .and_then(|r| r.message_id)
            .map(|r| id(r.get())),
    })
}

/// Maps one gateway event received at `received`. DMs and events the worker
/// does not mirror map to nothing.
pub fn event(ev: &Event, received: DateTime<Utc>) -> Mapped {
    let mut out = Mapped::default();
    match ev {
        Event::GuildCreate(e) => {
            let g = &e.guild;
            let gid = id(g.id.get());
            let channels: Vec<ChannelInfo> = g.channels.values().map(channel).collect();
            let threads: Vec<ChannelInfo> = g.threads.iter().map(channel).collect();
            let all: Vec<&ChannelInfo> = channels.iter().chain(threads.iter()).collect();
            let backfill = backfill_of(gid, &all, false);
            out.snapshot = Some(crate::requests::SnapshotRequest::guild_create(
                gid, &channels, &threads,
            ));
            out.ops.push(IngestOp::GuildCreate(Box::new(GuildSnapshot {
                guild: GuildInfo {
                    guild_id: gid,
                    name: g.name.clone(),
                    icon: g.icon.map(|i| i.to_string()),
                    owner_id: id(g.owner_id.get()),
                },
                roles: g.roles.values().map(role).collect(),
                channels,
                threads,
                members: g.members.values().map(|m| member(m, received)).collect(),
                observed_at: received,
            })));
            out.backfill = backfill.or(Some(BackfillAsk {
                guild_id: gid,
                channels: vec![],
                only_unreadable: false,
            }));
        }
        Event::GuildUpdate(e) => {
            let g = &e.guild;
            out.ops.push(IngestOp::GuildUpdate(GuildInfo {
                guild_id: id(g.id.get()),
                name: g.name.clone(),
                icon: g.icon.map(|i| i.to_string()),
                owner_id: id(g.owner_id.get()),
            }));
            out.ops
                .extend(g.roles.values().map(|r| IngestOp::RoleUpsert(role(r))));
        }
        Event::GuildDelete(e) => {
            let guild_id = id(e.guild.id.get());
            out.ops.push(if e.guild.unavailable {
                IngestOp::GuildUnavailable { guild_id }
            } else {
                IngestOp::GuildRemoved {
                    guild_id,
                    observed_at: received,
                }
            });
        }
        Event::ChannelCreate(e) => out.ops.push(IngestOp::ChannelUpsert(channel(&e.channel))),
        Event::ChannelUpdate(e) => {
            let c = channel(&e.channel);
            out.backfill = backfill_of(c.guild_id, &[&c], true);
            out.ops.push(IngestOp::ChannelUpsert(c));
        }
        Event::ChannelDelete(e) => out.ops.push(IngestOp::ChannelDelete {
            guild_id: id(e.channel.guild_id.get()),
            channel_id: id(e.channel.id.get()),
        }),
        // THREAD_CREATE's `member` (the bot's own membership) carries no user id
        // in serenity's model; THREAD_MEMBERS_UPDATE and THREAD_LIST_SYNC do.
        Event::ThreadCreate(e) => out.ops.push(IngestOp::ChannelUpsert(channel(&e.thread))),
        Event::ThreadUpdate(e) => out.ops.push(IngestOp::ChannelUpsert(channel(&e.thread))),
        Event::ThreadDelete(e) => out.ops.push(IngestOp::ChannelDelete {
            guild_id: id(e.thread.guild_id.get()),
            channel_id: id(e.thread.id.get()),
        }),
        Event::ThreadListSync(e) => {
            let guild_id = id(e.guild_id.get());
            let threads: Vec<ChannelInfo> = e.threads.iter().map(channel).collect();
            out.snapshot = Some(crate::requests::SnapshotRequest::thread_list_sync(
                guild_id, &threads,
            ));
            // Sent when the bot gains access to channels: fetch what it could
            // not read before (the parents' kinds are in the store, not here;
            // ids of non-message channels answer an error the backfill logs).
            let mut ids: Vec<i64> = e
                .channel_ids
                .iter()
                .flatten()
                .map(|c| id(c.get()))
                .collect();
            ids.extend(
                threads
                    .iter()
                    .filter(|t| is_backfill_kind(t.kind, t.archived))
                    .map(|t| t.channel_id),
            );
            if !ids.is_empty() {
                out.backfill = Some(BackfillAsk {
                    guild_id,
                    channels: ids
                        .into_iter()
                        .map(|channel_id| BackfillChannel { channel_id })
                        .collect(),
                    only_unreadable: false,
                });
            }
            out.ops.push(IngestOp::ThreadListSync {
                guild_id,
                threads,
                members: e
                    .members
                    .iter()
                    .map(|m| (id(m.id.get()), id(m.user_id.get())))
                    .collect(),
                observed_at: received,
            });
        }
        Event::ThreadMembersUpdate(e) => out.ops.push(IngestOp::ThreadMembers {
            guild_id: id(e.guild_id.get()),
            thread_id: id(e.id.get()),
            added: e
                .added_members
                .iter()
                .map(|m| id(m.user_id.get()))
                .collect(),
            removed: e.removed_member_ids.iter().map(|u| id(u.get())).collect(),
            observed_at: received,
        }),
        Event::GuildRoleCreate(e) => out.ops.push(IngestOp::RoleUpsert(role(&e.role))),
        Event::GuildRoleUpdate(e) => out.ops.push(IngestOp::RoleUpsert(role(&e.role))),
        Event::GuildRoleDelete(e) => out.ops.push(IngestOp::RoleDelete {
            guild_id: id(e.guild_id.get()),
            role_id: id(e.role_id.get()),
        }),
        Event::GuildMemberAdd(e) => out
            .ops
            .push(IngestOp::MemberUpsert(member(&e.member, received))),
        Event::GuildMemberUpdate(e) => out.ops.push(IngestOp::MemberUpsert(MemberInfo {
            guild_id: id(e.guild_id.get()),
            user_id: id(e.user.id.get()),
            role_ids: e.roles.iter().map(|r| id(r.get())).collect(),
            nick: e.nick.clone(),
            joined_at: ts(&e.joined_at),
            communication_disabled_until: e.communication_disabled_until.as_ref().and_then(ts),
            observed_at: received,
        })),
        Event::GuildMemberRemove(e) => out.ops.push(IngestOp::MemberRemove {
            guild_id: id(e.guild_id.get()),
            user_id: id(e.user.id.get()),
            observed_at: received,
        }),
        Event::MessageCreate(e) => {
            if let Some(m) = message(&e.message, None) {
                out.ops.push(IngestOp::MessageCreate(Box::new(m)));
            }
        }
        Event::MessageUpdate(e) => {
            if let Some(g) = e.guild_id {
                let nick = e
                    .member
                    .as_ref()
                    .and_then(|m| m.as_ref())
                    .and_then(|m| m.nick.as_deref());
                out.ops.push(IngestOp::MessageUpdate(Box::new(MessagePatch {
                    guild_id: id(g.get()),
                    channel_id: id(e.channel_id.get()),
                    message_id: id(e.id.get()),
                    author: e.author.as_ref().map(|a| author(a, nick)),
                    content: e.content.clone(),
                    edited_at: e.edited_timestamp.as_ref().and_then(ts),
                    attachments: e.attachments.as_deref().map(attachments),
                })));
            }
        }
        Event::MessageDelete(e) => {
            if let Some(g) = e.guild_id {
                out.ops.push(IngestOp::MessageDelete {
                    guild_id: id(g.get()),
                    channel_id: id(e.channel_id.get()),
                    message_id: id(e.message_id.get()),
                });
            }
        }
        Event::MessageDeleteBulk(e) => {
            if let Some(g) = e.guild_id {
                out.ops.push(IngestOp::MessageBulkDelete {
                    guild_id: id(g.get()),
                    channel_id: id(e.channel_id.get()),
                    message_ids: e.ids.iter().map(|m| id(m.get())).collect(),
                });
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serenity::all::Permissions;

    const ADMINISTRATOR: i64 = 1 << 3;
    const VIEW_CHANNEL: u64 = 1 << 10;

    #[test]
    fn permission_bits_above_i64_max_are_preserved_not_saturated() {
        let high = (1u64 << 63) | VIEW_CHANNEL;
        let mut r: Role = serde_json::from_value(json!({
            "id": "20", "guild_id": "1", "name": "r", "color": 0, "hoist": false,
            "managed": false, "mentionable": false, "permissions": "0", "position": 1,
            "colors": {"primary_color": 0, "secondary_color": null, "tertiary_color": null},
        }))
        .unwrap();
        r.permissions = Permissions::from_bits_retain(high);
        let info = role(&r);
        assert_eq!(info.permissions, high as i64);
        assert_eq!(
            info.permissions & ADMINISTRATOR,
            0,
            "must not grant ADMINISTRATOR"
        );

        let mut c: GuildChannel = serde_json::from_value(json!({
            "id": "5", "guild_id": "1", "type": 0, "name": "c", "position": 0,
            "permission_overwrites": [
                {"id": "1", "type": 0, "allow": "0", "deny": "0"}
            ],
        }))
        .unwrap();
        c.permission_overwrites[0].allow = Permissions::from_bits_retain(high);
        c.permission_overwrites[0].deny = Permissions::from_bits_retain(u64::MAX);
        let info = channel(&c);
        assert_eq!(info.overwrites[0].allow, high as i64);
        assert_eq!(info.overwrites[0].allow & ADMINISTRATOR, 0);
        assert_eq!(info.overwrites[0].deny, -1);
        // Ids keep the snowflake conversion.
        assert_eq!(info.channel_id, 5);
    }
}
