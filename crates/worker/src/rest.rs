//! The worker's Discord REST client: `observer_discord::Client` (bucket and
//! global rate limits, the invalid-request guard, retries) wired to the
//! worker's metrics.

use std::sync::Arc;

use anyhow::Context as _;
pub use observer_discord::{Client as Rest, Error as RestError, Fetched};

use crate::metrics::Metrics;

/// Counts the client's events in the worker's Prometheus metrics.
struct Counted(Arc<Metrics>);

impl observer_discord::Observer for Counted {
    fn rate_limited(&self, _route: &str, _global: bool) {
        self.0.backfill_rate_limited.inc();
    }

    fn gave_up(&self, _route: &str) {
        self.0.rest_rate_limit_give_ups.inc();
    }

    fn forbidden(&self, _route: &str, _code: Option<u64>) {
        self.0.rest_forbidden.inc();
    }

    fn invalid_request(&self, _route: &str, in_window: usize) {
        self.0
            .rest_invalid_requests
            .set(i64::try_from(in_window).unwrap_or(i64::MAX));
    }

    fn budget_refused(&self, _route: &str) {
        self.0.rest_budget_refusals.inc();
    }

    fn retrying(&self, _route: &str, _after: std::time::Duration) {
        self.0.rest_retries.inc();
    }
}

/// The client for `config`'s Discord, counting into `metrics`.
pub fn client(config: &crate::Config, metrics: &Arc<Metrics>) -> anyhow::Result<Rest> {
    Rest::builder(config.base())
        .bot_token(config.discord_token.clone())
        .options(config.rest.clone())
        .observer(Arc::new(Counted(Arc::clone(metrics))))
        .build()
        .context("building the Discord REST client")
}

/// Messages per history page (Discord's maximum).
pub const PAGE: usize = 100;

/// Why a pass over a channel's history (backfill or reconciliation) stopped.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{0}")]
    Rest(#[from] RestError),
    #[error("database: {0}")]
    Db(#[from] observer_db::Error),
    #[error("the ingest queue is closed")]
    Closed,
    #[error("unparseable answer: {0}")]
    Unparseable(String),
}
