//! Discord OAuth login (axum-login + tower-sessions on PostgreSQL).
//!
//! `GET /auth/login?next=` stores CSRF state, the PKCE verifier and `next` in
//! the (pre-login) session and redirects to Discord. `GET /auth/callback`
//! removes all three, checks the state, exchanges the code with the verifier,
//! stores the user, their OAuth tokens and their memberships in the bot's
//! guilds, rotates the session id and logs in. `POST /auth/logout` deletes the
//! server-side session.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum_login::{AuthUser, AuthnBackend, UserId};
use observer_db::auth::{self as dbauth, OAuthTokenRow};
use observer_db::Db;
use serde::Deserialize;

use crate::discord::{Discord, DiscordError, TokenSet};
use crate::state::AppState;

const STATE_KEY: &str = "oauth.state";
const VERIFIER_KEY: &str = "oauth.pkce_verifier";
const NEXT_KEY: &str = "oauth.next";
/// Lifetime of a session that holds only a login in progress.
const PENDING_LOGIN_MINUTES: i64 = 10;

/// The logged-in user as the session knows them.
#[derive(Clone, Debug)]
pub struct SessionUser {
    pub user_id: i64,
    auth_hash: Vec<u8>,
}

impl AuthUser for SessionUser {
    type Id = i64;

    fn id(&self) -> i64 {
        self.user_id
    }

    // Sessions are invalidated by deleting them server-side (logout), not by
    // rotating a per-user secret, so the hash only has to be stable.
    fn session_auth_hash(&self) -> &[u8] {
        &self.auth_hash
    }
}

impl SessionUser {
    fn new(user_id: i64) -> Self {
        Self {
            user_id,
            auth_hash: user_id.to_be_bytes().to_vec(),
        }
    }
}

/// What the callback hands the backend.
pub struct Credentials {
    pub code: String,
    pub pkce_verifier: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Db(#[from] observer_db::Error),
    #[error(transparent)]
    Discord(#[from] DiscordError),
}

#[derive(Clone, Debug)]
pub struct Backend {
    pub db: Db,
    pub discord: Arc<Discord>,
}

pub type AuthSession = axum_login::AuthSession<Backend>;

impl AuthnBackend for Backend {
    type User = SessionUser;
    type Credentials = Credentials;
    type Error = BackendError;

    async fn authenticate(&self, creds: Credentials) -> Result<Option<SessionUser>, BackendError> {
        let tokens = match self
            .discord
            .exchange_code(creds.code, creds.pkce_verifier)
            .await
        {
            Ok(t) => t,
            // Wrong code or PKCE verifier: a failed login, not a server error.
            Err(DiscordError::GrantRejected(reason)) => {
                tracing::info!(%reason, "oauth code exchange rejected");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let user = self.discord.current_user(&tokens.access_token).await?;
        let user_id = user.user_id;
        let mut tx = self.db.auth().await?;
        dbauth::upsert_user(&mut tx, &user).await?;
        dbauth::store_oauth_token(&mut tx, &token_row(user_id, &tokens)).await?;
        tx.commit().await?;
        sync_memberships(&self.db, &self.discord, user_id, &tokens.access_token).await?;
        Ok(Some(SessionUser::new(user_id)))
    }

    async fn get_user(&self, user_id: &UserId<Self>) -> Result<Option<SessionUser>, BackendError> {
        let mut tx = self.db.auth().await?;
        let user = dbauth::user(&mut tx, *user_id).await?;
        tx.commit().await?;
        Ok(user.map(|u| SessionUser::new(u.user_id)))
    }
}

pub(crate) fn token_row(user_id: i64, t: &TokenSet) -> OAuthTokenRow {
    OAuthTokenRow {
        user_id,
        access_token: t.access_token.clone(),
        refresh_token: t.refresh_token.clone(),
        expires_at: t.expires_at,
        scope: t.scope.clone(),
    }
}

/// Re-reads the user's memberships in every guild the bot is in and stores
/// them, so the access rule sees the user's current roles.
pub(crate) async fn sync_memberships(
    db: &Db,
    discord: &Discord,
    user_id: i64,
    access_token: &str,
) -> Result<(), BackendError> {
    let bot_guilds = {
        let mut tx = db.auth().await?;
        let ids = dbauth::bot_guild_ids(&mut tx).await?;
        tx.commit().await?;
        ids
    };
    // Taken before the fetch: anything the worker observes after this moment
    // is newer than the snapshot and must win over it.
    let observed_at = chrono::Utc::now();
    let memberships = discord.memberships(access_token, &bot_guilds).await?;
    let mut tx = db.auth().await?;
    dbauth::replace_memberships(&mut tx, user_id, &bot_guilds, &memberships, observed_at).await?;
    tx.commit().await?;
    Ok(())
}

/// `next` is honoured only as a same-origin path: it must start with one `/`
/// and contain no backslash, scheme or control character, so `//evil.com`,
/// `/\evil.com` and `https://evil.com` are all refused.
pub fn safe_next(next: &str) -> bool {
    next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains('\\')
        && !next.chars().any(char::is_control)
        && next.len() <= 2048
        && !next.contains("://")
}

#[derive(Debug, Deserialize)]
pub struct LoginParams {
    next: Option<String>,
}

pub async fn login(
    State(state): State<AppState>,
    session: AuthSession,
    Query(params): Query<LoginParams>,
) -> Response {
    let next = params.next.unwrap_or_else(|| "/".to_owned());
    if !safe_next(&next) {
        return (
            StatusCode::BAD_REQUEST,
            "`next` must be a path on this site",
        )
            .into_response();
    }
    let (url, csrf, verifier) = state.discord.authorize_url();
    let s = &session.session;
    // A login in progress is worth keeping for minutes, not for the week a
    // logged-in session lives: abandoned attempts expire quickly.
    s.set_expiry(Some(tower_sessions::Expiry::OnInactivity(
        tower_sessions::cookie::time::Duration::minutes(PENDING_LOGIN_MINUTES),
    )));
    let stored = async {
        s.insert(STATE_KEY, csrf.secret()).await?;
        s.insert(VERIFIER_KEY, verifier.secret()).await?;
        s.insert(NEXT_KEY, &next).await
    }
    .await;
    if let Err(e) = stored {
        tracing::error!(error = %e, "could not store oauth state in session");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    Redirect::to(url.as_str()).into_response()
}

#[derive(Debug, Deserialize)]
pub struct CallbackParams {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

pub async fn callback(
    State(state): State<AppState>,
    auth: AuthSession,
    Query(params): Query<CallbackParams>,
) -> Response {
    let (outcome, resp) = callback_inner(auth, params, state.config.session_ttl).await;
    state
        .metrics
        .logins
        .get_or_create(&crate::metrics::CodeLabels {
            code: outcome.to_owned(),
        })
        .inc();
    resp
}

async fn callback_inner(
    mut auth: AuthSession,
    params: CallbackParams,
    session_ttl: std::time::Duration,
) -> (&'static str, Response) {
    // Take all three out first: a state is good for exactly one attempt.
    let taken = async {
        let state: Option<String> = auth.session.remove(STATE_KEY).await?;
        let verifier: Option<String> = auth.session.remove(VERIFIER_KEY).await?;
        let next: Option<String> = auth.session.remove(NEXT_KEY).await?;
        Ok::<_, tower_sessions::session::Error>((state, verifier, next))
    }
    .await;
    let (stored_state, verifier, next) = match taken {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "session store failed in oauth callback");
            return ("error", StatusCode::INTERNAL_SERVER_ERROR.into_response());
        }
    };
    let fail = |auth: AuthSession, status: StatusCode, msg: &'static str| async move {
        // No half-made session survives a failed callback.
        if let Err(e) = auth.session.flush().await {
            tracing::warn!(error = %e, "could not flush session after failed login");
        }
        (status, msg).into_response()
    };
    if let Some(err) = params.error {
        tracing::info!(error = %err, "oauth authorization denied");
        return (
            "denied",
            fail(auth, StatusCode::BAD_REQUEST, "authorization was denied").await,
        );
    }
    let (Some(code), Some(state), Some(stored_state), Some(verifier)) =
        (params.code, params.state, stored_state, verifier)
    else {
        let resp = fail(auth, StatusCode::BAD_REQUEST, "login expired or invalid").await;
        return ("bad_state", resp);
    };
    if !constant_time_eq(state.as_bytes(), stored_state.as_bytes()) {
        return (
            "bad_state",
            fail(auth, StatusCode::BAD_REQUEST, "invalid oauth state").await,
        );
    }
    let user = match auth
        .authenticate(Credentials {
            code,
            pkce_verifier: verifier,
        })
        .await
    {
        Ok(Some(u)) => u,
        Ok(None) => {
            let resp = fail(auth, StatusCode::UNAUTHORIZED, "login rejected by discord").await;
            return ("rejected", resp);
        }
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "oauth login failed");
            return (
                "error",
                fail(auth, StatusCode::BAD_GATEWAY, "login failed; try again").await,
            );
        }
    };
    // Always a fresh id at login (axum-login only cycles when the session
    // was not yet authenticated; re-login must rotate too).
    if let Err(e) = auth.session.cycle_id().await {
        tracing::error!(error = %e, "could not rotate session id");
        return ("error", StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    auth.session
        .set_expiry(Some(tower_sessions::Expiry::OnInactivity(
            crate::time_duration(session_ttl),
        )));
    if let Err(e) = auth.login(&user).await {
        tracing::error!(error = %error_chain(&e), "could not log in");
        return ("error", StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    tracing::info!(user_id = user.user_id, "viewer logged in");
    let next = next
        .filter(|n| safe_next(n))
        .unwrap_or_else(|| "/".to_owned());
    ("ok", Redirect::to(&next).into_response())
}

pub async fn logout(mut auth: AuthSession) -> Response {
    match auth.logout().await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "logout failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) use crate::error::error_chain;

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn next_must_be_same_origin_path() {
        for ok in ["/", "/guilds/1", "/a?b=c#d"] {
            assert!(safe_next(ok), "{ok}");
        }
        for bad in [
            "//evil.com",
            "https://evil.com",
            "/\\evil.com",
            "evil.com",
            "",
            "/x\n",
            "/redirect?u=http://evil",
        ] {
            assert!(!safe_next(bad), "{bad}");
        }
    }
}
