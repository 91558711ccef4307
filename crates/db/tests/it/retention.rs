//! Per-tenant retention (docs/data-model.md): the purge removes exactly the messages
//! older than their guild's retention period, with their revisions and events,
//! and backfill never reaches behind the retention horizon again.
#![allow(clippy::unwrap_used)]

use observer_db::{ingest, migrate, Db};
use sqlx::PgPool;

/// Guild 1 keeps 1 day, guild 2 keeps forever. Each has an old (3 days) and a
/// new (1 hour) message in one channel, each with a revision and an event.
async fn seed(pool: &PgPool) {
    sqlx::raw_sql(
        "insert into guilds (guild_id, name, owner_id, retention) values
             (1, 'short', 9, interval '1 day'), (2, 'forever', 9, null);
         insert into channels (guild_id, channel_id, kind, name) values
             (1, 101, 0, 'a'), (1, 102, 0, 'empty'), (2, 201, 0, 'b');
         insert into messages (guild_id, message_id, channel_id, content, created_at, seen_create) values
             (1, 11, 101, 'old', now() - interval '3 days', true),
             (1, 12, 101, 'new', now() - interval '1 hour', true),
             (2, 21, 201, 'old', now() - interval '3 days', true),
             (2, 22, 201, 'new', now() - interval '1 hour', true);
         insert into message_revisions (guild_id, message_id, version_at, content)
             select guild_id, message_id, created_at, content from messages;
         insert into message_events (guild_id, kind, channel_id, message_id)
             select guild_id, 1, channel_id, message_id from messages;",
    )
    .execute(pool)
    .await
    .unwrap();
}

async fn ids(pool: &PgPool, table: &str) -> Vec<i64> {
    sqlx::query_scalar(&format!(
        "select distinct message_id from {table} order by message_id"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn purge_removes_only_what_retention_allows(pool: PgPool) {
    migrate::apply_policies(&pool).await.unwrap();
    seed(&pool).await;
    let db = Db::new(pool.clone());

    // Small batches: the caller's loop must be able to drain in several steps.
    let mut tx = db.worker().await.unwrap();
    assert_eq!(ingest::purge_expired(&mut tx, 1).await.unwrap(), 1);
    assert_eq!(ingest::purge_expired(&mut tx, 1).await.unwrap(), 0);
    tx.commit().await.unwrap();

    for table in ["messages", "message_revisions", "message_events"] {
        assert_eq!(ids(&pool, table).await, vec![12, 21, 22], "{table}");
    }
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn backfill_never_reaches_behind_the_retention_horizon(pool: PgPool) {
    migrate::apply_policies(&pool).await.unwrap();
    seed(&pool).await;
    let db = Db::new(pool.clone());
    let horizon = ingest::snowflake_at(chrono::Utc::now() - chrono::Duration::days(1));

    let mut tx = db.worker().await.unwrap();
    let newest = ingest::newest_message_ids(&mut tx, 1, &[101, 102], i64::MAX)
        .await
        .unwrap();
    // Stored message ids here are tiny, so the horizon wins for both channels,
    // including the one with no messages at all (it would otherwise be fetched
    // from the beginning of time).
    for ch in [101, 102] {
        let id = newest[&ch];
        assert!(
            (id - horizon).abs() < (10_000 << 22),
            "channel {ch}: {id} vs {horizon}"
        );
    }
    // No retention: only stored messages count; an empty channel stays absent.
    let newest = ingest::newest_message_ids(&mut tx, 2, &[201], i64::MAX)
        .await
        .unwrap();
    assert_eq!(newest.get(&201), Some(&22));
    tx.commit().await.unwrap();
}

/// Member-removal tombstones are forgotten once older than the TTL; recent
/// ones stay (they still guard against late, stale member writes).
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn old_member_removal_tombstones_are_forgotten(pool: PgPool) {
    migrate::apply_policies(&pool).await.unwrap();
    sqlx::raw_sql(
        "insert into guilds (guild_id, name, owner_id) values (1, 'g', 9);
         insert into member_removals (guild_id, user_id, observed_at) values
             (1, 5, now() - interval '2 days'), (1, 6, now() - interval '1 hour');",
    )
    .execute(&pool)
    .await
    .unwrap();
    let db = Db::new(pool.clone());
    let mut tx = db.worker().await.unwrap();
    let n = ingest::purge_member_removals(&mut tx, ingest::MEMBER_REMOVAL_TTL)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(n, 1);
    let left: Vec<i64> = sqlx::query_scalar("select user_id from member_removals")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, vec![6]);
}
