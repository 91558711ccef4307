//! OAuth2 like Discord's: an authorize page (or `&login_as=<user_id>` for tests), a form-encoded
//! token endpoint (authorization code with PKCE S256, refresh), revoke, and the bearer-token
//! user endpoints with scope checks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::model::perms;
use crate::rest::{query_map, ApiError, ApiResult};
use crate::Shared;

struct CodeGrant {
    user_id: u64,
    scopes: Vec<String>,
    redirect_uri: String,
    challenge: Option<String>,
    expires: Instant,
}

struct Auth {
    user_id: u64,
    scopes: Vec<String>,
    access: String,
    refresh: String,
    expires: Instant,
}

#[derive(Default)]
pub(crate) struct OAuthState {
    codes: HashMap<String, CodeGrant>,
    auths: HashMap<u64, Auth>,
    by_access: HashMap<String, u64>,
    by_refresh: HashMap<String, u64>,
    next_auth: u64,
}

fn random_token(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

pub(crate) fn router(sh: Arc<Shared>) -> Router<Arc<Shared>> {
    // The token endpoints are API routes, rate limited like the rest; the authorize page is the
    // website's.
    let api = Router::new()
        .route("/api/oauth2/token", post(token))
        .route("/api/v10/oauth2/token", post(token))
        .route("/api/oauth2/token/revoke", post(revoke))
        .route("/api/v10/oauth2/token/revoke", post(revoke))
        .route_layer(axum::middleware::from_fn_with_state(
            sh,
            crate::rest::rate_limit,
        ));
    Router::new()
        .route("/oauth2/authorize", get(authorize))
        .route("/api/oauth2/authorize", get(authorize))
        .merge(api)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// Discord answers the authorize step with a 302 to the app.
fn found(url: &url::Url) -> Response {
    (
        StatusCode::FOUND,
        [(axum::http::header::LOCATION, url.as_str().to_string())],
    )
        .into_response()
}

fn bad_authorize(msg: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        format!("invalid OAuth2 request: {msg}"),
    )
        .into_response()
}

async fn authorize(State(sh): State<Arc<Shared>>, RawQuery(raw): RawQuery) -> Response {
    let q = query_map(&raw);
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    if get("client_id") != sh.config.client_id {
        return bad_authorize("unknown client_id");
    }
    let redirect_uri = get("redirect_uri");
    let Ok(mut redirect) = url::Url::parse(redirect_uri) else {
        return bad_authorize("invalid redirect_uri");
    };
    if !sh.config.redirect_uris.is_empty()
        && !sh.config.redirect_uris.iter().any(|u| u == redirect_uri)
    {
        return bad_authorize("redirect_uri is not registered for this application");
    }
    if get("response_type") != "code" {
        return bad_authorize("response_type must be code");
    }
    let challenge = q.get("code_challenge").cloned();
    if challenge.is_some() && get("code_challenge_method") != "S256" {
        return bad_authorize("code_challenge_method must be S256");
    }
    let scopes: Vec<String> = get("scope")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let state = q.get("state").cloned();

    if get("deny") == "1" {
        redirect
            .query_pairs_mut()
            .append_pair("error", "access_denied");
        if let Some(s) = &state {
            redirect.query_pairs_mut().append_pair("state", s);
        }
        return found(&redirect);
    }
    let Some(login_as) = q.get("login_as") else {
        // Interactive page: one link per simulated user, each re-issuing this request with login_as.
        let w = sh.world();
        let base_q = raw.clone().unwrap_or_default();
        let mut items = String::new();
        for u in w.users.values().filter(|u| !u.bot) {
            let href = format!("/oauth2/authorize?{base_q}&login_as={}", u.id);
            let label = u.global_name.as_deref().unwrap_or(&u.username);
            items.push_str(&format!(
                "<li><a href=\"{}\">{}</a> <small>@{} ({})</small></li>\n",
                html_escape(&href),
                html_escape(label),
                html_escape(&u.username),
                u.id
            ));
        }
        return Html(format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>Simulated Discord login</title></head>\
             <body><h1>Log in to the simulated Discord</h1><p>Scopes: {}</p><p>Pick a user:</p><ul>\n{items}</ul>\
             <p><a href=\"{}\">Cancel (deny)</a></p></body></html>",
            html_escape(&scopes.join(" ")),
            html_escape(&format!("/oauth2/authorize?{base_q}&deny=1")),
        ))
        .into_response();
    };
    let Ok(user_id) = login_as.parse::<u64>() else {
        return bad_authorize("login_as is not a user id");
    };
    if !sh.world().users.contains_key(&user_id) {
        return bad_authorize("unknown user");
    }
    let code = random_token(30);
    sh.oauth
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .codes
        .insert(
            code.clone(),
            CodeGrant {
                user_id,
                scopes,
                redirect_uri: redirect_uri.to_string(),
                challenge,
                expires: Instant::now() + Duration::from_secs(600),
            },
        );
    redirect.query_pairs_mut().append_pair("code", &code);
    if let Some(s) = &state {
        redirect.query_pairs_mut().append_pair("state", s);
    }
    found(&redirect)
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

fn form_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// HTTP Basic (`client_id:client_secret`, each form-encoded as RFC 6749 says) or form fields.
fn client_ok(sh: &Shared, headers: &HeaderMap, form: &HashMap<String, String>) -> bool {
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let (id, secret) = match basic {
        Some(pair) => match pair.split_once(':') {
            Some((i, s)) => (form_decode(i), form_decode(s)),
            None => return false,
        },
        None => (
            form.get("client_id").cloned().unwrap_or_default(),
            form.get("client_secret").cloned().unwrap_or_default(),
        ),
    };
    id == sh.config.client_id && secret == sh.config.client_secret
}

fn issue(sh: &Shared, st: &mut OAuthState, user_id: u64, scopes: Vec<String>) -> Value {
    st.next_auth += 1;
    let id = st.next_auth;
    let (access, refresh) = (random_token(30), random_token(30));
    let ttl = sh.config.oauth_token_ttl_secs;
    st.by_access.insert(access.clone(), id);
    st.by_refresh.insert(refresh.clone(), id);
    let scope = scopes.join(" ");
    st.auths.insert(
        id,
        Auth {
            user_id,
            scopes,
            access: access.clone(),
            refresh: refresh.clone(),
            expires: Instant::now() + Duration::from_secs(ttl),
        },
    );
    json!({"access_token": access, "token_type": "Bearer", "expires_in": ttl, "refresh_token": refresh, "scope": scope})
}

fn forget(st: &mut OAuthState, id: u64) -> Option<Auth> {
    let a = st.auths.remove(&id)?;
    st.by_access.remove(&a.access);
    st.by_refresh.remove(&a.refresh);
    Some(a)
}

async fn token(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !client_ok(&sh, &headers, &form) {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    }
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let mut st = sh.oauth.lock().unwrap_or_else(|e| e.into_inner());
    match get("grant_type") {
        "authorization_code" => {
            let Some(grant) = st.codes.remove(get("code")) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Invalid \"code\" in request.",
                );
            };
            if grant.expires < Instant::now() {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "code expired");
            }
            if get("redirect_uri") != grant.redirect_uri {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Invalid \"redirect_uri\" in request.",
                );
            }
            if let Some(challenge) = &grant.challenge {
                let computed =
                    URL_SAFE_NO_PAD.encode(Sha256::digest(get("code_verifier").as_bytes()));
                if !form.contains_key("code_verifier") || &computed != challenge {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "Invalid \"code_verifier\"",
                    );
                }
            }
            Json(issue(&sh, &mut st, grant.user_id, grant.scopes)).into_response()
        }
        "refresh_token" => {
            let Some(id) = st.by_refresh.get(get("refresh_token")).copied() else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Invalid \"refresh_token\" in request.",
                );
            };
            let Some(old) = forget(&mut st, id) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Invalid \"refresh_token\" in request.",
                );
            };
            Json(issue(&sh, &mut st, old.user_id, old.scopes)).into_response()
        }
        other => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            &format!("unsupported grant_type {other:?}"),
        ),
    }
}

async fn revoke(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !client_ok(&sh, &headers, &form) {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    }
    let token = form.get("token").cloned().unwrap_or_default();
    let mut st = sh.oauth.lock().unwrap_or_else(|e| e.into_inner());
    // Revoking either token revokes the whole authorization.
    let id = st
        .by_access
        .get(&token)
        .or_else(|| st.by_refresh.get(&token))
        .copied();
    if let Some(id) = id {
        forget(&mut st, id);
    }
    Json(json!({})).into_response()
}

/// (user id, scopes) for a valid bearer token carrying `scope`.
fn bearer(sh: &Shared, headers: &HeaderMap, scope: &str) -> Result<(u64, Vec<String>), ApiError> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(ApiError::unauthorized)?;
    let st = sh.oauth.lock().unwrap_or_else(|e| e.into_inner());
    let auth = st
        .by_access
        .get(token)
        .and_then(|id| st.auths.get(id))
        .ok_or_else(ApiError::unauthorized)?;
    if auth.expires < Instant::now() {
        return Err(ApiError::unauthorized());
    }
    if !scope.is_empty() && !auth.scopes.iter().any(|s| s == scope) {
        return Err(ApiError::missing_access());
    }
    Ok((auth.user_id, auth.scopes.clone()))
}

pub(crate) async fn users_me(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> ApiResult {
    if crate::rest::require_bot(&sh, &headers).is_ok() {
        let w = sh.world();
        return Ok(Json(crate::payload::user(&w.bot)));
    }
    let (uid, scopes) = bearer(&sh, &headers, "identify")?;
    let w = sh.world();
    let u = w.users.get(&uid).ok_or(crate::SimError::UnknownUser(uid))?;
    let mut v = crate::payload::user(u);
    if let Some(o) = v.as_object_mut() {
        o.insert("mfa_enabled".into(), json!(false));
        o.insert("locale".into(), json!("en-US"));
        o.insert("flags".into(), json!(0));
        o.insert("premium_type".into(), json!(0));
        if scopes.iter().any(|s| s == "email") {
            o.insert(
                "email".into(),
                json!(format!("{}@users.sim.invalid", u.username)),
            );
            o.insert("verified".into(), json!(true));
        }
    }
    Ok(Json(v))
}

/// The user's guilds (whether or not the bot is in them), with guild-level permissions.
pub(crate) async fn users_me_guilds(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
) -> ApiResult {
    let (uid, _) = bearer(&sh, &headers, "guilds")?;
    let w = sh.world();
    let guilds: Vec<Value> = w
        .guilds
        .values()
        .filter(|g| g.members.contains_key(&uid))
        .map(|g| {
            let p = g.base_permissions(uid);
            json!({"id": g.id.to_string(), "name": g.name, "icon": null, "banner": null,
                   "owner": g.owner_id == uid, "permissions": (p & perms::ALL).to_string(), "features": []})
        })
        .collect();
    Ok(Json(Value::Array(guilds)))
}

pub(crate) async fn users_me_member(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult {
    let (uid, _) = bearer(&sh, &headers, "guilds.members.read")?;
    let w = sh.world();
    let g = w.guild(id)?;
    let m = g.members.get(&uid).ok_or(crate::SimError::NotAMember {
        guild_id: id,
        user_id: uid,
    })?;
    Ok(Json(w.member_json(g, m)))
}

pub(crate) async fn oauth_me(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> ApiResult {
    let (uid, scopes) = bearer(&sh, &headers, "")?;
    let w = sh.world();
    let mut v = json!({
        "application": {"id": sh.config.client_id, "name": "Support Observer (simulated)"},
        "scopes": scopes,
        "expires": crate::payload::ts(&(chrono::Utc::now() + chrono::Duration::seconds(sh.config.oauth_token_ttl_secs as i64))),
    });
    if scopes.iter().any(|s| s == "identify") {
        if let (Some(o), Some(u)) = (v.as_object_mut(), w.users.get(&uid)) {
            o.insert("user".into(), crate::payload::user(u));
        }
    }
    Ok(Json(v))
}
