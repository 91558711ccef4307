//! Discord's rate limits, obeyed before a request is sent rather than found
//! by hitting them.
//!
//! - Per-route buckets: a route (method + path with ids replaced, keeping the
//!   major parameter: channel, guild or webhook id) maps to the bucket named
//!   by `X-RateLimit-Bucket`; routes sharing a bucket hash share its budget
//!   per major parameter. Until a route's bucket is known only one request
//!   on it is in flight, so a burst of concurrent callers learns the limit
//!   from the first answer instead of from a volley of 429s.
//! - Remaining/reset come from `X-RateLimit-Remaining` and
//!   `X-RateLimit-Reset-After`, minus the requests still in flight; at 0 a
//!   caller waits for the reset.
//! - The global limit: bot requests are paced to a configurable rate (50/s
//!   is Discord's default), and a 429 marked global (`X-RateLimit-Global`,
//!   `X-RateLimit-Scope: global` or `"global": true`) pauses every request of
//!   that token for its `retry_after`.
//! - No wait is longer than the configured cap: past it the caller gets
//!   [`Error::RateLimited`] and retries on its own schedule.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use reqwest::header::HeaderMap;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::Error;

/// Wait when a 429 names no usable time.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Whose limits a request counts against: the bot token (globally paced) or
/// one OAuth user's token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Scope {
    Bot,
    User(u64),
    Anonymous,
}

impl Scope {
    fn prefix(&self) -> String {
        match self {
            Scope::Bot => "bot".to_owned(),
            Scope::User(f) => format!("user:{f:016x}"),
            Scope::Anonymous => "anon".to_owned(),
        }
    }
}

/// Route template and major parameter of a path (`/channels/1/messages?x`
/// → `GET /channels/:id/messages`, `1`).
pub(crate) fn route(method: &str, path: &str) -> (String, String) {
    let path = path.split('?').next().unwrap_or(path);
    let mut template = String::from(method);
    template.push(' ');
    let mut major = String::new();
    let mut prev = "";
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        template.push('/');
        if seg.bytes().all(|b| b.is_ascii_digit()) {
            if major.is_empty() && matches!(prev, "channels" | "guilds" | "webhooks") {
                major = seg.to_owned();
            }
            template.push_str(":id");
        } else {
            template.push_str(seg);
        }
        prev = seg;
    }
    (template, major)
}

#[derive(Debug, Default)]
struct Bucket {
    /// Unknown until an answer named it.
    limit: Option<u32>,
    remaining: u32,
    reset_at: Option<Instant>,
    in_flight: u32,
}

#[derive(Debug)]
struct State {
    /// `{scope} {route template}` → bucket hash.
    routes: HashMap<String, String>,
    /// `{scope} {bucket hash or route template}|{major}` → state.
    buckets: HashMap<String, Bucket>,
    /// Every request of the scope waits until then (a global 429).
    paused: HashMap<Scope, Instant>,
    /// The next free slot of the bot's global pacing.
    next_slot: Instant,
}

/// Rate-limit settings.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bot requests per second across all routes; 0 turns pacing off.
    pub global_per_sec: u32,
    /// Longest wait a rate limit may impose on one call.
    pub max_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            global_per_sec: 50,
            max_wait: Duration::from_secs(60),
        }
    }
}

#[derive(Debug)]
pub(crate) struct RateLimiter {
    state: Mutex<State>,
    changed: Notify,
    limits: Limits,
}

/// A slot in a bucket, held while the request is in flight; dropping it
/// without an answer (connection error, cancelled caller) frees the slot.
#[derive(Debug)]
pub(crate) struct Permit {
    limiter: Arc<RateLimiter>,
    key: String,
    scope: Scope,
    route: String,
    major: String,
    done: bool,
}

/// What a 429 said.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Limited {
    pub wait: Duration,
    pub global: bool,
    /// `X-RateLimit-Scope: shared`: a limit on a resource shared with other
    /// clients, which Discord does not count as an invalid request.
    pub shared: bool,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A finite, non-negative number of seconds (`NaN`, `inf` and negatives
/// parse as `f64` but are no usable wait).
fn secs(v: Option<f64>) -> Option<Duration> {
    v.filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

fn header_secs(headers: &HeaderMap, name: &str) -> Option<Duration> {
    secs(header(headers, name).and_then(|v| v.trim().parse::<f64>().ok()))
}

impl Limited {
    /// Reads a 429: `retry_after` from the body first (it has sub-second
    /// precision), else the `Retry-After` header.
    pub(crate) fn read(headers: &HeaderMap, body: &[u8]) -> Limited {
        #[derive(serde::Deserialize)]
        struct Body {
            retry_after: Option<f64>,
            #[serde(default)]
            global: bool,
        }
        let body: Option<Body> = serde_json::from_slice(body).ok();
        let scope = header(headers, "x-ratelimit-scope").unwrap_or_default();
        let global = body.as_ref().is_some_and(|b| b.global)
            || header(headers, "x-ratelimit-global")
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || scope.eq_ignore_ascii_case("global");
        let wait = secs(body.and_then(|b| b.retry_after))
            .or_else(|| header_secs(headers, "retry-after"))
            .unwrap_or(DEFAULT_RETRY_AFTER);
        Limited {
            wait,
            global,
            shared: scope.eq_ignore_ascii_case("shared"),
        }
    }
}

impl RateLimiter {
    pub(crate) fn new(limits: Limits) -> Arc<Self> {
        Arc::new(RateLimiter {
            state: Mutex::new(State {
                routes: HashMap::new(),
                buckets: HashMap::new(),
                paused: HashMap::new(),
                next_slot: Instant::now(),
            }),
            changed: Notify::new(),
            limits,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic in another holder (every
        // update is a few assignments), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bucket_key(st: &State, scope: &Scope, route: &str, major: &str) -> String {
        let p = scope.prefix();
        match st.routes.get(&format!("{p} {route}")) {
            Some(hash) => format!("{p} {hash}|{major}"),
            None => format!("{p} {route}|{major}"),
        }
    }

    /// Waits until a request on `route` may be sent.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        scope: Scope,
        method: &str,
        path: &str,
    ) -> Result<Permit, Error> {
        let (route, major) = route(method, path);
        let label = || format!("{method} {}", path.split('?').next().unwrap_or(path));
        loop {
            // Registered before the state is read, so an update between the
            // read and the wait still wakes this caller.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let wait = match self.try_take(&scope, &route, &major, now) {
                Ok((key, slot)) => {
                    let permit = Permit {
                        limiter: Arc::clone(self),
                        key,
                        scope: scope.clone(),
                        route: route.clone(),
                        major: major.clone(),
                        done: false,
                    };
                    if slot > now {
                        tokio::time::sleep_until(slot).await;
                    }
                    return Ok(permit);
                }
                Err(wait) => wait,
            };
            match wait {
                Some(until) => {
                    let d = until.saturating_duration_since(now);
                    if d > self.limits.max_wait {
                        return Err(Error::RateLimited {
                            route: label(),
                            retries: 0,
                            wait: d,
                        });
                    }
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => {}
                        () = &mut notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Takes a slot in the route's bucket: its key and when the global
    /// pacing lets it go; or, if none is free, until when to wait (`None`:
    /// until an answer in flight tells).
    fn try_take(
        &self,
        scope: &Scope,
        route: &str,
        major: &str,
        now: Instant,
    ) -> Result<(String, Instant), Option<Instant>> {
        let mut st = self.lock();
        let key = Self::bucket_key(&st, scope, route, major);
        if let Some(until) = st.paused.get(scope).copied().filter(|t| *t > now) {
            return Err(Some(until));
        }
        let b = st.buckets.entry(key.clone()).or_default();
        if let (Some(limit), Some(reset)) = (b.limit, b.reset_at) {
            if reset <= now {
                b.remaining = limit;
                b.reset_at = None;
            }
        }
        let free = match b.limit {
            // Unknown bucket: one request at a time until an answer names it.
            None => b.in_flight == 0,
            Some(_) => b.remaining > 0,
        };
        if !free {
            // Known limit, none left: until the reset (or, with no reset
            // known yet, until an answer in flight names one).
            return Err(b.reset_at);
        }
        b.remaining = b.remaining.saturating_sub(1);
        b.in_flight += 1;
        let slot = if *scope == Scope::Bot && self.limits.global_per_sec > 0 {
            let slot = st.next_slot.max(now);
            st.next_slot = slot + Duration::from_secs(1) / self.limits.global_per_sec;
            slot
        } else {
            now
        };
        Ok((key, slot))
    }

    /// Records a successful or failed (non-429) answer's headers.
    pub(crate) fn complete(&self, mut permit: Permit, headers: &HeaderMap) {
        permit.done = true;
        let now = Instant::now();
        let mut st = self.lock();
        let key = self.release(&mut st, &permit, header(headers, "x-ratelimit-bucket"));
        let limit = header(headers, "x-ratelimit-limit").and_then(|v| v.parse::<u32>().ok());
        let remaining =
            header(headers, "x-ratelimit-remaining").and_then(|v| v.parse::<u32>().ok());
        let reset_after = header_secs(headers, "x-ratelimit-reset-after");
        if let (Some(limit), Some(remaining)) = (limit, remaining) {
            let b = st.buckets.entry(key).or_default();
            let left = remaining.saturating_sub(b.in_flight);
            let fresh = b.limit.is_none() || b.reset_at.is_none_or(|r| r <= now);
            b.limit = Some(limit.max(1));
            if fresh {
                b.remaining = left;
                b.reset_at = reset_after.map(|d| now + d);
            } else {
                // An older answer may arrive after a newer one: never raise
                // what is left within the window already known.
                b.remaining = b.remaining.min(left);
            }
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Records a 429: the bucket (or, if global, the whole scope) waits.
    pub(crate) fn limited(&self, mut permit: Permit, headers: &HeaderMap, l: Limited) {
        permit.done = true;
        let now = Instant::now();
        let mut st = self.lock();
        let key = self.release(&mut st, &permit, header(headers, "x-ratelimit-bucket"));
        if l.global {
            let until = now + l.wait;
            let p = st.paused.entry(permit.scope.clone()).or_insert(until);
            *p = (*p).max(until);
        } else {
            let b = st.buckets.entry(key).or_default();
            if b.limit.is_none() {
                b.limit = header(headers, "x-ratelimit-limit")
                    .and_then(|v| v.parse::<u32>().ok())
                    .map(|l| l.max(1))
                    .or(Some(1));
            }
            b.remaining = 0;
            b.reset_at = Some(now + l.wait);
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Frees the permit's slot and learns the route's bucket; returns the
    /// bucket's key.
    fn release(&self, st: &mut State, permit: &Permit, hash: Option<&str>) -> String {
        if let Some(b) = st.buckets.get_mut(&permit.key) {
            b.in_flight = b.in_flight.saturating_sub(1);
        }
        let Some(hash) = hash else {
            return permit.key.clone();
        };
        let p = permit.scope.prefix();
        st.routes
            .insert(format!("{p} {}", permit.route), hash.to_owned());
        let learned = format!("{p} {hash}|{}", permit.major);
        if learned != permit.key {
            // The provisional per-route entry had at most this one request in
            // flight; its callers now find the learned bucket.
            if st
                .buckets
                .get(&permit.key)
                .is_some_and(|b| b.in_flight == 0)
            {
                st.buckets.remove(&permit.key);
            }
        }
        learned
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.limiter.lock();
        if let Some(b) = st.buckets.get_mut(&self.key) {
            // The slot it took from `remaining` stays used: the request
            // may have reached Discord.
            b.in_flight = b.in_flight.saturating_sub(1);
        }
        drop(st);
        self.limiter.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn routes_keep_the_major_parameter_only() {
        assert_eq!(
            route("GET", "/channels/12/messages/34?limit=1"),
            ("GET /channels/:id/messages/:id".to_owned(), "12".to_owned())
        );
        assert_eq!(
            route("GET", "/users/@me/guilds?after=5"),
            ("GET /users/@me/guilds".to_owned(), String::new())
        );
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_429_reads_body_then_header_and_ignores_unusable_numbers() {
        let l = Limited::read(
            &headers(&[("retry-after", "3")]),
            br#"{"retry_after": 0.25}"#,
        );
        assert_eq!(l.wait, Duration::from_millis(250));
        assert!(!l.global && !l.shared);
        let l = Limited::read(&headers(&[("retry-after", "NaN")]), b"");
        assert_eq!(l.wait, DEFAULT_RETRY_AFTER);
        let l = Limited::read(
            &headers(&[("retry-after", "2"), ("x-ratelimit-scope", "shared")]),
            br#"{"retry_after": -1}"#,
        );
        assert_eq!((l.wait, l.shared), (Duration::from_secs(2), true));
        let l = Limited::read(&headers(&[("x-ratelimit-global", "true")]), b"{}");
        assert!(l.global);
    }

    #[tokio::test]
    async fn an_exhausted_bucket_waits_for_its_reset() {
        let rl = RateLimiter::new(Limits {
            global_per_sec: 0,
            max_wait: Duration::from_secs(5),
        });
        let p = rl
            .acquire(Scope::Bot, "GET", "/channels/1/x")
            .await
            .unwrap();
        rl.complete(
            p,
            &headers(&[
                ("x-ratelimit-bucket", "abc"),
                ("x-ratelimit-limit", "1"),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset-after", "0.2"),
            ]),
        );
        let started = Instant::now();
        let p = rl
            .acquire(Scope::Bot, "GET", "/channels/1/x")
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(190));
        drop(p);
        // Another major parameter is another bucket: no wait.
        let started = Instant::now();
        let _p = rl
            .acquire(Scope::Bot, "GET", "/channels/2/x")
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn waits_beyond_the_cap_fail_fast() {
        let rl = RateLimiter::new(Limits {
            global_per_sec: 0,
            max_wait: Duration::from_millis(100),
        });
        let p = rl.acquire(Scope::Bot, "GET", "/x").await.unwrap();
        rl.limited(
            p,
            &HeaderMap::new(),
            Limited {
                wait: Duration::from_secs(30),
                global: true,
                shared: false,
            },
        );
        let err = rl.acquire(Scope::Bot, "GET", "/y").await.unwrap_err();
        assert!(matches!(err, Error::RateLimited { .. }), "{err}");
        // A global pause of the bot does not hold back a user's token.
        rl.acquire(Scope::User(7), "GET", "/y").await.unwrap();
    }
}
