//! JSON shapes of Discord objects, built to satisfy serenity 0.12.5's strict deserializers
//! (see discord-protocol.md §1.9: roles need `colors`, members need `flags`, ...).

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use crate::model::{Channel, Member, MessageState, OverwriteKind, Role, User};

pub(crate) fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, false)
}

fn ts_opt(t: &Option<DateTime<Utc>>) -> Value {
    match t {
        Some(t) => Value::String(ts(t)),
        None => Value::Null,
    }
}

pub(crate) fn user(u: &User) -> Value {
    json!({
        "id": u.id.to_string(),
        "username": u.username,
        "discriminator": "0",
        "global_name": u.global_name,
        "avatar": u.avatar,
        "bot": u.bot,
        "public_flags": 0,
    })
}

pub(crate) fn unknown_user(id: u64) -> Value {
    json!({"id": id.to_string(), "username": format!("user{id}"), "discriminator": "0",
           "global_name": null, "avatar": null, "bot": false, "public_flags": 0})
}

pub(crate) fn role(r: &Role) -> Value {
    json!({
        "id": r.id.to_string(),
        "name": r.name,
        "color": r.color,
        "colors": {"primary_color": r.color, "secondary_color": null, "tertiary_color": null},
        "hoist": r.hoist,
        "icon": null,
        "unicode_emoji": null,
        "position": r.position,
        "permissions": r.permissions.to_string(),
        "managed": false,
        "mentionable": r.mentionable,
        "flags": 0,
    })
}

pub(crate) fn channel(c: &Channel, guild_id: u64, created: &DateTime<Utc>) -> Value {
    let overwrites: Vec<Value> = c
        .overwrites
        .iter()
        .map(|o| {
            json!({
                "id": o.id.to_string(),
                "type": match o.kind { OverwriteKind::Role => 0, OverwriteKind::Member => 1 },
                "allow": o.allow.to_string(),
                "deny": o.deny.to_string(),
            })
        })
        .collect();
    let mut v = json!({
        "id": c.id.to_string(),
        "type": c.kind.code(),
        "guild_id": guild_id.to_string(),
        "name": c.name,
        "position": c.position.max(0),
        "permission_overwrites": overwrites,
        "parent_id": c.parent_id.map(|p| p.to_string()),
        "topic": c.topic,
        "nsfw": false,
        "rate_limit_per_user": 0,
        "flags": 0,
    });
    if let (true, Some(obj)) = (c.kind.has_posts(), v.as_object_mut()) {
        // Discord sends these on every forum and media channel, tags or none.
        let tags: Vec<Value> = c
            .available_tags
            .iter()
            .map(|t| {
                json!({
                    "id": t.id.to_string(),
                    "name": t.name,
                    "moderated": t.moderated,
                    "emoji_id": null,
                    "emoji_name": t.emoji_name,
                })
            })
            .collect();
        obj.insert("available_tags".into(), Value::Array(tags));
        obj.insert("default_reaction_emoji".into(), Value::Null);
        obj.insert("default_sort_order".into(), Value::Null);
        obj.insert("default_forum_layout".into(), json!(0));
    }
    if let (Some(t), Some(obj)) = (&c.thread, v.as_object_mut()) {
        obj.insert("owner_id".into(), Value::String(t.owner_id.to_string()));
        obj.insert("member_count".into(), json!(t.members.len().min(50)));
        // Discord sends `applied_tags` on posts of forum and media channels; an empty list
        // and an absent one mean the same to a reader, so only tagged posts carry it.
        if !t.applied_tags.is_empty() {
            let ids: Vec<String> = t.applied_tags.iter().map(u64::to_string).collect();
            obj.insert("applied_tags".into(), json!(ids));
        }
        obj.insert("message_count".into(), json!(0));
        obj.insert(
            "thread_metadata".into(),
            json!({
                "archived": t.archived,
                "auto_archive_duration": t.auto_archive_duration,
                "archive_timestamp": ts(&t.archive_timestamp.unwrap_or(*created)),
                "locked": t.locked,
                "invitable": t.invitable,
                "create_timestamp": ts(created),
            }),
        );
        obj.remove("permission_overwrites");
    }
    v
}

pub(crate) fn thread_member(thread_id: u64, user_id: u64, joined: &DateTime<Utc>) -> Value {
    json!({"id": thread_id.to_string(), "user_id": user_id.to_string(),
           "join_timestamp": ts(joined), "flags": 0})
}

/// The bot's own membership inside a GUILD_CREATE thread: Discord omits `id` and `user_id`
/// there (it can only be the current user's).
pub(crate) fn own_thread_member(joined: &DateTime<Utc>) -> Value {
    json!({"join_timestamp": ts(joined), "flags": 0})
}

/// A guild member; `user` is omitted for the partial member attached to messages.
pub(crate) fn member(m: &Member, user: Option<&User>, guild_id: u64) -> Value {
    let mut v = json!({
        "nick": m.nick,
        "avatar": null,
        "banner": null,
        "roles": m.roles.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        "joined_at": ts(&m.joined_at),
        "premium_since": null,
        "deaf": false,
        "mute": false,
        "flags": 0,
        "pending": false,
        "communication_disabled_until": ts_opt(&m.communication_disabled_until),
        "guild_id": guild_id.to_string(),
    });
    if let (Some(u), Some(obj)) = (user, v.as_object_mut()) {
        obj.insert("user".into(), self::user(u));
    }
    v
}

/// GUILD_MEMBER_UPDATE's flat shape.
pub(crate) fn member_update(m: &Member, user: &Value, guild_id: u64) -> Value {
    json!({
        "guild_id": guild_id.to_string(),
        "roles": m.roles.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        "user": user,
        "nick": m.nick,
        "avatar": null,
        "banner": null,
        "joined_at": ts(&m.joined_at),
        "premium_since": null,
        "deaf": false,
        "mute": false,
        "pending": false,
        "flags": 0,
        "communication_disabled_until": ts_opt(&m.communication_disabled_until),
    })
}

/// A full message object with the gateway extras (`guild_id`, partial `member`).
pub(crate) fn message(m: &MessageState, author: Value, member: Option<Value>) -> Value {
    let attachments: Vec<Value> = m
        .attachments
        .iter()
        .map(|a| {
            json!({
                "id": a.id.to_string(),
                "filename": a.filename,
                "size": a.size,
                "url": a.url,
                "proxy_url": a.url,
                "content_type": a.content_type,
            })
        })
        .collect();
    let mut v = json!({
        "id": m.id.to_string(),
        "channel_id": m.channel_id.to_string(),
        "guild_id": m.guild_id.to_string(),
        "author": author,
        "content": m.content,
        "timestamp": ts(&m.created_at),
        "edited_timestamp": ts_opt(&m.edited_at),
        "tts": false,
        "mention_everyone": false,
        "mentions": [],
        "mention_roles": [],
        "attachments": attachments,
        "embeds": [],
        "pinned": false,
        "type": if m.reply_to.is_some() { 19 } else { 0 },
        "flags": 0,
    });
    if let Some(obj) = v.as_object_mut() {
        if let Some(member) = member {
            obj.insert("member".into(), member);
        }
        if let Some(r) = m.reply_to {
            obj.insert(
                "message_reference".into(),
                json!({"message_id": r.to_string(), "channel_id": m.channel_id.to_string(),
                       "guild_id": m.guild_id.to_string()}),
            );
        }
    }
    v
}
