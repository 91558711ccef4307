//! REST under `/api/v10`, behind Discord-style rate limits (see `limits`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::model::{perms, ChannelKind};
use crate::world::{GuildState, World};
use crate::{PostOptions, Shared, SimError};

mod limits;

pub(crate) use limits::{rate_limit, RateState};
pub use limits::{RateStats, DEFAULT_GLOBAL_PER_SEC};

/// A Discord-shaped JSON error.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: u32,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, 0, "401: Unauthorized")
    }
    pub fn missing_access() -> Self {
        Self::new(StatusCode::FORBIDDEN, 50001, "Missing Access")
    }
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, 50035, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"code": self.code, "message": self.message})),
        )
            .into_response()
    }
}

impl From<SimError> for ApiError {
    fn from(e: SimError) -> Self {
        let msg = e.to_string();
        match e {
            SimError::UnknownGuild(_) => Self::new(StatusCode::NOT_FOUND, 10004, "Unknown Guild"),
            SimError::UnknownChannel(_) => {
                Self::new(StatusCode::NOT_FOUND, 10003, "Unknown Channel")
            }
            SimError::UnknownMessage(_) => {
                Self::new(StatusCode::NOT_FOUND, 10008, "Unknown Message")
            }
            SimError::UnknownUser(_) => Self::new(StatusCode::NOT_FOUND, 10013, "Unknown User"),
            SimError::UnknownRole(_) => Self::new(StatusCode::NOT_FOUND, 10011, "Unknown Role"),
            SimError::NotAMember { .. } => {
                Self::new(StatusCode::NOT_FOUND, 10007, "Unknown Member")
            }
            SimError::Invalid(_) | SimError::Io(_) => Self::bad_request(msg),
        }
    }
}

pub(crate) type ApiResult = Result<Json<Value>, ApiError>;

// ----- auth --------------------------------------------------------------------------------

fn auth_header(headers: &HeaderMap) -> &str {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

pub(crate) fn require_bot(sh: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    match auth_header(headers).strip_prefix("Bot ") {
        Some(t) if t == sh.config.bot_token => Ok(()),
        _ => Err(ApiError::unauthorized()),
    }
}

fn visible_guild(w: &World, id: u64) -> Result<&GuildState, ApiError> {
    let g = w.guild(id)?;
    if !g.bot_present {
        return Err(ApiError::missing_access());
    }
    Ok(g)
}

/// A channel the bot can view (VIEW_CHANNEL from its own member's permissions): Discord answers
/// 403 Missing Access on every route of any other channel of a guild it is in.
fn visible_channel(w: &World, id: u64) -> Result<(&GuildState, &crate::Channel), ApiError> {
    let (g, c) = w.channel(id)?;
    if !w.bot_access(g, id).view {
        return Err(ApiError::missing_access());
    }
    Ok((g, c))
}

/// History needs more than a view: CONNECT in voice and stage channels (403 without, as their
/// chat is unreadable), and READ_MESSAGE_HISTORY (without it Discord answers an empty page).
/// Ok(false) means "answer `[]`".
fn history_readable(w: &World, g: &GuildState, c: &crate::Channel) -> Result<bool, ApiError> {
    let p = w.user_channel_permissions(g, w.bot.id, c.id);
    if matches!(c.kind, ChannelKind::Voice | ChannelKind::Stage) && p & perms::CONNECT == 0 {
        return Err(ApiError::missing_access());
    }
    Ok(p & perms::READ_MESSAGE_HISTORY != 0)
}

/// Query pairs; tolerates serenity's `?&limit=..` (empty pairs are skipped).
pub(crate) fn query_map(raw: &Option<String>) -> HashMap<String, String> {
    raw.as_deref()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .filter(|(k, _)| !k.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn id_param(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    q.get(name)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("{name} is not a snowflake")))
        })
        .transpose()
}

fn limit_param(q: &HashMap<String, String>, default: u64, max: u64) -> Result<usize, ApiError> {
    let limit = match q.get("limit") {
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request("limit is not an integer"))?,
        None => default,
    };
    if limit == 0 || limit > max {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {max}"
        )));
    }
    Ok(limit as usize)
}

// ----- handlers ----------------------------------------------------------------------------

pub(crate) fn router(sh: Arc<Shared>) -> Router<Arc<Shared>> {
    Router::new()
        .route("/attachments/{cid}/{aid}/{name}", get(attachment))
        .route("/api/v10/gateway", get(gateway))
        .route("/api/v10/gateway/bot", get(gateway_bot))
        .route("/api/v10/channels/{id}", get(channel))
        .route(
            "/api/v10/channels/{id}/messages",
            get(history).post(create_message),
        )
        .route("/api/v10/channels/{id}/messages/{mid}", get(one_message))
        .route("/api/v10/channels/{id}/thread-members", get(thread_members))
        .route(
            "/api/v10/channels/{id}/thread-members/{uid}",
            get(one_thread_member),
        )
        .route(
            "/api/v10/channels/{id}/threads/archived/public",
            get(archived_public),
        )
        .route(
            "/api/v10/channels/{id}/threads/archived/private",
            get(archived_private),
        )
        .route("/api/v10/guilds/{id}", get(guild))
        .route("/api/v10/guilds/{id}/channels", get(guild_channels))
        .route("/api/v10/guilds/{id}/roles", get(guild_roles))
        .route("/api/v10/guilds/{id}/members", get(guild_members))
        .route("/api/v10/guilds/{id}/members/{uid}", get(guild_member))
        .route("/api/v10/guilds/{id}/threads/active", get(active_threads))
        .route("/api/v10/users/@me", get(crate::oauth::users_me))
        .route(
            "/api/v10/users/@me/guilds",
            get(crate::oauth::users_me_guilds),
        )
        .route(
            "/api/v10/users/@me/guilds/{id}/member",
            get(crate::oauth::users_me_member),
        )
        .route("/api/v10/oauth2/@me", get(crate::oauth::oauth_me))
        .route_layer(axum::middleware::from_fn_with_state(sh, rate_limit))
}

/// A placeholder body so attachment links in the demo resolve.
async fn attachment(Path((_, _, name)): Path<(u64, u64, String)>) -> String {
    format!("simulated attachment {name}\n")
}

async fn gateway(State(sh): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({"url": sh.gateway_url}))
}

async fn gateway_bot(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> ApiResult {
    require_bot(&sh, &headers)?;
    Ok(Json(json!({
        "url": sh.gateway_url,
        "shards": 1,
        "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 14_400_000, "max_concurrency": 1},
    })))
}

async fn channel(
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
async fn history(
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

async fn one_message(
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
struct CreateMessage {
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

async fn create_message(
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

/// The bot's own thread member object for each of `threads` it has joined.
fn own_memberships(w: &World, threads: &[&crate::Channel]) -> Vec<Value> {
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

fn threads_json(w: &World, g: &GuildState, threads: Vec<&crate::Channel>) -> Value {
    let mut threads = threads;
    threads.sort_by_key(|c| std::cmp::Reverse(c.id));
    json!({
        "threads": threads.iter().map(|c| w.channel_json(g.id, c)).collect::<Vec<_>>(),
        "members": own_memberships(w, &threads),
        "has_more": false,
    })
}

/// When a thread's archived flag last changed (its creation if never).
fn archive_time(c: &crate::Channel) -> chrono::DateTime<chrono::Utc> {
    c.thread
        .as_ref()
        .and_then(|t| t.archive_timestamp)
        .unwrap_or_else(|| World::thread_join_time(c))
}

/// Discord's archived-thread listing: newest archive first, `before` an ISO8601 timestamp
/// (exclusive), `limit` 2–100 (default 50), `has_more` when older ones remain. Who may call it
/// (READ_MESSAGE_HISTORY, plus MANAGE_THREADS for private threads) is not checked here.
fn archived(
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

async fn archived_public(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    archived(&sh, &headers, id, false, &raw)
}

async fn archived_private(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    archived(&sh, &headers, id, true, &raw)
}

/// 403 50001 unless the application may use the GUILD_MEMBERS privileged intent (Discord
/// checks the application's setting, not whether the current session asked for it).
fn require_members_intent(sh: &Shared) -> Result<(), ApiError> {
    if sh.config.privileged_intents & crate::world::INTENT_GUILD_MEMBERS == 0 {
        return Err(ApiError::missing_access());
    }
    Ok(())
}

fn bool_param(q: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match q.get(name).map(String::as_str) {
        None | Some("false") | Some("False") | Some("0") => Ok(false),
        Some("true") | Some("True") | Some("1") => Ok(true),
        Some(_) => Err(ApiError::bad_request(format!("{name} is not a boolean"))),
    }
}

/// A thread and its members; 400 50024 for a channel that is not a thread (what Discord answers
/// for thread routes on other channel types).
fn thread_of(w: &World, id: u64) -> Result<(&GuildState, &crate::Channel, &[u64]), ApiError> {
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

fn thread_member_json(
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
async fn thread_members(
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

async fn one_thread_member(
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

async fn active_threads(
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

async fn guild(
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

async fn guild_channels(
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

async fn guild_roles(
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
async fn guild_members(
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

async fn guild_member(
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
