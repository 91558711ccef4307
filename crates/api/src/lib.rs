//! observer-api: the HTTP/GraphQL API of Support Observer (docs/fan-out.md, docs/interfaces.md).
//!
//! Layout:
//! - [`config`]: [`Config`] and [`Limits`] (the binary maps env vars/flags onto them).
//! - [`state`]: [`AppState`], shared by every handler.
//! - [`login`]: Discord OAuth login/callback/logout (axum-login, PostgreSQL sessions).
//! - [`discord`]: OAuth2 and `/users/@me...` REST client (any Discord-compatible base URL).
//! - [`graphql`]: the schema (queries under RLS, mutations, subscription field).
//! - [`http`]: `POST /graphql`, `GET /graphql` (WebSocket or query page), auth resolution.
//! - [`live`]: live fan-out: the shared hub behind `messageEvents` (one LISTEN, one read per notification).
//! - [`tokens`]: API token secrets and their hashes.
//! - [`viewer`]: [`viewer::Viewer`], who is asking; below both GraphQL and live fan-out.
//! - [`ratelimit`]: per-viewer token buckets.
//! - [`metrics`]: Prometheus counters/histograms and their middleware.
//! - [`refresh`]: background refresh of viewers' memberships with their OAuth tokens.
//! - [`pages`]: GraphiQL and the dashboard (web/), embedded in the binary.
//! - [`error`]: GraphQL `extensions.code` values and internal-error logging.

pub mod config;
pub mod discord;
pub mod error;
pub mod graphql;
pub mod http;
pub mod live;
pub mod login;
pub mod metrics;
pub mod pages;
pub mod ratelimit;
pub mod refresh;
pub mod state;
pub mod tokens;
pub mod viewer;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use axum::Router;
use axum_login::AuthManagerLayerBuilder;
use observer_db::Db;
use tokio::net::TcpListener;
use tower_sessions::cookie::SameSite;
use tower_sessions::{Expiry, SessionManagerLayer};
use tower_sessions_sqlx_store::PostgresStore;

pub use config::{Config, Limits};
pub use graphql::{build_schema, sdl};
pub use state::AppState;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "observer_session";

/// The whole HTTP surface (routes of docs/interfaces.md).
pub fn app(state: AppState) -> Router {
    // The table `tower_sessions.session` comes from our migrations; never
    // `store.migrate()`, which needs CREATE on the database.
    let store = PostgresStore::new(state.db.pool().clone());
    let ttl = time_duration(state.config.session_ttl);
    let sessions = SessionManagerLayer::new(store)
        .with_name(SESSION_COOKIE)
        .with_http_only(true)
        .with_same_site(SameSite::Lax)
        .with_secure(state.config.secure_cookies())
        .with_path("/")
        .with_expiry(Expiry::OnInactivity(ttl));
    let backend = login::Backend {
        db: state.db.clone(),
        discord: state.discord.clone(),
    };
    let auth = AuthManagerLayerBuilder::new(backend, sessions).build();

    let routes = Router::new()
        .route("/", get(pages::dashboard))
        .route("/assets/{*path}", get(pages::asset))
        .route("/auth/login", get(login::login))
        .route("/auth/callback", get(login::callback))
        .route("/auth/logout", post(login::logout))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::handler));
    let routes = http::bounded(routes, &state.config.limits)
        .route("/graphql", http::graphql_route(&state))
        .layer(auth)
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            metrics::track,
        ))
        .with_state(state);
    http::outer_layers(routes)
}

pub(crate) fn time_duration(d: Duration) -> tower_sessions::cookie::time::Duration {
    tower_sessions::cookie::time::Duration::seconds(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the database answers as the API role.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let probe = async {
        let mut tx = state.db.viewer(0).await?;
        observer_db::viewer::ping(&mut tx).await?;
        tx.rollback().await
    };
    match tokio::time::timeout(Duration::from_secs(3), probe).await {
        Ok(Ok(())) => (StatusCode::OK, "ready"),
        Ok(Err(e)) => {
            tracing::warn!(error = %error::error_chain(&e), "readiness probe failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database timeout"),
    }
}

/// Serves the API on `listener` until `shutdown` resolves, with the
/// background jobs (expired-session cleanup, membership refresh).
pub async fn run(
    config: Config,
    db: Db,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = AppState::new(config, db).context("building API state")?;
    let store = PostgresStore::new(state.db.pool().clone());
    let cleanup = tokio::spawn(async move {
        use tower_sessions::session_store::ExpiredDeletion;
        if let Err(e) = store
            .continuously_delete_expired(Duration::from_secs(300))
            .await
        {
            tracing::error!(error = %e, "expired-session cleanup stopped");
        }
    });
    let refresher = tokio::spawn(refresh::run(state.clone()));
    // The hub holds the process's one LISTEN connection.
    state.live.run();
    let state_live = state.live.clone();
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "api listening");
    // Subscription frames are small writes: without TCP_NODELAY, Nagle holds
    // each one until the client ACKs the previous (up to its 40 ms delayed ACK).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    let served = axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    cleanup.abort();
    refresher.abort();
    state_live.shutdown();
    served.context("serving HTTP")
}
