//! REST under `/api/v10`, behind Discord-style rate limits (see `limits`). The bearer-token
//! routes (`/users/@me`, `/oauth2/@me`) live in `oauth`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::http::{require_bot, ApiResult};
use crate::Shared;

mod access;
mod guilds;
mod limits;
mod messages;
mod threads;

pub(crate) use limits::{rate_limit, RateState};
pub use limits::{RateStats, DEFAULT_GLOBAL_PER_SEC};

pub(crate) fn router(sh: Arc<Shared>) -> Router<Arc<Shared>> {
    Router::new()
        .route("/attachments/{cid}/{aid}/{name}", get(attachment))
        .route("/api/v10/gateway", get(gateway))
        .route("/api/v10/gateway/bot", get(gateway_bot))
        .route("/api/v10/channels/{id}", get(messages::channel))
        .route(
            "/api/v10/channels/{id}/messages",
            get(messages::history).post(messages::create_message),
        )
        .route(
            "/api/v10/channels/{id}/messages/{mid}",
            get(messages::one_message),
        )
        .route(
            "/api/v10/channels/{id}/thread-members",
            get(threads::thread_members),
        )
        .route(
            "/api/v10/channels/{id}/thread-members/{uid}",
            get(threads::one_thread_member),
        )
        .route(
            "/api/v10/channels/{id}/threads/archived/public",
            get(threads::archived_public),
        )
        .route(
            "/api/v10/channels/{id}/threads/archived/private",
            get(threads::archived_private),
        )
        .route("/api/v10/guilds/{id}", get(guilds::guild))
        .route("/api/v10/guilds/{id}/channels", get(guilds::guild_channels))
        .route("/api/v10/guilds/{id}/roles", get(guilds::guild_roles))
        .route("/api/v10/guilds/{id}/members", get(guilds::guild_members))
        .route(
            "/api/v10/guilds/{id}/members/{uid}",
            get(guilds::guild_member),
        )
        .route(
            "/api/v10/guilds/{id}/threads/active",
            get(threads::active_threads),
        )
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
