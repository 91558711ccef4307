//! Shared application state handed to every handler.

use std::sync::Arc;

use axum::extract::FromRef;
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
    /// Per viewer (per address when anonymous), after authentication.
    pub rate_limiter: Arc<RateLimiter>,
    /// Per client address, before any credential is looked up.
    pub address_limiter: Arc<RateLimiter>,
    /// Open `messageEvents` subscriptions per viewer (the per-viewer cap).
    pub subscription_slots: Arc<crate::live::conn::Slots>,
    /// Re-checks the credentials of connections with live subscriptions.
    pub credentials: crate::live::conn::Rechecker,
    /// Live fan-out (one per process; its tasks start with the first subscription).
    pub live: crate::live::hub::Hub,
}

impl AppState {
    /// Builds the state from configuration; fails only on invalid URLs.
    pub fn new(config: Config, db: Db) -> anyhow::Result<Self> {
        let schema = crate::graphql::build_schema(&config.limits);
        let rate_limiter = RateLimiter::new(config.limits.rate_burst, config.limits.rate_per_sec);
        let factor = crate::config::ADDRESS_RATE_FACTOR;
        let address_limiter = RateLimiter::new(
            config.limits.rate_burst.saturating_mul(factor),
            config.limits.rate_per_sec * f64::from(factor),
        );
        let subscription_slots =
            crate::live::conn::Slots::new(config.limits.max_subscriptions_per_viewer);
        let metrics = Metrics::new();
        let discord = Discord::new(&config, Arc::new(metrics.discord.clone()))?;
        let live = crate::live::hub::Hub::new(
            db.clone(),
            crate::live::hub::HubConfig::default(),
            metrics.live.clone(),
        );
        let credentials = crate::live::conn::Rechecker::new(db.clone(), config.limits.auth_recheck);
        Ok(Self {
            config: Arc::new(config),
            db,
            discord: Arc::new(discord),
            schema,
            metrics: Arc::new(metrics),
            rate_limiter: Arc::new(rate_limiter),
            address_limiter: Arc::new(address_limiter),
            subscription_slots: Arc::new(subscription_slots),
            credentials,
            live,
        })
    }
}

impl FromRef<AppState> for Arc<Metrics> {
    fn from_ref(state: &AppState) -> Self {
        state.metrics.clone()
    }
}
