//! Discord's rate limits, as strict as its documentation (rate-limits.mdx):
//! - a global limit per token (50 requests/s for bots), answered with `X-RateLimit-Global: true`
//!   and `X-RateLimit-Scope: global`;
//! - per-route buckets keyed by route template, top-level resource and token, with
//!   `X-RateLimit-*` headers on every answer and `X-RateLimit-Scope: user` on their 429s;
//! - invalid-request accounting per client IP: too many 401/403/429 answers (shared-scope 429s
//!   excepted) in a rolling window bring a Cloudflare ban (HTTP 429, `error code: 1015`).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{Shared, SimConfig, Simulator};

/// Discord's global limit for bots, per token.
pub const DEFAULT_GLOBAL_PER_SEC: u32 = 50;

#[derive(Default)]
pub(crate) struct RateState {
    buckets: HashMap<String, Window>,
    global: HashMap<String, Window>,
    clients: HashMap<IpAddr, Client>,
    shared_burst: u64,
    counts: Counts,
}

/// A fixed window: `used` requests since it opened, until `reset_at`.
struct Window {
    used: u32,
    reset_at: Instant,
}

impl Window {
    /// Takes one request; `Err(reset_after)` when the window is full.
    fn take(
        &mut self,
        limit: u32,
        len: Duration,
        now: Instant,
    ) -> Result<(u32, Duration), Duration> {
        if now >= self.reset_at {
            self.used = 0;
            self.reset_at = now + len;
        }
        let reset_after = self.reset_at.saturating_duration_since(now);
        if self.used >= limit {
            return Err(reset_after);
        }
        self.used += 1;
        Ok((limit - self.used, reset_after))
    }
}

#[derive(Default)]
struct Client {
    invalid: VecDeque<Instant>,
    banned_until: Option<Instant>,
}

#[derive(Default, Clone, Copy)]
struct Counts {
    route: u64,
    global: u64,
    shared: u64,
    injected: u64,
    banned: u64,
}

/// What the rate limiter has answered so far (`GET /_sim/rate-stats`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateStats {
    /// 401, 403 and 429 answers (shared-scope 429s excepted) inside the rolling window, summed
    /// over clients.
    pub invalid_requests: u64,
    /// `SimConfig::invalid_request_budget` (0: no ban).
    pub invalid_request_budget: u32,
    /// Unix milliseconds when the latest ban ends; `None` when no client is banned.
    pub banned_until: Option<i64>,
    /// Per-route 429s (`X-RateLimit-Scope: user`) from exhausted buckets.
    pub route_429s: u64,
    /// Global 429s (`X-RateLimit-Scope: global`).
    pub global_429s: u64,
    /// Shared-scope 429s (from [`Simulator::rate_limit_burst_shared`]).
    pub shared_429s: u64,
    /// Per-route 429s injected by [`Simulator::rate_limit_burst`].
    pub injected_429s: u64,
    /// Cloudflare-style 429s (`error code: 1015`) answered while banned.
    pub banned_429s: u64,
}

impl RateStats {
    /// Every 429 answered, whatever its scope.
    pub fn total_429s(&self) -> u64 {
        self.route_429s
            + self.global_429s
            + self.shared_429s
            + self.injected_429s
            + self.banned_429s
    }
}

impl Simulator {
    /// Counters of the rate limiter and the invalid-request accounting.
    pub fn rate_stats(&self) -> RateStats {
        let rs = lock(&self.shared);
        let now = Instant::now();
        let window = Duration::from_millis(self.shared.config.invalid_request_window_ms);
        let invalid = rs
            .clients
            .values()
            .map(|c| {
                c.invalid
                    .iter()
                    .filter(|t| now.duration_since(**t) < window)
                    .count() as u64
            })
            .sum();
        let banned_until = rs
            .clients
            .values()
            .filter_map(|c| c.banned_until)
            .filter(|u| *u > now)
            .max()
            .map(|u| epoch_ms(u.saturating_duration_since(now)));
        RateStats {
            invalid_requests: invalid,
            invalid_request_budget: self.shared.config.invalid_request_budget,
            banned_until,
            route_429s: rs.counts.route,
            global_429s: rs.counts.global,
            shared_429s: rs.counts.shared,
            injected_429s: rs.counts.injected,
            banned_429s: rs.counts.banned,
        }
    }

    /// Forgets buckets, counters, invalid requests and bans (and pending injected 429s).
    pub fn reset_rate_limits(&self) {
        *lock(&self.shared) = RateState::default();
        self.shared.burst.store(0, Ordering::SeqCst);
    }

    /// The next `n` rate-limited requests answer 429 with `X-RateLimit-Scope: shared` (a
    /// resource's limit, not the caller's): these do not count as invalid requests.
    pub fn rate_limit_burst_shared(&self, n: u64) {
        lock(&self.shared).shared_burst = n;
    }
}

fn lock(sh: &Shared) -> std::sync::MutexGuard<'_, RateState> {
    sh.rate.lock().unwrap_or_else(|e| e.into_inner())
}

/// The effective global limit: unset follows per-route limiting (off when that is off).
pub(crate) fn global_limit(c: &SimConfig) -> u32 {
    match c.rate_limit_global_per_sec {
        Some(n) => n,
        None if c.rate_limit_per_route == 0 => 0,
        None => DEFAULT_GLOBAL_PER_SEC,
    }
}

/// Route template with every id but the top-level resource replaced, plus that resource id.
fn bucket_key(method: &str, path: &str) -> (String, String) {
    let path = path
        .strip_prefix("/api/v10")
        .or_else(|| path.strip_prefix("/api"))
        .unwrap_or(path);
    let mut template = String::from(method);
    let mut major = String::new();
    let mut prev = "";
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        template.push('/');
        if seg.bytes().all(|b| b.is_ascii_digit()) {
            if major.is_empty() && matches!(prev, "channels" | "guilds" | "webhooks") {
                major = seg.to_string();
            }
            template.push_str(":id");
        } else {
            template.push_str(seg);
        }
        prev = seg;
    }
    let hash = hex_prefix(&Sha256::digest(template.as_bytes()));
    (format!("{template}|{major}"), hash)
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn epoch_secs(after: Duration) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now + after).as_secs_f64()
}

fn epoch_ms(after: Duration) -> i64 {
    (epoch_secs(after) * 1000.0) as i64
}

fn set(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(name, v);
    }
}

/// Discord sends `Retry-After` in whole seconds, rounded up.
fn retry_after_header(d: Duration) -> String {
    format!("{}", d.as_secs_f64().ceil().max(1.0) as u64)
}

fn limited_body(retry_after: Duration, global: bool) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        Json(json!({
            "message": "You are being rate limited.",
            "retry_after": retry_after.as_secs_f64(),
            "global": global,
        })),
    )
        .into_response()
}

/// A per-route 429 (`scope` is `user` or `shared`) with the bucket's headers.
fn route_429(retry_after: Duration, limit: u32, bucket: &str, scope: &str) -> Response {
    let secs = retry_after.as_secs_f64();
    let mut res = limited_body(retry_after, false);
    let h = res.headers_mut();
    set(h, "retry-after", retry_after_header(retry_after));
    set(h, "x-ratelimit-limit", limit.to_string());
    set(h, "x-ratelimit-remaining", "0".into());
    set(
        h,
        "x-ratelimit-reset",
        format!("{:.3}", epoch_secs(retry_after)),
    );
    set(h, "x-ratelimit-reset-after", format!("{secs:.3}"));
    set(h, "x-ratelimit-bucket", bucket.to_string());
    set(h, "x-ratelimit-scope", scope.into());
    res
}

/// The global 429: no bucket headers, `X-RateLimit-Global` (whose presence serenity reads).
fn global_429(retry_after: Duration) -> Response {
    let mut res = limited_body(retry_after, true);
    let h = res.headers_mut();
    set(h, "retry-after", retry_after_header(retry_after));
    set(h, "x-ratelimit-global", "true".into());
    set(h, "x-ratelimit-scope", "global".into());
    res
}

/// What Cloudflare answers a banned IP: plain text, no JSON, no rate-limit headers.
fn banned_429(retry_after: Duration) -> Response {
    let mut res = (
        StatusCode::TOO_MANY_REQUESTS,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=UTF-8",
        )],
        "error code: 1015",
    )
        .into_response();
    set(
        res.headers_mut(),
        "retry-after",
        retry_after_header(retry_after),
    );
    res
}

/// Counts one invalid request of `ip`; past the budget the client is banned.
fn record_invalid(rs: &mut RateState, config: &SimConfig, ip: IpAddr, now: Instant) {
    let window = Duration::from_millis(config.invalid_request_window_ms);
    let c = rs.clients.entry(ip).or_default();
    c.invalid.push_back(now);
    while c
        .invalid
        .front()
        .is_some_and(|t| now.duration_since(*t) >= window)
    {
        c.invalid.pop_front();
    }
    let budget = config.invalid_request_budget as usize;
    if budget > 0 && c.invalid.len() > budget && c.banned_until.is_none() {
        c.banned_until = Some(now + Duration::from_millis(config.invalid_request_ban_ms));
        tracing::warn!(%ip, invalid = c.invalid.len(), "too many invalid requests: banned");
    }
}

/// Why a request was refused before reaching its handler.
enum Refusal {
    Banned(Duration),
    Global(Duration),
    Route {
        retry_after: Duration,
        limit: u32,
        scope: &'static str,
    },
}

pub(crate) async fn rate_limit(
    State(sh): State<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    // Gateway discovery is exempt: serenity silently falls back to the real gateway if it fails.
    // Attachments stand for the CDN, another host without these limits.
    if path.ends_with("/gateway")
        || path.ends_with("/gateway/bot")
        || path.starts_with("/attachments/")
    {
        return next.run(req).await;
    }
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    // Discord keys the global and per-route limits by the token (bot or bearer).
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (route, bucket) = bucket_key(req.method().as_str(), &path);
    let config = &sh.config;
    let limit = config.rate_limit_per_route;
    let now = Instant::now();

    let checked = {
        let mut rs = lock(&sh);
        check(&mut rs, &sh, ip, &token, &route, now)
    };
    let (remaining, reset_after) = match checked {
        Ok(v) => v,
        Err(refusal) => {
            return match refusal {
                Refusal::Banned(d) => banned_429(d),
                Refusal::Global(d) => global_429(d),
                Refusal::Route {
                    retry_after,
                    limit,
                    scope,
                } => route_429(retry_after, limit, &bucket, scope),
            }
        }
    };
    let mut res = next.run(req).await;
    if matches!(
        res.status(),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
    ) {
        record_invalid(&mut lock(&sh), config, ip, Instant::now());
    }
    if limit == 0 {
        return res;
    }
    let h = res.headers_mut();
    set(h, "x-ratelimit-limit", limit.to_string());
    set(h, "x-ratelimit-remaining", remaining.to_string());
    set(
        h,
        "x-ratelimit-reset",
        format!("{:.3}", epoch_secs(reset_after)),
    );
    set(
        h,
        "x-ratelimit-reset-after",
        format!("{:.3}", reset_after.as_secs_f64()),
    );
    set(h, "x-ratelimit-bucket", bucket);
    res
}

/// Ban, then global limit, then injected faults, then the route's bucket. A request refused by
/// the global limit uses no route budget; one refused by its bucket still used global budget.
fn check(
    rs: &mut RateState,
    sh: &Shared,
    ip: IpAddr,
    token: &str,
    route: &str,
    now: Instant,
) -> Result<(u32, Duration), Refusal> {
    let config = &sh.config;
    if let Some(c) = rs.clients.get_mut(&ip) {
        match c.banned_until {
            Some(until) if until > now => {
                rs.counts.banned += 1;
                return Err(Refusal::Banned(until - now));
            }
            Some(_) => {
                // A lifted ban starts over with a clean record.
                c.banned_until = None;
                c.invalid.clear();
            }
            None => {}
        }
    }
    let global = global_limit(config);
    if global > 0 {
        let w = rs.global.entry(token.to_string()).or_insert(Window {
            used: 0,
            reset_at: now + Duration::from_secs(1),
        });
        if let Err(reset_after) = w.take(global, Duration::from_secs(1), now) {
            rs.counts.global += 1;
            record_invalid(rs, config, ip, now);
            return Err(Refusal::Global(reset_after));
        }
    }
    let limit = config.rate_limit_per_route;
    if rs.shared_burst > 0 {
        rs.shared_burst -= 1;
        rs.counts.shared += 1;
        return Err(Refusal::Route {
            retry_after: Duration::from_millis(config.burst_retry_after_ms),
            limit: limit.max(1),
            scope: "shared",
        });
    }
    let burst = sh
        .burst
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if burst {
        rs.counts.injected += 1;
        record_invalid(rs, config, ip, now);
        return Err(Refusal::Route {
            retry_after: Duration::from_millis(config.burst_retry_after_ms),
            limit: limit.max(1),
            scope: "user",
        });
    }
    if limit == 0 {
        return Ok((0, Duration::ZERO));
    }
    let len = Duration::from_millis(config.rate_limit_window_ms.max(1));
    let b = rs
        .buckets
        .entry(format!("{route}|{token}"))
        .or_insert(Window {
            used: 0,
            reset_at: now + len,
        });
    match b.take(limit, len, now) {
        Ok(v) => Ok(v),
        Err(retry_after) => {
            rs.counts.route += 1;
            record_invalid(rs, config, ip, now);
            Err(Refusal::Route {
                retry_after,
                limit,
                scope: "user",
            })
        }
    }
}
