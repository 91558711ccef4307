//! Discord OAuth login end to end against the simulator (never the internet):
//! the full flow with cookies, CSRF state, PKCE, open redirects, logout,
//! cookie attributes, membership sync and the background refresh.
#![allow(clippy::unwrap_used)]

use crate::common::*;
use observer_db::access::perms::{READ_MESSAGE_HISTORY, VIEW_CHANNEL};
use observer_sim::{Scenario, SimConfig, Simulator};
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use serde_json::{json, Value};
use sqlx::PgPool;

const G1: i64 = 1_000;
const G2: i64 = 2_000;
const STAFF: i64 = 11;
const ALICE: i64 = 1;

struct Env {
    api: TestApi,
    sim: Simulator,
    http: reqwest::Client,
}

/// Simulator with alice in guild 1 (not guild 2); database with both guilds,
/// a staff-only channel, and a stale membership of alice in guild 2 that the
/// login must remove.
async fn env(pool: PgPool) -> Env {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let scenario: Scenario = serde_json::from_value(json!({
        "users": [
            {"id": "1", "username": "alice"},
            {"id": "900", "username": "owner"}
        ],
        "guilds": [
            {"id": "1000", "name": "Acme", "owner_id": "900",
             "roles": [{"id": "1000", "name": "@everyone", "permissions": (VIEW_CHANNEL | READ_MESSAGE_HISTORY).to_string()},
                       {"id": "11", "name": "staff", "permissions": "0"}],
             "members": [{"user_id": "1", "roles": []}, {"user_id": "900", "roles": []}]},
            {"id": "2000", "name": "Other", "owner_id": "900",
             "roles": [{"id": "2000", "name": "@everyone", "permissions": (VIEW_CHANNEL | READ_MESSAGE_HISTORY).to_string()}],
             "members": [{"user_id": "900", "roles": []}]}
        ]
    }))
    .unwrap();
    sim.load(scenario);
    let sim_base = sim.base_url();
    let client_id = sim.config().client_id.clone();
    let client_secret = sim.config().client_secret.clone();
    let api = start_with(pool.clone(), move |addr| observer_api::Config {
        public_url: format!("http://{addr}"),
        discord_client_id: client_id,
        discord_client_secret: client_secret.into(),
        discord_api_base_url: sim_base,
        ..observer_api::Config::default()
    })
    .await;
    for (g, name) in [(G1, "Acme"), (G2, "Other")] {
        guild(&pool, g, name, 900).await;
        role(&pool, g, g, VIEW_CHANNEL | READ_MESSAGE_HISTORY).await;
        channel(&pool, g, g + 1, 0, None, "general").await;
    }
    role(&pool, G1, STAFF, 0).await;
    channel(&pool, G1, 1_002, 0, None, "staff").await;
    overwrite(&pool, G1, 1_002, G1, 0, 0, VIEW_CHANNEL).await;
    overwrite(&pool, G1, 1_002, STAFF, 0, VIEW_CHANNEL, 0).await;
    member(&pool, G2, ALICE, &[]).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Env { api, sim, http }
}

/// `name=value` of our session cookie in a response, with its attributes.
fn session_cookie(resp: &reqwest::Response) -> Option<(String, String)> {
    resp.headers().get_all(SET_COOKIE).iter().find_map(|v| {
        let s = v.to_str().ok()?;
        let pair = s.split(';').next()?.trim().to_owned();
        pair.starts_with(&format!("{}=", observer_api::SESSION_COOKIE))
            .then(|| (pair, s.to_owned()))
    })
}

fn location(resp: &reqwest::Response) -> String {
    resp.headers()
        .get(LOCATION)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

/// Steps 1-2: `/auth/login`, then the simulator's non-interactive authorize.
/// Returns (pre-login cookie, callback URL).
async fn begin(env: &Env, next: &str, tamper: impl Fn(String) -> String) -> (String, String) {
    let r = env
        .http
        .get(format!("{}/auth/login?next={next}", env.api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303, "{:?}", r.text().await);
    let (cookie, _) = session_cookie(&r).expect("login sets a session cookie");
    let authorize = location(&r);
    assert!(authorize.starts_with(&format!("{}/oauth2/authorize?", env.sim.base_url())));
    for needle in [
        "code_challenge_method=S256",
        "state=",
        "identify",
        "guilds.members.read",
        "response_type=code",
    ] {
        assert!(authorize.contains(needle), "{authorize} lacks {needle}");
    }
    let r = env
        .http
        .get(format!("{}&login_as={ALICE}", tamper(authorize)))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection(), "{}", r.status());
    let callback = location(&r);
    assert!(
        callback.starts_with(&format!("{}/auth/callback?", env.api.base)),
        "{callback}"
    );
    (cookie, callback)
}

/// Step 3: the browser returns to the callback with its pre-login cookie.
async fn callback_with(env: &Env, cookie: &str, callback: &str) -> reqwest::Response {
    env.http
        .get(callback)
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap()
}

async fn gql_cookie(env: &Env, cookie: &str, query: &str) -> Value {
    env.http
        .post(format!("{}/graphql", env.api.base))
        .header(COOKIE, cookie)
        .json(&json!({ "query": query }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn session_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from tower_sessions.session")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn full_login_flow_rotates_session_syncs_memberships_and_logs_out(pool: PgPool) {
    let env = env(pool.clone()).await;
    let (pre, callback) = begin(&env, "/graphql", |u| u).await;

    let r = callback_with(&env, &pre, &callback).await;
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(location(&r), "/graphql");
    let (post, attrs) = session_cookie(&r).expect("login sets the session cookie");
    assert_ne!(pre, post, "session id rotated at login");
    let lower = attrs.to_ascii_lowercase();
    assert!(lower.contains("httponly"), "{attrs}");
    assert!(lower.contains("samesite=lax"), "{attrs}");
    assert!(
        !lower.contains("secure"),
        "http PUBLIC_URL: no Secure ({attrs})"
    );

    let d = gql_cookie(
        &env,
        &post,
        "{ viewer { id username } guilds { id channels { id } } }",
    )
    .await;
    assert_eq!(d["data"]["viewer"], json!({"id": "1", "username": "alice"}));
    // Stale membership in guild 2 removed; guild 1 membership fetched.
    assert_eq!(
        d["data"]["guilds"],
        json!([{"id": "1000", "channels": [{"id": "1001"}]}])
    );

    // The pre-login session id is dead.
    let d = gql_cookie(&env, &pre, "{ viewer { id } }").await;
    assert_eq!(first_code(&d), "UNAUTHENTICATED");

    // Tokens stored for the refresh; the role change in Discord reaches us
    // through the background refresh, even with an expired access token.
    env.sim
        .set_member_roles(G1 as u64, ALICE as u64, vec![STAFF as u64])
        .unwrap();
    let old_access: String =
        sqlx::query_scalar("select access_token from oauth_tokens where user_id = 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    sqlx::query("update oauth_tokens set expires_at = now() - interval '1 hour'")
        .execute(&pool)
        .await
        .unwrap();
    observer_api::refresh::refresh_user(&env.api.state, ALICE)
        .await
        .unwrap();
    let new_access: String =
        sqlx::query_scalar("select access_token from oauth_tokens where user_id = 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_ne!(old_access, new_access, "expired token refreshed");
    let d = gql_cookie(&env, &post, "{ guilds { channels { id } } }").await;
    assert_eq!(
        d["data"]["guilds"][0]["channels"],
        json!([{"id": "1001"}, {"id": "1002"}])
    );
    // The scheduled pass picks users whose memberships are older than the interval.
    let n = observer_api::refresh::refresh_due(&env.api.state, std::time::Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(n, 1);

    // WebSockets honour the cookie only from our own origin.
    message(&pool, G1, 1_001, 5_000, ALICE, "hello").await;
    sqlx::query("insert into message_events (guild_id, kind, channel_id, message_id) values (1000, 1, 1001, 5000)")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(ws_subscribe(&env, &post, &env.api.base.clone()).await, None);
    assert_eq!(
        ws_subscribe(&env, &post, "http://evil.example")
            .await
            .as_deref(),
        Some("UNAUTHENTICATED")
    );

    // A live subscription of that session (no replay: it stays quiet)...
    let mut live = ws_live(&env, &post).await;
    let start = std::time::Instant::now();
    while env.api.state.live.subscriber_count() < 1 {
        assert!(start.elapsed() < std::time::Duration::from_secs(30));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // Logout destroys the server-side session; the old cookie is worthless.
    let logged_out = std::time::Instant::now();
    let r = env
        .http
        .post(format!("{}/auth/logout", env.api.base))
        .header(COOKIE, &post)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(session_rows(&pool).await, 0);
    let d = gql_cookie(&env, &post, "{ viewer { id } }").await;
    assert_eq!(first_code(&d), "UNAUTHENTICATED");
    // ...and the open subscription ends with UNAUTHENTICATED (re-checked
    // every `auth_recheck`, 5 s by default).
    assert_eq!(
        ws_end_code(&mut live).await.as_deref(),
        Some("UNAUTHENTICATED")
    );
    println!(
        "logout ended the subscription after {:?}",
        logged_out.elapsed()
    );
    env.sim.shutdown().await;
}

/// The code exchange goes through the shared Discord client: a 429 on the
/// token endpoint is waited out and retried (the code has not been used), and
/// the login completes.
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn a_rate_limited_token_grant_is_retried_and_the_login_completes(pool: PgPool) {
    let env = env(pool.clone()).await;
    let (pre, callback) = begin(&env, "/graphql", |u| u).await;
    let before = env.sim.rate_stats().injected_429s;
    // The callback's first Discord request is the token grant.
    env.sim.rate_limit_burst(1);
    let r = callback_with(&env, &pre, &callback).await;
    assert_eq!(r.status().as_u16(), 303, "{:?}", r.text().await);
    assert_eq!(env.sim.rate_stats().injected_429s, before + 1);
    let seen = &env.api.state.metrics.discord;
    assert_eq!(
        seen.rate_limited.get(),
        1,
        "counted in observer_api_discord_*"
    );
    assert_eq!(seen.invalid_requests.get(), 1);
    let (post, _) = session_cookie(&r).expect("login sets the session cookie");
    let d = gql_cookie(&env, &post, "{ viewer { id } }").await;
    assert_eq!(d["data"]["viewer"], json!({"id": "1"}), "{d}");
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn bad_state_is_refused_without_a_session(pool: PgPool) {
    let env = env(pool.clone()).await;
    let (pre, callback) = begin(&env, "/", |u| u).await;
    let mut url = url::Url::parse(&callback).unwrap();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "state" {
                format!("{v}x")
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    url.query_pairs_mut().clear().extend_pairs(pairs);
    let r = env
        .http
        .get(url.as_str())
        .header(COOKIE, &pre)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(session_rows(&pool).await, 0, "no session survives");
    let d = gql_cookie(&env, &pre, "{ viewer { id } }").await;
    assert_eq!(first_code(&d), "UNAUTHENTICATED");
    let users: i64 = sqlx::query_scalar("select count(*) from users")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(users, 0, "the code was never exchanged");

    // A callback without any login in progress (no cookie) is refused too,
    // and the state cannot be replayed after a failure.
    let r = env.http.get(&callback).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = callback_with(&env, &pre, &callback).await;
    assert_eq!(r.status().as_u16(), 400);
    env.sim.shutdown().await;
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn wrong_pkce_verifier_gives_no_session(pool: PgPool) {
    let env = env(pool.clone()).await;
    // Swap the challenge Discord sees: our stored verifier no longer matches it.
    let (pre, callback) = begin(&env, "/", |u| {
        let mut url = url::Url::parse(&u).unwrap();
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "code_challenge" {
                    "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
        url.to_string()
    })
    .await;
    let r = callback_with(&env, &pre, &callback).await;
    assert_eq!(r.status().as_u16(), 401);
    assert!(session_cookie(&r).map(|(p, _)| p != pre).unwrap_or(true));
    assert_eq!(session_rows(&pool).await, 0);
    let d = gql_cookie(&env, &pre, "{ viewer { id } }").await;
    assert_eq!(first_code(&d), "UNAUTHENTICATED");
    env.sim.shutdown().await;
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn open_redirects_are_refused(pool: PgPool) {
    let env = env(pool.clone()).await;
    for next in [
        "//evil.example",
        "https://evil.example",
        "/%5Cevil.example",
        "evil.example",
    ] {
        let r = env
            .http
            .get(format!("{}/auth/login?next={next}", env.api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "next={next}");
        assert!(r.headers().get(LOCATION).is_none());
    }
    env.sim.shutdown().await;
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn cookies_are_secure_when_public_url_is_https(pool: PgPool) {
    let api = start(
        pool,
        observer_api::Config {
            public_url: "https://observer.example".into(),
            ..config()
        },
    )
    .await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http
        .get(format!("{}/auth/login", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let (_, attrs) = session_cookie(&r).unwrap();
    let lower = attrs.to_ascii_lowercase();
    assert!(
        lower.contains("secure") && lower.contains("httponly") && lower.contains("samesite=lax"),
        "{attrs}"
    );
    assert!(location(&r).contains("redirect_uri=https%3A%2F%2Fobserver.example%2Fauth%2Fcallback"));
}

/// Opens a graphql-transport-ws connection with `cookie` and `origin`,
/// subscribes from the start of the event log, and returns the error code if
/// the subscription was refused (`None` if it delivered an event).
async fn ws_subscribe(env: &Env, cookie: &str, origin: &str) -> Option<String> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    let mut req = format!("{}/graphql", env.api.base.replace("http://", "ws://"))
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    h.insert("cookie", cookie.parse().unwrap());
    h.insert("origin", origin.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let send = |v: Value| WsMessage::Text(v.to_string().into());
    // Replays from the very start of the log, so an accepted subscription
    // answers at once.
    let from_start =
        observer_api::live::gql::format_cursor(observer_db::events::Cursor::new(0, -1));
    ws.send(send(json!({"type": "connection_init"})))
        .await
        .unwrap();
    ws.send(send(json!({"id": "1", "type": "subscribe", "payload": {
        "query": "subscription($a: String) { messageEvents(after: $a) { cursor } }",
        "variables": {"a": from_start}}})))
        .await
        .unwrap();
    loop {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let WsMessage::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        match v["type"].as_str().unwrap() {
            "connection_ack" => continue,
            // Resolver errors arrive as a `next` frame carrying `errors`.
            "next" => {
                return v["payload"]["errors"][0]["extensions"]["code"]
                    .as_str()
                    .map(str::to_owned)
            }
            "error" => {
                return v["payload"][0]["extensions"]["code"]
                    .as_str()
                    .map(str::to_owned)
            }
            other => panic!("unexpected frame {other}: {v}"),
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A graphql-transport-ws connection authenticated by `cookie` (same
/// origin) with one live `messageEvents` subscription, id "live".
async fn ws_live(env: &Env, cookie: &str) -> Ws {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    let mut req = format!("{}/graphql", env.api.base.replace("http://", "ws://"))
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    h.insert("cookie", cookie.parse().unwrap());
    h.insert("origin", env.api.base.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let send = |v: Value| WsMessage::Text(v.to_string().into());
    ws.send(send(json!({"type": "connection_init"})))
        .await
        .unwrap();
    ws.send(send(json!({"id": "live", "type": "subscribe", "payload": {
        "query": "subscription { messageEvents { cursor } }"}})))
        .await
        .unwrap();
    ws
}

/// The code that ends subscription "live" (None: it delivered an event).
async fn ws_end_code(ws: &mut Ws) -> Option<String> {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    loop {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(20), ws.next())
            .await
            .expect("the subscription did not end within 20 s")
            .unwrap()
            .unwrap();
        let WsMessage::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        match v["type"].as_str().unwrap() {
            "next" => {
                return v["payload"]["errors"][0]["extensions"]["code"]
                    .as_str()
                    .map(str::to_owned)
            }
            "error" => {
                return v["payload"][0]["extensions"]["code"]
                    .as_str()
                    .map(str::to_owned)
            }
            _ => continue,
        }
    }
}
