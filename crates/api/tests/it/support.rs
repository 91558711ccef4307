//! The support queue over GraphQL: the queue, one conversation and the
//! telemetry answer within each viewer's rights (two viewers, two answers;
//! a hidden conversation is indistinguishable from a missing one); the
//! settings are for managers only.
#![allow(clippy::unwrap_used)]

use crate::common::*;
use observer_db::access::perms::{READ_MESSAGE_HISTORY, VIEW_CHANNEL};
use serde_json::{json, Value};
use sqlx::PgPool;

const G: i64 = 1_000;
const OWNER: i64 = 900;
const ALICE: i64 = 1;
const STAFF: i64 = 2;
const STAFF_ROLE: i64 = 50;
const MANAGE_MESSAGES: u64 = 1 << 13;

/// Forum 300 (everyone) with post 301: Alice asks at +1 s, staff answers at
/// +61 s. Forum 400 (staff only) with post 401: unanswered since +5 s.
async fn seed(pool: &PgPool, db: &observer_db::Db) {
    guild(pool, G, "Acme", OWNER).await;
    role(pool, G, G, VIEW_CHANNEL | READ_MESSAGE_HISTORY).await;
    role(pool, G, STAFF_ROLE, VIEW_CHANNEL | MANAGE_MESSAGES).await;
    channel(pool, G, 300, 15, None, "help").await;
    channel(pool, G, 301, 11, Some(300), "my order is late").await;
    channel(pool, G, 400, 15, None, "escalations").await;
    overwrite(pool, G, 400, G, 0, 0, VIEW_CHANNEL).await;
    overwrite(pool, G, 400, STAFF_ROLE, 0, VIEW_CHANNEL, 0).await;
    channel(pool, G, 401, 11, Some(400), "refund stuck").await;
    sqlx::query(
        "update channels set thread_created_at = timestamptz '2026-01-01 00:00:00+00' \
           + make_interval(secs => case channel_id when 301 then 1 else 5 end), \
           owner_id = $1 where channel_id in (301, 401)",
    )
    .bind(ALICE)
    .execute(pool)
    .await
    .unwrap();
    member(pool, G, ALICE, &[]).await;
    member(pool, G, STAFF, &[STAFF_ROLE]).await;
    member(pool, G, OWNER, &[]).await;
    message(pool, G, 301, 1, ALICE, "where is my order?").await;
    message(pool, G, 301, 61, STAFF, "on its way").await;
    message(pool, G, 401, 5, ALICE, "refund?").await;
    for (u, name) in [(ALICE, "alice"), (STAFF, "staff"), (OWNER, "owner")] {
        create_user(db, u, name).await;
    }
    // Seeded rows bypass ingestion: derive their conversations as a batch would.
    let mut tx = db.worker().await.unwrap();
    observer_db::support::refresh(&mut tx, &[(G, 301), (G, 401)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

fn queue_ids(d: &Value) -> Vec<&str> {
    d["conversations"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"]["id"].as_str().unwrap())
        .collect()
}

const QUEUE: &str = "query($g: ID!) { conversations(guildId: $g) { edges { node { id state \
    title requesterId firstResponderId firstResponseSecs slaStatus } } hasNextPage } }";
const STATS: &str = "query($g: ID!) { supportStats(guildId: $g, from: \"2025-12-31T00:00:00Z\", \
    to: \"2026-01-02T00:00:00Z\") { summary { opened unanswered backlog \
    firstResponse { count medianSecs p90Secs } } series { opened } topResponders { userId } } }";

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn the_queue_and_its_numbers_follow_each_viewers_rights(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    let (alice, staff) = (
        token_for(&api.db, ALICE).await,
        token_for(&api.db, STAFF).await,
    );

    let s = gql(&api.base, &staff, QUEUE, json!({"g": G.to_string()})).await;
    assert_eq!(queue_ids(&s), vec!["401", "301"]);
    assert_eq!(
        s["conversations"]["edges"][1]["node"],
        json!({"id": "301", "state": "WAITING_ON_REQUESTER", "title": "my order is late",
               "requesterId": "1", "firstResponderId": "2", "firstResponseSecs": 60.0,
               "slaStatus": null})
    );
    let a = gql(&api.base, &alice, QUEUE, json!({"g": G.to_string()})).await;
    assert_eq!(queue_ids(&a), vec!["301"]);

    let s = gql(&api.base, &staff, STATS, json!({"g": G.to_string()})).await;
    let a = gql(&api.base, &alice, STATS, json!({"g": G.to_string()})).await;
    assert_eq!(s["supportStats"]["summary"]["opened"], 2);
    assert_eq!(s["supportStats"]["summary"]["unanswered"], 1);
    assert_eq!(s["supportStats"]["summary"]["backlog"], 1);
    assert_eq!(a["supportStats"]["summary"]["opened"], 1);
    assert_eq!(a["supportStats"]["summary"]["unanswered"], 0);
    assert_eq!(a["supportStats"]["summary"]["backlog"], 0);
    assert_eq!(
        a["supportStats"]["summary"]["firstResponse"],
        json!({"count": 1, "medianSecs": 60.0, "p90Secs": 60.0})
    );
    assert_eq!(a["supportStats"]["topResponders"], json!([{"userId": "2"}]));

    // Hidden and missing look the same.
    let q = "query($id: ID!) { conversation(id: $id) { id state } }";
    let hidden = gql(&api.base, &alice, q, json!({"id": "401"})).await;
    let missing = gql(&api.base, &alice, q, json!({"id": "999"})).await;
    assert_eq!(hidden, json!({"conversation": null}));
    assert_eq!(hidden, missing);
    let seen = gql(&api.base, &staff, q, json!({"id": "401"})).await;
    assert_eq!(seen, json!({"conversation": {"id": "401", "state": "NEW"}}));

    // Bad input gets a clear error.
    let (_, body) = gql_raw(
        &api.base,
        Some(&staff),
        "{ conversations(guildId: \"1000\", first: 1000) { hasNextPage } }",
        json!({}),
    )
    .await;
    assert_eq!(first_code(&body), "BAD_REQUEST");
    let (_, body) = gql_raw(
        &api.base,
        Some(&staff),
        "{ conversations(guildId: \"1000\", after: \"nonsense\") { hasNextPage } }",
        json!({}),
    )
    .await;
    assert_eq!(first_code(&body), "BAD_REQUEST");
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn the_queue_pages_without_gaps_or_repeats(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    let staff = token_for(&api.db, STAFF).await;
    let q = "query($g: ID!, $after: String) { conversations(guildId: $g, first: 1, after: $after) \
             { edges { node { id } } hasNextPage endCursor } }";
    let p1 = gql(&api.base, &staff, q, json!({"g": "1000"})).await;
    assert_eq!(queue_ids(&p1), vec!["401"]);
    assert_eq!(p1["conversations"]["hasNextPage"], true);
    let after = p1["conversations"]["endCursor"].clone();
    let p2 = gql(&api.base, &staff, q, json!({"g": "1000", "after": after})).await;
    assert_eq!(queue_ids(&p2), vec!["301"]);
    assert_eq!(p2["conversations"]["hasNextPage"], false);
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn support_settings_are_for_managers_only(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    seed(&pool, &api.db).await;
    let (alice, owner) = (
        token_for(&api.db, ALICE).await,
        token_for(&api.db, OWNER).await,
    );
    let get = "query($g: ID!) { supportSettings(guildId: $g) { supportChannelIds staffRoleIds \
               lockedMeansSolved firstResponseTargetSecs recomputePending } }";
    let set = "mutation($g: ID!, $s: SupportSettingsInput!) { setSupportSettings(guildId: $g, \
               settings: $s) { staffRoleIds firstResponseTargetSecs recomputePending } }";
    let (_, body) = gql_raw(&api.base, Some(&alice), get, json!({"g": "1000"})).await;
    assert_eq!(first_code(&body), "NOT_FOUND");
    let (_, body) = gql_raw(
        &api.base,
        Some(&alice),
        set,
        json!({"g": "1000", "s": {"staffRoleIds": ["50"]}}),
    )
    .await;
    assert_eq!(first_code(&body), "NOT_FOUND");
    // The same answer for a guild that does not exist.
    let (_, body) = gql_raw(&api.base, Some(&owner), get, json!({"g": "4242"})).await;
    assert_eq!(first_code(&body), "NOT_FOUND");

    let d = gql(&api.base, &owner, get, json!({"g": "1000"})).await;
    assert_eq!(
        d["supportSettings"],
        json!({"supportChannelIds": null, "staffRoleIds": [], "lockedMeansSolved": true,
               "firstResponseTargetSecs": null, "recomputePending": false})
    );
    let d = gql(
        &api.base,
        &owner,
        set,
        json!({"g": "1000", "s": {"staffRoleIds": ["50"], "firstResponseTargetSecs": 3600}}),
    )
    .await;
    assert_eq!(
        d["setSupportSettings"],
        json!({"staffRoleIds": ["50"], "firstResponseTargetSecs": 3600, "recomputePending": true})
    );
    let (_, body) = gql_raw(
        &api.base,
        Some(&owner),
        set,
        json!({"g": "1000", "s": {"firstResponseTargetSecs": 1}}),
    )
    .await;
    assert_eq!(first_code(&body), "BAD_REQUEST");
    let audit: i64 = sqlx::query_scalar("select count(*) from support_settings_audit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(audit, 1);
}
