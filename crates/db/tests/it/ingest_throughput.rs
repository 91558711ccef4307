//! Bulk ingest smoke test: many messages in large batches (the shape the
//! worker produces under load), replayed once more. Prints the rate; asserts
//! only correctness (timing belongs in BENCHMARKS.md, not in a test).

use chrono::{TimeZone, Utc};
use observer_db::ingest::{self, snowflake_at, snowflake_time, Author, IngestOp, NewMessage};
use observer_db::Db;
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn large_batches(pool: PgPool) -> anyhow::Result<()> {
    observer_db::migrate::apply_policies(&pool).await?;
    let db = Db::new(pool.clone());
    let base = Utc
        .timestamp_millis_opt(1_760_000_000_000)
        .single()
        .unwrap_or_default();
    let n = 20_000i64;
    let ops: Vec<IngestOp> = (0..n)
        .map(|i| {
            let id = snowflake_at(base) + (i << 12);
            IngestOp::MessageCreate(Box::new(NewMessage {
                guild_id: 1 + i % 4,
                channel_id: 100 + i % 16,
                message_id: id,
                author: Author {
                    id: 7 + i % 50,
                    username: format!("user{}", i % 50),
                    display_name: None,
                    avatar: None,
                    bot: false,
                },
                content: format!("message number {i} with some ordinary support text in it"),
                created_at: snowflake_time(id),
                edited_at: None,
                attachments: json!([]),
                reply_to_id: None,
            }))
        })
        .collect();
    for round in 0..2 {
        let started = std::time::Instant::now();
        for chunk in ops.chunks(2000) {
            let mut tx = db.worker().await?;
            ingest::write_batch(&mut tx, chunk).await?;
            tx.commit().await?;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "round {round}: {n} messages in {secs:.2}s = {:.0} msg/s",
            n as f64 / secs
        );
    }
    let rows: i64 = sqlx::query_scalar("select count(*) from messages")
        .fetch_one(&pool)
        .await?;
    let events: i64 = sqlx::query_scalar("select count(*) from message_events")
        .fetch_one(&pool)
        .await?;
    assert_eq!((rows, events), (n, n), "replay adds nothing");
    Ok(())
}
