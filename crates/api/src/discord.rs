//! The slice of Discord the API talks to: OAuth2 (authorize URL, code
//! exchange with PKCE, refresh) through the `oauth2` crate, and the
//! `/users/@me...` REST calls made with a viewer's own access token. Every
//! request, the `oauth2` crate's token grants included, goes through
//! `observer_discord` (the worker's client: same rate limits, retries,
//! invalid-request guard and payload types). Works against any
//! Discord-compatible base URL.

use std::time::Duration;

use chrono::{DateTime, Utc};
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope,
    StandardErrorResponse, TokenResponse, TokenUrl,
};
use observer_db::auth::{Membership, NewUser};
use observer_discord::{Fetched, SecretString};

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
    /// A REST call failed (network, 5xx, rate limits, an unexpected answer).
    #[error("discord: {0}")]
    Rest(observer_discord::Error),
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

impl From<observer_discord::Error> for DiscordError {
    fn from(e: observer_discord::Error) -> Self {
        match e {
            observer_discord::Error::Unauthorized { .. } => DiscordError::Unauthorized,
            other => DiscordError::Rest(other),
        }
    }
}

/// Client for Discord's OAuth and user REST endpoints.
#[derive(Debug, Clone)]
pub struct Discord {
    oauth: OAuthClient,
    rest: observer_discord::Client,
}

impl Discord {
    /// `observer`: where the client reports rate limits, refusals and retries.
    pub fn new(
        config: &Config,
        observer: std::sync::Arc<dyn observer_discord::Observer>,
    ) -> Result<Self, DiscordError> {
        let base = config.api_base_trimmed();
        let cfg = |e: url::ParseError| DiscordError::Config(e.to_string());
        let oauth = BasicClient::new(ClientId::new(config.discord_client_id.clone()))
            .set_client_secret(ClientSecret::new(
                secrecy::ExposeSecret::expose_secret(&config.discord_client_secret).to_owned(),
            ))
            .set_auth_uri(AuthUrl::new(format!("{base}/oauth2/authorize")).map_err(cfg)?)
            .set_token_uri(TokenUrl::new(format!("{base}/api/oauth2/token")).map_err(cfg)?)
            .set_redirect_uri(RedirectUrl::new(config.redirect_url()).map_err(cfg)?);
        // observer_discord follows no redirects: a token endpoint that
        // redirects is an attack or a misconfiguration, and following it
        // could leak the code.
        let rest = observer_discord::Client::builder(base)
            .observer(observer)
            .build()?;
        Ok(Self { oauth, rest })
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
            .request_async(&Grants(self.rest.clone()))
            .await;
        token_set(res)
    }

    pub async fn refresh(&self, refresh_token: String) -> Result<TokenSet, DiscordError> {
        let token = RefreshToken::new(refresh_token);
        let res = self
            .oauth
            .exchange_refresh_token(&token)
            .request_async(&Grants(self.rest.clone()))
            .await;
        token_set(res)
    }

    /// `/users/@me`.
    pub async fn current_user(&self, access_token: &str) -> Result<NewUser, DiscordError> {
        let token = SecretString::from(access_token.to_owned());
        let u = self.rest.current_user(&token).await?;
        Ok(NewUser {
            user_id: Some(u.id.get())
                .filter(|id| *id > 0)
                .ok_or(DiscordError::OAuth("bad user id".into()))?,
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
        let token = SecretString::from(access_token.to_owned());
        let mut ids = Vec::new();
        let mut after: Option<i64> = None;
        // Discord caps users at a few hundred guilds; the bound stops a
        // misbehaving server from looping us forever.
        for _ in 0..50 {
            let page = self.rest.current_user_guilds(&token, after, 200).await?;
            let n = page.len();
            let page_ids: Vec<i64> = page
                .iter()
                .map(|g| g.id.get())
                .filter(|id| *id > 0)
                .collect();
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
        let token = SecretString::from(access_token.to_owned());
        Ok(match self.rest.current_member(&token, guild_id).await? {
            Fetched::Ok(m) => Some(Membership {
                guild_id,
                role_ids: m.role_ids().into_iter().filter(|r| *r > 0).collect(),
                nick: m.nick,
                joined_at: m.joined_at,
                communication_disabled_until: m.communication_disabled_until,
            }),
            Fetched::NotFound => None,
            Fetched::Forbidden { code } => {
                return Err(DiscordError::Rest(observer_discord::Error::Forbidden {
                    route: format!("GET /users/@me/guilds/{guild_id}/member"),
                    code,
                }))
            }
        })
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

type TokenResult<E> = Result<
    oauth2::basic::BasicTokenResponse,
    RequestTokenError<E, StandardErrorResponse<BasicErrorResponseType>>,
>;

/// The `oauth2` crate's HTTP client for grant requests: the shared client, so
/// logins and token refreshes count against the same limits and budget as
/// everything else this process sends Discord. (A struct, not a closure: the
/// crate's blanket impl for closures cannot name the borrow's lifetime.)
struct Grants(observer_discord::Client);

impl<'c> oauth2::AsyncHttpClient<'c> for Grants {
    type Error = observer_discord::Error;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<oauth2::HttpResponse, Self::Error>> + Send + 'c,
        >,
    >;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(grant_request(&self.0, request))
    }
}

async fn grant_request(
    rest: &observer_discord::Client,
    req: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, observer_discord::Error> {
    let (parts, body) = req.into_parts();
    let got = rest
        .send_raw(parts.method, &parts.uri.to_string(), parts.headers, body)
        .await?;
    let mut resp = oauth2::HttpResponse::new(got.body);
    *resp.status_mut() = got.status;
    *resp.headers_mut() = got.headers;
    Ok(resp)
}

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
