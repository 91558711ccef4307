//! Channels and their messages: history paging, one message, posting as the bot.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;

use crate::http::{id_param, limit_param, query_map, require_bot, ApiError, ApiResult};
use crate::{PostOptions, Shared, SimError};

use super::access::{history_readable, visible_channel};

pub(super) async fn channel(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult {
    require_bot(&sh, &headers)?;
    let w = sh.world();
    let (g, c) = visible_channel(&w, id)?;
    Ok(Json(w.channel_json(g.id, c)))
}

/// Discord's paging: results newest first; `after` gives the messages right after the cursor.
pub(super) async fn history(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    require_bot(&sh, &headers)?;
    let q = query_map(&raw);
    let limit = limit_param(&q, 50, 100)?;
    let (before, after, around) = (
        id_param(&q, "before")?,
        id_param(&q, "after")?,
        id_param(&q, "around")?,
    );
    let w = sh.world();
    let (g, c) = visible_channel(&w, id)?;
    if !c.kind.is_textual() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            50024,
            "Cannot execute action on this channel type",
        ));
    }
    if !history_readable(&w, g, c)? {
        return Ok(Json(Value::Array(vec![])));
    }
    let empty = Default::default();
    let msgs = w.messages.get(&id).unwrap_or(&empty);
    let live = |m: &&crate::MessageState| !m.deleted;
    let picked: Vec<&crate::MessageState> = if let Some(a) = around {
        let older: Vec<_> = msgs
            .range(..a)
            .rev()
            .map(|(_, m)| m)
            .filter(live)
            .take(limit / 2)
            .collect();
        let newer: Vec<_> = msgs
            .range(a..)
            .map(|(_, m)| m)
            .filter(live)
            .take(limit - older.len())
            .collect();
        newer.into_iter().rev().chain(older).collect()
    } else if let Some(a) = after {
        let mut v: Vec<_> = msgs
            .range(a.saturating_add(1)..)
            .map(|(_, m)| m)
            .filter(live)
            .take(limit)
            .collect();
        v.reverse();
        v
    } else {
        let b = before.unwrap_or(u64::MAX);
        msgs.range(..b)
            .rev()
            .map(|(_, m)| m)
            .filter(live)
            .take(limit)
            .collect()
    };
    Ok(Json(Value::Array(
        picked.into_iter().map(|m| w.message_json(m)).collect(),
    )))
}

pub(super) async fn one_message(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path((id, mid)): Path<(u64, u64)>,
) -> ApiResult {
    require_bot(&sh, &headers)?;
    let w = sh.world();
    let (g, c) = visible_channel(&w, id)?;
    if !history_readable(&w, g, c)? {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            50013,
            "Missing Permissions",
        ));
    }
    match w
        .messages
        .get(&id)
        .and_then(|m| m.get(&mid))
        .filter(|m| !m.deleted)
    {
        Some(m) => Ok(Json(w.message_json(m))),
        None => Err(SimError::UnknownMessage(mid).into()),
    }
}

#[derive(Deserialize)]
pub(super) struct CreateMessage {
    #[serde(default)]
    content: String,
    #[serde(default)]
    message_reference: Option<MessageRef>,
}

#[derive(Deserialize)]
struct MessageRef {
    #[serde(with = "crate::model::sf::opt", default)]
    message_id: Option<u64>,
}

pub(super) async fn create_message(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Json(body): Json<CreateMessage>,
) -> ApiResult {
    require_bot(&sh, &headers)?;
    let mut w = sh.world();
    visible_channel(&w, id)?;
    if body.content.is_empty() || body.content.chars().count() > 2000 {
        return Err(ApiError::bad_request("content must be 1..=2000 characters"));
    }
    let bot = w.bot.id;
    let opts = PostOptions {
        attachments: vec![],
        reply_to: body.message_reference.and_then(|r| r.message_id),
    };
    let m = w.post_message(id, bot, body.content, opts)?;
    Ok(Json(w.message_json(&m)))
}
