//! A real API server on 127.0.0.1:0 over a fresh `#[sqlx::test]` database
//! with migrations and policies applied, users and API tokens made the way
//! the login and `createApiToken` make them, and GraphQL calls over HTTP.

use std::net::SocketAddr;

use observer_api::{AppState, Config};
use observer_db::Db;
use serde_json::{json, Value};
use sqlx::PgPool;

pub struct TestApi {
    pub base: String,
    pub db: Db,
    pub pool: PgPool,
    pub state: AppState,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Applies the policies (MIGRATOR alone does not) and serves the API.
pub async fn start(pool: PgPool, config: Config) -> TestApi {
    start_with(pool, |_| config).await
}

/// Like [`start`], for configs that need the server's own address (PUBLIC_URL).
pub async fn start_with(pool: PgPool, config: impl FnOnce(SocketAddr) -> Config) -> TestApi {
    observer_db::migrate::apply_policies(&pool).await.unwrap();
    let db = Db::new(pool.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = AppState::new(config(addr), db.clone()).unwrap();
    let app = observer_api::app(state.clone());
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    TestApi {
        base: format!("http://{addr}"),
        db,
        pool,
        state,
        server,
    }
}

pub fn config() -> Config {
    Config {
        discord_client_id: "test-client".into(),
        discord_client_secret: "test-secret".into(),
        // Nothing listens here: tests that need Discord use the simulator.
        discord_api_base_url: "http://127.0.0.1:9".into(),
        ..Config::default()
    }
}

/// [`config`] without the per-viewer rate limit, for tests that poll the API
/// as every user again and again until it converges: far beyond a browser's
/// request rate, which is not what they test.
pub fn unthrottled_config() -> Config {
    Config {
        limits: observer_api::Limits {
            rate_burst: 100_000,
            rate_per_sec: 100_000.0,
            ..observer_api::Limits::default()
        },
        ..config()
    }
}

/// Creates a user through the auth path (as the login would).
pub async fn create_user(db: &Db, user_id: i64, username: &str) {
    let mut tx = db.auth().await.unwrap();
    observer_db::auth::upsert_user(
        &mut tx,
        &observer_db::auth::NewUser {
            user_id,
            username: username.into(),
            global_name: None,
            avatar: None,
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// Creates an API token for `user_id` the way `createApiToken` does, and
/// returns its secret.
pub async fn token_for(db: &Db, user_id: i64) -> String {
    let secret = observer_api::tokens::new_secret();
    let mut tx = db.viewer(user_id).await.unwrap();
    observer_db::viewer::create_api_token(
        &mut tx,
        user_id,
        uuid::Uuid::new_v4(),
        "test",
        &observer_api::tokens::hash_secret(&secret),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    secret
}

pub async fn gql_raw(
    base: &str,
    bearer: Option<&str>,
    query: &str,
    variables: Value,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut req = client
        .post(format!("{base}/graphql"))
        .json(&json!({ "query": query, "variables": variables }));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    (status, body)
}

/// A query that must succeed: returns `data`.
pub async fn gql(base: &str, bearer: &str, query: &str, variables: Value) -> Value {
    let (status, body) = gql_raw(base, Some(bearer), query, variables).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("errors").is_none(), "unexpected errors: {body}");
    body["data"].clone()
}

/// The `extensions.code` of the first error.
pub fn first_code(body: &Value) -> String {
    body["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or("<none>")
        .to_owned()
}
