//! `subscription messageEvents` end to end: a real server on 127.0.0.1, real
//! PostgreSQL with RLS, a tokio-tungstenite client speaking both
//! `graphql-transport-ws` and the legacy `graphql-ws`, API tokens in
//! `connection_init`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::*;
use futures::{SinkExt, StreamExt};
use observer_db::access::perms::{READ_MESSAGE_HISTORY, VIEW_CHANNEL};
use observer_db::Db;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const G1: i64 = 1_000;
const U1: i64 = 1;
const U2: i64 = 2;
const STAFF: i64 = 11;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Guild 1: 101 open to everyone, 102 staff only. U1 plain, U2 staff.
async fn seed(pool: &PgPool, db: &Db) {
    guild(pool, G1, "Acme Support", 900).await;
    role(pool, G1, G1, VIEW_CHANNEL | READ_MESSAGE_HISTORY).await;
    role(pool, G1, STAFF, 0).await;
    channel(pool, G1, 101, 0, None, "help").await;
    channel(pool, G1, 102, 0, None, "staff").await;
    overwrite(pool, G1, 102, G1, 0, 0, VIEW_CHANNEL).await;
    overwrite(pool, G1, 102, STAFF, 0, VIEW_CHANNEL, 0).await;
    member(pool, G1, U1, &[]).await;
    member(pool, G1, U2, &[STAFF]).await;
    create_user(db, U1, "alice").await;
    create_user(db, U2, "bob").await;
}

/// The worker's writes: a message and its `created` event, or an edit (with
/// the prior version kept as a revision) and its `updated` event.
async fn post(db: &Db, channel: i64, id: i64, content: &str) {
    let mut tx = db.worker().await.unwrap();
    sqlx::query(
        "insert into messages (guild_id, message_id, channel_id, author_id, author_username, \
           content, created_at, seen_create) \
         values ($1, $2, $3, 7, 'author', $4, '2026-01-01T00:00:00Z', true)",
    )
    .bind(G1)
    .bind(id)
    .bind(channel)
    .bind(content)
    .execute(&mut *tx)
    .await
    .unwrap();
    event(&mut tx, channel, id, 1).await;
    tx.commit().await.unwrap();
}

async fn edit(db: &Db, channel: i64, id: i64, old: &str, new: &str) {
    let mut tx = db.worker().await.unwrap();
    sqlx::query(
        "insert into message_revisions (guild_id, message_id, version_at, content) \
         values ($1, $2, '2026-01-01T00:00:00Z', $3)",
    )
    .bind(G1)
    .bind(id)
    .bind(old)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "update messages set content = $3, edited_at = '2026-01-01T00:05:00Z' \
         where guild_id = $1 and message_id = $2",
    )
    .bind(G1)
    .bind(id)
    .bind(new)
    .execute(&mut *tx)
    .await
    .unwrap();
    event(&mut tx, channel, id, 2).await;
    tx.commit().await.unwrap();
}

async fn event(tx: &mut observer_db::WorkerTx, channel: i64, id: i64, kind: i16) {
    sqlx::query(
        "insert into message_events (guild_id, kind, channel_id, message_id) values ($1, $2, $3, $4)",
    )
    .bind(G1)
    .bind(kind)
    .bind(channel)
    .bind(id)
    .execute(&mut **tx)
    .await
    .unwrap();
}

async fn connect(base: &str, protocol: &str, token: &str) -> Ws {
    let mut ws = open(base, protocol).await;
    send(
        &mut ws,
        json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(WsMessage::Text(v.to_string().into()))
        .await
        .unwrap();
}

/// The next protocol frame that is not a keep-alive.
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no frame within 10 s")
            .expect("connection closed")
            .unwrap();
        let WsMessage::Text(t) = frame else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] != "ka" && v["type"] != "ping" {
            return v;
        }
    }
}

const SUB: &str = "subscription($g: ID, $c: [ID!], $after: String) { \
    messageEvents(guildId: $g, channelIds: $c, after: $after) { \
      kind cursor message { id channelId content editedAt revisions { content } author { username } } } }";

/// Starts a subscription; `modern` picks the message type of the protocol.
async fn subscribe(ws: &mut Ws, modern: bool, id: &str, vars: Value) {
    let kind = if modern { "subscribe" } else { "start" };
    send(
        ws,
        json!({"id": id, "type": kind, "payload": {"query": SUB, "variables": vars}}),
    )
    .await;
}

/// The next `messageEvents` payload of subscription `id` (errors included).
async fn next_payload(ws: &mut Ws, id: &str) -> Value {
    loop {
        let m = next_json(ws).await;
        if m["id"] == id && (m["type"] == "next" || m["type"] == "data") {
            return m["payload"].clone();
        }
        assert!(m["type"] != "error", "{m}");
    }
}

/// Payloads of several subscriptions on one connection, `n` of each.
async fn collect(
    ws: &mut Ws,
    want: &[(&str, usize)],
) -> std::collections::HashMap<String, Vec<Value>> {
    let mut got: std::collections::HashMap<String, Vec<Value>> = Default::default();
    while want
        .iter()
        .any(|(id, n)| got.get(*id).map_or(0, Vec::len) < *n)
    {
        let m = next_json(ws).await;
        assert!(m["type"] != "error", "{m}");
        if m["type"] == "next" || m["type"] == "data" {
            let id = m["id"].as_str().unwrap_or_default().to_owned();
            got.entry(id).or_default().push(m["payload"].clone());
        }
    }
    got
}

async fn wait_subscribers(api: &TestApi, n: usize) {
    let start = std::time::Instant::now();
    while api.state.live.subscriber_count() < n {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "subscriptions never registered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn both_protocols_deliver_exactly_what_each_viewer_may_see(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    let t2 = token_for(&api.db, U2).await;

    let mut alice = connect(&api.base, "graphql-transport-ws", &t1).await;
    let mut bob = connect(&api.base, "graphql-ws", &t2).await;
    subscribe(&mut alice, true, "a", json!({})).await;
    subscribe(&mut bob, false, "b", json!({"g": G1.to_string()})).await;
    subscribe(&mut bob, false, "staff", json!({"c": ["102"]})).await;
    wait_subscribers(&api, 3).await;

    post(&api.db, 101, 5001, "hello").await;
    post(&api.db, 102, 5002, "staff only").await;
    edit(&api.db, 101, 5001, "hello", "hello, edited").await;

    let a1 = next_payload(&mut alice, "a").await;
    let a2 = next_payload(&mut alice, "a").await;
    assert_eq!(a1["data"]["messageEvents"]["kind"], "CREATED", "{a1}");
    assert_eq!(a1["data"]["messageEvents"]["message"]["id"], "5001");
    assert_eq!(
        a1["data"]["messageEvents"]["message"]["author"]["username"],
        "author"
    );
    // Alice cannot see 102: her next event is the edit in 101, with its revision.
    let edited = &a2["data"]["messageEvents"];
    assert_eq!(edited["kind"], "UPDATED", "{a2}");
    assert_eq!(edited["message"]["content"], "hello, edited");
    assert_eq!(
        edited["message"]["revisions"],
        json!([{"content": "hello"}])
    );

    // Both of Bob's subscriptions share one connection: frames interleave.
    let mut got = collect(&mut bob, &[("b", 3), ("staff", 1)]).await;
    let ids: Vec<Value> = got["b"]
        .iter()
        .map(|p| p["data"]["messageEvents"]["message"]["id"].clone())
        .collect();
    assert_eq!(ids, [json!("5001"), json!("5002"), json!("5001")]);
    let staff = got.remove("staff").unwrap().remove(0);
    assert_eq!(staff["data"]["messageEvents"]["message"]["id"], "5002");

    // Resume: a new connection replays what came after Alice's first event.
    let mut again = connect(&api.base, "graphql-transport-ws", &t1).await;
    let after = a1["data"]["messageEvents"]["cursor"].clone();
    subscribe(&mut again, true, "r", json!({"after": after})).await;
    let r = next_payload(&mut again, "r").await;
    assert_eq!(r["data"]["messageEvents"], a2["data"]["messageEvents"]);

    // Revocation: Bob loses the staff role; the subscription scoped to 102
    // ends with FORBIDDEN, his guild-wide one continues without 102.
    sqlx::query("update members set role_ids = '{}' where guild_id = $1 and user_id = $2")
        .bind(G1)
        .bind(U2)
        .execute(&pool)
        .await
        .unwrap();
    let ended = next_payload(&mut bob, "staff").await;
    assert_eq!(
        ended["errors"][0]["extensions"]["code"], "FORBIDDEN",
        "{ended}"
    );
    post(&api.db, 102, 5003, "after revocation").await;
    post(&api.db, 101, 5004, "public again").await;
    let next = next_payload(&mut bob, "b").await;
    assert_eq!(
        next["data"]["messageEvents"]["message"]["id"], "5004",
        "{next}"
    );

    // A malformed cursor is the client's error.
    subscribe(&mut again, true, "bad", json!({"after": "not-a-cursor"})).await;
    let bad = loop {
        let m = next_json(&mut again).await;
        if m["id"] == "bad" {
            break m;
        }
    };
    let code = if bad["type"] == "error" {
        bad["payload"][0]["extensions"]["code"].clone()
    } else {
        bad["payload"]["errors"][0]["extensions"]["code"].clone()
    };
    assert_eq!(code, "BAD_REQUEST", "{bad}");

    // The metrics endpoint shows the fan-out.
    let metrics = reqwest::get(format!("{}/metrics", api.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "observer_api_live_subscribers",
        "observer_api_live_deliveries_total",
        "observer_api_live_fanout_latency_seconds",
        "observer_api_live_slow_consumers_dropped_total",
        "observer_api_live_listener_reconnects_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

/// The `extensions.code` that ends subscription `id` (an `error` message, or
/// a payload carrying errors), skipping other traffic.
async fn end_code(ws: &mut Ws, id: &str) -> Value {
    loop {
        let m = next_json(ws).await;
        if m["id"] != id {
            continue;
        }
        if m["type"] == "error" {
            return m["payload"][0]["extensions"]["code"].clone();
        }
        if m["payload"]["errors"].is_array() {
            return m["payload"]["errors"][0]["extensions"]["code"].clone();
        }
    }
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn revoking_the_api_token_ends_its_subscriptions(pool: PgPool) {
    let mut cfg = config();
    cfg.limits.auth_recheck = Duration::from_millis(300);
    let api = start(pool.clone(), cfg).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    let t1b = token_for(&api.db, U1).await;
    let mut ws = connect(&api.base, "graphql-transport-ws", &t1).await;
    let mut other = connect(&api.base, "graphql-transport-ws", &t1b).await;
    subscribe(&mut ws, true, "a", json!({})).await;
    subscribe(&mut other, true, "b", json!({})).await;
    wait_subscribers(&api, 2).await;
    post(&api.db, 101, 7001, "before").await;
    let p = next_payload(&mut ws, "a").await;
    assert_eq!(p["data"]["messageEvents"]["message"]["id"], "7001", "{p}");

    // Revoke the first token only (as the revokeApiToken mutation does).
    let revoked_at = std::time::Instant::now();
    sqlx::query("update api_tokens set revoked_at = now() where secret_hash = $1")
        .bind(observer_api::tokens::hash_secret(&t1))
        .execute(&pool)
        .await
        .unwrap();
    let code = end_code(&mut ws, "a").await;
    println!(
        "revocation ended the subscription in {:?}",
        revoked_at.elapsed()
    );
    assert_eq!(code, "UNAUTHENTICATED");
    assert!(revoked_at.elapsed() < Duration::from_secs(10));
    // The hub let go of it; the other token's subscription goes on.
    let start = std::time::Instant::now();
    while api.state.live.subscriber_count() != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not unregistered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    post(&api.db, 101, 7002, "after").await;
    let p = next_payload(&mut other, "b").await;
    assert_eq!(p["data"]["messageEvents"]["message"]["id"], "7001", "{p}");
    let p = next_payload(&mut other, "b").await;
    assert_eq!(p["data"]["messageEvents"]["message"]["id"], "7002", "{p}");
    // A new subscription on the revoked connection fails too (the token is
    // checked again when the stream starts its first re-check).
    subscribe(&mut ws, true, "again", json!({})).await;
    assert_eq!(end_code(&mut ws, "again").await, "UNAUTHENTICATED");
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn subscriptions_are_capped_per_connection_and_per_viewer(pool: PgPool) {
    let mut cfg = config();
    cfg.limits.max_subscriptions_per_connection = 2;
    cfg.limits.max_subscriptions_per_viewer = 3;
    let api = start(pool.clone(), cfg).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    let mut a = connect(&api.base, "graphql-transport-ws", &t1).await;
    subscribe(&mut a, true, "1", json!({})).await;
    subscribe(&mut a, true, "2", json!({})).await;
    wait_subscribers(&api, 2).await;
    subscribe(&mut a, true, "3", json!({})).await;
    assert_eq!(end_code(&mut a, "3").await, "TOO_MANY_SUBSCRIPTIONS");

    let mut b = connect(&api.base, "graphql-transport-ws", &t1).await;
    subscribe(&mut b, true, "4", json!({})).await;
    wait_subscribers(&api, 3).await;
    subscribe(&mut b, true, "5", json!({})).await;
    assert_eq!(end_code(&mut b, "5").await, "TOO_MANY_SUBSCRIPTIONS");
    assert_eq!(api.state.subscription_slots.open(U1), 3);

    // Ending one frees its place.
    send(&mut a, json!({"id": "1", "type": "complete"})).await;
    let start = std::time::Instant::now();
    while api.state.subscription_slots.open(U1) != 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "slot not freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    subscribe(&mut b, true, "6", json!({})).await;
    wait_subscribers(&api, 3).await;
    post(&api.db, 101, 8001, "hi").await;
    let p = next_payload(&mut b, "6").await;
    assert_eq!(p["data"]["messageEvents"]["message"]["id"], "8001", "{p}");

    // A message larger than the body cap closes the connection.
    let big = json!({"id": "x", "type": "subscribe", "payload": {"query": "x".repeat(70 * 1024)}});
    let _ = a.send(WsMessage::Text(big.to_string().into())).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match a.next().await {
                None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => return true,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(closed, "oversized message accepted");
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn bad_tokens_count_against_the_client_address(pool: PgPool) {
    let mut cfg = config();
    cfg.limits.rate_burst = 2;
    cfg.limits.rate_per_sec = 0.001;
    let api = start(pool.clone(), cfg).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    // The address bucket is ADDRESS_RATE_FACTOR times the viewer's.
    let budget = 2 * observer_api::config::ADDRESS_RATE_FACTOR as usize;
    let mut statuses = Vec::new();
    for i in 0..budget + 2 {
        let (s, b) = gql_raw(
            &api.base,
            Some(&format!("obs_guess{i}")),
            "{ viewer { id } }",
            json!({}),
        )
        .await;
        if s == 429 {
            assert_eq!(first_code(&b), "RATE_LIMITED");
        }
        statuses.push(s);
    }
    assert_eq!(statuses[..budget], vec![401; budget], "{statuses:?}");
    assert_eq!(statuses[budget..], [429, 429], "{statuses:?}");
    // Spent for that address: a good token is limited too, before lookup,
    // and so is a WebSocket upgrade.
    let (s, _) = gql_raw(&api.base, Some(&t1), "{ viewer { id } }", json!({})).await;
    assert_eq!(s, 429);
    let req = format!("{}/graphql", api.base.replace("http://", "ws://"))
        .into_client_request()
        .unwrap();
    assert!(tokio_tungstenite::connect_async(req).await.is_err());
}

/// Renderings are shared between subscribers of one event, keyed by the whole
/// query document and its variables: each subscription still gets exactly
/// its own selection (fragments, aliases, directives with variables).
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn shared_renderings_follow_each_subscriptions_own_selection(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    let t2 = token_for(&api.db, U2).await;
    let mut alice = connect(&api.base, "graphql-transport-ws", &t1).await;
    let mut bob = connect(&api.base, "graphql-transport-ws", &t2).await;

    let plain = "subscription { messageEvents { cursor message { content } } }";
    let fragment = "subscription { messageEvents { ...F } } \
                    fragment F on MessageEvent { c: cursor kind }";
    // Same text as `fragment` but F selects something else.
    let other_fragment = "subscription { messageEvents { ...F } } \
                          fragment F on MessageEvent { c: kind }";
    let directive = "subscription($x: Boolean!) { messageEvents { \
                     message { id content @include(if: $x) } } }";
    // (on Alice's connection?, id, query, variables)
    let subs = [
        (true, "plain", plain, json!({})),
        (false, "plain", plain, json!({})),
        (false, "fragment", fragment, json!({})),
        (false, "other_fragment", other_fragment, json!({})),
        (true, "with", directive, json!({"x": true})),
        (false, "without", directive, json!({"x": false})),
    ];
    let n = subs.len();
    for (on_alice, id, query, vars) in subs {
        let ws = if on_alice { &mut alice } else { &mut bob };
        send(
            ws,
            json!({"id": id, "type": "subscribe", "payload": {"query": query, "variables": vars}}),
        )
        .await;
    }
    wait_subscribers(&api, n).await;
    post(&api.db, 101, 6001, "shared").await;

    let a = collect(&mut alice, &[("plain", 1), ("with", 1)]).await;
    let b = collect(
        &mut bob,
        &[
            ("plain", 1),
            ("fragment", 1),
            ("other_fragment", 1),
            ("without", 1),
        ],
    )
    .await;
    let ev = |p: &Value| p["data"]["messageEvents"].clone();
    let cursor = ev(&a["plain"][0])["cursor"].clone();
    assert!(cursor.is_string());
    assert_eq!(
        ev(&a["plain"][0]),
        json!({"cursor": cursor, "message": {"content": "shared"}})
    );
    assert_eq!(ev(&b["plain"][0]), ev(&a["plain"][0]));
    assert_eq!(
        ev(&b["fragment"][0]),
        json!({"c": cursor, "kind": "CREATED"})
    );
    assert_eq!(ev(&b["other_fragment"][0]), json!({"c": "CREATED"}));
    assert_eq!(
        ev(&a["with"][0]),
        json!({"message": {"id": "6001", "content": "shared"}})
    );
    assert_eq!(ev(&b["without"][0]), json!({"message": {"id": "6001"}}));
}

/// Quiet connections are kept alive: WebSocket pings on both protocols and
/// the legacy protocol's own `ka` message.
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn quiet_connections_get_keepalives(pool: PgPool) {
    let mut cfg = config();
    cfg.limits.ws_keepalive = Duration::from_secs(1);
    let api = start(pool.clone(), cfg).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    for (protocol, wants_ka) in [("graphql-transport-ws", false), ("graphql-ws", true)] {
        let mut ws = connect(&api.base, protocol, &t1).await;
        let (mut pings, mut kas) = (0, 0);
        // Pings are due at 1, 2, 3 and 4 s: two of them even on a loaded machine.
        let until = tokio::time::Instant::now() + Duration::from_millis(4500);
        while let Ok(frame) = tokio::time::timeout_at(until, ws.next()).await {
            match frame.expect("connection closed").unwrap() {
                WsMessage::Ping(_) => pings += 1,
                WsMessage::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(v["type"], "ka", "{v}");
                    kas += 1;
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        assert!(pings >= 2, "{protocol}: {pings} pings in 4.5 s");
        assert_eq!(kas > 0, wants_ka, "{protocol}: {kas} ka messages");
    }
}

/// Prior versions are history: a viewer without READ_MESSAGE_HISTORY gets an
/// edit without them even when a viewer with it subscribed with the very
/// same query (renderings are shared only between equal events).
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn shared_renderings_never_carry_history_to_viewers_without_it(pool: PgPool) {
    const U3: i64 = 3;
    const NO_HISTORY: i64 = 12;
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    role(&pool, G1, NO_HISTORY, 0).await;
    overwrite(&pool, G1, 101, NO_HISTORY, 0, 0, READ_MESSAGE_HISTORY).await;
    member(&pool, G1, U3, &[NO_HISTORY]).await;
    create_user(&api.db, U3, "carol").await;
    let t1 = token_for(&api.db, U1).await;
    let t3 = token_for(&api.db, U3).await;
    let mut alice = connect(&api.base, "graphql-transport-ws", &t1).await;
    let mut carol = connect(&api.base, "graphql-transport-ws", &t3).await;
    subscribe(&mut alice, true, "s", json!({"c": ["101"]})).await;
    subscribe(&mut carol, true, "s", json!({"c": ["101"]})).await;
    wait_subscribers(&api, 2).await;

    // Twice: which of the two renders an event first is up to the scheduler.
    for id in [7001, 7002] {
        post(&api.db, 101, id, "first").await;
        edit(&api.db, 101, id, "first", "second").await;
        let _created = next_payload(&mut alice, "s").await;
        let _created = next_payload(&mut carol, "s").await;
        let a = next_payload(&mut alice, "s").await;
        let c = next_payload(&mut carol, "s").await;
        assert_eq!(a["data"]["messageEvents"]["message"]["content"], "second");
        assert_eq!(
            a["data"]["messageEvents"]["message"]["revisions"],
            json!([{"content": "first"}]),
            "{a}"
        );
        assert_eq!(c["data"]["messageEvents"]["message"]["content"], "second");
        assert_eq!(
            c["data"]["messageEvents"]["message"]["revisions"],
            json!([]),
            "{c}"
        );
    }
}

/// A raw connection: upgraded, nothing sent yet.
async fn open(base: &str, protocol: &str) -> Ws {
    let mut req = format!("{}/graphql", base.replace("http://", "ws://"))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

/// The close code the server ends the connection with, after any text
/// frames (returned too).
async fn closed_with(ws: &mut Ws) -> (Option<u16>, Vec<Value>) {
    let mut texts = Vec::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the server never closed");
        match frame {
            Some(Ok(WsMessage::Close(c))) => return (c.map(|c| u16::from(c.code)), texts),
            Some(Ok(WsMessage::Text(t))) => texts.push(serde_json::from_str(&t).unwrap()),
            Some(Ok(_)) => {}
            None | Some(Err(_)) => return (None, texts),
        }
    }
}

/// A connection that never sends `connection_init` is closed with 4408
/// once `ws_init_timeout` has passed, on either protocol; one that does is
/// not, however long it then stays quiet.
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn connections_that_never_init_are_closed(pool: PgPool) {
    let mut cfg = config();
    cfg.limits.ws_init_timeout = Duration::from_millis(400);
    let api = start(pool.clone(), cfg).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    let started = std::time::Instant::now();
    let mut modern = open(&api.base, "graphql-transport-ws").await;
    let mut legacy = open(&api.base, "graphql-ws").await;
    let mut initialised = connect(&api.base, "graphql-transport-ws", &t1).await;
    assert_eq!(closed_with(&mut modern).await.0, Some(4408));
    let (code, texts) = closed_with(&mut legacy).await;
    assert_eq!(code, Some(4408));
    assert_eq!(
        texts.first().map(|t| t["type"].clone()),
        Some(json!("connection_error"))
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    // Past the deadline, the initialised connection still answers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(&mut initialised, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut initialised).await, json!({"type": "pong"}));
}

/// A `connection_init` refused by the rate limit closes with 1013 (Try
/// Again Later), not with 4403, which tells clients the credential is bad
/// and makes the dashboard stop reconnecting.
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn rate_limited_inits_say_try_again_later(pool: PgPool) {
    let mut cfg = config();
    cfg.limits.rate_burst = 1;
    cfg.limits.rate_per_sec = 0.001;
    let api = start(pool.clone(), cfg).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    // The address bucket holds ADDRESS_RATE_FACTOR tokens; a bad bearer on
    // HTTP, an upgrade and an init each take one.
    let budget = observer_api::config::ADDRESS_RATE_FACTOR as usize;
    assert_eq!(budget % 2, 0);
    let (status, _) = gql_raw(&api.base, Some("obs_guess"), "{ viewer { id } }", json!({})).await;
    assert_eq!(status, 401);
    for _ in 0..(budget - 2) / 2 {
        let _ok = connect(&api.base, "graphql-transport-ws", &t1).await;
    }
    // One token left: the upgrade takes it, the init finds none.
    let mut ws = open(&api.base, "graphql-transport-ws").await;
    send(
        &mut ws,
        json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {t1}")}}),
    )
    .await;
    assert_eq!(closed_with(&mut ws).await.0, Some(1013));
}

/// The edges of the protocols end with the `graphql-transport-ws` spec's
/// close codes (the legacy protocol: a `connection_error` first), and the
/// small messages get their answers.
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn protocol_edges_get_the_specs_answers(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    let sub = |id: &str| json!({"id": id, "type": "subscribe", "payload": {"query": SUB}});

    // Subscribing before the ack: 4401.
    let mut ws = open(&api.base, "graphql-transport-ws").await;
    send(&mut ws, sub("early")).await;
    assert_eq!(closed_with(&mut ws).await.0, Some(4401));

    // Not a protocol message: 4400.
    let mut ws = open(&api.base, "graphql-transport-ws").await;
    ws.send(WsMessage::Text("{not json".into())).await.unwrap();
    assert_eq!(closed_with(&mut ws).await.0, Some(4400));
    let mut ws = open(&api.base, "graphql-transport-ws").await;
    send(&mut ws, json!({"type": "no_such_type"})).await;
    assert_eq!(closed_with(&mut ws).await.0, Some(4400));

    // A refused connection_init: 4403; on the legacy protocol a
    // connection_error comes first.
    let bad = json!({"type": "connection_init", "payload": {"authorization": "Bearer obs_nope"}});
    let mut ws = open(&api.base, "graphql-transport-ws").await;
    send(&mut ws, bad.clone()).await;
    let (code, texts) = closed_with(&mut ws).await;
    assert_eq!(code, Some(4403));
    assert!(texts.is_empty(), "{texts:?}");
    let mut ws = open(&api.base, "graphql-ws").await;
    send(&mut ws, bad).await;
    let (code, texts) = closed_with(&mut ws).await;
    assert_eq!(code, Some(4403));
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert_eq!(texts[0]["type"], "connection_error");

    // A second connection_init: 4429.
    let mut ws = connect(&api.base, "graphql-transport-ws", &t1).await;
    send(&mut ws, json!({"type": "connection_init"})).await;
    assert_eq!(closed_with(&mut ws).await.0, Some(4429));

    // ping → pong; a reused subscription id: 4409.
    let mut ws = connect(&api.base, "graphql-transport-ws", &t1).await;
    send(&mut ws, json!({"type": "ping"})).await;
    let pong = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let WsMessage::Text(t) = frame {
            break serde_json::from_str::<Value>(&t).unwrap();
        }
    };
    assert_eq!(pong, json!({"type": "pong"}));
    send(&mut ws, sub("one")).await;
    wait_subscribers(&api, 1).await;
    send(&mut ws, sub("one")).await;
    assert_eq!(closed_with(&mut ws).await.0, Some(4409));

    // A query over the socket: one result, then complete. The legacy
    // protocol confirms a stop with complete.
    let mut ws = connect(&api.base, "graphql-ws", &t1).await;
    send(
        &mut ws,
        json!({"id": "q", "type": "start", "payload": {"query": "{ __typename }"}}),
    )
    .await;
    let data = next_json(&mut ws).await;
    assert_eq!(data["type"], "data", "{data}");
    assert_eq!(data["payload"]["data"]["__typename"], "Query", "{data}");
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "complete", "id": "q"})
    );
    send(
        &mut ws,
        json!({"id": "s", "type": "start", "payload": {"query": SUB}}),
    )
    .await;
    wait_subscribers(&api, 1).await;
    send(&mut ws, json!({"id": "s", "type": "stop"})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "complete", "id": "s"})
    );
    // The legacy connection_terminate: a normal close, no connection_error.
    send(&mut ws, json!({"type": "connection_terminate"})).await;
    let (code, texts) = closed_with(&mut ws).await;
    assert_eq!(code, Some(1000));
    assert!(texts.is_empty(), "{texts:?}");
}

/// Events rendered for one subscriber reach the others as pre-rendered text
/// and events not yet rendered go through GraphQL execution: whichever way
/// each one takes, every subscriber gets every event once, in log order,
/// with the same payload as everyone with its selection, under its own
/// alias and id.
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn pre_rendered_and_executed_events_keep_log_order(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    let t2 = token_for(&api.db, U2).await;
    let plain =
        "subscription { messageEvents(channelIds: [\"101\"]) { cursor message { id content } } }";
    let aliased = "subscription { ev: messageEvents(channelIds: [\"101\"]) { cursor message { id content } } }";
    let mut conns = Vec::new();
    for (i, (token, protocol, query)) in [
        (&t1, "graphql-transport-ws", plain),
        (&t2, "graphql-transport-ws", plain),
        (&t1, "graphql-ws", plain),
        (&t2, "graphql-ws", aliased),
        (&t1, "graphql-transport-ws", aliased),
    ]
    .into_iter()
    .enumerate()
    {
        let mut ws = connect(&api.base, protocol, token).await;
        let kind = if protocol == "graphql-ws" {
            "start"
        } else {
            "subscribe"
        };
        let id = format!("sub \"{i}\"");
        send(
            &mut ws,
            json!({"id": id, "type": kind, "payload": {"query": query}}),
        )
        .await;
        conns.push((
            ws,
            id,
            if query == plain {
                "messageEvents"
            } else {
                "ev"
            },
        ));
    }
    wait_subscribers(&api, conns.len()).await;

    // Batches in quick succession, so the hub hands several events at once
    // to subscribers that reach them in different orders.
    let mut want = Vec::new();
    for batch in 0..6i64 {
        let mut tx = api.db.worker().await.unwrap();
        for k in 0..10i64 {
            let id = 7000 + batch * 10 + k;
            sqlx::query(
                "insert into messages (guild_id, message_id, channel_id, author_id, author_username, \
                   content, created_at, seen_create) \
                 values ($1, $2, 101, 7, 'author', $3, '2026-01-01T00:00:00Z', true)",
            )
            .bind(G1)
            .bind(id)
            .bind(format!("m{id}"))
            .execute(&mut *tx)
            .await
            .unwrap();
            event(&mut tx, 101, id, 1).await;
            want.push(id.to_string());
        }
        tx.commit().await.unwrap();
    }

    let mut payloads = Vec::new();
    for (ws, id, key) in &mut conns {
        let got = collect(ws, &[(id.as_str(), want.len())]).await;
        let events: Vec<Value> = got[id.as_str()]
            .iter()
            .map(|p| {
                assert!(p.get("errors").is_none(), "{p}");
                p["data"][*key].clone()
            })
            .collect();
        let ids: Vec<String> = events
            .iter()
            .map(|e| e["message"]["id"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(ids, want, "subscription {id}");
        payloads.push(events);
    }
    for p in &payloads[1..] {
        assert_eq!(p, &payloads[0], "same selection, same payloads");
    }
}

/// A history page and a subscription from its `eventCursor` leave no gap: a
/// message whose writing transaction was still open when the page was read
/// (so the page cannot show it) and one committed after the page both arrive,
/// and nothing committed before the page is replayed.
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn a_history_page_continues_live_from_its_event_cursor(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    post(&api.db, 101, 5_001, "before the page").await;

    // The worker is mid-write while the page is read.
    let mut open = api.db.worker().await.unwrap();
    sqlx::query(
        "insert into messages (guild_id, message_id, channel_id, author_id, author_username, \
           content, created_at, seen_create) \
         values ($1, 5002, 101, 7, 'author', 'while the page was read', \
           '2026-01-01T00:00:01Z', true)",
    )
    .bind(G1)
    .execute(&mut *open)
    .await
    .unwrap();
    event(&mut open, 101, 5_002, 1).await;

    let page = gql(
        &api.base,
        &t1,
        "query($c: ID!) { messages(channelId: $c) { edges { node { id } } eventCursor } }",
        json!({"c": "101"}),
    )
    .await;
    let ids: Vec<&str> = page["messages"]["edges"]
        .as_array()
        .unwrap_or_else(|| panic!("{page}"))
        .iter()
        .map(|e| e["node"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["5001"], "{page}");
    let cursor = page["messages"]["eventCursor"].as_str().unwrap();

    open.commit().await.unwrap();
    post(&api.db, 101, 5_003, "after the page").await;

    let mut ws = connect(&api.base, "graphql-transport-ws", &t1).await;
    subscribe(&mut ws, true, "s", json!({"c": ["101"], "after": cursor})).await;
    let got = collect(&mut ws, &[("s", 2)]).await;
    let ids: Vec<&str> = got["s"]
        .iter()
        .map(|p| {
            p["data"]["messageEvents"]["message"]["id"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(ids, ["5002", "5003"]);

    // Search results carry no event cursor: they are not a position in a channel.
    let search = gql(
        &api.base,
        &t1,
        "{ searchMessages(query: \"page\") { eventCursor } }",
        json!({}),
    )
    .await;
    assert_eq!(
        search["searchMessages"]["eventCursor"],
        Value::Null,
        "{search}"
    );
}
