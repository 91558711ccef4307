//! Shared test helpers: a real API server on 127.0.0.1:0 over a fresh
//! `#[sqlx::test]` database with migrations and policies applied, fixture
//! seeding as the superuser test connection, and GraphQL calls over HTTP.
#![allow(dead_code, clippy::unwrap_used)]

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

// ---------------------------------------------------------------------------
// Fixture seeding (superuser connection; reads under test go through the API)
// ---------------------------------------------------------------------------

pub async fn guild(pool: &PgPool, guild_id: i64, name: &str, owner_id: i64) {
    sqlx::query("insert into guilds (guild_id, name, owner_id) values ($1, $2, $3)")
        .bind(guild_id)
        .bind(name)
        .bind(owner_id)
        .execute(pool)
        .await
        .unwrap();
    // The @everyone role (id = guild id) with no permissions unless set.
    role(pool, guild_id, guild_id, 0).await;
}

pub async fn role(pool: &PgPool, guild_id: i64, role_id: i64, permissions: u64) {
    sqlx::query(
        "insert into roles (guild_id, role_id, name, permissions) values ($1, $2, $3, $4) \
         on conflict (guild_id, role_id) do update set permissions = excluded.permissions",
    )
    .bind(guild_id)
    .bind(role_id)
    .bind(format!("role-{role_id}"))
    .bind(permissions as i64)
    .execute(pool)
    .await
    .unwrap();
}

pub async fn channel(
    pool: &PgPool,
    guild_id: i64,
    channel_id: i64,
    kind: i16,
    parent_id: Option<i64>,
    name: &str,
) {
    sqlx::query(
        "insert into channels (guild_id, channel_id, kind, name, parent_id, position) \
         values ($1, $2, $3, $4, $5, 0)",
    )
    .bind(guild_id)
    .bind(channel_id)
    .bind(kind)
    .bind(name)
    .bind(parent_id)
    .execute(pool)
    .await
    .unwrap();
}

pub async fn overwrite(
    pool: &PgPool,
    guild_id: i64,
    channel_id: i64,
    target_id: i64,
    kind: i16,
    allow: u64,
    deny: u64,
) {
    sqlx::query(
        "insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow, deny) \
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(guild_id)
    .bind(channel_id)
    .bind(target_id)
    .bind(kind)
    .bind(allow as i64)
    .bind(deny as i64)
    .execute(pool)
    .await
    .unwrap();
}

pub async fn member(pool: &PgPool, guild_id: i64, user_id: i64, roles: &[i64]) {
    sqlx::query("insert into members (guild_id, user_id, role_ids) values ($1, $2, $3)")
        .bind(guild_id)
        .bind(user_id)
        .bind(roles)
        .execute(pool)
        .await
        .unwrap();
}

pub async fn thread_member(pool: &PgPool, guild_id: i64, thread_id: i64, user_id: i64) {
    sqlx::query("insert into thread_members (guild_id, thread_id, user_id) values ($1, $2, $3)")
        .bind(guild_id)
        .bind(thread_id)
        .bind(user_id)
        .execute(pool)
        .await
        .unwrap();
}

/// Inserts a message created at `message_id` seconds after 2026-01-01.
pub async fn message(
    pool: &PgPool,
    guild_id: i64,
    channel_id: i64,
    message_id: i64,
    author_id: i64,
    content: &str,
) {
    sqlx::query(
        "insert into messages (guild_id, message_id, channel_id, author_id, author_username, \
           content, created_at, seen_create) \
         values ($1, $2, $3, $4, $5, $6, timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => $7), true)",
    )
    .bind(guild_id)
    .bind(message_id)
    .bind(channel_id)
    .bind(author_id)
    .bind(format!("user{author_id}"))
    .bind(content)
    .bind((message_id % 1_000_000) as f64)
    .execute(pool)
    .await
    .unwrap();
}
