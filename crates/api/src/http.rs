//! HTTP entry points of GraphQL: `POST /graphql`, and `GET /graphql` (the
//! WebSocket upgrade, or the query page for a browser), and the tower-http
//! layers around every route ([`outer_layers`], [`bounded`]).
//!
//! Order of checks on POST: the body cap and request timeout (tower-http,
//! answered in the GraphQL error shape by [`graphql_route`]), content type (a
//! JSON-only endpoint cannot be hit by a cross-site form), the per-address
//! rate limit (before any credential is looked up, so bad tokens count too),
//! who is asking (bearer token, else session cookie), the per-viewer rate
//! limit, then execution in one `observer_api` transaction that is committed
//! after the response is built (a timed-out request drops it: rolled back).
//! WebSockets: the per-address limit at the upgrade and at `connection_init`;
//! frames and messages capped at the body size; the connection keeps its
//! credential so subscriptions end on logout/revocation.

use std::net::SocketAddr;
use std::str::FromStr as _;
use std::time::Duration;

use async_graphql::http::{WebSocketProtocols, ALL_WEBSOCKET_PROTOCOLS};
use async_graphql::Data;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State, WebSocketUpgrade};
use axum::http::header::{
    AUTHORIZATION, CONTENT_TYPE, ORIGIN, REFERRER_POLICY, SEC_WEBSOCKET_PROTOCOL, UPGRADE,
    X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use axum::Router;
use observer_db::Db;
use tower::ServiceBuilder;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::Instrument as _;

use crate::config::Limits;
use crate::error::{ensure_codes, error_response, Code};
use crate::graphql::{RequestDb, Viewer};
use crate::live::conn::{Connection, ConnectionLimits, Credential};
use crate::login::AuthSession;
use crate::ratelimit::RateKey;
use crate::state::AppState;
use crate::tokens;

/// The request id header: kept from the client or a proxy when present,
/// else a fresh UUID; echoed in the response and in every log line.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Layers around every route, outermost first: the request id, a tracing span
/// per request carrying it (so every log line of the request, the WebSocket
/// connection's included, names it), the id echoed in the response, and the
/// security headers every answer gets (pages add their own CSP).
pub fn outer_layers(router: Router) -> Router {
    router.layer(
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
            .layer(TraceLayer::new_for_http().make_span_with(request_span))
            .layer(PropagateRequestIdLayer::new(REQUEST_ID))
            .layer(SetResponseHeaderLayer::if_not_present(
                X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ))
            .layer(SetResponseHeaderLayer::if_not_present(
                REFERRER_POLICY,
                HeaderValue::from_static("same-origin"),
            )),
    )
}

/// The span of one request. The path only, never the query: the OAuth
/// callback's carries the authorization code and state.
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    )
}

/// Body cap and request timeout for `router`'s routes (plain-text answers:
/// 413, 408). `/graphql` gets the same bounds from [`graphql_route`].
pub fn bounded<S: Clone + Send + Sync + 'static>(router: Router<S>, limits: &Limits) -> Router<S> {
    router.layer(
        ServiceBuilder::new()
            .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                limits.request_timeout,
            )),
    )
}

/// `/graphql`: POST and GET under the body cap and request timeout, whose
/// plain-text answers are turned into GraphQL errors (`BAD_REQUEST` 413,
/// `INTERNAL` "request timed out") so clients parse one shape.
pub fn graphql_route(state: &AppState) -> MethodRouter<AppState> {
    let limits = &state.config.limits;
    post(graphql_post).get(graphql_get).layer(
        ServiceBuilder::new()
            .layer(axum::middleware::map_response_with_state(
                state.clone(),
                graphql_shaped,
            ))
            .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                limits.request_timeout,
            )),
    )
}

/// Rewrites the body-limit and timeout layers' answers (the only non-JSON
/// 413 and 408 on this route) as GraphQL errors.
async fn graphql_shaped<B>(State(state): State<AppState>, resp: axum::http::Response<B>) -> Response
where
    axum::http::Response<B>: IntoResponse,
{
    let json = resp
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json {
        return resp.into_response();
    }
    match resp.status() {
        StatusCode::PAYLOAD_TOO_LARGE => reject(
            &state,
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::BadRequest,
            "request body too large",
        ),
        StatusCode::REQUEST_TIMEOUT => {
            // Dropping the handler dropped its transaction: rolled back.
            tracing::warn!("GraphQL request timed out");
            reject(&state, StatusCode::OK, Code::Internal, "request timed out")
        }
        _ => resp.into_response(),
    }
}

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
    if !is_json(req.headers()) {
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
    // The body is already capped by RequestBodyLimitLayer (see graphql_route);
    // this is where a chunked body over the cap fails.
    let body = match axum::body::to_bytes(req.into_body(), usize::MAX).await {
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
    let mut resp = state.schema.execute(request).await;
    if let Err(e) = rdb.finish().await {
        crate::error::internal(&e);
        resp = error_response(Code::Internal, "internal error");
    }
    ensure_codes(&mut resp);
    count_error_codes(&state, &resp);
    gql_json(StatusCode::OK, &resp)
}

/// Whether the media type is `application/json` (parameters such as
/// `charset` allowed).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        })
}

/// Counts each error of an executed request by its `extensions.code`.
fn count_error_codes(state: &AppState, resp: &async_graphql::Response) {
    for e in &resp.errors {
        let code = e.extensions.as_ref().and_then(|x| x.get("code"));
        if let Some(async_graphql::Value::String(code)) = code {
            state.metrics.graphql_error(code);
        }
    }
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
    let upgrade_viewer = match upgrade_credential(&state, &parts.headers, &auth).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let limits = &state.config.limits;
    let max_size = limits.max_body_bytes;
    let keepalive = limits.ws_keepalive.max(Duration::from_secs(1));
    let init_timeout = limits.ws_init_timeout;
    let schema = state.schema.clone();
    // The connection outlives the request's future: keep its span (and request id).
    let span = tracing::Span::current();
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .max_message_size(max_size)
        .max_frame_size(max_size)
        // Small: see WS_READ_BUFFER. Also most of an idle connection's memory.
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .on_upgrade(move |socket| {
            crate::live::ws::serve(
                socket,
                schema,
                protocol,
                move |payload| connection_init(state, address, upgrade_viewer, payload),
                keepalive,
                init_timeout,
            )
            .instrument(span)
        })
}

/// Who the upgrade request itself authenticates, if anyone: a bearer header
/// (scripts; browsers cannot set one and use `connection_init` or the cookie),
/// else the session cookie, which counts only from our own origin (a cookie
/// rides along on cross-site WebSocket handshakes: no CORS for WebSockets).
/// A bad bearer header is refused (401), never a fallback to the cookie.
async fn upgrade_credential(
    state: &AppState,
    headers: &HeaderMap,
    auth: &AuthSession,
) -> Result<Option<(Viewer, Credential)>, Response> {
    if headers.contains_key(AUTHORIZATION) {
        return match who(state, headers, auth).await? {
            Who::Viewer(v) => {
                let hash = headers
                    .get(AUTHORIZATION)
                    .and_then(|h| h.to_str().ok())
                    .and_then(tokens::bearer_secret)
                    .map(tokens::hash_secret)
                    .unwrap_or_default();
                Ok(Some((v, Credential::Token(hash))))
            }
            Who::Anonymous | Who::BadToken => Err(reject(
                state,
                StatusCode::UNAUTHORIZED,
                Code::Unauthenticated,
                "invalid or revoked API token",
            )),
        };
    }
    let origin_ok = headers
        .get(ORIGIN)
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| o.trim_end_matches('/') == public_origin(&state.config.public_url));
    Ok(match (&auth.user, origin_ok, auth.session.id()) {
        (Some(u), true, Some(id)) => Some((Viewer { user_id: u.user_id }, Credential::Session(id))),
        _ => None,
    })
}

/// `connection_init`: the per-address rate limit again, then the credential
/// (an `authorization` in the payload wins over the upgrade's), and the data
/// every operation on the connection sees.
async fn connection_init(
    state: AppState,
    address: RateKey,
    upgrade_viewer: Option<(Viewer, Credential)>,
    payload: serde_json::Value,
) -> async_graphql::Result<Data> {
    if !state.address_limiter.check(address) {
        return Err(crate::error::gql_error(
            Code::RateLimited,
            "rate limit exceeded; slow down",
        ));
    }
    let authed = match payload.get("authorization").and_then(|v| v.as_str()) {
        Some(value) => {
            let secret = tokens::bearer_secret(value)
                .ok_or_else(|| async_graphql::Error::new("invalid authorization"))?;
            match viewer_from_bearer(&state.db, secret).await {
                Ok(Some(v)) => Some((v, Credential::Token(tokens::hash_secret(secret)))),
                Ok(None) => return Err(async_graphql::Error::new("invalid or revoked API token")),
                Err(e) => return Err(crate::error::internal(&e)),
            }
        }
        None => upgrade_viewer,
    };
    let (viewer, credential) = match authed {
        Some((v, c)) => (Some(v), Some(c)),
        None => (None, None),
    };
    let limits = &state.config.limits;
    let conn_limits = ConnectionLimits {
        recheck: limits.auth_recheck,
        max_per_connection: limits.max_subscriptions_per_connection,
        slots: state.subscription_slots.clone(),
        limiter: state.rate_limiter.clone(),
        rechecker: state.credentials.clone(),
    };
    let mut data = Data::default();
    data.insert(std::sync::Arc::new(Connection::new(
        viewer,
        credential,
        state.db.clone(),
        conn_limits,
    )));
    data.insert(state.db.clone());
    data.insert(state.live.clone());
    Ok(data)
}

/// `scheme://host[:port]` of a URL, as browsers send it in `Origin`.
pub fn public_origin(public_url: &str) -> String {
    match url::Url::parse(public_url) {
        Ok(u) => u.origin().ascii_serialization(),
        Err(_) => public_url.trim_end_matches('/').to_owned(),
    }
}
