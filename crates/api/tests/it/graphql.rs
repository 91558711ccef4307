//! GraphQL over HTTP against a real server and real PostgreSQL with the RLS
//! policies applied: queries, pagination, search, tokens, setObserverRoles,
//! limits, and "forbidden looks exactly like nonexistent".
#![allow(clippy::unwrap_used)]

use crate::common::*;
use observer_db::access::perms::{ADMINISTRATOR, MANAGE_GUILD, READ_MESSAGE_HISTORY, VIEW_CHANNEL};
use serde_json::{json, Value};
use sha2::Digest;
use sqlx::PgPool;

const G1: i64 = 1_000;
const G2: i64 = 2_000;
const OWNER1: i64 = 900;
const U1: i64 = 1;
const U2: i64 = 2;
const U3: i64 = 3;
const STAFF: i64 = 11;
const ADMIN: i64 = 12;

/// Guild 1: public text 101, staff-only 102, category 103 with forum 104 and
/// its public thread 105, private thread 106 of 101 (U2 is a thread member),
/// 107 visible without history. Guild 2 (another tenant): text 201.
async fn seed(pool: &PgPool, db: &observer_db::Db) {
    guild(pool, G1, "Acme Support", OWNER1).await;
    role(pool, G1, G1, VIEW_CHANNEL | READ_MESSAGE_HISTORY).await;
    role(pool, G1, STAFF, MANAGE_GUILD).await;
    role(pool, G1, ADMIN, ADMINISTRATOR).await;
    channel(pool, G1, 101, 0, None, "help").await;
    channel(pool, G1, 102, 0, None, "staff").await;
    overwrite(pool, G1, 102, G1, 0, 0, VIEW_CHANNEL).await;
    overwrite(pool, G1, 102, STAFF, 0, VIEW_CHANNEL, 0).await;
    channel(pool, G1, 103, 4, None, "Tickets").await;
    channel(pool, G1, 104, 15, Some(103), "tickets").await;
    channel(pool, G1, 105, 11, Some(104), "ticket-1").await;
    channel(pool, G1, 106, 12, Some(101), "private-thread").await;
    channel(pool, G1, 107, 0, None, "announcements-no-history").await;
    overwrite(pool, G1, 107, G1, 0, 0, READ_MESSAGE_HISTORY).await;
    member(pool, G1, U1, &[]).await;
    member(pool, G1, U2, &[STAFF]).await;
    member(pool, G1, OWNER1, &[]).await;
    thread_member(pool, G1, 106, U2).await;

    guild(pool, G2, "Other Tenant", U3).await;
    role(pool, G2, G2, VIEW_CHANNEL | READ_MESSAGE_HISTORY).await;
    channel(pool, G2, 201, 0, None, "general").await;
    member(pool, G2, U3, &[]).await;

    for i in 1..=60 {
        message(
            pool,
            G1,
            101,
            1_000 + i,
            U1,
            &format!("hello world number {i}"),
        )
        .await;
    }
    message(
        pool,
        G1,
        101,
        1_061,
        U1,
        "refund please, my order is broken",
    )
    .await;
    message(pool, G1, 102, 1_062, U2, "staff only: refund approved").await;
    message(pool, G1, 106, 1_063, U2, "private thread refund details").await;
    message(pool, G1, 107, 1_064, OWNER1, "no history refund").await;
    message(pool, G1, 105, 1_065, U1, "ticket thread about shipping").await;
    message(
        pool,
        G2,
        201,
        2_001,
        U3,
        "secret refund of the other tenant",
    )
    .await;

    for (u, name) in [(U1, "alice"), (U2, "bob"), (U3, "carol"), (OWNER1, "owner")] {
        create_user(db, u, name).await;
    }
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

fn edge_ids(conn: &Value) -> Vec<i64> {
    conn["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"]["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn viewer_guilds_and_channels_follow_the_access_rule(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    let t2 = token_for(&api.db, U2).await;
    let t3 = token_for(&api.db, U3).await;

    let q = "{ viewer { id username avatarUrl } guilds { id name observerRoleIds channels { id guildId parentId name kind position } } }";
    let d1 = gql(&api.base, &t1, q, json!({})).await;
    assert_eq!(
        d1["viewer"],
        json!({"id": "1", "username": "alice", "avatarUrl": null})
    );
    assert_eq!(ids(&d1["guilds"]), vec![G1]);
    let mut ch1 = ids(&d1["guilds"][0]["channels"]);
    ch1.sort();
    assert_eq!(ch1, vec![101, 103, 104, 105, 107]);
    let forum = d1["guilds"][0]["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "104")
        .unwrap();
    assert_eq!(forum["kind"], "FORUM");
    assert_eq!(forum["parentId"], "103");
    assert_eq!(forum["guildId"], "1000");

    let d2 = gql(&api.base, &t2, q, json!({})).await;
    let mut ch2 = ids(&d2["guilds"][0]["channels"]);
    ch2.sort();
    assert_eq!(ch2, vec![101, 102, 103, 104, 105, 106, 107]);

    let d3 = gql(&api.base, &t3, q, json!({})).await;
    assert_eq!(ids(&d3["guilds"]), vec![G2]);

    // guild(id) of another tenant: exactly like a guild that does not exist.
    let probe = |id: &str| {
        format!("{{ guild(id: \"{id}\") {{ id name }} channel(id: \"{id}\") {{ id }} message(id: \"{id}\") {{ id }} }}")
    };
    let other = gql_raw(&api.base, Some(&t1), &probe("2000"), json!({})).await;
    let none = gql_raw(&api.base, Some(&t1), &probe("2999"), json!({})).await;
    let junk = gql_raw(&api.base, Some(&t1), &probe("not-a-number"), json!({})).await;
    assert_eq!(other, none);
    assert_eq!(other, junk);
    assert_eq!(
        other.1,
        json!({"data": {"guild": null, "channel": null, "message": null}})
    );
    for hidden in ["102", "106", "201"] {
        let h = gql_raw(&api.base, Some(&t1), &probe(hidden), json!({})).await;
        assert_eq!(h, none, "channel {hidden} must look nonexistent to U1");
    }
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn history_pages_newest_first_with_stable_cursors(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    let q = "query($c: ID!, $after: String) { messages(channelId: $c, first: 25, after: $after) { edges { cursor node { id content channelId guildId author { id username bot } createdAt editedAt deletedAt revisions { content } attachments { id } } } pageInfo { hasNextPage endCursor } } }";
    let mut seen = Vec::new();
    let mut after = Value::Null;
    let mut pages = 0;
    loop {
        let d = gql(&api.base, &t1, q, json!({"c": "101", "after": after})).await;
        let conn = &d["messages"];
        seen.extend(edge_ids(conn));
        pages += 1;
        if !conn["pageInfo"]["hasNextPage"].as_bool().unwrap() {
            break;
        }
        after = conn["pageInfo"]["endCursor"].clone();
        assert!(pages < 10);
    }
    assert_eq!(pages, 3);
    let expected: Vec<i64> = (1_001..=1_061).rev().collect();
    assert_eq!(seen, expected);

    // View without history: visible channel, empty history.
    let d = gql(&api.base, &t1, q, json!({"c": "107"})).await;
    assert_eq!(edge_ids(&d["messages"]), Vec::<i64>::new());
    let d = gql(
        &api.base,
        &t1,
        "{ message(id: \"1064\") { id } }",
        json!({}),
    )
    .await;
    assert_eq!(d["message"], Value::Null);

    // Hidden, other-tenant and nonexistent channels answer identically.
    let hidden = gql_raw(&api.base, Some(&t1), q, json!({"c": "102"})).await;
    let other = gql_raw(&api.base, Some(&t1), q, json!({"c": "201"})).await;
    let none = gql_raw(&api.base, Some(&t1), q, json!({"c": "999999"})).await;
    assert_eq!(hidden, none);
    assert_eq!(other, none);
    assert_eq!(first_code(&none.1), "NOT_FOUND");

    // A single message, with revisions and tombstone fields.
    sqlx::query("insert into message_revisions (guild_id, message_id, version_at, content) values ($1, 1061, (select created_at from messages where message_id = 1061), 'refund pls')")
        .bind(G1)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("update messages set edited_at = created_at + interval '1 minute', deleted_at = created_at + interval '2 minutes' where message_id = 1061")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("insert into message_revisions (guild_id, message_id, version_at, content) values ($1, 1061, (select edited_at from messages where message_id = 1061), 'refund please, my order is broken')")
        .bind(G1)
        .execute(&pool)
        .await
        .unwrap();
    let d = gql(&api.base, &t1, "{ message(id: \"1061\") { id content deletedAt editedAt revisions { content editedAt } } }", json!({})).await;
    assert_eq!(d["message"]["content"], "refund please, my order is broken");
    assert!(d["message"]["deletedAt"].is_string());
    assert_eq!(d["message"]["revisions"].as_array().unwrap().len(), 1);
    assert_eq!(d["message"]["revisions"][0]["content"], "refund pls");
    // The same through a page (revisions batch-loaded).
    let d = gql(&api.base, &t1, "{ messages(channelId: \"101\", first: 1) { edges { node { id revisions { content } } } } }", json!({})).await;
    assert_eq!(
        d["messages"]["edges"][0]["node"]["revisions"][0]["content"],
        "refund pls"
    );
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn search_is_scoped_ranked_and_paged(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    let q = "query($q: String!, $g: ID, $after: String, $first: Int) { searchMessages(query: $q, guildId: $g, first: $first, after: $after) { edges { cursor node { id } } pageInfo { hasNextPage endCursor } } }";
    let search = |t: String, g: Value| {
        let base = api.base.clone();
        async move {
            let d = gql(&base, &t, q, json!({"q": "refund", "g": g})).await;
            let mut v = edge_ids(&d["searchMessages"]);
            v.sort();
            v
        }
    };
    let t1 = token_for(&api.db, U1).await;
    let t2 = token_for(&api.db, U2).await;
    let t3 = token_for(&api.db, U3).await;
    assert_eq!(search(t1.clone(), Value::Null).await, vec![1_061]);
    assert_eq!(
        search(t2.clone(), Value::Null).await,
        vec![1_061, 1_062, 1_063]
    );
    assert_eq!(search(t3.clone(), Value::Null).await, vec![2_001]);
    // Scoping to another tenant's guild finds nothing, like a nonexistent one.
    assert_eq!(search(t1.clone(), json!("2000")).await, Vec::<i64>::new());
    assert_eq!(search(t3.clone(), json!("2000")).await, vec![2_001]);

    // Paging one hit at a time visits every hit exactly once.
    let mut after = Value::Null;
    let mut seen = Vec::new();
    for _ in 0..10 {
        let d = gql(
            &api.base,
            &t2,
            q,
            json!({"q": "refund OR hello", "first": 7, "after": after}),
        )
        .await;
        seen.extend(edge_ids(&d["searchMessages"]));
        if !d["searchMessages"]["pageInfo"]["hasNextPage"]
            .as_bool()
            .unwrap()
        {
            break;
        }
        after = d["searchMessages"]["pageInfo"]["endCursor"].clone();
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len(), "no duplicates across pages");
    assert_eq!(seen.len(), 63, "60 hellos + 3 refunds visible to U2");
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn api_tokens_are_hashed_listed_and_revocable(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    let d = gql(
        &api.base,
        &t1,
        "mutation { createApiToken(name: \"dashboard\") { id name secret } }",
        json!({}),
    )
    .await;
    let secret = d["createApiToken"]["secret"].as_str().unwrap().to_owned();
    let id = d["createApiToken"]["id"].as_str().unwrap().to_owned();
    assert!(secret.len() >= 40);
    assert_eq!(d["createApiToken"]["name"], "dashboard");

    // The new token acts as its user.
    let d = gql(
        &api.base,
        &secret,
        "{ viewer { id } apiTokens { id name revokedAt } }",
        json!({}),
    )
    .await;
    assert_eq!(d["viewer"]["id"], "1");
    let listed = d["apiTokens"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        !d.to_string().contains(&secret),
        "listing never shows secrets"
    );

    // Stored is the SHA-256, never the secret.
    let stored: Vec<u8> =
        sqlx::query_scalar("select secret_hash from api_tokens where token_id = $1::uuid")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, sha2::Sha256::digest(secret.as_bytes()).to_vec());
    assert_ne!(stored, secret.as_bytes());

    // Another user cannot revoke it (answers false, like an unknown id).
    let t2 = token_for(&api.db, U2).await;
    let d = gql(
        &api.base,
        &t2,
        "mutation($id: ID!) { revokeApiToken(id: $id) }",
        json!({"id": id}),
    )
    .await;
    assert_eq!(d["revokeApiToken"], false);

    let d = gql(
        &api.base,
        &t1,
        "mutation($id: ID!) { revokeApiToken(id: $id) }",
        json!({"id": id}),
    )
    .await;
    assert_eq!(d["revokeApiToken"], true);
    let (status, body) = gql_raw(&api.base, Some(&secret), "{ viewer { id } }", json!({})).await;
    assert_eq!(status, 401);
    assert_eq!(first_code(&body), "UNAUTHENTICATED");

    // Garbage bearer and no credentials at all.
    let (status, body) = gql_raw(&api.base, Some("so_nope"), "{ viewer { id } }", json!({})).await;
    assert_eq!(
        (status, first_code(&body).as_str()),
        (401, "UNAUTHENTICATED")
    );
    let (status, body) = gql_raw(
        &api.base,
        None,
        "{ viewer { id } guilds { id } }",
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(first_code(&body), "UNAUTHENTICATED");
    assert!(body["data"].is_null());
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn set_observer_roles_needs_manage_rights_and_gates_viewers(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    let t2 = token_for(&api.db, U2).await;
    let towner = token_for(&api.db, OWNER1).await;
    let m = "mutation($g: ID!, $r: [ID!]!) { setObserverRoles(guildId: $g, roleIds: $r) { id observerRoleIds } }";

    // A plain member: NOT_FOUND, exactly like another tenant's guild.
    let denied = gql_raw(&api.base, Some(&t1), m, json!({"g": "1000", "r": ["11"]})).await;
    let other = gql_raw(&api.base, Some(&t1), m, json!({"g": "2000", "r": ["11"]})).await;
    assert_eq!(first_code(&denied.1), "NOT_FOUND");
    assert_eq!(denied, other);

    // Unknown role: BAD_REQUEST.
    let bad = gql_raw(
        &api.base,
        Some(&towner),
        m,
        json!({"g": "1000", "r": ["424242"]}),
    )
    .await;
    assert_eq!(first_code(&bad.1), "BAD_REQUEST");

    // MANAGE_GUILD (U2 via the staff role) may, and the gate applies at once.
    let d = gql(&api.base, &t2, m, json!({"g": "1000", "r": ["11"]})).await;
    assert_eq!(d["setObserverRoles"]["observerRoleIds"], json!(["11"]));
    let d = gql(&api.base, &t1, "{ guilds { id } }", json!({})).await;
    assert_eq!(d["guilds"], json!([]));
    let d = gql(&api.base, &towner, "{ guilds { id } }", json!({})).await;
    assert_eq!(d["guilds"], json!([{"id": "1000"}]));

    // Locking oneself out is refused and changes nothing.
    let lock = gql_raw(&api.base, Some(&t2), m, json!({"g": "1000", "r": ["12"]})).await;
    assert_eq!(first_code(&lock.1), "BAD_REQUEST");
    let d = gql(
        &api.base,
        &towner,
        "{ guild(id: \"1000\") { observerRoleIds } }",
        json!({}),
    )
    .await;
    assert_eq!(d["guild"]["observerRoleIds"], json!(["11"]));

    // The owner clears it.
    let d = gql(&api.base, &towner, m, json!({"g": "1000", "r": []})).await;
    assert_eq!(d["setObserverRoles"]["observerRoleIds"], json!([]));
    let d = gql(&api.base, &t1, "{ guilds { id } }", json!({})).await;
    assert_eq!(d["guilds"], json!([{"id": "1000"}]));
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn set_retention_days_needs_manage_rights_and_the_purge_applies_it(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;
    let t2 = token_for(&api.db, U2).await;
    let m = "mutation($g: ID!, $d: Int) { setRetentionDays(guildId: $g, days: $d) { id retentionDays } }";
    // One message from January 2026, one from now.
    message(&pool, G1, 101, 9_001, U1, "old").await;
    sqlx::query(
        "insert into messages (guild_id, message_id, channel_id, author_id, author_username, \
           content, created_at, seen_create) values ($1, 9002, 101, $2, 'u', 'new', now(), true)",
    )
    .bind(G1)
    .bind(U1)
    .execute(&pool)
    .await
    .unwrap();
    let purge = || async {
        let mut tx = api.db.worker().await.unwrap();
        observer_db::ingest::purge_expired(&mut tx, 1000)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let left: Vec<i64> = sqlx::query_scalar(
            "select message_id from messages where message_id in (9001, 9002) order by 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        left
    };

    // A plain member: NOT_FOUND, exactly like another tenant's guild.
    let denied = gql_raw(&api.base, Some(&t1), m, json!({"g": "1000", "d": 30})).await;
    let other = gql_raw(&api.base, Some(&t1), m, json!({"g": "2000", "d": 30})).await;
    assert_eq!(first_code(&denied.1), "NOT_FOUND");
    assert_eq!(denied, other);
    for bad in [0, -1, 36_501] {
        let r = gql_raw(&api.base, Some(&t2), m, json!({"g": "1000", "d": bad})).await;
        assert_eq!(first_code(&r.1), "BAD_REQUEST", "{bad}");
    }
    assert_eq!(purge().await, [9_001, 9_002], "no retention: keep forever");

    // MANAGE_GUILD may; the worker's purge follows the setting.
    let d = gql(&api.base, &t2, m, json!({"g": "1000", "d": 3650})).await;
    assert_eq!(
        d["setRetentionDays"],
        json!({"id": "1000", "retentionDays": 3650})
    );
    assert_eq!(purge().await, [9_001, 9_002]);
    let d = gql(&api.base, &t2, m, json!({"g": "1000", "d": 30})).await;
    assert_eq!(d["setRetentionDays"]["retentionDays"], 30);
    let d = gql(
        &api.base,
        &t1,
        "{ guild(id: \"1000\") { retentionDays } }",
        json!({}),
    )
    .await;
    assert_eq!(d["guild"]["retentionDays"], 30, "members see the setting");
    assert_eq!(purge().await, [9_002], "older than 30 days: purged");

    // null: forever again.
    let d = gql(&api.base, &t2, m, json!({"g": "1000", "d": null})).await;
    assert_eq!(d["setRetentionDays"]["retentionDays"], Value::Null);
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn limits_answer_documented_errors_never_500(pool: PgPool) {
    let mut cfg = config();
    cfg.limits.rate_burst = 30;
    cfg.limits.rate_per_sec = 0.001;
    let api = start(pool.clone(), cfg).await;
    seed(&pool, &api.db).await;
    let t1 = token_for(&api.db, U1).await;

    // first > 100.
    let (s, b) = gql_raw(
        &api.base,
        Some(&t1),
        "{ messages(channelId: \"101\", first: 101) { edges { cursor } } }",
        json!({}),
    )
    .await;
    assert_eq!((s, first_code(&b).as_str()), (200, "BAD_REQUEST"));
    let (s, b) = gql_raw(
        &api.base,
        Some(&t1),
        "{ messages(channelId: \"101\", after: \"garbage\") { edges { cursor } } }",
        json!({}),
    )
    .await;
    assert_eq!((s, first_code(&b).as_str()), (200, "BAD_REQUEST"));

    // A NUL in a search string is the client's fault, not a 500.
    let (s, b) = gql_raw(
        &api.base,
        Some(&t1),
        "query($q: String!) { searchMessages(query: $q) { edges { cursor } } }",
        json!({"q": "refund\u{0}"}),
    )
    .await;
    assert_eq!((s, first_code(&b).as_str()), (200, "BAD_REQUEST"), "{b}");

    // Too deep (introspection nests arbitrarily).
    let mut deep = String::from("name");
    for _ in 0..20 {
        deep = format!("ofType {{ {deep} }}");
    }
    let (s, b) = gql_raw(
        &api.base,
        Some(&t1),
        &format!("{{ __schema {{ types {{ fields {{ type {{ {deep} }} }} }} }} }}"),
        json!({}),
    )
    .await;
    assert_eq!((s, first_code(&b).as_str()), (200, "BAD_REQUEST"), "{b}");
    assert!(
        b["errors"][0]["message"].as_str().unwrap().contains("deep"),
        "{b}"
    );

    // Too complex: many maximal pages at once.
    let heavy: String = (0..30)
        .map(|i| format!("p{i}: messages(channelId: \"101\", first: 100) {{ edges {{ cursor node {{ id content author {{ id username }} }} }} }}\n"))
        .collect();
    let (s, b) = gql_raw(&api.base, Some(&t1), &format!("{{ {heavy} }}"), json!({})).await;
    assert_eq!((s, first_code(&b).as_str()), (200, "BAD_REQUEST"), "{b}");
    assert!(
        b["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("complex"),
        "{b}"
    );

    // Too large.
    let big = format!("{{ viewer {{ id }} }} # {}", "x".repeat(70 * 1024));
    let (s, b) = gql_raw(&api.base, Some(&t1), &big, json!({})).await;
    assert_eq!((s, first_code(&b).as_str()), (413, "BAD_REQUEST"));

    // Not JSON / not a GraphQL request / syntax error.
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/graphql", api.base))
        .bearer_auth(&t1)
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = client
        .post(format!("{}/graphql", api.base))
        .bearer_auth(&t1)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let (s, b) = gql_raw(&api.base, Some(&t1), "{ viewer { id ", json!({})).await;
    assert_eq!((s, first_code(&b).as_str()), (200, "BAD_REQUEST"));

    // Too many requests: the bucket (30) is nearly spent by now.
    let mut limited = None;
    for _ in 0..40 {
        let (s, b) = gql_raw(&api.base, Some(&t1), "{ viewer { id } }", json!({})).await;
        assert_ne!(s, 500);
        if s == 429 {
            limited = Some(b);
            break;
        }
    }
    let b = limited.expect("rate limit must trigger");
    assert_eq!(first_code(&b), "RATE_LIMITED");
    // Another viewer is unaffected.
    let t2 = token_for(&api.db, U2).await;
    let (s, _) = gql_raw(&api.base, Some(&t2), "{ viewer { id } }", json!({})).await;
    assert_eq!(s, 200);
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn health_ready_metrics_and_query_page(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{}/healthz", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = client
        .get(format!("{}/readyz", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let _ = gql_raw(&api.base, None, "{ viewer { id } }", json!({})).await;
    let m = client
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("observer_api_http_requests_total"), "{m}");
    assert!(m.contains("route=\"/graphql\""), "{m}");
    assert!(
        m.contains("observer_api_http_request_duration_seconds_bucket"),
        "{m}"
    );
    assert!(
        m.contains("observer_api_graphql_errors_total{code=\"UNAUTHENTICATED\"}"),
        "{m}"
    );

    let page = client
        .get(format!("{}/graphql", api.base))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let csp = page
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self'"));
    assert!(!csp.contains("unsafe-eval"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains("/assets/graphiql-init.js"));
    assert!(!html.contains("<script>"), "no inline script");
    assert!(!html.contains("https://"), "no CDN");
    for asset in [
        "/assets/graphiql/graphiql-4.1.2.min.js",
        "/assets/graphiql/graphiql-4.1.2.min.css",
        "/assets/graphiql/react-18.3.1.production.min.js",
        "/assets/graphiql/react-dom-18.3.1.production.min.js",
    ] {
        assert!(html.contains(asset), "{asset} not linked");
        let resp = client
            .get(format!("{}{asset}", api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{asset}");
        let cache = resp
            .headers()
            .get("cache-control")
            .unwrap()
            .to_str()
            .unwrap();
        assert!(cache.contains("immutable"), "{asset}: {cache}");
    }
    let init = client
        .get(format!("{}/assets/graphiql-init.js", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(init.status().as_u16(), 200);
    let init = init.text().await.unwrap();
    assert!(init.contains("subscriptionUrl"), "{init}");
    let missing = client
        .get(format!("{}/assets/nope.js", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);

    let dash = client.get(format!("{}/", api.base)).send().await.unwrap();
    assert_eq!(dash.status().as_u16(), 200);
    let csp = dash
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self';"), "{csp}");
    assert!(csp.contains("style-src 'self';"), "{csp}");
    let html = dash.text().await.unwrap();
    assert!(html.contains("/assets/app.js"));
    for asset in ["/assets/app.js", "/assets/gqlws.js", "/assets/style.css"] {
        let resp = client
            .get(format!("{}{asset}", api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{asset}");
    }
}

mod ws {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn connect(base: &str, protocol: &str) -> Ws {
        let mut req = format!("{}/graphql", base.replace("http://", "ws://"))
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", protocol.parse().unwrap());
        let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .unwrap()
                .to_str()
                .unwrap(),
            protocol
        );
        ws
    }

    /// The next text frame as JSON, or `None` when the server closed.
    async fn next_json(ws: &mut Ws) -> Option<Value> {
        let deadline = std::time::Duration::from_secs(10);
        loop {
            match tokio::time::timeout(deadline, ws.next())
                .await
                .expect("server answers")
            {
                Some(Ok(WsMessage::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    async fn send(ws: &mut Ws, v: Value) {
        ws.send(WsMessage::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    #[sqlx::test(migrator = "observer_db::MIGRATOR")]
    async fn websocket_init_accepts_live_tokens_only(pool: PgPool) {
        let api = start(pool.clone(), config()).await;
        seed(&pool, &api.db).await;
        let t1 = token_for(&api.db, U1).await;

        // Modern protocol, valid token: acknowledged, subscription accepted.
        let mut ws = connect(&api.base, "graphql-transport-ws").await;
        send(&mut ws, json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {t1}")}})).await;
        assert_eq!(next_json(&mut ws).await.unwrap()["type"], "connection_ack");
        let sub = "subscription($after: String) { messageEvents(guildId: \"1000\", after: $after) { cursor kind message { id content } } }";
        send(
            &mut ws,
            json!({"id": "1", "type": "subscribe", "payload": {"query": sub}}),
        )
        .await;
        send(&mut ws, json!({"type": "ping"})).await;
        let pong = next_json(&mut ws).await.unwrap();
        assert_eq!(
            pong["type"], "pong",
            "no error for an authenticated subscription: {pong}"
        );
        // Events written before the subscription registers with the hub are
        // not live for it: wait for the registration.
        let start = std::time::Instant::now();
        while api.state.live.subscriber_count() < 1 {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "subscription never registered"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // The worker appends events (one transaction each); U1 may read 101
        // but not 102.
        for (channel, message, kind) in [(101, 1_061, 1), (102, 1_062, 1), (101, 1_001, 2)] {
            sqlx::query("insert into message_events (guild_id, kind, channel_id, message_id) values ($1, $2, $3, $4)")
                .bind(G1)
                .bind(kind as i16)
                .bind(channel as i64)
                .bind(message as i64)
                .execute(&pool)
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        while got.len() < 2 {
            let m = next_json(&mut ws).await.unwrap();
            assert_eq!(m["type"], "next", "{m}");
            got.push(m["payload"]["data"]["messageEvents"].clone());
        }
        assert_eq!(got[0]["message"]["id"], "1061");
        assert_eq!(got[0]["kind"], "CREATED");
        assert_eq!(got[1]["message"]["id"], "1001");
        assert_eq!(got[1]["kind"], "UPDATED");
        // Resume after the first event: replays exactly the second.
        let mut ws2 = connect(&api.base, "graphql-transport-ws").await;
        send(&mut ws2, json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {t1}")}})).await;
        assert_eq!(next_json(&mut ws2).await.unwrap()["type"], "connection_ack");
        send(&mut ws2, json!({"id": "r", "type": "subscribe", "payload": {"query": sub, "variables": {"after": got[0]["cursor"]}}})).await;
        let m = next_json(&mut ws2).await.unwrap();
        assert_eq!(m["payload"]["data"]["messageEvents"], got[1]);

        // A bearer header on the upgrade itself works too; a bad one is refused
        // before the upgrade.
        let upgrade = |auth: String| {
            let mut req = format!("{}/graphql", api.base.replace("http://", "ws://"))
                .into_client_request()
                .unwrap();
            req.headers_mut().insert(
                "sec-websocket-protocol",
                "graphql-transport-ws".parse().unwrap(),
            );
            req.headers_mut()
                .insert("authorization", auth.parse().unwrap());
            req
        };
        let (mut ws3, _) = tokio_tungstenite::connect_async(upgrade(format!("Bearer {t1}")))
            .await
            .unwrap();
        send(&mut ws3, json!({"type": "connection_init"})).await;
        assert_eq!(next_json(&mut ws3).await.unwrap()["type"], "connection_ack");
        send(&mut ws3, json!({"id": "h", "type": "subscribe", "payload": {"query": sub, "variables": {"after": got[0]["cursor"]}}})).await;
        let m = next_json(&mut ws3).await.unwrap();
        assert_eq!(m["payload"]["data"]["messageEvents"], got[1], "{m}");
        match tokio_tungstenite::connect_async(upgrade("Bearer so_nope".into())).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 401)
            }
            other => panic!(
                "bad bearer must be refused at upgrade: {:?}",
                other.map(|_| ())
            ),
        }

        // Revoked/unknown token: no ack, the connection closes.
        let mut ws = connect(&api.base, "graphql-transport-ws").await;
        send(
            &mut ws,
            json!({"type": "connection_init", "payload": {"authorization": "Bearer so_revoked"}}),
        )
        .await;
        assert_eq!(next_json(&mut ws).await, None);

        // Legacy protocol, anonymous: the subscription itself is refused.
        let mut ws = connect(&api.base, "graphql-ws").await;
        send(&mut ws, json!({"type": "connection_init", "payload": {}})).await;
        assert_eq!(next_json(&mut ws).await.unwrap()["type"], "connection_ack");
        send(&mut ws, json!({"id": "1", "type": "start", "payload": {"query": "subscription { messageEvents { cursor } }"}})).await;
        let err = loop {
            let m = next_json(&mut ws).await.unwrap();
            if m["type"] != "ka" {
                break m;
            }
        };
        // Legacy protocol: the resolver's error arrives as a `data` frame.
        assert_eq!(err["type"], "data", "{err}");
        assert_eq!(
            err["payload"]["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
            "{err}"
        );
    }
}

/// Behind N trusted proxies the per-address limit keys on the address the
/// outermost one saw (the Nth X-Forwarded-For entry from the right); what a
/// client writes further left is ignored. With no trusted proxy the header
/// is ignored altogether, so it cannot be used to dodge the limit.
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn address_limits_trust_only_the_configured_proxies(pool: PgPool) {
    // Anonymous requests are limited per client address: `rate_burst`
    // requests, (practically) no refill.
    let limited = |hops: usize| {
        let mut cfg = config();
        cfg.limits.rate_burst = 2;
        cfg.limits.rate_per_sec = 0.000_1;
        cfg.trusted_proxy_hops = hops;
        cfg
    };
    let post = |base: String, xff: &'static str| async move {
        reqwest::Client::new()
            .post(format!("{base}/graphql"))
            .header("x-forwarded-for", xff)
            .json(&json!({"query": "{ __typename }"}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };

    let api = start(pool.clone(), limited(1)).await;
    for _ in 0..2 {
        assert_eq!(post(api.base.clone(), "1.1.1.1").await, 200);
    }
    assert_eq!(post(api.base.clone(), "1.1.1.1").await, 429);
    // A spoofed entry on the left does not make a new client.
    assert_eq!(post(api.base.clone(), "9.9.9.9, 1.1.1.1").await, 429);
    // Another client behind the same proxy has its own bucket.
    assert_eq!(post(api.base.clone(), "2.2.2.2").await, 200);
    drop(api);

    // No trusted proxy: every request is the TCP peer (127.0.0.1).
    let api = start(pool, limited(0)).await;
    for xff in ["3.3.3.3", "4.4.4.4"] {
        assert_eq!(post(api.base.clone(), xff).await, 200);
    }
    assert_eq!(post(api.base.clone(), "7.7.7.7").await, 429);
}
