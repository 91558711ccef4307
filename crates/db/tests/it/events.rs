//! The event-log reads of `observer_db::events`: the xmin watermark under
//! out-of-order commits, purged messages, the access log, RLS-filtered replay.
#![allow(clippy::unwrap_used)]

use observer_db::events::{self, Cursor, EventKind, Scope};
use observer_db::{migrate, Db};
use sqlx::PgPool;

const VIEW: i64 = 1 << 10;
const HISTORY: i64 = 1 << 16;

/// Guild 1: 101 open, 102 hidden from @everyone, 103 visible without history.
/// User 11 a plain member.
async fn setup(pool: &PgPool) -> Db {
    migrate::apply_policies(pool).await.unwrap();
    sqlx::raw_sql(&format!(
        "insert into guilds (guild_id, name, owner_id) values (1, 'one', 900);
         insert into roles (guild_id, role_id, permissions) values (1, 1, {});
         insert into channels (guild_id, channel_id, kind, name) values
             (1, 101, 0, 'open'), (1, 102, 0, 'hidden'), (1, 103, 0, 'no-history');
         insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow, deny) values
             (1, 102, 1, 0, 0, {VIEW}), (1, 103, 1, 0, 0, {HISTORY});
         insert into members (guild_id, user_id, role_ids) values (1, 11, '{{}}');",
        VIEW | HISTORY
    ))
    .execute(pool)
    .await
    .unwrap();
    Db::new(pool.clone())
}

async fn write(tx: &mut observer_db::WorkerTx, channel: i64, id: i64) {
    sqlx::query(
        "insert into messages (guild_id, message_id, channel_id, content, created_at, seen_create) \
         values (1, $1, $2, 'hi', now(), true)",
    )
    .bind(id)
    .bind(channel)
    .execute(&mut **tx)
    .await
    .unwrap();
    sqlx::query(
        "insert into message_events (guild_id, kind, channel_id, message_id) values (1, 1, $1, $2)",
    )
    .bind(channel)
    .bind(id)
    .execute(&mut **tx)
    .await
    .unwrap();
}

async fn post(db: &Db, channel: i64, id: i64) {
    let mut tx = db.worker().await.unwrap();
    write(&mut tx, channel, id).await;
    tx.commit().await.unwrap();
}

/// Waits until every transaction older than now has finished, anywhere in
/// the cluster (other tests run concurrently): then everything committed so
/// far is below the watermark and readable.
async fn settle(db: &Db) {
    let mut tx = db.fanout().await.unwrap();
    let target: i64 =
        sqlx::query_scalar("select pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    tx.commit().await.unwrap();
    let start = std::time::Instant::now();
    loop {
        if head(db).await.xid >= target {
            return;
        }
        assert!(start.elapsed().as_secs() < 30, "watermark never advanced");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The fan-out watermark now.
async fn head(db: &Db) -> Cursor {
    let mut tx = db.fanout().await.unwrap();
    let head = events::head(&mut tx).await.unwrap();
    tx.commit().await.unwrap();
    head
}

async fn read_all(db: &Db, after: Cursor) -> (Vec<i64>, Cursor) {
    let mut tx = db.fanout().await.unwrap();
    let (rows, next) = events::read_after(&mut tx, after, 100).await.unwrap();
    tx.commit().await.unwrap();
    (rows.iter().map(|r| r.message.message_id).collect(), next)
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn the_watermark_holds_back_events_behind_an_open_older_transaction(pool: PgPool) {
    let db = setup(&pool).await;
    let start = head(&db).await;

    let mut older = db.worker().await.unwrap();
    write(&mut older, 101, 1).await;
    post(&db, 101, 2).await;
    // 2 is committed, but 1 (smaller xid) may still commit: nothing is final.
    let (ids, next) = read_all(&db, start).await;
    assert!(ids.is_empty(), "{ids:?}");
    assert_eq!(next, start);
    older.commit().await.unwrap();
    settle(&db).await;

    let (ids, next) = read_all(&db, start).await;
    assert_eq!(ids, [1, 2]);
    assert!(next > start);
    // Nothing twice.
    assert_eq!(read_all(&db, next).await.0, Vec::<i64>::new());
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn purged_messages_are_skipped_but_advance_the_cursor(pool: PgPool) {
    let db = setup(&pool).await;
    post(&db, 101, 1).await;
    post(&db, 101, 2).await;
    sqlx::query("delete from messages where message_id = 2")
        .execute(&pool)
        .await
        .unwrap();
    settle(&db).await;
    let (ids, next) = read_all(&db, Cursor::new(0, 0)).await;
    assert_eq!(ids, [1]);
    let last: (i64, i64) = sqlx::query_as(
        "select xid::text::bigint, seq from message_events order by xid desc, seq desc limit 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(next, Cursor::new(last.0, last.1));
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn replay_is_rls_filtered_history_within_bounds_and_scope(pool: PgPool) {
    let db = setup(&pool).await;
    for (channel, id) in [(101, 1), (102, 2), (103, 3), (101, 4), (101, 5)] {
        post(&db, channel, id).await;
    }
    settle(&db).await;
    let mut f = db.fanout().await.unwrap();
    let (all, upto) = events::read_after(&mut f, Cursor::new(0, 0), 100)
        .await
        .unwrap();
    f.commit().await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.iter().all(|e| e.kind == EventKind::Created));

    let replay = |after: Cursor, upto: Cursor, scope: Scope, limit: i64| {
        let db = db.clone();
        async move {
            let mut tx = db.viewer(11).await.unwrap();
            let rows = events::replay_for_viewer(&mut tx, after, upto, &scope, limit)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            rows.iter()
                .map(|r| r.message.message_id)
                .collect::<Vec<_>>()
        }
    };
    // 102 is invisible, 103 has no history: replay is history.
    assert_eq!(
        replay(Cursor::new(0, 0), upto, Scope::default(), 100).await,
        [1, 4, 5]
    );
    // Bounded above by `upto`, paged by `limit`.
    assert_eq!(
        replay(Cursor::new(0, 0), all[3].cursor, Scope::default(), 100).await,
        [1, 4]
    );
    assert_eq!(replay(all[0].cursor, upto, Scope::default(), 1).await, [4]);
    let scoped = Scope {
        guild_id: Some(1),
        channel_ids: Some(vec![103, 102]),
    };
    assert!(replay(Cursor::new(0, 0), upto, scoped, 100)
        .await
        .is_empty());

    let mut tx = db.viewer(11).await.unwrap();
    let visible = events::viewer_channels(&mut tx).await.unwrap();
    tx.commit().await.unwrap();
    let visible: Vec<(i64, bool)> = visible.iter().map(|c| (c.channel_id, c.history)).collect();
    assert_eq!(visible, [(101, true), (103, false)]);
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn access_changes_are_logged_per_guild_or_user(pool: PgPool) {
    let db = setup(&pool).await;
    settle(&db).await;
    let start = head(&db).await;
    sqlx::query("update members set role_ids = '{5}' where user_id = 11")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("update roles set permissions = 0 where role_id = 1")
        .execute(&pool)
        .await
        .unwrap();
    settle(&db).await;
    let mut tx = db.fanout().await.unwrap();
    let (rows, next) = events::access_after(&mut tx, start, 100).await.unwrap();
    let guilds = events::member_guild_ids(&mut tx, 11).await.unwrap();
    tx.commit().await.unwrap();
    let got: Vec<(i64, Option<i64>)> = rows.iter().map(|r| (r.guild_id, r.user_id)).collect();
    assert_eq!(got, [(1, Some(11)), (1, None)]);
    assert_eq!(next, rows[1].cursor);
    assert_eq!(guilds, [1]);

    let mut tx = db.fanout().await.unwrap();
    assert!(events::read_after(&mut tx, start, 0).await.is_err());
    tx.rollback().await.unwrap();
}

/// The fan-out reader's and the ingest writer's own sessions run as their
/// role for good (read only for fan-out), read what a role transaction reads
/// (the watermark included), and leave the pool's connections untouched.
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn own_sessions_run_as_their_role_and_leak_it_nowhere(pool: PgPool) {
    let db = setup(&pool).await;
    let mut fanout = db.fanout_conn().await.unwrap();
    let whoami = "select current_user::text";
    let user: String = sqlx::query_scalar(whoami)
        .fetch_one(&mut *fanout)
        .await
        .unwrap();
    assert_eq!(user, observer_db::tx::ROLE_FANOUT);

    // Read only: a write fails, and the session is still usable afterwards.
    let refused = sqlx::query("insert into guilds (guild_id, name) values (2, 'x')")
        .execute(&mut *fanout)
        .await;
    assert!(refused.is_err(), "{refused:?}");

    // The same events, the same watermark, as a role transaction.
    let start = head(&db).await;
    let mut older = db.worker().await.unwrap();
    write(&mut older, 101, 1).await;
    post(&db, 101, 2).await;
    let (rows, next) = events::read_after(&mut fanout, start, 100).await.unwrap();
    assert!(rows.is_empty(), "an open older transaction holds back 2");
    assert_eq!(next, start);
    older.commit().await.unwrap();
    settle(&db).await;
    let (rows, next) = events::read_after(&mut fanout, start, 100).await.unwrap();
    let ids: Vec<i64> = rows.iter().map(|r| r.message.message_id).collect();
    assert_eq!(ids, [1, 2]);
    assert_eq!(read_all(&db, start).await, (ids, next));
    fanout.close().await.unwrap();

    let mut worker = db.worker_conn().await.unwrap();
    let ops = [observer_db::ingest::IngestOp::MessageDelete {
        guild_id: 1,
        channel_id: 101,
        message_id: 1,
    }];
    observer_db::ingest::write_batch_on(&mut worker, &ops)
        .await
        .unwrap();
    worker.close().await.unwrap();
    let deleted: bool =
        sqlx::query_scalar("select deleted_at is not null from messages where message_id = 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(deleted);

    // Pooled connections never saw either role.
    for _ in 0..3 {
        let user: String = sqlx::query_scalar(whoami)
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_ne!(user, observer_db::tx::ROLE_FANOUT);
        assert_ne!(user, observer_db::tx::ROLE_WORKER);
    }
}
