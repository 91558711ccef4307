//! Prometheus metrics: HTTP requests, latencies and GraphQL errors by code.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOnly {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteLabels, Counter>,
    pub latency: Family<RouteOnly, Histogram>,
    pub graphql_errors: Family<CodeLabels, Counter>,
    pub logins: Family<CodeLabels, Counter>,
    /// Live fan-out (`observer_api_live_*`).
    pub live: crate::live::metrics::LiveMetrics,
    /// Requests to Discord (`observer_api_discord_*`).
    pub discord: DiscordMetrics,
}

/// What the API's Discord client met (OAuth grants, `/users/@me…`): the same
/// hooks the worker counts, so rate limits and the invalid-request budget
/// show on both services' dashboards. No route label: paths carry ids.
#[derive(Clone, Debug, Default)]
pub struct DiscordMetrics {
    pub rate_limited: Counter,
    pub gave_up: Counter,
    pub forbidden: Counter,
    /// 401/403/429 in the guard's rolling 10-minute window (Discord bans the
    /// IP, the whole deployment, at 10,000).
    pub invalid_requests: Gauge,
    pub budget_refusals: Counter,
    pub retries: Counter,
}

impl DiscordMetrics {
    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("discord");
        r.register(
            "rate_limited",
            "429 answers from Discord",
            self.rate_limited.clone(),
        );
        r.register(
            "rate_limit_give_ups",
            "Requests abandoned after too many 429 answers",
            self.gave_up.clone(),
        );
        r.register(
            "forbidden",
            "403 answers from Discord",
            self.forbidden.clone(),
        );
        r.register(
            "invalid_requests",
            "401/403/429 answers in the rolling 10-minute window",
            self.invalid_requests.clone(),
        );
        r.register(
            "budget_refusals",
            "Requests refused before Discord's invalid-request ban threshold",
            self.budget_refusals.clone(),
        );
        r.register(
            "retries",
            "Requests retried after a connection error or 5xx",
            self.retries.clone(),
        );
    }
}

impl observer_discord::Observer for DiscordMetrics {
    fn rate_limited(&self, _route: &str, _global: bool) {
        self.rate_limited.inc();
    }

    fn gave_up(&self, _route: &str) {
        self.gave_up.inc();
    }

    fn forbidden(&self, _route: &str, _code: Option<u64>) {
        self.forbidden.inc();
    }

    fn invalid_request(&self, _route: &str, in_window: usize) {
        self.invalid_requests
            .set(i64::try_from(in_window).unwrap_or(i64::MAX));
    }

    fn budget_refused(&self, _route: &str) {
        self.budget_refusals.inc();
    }

    fn retrying(&self, _route: &str, _after: std::time::Duration) {
        self.retries.inc();
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("observer_api");
        let requests = Family::<RouteLabels, Counter>::default();
        let latency = Family::<RouteOnly, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let graphql_errors = Family::<CodeLabels, Counter>::default();
        let logins = Family::<CodeLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests served", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            latency.clone(),
        );
        registry.register(
            "graphql_errors",
            "GraphQL errors returned, by extensions.code",
            graphql_errors.clone(),
        );
        registry.register("logins", "OAuth login attempts by outcome", logins.clone());
        let live = crate::live::metrics::LiveMetrics::default();
        live.register(&mut registry);
        let discord = DiscordMetrics::default();
        discord.register(&mut registry);
        Self {
            registry,
            requests,
            latency,
            graphql_errors,
            logins,
            live,
            discord,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }

    pub fn graphql_error(&self, code: &str) {
        self.graphql_errors
            .get_or_create(&CodeLabels {
                code: code.to_owned(),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Middleware recording every request by its route template (not the raw
/// path, which would explode label cardinality).
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(req.method()).to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    metrics
        .latency
        .get_or_create(&RouteOnly {
            route: route.clone(),
        })
        .observe(start.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RouteLabels {
            method,
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

/// The method as a label: the standard ones, else `OTHER` (clients may send
/// any token as a method; each would otherwise be a new series).
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// `GET /metrics`. Takes the metrics alone (the application state hands them
/// out through `FromRef`), so this module needs nothing from `state`.
pub async fn handler(State(metrics): State<Arc<Metrics>>) -> Response {
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::method_label;
    use axum::http::Method;

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::POST), "POST");
        for m in ["FOO", "BREW", "X-ANYTHING"] {
            let m = Method::from_bytes(m.as_bytes()).unwrap_or(Method::GET);
            assert_ne!(m, Method::GET);
            assert_eq!(method_label(&m), "OTHER");
        }
    }
}
