//! Thread listings (active, archived) and thread members.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};

use crate::http::{bool_param, id_param, limit_param, query_map, require_bot, ApiError, ApiResult};
use crate::model::{perms, ChannelKind};
use crate::world::{GuildState, World};
use crate::Shared;

use super::access::{require_members_intent, visible_channel, visible_guild};

/// The bot's own thread member object for each of `threads` it has joined.
pub(super) fn own_memberships(w: &World, threads: &[&crate::Channel]) -> Vec<Value> {
    threads
        .iter()
        .filter(|c| {
            c.thread
                .as_ref()
                .is_some_and(|t| t.members.contains(&w.bot.id))
        })
        .map(|c| crate::payload::thread_member(c.id, w.bot.id, &World::thread_join_time(c)))
        .collect()
}

pub(super) fn threads_json(w: &World, g: &GuildState, threads: Vec<&crate::Channel>) -> Value {
    let mut threads = threads;
    threads.sort_by_key(|c| std::cmp::Reverse(c.id));
    json!({
        "threads": threads.iter().map(|c| w.channel_json(g.id, c)).collect::<Vec<_>>(),
        "members": own_memberships(w, &threads),
        "has_more": false,
    })
}

/// When a thread's archived flag last changed (its creation if never).
pub(super) fn archive_time(c: &crate::Channel) -> chrono::DateTime<chrono::Utc> {
    c.thread
        .as_ref()
        .and_then(|t| t.archive_timestamp)
        .unwrap_or_else(|| World::thread_join_time(c))
}

/// Discord's archived-thread listing: newest archive first, `before` an ISO8601 timestamp
/// (exclusive), `limit` 2–100 (default 50), `has_more` when older ones remain.
pub(super) fn archived(
    sh: &Shared,
    headers: &HeaderMap,
    id: u64,
    private: bool,
    raw: &Option<String>,
) -> ApiResult {
    require_bot(sh, headers)?;
    let q = query_map(raw);
    let limit = match q.get("limit") {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request("limit is not an integer"))?,
        None => 50,
    };
    if !(2..=100).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 2 and 100"));
    }
    let before = q
        .get("before")
        .map(|v| {
            chrono::DateTime::parse_from_rfc3339(v)
                .map(|d| d.with_timezone(&chrono::Utc))
                .map_err(|_| ApiError::bad_request("before is not an ISO8601 timestamp"))
        })
        .transpose()?;
    let w = sh.world();
    let (g, _) = visible_channel(&w, id)?;
    // Listing archived threads needs READ_MESSAGE_HISTORY, and MANAGE_THREADS too for private
    // ones (discord-protocol.md §9).
    let p = w.user_channel_permissions(g, w.bot.id, id);
    let needed = perms::READ_MESSAGE_HISTORY | if private { perms::MANAGE_THREADS } else { 0 };
    if p & needed != needed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            50013,
            "Missing Permissions",
        ));
    }
    let mut threads: Vec<&crate::Channel> = g
        .channels
        .values()
        .filter(|c| {
            c.parent_id == Some(id)
                && (c.kind == ChannelKind::PrivateThread) == private
                && c.kind.is_thread()
                && c.thread.as_ref().is_some_and(|t| t.archived)
                && before.is_none_or(|b| archive_time(c) < b)
        })
        .collect();
    threads.sort_by_key(|c| std::cmp::Reverse((archive_time(c), c.id)));
    let has_more = threads.len() > limit;
    threads.truncate(limit);
    Ok(Json(json!({
        "threads": threads.iter().map(|c| w.channel_json(g.id, c)).collect::<Vec<_>>(),
        "members": own_memberships(&w, &threads),
        "has_more": has_more,
    })))
}

pub(super) async fn archived_public(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    archived(&sh, &headers, id, false, &raw)
}

pub(super) async fn archived_private(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    archived(&sh, &headers, id, true, &raw)
}

/// A thread and its members; 400 50024 for a channel that is not a thread (what Discord answers
/// for thread routes on other channel types).
pub(super) fn thread_of(
    w: &World,
    id: u64,
) -> Result<(&GuildState, &crate::Channel, &[u64]), ApiError> {
    let (g, c) = visible_channel(w, id)?;
    match &c.thread {
        Some(t) if c.kind.is_thread() => Ok((g, c, &t.members)),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            50024,
            "Cannot execute action on this channel type",
        )),
    }
}

pub(super) fn thread_member_json(
    w: &World,
    g: &GuildState,
    c: &crate::Channel,
    uid: u64,
    with_member: bool,
) -> Value {
    let mut v = crate::payload::thread_member(c.id, uid, &World::thread_join_time(c));
    if with_member {
        let member = g
            .members
            .get(&uid)
            .map(|m| w.member_json(g, m))
            .or_else(|| (uid == w.bot.id).then(|| w.member_json(g, &w.bot_member_of(g))));
        if let (Some(m), Some(obj)) = (member, v.as_object_mut()) {
            obj.insert("member".into(), m);
        }
    }
    v
}

/// `GET /channels/{thread.id}/thread-members` as in API v10: ascending user id; `after` and
/// `limit` (1–100, default 100) page only with `with_member=true`, otherwise every member is
/// returned. Needs the GUILD_MEMBERS intent.
pub(super) async fn thread_members(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    require_bot(&sh, &headers)?;
    let q = query_map(&raw);
    let with_member = bool_param(&q, "with_member")?;
    let limit = limit_param(&q, 100, 100)?;
    let after = id_param(&q, "after")?.unwrap_or(0);
    let w = sh.world();
    let (g, c, members) = thread_of(&w, id)?;
    require_members_intent(&sh)?;
    let mut ids: Vec<u64> = members.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let picked: Vec<u64> = if with_member {
        ids.into_iter().filter(|u| *u > after).take(limit).collect()
    } else {
        ids
    };
    Ok(Json(Value::Array(
        picked
            .into_iter()
            .map(|u| thread_member_json(&w, g, c, u, with_member))
            .collect(),
    )))
}

pub(super) async fn one_thread_member(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path((id, uid)): Path<(u64, u64)>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    require_bot(&sh, &headers)?;
    let q = query_map(&raw);
    let with_member = bool_param(&q, "with_member")?;
    let w = sh.world();
    let (g, c, members) = thread_of(&w, id)?;
    require_members_intent(&sh)?;
    if !members.contains(&uid) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            10007,
            "Unknown Member",
        ));
    }
    Ok(Json(thread_member_json(&w, g, c, uid, with_member)))
}

pub(super) async fn active_threads(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult {
    require_bot(&sh, &headers)?;
    let w = sh.world();
    let g = visible_guild(&w, id)?;
    let threads = g
        .channels
        .values()
        .filter(|c| c.kind.is_thread() && !c.thread.as_ref().is_some_and(|t| t.archived))
        .filter(|c| w.bot_access(g, c.id).view)
        .collect();
    Ok(Json(threads_json(&w, g, threads)))
}
