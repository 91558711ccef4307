//! `Channel.botCanRead`: managers learn which channels the bot cannot read;
//! everyone else gets null.
#![allow(clippy::unwrap_used)]

use crate::common::*;
use observer_db::access::perms::{MANAGE_GUILD, READ_MESSAGE_HISTORY, VIEW_CHANNEL};
use serde_json::{json, Value};
use sqlx::PgPool;

const G: i64 = 1_000;
const OWNER: i64 = 900;
const MEMBER: i64 = 1;
const MANAGER: i64 = 2;
const MANAGERS: i64 = 11;

fn bot_can_read(guilds: &Value) -> Vec<(String, Value)> {
    let mut v: Vec<(String, Value)> = guilds[0]["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_owned(),
                c["botCanRead"].clone(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn bot_can_read_is_shown_to_managers_only(pool: PgPool) {
    let api = start(pool.clone(), config()).await;
    guild(&pool, G, "Acme", OWNER).await;
    role(&pool, G, G, VIEW_CHANNEL | READ_MESSAGE_HISTORY).await;
    role(&pool, G, MANAGERS, MANAGE_GUILD).await;
    channel(&pool, G, 101, 0, None, "help").await;
    channel(&pool, G, 102, 0, None, "leadership").await;
    channel(&pool, G, 103, 0, None, "new").await;
    member(&pool, G, MEMBER, &[]).await;
    member(&pool, G, MANAGER, &[MANAGERS]).await;
    member(&pool, G, OWNER, &[]).await;
    for (u, name) in [(MEMBER, "alice"), (MANAGER, "bob"), (OWNER, "owner")] {
        create_user(&api.db, u, name).await;
    }
    sqlx::query(
        "update channels set bot_can_read = (channel_id = 101), bot_access_checked_at = now()
         where channel_id in (101, 102)",
    )
    .execute(&pool)
    .await
    .unwrap();

    let q = "{ guilds { channels { id botCanRead } } }";
    let want = vec![
        ("101".to_owned(), json!(true)),
        ("102".to_owned(), json!(false)),
        ("103".to_owned(), Value::Null),
    ];
    for u in [MANAGER, OWNER] {
        let t = token_for(&api.db, u).await;
        let d = gql(&api.base, &t, q, json!({})).await;
        assert_eq!(bot_can_read(&d["guilds"]), want, "user {u}");
        let d = gql(
            &api.base,
            &t,
            "{ channel(id: \"102\") { botCanRead } }",
            json!({}),
        )
        .await;
        assert_eq!(d["channel"]["botCanRead"], json!(false));
    }
    let t = token_for(&api.db, MEMBER).await;
    let d = gql(&api.base, &t, q, json!({})).await;
    assert!(
        bot_can_read(&d["guilds"]).iter().all(|(_, v)| v.is_null()),
        "{d}"
    );
}
