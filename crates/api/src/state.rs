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
    /// Live fan-out (one per process; its tasks start with the first subscription).
    pub live: crate::live::hub::Hub,
}

impl AppState {
    /// Builds the state from configuration; fails only on invalid URLs.
    pub fn new(config: Config, db: Db) -> anyhow::Result<Self> {
        let discord = Discord::new(&config)?;
        let schema = crate::graphql::build_schema(&config.limits);
        let rate_limiter = RateLimiter::new(config.limits.rate_burst, config.limits.rate_per_sec);
        let metrics = Metrics::new();
        let live = crate::live::hub::Hub::new(
            db.clone(),
            crate::live::hub::HubConfig::default(),
            metrics.live.clone(),
        );
        Ok(Self {
            config: Arc::new(config),
            db,
            discord: Arc::new(discord),
            schema,
            metrics: Arc::new(metrics),
            rate_limiter: Arc::new(rate_limiter),
            wakeups: Arc::new(tokio::sync::watch::channel(0).0),
            live,
        })
    }
}
