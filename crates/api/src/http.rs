//! HTTP entry points of GraphQL: `POST /graphql`, and `GET /graphql` (the
//! WebSocket upgrade, or the query page for a browser).
//!
//! Order of checks on POST: content type (a JSON-only endpoint cannot be hit
//! by a cross-site form), the per-address rate limit (before any credential
//! is looked up, so bad tokens count too), who is asking (bearer token, else
//! session cookie), the per-viewer rate limit, the body cap, then execution
//! in one `observer_api` transaction that is committed after the response is
//! built. WebSockets: the per-address limit at the upgrade and at
//! `connection_init`; frames and messages capped at the body size; the
//! connection keeps its credential so subscriptions end on logout/revocation.

use std::net::SocketAddr;
use std::str::FromStr as _;
use std::time::Duration;

use async_graphql::http::{WebSocketProtocols, ALL_WEBSOCKET_PROTOCOLS};
use async_graphql::Data;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State, WebSocketUpgrade};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, ORIGIN, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use observer_db::Db;

use crate::error::{ensure_codes, error_response, Code};
use crate::graphql::{RequestDb, Viewer};
use crate::live::conn::{Connection, ConnectionLimits, Credential};
use crate::login::AuthSession;
use crate::ratelimit::RateKey;
use crate::state::AppState;
use crate::tokens;

fn gql_json(status: StatusCode, resp: &async_graphql::Response) -> Response {
    match serde_json::to_vec(resp) {
        Ok(body) => (status, [(CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "could not serialise GraphQL response");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

fn reject(state: &AppState, status: StatusCode, code: Code, message: &str) -> Response {
    state.metrics.graphql_error(code.as_str());
    gql_json(status, &error_response(code, message))
}

/// Resolves a bearer secret to the viewer it acts for.
pub async fn viewer_from_bearer(
    db: &Db,
    secret: &str,
) -> Result<Option<Viewer>, observer_db::Error> {
    let hash = tokens::hash_secret(secret);
    let mut tx = db.auth().await?;
    let owner = observer_db::auth::api_token_owner(&mut tx, &hash).await?;
    tx.commit().await?;
    Ok(owner.map(|o| Viewer { user_id: o.user_id }))
}

enum Who {
    Viewer(Viewer),
    Anonymous,
    BadToken,
}

async fn who(state: &AppState, headers: &HeaderMap, auth: &AuthSession) -> Result<Who, Response> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        // An Authorization header is never silently ignored: a wrong one
        // fails, rather than falling back to whatever cookie rode along.
        let Some(secret) = value.to_str().ok().and_then(tokens::bearer_secret) else {
            return Ok(Who::BadToken);
        };
        return match viewer_from_bearer(&state.db, secret).await {
            Ok(Some(v)) => Ok(Who::Viewer(v)),
            Ok(None) => Ok(Who::BadToken),
            Err(e) => {
                crate::error::internal(&e);
                Err(reject(
                    state,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::Internal,
                    "internal error",
                ))
            }
        };
    }
    Ok(match &auth.user {
        Some(u) => Who::Viewer(Viewer { user_id: u.user_id }),
        None => Who::Anonymous,
    })
}

pub async fn graphql_post(
    State(state): State<AppState>,
    auth: AuthSession,
    req: Request,
) -> Response {
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    if !is_json {
        return reject(
            &state,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::BadRequest,
            "content-type must be application/json",
        );
    }
    let address = client_address(&req, state.config.trusted_proxy_hops);
    if !state.address_limiter.check(address.clone()) {
        return rate_limited(&state);
    }
    let viewer = match who(&state, req.headers(), &auth).await {
        Ok(Who::Viewer(v)) => Some(v),
        Ok(Who::Anonymous) => None,
        Ok(Who::BadToken) => {
            return reject(
                &state,
                StatusCode::UNAUTHORIZED,
                Code::Unauthenticated,
                "invalid or revoked API token",
            )
        }
        Err(resp) => return resp,
    };
    let key = match viewer {
        Some(v) => RateKey::Viewer(v.user_id),
        None => address,
    };
    if !state.rate_limiter.check(key) {
        return rate_limited(&state);
    }
    let limit = state.config.limits.max_body_bytes;
    let body = match axum::body::to_bytes(req.into_body(), limit).await {
        Ok(b) => b,
        Err(_) => {
            return reject(
                &state,
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::BadRequest,
                "request body too large",
            )
        }
    };
    let request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(_) => {
            return reject(
                &state,
                StatusCode::BAD_REQUEST,
                Code::BadRequest,
                "body must be a GraphQL request object",
            )
        }
    };
    let rdb = std::sync::Arc::new(RequestDb::new(state.db.clone(), viewer));
    let request = request.data(rdb.clone());
    let timeout = state.config.limits.request_timeout;
    let mut resp = match tokio::time::timeout(timeout, state.schema.execute(request)).await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::warn!(?viewer, "GraphQL request timed out");
            rdb.mark_rollback();
            error_response(Code::Internal, "request timed out")
        }
    };
    if let Err(e) = rdb.finish().await {
        crate::error::internal(&e);
        resp = error_response(Code::Internal, "internal error");
    }
    ensure_codes(&mut resp);
    for e in &resp.errors {
        if let Some(code) =
            e.extensions
                .as_ref()
                .and_then(|x| x.get("code"))
                .and_then(|c| match c {
                    async_graphql::Value::String(s) => Some(s.clone()),
                    _ => None,
                })
        {
            state.metrics.graphql_error(&code);
        }
    }
    gql_json(StatusCode::OK, &resp)
}

fn rate_limited(state: &AppState) -> Response {
    reject(
        state,
        StatusCode::TOO_MANY_REQUESTS,
        Code::RateLimited,
        "rate limit exceeded; slow down",
    )
}

/// The rate-limit key of the client: the TCP peer, or behind
/// `trusted_hops` proxies the address the outermost of them saw (no address:
/// one shared bucket).
fn client_address(req: &Request, trusted_hops: usize) -> RateKey {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let forwarded = (trusted_hops > 0)
        .then(|| forwarded_client(req.headers(), trusted_hops))
        .flatten();
    forwarded
        .or(peer)
        .map(RateKey::Address)
        .unwrap_or(RateKey::Anonymous)
}

/// The `X-Forwarded-For` entry `trusted_hops` places from the right (each
/// proxy appends the address it received from; only our own proxies'
/// entries are trusted). None when the header is absent or unparsable.
fn forwarded_client(headers: &HeaderMap, trusted_hops: usize) -> Option<std::net::IpAddr> {
    let mut entries: Vec<std::net::IpAddr> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        for part in value.to_str().ok()?.split(',') {
            entries.push(part.trim().parse().ok()?);
        }
    }
    let i = entries.len().saturating_sub(trusted_hops);
    entries.get(i).copied()
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// WebSocket read chunk (tungstenite's default is 128 KiB). tungstenite
/// zero-fills this much before every read attempt, and the connection loop
/// polls the socket each time it wakes to send: at 4 KiB that memset was
/// 2.6 % of the server's CPU under fan-out load. Clients send little; longer
/// messages take several reads.
const WS_READ_BUFFER: usize = 512;
/// Frames queued before tungstenite writes them out (we flush per batch anyway).
const WS_WRITE_BUFFER: usize = 16 * 1024;

/// `GET /graphql`: WebSocket subscriptions, or the query page for a browser.
pub async fn graphql_get(
    State(state): State<AppState>,
    auth: AuthSession,
    req: Request,
) -> Response {
    if !is_websocket_upgrade(req.headers()) {
        return crate::pages::graphiql().await;
    }
    let address = client_address(&req, state.config.trusted_proxy_hops);
    if !state.address_limiter.check(address.clone()) {
        return rate_limited(&state);
    }
    let session_id = auth.session.id();
    let (mut parts, _body) = req.into_parts();
    // The first protocol offered that we speak (as async-graphql-axum picks it).
    let protocol = parts
        .headers
        .get(SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|offered| {
            offered
                .split(',')
                .find_map(|p| WebSocketProtocols::from_str(p.trim()).ok())
        });
    let Some(protocol) = protocol else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &state).await {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    // A cookie rides along on cross-site WebSocket handshakes (no CORS for
    // WebSockets), so the cookie counts only from our own origin.
    let origin_ok = parts
        .headers
        .get(ORIGIN)
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| o.trim_end_matches('/') == public_origin(&state.config.public_url));
    let cookie_viewer = match (&auth.user, origin_ok, session_id) {
        (Some(u), true, Some(id)) => Some((Viewer { user_id: u.user_id }, Credential::Session(id))),
        _ => None,
    };
    // Scripts may also authenticate the upgrade itself with a bearer header
    // (browsers cannot set one; they use connection_init or the cookie).
    let upgrade_viewer = if parts.headers.contains_key(AUTHORIZATION) {
        match who(&state, &parts.headers, &auth).await {
            Ok(Who::Viewer(v)) => {
                let hash = parts
                    .headers
                    .get(AUTHORIZATION)
                    .and_then(|h| h.to_str().ok())
                    .and_then(tokens::bearer_secret)
                    .map(tokens::hash_secret)
                    .unwrap_or_default();
                Some((v, Credential::Token(hash)))
            }
            Ok(_) => {
                return reject(
                    &state,
                    StatusCode::UNAUTHORIZED,
                    Code::Unauthenticated,
                    "invalid or revoked API token",
                )
            }
            Err(resp) => return resp,
        }
    } else {
        cookie_viewer
    };
    let schema = state.schema.clone();
    let db = state.db.clone();
    let hub = state.live.clone();
    let address_limiter = state.address_limiter.clone();
    let limits = &state.config.limits;
    let conn_limits = ConnectionLimits {
        recheck: limits.auth_recheck,
        max_per_connection: limits.max_subscriptions_per_connection,
        slots: state.subscription_slots.clone(),
        limiter: state.rate_limiter.clone(),
        rechecker: state.credentials.clone(),
    };
    let max_size = limits.max_body_bytes;
    let keepalive = limits.ws_keepalive.max(Duration::from_secs(1));
    let init_timeout = limits.ws_init_timeout;
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .max_message_size(max_size)
        .max_frame_size(max_size)
        // Small: see WS_READ_BUFFER. Also most of an idle connection's memory.
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            crate::live::ws::serve(
                socket,
                schema,
                protocol,
                move |payload| async move {
                    if !address_limiter.check(address) {
                        return Err(crate::error::gql_error(
                            Code::RateLimited,
                            "rate limit exceeded; slow down",
                        ));
                    }
                    let mut data = Data::default();
                    let authed = match payload.get("authorization").and_then(|v| v.as_str()) {
                        Some(value) => {
                            let secret = tokens::bearer_secret(value).ok_or_else(|| {
                                async_graphql::Error::new("invalid authorization")
                            })?;
                            match viewer_from_bearer(&db, secret).await {
                                Ok(Some(v)) => {
                                    Some((v, Credential::Token(tokens::hash_secret(secret))))
                                }
                                Ok(None) => {
                                    return Err(async_graphql::Error::new(
                                        "invalid or revoked API token",
                                    ))
                                }
                                Err(e) => return Err(crate::error::internal(&e)),
                            }
                        }
                        None => upgrade_viewer,
                    };
                    let (viewer, credential) = match authed {
                        Some((v, c)) => (Some(v), Some(c)),
                        None => (None, None),
                    };
                    data.insert(std::sync::Arc::new(Connection::new(
                        viewer,
                        credential,
                        db.clone(),
                        conn_limits,
                    )));
                    data.insert(db.clone());
                    data.insert(hub.clone());
                    Ok(data)
                },
                keepalive,
                init_timeout,
            )
            .await
        })
}

/// `scheme://host[:port]` of a URL, as browsers send it in `Origin`.
pub fn public_origin(public_url: &str) -> String {
    match url::Url::parse(public_url) {
        Ok(u) => u.origin().ascii_serialization(),
        Err(_) => public_url.trim_end_matches('/').to_owned(),
    }
}
