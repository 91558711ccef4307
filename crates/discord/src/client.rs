//! The client: one `reqwest` connection pool, the bot token, the rate
//! limiter and the invalid-request guard, shared by every clone.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;

use crate::guard::{Guard, GuardSettings};
use crate::models::{
    Gateway, Member, PartialGuild, Role, Snowflake, ThreadList, ThreadMember, User,
};
use crate::ratelimit::{Limited, Limits, RateLimiter, Scope};
use crate::Error;

/// An answer to [`Client::send_raw`], whatever its status.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

/// What a GET found. 403 and 404 are answers, not failures: the bot lacks a
/// permission retrying will not give it, or the thing is gone.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched<T> {
    Ok(T),
    /// 403: Missing Access (50001, no VIEW_CHANNEL) or Missing Permissions
    /// (50013). `code` is Discord's JSON error code.
    Forbidden {
        code: Option<u64>,
    },
    /// 404: gone (or never existed).
    NotFound,
}

impl<T> Fetched<T> {
    /// The payload; `None` for 403 and 404.
    pub fn ok(self) -> Option<T> {
        match self {
            Fetched::Ok(v) => Some(v),
            Fetched::Forbidden { .. } | Fetched::NotFound => None,
        }
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Fetched<U> {
        match self {
            Fetched::Ok(v) => Fetched::Ok(f(v)),
            Fetched::Forbidden { code } => Fetched::Forbidden { code },
            Fetched::NotFound => Fetched::NotFound,
        }
    }
}

/// Hooks for the caller's metrics; every method defaults to nothing.
pub trait Observer: Send + Sync + 'static {
    /// A 429 answer (`global`: the token's global limit).
    fn rate_limited(&self, _route: &str, _global: bool) {}
    /// A call failed for good on rate limits (retries or wait cap exceeded).
    fn gave_up(&self, _route: &str) {}
    /// A 403 answer.
    fn forbidden(&self, _route: &str, _code: Option<u64>) {}
    /// A 401, 403 or (not shared) 429 answer; `_in_window`: how many the
    /// guard now counts in its rolling window.
    fn invalid_request(&self, _route: &str, _in_window: usize) {}
    /// The invalid-request guard refused to send.
    fn budget_refused(&self, _route: &str) {}
    /// A connection error or 5xx, retried after `_after`.
    fn retrying(&self, _route: &str, _after: Duration) {}
}

struct NoObserver;
impl Observer for NoObserver {}

/// Client settings; the defaults suit real Discord.
#[derive(Debug, Clone)]
pub struct Options {
    pub limits: Limits,
    pub guard: GuardSettings,
    /// 429 answers tolerated for one call before it fails.
    pub max_rate_limit_retries: u32,
    /// Retries of connection errors and 5xx (jittered exponential backoff).
    pub max_retries: usize,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub timeout: Duration,
    pub user_agent: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            limits: Limits::default(),
            guard: GuardSettings::default(),
            max_rate_limit_retries: 10,
            max_retries: 5,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            user_agent: "DiscordBot (https://github.com/support-observer, 0.1)".to_owned(),
        }
    }
}

#[derive(Clone, Copy)]
enum Auth<'a> {
    Bot,
    Bearer(&'a SecretString),
    None,
}

struct Inner {
    http: reqwest::Client,
    /// `{base}/api/v10`
    api: String,
    bot_token: Option<SecretString>,
    limiter: Arc<RateLimiter>,
    guard: Guard,
    options: Options,
    observer: Arc<dyn Observer>,
}

/// The Discord REST client (cheap to clone; clones share limits and budget).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is never printed: only whether there is one.
        f.debug_struct("Client")
            .field("api", &self.inner.api)
            .field("bot_token", &self.inner.bot_token.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Client`].
pub struct ClientBuilder {
    base_url: String,
    bot_token: Option<SecretString>,
    options: Options,
    observer: Arc<dyn Observer>,
}

impl ClientBuilder {
    /// The bot token, with or without its `Bot ` prefix.
    pub fn bot_token(mut self, token: SecretString) -> Self {
        let t = token.expose_secret().trim();
        let t = t.strip_prefix("Bot ").unwrap_or(t).trim();
        self.bot_token = Some(SecretString::from(t.to_owned()));
        self
    }

    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = observer;
        self
    }

    pub fn build(self) -> Result<Client, Error> {
        if self
            .bot_token
            .as_ref()
            .is_some_and(|t| t.expose_secret().is_empty())
        {
            return Err(Error::Setup("the bot token is empty".into()));
        }
        // Redirects disabled: an API that redirects is misconfigured or
        // hostile, and following it would hand the token to someone else.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.options.timeout)
            .user_agent(self.options.user_agent.clone())
            .build()
            .map_err(|e| Error::Setup(e.to_string()))?;
        let base = self.base_url.trim_end_matches('/');
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                api: format!("{base}/api/v10"),
                bot_token: self.bot_token,
                limiter: RateLimiter::new(self.options.limits.clone()),
                guard: Guard::new(self.options.guard.clone()),
                options: self.options,
                observer: self.observer,
            }),
        })
    }
}

/// A short fingerprint of a user token, so each user's limits are kept
/// apart without keeping the token itself as a key.
fn fingerprint(token: &SecretString) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    token.expose_secret().hash(&mut h);
    h.finish()
}

fn label(path: &str) -> String {
    format!("GET {}", path.split('?').next().unwrap_or(path))
}

fn error_code(body: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Body {
        code: Option<u64>,
    }
    serde_json::from_slice::<Body>(body)
        .ok()
        .and_then(|b| b.code)
}

impl Client {
    /// `base_url`: Discord's (`https://discord.com`) or a compatible one;
    /// requests go to `{base_url}/api/v10`.
    pub fn builder(base_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.into(),
            bot_token: None,
            options: Options::default(),
            observer: Arc::new(NoObserver),
        }
    }

    /// 401/403/429 answers counted in the guard's current window.
    pub fn invalid_requests(&self) -> usize {
        self.inner.guard.count()
    }

    /// GET `path` (under `/api/v10`) with the bot token, decoded as `T`.
    pub async fn fetch<T: DeserializeOwned>(&self, path: &str) -> Result<Fetched<T>, Error> {
        self.call(Auth::Bot, path).await
    }

    /// [`Client::fetch`] with 403 and 404 as errors.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        required(path, self.fetch(path).await?)
    }

    /// GET `path` with an OAuth user's access token.
    pub async fn fetch_as_user<T: DeserializeOwned>(
        &self,
        access_token: &SecretString,
        path: &str,
    ) -> Result<Fetched<T>, Error> {
        self.call(Auth::Bearer(access_token), path).await
    }

    /// `GET /gateway` (no token needed). Connection errors and 5xx are
    /// retried like any call, so a starting simulator or a blip is survived.
    pub async fn gateway(&self) -> Result<Gateway, Error> {
        required("/gateway", self.call(Auth::None, "/gateway").await?)
    }

    /// A guild member, with its guild id filled in.
    pub async fn member(&self, guild_id: i64, user_id: i64) -> Result<Fetched<Member>, Error> {
        Ok(self
            .fetch::<Member>(&format!("/guilds/{guild_id}/members/{user_id}"))
            .await?
            .map(|m| in_guild(m, guild_id)))
    }

    /// One page of the guild's members (ids above `after`), guild ids filled in.
    pub async fn members_page(
        &self,
        guild_id: i64,
        after: i64,
        limit: usize,
    ) -> Result<Fetched<Vec<Member>>, Error> {
        Ok(self
            .fetch::<Vec<Member>>(&format!(
                "/guilds/{guild_id}/members?limit={limit}&after={after}"
            ))
            .await?
            .map(|ms| ms.into_iter().map(|m| in_guild(m, guild_id)).collect()))
    }

    pub async fn roles(&self, guild_id: i64) -> Result<Fetched<Vec<Role>>, Error> {
        self.fetch(&format!("/guilds/{guild_id}/roles")).await
    }

    /// One page of a thread's members (user ids above `after`).
    pub async fn thread_members_page(
        &self,
        thread_id: i64,
        after: i64,
        limit: usize,
    ) -> Result<Fetched<Vec<ThreadMember>>, Error> {
        // In API v10 only `with_member=true` pages; without it Discord
        // returns everyone at once, which a huge thread would not survive.
        self.fetch(&format!(
            "/channels/{thread_id}/thread-members?with_member=true&limit={limit}&after={after}"
        ))
        .await
    }

    /// One page of a channel's archived threads (`private` or public),
    /// archived before `before` (ISO 8601), as `T` (the caller's channel model).
    pub async fn archived_threads<T: DeserializeOwned>(
        &self,
        parent: i64,
        private: bool,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Fetched<ThreadList<T>>, Error> {
        let which = if private { "private" } else { "public" };
        let mut path = format!("/channels/{parent}/threads/archived/{which}?limit={limit}");
        if let Some(b) = before {
            path.push_str("&before=");
            path.push_str(b);
        }
        self.fetch(&path).await
    }

    /// `/users/@me` of an OAuth user.
    pub async fn current_user(&self, access_token: &SecretString) -> Result<User, Error> {
        let path = "/users/@me";
        required(path, self.fetch_as_user(access_token, path).await?)
    }

    /// One page of the OAuth user's guilds (ids above `after`).
    pub async fn current_user_guilds(
        &self,
        access_token: &SecretString,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<PartialGuild>, Error> {
        let path = match after {
            Some(a) => format!("/users/@me/guilds?limit={limit}&after={a}"),
            None => format!("/users/@me/guilds?limit={limit}"),
        };
        required(&path, self.fetch_as_user(access_token, &path).await?)
    }

    /// The OAuth user's member object in a guild (guild id filled in);
    /// `NotFound` when not a member.
    pub async fn current_member(
        &self,
        access_token: &SecretString,
        guild_id: i64,
    ) -> Result<Fetched<Member>, Error> {
        Ok(self
            .fetch_as_user::<Member>(
                access_token,
                &format!("/users/@me/guilds/{guild_id}/member"),
            )
            .await?
            .map(|m| in_guild(m, guild_id)))
    }

    /// A request the typed calls do not cover — the OAuth2 token grant, which
    /// the `oauth2` crate builds and parses — under the same limiter and
    /// invalid-request guard. `url` must lie under the base URL. A 429 is
    /// waited out and retried like any call; every other answer, 4xx
    /// included, is returned as is for the caller to read. Connection errors
    /// and 5xx are not retried: a grant is not idempotent (an authorization
    /// code works once).
    pub async fn send_raw(
        &self,
        method: reqwest::Method,
        url: &str,
        headers: reqwest::header::HeaderMap,
        body: Vec<u8>,
    ) -> Result<RawResponse, Error> {
        let path = self.path_of(url)?;
        let route = format!("{method} {path}");
        let mut limited = 0u32;
        loop {
            let req = self
                .inner
                .http
                .request(method.clone(), url)
                .headers(headers.clone())
                .body(body.clone());
            match self
                .exchange(Auth::None, method.as_str(), &path, &route, req)
                .await
            {
                Err(Error::RateLimited { route, wait, .. }) => {
                    self.after_429(route, &mut limited, wait)?;
                }
                other => return other,
            }
        }
    }

    /// The path of `url`, which must lie under the configured base URL: the
    /// token must never be sent anywhere else.
    fn path_of(&self, url: &str) -> Result<String, Error> {
        let base = self.inner.api.trim_end_matches("/api/v10");
        let rest = url
            .strip_prefix(base)
            .filter(|r| r.starts_with('/'))
            .ok_or_else(|| Error::Setup(format!("{url} is not under {base}")))?;
        Ok(rest.split('?').next().unwrap_or(rest).to_owned())
    }

    async fn call<T: DeserializeOwned>(
        &self,
        auth: Auth<'_>,
        path: &str,
    ) -> Result<Fetched<T>, Error> {
        let got = self.with_retries(auth, path).await?;
        Ok(match got {
            Fetched::Ok(body) => {
                Fetched::Ok(
                    serde_json::from_slice(&body).map_err(|source| Error::Decode {
                        route: label(path),
                        source,
                    })?,
                )
            }
            Fetched::Forbidden { code } => Fetched::Forbidden { code },
            Fetched::NotFound => Fetched::NotFound,
        })
    }

    /// One call: 429s retried after the wait they name (up to the
    /// configured count), connection errors and 5xx with jittered backoff.
    async fn with_retries(&self, auth: Auth<'_>, path: &str) -> Result<Fetched<Vec<u8>>, Error> {
        let o = &self.inner.options;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(o.min_backoff)
            .with_max_delay(o.max_backoff)
            .with_max_times(o.max_retries)
            .with_jitter();
        let mut limited = 0u32;
        loop {
            let res = (|| self.once(auth, path))
                .retry(backoff)
                .sleep(tokio::time::sleep)
                .when(Error::is_retryable_now)
                .notify(|err, after| {
                    tracing::warn!(error = %err, after_ms = after.as_millis() as u64, "Discord request failed; retrying");
                    self.inner.observer.retrying(&label(path), after);
                })
                .await;
            match res {
                Err(Error::RateLimited { route, wait, .. }) => {
                    self.after_429(route, &mut limited, wait)?;
                }
                other => return other,
            }
        }
    }

    /// After a 429 (the limiter has learned the wait and the next acquire
    /// sleeps it out): go on, or give up when this call was limited too often
    /// or would wait longer than the cap.
    fn after_429(&self, route: String, limited: &mut u32, wait: Duration) -> Result<(), Error> {
        let o = &self.inner.options;
        if *limited >= o.max_rate_limit_retries || wait > o.limits.max_wait {
            self.inner.observer.gave_up(&route);
            tracing::warn!(%route, retries = *limited, "still rate limited; giving up on this request");
            return Err(Error::RateLimited {
                route,
                retries: *limited,
                wait,
            });
        }
        *limited += 1;
        Ok(())
    }

    /// One GET, its answer read as a typed call's: 403 and 404 are answers,
    /// 401 and other failures errors.
    async fn once(&self, auth: Auth<'_>, path: &str) -> Result<Fetched<Vec<u8>>, Error> {
        let route = label(path);
        let req = self.inner.http.get(format!("{}{path}", self.inner.api));
        let raw = self.exchange(auth, "GET", path, &route, req).await?;
        match raw.status {
            s if s.is_success() => Ok(Fetched::Ok(raw.body)),
            StatusCode::UNAUTHORIZED => Err(Error::Unauthorized { route }),
            StatusCode::FORBIDDEN => {
                let code = error_code(&raw.body);
                self.inner.observer.forbidden(&route, code);
                Ok(Fetched::Forbidden { code })
            }
            StatusCode::NOT_FOUND => Ok(Fetched::NotFound),
            s => Err(Error::Status {
                route,
                status: s.as_u16(),
                code: error_code(&raw.body),
            }),
        }
    }

    /// One request, typed or raw: budget check, rate-limit slot, send, read,
    /// and what the answer teaches the limiter and the invalid-request guard.
    /// A 429 comes back as [`Error::RateLimited`], every other answer as is.
    async fn exchange(
        &self,
        auth: Auth<'_>,
        method: &str,
        path: &str,
        route: &str,
        mut req: reqwest::RequestBuilder,
    ) -> Result<RawResponse, Error> {
        let inner = &self.inner;
        if let Err(count) = inner.guard.check() {
            inner.observer.budget_refused(route);
            return Err(Error::BudgetExhausted {
                route: route.to_owned(),
                count,
            });
        }
        let (scope, authorization) = match auth {
            Auth::Bot => {
                let Some(t) = &inner.bot_token else {
                    return Err(Error::Setup("no bot token configured".into()));
                };
                (Scope::Bot, Some(format!("Bot {}", t.expose_secret())))
            }
            Auth::Bearer(t) => (
                Scope::User(fingerprint(t)),
                Some(format!("Bearer {}", t.expose_secret())),
            ),
            Auth::None => (Scope::Anonymous, None),
        };
        let permit = inner.limiter.acquire(scope, method, path).await?;
        if let Some(a) = authorization {
            let mut v = HeaderValue::from_str(&a)
                .map_err(|_| Error::Setup("token is not a valid header".into()))?;
            v.set_sensitive(true);
            req = req.header(AUTHORIZATION, v);
        }
        let http_err = |source| Error::Http {
            route: route.to_owned(),
            source,
        };
        // On a connection error the permit is dropped, freeing its slot.
        let resp = req.send().await.map_err(http_err)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(http_err)?.to_vec();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let l = Limited::read(&headers, &body);
            inner.limiter.limited(permit, &headers, l);
            if !l.shared {
                let n = inner.guard.record();
                inner.observer.invalid_request(route, n);
            }
            inner.observer.rate_limited(route, l.global);
            tracing::info!(%route, retry_after = l.wait.as_secs_f64(), global = l.global, "rate limited");
            return Err(Error::RateLimited {
                route: route.to_owned(),
                retries: 0,
                wait: l.wait,
            });
        }
        inner.limiter.complete(permit, &headers);
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            let n = inner.guard.record();
            inner.observer.invalid_request(route, n);
        }
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }
}

fn required<T>(path: &str, got: Fetched<T>) -> Result<T, Error> {
    match got {
        Fetched::Ok(v) => Ok(v),
        Fetched::Forbidden { code } => Err(Error::Forbidden {
            route: label(path),
            code,
        }),
        Fetched::NotFound => Err(Error::NotFound { route: label(path) }),
    }
}

fn in_guild(mut m: Member, guild_id: i64) -> Member {
    m.guild_id = Some(Snowflake(guild_id));
    m
}
