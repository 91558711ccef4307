//! `/_sim/` JSON control API: thin handlers over [`Simulator`]'s Rust methods. Local use only —
//! it has no authentication, like the simulator itself.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{delete, get, patch, post, put};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::http::{ApiError, ApiResult};
use crate::model::{sf, Channel, Overwrite, PostOptions, Role, Scenario, User};
use crate::{GenOptions, Shared, Simulator, TrafficOptions};

fn sim(sh: &Arc<Shared>) -> Simulator {
    // Handlers reuse the public API; the server handle is only needed for shutdown.
    Simulator {
        shared: Arc::clone(sh),
        addr: local_addr(sh),
        server: Default::default(),
    }
}

fn local_addr(sh: &Shared) -> std::net::SocketAddr {
    sh.base_url
        .trim_start_matches("http://")
        .parse()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
}

fn to_json<T: serde::Serialize>(v: &T) -> ApiResult {
    serde_json::to_value(v)
        .map(Json)
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

fn ok() -> ApiResult {
    Ok(Json(json!({"ok": true})))
}

pub(crate) fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/_sim/info", get(info))
        .route("/_sim/scenario", get(get_scenario).post(load_scenario))
        .route("/_sim/scenario/generate", post(generate))
        .route("/_sim/users", post(add_user))
        .route("/_sim/messages", post(post_message))
        .route(
            "/_sim/messages/{id}",
            patch(edit_message).delete(delete_message).get(get_message),
        )
        .route("/_sim/channels/{id}/bulk-delete", post(bulk_delete))
        .route("/_sim/guilds/{gid}/channels", post(create_channel))
        .route(
            "/_sim/channels/{id}",
            put(update_channel).delete(delete_channel),
        )
        .route("/_sim/channels/{id}/threads", post(create_thread))
        .route(
            "/_sim/channels/{id}/thread-members/{uid}",
            put(add_thread_member).delete(remove_thread_member),
        )
        .route("/_sim/channels/{id}/overwrites", put(set_overwrite))
        .route(
            "/_sim/channels/{id}/overwrites/{target}",
            delete(remove_overwrite),
        )
        .route("/_sim/guilds/{gid}/roles", post(create_role))
        .route(
            "/_sim/guilds/{gid}/roles/{rid}",
            patch(set_role_permissions).delete(delete_role),
        )
        .route(
            "/_sim/guilds/{gid}/members/{uid}",
            put(add_member).delete(remove_member),
        )
        .route(
            "/_sim/guilds/{gid}/members/{uid}/roles",
            put(set_member_roles),
        )
        .route(
            "/_sim/guilds/{gid}/members/{uid}/timeout",
            put(timeout_member),
        )
        .route("/_sim/guilds/{gid}/bot", put(add_bot).delete(remove_bot))
        .route("/_sim/faults/drop", post(fault_drop))
        .route("/_sim/faults/reconnect", post(fault_reconnect))
        .route("/_sim/faults/invalidate", post(fault_invalidate))
        .route("/_sim/faults/close", post(fault_close))
        .route("/_sim/faults/heartbeat-acks", post(fault_acks))
        .route("/_sim/faults/malformed", post(fault_malformed))
        .route("/_sim/faults/garbage", post(fault_garbage))
        .route("/_sim/faults/chaos", post(fault_chaos))
        .route("/_sim/faults/rate-limit-burst", post(fault_burst))
        .route("/_sim/faults/rate-limit-shared", post(fault_burst_shared))
        .route("/_sim/faults/partial-updates", post(fault_partial))
        .route("/_sim/rate-stats", get(rate_stats))
        .route("/_sim/rate-stats/reset", post(rate_stats_reset))
        .route("/_sim/ground-truth", get(ground_truth))
        .route("/_sim/support-truth", get(support_truth))
        .route("/_sim/support_truth", get(support_truth))
        .route("/_sim/guilds/{gid}/support-history", post(support_history))
        .route("/_sim/access-truth", get(get_scenario))
        .route("/_sim/traffic/start", post(traffic_start))
        .route("/_sim/traffic/stop", post(traffic_stop))
        .route("/_sim/traffic/steps", post(traffic_steps))
}

async fn info(State(sh): State<Arc<Shared>>) -> ApiResult {
    let (sessions, connected) = sim(&sh).session_counts();
    Ok(Json(json!({
        "base_url": sh.base_url, "gateway_url": sh.gateway_url, "bot_token": sh.config.bot_token,
        "bot_user_id": sh.config.bot_user_id.to_string(), "client_id": sh.config.client_id,
        "sessions": sessions, "connected": connected,
    })))
}

async fn get_scenario(State(sh): State<Arc<Shared>>) -> ApiResult {
    to_json(&sim(&sh).access_truth())
}

async fn load_scenario(State(sh): State<Arc<Shared>>, Json(s): Json<Scenario>) -> ApiResult {
    sim(&sh).load(s);
    ok()
}

#[derive(Deserialize)]
struct GenBody {
    #[serde(default)]
    seed: u64,
    #[serde(flatten)]
    opts: GenOptions,
}

async fn generate(State(sh): State<Arc<Shared>>, Json(b): Json<GenBody>) -> ApiResult {
    let s = Scenario::generate(b.seed, b.opts);
    sim(&sh).load(s.clone());
    to_json(&s)
}

async fn add_user(State(sh): State<Arc<Shared>>, Json(u): Json<User>) -> ApiResult {
    sim(&sh).add_user(u.clone());
    to_json(&u)
}

#[derive(Deserialize)]
struct PostBody {
    #[serde(with = "sf")]
    channel_id: u64,
    #[serde(with = "sf")]
    author_id: u64,
    content: String,
    #[serde(flatten)]
    opts: PostOptions,
}

async fn post_message(State(sh): State<Arc<Shared>>, Json(b): Json<PostBody>) -> ApiResult {
    to_json(&sim(&sh).post_message(b.channel_id, b.author_id, b.content, b.opts)?)
}

async fn get_message(State(sh): State<Arc<Shared>>, Path(id): Path<u64>) -> ApiResult {
    match sim(&sh).message(id) {
        Some(m) => to_json(&m),
        None => Err(crate::SimError::UnknownMessage(id).into()),
    }
}

#[derive(Deserialize)]
struct EditBody {
    content: String,
}

async fn edit_message(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<u64>,
    Json(b): Json<EditBody>,
) -> ApiResult {
    to_json(&sim(&sh).edit_message(id, b.content)?)
}

async fn delete_message(State(sh): State<Arc<Shared>>, Path(id): Path<u64>) -> ApiResult {
    sim(&sh).delete_message(id)?;
    ok()
}

#[derive(Deserialize)]
struct IdsBody {
    #[serde(with = "sf::vec")]
    ids: Vec<u64>,
}

async fn bulk_delete(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<u64>,
    Json(b): Json<IdsBody>,
) -> ApiResult {
    sim(&sh).bulk_delete(id, &b.ids)?;
    ok()
}

async fn create_channel(
    State(sh): State<Arc<Shared>>,
    Path(gid): Path<u64>,
    Json(c): Json<Channel>,
) -> ApiResult {
    to_json(&sim(&sh).create_channel(gid, c)?)
}

async fn update_channel(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<u64>,
    Json(mut c): Json<Channel>,
) -> ApiResult {
    c.id = id;
    to_json(&sim(&sh).update_channel(c)?)
}

async fn delete_channel(State(sh): State<Arc<Shared>>, Path(id): Path<u64>) -> ApiResult {
    sim(&sh).delete_channel(id)?;
    ok()
}

#[derive(Deserialize)]
struct ThreadBody {
    name: String,
    #[serde(with = "sf")]
    owner_id: u64,
    #[serde(default)]
    private: bool,
}

async fn create_thread(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<u64>,
    Json(b): Json<ThreadBody>,
) -> ApiResult {
    to_json(&sim(&sh).create_thread(id, b.name, b.owner_id, b.private)?)
}

async fn add_thread_member(
    State(sh): State<Arc<Shared>>,
    Path((id, uid)): Path<(u64, u64)>,
) -> ApiResult {
    sim(&sh).add_thread_member(id, uid)?;
    ok()
}

async fn remove_thread_member(
    State(sh): State<Arc<Shared>>,
    Path((id, uid)): Path<(u64, u64)>,
) -> ApiResult {
    sim(&sh).remove_thread_member(id, uid)?;
    ok()
}

async fn set_overwrite(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<u64>,
    Json(o): Json<Overwrite>,
) -> ApiResult {
    to_json(&sim(&sh).set_overwrite(id, o)?)
}

async fn remove_overwrite(
    State(sh): State<Arc<Shared>>,
    Path((id, target)): Path<(u64, u64)>,
) -> ApiResult {
    to_json(&sim(&sh).remove_overwrite(id, target)?)
}

async fn create_role(
    State(sh): State<Arc<Shared>>,
    Path(gid): Path<u64>,
    Json(r): Json<Role>,
) -> ApiResult {
    to_json(&sim(&sh).create_role(gid, r)?)
}

#[derive(Deserialize)]
struct PermsBody {
    #[serde(with = "sf")]
    permissions: u64,
}

async fn set_role_permissions(
    State(sh): State<Arc<Shared>>,
    Path((gid, rid)): Path<(u64, u64)>,
    Json(b): Json<PermsBody>,
) -> ApiResult {
    to_json(&sim(&sh).set_role_permissions(gid, rid, b.permissions)?)
}

async fn delete_role(
    State(sh): State<Arc<Shared>>,
    Path((gid, rid)): Path<(u64, u64)>,
) -> ApiResult {
    sim(&sh).delete_role(gid, rid)?;
    ok()
}

#[derive(Deserialize, Default)]
struct RolesBody {
    #[serde(with = "sf::vec", default)]
    roles: Vec<u64>,
}

async fn add_member(
    State(sh): State<Arc<Shared>>,
    Path((gid, uid)): Path<(u64, u64)>,
    body: Option<Json<RolesBody>>,
) -> ApiResult {
    let roles = body.map(|Json(b)| b.roles).unwrap_or_default();
    to_json(&sim(&sh).add_member(gid, uid, roles)?)
}

async fn remove_member(
    State(sh): State<Arc<Shared>>,
    Path((gid, uid)): Path<(u64, u64)>,
) -> ApiResult {
    sim(&sh).remove_member(gid, uid)?;
    ok()
}

async fn set_member_roles(
    State(sh): State<Arc<Shared>>,
    Path((gid, uid)): Path<(u64, u64)>,
    Json(b): Json<RolesBody>,
) -> ApiResult {
    to_json(&sim(&sh).set_member_roles(gid, uid, b.roles)?)
}

#[derive(Deserialize)]
struct TimeoutBody {
    until: Option<DateTime<Utc>>,
}

async fn timeout_member(
    State(sh): State<Arc<Shared>>,
    Path((gid, uid)): Path<(u64, u64)>,
    Json(b): Json<TimeoutBody>,
) -> ApiResult {
    to_json(&sim(&sh).timeout_member(gid, uid, b.until)?)
}

async fn add_bot(State(sh): State<Arc<Shared>>, Path(gid): Path<u64>) -> ApiResult {
    sim(&sh).add_bot_to_guild(gid)?;
    ok()
}

async fn remove_bot(State(sh): State<Arc<Shared>>, Path(gid): Path<u64>) -> ApiResult {
    sim(&sh).remove_bot_from_guild(gid)?;
    ok()
}

async fn fault_drop(State(sh): State<Arc<Shared>>) -> ApiResult {
    sim(&sh).drop_connections();
    ok()
}

async fn fault_reconnect(State(sh): State<Arc<Shared>>) -> ApiResult {
    sim(&sh).send_reconnect();
    ok()
}

#[derive(Deserialize)]
struct InvalidateBody {
    #[serde(default)]
    resumable: bool,
}

async fn fault_invalidate(
    State(sh): State<Arc<Shared>>,
    Json(b): Json<InvalidateBody>,
) -> ApiResult {
    sim(&sh).invalidate_sessions(b.resumable);
    ok()
}

#[derive(Deserialize)]
struct CloseBody {
    code: u16,
}

async fn fault_close(State(sh): State<Arc<Shared>>, Json(b): Json<CloseBody>) -> ApiResult {
    sim(&sh).close_with(b.code);
    ok()
}

#[derive(Deserialize)]
struct EnabledBody {
    enabled: bool,
}

async fn fault_acks(State(sh): State<Arc<Shared>>, Json(b): Json<EnabledBody>) -> ApiResult {
    sim(&sh).stop_heartbeat_acks(!b.enabled);
    ok()
}

async fn fault_malformed(State(sh): State<Arc<Shared>>) -> ApiResult {
    sim(&sh).send_malformed();
    ok()
}

async fn fault_garbage(State(sh): State<Arc<Shared>>) -> ApiResult {
    sim(&sh).send_garbage_frame();
    ok()
}

#[derive(Deserialize)]
struct ChaosBody {
    #[serde(default)]
    dup_max: u32,
    #[serde(default)]
    reorder_window: usize,
}

async fn fault_chaos(State(sh): State<Arc<Shared>>, Json(b): Json<ChaosBody>) -> ApiResult {
    sim(&sh).set_dispatch_chaos(b.dup_max, b.reorder_window);
    ok()
}

#[derive(Deserialize)]
struct BurstBody {
    n: u64,
}

async fn fault_burst(State(sh): State<Arc<Shared>>, Json(b): Json<BurstBody>) -> ApiResult {
    sim(&sh).rate_limit_burst(b.n);
    ok()
}

async fn fault_burst_shared(State(sh): State<Arc<Shared>>, Json(b): Json<BurstBody>) -> ApiResult {
    sim(&sh).rate_limit_burst_shared(b.n);
    ok()
}

async fn rate_stats(State(sh): State<Arc<Shared>>) -> ApiResult {
    to_json(&sim(&sh).rate_stats())
}

async fn rate_stats_reset(State(sh): State<Arc<Shared>>) -> ApiResult {
    sim(&sh).reset_rate_limits();
    ok()
}

async fn fault_partial(State(sh): State<Arc<Shared>>, Json(b): Json<EnabledBody>) -> ApiResult {
    sim(&sh).partial_message_updates(b.enabled);
    ok()
}

async fn ground_truth(State(sh): State<Arc<Shared>>) -> ApiResult {
    to_json(&sim(&sh).ground_truth())
}

#[derive(Deserialize)]
struct TruthQuery {
    /// RFC 3339; the simulator's current time when absent.
    #[serde(default)]
    as_of: Option<DateTime<Utc>>,
}

async fn support_truth(
    State(sh): State<Arc<Shared>>,
    axum::extract::Query(q): axum::extract::Query<TruthQuery>,
) -> ApiResult {
    let s = sim(&sh);
    to_json(&match q.as_of {
        Some(t) => s.support_truth_at(t),
        None => s.support_truth(),
    })
}

#[derive(Deserialize)]
struct HistoryBody {
    days: u32,
    #[serde(default)]
    seed: u64,
}

async fn support_history(
    State(sh): State<Arc<Shared>>,
    Path(gid): Path<u64>,
    Json(b): Json<HistoryBody>,
) -> ApiResult {
    let s = sim(&sh);
    let out = tokio::task::spawn_blocking(move || s.generate_support_history(gid, b.days, b.seed))
        .await
        .map_err(|e| ApiError::bad_request(e.to_string()))??;
    to_json(&out)
}

async fn traffic_start(State(sh): State<Arc<Shared>>, Json(o): Json<TrafficOptions>) -> ApiResult {
    let s = sim(&sh);
    s.stop_traffic();
    let h = s.start_traffic(o);
    *sh.traffic.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
    ok()
}

async fn traffic_stop(State(sh): State<Arc<Shared>>) -> ApiResult {
    let steps = sh
        .traffic
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|h| h.steps());
    sim(&sh).stop_traffic();
    Ok(Json(json!({"ok": true, "steps": steps})))
}

#[derive(Deserialize)]
struct StepsBody {
    #[serde(default)]
    seed: u64,
    steps: u64,
    /// Support traffic only (`Simulator::run_support_steps`).
    #[serde(default)]
    support_only: bool,
}

async fn traffic_steps(
    State(sh): State<Arc<Shared>>,
    Json(b): Json<StepsBody>,
) -> Result<Json<Value>, ApiError> {
    let s = sim(&sh);
    // Step-driven traffic runs synchronously; keep it off the async worker threads.
    tokio::task::spawn_blocking(move || {
        if b.support_only {
            s.run_support_steps(b.seed, b.steps)
        } else {
            s.run_traffic_steps(b.seed, b.steps)
        }
    })
    .await
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    ok()
}
