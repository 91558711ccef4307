//! Shared application state handed to every handler.

use std::sync::Arc;

use observer_db::Db;

use crate::config::Config;
use crate::discord::Discord;
use crate::graphql::ObserverSchema;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    pub discord: Arc<Discord>,
    pub schema: ObserverSchema,
    pub metrics: Arc<Metrics>,
    pub rate_limiter: Arc<RateLimiter>,
    /// Bumped on every database notification (see [`crate::replay`]).
    pub wakeups: Arc<tokio::sync::watch::Sender<u64>>,
}

impl AppState {
    /// Builds the state from configuration; fails only on invalid URLs.
    pub fn new(config: Config, db: Db) -> anyhow::Result<Self> {
        let discord = Discord::new(&config)?;
        let schema = crate::graphql::build_schema(&config.limits);
        let rate_limiter = RateLimiter::new(config.limits.rate_burst, config.limits.rate_per_sec);
        Ok(Self {
            config: Arc::new(config),
            db,
            discord: Arc::new(discord),
            schema,
            metrics: Arc::new(Metrics::new()),
            rate_limiter: Arc::new(rate_limiter),
            wakeups: Arc::new(tokio::sync::watch::channel(0).0),
        })
    }
}
