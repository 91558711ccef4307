//! PostgreSQL restarted under a live subscriber (docs/targets.md): the hub's
//! listener reconnects and catches up from the event log, and a subscriber
//! either keeps receiving or is told to resume from a cursor — in both cases
//! it ends up with every event exactly once, in order.
//!
//! Restarting the shared test server would break every other test, so this
//! test runs its own private cluster (observer_db::server) on a free port.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use observer_api::live::hub::{Hub, HubConfig, LiveError, Subscription};
use observer_api::live::metrics::LiveMetrics;
use observer_db::events::{Cursor, Scope};
use observer_db::server::PrivatePostgres;
use observer_db::{migrate, Db};

const VIEW_AND_HISTORY: i64 = (1 << 10) | (1 << 16);
const VIEWER: i64 = 11;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn connect(url: &str) -> Db {
    // The server may still be starting up right after a restart.
    let start = Instant::now();
    loop {
        match Db::connect(url, 4).await {
            Ok(db) => return db,
            Err(err) if start.elapsed() < Duration::from_secs(30) => {
                eprintln!("waiting for PostgreSQL: {err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("PostgreSQL did not come back: {err}"),
        }
    }
}

/// One guild, one open channel, one member (the viewer).
async fn seed(db: &Db) {
    sqlx::raw_sql(&format!(
        "insert into guilds (guild_id, name, owner_id) values (1, 'one', 900);
         insert into roles (guild_id, role_id, permissions) values (1, 1, {VIEW_AND_HISTORY});
         insert into channels (guild_id, channel_id, kind, name) values (1, 101, 0, 'open');
         insert into members (guild_id, user_id, role_ids) values (1, {VIEWER}, '{{}}');"
    ))
    .execute(db.pool())
    .await
    .unwrap();
}

/// Writes messages `ids` (and their `created` events) in one worker transaction,
/// retrying while the server is unreachable.
async fn post(db: &Db, ids: std::ops::Range<i64>) {
    let start = Instant::now();
    loop {
        match try_post(db, ids.clone()).await {
            Ok(()) => return,
            Err(err) if start.elapsed() < Duration::from_secs(30) => {
                eprintln!("retrying a write: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("write failed: {err}"),
        }
    }
}

async fn try_post(db: &Db, ids: std::ops::Range<i64>) -> Result<(), observer_db::Error> {
    let mut tx = db.worker().await?;
    for id in ids {
        sqlx::query(
            "insert into messages (guild_id, message_id, channel_id, author_id, author_username, \
               content, created_at, seen_create) values (1, $1, 101, 7, 'author', $2, now(), true)",
        )
        .bind(id)
        .bind(format!("message {id}"))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "insert into message_events (guild_id, kind, channel_id, message_id) values (1, 1, 101, $1)",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Collects message ids until `want` have arrived. A subscription the hub ends
/// as unavailable (database down) is resumed from the cursor it names, as a
/// client would; the last delivered cursor is the fallback.
async fn collect(hub: &Hub, mut sub: Subscription, want: usize) -> Vec<i64> {
    let mut got = Vec::new();
    let mut last: Option<Cursor> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out with {got:?}");
        match tokio::time::timeout(left, sub.next()).await {
            Ok(Some(Ok(ev))) => {
                last = Some(ev.cursor());
                got.push(ev.row.message.message_id);
            }
            // A client resumes from the last cursor it received.
            Ok(Some(Err(LiveError::Unavailable { resume_from }))) => {
                sub = resubscribe(hub, last.or(resume_from)).await;
            }
            Ok(Some(Err(err))) => panic!("subscription ended: {err}"),
            Ok(None) => {
                sub = resubscribe(hub, last).await;
            }
            Err(_) => panic!("timed out with {got:?}"),
        }
    }
    got
}

async fn resubscribe(hub: &Hub, after: Option<Cursor>) -> Subscription {
    let start = Instant::now();
    loop {
        match hub.subscribe(VIEWER, Scope::default(), after).await {
            Ok(sub) => return sub,
            Err(err) if start.elapsed() < Duration::from_secs(30) => {
                eprintln!("resubscribing: {err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("cannot resubscribe: {err}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_misses_nothing_across_a_postgres_restart() {
    let dir = std::env::temp_dir().join(format!("observer-pg-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pg = PrivatePostgres::start(&dir, free_port()).await.unwrap();
    let db = connect(&pg.url()).await;
    migrate::run(db.pool()).await.unwrap();
    seed(&db).await;

    let hub = Hub::start(
        db.clone(),
        HubConfig {
            ready_timeout: Duration::from_secs(30),
            ..HubConfig::default()
        },
        LiveMetrics::default(),
    );
    let sub = hub.subscribe(VIEWER, Scope::default(), None).await.unwrap();
    let collector = {
        let hub = hub.clone();
        tokio::spawn(async move { collect(&hub, sub, 30).await })
    };

    post(&db, 1..11).await;
    // Let the first ten reach the subscriber, so the restart happens mid-stream.
    let start = Instant::now();
    while hub.cursor().is_none_or(|c| c.seq < 10) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "hub never read the first events"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    pg.restart().await.unwrap();
    // Written immediately after the restart, before the listener can be back:
    // only catching up from the log can deliver these.
    post(&db, 11..21).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    post(&db, 21..31).await;

    let got = collector.await.unwrap();
    assert_eq!(
        got,
        (1..31).collect::<Vec<_>>(),
        "every event once, in order"
    );

    hub.shutdown();
    db.pool().close().await;
    pg.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
