//! The login path (`observer_auth`): memberships fetched with a viewer's OAuth
//! token replace exactly the checked guilds, and bearer lookup ignores revoked
//! tokens.
#![allow(clippy::unwrap_used)]

use observer_db::auth::{self, Membership, NewUser};
use observer_db::Db;
use sqlx::PgPool;

async fn setup(pool: &PgPool) -> Db {
    observer_db::migrate::apply_policies(pool).await.unwrap();
    for g in [1_i64, 2, 3] {
        sqlx::query("insert into guilds (guild_id, name) values ($1, 'g')")
            .bind(g)
            .execute(pool)
            .await
            .unwrap();
    }
    sqlx::query("update guilds set removed_at = now() where guild_id = 3")
        .execute(pool)
        .await
        .unwrap();
    Db::new(pool.clone())
}

fn membership(guild_id: i64, roles: &[i64]) -> Membership {
    Membership {
        guild_id,
        role_ids: roles.to_vec(),
        nick: None,
        joined_at: None,
        communication_disabled_until: None,
    }
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn memberships_replace_only_checked_guilds(pool: PgPool) {
    let db = setup(&pool).await;
    let mut tx = db.auth().await.unwrap();
    auth::upsert_user(
        &mut tx,
        &NewUser {
            user_id: 7,
            username: "u".into(),
            global_name: None,
            avatar: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(auth::bot_guild_ids(&mut tx).await.unwrap(), vec![1, 2]);
    auth::replace_memberships(
        &mut tx,
        7,
        &[1, 2],
        &[membership(1, &[10]), membership(2, &[])],
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // A row in a guild we did not ask about (the worker's business) survives.
    sqlx::query("insert into members (guild_id, user_id) values (3, 7)")
        .execute(&pool)
        .await
        .unwrap();

    let mut tx = db.auth().await.unwrap();
    auth::replace_memberships(
        &mut tx,
        7,
        &[1, 2],
        &[membership(1, &[10, 11])],
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let rows: Vec<(i64, Vec<i64>)> = sqlx::query_as(
        "select guild_id, role_ids from members where user_id = 7 order by guild_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows, vec![(1, vec![10, 11]), (3, vec![])]);
    let refreshed: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("select memberships_refreshed_at from users where user_id = 7")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(refreshed.is_some());
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn bearer_lookup_ignores_revoked_tokens(pool: PgPool) {
    let db = setup(&pool).await;
    let mut tx = db.auth().await.unwrap();
    auth::upsert_user(
        &mut tx,
        &NewUser {
            user_id: 7,
            username: "u".into(),
            global_name: None,
            avatar: None,
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let id = uuid::Uuid::new_v4();
    let mut vtx = db.viewer(7).await.unwrap();
    observer_db::viewer::create_api_token(&mut vtx, 7, id, "t", b"hash-of-secret")
        .await
        .unwrap();
    vtx.commit().await.unwrap();

    let mut tx = db.auth().await.unwrap();
    let owner = auth::api_token_owner(&mut tx, b"hash-of-secret")
        .await
        .unwrap();
    assert_eq!(owner.map(|o| (o.token_id, o.user_id)), Some((id, 7)));
    assert_eq!(
        auth::api_token_owner(&mut tx, b"other").await.unwrap(),
        None
    );
    tx.commit().await.unwrap();

    // Another viewer cannot revoke it; its owner can.
    let mut vtx = db.viewer(8).await.unwrap();
    assert!(!observer_db::viewer::revoke_api_token(&mut vtx, id)
        .await
        .unwrap());
    vtx.commit().await.unwrap();
    let mut vtx = db.viewer(7).await.unwrap();
    assert!(observer_db::viewer::revoke_api_token(&mut vtx, id)
        .await
        .unwrap());
    vtx.commit().await.unwrap();
    let mut tx = db.auth().await.unwrap();
    assert_eq!(
        auth::api_token_owner(&mut tx, b"hash-of-secret")
            .await
            .unwrap(),
        None
    );
    tx.commit().await.unwrap();
}
