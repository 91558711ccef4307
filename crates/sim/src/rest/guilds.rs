//! Guild objects: the guild, its channels, roles and members.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::Value;

use crate::http::{id_param, limit_param, query_map, require_bot, ApiResult};
use crate::{Shared, SimError};

use super::access::{require_members_intent, visible_guild};

pub(super) async fn guild(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult {
    require_bot(&sh, &headers)?;
    let w = sh.world();
    let g = visible_guild(&w, id)?;
    let mut v = w.guild_create_json(g);
    if let Some(o) = v.as_object_mut() {
        for k in [
            "members",
            "channels",
            "threads",
            "voice_states",
            "presences",
            "joined_at",
            "large",
            "member_count",
        ] {
            o.remove(k);
        }
    }
    Ok(Json(v))
}

pub(super) async fn guild_channels(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult {
    require_bot(&sh, &headers)?;
    let w = sh.world();
    let g = visible_guild(&w, id)?;
    let v: Vec<Value> = g
        .channels
        .values()
        .filter(|c| !c.kind.is_thread())
        .map(|c| w.channel_json(g.id, c))
        .collect();
    Ok(Json(Value::Array(v)))
}

pub(super) async fn guild_roles(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult {
    require_bot(&sh, &headers)?;
    let w = sh.world();
    let g = visible_guild(&w, id)?;
    Ok(Json(Value::Array(
        g.roles.values().map(crate::payload::role).collect(),
    )))
}

/// Pages by ascending user id (`after` = highest id of the previous page), like Discord; needs
/// the GUILD_MEMBERS intent.
pub(super) async fn guild_members(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    require_bot(&sh, &headers)?;
    require_members_intent(&sh)?;
    let q = query_map(&raw);
    let limit = limit_param(&q, 1, 1000)?;
    let after = id_param(&q, "after")?.unwrap_or(0);
    let w = sh.world();
    let g = visible_guild(&w, id)?;
    let v: Vec<Value> = g
        .members
        .range(after.saturating_add(1)..)
        .take(limit)
        .map(|(_, m)| w.member_json(g, m))
        .collect();
    Ok(Json(Value::Array(v)))
}

pub(super) async fn guild_member(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path((id, uid)): Path<(u64, u64)>,
) -> ApiResult {
    require_bot(&sh, &headers)?;
    let w = sh.world();
    let g = visible_guild(&w, id)?;
    let m = g.members.get(&uid).ok_or(SimError::NotAMember {
        guild_id: id,
        user_id: uid,
    })?;
    Ok(Json(w.member_json(g, m)))
}
