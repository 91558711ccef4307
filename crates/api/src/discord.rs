//! The slice of Discord the API talks to: OAuth2 (authorize URL, code
//! exchange with PKCE, refresh) and the `/users/@me...` REST calls made with a
//! viewer's own access token. Works against any Discord-compatible base URL.

use std::time::Duration;

use chrono::{DateTime, Utc};
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope,
    StandardErrorResponse, TokenResponse, TokenUrl,
};
use observer_db::auth::{Membership, NewUser};
use serde::Deserialize;

use crate::config::Config;

/// OAuth scopes the login asks for.
pub const SCOPES: [&str; 3] = ["identify", "guilds", "guilds.members.read"];

type OAuthClient =
    BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

#[derive(Debug, thiserror::Error)]
pub enum DiscordError {
    /// Discord refused the grant (bad code, wrong PKCE verifier, revoked refresh token).
    #[error("grant rejected: {0}")]
    GrantRejected(String),
    /// The access token no longer works.
    #[error("access token rejected")]
    Unauthorized,
    #[error("discord answered {status} for {what}")]
    Status { status: u16, what: &'static str },
    #[error("bad response from discord for {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("request to discord failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("oauth exchange failed: {0}")]
    OAuth(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Tokens returned by the token endpoint.
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_at: DateTime<Utc>,
    pub scope: String,
}

#[derive(Debug, Deserialize)]
struct UserJson {
    id: String,
    username: String,
    global_name: Option<String>,
    avatar: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PartialGuildJson {
    id: String,
}

#[derive(Debug, Deserialize)]
struct MemberJson {
    #[serde(default)]
    roles: Vec<String>,
    nick: Option<String>,
    joined_at: Option<DateTime<Utc>>,
    communication_disabled_until: Option<DateTime<Utc>>,
}

/// Client for Discord's OAuth and user REST endpoints.
#[derive(Debug, Clone)]
pub struct Discord {
    oauth: OAuthClient,
    http: reqwest::Client,
    rest_base: String,
}

impl Discord {
    pub fn new(config: &Config) -> Result<Self, DiscordError> {
        let base = config.api_base_trimmed();
        let cfg = |e: url::ParseError| DiscordError::Config(e.to_string());
        let oauth = BasicClient::new(ClientId::new(config.discord_client_id.clone()))
            .set_client_secret(ClientSecret::new(
                secrecy::ExposeSecret::expose_secret(&config.discord_client_secret).to_owned(),
            ))
            .set_auth_uri(AuthUrl::new(format!("{base}/oauth2/authorize")).map_err(cfg)?)
            .set_token_uri(TokenUrl::new(format!("{base}/api/oauth2/token")).map_err(cfg)?)
            .set_redirect_uri(RedirectUrl::new(config.redirect_url()).map_err(cfg)?);
        // Redirects disabled: a token endpoint that redirects is an attack or
        // a misconfiguration, and following it could leak the code.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(15))
            .user_agent("SupportObserver (https://github.com/, 0.1)")
            .build()?;
        Ok(Self {
            oauth,
            http,
            rest_base: format!("{base}/api/v10"),
        })
    }

    /// The browser authorize URL with fresh CSRF state and a PKCE S256 challenge.
    pub fn authorize_url(&self) -> (url::Url, CsrfToken, PkceCodeVerifier) {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state) = self
            .oauth
            .authorize_url(CsrfToken::new_random)
            .add_scopes(SCOPES.iter().map(|s| Scope::new((*s).to_owned())))
            .set_pkce_challenge(challenge)
            .url();
        (url, state, verifier)
    }

    pub async fn exchange_code(
        &self,
        code: String,
        verifier: String,
    ) -> Result<TokenSet, DiscordError> {
        let res = self
            .oauth
            .exchange_code(AuthorizationCode::new(code))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier))
            .request_async(&self.http)
            .await;
        token_set(res)
    }

    pub async fn refresh(&self, refresh_token: String) -> Result<TokenSet, DiscordError> {
        let token = RefreshToken::new(refresh_token);
        let res = self
            .oauth
            .exchange_refresh_token(&token)
            .request_async(&self.http)
            .await;
        token_set(res)
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        access_token: &str,
        path: &str,
        what: &'static str,
    ) -> Result<Option<T>, DiscordError> {
        // A few retries honour Discord's 429 `retry_after`; beyond that the
        // caller fails and tries again on its next schedule.
        for _ in 0..3 {
            let resp = self
                .http
                .get(format!("{}{path}", self.rest_base))
                .bearer_auth(access_token)
                .send()
                .await?;
            let status = resp.status();
            if status.as_u16() == 429 {
                let wait = resp
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v.get("retry_after").and_then(|r| r.as_f64()))
                    .unwrap_or(1.0)
                    .clamp(0.0, 5.0);
                tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                continue;
            }
            if status.as_u16() == 401 {
                return Err(DiscordError::Unauthorized);
            }
            if status.as_u16() == 404 {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(DiscordError::Status {
                    status: status.as_u16(),
                    what,
                });
            }
            let body = resp
                .json::<T>()
                .await
                .map_err(|source| DiscordError::Decode { what, source })?;
            return Ok(Some(body));
        }
        Err(DiscordError::Status { status: 429, what })
    }

    /// `/users/@me`.
    pub async fn current_user(&self, access_token: &str) -> Result<NewUser, DiscordError> {
        let u: UserJson = self
            .get(access_token, "/users/@me", "users/@me")
            .await?
            .ok_or(DiscordError::Status {
                status: 404,
                what: "users/@me",
            })?;
        Ok(NewUser {
            user_id: parse_snowflake(&u.id).ok_or(DiscordError::OAuth("bad user id".into()))?,
            username: u.username,
            global_name: u.global_name,
            avatar: u.avatar,
        })
    }

    /// Ids of every guild the user is in (`/users/@me/guilds`, paged by 200).
    pub async fn current_user_guild_ids(
        &self,
        access_token: &str,
    ) -> Result<Vec<i64>, DiscordError> {
        let mut ids = Vec::new();
        let mut after: Option<i64> = None;
        // Discord caps users at a few hundred guilds; the bound stops a
        // misbehaving server from looping us forever.
        for _ in 0..50 {
            let path = match after {
                Some(a) => format!("/users/@me/guilds?limit=200&after={a}"),
                None => "/users/@me/guilds?limit=200".to_owned(),
            };
            let page: Vec<PartialGuildJson> = self
                .get(access_token, &path, "users/@me/guilds")
                .await?
                .unwrap_or_default();
            let n = page.len();
            let page_ids: Vec<i64> = page.iter().filter_map(|g| parse_snowflake(&g.id)).collect();
            let max = page_ids.iter().copied().max();
            ids.extend(page_ids);
            match max {
                Some(m) if n >= 200 && Some(m) != after => after = Some(m),
                _ => break,
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// The user's member object in one guild, `None` if not a member.
    pub async fn current_member(
        &self,
        access_token: &str,
        guild_id: i64,
    ) -> Result<Option<Membership>, DiscordError> {
        let m: Option<MemberJson> = self
            .get(
                access_token,
                &format!("/users/@me/guilds/{guild_id}/member"),
                "users/@me/guilds/{id}/member",
            )
            .await?;
        Ok(m.map(|m| Membership {
            guild_id,
            role_ids: m.roles.iter().filter_map(|r| parse_snowflake(r)).collect(),
            nick: m.nick,
            joined_at: m.joined_at,
            communication_disabled_until: m.communication_disabled_until,
        }))
    }

    /// Memberships of the user in the given bot guilds.
    pub async fn memberships(
        &self,
        access_token: &str,
        bot_guilds: &[i64],
    ) -> Result<Vec<Membership>, DiscordError> {
        let mine = self.current_user_guild_ids(access_token).await?;
        let mut out = Vec::new();
        for g in bot_guilds {
            if mine.binary_search(g).is_err() {
                continue;
            }
            if let Some(m) = self.current_member(access_token, *g).await? {
                out.push(m);
            }
        }
        Ok(out)
    }
}

fn parse_snowflake(s: &str) -> Option<i64> {
    s.parse::<i64>().ok().filter(|v| *v > 0)
}

type TokenResult<E> = Result<
    oauth2::basic::BasicTokenResponse,
    RequestTokenError<E, StandardErrorResponse<BasicErrorResponseType>>,
>;

fn token_set<E: std::error::Error + 'static>(
    res: TokenResult<E>,
) -> Result<TokenSet, DiscordError> {
    match res {
        Ok(tok) => {
            let expires_in = tok.expires_in().unwrap_or(Duration::from_secs(3600));
            let expires_at = Utc::now()
                + chrono::Duration::from_std(expires_in).unwrap_or(chrono::Duration::hours(1));
            Ok(TokenSet {
                access_token: tok.access_token().secret().clone(),
                refresh_token: tok.refresh_token().map(|r| r.secret().clone()),
                expires_at,
                scope: tok
                    .scopes()
                    .map(|s| s.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(" "))
                    .unwrap_or_default(),
            })
        }
        Err(RequestTokenError::ServerResponse(e)) => {
            Err(DiscordError::GrantRejected(e.error().to_string()))
        }
        Err(e) => Err(DiscordError::OAuth(error_chain(&e))),
    }
}

use crate::error::error_chain;
