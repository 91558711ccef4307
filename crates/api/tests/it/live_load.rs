//! A small load run of the hub (not a timed test: it asserts completeness and
//! prints numbers). 1,000 subscriptions of 100 viewers with different roles,
//! messages written in worker transactions, every subscription drained by its
//! own task. Prints deliveries/s, hand-off latency (writing transaction start
//! → subscriber task) p50/p99, fan-out reads per message and resident memory
//! per idle subscription. `LIVE_LOAD_MESSAGES=<n>` makes it bigger,
//! `LIVE_LOAD_BATCH=<n>` sets messages per worker transaction (default 20).
//! For the numbers run it alone (`cargo test -p observer-api --test it
//! live_load -- --nocapture`): memory is the whole process's, which the other
//! API tests share.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use chrono::Utc;
use observer_api::live::hub::{Hub, HubConfig};
use observer_api::live::metrics::LiveMetrics;
use observer_db::events::Scope;
use observer_db::{migrate, Db};
use sqlx::PgPool;

const VIEW: i64 = 1 << 10;
const HISTORY: i64 = 1 << 16;

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn fan_out_load(pool: PgPool) {
    migrate::apply_policies(&pool).await.unwrap();
    // Guild 1: 101 open, 102 for role 500 only; viewers 1000..1099, every
    // other one with role 500.
    let mut sql = format!(
        "insert into guilds (guild_id, name, owner_id) values (1, 'load', 900);
         insert into roles (guild_id, role_id, permissions) values (1, 1, {}), (1, 500, 0);
         insert into channels (guild_id, channel_id, kind, name) values (1, 101, 0, 'a'), (1, 102, 0, 'b');
         insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow, deny) values
             (1, 102, 1, 0, 0, {VIEW}), (1, 102, 500, 0, {VIEW}, 0);",
        VIEW | HISTORY
    );
    for v in 1000..1100 {
        let roles = if v % 2 == 0 { "{500}" } else { "{}" };
        sql.push_str(&format!(
            "insert into members (guild_id, user_id, role_ids) values (1, {v}, '{roles}');"
        ));
    }
    sqlx::raw_sql(&sql).execute(&pool).await.unwrap();
    let db = Db::new(pool.clone());
    let hub = Hub::start(
        db.clone(),
        HubConfig {
            buffer: 4096,
            ..HubConfig::default()
        },
        LiveMetrics::default(),
    );

    let subs_n = 1000usize;
    let rss_before = rss_bytes();
    let mut subs = Vec::with_capacity(subs_n);
    for i in 0..subs_n {
        subs.push(
            hub.subscribe(1000 + (i as i64 % 100), Scope::default(), None)
                .await
                .unwrap(),
        );
    }
    let rss_after = rss_bytes();

    let messages: i64 = std::env::var("LIVE_LOAD_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let batch: i64 = std::env::var("LIVE_LOAD_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|b| *b > 0)
        .unwrap_or(20);
    // Staff (even viewers) see both channels, the others half the messages.
    let expected_per_staff = messages as usize;
    let expected_per_plain = ((messages + 1) / 2) as usize;

    let mut consumers = Vec::with_capacity(subs_n);
    for (i, mut sub) in subs.into_iter().enumerate() {
        let want = if (i % 100) % 2 == 0 {
            expected_per_staff
        } else {
            expected_per_plain
        };
        consumers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(want);
            while lat.len() < want {
                let ev = tokio::time::timeout(Duration::from_secs(60), sub.next())
                    .await
                    .expect("stalled")
                    .expect("ended")
                    .expect("failed");
                lat.push((Utc::now() - ev.row.at).num_microseconds().unwrap_or(0));
            }
            lat
        }));
    }

    let reads_before = hub.metrics().reads.get();
    let start = Instant::now();
    let mut id = 1i64;
    while id <= messages {
        let mut tx = db.worker().await.unwrap();
        for _ in 0..batch.min(messages - id + 1) {
            let channel = if id % 2 == 0 { 102 } else { 101 };
            sqlx::query(
                "insert into messages (guild_id, message_id, channel_id, author_id, author_username, \
                   content, created_at, seen_create) values (1, $1, $2, 7, 'a', 'load', now(), true)",
            )
            .bind(id)
            .bind(channel)
            .execute(&mut *tx)
            .await
            .unwrap();
            sqlx::query(
                "insert into message_events (guild_id, kind, channel_id, message_id) values (1, 1, $1, $2)",
            )
            .bind(channel)
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
            id += 1;
        }
        tx.commit().await.unwrap();
    }
    let mut all: Vec<i64> = Vec::new();
    for c in consumers {
        all.extend(c.await.unwrap());
    }
    let elapsed = start.elapsed();
    let reads = hub.metrics().reads.get() - reads_before;
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0;
    let deliveries = all.len();
    assert_eq!(
        deliveries,
        50 * (expected_per_staff + expected_per_plain) * 10
    );
    println!(
        "LIVE LOAD: {subs_n} subscriptions, {messages} messages in transactions of {batch}: \
         {deliveries} deliveries in {:.3} s = {:.0}/s; hand-off latency p50 {:.2} ms, p99 {:.2} ms; \
         {reads} fan-out reads ({:.3} per message); rss per idle subscription ≈ {} bytes",
        elapsed.as_secs_f64(),
        deliveries as f64 / elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        reads as f64 / messages as f64,
        match (rss_before, rss_after) {
            (Some(b), Some(a)) => (a.saturating_sub(b) / subs_n as u64).to_string(),
            _ => "?".into(),
        }
    );
    hub.shutdown();
}
